import { describe, expect, it, beforeAll, afterAll } from 'vitest';
import { mkdtemp, mkdir, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readPeftAdapter, writePeftAdapter, ADAPTER_CONFIG, ADAPTER_WEIGHTS } from '../../common/peft.ts';
import { writeSafetensors, readSafetensors, type StWriteEntry } from '../../common/safetensors.ts';
import { normalizeConfig } from '../../common/hf-model.ts';
import { initLoraAdapter, loraTargets, peftKey, validateAdapter } from '../../common/lora.ts';
import { createRng } from '../../common/random.ts';
import type { TensorMap } from '../../common/tensor.ts';
import type { LoraConfig } from '../../common/model-config.ts';

let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'fedtune-peft-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const gpt2 = normalizeConfig({ model_type: 'gpt2', vocab_size: 50, n_embd: 16, n_head: 2, n_layer: 2, n_positions: 32 });
const llama = normalizeConfig({ model_type: 'llama', vocab_size: 50, hidden_size: 16, intermediate_size: 24, num_attention_heads: 2, num_key_value_heads: 1, num_hidden_layers: 1 });

function trained(adapter: TensorMap, seed: number): TensorMap {
  const rng = createRng(seed);
  const out: TensorMap = new Map();
  for (const [k, t] of adapter) out.set(k, { shape: t.shape, data: t.data.map(() => rng.normal()) });
  return out;
}

