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
import { Float64Sum, takeAdapterBuffer, type SumKernel } from './math/sum.ts';
import { BaseStrategy, type Aggregator, type FitUpdate, type GlobalAdapter, type StrategyDefinition } from './strategy.ts';

export interface MeanAggregatorOptions {
  /**
   * How many float32 updates are queued before they are folded in one pass
   * (default 4; 1 folds each update as it arrives). Between calls the
   * aggregator holds at most batch - 1 updates (their tensors, not copies):
   * memory is the float64 sum plus up to batch - 1 updates.
   */
  batch?: number;
  /** The fold's kernel (default: WebAssembly SIMD where available, see math/sum.ts); both give the same bits. */
  kernel?: SumKernel;
}

/**
 * Streaming weighted mean of tensor maps with the same names and shapes, in a
 * float64 sum. add() checks an update and queues it; once `batch` updates are
 * queued, or when mean() or flush() is called, the queue is folded into the sum
 * in one cache-blocked pass (Float64Sum, math/sum.ts). The mean is the float64
 * weighted mean up to the order of the additions.
 *
 * Memory: the float64 sum (8 bytes per parameter) plus at most batch - 1 queued
 * updates (4 bytes per parameter each; default batch 4: 3 updates, 201 MB for a
 * 16.8M-parameter adapter besides its 134 MB sum).
 *
 * Batch 4 reads and writes each sum element once per four updates (4 + 16/4
 * bytes per update element, against 20 folding one update per pass); bench (a)
 * numbers are in math/sum.ts.
 */
export class MeanAggregator implements Aggregator {
  readonly kind = 'streaming';
  private readonly names: string[];
  private readonly shapes: number[][];
  /** Start of each tensor in `sum`; offsets[names.length] is its length. */
  private readonly offsets: number[];
  private readonly sum: Float64Sum;
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
    this.sum = new Float64Sum(this.offsets[this.offsets.length - 1]!, opts.kernel ? { kernel: opts.kernel } : {});
  }

  /** The fold's kernel. */
  get kernel(): SumKernel {
    return this.sum.kernel;
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
   * add() throws; dispose() calls it for updates still queued.
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
      for (const [i, d] of parts.entries()) {
        if (d instanceof Float64Array) this.sum.foldFloat64(this.offsets[i]!, d, w);
        else this.sum.fold(this.offsets[i]!, [d], [w]);
      }
      u.release?.();
    }
  }

  /** Folds the queued updates into the sum now, calls their `release` and drops them (mean() does this itself). */
  flush(): void {
    const q = this.pending;
    if (q.length === 0) return;
    this.pending = [];
    const weights = q.map((u) => u.weight);
    for (let i = 0; i < this.names.length; i++) this.sum.fold(this.offsets[i]!, q.map((u) => u.parts[i]!), weights);
    for (const u of q) u.release?.();
  }

  /**
   * Gives the sum's memory back for the next aggregator (math/sum.ts), and the buffers of updates
   * still queued (a retried attempt's) to their pool; the aggregator is unusable afterwards.
   */
  dispose(): void {
    const q = this.pending;
    this.pending = [];
    for (const u of q) u.release?.();
    this.sum.dispose();
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
    const all = takeAdapterBuffer(this.sum.length);
    this.sum.scaleTo(0, all, inv);
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
