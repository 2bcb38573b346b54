/**
 * The task board both run loops share: every task handed to a worker, its
 * state machine, and the checks every upload passes before a byte of it is
 * read.
 *
 *   running --upload header--> uploading --complete, accepted--> done
 *      ^                          |
 *      +---- broke off / refused -+
 *   running | uploading --worker left, failed, deadline, retry--> failed | cancelled
 *
 * Invariant: a task is `done` at most once, and only a task of the attempt now
 * collecting (`isOpen`) can start uploading, so no update is counted twice or
 * into the wrong round or step.
 */
import type { RunConfig } from '../common/config.ts';
import { redactUrl } from '../common/redact.ts';
import type { TrainingSpec } from '../proto/gen/fedtune/v1/coordinator.ts';
import type { WorkerRecord, WorkerRegistry } from './workers.ts';
import { loraConfigOf, loraSpecOf } from '../common/lora-spec.ts';

/** Why an update was refused; service.ts maps `code` onto a gRPC status. */
export class UpdateRejected extends Error {
  constructor(
    readonly code: 'INVALID_ARGUMENT' | 'FAILED_PRECONDITION' | 'PERMISSION_DENIED' | 'ALREADY_EXISTS' | 'NOT_FOUND',
    message: string,
  ) {
    super(message);
    this.name = 'UpdateRejected';
  }
}

export type TaskStatus = 'running' | 'uploading' | 'done' | 'failed' | 'cancelled';

export interface TaskBase {
  taskId: string;
  workerId: string;
  site: string;
  attempt: number;
  /** Global adapter version the task starts from. */
  baseVersion: number;
  status: TaskStatus;
  dispatchedAt: number;
  uploadStartedAt: number | null;
  doneAt: number | null;
  bytesUp: number;
  /** Why the task failed, as the worker or the coordinator saw it. */
  failReason: string | null;
}

export function isOpenTask(t: TaskBase): boolean {
  return t.status === 'running' || t.status === 'uploading';
}

/** How many forgotten tasks the board still recognises (a late upload for one is stale, not unknown). */
const RETIRED_LIMIT = 10_000;

export class TaskBoard<T extends TaskBase> {
  private readonly tasks = new Map<string, T>();
  /** Tasks of earlier rounds or steps, forgotten: their worker and what they were, for precise answers to late uploads. */
  private readonly retired = new Map<string, { workerId: string; what: string }>();

  /** `describe` names a task for late-upload answers, e.g. "of round 3". */
  constructor(
    private readonly registry: WorkerRegistry,
    private readonly describe: (t: T) => string = () => '',
  ) {}

  add(t: T): T {
    this.tasks.set(t.taskId, t);
    return t;
  }

  get(taskId: string): T | undefined {
    return this.tasks.get(taskId);
  }

  values(): IterableIterator<T> {
    return this.tasks.values();
  }

  /** Workers with a task still out. */
  busyWorkers(): Set<string> {
    const busy = new Set<string>();
    for (const t of this.tasks.values()) if (isOpenTask(t)) busy.add(t.workerId);
    return busy;
  }

  /**
   * The upload prologue: the task exists, is this worker's, has not been
   * received (or is not being received) already, and belongs to the attempt now
   * collecting. Marks it uploading.
   */
  beginUpload(w: WorkerRecord, taskId: string, isOpen: (t: T) => boolean, closed: (t: T) => string): T {
    const t = this.tasks.get(taskId);
    if (!t) {
      const old = this.retired.get(taskId);
      if (old && old.workerId === w.workerId) throw new UpdateRejected('FAILED_PRECONDITION', `stale update: task ${taskId} ${old.what} is closed; the run has moved on`);
      throw new UpdateRejected('NOT_FOUND', `task ${taskId || '(empty)'} is not known to this coordinator`);
    }
    if (t.workerId !== w.workerId) throw new UpdateRejected('PERMISSION_DENIED', `task ${taskId} was not given to worker ${w.workerId}`);
    if (t.status === 'done') throw new UpdateRejected('ALREADY_EXISTS', `duplicate update: task ${taskId} was already received`);
    if (t.status === 'uploading') throw new UpdateRejected('ALREADY_EXISTS', `duplicate update: an upload for task ${taskId} is already in progress`);
    if (t.status !== 'running' || !isOpen(t)) throw new UpdateRejected('FAILED_PRECONDITION', `stale update: ${closed(t)}`);
    return t;
  }

  markUploading(t: T): void {
    t.status = 'uploading';
    t.uploadStartedAt = Date.now();
  }

