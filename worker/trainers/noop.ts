/**
 * The noop trainer: no model math. It returns the global adapter plus a small
 * deterministic perturbation (the same for every site given the same adapter
 * in the same round), reports simulated progress and counts the local
 * records, so transport, aggregation and fault handling can be exercised (and
 * benchmarked) without training anything. With freeze_lora_a (FFA-LoRA) every
 * lora_A comes back exactly as it arrived, as a real trainer would leave it;
 * prox_mu is checked and otherwise has nothing to act on.
 */
import { createHash } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { inspectModel } from '../../common/hf-model.ts';
import { createRng } from '../../common/random.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { splitEval } from '../data/batching.ts';
import { loadRecords } from '../../common/data/dataset.ts';
import { checkProxMu } from '../engine/train.ts';
import type { EvalOutcome, LocalTrainingSpec, Trainer, TrainerFactoryOptions, TrainArgs, TrainOutcome } from './trainer.ts';

/** Size of the perturbation added to every element. */
export const NOOP_PERTURBATION = 1e-3;

function seedOf(...parts: Array<string | number>): number {
  return createHash('sha256').update(parts.join('\0')).digest().readUInt32LE(0);
}

/** A cheap digest of an adapter: the first 256 elements of every tensor, as text. */
function checksum(m: TensorMap): string {
  const parts: string[] = [];
  for (const [name, t] of m) parts.push(name, t.shape.join('x'), Array.from(t.data.subarray(0, 256)).join(','));
  return createHash('sha256').update(parts.join('|')).digest('hex');
}

export class NoopTrainer implements Trainer {
  readonly backend = 'noop';
  readonly device = 'cpu';
  readonly numTrainExamples: number;
  readonly numEvalExamples: number;
  readonly modelFingerprint?: string;
  private readonly stepMs: number;
  private readonly perturb: boolean;

  /**
   * `perturb: false` hands the global adapter back untouched (no copy): benchmarks
   * with many in-process workers and large adapters use it to stay within memory.
   */
  constructor(opts: { numTrainExamples: number; numEvalExamples: number; stepMs?: number; modelFingerprint?: string; perturb?: boolean }) {
    this.numTrainExamples = opts.numTrainExamples;
    this.numEvalExamples = opts.numEvalExamples;
    this.stepMs = opts.stepMs ?? 0;
    this.perturb = opts.perturb ?? true;
    if (opts.modelFingerprint !== undefined) this.modelFingerprint = opts.modelFingerprint;
  }

  totalSteps(spec: LocalTrainingSpec): number {
    if (spec.steps !== null) return spec.steps;
    const perEpoch = Math.max(1, Math.ceil(this.numTrainExamples / (spec.batchSize * spec.gradAccumulation)));
    return Math.max(1, Math.ceil((spec.epochs ?? 1) * perEpoch));
  }

  async train(args: TrainArgs): Promise<TrainOutcome> {
    const { spec, signal } = args;
    checkProxMu(spec.proxMu);
    if (spec.dpSgd) {
      throw new Error('privacy.dp_sgd is set, but the noop trainer computes no gradients, so it cannot clip or noise them; use the onnx trainer (--trainer onnx) or remove privacy.dp_sgd');
    }
    const total = this.totalSteps(spec);
    let loss = 0;
    for (let step = 1; step <= total; step++) {
      signal.throwIfAborted();
      if (this.stepMs > 0) await sleep(this.stepMs, undefined, { signal });
      else await new Promise<void>((r) => setImmediate(r));
      loss = 1 / (args.round + step / total);
      args.onProgress({ step, totalSteps: total, loss, tokensPerSec: 0, examples: Math.min(this.numTrainExamples, step * spec.batchSize) });
    }
    signal.throwIfAborted();
    const metrics = { train_loss: loss, steps: total, tokens: 0 };
    if (!this.perturb) return { adapter: args.globalAdapter, numExamples: this.numTrainExamples, metrics };
    // Seeded by the run seed, the round and the adapter it starts from: every site given the same
    // global in the same round returns the same update (tests check aggregation rules on it).
    const rng = createRng(seedOf(spec.seed, args.round, checksum(args.globalAdapter)));
    const adapter: TensorMap = new Map();
    for (const [name, t] of args.globalAdapter) {
      // One random offset per tensor plus a cheap index pattern: deterministic and O(n).
      const base = (rng.next() - 0.5) * NOOP_PERTURBATION;
      if (spec.freezeLoraA && name.endsWith('.lora_A.weight')) {
        adapter.set(name, { shape: [...t.shape], data: Float32Array.from(t.data) });
        continue;
      }
      const data = new Float32Array(t.data.length);
      for (let i = 0; i < data.length; i++) data[i] = t.data[i]! + base + NOOP_PERTURBATION * 1e-3 * (i % 7);
      adapter.set(name, { shape: [...t.shape], data });
    }
    return { adapter, numExamples: this.numTrainExamples, metrics };
  }

  async evaluate(args: { globalAdapter: TensorMap; spec: LocalTrainingSpec; signal: AbortSignal }): Promise<EvalOutcome | null> {
    args.signal.throwIfAborted();
    if (this.numEvalExamples === 0) return null;
    // A deterministic stand-in: mean square of the adapter's elements.
    let sum = 0;
    let n = 0;
    for (const t of args.globalAdapter.values()) {
      for (let i = 0; i < t.data.length; i++) sum += t.data[i]! * t.data[i]!;
      n += t.data.length;
    }
    return { evalLoss: n === 0 ? 0 : sum / n, evalTokens: 0, evalExamples: this.numEvalExamples, evalAccuracy: null };
  }

  async close(): Promise<void> {}
}

export async function createNoopTrainer(opts: TrainerFactoryOptions): Promise<NoopTrainer> {
  let train = 0;
  let evalN = 0;
  if (opts.dataPath) {
    const records = await loadRecords(opts.dataPath);
    if (opts.evalPath) {
      train = records.length;
      evalN = (await loadRecords(opts.evalPath)).length;
    } else {
      const split = splitEval(records, opts.evalFraction, opts.seed);
      train = split.train.length;
      evalN = split.eval.length;
    }
  }
  let modelFingerprint: string | undefined;
  if (opts.modelDir) {
    // Only to identify the base model at registration; the noop trainer computes nothing with it.
    modelFingerprint = (await inspectModel(opts.modelDir)).fingerprint;
  }
  return new NoopTrainer({
    numTrainExamples: train,
    numEvalExamples: evalN,
    ...(opts.noopStepMs !== undefined ? { stepMs: opts.noopStepMs } : {}),
    ...(opts.noopPerturb !== undefined ? { perturb: opts.noopPerturb } : {}),
    ...(modelFingerprint !== undefined ? { modelFingerprint } : {}),
  });
}
