/**
 * DoRA (Liu et al. 2024, PEFT use_dora): W' = m * (W + s B A) / ||W + s B A||_c,
 * the norm per output feature. Logits against the float64 PyTorch reference
 * (test/reference/peft_ref.py merges the adapter as the paper defines it);
 * gradients against finite differences in float64 of the function PEFT
 * differentiates, in which the norm is a constant (paper §4.3: PEFT detaches
 * it); the PEFT file format both ways; merge; the coordinator's magnitudes;
 * the federated strategies on magnitude tensors.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Engine } from '../../worker/engine/engine.ts';
import { loadModel, writeModelFiles } from '../../worker/engine/model.ts';
import { mergeAdapter } from '../../worker/engine/merge.ts';
import { computeFingerprint, normalizeConfig } from '../../common/hf-model.ts';
import { adapterShapes, loraTargets, peftKey, peftMagnitudeKey, validateAdapter, type LoraTarget } from '../../common/lora.ts';
import { readDoraMagnitudes } from '../../common/dora-norms.ts';
import { ADAPTER_CONFIG, ADAPTER_WEIGHTS, readPeftAdapter, writePeftAdapter } from '../../common/peft.ts';
import { PEFT_IMPLEMENTED_KEYS, disallowedWrittenKeys } from '../../common/peft-keys.ts';
import { readSafetensors, serializeSafetensors, type StWriteEntry } from '../../common/safetensors.ts';
import { parseRunConfig } from '../../common/config.ts';
import { MeanAggregator } from '../../coordinator/strategies/fedavg.ts';
import { createStrategy } from '../../coordinator/strategies/index.ts';
import type { FitUpdate, GlobalAdapter, Strategy } from '../../coordinator/strategies/strategy.ts';
import { createRng } from '../../common/random.ts';
import type { Batch, LoadedModel, LoraConfig, ModelConfig } from '../../common/model-config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { randomConfig, randomModel, randomBatch } from '../helpers/random-model.ts';
import { gradCheck } from '../helpers/gradcheck.ts';
import { referenceAvailable, referenceLogits } from '../helpers/reference.ts';
import { archModel, archRaw, randomIds } from './arch-models.ts';

const haveTorch = referenceAvailable('dora');

const root = mkdtempSync(join(tmpdir(), 'fedtune-dora-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** ||V||_c of V = W + s B A per output feature, in float64 (W as stored: [out, in], Conv1D [in, out]). */
function outNorms(t: LoraTarget, W: ArrayLike<number>, A?: ArrayLike<number>, B?: ArrayLike<number>): Float64Array {
  const { inFeatures: nIn, outFeatures: nOut, r } = t;
  const out = new Float64Array(nOut);
  for (let o = 0; o < nOut; o++) {
    let s = 0;
    for (let i = 0; i < nIn; i++) {
      let v = t.conv1d ? W[i * nOut + o]! : W[o * nIn + i]!;
      if (A && B) for (let k = 0; k < r; k++) v += t.scale * B[o * r + k]! * A[k * nIn + i]!;
      s += v * v;
    }
    out[o] = Math.sqrt(s);
  }
  return out;
}

/** Random A and B, and magnitudes away from ||W||_c so that every DoRA term matters. */
function randomDoraAdapter(targets: readonly LoraTarget[], weights: TensorMap, seed: number, dtype: 'float32' | 'float64' = 'float32'): TensorMap {
  const rng = createRng(seed);
  const make = (n: number) => (dtype === 'float64' ? new Float64Array(n) : new Float32Array(n));
  const out: TensorMap = new Map();
  for (const [k, shape] of adapterShapes(targets)) {
    if (k.endsWith('.lora_magnitude_vector')) continue;
    const d = make(shape[0]! * shape[1]!);
    for (let i = 0; i < d.length; i++) d[i] = 0.3 * rng.normal();
    out.set(k, { shape, data: d });
  }
  for (const t of targets) {
    const n = outNorms(t, weights.get(t.weight)!.data);
    const m = make(t.outFeatures);
    for (let o = 0; o < m.length; o++) m[o] = n[o]! * (1 + 0.4 * rng.normal());
    out.set(peftMagnitudeKey(t.module), { shape: [t.outFeatures], data: m });
  }
  return out;
}

