/**
 * The federated round loop. Round k:
 *
 *   wait for cohort.min_workers -> strategy picks the cohort -> a TrainTask goes
 *   down each chosen worker's session -> updates arrive (service.ts validates the
 *   stream, acceptUpdate() checks and folds each into the streaming accumulator)
 *   -> all in, or the deadline passes (stragglers are cancelled) -> at least
 *   round.min_results? aggregate : retry the round (never skipped silently) ->
 *   evaluation-only tasks on workers holding eval data -> checkpoint atomically
 *   -> round.completed.
 *
 * Every step is published on the event bus. The loop never touches sockets:
 * service.ts calls in with what arrived and the registry sends what goes out.
 */
import { randomBytes } from 'node:crypto';
import { findNonFinite, unpackTensorMap, type TensorSpecEntry } from '../common/chunks.ts';
import type { RunConfig } from '../common/config.ts';
import type { PhaseTimes } from '../common/events.ts';
import { logger } from '../common/log.ts';
import type { TensorMap } from '../common/tensor.ts';
import {
  UpdateKind,
  type EvalResult,
  type TaskFailed,
  type TaskProgress,
  type TrainingSpec,
  type UploadHeader,
} from '../proto/gen/fedtune/v1/coordinator.ts';
import type { EventBus } from './events/bus.ts';
import type { FedAvgAccumulator } from './strategies/fedavg.ts';
import type { Strategy } from './strategies/strategy.ts';
import { SERVER_OPTIMIZER_FILE, type CheckpointStore, type RoundRecord, type RunStateFile, type WorkerStats } from './store.ts';
import type { RegistryListener, WorkerRecord, WorkerRegistry } from './workers.ts';
import { RunBase, manifestMismatch } from './run-base.ts';

const log = logger('coordinator.run');

/** gRPC-facing reason an update was refused (service.ts maps `code` onto a status). */
export class UpdateRejected extends Error {
  constructor(
    readonly code: 'INVALID_ARGUMENT' | 'FAILED_PRECONDITION' | 'PERMISSION_DENIED' | 'ALREADY_EXISTS' | 'NOT_FOUND',
    message: string,
  ) {
    super(message);
    this.name = 'UpdateRejected';
  }
}

type TaskStatus = 'running' | 'uploading' | 'done' | 'failed' | 'cancelled';

interface TaskState {
  taskId: string;
  kind: 'train' | 'eval';
  round: number;
  attempt: number;
  workerId: string;
  site: string;
  baseVersion: number;
  status: TaskStatus;
  dispatchedAt: number;
  downloadedAt: number | null;
  uploadStartedAt: number | null;
  doneAt: number | null;
  numExamples: number;
  metrics: Record<string, number>;
  evalResult: EvalResult | null;
  bytesUp: number;
  /** Why the task failed, as the worker or the coordinator saw it. */
  failReason: string | null;
}

export interface RunResult {
  state: 'completed' | 'failed' | 'stopped';
  rounds: number;
  finalAdapterPath: string | null;
  history: RoundRecord[];
  error?: string;
}

export interface FederatedRunOptions {
  cfg: RunConfig;
  bus: EventBus;
  registry: WorkerRegistry;
  store: CheckpointStore;
  strategy: Strategy;
  global: TensorMap;
  state: RunStateFile;
  resumed: boolean;
}

export function trainingSpecOf(cfg: RunConfig): TrainingSpec {
  const t = cfg.training;
  return {
    lora: { r: cfg.lora.r, alpha: cfg.lora.alpha, dropout: cfg.lora.dropout, targetModules: [...cfg.lora.target_modules] },
    ...(t.steps !== null ? { steps: t.steps } : {}),
    ...(t.epochs !== null ? { epochs: t.epochs } : {}),
    batchSize: t.batch_size,
    gradAccumulation: t.grad_accumulation,
    lr: t.lr,
    schedule: t.schedule,
    warmupSteps: t.warmup_steps,
    weightDecay: t.weight_decay,
    maxGradNorm: t.max_grad_norm,
    maxSeqLen: t.max_seq_len,
    template: t.template,
    seed: t.seed,
    proxMu: 0,
    freezeLoraA: false,
  };
}


