/**
 * One federated round as users run it: this process is the coordinator
 * (`startCoordinator`, the same code `fedtune coordinator` runs) and every site
 * is its own `fedtune worker` process (noop trainer with its perturbation off,
 * so the workers cost only their transport), over loopback gRPC, started by
 * bench/spawner.mjs rather than forked from the coordinator. Measured in the
 * same run:
 *
 *   round time (round.completed durationMs of the warm rounds: 2 to 5, round 1
 *       includes the workers' start-up; from round 3 on the coordinator's means
 *       reuse the buffers of versions two rounds old, as a long run does)
 *       vs the bytes-once bound: 2 x N x adapter bytes at the raw TCP rate
 *         between two processes (a child process reading and writing a socket)
 *   coordinator CPU-seconds per client-round (process.cpuUsage over the warm rounds)
 *   coordinator peak RSS (this process's maxRSS) and each worker's peak RSS (VmHWM)
 *   the machine's load average during the run
 *
 * The base model is a bfloat16 llama of hidden 1024 and 16 layers whose
 * q/k/v/o LoRA at r = 128 has 16.8M parameters (67 MB in float32): the adapter
 * size of Llama-7B attention at r = 16, in fewer, larger tensors.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { parseRunConfig } from '../common/config.ts';
import type { RunEvent } from '../common/events.ts';
import { startCoordinator } from '../coordinator/main.ts';

const ROOT = join(import.meta.dirname, '..');

export interface ProcessRoundRow {
  workers: number;
  adapterBytes: number;
  /** Mean of the warm rounds' durationMs. */
  roundMs: number;
  phases: { dispatchMs: number; trainMs: number; uploadMs: number; aggregateMs: number };
  /** 2 x N x adapter bytes at the raw TCP rate. */
  boundMs: number;
  coordinatorCpuSecPerClientRound: number;
  /** The same, its user and system (kernel: socket and file I/O) parts. */
  coordinatorCpuSplit: { user: number; system: number };
  /** CPU-seconds of SHA-256 over one upload's bytes in this process (node:crypto, best of 3): the digest check's share of a client-round. */
  sha256SecPerUpload: number;
  /** Each worker process's CPU-seconds per round (utime + stime from /proc over the same warm rounds), mean over workers. */
  workerCpuSecPerRound: number;
  coordinatorPeakRssMb: number;
  workerPeakRssMb: { min: number; max: number };
  load: number[];
}

/** Bytes per millisecond of one loopback TCP stream between this process and a child process, each way (best of `repeats`). */
export async function rawTcpBetweenProcesses(bytes: number, repeats = 3): Promise<number> {
  // The child reads `bytes`, then writes `bytes` back: one download and one upload of the payload.
  const child = `
    const net = require('node:net');
    const [port, n] = process.argv.slice(1).map(Number);
    const s = net.connect(port, '127.0.0.1');
    const buf = Buffer.alloc(1 << 20, 7);
    let got = 0;
    s.on('data', (d) => {
      got += d.length;
      if (got === n) {
        let sent = 0;
        const pump = () => { while (sent < n) { const k = Math.min(buf.length, n - sent); sent += k; if (!s.write(k === buf.length ? buf : buf.subarray(0, k))) { s.once('drain', pump); return; } } s.end(); };
        pump();
      }
    });`;
  const payload = Buffer.alloc(1 << 20, 3);
  let best = Infinity;
  for (let r = 0; r < repeats; r++) {
    const ms = await new Promise<number>((resolve, reject) => {
      let t0 = 0n;
      const server = createServer((sock) => {
        t0 = process.hrtime.bigint();
        let sent = 0;
        let back = 0;
        const pump = (): void => {
          while (sent < bytes) {
            const k = Math.min(payload.length, bytes - sent);
            sent += k;
            if (!sock.write(k === payload.length ? payload : payload.subarray(0, k))) {
              sock.once('drain', pump);
              return;
            }
          }
        };
        sock.on('data', (d: Buffer) => {
          back += d.length;
          if (back === bytes) {
            resolve(Number(process.hrtime.bigint() - t0) / 1e6);
            server.close();
          }
        });
        sock.on('error', reject);
        pump();
      });
      server.listen(0, '127.0.0.1', () => {
        const p = spawn(process.execPath, ['-e', child, String((server.address() as AddressInfo).port), String(bytes)], { stdio: 'ignore' });
        p.on('error', reject);
      });
    });
    best = Math.min(best, ms);
  }
  return (2 * bytes) / best;
}

