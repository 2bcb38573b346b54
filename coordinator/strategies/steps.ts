/**
 * Step strategies of distributed mode, on the same footing as the federated
 * strategies: policy only (what workers upload, how the sum becomes the next
 * global adapter, the server state to checkpoint), no sockets, no timing.
 *
 *   sync-sgd   each worker uploads the gradient of the SUMMED token loss over
 *              its micro-batches and its token count. Sums are additive, so
 *                g = (sum_w G_w) / (sum_w T_w)
 *              is exactly the gradient of the mean token loss over the global
 *              batch, the one a single process computes; then clip by global
 *              norm and one AdamW step at the scheduled learning rate, as the
 *              worker's training loop does.
 *   local-sgd  (distributed.sync_every = H > 1; DiLoCo, Douillard et al. 2023)
 *              each worker takes H local AdamW steps and uploads
 *              delta_w = local - global; the coordinator applies the outer
 *              optimizer (plain average, or Nesterov momentum) to the
 *              token-weighted mean delta.
 *
 * Sums are kept in float64 and folded in as each upload arrives (FlatSum), so
 * memory is O(adapter size) whatever the number of workers.
 */
import { manifestBytes, type TensorSpecEntry } from '../../common/chunks.ts';
import type { RunConfig } from '../../common/config.ts';
import { AdamW, clipGradNorm, loraPlusGroups } from '../../common/optim.ts';
import { OuterOptimizer, type OuterKind } from '../../common/outer.ts';
import { numel, type TensorMap } from '../../common/tensor.ts';
import { Float64Sum } from './math/sum.ts';
import type { StrategyState } from './strategy.ts';

export class FlatSum {
  readonly manifest: readonly TensorSpecEntry[];
  private readonly sum: Float64Sum;
  private weight = 0;
  private n = 0;

  constructor(manifest: readonly TensorSpecEntry[]) {
    this.manifest = manifest;
    this.sum = new Float64Sum(manifestBytes(manifest) / 4);
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
    this.sum.fold(0, [values], [scale]);
    this.weight += weight;
    this.n++;
  }

  /** Gives the sum's memory back for the next step's (math/sum.ts); unusable afterwards. */
  dispose(): void {
    this.sum.dispose();
  }

  /** sum * factor as float32 tensors named by the manifest. */
  scaled(factor: number): TensorMap {
    const out: TensorMap = new Map();
    let off = 0;
    for (const e of this.manifest) {
      const n = numel(e.shape);
      const data = new Float32Array(n);
      this.sum.scaleTo(off, data, factor);
      out.set(e.name, { shape: [...e.shape], data });
      off += n;
    }
    return out;
  }
}

export interface StepStrategy {
  readonly name: 'sync-sgd' | 'local-sgd';
  readonly description: string;
  /** What a worker uploads for a step task. */
  readonly upload: 'gradient' | 'delta';
  aggregator(manifest: readonly TensorSpecEntry[]): FlatSum;
  /** Fold one worker's upload (its values and trained tokens) into the sum. */
  fold(sum: FlatSum, values: Float32Array, tokens: number): void;
  /**
   * The next global adapter from the step's sum. `global` may be updated in
   * place (sync-sgd's AdamW step). gradNorm: the norm before clipping (sync-sgd;
   * non-finite: the step was skipped).
   */
  step(global: TensorMap, sum: FlatSum, tokens: number, lr: number): { next: TensorMap; gradNorm: number | null };
  state(): StrategyState;
  load(state: StrategyState): void;
}

function splitMoments(s: StrategyState, who: string): { m: TensorMap; v: TensorMap } {
  const m: TensorMap = new Map();
  const v: TensorMap = new Map();
  for (const [k, t] of s.tensors) {
    if (k.startsWith('m.')) m.set(k.slice(2), t);
    else if (k.startsWith('v.')) v.set(k.slice(2), t);
    else throw new Error(`${who} state: unexpected tensor ${k} (expected m.* and v.*)`);
  }
  return { m, v };
}

function joinMoments(kind: string, step: number, m: TensorMap, v: TensorMap): StrategyState {
  const tensors: TensorMap = new Map();
  for (const [k, t] of m) tensors.set(`m.${k}`, t);
  for (const [k, t] of v) tensors.set(`v.${k}`, t);
  return { json: { kind, step }, tensors };
}

class SyncSgd implements StepStrategy {
  readonly name = 'sync-sgd';
  readonly description = 'sync-sgd';
  readonly upload = 'gradient';
  private readonly optimizer: AdamW;
  constructor(
    lr: number,
    weightDecay: number,
    private readonly maxGradNorm: number,
    loraPlusRatio: number,
  ) {
    this.optimizer = new AdamW({ lr, weightDecay, groups: loraPlusGroups(loraPlusRatio) });
  }
  aggregator(manifest: readonly TensorSpecEntry[]): FlatSum {
    return new FlatSum(manifest);
  }
  fold(sum: FlatSum, values: Float32Array, tokens: number): void {
    sum.add(values, 1, tokens);
  }
  step(global: TensorMap, sum: FlatSum, tokens: number, lr: number): { next: TensorMap; gradNorm: number } {
    if (!(tokens > 0)) throw new Error(`a step needs trained tokens (got ${tokens})`);
    const grads = sum.scaled(1 / tokens);
    const norm = clipGradNorm(grads, this.maxGradNorm);
    if (Number.isFinite(norm)) this.optimizer.step(global, grads, lr);
    return { next: global, gradNorm: norm };
  }
  state(): StrategyState {
    const s = this.optimizer.state();
    return joinMoments(s.kind, s.step, s.m, s.v);
  }
  load(state: StrategyState): void {
    const { m, v } = splitMoments(state, this.name);
    this.optimizer.load({ kind: 'adamw', step: Number(state.json.step), m, v });
  }
}

class LocalSgd implements StepStrategy {
  readonly name = 'local-sgd';
  readonly description: string;
  readonly upload = 'delta';
  private readonly outer: OuterOptimizer;
  constructor(syncEvery: number, o: RunConfig['distributed']['outer_optimizer']) {
    this.outer = new OuterOptimizer(o.kind === 'average' ? { kind: 'average' } : { kind: 'nesterov', lr: o.lr, momentum: o.momentum });
    this.description = `local-sgd (sync every ${syncEvery}, outer ${o.kind})`;
  }
  aggregator(manifest: readonly TensorSpecEntry[]): FlatSum {
    return new FlatSum(manifest);
  }
  fold(sum: FlatSum, values: Float32Array, tokens: number): void {
    sum.add(values, tokens, tokens);
  }
  step(global: TensorMap, sum: FlatSum): { next: TensorMap; gradNorm: null } {
    if (!(sum.totalWeight > 0)) throw new Error('an outer step needs at least one delta with trained tokens');
    return { next: this.outer.step(global, sum.scaled(1 / sum.totalWeight)), gradNorm: null };
  }
  state(): StrategyState {
    const s = this.outer.state();
    return joinMoments(s.kind, s.step, s.m, s.v);
  }
  load(state: StrategyState): void {
    const { m, v } = splitMoments(state, this.name);
    this.outer.load({ kind: state.json.kind as OuterKind, step: Number(state.json.step), m, v });
  }
}

/** sync-sgd, or local-sgd when distributed.sync_every > 1. */
export function createStepStrategy(cfg: RunConfig): StepStrategy {
  const d = cfg.distributed;
  return d.sync_every > 1 ? new LocalSgd(d.sync_every, d.outer_optimizer) : new SyncSgd(cfg.training.lr, cfg.training.weight_decay, cfg.training.max_grad_norm, cfg.training.lora_plus_ratio);
}
