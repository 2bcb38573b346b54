/**
 * Standalone dashboards over NATS: two dashboard servers fed by read-only
 * NATS consumer buses show the same runs and events as the coordinator's own
 * dashboard (MemoryBus inside its NatsBus), over the HTTP API and the
 * WebSocket stream; and `fedtune dashboard --nats` serves them as a command.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, describe, expect, it } from 'vitest';
import { WebSocket } from 'ws';
import type { NewRunEvent, RunEvent } from '../../common/events.ts';
import { createConsumerBus, createEventBus, type EventBus } from '../../coordinator/events/index.ts';
import { startDashboardServer, type DashboardServer } from '../../coordinator/http/server.ts';
import { deleteStreams, natsTestsEnabled, SHARED_NATS, uniq, waitFor } from './nats-helpers.ts';

const enabled = await natsTestsEnabled('NATS dashboard tests');
const streams: string[] = [];
afterAll(() => deleteStreams(SHARED_NATS, streams));

/** A WebSocket dashboard client that subscribes to one run and collects its events. */
class WsClient {
  readonly events: RunEvent[] = [];
  readonly errors: string[] = [];
  private constructor(private readonly ws: WebSocket) {
    ws.on('message', (data) => {
      const m = JSON.parse(data.toString()) as { type: string; event?: RunEvent; message?: string };
      if (m.type === 'event' && m.event) this.events.push(m.event);
      if (m.type === 'error' || m.type === 'resync') this.errors.push(data.toString());
    });
  }
  static async open(server: DashboardServer, runId: string): Promise<WsClient> {
    const ws = new WebSocket(`${server.url.replace(/^http/, 'ws')}ws`);
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    const c = new WsClient(ws);
    ws.send(JSON.stringify({ type: 'subscribe', runId, afterSeq: 0 }));
    return c;
  }
  close(): void {
    this.ws.close();
  }
}

async function getJson<T>(url: string): Promise<T> {
  const res = await fetch(url);
  if (!res.ok) throw new Error(`GET ${url}: ${res.status} ${await res.text()}`);
  return (await res.json()) as T;
}

function runEvents(runId: string, from: number, to: number): NewRunEvent[] {
  const out: NewRunEvent[] = [];
  for (let s = from; s <= to; s++) {
    out.push({ runId, type: 'worker.progress', workerId: 'w1', site: 'lab', round: 1, taskId: 't1', step: s, totalSteps: to, loss: 2 / s, tokensPerSec: 100, examples: s });
    if (s % 5 === 0) {
      out.push({ runId, type: 'round.completed', round: s / 5, globalVersion: s / 5, participants: 1, examples: s, trainLoss: 1 / s, evalLoss: null, evalAccuracy: null, durationMs: 3, phases: { dispatchMs: 1, trainMs: 1, uploadMs: 0, aggregateMs: 1 }, bytesUp: 10, bytesDown: 10 });
    }
  }
  return out;
}

