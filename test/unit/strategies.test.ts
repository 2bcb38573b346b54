import { Matrix, SingularValueDecomposition } from 'ml-matrix';
import { describe, expect, it } from 'vitest';
import { parseRunConfig, RunConfigError } from '../../common/config.ts';
import { peftKey, type LoraTarget } from '../../common/lora.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { MeanAggregator } from '../../coordinator/strategies/fedavg.ts';
import { createStrategy, strategyIssues } from '../../coordinator/strategies/index.ts';
import type { Candidate, FitSpec, FitUpdate, GlobalAdapter, Strategy } from '../../coordinator/strategies/strategy.ts';

// One adapted module m: A [r, 3], B [2, r].
const target: LoraTarget = { module: 'm', weight: 'm.weight', bias: null, inFeatures: 3, outFeatures: 2, conv1d: false, layer: 0, kind: 'q_proj', r: 1, scale: 1 };
const KA = peftKey('m', 'A');
const KB = peftKey('m', 'B');

function adapter(a: number[], b: number[], r = 1): TensorMap {
  return new Map([
    [KA, { shape: [r, a.length / r], data: Float32Array.from(a) }],
    [KB, { shape: [b.length / r, r], data: Float32Array.from(b) }],
  ]);
}

const cfg = (strategy: unknown, over: Record<string, unknown> = {}) =>
  parseRunConfig({ name: 't', model: { path: 'm' }, training: { steps: 1, seed: 3 }, rounds: 1, strategy, server: { join_token: 'x' }, lora: { r: 1, alpha: 1 }, ...over });

const make = (strategy: unknown, over: Record<string, unknown> = {}): Strategy => createStrategy(cfg(strategy, over), [target]);

const spec = (rank = 1): FitSpec => ({ rank, proxMu: 0, freezeLoraA: false });

function fold(s: Strategy, g: GlobalAdapter, ups: Array<[TensorMap, number, string?, number?]>): GlobalAdapter {
  const agg = s.aggregator(g);
  for (const [tensors, weight, site, rank] of ups) {
    const u: FitUpdate = { workerId: site ?? 'w', site: site ?? 'w', spec: spec(rank ?? g.rank), weight, tensors, start: g.tensors };
    expect(s.checkUpdate(u)).toBeNull();
    agg.add(u);
  }
  return s.aggregateFit(1, g, agg, [], []);
}

const vals = (m: TensorMap, k: string): number[] => [...m.get(k)!.data].map((x) => +x.toFixed(5));

/** Dense s * B @ A of a single-module adapter of rank r. */
function product(m: TensorMap, r: number, s = 1): number[][] {
  const A = m.get(KA)!.data;
  const B = m.get(KB)!.data;
  return [0, 1].map((o) => [0, 1, 2].map((j) => s * Array.from({ length: r }, (_, k) => B[o * r + k]! * A[k * 3 + j]!).reduce((x, y) => x + y, 0)));
}

