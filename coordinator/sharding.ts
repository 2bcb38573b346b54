/**
 * Splitting a dataset across workers (distributed mode) or simulated sites
 * (federated experiments).
 *
 *   iid        seeded shuffle, then greedy longest-processing-time assignment
 *              by weight (e.g. token count): shard weights differ by at most
 *              the largest single item's weight.
 *   field      one shard per distinct value of a field (e.g. `site`), shards
 *              in sorted value order; n must equal the number of values.
 *   dirichlet  label skew as in the federated learning literature: for each
 *              label, shard proportions ~ Dir(alpha); small alpha -> each label
 *              sits on few shards, large alpha -> near IID.
 *
 * Every item lands in exactly one shard, and no shard is empty (an empty shard
 * is an error naming it). Written by hand: the assignment rules are short and
 * no maintained package implements these splits for JavaScript.
 */
import { createRng, type Rng } from '../common/random.ts';

export type PartitionOptions<T> =
  | { kind: 'iid'; seed: number; weight?: (x: T) => number }
  | { kind: 'field'; field: (x: T) => string }
  | { kind: 'dirichlet'; alpha: number; label: (x: T) => string; seed: number };

export const PARTITION_KINDS = ['iid', 'field', 'dirichlet'] as const;

/** Dirichlet draws are repeated (same seeded stream) until no shard is empty, at most this many times. */
const DIRICHLET_ATTEMPTS = 100;

export function partition<T>(items: readonly T[], n: number, opts: PartitionOptions<T>): T[][] {
  if (!Number.isInteger(n) || n < 1) throw new Error(`number of shards is ${n}, expected an integer >= 1`);
  switch (opts.kind) {
    case 'iid':
      checkEnough(items.length, n);
      return partitionIid(items, n, opts.seed, opts.weight);
    case 'field':
      return partitionField(items, n, opts.field);
    case 'dirichlet':
      checkEnough(items.length, n);
      return partitionDirichlet(items, n, opts.alpha, opts.label, opts.seed);
    default: {
      const kind = (opts as { kind: unknown }).kind;
      throw new Error(`partition kind ${JSON.stringify(kind)} is not known; use one of ${PARTITION_KINDS.join(', ')}`);
    }
  }
}

function checkEnough(count: number, n: number): void {
  if (n > count) {
    throw new Error(`cannot split ${count} item(s) into ${n} shards: shard ${count} would be empty; use at most ${count} shards`);
  }
}

function checkNoEmpty<T>(shards: T[][], hint: string): T[][] {
  const empty = shards.findIndex((s) => s.length === 0);
  if (empty >= 0) throw new Error(`shard ${empty} of ${shards.length} is empty; ${hint}`);
  return shards;
}

// ---------------------------------------------------------------------------
// iid

function partitionIid<T>(items: readonly T[], n: number, seed: number, weight?: (x: T) => number): T[][] {
  const weights = items.map((x, i) => {
    const w = weight ? weight(x) : 1;
    if (typeof w !== 'number' || !Number.isFinite(w) || w < 0) {
      throw new Error(`item ${i}: weight is ${String(w)}, expected a finite number >= 0`);
    }
    return w;
  });
  const rng = createRng(seed);
  const order = shuffled(items.length, rng);
  // rank = position in the shuffled order; heaviest first, ties in shuffled order.
  const rank = new Int32Array(items.length);
  order.forEach((idx, r) => (rank[idx] = r));
  const byWeight = [...order].sort((a, b) => weights[b]! - weights[a]! || rank[a]! - rank[b]!);

  const load = new Float64Array(n);
  const count = new Int32Array(n);
  const assigned: number[][] = Array.from({ length: n }, () => []);
  for (const idx of byWeight) {
    // Lightest shard; ties go to the one with fewer items, then the lower index.
    let best = 0;
    for (let s = 1; s < n; s++) {
      if (load[s]! < load[best]! || (load[s] === load[best] && count[s]! < count[best]!)) best = s;
    }
    assigned[best]!.push(idx);
    load[best]! += weights[idx]!;
    count[best]! += 1;
  }
  // Within a shard, items follow the shuffled order (not sorted by weight).
  return checkNoEmpty(
    assigned.map((idxs) => idxs.sort((a, b) => rank[a]! - rank[b]!).map((i) => items[i]!)),
    'use fewer shards',
  );
}

// ---------------------------------------------------------------------------
// field

/** Distinct values of `field`, sorted: the order of partition(kind 'field')'s shards. */
export function fieldValues<T>(items: readonly T[], field: (x: T) => string): string[] {
  const values = new Set<string>();
  items.forEach((x, i) => values.add(fieldOf(x, i, field)));
  return [...values].sort(compareStrings);
}

function fieldOf<T>(x: T, i: number, field: (x: T) => string): string {
  const v = field(x);
  if (typeof v !== 'string' || v === '') throw new Error(`item ${i}: partition field value is ${JSON.stringify(v) ?? 'undefined'}, expected a non-empty string`);
  return v;
}

function partitionField<T>(items: readonly T[], n: number, field: (x: T) => string): T[][] {
  const values = fieldValues(items, field);
  if (values.length !== n) {
    const shown = values.length > 10 ? `${values.slice(0, 10).join(', ')}, ...` : values.join(', ');
    throw new Error(
      `partition by field: the data has ${values.length} distinct value(s) (${shown || 'none'}) but ${n} shard(s) were asked for; ` +
        `the number of shards must equal the number of values`,
    );
  }
  const slot = new Map(values.map((v, s) => [v, s]));
  const shards: T[][] = values.map(() => []);
  items.forEach((x, i) => shards[slot.get(fieldOf(x, i, field))!]!.push(x));
  return shards;
}

