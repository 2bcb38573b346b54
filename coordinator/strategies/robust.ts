/**
 * Byzantine-robust aggregation: rules that a minority of faulty or malicious
 * sites cannot drag arbitrarily far. They need every update of the round at
 * once (buffering: memory O(updates x adapter)) and, except norm bounding,
 * treat every site alike: an example count is a claim a Byzantine site can
 * inflate.
 *
 *   median         coordinate-wise median (Yin et al. 2018, "Byzantine-Robust
 *                  Distributed Learning: Towards Optimal Statistical Rates")
 *   trimmed_mean   coordinate-wise mean after dropping the beta fraction of
 *                  largest and smallest values (same paper)
 *   krum           the update closest to its n - f - 2 nearest neighbours; with
 *                  m > 1 the mean of the m best (multi-Krum) (Blanchard et al.
 *                  2017, "Machine Learning with Adversaries")
 *   norm_bounding  each update's distance from the global clipped to a bound
 *                  (fixed, or the round's median distance), then the mean (Sun
 *                  et al. 2019, "Can You Really Backdoor Federated Learning?")
 */
import { z } from 'zod';
import { clipToNorm, coordinateMedian, l2Distance, multiKrum, trimmedMean, weightedMean } from './math/robust.ts';
import {
  BaseStrategy,
  flatten,
  unflatten,
  type Aggregator,
  type FitUpdate,
  type GlobalAdapter,
  type StrategyContext,
  type StrategyDefinition,
} from './strategy.ts';

/** Keeps every update of the attempt as a flat vector (with its weight). */
export class BufferAggregator implements Aggregator {
  readonly kind = 'buffering';
  readonly updates: Float32Array[] = [];
  readonly weights: number[] = [];
  readonly sites: string[] = [];
  get count(): number {
    return this.updates.length;
  }
  add(u: FitUpdate): void {
    // Kept in site order, whatever the arrival order, so ties (Krum) and results are reproducible.
    let i = this.sites.length;
    while (i > 0 && this.sites[i - 1]! > u.site) i--;
    this.updates.splice(i, 0, flatten(u.tensors));
    this.weights.splice(i, 0, u.weight);
    this.sites.splice(i, 0, u.site);
  }
}

type Rule = (agg: BufferAggregator, center: Float32Array) => Float32Array;

class Robust extends BaseStrategy {
  constructor(
    ctx: StrategyContext,
    readonly name: string,
    readonly description: string,
    private readonly rule: Rule,
  ) {
    super(ctx);
  }
  aggregator(): Aggregator {
    return new BufferAggregator();
  }
  aggregateFit(_round: number, global: GlobalAdapter, aggregator: Aggregator): GlobalAdapter {
    if (!(aggregator instanceof BufferAggregator)) throw new Error(`${this.name}: expects the aggregator it created`);
    if (aggregator.count === 0) throw new Error(`${this.name}: no updates to aggregate`);
    const next = this.rule(aggregator, flatten(global.tensors));
    return { tensors: unflatten(next, global.tensors), rank: global.rank };
  }
}

export const median: StrategyDefinition = {
  name: 'median',
  summary: 'coordinate-wise median of the sites\' adapters',
  params: z.strictObject({}),
  create: (_p, ctx) => new Robust(ctx, 'median', 'median (coordinate-wise)', (a) => coordinateMedian(a.updates)),
};

export const trimmed_mean: StrategyDefinition = {
  name: 'trimmed_mean',
  summary: 'coordinate-wise mean without the beta fraction of largest and smallest values',
  params: z.strictObject({ beta: z.number().min(0).lt(0.5).default(0.1) }),
  create: (p: { beta: number }, ctx) => new Robust(ctx, 'trimmed_mean', `trimmed_mean (beta ${p.beta})`, (a) => trimmedMean(a.updates, p.beta)),
};

export const krum: StrategyDefinition = {
  name: 'krum',
  summary: 'Krum / multi-Krum: the m updates closest to their n - f - 2 nearest neighbours, averaged',
  params: z.strictObject({ f: z.number().int().min(0).default(0), m: z.number().int().min(1).default(1) }),
  create: (p: { f: number; m: number }, ctx) =>
    new Robust(ctx, 'krum', p.m > 1 ? `multi-krum (f ${p.f}, m ${p.m})` : `krum (f ${p.f})`, (a) => multiKrum(a.updates, p.f, Math.min(p.m, a.count)).aggregate),
};

export const norm_bounding: StrategyDefinition = {
  name: 'norm_bounding',
  summary: 'each update\'s distance from the global clipped to a bound (fixed or the round\'s median), then the mean',
  params: z.strictObject({
    bound: z.union([z.number().positive(), z.literal('median')]).default('median'),
    /** Weight the clipped updates by examples (default: every site alike). */
    weighted: z.boolean().default(false),
  }),
  create: (p: { bound: number | 'median'; weighted: boolean }, ctx) =>
    new Robust(ctx, 'norm_bounding', `norm_bounding (bound ${p.bound}${p.weighted ? ', weighted' : ''})`, (a, center) => {
      const norms = a.updates.map((u) => l2Distance(u, center));
      const sorted = [...norms].sort((x, y) => x - y);
      const mid = sorted.length >> 1;
      const med = sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2;
      const bound = p.bound === 'median' ? med : p.bound;
      const clipped = a.updates.map((u) => (bound > 0 ? clipToNorm(u, center, bound).clipped : center));
      return weightedMean(clipped, p.weighted ? a.weights : a.updates.map(() => 1));
    }),
};