/** utime + stime of a process in seconds (from /proc/PID/stat; NaN once it is gone). */
function procCpuSec(pid: number): number {
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
    // Fields after the command: state is rest[0], utime is field 14 (rest[11]), stime field 15 (rest[12]).
    return (Number(rest[11]) + Number(rest[12])) / 100;
  } catch {
    return NaN;
  }
}

function vmHwmMb(pid: number): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

/**
 * Worker processes started by bench/spawner.mjs, not by this process: forking the coordinator
 * would leave its pages copy-on-write and charge it faults that no deployed coordinator pays.
 */
export class Spawner {
  private readonly proc: ChildProcess;
  private readonly waiting: Array<(line: string) => void> = [];

  private constructor() {
    this.proc = spawn(process.execPath, [join(ROOT, 'bench/spawner.mjs')], { stdio: ['pipe', 'pipe', 'inherit'] });
    createInterface({ input: this.proc.stdout! }).on('line', (line) => this.waiting.shift()?.(line));
  }

  /** Start it while this process holds little (before any coordinator). */
  static start(): Spawner {
    return new Spawner();
  }

  private ask(msg: unknown): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      this.waiting.push((line) => {
        const r = JSON.parse(line) as Record<string, unknown>;
        if (typeof r.error === 'string') reject(new Error(`bench spawner: ${r.error}`));
        else resolve(r);
      });
      this.proc.stdin!.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /** `node ...args` with stdio ignored; its pid. */
  async spawn(args: string[], env: NodeJS.ProcessEnv): Promise<number> {
    const r = await this.ask({ args, env });
    if (typeof r.pid !== 'number') throw new Error(`bench spawner: no pid for ${args.slice(0, 2).join(' ')}`);
    return r.pid;
  }

  /** SIGKILL every process started so far. */
  async killAll(): Promise<void> {
    await this.ask({ kill: true });
  }

  close(): void {
    this.proc.stdin!.end();
  }
}

/** The bench's base model: llama, hidden 1024, 16 layers, bfloat16 (about 170 MB). */
export async function roundBenchModel(dir: string): Promise<string> {
  const model = join(dir, 'model');
  // In a child process, so that the weights it generates do not count in this (the coordinator's) peak RSS.
  const args = ['model', 'init', '--arch', 'llama', '--out', model, '--hidden', '1024', '--layers', '16', '--heads', '16', '--kv-heads', '16', '--intermediate', '256', '--max-positions', '128', '--dtype', 'bfloat16'];
  await new Promise<void>((resolve, reject) => {
    const p = spawn(process.execPath, [join(ROOT, 'bin/fedtune.js'), ...args], { stdio: ['ignore', 'ignore', 'inherit'] });
    p.on('error', reject);
    p.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`fedtune model init exited with ${code}`))));
  });
  return model;
}

