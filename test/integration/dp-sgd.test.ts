/**
 * Sample-level DP-SGD end to end: a coordinator with privacy.dp_sgd and `fedtune worker`
 * processes over real gRPC on loopback. ONNX workers train with per-example clipping,
 * noise and Poisson sampling (the eval loss goes down with small noise); a noop worker,
 * which cannot honour it, fails its task naming privacy.dp_sgd.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { events, runConfig, tempDir, tinyModel, waitForEvent, worker, writeData, type Proc } from './federated-helpers.ts';

let procs: Proc[] = [];
let coord: CoordinatorHandle | null = null;

afterEach(async () => {
  for (const p of procs) p.kill();
  procs = [];
  await coord?.close();
  coord = null;
});

describe('federated DP-SGD', () => {
  it('2 rounds with 2 onnx workers: trains under per-example clipping and noise', async () => {
    const dir = tempDir('dpsgd');
    const model = await tinyModel(join(dir, 'model'));
    const cfg = runConfig(dir, model, {
      name: 'dp-sgd-2',
      rounds: 2,
      lora: { r: 4, alpha: 8, target_modules: ['q_proj', 'v_proj', 'o_proj'] },
      training: { steps: 8, batch_size: 4, lr: 0.02, max_seq_len: 128, template: 'plain' },
      cohort: { min_workers: 2 },
      round: { min_results: 2, deadline_sec: 120 },
      eval: { every: 1, initial: true },
      privacy: { dp_sgd: { max_grad_norm: 1, noise_multiplier: 0.05, sample_rate: 0.25 } },
    });
    coord = await startCoordinator(cfg);
    for (const site of ['alpha', 'beta']) {
      procs.push(worker({ address: coord.address, site, data: writeData(join(dir, `${site}.jsonl`), 24, site), model, trainer: 'onnx', extra: ['--threads', '1'] }));
    }
    const result = await coord.run;
    expect(result.error ?? '').toBe('');
    expect(result.state).toBe('completed');
    const state = JSON.parse(readFileSync(join(coord.runDir, 'round-0002', 'state.json'), 'utf8'));
    const baseline = state.baseline.evalLoss as number;
    const losses = (state.history as Array<{ evalLoss: number }>).map((h) => h.evalLoss);
    expect(losses[1]!).toBeLessThan(baseline);
    // Each update reports DP-SGD's metrics: the mean Poisson batch (q * 19 training records here) and the clipped fraction.
    const updates = (await events(coord.bus, coord.runId)).filter((e) => e.type === 'update.received') as Array<{ metrics?: Record<string, number> }>;
    expect(updates.length).toBe(4);
    for (const u of updates) {
      expect(u.metrics?.dp_mean_batch_size).toBeGreaterThan(0);
      expect(u.metrics?.dp_clipped_fraction).toBeGreaterThanOrEqual(0);
      expect(u.metrics?.steps).toBe(8);
    }
  });

  it('a noop worker fails the task naming privacy.dp_sgd instead of training without it', async () => {
    const dir = tempDir('dpsgd-noop');
    const model = await tinyModel(join(dir, 'model'));
    const cfg = runConfig(dir, model, {
      name: 'dp-sgd-noop',
      rounds: 1,
      cohort: { min_workers: 1 },
      round: { min_results: 1, deadline_sec: 30 },
      privacy: { dp_sgd: { max_grad_norm: 1, noise_multiplier: 1, sample_rate: 0.1 } },
    });
    coord = await startCoordinator(cfg);
    procs.push(worker({ address: coord.address, site: 'noop', data: writeData(join(dir, 'noop.jsonl'), 10, 'noop'), model, trainer: 'noop' }));
    const err = await waitForEvent(coord.bus, coord.runId, 'worker.error', (e) => e.site === 'noop');
    expect(err.message).toMatch(/privacy\.dp_sgd/);
    const received = (await events(coord.bus, coord.runId)).filter((e) => e.type === 'update.received');
    expect(received).toEqual([]);
  });
});
