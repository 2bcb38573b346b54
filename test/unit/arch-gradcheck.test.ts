/**
 * Gradient check of the architecture features (rope_scaling types, llama
 * attention/mlp biases and a head_dim apart from hidden/heads, sliding-window
 * masks, gpt2 attention scaling flags): the training graph's gradients against
 * central finite differences of the forward graph's loss, in float64, for
 * every weight (full mode) and for LoRA on every target module.
 */
import { describe, expect, it } from 'vitest';
import { Engine } from '../../worker/engine/engine.ts';
import type { Batch, LoadedModel, LoraConfig } from '../../common/model-config.ts';
import { computeFingerprint, normalizeConfig } from '../../common/hf-model.ts';
import { createRng } from '../../common/random.ts';
import { archModel, archRaw, randomIds } from './arch-models.ts';
import { gradCheck } from '../helpers/gradcheck.ts';

function batchOf(vocab: number, B: number, T: number, seed: number): Batch {
  const ids = randomIds(vocab, B, T, seed).flat();
  const labels = Int32Array.from(ids);
  labels[0] = -100;
  labels[T] = -100;
  return { batchSize: B, seqLen: T, inputIds: Int32Array.from(ids), labels };
}

function model(raw: Record<string, unknown>, seed: number): LoadedModel {
  const config = normalizeConfig(raw, 'arch-gradcheck');
  const weights = archModel(config, seed);
  return { dir: '(memory)', config, weights, fingerprint: computeFingerprint(config, weights) };
}

const CASES: Array<{ name: string; raw: Record<string, unknown>; T: number }> = [
  {
    name: 'llama3 rope_scaling + attention_bias + mlp_bias + head_dim 16',
    raw: archRaw('llama', {
      num_hidden_layers: 1,
      rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 32 },
      attention_bias: true,
      mlp_bias: true,
      head_dim: 16,
    }),
    T: 8,
  },
  { name: 'yarn rope_scaling', raw: archRaw('qwen2', { num_hidden_layers: 1, max_position_embeddings: 32, rope_scaling: { rope_type: 'yarn', factor: 4, original_max_position_embeddings: 8 } }), T: 10 },
  { name: 'dynamic rope_scaling past max_position_embeddings', raw: archRaw('llama', { num_hidden_layers: 1, max_position_embeddings: 6, rope_scaling: { rope_type: 'dynamic', factor: 2 } }), T: 9 },
  { name: 'mistral sliding_window 3', raw: archRaw('mistral', { num_hidden_layers: 1, sliding_window: 3 }), T: 8 },
  { name: 'qwen2 sliding window on layer 1 only', raw: archRaw('qwen2', { use_sliding_window: true, sliding_window: 3, max_window_layers: 1 }), T: 8 },
  { name: 'qwen3 q/k norms with attention_bias', raw: archRaw('qwen3', { num_hidden_layers: 1, head_dim: 16, attention_bias: true }), T: 8 },
  {
    name: 'gemma2 (soft-capping that binds, sliding layer 0, (1 + w) norms, attention_bias)',
    raw: archRaw('gemma2', { head_dim: 16, query_pre_attn_scalar: 16, attn_logit_softcapping: 1.5, final_logit_softcapping: 2.0, sliding_window: 3, attention_bias: true, tie_word_embeddings: true }),
    T: 8,
  },
  {
    name: 'phi3 fused projections, longrope past the original context, sliding_window',
    raw: archRaw('phi3', {
      num_hidden_layers: 1,
      original_max_position_embeddings: 4,
      sliding_window: 3,
      rope_scaling: { type: 'longrope', short_factor: [1, 1.1, 1.3, 1.7], long_factor: [1, 2, 5, 9] },
    }),
    T: 8,
  },
  { name: 'gpt2 scale_attn_weights false + scale_attn_by_inverse_layer_idx', raw: archRaw('gpt2', { scale_attn_weights: false, scale_attn_by_inverse_layer_idx: true }), T: 8 },
];

describe('architecture features: gradient check (float64, central differences)', () => {
  CASES.forEach((c, i) => {
    it(`${c.name}: full fine-tuning, every weight`, async () => {
      const m = model(c.raw, 10 + i);
      const engine = Engine.create(m, { mode: 'full', dtype: 'float64', threads: 1 });
      const { worst, checked } = await gradCheck(engine, engine.initParams(0), batchOf(m.config.vocabSize, 2, c.T, 20 + i), 30 + i);
      expect(checked).toBe(m.weights.size);
      expect(worst).toBeLessThan(1e-6);
      await engine.close();
    });
  });

  it('phi3: LoRA on qkv_proj, o_proj, gate_up_proj, down_proj', async () => {
    const m = model(archRaw('phi3', { original_max_position_embeddings: 64 }), 8);
    const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj'] };
    const engine = Engine.create(m, { mode: 'lora', lora, dtype: 'float64', threads: 1 });
    const params = engine.initParams(4);
    expect(params.get('base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight')!.shape).toEqual([64, 2]);
    expect(params.get('base_model.model.model.layers.1.mlp.gate_up_proj.lora_B.weight')!.shape).toEqual([48, 2]);
    const rng = createRng(5);
    for (const [name, t] of params) if (name.endsWith('lora_B.weight')) for (let k = 0; k < t.data.length; k++) t.data[k] = 0.3 * rng.normal();
    const { worst, checked } = await gradCheck(engine, params, batchOf(m.config.vocabSize, 2, 8, 6), 7);
    expect(checked).toBe(16);
    expect(worst).toBeLessThan(1e-6);
    await engine.close();
  });

  it('llama with every bias: LoRA on every target module (o_proj and MLP biases included)', async () => {
    const m = model(CASES[0]!.raw, 3);
    const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] };
    const engine = Engine.create(m, { mode: 'lora', lora, dtype: 'float64', threads: 1 });
    const params = engine.initParams(4);
    const rng = createRng(5);
    for (const [name, t] of params) if (name.endsWith('lora_B.weight')) for (let k = 0; k < t.data.length; k++) t.data[k] = 0.3 * rng.normal();
    const { worst, checked } = await gradCheck(engine, params, batchOf(m.config.vocabSize, 2, 8, 6), 7);
    expect(checked).toBe(14);
    expect(worst).toBeLessThan(1e-6);
    await engine.close();
  });
});