function mean(pairs: Array<[value: number, weight: number]>): number | null {
  let s = 0;
  let w = 0;
  for (const [v, k] of pairs) {
    if (Number.isFinite(v) && k > 0) {
      s += v * k;
      w += k;
    }
  }
  return w > 0 ? s / w : null;
}

export class FederatedRun extends RunBase implements RegistryListener {
  private readonly cfg: RunConfig;
  private readonly registry: WorkerRegistry;
  private readonly store: CheckpointStore;
  private readonly strategy: Strategy;
  private readonly state: RunStateFile;
  private readonly resumed: boolean;
  private readonly spec: TrainingSpec;
  private readonly tasks = new Map<string, TaskState>();
  /** Accumulator of the round attempt now collecting, with its identity. */
  private open: { round: number; attempt: number; acc: FedAvgAccumulator } | null = null;
  private roundBytesDown = 0;

  constructor(o: FederatedRunOptions) {
    super(o.state.runId, o.bus, o.global, o.state.globalVersion);
    this.cfg = o.cfg;
    this.registry = o.registry;
    this.store = o.store;
    this.strategy = o.strategy;
    this.state = o.state;
    this.resumed = o.resumed;
    this.spec = trainingSpecOf(o.cfg);
  }




  // ------------------------------------------------------------------ registry events


  onWorkerGone(w: WorkerRecord, reason: string): void {
    this.publish({ type: 'worker.left', workerId: w.workerId, site: w.site, reason });
    log.info({ worker: w.workerId, site: w.site, reason }, 'worker left');
    for (const t of this.tasks.values()) {
      if (t.workerId === w.workerId && (t.status === 'running' || t.status === 'uploading')) {
        t.status = 'failed';
        t.doneAt = Date.now();
        t.failReason = `worker left (${reason})`;
        this.stats(t.site).failed++;
      }
    }
    this.conditions.notify();
  }

  // ------------------------------------------------------------------ messages from workers


  onProgress(w: WorkerRecord, p: TaskProgress): void {
    const t = this.tasks.get(p.taskId);
    if (!t || t.workerId !== w.workerId) return;
    if (t.downloadedAt === null) t.downloadedAt = Date.now();
    this.publish({
      type: 'worker.progress',
      workerId: w.workerId,
      site: w.site,
      round: t.round,
      taskId: t.taskId,
      step: p.step,
      totalSteps: p.totalSteps,
      loss: p.loss,
      tokensPerSec: p.tokensPerSec,
      examples: p.examples,
    });
  }

  onTaskFailed(w: WorkerRecord, f: TaskFailed): void {
    const t = this.tasks.get(f.taskId);
    const message = `task ${f.taskId}: ${f.message}`;
    this.publish({ type: 'worker.error', workerId: w.workerId, site: w.site, message });
    log.warn({ worker: w.workerId, site: w.site, task: f.taskId }, f.message);
    if (t && t.workerId === w.workerId && (t.status === 'running' || t.status === 'uploading')) {
      t.status = 'failed';
      t.doneAt = Date.now();
      t.failReason = f.message;
      this.stats(t.site).failed++;
      this.conditions.notify();
    }
  }

  onEvalResult(w: WorkerRecord, r: EvalResult): void {
    const t = this.tasks.get(r.taskId);
    if (!t || t.workerId !== w.workerId || t.kind !== 'eval' || t.status !== 'running') {
      log.warn({ worker: w.workerId, task: r.taskId }, 'eval result for a task that is not open; ignored');
      return;
    }
    t.evalResult = r;
    t.status = 'done';
    t.doneAt = Date.now();
    this.conditions.notify();
  }

