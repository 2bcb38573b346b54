/**
 * Soak test of a federated run under faults, the shape operators run:
 * a coordinator process and three worker processes (noop trainer), events
 * published to a private NATS server, and random faults until the run is done:
 *
 *   - kill -9 of the coordinator, restarted with --resume on the same port
 *   - kill -9 of a worker, restarted
 *   - a restart of the NATS server
 *   - corrupted uploads: one worker flips a byte in the first attempt of every
 *     upload (refused by digest, retried clean)
 *
 * Then it checks what must hold after any kill: every round has a complete
 * checkpoint, checkpoints read back, every round has exactly one
 * round.completed event, no temporary file is left, and prints one line:
 *
 *   soak: 100 rounds completed, 41 faults injected (...), 0 rounds lost, 0 corrupt checkpoints, 0 events missing, 0 doubled
 *
 *   npm run soak -- --rounds 100 [--seed N] [--keep]
 *
 * A 10-round version runs in `npm test` (test/integration/soak.test.ts).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { isTempName } from '../common/atomic.ts';
import type { RunEvent } from '../common/events.ts';
import { readPeftAdapter } from '../common/peft.ts';
import { createRng } from '../common/random.ts';
import { initModel } from '../worker/engine/init.ts';

const ROOT = resolve(import.meta.dirname, '..');
const NATS_SERVER = '/usr/sbin/nats-server';

export interface SoakOptions {
  rounds: number;
  seed?: number;
  /** Give up after this long (the run must be done by then). */
  timeoutSec?: number;
  /** Keep the working directory (for inspection). */
  keep?: boolean;
  log?: (line: string) => void;
}

export interface RunCheck {
  roundsCompleted: number;
  roundsLost: number;
  corruptCheckpoints: number;
  eventsMissing: number;
  eventsDoubled: number;
  /** Event sequence numbers that do not increase strictly. */
  seqBreaks: number;
  tempFilesLeft: number;
  problems: string[];
}

export interface SoakResult extends RunCheck {
  faults: { coordinatorKills: number; workerKills: number; natsRestarts: number; corruptedUploads: number };
  seconds: number;
  line: string;
}

/** What must hold in a run directory after any sequence of kills and resumes, for a run of `rounds` rounds. */
export async function checkRun(runDir: string, rounds: number): Promise<RunCheck> {
  const problems: string[] = [];
  const events: RunEvent[] = [];
  const logPath = join(runDir, 'events.jsonl');
  if (existsSync(logPath)) {
    for (const [i, line] of readFileSync(logPath, 'utf8').split('\n').entries()) {
      if (!line.trim()) continue;
      try {
        events.push(JSON.parse(line) as RunEvent);
      } catch {
        problems.push(`events.jsonl line ${i + 1} is not JSON`);
      }
    }
  } else problems.push('events.jsonl is missing');
  let seqBreaks = 0;
  for (let i = 1; i < events.length; i++) if (events[i]!.seq <= events[i - 1]!.seq) seqBreaks++;
  const completed = new Map<number, number>();
  for (const e of events) if (e.type === 'round.completed') completed.set(e.round, (completed.get(e.round) ?? 0) + 1);
  let eventsMissing = 0;
  let eventsDoubled = 0;
  for (let r = 1; r <= rounds; r++) {
    const n = completed.get(r) ?? 0;
    if (n === 0) {
      eventsMissing++;
      problems.push(`round ${r}: no round.completed event`);
    }
    if (n > 1) {
      eventsDoubled += n - 1;
      problems.push(`round ${r}: ${n} round.completed events`);
    }
  }
  let corruptCheckpoints = 0;
  let roundsCompleted = 0;
  for (let r = 0; r <= rounds; r++) {
    const dir = join(runDir, `round-${String(r).padStart(4, '0')}`);
    if (!existsSync(dir)) continue;
    try {
      const state = JSON.parse(readFileSync(join(dir, 'state.json'), 'utf8')) as { round: number };
      if (state.round !== r) throw new Error(`state.json says round ${state.round}`);
      const { adapter } = await readPeftAdapter(dir);
      for (const [name, t] of adapter) for (const v of t.data) if (!Number.isFinite(v)) throw new Error(`${name} holds ${v}`);
      if (r > 0) roundsCompleted++;
    } catch (err) {
      corruptCheckpoints++;
      problems.push(`${dir}: ${(err as Error).message}`);
    }
  }
  const roundsLost = rounds - roundsCompleted;
  const temps = existsSync(runDir) ? readdirSync(runDir).filter(isTempName) : [];
  if (temps.length > 0) problems.push(`temporary files left: ${temps.join(', ')}`);
  return { roundsCompleted, roundsLost, corruptCheckpoints, eventsMissing, eventsDoubled, seqBreaks, tempFilesLeft: temps.length, problems };
}

