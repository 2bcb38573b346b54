/**
 * A worker's side of distributed mode: a StepTask names the global adapter
 * version, a data shard (downloaded once per epoch plan and cached) and which of
 * the shard's micro-batches to use. The worker either
 *
 *   GRADIENT: sums the gradients of the summed token loss over those
 *             micro-batches and uploads them with the token count, or
 *   DELTA:    (local SGD) takes one local AdamW step per group of
 *             micro-batches at the learning rates the task gives, and uploads
 *             local - global.
 *
 * The engine math lives here (sumGradients, localSgd) so that any trainer
 * backend with an Engine can offer computeGradients / localSteps.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { TensorMap } from '../../common/tensor.ts';
import { logger } from '../../common/log.ts';
import { UpdateKind, type StepTask, type TrainingSpec } from '../../proto/gen/fedtune/v1/coordinator.ts';
import { makeBatches } from '../data/batching.ts';
import { loadRecords, type SftRecord } from '../../common/data/dataset.ts';
import { tokenizeRecord, type Example, type Tokenizer } from '../../common/data/tokenize.ts';
import type { Batch } from '../../common/model-config.ts';
import type { Engine } from '../engine/engine.ts';
import { AdamW, clipGradNorm, loraPlusGroups } from '../../common/optim.ts';
import { addInto, scaleInPlace } from '../engine/train.ts';
import { decodeShard, fromRanges, type Shard } from '../../common/shard.ts';
import { resolveTemplate } from '../../common/data/template.ts';
import type { GradientOutcome, LocalStepsOutcome, LocalTrainingSpec, Trainer } from './trainer.ts';

const log = logger('worker.step');

/** Sum of the summed-loss gradients over `batches` (in order, float32, as train.ts accumulates). */
export async function sumGradients(engine: Engine, params: TensorMap, batches: readonly Batch[], signal?: AbortSignal): Promise<GradientOutcome> {
  if (batches.length === 0) throw new Error('no micro-batches to compute gradients on');
  let sum: TensorMap | null = null;
  let lossSum = 0;
  let tokens = 0;
  let examples = 0;
  for (const b of batches) {
    signal?.throwIfAborted();
    const r = await engine.lossAndGrads(params, b);
    lossSum += r.lossSum;
    tokens += r.tokens;
    examples += b.batchSize;
    sum = sum ? addInto(sum, r.grads) : r.grads;
  }
  return { grads: sum!, lossSum, tokens, examples };
}

/** Local SGD: one clipped AdamW step per non-empty entry of `steps`, in place on params. */
export async function localSgd(
  engine: Engine,
  args: { params: TensorMap; steps: Batch[][]; lrs: number[]; optimizer: AdamW; maxGradNorm: number; signal?: AbortSignal },
): Promise<LocalStepsOutcome> {
  if (args.lrs.length !== args.steps.length) throw new Error(`${args.steps.length} local steps but ${args.lrs.length} learning rates`);
  let lossSum = 0;
  let tokens = 0;
  let examples = 0;
  let steps = 0;
  for (const [h, batches] of args.steps.entries()) {
    if (batches.length === 0) continue;
    const g = await sumGradients(engine, args.params, batches, args.signal);
    lossSum += g.lossSum;
    tokens += g.tokens;
    examples += g.examples;
    if (g.tokens === 0) continue;
    scaleInPlace(g.grads, 1 / g.tokens);
    const norm = clipGradNorm(g.grads, args.maxGradNorm);
    if (!Number.isFinite(norm)) throw new Error(`local step ${h + 1}: gradient norm is ${norm}`);
    args.optimizer.step(args.params, g.grads, args.lrs[h]!);
    steps++;
  }
  return { lossSum, tokens, examples, steps };
}

export interface StepIo {
  /** The task's global adapter (cached by version by the caller). */
  fetchGlobal(): Promise<TensorMap>;
  /** The shard's bytes, digest already checked against the reference. */
  downloadShard(shardId: string, sha256: Uint8Array): Promise<Uint8Array>;
  upload(header: { kind: UpdateKind; numExamples: number; metrics: Record<string, number> }, tensors: TensorMap): Promise<{ bytes: number }>;
}

