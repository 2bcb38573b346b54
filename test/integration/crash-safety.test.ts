/**
 * Crash safety through the CLI with real processes: kill -9 at every commit
 * point of a checkpoint, a second coordinator on a live run directory, a stale
 * lock, SIGTERM and restart with the workers staying, --resume of a finished
 * run, and one site joining twice.
 */
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { isTempName } from '../../common/atomic.ts';
import type { RunEvent } from '../../common/events.ts';
import { LOCK_FILE } from '../../coordinator/lock.ts';
import { checkRun, freePort } from '../../scripts/soak.ts';
import { fedtune, tempDir, tinyModel, worker, writeData, type Proc } from './federated-helpers.ts';

let dir: string;
let modelDir: string;
const data: Record<string, string> = {};

beforeAll(async () => {
  dir = tempDir('crash');
  modelDir = await tinyModel(join(dir, 'model'));
  for (const s of ['site-a', 'site-b', 'site-c']) data[s] = writeData(join(dir, `${s}.jsonl`), 10, s);
});

/** A run config file for `name`, listening on a fixed port so that workers can reconnect to a restarted coordinator. */
function config(name: string, port: number, rounds: number, extra = '', checkpoint = ''): string {
  const p = join(dir, `${name}.yaml`);
  writeFileSync(
    p,
    [
      `name: ${name}`,
      `model: { path: ${JSON.stringify(modelDir)} }`,
      'lora: { r: 4, alpha: 8 }',
      'training: { steps: 2, batch_size: 2, max_seq_len: 64 }',
      `rounds: ${rounds}`,
      'cohort: { min_workers: 2, wait_timeout_sec: 60 }',
      'round: { deadline_sec: 30, min_results: 2 }',
      'eval: { every: 1, initial: false, deadline_sec: 30 }',
      `checkpoint: { dir: ${JSON.stringify(join(dir, 'checkpoints'))}${checkpoint ? `, ${checkpoint}` : ''} }`,
      `server: { listen: 127.0.0.1:${port}, join_token: test-token, heartbeat_interval_ms: 300, heartbeat_timeout_ms: 3000 }`,
      'dashboard: { enabled: false }',
      extra,
      '',
    ].join('\n'),
  );
  return p;
}

function coordinator(cfg: string, opts: { resume?: boolean; env?: Record<string, string> } = {}): Proc {
  return fedtune(['coordinator', '--config', cfg, ...(opts.resume ? ['--resume'] : [])], opts.env ?? {});
}

function workers(port: number, sites = ['site-a', 'site-b'], extra: string[] = []): Proc[] {
  return sites.map((site) => worker({ address: `127.0.0.1:${port}`, site, data: data[site]!, model: modelDir, extra: ['--noop-step-ms', '50', ...extra] }));
}

function eventsOf(name: string): RunEvent[] {
  const p = join(dir, 'checkpoints', name, 'events.jsonl');
  return readFileSync(p, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as RunEvent);
}

const signalOf = async (p: Proc): Promise<NodeJS.Signals | null> => {
  await p.exited;
  return p.child.signalCode;
};

describe('kill -9 at the commit points of a checkpoint', () => {
  for (const point of ['checkpoint.before-state', 'checkpoint.before-rename', 'checkpoint.before-latest', 'round.before-events', 'round.before-completed']) {
    it(`${point}: resume continues after the last complete round; checkpoints and events agree`, async () => {
      const port = await freePort();
      const name = `kill-${point.replace(/\./g, '-')}`;
      const cfg = config(name, port, 3);
      const c1 = coordinator(cfg, { env: { FEDTUNE_FAULT_POINT: `${point}@2` } });
      const ws = workers(port);
      expect(await signalOf(c1)).toBe('SIGKILL');
      const runDir = join(dir, 'checkpoints', name);
      // The killed process left its lock and maybe temporaries; round 2 is either complete or absent.
      expect(existsSync(join(runDir, LOCK_FILE))).toBe(true);
      const c2 = coordinator(cfg, { resume: true });
      expect(await c2.exited, c2.out().slice(-2000)).toBe(0);
      for (const w of ws) expect(await w.exited).toBe(0);
      const check = await checkRun(runDir, 3);
      expect(check.problems).toEqual([]);
      expect(check.roundsCompleted).toBe(3);
      expect(readdirSync(runDir).filter(isTempName)).toEqual([]);
      expect(existsSync(join(runDir, LOCK_FILE))).toBe(false);
      expect(eventsOf(name).filter((e) => e.type === 'run.completed')).toHaveLength(1);
    }, 90_000);
  }
});

