import { describe, expect, it } from 'vitest';
import { normalizeConfig } from '../../common/hf-model.ts';
import { initLoraAdapter, loraTargets, peftKey, validateAdapter } from '../../common/lora.ts';
import { createRng } from '../../common/random.ts';
import type { LoraConfig } from '../../common/model-config.ts';

const llama = normalizeConfig({
  model_type: 'llama',
  vocab_size: 50,
  hidden_size: 32,
  intermediate_size: 48,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  num_hidden_layers: 2,
});
const qwen = normalizeConfig({ ...{ model_type: 'qwen2', vocab_size: 50, hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 1, num_hidden_layers: 1 } });
const gpt2 = normalizeConfig({ model_type: 'gpt2', vocab_size: 50, n_embd: 16, n_head: 2, n_layer: 2, n_positions: 32 });
const lora = (targetModules: string[], r = 4): LoraConfig => ({ r, alpha: 8, dropout: 0, targetModules });

describe('loraTargets', () => {
  it('llama GQA: k/v out = kvHeads * headDim, canonical module paths, layer-major order', () => {
    const t = loraTargets(llama, lora(['down_proj', 'v_proj', 'q_proj', 'k_proj', 'o_proj', 'gate_proj', 'up_proj']));
    expect(t).toHaveLength(14);
    expect(t.slice(0, 7).map((x) => x.kind)).toEqual(['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']);
    expect(t.map((x) => x.layer)).toEqual([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]);
    const byKind = Object.fromEntries(t.slice(7).map((x) => [x.kind, x]));
    expect(byKind.q_proj).toEqual({
      module: 'model.layers.1.self_attn.q_proj',
      weight: 'model.layers.1.self_attn.q_proj.weight',
      bias: null,
      inFeatures: 32,
      outFeatures: 32,
      conv1d: false,
      layer: 1,
      kind: 'q_proj',
      r: 4,
      scale: 2,
    });
    expect([byKind.k_proj!.inFeatures, byKind.k_proj!.outFeatures]).toEqual([32, 16]);
    expect([byKind.v_proj!.inFeatures, byKind.v_proj!.outFeatures]).toEqual([32, 16]);
    expect([byKind.o_proj!.inFeatures, byKind.o_proj!.outFeatures]).toEqual([32, 32]);
    expect([byKind.gate_proj!.inFeatures, byKind.gate_proj!.outFeatures]).toEqual([32, 48]);
    expect([byKind.up_proj!.inFeatures, byKind.up_proj!.outFeatures]).toEqual([32, 48]);
    expect(byKind.down_proj!.module).toBe('model.layers.1.mlp.down_proj');
    expect([byKind.down_proj!.inFeatures, byKind.down_proj!.outFeatures]).toEqual([48, 32]);
  });

  it('qwen2: q/k/v carry biases', () => {
    const t = loraTargets(qwen, lora(['q_proj', 'v_proj', 'o_proj']));
    expect(t.map((x) => x.bias)).toEqual(['model.layers.0.self_attn.q_proj.bias', 'model.layers.0.self_attn.v_proj.bias', null]);
    expect(t[1]!.outFeatures).toBe(8);
  });

  it('gpt2: Conv1D modules, c_proj matches attention and MLP projections', () => {
    const t = loraTargets(gpt2, lora(['c_fc', 'c_proj', 'c_attn']));
    expect(t.slice(0, 4).map((x) => [x.module, x.inFeatures, x.outFeatures])).toEqual([
      ['transformer.h.0.attn.c_attn', 16, 48],
      ['transformer.h.0.attn.c_proj', 16, 16],
      ['transformer.h.0.mlp.c_proj', 64, 16],
      ['transformer.h.0.mlp.c_fc', 16, 64],
    ]);
    expect(t.every((x) => x.conv1d && x.bias === `${x.module}.bias`)).toBe(true);
    expect(t).toHaveLength(8);
    expect(loraTargets(gpt2, lora(['c_proj'])).map((x) => x.module)).toEqual([
      'transformer.h.0.attn.c_proj',
      'transformer.h.0.mlp.c_proj',
      'transformer.h.1.attn.c_proj',
      'transformer.h.1.mlp.c_proj',
    ]);
  });

  it('rejects unknown modules, empty lists and bad hyperparameters', () => {
    expect(() => loraTargets(gpt2, lora(['q_proj']))).toThrow(/unknown module "q_proj" for gpt2; valid modules: c_attn, c_proj, c_fc/);
    expect(() => loraTargets(llama, lora(['c_attn']))).toThrow(/unknown module "c_attn" for llama; valid modules: q_proj, k_proj/);
    expect(() => loraTargets(llama, lora([]))).toThrow(/targetModules is empty/);
    expect(() => loraTargets(llama, lora(['q_proj'], 0))).toThrow(/lora\.r must be an integer >= 1/);
    expect(() => loraTargets(llama, { ...lora(['q_proj']), alpha: 0 })).toThrow(/lora\.alpha must be a number > 0/);
    expect(() => loraTargets(llama, { ...lora(['q_proj']), dropout: 1 })).toThrow(/lora\.dropout must be in \[0, 1\)/);
  });

  it('peftKey uses PEFT names', () => {
    expect(peftKey('model.layers.0.self_attn.q_proj', 'A')).toBe('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight');
    expect(peftKey('transformer.h.1.attn.c_attn', 'B')).toBe('base_model.model.transformer.h.1.attn.c_attn.lora_B.weight');
  });
});

