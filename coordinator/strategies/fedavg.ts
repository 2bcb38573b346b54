/**
 * FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep
 * Networks from Decentralized Data"):
 *
 *   w_global = sum_k n_k * w_k / sum_k n_k
 *
 * over every tensor independently (LoRA A and B are averaged separately, never
 * their product). MeanAggregator folds each update into one float64 running
 * sum as it arrives and drops it, so memory is O(adapter size) whatever the
 * number of workers. FedProx, FFA-LoRA and the server optimizers reuse it.
 */
import { z } from 'zod';
import { numel, type TensorMap } from '../../common/tensor.ts';
import { BaseStrategy, type Aggregator, type FitUpdate, type GlobalAdapter, type StrategyDefinition } from './strategy.ts';

// One loop per source type keeps each monomorphic; indexing a view from 0 avoids
// the offset add per element (0.75 -> about 1 GB/s in bench (a)).
function foldF32(sum: Float64Array, d: Float32Array, w: number): void {
  for (let j = 0; j < d.length; j++) sum[j]! += w * d[j]!;
}
function foldF64(sum: Float64Array, d: Float64Array, w: number): void {
  for (let j = 0; j < d.length; j++) sum[j]! += w * d[j]!;
}

/** Streaming weighted mean of tensor maps with the same names and shapes. */
export class MeanAggregator implements Aggregator {
  readonly kind = 'streaming';
  private readonly names: string[];
  private readonly shapes: number[][];
  private readonly sum: Float64Array;
  private weight = 0;
  private n = 0;

  constructor(like: TensorMap) {
    this.names = [...like.keys()];
    this.shapes = [...like.values()].map((t) => [...t.shape]);
    this.sum = new Float64Array(this.shapes.reduce((s, sh) => s + numel(sh), 0));
  }

  get count(): number {
    return this.n;
  }
  get totalWeight(): number {
    return this.weight;
  }

  add(u: Pick<FitUpdate, 'tensors' | 'weight'>): void {
    const w = u.weight;
    if (!(w > 0) || !Number.isFinite(w)) throw new Error(`mean: weight must be a positive finite number (got ${w})`);
    let off = 0;
    for (const [i, name] of this.names.entries()) {
      const t = u.tensors.get(name);
      const n = numel(this.shapes[i]!);
      if (!t || t.data.length !== n) throw new Error(`mean: update lacks tensor ${name} of ${n} elements`);
      if (t.data instanceof Float32Array) foldF32(this.sum.subarray(off, off + n), t.data, w);
      else foldF64(this.sum.subarray(off, off + n), t.data, w);
      off += n;
    }
    this.weight += w;
    this.n++;
  }

  /** The weighted mean as float32 tensors. Throws when nothing was added. */
  mean(): TensorMap {
    if (this.n === 0) throw new Error('mean: no updates to average');
    const out: TensorMap = new Map();
    const inv = 1 / this.weight;
    let off = 0;
    for (const [i, name] of this.names.entries()) {
      const shape = this.shapes[i]!;
      const n = numel(shape);
      const data = new Float32Array(n);
      for (let j = 0; j < n; j++) data[j] = this.sum[off + j]! * inv;
      out.set(name, { shape: [...shape], data });
      off += n;
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
