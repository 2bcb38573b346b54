/**
 * What the dashboard shows, folded from run events alone (no DOM here). The
 * browser app keeps one RunView per run; the server uses the same fold for the
 * run headers behind /api/runs, so both agree on state, round and timing.
 */
import type { PhaseTimes, PrivacyReport, RunEvent, RunMode, RunState } from '../../common/events.ts';

export interface RunHeader {
  runId: string;
  name: string;
  mode: RunMode | 'unknown';
  strategy: string;
  state: RunState;
  /** Last completed round (federated) and the planned total. */
  round: number;
  totalRounds: number;
  /** Round this run resumed after (0 for a fresh run); rounds done in this process = round - this. */
  resumedFromRound: number;
  /** Last completed optimizer step (distributed) and the planned total. */
  step: number;
  totalSteps: number;
  /** Time of run.started (ms since epoch), or of the first event seen. */
  startedAt: number;
  /** Time the run ended (completed, failed or stopped); undefined while it runs. */
  endedAt?: number;
  lastEventAt: number;
  lastSeq: number;
  /** Last state message or failure reason. */
  message?: string;
  workers: number;
  lastTrainLoss: number | null;
  lastEvalLoss: number | null;
  /** Privacy spent after the last round (runs with client_dp or dp_sgd); null when the run reports none. */
  privacy: PrivacyReport | null;
  /** Set while the coordinator reports its event bus (NATS) degraded: events are buffered, not lost. */
  busDegraded: { backend: string; message: string; buffered: number } | null;
}

export interface WorkerRow {
  workerId: string;
  site: string;
  device: string;
  status: string;
  /** Time of the last event about this worker (heartbeat, progress, update). */
  lastSeen: number;
  round: number;
  step: number;
  totalSteps: number;
  loss: number | null;
  tokensPerSec: number;
  examples: number;
  bytesUp: number;
  bytesDown: number;
  errors: number;
  lastError?: string;
}

export interface RoundPoint {
  round: number;
  trainLoss: number | null;
  evalLoss: number | null;
  evalAccuracy: number | null;
  durationMs: number;
  phases: PhaseTimes;
  bytesUp: number;
  bytesDown: number;
  participants: number;
  examples: number;
  /** Privacy spent after the round (null: the run reports none). */
  privacy: PrivacyReport | null;
  time: number;
}

export interface StepPoint {
  step: number;
  loss: number;
  lr: number;
  tokensPerSec: number;
  workers: number;
  time: number;
  computeMs: number;
  communicateMs: number;
  aggregateMs: number;
}

/** One worker's step-loss curve; x is fractional round (round - 1 + step/totalSteps) or global step. */
export interface LossCurve {
  workerId: string;
  site: string;
  x: number[];
  y: number[];
}

const TERMINAL: readonly RunState[] = ['completed', 'failed', 'stopped'];

export function isTerminal(state: RunState): boolean {
  return TERMINAL.includes(state);
}

/** Header fold only: small, used by the server for every run. */
export class HeaderFold {
  readonly header: RunHeader;
  private readonly present = new Set<string>();

  constructor(runId: string) {
    this.header = {
      runId, name: runId, mode: 'unknown', strategy: '', state: 'starting',
      round: 0, totalRounds: 0, resumedFromRound: 0, step: 0, totalSteps: 0,
      startedAt: 0, lastEventAt: 0, lastSeq: 0, workers: 0,
      lastTrainLoss: null, lastEvalLoss: null, privacy: null, busDegraded: null,
    };
  }

  /** Fold one event; returns false (and changes nothing) for an event already seen. */
  apply(e: RunEvent): boolean {
    const h = this.header;
    if (e.seq <= h.lastSeq) return false;
    h.lastSeq = e.seq;
    h.lastEventAt = e.time;
    if (h.startedAt === 0) h.startedAt = e.time;
    switch (e.type) {
      case 'run.started':
        h.name = e.name;
        h.mode = e.mode;
        h.strategy = e.strategy;
        h.totalRounds = e.totalRounds;
        h.totalSteps = e.totalSteps;
        h.round = e.resumedFromRound;
        h.resumedFromRound = e.resumedFromRound;
        h.state = 'running';
        h.startedAt = e.time;
        h.endedAt = undefined;
        h.message = undefined;
        break;
      case 'run.state':
        h.state = e.state;
        h.message = e.message;
        h.endedAt = isTerminal(e.state) ? e.time : undefined;
        break;
      case 'run.completed':
        h.state = 'completed';
        h.endedAt = e.time;
        break;
      case 'run.failed':
        h.state = 'failed';
        h.message = e.error;
        h.endedAt = e.time;
        break;
      case 'worker.joined':
        this.present.add(e.worker.workerId);
        h.workers = this.present.size;
        break;
      case 'worker.left':
        this.present.delete(e.workerId);
        h.workers = this.present.size;
        break;
      case 'round.completed':
        h.round = Math.max(h.round, e.round);
        if (e.trainLoss !== null) h.lastTrainLoss = e.trainLoss;
        if (e.evalLoss !== null) h.lastEvalLoss = e.evalLoss;
        if (e.privacy) h.privacy = e.privacy;
        break;
      case 'step.completed':
        h.step = Math.max(h.step, e.step);
        h.lastTrainLoss = e.loss;
        break;
      case 'bus.degraded':
        h.busDegraded = { backend: e.backend, message: e.message, buffered: e.buffered };
        break;
      case 'bus.restored':
        h.busDegraded = null;
        break;
      default:
        break;
    }
    return true;
  }
}

