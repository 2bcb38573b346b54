/**
 * float16 compute (worker/engine/half.ts): the 2-D base weights held in
 * float16 and their products computed in float16, the adapters and AdamW in
 * float32, with dynamic loss scaling. The float16 engine's gradients are
 * checked against the float64 engine (itself checked against finite
 * differences in engine.test.ts) on the same float16-rounded weights, within
 * float16's precision; loss scaling against underflow and overflow; training
 * against the float32 run; memory; loading; refusals.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Engine } from '../../worker/engine/engine.ts';
import { initModel } from '../../worker/engine/init.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { baseMemory, loadBaseModel } from '../../worker/engine/quantize.ts';
import { memoryPlan } from '../../worker/engine/memory-plan.ts';
import { buildCausalLmGraph } from '../../worker/engine/model-graph.ts';
import { Generator } from '../../worker/engine/generate.ts';
import { fromFloat16, halfModel, halfWeights, LossScaler, parseComputeDtype, toFloat16 } from '../../worker/engine/half.ts';
import { f32ToF16Bits } from '../../common/update-encoding.ts';
import { initLoraAdapter, loraTargets, peftKey } from '../../common/lora.ts';
import { AdamW } from '../../common/optim.ts';
import { createRng } from '../../common/random.ts';
import type { LoadedModel, LoraConfig, ModelConfig } from '../../common/model-config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { randomBatch, randomConfig, randomModel } from '../helpers/random-model.ts';
import { evalAdapter, runFedtune, SAMPLE_DATA, trainTinyAdapter } from '../helpers/cli.ts';

const root = mkdtempSync(join(tmpdir(), 'fedtune-half-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** The model with every 2-D weight rounded to float16 and widened back: what the float16 engine multiplies with. */
function roundedModel(model: LoadedModel): LoadedModel {
  const weights: TensorMap = new Map();
  for (const [name, t] of model.weights) {
    weights.set(name, { shape: t.shape, data: t.shape.length === 2 ? fromFloat16(toFloat16(t.data, name)) : t.data });
  }
  return { ...model, weights };
}

/** An adapter with A and B both random (B = 0 would give A no gradient); DoRA magnitudes from `engine`. */
function randomAdapter(config: ModelConfig, lora: LoraConfig, seed: number, dtype: 'float32' | 'float64', engine?: Engine): TensorMap {
  const targets = loraTargets(config, lora);
  const p = engine ? engine.initParams(seed) : initLoraAdapter(targets, undefined, seed, dtype);
  const rng = createRng(seed + 1);
  for (const t of targets) {
    const b = p.get(peftKey(t.module, 'B'))!;
    for (let i = 0; i < b.data.length; i++) b.data[i] = 0.2 * rng.normal();
  }
  return p;
}

function relativeError(got: TensorMap, ref: TensorMap): number {
  let diff = 0;
  let norm = 0;
  for (const [name, r] of ref) {
    const g = got.get(name)!;
    for (let i = 0; i < r.data.length; i++) {
      diff += (g.data[i]! - r.data[i]!) ** 2;
      norm += r.data[i]! ** 2;
    }
  }
  return Math.sqrt(diff / norm);
}

function toFloat32Map(m: TensorMap): TensorMap {
  return new Map([...m].map(([k, t]) => [k, { shape: t.shape, data: Float32Array.from(t.data) }]));
}

const LLAMA_LORA: LoraConfig = { r: 4, alpha: 8, dropout: 0, targetModules: ['q_proj', 'v_proj', 'o_proj', 'down_proj'] };
const GPT2_LORA: LoraConfig = { r: 4, alpha: 8, dropout: 0, targetModules: ['c_attn', 'c_proj', 'c_fc'] };