describe('fedavg family', () => {
  it('MeanAggregator is the example-weighted mean of A and of B separately, in O(adapter) memory', () => {
    const acc = new MeanAggregator(adapter([0, 0, 0], [0, 0]));
    acc.add({ tensors: adapter([1, 2, 3], [10, 20]), weight: 10 });
    acc.add({ tensors: adapter([3, -2, 0], [0, 6]), weight: 30 });
    acc.add({ tensors: adapter([0, 1, 1], [1, 1]), weight: 60 });
    const m = acc.mean();
    expect(acc.count).toBe(3);
    // sum_k n_k w_k / sum_k n_k, written out per element
    expect(vals(m, KA)).toEqual([(10 * 1 + 30 * 3) / 100, (10 * 2 - 30 * 2 + 60) / 100, (10 * 3 + 60) / 100]);
    expect(vals(m, KB)).toEqual([(100 + 60) / 100, (200 + 180 + 60) / 100]);
    expect(() => acc.add({ tensors: adapter([1, 2, 3], [1, 1]), weight: 0 })).toThrow(/weight must be a positive finite number/);
    expect(() => new MeanAggregator(adapter([0, 0, 0], [0, 0])).mean()).toThrow(/no updates/);
  });

  it('fedavg returns the weighted mean; fedprox the same mean, with mu in every fit spec', () => {
    const g: GlobalAdapter = { tensors: adapter([0, 0, 0], [0, 0]), rank: 1 };
    const ups: Array<[TensorMap, number]> = [
      [adapter([2, 4, 0], [1, 0]), 1],
      [adapter([4, 8, 4], [3, 0]), 3],
    ];
    const a = fold(make('fedavg'), g, ups);
    expect(vals(a.tensors, KA)).toEqual([3.5, 7, 3]);
    expect(vals(a.tensors, KB)).toEqual([2.5, 0]);
    const prox = make({ name: 'fedprox', mu: 0.05 });
    const cands: Candidate[] = [0, 1].map((i) => ({ workerId: `w${i}`, site: `s${i}`, numTrainExamples: 5, numEvalExamples: 0 }));
    expect(prox.configureFit(1, 0, cands).map((f) => f.spec)).toEqual([
      { rank: 1, proxMu: 0.05, freezeLoraA: false },
      { rank: 1, proxMu: 0.05, freezeLoraA: false },
    ]);
    expect(vals(fold(prox, g, ups).tensors, KA)).toEqual([3.5, 7, 3]);
  });

  it('fedavgm: one step from fresh momentum is global + lr * (mean - global)', () => {
    const s = make({ name: 'fedavgm', lr: 0.5 });
    const g: GlobalAdapter = { tensors: adapter([1, 1, 1], [1, 1]), rank: 1 };
    const next = fold(s, g, [[adapter([3, 1, 0], [0, 1]), 1]]);
    expect(vals(next.tensors, KA)).toEqual([1 + 0.5 * 2, 1, 1 - 0.5]);
    expect(vals(next.tensors, KB)).toEqual([1 - 0.5, 1]);
  });

  it('fedadam: one step is g + lr * m / (sqrt(v) + tau) with m = (1-b1) d, v = b2 tau^2 + (1-b2) d^2 (Reddi et al. 2021, Alg. 2)', () => {
    const p = { lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 0.01 };
    const s = make({ name: 'fedadam', ...p });
    const g: GlobalAdapter = { tensors: adapter([0, 0, 0], [0, 0]), rank: 1 };
    const next = fold(s, g, [[adapter([1, -2, 0], [0.5, 0]), 1]]);
    const step = (d: number): number => {
      const m = (1 - p.beta1) * d;
      const v = p.beta2 * p.tau ** 2 + (1 - p.beta2) * d * d;
      return (p.lr * m) / (Math.sqrt(v) + p.tau);
    };
    expect(vals(next.tensors, KA)).toEqual([1, -2, 0].map((d) => +step(d).toFixed(5)));
    expect(vals(next.tensors, KB)).toEqual([0.5, 0].map((d) => +step(d).toFixed(5)));
  });

  it('fedadam state saved after a round and loaded into a new strategy continues exactly the same trajectory', () => {
    const p = { name: 'fedadam', lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 0.01 };
    const g0: GlobalAdapter = { tensors: adapter([0, 0, 0], [0, 0]), rank: 1 };
    const a = make(p);
    const g1 = fold(a, g0, [[adapter([1, -2, 0], [0.5, 0]), 1]]);
    const saved = a.state();
    expect(saved.tensors.size).toBe(4);
    const ga = fold(a, g1, [[adapter([0, 1, 1], [1, 1]), 1]]);
    const b = make(p);
    b.load(saved);
    const gb = fold(b, g1, [[adapter([0, 1, 1], [1, 1]), 1]]);
    expect([...gb.tensors.get(KA)!.data]).toEqual([...ga.tensors.get(KA)!.data]);
    // A fresh optimizer (moments lost) would not give the same result.
    const gc = fold(make(p), g1, [[adapter([0, 1, 1], [1, 1]), 1]]);
    expect([...gc.tensors.get(KA)!.data]).not.toEqual([...ga.tensors.get(KA)!.data]);
  });
});

