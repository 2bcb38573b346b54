import { EigenvalueDecomposition, Matrix, solve } from 'ml-matrix';
import { describe, expect, it } from 'vitest';
import { createRng, type Rng } from '../../common/random.ts';
import { loraProduct, stackLora, truncateLowRank, type LoraPart } from '../../coordinator/strategies/math/lowrank.ts';

const gaussian = (rng: Rng, n: number, sd = 1) => Float32Array.from({ length: n }, () => sd * rng.normal());

function maxAbs(x: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i]!));
  return m;
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

function frobDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let s = 0;
  for (let i = 0; i < a.length; i++) s += (a[i]! - b[i]!) ** 2;
  return Math.sqrt(s);
}

/**
 * Singular values of a dense out x in matrix, computed independently of the
 * QR + small-SVD path: square roots of the eigenvalues of M^T M, descending.
 */
function referenceSingularValues(M: Float64Array, outDim: number, inDim: number): number[] {
  const m = Matrix.from1DArray(outDim, inDim, M);
  const evd = new EigenvalueDecomposition(m.transpose().mmul(m), { assumeSymmetric: true });
  return evd.realEigenvalues.map((e) => Math.sqrt(Math.max(0, e))).sort((a, b) => b - a);
}

describe('loraProduct', () => {
  it('is scale * B @ A in row-major [out, in]', () => {
    // A = [[1,2,3],[4,5,6]] (r = 2, in = 3), B = [[1,0],[0,1],[1,1]] (out = 3)
    // B @ A = [[1,2,3],[4,5,6],[5,7,9]]; times scale 2:
    const M = loraProduct(Float32Array.of(1, 2, 3, 4, 5, 6), Float32Array.of(1, 0, 0, 1, 1, 1), 2, 3, 3, 2);
    expect([...M]).toEqual([2, 4, 6, 8, 10, 12, 10, 14, 18]);
  });

  it('refuses factors whose length does not match the shapes', () => {
    expect(() => loraProduct(new Float32Array(5), new Float32Array(6), 2, 3, 3, 1)).toThrow(/A has 5 elements but \[r, in\] = \[2, 3\] needs 6/);
    expect(() => loraProduct(new Float32Array(6), new Float32Array(4), 2, 3, 3, 1)).toThrow(/B has 4 elements but \[out, r\] = \[3, 2\] needs 6/);
    expect(() => loraProduct(new Float32Array(6), new Float32Array(6), 2, 3, 3, NaN)).toThrow(/scale must be a finite number/);
    expect(() => loraProduct(Float32Array.of(1, 2, 3, 4, 5, NaN), new Float32Array(6), 2, 3, 3, 1)).toThrow(/A\[5\] is NaN/);
  });
});

describe('stackLora (FLoRA)', () => {
  const inDim = 24;
  const outDim = 20;
  const alpha = 16;
  const rng = createRng(2024);
  const ranks = [4, 8, 16];
  const raw = ranks.map(() => 0.2 + rng.next());
  const total = raw.reduce((a, b) => a + b, 0);
  const parts: LoraPart[] = ranks.map((r, k) => ({
    A: gaussian(rng, r * inDim, 0.3),
    B: gaussian(rng, outDim * r, 0.3),
    r,
    weight: raw[k]! / total,
    scale: alpha / r,
  }));
  const R = ranks.reduce((a, b) => a + b, 0);
  const targetScale = alpha / R;

  // sum_k w_k s_k B_k @ A_k, formed densely.
  const reference = new Float64Array(outDim * inDim);
  for (const p of parts) {
    const Mk = loraProduct(p.A, p.B, p.r, inDim, outDim, p.scale);
    for (let i = 0; i < Mk.length; i++) reference[i] += p.weight * Mk[i]!;
  }

  it('stacks ranks 4, 8, 16 into rank 28 whose product is the weighted sum of products', () => {
    const st = stackLora(parts, inDim, outDim, targetScale);
    expect(st.r).toBe(28);
    expect(st.A.length).toBe(28 * inDim);
    expect(st.B.length).toBe(outDim * 28);
    // A_stack rows are the rows of A_1, A_2, A_3 in order.
    expect([...st.A.subarray(4 * inDim, 12 * inDim)]).toEqual([...parts[1]!.A]);
    const stacked = loraProduct(st.A, st.B, st.r, inDim, outDim, targetScale);
    expect(maxAbsDiff(stacked, reference)).toBeLessThanOrEqual(1e-5 * maxAbs(reference));
  });

  it('differs a lot from averaging A and B separately (zero-padded to the largest rank)', () => {
    const rMax = 16;
    const Abar = new Float64Array(rMax * inDim);
    const Bbar = new Float64Array(outDim * rMax);
    for (const p of parts) {
      for (let j = 0; j < p.r * inDim; j++) Abar[j] += p.weight * p.A[j]!;
      for (let o = 0; o < outDim; o++) for (let j = 0; j < p.r; j++) Bbar[o * rMax + j] += p.weight * p.scale * p.B[o * p.r + j]!;
    }
    const naive = loraProduct(Float32Array.from(Abar), Float32Array.from(Bbar), rMax, inDim, outDim, 1);
    const gap = frobDiff(naive, reference) / Math.hypot(...reference);
    // The cross terms w_k w_l s_l B_l A_k (k != l) do not cancel: the relative gap is of order 1.
    expect(gap).toBeGreaterThan(0.5);
  });

  it('refuses bad parts naming which', () => {
    const bad = [parts[0]!, { ...parts[1]!, A: new Float32Array(3) }];
    expect(() => stackLora(bad, inDim, outDim, targetScale)).toThrow(/parts\[1\]\.A has 3 elements but \[r, in\] = \[8, 24\] needs 192/);
    expect(() => stackLora([{ ...parts[0]!, weight: -1 }], inDim, outDim, targetScale)).toThrow(/parts\[0\]\.weight is -1/);
    expect(() => stackLora(parts, inDim, outDim, 0)).toThrow(/targetScale must be a finite number > 0/);
    expect(() => stackLora([], inDim, outDim, 1)).toThrow(/parts is empty/);
  });
});

