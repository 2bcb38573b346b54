/**
 * Client-level differential privacy for federated rounds: DP-FedAvg
 * (McMahan et al. 2018, "Learning Differentially Private Recurrent Language
 * Models") with optional adaptive clipping (Andrew et al. 2021,
 * "Differentially Private Learning with Adaptive Clipping").
 *
 * One round with m sites asked:
 *
 *   Delta_k  = update_k - start_k                       (each accepted site's update delta)
 *   Delta_k <- Delta_k * min(1, C / ||Delta_k||)         (clipped to L2 norm C; weight 1)
 *   S        = sum_k Delta_k + N(0, (sigma C)^2 I)       (central: the coordinator draws the noise;
 *                                                          distributed: each site adds N(0, (sigma C)^2 / t))
 *   next     = global + S / m                            (McMahan's fixed denominator)
 *
 * The shape the round loop and the secure-aggregation round call:
 *
 *   class ClientDp {
 *     clipNorm(): number                       C of this round (adaptive clipping moves it between rounds)
 *     noiseMultiplier(): number                sigma of the update sum
 *     siteNoiseStd(threshold): number          std each site adds with noise: distributed (sigma C / sqrt(t))
 *     clip(parts): { norm, factor }            clip one update delta in place, note its unclipped bit
 *     finishSum(sum, expected, frozen?): void  central noise on the sum (central mode), then / expected
 *     beginAttempt(): void                     forget the bits of a failed attempt
 *     endRound(expected): RoundPrivacy         adaptive clipping step; sigma of the round for the accountant
 *     state() / load()                         C, saved with each checkpoint
 *   }
 *
 * In the clear (no secure aggregation) ClientDpAggregator below does the
 * clipping, the sum and finishSum. Under secure aggregation the sites clip
 * (and with noise: distributed add their share); the decoded sum goes through
 * finishSum(sum, m) and then to the strategy as one update of weight 1. Either
 * way the round loop (run.ts) charges the round to the privacy ledger.
 *
 * The denominator is the number of sites asked, not the number that answered:
 * the sum of clipped weight-1 deltas has L2 sensitivity C when one site is
 * added or removed, and a fixed denominator keeps it C / m; dividing by the
 * number received would let one site's presence change the scale of everyone
 * else's contribution. A site that does not answer contributes zero (the
 * round's step shrinks by the missing share, as in McMahan et al.).
 *
 * Weights must be bounded for the sensitivity to be C: every update weighs 1
 * (weighting.mode: equal; `examples` is refused with client_dp).
 */
import { RunConfigError, type RunConfig } from '../../common/config.ts';
import { addGaussianNoise, clipToNorm, cryptoNormals, type NormalSource } from '../../common/privacy/noise.ts';
import type { ClientDpConfig } from '../../common/privacy/config.ts';
import { numel, type TensorMap } from '../../common/tensor.ts';
import { MeanAggregator } from '../strategies/fedavg.ts';
import type { FitUpdate, GlobalAdapter } from '../strategies/strategy.ts';

/** Strategies whose aggregate is the mean of the updates (what DP-FedAvg's sum-plus-noise replaces). */
export const CLIENT_DP_STRATEGIES = ['fedavg', 'fedavgm', 'fedadam', 'fedyogi', 'fedprox', 'ffa'] as const;

const NOT_A_SUM: Record<string, string> = {
  median: 'the coordinate-wise median is not a sum of updates: one site can move it by more than C / m, so Gaussian noise calibrated to C does not cover it',
  trimmed_mean: 'the trimmed mean is not a sum of updates: which updates are trimmed depends on every site, so its sensitivity is not C / m',
  krum: 'Krum selects one site\'s update: its output is a single site\'s data, and its sensitivity is not bounded by C / m',
  flora: 'FLoRA stacks the sites\' factors instead of summing them: the global adapter holds each site\'s update as it came',
  flexlora: 'FlexLoRA re-factorises the sum with an SVD at mixed ranks: the sites start from different adapters, so deltas are not clipped against one global',
  norm_bounding: 'norm_bounding clips and averages updates itself; client_dp already clips every update to clip_norm (use fedavg with client_dp instead)',
};

/** Why client_dp does not fit the rest of the config (path and message), empty when it does. */
export function clientDpIssues(cfg: RunConfig): Array<{ path: PropertyKey[]; message: string }> {
  const dp = cfg.privacy.client_dp;
  if (!dp) return [];
  const out: Array<{ path: PropertyKey[]; message: string }> = [];
  const name = cfg.strategy.name;
  if (!(CLIENT_DP_STRATEGIES as readonly string[]).includes(name)) {
    out.push({
      path: ['privacy', 'client_dp'],
      message: `does not work with strategy ${name}: ${NOT_A_SUM[name] ?? 'its aggregate is not a sum of updates'}; use one of ${CLIENT_DP_STRATEGIES.join(', ')}`,
    });
  }
  if (cfg.weighting.mode !== 'equal') {
    out.push({
      path: ['weighting', 'mode'],
      message: `must be equal with privacy.client_dp (got ${cfg.weighting.mode}): weighting by examples lets one site's update count more than C, and the noise is calibrated to a sensitivity of C`,
    });
  }
  if (dp.adaptive_clipping && cfg.privacy.secure_aggregation) {
    out.push({
      path: ['privacy', 'client_dp', 'adaptive_clipping'],
      message: 'is not available with privacy.secure_aggregation: the coordinator would have to see each site\'s unclipped bit, which secure aggregation hides; remove adaptive_clipping or secure_aggregation',
    });
  }
  if (dp.adaptive_clipping && dp.adaptive_clipping.count_stddev === 0 && dp.noise_multiplier > 0) {
    out.push({
      path: ['privacy', 'client_dp', 'adaptive_clipping', 'count_stddev'],
      message: 'must be > 0 when noise_multiplier > 0: a noiseless count of unclipped updates is released exactly and its epsilon is unbounded; leave it null (cohort / 20) or set a positive std',
    });
  }
  return out;
}