describe('FFA-LoRA', () => {
  it('freezes A in every fit spec, refuses an update whose A changed, and its mean of B is the exact mean of the products', () => {
    const s = make('ffa');
    const cands: Candidate[] = [{ workerId: 'w0', site: 's0', numTrainExamples: 5, numEvalExamples: 0 }];
    expect(s.configureFit(1, 0, cands)[0]!.spec.freezeLoraA).toBe(true);
    const g: GlobalAdapter = { tensors: adapter([0.5, -1, 2], [0, 0]), rank: 1 };
    const moved: FitUpdate = { workerId: 'w', site: 'w', spec: spec(), weight: 1, tensors: adapter([0.5, -1, 2.5], [1, 1]), start: g.tensors };
    expect(s.checkUpdate(moved)).toMatch(/lora_A\.weight changed at element 2 .*lora_A must stay frozen/);
    const next = fold(s, g, [
      [adapter([0.5, -1, 2], [1, 3]), 1],
      [adapter([0.5, -1, 2], [3, -1]), 3],
    ]);
    // mean of B_k A = (1 * B_1 A + 3 * B_2 A) / 4, computed densely
    const want = [0, 1].map((o) => [0, 1, 2].map((j) => ((1 * [1, 3][o]! + 3 * [3, -1][o]!) / 4) * [0.5, -1, 2][j]!));
    const got = product(next.tensors, 1);
    for (let o = 0; o < 2; o++) for (let j = 0; j < 3; j++) expect(got[o]![j]).toBeCloseTo(want[o]![j]!, 6);
  });
});

describe('robust aggregation with one Byzantine site of three', () => {
  const g: GlobalAdapter = { tensors: adapter([0, 0, 0], [0, 0]), rank: 1 };
  // Honest sites near (1, 1, 1 | 1, 1); the Byzantine one sends -10 x that and claims 100x the examples.
  const ups: Array<[TensorMap, number]> = [
    [adapter([1, 1.2, 0.8], [1, 1]), 10],
    [adapter([1.2, 0.8, 1], [0.9, 1.1]), 10],
    [adapter([-10, -10, -10], [-10, -10]), 1000],
  ];

  it('fedavg is dragged to the Byzantine side', () => {
    const a = fold(make('fedavg'), g, ups);
    expect(a.tensors.get(KA)!.data[0]).toBeLessThan(-9);
  });

  it('median takes the middle value per coordinate', () => {
    const m = fold(make('median'), g, ups);
    expect(vals(m.tensors, KA)).toEqual([1, 0.8, 0.8]);
    expect(vals(m.tensors, KB)).toEqual([0.9, 1]);
  });

  it('trimmed mean with beta 0.34 drops one value from each end (n = 3: the median)', () => {
    const m = fold(make({ name: 'trimmed_mean', beta: 0.34 }), g, ups);
    expect(vals(m.tensors, KA)).toEqual([1, 0.8, 0.8]);
  });

  it('krum (f = 0) picks an honest update: the one nearest its nearest neighbour', () => {
    const k = fold(make({ name: 'krum', f: 0 }), g, ups);
    // Honest updates are 0.3 apart in squared distance; both have score 0.1, the lower index wins.
    expect(vals(k.tensors, KA)).toEqual([1, 1.2, 0.8]);
  });

  it('norm bounding at the median norm clips the Byzantine update to the honest scale', () => {
    const n = fold(make('norm_bounding'), g, ups);
    const norm = (x: number[]) => Math.sqrt(x.reduce((s, v) => s + v * v, 0));
    const honest = [norm([1, 1.2, 0.8, 1, 1]), norm([1.2, 0.8, 1, 0.9, 1.1])];
    const med = honest[1]!; // sorted norms [h0, h1, 22.36]: the median is the larger honest norm
    const byz = [-10, -10, -10, -10, -10].map((v) => (v * med) / norm([-10, -10, -10, -10, -10]));
    const want = [0, 1, 2].map((i) => ([1, 1.2, 0.8][i]! + [1.2, 0.8, 1][i]! + byz[i]!) / 3);
    expect(vals(n.tensors, KA)).toEqual(want.map((x) => +x.toFixed(5)));
    expect(n.tensors.get(KA)!.data[0]).toBeGreaterThan(0.2);
  });
});

