import { describe, expect, it, beforeAll, afterAll } from 'vitest';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readPeftAdapter, writePeftAdapter, ADAPTER_CONFIG } from '../../common/peft.ts';
import { PEFT_06_LORA_KEYS, disallowedWrittenKeys } from '../../common/peft-keys.ts';
import { CheckpointStore } from '../../coordinator/store.ts';

let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'fedtune-peft-keys-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/**
 * The field names of an adapter_config.json written by PEFT 0.6.x
 * (save_pretrained of a LoraConfig; e.g. huggingface.co/Ext-Sub/llama-7b_alpaca-gpt4-untruthful_lora),
 * typed in independently of common/peft-keys.ts.
 */
const PEFT_06_WRITTEN = [
  'alpha_pattern', 'auto_mapping', 'base_model_name_or_path', 'bias', 'fan_in_fan_out', 'inference_mode', 'init_lora_weights',
  'layers_pattern', 'layers_to_transform', 'lora_alpha', 'lora_dropout', 'modules_to_save', 'peft_type', 'r', 'rank_pattern',
  'revision', 'target_modules', 'task_type',
];

const Q_A = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight';
const Q_B = 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight';
const adapter = new Map([
  [Q_A, { shape: [2, 4], data: new Float32Array(8).fill(0.25) }],
  [Q_B, { shape: [4, 2], data: new Float32Array(8).fill(-0.5) }],
]);

async function writtenKeys(dir: string): Promise<string[]> {
  return Object.keys(JSON.parse(await readFile(join(dir, ADAPTER_CONFIG), 'utf8'))).sort();
}