describe('truncateLowRank (FlexLoRA redistribution)', () => {
  const inDim = 30;
  const outDim = 20;
  const r = 8;
  const scale = 16 / r;
  const rng = createRng(99);
  const A = gaussian(rng, r * inDim, 0.5);
  const B = gaussian(rng, outDim * r, 0.5);
  const M = loraProduct(A, B, r, inDim, outDim, scale);
  const sigmaRef = referenceSingularValues(M, outDim, inDim);
  const tail = (k: number) => Math.sqrt(sigmaRef.slice(k).reduce((s, x) => s + x * x, 0));

  it('returns the singular values of scale * B @ A (checked against eig(M^T M) of the dense product)', () => {
    const t = truncateLowRank(A, B, r, inDim, outDim, scale, 3, 16 / 3);
    expect(t.singularValues.length).toBe(r);
    for (let i = 0; i < r; i++) expect(Math.abs(t.singularValues[i]! - sigmaRef[i]!)).toBeLessThan(1e-9 * sigmaRef[0]!);
    // The product has rank r: the dense matrix's other singular values vanish.
    expect(sigmaRef[r]!).toBeLessThan(1e-6 * sigmaRef[0]!);
  });

  it('Eckart-Young: the rank-k error is sqrt(sum of the discarded singular values squared)', () => {
    for (let k = 1; k < r; k++) {
      const targetScale = 16 / k;
      const t = truncateLowRank(A, B, r, inDim, outDim, scale, k, targetScale);
      expect(t.A.length).toBe(k * inDim);
      expect(t.B.length).toBe(outDim * k);
      const approx = loraProduct(t.A, t.B, k, inDim, outDim, targetScale);
      const err = frobDiff(M, approx);
      expect(Math.abs(err - tail(k)) / tail(k)).toBeLessThan(1e-5);
      expect(Math.abs(t.discardedNorm - tail(k)) / tail(k)).toBeLessThan(1e-9);
    }
  });

  it('no random or alternating-least-squares rank-k factorisation does better', () => {
    const k = 3;
    const t = truncateLowRank(A, B, r, inDim, outDim, scale, k, 1);
    const best = frobDiff(M, loraProduct(t.A, t.B, k, inDim, outDim, 1));
    expect(Math.abs(best - tail(k)) / tail(k)).toBeLessThan(1e-5);
    const Mm = Matrix.from1DArray(outDim, inDim, M);
    const errOf = (X: Matrix, Y: Matrix) => frobDiff(M, X.mmul(Y).to1DArray());
    const Xopt = Matrix.from1DArray(outDim, k, t.B);
    const Yopt = Matrix.from1DArray(k, inDim, t.A);
    const randn = (rows: number, cols: number, sd: number) => Matrix.from1DArray(rows, cols, gaussian(rng, rows * cols, sd));
    const sdX = Math.sqrt(Xopt.norm() ** 2 / (outDim * k));
    const sdY = Math.sqrt(Yopt.norm() ** 2 / (k * inDim));
    let tried = 0;
    let closest = Infinity;
    // Pure random factorisations with the optimum's entry scale.
    for (let i = 0; i < 100; i++, tried++) expect(errOf(randn(outDim, k, sdX), randn(k, inDim, sdY))).toBeGreaterThanOrEqual(best);
    // Random perturbations of the returned factors: a local search around them.
    for (const eps of [1e-2, 1e-1, 1]) {
      for (let i = 0; i < 100; i++, tried++) {
        const e = errOf(Xopt.clone().add(randn(outDim, k, eps * sdX)), Yopt.clone().add(randn(k, inDim, eps * sdY)));
        expect(e).toBeGreaterThan(best * (1 - 1e-9));
        closest = Math.min(closest, e);
      }
    }
    // One step of alternating least squares from a random start.
    let alsBest = Infinity;
    for (let i = 0; i < 30; i++, tried++) {
      const X0 = randn(outDim, k, 1);
      const Y = solve(X0, Mm); // argmin_Y ||M - X0 Y||
      const X = solve(Y.transpose(), Mm.transpose()).transpose(); // argmin_X ||M - X Y||
      const e = errOf(X, Y);
      expect(e).toBeGreaterThan(best * (1 - 1e-9));
      alsBest = Math.min(alsBest, e);
    }
    expect(tried).toBe(430);
    // The competitors are not straw men: the small perturbations and ALS get close to the optimum.
    expect(closest / best).toBeLessThan(1.01);
    expect(alsBest / best).toBeLessThan(1.5);
  });

  it('rank >= r reproduces the product exactly, padding with zero rows and columns', () => {
    for (const rank of [r, r + 3]) {
      const ts = 16 / rank;
      const t = truncateLowRank(A, B, r, inDim, outDim, scale, rank, ts);
      expect(t.r).toBe(rank);
      expect(t.A.length).toBe(rank * inDim);
      expect(t.B.length).toBe(outDim * rank);
      expect(t.discardedNorm).toBe(0);
      const P = loraProduct(t.A, t.B, rank, inDim, outDim, ts);
      expect(maxAbsDiff(P, M)).toBeLessThanOrEqual(1e-5 * maxAbs(M));
      for (let row = r; row < rank; row++) expect(maxAbs(t.A.subarray(row * inDim, (row + 1) * inDim))).toBe(0);
      for (let o = 0; o < outDim; o++) for (let c = r; c < rank; c++) expect(t.B[o * rank + c]).toBe(0);
    }
  });

  it('handles out or in smaller than r, and an all-zero B (PEFT initialisation)', () => {
    for (const [inD, outD] of [
      [30, 5],
      [5, 30],
      [3, 4],
    ] as const) {
      const a = gaussian(rng, r * inD);
      const b = gaussian(rng, outD * r);
      const Md = loraProduct(a, b, r, inD, outD, 0.5);
      const ref = referenceSingularValues(Md, outD, inD);
      const n = Math.min(inD, outD);
      const full = truncateLowRank(a, b, r, inD, outD, 0.5, r, 2);
      expect(full.singularValues.length).toBe(n);
      for (let i = 0; i < n; i++) expect(Math.abs(full.singularValues[i]! - ref[i]!)).toBeLessThan(1e-9 * ref[0]!);
      expect(maxAbsDiff(loraProduct(full.A, full.B, r, inD, outD, 2), Md)).toBeLessThanOrEqual(1e-5 * maxAbs(Md));
      const k = 2;
      const cut = truncateLowRank(a, b, r, inD, outD, 0.5, k, 2);
      const refTail = Math.sqrt(ref.slice(k).reduce((s, x) => s + x * x, 0));
      expect(Math.abs(frobDiff(loraProduct(cut.A, cut.B, k, inD, outD, 2), Md) - refTail) / refTail).toBeLessThan(1e-5);
    }
    const z = truncateLowRank(gaussian(rng, r * inDim), new Float32Array(outDim * r), r, inDim, outDim, scale, 4, 1);
    expect([...z.singularValues].every((s) => s === 0)).toBe(true);
    expect(maxAbs(z.A) + maxAbs(z.B)).toBe(0);
  });

  it('refuses bad rank, scale and shapes', () => {
    expect(() => truncateLowRank(A, B, r, inDim, outDim, scale, 0, 1)).toThrow(/rank must be an integer >= 1, got 0/);
    expect(() => truncateLowRank(A, B, r, inDim, outDim, scale, 2.5, 1)).toThrow(/rank must be an integer >= 1, got 2.5/);
    expect(() => truncateLowRank(A, B, r, inDim, outDim, scale, 2, -1)).toThrow(/targetScale must be a finite number > 0/);
    expect(() => truncateLowRank(A, B, r, inDim + 1, outDim, scale, 2, 1)).toThrow(/A has 240 elements but \[r, in\] = \[8, 31\] needs 248/);
  });
});