export async function processRound(o: { model: string; dir: string; workers: number; rounds?: number; tcpBytesPerMs: number; spawner: Spawner; keepLast?: number }): Promise<ProcessRoundRow> {
  const rounds = o.rounds ?? 5;
  const runDir = mkdtempSync(join(o.dir, `n${o.workers}-`));
  const cfg = parseRunConfig({
    name: `rounds-${o.workers}`,
    model: { path: o.model },
    lora: { r: 128, alpha: 256, target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] },
    training: { steps: 1, batch_size: 1, max_seq_len: 64 },
    rounds,
    cohort: { min_workers: o.workers, wait_timeout_sec: 600 },
    round: { min_results: o.workers, deadline_sec: 600 },
    eval: { every: 0 },
    checkpoint: { dir: join(runDir, 'checkpoints'), ...(o.keepLast ? { keep_last: o.keepLast } : {}) },
    server: { listen: '127.0.0.1:0', join_token: 'bench-token', heartbeat_timeout_ms: 120_000 },
    dashboard: { enabled: false },
  });
  const data = join(runDir, 'data.jsonl');
  writeFileSync(data, `${Array.from({ length: 4 }, (_, i) => JSON.stringify({ instruction: 'Say ok.', input: `#${i}`, output: 'ok' })).join('\n')}\n`);
  const coord = await startCoordinator(cfg);
  const procs: number[] = [];
  const peak = new Map<number, number>();
  const sample = setInterval(() => {
    for (const pid of procs) peak.set(pid, Math.max(peak.get(pid) ?? 0, vmHwmMb(pid) || 0));
  }, 500);
  const loads: number[] = [];
  const loadTimer = setInterval(() => loads.push(loadavg()[0]!), 5000);
  // CPU of this process between the start of round 2 and the end of the last round.
  let cpuAt: NodeJS.CpuUsage | null = null;
  let cpuUsed: NodeJS.CpuUsage | null = null;
  let workerCpuAt: number[] = [];
  let workerCpuUsed: number[] = [];
  const sub = coord.bus.subscribe({ runId: coord.runId, afterSeq: 0 });
  void (async () => {
    for await (const e of sub) {
      if (e.type === 'round.started' && e.round === 2) {
        cpuAt = process.cpuUsage();
        workerCpuAt = procs.map(procCpuSec);
      }
      if (e.type === 'round.completed' && e.round === rounds && cpuAt) {
        cpuUsed = process.cpuUsage(cpuAt);
        workerCpuUsed = procs.map((pid, i) => procCpuSec(pid) - workerCpuAt[i]!);
      }
    }
  })().catch(() => undefined);
  try {
    for (let i = 0; i < o.workers; i++) {
      procs.push(
        await o.spawner.spawn(
          [join(ROOT, 'bin/fedtune.js'), 'worker', '--coordinator', coord.address, '--name', `site-${i}`, '--data', data, '--model', o.model, '--token', 'bench-token',
            '--trainer', 'noop', '--no-noop-perturb', '--progress', 'none', '--eval-fraction', '0'],
          { ...process.env, FEDTUNE_LOG_LEVEL: 'warn' },
        ),
      );
    }
    const result = await coord.run;
    if (result.state !== 'completed') throw new Error(`bench rounds (${o.workers} workers): ${result.error ?? result.state}`);
    for (const pid of procs) peak.set(pid, Math.max(peak.get(pid) ?? 0, vmHwmMb(pid) || 0));
    const evs = (await coord.bus.history(coord.runId, 0)) as RunEvent[];
    // Round 1 includes the workers' start-up and registration; rounds 2.. are warm.
    const warm = evs.filter((e): e is Extract<RunEvent, { type: 'round.completed' }> => e.type === 'round.completed' && e.round >= 2);
    const adapterBytes = evs.find((e): e is Extract<RunEvent, { type: 'update.received' }> => e.type === 'update.received')!.bytes;
    const mean = (f: (e: (typeof warm)[number]) => number): number => warm.reduce((s, e) => s + f(e), 0) / warm.length;
    const used = cpuUsed as NodeJS.CpuUsage | null;
    const cpuSec = used ? (used.user + used.system) / 1e6 : NaN;
    const rss = [...peak.values()].filter((v) => v > 0);
    return {
      workers: o.workers,
      adapterBytes,
      roundMs: mean((e) => e.durationMs),
      phases: {
        dispatchMs: mean((e) => e.phases.dispatchMs),
        trainMs: mean((e) => e.phases.trainMs),
        uploadMs: mean((e) => e.phases.uploadMs),
        aggregateMs: mean((e) => e.phases.aggregateMs),
      },
      boundMs: (2 * o.workers * adapterBytes) / o.tcpBytesPerMs,
      coordinatorCpuSecPerClientRound: cpuSec / (o.workers * warm.length),
      coordinatorCpuSplit: { user: (used?.user ?? NaN) / 1e6 / (o.workers * warm.length), system: (used?.system ?? NaN) / 1e6 / (o.workers * warm.length) },
      sha256SecPerUpload: sha256Secs(adapterBytes),
      workerCpuSecPerRound: workerCpuUsed.reduce((a, b) => a + b, 0) / (workerCpuUsed.length * warm.length),
      coordinatorPeakRssMb: process.resourceUsage().maxRSS / 1024,
      workerPeakRssMb: { min: Math.min(...rss), max: Math.max(...rss) },
      load: loads.length ? loads : [loadavg()[0]!],
    };
  } finally {
    clearInterval(sample);
    clearInterval(loadTimer);
    sub.close();
    await o.spawner.killAll();
    await coord.close();
    rmSync(runDir, { recursive: true, force: true });
  }
}

/** Seconds node:crypto's SHA-256 takes over `bytes` bytes here (best of 3). */
function sha256Secs(bytes: number): number {
  const b = Buffer.alloc(bytes, 7);
  let best = Infinity;
  for (let r = 0; r < 3; r++) {
    const t = performance.now();
    createHash('sha256').update(b).digest();
    best = Math.min(best, performance.now() - t);
  }
  return best / 1000;
}

