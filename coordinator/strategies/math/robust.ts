/**
 * Robust aggregation rules over flat update vectors.
 *
 * An update is one worker's adapter flattened to a single Float32Array (every
 * tensor of the adapter concatenated in manifest order); every update of a
 * round has the same length. The global adapter, where a rule needs it, is a
 * flat vector of that same length.
 *
 * Everything here is a pure function: no I/O, no state between calls. The
 * loops are written for vectors of millions of elements: typed arrays only,
 * float64 accumulation, and no allocation per element (the per-coordinate
 * order statistics reuse one scratch array of length n).
 *
 * Rules:
 * - coordinate-wise median and trimmed mean (Yin et al. 2018, "Byzantine-
 *   Robust Distributed Learning: Towards Optimal Statistical Rates");
 * - Krum and multi-Krum (Blanchard et al. 2017, "Machine Learning with
 *   Adversaries: Byzantine Tolerant Gradient Descent");
 * - norm bounding around the global (Sun et al. 2019, "Can You Really
 *   Backdoor Federated Learning?");
 * - the weighted mean the other rules fall back to.
 */

/** Throws unless `updates` is a non-empty list of equal-length vectors of finite numbers; returns that length. */
function checkUpdates(fn: string, updates: readonly Float32Array[]): number {
  if (updates.length === 0) throw new Error(`${fn}: updates is empty; pass at least one update vector`);
  const d = updates[0]!.length;
  for (let k = 0; k < updates.length; k++) {
    const u = updates[k]!;
    if (!(u instanceof Float32Array)) throw new Error(`${fn}: updates[${k}] is not a Float32Array; flatten the adapter into one Float32Array per update`);
    if (u.length !== d) {
      throw new Error(`${fn}: updates[${k}] has ${u.length} elements but updates[0] has ${d}; every update must flatten the same adapter manifest`);
    }
    for (let j = 0; j < d; j++) {
      const x = u[j]!;
      if (x - x !== 0) throw new Error(`${fn}: updates[${k}][${j}] is ${x}; reject non-finite updates before aggregating`);
    }
  }
  return d;
}

function checkSameLength(fn: string, aName: string, a: Float32Array, bName: string, b: Float32Array): void {
  if (a.length !== b.length) throw new Error(`${fn}: ${aName} has ${a.length} elements but ${bName} has ${b.length}; both must flatten the same adapter manifest`);
}

/**
 * Sorts `s[0..n)` ascending in place. Insertion sort for the small n of a
 * round (no allocation, no comparator call); the built-in typed-array sort
 * (numeric) beyond that.
 */
function sortSmall(s: Float64Array, n: number): void {
  if (n > 48) {
    s.subarray(0, n).sort();
    return;
  }
  for (let i = 1; i < n; i++) {
    const x = s[i]!;
    let j = i - 1;
    while (j >= 0 && s[j]! > x) {
      s[j + 1] = s[j]!;
      j--;
    }
    s[j + 1] = x;
  }
}

/** Per coordinate, the median of the updates; for an even count, the mean of the two middle values. */
export function coordinateMedian(updates: readonly Float32Array[]): Float32Array {
  const d = checkUpdates('coordinateMedian', updates);
  const n = updates.length;
  const out = new Float32Array(d);
  const scratch = new Float64Array(n);
  const lo = (n - 1) >> 1;
  const hi = n >> 1;
  for (let j = 0; j < d; j++) {
    for (let k = 0; k < n; k++) scratch[k] = updates[k]![j]!;
    sortSmall(scratch, n);
    out[j] = (scratch[lo]! + scratch[hi]!) / 2;
  }
  return out;
}

/**
 * Per coordinate, drop the floor(beta * n) smallest and the floor(beta * n)
 * largest values and average the rest. beta = 0 is the plain mean.
 */
export function trimmedMean(updates: readonly Float32Array[], beta: number): Float32Array {
  if (!Number.isFinite(beta) || beta < 0 || beta >= 0.5) {
    throw new Error(`trimmedMean: beta must be in [0, 0.5) (the fraction trimmed from each end), got ${beta}; at 0.5 or more nothing would remain`);
  }
  const d = checkUpdates('trimmedMean', updates);
  const n = updates.length;
  const cut = Math.floor(beta * n);
  const kept = n - 2 * cut;
  if (kept < 1) {
    throw new Error(`trimmedMean: beta ${beta} trims ${cut} from each end of ${n} updates and nothing would remain; lower beta or collect more updates`);
  }
  const out = new Float32Array(d);
  if (cut === 0) {
    const acc = new Float64Array(d);
    for (const u of updates) for (let j = 0; j < d; j++) acc[j] += u[j]!;
    for (let j = 0; j < d; j++) out[j] = acc[j]! / n;
    return out;
  }
  const scratch = new Float64Array(n);
  for (let j = 0; j < d; j++) {
    for (let k = 0; k < n; k++) scratch[k] = updates[k]![j]!;
    sortSmall(scratch, n);
    let s = 0;
    for (let k = cut; k < n - cut; k++) s += scratch[k]!;
    out[j] = s / kept;
  }
  return out;
}

/** Euclidean distance between two vectors of equal length (float64 accumulation). */
export function l2Distance(a: Float32Array, b: Float32Array): number {
  checkSameLength('l2Distance', 'a', a, 'b', b);
  return Math.sqrt(squaredDistance(a, b));
}