describe('mixed ranks', () => {
  const s0 = 1; // lora alpha / r of the test config
  const rng = (seed: number) => () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648) * 2 - 1;
  const random = (r: number, seed: number): TensorMap => {
    const f = rng(seed);
    return adapter(Array.from({ length: r * 3 }, f), Array.from({ length: 2 * r }, f), r);
  };

  it('flora: the stacked product is exactly the weighted mean of the sites\' products, at rank sum(r_k)', () => {
    const s = make({ name: 'flora', ranks: { a: 1, b: 2 } }, { lora: { r: 1, alpha: 1 } });
    const cands: Candidate[] = ['a', 'b', 'c'].map((x) => ({ workerId: x, site: x, numTrainExamples: 5, numEvalExamples: 0 }));
    expect(s.configureFit(1, 0, cands).map((f) => [f.workerId, f.spec.rank])).toEqual(
      expect.arrayContaining([
        ['a', 1],
        ['b', 2],
        ['c', 1],
      ]),
    );
    const g: GlobalAdapter = { tensors: random(1, 1), rank: 1 };
    const u = [random(1, 2), random(2, 3), random(1, 4)];
    const w = [1, 2, 5];
    const next = fold(s, g, [
      [u[0]!, w[0]!, 'a', 1],
      [u[1]!, w[1]!, 'b', 2],
      [u[2]!, w[2]!, 'c', 1],
    ]);
    expect(next.rank).toBe(4);
    const want = [0, 1].map((o) => [0, 1, 2].map((j) => (w[0]! * product(u[0]!, 1)[o]![j]! + w[1]! * product(u[1]!, 2)[o]![j]! + w[2]! * product(u[2]!, 1)[o]![j]!) / 8));
    const got = product(next.tensors, 4, s0);
    for (let o = 0; o < 2; o++) for (let j = 0; j < 3; j++) expect(Math.abs(got[o]![j]! - want[o]![j]!)).toBeLessThan(1e-6);
    // Averaging A and B separately would not give that product.
    const ones = fold(make('fedavg'), { tensors: random(1, 1), rank: 1 }, [
      [u[0]!, w[0]!],
      [u[2]!, w[2]!],
    ]);
    const sep = product(ones.tensors, 1);
    const exact = [0, 1].map((o) => [0, 1, 2].map((j) => (w[0]! * product(u[0]!, 1)[o]![j]! + w[2]! * product(u[2]!, 1)[o]![j]!) / 6));
    expect(Math.max(...[0, 1].flatMap((o) => [0, 1, 2].map((j) => Math.abs(sep[o]![j]! - exact[o]![j]!))))).toBeGreaterThan(1e-3);
  });

  it('a site restarts from the best rank-r_k approximation of the global product (Eckart-Young), exact when r_k >= the global rank', () => {
    const s = make({ name: 'flora', ranks: {} });
    const g: GlobalAdapter = { tensors: random(2, 9), rank: 2 };
    const dense = product(g.tensors, 2);
    const svd = new SingularValueDecomposition(new Matrix(dense), { autoTranspose: true });
    const sigma = svd.diagonal; // independent reference: SVD of the dense 2 x 3 product
    const one = s.startAdapter(g, spec(1));
    expect(one.get(KA)!.shape).toEqual([1, 3]);
    const err = Math.sqrt(dense.flat().reduce((acc, x, i) => acc + (x - product(one, 1).flat()[i]!) ** 2, 0));
    expect(err).toBeCloseTo(sigma[1]!, 5);
    const three = s.startAdapter(g, spec(3));
    const p3 = product(three, 3).flat();
    dense.flat().forEach((x, i) => expect(p3[i]).toBeCloseTo(x, 5));
    // The padded row of A is trainable (non-zero), its B column zero, so the product is unchanged.
    const a3 = three.get(KA)!.data;
    expect(Math.hypot(...[0, 1, 2].map((j) => a3[2 * 3 + j]!))).toBeGreaterThan(0);
  });

  it('flexlora keeps the global at global_rank: the best rank-k approximation of the weighted mean product', () => {
    const s = make({ name: 'flexlora', ranks: { a: 2, b: 2 }, global_rank: 1 });
    const g: GlobalAdapter = { tensors: random(1, 1), rank: 1 };
    const u = [random(2, 5), random(2, 6)];
    const next = fold(s, g, [
      [u[0]!, 1, 'a', 2],
      [u[1]!, 3, 'b', 2],
    ]);
    expect(next.rank).toBe(1);
    const mean = [0, 1].map((o) => [0, 1, 2].map((j) => (product(u[0]!, 2)[o]![j]! + 3 * product(u[1]!, 2)[o]![j]!) / 4));
    const sigma = new SingularValueDecomposition(new Matrix(mean), { autoTranspose: true }).diagonal;
    const got = product(next.tensors, 1).flat();
    const err = Math.sqrt(mean.flat().reduce((acc, x, i) => acc + (x - got[i]!) ** 2, 0));
    expect(err).toBeCloseTo(sigma[1]!, 5);
  });

  it('the rank each site was given is server state: restored on resume even when the config changed', () => {
    const a = make({ name: 'flora', ranks: { a: 2 } });
    const cands: Candidate[] = [{ workerId: 'x', site: 'a', numTrainExamples: 1, numEvalExamples: 0 }];
    expect(a.configureFit(1, 0, cands)[0]!.spec.rank).toBe(2);
    const b = make({ name: 'flora', ranks: { a: 4 } });
    b.load(a.state());
    expect(b.configureFit(2, 0, cands)[0]!.spec.rank).toBe(2);
  });
});