describe('initLoraAdapter', () => {
  const targets = loraTargets(llama, lora(['q_proj', 'down_proj'], 8));

  it('A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, PEFT shapes', () => {
    const a = initLoraAdapter(targets, 8, 42);
    expect(a.size).toBe(2 * targets.length);
    for (const t of targets) {
      const A = a.get(peftKey(t.module, 'A'))!;
      const B = a.get(peftKey(t.module, 'B'))!;
      expect(A.shape).toEqual([8, t.inFeatures]);
      expect(B.shape).toEqual([t.outFeatures, 8]);
      expect(B.data.every((x) => x === 0)).toBe(true);
      const bound = 1 / Math.sqrt(t.inFeatures);
      let max = 0;
      let sum = 0;
      let sq = 0;
      for (const x of A.data) {
        max = Math.max(max, Math.abs(x));
        sum += x;
        sq += x * x;
      }
      expect(max).toBeLessThanOrEqual(bound);
      expect(max).toBeGreaterThan(0.9 * bound); // spread over the whole interval
      const n = A.data.length;
      expect(Math.abs(sum / n)).toBeLessThan(0.2 * bound);
      const variance = sq / n;
      expect(variance / (bound * bound)).toBeGreaterThan(1 / 3 - 0.08); // U(-b, b) has variance b^2 / 3
      expect(variance / (bound * bound)).toBeLessThan(1 / 3 + 0.08);
    }
  });

  it('is deterministic per seed', () => {
    const a = initLoraAdapter(targets, 8, 7);
    const b = initLoraAdapter(targets, 8, 7);
    const c = initLoraAdapter(targets, 8, 8);
    const key = peftKey(targets[0]!.module, 'A');
    expect(Array.from(a.get(key)!.data)).toEqual(Array.from(b.get(key)!.data));
    expect(Array.from(a.get(key)!.data)).not.toEqual(Array.from(c.get(key)!.data));
    const d = initLoraAdapter(targets, 8, 7, 'float64');
    expect(d.get(key)!.data).toBeInstanceOf(Float64Array);
  });

  it('seeded RNG: uniform in [0, 1) and standard normal', () => {
    const rng = createRng(123);
    let s = 0;
    let s2 = 0;
    const n = 20000;
    for (let i = 0; i < n; i++) {
      const u = rng.next();
      expect(u >= 0 && u < 1).toBe(true);
      const z = rng.normal();
      s += z;
      s2 += z * z;
    }
    expect(Math.abs(s / n)).toBeLessThan(0.05);
    expect(Math.abs(s2 / n - 1)).toBeLessThan(0.05);
    expect(createRng(5).next()).toBe(createRng(5).next());
    expect(createRng(5).next()).not.toBe(createRng(2 ** 32 + 5).next());
  });
});

describe('validateAdapter', () => {
  const targets = loraTargets(llama, lora(['q_proj', 'k_proj'], 4));

  it('accepts a fresh adapter and names the key, expected and actual shape when wrong', () => {
    const a = initLoraAdapter(targets, 4, 0);
    expect(() => validateAdapter(a, targets, 4)).not.toThrow();
    const kB = peftKey('model.layers.0.self_attn.k_proj', 'B');
    const wrong = new Map(a);
    wrong.set(kB, { shape: [32, 4], data: new Float32Array(128) });
    expect(() => validateAdapter(wrong, targets, 4)).toThrow(`key ${kB}: expected shape [16, 4], got [32, 4]`);
    expect(() => validateAdapter(a, targets, 8)).toThrow(/expected shape \[8, 32\], got \[4, 32\]/);
  });

  it('reports missing, unknown and non-finite entries', () => {
    const a = initLoraAdapter(targets, 4, 0);
    const kA = peftKey('model.layers.1.self_attn.q_proj', 'A');
    const missing = new Map(a);
    missing.delete(kA);
    expect(() => validateAdapter(missing, targets, 4)).toThrow(`missing key ${kA} (expected shape [4, 32])`);
    const extra = new Map(a);
    extra.set('base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight', { shape: [4, 32], data: new Float32Array(128) });
    expect(() => validateAdapter(extra, targets, 4)).toThrow(/unknown key base_model\.model\.model\.layers\.0\.self_attn\.v_proj\.lora_A\.weight/);
    const nan = new Map(a);
    const d = a.get(kA)!.data.slice();
    d[5] = NaN;
    nan.set(kA, { shape: [4, 32], data: d });
    expect(() => validateAdapter(nan, targets, 4)).toThrow(`key ${kA}: non-finite value NaN at index 5`);
  });
});
