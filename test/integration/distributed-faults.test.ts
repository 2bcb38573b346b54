/**
 * Faults in distributed mode over real gRPC on loopback with real worker
 * processes: a worker killed mid-step, workers sending NaN or wrong-shape
 * gradients, one that never answers (step deadline), a worker joining mid-run,
 * and a coordinator killed and resumed. Because a step's global batch never
 * depends on who computes it, every run must still end exactly where one
 * process training on the same data ends.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterEach, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import type { RunEvent } from '../../common/events.ts';
import { readPeftAdapter } from '../../common/peft.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { STEPS_LOG, type StepRecord } from '../../coordinator/distributed/store.ts';
import { UpdateKind, WorkerStatus, type CoordinatorMessage, type Task } from '../../proto/gen/fedtune/v1/coordinator.ts';
import { CoordinatorConnection, isServiceError, WorkerAgent } from '../../worker/agent.ts';
import { createTrainer } from '../../worker/trainers/index.ts';
import type { Trainer } from '../../worker/trainers/trainer.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { decodeShard } from '../../common/shard.ts';
import { distConfig, distWorker, maxAbsDiff, referenceTraining, tinyLlama, writeDataset } from './distributed-helpers.ts';
import { events, fedtune, tempDir, waitForEvent, type Proc } from './federated-helpers.ts';

const procs: Proc[] = [];
const probes: Probe[] = [];
let coord: CoordinatorHandle | null = null;

afterEach(async () => {
  for (const p of probes.splice(0)) p.close();
  for (const p of procs.splice(0)) p.kill();
  await coord?.close();
  coord = null;
});

type Behaviour = 'nan' | 'wrong-shape' | 'silent';

/** A worker driven by hand: registers, keeps its session alive, and answers step tasks badly. */
class Probe {
  readonly conn: CoordinatorConnection;
  readonly answered: string[] = [];
  private call: grpc.ClientDuplexStream<unknown, CoordinatorMessage> | null = null;
  private timer: NodeJS.Timeout | null = null;

  constructor(address: string, private readonly behaviour: Behaviour) {
    this.conn = new CoordinatorConnection(address);
  }

  async join(site: string, fingerprint: string): Promise<void> {
    const reg = await this.conn.register({
      joinToken: 'test-token',
      site,
      previousWorkerId: '',
      capabilities: { device: 'cpu', memoryBytes: 1, backends: ['probe'], modelFingerprint: fingerprint, numTrainExamples: 0, numEvalExamples: 0, client: 'probe', protocolVersion: 1 },
    });
    const call = this.conn.session();
    this.call = call as unknown as grpc.ClientDuplexStream<unknown, CoordinatorMessage>;
    call.on('data', (m: CoordinatorMessage) => {
      if (m.body?.$case === 'task') void this.answer(m.body.value, reg.maxChunkBytes).catch(() => {});
    });
    call.on('error', () => {});
    const beat = (): void => void call.write({ body: { $case: 'heartbeat', value: { status: WorkerStatus.WORKER_STATUS_IDLE, taskId: '', memoryUsedBytes: 0 } } });
    beat();
    this.timer = setInterval(beat, 200);
  }

  private async answer(task: Task, maxChunkBytes: number): Promise<void> {
    if (task.kind?.$case !== 'step' || this.behaviour === 'silent') return;
    const st = task.kind.value;
    // Report the right token count so that the values themselves are what gets refused.
    const shard = await this.conn.downloadShard(st.shard!.shardId, maxChunkBytes);
    const s = decodeShard(shard.bytes, shard.mediaType);
    if (s.kind !== 'examples') throw new Error('probe expects example shards');
    let tokens = 0;
    for (const mb of s.microBatches.slice(Number(st.microBatchStart), Number(st.microBatchStart) + Number(st.microBatchCount))) {
      for (const ex of mb) tokens += ex.labels.filter((l, i) => i > 0 && l !== -100).length;
    }
    const { adapter } = await this.conn.downloadAdapter(task.global!.version, maxChunkBytes);
    const grads: TensorMap = new Map();
    let first = true;
    for (const [k, t] of adapter) {
      const data = new Float32Array(t.data.length).fill(0.01);
      let shape = [...t.shape];
      if (first && this.behaviour === 'nan') data[3] = NaN;
      if (first && this.behaviour === 'wrong-shape') shape = [shape[0]! * 2, shape[1]!];
      grads.set(k, { shape, data: first && this.behaviour === 'wrong-shape' ? new Float32Array(shape[0]! * shape[1]!) : data });
      first = false;
    }
    this.answered.push(task.taskId);
    try {
      await this.conn.upload(
        { taskId: task.taskId, round: task.round, kind: UpdateKind.UPDATE_KIND_GRADIENT, baseVersion: task.global!.version, numExamples: 1, metrics: { tokens, loss_sum: 1 } },
        grads,
        { chunkBytes: 1024 },
      );
    } catch (err) {
      if (!isServiceError(err)) throw err;
    }
  }

