/**
 * --compute-dtype bfloat16 (worker/engine/half.ts): the 2-D base weights of a
 * bfloat16 checkpoint stay in its safetensors files, named by the graphs as
 * initializers whose bytes ONNX Runtime maps from the file, and widened to
 * float32 per product. bfloat16 -> float32 is exact (the upper half of the
 * bits), so the engine must give the float32 engine's loss and gradients on
 * the same checkpoint loaded as float32 (loadModel), which reads and widens
 * the same bytes in JavaScript; training, DoRA's norms, loading and refusals.
 */
import { copyFileSync, mkdtempSync, readdirSync, renameSync, rmSync, utimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Engine } from '../../worker/engine/engine.ts';
import { initModel } from '../../worker/engine/init.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { baseMemory, loadBaseModel } from '../../worker/engine/quantize.ts';
import { buildCausalLmGraph } from '../../worker/engine/model-graph.ts';
import { fileWeights, fromBFloat16, halfWeightValues, parseComputeDtype } from '../../worker/engine/half.ts';
import { loraTargets, peftKey } from '../../common/lora.ts';
import { createRng } from '../../common/random.ts';
import type { LoraConfig } from '../../common/model-config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { randomBatch } from '../helpers/random-model.ts';
import { evalAdapter, runFedtune, SAMPLE_DATA, trainTinyAdapter } from '../helpers/cli.ts';

