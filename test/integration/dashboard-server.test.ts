import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import WebSocket from 'ws';
import type { NewRunEvent, RunEvent } from '../../common/events.ts';
import { MemoryBus } from '../../coordinator/events/memory.ts';
import { startDashboardServer, type DashboardServer, type DashboardServerOptions } from '../../coordinator/http/server.ts';
import type { ServerMessage } from '../../coordinator/http/protocol.ts';

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'fedtune-dash-'));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

/** A tiny stand-in for the built app, so these tests do not depend on the build. */
function staticDir(): string {
  const d = tempDir();
  writeFileSync(join(d, 'index.html'), '<!doctype html><title>fedtune</title><p>dashboard</p>');
  return d;
}

async function start(opts: Partial<DashboardServerOptions> & { bus: MemoryBus }): Promise<DashboardServer> {
  const srv = await startDashboardServer({ port: 0, staticDir: staticDir(), ...opts });
  cleanups.push(() => srv.close());
  return srv;
}

function newBus(opts: ConstructorParameters<typeof MemoryBus>[0] = {}): MemoryBus {
  const bus = new MemoryBus(opts);
  cleanups.push(() => bus.close());
  return bus;
}

const logEv = (runId: string, message: string): NewRunEvent => ({ runId, type: 'log', level: 'info', message });

