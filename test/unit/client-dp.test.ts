import { describe, expect, it } from 'vitest';
import { parseRunConfig } from '../../common/config.ts';
import type { NormalSource } from '../../common/privacy/noise.ts';
import { clientDpSchema, type ClientDpConfig } from '../../common/privacy/config.ts';
import { createRng } from '../../common/random.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { ClientDp, ClientDpAggregator, clientDpIssues, effectiveSigma } from '../../coordinator/privacy/client-dp.ts';

const seeded = (seed: number): NormalSource => {
  const rng = createRng(seed);
  return (out) => {
    for (let i = 0; i < out.length; i++) out[i] = rng.normal();
  };
};

const dpCfg = (o: Record<string, unknown>): ClientDpConfig => clientDpSchema.parse(o);

/** Sample mean and variance of a vector. */
function moments(v: ArrayLike<number>): { mean: number; variance: number } {
  let s = 0;
  let s2 = 0;
  for (let i = 0; i < v.length; i++) {
    s += v[i]!;
    s2 += v[i]! * v[i]!;
  }
  const mean = s / v.length;
  return { mean, variance: s2 / v.length - mean * mean };
}

const adapter = (a: number[], b: number[]): TensorMap =>
  new Map([
    ['m.lora_A.weight', { shape: [1, a.length], data: Float32Array.from(a) }],
    ['m.lora_B.weight', { shape: [b.length, 1], data: Float32Array.from(b) }],
  ]);

const update = (tensors: TensorMap, start: TensorMap) => ({ workerId: 'w', site: 's', spec: { rank: 1, proxMu: 0, freezeLoraA: false }, weight: 1, tensors, start });

describe('client DP: central noise', () => {
  it('adds N(0, (sigma C)^2) to the sum and divides by the sites asked', () => {
    const n = 200_000;
    const sigma = 1.3;
    const C = 0.25;
    for (const expected of [1, 4]) {
      const dp = new ClientDp(dpCfg({ clip_norm: C, noise_multiplier: sigma }), seeded(7 + expected));
      const sum = new Float64Array(n);
      dp.finishSum(sum, expected);
      const { mean, variance } = moments(sum);
      const want = (sigma * C / expected) ** 2;
      // 6 standard errors of the variance estimate (sqrt(2/n) relative): about 1.9%; a variance off by
      // a factor sqrt(2) (or one using sigma alone, or dividing the std twice) is far outside.
      expect(Math.abs(variance / want - 1)).toBeLessThan(6 * Math.sqrt(2 / n));
      expect(Math.abs(mean)).toBeLessThan((6 * Math.sqrt(want)) / Math.sqrt(n));
    }
  });

  it('noise: distributed leaves the sum to the sites: t shares of std sigma C / sqrt(t) make variance (sigma C)^2', () => {
    const sigma = 0.8;
    const C = 2;
    const t = 5;
    const dp = new ClientDp(dpCfg({ clip_norm: C, noise_multiplier: sigma, noise: 'distributed' }), seeded(3));
    expect(dp.centralNoiseStd()).toBe(0);
    const std = dp.siteNoiseStd(t);
    expect(std).toBeCloseTo((sigma * C) / Math.sqrt(t), 12);
    const n = 100_000;
    const rng = seeded(11);
    const sum = new Float64Array(n);
    const z = new Float64Array(n);
    for (let k = 0; k < t; k++) {
      rng(z);
      for (let i = 0; i < n; i++) sum[i]! += std * z[i]!;
    }
    const before = Float64Array.from(sum);
    dp.finishSum(sum, 1);
    expect(sum).toEqual(before); // the coordinator adds nothing
    expect(Math.abs(moments(sum).variance / (sigma * C) ** 2 - 1)).toBeLessThan(6 * Math.sqrt(2 / n));
    expect(() => dp.siteNoiseStd(0)).toThrow(/threshold/);
  });
});