export interface StepResult {
  kind: UpdateKind;
  metrics: Record<string, number>;
  bytes: number;
}

function copyF32(m: TensorMap): TensorMap {
  const out: TensorMap = new Map();
  for (const [k, t] of m) out.set(k, { shape: [...t.shape], data: Float32Array.from(t.data) });
  return out;
}

/** Runs StepTasks for one worker: shard cache, inner optimizer of local SGD, gradient / delta upload. */
export class StepRunner {
  private shard: { id: string; sha: string; batches: Batch[] } | null = null;
  private tokenizer: Promise<Tokenizer> | null = null;
  private records: { key: string; records: SftRecord[] } | null = null;
  private inner: { key: string; optimizer: AdamW } | null = null;

  constructor(
    private readonly trainer: Trainer,
    private readonly opts: { modelDir: string; runId: string; localSpec: (s: TrainingSpec) => LocalTrainingSpec },
  ) {}

  async run(task: StepTask, io: StepIo, signal: AbortSignal, onPhase?: (phase: 'fetching' | 'training' | 'uploading') => void): Promise<StepResult> {
    const tr = this.trainer;
    const spec = this.opts.localSpec(task.spec ?? ({} as TrainingSpec));
    const ref = task.shard;
    if (!ref || !ref.shardId) throw new Error('step task names no data shard');
    const t0 = performance.now();
    onPhase?.('fetching');
    const global = await io.fetchGlobal();
    const batches = await this.shardBatches(ref.shardId, ref.sha256, ref.mediaType, spec, io);
    const start = Number(task.microBatchStart);
    const count = Number(task.microBatchCount);
    if (count < 1 || start + count > batches.length) {
      throw new Error(`step task asks for micro-batches ${start}..${start + count - 1} of shard ${ref.shardId}, which holds ${batches.length}`);
    }
    const mine = batches.slice(start, start + count);
    signal.throwIfAborted();
    const fetchMs = performance.now() - t0;
    onPhase?.('training');
    const t1 = performance.now();
    if (task.uploadKind === UpdateKind.UPDATE_KIND_GRADIENT) {
      if (!tr.computeGradients) throw new Error(`the ${tr.backend} trainer cannot compute gradients (distributed mode needs the onnx trainer)`);
      const g = await tr.computeGradients({ params: global, batches: mine, spec, signal });
      const computeMs = performance.now() - t1;
      signal.throwIfAborted();
      onPhase?.('uploading');
      const metrics = { loss_sum: g.lossSum, tokens: g.tokens, examples: g.examples, compute_ms: computeMs, fetch_ms: fetchMs };
      const ack = await io.upload({ kind: UpdateKind.UPDATE_KIND_GRADIENT, numExamples: Math.max(1, g.examples), metrics }, g.grads);
      return { kind: UpdateKind.UPDATE_KIND_GRADIENT, metrics, bytes: ack.bytes };
    }
    if (task.uploadKind !== UpdateKind.UPDATE_KIND_DELTA) throw new Error(`step task upload kind ${UpdateKind[task.uploadKind] ?? task.uploadKind} is not supported (allowed: GRADIENT, DELTA)`);
    if (!tr.localSteps) throw new Error(`the ${tr.backend} trainer cannot take local steps (local SGD needs the onnx trainer)`);
    const per = task.microBatchesPerStep;
    if (per.reduce((a, b) => a + b, 0) !== count || task.localLrs.length !== per.length) {
      throw new Error(`step task: micro_batches_per_step ${JSON.stringify(per)} must sum to micro_batch_count ${count} and match local_lrs (${task.localLrs.length})`);
    }
    const steps: Batch[][] = [];
    let off = 0;
    for (const n of per) {
      steps.push(mine.slice(off, off + n));
      off += n;
    }
    const params = copyF32(global);
    const r = await tr.localSteps({ params, steps, lrs: [...task.localLrs], optimizer: this.innerOptimizer(spec), spec, signal });
    const computeMs = performance.now() - t1;
    signal.throwIfAborted();
    const delta: TensorMap = new Map();
    for (const [k, p] of params) {
      const g = global.get(k)!;
      const d = new Float32Array(p.data.length);
      for (let i = 0; i < d.length; i++) d[i] = p.data[i]! - g.data[i]!;
      delta.set(k, { shape: [...p.shape], data: d });
    }
    onPhase?.('uploading');
    const metrics = { loss_sum: r.lossSum, tokens: r.tokens, examples: r.examples, local_steps: r.steps, compute_ms: computeMs, fetch_ms: fetchMs };
    const ack = await io.upload({ kind: UpdateKind.UPDATE_KIND_DELTA, numExamples: Math.max(1, r.examples), metrics }, delta);
    return { kind: UpdateKind.UPDATE_KIND_DELTA, metrics, bytes: ack.bytes };
  }

