/**
 * Helpers for the NATS integration tests: is the shared nats-server on
 * 127.0.0.1:4222 reachable, a private nats-server child process (for restart
 * tests), unique names, and stream cleanup.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createConnection, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect } from 'nats';

export const SHARED_NATS = 'nats://127.0.0.1:4222';
export const NATS_SERVER_BIN = process.env.NATS_SERVER_BIN ?? '/usr/sbin/nats-server';
const inCI = process.env.CI === 'true' || process.env.CI === '1';

function portOpen(port: number, host = '127.0.0.1', timeoutMs = 500): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection({ port, host });
    const done = (ok: boolean): void => {
      s.destroy();
      resolve(ok);
    };
    s.setTimeout(timeoutMs, () => done(false));
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
  });
}

/**
 * Whether NATS tests run: always in CI (where a missing server is a failure),
 * elsewhere only when 127.0.0.1:4222 answers. Prints one line when skipping.
 */
export async function natsTestsEnabled(what: string): Promise<boolean> {
  if (inCI) return true;
  if (await portOpen(4222)) return true;
  console.log(`skipping ${what}: no nats-server at 127.0.0.1:4222 (start one with "nats-server -js"; CI=true always runs these)`);
  return false;
}

/** Whether the private-server tests can run (they need the nats-server binary). */
export function natsBinaryAvailable(what: string): boolean {
  if (inCI || existsSync(NATS_SERVER_BIN)) return true;
  console.log(`skipping ${what}: no nats-server binary at ${NATS_SERVER_BIN} (set NATS_SERVER_BIN; CI=true always runs these)`);
  return false;
}

let counter = 0;
/** A name unique to this test process: streams, runs, sites. */
export function uniq(prefix: string): string {
  counter++;
  return `${prefix}_${process.pid}_${Date.now().toString(36)}_${counter}`;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

export async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A nats-server child process with JetStream on a fixed port and store dir, so it can be stopped and started again. */
export class PrivateNatsServer {
  private proc: ChildProcess | undefined;
  readonly storeDir: string;
  constructor(readonly port: number) {
    this.storeDir = mkdtempSync(join(tmpdir(), 'fedtune-nats-'));
  }
  get url(): string {
    return `nats://127.0.0.1:${this.port}`;
  }
  async start(): Promise<void> {
    if (this.proc) throw new Error('nats-server already running');
    const proc = spawn(NATS_SERVER_BIN, ['-a', '127.0.0.1', '-p', String(this.port), '-js', '-sd', this.storeDir], {
      stdio: 'ignore',
    });
    this.proc = proc;
    let exited = false;
    proc.once('exit', () => (exited = true));
    await waitFor(async () => {
      if (exited) throw new Error(`nats-server on port ${this.port} exited at start`);
      return portOpen(this.port);
    }, 10_000, `nats-server on port ${this.port}`);
  }
  /** Stop (SIGTERM: a restart, the server shuts down cleanly) and wait until it is gone. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const p = this.proc;
    if (!p) return;
    this.proc = undefined;
    if (p.exitCode !== null || p.signalCode !== null) return;
    const gone = new Promise<void>((resolve) => p.once('exit', () => resolve()));
    p.kill(signal);
    await gone;
  }
  /** Stop for good and remove the store directory. */
  async destroy(): Promise<void> {
    await this.stop();
    rmSync(this.storeDir, { recursive: true, force: true });
  }
}

/** Delete streams created by a test (on the shared server). */
export async function deleteStreams(servers: string, names: string[]): Promise<void> {
  if (names.length === 0) return;
  const nc = await connect({ servers, timeout: 2000 }).catch(() => undefined);
  if (!nc) return;
  try {
    const jsm = await nc.jetstreamManager();
    for (const n of names) await jsm.streams.delete(n).catch(() => undefined);
  } finally {
    await nc.close();
  }
}
