import { describe, expect, it } from 'vitest';
import { createRng } from '../../common/random.ts';
import { fieldValues, indexRanges, logGamma, partition, sampleDirichlet } from '../../coordinator/sharding.ts';

interface Item {
  id: number;
  tokens: number;
  label: string;
  site: string;
}
const items: Item[] = Array.from({ length: 400 }, (_, id) => ({
  id,
  tokens: 10 + ((id * 37) % 91),
  label: `c${id % 4}`,
  site: ['north', 'east', 'south'][id % 3]!,
}));

function ids(shards: Item[][]): number[] {
  return shards.flat().map((x) => x.id).sort((a, b) => a - b);
}

describe('partition iid', () => {
  it('puts every item in exactly one shard and balances token weight within one item', () => {
    const shards = partition(items, 7, { kind: 'iid', seed: 3, weight: (x) => x.tokens });
    expect(shards).toHaveLength(7);
    expect(ids(shards)).toEqual(items.map((x) => x.id));
    const loads = shards.map((s) => s.reduce((a, x) => a + x.tokens, 0));
    const maxItem = Math.max(...items.map((x) => x.tokens));
    expect(Math.max(...loads) - Math.min(...loads)).toBeLessThanOrEqual(maxItem);
  });

  it('balances item counts without weights, and is deterministic per seed', () => {
    const a = partition(items, 6, { kind: 'iid', seed: 1 });
    const counts = a.map((s) => s.length);
    expect(Math.max(...counts) - Math.min(...counts)).toBeLessThanOrEqual(1);
    expect(partition(items, 6, { kind: 'iid', seed: 1 })).toEqual(a);
    expect(partition(items, 6, { kind: 'iid', seed: 2 })).not.toEqual(a);
    // Shards are a mix, not consecutive runs of the input.
    expect(a[0]!.map((x) => x.id)).not.toEqual(items.slice(0, a[0]!.length).map((x) => x.id));
  });

  it('rejects bad shard counts and weights', () => {
    expect(() => partition(items, 0, { kind: 'iid', seed: 0 })).toThrow(/number of shards is 0, expected an integer >= 1/);
    expect(() => partition(items.slice(0, 3), 4, { kind: 'iid', seed: 0 })).toThrow(/cannot split 3 item\(s\) into 4 shards: shard 3 would be empty/);
    expect(() => partition(items, 2, { kind: 'iid', seed: 0, weight: (x) => (x.id === 5 ? -1 : 1) })).toThrow(/item 5: weight is -1/);
  });

  it('gives every shard an item even when weights are zero', () => {
    const shards = partition(items.slice(0, 5), 5, { kind: 'iid', seed: 0, weight: () => 0 });
    expect(shards.map((s) => s.length)).toEqual([1, 1, 1, 1, 1]);
  });
});

describe('partition field', () => {
  it('makes one shard per value, in sorted value order', () => {
    const shards = partition(items, 3, { kind: 'field', field: (x) => x.site });
    expect(fieldValues(items, (x) => x.site)).toEqual(['east', 'north', 'south']);
    expect(shards.map((s) => new Set(s.map((x) => x.site)).size)).toEqual([1, 1, 1]);
    expect(shards.map((s) => s[0]!.site)).toEqual(['east', 'north', 'south']);
    expect(ids(shards)).toEqual(items.map((x) => x.id));
  });

  it('requires n to equal the number of values and names them', () => {
    expect(() => partition(items, 2, { kind: 'field', field: (x) => x.site })).toThrow(
      /3 distinct value\(s\) \(east, north, south\) but 2 shard\(s\) were asked for/,
    );
    expect(() => partition(items, 3, { kind: 'field', field: (x) => (x.id === 9 ? '' : x.site) })).toThrow(/item 9: partition field value is ""/);
  });
});

