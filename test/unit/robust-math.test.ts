import { describe, expect, it } from 'vitest';
import { createRng } from '../../common/random.ts';
import {
  clipToNorm,
  coordinateMedian,
  krumScores,
  krumSelect,
  l2Distance,
  multiKrum,
  trimmedMean,
  weightedMean,
} from '../../coordinator/strategies/math/robust.ts';

const v = (...xs: number[]) => Float32Array.from(xs);
const list = (a: ArrayLike<number>) => Array.from(a);

describe('coordinateMedian', () => {
  it('takes the middle value of each coordinate for an odd count', () => {
    const u = [v(1, 9, -3, 0.5), v(5, 2, -1, 0.25), v(3, 4, 7, 0.75)];
    // coord 0: {1, 5, 3} sorted 1, 3, 5 -> 3
    // coord 1: {9, 2, 4} sorted 2, 4, 9 -> 4
    // coord 2: {-3, -1, 7} -> -1
    // coord 3: {0.5, 0.25, 0.75} -> 0.5
    expect(list(coordinateMedian(u))).toEqual([3, 4, -1, 0.5]);
  });

  it('averages the two middle values for an even count, ignoring an outlier', () => {
    const u = [v(1, 10), v(4, -2), v(2, 0), v(1000, 6)];
    // coord 0: sorted 1, 2, 4, 1000 -> (2 + 4) / 2 = 3
    // coord 1: sorted -2, 0, 6, 10 -> (0 + 6) / 2 = 3
    expect(list(coordinateMedian(u))).toEqual([3, 3]);
  });

  it('matches a sort-based reference on more updates than the insertion-sort limit', () => {
    const rng = createRng(7);
    for (const n of [5, 48, 49, 60]) {
      const u = Array.from({ length: n }, () => Float32Array.from({ length: 30 }, () => rng.normal()));
      const got = coordinateMedian(u);
      for (let j = 0; j < 30; j++) {
        const col = u.map((x) => x[j]!).sort((a, b) => a - b);
        const want = n % 2 ? col[(n - 1) / 2]! : (col[n / 2 - 1]! + col[n / 2]!) / 2;
        expect(got[j]).toBeCloseTo(want, 6);
      }
    }
  });

  it('refuses an empty list, unequal lengths and non-finite values', () => {
    expect(() => coordinateMedian([])).toThrow(/updates is empty/);
    expect(() => coordinateMedian([v(1, 2), v(1)])).toThrow(/updates\[1\] has 1 elements but updates\[0\] has 2/);
    expect(() => coordinateMedian([v(1, 2), v(1, NaN)])).toThrow(/updates\[1\]\[1\] is NaN/);
    expect(() => coordinateMedian([v(Infinity)])).toThrow(/updates\[0\]\[0\] is Infinity/);
  });
});

describe('trimmedMean', () => {
  it('drops floor(beta n) from each end per coordinate', () => {
    const u = [v(1, 50), v(2, -100), v(3, 10), v(4, 20), v(100, 30)];
    // beta = 0.2, n = 5: drop floor(1) smallest and largest.
    // coord 0: sorted 1, 2, 3, 4, 100 -> mean(2, 3, 4) = 3
    // coord 1: sorted -100, 10, 20, 30, 50 -> mean(10, 20, 30) = 20
    expect(list(trimmedMean(u, 0.2))).toEqual([3, 20]);
    // beta = 0.39: floor(1.95) = 1, same cut.
    expect(list(trimmedMean(u, 0.39))).toEqual([3, 20]);
    // beta = 0.4: floor(2) = 2 -> only the median remains: 3 and 20.
    expect(list(trimmedMean(u, 0.4))).toEqual([3, 20]);
    // beta = 0.1: floor(0.5) = 0 -> plain mean: (1+2+3+4+100)/5 = 22, (50-100+10+20+30)/5 = 2
    expect(list(trimmedMean(u, 0.1))).toEqual([22, 2]);
  });

  it('with beta = 0 equals the plain mean', () => {
    const rng = createRng(3);
    const u = Array.from({ length: 6 }, () => Float32Array.from({ length: 40 }, () => rng.normal() * 3));
    const got = trimmedMean(u, 0);
    for (let j = 0; j < 40; j++) {
      const mean = u.reduce((s, x) => s + x[j]!, 0) / u.length;
      expect(got[j]).toBeCloseTo(mean, 6);
    }
  });

  it('refuses beta outside [0, 0.5) naming beta', () => {
    const u = [v(1), v(2), v(3)];
    for (const beta of [0.5, 0.7, -0.1, NaN, Infinity]) {
      expect(() => trimmedMean(u, beta)).toThrow(/beta must be in \[0, 0.5\)/);
    }
  });
});

