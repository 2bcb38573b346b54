import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { get as httpsGet } from 'node:https';
import type { Socket } from 'node:net';
import { Writable } from 'node:stream';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import WebSocket from 'ws';
import { pino } from 'pino';
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

/** A logger that keeps its records in memory, to check what the server logs. */
function memoryLog(): { log: NonNullable<DashboardServerOptions['log']>; records: Array<{ level: number; msg: string } & Record<string, unknown>> } {
  const records: Array<{ level: number; msg: string } & Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString().split('\n')) if (line) records.push(JSON.parse(line));
      cb();
    },
  });
  return { log: pino({ level: 'debug' }, sink), records };
}

/** Status of a WebSocket upgrade: 101 when it opened, else the HTTP status of the refusal. */
function upgradeStatus(url: string, headers: Record<string, string>, extra: WebSocket.ClientOptions = {}): Promise<number> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { headers, ...extra });
    ws.on('unexpected-response', (_req, res) => {
      resolve(res.statusCode ?? 0);
      ws.terminate();
    });
    ws.on('open', () => {
      resolve(101);
      ws.close();
    });
    ws.on('error', (err) => reject(err));
  });
}

const cookieOf = async (url: string, headers: Record<string, string> = {}): Promise<string> =>
  (await fetch(url, { headers })).headers.get('set-cookie') ?? '';