describe('client DP: clipping and the aggregate', () => {
  it('clips every update delta to norm <= C, keeps those within C as they are, and averages over the sites asked', () => {
    const rng = createRng(5);
    const C = 0.5;
    const dim = 6;
    const global = adapter(Array.from({ length: dim }, () => rng.normal()), Array.from({ length: dim }, () => rng.normal()));
    const dp = new ClientDp(dpCfg({ clip_norm: C, noise_multiplier: 0 }));
    const expected = 10;
    const agg = new ClientDpAggregator({ tensors: global, rank: 1 }, dp, expected);
    const ref = new Float64Array(2 * dim);
    const scales = [0.01, 0.1, 0.3, 1, 3, 10, 100];
    for (const scale of scales) {
      const d = Array.from({ length: 2 * dim }, () => rng.normal() * scale);
      const tensors = adapter(
        d.slice(0, dim).map((x, i) => global.get('m.lora_A.weight')!.data[i]! + x),
        d.slice(dim).map((x, i) => global.get('m.lora_B.weight')!.data[i]! + x),
      );
      // Reference clip, computed from what arrived (float32) independently of the code under test.
      const flat = [...tensors.get('m.lora_A.weight')!.data, ...tensors.get('m.lora_B.weight')!.data];
      const start = [...global.get('m.lora_A.weight')!.data, ...global.get('m.lora_B.weight')!.data];
      const delta = flat.map((x, i) => x - start[i]!);
      const norm = Math.hypot(...delta);
      for (let i = 0; i < delta.length; i++) ref[i]! += delta[i]! * Math.min(1, C / norm);
      agg.add(update(tensors, global));
    }
    expect(agg.count).toBe(scales.length);
    expect(agg.clippedNorms).toHaveLength(scales.length);
    for (const n of agg.clippedNorms) expect(n).toBeLessThanOrEqual(C * (1 + 1e-12));
    // The small updates were not clipped: their norm is their own.
    expect(agg.clippedNorms[0]!).toBeLessThan(C);
    expect(agg.clippedNorms.at(-1)!).toBeCloseTo(C, 12);
    const mean = agg.mean();
    const got = [...mean.get('m.lora_A.weight')!.data, ...mean.get('m.lora_B.weight')!.data];
    const g0 = [...global.get('m.lora_A.weight')!.data, ...global.get('m.lora_B.weight')!.data];
    for (let i = 0; i < got.length; i++) expect(got[i]!).toBeCloseTo(g0[i]! + ref[i]! / expected, 6);
    // Drawn once: a second call gives the same tensors.
    expect(agg.mean()).toBe(mean);
  });

  it('adds no noise to tensors no site can change (FFA-LoRA lora_A)', () => {
    const global = adapter([1, 2, 3], [0, 0, 0]);
    const dp = new ClientDp(dpCfg({ clip_norm: 1, noise_multiplier: 2 }), seeded(1));
    const agg = new ClientDpAggregator({ tensors: global, rank: 1 }, dp, 3, (n) => n.includes('.lora_A.'));
    agg.add(update(adapter([1, 2, 3], [0.1, 0, 0]), global));
    const mean = agg.mean();
    expect([...mean.get('m.lora_A.weight')!.data]).toEqual([1, 2, 3]);
    expect([...mean.get('m.lora_B.weight')!.data].some((v, i) => v !== [0.1 / 3, 0, 0][i])).toBe(true);
  });
});

