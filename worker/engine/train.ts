/**
 * The local training loop shared by `fedtune train` and the worker's ONNX
 * trainer: micro-batches -> summed-loss gradients -> token-weighted mean over
 * the accumulated micro-batches -> clip by global norm -> AdamW step at the
 * scheduled learning rate.
 *
 * Gradients are averaged per trained token over the whole accumulated batch,
 * so k micro-batches of accumulation give exactly the step one batch of their
 * union would give (and distributed workers reproduce it exactly).
 *
 * Two federated variants of the local objective live here too:
 * - FedProx (Li et al. 2020): the local objective is the mean token loss plus
 *   mu/2 * ||w - w_global||^2 over the trained parameters, w_global being the
 *   adapter the task started from (`proximal.anchor`). Its gradient
 *   mu * (w - w_global) is a term of the mean loss, so it is added after the
 *   division by the token count and before clipping.
 * - FFA-LoRA (Sun et al. 2024) and any other partial training: parameters for
 *   which `frozen(name)` holds get no gradient, no optimizer state and no
 *   weight decay; they keep exactly the value they came with.
 */
import type { TensorMap } from '../../common/tensor.ts';
import { IGNORE_INDEX, type Batch } from '../../common/model-config.ts';
import { checkDpSgd, noisyClippedMean, type DpSgdParams } from '../../common/privacy/dp-sgd.ts';
import type { NormalSource } from '../../common/privacy/noise.ts';
import type { Engine } from './engine.ts';
import { AdamW, clipGradNorm, lrAt, type Schedule } from '../../common/optim.ts';

export interface StepInfo {
  /** 1-based optimizer step within this loop. */
  step: number;
  totalSteps: number;
  /** Objective of this step: mean token loss of its micro-batches plus proxLoss. */
  loss: number;
  /** FedProx term mu/2 * ||w - anchor||^2 at the parameters the step started from (0 without proximal). */
  proxLoss: number;
  lr: number;
  gradNorm: number;
  tokens: number;
  tokensPerSec: number;
  /** Examples (sequences) consumed so far. */
  examples: number;
  epoch: number;
}

/** What the plain and the DP-SGD training loops take alike. */
export interface LoopOptions {
  engine: Engine;
  /** Trainable parameters; updated in place. */
  params: TensorMap;
  /** Optimizer steps to take. */
  steps: number;
  optimizer: AdamW;
  schedule: Schedule;
  /** Offset of the schedule (steps already taken before this loop, e.g. when resuming). */
  scheduleOffset?: number;
  onStep?: (s: StepInfo) => void;
  signal?: AbortSignal;
  /** FedProx: add mu/2 * ||w - anchor||^2 over the trained parameters (mu = 0: plain local training). */
  proximal?: { mu: number; anchor: TensorMap };
  /** Parameters to keep fixed (FFA-LoRA: every lora_A). They are handed to neither the gradient step nor the optimizer. */
  frozen?: (name: string) => boolean;
}

export interface TrainLoopOptions extends LoopOptions {
  /** Micro-batches for epoch e (called once per epoch; reshuffle there). */
  epochBatches: (epoch: number) => Batch[];
  gradAccumulation: number;
  /** Clip the global gradient norm to this (<= 0 or Infinity: no clipping). */
  maxGradNorm: number;
}