async function archDir(name: string, raw: Record<string, unknown>, seed: number, opts: { dtype?: 'float32' | 'bfloat16'; shards?: number } = {}) {
  const dir = join(root, name);
  await mkdir(dir, { recursive: true });
  const config = normalizeConfig(raw, name);
  const weights = archModel(config, seed);
  await writeModelFiles(dir, raw, weights, opts);
  await writeFile(join(dir, 'tokenizer.json'), '{}'); // present as a model directory needs; never read here
  return { dir, config, weights };
}

const reference = (script: string, dir: string, ids: number[][], adapter?: string) => referenceLogits(script, dir, ids, adapter ? { adapter } : {});

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
  return worst;
}

function batchOf(ids: number[][]): Batch {
  const flat = Int32Array.from(ids.flat());
  return { batchSize: ids.length, seqLen: ids[0]!.length, inputIds: flat, labels: Int32Array.from(flat) };
}

const asModel = (dir: string, config: ModelConfig, weights: TensorMap): LoadedModel => ({ dir, config, weights, fingerprint: computeFingerprint(config, weights) });

interface RefCase {
  name: string;
  raw: Record<string, unknown>;
  lora: LoraConfig;
  script: string;
}

const REF_CASES: RefCase[] = [
  {
    name: 'llama with attention_bias / mlp_bias: DoRA with rsLoRA, rank_pattern and alpha_pattern, layers_to_transform',
    raw: archRaw('llama', { num_hidden_layers: 3, attention_bias: true, mlp_bias: true }),
    lora: {
      r: 4,
      alpha: 8,
      dropout: 0,
      targetModules: ['q_proj', 'v_proj', 'o_proj', 'down_proj'],
      useRslora: true,
      useDora: true,
      rankPattern: { 'layers.0.self_attn.q_proj': 2, down_proj: 3 },
      alphaPattern: { o_proj: 20 },
      layersToTransform: [0, 2],
    },
    script: 'llama_ref.py',
  },
  {
    name: 'gemma2: DoRA on every target module',
    raw: archRaw('gemma2', { head_dim: 16, query_pre_attn_scalar: 16, attn_logit_softcapping: 50, final_logit_softcapping: 30, sliding_window: 4, tie_word_embeddings: true }),
    lora: { r: 3, alpha: 6, dropout: 0, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], useDora: true },
    script: 'gemma2_ref.py',
  },
  {
    name: 'gpt2: DoRA on Conv1D c_attn / c_proj / c_fc (weights stored [in, out], fan_in_fan_out)',
    raw: archRaw('gpt2'),
    lora: { r: 2, alpha: 5, dropout: 0, targetModules: ['c_attn', 'c_proj', 'c_fc'], useDora: true },
    script: 'gpt2_ref.py',
  },
];

describe.skipIf(!haveTorch)('DoRA logits against the float64 PyTorch reference (float32, max |diff| <= 1e-4)', () => {
  REF_CASES.forEach((c, i) => {
    it(c.name, async () => {
      const { dir, config, weights } = await archDir(`ref${i}`, c.raw, 700 + i);
      const targets = loraTargets(config, c.lora);
      expect(targets.every((t) => t.dora)).toBe(true);
      const adapter = randomDoraAdapter(targets, weights, 800 + i);
      const adapterDir = join(root, `ref${i}-adapter`);
      await writePeftAdapter(adapterDir, adapter, { lora: c.lora, baseModel: dir });
      const back = await readPeftAdapter(adapterDir);
      expect(back.config.useDora).toBe(true);

      const engine = Engine.create(asModel(dir, config, weights), { mode: 'lora', lora: back.config, dtype: 'float32', threads: 1 });
      const ids = randomIds(config.vocabSize, 2, 10, 900 + i);
      const { logits } = await engine.forward(back.adapter, batchOf(ids));
      await engine.close();
      const ref = reference(c.script, dir, ids, adapterDir).flat(2);
      const diff = maxAbsDiff(logits, ref);
      expect(diff).toBeLessThanOrEqual(1e-4);

      // The same A and B as a plain LoRA adapter: the reference must differ clearly, so DoRA is exercised.
      const plainDir = join(root, `ref${i}-plain`);
      const plain = new Map([...adapter].filter(([k]) => !k.endsWith('.lora_magnitude_vector')));
      await writePeftAdapter(plainDir, plain, { lora: { ...c.lora, useDora: false }, baseModel: dir });
      const off = maxAbsDiff(logits, reference(c.script, dir, ids, plainDir).flat(2));
      expect(off).toBeGreaterThan(1e-2);
    });
  });
});