// ---------------------------------------------------------------------------
// dirichlet

function partitionDirichlet<T>(items: readonly T[], n: number, alpha: number, label: (x: T) => string, seed: number): T[][] {
  if (typeof alpha !== 'number' || !Number.isFinite(alpha) || alpha <= 0) {
    throw new Error(`dirichlet alpha is ${String(alpha)}, expected a finite number > 0 (small: skewed shards, large: near IID)`);
  }
  const byLabel = new Map<string, number[]>();
  items.forEach((x, i) => {
    const l = label(x);
    if (typeof l !== 'string') throw new Error(`item ${i}: label is ${JSON.stringify(l) ?? 'undefined'}, expected a string`);
    let list = byLabel.get(l);
    if (!list) byLabel.set(l, (list = []));
    list.push(i);
  });
  const labels = [...byLabel.keys()].sort(compareStrings);
  const rng = createRng(seed);
  let shards: number[][] = [];
  for (let attempt = 0; attempt < DIRICHLET_ATTEMPTS; attempt++) {
    shards = Array.from({ length: n }, () => []);
    for (const l of labels) {
      const idxs = byLabel.get(l)!;
      const order = shuffled(idxs.length, rng).map((k) => idxs[k]!);
      const p = sampleDirichlet(rng, alpha, n);
      // Cut points at floor(cumsum(p) * count), as the usual numpy implementations.
      let cum = 0;
      let from = 0;
      for (let s = 0; s < n; s++) {
        cum += p[s]!;
        const to = s === n - 1 ? order.length : Math.min(order.length, Math.floor(cum * order.length));
        for (let k = from; k < to; k++) shards[s]!.push(order[k]!);
        from = Math.max(from, to);
      }
    }
    if (shards.every((s) => s.length > 0)) break;
  }
  const out = shards.map((s) => s.sort((a, b) => a - b).map((i) => items[i]!));
  return checkNoEmpty(out, `no Dirichlet(${alpha}) draw in ${DIRICHLET_ATTEMPTS} tries gave every shard an item; raise alpha or use fewer shards`);
}

/** One draw from a symmetric Dirichlet(alpha) over k categories (normalized gammas, in log space). */
export function sampleDirichlet(rng: Rng, alpha: number, k: number): number[] {
  const logs = Array.from({ length: k }, () => logGamma(rng, alpha));
  const max = Math.max(...logs);
  const e = logs.map((l) => Math.exp(l - max));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / sum);
}

/**
 * log of a Gamma(shape, 1) sample by Marsaglia and Tsang (2000). For shape < 1,
 * Gamma(shape) = Gamma(shape + 1) * U^(1/shape), kept in log space so that tiny
 * shapes do not underflow to 0.
 */
export function logGamma(rng: Rng, shape: number): number {
  if (shape < 1) {
    let u = 0;
    while (u === 0) u = rng.next();
    return logGamma(rng, shape + 1) + Math.log(u) / shape;
  }
  const d = shape - 1 / 3;
  const c = 1 / Math.sqrt(9 * d);
  for (;;) {
    let x: number;
    let v: number;
    do {
      x = rng.normal();
      v = 1 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const u = rng.next();
    if (u < 1 - 0.0331 * x * x * x * x) return Math.log(d * v);
    if (u > 0 && Math.log(u) < 0.5 * x * x + d * (1 - v + Math.log(v))) return Math.log(d * v);
  }
}

// ---------------------------------------------------------------------------
// contiguous ranges

/**
 * Splits indices 0..weights.length into n contiguous, non-empty ranges of
 * near-equal total weight, for workers that read the same file from shared
 * storage: each cut is placed where the running total is closest to
 * i * total / n.
 */
export function indexRanges(weights: readonly number[], n: number): Array<{ start: number; end: number }> {
  if (!Number.isInteger(n) || n < 1) throw new Error(`number of ranges is ${n}, expected an integer >= 1`);
  if (n > weights.length) {
    throw new Error(`cannot split ${weights.length} item(s) into ${n} ranges: range ${weights.length} would be empty; use at most ${weights.length}`);
  }
  const prefix = new Float64Array(weights.length + 1);
  weights.forEach((w, i) => {
    if (typeof w !== 'number' || !Number.isFinite(w) || w < 0) throw new Error(`weight ${i} is ${String(w)}, expected a finite number >= 0`);
    prefix[i + 1] = prefix[i]! + w;
  });
  const total = prefix[weights.length]!;
  const cuts = [0];
  for (let r = 1; r < n; r++) {
    const target = (total * r) / n;
    // Smallest index whose prefix reaches the target, then the closer of it and its predecessor.
    let lo = 0;
    let hi = weights.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (prefix[mid]! < target) lo = mid + 1;
      else hi = mid;
    }
    let cut = lo > 0 && target - prefix[lo - 1]! <= prefix[lo]! - target ? lo - 1 : lo;
    // Keep every range non-empty: after the previous cut, and leaving one item for each later range.
    cut = Math.max(cut, cuts[r - 1]! + 1);
    cut = Math.min(cut, weights.length - (n - r));
    cuts.push(cut);
  }
  cuts.push(weights.length);
  return cuts.slice(0, n).map((start, r) => ({ start, end: cuts[r + 1]! }));
}

// ---------------------------------------------------------------------------

function shuffled(count: number, rng: Rng): number[] {
  const a = Array.from({ length: count }, (_, i) => i);
  for (let i = a.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    const t = a[i]!;
    a[i] = a[j]!;
    a[j] = t;
  }
  return a;
}

function compareStrings(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
