/**
 * Strategies end to end: a real coordinator (gRPC on loopback) and real worker
 * processes. The noop trainer returns the same update from every site given
 * the same adapter in the same round, so what each aggregation rule must give
 * is known exactly: a Byzantine site's effect, a mixed-rank refusal, and a
 * resumed run's server state.
 */
import { existsSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { beforeAll, describe, expect, it } from 'vitest';
import { readPeftAdapter } from '../../common/peft.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { startCoordinator } from '../../coordinator/main.ts';
import { readStrategyState } from '../../coordinator/store.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { events, fedtune, Probe, rawUpload, runConfig, tempDir, tinyModel, updateMessages, waitForEvent, worker, writeData } from './federated-helpers.ts';

let dir: string;
let modelDir: string;
let fingerprint: string;
const data: Record<string, string> = {};

beforeAll(async () => {
  dir = tempDir('strategies');
  modelDir = await tinyModel(join(dir, 'model'));
  fingerprint = (await loadModel(modelDir)).fingerprint;
  for (const site of ['site-a', 'site-b', 'site-c']) data[site] = writeData(join(dir, `${site}.jsonl`), 10, site);
});

interface RunOpts {
  name: string;
  strategy: unknown;
  rounds: number;
  sites?: string[];
  /** Sites whose worker runs with --fault-byzantine SCALE,FACTOR. */
  byzantine?: Record<string, string>;
  resume?: boolean;
  over?: Record<string, unknown>;
}

/** One coordinator run to completion with one noop worker process per site. */
async function run(o: RunOpts): Promise<{ runDir: string; state: string; error?: string }> {
  const sites = o.sites ?? ['site-a', 'site-b'];
  const cfg = runConfig(dir, modelDir, {
    name: o.name,
    rounds: o.rounds,
    strategy: o.strategy,
    lora: { r: 4, alpha: 8 },
    cohort: { min_workers: sites.length, wait_timeout_sec: 60 },
    round: { min_results: sites.length, deadline_sec: 60 },
    eval: { every: 0 },
    ...(o.over ?? {}),
  } as Record<string, unknown>);
  const coord = await startCoordinator(cfg, { resume: o.resume ?? false });
  const procs = sites.map((site) =>
    worker({ address: coord.address, site, data: data[site]!, model: modelDir, extra: o.byzantine?.[site] ? ['--fault-byzantine', o.byzantine[site]!] : [] }),
  );
  try {
    const result = await coord.run;
    await Promise.all(procs.map((p) => p.exited));
    return { runDir: coord.runDir, state: result.state, ...(result.error ? { error: result.error } : {}) };
  } finally {
    for (const p of procs) p.kill();
    await coord.close();
  }
}

const adapterAt = async (runDir: string, round: number): Promise<TensorMap> =>
  (await readPeftAdapter(join(runDir, `round-${String(round).padStart(4, '0')}`))).adapter;

function flat(m: TensorMap): number[] {
  return [...m.values()].flatMap((t) => [...t.data]);
}

function change(g0: TensorMap, g1: TensorMap): number[] {
  const a = flat(g0);
  return flat(g1).map((x, i) => x - a[i]!);
}

const dot = (a: number[], b: number[]): number => a.reduce((s, x, i) => s + x * b[i]!, 0);
const norm = (a: number[]): number => Math.sqrt(dot(a, a));
const maxDiff = (a: number[], b: number[]): number => Math.max(...a.map((x, i) => Math.abs(x - b[i]!)));

describe('one Byzantine site of three (update sign-flipped and scaled x10, claiming 100x its examples)', () => {
  const byz = { byzantine: { 'site-c': '-10,100' }, sites: ['site-a', 'site-b', 'site-c'], rounds: 1 };
  const moved: Record<string, number[]> = {};

  beforeAll(async () => {
    for (const [label, strategy, extra] of [
      ['clean', 'fedavg', { byzantine: {} }],
      ['fedavg', 'fedavg', {}],
      ['median', 'median', {}],
      ['trimmed_mean', { name: 'trimmed_mean', beta: 0.34 }, {}],
      ['krum', { name: 'krum', f: 0 }, {}],
      ['norm_bounding', 'norm_bounding', {}],
      ['equal', 'fedavg', { over: { weighting: { mode: 'equal' } } }],
    ] as const) {
      const r = await run({ name: `byz-${label}`, strategy, ...byz, ...extra });
      expect(r.state, `${label}: ${r.error ?? ''}`).toBe('completed');
      moved[label] = change(await adapterAt(r.runDir, 0), await adapterAt(r.runDir, 1));
    }
  }, 240_000);

  it('drags FedAvg the wrong way, about 9.8x as far as the honest update', () => {
    const honest = moved.clean!;
    expect(norm(honest)).toBeGreaterThan(0);
    // (10 x honest + 10 x honest + 1000 x (-10 x honest)) / 1020 = -9.78 x honest
    expect(dot(moved.fedavg!, honest)).toBeLessThan(0);
    expect(norm(moved.fedavg!) / norm(honest)).toBeCloseTo(9980 / 1020, 3);
  });

  it('median, trimmed mean and Krum give exactly the honest update', () => {
    for (const k of ['median', 'trimmed_mean', 'krum']) expect(maxDiff(moved[k]!, moved.clean!), k).toBeLessThan(1e-7);
  });

  it('norm bounding clips the Byzantine update to the median norm: (h + h - h) / 3', () => {
    const want = moved.clean!.map((x) => x / 3);
    expect(maxDiff(moved.norm_bounding!, want)).toBeLessThan(1e-7);
  });

  it('equal weighting takes away the inflated example count: (h + h - 10 h) / 3', () => {
    const want = moved.clean!.map((x) => (-8 * x) / 3);
    expect(maxDiff(moved.equal!, want)).toBeLessThan(1e-6);
  });
});

describe('mixed ranks', () => {
  it('gives each site its rank, refuses an upload of a rank the site was not assigned, naming it, and stacks the rest', async () => {
    const cfg = runConfig(dir, modelDir, {
      name: 'ranks',
      rounds: 1,
      strategy: { name: 'flora', ranks: { 'probe-a': 2 } },
      lora: { r: 4, alpha: 8 },
      cohort: { min_workers: 1 },
      round: { min_results: 1, deadline_sec: 60 },
      eval: { every: 0 },
    } as Record<string, unknown>);
    const coord = await startCoordinator(cfg);
    const p = new Probe(coord.address, fingerprint);
    try {
      await p.join('probe-a');
      const task = await p.nextTask();
      const spec = task.kind?.$case === 'train' ? task.kind.value.spec! : null;
      expect(spec?.lora?.r).toBe(2);
      expect(spec?.lora?.alpha).toBe(4); // alpha / r of the run (8 / 4) kept at rank 2
      expect(task.global!.rank).toBe(2);
      const mine = await p.conn.downloadAdapter(task.global!.version, 1 << 20, task.global!.rank);
      expect(mine.adapter.values().next().value!.shape[0]).toBe(2);
      const whole = await p.conn.downloadAdapter(task.global!.version, 1 << 20, 0);
      const wrong = await rawUpload(p.conn, updateMessages(task, whole.adapter));
      expect(grpc.status[wrong.code]).toBe('INVALID_ARGUMENT');
      expect(wrong.details).toMatch(/site probe-a was assigned LoRA rank 2\): tensor .*lora_A\.weight: shape \[4, 32\], expected \[2, 32\]/);
      const ok = await rawUpload(p.conn, updateMessages(task, mine.adapter));
      expect(grpc.status[ok.code]).toBe('OK');
      await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1);
      const rejected = (await events(coord.bus, coord.runId)).filter((e) => e.type === 'update.rejected');
      expect(rejected).toHaveLength(1);
      const g1 = await adapterAt(coord.runDir, 1);
      expect(g1.values().next().value!.shape[0]).toBe(2); // stacked from one rank-2 site
    } finally {
      p.close();
      await coord.close();
    }
  });
});

