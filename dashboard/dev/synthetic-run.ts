/**
 * A synthetic run that publishes realistic events to a bus: workers join,
 * train with falling loss, upload, rounds complete. Used by the dashboard's
 * tests, the fan-out bench and `node bin/run-ts.js dashboard/dev/preview.ts`
 * to look at the dashboard without a real run.
 */
import type { NewRunEvent, RunEventBody, RunMode } from '../../common/events.ts';
import type { EventBus } from '../../coordinator/events/bus.ts';

export interface SyntheticRunOptions {
  runId: string;
  name?: string;
  mode?: RunMode;
  rounds?: number;
  workers?: number;
  /** Local steps per round (federated) or optimizer steps per "round" chunk (distributed). */
  stepsPerRound?: number;
  /** Wall time per local step in ms (0: as fast as possible). */
  stepMs?: number;
  /** Stop early when aborted. */
  signal?: AbortSignal;
  /** Deterministic pseudo-random seed. */
  seed?: number;
}

const SITES = ['hospital-a', 'hospital-b', 'lab-zurich', 'clinic-osaka', 'univ-lyon', 'edge-nyc', 'site-7', 'site-8'];
const DEVICES = ['cuda:0 (A100 80GB)', 'cuda:0 (L4 24GB)', 'cpu (32 cores)', 'cuda:0 (RTX 4090)', 'cpu (16 cores)'];

function rng(seed: number): () => number {
  // mulberry32: tiny deterministic generator, enough for fake noise.
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const sleep = (ms: number, signal?: AbortSignal): Promise<void> =>
  new Promise((resolve) => {
    if (ms <= 0 || signal?.aborted) return resolve();
    const t = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
  });

/** Publish a whole synthetic run; resolves when it has completed (or was aborted). */
export async function runSynthetic(bus: EventBus, o: SyntheticRunOptions): Promise<void> {
  const rounds = o.rounds ?? 5;
  const nWorkers = o.workers ?? 3;
  const steps = o.stepsPerRound ?? 8;
  const stepMs = o.stepMs ?? 50;
  const mode = o.mode ?? 'federated';
  const rand = rng(o.seed ?? 1);
  const runId = o.runId;
  const pub = (e: RunEventBody): void => {
    bus.publish({ ...e, runId } satisfies NewRunEvent);
  };
  const stopped = (): boolean => o.signal?.aborted === true;

  const workers = Array.from({ length: nWorkers }, (_, i) => ({
    workerId: `w${i + 1}-${SITES[i % SITES.length]}`,
    site: SITES[i % SITES.length]!,
    device: DEVICES[i % DEVICES.length]!,
    speed: 0.6 + rand() * 0.8,
    examples: 200 + Math.floor(rand() * 800),
  }));
  const adapterBytes = 3_407_872;

  pub({
    type: 'run.started', name: o.name ?? `synthetic ${mode} run`, mode,
    strategy: mode === 'federated' ? 'fedavg' : 'sync-sgd', totalRounds: mode === 'federated' ? rounds : 0,
    totalSteps: mode === 'distributed' ? rounds * steps : 0,
    config: { model: 'tiny-llama-test', lora: { r: 8, alpha: 16 } }, resumedFromRound: 0,
  });
  pub({ type: 'run.state', state: 'waiting', message: `waiting for ${nWorkers} workers` });
  for (const w of workers) {
    await sleep(stepMs, o.signal);
    pub({ type: 'worker.joined', worker: { workerId: w.workerId, site: w.site, device: w.device, memoryBytes: 16e9, backends: ['cpu'] } });
  }
  pub({ type: 'run.state', state: 'running' });

  let loss = 3.2;
  let globalStep = 0;
  for (let r = 1; r <= rounds && !stopped(); r++) {
    if (mode === 'distributed') {
      for (let s = 0; s < steps && !stopped(); s++) {
        await sleep(stepMs, o.signal);
        globalStep++;
        loss = loss * 0.97 + (rand() - 0.5) * 0.03;
        const per = workers.map((w) => ({ workerId: w.workerId, site: w.site, tokens: 2048, tokensPerSec: 1500 * w.speed * (0.9 + rand() * 0.2) }));
        pub({
          type: 'step.completed', step: globalStep, epoch: Math.floor(globalStep / 50), loss, lr: 2e-4, tokens: 2048 * nWorkers,
          tokensPerSec: per.reduce((a, p) => a + p.tokensPerSec, 0), workers: nWorkers,
          computeMs: stepMs * 0.7, communicateMs: stepMs * 0.2, aggregateMs: stepMs * 0.1, perWorker: per,
        });
      }
      continue;
    }
    const t0 = Date.now();
    pub({ type: 'round.started', round: r, cohort: workers.map((w) => w.workerId), globalVersion: r - 1 });
    for (const w of workers) {
      pub({ type: 'task.dispatched', round: r, taskId: `r${r}-${w.workerId}`, workerId: w.workerId, site: w.site, bytes: adapterBytes });
    }
    const tDispatch = Date.now();
    const local = workers.map(() => loss);
    for (let s = 1; s <= steps && !stopped(); s++) {
      await sleep(stepMs, o.signal);
      workers.forEach((w, i) => {
        local[i] = local[i]! * (0.985 - 0.01 * w.speed) + (rand() - 0.5) * 0.05;
        pub({
          type: 'worker.progress', workerId: w.workerId, site: w.site, round: r, taskId: `r${r}-${w.workerId}`,
          step: s, totalSteps: steps, loss: local[i]!, tokensPerSec: 1200 * w.speed * (0.9 + rand() * 0.2),
          examples: Math.round((w.examples * s) / steps),
        });
      });
      if (s % 4 === 0) for (const w of workers) pub({ type: 'worker.heartbeat', workerId: w.workerId, site: w.site, status: 'training' });
    }
    const tTrain = Date.now();
    for (const [i, w] of workers.entries()) {
      pub({
        type: 'update.received', round: r, taskId: `r${r}-${w.workerId}`, workerId: w.workerId, site: w.site,
        examples: w.examples, bytes: adapterBytes, metrics: { train_loss: local[i]! },
      });
    }
    const tUpload = Date.now();
    await sleep(stepMs / 2, o.signal);
    const total = workers.reduce((a, w) => a + w.examples, 0);
    loss = workers.reduce((a, w, i) => a + local[i]! * w.examples, 0) / total;
    const t1 = Date.now();
    pub({
      type: 'round.completed', round: r, globalVersion: r, participants: nWorkers, examples: total,
      trainLoss: loss, evalLoss: loss * 1.06 + rand() * 0.02, evalAccuracy: Math.min(0.99, 0.35 + 0.6 * (1 - Math.exp(-r / 3))),
      durationMs: t1 - t0,
      phases: { dispatchMs: tDispatch - t0, trainMs: tTrain - tDispatch, uploadMs: tUpload - tTrain, aggregateMs: t1 - tUpload },
      bytesUp: adapterBytes * nWorkers, bytesDown: adapterBytes * nWorkers,
    });
    pub({ type: 'checkpoint.written', round: r, step: 0, path: `checkpoints/${runId}/round-${r}`, bytes: adapterBytes });
  }
  if (stopped()) {
    pub({ type: 'run.state', state: 'stopped', message: 'stopped by user' });
    return;
  }
  pub({
    type: 'run.completed', rounds, finalAdapterPath: `checkpoints/${runId}/final`,
    metrics: { train_loss: loss },
  });
}
