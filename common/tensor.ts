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