describe.skipIf(!enabled)('dashboards over NATS', () => {
  it('two standalone dashboards see the same runs and events as the coordinator\'s own', async () => {
    const stream = uniq('FT_DASH');
    streams.push(stream);
    const subjectRoot = uniq('ft');
    const runId = uniq('demo run.1'); // a space and a dot: encoded in subjects and URLs
    const staticDir = mkdtempSync(join(tmpdir(), 'fedtune-dash-'));
    const coordBus = await createEventBus({ nats: { servers: SHARED_NATS, stream, subjectRoot }, memory: {} });
    const buses: EventBus[] = [coordBus];
    const servers: DashboardServer[] = [];
    const clients: WsClient[] = [];
    try {
      servers.push(await startDashboardServer({ bus: coordBus, port: 0, staticDir }));
      for (let i = 0; i < 2; i++) {
        const bus = await createConsumerBus({ nats: { servers: SHARED_NATS, stream, subjectRoot } });
        buses.push(bus);
        servers.push(await startDashboardServer({ bus, port: 0, staticDir }));
      }
      coordBus.publish({ runId, type: 'run.started', name: 'demo', mode: 'federated', strategy: 'fedavg', totalRounds: 4, totalSteps: 0, config: { lr: 0.001 }, resumedFromRound: 0 });
      coordBus.publish({ runId, type: 'run.state', state: 'running' });
      for (const e of runEvents(runId, 1, 10)) coordBus.publish(e);

      // Every dashboard learns of the run, then streams it over WebSocket: history first, then live events.
      for (const s of servers) {
        await waitFor(async () => (await getJson<{ runs: Array<{ runId: string }> }>(`${s.url}api/runs`)).runs.some((r) => r.runId === runId), 10_000, `run on ${s.url}`);
        clients.push(await WsClient.open(s, runId));
      }
      for (const e of runEvents(runId, 11, 20)) coordBus.publish(e);
      coordBus.publish({ runId, type: 'run.completed', rounds: 4, finalAdapterPath: '/tmp/adapter', metrics: { loss: 0.1 } });

      const own = await coordBus.history(runId);
      const n = own.length;
      expect(own.map((e) => e.seq)).toEqual(Array.from({ length: n }, (_, i) => i + 1));
      for (const [i, c] of clients.entries()) {
        await waitFor(() => c.events.length >= n, 15_000, `WebSocket client ${i} to get ${n} events (has ${c.events.length})`);
        expect(c.errors).toEqual([]);
        expect(c.events).toEqual(own);
      }
      const apiPath = `api/runs/${encodeURIComponent(runId)}/events`;
      const headers: unknown[] = [];
      for (const s of servers) {
        expect((await getJson<{ events: RunEvent[] }>(`${s.url}${apiPath}?after=0`)).events).toEqual(own);
        expect((await getJson<{ events: RunEvent[] }>(`${s.url}${apiPath}?after=${n - 3}`)).events).toEqual(own.slice(n - 3));
        await waitFor(async () => {
          const runs = (await getJson<{ runs: Array<{ runId: string; lastSeq: number }> }>(`${s.url}api/runs`)).runs;
          return runs.find((r) => r.runId === runId)?.lastSeq === n;
        }, 10_000, `run header on ${s.url} to reach seq ${n}`);
        const runs = (await getJson<{ runs: Array<{ runId: string }> }>(`${s.url}api/runs`)).runs;
        headers.push(runs.find((r) => r.runId === runId));
      }
      // The run header (state, rounds, losses) folded on each server is the same.
      expect(headers[1]).toEqual(headers[0]);
      expect(headers[2]).toEqual(headers[0]);
      expect(headers[0]).toMatchObject({ state: 'completed', round: 4 });
    } finally {
      for (const c of clients) c.close();
      for (const s of servers) await s.close();
      for (const b of buses) await b.close();
    }
  });

  it('`fedtune dashboard --nats` serves the runs on NATS', async () => {
    const stream = uniq('FT_DASHCLI');
    streams.push(stream);
    const subjectRoot = uniq('ft');
    const runId = uniq('cli');
    const coordBus = await createEventBus({ nats: { servers: SHARED_NATS, stream, subjectRoot }, memory: {} });
    for (const e of runEvents(runId, 1, 5)) coordBus.publish(e);
    await coordBus.close(); // flushes to NATS: the dashboard has no link to this coordinator
    const proc = spawn(
      process.execPath,
      ['bin/fedtune.js', 'dashboard', '--nats', SHARED_NATS, '--port', '0', '--stream', stream, '--subject-root', subjectRoot, '--token', 'sekret'],
      { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, FEDTUNE_LOG_LEVEL: 'warn' } },
    );
    let stderr = '';
    proc.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
    try {
      const line = await new Promise<string>((resolve, reject) => {
        const rl = createInterface({ input: proc.stdout });
        rl.once('line', resolve);
        void exited.then((code) => reject(new Error(`fedtune dashboard exited with ${code}: ${stderr}`)));
      });
      expect(line).toContain('1 run on NATS');
      // The token is never printed: the page asks for it.
      expect(line).not.toContain('sekret');
      const url = /open (http:\/\/\S+\/)/.exec(line)?.[1];
      expect(url).toBeDefined();
      expect((await fetch(`${url}api/runs`)).status).toBe(401);
      const res = await fetch(`${url}api/runs/${encodeURIComponent(runId)}/events?after=2`, { headers: { Authorization: 'Bearer sekret' } });
      const body = (await res.json()) as { events: RunEvent[] };
      expect(body.events.map((e) => e.seq)).toEqual([3, 4, 5, 6]);
    } finally {
      proc.kill('SIGTERM');
      expect(await exited).toBe(0);
    }
  });

  it('`fedtune dashboard` says what is wrong with a bad NATS URL', async () => {
    const proc = spawn(process.execPath, ['bin/fedtune.js', 'dashboard', '--nats', 'http://127.0.0.1:4222', '--port', '0'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    proc.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const code = await new Promise<number | null>((resolve) => proc.once('exit', resolve));
    expect(code).toBe(1);
    expect(stderr).toContain('has scheme http; allowed: nats, tls');
  });
});
