/**
 * Fault injection for testing robust aggregation: a Byzantine site. It wraps a
 * real trainer, trains honestly, then lies about the result:
 *
 *   adapter      global + scale * (local - global)   (scale -10: the update sign-flipped and 10x larger)
 *   numExamples  factor * the true count             (factor 100: claims 100x its data, to win FedAvg's weighting)
 *
 * numTrainExamples (what the worker registers with) is inflated the same way.
 * Distributed mode is corrupted the same way: gradients are scaled by `scale`
 * and token and example counts by `factor`; local SGD steps move the
 * parameters by scale times the honest move. Evaluation stays honest, so that
 * eval metrics measure the global adapter, not the lie.
 *
 * Enabled by `fedtune worker --fault-byzantine SCALE,FACTOR`.
 */
import type { TensorMap } from '../../common/tensor.ts';
import type { AdamW } from '../../common/optim.ts';
import type { Batch } from '../../common/model-config.ts';
import type {
  EvalOutcome,
  GradientOutcome,
  LocalStepsOutcome,
  LocalTrainingSpec,
  TrainArgs,
  TrainOutcome,
  Trainer,
} from './trainer.ts';

export interface ByzantineOptions {
  /** Multiplies the honest update local - global (e.g. -10). */
  scale: number;
  /** Multiplies the example counts the site reports (e.g. 100). */
  factor: number;
}

/** Parses SCALE,FACTOR as given to --fault-byzantine (e.g. "-10,100"). */
export function parseByzantine(value: string, option = '--fault-byzantine'): ByzantineOptions {
  const parts = value.split(',').map((s) => s.trim());
  const nums = parts.map(Number);
  if (parts.length !== 2 || parts.some((p) => p === '') || nums.some((n) => !Number.isFinite(n))) {
    throw new Error(`${option} must be SCALE,FACTOR, two numbers such as -10,100 (got "${value}")`);
  }
  const [scale, factor] = nums as [number, number];
  if (!(factor > 0)) throw new Error(`${option}: FACTOR multiplies the reported example counts and must be > 0 (got ${factor})`);
  return { scale, factor };
}

/** global + scale * (local - global), as float32, for every tensor of `global`. */
export function scaleUpdate(global: TensorMap, local: TensorMap, scale: number): TensorMap {
  const out: TensorMap = new Map();
  for (const [name, g] of global) {
    const l = local.get(name);
    if (!l) throw new Error(`byzantine trainer: the trained adapter has no tensor ${name}`);
    if (l.data.length !== g.data.length) {
      throw new Error(`byzantine trainer: tensor ${name} has ${l.data.length} elements after training, ${g.data.length} before`);
    }
    const data = new Float32Array(g.data.length);
    for (let i = 0; i < data.length; i++) data[i] = g.data[i]! + scale * (l.data[i]! - g.data[i]!);
    out.set(name, { shape: [...g.shape], data });
  }
  return out;
}

export class ByzantineTrainer implements Trainer {
  computeGradients?: Trainer['computeGradients'];
  localSteps?: Trainer['localSteps'];

  constructor(
    private readonly inner: Trainer,
    readonly fault: ByzantineOptions,
  ) {
    if (!Number.isFinite(fault.scale)) throw new Error(`byzantine trainer: scale is ${fault.scale}, expected a finite number`);
    if (!(fault.factor > 0) || !Number.isFinite(fault.factor)) throw new Error(`byzantine trainer: factor is ${fault.factor}, expected a finite number > 0`);
    if (inner.computeGradients) this.computeGradients = (args) => this.corruptGradients(args);
    if (inner.localSteps) this.localSteps = (args) => this.corruptLocalSteps(args);
  }

  get backend(): string {
    return this.inner.backend;
  }
  get device(): string {
    return this.inner.device;
  }
  get numTrainExamples(): number {
    return Math.round(this.inner.numTrainExamples * this.fault.factor);
  }
  get numEvalExamples(): number {
    return this.inner.numEvalExamples;
  }
  get modelFingerprint(): string | undefined {
    return this.inner.modelFingerprint;
  }

  async train(args: TrainArgs): Promise<TrainOutcome> {
    const honest = await this.inner.train(args);
    return {
      adapter: scaleUpdate(args.globalAdapter, honest.adapter, this.fault.scale),
      numExamples: Math.round(honest.numExamples * this.fault.factor),
      metrics: honest.metrics,
    };
  }

  evaluate(args: { globalAdapter: TensorMap; spec: LocalTrainingSpec; signal: AbortSignal }): Promise<EvalOutcome | null> {
    return this.inner.evaluate(args);
  }

  private async corruptGradients(args: { params: TensorMap; batches: Batch[]; spec: LocalTrainingSpec; signal: AbortSignal }): Promise<GradientOutcome> {
    const honest = await this.inner.computeGradients!(args);
    const grads: TensorMap = new Map();
    for (const [name, t] of honest.grads) grads.set(name, { shape: [...t.shape], data: Float32Array.from(t.data, (x) => x * this.fault.scale) });
    return {
      grads,
      lossSum: honest.lossSum,
      tokens: Math.round(honest.tokens * this.fault.factor),
      examples: Math.round(honest.examples * this.fault.factor),
    };
  }

  private async corruptLocalSteps(args: {
    params: TensorMap;
    steps: Batch[][];
    lrs: number[];
    optimizer: AdamW;
    spec: LocalTrainingSpec;
    signal: AbortSignal;
  }): Promise<LocalStepsOutcome> {
    const before: TensorMap = new Map();
    for (const [name, t] of args.params) before.set(name, { shape: [...t.shape], data: t.data.slice() });
    const honest = await this.inner.localSteps!(args);
    for (const [name, t] of scaleUpdate(before, args.params, this.fault.scale)) args.params.get(name)!.data.set(t.data);
    return { ...honest, tokens: Math.round(honest.tokens * this.fault.factor), examples: Math.round(honest.examples * this.fault.factor) };
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