describe('resume restores the strategy\'s server state exactly', () => {
  it('fedadam: 2 rounds + resume for the 3rd equals 3 rounds straight; without the saved moments it does not', async () => {
    const strategy = { name: 'fedadam', lr: 0.05, tau: 0.001 };
    const straight = await run({ name: 'adam-straight', strategy, rounds: 3 });
    expect(straight.state).toBe('completed');
    const want = flat(await adapterAt(straight.runDir, 3));

    const first = await run({ name: 'adam-resumed', strategy, rounds: 2 });
    expect(first.state).toBe('completed');
    const saved = await readStrategyState(join(first.runDir, 'round-0002', 'strategy_state.safetensors'));
    expect(saved.json).toEqual({ kind: 'fedadam', step: 2 });
    const resumed = await run({ name: 'adam-resumed', strategy, rounds: 3, resume: true });
    expect(resumed.state).toBe('completed');
    expect(maxDiff(flat(await adapterAt(resumed.runDir, 3)), want)).toBe(0);

    // Control: the same resume with the moments removed lands somewhere else.
    await run({ name: 'adam-forgot', strategy, rounds: 2 });
    const forgot = join(dir, 'checkpoints', 'adam-forgot');
    rmSync(join(forgot, 'round-0002', 'strategy_state.safetensors'));
    await run({ name: 'adam-forgot', strategy, rounds: 3, resume: true });
    expect(maxDiff(flat(await adapterAt(forgot, 3)), want)).toBeGreaterThan(1e-4);
  }, 180_000);

  it('flora: the rank each site was given survives a resume with a changed config', async () => {
    const straight = await run({ name: 'flora-straight', strategy: { name: 'flora', ranks: { 'site-a': 2, 'site-b': 4 } }, rounds: 2 });
    expect(straight.state).toBe('completed');
    await run({ name: 'flora-resumed', strategy: { name: 'flora', ranks: { 'site-a': 2, 'site-b': 4 } }, rounds: 1 });
    const resumed = await run({ name: 'flora-resumed', strategy: { name: 'flora', ranks: { 'site-a': 4, 'site-b': 2 } }, rounds: 2, resume: true });
    expect(resumed.state).toBe('completed');
    const state = await readStrategyState(join(resumed.runDir, 'round-0002', 'strategy_state.safetensors'));
    expect(state.json).toEqual({ assigned: { 'site-a': 2, 'site-b': 4 } });
    const a = await adapterAt(straight.runDir, 2);
    const b = await adapterAt(resumed.runDir, 2);
    expect([...b.values()][0]!.shape).toEqual([6, 32]); // rank 2 + 4, stacked
    expect(maxDiff(flat(b), flat(a))).toBe(0);
  }, 120_000);
});