describe('cohort and config', () => {
  it('selects a seeded cohort of the configured fraction, never below min_workers', () => {
    const s = make('fedavg', { cohort: { fraction: 0.3, min_workers: 2 } });
    const cands: Candidate[] = Array.from({ length: 10 }, (_, i) => ({ workerId: `w${i}`, site: `s${i}`, numTrainExamples: 5, numEvalExamples: 0 }));
    const a = s.configureFit(1, 0, cands).map((f) => f.workerId);
    expect(a).toHaveLength(3);
    expect(new Set(a).size).toBe(3);
    expect(s.configureFit(1, 0, [...cands].reverse()).map((f) => f.workerId)).toEqual(a); // order of arrival does not matter
    expect(s.configureFit(1, 0, cands.slice(0, 4))).toHaveLength(2);
    const rounds = new Set(Array.from({ length: 8 }, (_, r) => s.configureFit(r + 1, 0, cands).map((f) => f.workerId).join()));
    expect(rounds.size).toBeGreaterThan(1);
  });

  it('evaluation goes to workers with eval data; loss weighted by tokens, accuracy by examples', () => {
    const s = make('fedavg');
    const cands: Candidate[] = [
      { workerId: 'a', site: 'a', numTrainExamples: 1, numEvalExamples: 4 },
      { workerId: 'b', site: 'b', numTrainExamples: 1, numEvalExamples: 0 },
    ];
    expect(s.configureEvaluate(1, cands)).toEqual(['a']);
    const sum = s.aggregateEvaluate(1, [
      { workerId: 'a', site: 'a', evalLoss: 1, evalTokens: 10, evalExamples: 1, evalAccuracy: 1 },
      { workerId: 'c', site: 'c', evalLoss: 2, evalTokens: 30, evalExamples: 3, evalAccuracy: 0 },
    ]);
    expect(sum.evalLoss).toBeCloseTo((10 + 60) / 40, 10);
    expect(sum.evalAccuracy).toBeCloseTo(1 / 4, 10);
  });

  it('names the field of an unknown strategy, a bad parameter or an unknown parameter', () => {
    const issues = (s: unknown) => strategyIssues(cfg(s)).map((i) => `${i.path.join('.')}: ${i.message}`);
    expect(issues('fedsgd')[0]).toMatch(/^strategy: must be one of fedavg, fedavgm, fedadam, fedyogi, fedprox, ffa, flora, flexlora, median, trimmed_mean, krum, norm_bounding \(got "fedsgd"\)$/);
    expect(issues({ name: 'fedsgd', mu: 1 })[0]).toMatch(/^strategy\.name: must be one of/);
    expect(issues({ name: 'fedprox', mu: -1 })).toEqual(['strategy.mu: must be >0 (got -1)']);
    expect(issues({ name: 'fedprox' })).toEqual(['strategy.mu: is required (number)']);
    expect(issues({ name: 'fedavg', mu: 0.1 })).toEqual(['strategy.mu: unknown parameter of strategy fedavg (allowed: name)']);
    expect(issues({ name: 'krum', f: 1, beta: 2 })).toEqual(['strategy.beta: unknown parameter of strategy krum (allowed: name, f, m)']);
    expect(issues({ name: 'trimmed_mean', beta: 0.5 })).toEqual(['strategy.beta: must be <0.5 (got 0.5)']);
    expect(issues({ name: 'flora', ranks: { a: 0 } })).toEqual(['strategy.ranks.a: must be >=1 (got 0)']);
    expect(() => make({ name: 'fedprox', mu: 0 })).toThrow(RunConfigError);
    expect(issues('fedavg')).toEqual([]);
  });

  it('refuses the old server_optimizer section, saying where its settings went', () => {
    expect(() => parseRunConfig({ name: 't', model: { path: 'm' }, training: { steps: 1 }, rounds: 1, server: { join_token: 'x' }, server_optimizer: { lr: 1 } })).toThrow(
      /server_optimizer: moved into strategy: .*strategy: \{ name: fedadam, lr: 0.1/,
    );
  });
});