  onDownloaded(w: WorkerRecord, bytes: number): void {
    this.roundBytesDown += bytes;
    this.stats(w.site).bytesDown += bytes;
    for (const t of this.tasks.values()) {
      if (t.workerId === w.workerId && t.status === 'running' && t.downloadedAt === null) t.downloadedAt = Date.now();
    }
  }

  // ------------------------------------------------------------------ updates

  /**
   * Check an upload's header before any chunk is read: the task must be open, this
   * worker's, of the current round, and the manifest must be the global adapter's.
   */
  beginUpdate(w: WorkerRecord, h: UploadHeader, manifest: TensorSpecEntry[]): TaskState {
    const t = this.tasks.get(h.taskId);
    if (!t) throw new UpdateRejected('NOT_FOUND', `task ${h.taskId || '(empty)'} is not known to this coordinator`);
    if (t.workerId !== w.workerId) throw new UpdateRejected('PERMISSION_DENIED', `task ${h.taskId} was not given to worker ${w.workerId}`);
    if (t.kind !== 'train') throw new UpdateRejected('INVALID_ARGUMENT', `task ${h.taskId} is an evaluation task and takes no upload`);
    if (h.round !== t.round) throw new UpdateRejected('INVALID_ARGUMENT', `round ${h.round} in the header, but task ${h.taskId} belongs to round ${t.round}`);
    if (t.status === 'done') throw new UpdateRejected('ALREADY_EXISTS', `duplicate update: task ${h.taskId} was already received`);
    if (t.status === 'uploading') throw new UpdateRejected('ALREADY_EXISTS', `duplicate update: an upload for task ${h.taskId} is already in progress`);
    if (!this.open || this.open.round !== t.round || this.open.attempt !== t.attempt || t.status !== 'running') {
      throw new UpdateRejected(
        'FAILED_PRECONDITION',
        `stale update: task ${h.taskId} of round ${t.round} is closed (${t.status === 'cancelled' ? 'deadline passed or cancelled' : t.status}); the run is at round ${this.open?.round ?? this.state.round}`,
      );
    }
    if (h.kind !== UpdateKind.UPDATE_KIND_ADAPTER_WEIGHTS) {
      throw new UpdateRejected('INVALID_ARGUMENT', `update kind ${UpdateKind[h.kind] ?? h.kind} is not accepted here (allowed: UPDATE_KIND_ADAPTER_WEIGHTS)`);
    }
    if (h.baseVersion !== t.baseVersion) {
      throw new UpdateRejected('FAILED_PRECONDITION', `update computed from global version ${h.baseVersion}, task ${h.taskId} is on version ${t.baseVersion}`);
    }
    if (!Number.isSafeInteger(h.numExamples) || h.numExamples < 1) {
      throw new UpdateRejected('INVALID_ARGUMENT', `num_examples must be a positive integer (got ${h.numExamples})`);
    }
    for (const [k, v] of Object.entries(h.metrics)) {
      if (!Number.isFinite(v)) throw new UpdateRejected('INVALID_ARGUMENT', `metric ${k} is not finite (${v})`);
    }
    const bad = manifestMismatch(manifest, this.packedGlobal.manifest);
    if (bad) throw new UpdateRejected('INVALID_ARGUMENT', `update does not match the global adapter: ${bad}`);
    t.status = 'uploading';
    t.uploadStartedAt = Date.now();
    return t;
  }

  /** The upload of `t` broke off before it was complete: drop it, the task stays open for a retry. */
  abandonUpdate(t: TaskState): void {
    if (t.status === 'uploading') t.status = 'running';
    this.conditions.notify();
  }