/**
 * Central differences of the function PEFT differentiates: the layer's output
 * with n = ||W + s B A||_c held at its value at the point of the check. The
 * engine's forward only uses m / n, so the loss at (A', B', m) with n held at
 * n0 is the engine's loss at (A', B', m * n(A', B') / n0).
 */
/**
 * The gradient check with the norm detached: each shifted point's magnitude is
 * rescaled by n(A', B') / n0, so the engine's forward computes m * (W + sBA') / n0,
 * the function whose gradient PEFT takes (the norm held at its value).
 */
function detachedGradCheck(engine: Engine, targets: readonly LoraTarget[], weights: TensorMap, params: TensorMap, batch: Batch, seed: number) {
  const byKey = new Map<string, LoraTarget>();
  for (const t of targets) for (const k of [peftKey(t.module, 'A'), peftKey(t.module, 'B')]) byKey.set(k, t);
  const n0 = new Map(targets.map((t) => [t.module, outNorms(t, weights.get(t.weight)!.data, params.get(peftKey(t.module, 'A'))!.data, params.get(peftKey(t.module, 'B'))!.data)]));
  return gradCheck(engine, params, batch, seed, (m, name) => {
    const t = byKey.get(name);
    if (!t) return m;
    const n = outNorms(t, weights.get(t.weight)!.data, m.get(peftKey(t.module, 'A'))!.data, m.get(peftKey(t.module, 'B'))!.data);
    const mk = peftMagnitudeKey(t.module);
    const mag = params.get(mk)!.data;
    m.set(mk, { shape: [t.outFeatures], data: Float64Array.from(mag, (x, o) => (x * n[o]!) / n0.get(t.module)![o]!) });
    return m;
  });
}

const ALL: Record<'llama' | 'gpt2', string[]> = {
  llama: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  gpt2: ['c_attn', 'c_proj', 'c_fc'],
};

