/**
 * The distributed step loop. Step s (0-based):
 *
 *   plan: at each epoch boundary, the connected workers split the epoch's steps
 *   (plan.ts); each downloads its shard once -> a StepTask goes down each
 *   worker holding micro-batches of step s -> each uploads the summed gradient
 *   of its micro-batches (service.ts checks the stream, acceptUpdate() checks
 *   values and token count and folds it into one float64 sum) -> all in: divide
 *   by the total tokens, clip, AdamW at lrAt(s), new adapter version ->
 *   step.completed -> every checkpoint_every steps a checkpoint.
 *
 * A worker that leaves, misses the step deadline, fails its task, or sends a
 * gradient that is refused (wrong shape, NaN, wrong token count) is dropped
 * for the rest of the epoch: the remaining steps of the epoch are planned again
 * over the others (new shards) and the step is retried with them. The global
 * batch of a step never changes, so the result does not either. Workers that
 * join mid-run get a shard at the next epoch boundary.
 *
 * With distributed.sync_every = H > 1 (local SGD), one task covers H steps:
 * each worker takes its local AdamW steps on its micro-batches of those steps
 * and uploads its parameter delta; the coordinator applies the outer optimizer
 * to the token-weighted mean delta.
 */
import { randomBytes } from 'node:crypto';
import { findNonFinite, sha256, unpackTensorMap, type TensorSpecEntry } from '../../common/chunks.ts';
import { logger } from '../../common/log.ts';
import {
  UpdateKind,
  type EvalResult,
  type TaskFailed,
  type TaskProgress,
  type TrainingSpec,
  type UploadHeader,
} from '../../proto/gen/fedtune/v1/coordinator.ts';
import { encodeShard, toRanges, type Shard } from '../../common/shard.ts';
import { lrAt, type Schedule } from '../../common/optim.ts';
import { RunBase, manifestMismatch, type RunBaseOptions, type RunResult } from '../run-base.ts';
import type { DistributedSetup } from './setup.ts';
import type { CheckpointStore } from '../store.ts';
import type { FlatSum, StepStrategy } from '../strategies/steps.ts';
import { TaskBoard, trainingSpecOf, UpdateRejected, type TaskBase } from '../tasks.ts';
import type { RegistryListener, WorkerRecord } from '../workers.ts';
import { DataOrder, planEpoch, type DistributedDataset, type EpochPlan } from './plan.ts';
import { STEPS_LOG, type DistributedStateFile, type StepRecord } from './store.ts';

const log = logger('coordinator.distributed');

export interface StepTaskState extends TaskBase {
  /** First global step (0-based) and how many the task covers. */
  step: number;
  span: number;
  kind: UpdateKind;
  expectedTokens: number;
  expectedExamples: number;
  lossSum: number;
  computeMs: number;
}

export type DistributedRunOptions = Omit<RunBaseOptions, 'state'> & DistributedSetup;

interface ShardEntry {
  bytes: Uint8Array;
  sha256: Uint8Array;
  mediaType: string;
  microBatches: number;
}

interface ActivePlan extends EpochPlan {
  /** Shard id of each plan worker (same index as workers). */
  shardIds: string[];
}

export class DistributedRun extends RunBase implements RegistryListener {
  private readonly store: CheckpointStore<DistributedStateFile>;
  private readonly data: DistributedDataset;
  private readonly order: DataOrder;
  private readonly strategy: StepStrategy;
  private readonly state: DistributedStateFile;
  private readonly spec: TrainingSpec;
  private readonly schedule: Schedule;
  private readonly syncEvery: number;
  private readonly nonce = randomBytes(3).toString('hex');
  private readonly board: TaskBoard<StepTaskState>;
  private readonly shards = new Map<string, ShardEntry>();
  private plan: ActivePlan | null = null;
  private planSeq = 0;
  /** Workers dropped during the current epoch (they come back at the next epoch boundary). */
  private readonly dropped = new Map<string, string>();
  /** Sum of the open attempt's uploads, with its identity. */
  private open: { step: number; attempt: number; sum: FlatSum; tokens: number } | null = null;
  private stepBytesDown = 0;
  /** Highest step whose step.completed event the log holds (a resumed run recomputes steps after its checkpoint). */
  private loggedSteps = 0;

