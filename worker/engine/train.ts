/**
 * The local training loop shared by `fedtune train` and the worker's ONNX
 * trainer: micro-batches -> summed-loss gradients -> token-weighted mean over
 * the accumulated micro-batches -> clip by global norm -> AdamW step at the
 * scheduled learning rate.
 *
 * Gradients are averaged per trained token over the whole accumulated batch,
 * so k micro-batches of accumulation give exactly the step one batch of their
 * union would give (and distributed workers reproduce it exactly).
 */
import type { TensorMap } from '../../common/tensor.ts';
import type { Batch } from '../../common/model-config.ts';
import type { Engine } from './engine.ts';
import { AdamW, clipGradNorm, lrAt, type Schedule } from '../../common/optim.ts';

export interface StepInfo {
  /** 1-based optimizer step within this loop. */
  step: number;
  totalSteps: number;
  /** Mean token loss of this step's micro-batches. */
  loss: number;
  lr: number;
  gradNorm: number;
  tokens: number;
  tokensPerSec: number;
  /** Examples (sequences) consumed so far. */
  examples: number;
  epoch: number;
}

export interface TrainLoopOptions {
  engine: Engine;
  /** Trainable parameters; updated in place. */
  params: TensorMap;
  /** Micro-batches for epoch e (called once per epoch; reshuffle there). */
  epochBatches: (epoch: number) => Batch[];
  /** Optimizer steps to take. */
  steps: number;
  gradAccumulation: number;
  optimizer: AdamW;
  schedule: Schedule;
  /** Clip the global gradient norm to this (<= 0 or Infinity: no clipping). */
  maxGradNorm: number;
  /** Offset of the schedule (steps already taken before this loop, e.g. when resuming). */
  scheduleOffset?: number;
  onStep?: (s: StepInfo) => void;
  signal?: AbortSignal;
}

export interface TrainLoopResult {
  steps: number;
  /** Token-weighted mean loss over every step. */
  meanLoss: number;
  lastLoss: number;
  tokens: number;
  examples: number;
  seconds: number;
}

export async function trainLoop(o: TrainLoopOptions): Promise<TrainLoopResult> {
  if (!Number.isInteger(o.steps) || o.steps < 1) throw new Error(`steps is ${o.steps}, expected an integer >= 1`);
  if (!Number.isInteger(o.gradAccumulation) || o.gradAccumulation < 1) {
    throw new Error(`gradAccumulation is ${o.gradAccumulation}, expected an integer >= 1`);
  }
  const t0 = performance.now();
  let epoch = 0;
  let queue = o.epochBatches(epoch);
  if (queue.length === 0) throw new Error('training data produced no batches');
  let cursor = 0;
  const nextBatch = (): Batch => {
    if (cursor >= queue.length) {
      epoch++;
      queue = o.epochBatches(epoch);
      cursor = 0;
    }
    return queue[cursor++]!;
  };

  let totalLoss = 0;
  let totalTokens = 0;
  let examples = 0;
  let lastLoss = NaN;
  for (let step = 1; step <= o.steps; step++) {
    o.signal?.throwIfAborted();
    const stepStart = performance.now();
    let sum: TensorMap | null = null;
    let lossSum = 0;
    let tokens = 0;
    for (let k = 0; k < o.gradAccumulation; k++) {
      const batch = nextBatch();
      const r = await o.engine.lossAndGrads(o.params, batch);
      lossSum += r.lossSum;
      tokens += r.tokens;
      examples += batch.batchSize;
      sum = sum ? addInto(sum, r.grads) : r.grads;
      o.signal?.throwIfAborted();
    }
    const grads = sum!;
    if (tokens > 0) scaleInPlace(grads, 1 / tokens);
    const gradNorm = clipGradNorm(grads, o.maxGradNorm);
    const lr = lrAt((o.scheduleOffset ?? 0) + step - 1, o.schedule);
    if (tokens > 0) o.optimizer.step(o.params, grads, lr);
    const loss = tokens > 0 ? lossSum / tokens : NaN;
    lastLoss = loss;
    totalLoss += lossSum;
    totalTokens += tokens;
    const seconds = (performance.now() - stepStart) / 1000;
    o.onStep?.({
      step,
      totalSteps: o.steps,
      loss,
      lr,
      gradNorm,
      tokens,
      tokensPerSec: seconds > 0 ? tokens / seconds : 0,
      examples,
      epoch,
    });
  }
  return {
    steps: o.steps,
    meanLoss: totalTokens > 0 ? totalLoss / totalTokens : NaN,
    lastLoss,
    tokens: totalTokens,
    examples,
    seconds: (performance.now() - t0) / 1000,
  };
}

/** a += b elementwise for every tensor; returns a. */
export function addInto(a: TensorMap, b: TensorMap): TensorMap {
  for (const [name, t] of a) {
    const u = b.get(name);
    if (!u) throw new Error(`gradients: missing ${name}`);
    const x = t.data;
    const y = u.data;
    for (let i = 0; i < x.length; i++) x[i]! += y[i]!;
  }
  return a;
}

export function scaleInPlace(m: TensorMap, s: number): void {
  for (const t of m.values()) {
    const x = t.data;
    for (let i = 0; i < x.length; i++) x[i]! *= s;
  }
}