describe('DoRA gradients (float64, central differences, norm held constant as PEFT detaches it)', () => {
  for (const arch of ['llama', 'qwen2', 'gpt2'] as const) {
    it(`${arch}: A, B and m of every target module`, async () => {
      const model = randomModel(randomConfig(arch));
      const lora: LoraConfig = { r: 3, alpha: 6, dropout: 0, targetModules: ALL[arch === 'gpt2' ? 'gpt2' : 'llama'], useDora: true };
      const targets = loraTargets(model.config, lora);
      const engine = Engine.create(model, { mode: 'lora', lora, dtype: 'float64', threads: 1 });
      const params = randomDoraAdapter(targets, model.weights, 11, 'float64');
      const batch = randomBatch(model.config.vocabSize, 2, 8, 12);
      const { worst, checked } = await detachedGradCheck(engine, targets, model.weights, params, batch, 13);
      expect(checked).toBe(3 * targets.length);
      expect(worst).toBeLessThan(1e-6);
      // The gradient is not that of the function whose norm moves with A and B: the norm is detached.
      const moving = await gradCheck(engine, params, batch, 13);
      expect(moving.worst).toBeGreaterThan(1e-3);
      await engine.close();
    });
  }

  it('lora.dropout > 0: the training graph drops the DoRA branch input, and the loss is unchanged at m = ||W + sBA||, B = 0', async () => {
    const model = randomModel(randomConfig('llama'));
    const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0.3, targetModules: ['q_proj', 'v_proj'], useDora: true };
    const withDrop = Engine.create(model, { mode: 'lora', lora, dtype: 'float64', threads: 1, seed: 3 });
    const without = Engine.create(model, { mode: 'lora', lora: { ...lora, dropout: 0 }, dtype: 'float64', threads: 1 });
    const fresh = withDrop.initParams(4);
    const batch = randomBatch(model.config.vocabSize, 2, 8, 5);
    // m = ||W||, B = 0: the DoRA term is 0 whatever the dropout mask, so the loss is the base model's.
    const a = await withDrop.lossAndGrads(fresh, batch);
    const b = await without.lossAndGrads(fresh, batch);
    expect(Math.abs(a.lossSum - b.lossSum)).toBeLessThan(1e-9);
    const params = randomDoraAdapter(loraTargets(model.config, lora), model.weights, 6, 'float64');
    const c = await withDrop.lossAndGrads(params, batch);
    const d = await without.lossAndGrads(params, batch);
    expect(Number.isFinite(c.lossSum)).toBe(true);
    expect(Math.abs(c.lossSum - d.lossSum)).toBeGreaterThan(1e-6);
    await withDrop.close();
    await without.close();
  });

  it('DP-SGD: per-example DoRA gradients (clip not reached) sum to the per-example losses\' gradients', async () => {
    const model = randomModel(randomConfig('llama'));
    const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj', 'down_proj'], useDora: true };
    const targets = loraTargets(model.config, lora);
    const engine = Engine.create(model, { mode: 'lora', lora, dtype: 'float64', threads: 1 });
    const params = randomDoraAdapter(targets, model.weights, 21, 'float64');
    const batch = randomBatch(model.config.vocabSize, 3, 6, 22);
    const pe = await engine.clippedGrads(params, batch, 1e9);
    const want = new Map<string, Float64Array>();
    for (let b = 0; b < 3; b++) {
      const one: Batch = { batchSize: 1, seqLen: 6, inputIds: batch.inputIds.slice(b * 6, b * 6 + 6), labels: batch.labels.slice(b * 6, b * 6 + 6) };
      const r = await engine.lossAndGrads(params, one);
      for (const [k, g] of r.grads) {
        const acc = want.get(k) ?? new Float64Array(g.data.length);
        for (let i = 0; i < acc.length; i++) acc[i]! += g.data[i]! / r.tokens;
        want.set(k, acc);
      }
    }
    expect([...pe.grads.keys()].filter((k) => k.endsWith('.lora_magnitude_vector'))).toHaveLength(targets.length);
    for (const [k, w] of want) expect(maxAbsDiff(pe.grads.get(k)!.data, w), k).toBeLessThan(1e-10);
    await engine.close();
  });
});

describe('DoRA initialisation', () => {
  it('a fresh DoRA adapter has m = ||W||_c and leaves the model unchanged', async () => {
    for (const arch of ['llama', 'gpt2'] as const) {
      const model = randomModel(randomConfig(arch));
      const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ALL[arch], useDora: true };
      const targets = loraTargets(model.config, lora);
      const dora = Engine.create(model, { mode: 'lora', lora, dtype: 'float32', threads: 1 });
      const plain = Engine.create(model, { mode: 'lora', lora: { ...lora, useDora: false }, dtype: 'float32', threads: 1 });
      const params = dora.initParams(5);
      validateAdapter(params, targets);
      for (const t of targets) {
        const m = params.get(peftMagnitudeKey(t.module))!;
        expect(m.shape).toEqual([t.outFeatures]);
        expect(maxAbsDiff(m.data, outNorms(t, model.weights.get(t.weight)!.data))).toBeLessThan(1e-6);
      }
      const batch = randomBatch(model.config.vocabSize, 1, 8, 6);
      const a = await dora.forward(params, batch);
      const b = await plain.forward(new Map([...params].filter(([k]) => !k.endsWith('.lora_magnitude_vector'))), batch);
      expect(maxAbsDiff(a.logits, b.logits)).toBeLessThan(1e-5);
      await dora.close();
      await plain.close();
    }
  });

  it('the coordinator reads the same magnitudes from a sharded bfloat16 checkpoint, one weight at a time', async () => {
    for (const [arch, raw] of [['llama', archRaw('llama', { attention_bias: true })], ['gpt2', archRaw('gpt2')]] as const) {
      const { dir } = await archDir(`init-${arch}`, raw, 31, { dtype: 'bfloat16', shards: 3 });
      const model = await loadModel(dir);
      const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ALL[arch], useDora: true };
      const targets = loraTargets(model.config, lora);
      const worker = Engine.create(model, { mode: 'lora', lora, threads: 1 }).initParams(9);
      const norms = await readDoraMagnitudes(dir, targets);
      expect(norms.size).toBe(targets.length);
      for (const t of targets) {
        expect(Float32Array.from(norms.get(t.module)!)).toEqual(worker.get(peftMagnitudeKey(t.module))!.data);
      }
      expect(await readDoraMagnitudes(dir, loraTargets(model.config, { ...lora, useDora: false }))).toEqual(new Map());
    }
  });

  it('refuses a DoRA target whose base weight has an all-zero output row (m / ||W|| undefined)', () => {
    const model = randomModel(randomConfig('llama'));
    const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj'], useDora: true };
    const t = loraTargets(model.config, lora)[0]!;
    model.weights.get(t.weight)!.data.fill(0, 0, t.inFeatures);
    expect(() => Engine.create(model, { mode: 'lora', lora, threads: 1 }).initParams(1)).toThrow(/output feature 0 of model\.layers\.0\.self_attn\.q_proj\.weight has all-zero weights/);
  });
});