  /** Complete bytes of a checked stream: validate values and fold into the round. */
  acceptUpdate(w: WorkerRecord, t: TaskState, h: UploadHeader, bytes: Uint8Array): void {
    if (t.status !== 'uploading' || !this.open || this.open.round !== t.round || this.open.attempt !== t.attempt) {
      throw new UpdateRejected('FAILED_PRECONDITION', `stale update: round ${t.round} closed while task ${t.taskId} was uploading`);
    }
    const update = unpackTensorMap(this.packedGlobal.manifest, bytes);
    const nf = findNonFinite(update);
    if (nf) {
      t.status = 'running';
      throw new UpdateRejected('INVALID_ARGUMENT', `tensor ${nf.name} has a non-finite value (${nf.value}) at element ${nf.index}`);
    }
    const flat = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
    this.open.acc.addFlat(flat, h.numExamples);
    t.status = 'done';
    t.doneAt = Date.now();
    t.numExamples = h.numExamples;
    t.metrics = { ...h.metrics };
    t.bytesUp = bytes.byteLength;
    const s = this.stats(w.site);
    s.bytesUp += bytes.byteLength;
    s.examples += h.numExamples;
    s.rounds++;
    this.publish({
      type: 'update.received',
      round: t.round,
      taskId: t.taskId,
      workerId: w.workerId,
      site: w.site,
      examples: h.numExamples,
      bytes: bytes.byteLength,
      metrics: t.metrics,
    });
    log.info({ round: t.round, site: w.site, examples: h.numExamples, bytes: bytes.byteLength }, 'update received');
    this.conditions.notify();
  }

  rejectUpdate(w: WorkerRecord, h: Pick<UploadHeader, 'taskId' | 'round'> | null, reason: string): void {
    const t = h ? this.tasks.get(h.taskId) : undefined;
    this.stats(w.site).rejected++;
    this.publish({
      type: 'update.rejected',
      round: t?.round ?? h?.round ?? 0,
      taskId: h?.taskId ?? '',
      workerId: w.workerId,
      site: w.site,
      reason,
    });
    log.warn({ worker: w.workerId, site: w.site, task: h?.taskId }, `update rejected: ${reason}`);
  }

  // ------------------------------------------------------------------ the loop


  async run(): Promise<RunResult> {
    const cfg = this.cfg;
    this.publish({
      type: 'run.started',
      name: cfg.name,
      mode: cfg.mode,
      strategy: cfg.strategy,
      totalRounds: cfg.rounds,
      totalSteps: 0,
      config: JSON.parse(JSON.stringify({ ...cfg, server: { ...cfg.server, join_token: '***' }, dashboard: { ...cfg.dashboard, token: cfg.dashboard.token ? '***' : null } })) as Record<string, unknown>,
      resumedFromRound: this.resumed ? this.state.round : 0,
    });
    try {
      if (this.state.round === 0 && cfg.eval.every > 0 && cfg.eval.initial && this.state.baseline === null) {
        this.publish({ type: 'run.state', state: 'waiting', message: `waiting for ${cfg.cohort.min_workers} worker(s)` });
        await this.waitForWorkers();
        this.publish({ type: 'run.state', state: 'running', message: 'evaluating the initial adapter' });
        const ev = await this.evaluate(0);
        this.state.baseline = { evalLoss: ev.evalLoss, evalAccuracy: ev.evalAccuracy };
        this.publish({
          type: 'log',
          level: 'info',
          message: `baseline (round 0): eval loss ${ev.evalLoss?.toFixed(4) ?? 'n/a'}, eval accuracy ${ev.evalAccuracy === null ? 'n/a' : `${(ev.evalAccuracy * 100).toFixed(1)}%`}`,
        });
      }
      for (let round = this.state.round + 1; round <= cfg.rounds; round++) await this.runRound(round);
      const last = this.state.history.at(-1);
      const finalAdapterPath = this.store.roundDir(this.state.round);
      this.publish({
        type: 'run.completed',
        rounds: this.state.round,
        finalAdapterPath,
        metrics: Object.fromEntries(
          Object.entries({ trainLoss: last?.trainLoss, evalLoss: last?.evalLoss, evalAccuracy: last?.evalAccuracy }).filter(
            (e): e is [string, number] => typeof e[1] === 'number',
          ),
        ),
      });
      this.publish({ type: 'run.state', state: 'completed' });
      return { state: 'completed', rounds: this.state.round, finalAdapterPath, history: this.state.history };
    } catch (err) {
      const stopped = this.abort.signal.aborted;
      const error = err instanceof Error ? err.message : String(err);
      if (stopped) {
        this.publish({ type: 'run.state', state: 'stopped', message: error });
      } else {
        log.error({ err }, 'run failed');
        this.publish({ type: 'run.failed', error });
        this.publish({ type: 'run.state', state: 'failed', message: error });
      }
      return {
        state: stopped ? 'stopped' : 'failed',
        rounds: this.state.round,
        finalAdapterPath: this.state.round > 0 ? this.store.roundDir(this.state.round) : null,
        history: this.state.history,
        error,
      };
    } finally {
      this.open = null;
    }
  }


