import { describe, expect, it } from 'vitest';
import { decode, encode, fixedPointScale, quantisationBound } from '../../common/secagg/index.ts';
import { createRng } from '../../common/random.ts';

function seededUniform(seed: number): (n: number) => Float64Array {
  const rng = createRng(seed);
  return (n) => Float64Array.from({ length: n }, () => rng.next());
}

function addMod(acc: Uint32Array, y: Uint32Array): void {
  for (let i = 0; i < acc.length; i++) acc[i] += y[i]!;
}

describe('secure aggregation fixed point', () => {
  it('scales so that maxSummands values of range fit in a signed int32', () => {
    // S = floor((2^31 - 1) / (maxSummands * range)), computed by hand: 2147483647 / 10 = 214748364.7
    expect(fixedPointScale(1, 10)).toBe(214748364);
    expect(fixedPointScale(0.5, 50)).toBe(Math.floor(2147483647 / 25));
    expect(quantisationBound(1, 10, 7)).toBeCloseTo(7 / 214748364, 20);
    expect(() => fixedPointScale(0, 10)).toThrow(/range must be a positive/);
    expect(() => fixedPointScale(1e9, 10)).toThrow(/below 2\^31 - 1.*lower privacy.secure_aggregation.range/);
    expect(() => quantisationBound(1, 10, 11)).toThrow(/summands must be an integer in \[0, 10\]/);
  });

  it('decodes a sum of n encoded vectors within quantisationBound of the float64 sum', () => {
    const rng = createRng(42);
    const n = 13;
    const range = 0.75;
    const len = 5000;
    const acc = new Uint32Array(len);
    const exact = new Float64Array(len);
    for (let k = 0; k < n; k++) {
      const x = new Float32Array(len);
      for (let i = 0; i < len; i++) x[i] = (2 * rng.next() - 1) * range;
      addMod(acc, encode(x, range, n));
      for (let i = 0; i < len; i++) exact[i] += x[i]!;
    }
    const got = decode(acc, range, n);
    const bound = quantisationBound(range, n, n);
    let worst = 0;
    for (let i = 0; i < len; i++) worst = Math.max(worst, Math.abs(got[i]! - exact[i]!));
    expect(worst).toBeLessThanOrEqual(bound);
    expect(worst).toBeGreaterThan(0); // it is a quantisation, not the identity
  });

  it('rounds stochastically without bias', () => {
    // A value 0.3 of the way between two grid points: the mean of many roundings is the value itself.
    const range = 1;
    const s = fixedPointScale(range, 4);
    const v = (12345 + 0.3) / s;
    const draws = 200_000;
    const x = new Float64Array(draws).fill(v);
    const y = encode(x, range, 4, seededUniform(7));
    let up = 0;
    let other = 0;
    for (let i = 0; i < draws; i++) {
      const q = y[i]! | 0;
      if (q === 12346) up++;
      else if (q !== 12345) other++;
    }
    expect(other).toBe(0);
    // Binomial(draws, 0.3): 6 standard deviations.
    const sd = Math.sqrt(draws * 0.3 * 0.7);
    expect(Math.abs(up - 0.3 * draws)).toBeLessThan(6 * sd);
    // Negative values round the same way (two's complement).
    const yn = encode(new Float64Array(draws).fill(-v), range, 4, seededUniform(8));
    let mean = 0;
    for (let i = 0; i < draws; i++) mean += (yn[i]! | 0) / draws;
    expect(Math.abs(mean + 12345.3)).toBeLessThan((6 * sd) / draws);
  });

  it('clips values beyond range, and refuses non-finite values by coordinate', () => {
    const range = 0.5;
    const y = encode(Float64Array.of(3, -7, 0.5, -0.5), range, 8);
    const d = decode(y, range, 8);
    const lim = Math.floor(range * fixedPointScale(range, 8)) / fixedPointScale(range, 8);
    expect(d[0]).toBeCloseTo(lim, 12);
    expect(d[1]).toBeCloseTo(-lim, 12);
    expect(Math.abs(d[2]! - 0.5)).toBeLessThanOrEqual(1 / fixedPointScale(range, 8));
    expect(() => encode(Float64Array.of(0, NaN), range, 8)).toThrow(/coordinate 1 is NaN/);
    expect(() => encode(Float64Array.of(Infinity), range, 8)).toThrow(/coordinate 0 is Infinity/);
  });

  it('cannot overflow: maxSummands summands at +range or -range decode to +-maxSummands * range', () => {
    for (const [range, m] of [[1, 10], [0.1, 1000], [3.7, 3], [1e-3, 50]] as const) {
      for (const sign of [1, -1]) {
        const acc = new Uint32Array(4);
        // Worst case for rounding: every value at the edge, and a uniform source that always rounds up.
        for (let k = 0; k < m; k++) addMod(acc, encode(new Float64Array(4).fill(sign * range * 2), range, m, (n) => new Float64Array(n)));
        const d = decode(acc, range, m);
        for (const v of d) {
          expect(Math.sign(v)).toBe(sign);
          expect(Math.abs(Math.abs(v) - m * range)).toBeLessThanOrEqual(quantisationBound(range, m, m));
        }
      }
    }
  });
});
