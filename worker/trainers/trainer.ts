/**
 * The trainer interface: what the worker agent asks of a training backend.
 * The agent owns the session with the coordinator; a trainer owns the model and
 * the local data (which never leave it) and turns a global adapter into a
 * locally trained one, or evaluates one on the local eval split.
 */
import type { TensorMap } from '../../common/tensor.ts';
import type { Batch, LoraConfig } from '../../common/model-config.ts';
import type { AdamW } from '../../common/optim.ts';
import type { DpSgdParams } from '../../common/privacy/dp-sgd.ts';
import type { QuantFormat } from '../engine/quantize.ts';
import type { ComputeDtype } from '../engine/half.ts';

export interface LocalTrainingSpec {
  lora: LoraConfig;
  steps: number | null; // local optimizer steps per round, or
  epochs: number | null; // local epochs per round (exactly one of the two is set)
  batchSize: number;
  gradAccumulation: number;
  lr: number;
  schedule: 'constant' | 'linear' | 'cosine';
  warmupSteps: number;
  /**
   * training.schedule_scope 'run': this task is round scheduleRound (1-based) of a schedule spanning
   * scheduleRounds rounds of the task's local steps (common/optim.ts taskSchedule). 0: the schedule
   * spans this task alone.
   */
  scheduleRound: number;
  scheduleRounds: number;
  /**
   * training.optimizer_scope 'run': continue from the optimizer state this trainer's previous train
   * task of the same run ended with (same adapter tensors and shapes; else start fresh). A trainer
   * that cannot must fail the task naming training.optimizer_scope.
   */
  keepOptimizerState: boolean;
  weightDecay: number;
  maxGradNorm: number;
  maxSeqLen: number;
  template: string; // prompt template name
  seed: number;
  /** FedProx (Li et al. 2020): mu of the proximal term mu/2 * ||w - w_global||^2 (0 = off). */
  proxMu: number;
  /** FFA-LoRA (Sun et al. 2024): every lora_A keeps the value it arrived with; only lora_B trains. */
  freezeLoraA: boolean;
  /** LoRA+ (Hayou et al. 2024): lora_B learns at lr * loraPlusRatio (1: plain LoRA). */
  loraPlusRatio: number;
  /**
   * Sample-level DP-SGD (privacy.dp_sgd), null when off. A trainer that cannot
   * honour it must fail the task naming privacy.dp_sgd, never train without it.
   */
  dpSgd?: DpSgdParams | null;
}
export interface TrainProgress {
  step: number;
  totalSteps: number;
  loss: number;
  tokensPerSec: number;
  examples: number;
}
/** One local training task: start from the global adapter, train per spec, report progress. */
export interface TrainArgs {
  taskId: string;
  /** The run the task belongs to (the session's registration). */
  runId: string;
  round: number;
  globalAdapter: TensorMap;
  spec: LocalTrainingSpec;
  onProgress: (p: TrainProgress) => void;
  signal: AbortSignal;
}
/**
 * What a site's kept optimizer state (training.optimizer_scope 'run') belongs to: the run, the
 * adapter's tensors and shapes, the weight decay and the LoRA+ groups. A train task whose key differs
 * from the last one's starts with a fresh optimizer (a site whose rank changes, say).
 */
export function optimizerStateKey(args: Pick<TrainArgs, 'runId' | 'globalAdapter' | 'spec'>): string {
  return JSON.stringify([args.runId, args.spec.weightDecay, args.spec.loraPlusRatio, [...args.globalAdapter].map(([name, t]) => [name, t.shape])]);
}

export interface TrainOutcome {
  adapter: TensorMap;
  numExamples: number;
  metrics: Record<string, number>; // metrics: train_loss, tokens, ...
}
export interface EvalOutcome {
  evalLoss: number;
  evalTokens: number;
  evalExamples: number;
  evalAccuracy: number | null;
}
/** Distributed mode: gradients of the summed token loss over some micro-batches. */
export interface GradientOutcome {
  /** d(sum of token losses)/d(param), float32, keyed like the adapter. */
  grads: TensorMap;
  lossSum: number;
  tokens: number;
  examples: number;
}
/** Local SGD: what a worker's local steps did (params were updated in place). */
export interface LocalStepsOutcome {
  lossSum: number;
  tokens: number;
  examples: number;
  /** Local optimizer steps taken (steps without micro-batches are skipped). */
  steps: number;
}
export interface Trainer {
  readonly backend: string; // 'onnx' | 'noop'
  readonly device: string; // 'cpu' | 'cuda:0' ...
  readonly numTrainExamples: number;
  readonly numEvalExamples: number;
  /** sha256 hex of the base model (LoadedModel.fingerprint) when the trainer loaded one. */
  readonly modelFingerprint?: string;
  train(args: TrainArgs): Promise<TrainOutcome>;
  evaluate(args: { globalAdapter: TensorMap; spec: LocalTrainingSpec; signal: AbortSignal }): Promise<EvalOutcome | null>; // null: no eval data
  /** Distributed mode (optional): summed-loss gradients of `batches` at `params`. */
  computeGradients?(args: { params: TensorMap; batches: Batch[]; spec: LocalTrainingSpec; signal: AbortSignal }): Promise<GradientOutcome>;
  /**
   * Local SGD (optional): for each entry of `steps`, one optimizer step on those
   * micro-batches (token-weighted mean gradient, clipped) at the matching `lrs`
   * entry; `params` are updated in place. An empty entry skips that step.
   */
  localSteps?(args: {
    params: TensorMap;
    steps: Batch[][];
    lrs: number[];
    optimizer: AdamW;
    spec: LocalTrainingSpec;
    signal: AbortSignal;
  }): Promise<LocalStepsOutcome>;
  close(): Promise<void>;
}
export interface TrainerFactoryOptions {
  modelDir: string;
  dataPath: string;
  evalPath?: string;
  evalFraction: number;
  template: string;
  maxSeqLen: number;
  threads?: number;
  device?: 'cpu' | 'cuda';
  /** onnx trainer: 4-bit base weights (worker/engine/quantize.ts), nf4 or int4. */
  quantizeBase?: QuantFormat;
  /** onnx trainer: recompute each decoder layer in the backward pass (less activation memory). */
  recompute?: boolean;
  /** onnx trainer: float16 base weights, and float16 products on CUDA (worker/engine/half.ts). */
  computeDtype?: ComputeDtype;
  seed: number;
  /** This site's name (seeds DP-SGD's Poisson sampling together with training.seed and the round). */
  site?: string;
  /** noop trainer only: milliseconds each simulated step takes (tests and benchmarks). */
  noopStepMs?: number;
  /** noop trainer only: false returns the global adapter untouched (no copy, no arithmetic), for transport benchmarks. */
  noopPerturb?: boolean;
}