  private eligible(kind: 'train' | 'eval'): WorkerRecord[] {
    const busy = new Set<string>();
    for (const t of this.tasks.values()) if (t.status === 'running' || t.status === 'uploading') busy.add(t.workerId);
    return this.registry
      .connected()
      .filter((w) => !busy.has(w.workerId) && (kind === 'train' ? w.numTrainExamples > 0 : w.numEvalExamples > 0));
  }

  private async waitForWorkers(): Promise<void> {
    const need = this.cfg.cohort.min_workers;
    if (this.eligible('train').length >= need) return;
    log.info({ need, have: this.eligible('train').length }, 'waiting for workers');
    const ok = await this.conditions.waitFor(() => this.eligible('train').length >= need, Date.now() + this.cfg.cohort.wait_timeout_sec * 1000);
    if (!ok) {
      throw new Error(
        `only ${this.eligible('train').length} worker(s) with training data connected after ${this.cfg.cohort.wait_timeout_sec} s; cohort.min_workers is ${need}`,
      );
    }
  }

  private newTask(kind: 'train' | 'eval', round: number, attempt: number, w: WorkerRecord): TaskState {
    const t: TaskState = {
      taskId: `r${round}-${kind}-${attempt}-${randomBytes(4).toString('hex')}`,
      kind,
      round,
      attempt,
      workerId: w.workerId,
      site: w.site,
      baseVersion: this.globalVersion,
      status: 'running',
      dispatchedAt: Date.now(),
      downloadedAt: null,
      uploadStartedAt: null,
      doneAt: null,
      numExamples: 0,
      metrics: {},
      evalResult: null,
      bytesUp: 0,
      failReason: null,
    };
    this.tasks.set(t.taskId, t);
    return t;
  }

  private dispatch(t: TaskState, deadline: number): boolean {
    const w = this.registry.get(t.workerId);
    const ok =
      w !== undefined &&
      this.registry.send(w, {
        body: {
          $case: 'task',
          value: {
            taskId: t.taskId,
            round: t.round,
            deadlineUnixMs: deadline,
            global: { version: this.globalVersion, totalBytes: this.packedGlobal.bytes.byteLength, sha256: this.packedGlobal.sha256, rank: 0 },
            kind: t.kind === 'train' ? { $case: 'train', value: { spec: this.spec, uploadKind: UpdateKind.UPDATE_KIND_ADAPTER_WEIGHTS } } : { $case: 'eval', value: { spec: this.spec } },
          },
        },
      });
    if (!ok) {
      t.status = 'failed';
      t.doneAt = Date.now();
      t.failReason = 'could not send the task (session closed)';
      return false;
    }
    if (t.kind === 'train') {
      this.publish({ type: 'task.dispatched', round: t.round, taskId: t.taskId, workerId: t.workerId, site: t.site, bytes: this.packedGlobal.bytes.byteLength });
    }
    return true;
  }

  /** Cancel tasks of a closing attempt that are still out. */
  private closeTasks(tasks: TaskState[], reason: string): void {
    for (const t of tasks) {
      if (t.status !== 'running' && t.status !== 'uploading') continue;
      t.status = 'cancelled';
      t.doneAt = Date.now();
      const w = this.registry.get(t.workerId);
      if (w) this.registry.send(w, { body: { $case: 'cancel', value: { taskId: t.taskId, reason } } });
    }
  }

