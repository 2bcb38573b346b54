/**
 * Prometheus metrics fed from run events alone (prom-client), so a dashboard
 * server fed from NATS exposes the same numbers as the coordinator's own.
 * Every series carries a `run` label.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { RunEvent } from '../../common/events.ts';

export interface RunMetrics {
  readonly registry: Registry;
  /** Fold one event into the metrics. Call once per event (the server dedupes by seq). */
  observe(e: RunEvent): void;
  /** Prometheus text exposition. */
  text(): Promise<string>;
  contentType: string;
}

/** Round durations: from a toy run (sub-second) to long federated rounds. */
export const ROUND_DURATION_BUCKETS = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600];

export function createRunMetrics(opts: { processMetrics?: boolean } = {}): RunMetrics {
  const registry = new Registry();
  if (opts.processMetrics ?? true) collectDefaultMetrics({ register: registry, prefix: 'fedtune_process_' });
  const labelNames = ['run'] as const;
  const reg = { registers: [registry] };

  const runInfo = new Gauge({
    name: 'fedtune_run_info', help: 'Run description (value 1)', labelNames: ['run', 'name', 'mode', 'strategy'] as const, ...reg,
  });
  const roundsCompleted = new Counter({ name: 'fedtune_rounds_completed_total', help: 'Federated rounds completed', labelNames, ...reg });
  const stepsCompleted = new Counter({ name: 'fedtune_steps_completed_total', help: 'Distributed optimizer steps completed', labelNames, ...reg });
  const tokens = new Counter({ name: 'fedtune_tokens_total', help: 'Tokens trained on in distributed steps', labelNames, ...reg });
  const workersConnected = new Gauge({ name: 'fedtune_workers_connected', help: 'Workers connected to the run now', labelNames, ...reg });
  const bytes = new Counter({
    name: 'fedtune_bytes_total', help: 'Bytes moved between coordinator and workers (up = to the coordinator)',
    labelNames: ['run', 'direction'] as const, ...reg,
  });
  const globalLoss = new Gauge({
    name: 'fedtune_global_loss', help: 'Last global loss (split train or eval)', labelNames: ['run', 'split'] as const, ...reg,
  });
  const evalAccuracy = new Gauge({ name: 'fedtune_eval_accuracy', help: 'Last global eval accuracy', labelNames, ...reg });
  const roundDuration = new Histogram({
    name: 'fedtune_round_duration_seconds', help: 'Wall time of each federated round', labelNames,
    buckets: ROUND_DURATION_BUCKETS, ...reg,
  });
  const updatesRejected = new Counter({ name: 'fedtune_updates_rejected_total', help: 'Worker updates rejected by validation', labelNames, ...reg });
  const workerErrors = new Counter({ name: 'fedtune_worker_errors_total', help: 'Errors reported by workers', labelNames, ...reg });
  const privacyEpsilon = new Gauge({
    name: 'fedtune_privacy_epsilon',
    help: 'Privacy spent so far at the run\'s delta (kind: total = the largest, client = DP-FedAvg, sample = DP-SGD worst site; +Inf: unbounded)',
    labelNames: ['run', 'kind'] as const, ...reg,
  });
  const events = new Counter({
    name: 'fedtune_events_total', help: 'Run events seen, by type', labelNames: ['run', 'type'] as const, ...reg,
  });

  const present = new Map<string, Set<string>>();
  const workersOf = (run: string): Set<string> => {
    let s = present.get(run);
    if (!s) present.set(run, (s = new Set()));
    return s;
  };

  function observe(e: RunEvent): void {
    const run = e.runId;
    events.inc({ run, type: e.type });
    switch (e.type) {
      case 'run.started':
        runInfo.set({ run, name: e.name, mode: e.mode, strategy: e.strategy }, 1);
        break;
      case 'worker.joined':
        workersOf(run).add(e.worker.workerId);
        workersConnected.set({ run }, workersOf(run).size);
        break;
      case 'worker.left':
        workersOf(run).delete(e.workerId);
        workersConnected.set({ run }, workersOf(run).size);
        break;
      case 'worker.error':
        workerErrors.inc({ run });
        break;
      case 'update.rejected':
        updatesRejected.inc({ run });
        break;
      case 'round.completed':
        roundsCompleted.inc({ run });
        roundDuration.observe({ run }, e.durationMs / 1000);
        bytes.inc({ run, direction: 'up' }, e.bytesUp);
        bytes.inc({ run, direction: 'down' }, e.bytesDown);
        if (e.trainLoss !== null) globalLoss.set({ run, split: 'train' }, e.trainLoss);
        if (e.evalLoss !== null) globalLoss.set({ run, split: 'eval' }, e.evalLoss);
        if (e.evalAccuracy !== null) evalAccuracy.set({ run }, e.evalAccuracy);
        if (e.privacy) {
          const eps = (x: number | null): number => x ?? Infinity;
          privacyEpsilon.set({ run, kind: 'total' }, eps(e.privacy.epsilon));
          if (e.privacy.client) privacyEpsilon.set({ run, kind: 'client' }, eps(e.privacy.client.epsilon));
          if (e.privacy.sample) privacyEpsilon.set({ run, kind: 'sample' }, eps(e.privacy.sample.epsilon));
        }
        break;
      case 'step.completed':
        stepsCompleted.inc({ run });
        tokens.inc({ run }, e.tokens);
        globalLoss.set({ run, split: 'train' }, e.loss);
        break;
      case 'run.completed':
      case 'run.failed':
        workersOf(run).clear();
        workersConnected.set({ run }, 0);
        break;
      default:
        break;
    }
  }

  return { registry, observe, text: () => registry.metrics(), contentType: registry.contentType };
}
