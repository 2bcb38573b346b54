/**
 * FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep
 * Networks from Decentralized Data"):
 *
 *   w_global = sum_k n_k * w_k / sum_k n_k
 *
 * over every tensor independently (LoRA A and B are averaged separately, never
 * their product). MeanAggregator folds the updates into one float64 running
 * sum, a few at a time (see MeanAggregator), so memory is O(adapter size)
 * whatever the number of workers. FedProx, FFA-LoRA and the server optimizers
 * reuse it.
 */
import { z } from 'zod';
import { numel, type TensorMap } from '../../common/tensor.ts';
import { BaseStrategy, type Aggregator, type FitUpdate, type GlobalAdapter, type StrategyDefinition } from './strategy.ts';

// The fold is sum[j] += w * d[j] per update. One pass per update moves 20 bytes
// per element (float32 read, float64 sum read and written) against 8 for a copy,
// and is slow in V8: about 1 GB/s of update bytes in bench (a). Folding up to four
// queued updates in one loop reads and writes each sum element once for all four
// (4 + 16/4 bytes per update element). One function per arity keeps each
// monomorphic (float32 sources only), and every array is indexed by the same j
// (views that start at the tensor, no offset add per element).
function fold1(s: Float64Array, from: number, to: number, a: Float32Array, wa: number): void {
  for (let j = from; j < to; j++) s[j] = s[j]! + wa * a[j]!;
}
function fold2(s: Float64Array, from: number, to: number, a: Float32Array, wa: number, b: Float32Array, wb: number): void {
  for (let j = from; j < to; j++) s[j] = s[j]! + (wa * a[j]! + wb * b[j]!);
}
function fold3(s: Float64Array, from: number, to: number, a: Float32Array, wa: number, b: Float32Array, wb: number, c: Float32Array, wc: number): void {
  for (let j = from; j < to; j++) s[j] = s[j]! + (wa * a[j]! + wb * b[j]! + wc * c[j]!);
}
function fold4(s: Float64Array, from: number, to: number, a: Float32Array, wa: number, b: Float32Array, wb: number, c: Float32Array, wc: number, d: Float32Array, wd: number): void {
  for (let j = from; j < to; j++) s[j] = s[j]! + (wa * a[j]! + wb * b[j]! + wc * c[j]! + wd * d[j]!);
}
// An update with a float64 tensor is folded on its own at once (off the hot path).
function foldAny(s: Float64Array, d: Float32Array | Float64Array, w: number): void {
  for (let j = 0; j < d.length; j++) s[j] = s[j]! + w * d[j]!;
}

/**
 * Sum elements per block when more than four updates are folded together: the
 * sum block (32 KiB of float64) stays in L1 while every group of four passes
 * over it, so the sum crosses memory once per flush, not once per group.
 */
const BLOCK = 4096;

export interface MeanAggregatorOptions {
  /**
   * How many float32 updates are queued before they are folded in one pass
   * (default 4; 1 folds each update as it arrives). Between calls the
   * aggregator holds at most batch - 1 updates (their tensors, not copies):
   * memory is the float64 sum plus up to batch - 1 updates.
   */
  batch?: number;
}

/**
 * Streaming weighted mean of tensor maps with the same names and shapes, in a
 * float64 sum. add() checks an update and queues it; once `batch` updates are
 * queued, or when mean() or flush() is called, the queue is folded into the sum
 * in one cache-blocked pass. The mean is the float64 weighted mean up to the
 * order of the additions.
 *
 * Memory: the float64 sum (8 bytes per parameter) plus at most batch - 1 queued
 * updates (4 bytes per parameter each; default batch 4: 3 updates, 201 MB for a
 * 16.8M-parameter adapter besides its 134 MB sum).
 *
 * bench (a), 16.8M parameters, 4 distinct 67 MB updates, 2-core VM, same run:
 * one pass per update (batch 1, the old fold) 0.9-1.3 GB/s of update bytes,
 * 0.13-0.17x TypedArray.set; batch 4 4.4-5.3 GB/s against TypedArray.set
 * 6.8-7.7 GB/s, 0.65-0.72x (load average 3-8). That excludes the constructor
 * (allocating and touching the 134 MB sum, about 60 ms, once per round attempt,
 * before uploads arrive); with it timed too, 2.5 GB/s.
 */
export class MeanAggregator implements Aggregator {
  readonly kind = 'streaming';
  private readonly names: string[];
  private readonly shapes: number[][];
  /** Start of each tensor in `sum`; offsets[names.length] is its length. */
  private readonly offsets: number[];
  private readonly sum: Float64Array;
  private readonly batch: number;
  /** Checked float32 updates not yet in `sum`: their tensors in `names` order. */
  private pending: Array<{ parts: Float32Array[]; weight: number; release: (() => void) | undefined }> = [];
  private weight = 0;
  private n = 0;

  constructor(like: TensorMap, opts: MeanAggregatorOptions = {}) {
    const batch = opts.batch ?? 4;
    if (!Number.isInteger(batch) || batch < 1) throw new Error(`mean: batch must be an integer >= 1 (got ${batch})`);
    this.batch = batch;
    this.names = [...like.keys()];
    this.shapes = [...like.values()].map((t) => [...t.shape]);
    this.offsets = [0];
    for (const sh of this.shapes) this.offsets.push(this.offsets[this.offsets.length - 1]! + numel(sh));
    this.sum = new Float64Array(this.offsets[this.offsets.length - 1]!);
    // Touch every page of the sum now, at round start, so the first fold does not
    // take the page faults of a fresh allocation (0.4 ms per MB of sum on the
    // bench VM, more than the fold itself) while uploads are arriving.
    this.sum.fill(0);
  }