  private async runRound(round: number): Promise<void> {
    const cfg = this.cfg;
    const started = Date.now();
    this.roundBytesDown = 0;
    let done: TaskState[] = [];
    let attempt = 0;
    let phases: PhaseTimes = { dispatchMs: 0, trainMs: 0, uploadMs: 0, aggregateMs: 0 };
    for (; ; attempt++) {
      this.publish({ type: 'run.state', state: 'waiting', message: `round ${round}: waiting for ${cfg.cohort.min_workers} worker(s)` });
      await this.waitForWorkers();
      this.publish({ type: 'run.state', state: 'running', message: `round ${round}${attempt > 0 ? ` (retry ${attempt})` : ''}` });
      const candidates = this.eligible('train').map((w) => ({ workerId: w.workerId, site: w.site, numTrainExamples: w.numTrainExamples }));
      const cohort = this.strategy.selectCohort(candidates, round, attempt);
      this.open = { round, attempt, acc: this.strategy.accumulator(this.packedGlobal.manifest) };
      this.publish({ type: 'round.started', round, cohort, globalVersion: this.globalVersion });
      log.info({ round, attempt, cohort: cohort.length }, 'round started');
      const t0 = Date.now();
      const deadline = t0 + cfg.round.deadline_sec * 1000;
      const tasks = cohort.map((id) => this.newTask('train', round, attempt, this.registry.get(id)!));
      for (const t of tasks) this.dispatch(t, deadline);
      const settled = (): boolean => tasks.every((t) => t.status !== 'running' && t.status !== 'uploading');
      const allIn = await this.conditions.waitFor(settled, deadline);
      if (!allIn) this.closeTasks(tasks, `round ${round} deadline of ${cfg.round.deadline_sec} s passed`);
      done = tasks.filter((t) => t.status === 'done');
      const received = this.open.acc.count;
      const t1 = Date.now();
      // Phases overlap across workers; split the wall time at the last download and the first upload.
      const firstUp = Math.min(t1, ...done.map((t) => t.uploadStartedAt ?? t1));
      const lastUp = Math.max(firstUp, ...done.map((t) => t.doneAt ?? firstUp));
      const dl = Math.max(0, Math.min(firstUp, ...[Math.max(t0, ...tasks.map((t) => t.downloadedAt ?? t0))]) - t0);
      const ul = lastUp - firstUp;
      phases = { dispatchMs: dl, uploadMs: ul, trainMs: Math.max(0, t1 - t0 - dl - ul), aggregateMs: 0 };
      if (received >= cfg.round.min_results) break;
      const why = [...new Set(tasks.filter((t) => t.failReason).map((t) => `${t.site}: ${t.failReason}`))].slice(0, 3);
      const reason =
        (allIn
          ? `${received} of ${tasks.length} update(s) arrived`
          : `deadline of ${cfg.round.deadline_sec} s passed with ${received} of ${tasks.length} update(s)`) +
        (why.length > 0 ? ` (failed: ${why.join('; ')})` : '');
      this.publish({ type: 'round.retried', round, reason, received, required: cfg.round.min_results });
      log.warn({ round, attempt, received, required: cfg.round.min_results }, `round retried: ${reason}`);
      if (attempt >= cfg.round.max_retries) {
        throw new Error(`round ${round} failed ${attempt + 1} time(s) (round.max_retries is ${cfg.round.max_retries}): ${reason}; need round.min_results = ${cfg.round.min_results}`);
      }
    }
    // Aggregate: the accumulator already holds the weighted sum.
    const acc = this.open.acc;
    this.open = null;
    const ta = Date.now();
    const next = this.strategy.aggregate(this.globalAdapter, acc);
    phases.aggregateMs = Date.now() - ta;
    this.setGlobal(next, this.globalVersion + 1);
    // Evaluate the new global adapter where workers hold eval data.
    let ev: { evalLoss: number | null; evalAccuracy: number | null } = { evalLoss: null, evalAccuracy: null };
    if (cfg.eval.every > 0 && (round % cfg.eval.every === 0 || round === cfg.rounds)) ev = await this.evaluate(round);
    const record: RoundRecord = {
      round,
      globalVersion: this.globalVersion,
      participants: done.length,
      examples: done.reduce((s, t) => s + t.numExamples, 0),
      trainLoss: mean(done.map((t) => [t.metrics.train_loss ?? NaN, t.numExamples])),
      evalLoss: ev.evalLoss,
      evalAccuracy: ev.evalAccuracy,
      durationMs: Date.now() - started,
      bytesUp: done.reduce((s, t) => s + t.bytesUp, 0),
      bytesDown: this.roundBytesDown,
      retries: attempt,
      completedAt: new Date().toISOString(),
    };
    this.state.round = round;
    this.state.globalVersion = this.globalVersion;
    this.state.history.push(record);
    this.state.updatedAt = record.completedAt;
    const { path, bytes } = await this.store.write(this.state, this.globalAdapter, (dir) => this.strategy.save(`${dir}/${SERVER_OPTIMIZER_FILE}`));
    // Settled tasks of earlier rounds are forgotten; this round's stay so that late or repeated uploads get a precise answer.
    for (const t of this.tasks.values()) if (t.round < round && t.status !== 'running' && t.status !== 'uploading') this.tasks.delete(t.taskId);
    this.publish({ type: 'checkpoint.written', round, step: 0, path, bytes });
    this.publish({
      type: 'round.completed',
      round,
      globalVersion: this.globalVersion,
      participants: record.participants,
      examples: record.examples,
      trainLoss: record.trainLoss,
      evalLoss: record.evalLoss,
      evalAccuracy: record.evalAccuracy,
      durationMs: record.durationMs,
      phases,
      bytesUp: record.bytesUp,
      bytesDown: record.bytesDown,
    });
    log.info({ round, trainLoss: record.trainLoss, evalLoss: record.evalLoss, evalAccuracy: record.evalAccuracy, path }, 'round completed');
  }


