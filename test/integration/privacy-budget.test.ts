/**
 * Client-level DP-FedAvg over real gRPC with real worker processes (noop
 * trainer): epsilon in every round.completed event and in the checkpoint, a
 * run with privacy.max_epsilon that completes cleanly before a round would
 * exceed it, resume continuing the ledger, and every real update clipped to C.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { RunEvent } from '../../common/events.ts';
import { readPeftAdapter } from '../../common/peft.ts';
import { epsilonOf } from '../../common/privacy/rdp.ts';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { events, runConfig, tempDir, tinyModel, worker, writeData, type Proc } from './federated-helpers.ts';

const procs: Proc[] = [];
let coord: CoordinatorHandle | null = null;

afterEach(async () => {
  for (const p of procs.splice(0)) p.kill();
  await coord?.close();
  coord = null;
});

const SITES = ['north', 'south'];

function startWorkers(dir: string, model: string, address: string): void {
  for (const site of SITES) {
    procs.push(worker({ address, site, data: writeData(join(dir, `${site}.jsonl`), 8, site), model, extra: ['--noop-step-ms', '20', '--eval-fraction', '0'] }));
  }
}

type Completed = Extract<RunEvent, { type: 'round.completed' }>;
const completedOf = (evs: RunEvent[]): Completed[] => evs.filter((e): e is Completed => e.type === 'round.completed');

/** Every site in every round (cohort = all 2 of 2 eligible sites): q = 1, one Gaussian mechanism per round. */
const eps = (sigma: number, rounds: number): number => epsilonOf({ sampleRate: 1, noiseMultiplier: sigma, steps: rounds, delta: 1e-5 }).epsilon;

function dpConfig(dir: string, model: string, name: string, rounds: number, privacy: Record<string, unknown>) {
  return runConfig(dir, model, {
    name,
    rounds,
    training: { steps: 2 },
    cohort: { min_workers: 2 },
    round: { min_results: 2, deadline_sec: 60 },
    eval: { every: 0 },
    weighting: { mode: 'equal' },
    privacy,
  } as Parameters<typeof runConfig>[2]);
}

describe('client-level DP over real workers', () => {
  it('reports epsilon in every round and the checkpoint, and stops cleanly before privacy.max_epsilon', async () => {
    const dir = tempDir('dp-budget');
    const model = await tinyModel(join(dir, 'model'));
    const sigma = 2;
    // Room for exactly 3 rounds: epsilon after 3 is within, after 4 beyond.
    const max = (eps(sigma, 3) + eps(sigma, 4)) / 2;
    const cfg = dpConfig(dir, model, 'budget', 10, { client_dp: { clip_norm: 0.05, noise_multiplier: sigma }, max_epsilon: max });
    coord = await startCoordinator(cfg);
    startWorkers(dir, model, coord.address);
    const result = await coord.run;
    expect(result.state).toBe('completed');
    expect(result.rounds).toBe(3);

    const evs = await events(coord.bus, coord.runId);
    const rounds = completedOf(evs);
    expect(rounds.map((e) => e.round)).toEqual([1, 2, 3]);
    for (const e of rounds) {
      expect(e.privacy).toBeDefined();
      expect(e.privacy!.delta).toBe(1e-5);
      expect(e.privacy!.client!.rounds).toBe(e.round);
      expect(e.privacy!.client!.clipNorm).toBe(0.05);
      expect(e.privacy!.client!.noiseMultiplier).toBe(sigma);
      expect(e.privacy!.epsilon).toBeCloseTo(eps(sigma, e.round), 10);
      expect(e.privacy!.epsilon!).toBeLessThanOrEqual(max);
    }
    const done = evs.find((e): e is Extract<RunEvent, { type: 'run.completed' }> => e.type === 'run.completed')!;
    expect(done.rounds).toBe(3);
    expect(done.reason).toMatch(/^privacy\.max_epsilon = [\d.]+ reached: [\d.]+ spent \(delta 0\.00001\) after round 3; round 4 would take it to [\d.]+/);
    expect(evs.some((e) => e.type === 'round.started' && e.round === 4)).toBe(false);
    expect(evs.some((e) => e.type === 'run.failed')).toBe(false);

    const state = JSON.parse(readFileSync(join(coord.runDir, 'round-0003', 'state.json'), 'utf8'));
    expect(state.privacy.format).toBe('fedtune.privacy-ledger/1');
    expect(state.privacy.client.rounds).toBe(3);
    expect(state.privacy.client.dp.clipNorm).toBe(0.05);
    expect(state.history.map((h: { privacy: { epsilon: number } }) => h.privacy.epsilon)).toEqual(rounds.map((e) => e.privacy!.epsilon));
  });

  it('resume continues the ledger from the checkpoint', async () => {
    const dir = tempDir('dp-resume');
    const model = await tinyModel(join(dir, 'model'));
    const sigma = 1.5;
    const privacy = { client_dp: { clip_norm: 0.05, noise_multiplier: sigma } };
    coord = await startCoordinator(dpConfig(dir, model, 'resume', 2, privacy));
    startWorkers(dir, model, coord.address);
    expect((await coord.run).state).toBe('completed');
    const saved = JSON.parse(readFileSync(join(coord.runDir, 'round-0002', 'state.json'), 'utf8')).privacy;
    await coord.close();
    for (const p of procs.splice(0)) p.kill();

    coord = await startCoordinator(dpConfig(dir, model, 'resume', 3, privacy), { resume: true });
    startWorkers(dir, model, coord.address);
    expect((await coord.run).state).toBe('completed');
    const r3 = completedOf(await events(coord.bus, coord.runId)).find((e) => e.round === 3)!;
    expect(r3.privacy!.client!.rounds).toBe(3);
    expect(r3.privacy!.epsilon).toBeCloseTo(eps(sigma, 3), 10);
    // The round-2 checkpoint's ledger is what the resumed run started from: unchanged on disk.
    expect(JSON.parse(readFileSync(join(coord.runDir, 'round-0002', 'state.json'), 'utf8')).privacy).toEqual(saved);
  });

  it('clips every real update to C: with no noise, each round moves the global adapter by at most C', async () => {
    const dir = tempDir('dp-clip');
    const model = await tinyModel(join(dir, 'model'));
    const C = 1e-3;
    coord = await startCoordinator(dpConfig(dir, model, 'clip', 2, { client_dp: { clip_norm: C, noise_multiplier: 0 } }));
    startWorkers(dir, model, coord.address);
    expect((await coord.run).state).toBe('completed');
    const rounds = completedOf(await events(coord.bus, coord.runId));
    // Without noise there is no finite guarantee: reported as unbounded, never as a number.
    expect(rounds.map((e) => e.privacy!.epsilon)).toEqual([null, null]);
    for (const r of [1, 2]) {
      const before = (await readPeftAdapter(join(coord.runDir, `round-000${r - 1}`))).adapter;
      const after = (await readPeftAdapter(join(coord.runDir, `round-000${r}`))).adapter;
      let sq = 0;
      for (const [name, t] of after) {
        const b = before.get(name)!.data;
        for (let i = 0; i < t.data.length; i++) sq += (t.data[i]! - b[i]!) ** 2;
      }
      // (sum of 2 clipped deltas) / 2 sites asked: norm <= C. The noop trainer's delta (1e-3 per element, the
      // same at both sites) is larger than C, so both were clipped to exactly C and the mean has norm C.
      expect(Math.sqrt(sq)).toBeLessThanOrEqual(C * (1 + 1e-3));
      expect(Math.sqrt(sq)).toBeGreaterThan(C * (1 - 1e-3));
    }
  });
});