  /** Updates added (queued ones included). */
  get count(): number {
    return this.n;
  }
  /** Sum of the weights added (queued ones included). */
  get totalWeight(): number {
    return this.weight;
  }

  /**
   * Checks the update and queues it (folding the queue when it is full). The
   * aggregator keeps references to `u.tensors`' arrays, not copies, until the
   * next fold (at most `batch` - 1 further add()s, or mean()/flush()): callers
   * must not change or reuse those arrays after add() returns. To reuse them
   * (an upload buffer pool), pass `u.release`: it is called once, right after
   * the fold that read them (inside add() when that fills the batch or the update
   * has a float64 tensor, else in a later add(), flush() or mean()); never when
   * add() throws, nor for an aggregator dropped with updates still queued.
   * Throws, adding nothing, when the weight is not a positive finite number or a
   * tensor is missing or has the wrong number of elements. add() after mean() is
   * allowed: the next mean() includes it.
   */
  add(u: Pick<FitUpdate, 'tensors' | 'weight'> & { release?: () => void }): void {
    const w = u.weight;
    if (!(w > 0) || !Number.isFinite(w)) throw new Error(`mean: weight must be a positive finite number (got ${w})`);
    const parts: Array<Float32Array | Float64Array> = [];
    let allF32 = true;
    for (const [i, name] of this.names.entries()) {
      const t = u.tensors.get(name);
      const n = this.offsets[i + 1]! - this.offsets[i]!;
      if (!t || t.data.length !== n) throw new Error(`mean: update lacks tensor ${name} of ${n} elements`);
      parts.push(t.data);
      if (!(t.data instanceof Float32Array)) allF32 = false;
    }
    this.weight += w;
    this.n++;
    if (allF32) {
      this.pending.push({ parts: parts as Float32Array[], weight: w, release: u.release });
      if (this.pending.length >= this.batch) this.flush();
    } else {
      for (const [i, d] of parts.entries()) foldAny(this.sum.subarray(this.offsets[i]!, this.offsets[i + 1]!), d, w);
      u.release?.();
    }
  }

  /** Folds the queued updates into the sum now, calls their `release` and drops them (mean() does this itself). */
  flush(): void {
    const q = this.pending;
    if (q.length === 0) return;
    this.pending = [];
    for (let i = 0; i < this.names.length; i++) {
      // A view per tensor, as the sources are: one index j addresses both.
      const s = this.sum.subarray(this.offsets[i]!, this.offsets[i + 1]!);
      for (let from = 0; from < s.length; from += BLOCK) {
        const to = Math.min(s.length, from + BLOCK);
        for (let k = 0; k < q.length; k += 4) {
          const a = q[k]!;
          const b = q[k + 1];
          const c = q[k + 2];
          const d = q[k + 3];
          if (d) fold4(s, from, to, a.parts[i]!, a.weight, b!.parts[i]!, b!.weight, c!.parts[i]!, c!.weight, d.parts[i]!, d.weight);
          else if (c) fold3(s, from, to, a.parts[i]!, a.weight, b!.parts[i]!, b!.weight, c.parts[i]!, c.weight);
          else if (b) fold2(s, from, to, a.parts[i]!, a.weight, b.parts[i]!, b.weight);
          else fold1(s, from, to, a.parts[i]!, a.weight);
        }
      }
    }
    for (const u of q) u.release?.();
  }

  /**
   * The weighted mean as float32 tensors, views of one buffer in the order of the tensors given to
   * the constructor (so the coordinator packs it for the wire without copying). Throws when nothing
   * was added.
   */
  mean(): TensorMap {
    if (this.n === 0) throw new Error('mean: no updates to average');
    this.flush();
    const out: TensorMap = new Map();
    const inv = 1 / this.weight;
    const all = new Float32Array(this.sum.length);
    for (let j = 0; j < all.length; j++) all[j] = this.sum[j]! * inv;
    for (const [i, name] of this.names.entries()) {
      out.set(name, { shape: [...this.shapes[i]!], data: all.subarray(this.offsets[i]!, this.offsets[i + 1]!) });
    }
    return out;
  }
}

export function meanOf(aggregator: Aggregator, who: string): TensorMap {
  if (!(aggregator instanceof MeanAggregator)) throw new Error(`${who}: expects the aggregator it created (a MeanAggregator)`);
  return aggregator.mean();
}

export class FedAvg extends BaseStrategy {
  readonly name: string = 'fedavg';
  readonly description: string = 'fedavg';

  aggregator(global: GlobalAdapter): Aggregator {
    return new MeanAggregator(global.tensors);
  }

  aggregateFit(_round: number, global: GlobalAdapter, aggregator: Aggregator): GlobalAdapter {
    return { tensors: meanOf(aggregator, this.name), rank: global.rank };
  }
}

export const fedavg: StrategyDefinition = {
  name: 'fedavg',
  summary: 'example-weighted mean of the sites\' adapters',
  params: z.strictObject({}),
  create: (_p, ctx) => new FedAvg(ctx),
};