describe('--compute-dtype', () => {
  it('accepts float32 and float16 (bfloat16: bfloat16-base.test.ts); anything else is refused naming the field', () => {
    expect(parseComputeDtype(undefined)).toBe('float32');
    expect(parseComputeDtype('float16')).toBe('float16');
    expect(() => parseComputeDtype('fp8', 'compute_dtype')).toThrow(/compute_dtype is "fp8", expected one of float32, float16/);
  });

  it('float16 rounding is IEEE round-to-nearest-even; a weight beyond ±65504 is refused naming it', () => {
    const bits = toFloat16(Float32Array.of(1, -2.5, 65504, 1e-8, 0.1), 'w');
    expect(Array.from(bits)).toEqual([0x3c00, 0xc100, 0x7bff, f32ToF16Bits(1e-8), 0x2e66]);
    expect(fromFloat16(bits)[4]).toBe(0.0999755859375);
    expect(() => toFloat16(Float32Array.of(0, 70000), 'model.embed_tokens.weight')).toThrow(/model\.embed_tokens\.weight holds 70000 at index 1, beyond float16's range/);
  });
});

describe('float16 base weights', () => {
  it('holds every 2-D weight in float16 and the norms and biases in float32: the base takes about half the bytes', () => {
    const model = randomModel(randomConfig('qwen2'), 3);
    const h = halfModel(model);
    const half = halfWeights(h)!;
    expect([...half.keys()]).toContain('model.embed_tokens.weight');
    expect([...half.keys()]).toContain('model.layers.1.mlp.down_proj.weight');
    for (const name of half.keys()) expect(h.weights.has(name)).toBe(false);
    expect(h.weights.has('model.layers.0.self_attn.q_proj.bias')).toBe(true);
    expect(h.weights.has('model.norm.weight')).toBe(true);
    let twoD = 0;
    let oneD = 0;
    for (const t of model.weights.values()) (t.shape.length === 2 ? (twoD += t.data.length) : (oneD += t.data.length));
    expect(baseMemory(h).total).toBe(2 * twoD + 4 * oneD);
    expect(baseMemory(model).total).toBe(4 * (twoD + oneD));
    expect(halfModel(h)).toBe(h);
  });

  it('loadBaseModel rounds while loading: the same bits and fingerprint as halfModel(loadModel(dir))', async () => {
    const dir = join(root, 'tiny-llama');
    await initModel(dir, { arch: 'llama', hiddenSize: 32, numLayers: 2, numHeads: 4, numKvHeads: 2, intermediateSize: 40, shards: 2 });
    const full = await loadModel(dir);
    const a = halfModel(full);
    const b = await loadBaseModel(dir, undefined, { compute: 'float16' });
    expect(b.fingerprint).toBe(full.fingerprint);
    expect([...b.weights.keys()]).toEqual([...a.weights.keys()]);
    expect([...halfWeights(b)!.keys()]).toEqual([...halfWeights(a)!.keys()]);
    for (const [k, t] of halfWeights(a)!) expect(halfWeights(b)!.get(k)!.data).toEqual(t.data);
    await expect(loadBaseModel(dir, 'nf4', { compute: 'float16' })).rejects.toThrow(/--compute-dtype float16 and --quantize-base cannot be combined/);
  });
});

describe('float16 products', () => {
  const cases: Array<{ name: string; config: ModelConfig; lora: LoraConfig }> = [
    { name: 'llama, grouped-query attention, untied lm_head', config: randomConfig('llama'), lora: LLAMA_LORA },
    { name: 'qwen2, q/k/v biases, tied embeddings', config: randomConfig('qwen2'), lora: LLAMA_LORA },
    { name: 'gpt2, Conv1D layout, position table', config: randomConfig('gpt2'), lora: GPT2_LORA },
    { name: 'llama with DoRA', config: randomConfig('llama'), lora: { ...LLAMA_LORA, useDora: true } },
  ];
  for (const c of cases) for (const variant of ['storage', 'compute'] as const) {
    it(`${c.name}, ${variant === 'storage' ? 'weights widened per product (CPU)' : 'float16 products (CUDA graph)'}: loss and LoRA gradients equal the float64 engine's on the float16-rounded weights within float16 precision`, async () => {
      const model = randomModel(c.config, 5);
      const ref = await Engine.create(roundedModel(model), { mode: 'lora', lora: c.lora, dtype: 'float64', threads: 1 });
      const half = await Engine.create(model, { mode: 'lora', lora: c.lora, computeDtype: 'float16', halfVariant: variant, threads: 1 });
      try {
        const p64 = randomAdapter(c.config, c.lora, 7, 'float64', ref);
        const batch = randomBatch(c.config.vocabSize, 2, 16, 9);
        const r = await ref.lossAndGrads(p64, batch);
        const h = await half.lossAndGrads(toFloat32Map(p64), batch);
        expect(h.tokens).toBe(r.tokens);
        expect(Math.abs(h.lossSum - r.lossSum) / r.lossSum).toBeLessThan(2e-3);
        // float16 keeps 11 significant bits (relative rounding 2^-11 = 4.9e-4 per product). ONNX Runtime's
        // CPU provider has no float16 Gemm and computes even the 'compute' graph's products in float32.
        expect(relativeError(h.grads, r.grads)).toBeLessThan(1e-2);
        const f = await half.forward(toFloat32Map(p64), batch);
        expect(Math.abs(f.lossSum - r.lossSum) / r.lossSum).toBeLessThan(2e-3);
      } finally {
        await ref.close();
        await half.close();
      }
    });
  }
});

describe('--device cuda without its provider', () => {
  it('falls back to CPU with float16 base weights: the CPU graphs, the same results as asking for the CPU', async () => {
    const config = randomConfig('llama');
    const model = randomModel(config, 8);
    const cuda = Engine.create(model, { mode: 'lora', lora: LLAMA_LORA, computeDtype: 'float16', device: 'cuda', threads: 1 });
    const cpu = Engine.create(model, { mode: 'lora', lora: LLAMA_LORA, computeDtype: 'float16', halfVariant: 'storage', threads: 1 });
    const params = toFloat32Map(randomAdapter(config, LLAMA_LORA, 2, 'float64'));
    const batch = randomBatch(config.vocabSize, 2, 16, 4);
    const a = await cuda.lossAndGrads(params, batch);
    const b = await cpu.lossAndGrads(params, batch);
    expect(cuda.device).toBe('cpu');
    expect(a.lossSum).toBe(b.lossSum);
    for (const [k, t] of b.grads) expect(Array.from(a.grads.get(k)!.data)).toEqual(Array.from(t.data));
    await cuda.close();
    await cpu.close();
  });
});

describe('generation on float16 base weights', () => {
  it('KV cache and recompute agree, and their logits are float32 generation\'s on the same rounded weights', async () => {
    const config = randomConfig('qwen2', { vocabSize: 64 });
    const model = randomModel(config, 12);
    const params = toFloat32Map(randomAdapter(config, LLAMA_LORA, 6, 'float64'));
    const prompt = Array.from({ length: 7 }, (_, i) => (i * 11) % config.vocabSize);
    const half = new Generator(halfModel(model), { adapter: { lora: LLAMA_LORA, params }, computeDtype: 'float16', threads: 1 });
    const kv = await half.generate(prompt, { maxNewTokens: 5, keepLogits: true });
    const re = await half.generate(prompt, { maxNewTokens: 5, keepLogits: true, kvCache: false });
    await half.close();
    const full = new Generator(roundedModel(model), { adapter: { lora: LLAMA_LORA, params }, threads: 1 });
    const ref = await full.generate(prompt, { maxNewTokens: 5, keepLogits: true });
    await full.close();
    expect(kv.tokens).toEqual(ref.tokens);
    expect(re.tokens).toEqual(ref.tokens);
    for (let i = 0; i < 5; i++) {
      for (const got of [kv, re]) {
        let worst = 0;
        for (let j = 0; j < config.vocabSize; j++) worst = Math.max(worst, Math.abs(got.logits![i]![j]! - ref.logits![i]![j]!));
        expect(worst).toBeLessThan(1e-4);
      }
    }
    expect(() => new Generator(halfModel(model), { computeDtype: 'float16' })).toThrow(/--compute-dtype float16 generates with an adapter .* give --adapter/);
  });
});

describe('dynamic loss scaling', () => {
  const config = randomConfig('llama', { vocabSize: 64 });
  const model = randomModel(config, 11);
  const batch = randomBatch(config.vocabSize, 4, 32, 13);

  async function gradsAt(o: { init: number; growthInterval?: number }): Promise<{ grads: TensorMap; engine: Engine }> {
    const engine = await Engine.create(model, { mode: 'lora', lora: LLAMA_LORA, computeDtype: 'float16', halfVariant: 'compute', threads: 1, lossScale: o });
    const { grads } = await engine.lossAndGrads(toFloat32Map(randomAdapter(config, LLAMA_LORA, 3, 'float64')), batch);
    return { grads, engine };
  }

  it('divides the scale back out: gradients at scales 2^16, 2^6 and 2^-6 agree with float64', async () => {
    const ref = await Engine.create(roundedModel(model), { mode: 'lora', lora: LLAMA_LORA, dtype: 'float64', threads: 1 });
    const r = await ref.lossAndGrads(randomAdapter(config, LLAMA_LORA, 3, 'float64'), batch);
    await ref.close();
    const errors: number[] = [];
    for (const init of [2 ** 16, 2 ** 6, 2 ** -6]) {
      const { grads, engine } = await gradsAt({ init });
      errors.push(relativeError(grads, r.grads));
      expect(engine.lossScaler!.scale).toBe(init); // no overflow, no growth yet
      await engine.close();
    }
    for (const e of errors) expect(e).toBeLessThan(1e-2);
  });

  it('an overflowing scale is halved and the micro-batch run again, until its gradients are finite', async () => {
    const { grads: ok, engine: e1 } = await gradsAt({ init: 2 ** 10 });
    await e1.close();
    // A seed of ~2^127 overflows even float32 (the CPU provider computes the float16 products in
    // float32), as a scale beyond what float16 holds overflows its products on CUDA.
    const { grads, engine } = await gradsAt({ init: 2 ** 134 });
    const s = engine.lossScaler!;
    expect(s.overflows).toBeGreaterThan(0);
    expect(s.scale).toBe(2 ** (134 - s.overflows));
    for (const t of grads.values()) for (const v of t.data) expect(Number.isFinite(v)).toBe(true);
    expect(relativeError(grads, ok)).toBeLessThan(1e-2);
    await engine.close();
  });

  it('grows the scale x2 after growthInterval micro-batches without overflow', async () => {
    const s = new LossScaler({ init: 8, growthInterval: 2 });
    s.finite();
    expect(s.scale).toBe(8);
    s.finite();
    expect(s.scale).toBe(16);
    expect(s.backoff()).toBe(true);
    expect(s.scale).toBe(8);
    s.finite();
    expect(s.scale).toBe(8); // the count restarted at the overflow
    const one = new LossScaler({ init: 1 });
    expect(one.backoff()).toBe(false); // at 1 the gradients are not scaled: nothing left to reduce
    expect(() => new LossScaler({ growthInterval: 0 })).toThrow(/growthInterval is 0/);
  });
});

describe('training with float16 compute', () => {
  it('40 AdamW steps end within 2% of the float32 run\'s training loss, from the same adapter', async () => {
    const config = randomConfig('llama', { vocabSize: 48, hiddenSize: 32, numHeads: 4, numKvHeads: 2, intermediateSize: 48 });
    const model = randomModel(config, 21, 0.1);
    const lora: LoraConfig = { r: 8, alpha: 16, dropout: 0, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] };
    // A fixed pattern to learn: each token predicts (id * 7 + 3) mod V.
    const rng = createRng(4);
    const batches = Array.from({ length: 4 }, () => {
      const B = 4;
      const T = 16;
      const inputIds = new Int32Array(B * T);
      for (let b = 0; b < B; b++) {
        inputIds[b * T] = rng.int(config.vocabSize);
        for (let t = 1; t < T; t++) inputIds[b * T + t] = (inputIds[b * T + t - 1]! * 7 + 3) % config.vocabSize;
      }
      const labels = Int32Array.from(inputIds);
      for (let b = 0; b < B; b++) labels[b * T] = -100;
      return { batchSize: B, seqLen: T, inputIds, labels };
    });
    const finalLoss = async (computeDtype: 'float32' | 'float16'): Promise<{ first: number; last: number }> => {
      const engine = await Engine.create(model, { mode: 'lora', lora, computeDtype, threads: 2 });
      const params = engine.initParams(1);
      const opt = new AdamW({ lr: 1e-2, weightDecay: 0 });
      let first = NaN;
      let last = NaN;
      for (let step = 0; step < 40; step++) {
        const r = await engine.lossAndGrads(params, batches[step % batches.length]!);
        for (const t of r.grads.values()) for (let i = 0; i < t.data.length; i++) t.data[i] = t.data[i]! / r.tokens;
        opt.step(params, r.grads, 1e-2);
        if (step === 0) first = r.lossSum / r.tokens;
        last = r.lossSum / r.tokens;
      }
      await engine.close();
      return { first, last };
    };
    const f32 = await finalLoss('float32');
    const f16 = await finalLoss('float16');
    expect(f32.last).toBeLessThan(0.7 * f32.first); // it learned something
    expect(Math.abs(f16.last - f32.last) / f32.last).toBeLessThan(0.02);
  });
});