describe('bad strategy config', () => {
  it('fails at start naming the field and its line', async () => {
    const p = join(dir, 'bad-strategy.yaml');
    writeFileSync(p, 'name: x\nmodel:\n  path: m\ntraining:\n  steps: 1\nrounds: 1\nstrategy:\n  name: krum\n  f: -1\n  beta: 0.1\nserver:\n  join_token: t\n');
    const c = fedtune(['coordinator', '--config', p]);
    expect(await c.exited).toBe(1);
    expect(c.out()).toMatch(/strategy\.f \(line 9\): must be >=0 \(got -1\)/);
    expect(c.out()).toMatch(/strategy\.beta \(line 10\): unknown parameter of strategy krum \(allowed: name, f, m\)/);
    expect(existsSync(join(dir, 'checkpoints', 'x'))).toBe(false);
  });
});

describe('checkpoint before evaluation', () => {
  it('an aggregated round is on disk before its evaluation ends; a coordinator stopped during evaluation resumes after that round', async () => {
    const cfg = runConfig(dir, modelDir, {
      name: 'eval-crash',
      rounds: 2,
      cohort: { min_workers: 1 },
      round: { min_results: 1, deadline_sec: 60 },
      eval: { every: 1, initial: false, deadline_sec: 60 },
    } as Record<string, unknown>);
    const coord = await startCoordinator(cfg);
    const p = new Probe(coord.address, fingerprint);
    await p.join('probe-a', 10, 5);
    const task = await p.nextTask();
    const got = await p.conn.downloadAdapter(task.global!.version, 1 << 20);
    expect(grpc.status[(await rawUpload(p.conn, updateMessages(task, got.adapter))).code]).toBe('OK');
    const evalTask = await p.nextTask();
    expect(evalTask.kind?.$case).toBe('eval');
    // The probe never answers the evaluation: round 1 is checkpointed all the same, not yet completed.
    await waitForEvent(coord.bus, coord.runId, 'checkpoint.written', (e) => e.round === 1);
    expect(existsSync(join(coord.runDir, 'round-0001', 'state.json'))).toBe(true);
    expect((await events(coord.bus, coord.runId)).some((e) => e.type === 'round.completed')).toBe(false);
    p.close();
    await coord.close();

    const again = await startCoordinator(cfg, { resume: true });
    const q = new Probe(again.address, fingerprint);
    try {
      await q.join('probe-a', 10, 0);
      const next = await q.nextTask();
      expect(next.round).toBe(2);
      expect(next.global!.version).toBe(1);
    } finally {
      q.close();
      await again.close();
    }
  });
});

