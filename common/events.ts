/**
 * Run events: one typed union that every consumer (dashboard WebSocket, NATS,
 * the JSONL event log) speaks. Each event carries its run id and a per-run
 * sequence number (1, 2, 3, ... with no gaps) so that any consumer can resume
 * from the last sequence number it saw.
 */

export type RunMode = 'federated' | 'distributed';
export type RunState = 'starting' | 'waiting' | 'running' | 'completed' | 'failed' | 'stopped';

/** Fields every event has. `seq` and `time` are assigned by the event bus on publish. */
export interface EventBase {
  runId: string;
  seq: number;
  /** Milliseconds since the Unix epoch when the event was created. */
  time: number;
}

export interface WorkerInfo {
  workerId: string;
  site: string;
  device: string;
  memoryBytes: number;
  backends: string[];
}

/** Time split of one round or step, in milliseconds. */
export interface PhaseTimes {
  dispatchMs: number;
  trainMs: number;
  uploadMs: number;
  aggregateMs: number;
}

/**
 * Privacy spent so far (coordinator/privacy/ledger.ts). epsilon: the largest
 * reported, what privacy.max_epsilon bounds; null: unbounded (noise multiplier 0).
 */
export interface PrivacyReport {
  epsilon: number | null;
  delta: number;
  /** Client-level DP-FedAvg: epsilon over the aggregated rounds, C of the next round, sigma. */
  client?: { epsilon: number | null; clipNorm: number; noiseMultiplier: number; rounds: number };
  /** Sample-level DP-SGD: the worst site's epsilon and noisy steps. */
  sample?: { epsilon: number | null; steps: number; sampleRate: number; noiseMultiplier: number };
}

export type RunEventBody =
  | {
      type: 'run.started';
      name: string;
      mode: RunMode;
      strategy: string;
      totalRounds: number;
      /** Distributed mode: total optimizer steps planned (0 in federated mode). */
      totalSteps: number;
      config: Record<string, unknown>;
      resumedFromRound: number;
    }
  | { type: 'run.state'; state: RunState; message?: string }
  | {
      type: 'run.completed';
      rounds: number;
      finalAdapterPath: string;
      metrics: Record<string, number>;
      /** Why the run completed before its last round (e.g. privacy.max_epsilon). */
      reason?: string;
    }
  | { type: 'run.failed'; error: string }
  | { type: 'worker.joined'; worker: WorkerInfo }
  | { type: 'worker.left'; workerId: string; site: string; reason: string }
  | { type: 'worker.heartbeat'; workerId: string; site: string; status: string }
  | {
      type: 'worker.progress';
      workerId: string;
      site: string;
      round: number;
      taskId: string;
      step: number;
      totalSteps: number;
      loss: number;
      tokensPerSec: number;
      examples: number;
    }
  | { type: 'worker.error'; workerId: string; site: string; message: string }
  | { type: 'round.started'; round: number; cohort: string[]; globalVersion: number }
  | { type: 'task.dispatched'; round: number; taskId: string; workerId: string; site: string; bytes: number }
  | {
      type: 'update.received';
      round: number;
      taskId: string;
      workerId: string;
      site: string;
      examples: number;
      bytes: number;
      metrics: Record<string, number>;
    }
  | { type: 'update.rejected'; round: number; taskId: string; workerId: string; site: string; reason: string }
  | { type: 'round.retried'; round: number; reason: string; received: number; required: number }
  | {
      type: 'round.completed';
      round: number;
      globalVersion: number;
      participants: number;
      examples: number;
      trainLoss: number | null;
      evalLoss: number | null;
      evalAccuracy: number | null;
      durationMs: number;
      phases: PhaseTimes;
      bytesUp: number;
      bytesDown: number;
      /** Privacy spent after this round, when the run has privacy.client_dp or privacy.dp_sgd. */
      privacy?: PrivacyReport;
    }
  | {
      type: 'step.completed';
      step: number;
      epoch: number;
      loss: number;
      lr: number;
      tokens: number;
      tokensPerSec: number;
      workers: number;
      computeMs: number;
      communicateMs: number;
      aggregateMs: number;
      perWorker: Array<{ workerId: string; site: string; tokens: number; tokensPerSec: number }>;
    }
  | { type: 'checkpoint.written'; round: number; step: number; path: string; bytes: number }
  | { type: 'bus.degraded'; backend: string; message: string; buffered: number }
  | { type: 'bus.restored'; backend: string; republished: number }
  | { type: 'log'; level: 'info' | 'warn' | 'error'; message: string };

export type RunEventType = RunEventBody['type'];
export type RunEvent = EventBase & RunEventBody;
/** An event as the run loop hands it to the bus, before seq and time are assigned. */
export type NewRunEvent = RunEventBody & { runId: string };

export const RUN_EVENT_TYPES: readonly RunEventType[] = [
  'run.started', 'run.state', 'run.completed', 'run.failed',
  'worker.joined', 'worker.left', 'worker.heartbeat', 'worker.progress', 'worker.error',
  'round.started', 'task.dispatched', 'update.received', 'update.rejected', 'round.retried', 'round.completed',
  'step.completed', 'checkpoint.written', 'bus.degraded', 'bus.restored', 'log',
];

export function isRunEvent(x: unknown): x is RunEvent {
  if (typeof x !== 'object' || x === null) return false;
  const e = x as Record<string, unknown>;
  return (
    typeof e.runId === 'string' &&
    typeof e.seq === 'number' &&
    typeof e.time === 'number' &&
    typeof e.type === 'string' &&
    (RUN_EVENT_TYPES as readonly string[]).includes(e.type)
  );
}
