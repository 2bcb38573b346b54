/**
 * The built-in trainer: trains the global LoRA adapter on this site's data with
 * the ONNX engine and hands back the locally trained adapter. The data stays
 * here; only the adapter, counts and aggregate metrics leave.
 */
import type { TensorMap } from '../../common/tensor.ts';
import { logger } from '../../common/log.ts';
import type { LoadedModel, LoraConfig } from '../../common/model-config.ts';
import { Engine } from '../engine/engine.ts';
import { loadModel } from '../engine/model.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { AdamW } from '../../common/optim.ts';
import { trainLoop } from '../engine/train.ts';
import { makeBatches } from '../data/batching.ts';
import { prepareDataset } from '../data/prepare.ts';
import type { Example } from '../../common/data/tokenize.ts';
import type { Batch } from '../../common/model-config.ts';
import { localSgd, sumGradients } from './step.ts';
import type {
  EvalOutcome,
  GradientOutcome,
  LocalStepsOutcome,
  LocalTrainingSpec,
  TrainArgs,
  TrainOutcome,
  Trainer,
  TrainerFactoryOptions,
} from './trainer.ts';

const log = logger('onnx-trainer');

export async function createOnnxTrainer(opts: TrainerFactoryOptions): Promise<Trainer> {
  const model = await loadModel(opts.modelDir);
  const tok = await loadTokenizer(opts.modelDir);
  // No local data (dataPath ''): a distributed-mode worker gets its shard from the coordinator.
  const data = opts.dataPath
    ? await prepareDataset(opts.dataPath, tok, {
        template: opts.template,
        maxSeqLen: opts.maxSeqLen,
        evalFraction: opts.evalPath ? 0 : opts.evalFraction,
        seed: opts.seed,
      })
    : { train: [], eval: [], dropped: 0 };
  let evalSet = data.eval;
  if (opts.evalPath) {
    evalSet = (await prepareDataset(opts.evalPath, tok, { template: opts.template, maxSeqLen: opts.maxSeqLen, seed: opts.seed })).train;
  }
  if (data.dropped > 0) log.warn({ dropped: data.dropped }, 'records dropped: their response does not fit in max_seq_len');
  log.info({ train: data.train.length, eval: evalSet.length, model: model.config.modelType }, 'local data loaded');
  return new OnnxTrainer(model, data.train, evalSet, tok.padId, opts);
}

class OnnxTrainer implements Trainer {
  readonly backend = 'onnx';
  private readonly engines = new Map<string, Engine>();

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

  private engineFor(lora: LoraConfig): Engine {
    const key = JSON.stringify([lora.r, lora.alpha, lora.dropout, [...lora.targetModules].sort()]);
    let e = this.engines.get(key);
    if (!e) {
      e = Engine.create(this.model, { mode: 'lora', lora, threads: this.opts.threads, device: this.opts.device, seed: this.opts.seed });
      this.engines.set(key, e);
    }
    return e;
  }

  async train(args: TrainArgs): Promise<TrainOutcome> {
    const { spec } = args;
    const engine = this.engineFor(spec.lora);
    const params = toFloat32(args.globalAdapter);
    const batchesPerEpoch = Math.ceil(this.trainSet.length / spec.batchSize);
    const steps = spec.steps ?? Math.max(1, Math.ceil(((spec.epochs ?? 1) * batchesPerEpoch) / spec.gradAccumulation));
    const seedBase = spec.seed * 1_000_003 + args.round * 7919;
    const result = await trainLoop({
      engine,
      params,
      epochBatches: (epoch) =>
        makeBatches(this.trainSet, { batchSize: spec.batchSize, padId: this.padId, shuffle: true, seed: seedBase + epoch, maxSeqLen: spec.maxSeqLen }),
      steps,
      gradAccumulation: spec.gradAccumulation,
      optimizer: new AdamW({ lr: spec.lr, weightDecay: spec.weightDecay }),
      schedule: { kind: spec.schedule, baseLr: spec.lr, warmupSteps: spec.warmupSteps, totalSteps: steps },
      maxGradNorm: spec.maxGradNorm,
      signal: args.signal,
      onStep: (s) =>
        args.onProgress({ step: s.step, totalSteps: s.totalSteps, loss: s.loss, tokensPerSec: s.tokensPerSec, examples: s.examples }),
    });
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
      },
    };
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
    return sumGradients(this.engineFor(args.spec.lora), toFloat32(args.params), args.batches, args.signal);
  }

  async localSteps(args: { params: TensorMap; steps: Batch[][]; lrs: number[]; optimizer: AdamW; spec: LocalTrainingSpec; signal: AbortSignal }): Promise<LocalStepsOutcome> {
    return localSgd(this.engineFor(args.spec.lora), { ...args, maxGradNorm: args.spec.maxGradNorm });
  }

  async close(): Promise<void> {
    for (const e of this.engines.values()) await e.close();
    this.engines.clear();
  }
}

function toFloat32(m: TensorMap): TensorMap {
  const out: TensorMap = new Map();
  for (const [k, t] of m) out.set(k, { shape: [...t.shape], data: Float32Array.from(t.data) });
  return out;
}