/** Throw a RunConfigError naming every client_dp problem of the config. */
export function checkClientDp(cfg: RunConfig): void {
  const issues = clientDpIssues(cfg);
  if (issues.length > 0) throw new RunConfigError('config', issues.map((i) => `${i.path.map(String).join('.')}: ${i.message}`));
}

/** What the coordinator saves of client DP with every checkpoint. */
export interface ClientDpState {
  /** C for the next round. */
  clipNorm: number;
}

/** One aggregated round, for the accountant and the round.completed event. */
export interface RoundPrivacy {
  /** C the round clipped to. */
  clipNorm: number;
  /** sigma of the update sum. */
  noiseMultiplier: number;
  /** sigma the accountant charges for the round (with adaptive clipping, the count noise costs its share: Andrew et al. Thm 1). */
  effectiveNoiseMultiplier: number;
  /** Updates that were not clipped (adaptive clipping tracks their fraction), of those received. */
  unclipped: number;
  received: number;
}

/**
 * Effective noise multiplier of a round that releases the update sum with
 * noise multiplier sigma and the count of unclipped updates with noise std
 * sigmaB (Andrew et al. 2021, Theorem 1; the bits are centred to +-1/2, so
 * the count has sensitivity 1/2): (sigma^-2 + (2 sigmaB)^-2)^-1/2.
 * Without adaptive clipping (sigmaB = Infinity) it is sigma.
 */
export function effectiveSigma(sigma: number, sigmaB: number): number {
  if (sigma === 0 || sigmaB === 0) return 0;
  return 1 / Math.sqrt(sigma ** -2 + (2 * sigmaB) ** -2);
}

export class ClientDp {
  private c: number;
  private bits = 0;
  private received = 0;

  constructor(
    readonly cfg: ClientDpConfig,
    private readonly normals: NormalSource = cryptoNormals,
    state: ClientDpState | null = null,
  ) {
    this.c = cfg.clip_norm;
    if (state) this.load(state);
  }

  clipNorm(): number {
    return this.c;
  }

  noiseMultiplier(): number {
    return this.cfg.noise_multiplier;
  }

  /** Std of the Gaussian noise the coordinator adds to the decoded or summed updates (0 when the sites add it). */
  centralNoiseStd(): number {
    return this.cfg.noise === 'central' ? this.cfg.noise_multiplier * this.c : 0;
  }

  /**
   * Std each site adds to its clipped delta with noise: distributed, so that
   * any `threshold` sites together carry variance (sigma C)^2 (more survivors,
   * more noise). 0 with noise: central.
   */
  siteNoiseStd(threshold: number): number {
    if (!Number.isInteger(threshold) || threshold < 1) throw new Error(`siteNoiseStd: threshold must be an integer >= 1 (got ${threshold})`);
    return this.cfg.noise === 'distributed' ? (this.cfg.noise_multiplier * this.c) / Math.sqrt(threshold) : 0;
  }

  /** Std of the noise on the count of unclipped updates (adaptive clipping), for a cohort of `expected`. */
  countStd(expected: number): number {
    const a = this.cfg.adaptive_clipping;
    if (!a) return Infinity;
    return a.count_stddev ?? expected / 20;
  }

  /** sigma the accountant charges for a round of `expected` sites asked (see effectiveSigma). */
  roundSigma(expected: number): number {
    return effectiveSigma(this.cfg.noise_multiplier, this.countStd(expected));
  }

  /** A new round attempt: the bits of an attempt that was not aggregated are forgotten. */
  beginAttempt(): void {
    this.bits = 0;
    this.received = 0;
  }

  /** Clip one update delta (its tensors as one vector) to C in place and note whether it was within C. */
  clip(parts: ReadonlyArray<Float32Array | Float64Array>): { norm: number; factor: number } {
    const r = clipToNorm(parts, this.c);
    if (r.norm <= this.c) this.bits++;
    this.received++;
    return r;
  }