describe('refusals', () => {
  const model = randomModel(randomConfig('llama'), 2);
  it('refuses full training, a 4-bit base, float64 graphs and DP-SGD by name', async () => {
    expect(() => Engine.create(model, { mode: 'full', computeDtype: 'float16' })).toThrow(/--compute-dtype float16 .* LoRA training only, not --full/);
    expect(() => Engine.create(model, { mode: 'lora', lora: LLAMA_LORA, computeDtype: 'float16', quantizeBase: 'nf4' })).toThrow(/--compute-dtype float16 and --quantize-base cannot be combined/);
    expect(() => Engine.create(model, { mode: 'lora', lora: LLAMA_LORA, computeDtype: 'float16', dtype: 'float64' })).toThrow(/not float64/);
    expect(() => Engine.create(halfModel(model), { mode: 'lora', lora: LLAMA_LORA })).toThrow(/holds float16 base weights/);
    expect(() => buildCausalLmGraph(halfModel(model), { batchSize: 1, seqLen: 8, mode: 'lora', lora: LLAMA_LORA, dtype: 'float32', kind: 'forward' })).toThrow(/holds float16 base weights .* need GraphSpec\.half/);
    const e = Engine.create(model, { mode: 'lora', lora: LLAMA_LORA, computeDtype: 'float16', threads: 1 });
    await expect(e.clippedGrads(e.initParams(1), randomBatch(40, 2, 8, 1), 1)).rejects.toThrow(/DP-SGD \(privacy\.dp_sgd.*--compute-dtype float32/);
    await e.close();
  });
});

describe('fedtune train / worker --compute-dtype', () => {
  const data = SAMPLE_DATA;
  const run = runFedtune;

  it('trains a float32 PEFT adapter on float16 base weights; the plan counts them at 2 bytes; bad combinations are refused by name', async () => {
    const { stdout, model: dir, out } = await trainTinyAdapter(root, ['--compute-dtype', 'float16']);
    expect(stdout).toMatch(/float16 base weights/);
    // fedtune eval of that adapter on float16 base weights: the float32 figures within float16's rounding of the weights.
    const e16 = evalAdapter(dir, out, 'float16');
    const e32 = evalAdapter(dir, out, 'float32');
    expect(e16.tokens).toBe(e32.tokens);
    expect(e16.loss).not.toBe(e32.loss); // the weights really were rounded
    expect(Math.abs(e16.loss - e32.loss) / e32.loss).toBeLessThan(1e-2);
    const gen = run(['generate', '--model', dir, '--adapter', out, '--prompt', 'Say ok.', '--max-new-tokens', '4', '--compute-dtype', 'float16']);
    expect(gen.status, gen.stderr).toBe(0);
    expect(gen.stderr).toMatch(/4 new tokens|stopped by eos/);

    const plan = (dtype: string) => {
      const r = run(['train', '--model', dir, '--data', data, '--out', join(root, 'plan'), '--plan', '--batch-size', '2', '--max-seq-len', '128', '--compute-dtype', dtype]);
      expect(r.status, r.stderr).toBe(0);
      const line = r.stdout.split('\n').find((l) => /^\s*weights/.test(l))!;
      return line;
    };
    expect(plan('float16')).toMatch(/matrix weights float16, the rest float32/);
    const model = await loadModel(dir);
    const planned = (computeDtype: 'float32' | 'float16') =>
      memoryPlan(model.config, { mode: 'lora', lora: LLAMA_LORA, batchSize: 2, seqLen: 128, recompute: false, computeDtype }).weights;
    expect(planned('float16')).toBe(baseMemory(halfModel(model)).total);
    expect(planned('float32')).toBe(baseMemory(model).total);

    const refusals: Array<[string[], RegExp]> = [
      [['train', '--model', dir, '--data', data, '--out', join(root, 'x'), '--steps', '1', '--compute-dtype', 'bfloat16'], /is stored as F32; --compute-dtype bfloat16 trains on the checkpoint's own bfloat16 weights/],
      [['train', '--model', dir, '--data', data, '--out', join(root, 'x'), '--steps', '1', '--compute-dtype', 'half'], /--compute-dtype is "half", expected one of float32, float16/],
      [['train', '--model', dir, '--data', data, '--out', join(root, 'x'), '--steps', '1', '--full', '--compute-dtype', 'float16'], /--compute-dtype float16 .* LoRA training only, not --full/],
      [['train', '--model', dir, '--data', data, '--out', join(root, 'x'), '--steps', '1', '--quantize-base', 'nf4', '--compute-dtype', 'float16'], /cannot be combined/],
      [['worker', '--coordinator', '127.0.0.1:1', '--token', 't', '--name', 'a', '--model', dir, '--trainer', 'noop', '--compute-dtype', 'float16'], /--compute-dtype applies to the onnx trainer/],
      [['worker', '--coordinator', '127.0.0.1:1', '--token', 't', '--name', 'a', '--model', dir, '--compute-dtype', 'fp16'], /--compute-dtype is "fp16"/],
      [['eval', '--model', dir, '--data', data, '--compute-dtype', 'float16'], /--compute-dtype float16 evaluates an adapter .* give --adapter/],
      [['generate', '--model', dir, '--prompt', 'hi', '--compute-dtype', 'float16'], /--compute-dtype float16 generates with an adapter .* give --adapter/],
    ];
    for (const [args, msg] of refusals) {
      const r = run(args);
      expect(r.status, args.join(' ')).not.toBe(0);
      expect(r.stderr).toMatch(msg);
    }
  }, 120_000);
});