describe('the learned norm bound (defence.norm_factor)', () => {
  it('refuses an update far beyond the last round\'s median distance, and resets itself when it refused a whole attempt', async () => {
    const cfg = runConfig(dir, modelDir, {
      name: 'norm-factor',
      rounds: 3,
      cohort: { min_workers: 2 },
      round: { min_results: 1, deadline_sec: 6, max_retries: 3 },
      eval: { every: 0 },
      defence: { norm_factor: 10 },
    } as Record<string, unknown>);
    const coord = await startCoordinator(cfg);
    const a = new Probe(coord.address, fingerprint);
    const b = new Probe(coord.address, fingerprint);
    /** The task's start adapter plus `k` times a fixed direction. */
    const moved = async (p: Probe, task: Awaited<ReturnType<Probe['nextTask']>>, k: number): Promise<TensorMap> => {
      const g = (await p.conn.downloadAdapter(task.global!.version, 1 << 20, task.global!.rank)).adapter;
      return new Map([...g].map(([n, t]) => [n, { shape: [...t.shape], data: Float32Array.from(t.data, (x, i) => x + k * 1e-3 * ((i % 3) - 1)) }]));
    };
    try {
      await a.join('probe-a');
      await b.join('probe-b');
      // Round 1: both move by about the same distance; that is the reference.
      for (const p of [a, b]) {
        const t = await p.nextTask();
        expect(grpc.status[(await rawUpload(p.conn, updateMessages(t, await moved(p, t, p === a ? 1 : 1.2)))).code]).toBe('OK');
      }
      await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1);
      // Round 2: probe-b moves 100 times as far: refused, naming the rule; probe-a's normal update carries the round.
      const [ta, tb] = [await a.nextTask(), await b.nextTask()];
      const far = await rawUpload(b.conn, updateMessages(tb, await moved(b, tb, 100)));
      expect(grpc.status[far.code]).toBe('INVALID_ARGUMENT');
      expect(far.details).toMatch(/more than defence\.norm_factor = 10 x the median .* of the last round's accepted updates/);
      expect(grpc.status[(await rawUpload(a.conn, updateMessages(ta, await moved(a, ta, 1)))).code]).toBe('OK');
      await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 2);
      // Round 3: everybody moves 100 times as far (the scale changed, not one site): all refused, the bound resets, the retry passes.
      for (const p of [a, b]) {
        const t = await p.nextTask();
        expect(grpc.status[(await rawUpload(p.conn, updateMessages(t, await moved(p, t, 100)))).code]).toBe('INVALID_ARGUMENT');
      }
      await waitForEvent(coord.bus, coord.runId, 'round.retried', (e) => e.round === 3, 40_000);
      expect((await events(coord.bus, coord.runId)).some((e) => e.type === 'log' && /defence\.norm_factor refused every update of attempt 1; its reference .* is reset/.test(e.message))).toBe(true);
      for (const p of [a, b]) {
        const t = await p.nextTask();
        expect(grpc.status[(await rawUpload(p.conn, updateMessages(t, await moved(p, t, 100)))).code]).toBe('OK');
      }
      await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 3);
    } finally {
      a.close();
      b.close();
      await coord.close();
    }
  }, 90_000);
});
