import { execFileSync, spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { DEFAULT_ORDERS, epsilonOf, logErfc, noiseForEpsilon, RdpLedger, rdpOfSteps, rdpSampledGaussian, rdpToEpsilon } from '../../common/privacy/rdp.ts';

/**
 * A_alpha = E_{z ~ mu0} [(mu(z) / mu0(z))^alpha] with mu0 = N(0, s^2), mu = (1-q) N(0, s^2) + q N(1, s^2),
 * by composite Simpson quadrature in log space: an independent route to the series of the accountant
 * (the definition of Mironov, Talwar and Zhang 2019, Section 3.3, integrated numerically).
 */
function logAByQuadrature(q: number, s: number, alpha: number): number {
  const lo = -30 * s - 10;
  const hi = 30 * s + 10 + alpha;
  const n = 400_000;
  const h = (hi - lo) / n;
  const logF = (z: number): number => -(z * z) / (2 * s * s) - Math.log(s * Math.sqrt(2 * Math.PI)) + alpha * Math.log(1 - q + q * Math.exp((2 * z - 1) / (2 * s * s)));
  let m = -Infinity;
  for (let i = 0; i <= n; i++) m = Math.max(m, logF(lo + i * h));
  let sum = 0;
  for (let i = 0; i <= n; i++) sum += (i === 0 || i === n ? 1 : i % 2 === 1 ? 4 : 2) * Math.exp(logF(lo + i * h) - m);
  return m + Math.log((sum * h) / 3);
}

describe('privacy accountant (Renyi DP of the sampled Gaussian mechanism)', () => {
  it('matches the published RDP of the sampled Gaussian mechanism', () => {
    // tensorflow/privacy, tensorflow_privacy/privacy/analysis/rdp_accountant_test.py:
    // test_compute_rdp_scalar: compute_rdp(q=0.1, noise_multiplier=2, steps=10, orders=5) = 0.07737 (places=5);
    // test_compute_rdp_sequence: compute_rdp(0.01, 2.5, 50, [1.5, 2.5, 5, 50, 100, inf]) =
    // [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307, inf] (to within 1e-5).
    expect(rdpOfSteps(0.1, 2, 10, [5])[0]).toBeCloseTo(0.07737, 5);
    const published = [0.00065, 0.001085, 0.00218075, 0.023846, 167.416307];
    const got = rdpOfSteps(0.01, 2.5, 50, [1.5, 2.5, 5, 50, 100]);
    for (let i = 0; i < published.length; i++) expect(Math.abs(got[i]! - published[i]!)).toBeLessThan(1e-5);
    expect(rdpSampledGaussian(0.01, 2.5, [Infinity])[0]).toBe(Infinity);
  });

  it('reproduces the published MNIST DP-SGD budgets (classic conversion)', () => {
    // tensorflow/privacy, tutorials/README.md ("Using Command-Line Interface for Privacy Budgeting"):
    // compute_dp_sgd_privacy.py --N=60000 --batch_size=256 --noise_multiplier=1.1 --epochs=60 --delta=1e-5
    // "satisfies differential privacy with eps = 3.01 and delta = 1e-05". That script then used
    // q = 256/60000, steps = ceil(60 * 60000 / 256), orders [1 + x/10 for x in 1..99] + 12..63, classic conversion.
    const tfOrders = [...Array.from({ length: 99 }, (_, i) => 1 + (i + 1) / 10), ...Array.from({ length: 52 }, (_, i) => 12 + i)];
    const tf = epsilonOf({ sampleRate: 256 / 60000, noiseMultiplier: 1.1, steps: Math.ceil((60 * 60000) / 256), delta: 1e-5, orders: tfOrders, conversion: 'classic' });
    expect(tf.epsilon.toFixed(2)).toBe('3.01');
    // pytorch/opacus, scripts/compute_dp_sgd_privacy.py docstring: --dataset-size=60000 --batch-size=256
    // --noise_multiplier=1.12 --epochs=60 --delta=1e-5 --a 10 20 100 "satisfies (epsilon,delta)-DP of (2.95, 1e-5)";
    // steps = epochs * ceil(60000 / 256), and the classic conversion Opacus used then.
    const op = epsilonOf({ sampleRate: 256 / 60000, noiseMultiplier: 1.12, steps: 60 * Math.ceil(60000 / 256), delta: 1e-5, orders: [10, 20, 100], conversion: 'classic' });
    expect(op.epsilon.toFixed(2)).toBe('2.95');
    expect(op.order).toBe(10);
  });

  it('is never above the looser bound dp_accounting publishes, and equal to it at integer orders', () => {
    // google/differential-privacy, python/dp_accounting/dp_accounting/rdp/rdp_privacy_accountant_test.py,
    // test_compute_rdp_poisson_sampled_gaussian: same setting -> [6.70579741e-04, 1.08548710e-03, 2.18075656e-03,
    // 2.38460375e-02, 1.67416308e02] (rtol 1e-4). Its fractional-order series adds the terms' magnitudes (an upper
    // bound); ours keeps their signs, the exact A_alpha (checked against quadrature below), so it is at most theirs.
    const bound = [6.70579741e-4, 1.0854871e-3, 2.18075656e-3, 2.38460375e-2, 1.67416308e2];
    const got = rdpOfSteps(0.01, 2.5, 50, [1.5, 2.5, 5, 50, 100]);
    for (let i = 0; i < bound.length; i++) expect(got[i]!).toBeLessThanOrEqual(bound[i]! * (1 + 1e-8));
    for (const i of [2, 3, 4]) expect(Math.abs(got[i]! / bound[i]! - 1)).toBeLessThan(1e-8);
  });

  it('converts constant RDP (pure DP) to the published epsilon', () => {
    // Same file, test_compute_epsilon_delta_pure_dp: orders 2..32, rdp 1.1, delta 1e-5 -> epsilon 1.32783806176 at order 32.
    const orders = Array.from({ length: 31 }, (_, i) => i + 2);
    const r = rdpToEpsilon(orders, orders.map(() => 1.1), 1e-5);
    expect(r.order).toBe(32);
    expect(r.epsilon).toBeCloseTo(1.32783806176, 10);
  });

  it('gives the published (1, 1e-6) noise of the Gaussian mechanism', () => {
    // Same file, test_compute_epsilon_delta_gaussian: q = 1, sigma 4.530877117 gives exactly (1, 1e-6)-DP
    // over the orders 1.000 .. 99.999 by 0.001 (we start at 1.001: order 1 is the KL limit).
    const orders = Array.from({ length: 98_999 }, (_, i) => 0.001 * (i + 1001));
    const r = epsilonOf({ sampleRate: 1, noiseMultiplier: 4.530877117, steps: 1, delta: 1e-6, orders });
    expect(r.epsilon).toBeCloseTo(1, 7);
  });

  it('agrees with numerical integration of the definition, integer and fractional orders', () => {
    for (const [q, s, a] of [
      [0.01, 2.5, 2],
      [0.01, 2.5, 5.5],
      [0.1, 1.2, 3.7],
      [0.05, 0.8, 1.5],
      [0.3, 4, 12],
      [0.001, 1, 32.25],
    ] as const) {
      const series = rdpSampledGaussian(q, s, [a])[0]! * (a - 1);
      const quad = logAByQuadrature(q, s, a);
      expect(Math.abs(series - quad)).toBeLessThan(1e-8 * Math.max(1, Math.abs(quad)) + 1e-12);
    }
  });

  it('bounds the other direction too: B_alpha (mu0 against the mixture) is at most A_alpha', () => {
    // Mironov, Talwar and Zhang 2019 define the SGM's RDP as max(A_alpha, B_alpha) with
    // B_alpha = E_{z ~ mu} [(mu0(z) / mu(z))^alpha] and prove B_alpha <= A_alpha (their Theorem 5),
    // so the series for A_alpha is the RDP. Check that numerically for integer and fractional orders.
    const logBByQuadrature = (q: number, s: number, alpha: number): number => {
      const lo = -30 * s - 10;
      const hi = 30 * s + 10;
      const n = 400_000;
      const h = (hi - lo) / n;
      const logN = (z: number, m: number) => -((z - m) * (z - m)) / (2 * s * s) - Math.log(s * Math.sqrt(2 * Math.PI));
      const logMix = (z: number) => Math.log(1 - q) + logN(z, 0) + Math.log1p((q / (1 - q)) * Math.exp((2 * z - 1) / (2 * s * s)));
      const logF = (z: number) => alpha * logN(z, 0) + (1 - alpha) * logMix(z);
      let m = -Infinity;
      for (let i = 0; i <= n; i++) m = Math.max(m, logF(lo + i * h));
      let sum = 0;
      for (let i = 0; i <= n; i++) sum += (i === 0 || i === n ? 1 : i % 2 === 1 ? 4 : 2) * Math.exp(logF(lo + i * h) - m);
      return m + Math.log((sum * h) / 3);
    };
    for (const [q, s, a] of [
      [0.01, 2.5, 5.5],
      [0.1, 1.2, 3],
      [0.05, 0.8, 1.5],
    ] as const) {
      const logA = rdpSampledGaussian(q, s, [a])[0]! * (a - 1);
      expect(logBByQuadrature(q, s, a)).toBeLessThanOrEqual(logA * (1 + 1e-9));
    }
  });

  it('is the Gaussian mechanism at q = 1 and infinite without noise', () => {
    const orders = [1.5, 2, 7.25, 64];
    const r = rdpSampledGaussian(1, 1.7, orders);
    orders.forEach((a, i) => expect(r[i]).toBe(a / (2 * 1.7 * 1.7)));
    expect(rdpSampledGaussian(0.1, 0, [2])[0]).toBe(Infinity);
    expect(epsilonOf({ sampleRate: 0.1, noiseMultiplier: 0, steps: 3, delta: 1e-5 }).epsilon).toBe(Infinity);
    expect(rdpSampledGaussian(0, 1, [2])[0]).toBe(0);
  });

  it('is never below the subsampled bound and moves the right way with q, sigma and T', () => {
    // Subsampling can only help: the SGM's RDP is at most the full Gaussian's at every order.
    const gauss = rdpSampledGaussian(1, 1.1, DEFAULT_ORDERS);
    const sgm = rdpSampledGaussian(0.02, 1.1, DEFAULT_ORDERS);
    sgm.forEach((v, i) => expect(v).toBeLessThanOrEqual(gauss[i]!));
    const e = (q: number, s: number, t: number) => epsilonOf({ sampleRate: q, noiseMultiplier: s, steps: t, delta: 1e-5 }).epsilon;
    expect(e(0.01, 1.1, 2000)).toBeGreaterThan(e(0.01, 1.1, 1000));
    expect(e(0.02, 1.1, 1000)).toBeGreaterThan(e(0.01, 1.1, 1000));
    expect(e(0.01, 1.5, 1000)).toBeLessThan(e(0.01, 1.1, 1000));
    // The classic conversion is never tighter than the improved one.
    const rdp = rdpOfSteps(0.01, 1.1, 1000);
    expect(rdpToEpsilon(DEFAULT_ORDERS, rdp, 1e-5, 'classic').epsilon).toBeGreaterThan(rdpToEpsilon(DEFAULT_ORDERS, rdp, 1e-5).epsilon);
  });

  it('solves for sigma and round-trips', () => {
    for (const [target, q, t] of [
      [1, 0.01, 1000],
      [4, 0.004, 15000],
      [8, 1, 20],
    ] as const) {
      const sigma = noiseForEpsilon({ targetEpsilon: target, sampleRate: q, steps: t, delta: 1e-5 });
      const got = epsilonOf({ sampleRate: q, noiseMultiplier: sigma, steps: t, delta: 1e-5 }).epsilon;
      expect(got).toBeLessThanOrEqual(target);
      expect(got).toBeGreaterThan(target - 1e-3 * target);
      expect(epsilonOf({ sampleRate: q, noiseMultiplier: sigma * 0.999, steps: t, delta: 1e-5 }).epsilon).toBeGreaterThan(target - 2e-3 * target);
    }
  });

  it('composes in a ledger that serialises exactly', () => {
    const l = new RdpLedger([1.5, 2, 4, 8, 16, 32]);
    l.add(0.01, 1.1, 100);
    l.add(1, 3, 2);
    const direct = rdpOfSteps(0.01, 1.1, 100, [1.5, 2, 4, 8, 16, 32]).map((v, i) => v + [1.5, 2, 4, 8, 16, 32][i]! / 9);
    l.rdp().forEach((v, i) => expect(v).toBeCloseTo(direct[i]!, 14));
    const back = RdpLedger.fromJSON(JSON.parse(JSON.stringify(l)));
    expect(Array.from(back.rdp())).toEqual(Array.from(l.rdp()));
    expect(back.epsilon(1e-5)).toEqual(l.epsilon(1e-5));
    expect(() => RdpLedger.fromJSON({ orders: [2], rdp: [-1] })).toThrow(/rdp\[0\] must be a number >= 0/);
  });

  it('computes log erfc across its range', () => {
    // erfc values from Abramowitz and Stegun Table 7.1 / the asymptotic series for large x.
    expect(Math.exp(logErfc(0))).toBeCloseTo(1, 15);
    expect(Math.exp(logErfc(0.5))).toBeCloseTo(0.4795001221869535, 14);
    expect(Math.exp(logErfc(1))).toBeCloseTo(0.15729920705028513, 14);
    expect(Math.exp(logErfc(-1))).toBeCloseTo(1.8427007929497148, 14);
    expect(Math.abs(Math.exp(logErfc(3)) / 2.209049699858544e-5 - 1)).toBeLessThan(1e-13);
    // erfc(30) ~ e^-900 underflows a double; its log does not: -x^2 - log(x sqrt(pi)) + log(1 - 1/(2x^2) + 3/(4x^4)).
    const x = 30;
    expect(logErfc(x)).toBeCloseTo(-x * x - Math.log(x * Math.sqrt(Math.PI)) + Math.log(1 - 1 / (2 * x * x) + 3 / (4 * x ** 4) - 15 / (8 * x ** 6)), 10);
  });

  it('refuses bad input naming it', () => {
    expect(() => rdpSampledGaussian(1.5, 1)).toThrow(/sample rate q must be in \[0, 1\] \(got 1.5\)/);
    expect(() => rdpSampledGaussian(0.1, -1)).toThrow(/noise multiplier sigma must be/);
    expect(() => rdpSampledGaussian(0.1, 1, [1])).toThrow(/every order must be > 1/);
    expect(() => epsilonOf({ sampleRate: 0.1, noiseMultiplier: 1, steps: 1.5, delta: 1e-5 })).toThrow(/steps must be an integer >= 0 \(got 1.5\)/);
    expect(() => epsilonOf({ sampleRate: 0.1, noiseMultiplier: 1, steps: 1, delta: 0 })).toThrow(/delta must be in \(0, 1\)/);
  });

  it('prints the same numbers from the command line, and names a bad flag', () => {
    const out = execFileSync(process.execPath, ['bin/fedtune.js', 'privacy', 'epsilon', '--sample-rate', '0.01', '--noise-multiplier', '1.1', '--steps', '1000', '--json'], { encoding: 'utf8' });
    const j = JSON.parse(out) as { epsilon: number; order: number };
    expect(j).toMatchObject(epsilonOf({ sampleRate: 0.01, noiseMultiplier: 1.1, steps: 1000, delta: 1e-5 }));
    const inv = JSON.parse(execFileSync(process.execPath, ['bin/fedtune.js', 'privacy', 'epsilon', '--sample-rate', '0.01', '--target-epsilon', String(j.epsilon), '--steps', '1000', '--json'], { encoding: 'utf8' })) as { noise_multiplier: number };
    expect(Math.abs(inv.noise_multiplier - 1.1)).toBeLessThan(1e-3);
    const bad = spawnSync(process.execPath, ['bin/fedtune.js', 'privacy', 'epsilon', '--sample-rate', '2', '--noise-multiplier', '1', '--steps', '10'], { encoding: 'utf8' });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/--sample-rate: must be a number in \(0, 1\] \(got "2"\)/);
    const both = spawnSync(process.execPath, ['bin/fedtune.js', 'privacy', 'epsilon', '--sample-rate', '0.1', '--steps', '10'], { encoding: 'utf8' });
    expect(both.stderr).toMatch(/give exactly one of --noise-multiplier .* or --target-epsilon/);
  });
});