  constructor(o: DistributedRunOptions) {
    super(o);
    this.store = o.store;
    this.data = o.data;
    this.order = o.order;
    this.strategy = o.strategy;
    this.board = new TaskBoard<StepTaskState>(o.registry, (t) => `of step ${t.step + 1}`);
    this.state = o.state;
    this.spec = trainingSpecOf(o.cfg);
    const t = o.cfg.training;
    this.schedule = { kind: t.schedule, baseLr: t.lr, warmupSteps: t.warmup_steps, totalSteps: o.state.totalSteps };
    this.syncEvery = o.cfg.distributed.sync_every;
  }




  /** A data shard of the current plan, for Download. */
  dataShard(shardId: string): ShardEntry | undefined {
    return this.shards.get(shardId);
  }

  // ------------------------------------------------------------------ registry events


  onWorkerGone(w: WorkerRecord, reason: string): void {
    this.workerLeft(w, reason);
    this.board.failWorker(w.workerId, `worker left (${reason})`);
    this.conditions.notify();
  }

  // ------------------------------------------------------------------ messages from workers


  onProgress(_w: WorkerRecord, _p: TaskProgress): void {
    // Steps are short: step.completed carries what progress would.
  }

  onTaskFailed(w: WorkerRecord, f: TaskFailed): void {
    const t = this.board.get(f.taskId);
    this.taskFailedEvent(w, f);
    if (t && t.workerId === w.workerId && this.board.fail(t, f.unsupported ? `the worker cannot run distributed steps (${f.message})` : f.message)) {
      this.conditions.notify();
    }
  }

  onEvalResult(w: WorkerRecord, r: EvalResult): void {
    log.warn({ worker: w.workerId, task: r.taskId }, 'eval result in distributed mode; ignored');
  }

  onDownloaded(_w: WorkerRecord, bytes: number): void {
    this.stepBytesDown += bytes;
  }

  // ------------------------------------------------------------------ updates

  beginUpdate(w: WorkerRecord, h: UploadHeader, manifest: TensorSpecEntry[]): StepTaskState {
    const open = this.open;
    const t = this.board.beginUpload(
      w,
      h.taskId,
      (t) => open !== null && open.step === t.step && open.attempt === t.attempt,
      (t) =>
        `task ${t.taskId} of step ${t.step + 1} is closed (${t.status === 'cancelled' ? 'deadline passed or the step was retried' : t.status}); the run is at step ${(open?.step ?? this.state.step) + 1}`,
    );
    const reject = (message: string): never => {
      this.fail(t, message);
      this.conditions.notify();
      throw new UpdateRejected('INVALID_ARGUMENT', message);
    };
    if (h.kind !== t.kind) reject(`update kind ${UpdateKind[h.kind] ?? h.kind} is not accepted for this task (expected ${UpdateKind[t.kind]})`);
    if (h.baseVersion !== t.baseVersion) {
      this.fail(t, `computed from adapter version ${h.baseVersion}, the task is on version ${t.baseVersion}`);
      this.conditions.notify();
      throw new UpdateRejected('FAILED_PRECONDITION', `update computed from adapter version ${h.baseVersion}, task ${h.taskId} is on version ${t.baseVersion}`);
    }
    const bad = manifestMismatch(manifest, this.packedGlobal.manifest);
    if (bad) reject(`${t.kind === UpdateKind.UPDATE_KIND_GRADIENT ? 'gradient' : 'delta'} does not match the adapter: ${bad}`);
    const tokens = h.metrics.tokens;
    if (tokens !== t.expectedTokens) {
      reject(`the update reports ${tokens ?? 'no'} trained tokens, the task's micro-batches hold ${t.expectedTokens}`);
    }
    const lossSum = h.metrics.loss_sum;
    if (lossSum === undefined || !Number.isFinite(lossSum)) reject(`metric loss_sum is ${lossSum ?? 'missing'} (a finite number is required)`);
    this.board.markUploading(t);
    return t;
  }

  abandonUpdate(t: StepTaskState): void {
    this.board.reopen(t);
    this.conditions.notify();
  }