describe('one owner per run directory', () => {
  it('a second coordinator on a live run directory is refused naming the holder, and the live run is not disturbed', async () => {
    const port = await freePort();
    const cfg = config('owned', port, 1);
    const c1 = coordinator(cfg);
    await c1.waitFor(/listening on/);
    const other = await freePort();
    const c2 = fedtune(['coordinator', '--config', cfg, '--resume', '--listen', `127.0.0.1:${other}`]);
    expect(await c2.exited).toBe(1);
    expect(c2.out()).toMatch(new RegExp(`is in use by a coordinator \\(pid ${c1.child.pid} on ${hostname()}, since .*\\): stop that coordinator first`));
    const ws = workers(port);
    expect(await c1.exited, c1.out().slice(-2000)).toBe(0);
    for (const w of ws) expect(await w.exited).toBe(0);
    const ev = eventsOf('owned');
    expect(ev.filter((e) => e.type === 'run.started')).toHaveLength(1);
    expect((await checkRun(join(dir, 'checkpoints', 'owned'), 1)).problems).toEqual([]);
  }, 60_000);

  it('a stale lock left by a dead process is taken over', async () => {
    const dead = spawn(process.execPath, ['-e', '']);
    await new Promise((r) => dead.on('exit', r));
    const port = await freePort();
    const cfg = config('stale', port, 1);
    const runDir = join(dir, 'checkpoints', 'stale');
    await import('node:fs/promises').then((fs) => fs.mkdir(runDir, { recursive: true }));
    writeFileSync(join(runDir, LOCK_FILE), JSON.stringify({ pid: dead.pid, host: hostname(), startedAt: '2026-01-01T00:00:00.000Z' }));
    const c = coordinator(cfg);
    const ws = workers(port);
    expect(await c.exited, c.out().slice(-2000)).toBe(0);
    for (const w of ws) expect(await w.exited).toBe(0);
    expect(existsSync(join(runDir, LOCK_FILE))).toBe(false);
  }, 60_000);
});