/** Everything one run's page shows. */
export class RunView {
  private readonly fold: HeaderFold;
  readonly workers = new Map<string, WorkerRow>();
  readonly rounds: RoundPoint[] = [];
  readonly steps: StepPoint[] = [];
  readonly curves = new Map<string, LossCurve>();
  /** Recent events for the log (bounded). */
  readonly log: RunEvent[] = [];

  constructor(runId: string, private readonly logLimit = 5000) {
    this.fold = new HeaderFold(runId);
  }

  get header(): RunHeader {
    return this.fold.header;
  }

  apply(e: RunEvent): boolean {
    if (!this.fold.apply(e)) return false;
    this.log.push(e);
    if (this.log.length > this.logLimit) this.log.splice(0, this.log.length - this.logLimit);
    switch (e.type) {
      case 'worker.joined': {
        const w = this.worker(e.worker.workerId, e.worker.site, e.time);
        w.device = e.worker.device;
        w.status = 'connected';
        break;
      }
      case 'worker.left': {
        const w = this.worker(e.workerId, e.site, e.time);
        w.status = `left (${e.reason})`;
        break;
      }
      case 'worker.heartbeat': {
        const w = this.worker(e.workerId, e.site, e.time);
        w.status = e.status;
        break;
      }
      case 'worker.progress': {
        const w = this.worker(e.workerId, e.site, e.time);
        w.status = 'training';
        w.round = e.round;
        w.step = e.step;
        w.totalSteps = e.totalSteps;
        w.loss = e.loss;
        w.tokensPerSec = e.tokensPerSec;
        w.examples = e.examples;
        const x = e.round > 0 && e.totalSteps > 0 ? e.round - 1 + e.step / e.totalSteps : e.step;
        const c = this.curve(e.workerId, e.site);
        c.x.push(x);
        c.y.push(e.loss);
        break;
      }
      case 'worker.error': {
        const w = this.worker(e.workerId, e.site, e.time);
        w.errors++;
        w.lastError = e.message;
        break;
      }
      case 'task.dispatched': {
        const w = this.worker(e.workerId, e.site, e.time);
        w.bytesDown += e.bytes;
        w.status = 'task sent';
        w.round = e.round;
        break;
      }
      case 'update.received': {
        const w = this.worker(e.workerId, e.site, e.time);
        w.bytesUp += e.bytes;
        w.status = 'update sent';
        break;
      }
      case 'update.rejected': {
        const w = this.worker(e.workerId, e.site, e.time);
        w.errors++;
        w.lastError = `update rejected: ${e.reason}`;
        break;
      }
      case 'round.completed':
        this.rounds.push({
          round: e.round, trainLoss: e.trainLoss, evalLoss: e.evalLoss, evalAccuracy: e.evalAccuracy,
          durationMs: e.durationMs, phases: e.phases, bytesUp: e.bytesUp, bytesDown: e.bytesDown,
          participants: e.participants, examples: e.examples, privacy: e.privacy ?? null, time: e.time,
        });
        for (const w of this.workers.values()) if (w.status === 'update sent') w.status = 'idle';
        break;
      case 'step.completed':
        this.steps.push({
          step: e.step, loss: e.loss, lr: e.lr, tokensPerSec: e.tokensPerSec, workers: e.workers, time: e.time,
          computeMs: e.computeMs, communicateMs: e.communicateMs, aggregateMs: e.aggregateMs,
        });
        for (const p of e.perWorker) {
          const w = this.worker(p.workerId, p.site, e.time);
          w.status = 'training';
          w.step = e.step;
          w.tokensPerSec = p.tokensPerSec;
        }
        break;
      default:
        break;
    }
    return true;
  }

  private worker(workerId: string, site: string, time: number): WorkerRow {
    let w = this.workers.get(workerId);
    if (!w) {
      w = {
        workerId, site, device: '', status: 'unknown', lastSeen: time, round: 0, step: 0, totalSteps: 0,
        loss: null, tokensPerSec: 0, examples: 0, bytesUp: 0, bytesDown: 0, errors: 0,
      };
      this.workers.set(workerId, w);
    }
    if (site) w.site = site;
    w.lastSeen = Math.max(w.lastSeen, time);
    return w;
  }

  private curve(workerId: string, site: string): LossCurve {
    let c = this.curves.get(workerId);
    if (!c) {
      c = { workerId, site, x: [], y: [] };
      this.curves.set(workerId, c);
    }
    return c;
  }
}

/** Milliseconds the run has been going (to `now` while it runs, to its end after). */
export function elapsedMs(h: RunHeader, now: number): number {
  if (h.startedAt === 0) return 0;
  return Math.max(0, (h.endedAt ?? now) - h.startedAt);
}

/**
 * Estimated time left: mean duration of the rounds (or steps) done since the
 * run started, times what is left. Undefined until one is done or once the run ended.
 */
export function etaMs(h: RunHeader, now: number): number | undefined {
  if (h.endedAt !== undefined || isTerminal(h.state)) return undefined;
  const elapsed = elapsedMs(h, now);
  if (h.mode === 'distributed' && h.totalSteps > 0 && h.step > 0) {
    return (elapsed / h.step) * Math.max(0, h.totalSteps - h.step);
  }
  const done = h.round - h.resumedFromRound;
  if (h.totalRounds > 0 && done > 0) {
    return (elapsed / done) * Math.max(0, h.totalRounds - h.round);
  }
  return undefined;
}