describe('DoRA adapters in PEFT format', () => {
  const model = randomModel(randomConfig('llama'));
  const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj', 'v_proj'], useDora: true };
  const targets = loraTargets(model.config, lora);
  const adapter = randomDoraAdapter(targets, model.weights, 41);

  it('writes use_dora: true and base_model.model.<module>.lora_magnitude_vector [out], and reads them back', async () => {
    const dir = join(root, 'fmt');
    await writePeftAdapter(dir, adapter, { lora, baseModel: 'm' });
    const json = JSON.parse(await readFile(join(dir, ADAPTER_CONFIG), 'utf8'));
    expect(json.use_dora).toBe(true);
    expect(disallowedWrittenKeys(json)).toEqual([]);
    const st = await readSafetensors(join(dir, ADAPTER_WEIGHTS));
    expect(st.tensors.get('base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector')?.shape).toEqual([targets[0]!.outFeatures]);
    expect(st.tensors.size).toBe(3 * targets.length);
    const back = await readPeftAdapter(dir);
    expect(back.config.useDora).toBe(true);
    expect([...back.adapter.keys()].sort()).toEqual([...adapter.keys()].sort());
    for (const [k, t] of adapter) expect(back.adapter.get(k)!.data).toEqual(t.data);
    // A plain adapter does not write the field, so PEFT before 0.9 still loads it.
    const plainDir = join(root, 'fmt-plain');
    await writePeftAdapter(plainDir, new Map([...adapter].filter(([k]) => !k.endsWith('.lora_magnitude_vector'))), { lora: { ...lora, useDora: false }, baseModel: 'm' });
    expect(JSON.parse(await readFile(join(plainDir, ADAPTER_CONFIG), 'utf8'))).not.toHaveProperty('use_dora');
    expect(PEFT_IMPLEMENTED_KEYS).toContain('use_dora');
  });

  it('reads the magnitude with a .weight suffix and with the adapter-name infix', async () => {
    for (const [i, spell] of [
      (k: string) => `${k}.weight`,
      (k: string) => `${k}.default`,
      (k: string) => `${k}.default.weight`,
    ].entries()) {
      const dir = join(root, `fmt-spell${i}`);
      await writePeftAdapter(dir, adapter, { lora, baseModel: 'm' });
      const tensors = new Map<string, StWriteEntry>();
      for (const [k, t] of adapter) tensors.set(k.endsWith('.lora_magnitude_vector') ? spell(k) : k, { dtype: 'F32', shape: t.shape, data: t.data as Float32Array });
      await writeFile(join(dir, ADAPTER_WEIGHTS), serializeSafetensors(tensors));
      const back = await readPeftAdapter(dir);
      for (const [k, t] of adapter) expect(back.adapter.get(k)?.data, `${i}: ${k}`).toEqual(t.data);
    }
  });

  it('refuses magnitudes without use_dora, a missing magnitude, and a magnitude of the wrong length, naming the key', async () => {
    const dir = join(root, 'fmt-bad');
    await writePeftAdapter(dir, adapter, { lora, baseModel: 'm' });
    const json = JSON.parse(await readFile(join(dir, ADAPTER_CONFIG), 'utf8'));
    await writeFile(join(dir, ADAPTER_CONFIG), JSON.stringify({ ...json, use_dora: false }));
    await expect(readPeftAdapter(dir)).rejects.toThrow(/key base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_magnitude_vector is a DoRA magnitude vector, but the adapter is not DoRA/);
    await writeFile(join(dir, ADAPTER_CONFIG), JSON.stringify({ ...json, use_dora: 'yes' }));
    await expect(readPeftAdapter(dir)).rejects.toThrow(/field "use_dora" is "yes"; expected true or false/);

    const missing = new Map(adapter);
    missing.delete(peftMagnitudeKey(targets[1]!.module));
    await expect(writePeftAdapter(dir, missing, { lora, baseModel: 'm' })).rejects.toThrow(/DoRA module model\.layers\.0\.self_attn\.v_proj has no magnitude vector/);
    const short = new Map(adapter);
    short.set(peftMagnitudeKey(targets[0]!.module), { shape: [3], data: new Float32Array(3) });
    await expect(writePeftAdapter(dir, short, { lora, baseModel: 'm' })).rejects.toThrow(/lora_magnitude_vector has shape \[3\], expected \[16\]/);
    expect(() => validateAdapter(adapter, loraTargets(model.config, { ...lora, useDora: false }))).toThrow(/unknown key .*lora_magnitude_vector .*a DoRA magnitude, but the configuration has no use_dora/);
    // A non-finite value is named with its key and index, wherever it is (past the first four elements too).
    const bKey = peftKey(targets[0]!.module, 'B');
    const withNaN = new Map(adapter);
    const b = Float32Array.from(adapter.get(bKey)!.data);
    b[5] = NaN;
    withNaN.set(bKey, { shape: adapter.get(bKey)!.shape, data: b });
    await expect(writePeftAdapter(dir, withNaN, { lora, baseModel: 'm' })).rejects.toThrow(new RegExp(`key ${bKey.replace(/\./g, '\\.')} has a non-finite value NaN at index 5`));
    expect(() => validateAdapter(withNaN, targets)).toThrow(new RegExp(`key ${bKey.replace(/\./g, '\\.')}: non-finite value NaN at index 5`));
    const mKey = peftMagnitudeKey(targets[0]!.module);
    const withInf = new Map(adapter);
    const mag = Float32Array.from(adapter.get(mKey)!.data);
    mag[2] = Infinity;
    withInf.set(mKey, { shape: [mag.length], data: mag });
    await expect(writePeftAdapter(dir, withInf, { lora, baseModel: 'm' })).rejects.toThrow(/lora_magnitude_vector has a non-finite value Infinity at index 2/);
  });
});