  /** DiLoCo keeps each worker's inner AdamW state across syncs; it lives here, per run and LoRA shape. */
  private innerOptimizer(spec: LocalTrainingSpec): AdamW {
    const key = JSON.stringify([this.opts.runId, spec.lora.r, spec.lora.targetModules, spec.weightDecay, spec.loraPlusRatio]);
    if (this.inner?.key !== key) {
      this.inner = { key, optimizer: new AdamW({ lr: spec.lr, weightDecay: spec.weightDecay, groups: loraPlusGroups(spec.loraPlusRatio) }) };
    }
    return this.inner.optimizer;
  }

  private async shardBatches(id: string, sha: Uint8Array, mediaType: string, spec: LocalTrainingSpec, io: StepIo): Promise<Batch[]> {
    const shaHex = Buffer.from(sha).toString('hex');
    if (this.shard?.id === id && this.shard.sha === shaHex) return this.shard.batches;
    const bytes = await io.downloadShard(id, sha);
    const shard = decodeShard(bytes, mediaType, `data shard ${id}`);
    const micro = shard.kind === 'examples' ? shard.microBatches : await this.resolveIndex(shard, spec);
    const batches = micro.map((mb) => makeBatches(mb, { batchSize: mb.length, padId: shard.padId, shuffle: false, seed: 0, maxSeqLen: shard.maxSeqLen })[0]!);
    this.shard = { id, sha: shaHex, batches };
    log.info({ shard: id, kind: shard.kind, epoch: shard.epoch, microBatches: batches.length, examples: micro.reduce((n, mb) => n + mb.length, 0) }, 'data shard loaded');
    return batches;
  }

  /** Shared storage: read the records the index names from the dataset file and tokenize them as the coordinator did. */
  private async resolveIndex(shard: Extract<Shard, { kind: 'index' }>, spec: LocalTrainingSpec): Promise<Example[][]> {
    const key = `${shard.path}\0${shard.sha256}`;
    if (this.records?.key !== key) {
      let bytes: Buffer;
      try {
        bytes = await readFile(shard.path);
      } catch (err) {
        throw new Error(`data shard ${shard.shardId}: cannot read the shared dataset ${shard.path} (${(err as NodeJS.ErrnoException).code ?? String(err)}); distributed.worker_dataset_path must name it as the workers see it`);
      }
      const digest = createHash('sha256').update(bytes).digest('hex');
      if (digest !== shard.sha256) {
        throw new Error(`data shard ${shard.shardId}: ${shard.path} on this worker has SHA-256 ${digest}, the coordinator's dataset has ${shard.sha256}; the shared file differs`);
      }
      this.records = { key, records: await loadRecords(shard.path) };
    }
    const records = this.records.records;
    this.tokenizer ??= import('../../common/tokenizer.ts').then((m) => m.loadTokenizer(this.opts.modelDir));
    const tok = await this.tokenizer;
    const template = await resolveTemplate(spec.template, this.opts.modelDir); // auto: the model's chat_template
    return shard.microBatches.map((ranges, k) =>
      fromRanges(ranges).map((i) => {
        const rec = records[i];
        if (!rec) throw new Error(`data shard ${shard.shardId}: micro-batch ${k} names record ${i}, ${shard.path} has ${records.length}`);
        const ex = tokenizeRecord(tok, rec, { template, maxSeqLen: shard.maxSeqLen });
        if (!ex) throw new Error(`data shard ${shard.shardId}: record ${i} (${rec.source.file}:${rec.source.line}) has no trained token within max_seq_len ${shard.maxSeqLen}`);
        return ex;
      }),
    );
  }
}