function squaredDistance(a: Float32Array, b: Float32Array): number {
  let s = 0;
  for (let j = 0; j < a.length; j++) {
    const t = a[j]! - b[j]!;
    s += t * t;
  }
  return s;
}

function checkKrum(fn: string, n: number, f: number): void {
  if (!Number.isInteger(f) || f < 0) throw new Error(`${fn}: f (the number of Byzantine updates tolerated) must be an integer >= 0, got ${f}`);
  if (n < 2 * f + 3) {
    throw new Error(`${fn}: f = ${f} needs at least 2f + 3 = ${2 * f + 3} updates but got ${n}; lower f or wait for more updates`);
  }
}

/**
 * Krum scores: score_i = sum of the squared distances from update i to its
 * n - f - 2 nearest other updates. Needs n >= 2f + 3.
 */
export function krumScores(updates: readonly Float32Array[], f: number): Float64Array {
  checkKrum('krumScores', updates.length, f);
  checkUpdates('krumScores', updates);
  const n = updates.length;
  const dist = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let k = i + 1; k < n; k++) {
      const d2 = squaredDistance(updates[i]!, updates[k]!);
      dist[i * n + k] = d2;
      dist[k * n + i] = d2;
    }
  }
  const nearest = n - f - 2;
  const scores = new Float64Array(n);
  const row = new Float64Array(n - 1);
  for (let i = 0; i < n; i++) {
    let m = 0;
    for (let k = 0; k < n; k++) if (k !== i) row[m++] = dist[i * n + k]!;
    sortSmall(row, n - 1);
    let s = 0;
    for (let k = 0; k < nearest; k++) s += row[k]!;
    scores[i] = s;
  }
  return scores;
}

/**
 * Indices of the m updates with the lowest Krum scores, lowest first (ties go
 * to the lower index). m = 1 is Krum; m > 1 is multi-Krum, whose aggregate is
 * the mean of the selected updates (see `multiKrum`). m is at most n - f, so
 * that the selection never has to include more updates than are assumed honest.
 */
export function krumSelect(updates: readonly Float32Array[], f: number, m: number): number[] {
  const scores = krumScores(updates, f);
  const n = updates.length;
  if (!Number.isInteger(m) || m < 1 || m > n - f) {
    throw new Error(`krumSelect: m (how many updates to select) must be an integer in [1, n - f] = [1, ${n - f}], got ${m}`);
  }
  const order = Array.from({ length: n }, (_, i) => i);
  order.sort((a, b) => scores[a]! - scores[b]! || a - b);
  return order.slice(0, m);
}

/** Multi-Krum: the plain mean of the m updates `krumSelect` picks, and which they were. */
export function multiKrum(updates: readonly Float32Array[], f: number, m: number): { aggregate: Float32Array; selected: number[] } {
  const selected = krumSelect(updates, f, m);
  const picked = selected.map((i) => updates[i]!);
  return { aggregate: weightedMean(picked, picked.map(() => 1)), selected };
}

/**
 * Norm bounding: if ||update - center|| > bound, scale update - center down
 * to norm `bound`. Returns center + factor * (update - center) as a new
 * vector, and factor = min(1, bound / ||update - center||). With center all
 * zeros it bounds the update itself.
 */
export function clipToNorm(update: Float32Array, center: Float32Array, bound: number): { clipped: Float32Array; factor: number } {
  if (!Number.isFinite(bound) || bound <= 0) throw new Error(`clipToNorm: bound must be a finite number > 0 (the largest allowed L2 norm of update - center), got ${bound}`);
  checkSameLength('clipToNorm', 'update', update, 'center', center);
  const norm = Math.sqrt(squaredDistance(update, center));
  if (!Number.isFinite(norm)) throw new Error('clipToNorm: update - center has a non-finite norm; reject non-finite updates before clipping');
  const factor = norm > bound ? bound / norm : 1;
  const clipped = new Float32Array(update.length);
  if (factor === 1) {
    clipped.set(update);
  } else {
    for (let j = 0; j < update.length; j++) clipped[j] = center[j]! + factor * (update[j]! - center[j]!);
  }
  return { clipped, factor };
}

/** sum_k w_k u_k / sum_k w_k, accumulated in float64. Weights are finite, >= 0, with a positive sum. */
export function weightedMean(updates: readonly Float32Array[], weights: readonly number[]): Float32Array {
  const d = checkUpdates('weightedMean', updates);
  if (weights.length !== updates.length) {
    throw new Error(`weightedMean: got ${weights.length} weights for ${updates.length} updates; pass one weight per update`);
  }
  let total = 0;
  for (let k = 0; k < weights.length; k++) {
    const w = weights[k]!;
    if (!Number.isFinite(w) || w < 0) throw new Error(`weightedMean: weights[${k}] is ${w}; weights must be finite and >= 0 (e.g. example counts)`);
    total += w;
  }
  if (!(total > 0)) throw new Error('weightedMean: the weights sum to 0; at least one update needs a positive weight');
  const acc = new Float64Array(d);
  for (let k = 0; k < updates.length; k++) {
    const w = weights[k]!;
    if (w === 0) continue;
    const u = updates[k]!;
    for (let j = 0; j < d; j++) acc[j] += w * u[j]!;
  }
  const out = new Float32Array(d);
  for (let j = 0; j < d; j++) out[j] = acc[j]! / total;
  return out;
}
