/**
 * DP-SGD's noise, Poisson sampling and step count (common/privacy/dp-sgd.ts),
 * and the training loop (worker/engine/train.ts dpTrainLoop) on a tiny model.
 *
 * Statistical tests run at fixed seeds with bounds far out in the tails (about
 * 5 standard deviations), and each has a counterpart showing that the same
 * check rejects a wrong parameter.
 */
import { describe, expect, it } from 'vitest';
import { createRng } from '../../common/random.ts';
import type { NormalSource } from '../../common/privacy/noise.ts';
import { dpSgdSamplingSeed, dpSgdSteps, noisyClippedMean, poissonSample, poissonSampler, secretPoissonSampler } from '../../common/privacy/dp-sgd.ts';
import { Engine } from '../../worker/engine/engine.ts';
import { dpTrainLoop, padBatchRows } from '../../worker/engine/train.ts';
import { AdamW } from '../../common/optim.ts';
import type { Batch, LoraConfig } from '../../common/model-config.ts';
import { randomConfig, randomModel } from '../helpers/random-model.ts';

const seeded = (seed: number): NormalSource => {
  const rng = createRng(seed);
  return (out) => {
    for (let i = 0; i < out.length; i++) out[i] = rng.normal();
  };
};

/**
 * Chi-square check that the values d_i are N(0, s^2): sum d_i^2 / s^2 ~ chi2(n), mean n,
 * std sqrt(2n); accept within 5 std (Wilson-Hilferty is not needed at n = 40000).
 */
function varianceConsistent(d: ArrayLike<number>, s: number): boolean {
  let q = 0;
  for (let i = 0; i < d.length; i++) q += (d[i]! / s) ** 2;
  const n = d.length;
  return Math.abs(q - n) <= 5 * Math.sqrt(2 * n);
}

describe('DP-SGD noise', () => {
  const p = { maxGradNorm: 0.7, noiseMultiplier: 1.3, sampleRate: 0.02 };
  const N = 5000; // records: expected batch q N = 100
  const run = (seed: number): { d: Float64Array; mean: number } => {
    const known = Float64Array.from({ length: 40000 }, (_, i) => Math.sin(i) * 3);
    const v = Float64Array.from(known);
    noisyClippedMean([v.subarray(0, 15000), v.subarray(15000)], p, N, seeded(seed));
    const d = Float64Array.from(v, (x, i) => x - known[i]! / (p.sampleRate * N));
    return { d, mean: d.reduce((s, x) => s + x, 0) / d.length };
  };

  it('adds N(0, (sigma C / (q N))^2) to every coordinate of sum / (q N)', () => {
    const s = (p.noiseMultiplier * p.maxGradNorm) / (p.sampleRate * N);
    const { d, mean } = run(11);
    expect(varianceConsistent(d, s)).toBe(true);
    // The mean of the noise is 0: |mean| < 5 s / sqrt(n).
    expect(Math.abs(mean)).toBeLessThan((5 * s) / Math.sqrt(d.length));
  });

  it('the same check rejects a wrong variance (sigma off by 10%, or no division by q)', () => {
    const { d } = run(11);
    const s = (p.noiseMultiplier * p.maxGradNorm) / (p.sampleRate * N);
    expect(varianceConsistent(d, 1.1 * s)).toBe(false);
    expect(varianceConsistent(d, s / 1.1)).toBe(false);
    expect(varianceConsistent(d, (p.noiseMultiplier * p.maxGradNorm) / N)).toBe(false);
  });

  it('sigma = 0 only rescales', () => {
    const v = Float32Array.of(1, 2, 3);
    noisyClippedMean([v], { ...p, noiseMultiplier: 0 }, 50, seeded(1));
    expect([...v]).toEqual([1, 2, 3]);
  });

  it('draws from the OS CSPRNG by default (two calls differ)', () => {
    const a = new Float64Array(8);
    const b = new Float64Array(8);
    noisyClippedMean([a], p, 10);
    noisyClippedMean([b], p, 10);
    expect([...a]).not.toEqual([...b]);
  });
});