const root = mkdtempSync(join(tmpdir(), 'fedtune-bf16-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const LORA: LoraConfig = { r: 4, alpha: 8, dropout: 0, targetModules: ['q_proj', 'v_proj', 'o_proj', 'down_proj'] };

async function tinyModel(name: string, o: { dtype?: 'bfloat16' | 'float32'; arch?: 'llama' | 'qwen2' | 'gpt2'; shards?: number } = {}): Promise<string> {
  const dir = join(root, name);
  await initModel(dir, { arch: o.arch ?? 'llama', hiddenSize: 32, numLayers: 2, numHeads: 4, ...(o.arch === 'gpt2' ? {} : { numKvHeads: 2 }), intermediateSize: 40, dtype: o.dtype ?? 'bfloat16', shards: o.shards ?? 2 });
  return dir;
}

/** B random too, so that every LoRA factor has a gradient. */
function randomise(p: TensorMap, seed: number): TensorMap {
  const rng = createRng(seed);
  for (const [k, t] of p) if (k.includes('lora_B')) for (let i = 0; i < t.data.length; i++) t.data[i] = 0.2 * rng.normal();
  return p;
}

describe('--compute-dtype bfloat16', () => {
  it('is accepted; bfloat16 -> float32 is the upper half of the bits', () => {
    expect(parseComputeDtype('bfloat16')).toBe('bfloat16');
    expect(() => parseComputeDtype('fp8', 'compute_dtype')).toThrow(/compute_dtype is "fp8", expected one of float32, float16, bfloat16/);
    // 0x3f80 = 1, 0xc020 = -2.5, 0x4049 = 3.140625 (pi's bfloat16), 0x0001 = the smallest subnormal 2^-133.
    expect(Array.from(fromBFloat16(Uint16Array.of(0x3f80, 0xc020, 0x4049, 0x0001)))).toEqual([1, -2.5, 3.140625, 2 ** -133]);
  });

  it('loading reads no 2-D weight: each is recorded where it lies in its shard; 1-D ones load as float32; same fingerprint', async () => {
    const dir = await tinyModel('load');
    const full = await loadModel(dir);
    const m = await loadBaseModel(dir, undefined, { compute: 'bfloat16' });
    expect(m.fingerprint).toBe(full.fingerprint);
    const files = fileWeights(m)!;
    const twoD = [...full.weights].filter(([, t]) => t.shape.length === 2).map(([k]) => k);
    expect([...files.keys()].sort()).toEqual(twoD.sort());
    expect([...m.weights.keys()].every((k) => full.weights.get(k)!.shape.length === 1)).toBe(true);
    expect(new Set([...files.values()].map((f) => f.file)).size).toBe(2); // both shards
    // The recorded bytes are the weight: read back, they equal loadModel's float32 values.
    for (const k of twoD) expect(halfWeightValues(m, k)).toEqual(full.weights.get(k)!.data);
    const mem = baseMemory(m);
    expect(mem.fileBytes).toBe(2 * twoD.reduce((a, k) => a + full.weights.get(k)!.data.length, 0));
    expect(mem.floatBytes).toBe(4 * [...m.weights.values()].reduce((a, t) => a + t.data.length, 0));
  });

  for (const arch of ['llama', 'qwen2', 'gpt2'] as const) {
    it(`${arch}: loss and LoRA gradients equal the float32 engine's on the same checkpoint`, async () => {
      const dir = await tinyModel(`grads-${arch}`, { arch });
      const lora: LoraConfig = arch === 'gpt2' ? { r: 4, alpha: 8, dropout: 0, targetModules: ['c_attn', 'c_proj', 'c_fc'] } : LORA;
      const f32 = await Engine.create(await loadModel(dir), { mode: 'lora', lora, threads: 1 });
      const bf = await Engine.create(await loadBaseModel(dir, undefined, { compute: 'bfloat16' }), { mode: 'lora', lora, computeDtype: 'bfloat16', threads: 1 });
      const p = randomise(f32.initParams(3), 4);
      const batch = randomBatch(f32.model.config.vocabSize, 2, 12, 9);
      const a = await f32.lossAndGrads(p, batch);
      const b = await bf.lossAndGrads(p, batch);
      expect(b.tokens).toBe(a.tokens);
      expect(Math.abs(b.lossSum - a.lossSum)).toBeLessThanOrEqual(1e-5 * Math.abs(a.lossSum));
      for (const [k, g] of a.grads) {
        const h = b.grads.get(k)!;
        let diff = 0;
        let norm = 0;
        for (let i = 0; i < g.data.length; i++) {
          diff += (h.data[i]! - g.data[i]!) ** 2;
          norm += g.data[i]! ** 2;
        }
        expect(Math.sqrt(diff / norm), k).toBeLessThan(1e-5);
      }
      await f32.close();
      await bf.close();
    });
  }

  it('a shard replaced or rewritten after loading is refused, naming it, before ONNX Runtime maps it; restored, training goes on', async () => {
    const dir = await tinyModel('replaced');
    const bf = await Engine.create(await loadBaseModel(dir, undefined, { compute: 'bfloat16' }), { mode: 'lora', lora: LORA, computeDtype: 'bfloat16', threads: 1 });
    const p = bf.initParams(1);
    const vocab = bf.model.config.vocabSize;
    await bf.lossAndGrads(p, randomBatch(vocab, 1, 8, 1)); // a session per batch shape: this one maps the files now
    const shard = readdirSync(dir).filter((f) => f.endsWith('.safetensors')).sort()[0]!;
    const path = join(dir, shard);
    // Rewritten in place (same bytes, a new modification time): the next session is refused.
    utimesSync(path, new Date(), new Date(Date.now() + 5000));
    await expect(bf.lossAndGrads(p, randomBatch(vocab, 1, 10, 2))).rejects.toThrow(new RegExp(`${shard.replace('.', '\\.')}: it was written to \\(its modification time changed\\) since fedtune fingerprinted it; .*restart the worker so that it fingerprints the checkpoint it trains on`));
    // Replaced by another file (a copy: another inode): refused too.
    copyFileSync(path, `${path}.new`);
    renameSync(`${path}.new`, path);
    await expect(bf.lossAndGrads(p, randomBatch(vocab, 1, 12, 3))).rejects.toThrow(/it was replaced by another file since fedtune fingerprinted it/);
    await bf.close();
    // Loaded again, the checkpoint as it is now is fingerprinted and trains.
    const again = await Engine.create(await loadBaseModel(dir, undefined, { compute: 'bfloat16' }), { mode: 'lora', lora: LORA, computeDtype: 'bfloat16', threads: 1 });
    expect(Number.isFinite((await again.lossAndGrads(p, randomBatch(vocab, 1, 12, 3))).lossSum)).toBe(true);
    await again.close();
  });

  it('DoRA: the initial magnitudes are the norms of the weights read from the files', async () => {
    const dir = await tinyModel('dora');
    const lora = { ...LORA, useDora: true };
    const f32 = await Engine.create(await loadModel(dir), { mode: 'lora', lora, threads: 1 });
    const bf = await Engine.create(await loadBaseModel(dir, undefined, { compute: 'bfloat16' }), { mode: 'lora', lora, computeDtype: 'bfloat16', threads: 1 });
    const a = f32.initParams(5);
    const b = bf.initParams(5);
    for (const t of loraTargets(f32.model.config, lora)) expect(b.get(peftKey(t.module, 'A'))!.data).toEqual(a.get(peftKey(t.module, 'A'))!.data);
    for (const [k, t] of a) expect(b.get(k)!.data, k).toEqual(t.data);
    const batch = randomBatch(f32.model.config.vocabSize, 1, 10, 2);
    const la = await f32.lossAndGrads(randomise(a, 1), batch);
    const lb = await bf.lossAndGrads(randomise(b, 1), batch);
    expect(Math.abs(lb.lossSum - la.lossSum)).toBeLessThanOrEqual(1e-5 * Math.abs(la.lossSum));
    await f32.close();
    await bf.close();
  });

  it('the graph holds no weight bytes: they are external initializers, not inputs', async () => {
    const dir = await tinyModel('graph');
    const m = await loadBaseModel(dir, undefined, { compute: 'bfloat16' });
    const built = buildCausalLmGraph(m, { batchSize: 1, seqLen: 8, mode: 'lora', lora: LORA, dtype: 'float32', kind: 'train', dropoutSeed: 0, half: 'storage' });
    expect(built.graph.hasExternalData).toBe(true);
    expect(built.frozen.every((f) => !fileWeights(m)!.has(f.name))).toBe(true);
    const weightBytes = [...fileWeights(m)!.values()].reduce((a, f) => a + f.length, 0);
    expect(built.bytes.byteLength).toBeLessThan(weightBytes); // only names, offsets and lengths
    expect(() => buildCausalLmGraph(m, { batchSize: 1, seqLen: 8, mode: 'lora', lora: LORA, dtype: 'float32', kind: 'train', dropoutSeed: 0, half: 'compute' })).toThrow(/bfloat16 base weights are widened per product/);
    expect(() => buildCausalLmGraph(m, { batchSize: 1, seqLen: 8, mode: 'lora', lora: LORA, dtype: 'float32', kind: 'train', dropoutSeed: 0 })).toThrow(/holds bfloat16 base weights .*its graphs need GraphSpec.half/);
  });

  it('refusals name what is wrong: a float32 checkpoint, a model not loaded for it, --full, --quantize-base, float64 graphs', async () => {
    const f32dir = await tinyModel('f32', { dtype: 'float32', shards: 1 });
    await expect(loadBaseModel(f32dir, undefined, { compute: 'bfloat16' })).rejects.toThrow(/is stored as F32; --compute-dtype bfloat16 trains on the checkpoint's own bfloat16 weights where they lie/);
    const dir = await tinyModel('refuse', { shards: 1 });
    const plain = await loadModel(dir);
    expect(() => Engine.create(plain, { mode: 'lora', lora: LORA, computeDtype: 'bfloat16' })).toThrow(/load .* with loadBaseModel\(dir, undefined, \{ compute: 'bfloat16' \}\)/);
    const m = await loadBaseModel(dir, undefined, { compute: 'bfloat16' });
    expect(() => Engine.create(m, { mode: 'lora', lora: LORA })).toThrow(/leaves its bfloat16 base weights in their files/);
    expect(() => Engine.create(m, { mode: 'full', computeDtype: 'bfloat16' })).toThrow(/--compute-dtype bfloat16 holds the frozen base weights in bfloat16, so it applies to LoRA training only, not --full/);
    expect(() => Engine.create(m, { mode: 'lora', lora: LORA, computeDtype: 'bfloat16', quantizeBase: 'nf4' })).toThrow(/--compute-dtype bfloat16 and --quantize-base cannot be combined/);
    expect(() => Engine.create(m, { mode: 'lora', lora: LORA, computeDtype: 'bfloat16', dtype: 'float64' })).toThrow(/not float64 ones/);
    await expect(loadBaseModel(dir, 'nf4', { compute: 'bfloat16' })).rejects.toThrow(/--compute-dtype bfloat16 and --quantize-base cannot be combined/);
  });

  it('fedtune train, eval and generate with --compute-dtype bfloat16: a float32 PEFT adapter; eval equals float32\'s on the same checkpoint; the plan counts 2 bytes', async () => {
    const { stdout, model: dir, out } = await trainTinyAdapter(join(root, 'cli'), ['--compute-dtype', 'bfloat16'], { dtype: 'bfloat16' });
    expect(stdout).toMatch(/bfloat16 base weights mapped from the checkpoint/);
    const bf = evalAdapter(dir, out, 'bfloat16');
    const f32 = evalAdapter(dir, out, 'float32');
    expect(bf.tokens).toBe(f32.tokens);
    expect(Math.abs(bf.loss - f32.loss)).toBeLessThanOrEqual(1e-5 * f32.loss); // the same weights, widened in the graph or in JavaScript
    const gen = runFedtune(['generate', '--model', dir, '--adapter', out, '--prompt', 'Say ok.', '--max-new-tokens', '4', '--compute-dtype', 'bfloat16']);
    expect(gen.status, gen.stderr).toBe(0);
    expect(gen.stderr).toMatch(/4 new tokens|stopped by eos/);
    const plan = runFedtune(['train', '--model', dir, '--data', SAMPLE_DATA, '--out', join(root, 'plan'), '--plan', '--batch-size', '2', '--max-seq-len', '128', '--compute-dtype', 'bfloat16']);
    expect(plan.status, plan.stderr).toBe(0);
    expect(plan.stdout).toMatch(/matrix weights bfloat16 \(mapped from the checkpoint's files\), the rest float32/);
    const noAdapter = runFedtune(['eval', '--model', dir, '--data', SAMPLE_DATA, '--compute-dtype', 'bfloat16']);
    expect(noAdapter.status).not.toBe(0);
    expect(noAdapter.stderr).toMatch(/--compute-dtype bfloat16 evaluates an adapter on bfloat16 base weights; give --adapter/);
  });
});
