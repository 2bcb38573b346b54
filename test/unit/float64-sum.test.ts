// Float64Sum (coordinator/strategies/math/sum.ts): the WebAssembly SIMD kernels and the JavaScript
// fallback against a scalar reference written here from the definition
//   sum[offset + j] = sum[offset + j] + (w_1*x_1[j] + ... + w_k*x_k[j])   (float64, left to right,
//                                                                          four sources per pass)
//   out[j] = fround(sum[offset + j] * factor)
// Both kernels must give exactly the reference's bits.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { absMax, defaultKernel, Float64Sum, squaredDistance, UploadBufferPool, type SumKernel } from '../../coordinator/strategies/math/sum.ts';
import { createRng } from '../../common/random.ts';
import { firstNonFinite } from '../../common/tensor.ts';

const uniform = (seed: number): (() => number) => createRng(seed).next;

const root = join(import.meta.dirname, '..', '..');

/** The reference: the groups of four and their order as documented, one element at a time. */
function reference(sum: Float64Array, offset: number, sources: Float32Array[], weights: number[]): void {
  for (let k = 0; k < sources.length; k += 4) {
    for (let j = 0; j < sources[0]!.length; j++) {
      let t = weights[k]! * sources[k]![j]!;
      for (let i = k + 1; i < Math.min(k + 4, sources.length); i++) t = t + weights[i]! * sources[i]![j]!;
      sum[offset + j] = sum[offset + j]! + t;
    }
  }
}

function randomF32(n: number, rand: () => number, scale = 1): Float32Array {
  return Float32Array.from({ length: n }, () => (rand() * 2 - 1) * scale);
}

/** Bit patterns of two float64 arrays are equal (NaN payloads aside: any NaN matches any NaN). */
function expectSameBits(got: Float64Array | Float32Array, want: Float64Array | Float32Array): void {
  expect(got.length).toBe(want.length);
  for (let j = 0; j < got.length; j++) {
    if (Number.isNaN(want[j]!)) expect(got[j], `element ${j}`).toBeNaN();
    else if (!Object.is(got[j], want[j])) expect.fail(`element ${j}: got ${got[j]}, want ${want[j]}`);
  }
}