describe('Poisson sampling', () => {
  it('includes each record with probability q, independently', () => {
    const n = 1000;
    const q = 0.05;
    const steps = 400;
    const rng = createRng(3);
    const counts = new Float64Array(n);
    let total = 0;
    let sizes2 = 0;
    for (let s = 0; s < steps; s++) {
      const b = poissonSample(n, q, rng);
      total += b.length;
      sizes2 += (b.length - n * q) ** 2;
      for (const i of b) counts[i]!++;
      expect(new Set(b).size).toBe(b.length);
    }
    // Total inclusions ~ Binomial(n * steps, q).
    const trials = n * steps;
    expect(Math.abs(total - trials * q)).toBeLessThan(5 * Math.sqrt(trials * q * (1 - q)));
    // Batch sizes vary like Binomial(n, q): variance n q (1 - q) (a fixed-size sampler would have 0).
    const varSize = sizes2 / steps;
    expect(varSize).toBeGreaterThan(0.7 * n * q * (1 - q));
    expect(varSize).toBeLessThan(1.3 * n * q * (1 - q));
    // No record is favoured: every record's count ~ Binomial(steps, q), mean 20, std 4.36.
    for (const c of counts) expect(Math.abs(c - steps * q)).toBeLessThan(6 * Math.sqrt(steps * q * (1 - q)));
  });

  it('is reproducible per (seed, round, site) and differs between them', () => {
    const a = poissonSampler(500, 0.1, dpSgdSamplingSeed(1, 2, 'a'))();
    expect(poissonSampler(500, 0.1, dpSgdSamplingSeed(1, 2, 'a'))()).toEqual(a);
    expect(poissonSampler(500, 0.1, dpSgdSamplingSeed(1, 3, 'a'))()).not.toEqual(a);
    expect(poissonSampler(500, 0.1, dpSgdSamplingSeed(1, 2, 'b'))()).not.toEqual(a);
    expect(poissonSampler(500, 0.1, dpSgdSamplingSeed(2, 2, 'a'))()).not.toEqual(a);
  });
});

describe('secret Poisson sampling (what a site uses)', () => {
  it('includes each record with probability q, and two samplers share nothing', () => {
    const n = 2000;
    const q = 0.05;
    const draw = secretPoissonSampler(n, q);
    let total = 0;
    const hits = new Uint32Array(n);
    const draws = 200;
    for (let k = 0; k < draws; k++) for (const i of draw()) {
      hits[i]!++;
      total++;
    }
    const expected = n * q * draws;
    // Binomial(n * draws, q): 6 standard deviations.
    expect(Math.abs(total - expected)).toBeLessThan(6 * Math.sqrt(expected * (1 - q)));
    // Every index is reachable: no record is never sampled over 200 draws at q = 0.05 (p = 0.95^200 ~ 3.5e-5 each).
    expect(hits.filter((h) => h === 0).length).toBeLessThan(5);
    const a = secretPoissonSampler(n, 0.5)();
    const b = secretPoissonSampler(n, 0.5)();
    expect(a).not.toEqual(b);
  });
});

describe('dpSgdSteps', () => {
  it('is training.steps, or epochs * round(1/q)', () => {
    expect(dpSgdSteps({ steps: 7, epochs: null }, 0.01)).toBe(7);
    expect(dpSgdSteps({ steps: null, epochs: 2 }, 0.01)).toBe(200);
    expect(dpSgdSteps({ steps: null, epochs: 1 }, 0.3)).toBe(3);
    expect(dpSgdSteps({ steps: null, epochs: null }, 0.25)).toBe(4);
    expect(() => dpSgdSteps({ steps: null, epochs: 1 }, 0)).toThrow(/privacy\.dp_sgd\.sample_rate/);
  });
});

