/**
 * Gaussian noise and L2 clipping for differential privacy, shared by the
 * coordinator (central DP-FedAvg), the sites (distributed noise, DP-SGD) and
 * the tests. Uniform bits come from the operating system's CSPRNG
 * (crypto.randomFillSync); normals from the Box-Muller transform in float64.
 * Floating-point sampling is not the discrete Gaussian of Canonne et al. 2020;
 * docs/privacy.md names this limit.
 */
import { randomFillSync } from 'node:crypto';

const TWO_PI = 2 * Math.PI;
const U53 = 2 ** -53;

/** A source of standard normal deviates. The default draws from the OS CSPRNG; tests may pass a seeded one. */
export type NormalSource = (out: Float64Array) => void;

export const cryptoNormals: NormalSource = (out) => {
  const n = out.length;
  const words = new Uint32Array(2 * (n + (n & 1)));
  randomFillSync(words);
  for (let i = 0, w = 0; i < n; i += 2, w += 4) {
    // Two uniforms in (0, 1] from 53 random bits each.
    const u1 = ((words[w]! >>> 5) * 67108864 + (words[w + 1]! >>> 6) + 1) * U53;
    const u2 = ((words[w + 2]! >>> 5) * 67108864 + (words[w + 3]! >>> 6)) * U53;
    const r = Math.sqrt(-2 * Math.log(u1));
    out[i] = r * Math.cos(TWO_PI * u2);
    if (i + 1 < n) out[i + 1] = r * Math.sin(TWO_PI * u2);
  }
};

/** Add N(0, std^2) to every value of `v` in place. */
export function addGaussianNoise(v: Float32Array | Float64Array, std: number, normals: NormalSource = cryptoNormals): void {
  if (!(std >= 0) || !Number.isFinite(std)) throw new Error(`noise std must be a finite number >= 0 (got ${std})`);
  if (std === 0 || v.length === 0) return;
  const block = 1 << 16;
  const z = new Float64Array(Math.min(block, v.length));
  for (let off = 0; off < v.length; off += block) {
    const len = Math.min(block, v.length - off);
    const zz = len === z.length ? z : z.subarray(0, len);
    normals(zz);
    for (let i = 0; i < len; i++) v[off + i] = v[off + i]! + std * zz[i]!;
  }
}

/** L2 norm over several arrays taken as one vector (float64 accumulation). */
export function l2Norm(parts: ReadonlyArray<ArrayLike<number>>): number {
  let s = 0;
  for (const p of parts) for (let i = 0; i < p.length; i++) s += p[i]! * p[i]!;
  return Math.sqrt(s);
}

/**
 * Scale the arrays (one vector) in place so that their joint L2 norm is at most `clip`.
 * Returns the norm before clipping and the factor applied (1 when already within).
 */
export function clipToNorm(parts: ReadonlyArray<Float32Array | Float64Array>, clip: number): { norm: number; factor: number } {
  if (!(clip > 0)) throw new Error(`clip norm must be > 0 (got ${clip})`);
  const norm = l2Norm(parts);
  const factor = norm > clip ? clip / norm : 1;
  if (factor !== 1) for (const p of parts) for (let i = 0; i < p.length; i++) p[i] = p[i]! * factor;
  return { norm, factor };
}
