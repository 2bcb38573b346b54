/**
 * Faults with real processes: workers killed mid-training and mid-upload, a
 * coordinator killed between rounds and resumed, and a bad run config. Workers
 * are `fedtune worker` processes with the noop trainer (the transport and the
 * round loop are under test here, not the math).
 */
import { readFileSync, existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import type { RunEvent } from '../../common/events.ts';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { events, fedtune, runConfig, tempDir, tinyModel, waitForEvent, worker, writeData, type Proc } from './federated-helpers.ts';

const procs: Proc[] = [];
let coord: CoordinatorHandle | null = null;

afterEach(async () => {
  for (const p of procs.splice(0)) p.kill();
  await coord?.close();
  coord = null;
});

describe('workers dying', () => {
  it('a worker killed mid-training and one killed mid-upload: the round completes with the others, the partial upload discarded', async () => {
    const dir = tempDir('kill');
    const model = await tinyModel(join(dir, 'model'));
    const cfg = runConfig(dir, model, {
      name: 'kill',
      rounds: 1,
      training: { steps: 6 },
      cohort: { min_workers: 4 },
      round: { min_results: 2, deadline_sec: 60 },
      eval: { every: 0 },
      server: { chunk_bytes: 1024, heartbeat_timeout_ms: 3000 },
    });
    coord = await startCoordinator(cfg);
    const sites = ['steady-a', 'steady-b', 'dies-training', 'dies-uploading'];
    const sizes = [10, 20, 30, 40];
    for (const [i, site] of sites.entries()) {
      const extra = ['--noop-step-ms', site === 'dies-training' ? '400' : '100'];
      if (site === 'dies-uploading') extra.push('--fault', 'kill-mid-upload');
      procs.push(worker({ address: coord.address, site, data: writeData(join(dir, `${site}.jsonl`), sizes[i]!, site), model, extra: [...extra, '--eval-fraction', '0'] }));
    }
    // Kill the slow one once it is visibly training.
    await waitForEvent(coord.bus, coord.runId, 'worker.progress', (e) => e.site === 'dies-training' && e.step >= 2);
    procs[2]!.kill('SIGKILL');
    const done = await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1);
    const result = await coord.run;
    expect(result.state).toBe('completed');

    const evs = await events(coord.bus, coord.runId);
    const received = evs.filter((e): e is Extract<RunEvent, { type: 'update.received' }> => e.type === 'update.received');
    expect(received.map((e) => e.site).sort()).toEqual(['steady-a', 'steady-b']);
    expect(done.participants).toBe(2);
    expect(done.examples).toBe(10 + 20);
    expect(done.bytesUp).toBe(received[0]!.bytes * 2);
    const left = evs.filter((e): e is Extract<RunEvent, { type: 'worker.left' }> => e.type === 'worker.left' && e.reason !== 'run completed');
    expect(left.map((e) => e.site).sort()).toEqual(['dies-training', 'dies-uploading']);
    // The process that died mid-upload really did start uploading: it was killed by its own SIGKILL.
    expect(await procs[3]!.exited).toBe(null);
    expect(procs[3]!.child.signalCode).toBe('SIGKILL');
    expect(procs[3]!.out()).not.toMatch(/update uploaded/);
    const state = JSON.parse(readFileSync(join(coord.runDir, 'round-0001', 'state.json'), 'utf8'));
    expect(state.history[0].participants).toBe(2);
    expect(state.workers['dies-uploading']?.examples ?? 0).toBe(0);
  });
});

describe('coordinator dying', () => {
  it('killed between rounds and restarted with --resume: continues at the next round, nothing lost, workers rejoin', async () => {
    const dir = tempDir('resume');
    const model = await tinyModel(join(dir, 'model'));
    const cfg = runConfig(dir, model, {
      name: 'resume',
      rounds: 3,
      training: { steps: 4 },
      cohort: { min_workers: 2 },
      round: { min_results: 2, deadline_sec: 60 },
      eval: { every: 1, initial: false },
    });
    const configPath = join(dir, 'run.yaml');
    writeFileSync(configPath, stringify({ ...cfg, dashboard: { enabled: false } }));
    const c1 = fedtune(['coordinator', '--config', configPath]);
    procs.push(c1);
    const [, address] = await c1.waitFor(/listening on (\S+)/);
    const ws = ['east', 'west'].map((site) =>
      worker({ address: address!, site, data: writeData(join(dir, `${site}.jsonl`), 12, site), model, extra: ['--noop-step-ms', '150'] }),
    );
    procs.push(...ws);
    await c1.waitFor(/round 1\/3 done/);
    c1.kill('SIGKILL');
    await c1.exited;
    const round1 = readFileSync(join(dir, 'checkpoints', 'resume', 'round-0001', 'state.json'), 'utf8');
    expect(existsSync(join(dir, 'checkpoints', 'resume', 'round-0003'))).toBe(false);

    // Without --resume the existing run is refused, naming the way out.
    const refused = fedtune(['coordinator', '--config', configPath, '--listen', address!]);
    expect(await refused.exited).toBe(1);
    expect(refused.out()).toMatch(/already holds checkpoints up to round \d+: pass --resume/);

    const c2 = fedtune(['coordinator', '--config', configPath, '--resume', '--listen', address!]);
    procs.push(c2);
    expect(await c2.exited).toBe(0);
    const out = c2.out();
    expect(out).toMatch(/resumed after round [12]/);
    expect(out).toMatch(/round 3\/3 done/);
    expect(out).toMatch(/\+ east joined/);
    expect(out).toMatch(/\+ west joined/);
    // Workers finish by themselves when the run does.
    expect(await Promise.all(ws.map((w) => w.exited))).toEqual([0, 0]);

    const runDir = join(dir, 'checkpoints', 'resume');
    expect(readFileSync(join(runDir, 'round-0001', 'state.json'), 'utf8')).toBe(round1);
    const final = JSON.parse(readFileSync(join(runDir, 'round-0003', 'state.json'), 'utf8'));
    expect(final.history.map((h: { round: number }) => h.round)).toEqual([1, 2, 3]);
    expect(final.globalVersion).toBe(3);
    // The event log continued across the restart without gaps.
    const log = readFileSync(join(runDir, 'events.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as RunEvent);
    expect(log.map((e) => e.seq)).toEqual(log.map((_, i) => i + 1));
    expect(log.filter((e) => e.type === 'run.started').length).toBe(2);
    // Events are in the log before publish returns, and a round's event follows its checkpoint: each round completed exactly once.
    expect(log.filter((e) => e.type === 'round.completed').map((e) => (e as { round: number }).round)).toEqual([1, 2, 3]);
  });
});

describe('bad run config', () => {
  it('fails at start naming the field', async () => {
    const dir = tempDir('badcfg');
    const p = join(dir, 'run.yaml');
    writeFileSync(p, 'name: x\nmodel:\n  path: m\ntraining:\n  steps: 1\nrounds: 1\nstrategy: fedsgd\nserver:\n  join_token: t\n');
    const c = fedtune(['coordinator', '--config', p]);
    expect(await c.exited).toBe(1);
    expect(c.out()).toMatch(/strategy \(line 7\): must be one of fedavg, fedavgm, fedadam, fedyogi, fedprox, ffa, flora, flexlora, median, trimmed_mean, krum, norm_bounding \(got "fedsgd"\)/);
  });
});
