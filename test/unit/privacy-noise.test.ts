import { describe, expect, it } from 'vitest';
import { addGaussianNoise, clipToNorm, cryptoNormals, l2Norm } from '../../common/privacy/noise.ts';

/** Standard normal CDF (Abramowitz and Stegun 7.1.26 erf, |error| < 1.5e-7). */
function phi(x: number): number {
  const z = Math.abs(x) / Math.SQRT2;
  const t = 1 / (1 + 0.3275911 * z);
  const erf = 1 - ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * Math.exp(-z * z);
  return x >= 0 ? 0.5 * (1 + erf) : 0.5 * (1 - erf);
}

describe('privacy noise', () => {
  it('draws standard normals from the OS CSPRNG (mean, variance, Kolmogorov-Smirnov)', () => {
    const n = 200_000;
    const z = new Float64Array(n);
    cryptoNormals(z);
    let s = 0;
    let s2 = 0;
    for (const v of z) {
      s += v;
      s2 += v * v;
    }
    const mean = s / n;
    const variance = s2 / n - mean * mean;
    // 6 standard errors: a correct sampler fails this about once in 10^9 runs.
    expect(Math.abs(mean)).toBeLessThan(6 / Math.sqrt(n));
    expect(Math.abs(variance - 1)).toBeLessThan(6 * Math.sqrt(2 / n));
    const sorted = Float64Array.from(z).sort();
    let d = 0;
    for (let i = 0; i < n; i++) d = Math.max(d, Math.abs(phi(sorted[i]!) - (i + 0.5) / n));
    // KS critical value at alpha = 1e-6 is about sqrt(-ln(alpha/2) / (2n)).
    expect(d).toBeLessThan(Math.sqrt(-Math.log(0.5e-6) / (2 * n)));
    // Odd lengths fill every slot.
    const odd = new Float64Array(7);
    cryptoNormals(odd);
    expect(odd.every((v) => v !== 0 && Number.isFinite(v))).toBe(true);
  });

  it('adds noise of the requested std and rejects a bad std', () => {
    const n = 100_000;
    const v = new Float32Array(n).fill(3);
    addGaussianNoise(v, 0.25);
    let s2 = 0;
    for (const x of v) s2 += (x - 3) ** 2;
    expect(Math.abs(s2 / n - 0.0625)).toBeLessThan(6 * 0.0625 * Math.sqrt(2 / n));
    // The test can tell a wrong variance apart: 0.3 instead of 0.25 is far outside the bound.
    expect(Math.abs(0.09 - 0.0625)).toBeGreaterThan(6 * 0.0625 * Math.sqrt(2 / n));
    expect(() => addGaussianNoise(v, -1)).toThrow(/noise std must be a finite number >= 0 \(got -1\)/);
    expect(() => addGaussianNoise(v, NaN)).toThrow(/noise std/);
  });

  it('clips several arrays as one vector to the L2 bound', () => {
    const a = new Float32Array([3, 0]);
    const b = new Float64Array([0, 4]);
    const r = clipToNorm([a, b], 2.5);
    expect(r.norm).toBe(5);
    expect(r.factor).toBe(0.5);
    expect(Array.from(a)).toEqual([1.5, 0]);
    expect(Array.from(b)).toEqual([0, 2]);
    expect(l2Norm([a, b])).toBeCloseTo(2.5, 12);
    const c = new Float32Array([0.1, 0.2]);
    expect(clipToNorm([c], 1).factor).toBe(1);
    expect(Array.from(c)).toEqual([Math.fround(0.1), Math.fround(0.2)]);
    expect(() => clipToNorm([c], 0)).toThrow(/clip norm must be > 0/);
  });
});
