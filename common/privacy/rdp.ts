/**
 * The privacy accountant: Renyi differential privacy (RDP) of the sampled
 * Gaussian mechanism, composed over steps and converted to (epsilon, delta).
 *
 * - RDP of the sampled Gaussian mechanism (SGM) at order alpha, sampling rate q and
 *   noise multiplier sigma: Mironov, Talwar and Zhang 2019, "Renyi Differential
 *   Privacy of the Sampled Gaussian Mechanism", Section 3.3: the integer-order sum
 *   (their Eq. for A_alpha) and the fractional-order series with two erfc tails,
 *   computed in log space. This is the computation of TensorFlow Privacy's
 *   rdp_accountant (_compute_log_a_int / _compute_log_a_frac) and Opacus'
 *   analysis/rdp.py. q = 1 is the Gaussian mechanism: alpha / (2 sigma^2) exactly
 *   (Mironov 2017, Proposition 7).
 * - Composition: RDP adds over steps and mechanisms, order by order (Mironov 2017, Prop. 1).
 * - Conversion to (epsilon, delta), minimised over the orders:
 *   improved (what Opacus uses): eps = rdp - (log delta + log alpha) / (alpha - 1) + log((alpha - 1) / alpha)
 *     (Balle et al. 2020, "Hypothesis Testing Interpretations and Renyi Differential Privacy", Thm 21);
 *   classic: eps = rdp + log(1 / delta) / (alpha - 1) (Mironov 2017, Prop. 3).
 */

/** Opacus' default orders (1.1 .. 10.9 by 0.1, then 12 .. 63) plus orders near 1 and large ones for extreme settings. */
export const DEFAULT_ORDERS: readonly number[] = Object.freeze([
  1.01, 1.02, 1.03, 1.05, 1.07,
  ...Array.from({ length: 99 }, (_, i) => 1 + (i + 1) / 10),
  ...Array.from({ length: 52 }, (_, i) => 12 + i),
  64, 80, 96, 128, 192, 256, 384, 512, 1024,
]);

export type Conversion = 'improved' | 'classic';

function check(name: string, v: number, ok: boolean, what: string): void {
  if (typeof v !== 'number' || Number.isNaN(v) || !ok) throw new Error(`${name} must be ${what} (got ${v})`);
}

function checkOrders(orders: readonly number[]): void {
  if (orders.length === 0) throw new Error('orders must hold at least one Renyi order > 1');
  for (const a of orders) check('every order', a, a > 1, '> 1 (Renyi orders are alpha > 1)');
}

/** log(exp(a) + exp(b)) without overflow. */
function logAdd(a: number, b: number): number {
  const hi = Math.max(a, b);
  const lo = Math.min(a, b);
  if (hi === -Infinity) return -Infinity;
  return hi + Math.log1p(Math.exp(lo - hi));
}

/** log(exp(a) - exp(b)) for a >= b. */
function logSub(a: number, b: number): number {
  if (b === -Infinity) return a;
  if (a < b) throw new Error('accountant: log of a negative number (the series did not converge)');
  if (a === b) return -Infinity;
  return a + Math.log(-Math.expm1(b - a));
}

const SQRT_PI = Math.sqrt(Math.PI);

/**
 * log(erfc(x)) in float64 for every x: the all-positive series
 * erf(x) = 2/sqrt(pi) e^{-x^2} sum_n 2^n x^{2n+1} / (2n+1)!! for |x| < 2,
 * Lentz's continued fraction of erfc(x) e^{x^2} for x >= 2 (no underflow).
 */
export function logErfc(x: number): number {
  if (x < 0) return Math.log(2 - Math.exp(logErfc(-x)));
  if (x < 2) {
    let term = x;
    let sum = x;
    for (let n = 1; n < 200; n++) {
      term *= (2 * x * x) / (2 * n + 1);
      sum += term;
      if (term < sum * 1e-17) break;
    }
    const erf = (2 / SQRT_PI) * Math.exp(-x * x) * sum;
    return Math.log1p(-erf);
  }
  // erfc(x) = e^{-x^2}/sqrt(pi) * 1 / (x + (1/2) / (x + 1 / (x + (3/2) / (x + 2 / (x + ...))))), by modified Lentz.
  const tiny = 1e-300;
  let f = x;
  let c = x;
  let d = 0;
  for (let n = 1; n < 5000; n++) {
    const an = n / 2;
    d = x + an * d;
    d = d === 0 ? tiny : d;
    c = x + an / c;
    c = c === 0 ? tiny : c;
    d = 1 / d;
    const delta = c * d;
    f *= delta;
    if (Math.abs(delta - 1) < 1e-16) break;
  }
  return -x * x - Math.log(SQRT_PI) - Math.log(f);
}

