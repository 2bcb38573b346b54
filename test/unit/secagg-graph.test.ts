import { describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { graphOf, neighboursOf } from '../../common/secagg/index.ts';

const seed = (b: number) => new Uint8Array(32).fill(b);

describe('secure aggregation neighbour graph', () => {
  for (const [n, k] of [[20, 4], [50, 12], [21, 5], [10, 3], [7, 2]] as const) {
    it(`is symmetric and ${k}-regular for ${n} sites (odd k with odd n rounds up to k + 1)`, () => {
      const cohort = Array.from({ length: n }, (_, i) => 3 * i + 1);
      const g = graphOf(cohort, k, seed(1));
      const degree = k % 2 === 1 && n % 2 === 1 ? k + 1 : k;
      for (const u of cohort) {
        const nb = g.get(u)!;
        expect(nb.length).toBe(degree);
        expect(new Set(nb).size).toBe(degree);
        expect(nb).not.toContain(u);
        for (const v of nb) expect(g.get(v)).toContain(u);
        expect(neighboursOf(u, cohort, k, seed(1))).toEqual(nb);
      }
    });
  }

  it('is every other site when k is null or k >= n - 1', () => {
    const cohort = [5, 2, 9, 4];
    for (const k of [null, 3, 10]) {
      expect(neighboursOf(5, cohort, k, seed(2))).toEqual([2, 4, 9]);
    }
  });

  it('is the same for every party from the same seed (whatever the cohort order) and differs for another seed', () => {
    const cohort = Array.from({ length: 30 }, (_, i) => i + 1);
    const s = new Uint8Array(randomBytes(32));
    const a = graphOf(cohort, 6, s);
    const b = graphOf([...cohort].reverse(), 6, new Uint8Array(s));
    expect([...b.entries()].sort((x, y) => x[0] - y[0])).toEqual([...a.entries()].sort((x, y) => x[0] - y[0]));
    const c = graphOf(cohort, 6, new Uint8Array(randomBytes(32)));
    expect(cohort.some((u) => a.get(u)!.join() !== c.get(u)!.join())).toBe(true);
  });

  it('refuses a site outside the cohort, duplicates and a bad seed by name', () => {
    expect(() => neighboursOf(99, [1, 2, 3], null, seed(0))).toThrow(/site 99 is not in the cohort/);
    expect(() => graphOf([1, 2, 2], 2, seed(0))).toThrow(/lists site 2 twice/);
    expect(() => graphOf([1, 2, 3], 2, new Uint8Array(5))).toThrow(/graph seed must be 32 bytes/);
  });
});