  acceptUpdate(w: WorkerRecord, t: StepTaskState, h: UploadHeader, bytes: Uint8Array): void {
    if (t.status !== 'uploading' || !this.open || this.open.step !== t.step || this.open.attempt !== t.attempt) {
      throw new UpdateRejected('FAILED_PRECONDITION', `stale update: step ${t.step + 1} closed while task ${t.taskId} was uploading`);
    }
    const nf = findNonFinite(unpackTensorMap(this.packedGlobal.manifest, bytes));
    if (nf) {
      const message = `${t.kind === UpdateKind.UPDATE_KIND_GRADIENT ? 'gradient' : 'delta'} tensor ${nf.name} has a non-finite value (${nf.value}) at element ${nf.index}`;
      this.fail(t, message);
      this.conditions.notify();
      throw new UpdateRejected('INVALID_ARGUMENT', message);
    }
    const aligned = bytes.byteOffset % 4 === 0 ? bytes : bytes.slice();
    const flat = new Float32Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 4);
    // Gradients are sums over tokens: added as they are. Deltas: weighted by tokens.
    this.strategy.fold(this.open.sum, flat, t.expectedTokens);
    this.open.tokens += t.expectedTokens;
    this.board.done(t, bytes.byteLength);
    t.lossSum = h.metrics.loss_sum ?? 0;
    t.computeMs = Math.max(0, h.metrics.compute_ms ?? 0);
    this.conditions.notify();
  }

  rejectUpdate(w: WorkerRecord, h: Pick<UploadHeader, 'taskId' | 'round'> | null, reason: string): void {
    const t = h ? this.board.get(h.taskId) : undefined;
    this.publish({ type: 'update.rejected', round: t ? t.step + 1 : 0, taskId: h?.taskId ?? '', workerId: w.workerId, site: w.site, reason });
    log.warn({ worker: w.workerId, site: w.site, task: h?.taskId }, `update rejected: ${reason}`);
  }

  // ------------------------------------------------------------------ the loop


  async run(): Promise<RunResult> {
    const total = this.state.totalSteps;
    try {
      return await this.lifecycle(
        { strategy: this.strategy.description, totalRounds: 0, totalSteps: total, resumedFrom: this.state.step },
        async () => {
          if (this.resumed) {
            // Steps after the last checkpoint are computed again; their step.completed events are already logged.
            for (const e of await this.bus.history(this.runId, 0)) if (e.type === 'step.completed') this.loggedSteps = Math.max(this.loggedSteps, e.step);
          }
          while (this.state.step < total) await this.runStep(this.state.step);
          return { steps: this.state.step, tokens: this.state.tokens, trainLoss: this.state.recent.at(-1)?.loss };
        },
        () => ({ n: this.state.step, path: this.store.dir(this.state.step), history: [] }),
      );
    } finally {
      this.open = null;
    }
  }

  private fail(t: StepTaskState, reason: string): void {
    this.board.fail(t, reason);
  }

  private connectedIds(): string[] {
    return this.registry.connected().map((w) => w.workerId);
  }

  /** Wait until `need` workers not dropped this epoch are connected. */
  private async waitForWorkers(need: number, why: string): Promise<string[]> {
    const usable = (): string[] => this.connectedIds().filter((id) => !this.dropped.has(id));
    if (usable().length >= need) return usable();
    this.publish({ type: 'run.state', state: 'waiting', message: `${why}: waiting for ${need} worker(s)` });
    log.info({ need, have: usable().length }, `${why}: waiting for workers`);
    const ok = await this.conditions.waitFor(() => usable().length >= need, Date.now() + this.cfg.cohort.wait_timeout_sec * 1000);
    if (!ok) throw new Error(`${why}: only ${usable().length} worker(s) connected after ${this.cfg.cohort.wait_timeout_sec} s (cohort.wait_timeout_sec); need ${need}`);
    this.publish({ type: 'run.state', state: 'running', message: `${usable().length} worker(s)` });
    return usable();
  }

  /** Plan the rest of the epoch of `step` over `workerIds` and build their shards. */
  private makePlan(step: number, workerIds: string[], reason: string): void {
    const seed = this.cfg.distributed.sharding.seed ?? this.cfg.training.seed;
    const plan = planEpoch(this.order, this.data.tokens, step, workerIds, seed);
    this.planSeq++;
    this.shards.clear();
    const shardIds: string[] = [];
    const shared = this.cfg.distributed.shared_storage;
    for (const [k, wp] of plan.workers.entries()) {
      if (wp.microBatches.length === 0) {
        shardIds.push('');
        continue;
      }
      const shardId = `${this.runId}-${this.nonce}-e${plan.epoch}-p${this.planSeq}-w${k}`;
      const head = { shardId, epoch: plan.epoch, padId: this.data.padId, maxSeqLen: this.data.maxSeqLen };
      const shard: Shard = shared
        ? {
            kind: 'index',
            ...head,
            path: this.cfg.distributed.worker_dataset_path ?? this.data.path,
            sha256: this.data.sha256,
            microBatches: wp.microBatches.map((mb) => toRanges(mb.map((i) => this.data.recordIndex[i]!))),
          }
        : { kind: 'examples', ...head, microBatches: wp.microBatches.map((mb) => mb.map((i) => this.data.examples[i]!)) };
      const { bytes, mediaType } = encodeShard(shard);
      this.shards.set(shardId, { bytes, sha256: sha256(bytes), mediaType, microBatches: wp.microBatches.length });
      shardIds.push(shardId);
    }
    this.plan = { ...plan, shardIds };
    const sizes = plan.workers.map((w) => w.microBatches.length);
    const message = `epoch ${plan.epoch + 1}, steps ${plan.fromStep + 1}-${plan.toStep}: ${workerIds.length} worker(s) (${reason}); micro-batches per worker ${sizes.join('/')}`;
    log.info({ epoch: plan.epoch, from: plan.fromStep, to: plan.toStep, workers: workerIds.length, sizes }, 'data planned');
    this.publish({ type: 'log', level: 'info', message });
  }

  /** Make sure the plan covers `step` with workers that are still connected and not dropped. */
  private async ensurePlan(step: number): Promise<void> {
    const epoch = this.order.epochOf(step);
    if (!this.plan || this.plan.epoch !== epoch) {
      // Epoch boundary: everyone connected takes part, including workers dropped last epoch and new ones.
      this.dropped.clear();
      const need = this.plan ? 1 : this.cfg.cohort.min_workers;
      const ids = await this.waitForWorkers(need, `epoch ${epoch + 1}`);
      this.makePlan(step, ids, this.plan ? 'epoch boundary' : this.resumed ? 'resumed' : 'start');
      return;
    }
    const connected = new Set(this.connectedIds());
    const gone = this.plan.workers.filter((w) => !connected.has(w.workerId) || this.dropped.has(w.workerId));
    if (gone.length === 0) return;
    let ids = this.plan.workers.map((w) => w.workerId).filter((id) => connected.has(id) && !this.dropped.has(id));
    if (ids.length === 0) ids = await this.waitForWorkers(1, `step ${step + 1}`);
    this.makePlan(step, ids, `without ${gone.length} dropped worker(s)`);
  }

  /** Steps the next task covers: 1, or up to sync_every within the epoch and the run. */
  private spanAt(step: number): number {
    if (this.syncEvery === 1) return 1;
    const epochEnd = this.order.epochStart(this.order.epochOf(step) + 1);
    const fromEpochStart = step - this.order.epochStart(this.order.epochOf(step));
    // Syncs start at epoch starts and every sync_every steps after: a resumed run keeps the same boundaries.
    const nextBoundary = step + (this.syncEvery - (fromEpochStart % this.syncEvery));
    return Math.min(nextBoundary, epochEnd, this.state.totalSteps) - step;
  }

  private async runStep(step: number): Promise<void> {
    const cfg = this.cfg;
    const span = this.spanAt(step);
    const started = Date.now();
    this.stepBytesDown = 0;
    const lrs = Array.from({ length: span }, (_, h) => lrAt(step + h, this.schedule));
    const reasons: string[] = [];
    for (let attempt = 0; ; attempt++) {
      await this.ensurePlan(step);
      const plan = this.plan!;
      const kind = this.strategy.upload === 'delta' ? UpdateKind.UPDATE_KIND_DELTA : UpdateKind.UPDATE_KIND_GRADIENT;
      this.open = { step, attempt, sum: this.strategy.aggregator(this.packedGlobal.manifest), tokens: 0 };
      const t0 = Date.now();
      const deadline = t0 + cfg.distributed.step_deadline_sec * 1000 * span;
      const tasks: StepTaskState[] = [];
      for (const [k, wp] of plan.workers.entries()) {
        const per = wp.perStep.slice(step - plan.fromStep, step - plan.fromStep + span);
        const count = per.reduce((n, p) => n + p.count, 0);
        if (count === 0) continue;
        const mbs = wp.microBatches.slice(per[0]!.start, per[0]!.start + count);
        const t = this.newTask(wp.workerId, step, span, attempt, kind, mbs);
        tasks.push(t);
        this.dispatch(t, deadline, plan.shardIds[k]!, per[0]!.start, count, per.map((p) => p.count), lrs, plan.epoch);
      }
      const allIn = await this.conditions.waitFor(() => this.board.settled(tasks), deadline);
      if (!allIn) this.board.cancel(tasks, `missed the step deadline of ${cfg.distributed.step_deadline_sec * span} s`, 'failed');
      const failed = tasks.filter((t) => t.status !== 'done');
      if (failed.length === 0) {
        await this.complete(step, span, attempt, tasks, lrs, started, t0);
        // Tasks of earlier steps are forgotten; this step's stay so that a late or repeated upload gets a precise answer.
        this.board.forget((t) => t.step < step);
        return;
      }
      // Drop the failed workers for the rest of the epoch; the step is retried without them.
      for (const t of failed) {
        this.dropped.set(t.workerId, t.failReason ?? 'failed');
        t.status = 'cancelled';
        const reason = `${t.site}: ${t.failReason ?? 'failed'}`;
        reasons.push(reason);
        this.publish({ type: 'log', level: 'warn', message: `step ${step + 1}: worker ${t.site} (${t.workerId}) dropped: ${t.failReason}; its micro-batches go to the other workers and the step is retried` });
        log.warn({ step: step + 1, worker: t.workerId, site: t.site, attempt }, `worker dropped from the step: ${t.failReason}`);
      }
      for (const t of tasks) if (t.status === 'done') t.status = 'cancelled';
      this.open?.sum.dispose();
      this.open = null;
      if (attempt >= cfg.distributed.max_step_retries) {
        throw new Error(`step ${step + 1} failed ${attempt + 1} time(s) (distributed.max_step_retries is ${cfg.distributed.max_step_retries}): ${reasons.slice(-3).join('; ')}`);
      }
      // Nobody left who is not dropped: give every connected worker another chance (counts as a retry).
      const connected = this.connectedIds();
      if (connected.length > 0 && connected.every((id) => this.dropped.has(id))) this.dropped.clear();
    }
  }

  private newTask(workerId: string, step: number, span: number, attempt: number, kind: UpdateKind, mbs: number[][]): StepTaskState {
    const w = this.registry.get(workerId);
    let tokens = 0;
    let examples = 0;
    for (const mb of mbs) {
      examples += mb.length;
      for (const i of mb) tokens += this.data.tokens[i]!;
    }
    return this.board.add({
      taskId: `s${step + 1}-${attempt}-${randomBytes(4).toString('hex')}`,
      workerId,
      site: w?.site ?? workerId,
      step,
      span,
      attempt,
      baseVersion: this.globalVersion,
      kind,
      status: 'running',
      dispatchedAt: Date.now(),
      uploadStartedAt: null,
      doneAt: null,
      expectedTokens: tokens,
      expectedExamples: examples,
      lossSum: 0,
      computeMs: 0,
      bytesUp: 0,
      failReason: null,
    });
  }

  private dispatch(t: StepTaskState, deadline: number, shardId: string, start: number, count: number, perStep: number[], lrs: number[], epoch: number): void {
    const w = this.registry.get(t.workerId);
    const shard = this.shards.get(shardId)!;
    const local = t.kind === UpdateKind.UPDATE_KIND_DELTA;
    const ok =
      w !== undefined &&
      this.registry.send(w, {
        body: {
          $case: 'task',
          value: {
            taskId: t.taskId,
            round: 0,
            deadlineUnixMs: deadline,
            global: { version: this.globalVersion, totalBytes: this.packedGlobal.bytes.byteLength, sha256: this.packedGlobal.sha256, rank: 0 },
            kind: {
              $case: 'step',
              value: {
                step: t.step,
                shard: { shardId, totalBytes: shard.bytes.byteLength, sha256: shard.sha256, mediaType: shard.mediaType, microBatches: shard.microBatches },
                microBatchStart: start,
                microBatchCount: count,
                spec: this.spec,
                uploadKind: t.kind,
                microBatchesPerStep: local ? perStep : [],
                localLrs: local ? lrs : [],
                epoch,
              },
            },
          },
        },
      });
    if (!ok) this.fail(t, 'could not send the task (session closed)');
  }

  private async complete(step: number, span: number, attempt: number, tasks: StepTaskState[], lrs: number[], started: number, t0: number): Promise<void> {
    const open = this.open!;
    this.open = null;
    const t1 = Date.now();
    const tokens = open.tokens;
    const lossSum = tasks.reduce((s, t) => s + t.lossSum, 0);
    const examples = tasks.reduce((s, t) => s + t.expectedExamples, 0);
    const ta = Date.now();
    const { next, gradNorm } = this.strategy.step(this.globalAdapter, open.sum, tokens, lrs[0]!);
    open.sum.dispose();
    if (gradNorm !== null && !Number.isFinite(gradNorm)) {
      this.publish({ type: 'log', level: 'warn', message: `step ${step + 1}: gradient norm is ${gradNorm}; the update was skipped` });
    }
    this.setGlobal(next, this.globalVersion + 1);
    const aggregateMs = Date.now() - ta;
    const done = step + span;
    const computeMs = Math.max(0, ...tasks.map((t) => t.computeMs));
    const wallMs = t1 - t0;
    const durationMs = Date.now() - started;
    const rec: StepRecord = {
      step: done,
      epoch: this.order.epochOf(step),
      steps: span,
      loss: tokens > 0 ? lossSum / tokens : NaN,
      lr: lrs[0]!,
      gradNorm,
      tokens,
      examples,
      workers: tasks.length,
      retries: attempt,
      durationMs,
      computeMs,
      communicateMs: Math.max(0, wallMs - computeMs),
      aggregateMs,
      bytesUp: tasks.reduce((s, t) => s + t.bytesUp, 0),
      bytesDown: this.stepBytesDown,
      completedAt: new Date().toISOString(),
    };
    this.state.step = done;
    this.state.globalVersion = this.globalVersion;
    this.state.tokens += tokens;
    this.state.recent.push(rec);
    if (this.state.recent.length > 20) this.state.recent.splice(0, this.state.recent.length - 20);
    this.state.updatedAt = rec.completedAt;
    if (done > this.loggedSteps) this.publish({
      type: 'step.completed',
      step: done,
      epoch: rec.epoch,
      loss: rec.loss,
      lr: rec.lr,
      tokens,
      tokensPerSec: durationMs > 0 ? (tokens * 1000) / durationMs : 0,
      workers: tasks.length,
      computeMs,
      communicateMs: rec.communicateMs,
      aggregateMs,
      perWorker: tasks.map((t) => ({
        workerId: t.workerId,
        site: t.site,
        tokens: t.expectedTokens,
        tokensPerSec: t.computeMs > 0 ? (t.expectedTokens * 1000) / t.computeMs : 0,
      })),
    });
    log.info({ step: done, loss: rec.loss, tokens, workers: tasks.length, ms: durationMs }, 'step completed');
    if (done > this.loggedSteps) await this.store.appendLog(STEPS_LOG, rec).catch((err: unknown) => log.warn({ err }, `could not append to ${STEPS_LOG}`));
    const every = this.cfg.distributed.checkpoint_every;
    if (Math.floor(done / every) > Math.floor(step / every) || done === this.state.totalSteps) await this.checkpoint();
  }

  private async checkpoint(): Promise<void> {
    const { path, bytes } = await this.store.write(this.state, this.globalAdapter, { r: this.cfg.lora.r, alpha: this.cfg.lora.alpha }, { strategy: this.strategy.state() });
    this.publish({ type: 'checkpoint.written', round: 0, step: this.state.step, path, bytes });
    log.info({ step: this.state.step, path }, 'checkpoint written');
  }

}