describe('dpTrainLoop', () => {
  const model = randomModel(randomConfig('llama'));
  const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj', 'v_proj'] };
  const T = 8;
  const rows = Array.from({ length: 12 }, (_, i) => {
    const rng = createRng(100 + i);
    const ids = Int32Array.from({ length: T }, () => rng.int(model.config.vocabSize));
    return { ids, labels: Int32Array.from(ids, (x, t) => (t < 2 ? -100 : x)) };
  });
  const microBatches = (bs: number) => (idx: number[]): Batch[] => {
    const out: Batch[] = [];
    for (let s = 0; s < idx.length; s += bs) {
      const part = idx.slice(s, s + bs);
      const inputIds = new Int32Array(part.length * T);
      const labels = new Int32Array(part.length * T);
      part.forEach((i, b) => {
        inputIds.set(rows[i]!.ids, b * T);
        labels.set(rows[i]!.labels, b * T);
      });
      out.push(padBatchRows({ batchSize: part.length, seqLen: T, inputIds, labels }, bs, 0));
    }
    return out;
  };

  it('the step does not depend on how the batch is split into micro-batches (sigma = 0)', async () => {
    const engine = Engine.create(model, { mode: 'lora', lora, dtype: 'float64', threads: 1 });
    const results: number[][] = [];
    for (const bs of [5, 2]) {
      const params = engine.initParams(1);
      const all = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
      await dpTrainLoop({
        engine, params, numRecords: 12, sample: () => all, microBatches: microBatches(bs),
        dp: { maxGradNorm: 0.05, noiseMultiplier: 0, sampleRate: 0.5 }, steps: 2,
        optimizer: new AdamW({ lr: 0.01, weightDecay: 0 }), schedule: { kind: 'constant', baseLr: 0.01, warmupSteps: 0, totalSteps: 2 },
      });
      results.push([...params.values()].flatMap((t) => [...t.data]));
    }
    for (let i = 0; i < results[0]!.length; i++) expect(results[1]![i]).toBeCloseTo(results[0]![i]!, 9);
    await engine.close();
  });

  it('an empty Poisson batch is a noise-only step; loss goes down with small noise', async () => {
    const engine = Engine.create(model, { mode: 'lora', lora, threads: 1 });
    const params = engine.initParams(2);
    const before = [...params.values()].map((t) => Float32Array.from(t.data));
    const empty = await dpTrainLoop({
      engine, params, numRecords: 12, sample: () => [], microBatches: microBatches(4),
      dp: { maxGradNorm: 1, noiseMultiplier: 1, sampleRate: 0.25 }, steps: 1,
      optimizer: new AdamW({ lr: 0.01, weightDecay: 0 }), schedule: { kind: 'constant', baseLr: 0.01, warmupSteps: 0, totalSteps: 1 },
      normals: seeded(4),
    });
    expect(empty.examples).toBe(0);
    expect([...params.values()].some((t, i) => t.data.some((x, j) => x !== before[i]![j]))).toBe(true);

    const p2 = engine.initParams(2);
    const sampler = poissonSampler(12, 0.5, 9);
    const losses: number[] = [];
    await dpTrainLoop({
      engine, params: p2, numRecords: 12, sample: sampler, microBatches: microBatches(4),
      dp: { maxGradNorm: 1, noiseMultiplier: 0.01, sampleRate: 0.5 }, steps: 30,
      optimizer: new AdamW({ lr: 0.05, weightDecay: 0 }), schedule: { kind: 'constant', baseLr: 0.05, warmupSteps: 0, totalSteps: 30 },
      normals: seeded(5),
      onStep: (s) => { if (Number.isFinite(s.loss)) losses.push(s.loss); },
    });
    const head = losses.slice(0, 5).reduce((a, b) => a + b, 0) / 5;
    const tail = losses.slice(-5).reduce((a, b) => a + b, 0) / 5;
    expect(tail).toBeLessThan(head);
    await engine.close();
  });
});