/** log |binom(alpha, i)| and its sign, for real alpha (the generalised binomial coefficient). */
function logBinom(alpha: number, i: number, prev: { log: number; sign: number }): { log: number; sign: number } {
  if (i === 0) return { log: 0, sign: 1 };
  const f = alpha - i + 1;
  if (f === 0) return { log: -Infinity, sign: 0 };
  return { log: prev.log + Math.log(Math.abs(f)) - Math.log(i), sign: prev.sign * Math.sign(f) };
}

/** log A_alpha for integer alpha (Mironov et al. 2019, Section 3.3). */
function logAInt(q: number, sigma: number, alpha: number): number {
  let logA = -Infinity;
  let c = { log: 0, sign: 1 };
  for (let i = 0; i <= alpha; i++) {
    c = logBinom(alpha, i, c);
    const s = c.log + i * Math.log(q) + (alpha - i) * Math.log1p(-q) + (i * i - i) / (2 * sigma * sigma);
    logA = logAdd(logA, s);
  }
  return logA;
}

/** log A_alpha for fractional alpha: the two-tailed series with erfc terms (Mironov et al. 2019, Section 3.3). */
function logAFrac(q: number, sigma: number, alpha: number): number {
  let logA0 = -Infinity;
  let logA1 = -Infinity;
  const z0 = sigma * sigma * Math.log(1 / q - 1) + 0.5;
  let c = { log: 0, sign: 1 };
  for (let i = 0; ; i++) {
    c = logBinom(alpha, i, c);
    const j = alpha - i;
    const logT0 = c.log + i * Math.log(q) + j * Math.log1p(-q);
    const logT1 = c.log + j * Math.log(q) + i * Math.log1p(-q);
    const logE0 = Math.log(0.5) + logErfc((i - z0) / (Math.SQRT2 * sigma));
    const logE1 = Math.log(0.5) + logErfc((z0 - j) / (Math.SQRT2 * sigma));
    const logS0 = logT0 + (i * i - i) / (2 * sigma * sigma) + logE0;
    const logS1 = logT1 + (j * j - j) / (2 * sigma * sigma) + logE1;
    if (c.sign > 0) {
      logA0 = logAdd(logA0, logS0);
      logA1 = logAdd(logA1, logS1);
    } else if (c.sign < 0) {
      logA0 = logSub(logA0, logS0);
      logA1 = logSub(logA1, logS1);
    }
    if (Math.max(logS0, logS1) < -30 || i > 100_000) break;
  }
  return logAdd(logA0, logA1);
}

function rdpOne(q: number, sigma: number, alpha: number): number {
  if (q === 0) return 0;
  if (sigma === 0) return Infinity;
  if (alpha === Infinity) return Infinity;
  if (q === 1) return alpha / (2 * sigma * sigma);
  const logA = Number.isInteger(alpha) ? logAInt(q, sigma, alpha) : logAFrac(q, sigma, alpha);
  return logA / (alpha - 1);
}

/** RDP of ONE step of the sampled Gaussian mechanism at each order. */
export function rdpSampledGaussian(q: number, sigma: number, orders: readonly number[] = DEFAULT_ORDERS): Float64Array {
  check('sample rate q', q, q >= 0 && q <= 1, 'in [0, 1]');
  check('noise multiplier sigma', sigma, sigma >= 0 && Number.isFinite(sigma), 'a finite number >= 0');
  checkOrders(orders);
  return Float64Array.from(orders, (a) => rdpOne(q, sigma, a));
}

/** RDP of `steps` steps (composition: RDP adds up). */
export function rdpOfSteps(q: number, sigma: number, steps: number, orders: readonly number[] = DEFAULT_ORDERS): Float64Array {
  check('steps', steps, Number.isInteger(steps) && steps >= 0, 'an integer >= 0');
  const r = rdpSampledGaussian(q, sigma, orders);
  for (let i = 0; i < r.length; i++) r[i] = steps === 0 ? 0 : r[i]! * steps;
  return r;
}