describe('DoRA merge', () => {
  for (const arch of ['llama', 'gpt2'] as const) {
    it(`${arch}: the merged model's logits equal the unmerged DoRA forward`, async () => {
      const model = randomModel(randomConfig(arch));
      const lora: LoraConfig = { r: 3, alpha: 6, dropout: 0, targetModules: ALL[arch], useDora: true };
      const targets = loraTargets(model.config, lora);
      const adapter = randomDoraAdapter(targets, model.weights, 51);
      const dora = Engine.create(model, { mode: 'lora', lora, dtype: 'float32', threads: 1 });
      const merged = mergeAdapter(model, adapter, lora);
      const full = Engine.create({ ...model, weights: merged }, { mode: 'full', dtype: 'float32', threads: 1 });
      const batch = randomBatch(model.config.vocabSize, 2, 8, 52);
      const a = await dora.forward(adapter, batch);
      const b = await full.forward(merged, batch);
      expect(maxAbsDiff(a.logits, b.logits)).toBeLessThan(1e-4);
      // Merging the same A and B as plain LoRA gives a clearly different model.
      const plain = new Map([...adapter].filter(([k]) => !k.endsWith('.lora_magnitude_vector')));
      const plainMerged = mergeAdapter(model, plain, { ...lora, useDora: false });
      const c = await full.forward(plainMerged, batch);
      expect(maxAbsDiff(a.logits, c.logits)).toBeGreaterThan(1e-2);
      await dora.close();
      await full.close();
    });
  }
});

