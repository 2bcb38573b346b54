/**
 * FedAvg as a streaming accumulator (McMahan et al. 2017):
 *
 *   w_global = sum_k n_k * w_k / sum_k n_k
 *
 * over every tensor independently (LoRA A and B are averaged separately, never
 * their product). Each update is folded into one float64 running sum as it
 * arrives and then dropped, so memory is O(adapter size) whatever the number of
 * workers.
 */
import { manifestBytes, type TensorSpecEntry } from '../../common/chunks.ts';
import { numel, type TensorMap } from '../../common/tensor.ts';

export class FedAvgAccumulator {
  readonly manifest: readonly TensorSpecEntry[];
  private readonly sum: Float64Array;
  private weight = 0;
  private n = 0;

  constructor(manifest: readonly TensorSpecEntry[]) {
    this.manifest = manifest.map((e) => ({ ...e, shape: [...e.shape] }));
    this.sum = new Float64Array(manifestBytes(manifest) / 4);
  }

  /** Updates folded in so far. */
  get count(): number {
    return this.n;
  }
  get totalWeight(): number {
    return this.weight;
  }

  /**
   * Fold one update given as the flat float32 concatenation of its tensors in
   * manifest order (exactly what arrives on the wire). The caller has validated it.
   */
  addFlat(values: Float32Array, weight: number): void {
    if (values.length !== this.sum.length) {
      throw new Error(`FedAvg: update has ${values.length} elements, the adapter has ${this.sum.length}`);
    }
    if (!(weight > 0) || !Number.isFinite(weight)) throw new Error(`FedAvg: weight must be a positive number (got ${weight})`);
    const s = this.sum;
    for (let i = 0; i < s.length; i++) s[i]! += weight * values[i]!;
    this.weight += weight;
    this.n++;
  }

  /** Fold one update given as a tensor map with the manifest's names and shapes. */
  add(update: TensorMap, weight: number): void {
    const flat = new Float32Array(this.sum.length);
    let off = 0;
    for (const e of this.manifest) {
      const t = update.get(e.name);
      if (!t) throw new Error(`FedAvg: update lacks tensor ${e.name}`);
      flat.set(t.data, off);
      off += numel(e.shape);
    }
    this.addFlat(flat, weight);
  }

  /** The weighted mean as float32 tensors. Throws when nothing was added. */
  mean(): TensorMap {
    if (this.n === 0) throw new Error('FedAvg: no updates to average');
    const out: TensorMap = new Map();
    const inv = 1 / this.weight;
    let off = 0;
    for (const e of this.manifest) {
      const n = numel(e.shape);
      const data = new Float32Array(n);
      for (let i = 0; i < n; i++) data[i] = this.sum[off + i]! * inv;
      out.set(e.name, { shape: [...e.shape], data });
      off += n;
    }
    return out;
  }
}
