// MeanAggregator's batched fold (coordinator/strategies/fedavg.ts): updates are
// queued and folded a few at a time. Every expected number here is worked out by
// hand (or in closed form) in the comments, not by running the aggregator.
import { describe, expect, it } from 'vitest';
import type { TensorMap } from '../../common/tensor.ts';
import { MeanAggregator as Mean, type MeanAggregatorOptions } from '../../coordinator/strategies/fedavg.ts';
import type { SumKernel } from '../../coordinator/strategies/math/sum.ts';

// Two tensors: A [1, 3] and B [2].
function up(a: number[], b: number[], f64 = false): TensorMap {
  const arr = (x: number[]) => (f64 ? Float64Array.from(x) : Float32Array.from(x));
  return new Map([
    ['A', { shape: [1, 3], data: arr(a) }],
    ['B', { shape: [2], data: arr(b) }],
  ]);
}
const like = (): TensorMap => up([0, 0, 0], [0, 0]);

// Five updates (weight, A, B); all values are exact in float32.
const U: Array<[number, number[], number[]]> = [
  [1, [1, 2, 3], [4, 5]],
  [2, [0, 1, 0], [1, 1]],
  [3, [2, 0, 1], [0, 2]],
  [4, [1, 1, 1], [3, 0]],
  [10, [-1, 0, 2], [0.5, -1]],
];
// Weighted sums over all five, element by element (total weight 1+2+3+4+10 = 20):
//   A0 = 1*1 + 2*0 + 3*2 + 4*1 + 10*(-1) = 1      A1 = 2 + 2 + 0 + 4 + 0 = 8     A2 = 3 + 0 + 3 + 4 + 20 = 30
//   B0 = 4 + 2 + 0 + 12 + 5 = 23                   B1 = 5 + 2 + 6 + 0 - 10 = 3
const ALL = { weight: 20, A: [1 / 20, 8 / 20, 30 / 20], B: [23 / 20, 3 / 20] };
// The first three only (total weight 6): A = [1+0+6, 2+2+0, 3+0+3] = [7, 4, 6], B = [4+2+0, 5+2+6] = [6, 13].
const FIRST3 = { weight: 6, A: [7 / 6, 4 / 6, 6 / 6], B: [6 / 6, 13 / 6] };
// The first two only (total weight 3): A = [1, 4, 3], B = [6, 7].
const FIRST2 = { weight: 3, A: [1 / 3, 4 / 3, 3 / 3], B: [6 / 3, 7 / 3] };

function expectMean(m: TensorMap, want: { A: number[]; B: number[] }): void {
  const close = (got: Float32Array | Float64Array, exp: number[]) => {
    expect(got.length).toBe(exp.length);
    exp.forEach((x, j) => expect(got[j]!).toBeCloseTo(x, 6));
  };
  expect(m.get('A')!.shape).toEqual([1, 3]);
  expect(m.get('B')!.shape).toEqual([2]);
  expect(m.get('A')!.data).toBeInstanceOf(Float32Array);
  close(m.get('A')!.data, want.A);
  close(m.get('B')!.data, want.B);
}