/** A WebSocket client that records every message and can wait for one. */
class TestClient {
  readonly messages: ServerMessage[] = [];
  private waiters: Array<() => void> = [];
  private constructor(readonly ws: WebSocket, light: boolean) {
    ws.on('message', (d) => {
      const m = JSON.parse(d.toString()) as ServerMessage;
      // light: keep only what identifies an event, not its (large) body.
      if (light && m.type === 'event') m.event = { runId: m.event.runId, seq: m.event.seq, time: m.event.time, type: 'log', level: 'info', message: '' };
      this.messages.push(m);
      for (const w of this.waiters.splice(0)) w();
    });
  }
  static async open(url: string, headers: Record<string, string> = {}, light = false): Promise<TestClient> {
    const ws = new WebSocket(url, { headers });
    const c = new TestClient(ws, light);
    cleanups.push(() => ws.terminate());
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    return c;
  }
  send(m: unknown): void {
    this.ws.send(typeof m === 'string' ? m : JSON.stringify(m));
  }
  events(runId?: string): RunEvent[] {
    return this.messages.flatMap((m) => (m.type === 'event' && (!runId || m.event.runId === runId) ? [m.event] : []));
  }
  /** Wait until pred holds over the messages so far. */
  async until(pred: (c: TestClient) => boolean, what: string, ms = 10_000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!pred(this)) {
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; got ${this.messages.length} messages`);
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 50);
      });
    }
  }
}

const wsUrl = (srv: DashboardServer, q = ''): string => `${srv.url.replace('http', 'ws')}ws${q}`;
const seqs = (es: RunEvent[]): number[] => es.map((e) => e.seq);
const range = (a: number, b: number): number[] => Array.from({ length: b - a + 1 }, (_, i) => a + i);

describe('dashboard server', () => {
  it('sends history, then live events, and resumes from a sequence number', async () => {
    const bus = newBus();
    for (let i = 1; i <= 3; i++) bus.publish(logEv('run1', `h${i}`));
    const srv = await start({ bus });

    const c = await TestClient.open(wsUrl(srv));
    await c.until((x) => x.messages.some((m) => m.type === 'runs'), 'run list');
    const runsMsg = c.messages.find((m) => m.type === 'runs');
    expect(runsMsg?.type === 'runs' && runsMsg.runs.map((r) => r.runId)).toEqual(['run1']);

    c.send({ type: 'subscribe', runId: 'run1', afterSeq: 0 });
    await c.until((x) => x.events().length === 3, 'history');
    bus.publish(logEv('run1', 'live4'));
    bus.publish(logEv('other', 'not subscribed'));
    bus.publish(logEv('run1', 'live5'));
    await c.until((x) => x.events('run1').length === 5, 'live events');
    expect(seqs(c.events())).toEqual([1, 2, 3, 4, 5]);

    // A reconnecting client resumes after the last seq it saw: no gaps, no duplicates.
    const c2 = await TestClient.open(wsUrl(srv));
    c2.send({ type: 'subscribe', runId: 'run1', afterSeq: 3 });
    bus.publish(logEv('run1', 'live6'));
    await c2.until((x) => x.events().length === 3, 'resumed events');
    expect(seqs(c2.events())).toEqual([4, 5, 6]);
  });

  it('serves run headers and stored history over HTTP; unknown run is 404', async () => {
    const bus = newBus();
    bus.publish({
      runId: 'fed-1', type: 'run.started', name: 'demo', mode: 'federated', strategy: 'fedavg',
      totalRounds: 4, totalSteps: 0, config: {}, resumedFromRound: 0,
    });
    bus.publish(logEv('fed-1', 'hello'));
    const srv = await start({ bus });

    await vi.waitFor(async () => {
      const runs = (await (await fetch(`${srv.url}api/runs`)).json()) as { runs: Array<Record<string, unknown>> };
      expect(runs.runs).toEqual([expect.objectContaining({ runId: 'fed-1', name: 'demo', mode: 'federated', strategy: 'fedavg', totalRounds: 4, state: 'running', lastSeq: 2 })]);
    });
    const ev = await fetch(`${srv.url}api/runs/fed-1/events?after=1`);
    expect(ev.status).toBe(200);
    const body = (await ev.json()) as { runId: string; events: RunEvent[] };
    expect(body.events.map((e) => [e.seq, e.type])).toEqual([[2, 'log']]);

    const missing = await fetch(`${srv.url}api/runs/nope/events`);
    expect(missing.status).toBe(404);
    expect(((await missing.json()) as { error: string }).error).toMatch(/unknown run "nope"; known runs: fed-1/);
    const bad = await fetch(`${srv.url}api/runs/fed-1/events?after=abc`);
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { error: string }).error).toMatch(/"after" must be an integer >= 0/);
    expect((await fetch(`${srv.url}api/nothing`)).status).toBe(404);
    expect((await fetch(srv.url, { method: 'POST' })).status).toBe(405);
    const page = await fetch(srv.url);
    expect(page.status).toBe(200);
    expect(await page.text()).toContain('dashboard');
  });

  it('answers malformed messages and unknown runs with errors and keeps serving', async () => {
    const bus = newBus();
    bus.publish(logEv('r', 'one'));
    const srv = await start({ bus });
    const c = await TestClient.open(wsUrl(srv));
    const errors = (): string[] => c.messages.flatMap((m) => (m.type === 'error' ? [m.message] : []));

    c.send('this is not json');
    c.send({ type: 'subscribe' });
    c.send({ type: 'subscribe', runId: 'r', afterSeq: -4 });
    c.send({ type: 'launch-missiles' });
    c.ws.send(Buffer.from([1, 2, 3]), { binary: true });
    c.send({ type: 'subscribe', runId: 'ghost', afterSeq: 0 });
    await c.until(() => errors().length === 6, 'six errors');
    const e = errors();
    expect(e[0]).toMatch(/^malformed message: .*JSON/);
    expect(e[1]).toMatch(/runId/);
    expect(e[2]).toMatch(/afterSeq/);
    expect(e[3]).toMatch(/malformed message .*allowed: \{"type":"subscribe"/);
    expect(e[4]).toMatch(/binary frames are not accepted/);
    expect(e[5]).toMatch(/unknown run "ghost"; known runs: r/);

    // Same connection still works.
    c.send({ type: 'subscribe', runId: 'r', afterSeq: 0 });
    await c.until((x) => x.events().length === 1, 'event after errors');
    expect(c.ws.readyState).toBe(WebSocket.OPEN);
    expect((await fetch(`${srv.url}api/runs`)).status).toBe(200);
  });

  it('tells a stalled client to resync while a fast client and the publisher carry on', async () => {
    const bus = newBus();
    const srv = await start({ bus, maxBufferedBytes: 16 * 1024, stallTimeoutMs: 1000 });
    bus.publish(logEv('r', 'start'));
    const fast = await TestClient.open(wsUrl(srv), {}, true);
    const slow = await TestClient.open(wsUrl(srv), {}, true);
    fast.send({ type: 'subscribe', runId: 'r', afterSeq: 0 });
    slow.send({ type: 'subscribe', runId: 'r', afterSeq: 0 });
    await fast.until((x) => x.events().length === 1, 'fast first event');
    await slow.until((x) => x.events().length === 1, 'slow first event');

    // Stall the slow client: stop reading its socket, so the server's send buffer fills once the
    // kernel's socket buffers (a few MB on loopback) are full: send 2000 events of 8 KB.
    // ws itself resumes a paused socket when its parser drains, so hold resume() off until we are done.
    const sock = (slow.ws as unknown as { _socket: Socket })._socket;
    const resume = sock.resume.bind(sock);
    sock.resume = () => sock;
    sock.pause();
    const N = 2000;
    const filler = 'x'.repeat(8 * 1024);
    for (let i = 2; i <= N; i++) {
      const e = bus.publish(logEv('r', `${i} ${filler}`));
      expect(e.seq).toBe(i); // publish returns at once with the next seq
      if (i % 50 === 0) await new Promise((r) => setImmediate(r));
    }
    await fast.until((x) => x.events().length === N, 'fast client gets everything', 30_000);
    expect(seqs(fast.events())).toEqual(range(1, N));
    expect(fast.messages.some((m) => m.type === 'resync')).toBe(false);
    expect(slow.events().length).toBeLessThan(N);
    // The server gives up on the stalled client after stallTimeoutMs and drops its subscription.
    await vi.waitFor(() => expect(srv.stats()).toEqual({ clients: 2, subscriptions: 1, resyncs: 1 }), { timeout: 10_000 });

    // Once it reads again it finds a contiguous prefix, then a resync telling it where to resume.
    sock.resume = resume;
    sock.resume();
    await slow.until((x) => x.messages.some((m) => m.type === 'resync'), 'resync', 30_000);
    const resync = slow.messages.find((m) => m.type === 'resync');
    const got = slow.events();
    expect(resync).toEqual({ type: 'resync', runId: 'r', fromSeq: got.length + 1 });
    expect(seqs(got)).toEqual(range(1, got.length));

    slow.send({ type: 'subscribe', runId: 'r', afterSeq: got.length });
    await slow.until((x) => x.events().length === N, 'slow client catches up', 30_000);
    expect(seqs(slow.events())).toEqual(range(1, N));
  });

  it('refuses pages, API, /metrics and the WebSocket without the token (401)', async () => {
    const bus = newBus();
    bus.publish(logEv('r', 'x'));
    const srv = await start({ bus, token: 's3cret' });
    expect(srv.openUrl).toBe(`${srv.url}?token=s3cret`);
    for (const path of ['', 'index.html', 'api/runs', 'api/runs/r/events', 'metrics']) {
      const res = await fetch(`${srv.url}${path}`);
      expect(res.status, path).toBe(401);
      expect(await res.text()).toMatch(/needs its access token/);
      expect((await fetch(`${srv.url}${path}`, { headers: { Authorization: 'Bearer wrong' } })).status, path).toBe(401);
      expect((await fetch(`${srv.url}${path}?token=wrong`)).status, path).toBe(401);
      expect((await fetch(`${srv.url}${path}`, { headers: { Authorization: 'Bearer s3cret' } })).status, path).toBe(200);
    }
    const page = await fetch(`${srv.url}?token=s3cret`);
    expect(page.status).toBe(200);
    const cookie = page.headers.get('set-cookie')!.split(';')[0]!;
    expect((await fetch(`${srv.url}api/runs`, { headers: { Cookie: cookie } })).status).toBe(200);

    const refused = await new Promise<number>((resolve, reject) => {
      const ws = new WebSocket(wsUrl(srv));
      ws.on('unexpected-response', (_req, res) => resolve(res.statusCode ?? 0));
      ws.on('open', () => reject(new Error('WebSocket opened without a token')));
      ws.on('error', () => undefined);
    });
    expect(refused).toBe(401);
    const c = await TestClient.open(wsUrl(srv, '?token=s3cret'));
    c.send({ type: 'subscribe', runId: 'r', afterSeq: 0 });
    await c.until((x) => x.events().length === 1, 'event with token');
    const c2 = await TestClient.open(wsUrl(srv), { Authorization: 'Bearer s3cret' });
    await c2.until((x) => x.messages.some((m) => m.type === 'runs'), 'runs with bearer token');
  });

  it('serves the full history after a coordinator restart with the same log directory', async () => {
    const logDir = tempDir();
    const bus1 = new MemoryBus({ logDir, ringSize: 4 });
    const srv1 = await startDashboardServer({ bus: bus1, port: 0, staticDir: staticDir() });
    for (let i = 1; i <= 10; i++) bus1.publish(logEv('r', `before ${i}`));
    await srv1.close();
    await bus1.close();

    const bus2 = newBus({ logDir, ringSize: 4 });
    const srv2 = await start({ bus: bus2 });
    const c = await TestClient.open(wsUrl(srv2));
    c.send({ type: 'subscribe', runId: 'r', afterSeq: 0 });
    await c.until((x) => x.events().length === 10, 'history from the log');
    bus2.publish(logEv('r', 'after restart'));
    await c.until((x) => x.events().length === 11, 'live after restart');
    expect(seqs(c.events())).toEqual(range(1, 11));
    expect(c.events().map((e) => (e.type === 'log' ? e.message : ''))[0]).toBe('before 1');
    const hist = (await (await fetch(`${srv2.url}api/runs/r/events`)).json()) as { events: RunEvent[] };
    expect(seqs(hist.events)).toEqual(range(1, 11));
  });

  it('exposes Prometheus metrics folded from the events', async () => {
    const bus = newBus();
    const srv = await start({ bus });
    const runId = 'm1';
    bus.publish({ runId, type: 'run.started', name: 'metrics run', mode: 'federated', strategy: 'fedavg', totalRounds: 2, totalSteps: 0, config: {}, resumedFromRound: 0 });
    for (const id of ['a', 'b', 'c']) {
      bus.publish({ runId, type: 'worker.joined', worker: { workerId: id, site: `site-${id}`, device: 'cpu', memoryBytes: 1, backends: ['cpu'] } });
    }
    bus.publish({ runId, type: 'worker.left', workerId: 'c', site: 'site-c', reason: 'gone' });
    const round = (r: number, loss: number, ms: number): NewRunEvent => ({
      runId, type: 'round.completed', round: r, globalVersion: r, participants: 2, examples: 10,
      trainLoss: loss, evalLoss: loss + 0.5, evalAccuracy: 0.5 + r / 10, durationMs: ms,
      phases: { dispatchMs: 1, trainMs: ms - 3, uploadMs: 1, aggregateMs: 1 }, bytesUp: 1000, bytesDown: 3000,
    });
    bus.publish(round(1, 2.5, 1500));
    bus.publish(round(2, 1.25, 7000));
    await vi.waitFor(async () => {
      const text = await (await fetch(`${srv.url}metrics`)).text();
      expect(text).toContain('fedtune_rounds_completed_total{run="m1"} 2');
    });
    const res = await fetch(`${srv.url}metrics`);
    expect(res.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    const text = await res.text();
    expect(text).toContain('fedtune_workers_connected{run="m1"} 2');
    expect(text).toContain('fedtune_bytes_total{run="m1",direction="up"} 2000');
    expect(text).toContain('fedtune_bytes_total{run="m1",direction="down"} 6000');
    expect(text).toContain('fedtune_global_loss{run="m1",split="train"} 1.25');
    expect(text).toContain('fedtune_global_loss{run="m1",split="eval"} 1.75');
    expect(text).toContain('fedtune_round_duration_seconds_count{run="m1"} 2');
    expect(text).toContain('fedtune_round_duration_seconds_sum{run="m1"} 8.5');
    expect(text).toContain('fedtune_round_duration_seconds_bucket{le="2",run="m1"} 1');
    expect(text).toContain('fedtune_round_duration_seconds_bucket{le="10",run="m1"} 2');
    expect(text).toContain('fedtune_run_info{run="m1",name="metrics run",mode="federated",strategy="fedavg"} 1');
  });

  it('validates its options and reports a port in use', async () => {
    const bus = newBus();
    await expect(startDashboardServer({ bus, port: 70000 })).rejects.toThrow(/port must be an integer in \[0, 65535\]/);
    await expect(startDashboardServer({ bus, token: '' })).rejects.toThrow(/token must not be empty/);
    const srv = await start({ bus });
    await expect(startDashboardServer({ bus, port: srv.port, staticDir: staticDir() })).rejects.toThrow(/already in use/);
  });
});