export interface TrainLoopResult {
  steps: number;
  /** Token-weighted mean objective (token loss plus proxLoss) over every step. */
  meanLoss: number;
  /** Token-weighted mean of the steps' FedProx terms (0 without proximal). */
  proxLoss: number;
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
  const frozen = o.frozen ?? (() => false);
  const trainable = [...o.params.keys()].filter((name) => !frozen(name));
  if (trainable.length === 0) {
    throw new Error(`all ${o.params.size} parameters are frozen, so there is nothing to train; leave at least one trainable (freeze_lora_a needs an adapter with lora_B tensors)`);
  }
  const prox = o.proximal ? checkProximal(o.proximal, o.params, trainable) : null;

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
  let totalProx = 0;
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
    // Only the trainable parameters reach the step: frozen ones get neither a gradient nor optimizer state.
    const stepGrads: TensorMap = new Map();
    for (const name of trainable) {
      const g = grads.get(name);
      if (!g) throw new Error(`the engine returned no gradient for trainable parameter ${name}`);
      stepGrads.set(name, g);
    }
    // Measured at the parameters the step starts from, like the token loss.
    const proxLoss = prox ? proximalLoss(o.params, prox.anchor, prox.mu, trainable) : 0;
    if (prox) addProximalGrad(stepGrads, o.params, prox.anchor, prox.mu);
    const gradNorm = clipGradNorm(stepGrads, o.maxGradNorm);
    const lr = lrAt((o.scheduleOffset ?? 0) + step - 1, o.schedule);
    if (tokens > 0) o.optimizer.step(o.params, stepGrads, lr);
    const loss = tokens > 0 ? lossSum / tokens + proxLoss : NaN;
    lastLoss = loss;
    totalLoss += lossSum;
    totalProx += tokens * proxLoss;
    totalTokens += tokens;
    const seconds = (performance.now() - stepStart) / 1000;
    o.onStep?.({
      step,
      totalSteps: o.steps,
      loss,
      proxLoss,
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
    meanLoss: totalTokens > 0 ? (totalLoss + totalProx) / totalTokens : NaN,
    proxLoss: totalTokens > 0 ? totalProx / totalTokens : NaN,
    lastLoss,
    tokens: totalTokens,
    examples,
    seconds: (performance.now() - t0) / 1000,
  };
}

/** FedProx mu must be finite and >= 0; the error names the TrainingSpec field. */
export function checkProxMu(mu: number): void {
  if (typeof mu !== 'number' || !Number.isFinite(mu) || mu < 0) {
    throw new Error(`prox_mu is ${String(mu)}, expected a finite number >= 0 (0 turns FedProx off)`);
  }
}

/** Validates mu and that the anchor holds every trainable parameter with its shape. Returns null when mu = 0. */
function checkProximal(p: { mu: number; anchor: TensorMap }, params: TensorMap, trainable: string[]): { mu: number; anchor: TensorMap } | null {
  checkProxMu(p.mu);
  if (p.mu === 0) return null;
  for (const name of trainable) {
    const a = p.anchor.get(name);
    const w = params.get(name)!;
    if (!a) throw new Error(`FedProx anchor (the global adapter) has no tensor ${name}; it must hold every trained parameter`);
    if (a.data.length !== w.data.length || a.shape.length !== w.shape.length || a.shape.some((d, i) => d !== w.shape[i])) {
      throw new Error(`FedProx anchor tensor ${name} has shape [${a.shape.join(', ')}], but the parameter has shape [${w.shape.join(', ')}]`);
    }
  }
  return p;
}

/** mu/2 * sum over `names` of ||w - anchor||^2, accumulated in float64. */
export function proximalLoss(params: TensorMap, anchor: TensorMap, mu: number, names: Iterable<string>): number {
  let sq = 0;
  for (const name of names) {
    const w = params.get(name)!.data;
    const a = anchor.get(name)!.data;
    for (let i = 0; i < w.length; i++) {
      const d = w[i]! - a[i]!;
      sq += d * d;
    }
  }
  return 0.5 * mu * sq;
}

/** grads += mu * (w - anchor) for every tensor in `grads`, in place. */
export function addProximalGrad(grads: TensorMap, params: TensorMap, anchor: TensorMap, mu: number): void {
  for (const [name, g] of grads) {
    const gd = g.data;
    const w = params.get(name)!.data;
    const a = anchor.get(name)!.data;
    for (let i = 0; i < gd.length; i++) gd[i]! += mu * (w[i]! - a[i]!);
  }
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

export interface DpTrainLoopOptions extends LoopOptions {
  /** Number of training records N (the Poisson sampler's population, and the normalisation q N). */
  numRecords: number;
  /** One Poisson-sampled batch of record indices per call. */
  sample: () => number[];
  /** The sampled records as micro-batches (each at most the physical batch size; padding rows carry no loss). */
  microBatches: (indices: number[]) => Batch[];
  dp: DpSgdParams;
  /** Source of the Gaussian noise (default: the OS CSPRNG; tests pass a seeded one). */
  normals?: NormalSource;
}

export interface DpTrainLoopResult extends TrainLoopResult {
  /** Fraction of sampled examples whose gradient norm exceeded max_grad_norm. */
  clippedFraction: number;
  /** Mean Poisson batch size over the steps. */
  meanBatchSize: number;
}

/**
 * DP-SGD (Abadi et al. 2016, with Opacus' normalisation): each step draws a
 * Poisson batch, the engine clips every example's gradient of its mean token
 * loss to C in the graph and sums them, Gaussian noise N(0, (sigma C)^2) is
 * added to every coordinate of the sum, the result is divided by the expected
 * batch size q N and handed to the optimizer. An empty batch is a noise-only
 * step. No global-norm clip is applied on top (max_grad_norm of training is
 * not used), and grad_accumulation plays no part: the batch is split into
 * micro-batches of the physical batch size, which gives exactly the same sum.
 * FedProx's gradient mu (w - anchor) reads no data, so it is added after the noise.
 */
export async function dpTrainLoop(o: DpTrainLoopOptions): Promise<DpTrainLoopResult> {
  checkDpSgd(o.dp);
  if (!Number.isInteger(o.steps) || o.steps < 1) throw new Error(`steps is ${o.steps}, expected an integer >= 1`);
  if (!(o.numRecords >= 1)) throw new Error('privacy.dp_sgd: this site has no training records to sample from');
  const frozen = o.frozen ?? (() => false);
  const trainable = [...o.params.keys()].filter((name) => !frozen(name));
  if (trainable.length === 0) {
    throw new Error(`all ${o.params.size} parameters are frozen, so there is nothing to train; leave at least one trainable (freeze_lora_a needs an adapter with lora_B tensors)`);
  }
  const prox = o.proximal ? checkProximal(o.proximal, o.params, trainable) : null;
  const t0 = performance.now();
  let totalLoss = 0;
  let totalProx = 0;
  let totalExamples = 0;
  let totalTokens = 0;
  let clippedCount = 0;
  let sampled = 0;
  let lastLoss = NaN;
  for (let step = 1; step <= o.steps; step++) {
    o.signal?.throwIfAborted();
    const stepStart = performance.now();
    const indices = o.sample();
    sampled += indices.length;
    const sum: TensorMap = new Map();
    for (const name of trainable) {
      const p = o.params.get(name)!;
      // Accumulated and noised in float64, whatever the parameters' dtype.
      sum.set(name, { shape: [...p.shape], data: new Float64Array(p.data.length) });
    }
    let lossSum = 0;
    let examples = 0;
    let tokens = 0;
    let sqNormSum = 0;
    for (const batch of indices.length > 0 ? o.microBatches(indices) : []) {
      const r = await o.engine.clippedGrads(o.params, batch, o.dp.maxGradNorm, { frozen });
      lossSum += r.lossSum;
      examples += r.examples;
      tokens += r.tokens;
      for (const n of r.norms) {
        if (n > o.dp.maxGradNorm) clippedCount++;
        sqNormSum += Math.min(n, o.dp.maxGradNorm) ** 2;
      }
      for (const name of trainable) {
        const g = r.grads.get(name);
        if (!g) throw new Error(`the engine returned no gradient for trainable parameter ${name}`);
        const acc = sum.get(name)!.data;
        for (let i = 0; i < acc.length; i++) acc[i]! += g.data[i]!;
      }
      o.signal?.throwIfAborted();
    }
    noisyClippedMean([...sum.values()].map((t) => t.data as Float64Array), o.dp, o.numRecords, o.normals);
    const proxLoss = prox ? proximalLoss(o.params, prox.anchor, prox.mu, trainable) : 0;
    if (prox) addProximalGrad(sum, o.params, prox.anchor, prox.mu);
    const lr = lrAt((o.scheduleOffset ?? 0) + step - 1, o.schedule);
    o.optimizer.step(o.params, sum, lr);
    const loss = examples > 0 ? lossSum / examples + proxLoss : NaN;
    lastLoss = loss;
    totalLoss += lossSum;
    totalProx += examples * proxLoss;
    totalExamples += examples;
    totalTokens += tokens;
    const seconds = (performance.now() - stepStart) / 1000;
    o.onStep?.({
      step,
      totalSteps: o.steps,
      loss,
      proxLoss,
      lr,
      // Root mean square of the clipped per-example norms (the noisy step's norm would mostly measure the noise).
      gradNorm: indices.length > 0 ? Math.sqrt(sqNormSum / indices.length) : 0,
      tokens,
      tokensPerSec: seconds > 0 ? tokens / seconds : 0,
      examples: sampled,
      epoch: Math.floor((step - 1) * o.dp.sampleRate),
    });
  }
  return {
    steps: o.steps,
    meanLoss: totalExamples > 0 ? (totalLoss + totalProx) / totalExamples : NaN,
    proxLoss: totalExamples > 0 ? totalProx / totalExamples : NaN,
    lastLoss,
    tokens: totalTokens,
    examples: sampled,
    seconds: (performance.now() - t0) / 1000,
    clippedFraction: sampled > 0 ? clippedCount / sampled : 0,
    meanBatchSize: sampled / o.steps,
  };
}

/** Pad a micro-batch with rows that carry no loss up to `size` rows, so every micro-batch has one graph shape. */
export function padBatchRows(batch: Batch, size: number, padId: number): Batch {
  if (batch.batchSize >= size) return batch;
  const T = batch.seqLen;
  const inputIds = new Int32Array(size * T).fill(padId);
  const labels = new Int32Array(size * T).fill(IGNORE_INDEX);
  inputIds.set(batch.inputIds);
  labels.set(batch.labels);
  return { batchSize: size, seqLen: T, inputIds, labels };
}
