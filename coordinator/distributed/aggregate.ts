/**
 * The coordinator's math of a distributed step.
 *
 * Synchronous steps: each worker uploads the gradient of the SUMMED token loss
 * over its micro-batches, and its token count. Sums are additive, so
 *
 *   g = (sum_w G_w) / (sum_w T_w)
 *
 * is exactly the gradient of the mean token loss over the global batch, the
 * one a single process would compute. Then clip by global norm and take one
 * AdamW step at the scheduled learning rate, as worker/engine/train.ts does.
 *
 * Local SGD: each worker uploads delta_w = local - global after its local
 * steps; the coordinator takes the token-weighted mean delta and applies the
 * outer optimizer (plain average, or Nesterov momentum as in DiLoCo).
 *
 * Sums are kept in float64 and folded in as each upload arrives, so memory is
 * O(adapter size) whatever the number of workers.
 */
import { manifestBytes, type TensorSpecEntry } from '../../common/chunks.ts';
import { numel, type TensorMap } from '../../common/tensor.ts';
import { clipGradNorm, type AdamW } from '../../common/optim.ts';
import type { OuterOptimizer } from '../../common/outer.ts';

export class FlatSum {
  readonly manifest: readonly TensorSpecEntry[];
  private readonly sum: Float64Array;
  private weight = 0;
  private n = 0;

  constructor(manifest: readonly TensorSpecEntry[]) {
    this.manifest = manifest;
    this.sum = new Float64Array(manifestBytes(manifest) / 4);
  }

  get count(): number {
    return this.n;
  }
  get totalWeight(): number {
    return this.weight;
  }

  /** sum += scale * values; `weight` is added to the total weight. */
  add(values: Float32Array, scale: number, weight: number): void {
    if (values.length !== this.sum.length) throw new Error(`update has ${values.length} elements, the adapter has ${this.sum.length}`);
    const s = this.sum;
    if (scale === 1) for (let i = 0; i < s.length; i++) s[i]! += values[i]!;
    else for (let i = 0; i < s.length; i++) s[i]! += scale * values[i]!;
    this.weight += weight;
    this.n++;
  }

  /** sum * factor as float32 tensors named by the manifest. */
  scaled(factor: number): TensorMap {
    const out: TensorMap = new Map();
    let off = 0;
    for (const e of this.manifest) {
      const n = numel(e.shape);
      const data = new Float32Array(n);
      for (let i = 0; i < n; i++) data[i] = this.sum[off + i]! * factor;
      out.set(e.name, { shape: [...e.shape], data });
      off += n;
    }
    return out;
  }
}

/**
 * One synchronous optimizer step in place on `params` from summed gradients and
 * their token count. Returns the gradient norm before clipping. A non-finite
 * norm skips the update (the caller reports it).
 */
export function applyGradientStep(
  params: TensorMap,
  gradSum: FlatSum,
  tokens: number,
  opts: { optimizer: AdamW; lr: number; maxGradNorm: number },
): number {
  if (!(tokens > 0)) throw new Error(`a step needs trained tokens (got ${tokens})`);
  const grads = gradSum.scaled(1 / tokens);
  const norm = clipGradNorm(grads, opts.maxGradNorm);
  if (Number.isFinite(norm)) opts.optimizer.step(params, grads, opts.lr);
  return norm;
}

/** The outer step of local SGD: token-weighted mean delta through the outer optimizer. */
export function applyOuterStep(global: TensorMap, deltaSum: FlatSum, outer: OuterOptimizer): TensorMap {
  if (!(deltaSum.totalWeight > 0)) throw new Error('an outer step needs at least one delta with trained tokens');
  return outer.step(global, deltaSum.scaled(1 / deltaSum.totalWeight));
}
