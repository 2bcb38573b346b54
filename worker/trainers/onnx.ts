/**
 * The built-in trainer: trains the global LoRA adapter on this site's data with
 * the ONNX engine and hands back the locally trained adapter. The data stays
 * here; only the adapter, counts and aggregate metrics leave.
 */
import type { TensorMap } from '../../common/tensor.ts';
import { logger } from '../../common/log.ts';
import type { LoadedModel, LoraConfig } from '../../common/model-config.ts';
import { Engine } from '../engine/engine.ts';
import { loadBaseModel, parseQuantizeBase } from '../engine/quantize.ts';
import { parseComputeDtype } from '../engine/half.ts';
import { deviceMemory, planRun, withOwnMemory } from '../engine/memory-plan.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { AdamW, loraPlusGroups, taskSchedule } from '../../common/optim.ts';
import { checkProxMu, dpTrainLoop, padBatchRows, trainLoop, type StepInfo } from '../engine/train.ts';
import { checkDpSgd, dpSgdSteps, secretPoissonSampler } from '../../common/privacy/dp-sgd.ts';
import { loraTargets, validateAdapter } from '../../common/lora.ts';
import { makeBatches } from '../data/batching.ts';
import { prepareDataset } from '../data/prepare.ts';
import { resolveTemplate } from '../../common/data/template.ts';
import type { Example } from '../../common/data/tokenize.ts';
import type { Batch } from '../../common/model-config.ts';
import { localSgd, sumGradients } from './step.ts';
import {
  optimizerStateKey,
  type EvalOutcome,
  type GradientOutcome,
  type LocalStepsOutcome,
  type LocalTrainingSpec,
  type TrainArgs,
  type TrainOutcome,
  type Trainer,
  type TrainerFactoryOptions,
} from './trainer.ts';

const log = logger('onnx-trainer');

export async function createOnnxTrainer(opts: TrainerFactoryOptions): Promise<Trainer> {
  // --quantize-base: the decoder linear weights are held 4-bit from here on; --compute-dtype float16: the
  // matrices in float16 (the fingerprint stays the checkpoint's).
  const model = await loadBaseModel(opts.modelDir, parseQuantizeBase(opts.quantizeBase, '--quantize-base'), { compute: parseComputeDtype(opts.computeDtype) });
  const tok = await loadTokenizer(opts.modelDir);
  // training.template auto: this site's copy of the model's chat_template.
  const template = await resolveTemplate(opts.template, opts.modelDir);
  // No local data (dataPath ''): a distributed-mode worker gets its shard from the coordinator.
  const data = opts.dataPath
    ? await prepareDataset(opts.dataPath, tok, {
        template,
        maxSeqLen: opts.maxSeqLen,
        evalFraction: opts.evalPath ? 0 : opts.evalFraction,
        seed: opts.seed,
      })
    : { train: [], eval: [], dropped: 0 };
  let evalSet = data.eval;
  if (opts.evalPath) {
    evalSet = (await prepareDataset(opts.evalPath, tok, { template, maxSeqLen: opts.maxSeqLen, seed: opts.seed })).train;
  }
  log.info({ train: data.train.length, eval: evalSet.length, dropped: data.dropped, model: model.config.modelType }, 'local data loaded');
  return new OnnxTrainer(model, data.train, evalSet, tok.padId, opts);
}

/** Options the plain and the DP-SGD training loops take alike from a task. */
function loopOptions(args: TrainArgs, anchor: TensorMap | null, steps: number, optimizer: AdamW) {
  const { spec } = args;
  const { schedule, offset } = taskSchedule(spec, steps);
  return {
    steps,
    optimizer,
    schedule,
    scheduleOffset: offset,
    signal: args.signal,
    ...(anchor ? { proximal: { mu: spec.proxMu, anchor } } : {}),
    ...(spec.freezeLoraA ? { frozen: isLoraA } : {}),
    onStep: (s: StepInfo) => args.onProgress({ step: s.step, totalSteps: s.totalSteps, loss: s.loss, tokensPerSec: s.tokensPerSec, examples: s.examples }),
  };
}

class OnnxTrainer implements Trainer {
  readonly backend = 'onnx';
  private readonly engines = new Map<string, Engine>();
  private readonly planned = new Set<string>();
  /** training.optimizer_scope 'run': the AdamW the last train task ended with, and what it was for. */
  private kept: { key: string; optimizer: AdamW } | null = null;

  constructor(
    private readonly model: LoadedModel,
    private readonly trainSet: Example[],
    private readonly evalSet: Example[],
    private readonly padId: number,
    private readonly opts: TrainerFactoryOptions,
  ) {}

  get device(): string {
    const e = this.engines.values().next().value as Engine | undefined;
    return e?.device ?? (this.opts.device === 'cuda' ? 'cuda' : 'cpu');
  }
  get numTrainExamples(): number {
    return this.trainSet.length;
  }
  get numEvalExamples(): number {
    return this.evalSet.length;
  }
  get modelFingerprint(): string {
    return this.model.fingerprint;
  }