for (const kernel of ['wasm', 'js'] as SumKernel[]) {
  // The same cases with either fold kernel (math/sum.ts).
  const MeanAggregator = class extends Mean {
    constructor(like: TensorMap, opts: MeanAggregatorOptions = {}) {
      super(like, { ...opts, kernel });
    }
  };
  describe(`MeanAggregator batched fold (${kernel} kernel)`, () => {
    it('uses the kernel asked for', () => expect(new MeanAggregator(like()).kernel).toBe(kernel));

    for (const batch of [1, 2, 3, 4, 5, 8]) {
      it(`batch ${batch}: the weighted mean of five updates; count and totalWeight exact after every add`, () => {
        const acc = new MeanAggregator(like(), { batch });
        const weights = [1, 3, 6, 10, 20]; // running totals of 1, 2, 3, 4, 10
        U.forEach(([w, a, b], k) => {
          acc.add({ tensors: up(a, b), weight: w });
          expect(acc.count).toBe(k + 1);
          expect(acc.totalWeight).toBe(weights[k]);
        });
        expectMean(acc.mean(), ALL);
      });
    }

    it('the default batch (4) with five updates: one full batch, then mean() folds the partial one', () => {
      const acc = new MeanAggregator(like());
      for (const [w, a, b] of U) acc.add({ tensors: up(a, b), weight: w });
      expect(acc.totalWeight).toBe(ALL.weight);
      expectMean(acc.mean(), ALL);
    });

    it('mean() with a partial batch, then add() after mean(): the next mean() includes the later updates', () => {
      const acc = new MeanAggregator(like(), { batch: 4 });
      for (const [w, a, b] of U.slice(0, 3)) acc.add({ tensors: up(a, b), weight: w });
      expectMean(acc.mean(), FIRST3); // 3 < 4 queued: mean() folds them
      expectMean(acc.mean(), FIRST3); // and again: nothing is folded twice
      for (const [w, a, b] of U.slice(3)) acc.add({ tensors: up(a, b), weight: w });
      expect(acc.count).toBe(5);
      expectMean(acc.mean(), ALL);
    });

    it('batch 2 with three updates: a full batch folded in add(), the third folded by mean()', () => {
      const acc = new MeanAggregator(like(), { batch: 2 });
      for (const [w, a, b] of U.slice(0, 2)) acc.add({ tensors: up(a, b), weight: w });
      expectMean(acc.mean(), FIRST2);
      acc.add({ tensors: up(U[2]![1], U[2]![2]), weight: U[2]![0] });
      expectMean(acc.mean(), FIRST3);
    });

    it('keeps references until the fold: flush() folds now, after which the caller may reuse its arrays', () => {
      const acc = new MeanAggregator(like(), { batch: 4 });
      const first = up(U[0]![1], U[0]![2]);
      const second = up(U[1]![1], U[1]![2]);
      acc.add({ tensors: first, weight: 1 });
      acc.add({ tensors: second, weight: 2 });
      acc.flush();
      for (const t of [...first.values(), ...second.values()]) t.data.fill(1e6);
      expectMean(acc.mean(), FIRST2);
    });

    it('calls release once per update, only after the fold that read it, never for a refused update', () => {
      const released: number[] = [];
      const acc = new MeanAggregator(like(), { batch: 3 });
      const add = (k: number, f64 = false) => {
        const [w, a, b] = U[k]!;
        const tensors = up(a, b, f64);
        acc.add({
          tensors,
          weight: w,
          release: () => {
            released.push(k);
            // From here on the caller may reuse the arrays: overwrite them as a pool would.
            for (const t of tensors.values()) t.data.fill(1e6);
          },
        });
      };
      add(0);
      add(1);
      expect(released).toEqual([]); // queued, not folded
      add(2); // fills the batch of 3: all three folded, then released
      expect(released).toEqual([0, 1, 2]);
      add(3, true); // a float64 update is folded at once
      expect(released).toEqual([0, 1, 2, 3]);
      expect(() => acc.add({ tensors: up([1, 1, 1], [1, 1]), weight: 0, release: () => released.push(99) })).toThrow(/weight must be/);
      add(4);
      expect(released).toEqual([0, 1, 2, 3]);
      expectMean(acc.mean(), ALL); // folds update 4 first, then releases it
      expect(released).toEqual([0, 1, 2, 3, 4]);
      acc.flush();
      expectMean(acc.mean(), ALL);
      expect(released).toEqual([0, 1, 2, 3, 4]);
    });

    it('float64 tensors are folded at once, float32 ones queued: the same mean', () => {
      const acc = new MeanAggregator(like(), { batch: 4 });
      U.forEach(([w, a, b], k) => acc.add({ tensors: up(a, b, k % 2 === 1), weight: w }));
      expectMean(acc.mean(), ALL);
    });

    it('a tensor longer than a fold block (4096), several groups of four and a remainder: the closed form', () => {
      // Update k (k = 0..5, weight k + 1) holds d_k[j] = (j % 7) + k. With sum_k w_k = 21 and
      // sum_k w_k * k = 0 + 2 + 6 + 12 + 20 + 30 = 70, mean[j] = (j % 7) + 70 / 21 = (j % 7) + 10 / 3.
      const n = 10_001;
      const shape = [n];
      const mk = (k: number): TensorMap => new Map([['T', { shape, data: Float32Array.from({ length: n }, (_, j) => (j % 7) + k) }]]);
      for (const batch of [6, 4, 3]) {
        const acc = new MeanAggregator(new Map([['T', { shape, data: new Float32Array(n) }]]), { batch });
        for (let k = 0; k < 6; k++) acc.add({ tensors: mk(k), weight: k + 1 });
        const m = acc.mean().get('T')!.data;
        for (const j of [0, 1, 6, 4095, 4096, 4097, 8191, 8192, 9999, 10_000]) expect(m[j]!).toBeCloseTo((j % 7) + 10 / 3, 5);
        let worst = 0;
        for (let j = 0; j < n; j++) worst = Math.max(worst, Math.abs(m[j]! - ((j % 7) + 10 / 3)));
        expect(worst).toBeLessThan(1e-5);
      }
    });

    it('refuses bad updates by name, queueing nothing, and bad batch sizes', () => {
      const acc = new MeanAggregator(like(), { batch: 4 });
      acc.add({ tensors: up(U[0]![1], U[0]![2]), weight: 1 });
      for (const w of [0, -1, Number.NaN, Number.POSITIVE_INFINITY]) {
        expect(() => acc.add({ tensors: up([9, 9, 9], [9, 9]), weight: w })).toThrow(/mean: weight must be a positive finite number/);
      }
      expect(() => acc.add({ tensors: new Map([['A', { shape: [1, 3], data: new Float32Array(3) }]]), weight: 1 })).toThrow(/mean: update lacks tensor B of 2 elements/);
      expect(() => acc.add({ tensors: up([9, 9], [9, 9]), weight: 1 })).toThrow(/mean: update lacks tensor A of 3 elements/);
      expect(acc.count).toBe(1);
      expect(acc.totalWeight).toBe(1);
      acc.add({ tensors: up(U[1]![1], U[1]![2]), weight: 2 });
      expectMean(acc.mean(), FIRST2);
      for (const batch of [0, -1, 1.5, Number.NaN]) expect(() => new MeanAggregator(like(), { batch })).toThrow(/mean: batch must be an integer >= 1/);
      expect(() => new MeanAggregator(like()).mean()).toThrow(/mean: no updates to average/);
    });
  });
}