  /** Evaluation-only tasks on every idle worker holding eval data; weighted means of what comes back. */
  private async evaluate(round: number): Promise<{ evalLoss: number | null; evalAccuracy: number | null }> {
    const workers = this.eligible('eval');
    if (workers.length === 0) return { evalLoss: null, evalAccuracy: null };
    const deadline = Date.now() + this.cfg.eval.deadline_sec * 1000;
    const tasks = workers.map((w) => this.newTask('eval', round, 0, w));
    for (const t of tasks) this.dispatch(t, deadline);
    const allIn = await this.conditions.waitFor(() => tasks.every((t) => t.status !== 'running'), deadline);
    if (!allIn) this.closeTasks(tasks, `evaluation deadline of ${this.cfg.eval.deadline_sec} s passed`);
    const results = tasks.map((t) => t.evalResult).filter((r): r is EvalResult => r !== null && r.hasEvalData);
    for (const t of tasks) this.tasks.delete(t.taskId);
    const evalLoss = mean(results.map((r) => [r.evalLoss, r.evalTokens > 0 ? r.evalTokens : r.evalExamples]));
    const evalAccuracy = mean(results.filter((r) => r.evalAccuracy !== undefined).map((r) => [r.evalAccuracy!, r.evalExamples]));
    log.info({ round, evalLoss, evalAccuracy, workers: results.length }, 'evaluation done');
    return { evalLoss, evalAccuracy };
  }

  private stats(site: string): WorkerStats {
    let s = this.state.workers[site];
    if (!s) {
      s = { site, rounds: 0, examples: 0, bytesUp: 0, bytesDown: 0, rejected: 0, failed: 0 };
      this.state.workers[site] = s;
    }
    return s;
  }
}
