/**
 * Data-parallel steps over real gRPC on loopback with real `fedtune worker`
 * processes: N workers (1, 2, 3) reproduce one process training on the same
 * global batches (trainLoop) within 1e-5 on every parameter, across an epoch
 * boundary; each step reports loss, tokens/s per worker and the time split.
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { RunEvent } from '../../common/events.ts';
import { readPeftAdapter } from '../../common/peft.ts';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { initLoraAdapter, loraTargets } from '../../common/lora.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { distConfig, distWorker, maxAbsDiff, referenceTraining, tinyLlama, writeDataset } from './distributed-helpers.ts';
import { events, tempDir, type Proc } from './federated-helpers.ts';

const procs: Proc[] = [];
let coord: CoordinatorHandle | null = null;

afterEach(async () => {
  for (const p of procs.splice(0)) p.kill();
  await coord?.close();
  coord = null;
});

describe('distributed: N workers equal one process with the same global batch', () => {
  const dir = tempDir('dist-eq');
  let reference: Awaited<ReturnType<typeof referenceTraining>> | null = null;

  for (const n of [1, 2, 3]) {
    it(`${n} worker process(es)`, async () => {
      const model = await tinyLlama(join(dir, 'model'));
      const data = writeDataset(join(dir, 'data.jsonl'), 12);
      // 12 examples, batch 2 -> 6 micro-batches per epoch; 3 per step -> 2 steps per epoch; 4 steps cross an epoch.
      const cfg = distConfig(dir, model, data, { name: `eq-${n}`, cohort: { min_workers: n } });
      reference ??= await referenceTraining(cfg);

      coord = await startCoordinator(cfg);
      for (let i = 0; i < n; i++) procs.push(distWorker(coord.address, `w${i + 1}`, model));
      const result = await coord.run;
      expect(result.state, result.error).toBe('completed');
      expect(result.rounds).toBe(4);

      const final = (await readPeftAdapter(join(coord.runDir, 'step-000004'))).adapter;
      expect(maxAbsDiff(final, reference)).toBeLessThan(1e-5);
      // Training really moved the adapter (the comparison is not between two untouched inits).
      const m = await loadModel(model);
      const init = initLoraAdapter(loraTargets(m.config, { r: 4, alpha: 8, dropout: 0, targetModules: ['q_proj', 'v_proj'] }), 4, cfg.training.seed);
      expect(maxAbsDiff(final, init)).toBeGreaterThan(1e-3);

      const evs = await events(coord.bus, coord.runId);
      const steps = evs.filter((e): e is Extract<RunEvent, { type: 'step.completed' }> => e.type === 'step.completed');
      expect(steps.map((e) => e.step)).toEqual([1, 2, 3, 4]);
      expect(steps.map((e) => e.epoch)).toEqual([0, 0, 1, 1]);
      for (const s of steps) {
        expect(s.workers).toBe(n);
        expect(s.perWorker).toHaveLength(n);
        expect(s.perWorker.reduce((a, w) => a + w.tokens, 0)).toBe(s.tokens);
        expect(Number.isFinite(s.loss) && s.loss > 0).toBe(true);
        expect(s.tokensPerSec).toBeGreaterThan(0);
        expect(s.computeMs + s.communicateMs).toBeGreaterThan(0);
        expect(s.aggregateMs).toBeGreaterThanOrEqual(0);
      }
      // Checkpoints every 2 steps with the optimizer state.
      const written = evs.filter((e): e is Extract<RunEvent, { type: 'checkpoint.written' }> => e.type === 'checkpoint.written').map((e) => e.step);
      expect(written).toEqual([2, 4]);
      // Workers exit by themselves when the run is over.
      expect(await Promise.all(procs.map((p) => p.exited))).toEqual(procs.map(() => 0));
    });
  }

  it('shared storage: workers read the file themselves from record index ranges, same result', async () => {
    const model = await tinyLlama(join(dir, 'model'));
    const data = writeDataset(join(dir, 'data.jsonl'), 12);
    const cfg = distConfig(dir, model, data, { name: 'eq-shared', cohort: { min_workers: 2 }, distributed: { shared_storage: true } });
    reference ??= await referenceTraining(cfg);
    coord = await startCoordinator(cfg);
    for (let i = 0; i < 2; i++) procs.push(distWorker(coord.address, `s${i + 1}`, model));
    const result = await coord.run;
    expect(result.state, result.error).toBe('completed');
    const final = (await readPeftAdapter(join(coord.runDir, 'step-000004'))).adapter;
    expect(maxAbsDiff(final, reference)).toBeLessThan(1e-5);
    expect(procs[0]!.out()).toMatch(/data shard loaded.*"kind":"index"/);
  });

  it('local SGD with one worker and a plain-average outer step equals one process', async () => {
    const model = await tinyLlama(join(dir, 'model'));
    const data = writeDataset(join(dir, 'data.jsonl'), 12);
    const cfg = distConfig(dir, model, data, { name: 'local-avg', distributed: { sync_every: 2, outer_optimizer: { kind: 'average' } } });
    reference ??= await referenceTraining(cfg);
    coord = await startCoordinator(cfg);
    procs.push(distWorker(coord.address, 'solo', model));
    const result = await coord.run;
    expect(result.state, result.error).toBe('completed');
    const final = (await readPeftAdapter(join(coord.runDir, 'step-000004'))).adapter;
    expect(maxAbsDiff(final, reference)).toBeLessThan(1e-5);
    const evs = await events(coord.bus, coord.runId);
    // One step.completed per sync of 2 local steps.
    expect(evs.filter((e) => e.type === 'step.completed').map((e) => (e as { step: number }).step)).toEqual([2, 4]);
  });
});