describe('planned stop and restart', () => {
  it('SIGTERM stops the coordinator but not the workers; a restart with --resume finishes the run with the same workers', async () => {
    const port = await freePort();
    const cfg = config('restart', port, 3);
    const c1 = coordinator(cfg);
    const ws = workers(port);
    await c1.waitFor(/round 1\/3 done/, 60_000).catch(async () => {
      throw new Error(c1.out().slice(-2000));
    });
    c1.child.kill('SIGTERM');
    expect(await c1.exited, c1.out().slice(-2000)).toBe(0);
    // The workers stay, reconnecting.
    await new Promise((r) => setTimeout(r, 1500));
    for (const w of ws) expect(w.child.exitCode, w.out().slice(-1500)).toBeNull();
    expect(ws.map((w) => w.out()).join('\n')).toMatch(/coordinator stopped the run for now/);
    const c2 = coordinator(cfg, { resume: true });
    expect(await c2.exited, c2.out().slice(-2000)).toBe(0);
    for (const w of ws) expect(await w.exited).toBe(0);
    expect((await checkRun(join(dir, 'checkpoints', 'restart'), 3)).problems).toEqual([]);
  }, 90_000);

  it('checkpoint.keep_last 2: older checkpoints go once a newer one is durable; a stop and --resume go on from the newest; every round is announced once', async () => {
    const port = await freePort();
    const cfg = config('keep', port, 4, '', 'keep_last: 2');
    const runDir = join(dir, 'checkpoints', 'keep');
    const rounds = (): string[] => readdirSync(runDir).filter((n) => /^round-\d+$/.test(n)).sort();
    const c1 = coordinator(cfg);
    const ws = workers(port);
    await c1.waitFor(/round 3\/4 done/, 60_000).catch(async () => {
      throw new Error(c1.out().slice(-2000));
    });
    c1.child.kill('SIGTERM');
    expect(await c1.exited, c1.out().slice(-2000)).toBe(0);
    expect(rounds()).toEqual(['round-0002', 'round-0003']);
    const c2 = coordinator(cfg, { resume: true });
    expect(await c2.exited, c2.out().slice(-2000)).toBe(0);
    for (const w of ws) expect(await w.exited).toBe(0);
    expect(rounds()).toEqual(['round-0003', 'round-0004']);
    expect(JSON.parse(readFileSync(join(runDir, 'latest.json'), 'utf8')).round).toBe(4);
    const evs = eventsOf('keep');
    expect(evs.filter((e) => e.type === 'round.completed').map((e) => (e as { round: number }).round)).toEqual([1, 2, 3, 4]);
    expect(evs.filter((e) => e.type === 'checkpoint.written').map((e) => (e as { round: number }).round)).toEqual([1, 2, 3, 4]);
  }, 90_000);

  it('--resume of a finished run says so and changes nothing', async () => {
    const port = await freePort();
    const cfg = config('finished', port, 1);
    const c1 = coordinator(cfg);
    const ws = workers(port);
    expect(await c1.exited).toBe(0);
    for (const w of ws) expect(await w.exited).toBe(0);
    const runDir = join(dir, 'checkpoints', 'finished');
    const before = readFileSync(join(runDir, 'events.jsonl'));
    const names = readdirSync(runDir).sort();
    const c2 = coordinator(cfg, { resume: true });
    expect(await c2.exited).toBe(0);
    expect(c2.out()).toMatch(/run finished has completed all 1 round\(s\) .*nothing to resume and nothing was changed/);
    expect(readFileSync(join(runDir, 'events.jsonl')).equals(before)).toBe(true);
    expect(readdirSync(runDir).sort()).toEqual(names);
  }, 60_000);
});

describe('one live session per site', () => {
  it('a second worker for a site with a live session is refused and not averaged twice', async () => {
    const port = await freePort();
    // Three sites needed: the run waits while the duplicate tries to join.
    const cfg = config('twice', port, 1);
    writeFileSync(cfg, readFileSync(cfg, 'utf8').replace('min_workers: 2', 'min_workers: 3'));
    const c = coordinator(cfg);
    const [a, b] = workers(port);
    await c.waitFor(/worker registered[^\n]*site-a|site-a[^\n]*joined|joined[^\n]*site-a/, 30_000).catch(() => {});
    await new Promise((r) => setTimeout(r, 1000));
    const dup = worker({ address: `127.0.0.1:${port}`, site: 'site-a', data: data['site-a']!, model: modelDir, extra: ['--give-up-after', '30'] });
    await dup.waitFor(/already has a live session/, 30_000);
    const [third] = workers(port, ['site-c']);
    expect(await c.exited, c.out().slice(-2000)).toBe(0);
    dup.kill();
    await Promise.all([a!.exited, b!.exited, third!.exited]);
    const done = eventsOf('twice').find((e): e is Extract<RunEvent, { type: 'round.completed' }> => e.type === 'round.completed')!;
    expect(done.participants).toBe(3);
    expect(done.examples).toBe(24); // 8 training records each (eval fraction 0.2 of 10), site-a once
  }, 60_000);
});
