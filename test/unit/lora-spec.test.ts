/**
 * The LoRA variants travel from the run config to the worker unchanged:
 * run config -> LoraConfig -> wire LoraSpec -> protobuf bytes -> LoraConfig,
 * the pattern keys in their order (PEFT tries them in order). What fedtune does
 * not implement is refused by name.
 */
import { describe, expect, it } from 'vitest';
import { parseRunConfig, RunConfigError } from '../../common/config.ts';
import { loraConfigFromSpec, loraConfigOf, loraSpecOf } from '../../common/lora-spec.ts';
import { trainingSpecOf } from '../../coordinator/tasks.ts';
import { localSpecOf } from '../../worker/agent.ts';
import { TrainingSpec } from '../../proto/gen/fedtune/v1/coordinator.ts';

const base = () => ({ name: 'demo', model: { path: 'm' }, training: { steps: 3 }, rounds: 2, server: { join_token: 'tok' } });
const issues = (raw: unknown): string => {
  try {
    parseRunConfig(raw, 'run.yaml');
  } catch (err) {
    expect(err).toBeInstanceOf(RunConfigError);
    return (err as RunConfigError).issues.join('\n');
  }
  throw new Error('expected the config to be rejected');
};

describe('LoRA variants over the wire', () => {
  it('rsLoRA, patterns, layers and the LoRA+ ratio reach the worker as configured', () => {
    const cfg = parseRunConfig({
      ...base(),
      lora: {
        r: 4,
        alpha: 8,
        target_modules: ['q_proj', 'v_proj', 'down_proj'],
        use_rslora: true,
        rank_pattern: { 'layers.0.self_attn.v_proj': 2, v_proj: 6, down_proj: 3 },
        alpha_pattern: { q_proj: 1.5 },
        layers_to_transform: [2, 0],
        layers_pattern: 'layers',
      },
      training: { steps: 3, lora_plus_ratio: 16 },
    });
    const bytes = TrainingSpec.encode(trainingSpecOf(cfg)).finish();
    const local = localSpecOf(TrainingSpec.decode(bytes));
    expect(local.lora).toEqual({
      r: 4,
      alpha: 8,
      dropout: 0,
      targetModules: ['q_proj', 'v_proj', 'down_proj'],
      useRslora: true,
      rankPattern: { 'layers.0.self_attn.v_proj': 2, v_proj: 6, down_proj: 3 },
      alphaPattern: { q_proj: 1.5 },
      layersToTransform: [2, 0],
      layersPattern: ['layers'],
    });
    // Order is meaning: the layer-specific key stays before the general one.
    expect(Object.keys(local.lora.rankPattern!)).toEqual(['layers.0.self_attn.v_proj', 'v_proj', 'down_proj']);
    expect(local.loraPlusRatio).toBe(16);
  });

  it('a run without variants sends plain LoRA and a ratio of 1', () => {
    const local = localSpecOf(TrainingSpec.decode(TrainingSpec.encode(trainingSpecOf(parseRunConfig(base()))).finish()));
    expect(local.lora).toEqual({ r: 8, alpha: 16, dropout: 0, targetModules: ['q_proj', 'v_proj'] });
    expect(local.loraPlusRatio).toBe(1);
    // A spec from a coordinator that predates the field (0 on the wire) is plain LoRA too.
    expect(localSpecOf(TrainingSpec.decode(TrainingSpec.encode({ ...trainingSpecOf(parseRunConfig(base())), loraPlusRatio: 0 }).finish())).loraPlusRatio).toBe(1);
  });

  it("a site's own rank keeps the run's scale on B A (plain alpha / r and rsLoRA alpha / sqrt(r))", () => {
    const plain = parseRunConfig({ ...base(), lora: { r: 8, alpha: 16 } }).lora;
    const at4 = loraConfigOf(plain, 4);
    expect(at4.alpha / at4.r).toBeCloseTo(16 / 8, 12);
    const rs = parseRunConfig({ ...base(), lora: { r: 8, alpha: 16, use_rslora: true } }).lora;
    const rs2 = loraConfigOf(rs, 2);
    expect(rs2.alpha / Math.sqrt(rs2.r)).toBeCloseTo(16 / Math.sqrt(8), 12);
    expect(loraConfigFromSpec(loraSpecOf(rs2))).toEqual(rs2);
  });

  it('a wire pattern with a key twice is refused, not folded', () => {
    expect(() => loraConfigFromSpec({ ...loraSpecOf({ r: 2, alpha: 2, dropout: 0, targetModules: ['q_proj'] }), rankPattern: [{ key: 'q_proj', value: 2 }, { key: 'q_proj', value: 4 }] })).toThrow(
      /LoraSpec\.rank_pattern: key "q_proj" is given twice/,
    );
  });
});

describe('run config: LoRA variant fields checked by name', () => {
  it('refuses what is not implemented and what cannot mean anything', () => {
    expect(issues({ ...base(), lora: { layers_pattern: 'layers' } })).toMatch(/lora\.layers_pattern.*needs layers_to_transform/);
    expect(issues({ ...base(), lora: { layers_to_transform: [1, 1] } })).toMatch(/lora\.layers_to_transform.*lists layer 1 twice/);
    expect(issues({ ...base(), lora: { rank_pattern: { q_proj: 0 } } })).toMatch(/lora\.rank_pattern\.q_proj/);
    expect(issues({ ...base(), lora: { rank_pattern: { '3': 4 } } })).toMatch(/lora\.rank_pattern\.3.*a bare number names no module/);
    expect(issues({ ...base(), lora: { alpha_pattern: { q_proj: -1 } } })).toMatch(/lora\.alpha_pattern\.q_proj/);
    expect(issues({ ...base(), training: { steps: 3, lora_plus_ratio: 0 } })).toMatch(/training\.lora_plus_ratio/);
  });

  it('accepts DoRA and carries it to the worker', () => {
    const c = parseRunConfig({ ...base(), lora: { use_dora: true } });
    expect(localSpecOf(TrainingSpec.decode(TrainingSpec.encode(trainingSpecOf(c)).finish())).lora.useDora).toBe(true);
  });

  it('accepts one layer index and one layers_pattern name as PEFT writes them', () => {
    const c = parseRunConfig({ ...base(), lora: { layers_to_transform: 1, layers_pattern: 'layers' } });
    expect(loraConfigOf(c.lora)).toMatchObject({ layersToTransform: [1], layersPattern: ['layers'] });
  });
});