describe('client DP: adaptive clipping (Andrew et al. 2021)', () => {
  it('moves C geometrically by the fraction of unclipped updates: C exp(-eta (b - gamma))', () => {
    const dp = new ClientDp(dpCfg({ clip_norm: 1, noise_multiplier: 0, adaptive_clipping: { target_quantile: 0.5, learning_rate: 0.2, count_stddev: 0 } }));
    const global = adapter([0, 0], [0, 0]);
    const agg = new ClientDpAggregator({ tensors: global, rank: 1 }, dp, 4);
    for (const x of [0.1, 0.5, 2, 3]) agg.add(update(adapter([x, 0], [0, 0]), global));
    agg.add(update(adapter([0.2, 0], [0, 0]), global)); // 3 of 5 within C, over 4 asked
    const r = dp.endRound(4);
    expect(r.unclipped).toBe(3);
    expect(r.received).toBe(5);
    expect(r.clipNorm).toBe(1);
    expect(dp.clipNorm()).toBeCloseTo(Math.exp(-0.2 * (3 / 4 - 0.5)), 14);
  });

  it('tracks the target quantile of the update norms over rounds, with count noise', () => {
    const rng = createRng(9);
    const dp = new ClientDp(dpCfg({ clip_norm: 0.1, noise_multiplier: 1, adaptive_clipping: { target_quantile: 0.8, learning_rate: 0.2 } }), seeded(4));
    const m = 100;
    for (let round = 0; round < 300; round++) {
      dp.beginAttempt();
      // Update norms uniform on (0, 10): the 0.8 quantile is 8.
      for (let k = 0; k < m; k++) dp.clip([Float64Array.of(rng.next() * 10)]);
      dp.endRound(m);
    }
    expect(dp.clipNorm()).toBeGreaterThan(7);
    expect(dp.clipNorm()).toBeLessThan(9);
  });

  it('charges the count noise: sigma_eff = (sigma^-2 + (2 sigma_b)^-2)^-1/2, sigma_b = m / 20 by default', () => {
    // Andrew et al. 2021 Thm 1, e.g. sigma 1, sigma_b 5: (1 + 1/100)^-1/2.
    expect(effectiveSigma(1, 5)).toBeCloseTo(1 / Math.sqrt(1.01), 12);
    expect(effectiveSigma(1.2, Infinity)).toBe(1.2);
    expect(effectiveSigma(0, 5)).toBe(0);
    const dp = new ClientDp(dpCfg({ clip_norm: 1, noise_multiplier: 1, adaptive_clipping: {} }));
    expect(dp.roundSigma(100)).toBeCloseTo(1 / Math.sqrt(1.01), 12);
    expect(new ClientDp(dpCfg({ clip_norm: 1, noise_multiplier: 1 })).roundSigma(100)).toBe(1);
  });

  it('saves and restores C', () => {
    const cfg = dpCfg({ clip_norm: 1, noise_multiplier: 1, adaptive_clipping: {} });
    const a = new ClientDp(cfg, seeded(2));
    a.clip([Float64Array.of(0.3)]);
    a.endRound(1);
    const b = new ClientDp(cfg, undefined, a.state());
    expect(b.clipNorm()).toBe(a.clipNorm());
    expect(b.clipNorm()).not.toBe(1);
    expect(() => new ClientDp(cfg, undefined, { clipNorm: -1 })).toThrow(/clipNorm/);
  });
});

describe('client DP: what it refuses, by name', () => {
  const cfg = (o: Record<string, unknown>) =>
    parseRunConfig({ name: 't', model: { path: 'm' }, training: { steps: 1 }, rounds: 1, server: { join_token: 'x' }, weighting: { mode: 'equal' }, ...o });
  const issues = (o: Record<string, unknown>) => clientDpIssues(cfg(o)).map((i) => `${i.path.join('.')}: ${i.message}`);

  it('accepts FedAvg-family strategies with equal weighting', () => {
    for (const name of ['fedavg', 'fedadam', 'fedprox', 'ffa']) expect(issues({ strategy: name, privacy: { client_dp: { clip_norm: 1, noise_multiplier: 1 } } })).toEqual([]);
    expect(issues({ strategy: 'median' })).toEqual([]); // no client_dp: nothing to check
  });

  it('refuses strategies that are not sums, example weighting, adaptive clipping under secure aggregation and a noiseless count', () => {
    for (const name of ['median', 'trimmed_mean', 'krum', 'flora', 'flexlora', 'norm_bounding']) {
      expect(issues({ strategy: name, privacy: { client_dp: { clip_norm: 1, noise_multiplier: 1 } } })).toEqual([expect.stringMatching(new RegExp(`^privacy\\.client_dp: does not work with strategy ${name}: .*use one of fedavg`))]);
    }
    expect(issues({ weighting: { mode: 'examples' }, privacy: { client_dp: { clip_norm: 1, noise_multiplier: 1 } } })).toEqual([
      expect.stringMatching(/^weighting\.mode: must be equal with privacy\.client_dp \(got examples\)/),
    ]);
    expect(
      issues({ cohort: { min_workers: 2 }, privacy: { secure_aggregation: { threshold: 2 }, client_dp: { clip_norm: 1, noise_multiplier: 1, adaptive_clipping: {} } } }),
    ).toEqual([expect.stringMatching(/^privacy\.client_dp\.adaptive_clipping: is not available with privacy\.secure_aggregation/)]);
    expect(issues({ privacy: { client_dp: { clip_norm: 1, noise_multiplier: 1, adaptive_clipping: { count_stddev: 0 } } } })).toEqual([
      expect.stringMatching(/^privacy\.client_dp\.adaptive_clipping\.count_stddev: must be > 0/),
    ]);
  });
});