describe('federated strategies on DoRA magnitudes', () => {
  // One module: A [1, 3], B [2, 1], m [2].
  const target: LoraTarget = { module: 'm', weight: 'm.weight', bias: null, inFeatures: 3, outFeatures: 2, conv1d: false, layer: 0, kind: 'q_proj', r: 1, scale: 1, dora: true };
  const KM = peftMagnitudeKey('m');
  const ad = (a: number[], b: number[], m: number[]): TensorMap =>
    new Map([
      [peftKey('m', 'A'), { shape: [1, 3], data: Float32Array.from(a) }],
      [peftKey('m', 'B'), { shape: [2, 1], data: Float32Array.from(b) }],
      [KM, { shape: [2], data: Float32Array.from(m) }],
    ]);
  const doraCfg = (strategy: unknown) => {
    const c = parseRunConfig({ name: 't', model: { path: 'm' }, training: { steps: 1, seed: 3 }, rounds: 1, strategy, server: { join_token: 'x' }, lora: { r: 1, alpha: 1 } });
    c.lora.use_dora = true;
    return c;
  };
  const fold = (s: Strategy, g: GlobalAdapter, ups: Array<[TensorMap, number]>): GlobalAdapter => {
    const agg = s.aggregator(g);
    for (const [tensors, weight] of ups) {
      const u: FitUpdate = { workerId: 'w', site: 'w', spec: { rank: 1, proxMu: 0, freezeLoraA: false }, weight, tensors, start: g.tensors };
      expect(s.checkUpdate(u)).toBeNull();
      agg.add(u);
    }
    return s.aggregateFit(1, g, agg, [], []);
  };
  const g: GlobalAdapter = { tensors: ad([0.5, 0.5, 0.5], [0, 0], [1, 2]), rank: 1 };
  const ups: Array<[TensorMap, number]> = [
    [ad([0.5, 0.5, 0.5], [1, 2], [1.5, 2.5]), 10],
    [ad([0.5, 0.5, 0.5], [3, 0], [0.5, 3]), 30],
    [ad([0.5, 0.5, 0.5], [0, 1], [2, 1]), 60],
  ];
  const vals = (m: TensorMap) => [...m.get(KM)!.data].map((x) => +x.toFixed(5));

  it('fedavg (and its MeanAggregator) average m as a tensor: the example-weighted mean per element', () => {
    const want = [(10 * 1.5 + 30 * 0.5 + 60 * 2) / 100, (10 * 2.5 + 30 * 3 + 60 * 1) / 100];
    const acc = new MeanAggregator(g.tensors);
    for (const [t, w] of ups) acc.add({ tensors: t, weight: w });
    expect(vals(acc.mean())).toEqual(want);
    expect(vals(fold(createStrategy(doraCfg('fedavg'), [target]), g, ups).tensors)).toEqual(want);
    // FFA-LoRA: A frozen, B and m trained and averaged.
    expect(vals(fold(createStrategy(doraCfg('ffa'), [target]), g, ups).tensors)).toEqual(want);
  });

  it('median takes the middle magnitude per element', () => {
    expect(vals(fold(createStrategy(doraCfg('median'), [target]), g, ups).tensors)).toEqual([1.5, 2.5]);
  });

  it('flora and flexlora refuse DoRA by name', () => {
    for (const name of ['flora', 'flexlora']) {
      expect(() => createStrategy(doraCfg({ name, ranks: {} }), [target])).toThrow(new RegExp(`strategy ${name} .*DoRA adapter \\(lora\\.use_dora\\)`));
    }
  });
});