async function writeRawAdapter(dir: string, cfg: Record<string, unknown>): Promise<void> {
  await rm(dir, { recursive: true, force: true });
  await writePeftAdapter(dir, adapter, { lora: { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj'] }, baseModel: 'm' });
  await writeFile(join(dir, ADAPTER_CONFIG), JSON.stringify(cfg));
}

describe('adapter_config.json fields every PEFT >= 0.6 loads', () => {
  it('the allowed list is exactly the fields PEFT 0.6 writes', () => {
    expect([...PEFT_06_LORA_KEYS].sort()).toEqual([...PEFT_06_WRITTEN].sort());
    expect(disallowedWrittenKeys({ r: 1, lora_bias: false, megatron_core: 'megatron.core' })).toEqual(['lora_bias', 'megatron_core']);
    // use_dora is written for DoRA adapters only (PEFT >= 0.9.0), as use_rslora for rsLoRA ones.
    expect(disallowedWrittenKeys({ r: 1, use_dora: true, use_rslora: true })).toEqual([]);
  });

  it('writePeftAdapter writes only 0.6 fields (plus use_rslora for rsLoRA adapters)', async () => {
    const plain = join(root, 'plain');
    await writePeftAdapter(plain, adapter, { lora: { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj'] }, baseModel: 'm' });
    expect(await writtenKeys(plain)).toEqual([...PEFT_06_WRITTEN].sort());
    const rs = join(root, 'rslora');
    await writePeftAdapter(rs, adapter, { lora: { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj'], useRslora: true }, baseModel: 'm' });
    expect(await writtenKeys(rs)).toEqual([...PEFT_06_WRITTEN, 'use_rslora'].sort());
  });

  it("the coordinator's checkpoints write only 0.6 fields", async () => {
    for (const useRslora of [false, true]) {
      const store = new CheckpointStore<{ format: string; n: number }>({
        root: join(root, `ckpt-${useRslora}`),
        runName: 'run',
        unit: 'round',
        format: 'test/1',
        numberOf: (s) => s.n,
        baseModel: 'm',
        fanInFanOut: false,
        lora: { dropout: 0, targetModules: ['q_proj'], useRslora },
      });
      const { path } = await store.write({ format: 'test/1', n: 1 }, adapter, { r: 2, alpha: 4 });
      expect(await writtenKeys(path)).toEqual((useRslora ? [...PEFT_06_WRITTEN, 'use_rslora'] : PEFT_06_WRITTEN).sort());
      expect((await readPeftAdapter(path)).config.useRslora).toBe(useRslora);
    }
  });
});

describe('reading adapter_config.json fields', () => {
  const base = { peft_type: 'LORA', r: 2, lora_alpha: 4, target_modules: ['q_proj'] };

  it('accepts a config written by a recent PEFT with every field at its default', async () => {
    // Field set and defaults of PEFT 0.17 save_pretrained (LoraConfig defaults).
    const recent = {
      ...base,
      alpha_pattern: {}, auto_mapping: { base_model_class: 'LlamaForCausalLM', parent_library: 'transformers.models.llama.modeling_llama' },
      base_model_name_or_path: 'm', bias: 'none', corda_config: null, eva_config: null, exclude_modules: null, fan_in_fan_out: false,
      inference_mode: true, init_lora_weights: true, layer_replication: null, layers_pattern: null, layers_to_transform: null,
      loftq_config: {}, lora_bias: false, lora_dropout: 0.05, megatron_config: null, megatron_core: 'megatron.core',
      modules_to_save: null, qalora_group_size: 16, rank_pattern: {}, revision: null, target_parameters: null, task_type: 'CAUSAL_LM',
      trainable_token_indices: null, use_dora: false, use_qalora: false, use_rslora: false,
    };
    const dir = join(root, 'recent');
    await writeRawAdapter(dir, recent);
    const a = await readPeftAdapter(dir);
    expect(a.config).toMatchObject({ r: 2, alpha: 4, dropout: 0.05, useRslora: false, targetModules: ['q_proj'] });
    expect(a.adapter.get(Q_B)!.data[0]).toBe(-0.5);
  });

  it('refuses an unknown field naming it', async () => {
    const dir = join(root, 'unknown');
    await writeRawAdapter(dir, { ...base, fedtune_round: 3 });
    await expect(readPeftAdapter(dir)).rejects.toThrow(/field "fedtune_round" is not a field of PEFT's LoraConfig .*remove it/);
  });

  it('refuses fields fedtune does not implement unless at their default, saying what it supports', async () => {
    const dir = join(root, 'unsupported');
    const cases: Array<[Record<string, unknown>, RegExp]> = [
      // The per-module fields are implemented: refused only where the tensors disagree with them.
      [{ layers_to_transform: [1] }, /is for module model\.layers\.0\.self_attn\.q_proj in layer 0, but layers_to_transform is \[1\]/],
      [{ layers_pattern: 'layers' }, /field "layers_pattern" is set but field "layers_to_transform" is not/],
      [{ rank_pattern: { q_proj: 4 } }, /expected \[4, in_features\]: rank_pattern key "q_proj" gives module model\.layers\.0\.self_attn\.q_proj rank 4/],
      [{ rank_pattern: { q_proj: 0 } }, /"rank_pattern": key "q_proj" has rank 0; a rank must be an integer >= 1/],
      [{ use_dora: true }, /DoRA module model\.layers\.0\.self_attn\.q_proj has no magnitude vector \(base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_magnitude_vector missing; use_dora is true\)/],
      [{ modules_to_save: ['lm_head'] }, /field "modules_to_save" is \["lm_head"\]; fedtune supports only null/],
      [{ init_lora_weights: 'pissa' }, /field "init_lora_weights" is "pissa"; .*convert them to plain LoRA/],
      [{ use_rslora: 'yes' }, /field "use_rslora" is "yes"; expected true or false/],
    ];
    for (const [extra, msg] of cases) {
      await writeRawAdapter(dir, { ...base, ...extra });
      await expect(readPeftAdapter(dir)).rejects.toThrow(msg);
    }
    for (const atDefault of [{ layers_to_transform: null }, { rank_pattern: {} }, { use_dora: false }, { modules_to_save: null }, { init_lora_weights: 'gaussian' }, { layers_to_transform: [0], layers_pattern: 'layers' }, { alpha_pattern: { q_proj: 8 } }]) {
      await writeRawAdapter(dir, { ...base, ...atDefault });
      await expect(readPeftAdapter(dir)).resolves.toMatchObject({ config: { r: 2 } });
    }
  });
});