/** The smallest epsilon over the orders for this delta, and the order that gives it. */
export function rdpToEpsilon(orders: readonly number[], rdp: ArrayLike<number>, delta: number, conversion: Conversion = 'improved'): { epsilon: number; order: number } {
  checkOrders(orders);
  check('delta', delta, delta > 0 && delta < 1, 'in (0, 1)');
  if (rdp.length !== orders.length) throw new Error(`rdp has ${rdp.length} values for ${orders.length} orders`);
  let best = { epsilon: Infinity, order: orders[0]! };
  for (let i = 0; i < orders.length; i++) {
    const a = orders[i]!;
    const r = rdp[i]!;
    const eps =
      conversion === 'classic'
        ? r + Math.log(1 / delta) / (a - 1)
        : r - (Math.log(delta) + Math.log(a)) / (a - 1) + Math.log((a - 1) / a);
    if (Number.isFinite(eps) && eps < best.epsilon) best = { epsilon: Math.max(0, eps), order: a };
  }
  return best;
}

export interface EpsilonQuery {
  sampleRate: number;
  noiseMultiplier: number;
  steps: number;
  delta: number;
  orders?: readonly number[];
  conversion?: Conversion;
}

/** (epsilon, delta) of `steps` steps of the sampled Gaussian mechanism. */
export function epsilonOf(o: EpsilonQuery): { epsilon: number; order: number } {
  const orders = o.orders ?? DEFAULT_ORDERS;
  check('sampleRate', o.sampleRate, o.sampleRate > 0 && o.sampleRate <= 1, 'in (0, 1]');
  return rdpToEpsilon(orders, rdpOfSteps(o.sampleRate, o.noiseMultiplier, o.steps, orders), o.delta, o.conversion);
}

/**
 * The smallest noise multiplier whose epsilon is at most targetEpsilon (bisection,
 * to 1e-4 relative), as Opacus' get_noise_multiplier does.
 */
export function noiseForEpsilon(o: Omit<EpsilonQuery, 'noiseMultiplier'> & { targetEpsilon: number }): number {
  check('targetEpsilon', o.targetEpsilon, o.targetEpsilon > 0 && Number.isFinite(o.targetEpsilon), 'a finite number > 0');
  check('steps', o.steps, Number.isInteger(o.steps) && o.steps >= 1, 'an integer >= 1');
  const eps = (sigma: number): number => epsilonOf({ ...o, noiseMultiplier: sigma }).epsilon;
  let hi = 1;
  while (eps(hi) > o.targetEpsilon) {
    hi *= 2;
    if (hi > 1e6) throw new Error(`no noise multiplier up to 1e6 reaches epsilon ${o.targetEpsilon} for these settings (sample rate ${o.sampleRate}, ${o.steps} steps, delta ${o.delta})`);
  }
  let lo = 0;
  while (hi - lo > 1e-4 * hi) {
    const mid = (lo + hi) / 2;
    if (eps(mid) > o.targetEpsilon) lo = mid;
    else hi = mid;
  }
  return hi;
}

/** Composition over a run: RDP summed order by order; exact to serialise (numbers round-trip through JSON). */
export class RdpLedger {
  readonly orders: readonly number[];
  private readonly total: Float64Array;

  constructor(orders: readonly number[] = DEFAULT_ORDERS) {
    checkOrders(orders);
    this.orders = [...orders];
    this.total = new Float64Array(orders.length);
  }

  /** Add `steps` steps of the sampled Gaussian mechanism with rate q and noise multiplier sigma. */
  add(q: number, sigma: number, steps = 1): void {
    const r = rdpOfSteps(q, sigma, steps, this.orders);
    for (let i = 0; i < r.length; i++) this.total[i] = this.total[i]! + r[i]!;
  }

  rdp(): Float64Array {
    return Float64Array.from(this.total);
  }

  epsilon(delta: number, conversion: Conversion = 'improved'): { epsilon: number; order: number } {
    return rdpToEpsilon(this.orders, this.total, delta, conversion);
  }

  toJSON(): { orders: number[]; rdp: Array<number | null> } {
    // Infinity (sigma 0) does not survive JSON: null stands for it.
    return { orders: [...this.orders], rdp: Array.from(this.total, (v) => (Number.isFinite(v) ? v : null)) };
  }

  static fromJSON(j: unknown): RdpLedger {
    const o = j as { orders?: unknown; rdp?: unknown };
    if (!o || !Array.isArray(o.orders) || !Array.isArray(o.rdp) || o.orders.length !== o.rdp.length) {
      throw new Error('privacy ledger state: expected { orders: number[], rdp: number[] } of equal length');
    }
    const l = new RdpLedger(o.orders as number[]);
    (o.rdp as Array<number | null>).forEach((v, i) => {
      if (v !== null && (typeof v !== 'number' || !(v >= 0))) throw new Error(`privacy ledger state: rdp[${i}] must be a number >= 0 or null (got ${String(v)})`);
      l.total[i] = v === null ? Infinity : v;
    });
    return l;
  }
}