/** A TCP port free on 127.0.0.1 right now. */
export function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => res(port));
    });
    s.on('error', rej);
  });
}

interface Proc {
  child: ChildProcess;
  out: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

function start(args: string[]): Proc {
  const child = spawn(process.execPath, [join(ROOT, 'bin', 'fedtune.js'), ...args], {
    cwd: ROOT,
    env: { ...process.env, FEDTUNE_LOG_LEVEL: 'info', VITEST: '' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let text = '';
  const keep = (d: Buffer): void => {
    text = (text + d.toString()).slice(-20_000);
  };
  child.stdout!.on('data', keep);
  child.stderr!.on('data', keep);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => child.on('exit', (code, signal) => r({ code, signal })));
  return { child, out: () => text, exited };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function waitPort(port: number, ms: number): Promise<boolean> {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    const ok = await new Promise<boolean>((res) => {
      const s = createServer();
      s.once('error', () => res(true)); // in use: someone listens
      s.listen(port, '127.0.0.1', () => s.close(() => res(false)));
    });
    if (ok) return true;
    await sleep(50);
  }
  return false;
}

export async function runSoak(o: SoakOptions): Promise<SoakResult> {
  const t0 = Date.now();
  const log = o.log ?? ((l: string) => console.log(l));
  const rng = createRng(o.seed ?? 1);
  const dir = mkdtempSync(join(tmpdir(), 'fedtune-soak-'));
  const faults = { coordinatorKills: 0, workerKills: 0, natsRestarts: 0, corruptedUploads: 0 };
  const procs = new Set<ChildProcess>();
  let nats: ChildProcess | null = null;
  try {
    const model = join(dir, 'model');
    await initModel(model, { arch: 'llama', hiddenSize: 32, numLayers: 1, numHeads: 2, numKvHeads: 1, maxPositions: 128, seed: 0 });
    const sites = ['site-a', 'site-b', 'site-c'];
    for (const s of sites) {
      const lines = Array.from({ length: 10 }, (_, i) => JSON.stringify({ instruction: `Repeat the word ${s}.`, input: `#${i}`, output: s }));
      writeFileSync(join(dir, `${s}.jsonl`), `${lines.join('\n')}\n`);
    }
    const port = await freePort();
    const haveNats = existsSync(NATS_SERVER);
    const natsPort = await freePort();
    const natsDir = join(dir, 'nats');
    const startNats = async (): Promise<void> => {
      nats = spawn(NATS_SERVER, ['-a', '127.0.0.1', '-p', String(natsPort), '-js', '-sd', natsDir], { stdio: 'ignore' });
      if (!(await waitPort(natsPort, 10_000))) throw new Error(`nats-server did not start on port ${natsPort}`);
    };
    const stopNats = async (): Promise<void> => {
      const n = nats;
      nats = null;
      if (!n || n.exitCode !== null) return;
      const gone = new Promise((r) => n.once('exit', r));
      n.kill('SIGTERM');
      await gone;
    };
    if (haveNats) await startNats();
    else log(`soak: ${NATS_SERVER} not found: NATS restarts are left out`);
    const config = join(dir, 'run.yaml');
    writeFileSync(
      config,
      [
        'name: soak',
        `model: { path: ${JSON.stringify(model)} }`,
        'lora: { r: 4, alpha: 8 }',
        'training: { steps: 2, batch_size: 2, max_seq_len: 64 }',
        `rounds: ${o.rounds}`,
        'cohort: { min_workers: 2, wait_timeout_sec: 120 }',
        'round: { deadline_sec: 20, min_results: 2, max_retries: 20 }',
        'eval: { every: 1, initial: false, deadline_sec: 20 }',
        `checkpoint: { dir: ${JSON.stringify(join(dir, 'checkpoints'))} }`,
        `server: { listen: 127.0.0.1:${port}, join_token: soak-token, heartbeat_interval_ms: 300, heartbeat_timeout_ms: 3000 }`,
        'dashboard: { enabled: false }',
        haveNats ? `events: { nats: { url: "nats://127.0.0.1:${natsPort}", stream: SOAK_${process.pid} } }` : '',
        '',
      ].join('\n'),
    );
    const runDir = join(dir, 'checkpoints', 'soak');
    const startCoordinator = (resume: boolean): Proc => {
      const p = start(['coordinator', '--config', config, ...(resume ? ['--resume'] : [])]);
      procs.add(p.child);
      return p;
    };
    const startWorker = (site: string): Proc => {
      const p = start([
        'worker', '--coordinator', `127.0.0.1:${port}`, '--token', 'soak-token', '--name', site,
        '--data', join(dir, `${site}.jsonl`), '--model', model, '--trainer', 'noop', '--noop-step-ms', '200',
        '--progress', 'none', '--eval-fraction', '0.2', '--give-up-after', '180',
        ...(site === 'site-c' ? ['--fault', 'corrupt-upload'] : []),
      ]);
      procs.add(p.child);
      return p;
    };
    let coord = startCoordinator(false);
    const workers = new Map(sites.map((s) => [s, startWorker(s)]));
    const deadline = Date.now() + (o.timeoutSec ?? 900) * 1000;
    let done = false;
    let lastReport = 0;
    while (!done) {
      if (Date.now() > deadline) throw new Error(`soak: the run did not finish within ${o.timeoutSec ?? 900} s\n${coord.out().slice(-3000)}`);
      // Let the run progress a while, watching whether the coordinator finished.
      const wait = 300 + Math.floor(rng.next() * 1500);
      const r = await Promise.race([coord.exited, sleep(wait).then(() => null)]);
      if (r) {
        if (r.code === 0) {
          done = true;
          break;
        }
        throw new Error(`soak: the coordinator exited with ${r.code ?? r.signal} by itself\n${coord.out().slice(-3000)}`);
      }
      const x = rng.next();
      if (x < 0.3) {
        coord.child.kill('SIGKILL');
        await coord.exited;
        faults.coordinatorKills++;
        coord = startCoordinator(true);
      } else if (x < 0.65) {
        const site = sites[Math.floor(rng.next() * sites.length)]!;
        const w = workers.get(site)!;
        w.child.kill('SIGKILL');
        await w.exited;
        faults.workerKills++;
        await sleep(100);
        workers.set(site, startWorker(site));
      } else if (x < 0.85 && haveNats) {
        await stopNats();
        await sleep(200 + Math.floor(rng.next() * 800));
        await startNats();
        faults.natsRestarts++;
      }
      if (Date.now() - lastReport > 10_000) {
        lastReport = Date.now();
        const n = existsSync(runDir) ? readdirSync(runDir).filter((d) => /^round-\d+$/.test(d)).length - 1 : 0;
        log(`soak: ${Math.max(0, n)} of ${o.rounds} rounds checkpointed, ${faults.coordinatorKills + faults.workerKills + faults.natsRestarts} faults so far`);
      }
    }
    for (const w of workers.values()) await Promise.race([w.exited, sleep(10_000)]);
    const check = await checkRun(runDir, o.rounds);
    const events = readFileSync(join(runDir, 'events.jsonl'), 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as RunEvent);
    faults.corruptedUploads = events.filter((e) => e.type === 'update.rejected' && /SHA-256/.test(e.reason)).length;
    const total = faults.coordinatorKills + faults.workerKills + faults.natsRestarts + faults.corruptedUploads;
    const line =
      `soak: ${check.roundsCompleted} rounds completed, ${total} faults injected (${faults.coordinatorKills} coordinator kills, ` +
      `${faults.workerKills} worker kills, ${faults.natsRestarts} NATS restarts, ${faults.corruptedUploads} corrupted uploads), ` +
      `${check.roundsLost} rounds lost, ${check.corruptCheckpoints} corrupt checkpoints, ${check.eventsMissing} events missing, ${check.eventsDoubled} doubled`;
    return { ...check, faults, seconds: (Date.now() - t0) / 1000, line };
  } finally {
    for (const p of procs) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
    if (nats) (nats as ChildProcess).kill('SIGKILL');
    if (!o.keep) rmSync(dir, { recursive: true, force: true });
    else log(`soak: working directory kept: ${dir}`);
  }
}

if (import.meta.url === `file://${process.argv[1]}` || process.argv[1]?.endsWith('soak.ts')) {
  const args = process.argv.slice(2);
  const arg = (name: string, def: number): number => {
    const i = args.indexOf(name);
    if (i < 0) return def;
    const v = Number(args[i + 1]);
    if (!Number.isInteger(v) || v < 1) {
      console.error(`soak: ${name} takes a whole number >= 1 (got ${args[i + 1] ?? 'nothing'})`);
      process.exit(2);
    }
    return v;
  };
  const unknown = args.filter((a, i) => a.startsWith('--') && !['--rounds', '--seed', '--timeout', '--keep'].includes(a) && !(i > 0 && ['--rounds', '--seed', '--timeout'].includes(args[i - 1]!)));
  if (unknown.length > 0) {
    console.error(`soak: unknown option ${unknown[0]} (allowed: --rounds N, --seed N, --timeout SEC, --keep)`);
    process.exit(2);
  }
  const r = await runSoak({ rounds: arg('--rounds', 100), seed: arg('--seed', 1), timeoutSec: arg('--timeout', 3600), keep: args.includes('--keep') });
  for (const p of r.problems) console.log(`  problem: ${p}`);
  console.log(r.line);
  process.exit(r.roundsLost === 0 && r.corruptCheckpoints === 0 && r.eventsMissing === 0 && r.eventsDoubled === 0 && r.seqBreaks === 0 && r.tempFilesLeft === 0 ? 0 : 1);
}