  /** Refuses a task whose step cannot fit in memory (worker/engine/memory-plan.ts); each batch shape is planned once. */
  private checkMemory(spec: LocalTrainingSpec): void {
    const key = JSON.stringify([spec.batchSize, spec.gradAccumulation > 1, spec.lora]);
    if (this.planned.has(key)) return;
    planRun(this.model.config, {
      mode: 'lora',
      lora: spec.lora,
      batchSize: spec.batchSize,
      seqLen: this.opts.maxSeqLen,
      recompute: this.opts.recompute ?? false,
      ...(this.opts.quantizeBase ? { quantizeBase: this.opts.quantizeBase } : {}),
      ...(this.opts.computeDtype ? { computeDtype: this.opts.computeDtype } : {}),
      accumulate: spec.gradAccumulation > 1,
      device: this.opts.device ?? 'cpu',
    }, undefined, withOwnMemory(deviceMemory(this.opts.device ?? 'cpu')));
    this.planned.add(key);
  }

  private engineFor(lora: LoraConfig): Engine {
    const key = JSON.stringify([
      lora.r,
      lora.alpha,
      lora.dropout,
      [...lora.targetModules].sort(),
      lora.useRslora ?? false,
      lora.useDora ?? false,
      // In order: PEFT tries pattern keys in order.
      Object.entries(lora.rankPattern ?? {}),
      Object.entries(lora.alphaPattern ?? {}),
      lora.layersToTransform ?? [],
      lora.layersPattern ?? [],
    ]);
    let e = this.engines.get(key);
    if (!e) {
      e = Engine.create(this.model, {
        mode: 'lora',
        lora,
        threads: this.opts.threads,
        device: this.opts.device,
        seed: this.opts.seed,
        quantizeBase: this.opts.quantizeBase,
        recompute: this.opts.recompute ?? false,
        computeDtype: this.opts.computeDtype ?? 'float32',
      });
      this.engines.set(key, e);
    }
    return e;
  }

  /**
   * The task's AdamW: a fresh one, or with training.optimizer_scope 'run' the one the last train
   * task of the same run ended with, when it had the same adapter tensors and shapes and the same
   * decay and LoRA+ groups (a site whose rank changes starts afresh).
   */
  private optimizerFor(args: TrainArgs): AdamW {
    const { spec } = args;
    const fresh = (): AdamW => new AdamW({ lr: spec.lr, weightDecay: spec.weightDecay, groups: loraPlusGroups(spec.loraPlusRatio) });
    if (!spec.keepOptimizerState) {
      this.kept = null;
      return fresh();
    }
    const key = optimizerStateKey(args);
    if (this.kept?.key !== key) {
      if (this.kept) log.info({ round: args.round }, 'optimizer state not kept: the adapter or the run changed; a fresh AdamW');
      this.kept = { key, optimizer: fresh() };
    }
    return this.kept.optimizer;
  }

  async train(args: TrainArgs): Promise<TrainOutcome> {
    try {
      return await this.trainTask(args);
    } catch (err) {
      this.kept = null; // a task that failed part-way leaves no state to continue from
      throw err;
    }
  }

  private async trainTask(args: TrainArgs): Promise<TrainOutcome> {
    const { spec } = args;
    checkProxMu(spec.proxMu);
    this.checkGlobalAdapter(args.globalAdapter, spec.lora);
    // The memory plan of this task's batch shape, before any session is built: a task that cannot fit is refused.
    this.checkMemory(spec);
    const engine = this.engineFor(spec.lora);
    const params = toFloat32(args.globalAdapter);
    // FedProx pulls towards the adapter this task started from: a copy, since params change in place.
    const anchor = spec.proxMu > 0 ? toFloat32(args.globalAdapter) : null;
    if (spec.dpSgd) return this.trainDpSgd(args, engine, params, anchor, spec.dpSgd);
    const batchesPerEpoch = Math.ceil(this.trainSet.length / spec.batchSize);
    const steps = spec.steps ?? Math.max(1, Math.ceil(((spec.epochs ?? 1) * batchesPerEpoch) / spec.gradAccumulation));
    const seedBase = spec.seed * 1_000_003 + args.round * 7919;
    const result = await trainLoop({
      engine,
      params,
      epochBatches: (epoch) =>
        makeBatches(this.trainSet, { batchSize: spec.batchSize, padId: this.padId, shuffle: true, seed: seedBase + epoch, maxSeqLen: spec.maxSeqLen }),
      gradAccumulation: spec.gradAccumulation,
      maxGradNorm: spec.maxGradNorm,
      ...loopOptions(args, anchor, steps, this.optimizerFor(args)),
    });
    return this.outcome(params, result, anchor, {});
  }