describe('partition dirichlet', () => {
  /** Mean total-variation distance between each shard's label distribution and the global one. */
  function skew(shards: Item[][]): number {
    const labels = ['c0', 'c1', 'c2', 'c3'];
    let tv = 0;
    for (const s of shards) {
      for (const l of labels) tv += Math.abs(s.filter((x) => x.label === l).length / s.length - 0.25) / 2;
    }
    return tv / shards.length;
  }

  it('is far more label-skewed at alpha 0.1 than at alpha 100, and keeps every item once', () => {
    const skewed = partition(items, 5, { kind: 'dirichlet', alpha: 0.1, label: (x) => x.label, seed: 11 });
    const even = partition(items, 5, { kind: 'dirichlet', alpha: 100, label: (x) => x.label, seed: 11 });
    for (const s of [skewed, even]) {
      expect(ids(s)).toEqual(items.map((x) => x.id));
      expect(s.every((shard) => shard.length > 0)).toBe(true);
    }
    expect(skew(skewed)).toBeGreaterThan(0.3);
    expect(skew(even)).toBeLessThan(0.1);
    expect(skew(skewed)).toBeGreaterThan(3 * skew(even));
  });

  it('is deterministic for a seed', () => {
    const opts = { kind: 'dirichlet' as const, alpha: 0.5, label: (x: Item) => x.label, seed: 4 };
    expect(partition(items, 4, opts)).toEqual(partition(items, 4, opts));
    expect(partition(items, 4, opts)).not.toEqual(partition(items, 4, { ...opts, seed: 5 }));
  });

  it('rejects alpha <= 0 and reports a shard that stays empty', () => {
    expect(() => partition(items, 3, { kind: 'dirichlet', alpha: 0, label: (x) => x.label, seed: 0 })).toThrow(/dirichlet alpha is 0, expected a finite number > 0/);
    expect(() => partition(items.slice(0, 4), 4, { kind: 'dirichlet', alpha: 0.001, label: () => 'same', seed: 0 })).toThrow(/shard \d of 4 is empty; .*raise alpha or use fewer shards/);
  });

  it('samples gamma and Dirichlet correctly, even for tiny alpha', () => {
    const rng = createRng(9);
    const n = 4000;
    let sum = 0;
    for (let i = 0; i < n; i++) sum += Math.exp(logGamma(rng, 2.5));
    expect(sum / n).toBeGreaterThan(2.35);
    expect(sum / n).toBeLessThan(2.65);
    let sumSmall = 0;
    for (let i = 0; i < n; i++) sumSmall += Math.exp(logGamma(rng, 0.3));
    expect(sumSmall / n).toBeGreaterThan(0.25);
    expect(sumSmall / n).toBeLessThan(0.35);
    const p = sampleDirichlet(rng, 0.001, 6);
    expect(p.every((x) => Number.isFinite(x) && x >= 0)).toBe(true);
    expect(p.reduce((a, b) => a + b, 0)).toBeCloseTo(1, 12);
  });
});

describe('indexRanges', () => {
  it('gives contiguous, non-empty ranges whose weights are within one item of the mean', () => {
    const weights = items.map((x) => x.tokens);
    const total = weights.reduce((a, b) => a + b, 0);
    for (const n of [1, 3, 8]) {
      const ranges = indexRanges(weights, n);
      expect(ranges).toHaveLength(n);
      expect(ranges[0]!.start).toBe(0);
      expect(ranges[n - 1]!.end).toBe(weights.length);
      ranges.forEach((r, i) => {
        expect(r.end).toBeGreaterThan(r.start);
        if (i > 0) expect(r.start).toBe(ranges[i - 1]!.end);
        const w = weights.slice(r.start, r.end).reduce((a, b) => a + b, 0);
        expect(Math.abs(w - total / n)).toBeLessThanOrEqual(Math.max(...weights));
      });
    }
  });

  it('keeps ranges non-empty when one item dominates, and rejects too many ranges', () => {
    const ranges = indexRanges([1000, 1, 1, 1], 3);
    expect(ranges).toEqual([
      { start: 0, end: 1 },
      { start: 1, end: 2 },
      { start: 2, end: 4 },
    ]);
    expect(() => indexRanges([1, 2], 3)).toThrow(/cannot split 2 item\(s\) into 3 ranges/);
    expect(() => indexRanges([1, NaN], 1)).toThrow(/weight 1 is NaN/);
  });
});