describe('Krum', () => {
  // Five points in 2-D, the last one far away. n = 5, f = 1: each score sums the
  // n - f - 2 = 2 smallest squared distances to the other points.
  //   u0 = (0,0), u1 = (1,0), u2 = (0,2), u3 = (2,1), u4 = (10,10)
  // squared distances:
  //   d01 = 1, d02 = 4, d03 = 4+1 = 5, d04 = 100+100 = 200
  //   d12 = 1+4 = 5, d13 = 1+1 = 2, d14 = 81+100 = 181
  //   d23 = 4+1 = 5, d24 = 100+64 = 164
  //   d34 = 64+81 = 145
  // score0 = two smallest of {1, 4, 5, 200} = 1 + 4 = 5
  // score1 = two smallest of {1, 5, 2, 181} = 1 + 2 = 3
  // score2 = two smallest of {4, 5, 5, 164} = 4 + 5 = 9
  // score3 = two smallest of {5, 2, 5, 145} = 2 + 5 = 7
  // score4 = two smallest of {200, 181, 164, 145} = 145 + 164 = 309
  const pts = [v(0, 0), v(1, 0), v(0, 2), v(2, 1), v(10, 10)];

  it('scores by the n - f - 2 nearest squared distances', () => {
    expect(list(krumScores(pts, 1))).toEqual([5, 3, 9, 7, 309]);
    // f = 0 on the same points: n - 0 - 2 = 3 nearest.
    // score0 = 1+4+5 = 10, score1 = 1+2+5 = 8, score2 = 4+5+5 = 14, score3 = 2+5+5 = 12, score4 = 145+164+181 = 490
    expect(list(krumScores(pts, 0))).toEqual([10, 8, 14, 12, 490]);
  });

  it('selects the lowest scores: Krum m = 1, multi-Krum m > 1 averages them', () => {
    expect(krumSelect(pts, 1, 1)).toEqual([1]);
    expect(krumSelect(pts, 1, 3)).toEqual([1, 0, 3]);
    expect(krumSelect(pts, 1, 4)).toEqual([1, 0, 3, 2]);
    const { aggregate, selected } = multiKrum(pts, 1, 3);
    expect(selected).toEqual([1, 0, 3]);
    // mean of (1,0), (0,0), (2,1) = (1, 1/3)
    expect(aggregate[0]).toBeCloseTo(1, 6);
    expect(aggregate[1]).toBeCloseTo(1 / 3, 6);
  });

  it('never selects a Byzantine update scaled x10', () => {
    const rng = createRng(11);
    const d = 200;
    const center = Float32Array.from({ length: d }, () => rng.normal());
    for (let trial = 0; trial < 10; trial++) {
      const n = 7;
      const f = 2;
      const honest = Array.from({ length: n }, () => Float32Array.from(center, (c) => c + 0.1 * rng.normal()));
      const bad = trial % n;
      honest[bad] = Float32Array.from(honest[bad]!, (x) => 10 * x);
      const sel = krumSelect(honest, f, n - f);
      expect(sel).toHaveLength(n - f);
      expect(sel).not.toContain(bad);
      expect(krumSelect(honest, f, 1)[0]).not.toBe(bad);
    }
  });

  it('refuses too few updates for f, naming f and how many are needed', () => {
    expect(() => krumScores(pts, 2)).toThrow(/f = 2 needs at least 2f \+ 3 = 7 updates but got 5/);
    expect(() => krumSelect(pts.slice(0, 4), 1, 1)).toThrow(/f = 1 needs at least 2f \+ 3 = 5 updates but got 4/);
    expect(() => krumScores(pts, -1)).toThrow(/f \(the number of Byzantine updates tolerated\) must be an integer >= 0, got -1/);
    expect(() => krumScores(pts, 0.5)).toThrow(/f .* must be an integer/);
    expect(() => krumSelect(pts, 1, 0)).toThrow(/m .* must be an integer in \[1, n - f\] = \[1, 4\], got 0/);
    expect(() => krumSelect(pts, 1, 5)).toThrow(/\[1, 4\], got 5/);
  });
});