  /**
   * DP-SGD (privacy.dp_sgd): Poisson batches drawn from the OS CSPRNG (secret to
   * the site), per-example clipping in the graph, Gaussian noise from the OS CSPRNG.
   */
  private async trainDpSgd(
    args: TrainArgs,
    engine: Engine,
    params: TensorMap,
    anchor: TensorMap | null,
    dp: NonNullable<LocalTrainingSpec['dpSgd']>,
  ): Promise<TrainOutcome> {
    const { spec } = args;
    checkDpSgd(dp);
    if (this.trainSet.length === 0) throw new Error('privacy.dp_sgd: this site has no training examples to sample from');
    const steps = dpSgdSteps(spec, dp.sampleRate);
    const sample = secretPoissonSampler(this.trainSet.length, dp.sampleRate);
    const result = await dpTrainLoop({
      engine,
      params,
      numRecords: this.trainSet.length,
      sample,
      microBatches: (indices) =>
        makeBatches(indices.map((i) => this.trainSet[i]!), { batchSize: spec.batchSize, padId: this.padId, shuffle: false, seed: 0, maxSeqLen: spec.maxSeqLen })
          .map((b) => padBatchRows(b, spec.batchSize, this.padId)),
      dp,
      ...loopOptions(args, anchor, steps, this.optimizerFor(args)),
    });
    return this.outcome(params, result, anchor, { dp_clipped_fraction: result.clippedFraction, dp_mean_batch_size: result.meanBatchSize });
  }

  /** What a training task reports: the adapter and the loop's metrics (plus `extra`). */
  private outcome(
    params: TensorMap,
    result: { meanLoss: number; lastLoss: number; tokens: number; steps: number; seconds: number; proxLoss: number },
    anchor: TensorMap | null,
    extra: Record<string, number>,
  ): TrainOutcome {
    return {
      adapter: params,
      numExamples: this.trainSet.length,
      metrics: {
        train_loss: result.meanLoss,
        last_loss: result.lastLoss,
        tokens: result.tokens,
        steps: result.steps,
        train_seconds: result.seconds,
        tokens_per_sec: result.seconds > 0 ? result.tokens / result.seconds : 0,
        ...extra,
        ...(anchor ? { prox_loss: result.proxLoss } : {}),
      },
    };
  }

  /**
   * The global adapter must have exactly the keys and shapes of this task's
   * LoRA settings (in mixed-rank runs each site has its own rank in spec.lora.r).
   */
  private checkGlobalAdapter(adapter: TensorMap, lora: LoraConfig): void {
    const targets = loraTargets(this.model.config, lora);
    const ranks = new Set<number>();
    for (const [name, t] of adapter) if (isLoraA(name) && t.shape.length === 2) ranks.add(t.shape[0]!);
    const got = [...ranks].sort((a, b) => a - b);
    // Uniform-rank check (skipped with rank_pattern, whose modules have their own ranks; validateAdapter checks each).
    if (!targets.some((t) => t.pattern) && got.length > 0 && (got.length > 1 || got[0] !== lora.r)) {
      throw new Error(
        `global adapter has LoRA rank ${got.join(', ')} (first dimension of its lora_A tensors) but this task's lora.r is ${lora.r}; ` +
          'the coordinator must send an adapter of the rank it assigns to this site',
      );
    }
    try {
      validateAdapter(adapter, targets); // each module at its own rank
    } catch (e) {
      throw new Error(`global adapter received for training: ${(e as Error).message}`);
    }
  }

  async evaluate(args: { globalAdapter: TensorMap; spec: LocalTrainingSpec; signal: AbortSignal }): Promise<EvalOutcome | null> {
    if (this.evalSet.length === 0) return null;
    const engine = this.engineFor(args.spec.lora);
    const batches = makeBatches(this.evalSet, {
      batchSize: args.spec.batchSize,
      padId: this.padId,
      shuffle: false,
      seed: 0,
      maxSeqLen: args.spec.maxSeqLen,
    });
    const r = await engine.evaluate(toFloat32(args.globalAdapter), batches);
    return { evalLoss: r.loss, evalTokens: r.tokens, evalExamples: r.examples, evalAccuracy: r.exactMatch };
  }

  async computeGradients(args: { params: TensorMap; batches: Batch[]; spec: LocalTrainingSpec; signal: AbortSignal }): Promise<GradientOutcome> {
    refuseDistributedDp(args.spec);
    return sumGradients(this.engineFor(args.spec.lora), toFloat32(args.params), args.batches, args.signal);
  }

  async localSteps(args: { params: TensorMap; steps: Batch[][]; lrs: number[]; optimizer: AdamW; spec: LocalTrainingSpec; signal: AbortSignal }): Promise<LocalStepsOutcome> {
    refuseDistributedDp(args.spec);
    return localSgd(this.engineFor(args.spec.lora), { ...args, maxGradNorm: args.spec.maxGradNorm });
  }

  async close(): Promise<void> {
    for (const e of this.engines.values()) await e.close();
    this.engines.clear();
  }
}

function refuseDistributedDp(spec: LocalTrainingSpec): void {
  if (spec.dpSgd) throw new Error('privacy.dp_sgd applies to federated training tasks only, not distributed-mode gradient steps; remove privacy.dp_sgd or use mode: federated');
}

/** FFA-LoRA freezes these: PEFT's `<module>.lora_A.weight`. */
function isLoraA(name: string): boolean {
  return name.endsWith('.lora_A.weight');
}

function toFloat32(m: TensorMap): TensorMap {
  const out: TensorMap = new Map();
  for (const [k, t] of m) out.set(k, { shape: [...t.shape], data: Float32Array.from(t.data) });
  return out;
}
