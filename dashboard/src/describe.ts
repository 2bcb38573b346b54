/** One line per event for the dashboard's event log. */
import type { RunEvent } from '../../common/events.ts';
import { formatBytes, formatDuration, formatEpsilon, formatMetric } from './format.ts';

export type EventKind = 'run' | 'worker' | 'round' | 'step' | 'problem';

export function eventKind(e: RunEvent): EventKind {
  switch (e.type) {
    case 'run.failed':
    case 'worker.error':
    case 'update.rejected':
    case 'round.retried':
    case 'bus.degraded':
      return 'problem';
    case 'log':
      return e.level === 'info' ? 'run' : 'problem';
    case 'run.started':
    case 'run.state':
    case 'run.completed':
    case 'checkpoint.written':
    case 'bus.restored':
      return 'run';
    case 'worker.joined':
    case 'worker.left':
    case 'worker.heartbeat':
    case 'worker.progress':
      return 'worker';
    case 'step.completed':
      return 'step';
    default:
      return 'round';
  }
}

export function eventLevel(e: RunEvent): 'info' | 'warn' | 'error' {
  if (e.type === 'log') return e.level;
  if (e.type === 'run.failed' || e.type === 'worker.error') return 'error';
  if (eventKind(e) === 'problem') return 'warn';
  return 'info';
}

export function describeEvent(e: RunEvent): string {
  switch (e.type) {
    case 'run.started':
      return `run "${e.name}" started: ${e.mode}, ${e.strategy}, ${e.mode === 'distributed' ? `${e.totalSteps} steps` : `${e.totalRounds} rounds`}` +
        (e.resumedFromRound > 0 ? `, resumed after round ${e.resumedFromRound}` : '');
    case 'run.state':
      return `state ${e.state}${e.message ? `: ${e.message}` : ''}`;
    case 'run.completed':
      return `run completed after ${e.rounds} rounds${e.reason ? ` (${e.reason})` : ''}; adapter at ${e.finalAdapterPath}`;
    case 'run.failed':
      return `run failed: ${e.error}`;
    case 'worker.joined':
      return `${e.worker.site} joined (${e.worker.device}, ${formatBytes(e.worker.memoryBytes)} memory)`;
    case 'worker.left':
      return `${e.site} left: ${e.reason}`;
    case 'worker.heartbeat':
      return `${e.site} heartbeat: ${e.status}`;
    case 'worker.progress':
      return `${e.site} round ${e.round} step ${e.step}/${e.totalSteps}, loss ${formatMetric(e.loss)}, ${Math.round(e.tokensPerSec)} tok/s`;
    case 'worker.error':
      return `${e.site}: ${e.message}`;
    case 'round.started':
      return `round ${e.round} started with ${e.cohort.length} workers from version ${e.globalVersion}`;
    case 'task.dispatched':
      return `round ${e.round}: task sent to ${e.site} (${formatBytes(e.bytes)})`;
    case 'update.received':
      return `round ${e.round}: update from ${e.site}, ${e.examples} examples (${formatBytes(e.bytes)})`;
    case 'update.rejected':
      return `round ${e.round}: update from ${e.site} rejected: ${e.reason}`;
    case 'round.retried':
      return `round ${e.round} retried: ${e.reason} (${e.received}/${e.required} updates)`;
    case 'round.completed':
      return `round ${e.round} done in ${formatDuration(e.durationMs)}: ${e.participants} workers, train loss ${formatMetric(e.trainLoss)}, eval loss ${formatMetric(e.evalLoss)}, accuracy ${formatMetric(e.evalAccuracy)}${e.privacy ? `, ${formatEpsilon(e.privacy)}` : ''}`;
    case 'step.completed':
      return `step ${e.step}: loss ${formatMetric(e.loss)}, ${e.workers} workers, ${Math.round(e.tokensPerSec)} tok/s`;
    case 'checkpoint.written':
      return `checkpoint ${e.path} (${formatBytes(e.bytes)})`;
    case 'bus.degraded':
      return `event bus ${e.backend} degraded: ${e.message} (${e.buffered} buffered)`;
    case 'bus.restored':
      return `event bus ${e.backend} restored, ${e.republished} republished`;
    case 'log':
      return e.message;
  }
}