describe('Float64Sum', () => {
  it('this Node has WebAssembly SIMD: the default kernel is wasm', () => {
    expect(defaultKernel(1000)).toBe('wasm');
    expect(new Float64Sum(1000).kernel).toBe('wasm');
    // Beyond the kernels' 2 GiB memory the JavaScript loop is used (nothing allocated to decide).
    expect(defaultKernel(2 ** 28)).toBe('js');
    expect(() => new Float64Sum(2 ** 28, { kernel: 'wasm' })).toThrow(/do not fit the wasm kernel's 2 GiB memory .*; use the js kernel/);
  });

  for (const kernel of ['wasm', 'js'] as SumKernel[]) {
    it(`${kernel}: 1 to 9 sources, lengths around the SIMD width and the 4096-element block, at an offset: the reference's bits`, () => {
      const rand = uniform(7);
      for (const n of [0, 1, 3, 4, 5, 7, 4095, 4096, 4097, 10_003]) {
        for (const k of [1, 2, 3, 4, 5, 8, 9]) {
          const offset = 5;
          const total = offset + n + 3;
          const s = new Float64Sum(total, { kernel });
          const want = new Float64Array(total);
          // A non-zero start, as after earlier folds.
          const start = [randomF32(n, rand, 10)];
          s.fold(offset, start, [0.3]);
          reference(want, offset, start, [0.3]);
          const sources = Array.from({ length: k }, (_, i) => randomF32(n, rand, 10 ** (i % 3)));
          const weights = Array.from({ length: k }, (_, i) => (i % 2 === 0 ? 1 : -1) * (0.1 + rand() * 1e3));
          s.fold(offset, sources, weights);
          reference(want, offset, sources, weights);
          expectSameBits(s.values, want);
        }
      }
    });

    it(`${kernel}: special values fold as IEEE float64 does (infinities, NaN, signed zero, float32 extremes)`, () => {
      const x = Float32Array.from([Infinity, -Infinity, NaN, -0, 0, 3.4028234663852886e38, 1.401298464324817e-45, -1.1754943508222875e-38, 1]);
      const y = Float32Array.from([1, 1, 1, -0, -0, 3.4028234663852886e38, 1.401298464324817e-45, 2, -Infinity]);
      const s = new Float64Sum(x.length, { kernel });
      const want = new Float64Array(x.length);
      s.fold(0, [x, y], [2, 1e300]);
      reference(want, 0, [x, y], [2, 1e300]);
      expectSameBits(s.values, want);
      expect(s.values[2]).toBeNaN();
      expect(s.values[8]).toBe(-Infinity);
    });

    it(`${kernel}: scaleTo rounds each float64 to the nearest float32 (fround), at an offset, beyond the block`, () => {
      const rand = uniform(11);
      const n = 9_001;
      const s = new Float64Sum(n + 2, { kernel });
      // Values with bits below float32 precision, halfway cases, overflow, underflow.
      const vals = new Float64Array(n + 2);
      for (let j = 0; j < vals.length; j++) vals[j] = (rand() * 2 - 1) * 10 ** ((j % 13) - 6);
      vals[2] = 1 + 2 ** -24; // halfway between 1 and the next float32: rounds to even (1)
      vals[3] = 1 + 3 * 2 ** -24; // halfway: rounds up to 1 + 2^-22
      vals[4] = 1e39; // beyond float32: Infinity
      vals[5] = 1e-50; // below float32's smallest subnormal: 0
      // Float32 sources cannot carry these values into the sum: set it directly.
      s.values.set(vals);
      const out = new Float32Array(n);
      s.scaleTo(2, out, 1);
      const want = Float32Array.from({ length: n }, (_, j) => Math.fround(vals[2 + j]!));
      expectSameBits(out, want);
      expect(out[0]).toBe(1);
      expect(out[1]).toBe(1 + 2 ** -22);
      expect(out[2]).toBe(Infinity);
      expect(out[3]).toBe(0);
      const scaled = new Float32Array(n);
      s.scaleTo(1, scaled, 1 / 3);
      expectSameBits(scaled, Float32Array.from({ length: n }, (_, j) => vals[1 + j]! * (1 / 3)));
    });

    it(`${kernel}: float64 sources and bad arguments`, () => {
      const s = new Float64Sum(6, { kernel });
      s.foldFloat64(1, Float64Array.from([1e-300, 2, 3]), 0.5);
      expectSameBits(s.values, Float64Array.from([0, 0.5e-300, 1, 1.5, 0, 0]));
      expect(() => s.fold(4, [new Float32Array(3)], [1])).toThrow(/elements 4\.\.7 are outside the sum of 6/);
      expect(() => s.fold(0, [new Float32Array(3), new Float32Array(2)], [1, 1])).toThrow(/one length and one weight each/);
      expect(() => s.fold(0, [new Float32Array(3)], [])).toThrow(/one length and one weight each/);
      expect(() => s.foldFloat64(5, new Float64Array(2), 1)).toThrow(/outside the sum of 6/);
      expect(() => s.scaleTo(-1, new Float32Array(2), 1)).toThrow(/outside the sum of 6/);
      expect(() => new Float64Sum(-1, { kernel })).toThrow(/length must be a non-negative integer/);
      s.fold(0, [], []);
      expect(s.values[1]).toBe(0.5e-300);
    });
  }

  for (const kernel of ['wasm', 'js'] as SumKernel[]) {
    it(`${kernel}: after dispose() the sum refuses use; the next sum of that size (which may reuse its memory) starts at zero`, () => {
      const a = new Float64Sum(5000, { kernel });
      a.fold(0, [new Float32Array(5000).fill(2)], [3]);
      expect(a.values[4999]).toBe(6);
      a.dispose();
      a.dispose(); // twice is harmless
      expect(() => a.values).toThrow(/used after dispose/);
      expect(() => a.fold(0, [new Float32Array(1)], [1])).toThrow(/used after dispose/);
      expect(() => a.scaleTo(0, new Float32Array(1), 1)).toThrow(/used after dispose/);
      for (let i = 0; i < 3; i++) {
        const b = new Float64Sum(5000, { kernel });
        expect(b.values.every((v) => v === 0)).toBe(true);
        b.fold(0, [new Float32Array(5000).fill(1)], [1]);
        expect(b.values[0]).toBe(1);
        b.dispose();
      }
    });
  }

  it('the wasm and js kernels agree bit for bit on a large random fold', () => {
    const rand = uniform(3);
    const n = 70_001;
    const a = new Float64Sum(n, { kernel: 'wasm' });
    const b = new Float64Sum(n, { kernel: 'js' });
    for (let round = 0; round < 3; round++) {
      const sources = Array.from({ length: 6 }, () => randomF32(n, rand, 1e-3));
      const weights = Array.from({ length: 6 }, () => 1 + Math.floor(rand() * 5000));
      a.fold(0, sources, weights);
      b.fold(0, sources, weights);
    }
    expectSameBits(a.values, b.values);
  });

  it('coordinator/strategies/math/sum-kernels.ts is what `npm run wasm` generates (regenerate and commit if this fails)', () => {
    const out = mkdtempSync(join(tmpdir(), 'fedtune-wasm-'));
    try {
      execFileSync(process.execPath, [join(root, 'bin', 'run-ts.js'), join(root, 'scripts', 'gen-wasm.ts'), out], { cwd: root, stdio: 'pipe' });
      const file = join('coordinator', 'strategies', 'math', 'sum-kernels.ts');
      expect(readFileSync(join(root, file), 'utf8'), `${file} is stale`).toBe(readFileSync(join(out, file), 'utf8'));
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });
});

describe('squaredDistance (the defences\' screen of an update)', () => {
  it('sum of squared differences and the largest |value|, by hand, for every length modulo 4', () => {
    // a - b = [3, -4, 1, 2, -2, 1, 0]: squares 9 + 16 + 1 + 4 + 4 + 1 + 0 = 35 for all seven;
    // the first n elements give 9, 25, 26, 30, 34, 35, 35. |a| = [4, 3, 1, 2.5, 6, 1, -0]: max 4 up to n = 4, then 6.
    const a = Float32Array.from([4, -3, 1, 2.5, -6, 1, -0]);
    const b = Float32Array.from([1, 1, 0, 0.5, -4, 0, 0]);
    const sq = [0, 9, 25, 26, 30, 34, 35, 35];
    const max = [0, 4, 4, 4, 4, 6, 6, 6];
    for (let n = 0; n <= 7; n++) {
      expect(squaredDistance(a.subarray(0, n), b.subarray(0, n), false)).toEqual({ sq: sq[n], maxSeen: 0 });
      expect(squaredDistance(a.subarray(0, n), b.subarray(0, n), true)).toEqual({ sq: sq[n], maxSeen: max[n] });
    }
  });

  it('a NaN or infinity anywhere (in the unrolled part or the tail) makes the sum non-finite', () => {
    for (const bad of [NaN, Infinity, -Infinity]) {
      for (const at of [0, 3, 5, 8]) {
        const a = new Float32Array(9).fill(1);
        a[at] = bad;
        const r = squaredDistance(a, new Float32Array(9), true);
        expect(Number.isFinite(r.sq), `${bad} at ${at}`).toBe(false);
        expect(Number.isFinite(r.maxSeen) && r.maxSeen <= 1, `${bad} at ${at}`).toBe(false);
      }
    }
  });
});


describe('absMax (the screen without a norm defence)', () => {
  it('the largest |value| for every length modulo 4; NaN or infinity wherever one is', () => {
    const a = Float32Array.from([4, -3, 1, 2.5, -6, 1, -0]);
    const max = [0, 4, 4, 4, 4, 6, 6, 6];
    for (let n = 0; n <= 7; n++) expect(absMax(a.subarray(0, n))).toBe(max[n]);
    for (const at of [0, 3, 5, 8]) {
      const b = new Float32Array(9).fill(1);
      b[at] = NaN;
      expect(absMax(b), `NaN at ${at}`).toBeNaN();
      b[at] = -Infinity;
      expect(absMax(b), `-Infinity at ${at}`).toBe(Infinity);
    }
  });
});

describe('firstNonFinite', () => {
  it('the first NaN or infinity, wherever it is (unrolled part or tail), or -1; large finite values are finite', () => {
    for (const n of [0, 1, 4, 7, 9]) {
      expect(firstNonFinite(new Float32Array(n).fill(3.4e38))).toBe(-1);
      expect(firstNonFinite(new Float64Array(n).fill(-1.7e308))).toBe(-1);
    }
    for (const bad of [NaN, Infinity, -Infinity]) {
      for (const at of [0, 3, 4, 6, 8]) {
        for (const data of [new Float32Array(9).fill(-0), new Float64Array(9).fill(1e300)]) {
          data[at] = bad;
          if (at < 8) data[8] = bad; // a later one too: the first is reported
          expect(firstNonFinite(data), `${bad} at ${at}`).toBe(at);
        }
      }
    }
  });
});

describe('upload buffers in the kernels\' memory (UploadBufferPool, the arena)', () => {
  // A length no other test uses, so this file's arena is its own.
  const N = 12_347;

  it('whole-adapter float32 uploads get distinct slots of one memory, given back and taken again; beyond the slots, ordinary buffers', () => {
    const pool = new UploadBufferPool(3);
    const a = pool.take(N * 4);
    const b = pool.take(N * 4);
    const c = pool.take(N * 4);
    expect(a.buffer).toBe(b.buffer);
    expect(c.buffer).toBe(a.buffer);
    const at = [a, b, c].map((x) => x.byteOffset).sort((x, y) => x - y);
    expect(at[1]! - at[0]!).toBeGreaterThanOrEqual(N * 4); // no overlap
    expect(at[2]! - at[1]!).toBeGreaterThanOrEqual(N * 4);
    const d = pool.take(N * 4); // the three slots are out
    expect(d.buffer).not.toBe(a.buffer);
    expect(d.buffer.byteLength).toBe(N * 4);
    expect(pool.take(N * 4 + 2).buffer.byteLength).toBe(N * 4 + 2); // not a float32 adapter's size
    pool.give(b);
    pool.give(b); // twice: the slot is free once
    const e = pool.take(N * 4);
    expect(e.buffer).toBe(a.buffer);
    expect(e.byteOffset).toBe(b.byteOffset);
    expect(pool.take(N * 4).buffer).not.toBe(a.buffer);
    for (const x of [a, c, e]) pool.give(x);
  });

  it('a sum of the arena\'s size lives in it and folds slots where they lie, other sources through scratch: the reference\'s bits', () => {
    const pool = new UploadBufferPool(4);
    const rand = uniform(11);
    const slots = [pool.take(N * 4), pool.take(N * 4)];
    const s = new Float64Sum(N);
    expect(s.values.buffer).toBe(slots[0]!.buffer);
    const other = new Float64Sum(N); // the arena's sum is taken: this one has its own memory
    expect(other.values.buffer).not.toBe(slots[0]!.buffer);
    const want = new Float64Array(N);
    for (let round = 0; round < 2; round++) {
      const sources = [
        new Float32Array(slots[0]!.buffer, slots[0]!.byteOffset, N),
        randomF32(N, rand, 10),
        new Float32Array(slots[1]!.buffer, slots[1]!.byteOffset, N),
        randomF32(N, rand, 0.1),
        new Float32Array(slots[0]!.buffer, slots[0]!.byteOffset, N).subarray(0, N), // the same slot twice
      ];
      sources[0]!.set(randomF32(N, rand, 100));
      sources[2]!.set(randomF32(N, rand, 1e-3));
      const weights = [3, -0.5, 1e3, 7, 0.25];
      s.fold(0, sources, weights);
      other.fold(0, sources, weights);
      reference(want, 0, sources, weights);
      expectSameBits(s.values, want);
      expectSameBits(other.values, want);
    }
    const out = new Float32Array(N);
    s.scaleTo(0, out, 1 / 3);
    expectSameBits(out, Float32Array.from(want, (v) => v * (1 / 3)));
    s.dispose();
    other.dispose();
    const again = new Float64Sum(N); // the arena's sum is free again, zeroed
    expect(again.values.buffer).toBe(slots[0]!.buffer);
    expect(again.values.every((v) => v === 0)).toBe(true);
    again.dispose();
    for (const x of slots) pool.give(x);
  });

  it('absMax over a slot (the WebAssembly kernel) is the JavaScript loop\'s answer for every length modulo 16, NaN, infinities, -0 and subnormals included', () => {
    const pool = new UploadBufferPool(2);
    const slot = pool.take(N * 4);
    const inSlot = new Float32Array(slot.buffer, slot.byteOffset, N);
    const rand = uniform(5);
    for (let n = 0; n <= 37; n++) {
      const v = randomF32(n, rand, 50);
      if (n % 3 === 1) v.fill(-0);
      if (n % 5 === 2) v.fill(-1e-45); // the smallest subnormal: bits 0x80000001
      if (n % 7 === 3) v[n - 1] = -3.4e38;
      inSlot.set(v);
      // The reference: a plain loop here.
      let m = 0;
      for (const x of v) m = Math.max(m, Math.abs(x));
      expect(absMax(inSlot.subarray(0, n)), `n = ${n}`).toBe(m);
      expect(absMax(v), `n = ${n}, outside`).toBe(m);
      for (let at = 0; at < n; at++) {
        inSlot[at] = NaN;
        expect(absMax(inSlot.subarray(0, n)), `NaN at ${at} of ${n}`).toBeNaN();
        inSlot[at] = -Infinity;
        expect(absMax(inSlot.subarray(0, n)), `-Infinity at ${at} of ${n}`).toBe(Infinity);
        inSlot[at] = v[at]!;
      }
    }
    pool.give(slot);
  });
});