  /**
   * The round's sum of clipped deltas -> its noisy mean: central noise of std
   * sigma C on every coordinate (noise: central; with noise: distributed the
   * sites added theirs), then divided by `expected` (the sites asked).
   * `frozen` names tensors no site can change (FFA-LoRA's lora_A): their sum is
   * 0 whatever the data, so they release nothing and get no noise.
   */
  finishSum(sum: Float64Array | ReadonlyMap<string, { data: Float32Array | Float64Array }>, expected: number, frozen: (name: string) => boolean = () => false): void {
    if (!Number.isInteger(expected) || expected < 1) throw new Error(`finishSum: expected must be the number of sites asked, an integer >= 1 (got ${expected})`);
    const std = this.centralNoiseStd();
    const inv = 1 / expected;
    const finish = (v: Float32Array | Float64Array, noise: boolean): void => {
      if (noise) addGaussianNoise(v, std, this.normals);
      for (let i = 0; i < v.length; i++) v[i] = v[i]! * inv;
    };
    if (sum instanceof Float64Array) finish(sum, true);
    else for (const [name, t] of sum) finish(t.data, !frozen(name));
  }

  /**
   * Close an aggregated round: with adaptive clipping, C <- C exp(-eta (b~ - gamma)),
   * b~ = (unclipped + N(0, sigmaB^2)) / expected. Returns what the round spent.
   */
  endRound(expected: number): RoundPrivacy {
    const out: RoundPrivacy = {
      clipNorm: this.c,
      noiseMultiplier: this.cfg.noise_multiplier,
      effectiveNoiseMultiplier: this.roundSigma(expected),
      unclipped: this.bits,
      received: this.received,
    };
    const a = this.cfg.adaptive_clipping;
    if (a) {
      const z = new Float64Array(1);
      z[0] = this.bits;
      addGaussianNoise(z, this.countStd(expected), this.normals);
      const frac = z[0]! / expected;
      this.c = this.c * Math.exp(-a.learning_rate * (frac - a.target_quantile));
    }
    this.beginAttempt();
    return out;
  }

  state(): ClientDpState {
    return { clipNorm: this.c };
  }

  load(s: ClientDpState): void {
    if (!(s.clipNorm > 0) || !Number.isFinite(s.clipNorm)) throw new Error(`client DP state: clipNorm must be a finite number > 0 (got ${s.clipNorm})`);
    this.c = s.clipNorm;
  }
}

/**
 * The aggregator of a FedAvg-family round under client DP: each update's delta
 * from the adapter it started from is clipped to C and summed in float64
 * (weight 1, memory O(adapter)); mean() returns global + (sum + noise) / m.
 * It is a MeanAggregator, so the strategy's aggregateFit (FedAvg's mean, a
 * server optimizer's pseudo-gradient) works on the noisy mean unchanged.
 */
export class ClientDpAggregator extends MeanAggregator {
  private readonly global: TensorMap;
  private readonly sums = new Map<string, { data: Float64Array }>();
  private added = 0;
  private result: TensorMap | null = null;
  /** Norms of the clipped deltas (each <= C), in arrival order. */
  readonly clippedNorms: number[] = [];

  constructor(
    global: GlobalAdapter,
    private readonly dp: ClientDp,
    /** m: the sites asked this attempt. */
    readonly expected: number,
    private readonly frozen: (name: string) => boolean = () => false,
  ) {
    super(new Map());
    this.global = global.tensors;
    for (const [name, t] of global.tensors) this.sums.set(name, { data: new Float64Array(numel(t.shape)) });
    dp.beginAttempt();
  }

  override get count(): number {
    return this.added;
  }
  override get totalWeight(): number {
    return this.added;
  }

  override add(u: Pick<FitUpdate, 'tensors' | 'weight'> & { start?: TensorMap; release?: () => void }): void {
    const start = u.start ?? this.global;
    const parts: Float64Array[] = [];
    for (const [name, g] of this.global) {
      const t = u.tensors.get(name);
      const s = start.get(name);
      if (!t || !s || t.data.length !== g.data.length || s.data.length !== g.data.length) throw new Error(`client DP: update lacks tensor ${name} of ${g.data.length} elements`);
      const d = new Float64Array(t.data.length);
      for (let i = 0; i < d.length; i++) d[i] = t.data[i]! - s.data[i]!;
      parts.push(d);
    }
    u.release?.(); // the deltas are copies: the upload's buffer is free again
    this.dp.clip(parts);
    let k = 0;
    let sq = 0;
    for (const sum of this.sums.values()) {
      const d = parts[k++]!;
      const acc = sum.data;
      for (let i = 0; i < d.length; i++) {
        acc[i] = acc[i]! + d[i]!;
        sq += d[i]! * d[i]!;
      }
    }
    this.clippedNorms.push(Math.sqrt(sq));
    this.added++;
  }

  /** global + (sum of clipped deltas + noise) / m, drawn once. */
  override mean(): TensorMap {
    if (this.result) return this.result;
    if (this.added === 0) throw new Error('client DP: no updates to aggregate');
    this.dp.finishSum(this.sums, this.expected, this.frozen);
    const out: TensorMap = new Map();
    for (const [name, g] of this.global) {
      const s = this.sums.get(name)!.data;
      const data = new Float32Array(g.data.length);
      for (let i = 0; i < data.length; i++) data[i] = g.data[i]! + s[i]!;
      out.set(name, { shape: [...g.shape], data });
    }
    this.result = out;
    return out;
  }
}
