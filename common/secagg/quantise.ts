/**
 * Fixed-point encoding of a site's (clipped, weighted) update into Z_2^32 for
 * secure aggregation. Every coordinate is clipped to [-range, range], scaled by
 * S = floor((2^31 - 1) / (maxSummands * range)), rounded stochastically (up with
 * probability equal to the fractional part, so the rounding is unbiased) and
 * stored in two's complement mod 2^32. The rounded integer is also clamped to
 * +-floor(range * S), so that the sum of up to maxSummands encoded values is a
 * signed int32 and can never wrap: decode reads it back as int32 / S.
 * Each rounding moves a value by less than 1 / S, so the decoded sum of
 * `summands` vectors is within summands / S of the exact sum of the clipped
 * values in every coordinate (quantisationBound).
 */
import { randomFillSync } from 'node:crypto';

const INT31 = 2 ** 31 - 1;
const U32 = 2 ** -32;
/** Elements per call to the uniform source (bounds encode's scratch memory). */
export const ENCODE_CHUNK = 1 << 16;

/** Uniform deviates in [0, 1) with 32 random bits each, from the OS CSPRNG. */
export function cryptoUniform(n: number): Float64Array {
  const w = new Uint32Array(n);
  randomFillSync(w);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = w[i]! * U32;
  return out;
}

function checkArgs(range: number, maxSummands: number): void {
  if (typeof range !== 'number' || !Number.isFinite(range) || range <= 0) {
    throw new Error(`secure aggregation: range must be a positive finite number, got ${range}`);
  }
  if (!Number.isInteger(maxSummands) || maxSummands < 1) {
    throw new Error(`secure aggregation: maxSummands must be a positive integer, got ${maxSummands}`);
  }
}

/** S: the fixed-point scale, so that maxSummands values of at most range in magnitude sum to at most 2^31 - 1. */
export function fixedPointScale(range: number, maxSummands: number): number {
  checkArgs(range, maxSummands);
  const s = Math.floor(INT31 / (maxSummands * range));
  if (s < 1) {
    throw new Error(
      `secure aggregation: range * maxSummands (${range} * ${maxSummands}) must be below 2^31 - 1 for a 32-bit fixed-point sum; lower privacy.secure_aggregation.range`,
    );
  }
  return s;
}

/**
 * Encode x (clipped to [-range, range]) to Z_2^32. `uniform(n)` must return n
 * deviates in [0, 1); it is called on consecutive chunks of at most ENCODE_CHUNK
 * elements whose lengths add up to x.length (default: the OS CSPRNG).
 */
export function encode(
  x: Float32Array | Float64Array,
  range: number,
  maxSummands: number,
  uniform?: (n: number) => Float64Array,
): Uint32Array {
  const s = fixedPointScale(range, maxSummands);
  const lim = Math.floor(range * s);
  const n = x.length;
  const out = new Uint32Array(n);
  // Default source: 32 random bits per coordinate, compared with the fraction scaled to 2^32.
  const words = uniform ? null : new Uint32Array(Math.min(ENCODE_CHUNK, n));
  for (let start = 0; start < n; start += ENCODE_CHUNK) {
    const len = Math.min(ENCODE_CHUNK, n - start);
    let u: Float64Array | null = null;
    let w: Uint32Array | null = null;
    if (uniform) {
      u = uniform(len);
      if (!(u instanceof Float64Array) || u.length !== len) {
        throw new Error(`secure aggregation: the uniform source returned ${u?.length} values, expected ${len}`);
      }
    } else {
      w = len === words!.length ? words! : words!.subarray(0, len);
      randomFillSync(w);
    }
    for (let j = 0; j < len; j++) {
      const i = start + j;
      const v = x[i]!;
      if (!(v - v === 0)) {
        throw new Error(`secure aggregation: update coordinate ${i} is ${v}; the site's update must be finite before masking`);
      }
      const c = v > range ? range : v < -range ? -range : v;
      const q = c * s;
      const f = Math.floor(q);
      const up = u ? u[j]! < q - f : w![j]! * U32 < q - f;
      let r = up ? f + 1 : f;
      if (r > lim) r = lim;
      else if (r < -lim) r = -lim;
      out[i] = r >>> 0;
    }
  }
  return out;
}

/** Decode a sum (mod 2^32) of at most maxSummands encoded vectors: signed int32 / S, in float64. */
export function decode(sum: Uint32Array, range: number, maxSummands: number): Float64Array {
  const s = fixedPointScale(range, maxSummands);
  const out = new Float64Array(sum.length);
  for (let i = 0; i < sum.length; i++) out[i] = (sum[i]! | 0) / s;
  return out;
}

/** Largest |decoded sum - exact sum of the clipped values| per coordinate, for `summands` vectors: summands / S. */
export function quantisationBound(range: number, maxSummands: number, summands: number): number {
  const s = fixedPointScale(range, maxSummands);
  if (!Number.isInteger(summands) || summands < 0 || summands > maxSummands) {
    throw new Error(`secure aggregation: summands must be an integer in [0, ${maxSummands}], got ${summands}`);
  }
  return summands / s;
}