describe('dashboard server: WebSocket origin and cookie', () => {
  it('refuses a WebSocket opened by a page of another origin (403, logged), accepts its own origin and clients without Origin', async () => {
    const bus = newBus();
    bus.publish(logEv('r', 'x'));
    const { log, records } = memoryLog();
    const srv = await start({ bus, token: 's3cret', log, allowedOrigins: ['https://dash.example.com'] });
    const auth = { Authorization: 'Bearer s3cret' };
    const own = `http://127.0.0.1:${srv.port}`;

    // Another web page the operator has open, even one that has the token (e.g. through the cookie).
    expect(await upgradeStatus(wsUrl(srv), { ...auth, Origin: 'http://evil.example' })).toBe(403);
    expect(await upgradeStatus(wsUrl(srv), { ...auth, Origin: `http://localhost:${srv.port}` })).toBe(403); // not the Host it dialled
    expect(await upgradeStatus(wsUrl(srv), { ...auth, Origin: `http://127.0.0.1:${srv.port + 1}` })).toBe(403); // another port is another origin
    expect(await upgradeStatus(wsUrl(srv), { ...auth, Origin: `https://127.0.0.1:${srv.port}` })).toBe(403); // another scheme
    expect(await upgradeStatus(wsUrl(srv), { ...auth, Origin: 'null' })).toBe(403); // sandboxed frames, file:// pages
    const refusal = await new Promise<string>((resolve) => {
      const ws = new WebSocket(wsUrl(srv), { headers: { ...auth, Origin: 'http://evil.example' } });
      ws.on('unexpected-response', (_req, res) => {
        let body = '';
        res.on('data', (d: Buffer) => (body += d.toString()));
        res.on('end', () => resolve(body));
      });
      ws.on('error', () => undefined);
    });
    expect(refusal).toMatch(/403 forbidden: WebSocket from origin http:\/\/evil\.example refused/);

    // The dashboard's own page, an origin allowed by option, and non-browser clients (no Origin) with the token.
    expect(await upgradeStatus(wsUrl(srv), { ...auth, Origin: own })).toBe(101);
    expect(await upgradeStatus(wsUrl(srv), { ...auth, Origin: 'https://dash.example.com' })).toBe(101);
    const c = await TestClient.open(wsUrl(srv), auth);
    c.send({ type: 'subscribe', runId: 'r', afterSeq: 0 });
    await c.until((x) => x.events().length === 1, 'event without Origin');
    // The origin check does not replace the token: the own origin without it is still 401.
    expect(await upgradeStatus(wsUrl(srv), { Origin: own })).toBe(401);

    // Logged with origin and peer, once per origin per minute (the two refusals of evil.example give one line).
    const refused = records.filter((r) => r.level === 40 && /refused a dashboard WebSocket/.test(r.msg));
    expect(refused.map((r) => r.origin).sort()).toEqual(
      ['http://evil.example', `http://127.0.0.1:${srv.port + 1}`, `http://localhost:${srv.port}`, `https://127.0.0.1:${srv.port}`, 'null'].sort(),
    );
    expect(refused.every((r) => r.peer === '127.0.0.1')).toBe(true);
  });

  it('behind a TLS-terminating proxy: Secure cookie and https origins', async () => {
    const bus = newBus();
    const srv = await start({ bus, token: 'tok', behindTlsProxy: true });
    expect(await cookieOf(`${srv.url}?token=tok`)).toMatch(/^fedtune_token=tok; Path=\/; HttpOnly; SameSite=Strict; Secure$/);
    expect(await upgradeStatus(wsUrl(srv), { Authorization: 'Bearer tok', Origin: `https://127.0.0.1:${srv.port}` })).toBe(101);
    expect(await upgradeStatus(wsUrl(srv), { Authorization: 'Bearer tok', Origin: `http://127.0.0.1:${srv.port}` })).toBe(403);

    // Without the option: no Secure over plain http, Secure when the proxy says the browser used https.
    const plain = await start({ bus, token: 'tok' });
    const c = await cookieOf(`${plain.url}?token=tok`);
    expect(c).toMatch(/^fedtune_token=tok; /);
    expect(c).not.toMatch(/Secure/);
    expect(await cookieOf(`${plain.url}?token=tok`, { 'X-Forwarded-Proto': 'https' })).toMatch(/; Secure$/);
    expect(await upgradeStatus(wsUrl(plain), { Authorization: 'Bearer tok', Origin: `https://127.0.0.1:${plain.port}`, 'X-Forwarded-Proto': 'https' })).toBe(101);
  });

  it('asks a browser for the token on a form; API clients get the plain-text 401', async () => {
    const bus = newBus();
    const srv = await start({ bus, token: 'tok' });
    const page = await fetch(srv.url, { headers: { Accept: 'text/html,application/xhtml+xml' } });
    expect(page.status).toBe(401);
    expect(page.headers.get('content-type')).toMatch(/^text\/html/);
    const html = await page.text();
    expect(html).toMatch(/needs its access token/);
    expect(html).toMatch(/<input type="password" name="token"/);
    const api = await fetch(`${srv.url}api/runs`, { headers: { Accept: 'text/html' } });
    expect(api.headers.get('content-type')).toMatch(/^text\/plain/);
  });

  it.skipIf(!hasOpenssl())('serves HTTPS and wss:// with the tls option; the cookie is Secure (skipped without openssl)', async () => {
    const d = tempDir();
    const cert = join(d, 'cert.pem');
    const key = join(d, 'key.pem');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'], { stdio: 'ignore' });
    const bus = newBus();
    bus.publish(logEv('r', 'over tls'));
    const srv = await start({ bus, token: 'tok', tls: { certFile: cert, keyFile: key } });
    expect(srv.url).toBe(`https://127.0.0.1:${srv.port}/`);
    const ca = readFileSync(cert);
    const res = await new Promise<{ status: number; cookie: string }>((resolve, reject) => {
      httpsGet(`${srv.url}?token=tok`, { ca }, (r) => {
        r.resume();
        resolve({ status: r.statusCode ?? 0, cookie: String(r.headers['set-cookie'] ?? '') });
      }).on('error', reject);
    });
    expect(res.status).toBe(200);
    expect(res.cookie).toMatch(/^fedtune_token=tok; Path=\/; HttpOnly; SameSite=Strict; Secure$/);
    const wss = wsUrl(srv);
    expect(wss.startsWith('wss://')).toBe(true);
    expect(await upgradeStatus(wss, { Authorization: 'Bearer tok', Origin: `https://127.0.0.1:${srv.port}` }, { ca })).toBe(101);
    expect(await upgradeStatus(wss, { Authorization: 'Bearer tok', Origin: `http://127.0.0.1:${srv.port}` }, { ca })).toBe(403);
    await expect(startDashboardServer({ bus, port: 0, tls: { certFile: join(d, 'missing.pem'), keyFile: key } })).rejects.toThrow(/cannot read the TLS certificate .*missing\.pem/);
  });

  it('validates allowedOrigins', async () => {
    const bus = newBus();
    await expect(startDashboardServer({ bus, port: 0, allowedOrigins: ['dash.example.com'] })).rejects.toThrow(/allowedOrigins: "dash.example.com" is not an origin; write scheme:\/\/host\[:port\]/);
  });
});

function hasOpenssl(): boolean {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}