describe('l2Distance and clipToNorm', () => {
  it('measures Euclidean distance', () => {
    // sqrt(3^2 + 4^2) = 5; sqrt(1 + 4 + 4) = 3
    expect(l2Distance(v(0, 0), v(3, 4))).toBe(5);
    expect(l2Distance(v(1, 1, 1), v(2, 3, -1))).toBe(3);
    expect(() => l2Distance(v(1), v(1, 2))).toThrow(/a has 1 elements but b has 2/);
  });

  it('scales update - center down to the bound, keeping its direction', () => {
    const center = v(1, 1);
    const update = v(4, 5); // update - center = (3, 4), norm 5
    const { clipped, factor } = clipToNorm(update, center, 2.5);
    // factor = 2.5 / 5 = 0.5; clipped = (1,1) + 0.5 * (3,4) = (2.5, 3)
    expect(factor).toBe(0.5);
    expect(list(clipped)).toEqual([2.5, 3]);
    expect(l2Distance(clipped, center)).toBeCloseTo(2.5, 6);

    const rng = createRng(5);
    const c = Float32Array.from({ length: 1000 }, () => rng.normal());
    const u = Float32Array.from({ length: 1000 }, () => rng.normal() * 4);
    const norm = l2Distance(u, c);
    const bound = norm / 7;
    const r = clipToNorm(u, c, bound);
    expect(r.factor).toBeCloseTo(1 / 7, 12);
    expect(l2Distance(r.clipped, c) / bound).toBeCloseTo(1, 5);
    // direction preserved: cosine between clipped - c and u - c is 1
    let dot = 0;
    for (let j = 0; j < 1000; j++) dot += (r.clipped[j]! - c[j]!) * (u[j]! - c[j]!);
    expect(dot / (bound * norm)).toBeCloseTo(1, 5);
  });

  it('returns an unchanged copy when within the bound', () => {
    const update = v(4, 5);
    const { clipped, factor } = clipToNorm(update, v(1, 1), 5);
    expect(factor).toBe(1);
    expect(list(clipped)).toEqual([4, 5]);
    expect(clipped).not.toBe(update);
    expect(clipToNorm(v(1, 1), v(1, 1), 0.1).factor).toBe(1);
  });

  it('refuses a bad bound or mismatched lengths', () => {
    for (const b of [0, -1, NaN, Infinity]) expect(() => clipToNorm(v(1), v(0), b)).toThrow(/bound must be a finite number > 0/);
    expect(() => clipToNorm(v(1, 2), v(0), 1)).toThrow(/update has 2 elements but center has 1/);
  });
});

describe('weightedMean', () => {
  it('is sum w_k u_k / sum w_k', () => {
    const u = [v(1, 10), v(3, 0), v(0, 2)];
    // coord 0: (10*1 + 30*3 + 60*0) / 100 = 1
    // coord 1: (10*10 + 30*0 + 60*2) / 100 = 2.2
    const m = weightedMean(u, [10, 30, 60]);
    expect(m[0]).toBeCloseTo(1, 6);
    expect(m[1]).toBeCloseTo(2.2, 6);
  });

  it('accumulates in float64', () => {
    // (2^24 + 1 + 1) / 3 = 5592406 exactly; a float32 accumulator loses both +1s
    // (2^24 + 1 rounds to 2^24) and gives 2^24 / 3 = 5592405.33.
    const m = weightedMean([v(2 ** 24), v(1), v(1)], [1, 1, 1]);
    expect(m[0]).toBe(5592406);
  });

  it('refuses bad weights', () => {
    const u = [v(1), v(2)];
    expect(() => weightedMean(u, [1])).toThrow(/got 1 weights for 2 updates/);
    expect(() => weightedMean(u, [1, -1])).toThrow(/weights\[1\] is -1/);
    expect(() => weightedMean(u, [1, NaN])).toThrow(/weights\[1\] is NaN/);
    expect(() => weightedMean(u, [0, 0])).toThrow(/weights sum to 0/);
  });
});