export function roundTable(rows: ProcessRoundRow[], tcpBytesPerMs: number[]): string {
  const mbps = tcpBytesPerMs.map((r) => ((r * 1000) / 1e6).toFixed(0));
  const lines = [
    `raw TCP between two processes: ${mbps.join(' / ')} MB/s${mbps.length > 1 ? ' (measured by each row\'s process)' : ''}`,
    '| N | round time | dispatch / train / upload / aggregate | bytes-once bound | ratio | coordinator CPU-s per client-round (user + system; SHA-256 of one upload alone) | worker CPU-s per round | coordinator peak RSS | worker peak RSS | load (1 min) |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const r of rows) {
    const p = r.phases;
    lines.push(
      `| ${r.workers} | ${(r.roundMs / 1000).toFixed(2)} s | ${(p.dispatchMs / 1000).toFixed(2)} / ${(p.trainMs / 1000).toFixed(2)} / ${(p.uploadMs / 1000).toFixed(2)} / ${(p.aggregateMs / 1000).toFixed(2)} s | ` +
        `${(r.boundMs / 1000).toFixed(2)} s | ${(r.roundMs / r.boundMs).toFixed(1)}x | ${r.coordinatorCpuSecPerClientRound.toFixed(3)} (${r.coordinatorCpuSplit.user.toFixed(3)} + ${r.coordinatorCpuSplit.system.toFixed(3)}; ${r.sha256SecPerUpload.toFixed(3)}) | ${r.workerCpuSecPerRound.toFixed(3)} | ${r.coordinatorPeakRssMb.toFixed(0)} MB | ` +
        `${r.workerPeakRssMb.min.toFixed(0)}-${r.workerPeakRssMb.max.toFixed(0)} MB | ${Math.min(...r.load).toFixed(1)}-${Math.max(...r.load).toFixed(1)} |`,
    );
  }
  return lines.join('\n');
}

export async function benchProcessRounds(counts: number[], o: { keepLast?: number } = {}): Promise<{ rows: ProcessRoundRow[]; tcpBytesPerMs: number; table: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'fedtune-bench-rounds-'));
  const spawner = Spawner.start();
  try {
    const model = await roundBenchModel(dir);
    const tcpBytesPerMs = await rawTcpBetweenProcesses(64 << 20);
    const rows: ProcessRoundRow[] = [];
    for (const n of counts) {
      rows.push(await processRound({ model, dir, workers: n, tcpBytesPerMs, spawner, ...o }));
      console.log(`  (c) ${n} worker processes done`);
    }
    return { rows, tcpBytesPerMs, table: roundTable(rows, [tcpBytesPerMs]) };
  } finally {
    spawner.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

const ROW_MARK = 'bench-rounds-row ';

/**
 * benchProcessRounds with each N in a fresh process of its own (this file run with --child N): the
 * coordinator's CPU and peak RSS are then its rounds' alone, not also what the benchmarks run
 * before it in the same process allocated and left to the garbage collector.
 */
export async function benchProcessRoundsIsolated(counts: number[], o: { keepLast?: number } = {}): Promise<{ rows: ProcessRoundRow[]; table: string }> {
  const rows: ProcessRoundRow[] = [];
  const tcp: number[] = [];
  for (const n of counts) {
    const out = await new Promise<string>((resolve, reject) => {
      const p = spawn(process.execPath, [join(ROOT, 'bin/run-ts.js'), import.meta.filename, '--child', String(n), ...(o.keepLast ? ['--keep-last', String(o.keepLast)] : [])], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, FEDTUNE_LOG_LEVEL: 'warn' } });
      let text = '';
      p.stdout!.on('data', (d: Buffer) => (text += d.toString()));
      p.on('error', reject);
      p.on('exit', (code) => (code === 0 ? resolve(text) : reject(new Error(`bench rounds, ${n} workers: child exited with ${code}`))));
    });
    const line = out.split('\n').find((l) => l.startsWith(ROW_MARK));
    if (!line) throw new Error(`bench rounds, ${n} workers: no result from the child`);
    const r = JSON.parse(line.slice(ROW_MARK.length)) as { rows: ProcessRoundRow[]; tcpBytesPerMs: number };
    rows.push(...r.rows);
    tcp.push(r.tcpBytesPerMs);
    console.log(`  (c) ${n} worker processes done`);
  }
  return { rows, table: roundTable(rows, tcp) };
}

if (process.argv[2] === '--child' && process.argv[1] && import.meta.filename === process.argv[1]) {
  const k = process.argv.indexOf('--keep-last');
  const r = await benchProcessRounds([Number(process.argv[3])], k > 0 ? { keepLast: Number(process.argv[k + 1]) } : {});
  console.log(ROW_MARK + JSON.stringify({ rows: r.rows, tcpBytesPerMs: r.tcpBytesPerMs }));
}