describe('PEFT adapter files', () => {
  it('round-trips weights and config (gpt2, fan_in_fan_out)', async () => {
    const lora: LoraConfig = { r: 4, alpha: 16, dropout: 0.05, targetModules: ['c_attn', 'c_proj'] };
    const targets = loraTargets(gpt2, lora);
    const adapter = trained(initLoraAdapter(targets, 4, 1), 2);
    const dir = join(root, 'gpt2-adapter');
    await writePeftAdapter(dir, adapter, { lora, baseModel: 'tiny-gpt2', fanInFanOut: true });
    expect((await readdir(dir)).sort()).toEqual([ADAPTER_CONFIG, ADAPTER_WEIGHTS]);
    expect(await readdir(root)).toEqual(['gpt2-adapter']); // no temporary directory left behind

    const cfg = JSON.parse(await readFile(join(dir, ADAPTER_CONFIG), 'utf8'));
    expect(cfg).toMatchObject({
      peft_type: 'LORA',
      task_type: 'CAUSAL_LM',
      r: 4,
      lora_alpha: 16,
      lora_dropout: 0.05,
      target_modules: ['c_attn', 'c_proj'],
      base_model_name_or_path: 'tiny-gpt2',
      bias: 'none',
      fan_in_fan_out: true,
      inference_mode: true,
      modules_to_save: null,
      init_lora_weights: true,
    });
    expect(cfg).not.toHaveProperty('use_rslora'); // PEFT 0.6 has no such field; plain LoRA leaves it out
    const st = await readSafetensors(join(dir, ADAPTER_WEIGHTS));
    expect(st.metadata).toEqual({ format: 'pt' });
    expect(st.tensors.get('base_model.model.transformer.h.0.attn.c_attn.lora_A.weight')).toMatchObject({ dtype: 'F32', shape: [4, 16] });
    expect(st.tensors.get('base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight')).toMatchObject({ dtype: 'F32', shape: [16, 4] });

    const back = await readPeftAdapter(dir);
    expect(back.config).toEqual({ ...lora, useRslora: false, baseModel: 'tiny-gpt2', fanInFanOut: true });
    expect([...back.adapter.keys()].sort()).toEqual([...adapter.keys()].sort());
    for (const [k, t] of adapter) {
      expect(back.adapter.get(k)!.shape).toEqual(t.shape);
      expect(Array.from(back.adapter.get(k)!.data)).toEqual(Array.from(t.data));
    }
    expect(() => validateAdapter(back.adapter, targets, 4)).not.toThrow();

    // gpt2 targets get fan_in_fan_out without being told
    const dir2 = join(root, 'gpt2-adapter-default');
    await writePeftAdapter(dir2, adapter, { lora, baseModel: 'tiny-gpt2' });
    expect((await readPeftAdapter(dir2)).config.fanInFanOut).toBe(true);
    await rm(dir2, { recursive: true });
  });

  it('replaces an existing adapter as a whole, and a rejected write leaves it untouched', async () => {
    const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj'] };
    const targets = loraTargets(llama, lora);
    const dir = join(root, 'replace');
    await writePeftAdapter(dir, initLoraAdapter(targets, 2, 1), { lora, baseModel: 'a' });
    const v2 = trained(initLoraAdapter(targets, 2, 1), 9);
    await writePeftAdapter(dir, v2, { lora, baseModel: 'b' });
    const back = await readPeftAdapter(dir);
    expect(back.config.baseModel).toBe('b');
    expect(back.config.fanInFanOut).toBe(false); // nn.Linear targets: no fan_in_fan_out
    const key = peftKey(targets[0]!.module, 'B');
    expect(Array.from(back.adapter.get(key)!.data)).toEqual(Array.from(v2.get(key)!.data));

    const bad = new Map(v2);
    bad.set(key, { shape: [16, 3], data: new Float32Array(48) });
    await expect(writePeftAdapter(dir, bad, { lora, baseModel: 'c' })).rejects.toThrow(`key ${key} has shape [16, 3] (rank 3), expected [out_features, 2]: module model.layers.0.self_attn.q_proj has r=2`);
    const nan = new Map(v2);
    nan.set(key, { shape: [16, 2], data: new Float32Array(32).fill(NaN) });
    await expect(writePeftAdapter(dir, nan, { lora, baseModel: 'c' })).rejects.toThrow(/non-finite value NaN/);
    expect((await readPeftAdapter(dir)).config.baseModel).toBe('b');
  });

  it('accepts keys with the .default adapter-name infix and half-precision weights', async () => {
    const dir = join(root, 'default-keys');
    await mkdir(dir);
    const m = new Map<string, StWriteEntry>([
      ['base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight', { dtype: 'F16', shape: [2, 16], data: new Float32Array(32).fill(0.5) }],
      ['base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight', { dtype: 'BF16', shape: [8, 2], data: new Float32Array(16).fill(-2) }],
    ]);
    await writeSafetensors(join(dir, ADAPTER_WEIGHTS), m);
    await writeFile(join(dir, ADAPTER_CONFIG), JSON.stringify({ peft_type: 'LORA', r: 2, lora_alpha: 4, lora_dropout: 0.1, target_modules: ['v_proj'], base_model_name_or_path: null }));
    const a = await readPeftAdapter(dir);
    expect([...a.adapter.keys()]).toEqual([
      'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight',
      'base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight',
    ]);
    expect(a.adapter.get('base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight')!.data[0]).toBe(-2);
    expect(a.config).toMatchObject({ r: 2, alpha: 4, dropout: 0.1, baseModel: '', fanInFanOut: false });
    expect(() => validateAdapter(a.adapter, loraTargets(llama, a.config), 2)).not.toThrow();
  });

  it('rejects wrong shapes on read naming the key', async () => {
    const dir = join(root, 'wrong-shape');
    await mkdir(dir);
    const key = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight';
    await writeSafetensors(
      join(dir, ADAPTER_WEIGHTS),
      new Map<string, StWriteEntry>([
        [key, { dtype: 'F32', shape: [3, 16], data: new Float32Array(48) }],
        ['base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight', { dtype: 'F32', shape: [16, 2], data: new Float32Array(32) }],
      ]),
    );
    await writeFile(join(dir, ADAPTER_CONFIG), JSON.stringify({ peft_type: 'LORA', r: 2, lora_alpha: 4, target_modules: ['q_proj'] }));
    await expect(readPeftAdapter(dir)).rejects.toThrow(`key ${key} has shape [3, 16] (rank 3), expected [2, in_features]: module model.layers.0.self_attn.q_proj has r=2`);
  });

  it('reports missing files and unsupported configurations', async () => {
    const dir = join(root, 'bad-config');
    await mkdir(dir);
    await expect(readPeftAdapter(dir)).rejects.toThrow(/has no adapter_config\.json/);
    const base = { peft_type: 'LORA', r: 2, lora_alpha: 4, target_modules: ['q_proj'] };
    const cases: Array<[Record<string, unknown>, RegExp]> = [
      [{ ...base, peft_type: 'IA3' }, /peft_type is "IA3"; only "LORA"/],
      [{ ...base, r: 0 }, /field "r" is 0; expected an integer >= 1/],
      [{ ...base, lora_alpha: undefined }, /field "lora_alpha" is missing/],
      [{ ...base, target_modules: 'all-linear' }, /target_modules is the pattern "all-linear"/],
      [{ ...base, target_modules: [] }, /field "target_modules" is \[\]/],
      [{ ...base, use_dora: 1 }, /field "use_dora" is 1; expected true or false/],
      [{ ...base, bias: 'all' }, /field "bias" is "all"/],
    ];
    for (const [cfg, msg] of cases) {
      await writeFile(join(dir, ADAPTER_CONFIG), JSON.stringify(cfg));
      await expect(readPeftAdapter(dir)).rejects.toThrow(msg);
    }
    await writeFile(join(dir, ADAPTER_CONFIG), JSON.stringify(base));
    await writeFile(join(dir, 'adapter_model.bin'), 'x');
    await expect(readPeftAdapter(dir)).rejects.toThrow(/no adapter_model\.safetensors \(found adapter_model\.bin/);
    await writeSafetensors(join(dir, ADAPTER_WEIGHTS), new Map([['model.embed.weight', { dtype: 'F32' as const, shape: [1], data: new Float32Array(1) }]]));
    await expect(readPeftAdapter(dir)).rejects.toThrow(/key model\.embed\.weight is not a PEFT LoRA key/);
  });
});