  /** The upload broke off or was refused after its header: the task stays open for another upload. */
  reopen(t: T): void {
    if (t.status === 'uploading') t.status = 'running';
  }

  done(t: T, bytesUp: number): void {
    t.status = 'done';
    t.doneAt = Date.now();
    t.bytesUp = bytesUp;
  }

  /** Mark an open task failed; false when it was already settled. */
  fail(t: T, reason: string): boolean {
    if (!isOpenTask(t)) return false;
    t.status = 'failed';
    t.doneAt = Date.now();
    t.failReason = reason;
    return true;
  }

  /** Fail every open task of a worker that left; returns them. */
  failWorker(workerId: string, reason: string): T[] {
    const out: T[] = [];
    for (const t of this.tasks.values()) if (t.workerId === workerId && this.fail(t, reason)) out.push(t);
    return out;
  }

  /** Cancel the open ones among `tasks` and tell their workers. */
  cancel(tasks: readonly T[], reason: string, status: 'cancelled' | 'failed' = 'cancelled'): void {
    for (const t of tasks) {
      if (!isOpenTask(t)) continue;
      t.status = status;
      t.doneAt = Date.now();
      if (status === 'failed') t.failReason = reason;
      const w = this.registry.get(t.workerId);
      if (w) this.registry.send(w, { body: { $case: 'cancel', value: { taskId: t.taskId, reason } } });
    }
  }

  settled(tasks: readonly T[]): boolean {
    return tasks.every((t) => !isOpenTask(t));
  }

  /** Forget settled tasks for which `pred` holds (earlier rounds or steps). */
  forget(pred: (t: T) => boolean): void {
    for (const t of this.tasks.values()) {
      if (isOpenTask(t) || !pred(t)) continue;
      this.tasks.delete(t.taskId);
      this.retired.set(t.taskId, { workerId: t.workerId, what: this.describe(t) });
    }
    for (const id of this.retired.keys()) {
      if (this.retired.size <= RETIRED_LIMIT) break;
      this.retired.delete(id);
    }
  }

  delete(t: T): void {
    this.tasks.delete(t.taskId);
  }
}

/** Settings a strategy may give one worker on top of the run's training section. */
export interface SpecOverrides {
  rank: number;
  proxMu: number;
  freezeLoraA: boolean;
}

/**
 * The TrainingSpec of a federated train task of round `round`: trainingSpecOf's, with
 * training.schedule_scope 'run' the place of the round in a schedule over all rounds, and whether
 * the site keeps its optimizer state (training.optimizer_scope).
 */
export function roundSpecOf(cfg: RunConfig, round: number, o?: SpecOverrides): TrainingSpec {
  const spec = { ...trainingSpecOf(cfg, o), keepOptimizerState: cfg.training.optimizer_scope === 'run' };
  return cfg.training.schedule_scope === 'run' ? { ...spec, scheduleRound: round, scheduleRounds: Math.max(cfg.rounds, round) } : spec;
}

/**
 * The TrainingSpec a task carries: the run's `training` and `lora` sections,
 * with a strategy's per-worker rank (alpha keeps the run's alpha / r), FedProx
 * mu and frozen-A flag.
 */
export function trainingSpecOf(cfg: RunConfig, o?: SpecOverrides): TrainingSpec {
  const t = cfg.training;
  return {
    lora: loraSpecOf(loraConfigOf(cfg.lora, o?.rank)),
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
    proxMu: o?.proxMu ?? 0,
    freezeLoraA: o?.freezeLoraA ?? false,
    loraPlusRatio: t.lora_plus_ratio,
    scheduleRound: 0,
    scheduleRounds: 0,
    keepOptimizerState: false,
    dpSgd: cfg.privacy.dp_sgd
      ? { maxGradNorm: cfg.privacy.dp_sgd.max_grad_norm, noiseMultiplier: cfg.privacy.dp_sgd.noise_multiplier, sampleRate: cfg.privacy.dp_sgd.sample_rate }
      : undefined,
  };
}

/** The run config as events and API answers may show it: secrets (tokens, credentials in URLs) replaced by ***. */
export function redactedConfig(cfg: RunConfig): Record<string, unknown> {
  const nats = cfg.events.nats ? { ...cfg.events.nats, url: redactUrl(cfg.events.nats.url) } : null;
  return JSON.parse(
    JSON.stringify({
      ...cfg,
      server: { ...cfg.server, join_token: '***' },
      dashboard: { ...cfg.dashboard, token: cfg.dashboard.token ? '***' : null },
      events: { ...cfg.events, nats },
    }),
  ) as Record<string, unknown>;
}