  close(): void {
    if (this.timer) clearInterval(this.timer);
    this.call?.cancel();
    this.conn.close();
  }
}

function stepRecords(runDir: string): StepRecord[] {
  return readFileSync(join(runDir, STEPS_LOG), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as StepRecord);
}

describe('distributed faults', () => {
  it('a worker killed mid-step (during its gradient upload): dropped, its micro-batches redistributed, the step retried, same result', async () => {
    const dir = tempDir('dist-kill');
    const model = await tinyLlama(join(dir, 'model'));
    const cfg = distConfig(dir, model, writeDataset(join(dir, 'data.jsonl'), 12), { name: 'kill', cohort: { min_workers: 3 }, server: { chunk_bytes: 1024 } });
    const reference = await referenceTraining(cfg);
    coord = await startCoordinator(cfg);
    procs.push(distWorker(coord.address, 'steady-a', model), distWorker(coord.address, 'steady-b', model));
    procs.push(distWorker(coord.address, 'dies', model, ['--fault', 'kill-mid-upload']));
    const result = await coord.run;
    expect(result.state, result.error).toBe('completed');
    // It really died by its own SIGKILL halfway through an upload.
    await procs[2]!.exited;
    expect(procs[2]!.child.signalCode).toBe('SIGKILL');

    const final = (await readPeftAdapter(join(coord.runDir, 'step-000004'))).adapter;
    expect(maxAbsDiff(final, reference)).toBeLessThan(1e-5);
    const evs = await events(coord.bus, coord.runId);
    expect(evs.some((e) => e.type === 'worker.left' && e.site === 'dies')).toBe(true);
    const dropped = evs.filter((e): e is Extract<RunEvent, { type: 'log' }> => e.type === 'log' && /dropped/.test(e.message));
    expect(dropped.length).toBeGreaterThan(0);
    expect(dropped[0]!.message).toMatch(/step 1: worker dies .*dropped: worker left/);
    const steps = evs.filter((e): e is Extract<RunEvent, { type: 'step.completed' }> => e.type === 'step.completed');
    expect(steps.map((e) => e.step)).toEqual([1, 2, 3, 4]);
    for (const s of steps) expect(s.perWorker.map((w) => w.site).sort()).toEqual(['steady-a', 'steady-b']);
    const recs = stepRecords(coord.runDir);
    expect(recs[0]!.retries).toBe(1);
    // The steady workers got new shards for the rest of the epoch (re-planned without the dead worker).
    expect(evs.some((e) => e.type === 'log' && /without 1 dropped worker/.test(e.message))).toBe(true);
  });

  it('NaN and wrong-shape gradients are refused with a logged reason, a silent worker misses the deadline; the step is computed from the rest', async () => {
    const dir = tempDir('dist-bad');
    const model = await tinyLlama(join(dir, 'model'));
    const cfg = distConfig(dir, model, writeDataset(join(dir, 'data.jsonl'), 12), {
      name: 'bad',
      cohort: { min_workers: 5 },
      // 6 micro-batches per step for 5 workers: every worker, probes included, gets a share of every step.
      training: { grad_accumulation: 6, steps: 2 },
      distributed: { step_deadline_sec: 5 },
    });
    const reference = await referenceTraining(cfg);
    coord = await startCoordinator(cfg);
    const fingerprint = (await loadModel(model)).fingerprint;
    for (const [site, b] of [['nan', 'nan'], ['shape', 'wrong-shape'], ['silent', 'silent']] as const) {
      const p = new Probe(coord.address, b);
      probes.push(p);
      await p.join(site, fingerprint);
    }
    procs.push(distWorker(coord.address, 'good-a', model), distWorker(coord.address, 'good-b', model));
    const result = await coord.run;
    expect(result.state, result.error).toBe('completed');
    const final = (await readPeftAdapter(join(coord.runDir, 'step-000002'))).adapter;
    expect(maxAbsDiff(final, reference)).toBeLessThan(1e-5);

    const evs = await events(coord.bus, coord.runId);
    const rejected = evs.filter((e): e is Extract<RunEvent, { type: 'update.rejected' }> => e.type === 'update.rejected');
    expect(rejected.find((e) => e.site === 'nan')?.reason).toMatch(/gradient tensor \S+ has a non-finite value \(NaN\) at element 3/);
    expect(rejected.find((e) => e.site === 'shape')?.reason).toMatch(/gradient does not match the adapter: tensor \S+: shape \[\d+, \d+\], expected \[\d+, \d+\]/);
    const drops = evs.filter((e): e is Extract<RunEvent, { type: 'log' }> => e.type === 'log' && /dropped/.test(e.message)).map((e) => e.message);
    expect(drops.some((m) => /worker silent .*missed the step deadline of 5 s/.test(m))).toBe(true);
    expect(drops.some((m) => /worker nan .*non-finite/.test(m))).toBe(true);
    // Every completed step was computed by the two good workers only.
    const steps = evs.filter((e): e is Extract<RunEvent, { type: 'step.completed' }> => e.type === 'step.completed');
    expect(steps).toHaveLength(2);
    for (const s of steps) expect(s.perWorker.map((w) => w.site).sort()).toEqual(['good-a', 'good-b']);
  });

  it('a worker joining mid-run gets a shard at the next epoch boundary', async () => {
    const dir = tempDir('dist-join');
    const model = await tinyLlama(join(dir, 'model'));
    const cfg = distConfig(dir, model, writeDataset(join(dir, 'data.jsonl'), 12), { name: 'join', training: { steps: 6 } });
    const reference = await referenceTraining(cfg);
    coord = await startCoordinator(cfg);
    // The first worker runs in this process and holds its first step until the late worker has joined,
    // so that the join lands in the middle of epoch 1 (steps 1-2) whatever the machine's speed.
    const trainer = await createTrainer('onnx', { modelDir: model, dataPath: '', evalFraction: 0, template: 'plain', maxSeqLen: 96, threads: 1, seed: 0 });
    let openGate!: () => void;
    const gate = new Promise<void>((r) => (openGate = r));
    const gated = Object.assign(Object.create(trainer) as Trainer, {
      computeGradients: async (a: Parameters<NonNullable<Trainer['computeGradients']>>[0]) => {
        await gate;
        return trainer.computeGradients!(a);
      },
    });
    const ac = new AbortController();
    const first = new WorkerAgent({
      coordinator: coord.address,
      token: 'test-token',
      site: 'first',
      trainer: 'onnx',
      trainerOptions: { modelDir: model, dataPath: '', evalFraction: 0, seed: 0 },
      trainerInstance: gated,
      progress: 'none',
    }).run(ac.signal);
    try {
      await waitForEvent(coord.bus, coord.runId, 'log', (e) => /epoch 1, steps 1-2: 1 worker/.test(e.message));
      procs.push(distWorker(coord.address, 'late', model));
      await waitForEvent(coord.bus, coord.runId, 'worker.joined', (e) => e.worker.site === 'late');
      openGate();
      const result = await coord.run;
      expect(result.state, result.error).toBe('completed');
      expect((await first).state).toBe('completed');
    } finally {
      ac.abort();
      await first.catch(() => {});
      await trainer.close();
    }
    const final = (await readPeftAdapter(join(coord.runDir, 'step-000006'))).adapter;
    expect(maxAbsDiff(final, reference)).toBeLessThan(1e-5);
    const steps = (await events(coord.bus, coord.runId)).filter((e): e is Extract<RunEvent, { type: 'step.completed' }> => e.type === 'step.completed');
    expect(steps.map((s) => [s.step, s.perWorker.map((w) => w.site).sort().join('+')])).toEqual([
      [1, 'first'],
      [2, 'first'],
      [3, 'first+late'],
      [4, 'first+late'],
      [5, 'first+late'],
      [6, 'first+late'],
    ]);
  });

  it('coordinator killed mid-run and restarted with --resume: continues at the checkpointed step with the same data order', async () => {
    const dir = tempDir('dist-resume');
    const model = await tinyLlama(join(dir, 'model'));
    const cfg = distConfig(dir, model, writeDataset(join(dir, 'data.jsonl'), 12), {
      name: 'resume',
      training: { steps: 30, schedule: 'cosine', warmup_steps: 3 },
      distributed: { checkpoint_every: 5 },
    });
    const reference = await referenceTraining(cfg);
    const configPath = join(dir, 'run.yaml');
    writeFileSync(configPath, stringify({ ...cfg, events: { log: true } }));
    const c1 = fedtune(['coordinator', '--config', configPath]);
    procs.push(c1);
    const [, address] = await c1.waitFor(/listening on (\S+)/);
    const w = distWorker(address!, 'survivor', model, ['--give-up-after', '60']);
    procs.push(w);
    await c1.waitFor(/checkpoint \S+step-000010/);
    c1.kill('SIGKILL');
    await c1.exited;

    const c2 = fedtune(['coordinator', '--config', configPath, '--resume', '--listen', address!]);
    procs.push(c2);
    expect(await c2.exited).toBe(0);
    // The worker reconnected by itself and finished with the run.
    expect(await w.exited).toBe(0);
    const runDir = join(dir, 'checkpoints', 'resume');
    const final = (await readPeftAdapter(join(runDir, 'step-000030'))).adapter;
    expect(maxAbsDiff(final, reference)).toBeLessThan(1e-5);
    const state = JSON.parse(readFileSync(join(runDir, 'step-000030', 'state.json'), 'utf8')) as { step: number };
    expect(state.step).toBe(30);
    // The second run started at a checkpointed step (10 or later) and did not redo earlier ones.
    const log = readFileSync(join(runDir, 'events.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as RunEvent);
    const starts = log.filter((e): e is Extract<RunEvent, { type: 'run.started' }> => e.type === 'run.started');
    expect(starts).toHaveLength(2);
    expect(starts[1]!.resumedFromRound % 5).toBe(0);
    expect(starts[1]!.resumedFromRound).toBeGreaterThanOrEqual(10);
  });
});
