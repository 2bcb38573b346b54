/**
 * Dashboard server: the built browser app, a small JSON API, the WebSocket
 * event stream and /metrics, all fed from an EventBus alone. It works the same
 * inside the coordinator (MemoryBus) and standalone (a bus reading NATS).
 *
 *   GET /                          the dashboard (static files, default dashboard/dist)
 *   GET /api/runs                  {runs: RunHeader[]}
 *   GET /api/runs/:id/events?after=N  {runId, events}: stored history with seq > N (404 unknown run)
 *   GET /metrics                   Prometheus text format
 *   WS  /ws                        see protocol.ts
 *
 * Access: with a token, every request needs it (?token=, Authorization:
 * Bearer, or the HttpOnly cookie set when ?token= was given). The cookie is
 * Secure when the page is served over TLS (the tls option), when the option
 * behindTlsProxy says a TLS-terminating proxy is in front, or when the request
 * says so (X-Forwarded-Proto: https). A WebSocket upgrade whose Origin header
 * names another origin than the dashboard's own (the scheme it is served with
 * and the Host header; or one of allowedOrigins) is refused with 403, so that
 * no other web page the operator opens can read the event stream; requests
 * without Origin (non-browser clients) only need the token.
 *
 * A slow or stalled WebSocket client never slows the run: each client reads its
 * own bus subscription; while the socket's send buffer is above
 * maxBufferedBytes the server stops reading for that client; if it does not
 * drain within stallTimeoutMs (or the bus cuts the subscription off), the
 * subscription is dropped and the client is told to resync from its last seq.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { timingSafeEqual, createHash } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import sirv from 'sirv';
import { WebSocketServer, WebSocket, type RawData } from 'ws';
import type { RunEvent } from '../../common/events.ts';
import { logger, type Logger } from '../../common/log.ts';
import { PerKeyLimit } from '../../common/rate-limit.ts';
import type { EventBus, EventSubscription } from '../events/bus.ts';
import { HeaderFold, type RunHeader } from '../../dashboard/src/model.ts';
import { createRunMetrics, type RunMetrics } from './metrics.ts';
import { ClientMessage, type ServerMessage } from './protocol.ts';

const defaultLog = logger('dashboard');

export const DEFAULT_STATIC_DIR = fileURLToPath(new URL('../../dashboard/dist', import.meta.url));
export const TOKEN_COOKIE = 'fedtune_token';

export interface DashboardServerOptions {
  bus: EventBus;
  /** Address to bind (default 127.0.0.1). */
  host?: string;
  /** Port (default 8080; 0 picks a free one). */
  port?: number;
  /** Read-only access token; when set, every request needs it (401 otherwise). */
  token?: string;
  /** Directory of the built dashboard (default dashboard/dist). */
  staticDir?: string;
  /** Per-client WebSocket send buffer above which the server stops sending to that client (default 1 MiB). */
  maxBufferedBytes?: number;
  /** How long a client may stay above maxBufferedBytes before it is told to resync (default 5000 ms). */
  stallTimeoutMs?: number;
  /** Interval of WebSocket pings; a client that misses one is disconnected (default 30000 ms). */
  pingIntervalMs?: number;
  /** Serve HTTPS (and wss://) with this PEM certificate and key. */
  tls?: { certFile: string; keyFile: string };
  /** A TLS-terminating proxy serves this dashboard as https://: the cookie gets Secure and WebSocket origins must be https. */
  behindTlsProxy?: boolean;
  /** Further origins (scheme://host[:port]) whose pages may open the WebSocket, e.g. a proxy that rewrites Host. */
  allowedOrigins?: string[];
  /** Where warnings go (default: the "dashboard" component logger). */
  log?: Pick<Logger, 'warn' | 'error' | 'debug'>;
}

export interface DashboardServer {
  /** http://HOST:PORT/ (https:// with the tls option) */
  url: string;
  /** url with ?token=... when a token is set: what to open in a browser. It holds the token: never print or log it. */
  openUrl: string;
  port: number;
  metrics: RunMetrics;
  /** Connected WebSocket clients, their live subscriptions, and resyncs sent so far. */
  stats(): { clients: number; subscriptions: number; resyncs: number };
  close(): Promise<void>;
}

function checkOptions(o: DashboardServerOptions): void {
  const intOpt = (name: keyof DashboardServerOptions, min: number, max = Number.MAX_SAFE_INTEGER): void => {
    const v = o[name];
    if (v === undefined) return;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
      throw new Error(`startDashboardServer: ${name} must be an integer in [${min}, ${max}], got ${String(v)}`);
    }
  };
  intOpt('port', 0, 65535);
  intOpt('maxBufferedBytes', 1);
  intOpt('stallTimeoutMs', 1);
  intOpt('pingIntervalMs', 1);
  if (o.token !== undefined && o.token.length === 0) {
    throw new Error('startDashboardServer: token must not be empty (leave it out to serve without a token)');
  }
  if (o.tls !== undefined && (!o.tls.certFile || !o.tls.keyFile)) {
    throw new Error('startDashboardServer: tls needs both certFile and keyFile (PEM files)');
  }
  for (const origin of o.allowedOrigins ?? []) {
    if (normalizeOrigin(origin) === null) {
      throw new Error(`startDashboardServer: allowedOrigins: ${JSON.stringify(origin)} is not an origin; write scheme://host[:port], e.g. https://dash.example.com`);
    }
  }
}

/** scheme://host[:port] in canonical form (lower case, default port dropped); null when it is not an http(s) origin. */
function normalizeOrigin(origin: string): string | null {
  try {
    const u = new URL(origin);
    if (u.protocol !== 'http:' && u.protocol !== 'https:') return null;
    if (u.username || u.password || (u.pathname !== '/' && u.pathname !== '') || u.search || u.hash) return null;
    return `${u.protocol}//${u.host}`;
  } catch {
    return null;
  }
}

/** Whether the request came through a TLS-terminating proxy that says so. */
function forwardedHttps(req: IncomingMessage): boolean {
  const h = req.headers['x-forwarded-proto'];
  const v = Array.isArray(h) ? h[0] : h;
  return v !== undefined && v.split(',')[0]!.trim().toLowerCase() === 'https';
}

function readPem(what: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new Error(`dashboard: cannot read the TLS ${what} ${path} (${(err as NodeJS.ErrnoException).code ?? String(err)}); give a PEM file`);
  }
}

function sameSecret(a: string, b: string): boolean {
  // Compare digests so that neither the length nor the content leaks through timing.
  const da = createHash('sha256').update(a).digest();
  const db = createHash('sha256').update(b).digest();
  return timingSafeEqual(da, db);
}

/** The token a request carries: ?token=, Authorization: Bearer, or the dashboard cookie. */
function requestToken(req: IncomingMessage, url: URL): string | undefined {
  const q = url.searchParams.get('token');
  if (q) return q;
  const auth = req.headers.authorization;
  if (auth && /^bearer\s+/i.test(auth)) return auth.replace(/^bearer\s+/i, '').trim();
  const cookie = req.headers.cookie;
  if (cookie) {
    for (const part of cookie.split(';')) {
      const [k, ...v] = part.trim().split('=');
      if (k === TOKEN_COOKIE) return decodeURIComponent(v.join('='));
    }
  }
  return undefined;
}

const UNAUTHORIZED =
  'fedtune dashboard: 401 unauthorized: this server needs its access token. ' +
  'Open the URL with ?token=TOKEN or send the header "Authorization: Bearer TOKEN".\n';

/** The 401 answer to a browser opening a page: the same words, and a field to give the token in. */
const UNAUTHORIZED_PAGE =
  '<!doctype html><meta charset="utf-8"><title>fedtune dashboard: access token</title>' +
  '<style>body{font:16px system-ui,sans-serif;max-width:34em;margin:4em auto;padding:0 1em}input{font:inherit;padding:.3em}</style>' +
  '<h1>fedtune dashboard</h1><p>fedtune dashboard: 401 unauthorized: this server needs its access token ' +
  '(<code>dashboard.token</code> of the run config, or <code>--token</code> of <code>fedtune dashboard</code>).</p>' +
  '<form method="get" action="/"><label>Access token <input type="password" name="token" autocomplete="current-password" autofocus required></label> ' +
  '<button>Open</button></form>';

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(text),
    'Cache-Control': 'no-store',
  });
  res.end(text);
}

function sendText(res: ServerResponse, status: number, text: string, headers: Record<string, string> = {}): void {
  res.writeHead(status, { 'Content-Type': 'text/plain; charset=utf-8', 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

export async function startDashboardServer(opts: DashboardServerOptions): Promise<DashboardServer> {
  checkOptions(opts);
  const { bus, token } = opts;
  const host = opts.host ?? '127.0.0.1';
  const staticDir = opts.staticDir ?? DEFAULT_STATIC_DIR;
  const maxBuffered = opts.maxBufferedBytes ?? 1024 * 1024;
  const stallTimeoutMs = opts.stallTimeoutMs ?? 5000;
  const pingIntervalMs = opts.pingIntervalMs ?? 30_000;
  const metrics = createRunMetrics();
  const tlsOptions = opts.tls ? { cert: readPem('certificate', opts.tls.certFile), key: readPem('key', opts.tls.keyFile) } : null;
  const servedHttps = tlsOptions !== null || opts.behindTlsProxy === true;
  const extraOrigins = new Set((opts.allowedOrigins ?? []).map((o) => normalizeOrigin(o)!));
  const refusedOrigins = new PerKeyLimit(60_000);
  const log = opts.log ?? defaultLog;

  // ---- run headers and metrics, folded from one subscription to every run ----
  const headers = new Map<string, HeaderFold>();
  const clients = new Set<Client>();
  let closed = false;
  let resyncs = 0;
  let allRuns: EventSubscription | undefined;

  const runHeaders = (): RunHeader[] => {
    const ids = new Set([...bus.runs(), ...headers.keys()]);
    return [...ids].map((id) => headers.get(id)?.header ?? new HeaderFold(id).header);
  };
  const knownRun = (id: string): boolean => headers.has(id) || bus.runs().includes(id);

  const foldAll = async (): Promise<void> => {
    while (!closed) {
      allRuns = bus.subscribe({});
      try {
        for await (const e of allRuns) {
          let fold = headers.get(e.runId);
          const isNew = !fold;
          if (!fold) headers.set(e.runId, (fold = new HeaderFold(e.runId)));
          if (fold.apply(e)) metrics.observe(e);
          if (isNew) for (const c of clients) c.send({ type: 'runs', runs: runHeaders() });
        }
        return; // the subscription ended: the bus or this server closed
      } catch (err) {
        // Fell behind: read again from the start; folds drop what they have seen.
        log.warn({ err }, 'run header subscription fell behind; re-reading history');
      }
    }
  };
  const folding = foldAll();

  // ---- HTTP ----
  const hasApp = (): boolean => existsSync(join(staticDir, 'index.html'));
  // Created on first use: sirv lists the directory up front, and the app may be built after start.
  let serveStatic: ReturnType<typeof sirv> | undefined;

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? '/', 'http://localhost');
    if (token !== undefined) {
      const given = requestToken(req, url);
      if (given === undefined || !sameSecret(given, token)) {
        const browser = (req.headers.accept ?? '').includes('text/html') && !url.pathname.startsWith('/api/') && url.pathname !== '/metrics';
        if (browser) {
          res.writeHead(401, { 'Content-Type': 'text/html; charset=utf-8', 'Content-Length': Buffer.byteLength(UNAUTHORIZED_PAGE), 'WWW-Authenticate': 'Bearer realm="fedtune"', 'Cache-Control': 'no-store' });
          res.end(req.method === 'HEAD' ? undefined : UNAUTHORIZED_PAGE);
        } else {
          sendText(res, 401, UNAUTHORIZED, { 'WWW-Authenticate': 'Bearer realm="fedtune"' });
        }
        return;
      }
      if (url.searchParams.has('token')) {
        // Let the page's own asset, API and WebSocket requests through without repeating the token.
        // Secure whenever the browser reached us over https, so the cookie never travels in clear text.
        const secure = servedHttps || forwardedHttps(req) ? '; Secure' : '';
        res.setHeader('Set-Cookie', `${TOKEN_COOKIE}=${encodeURIComponent(token)}; Path=/; HttpOnly; SameSite=Strict${secure}`);
      }
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      sendText(res, 405, `fedtune dashboard: method ${req.method} not allowed; this server is read-only (GET, HEAD)\n`, { Allow: 'GET, HEAD' });
      return;
    }
    const path = url.pathname;
    if (path === '/metrics') {
      const text = await metrics.text();
      res.writeHead(200, { 'Content-Type': metrics.contentType, 'Cache-Control': 'no-store' });
      res.end(text);
      return;
    }
    if (path === '/api/runs') {
      sendJson(res, 200, { runs: runHeaders() });
      return;
    }
    const m = /^\/api\/runs\/([^/]+)\/events$/.exec(path);
    if (m) {
      const runId = decodeURIComponent(m[1]!);
      const afterRaw = url.searchParams.get('after') ?? '0';
      if (!/^\d+$/.test(afterRaw)) {
        sendJson(res, 400, { error: `query parameter "after" must be an integer >= 0 (a sequence number), got "${afterRaw}"` });
        return;
      }
      if (!knownRun(runId)) {
        sendJson(res, 404, { error: `unknown run "${runId}"; known runs: ${runHeaders().map((h) => h.runId).join(', ') || 'none'}` });
        return;
      }
      sendJson(res, 200, { runId, events: await bus.history(runId, Number(afterRaw)) });
      return;
    }
    if (path.startsWith('/api/')) {
      sendJson(res, 404, { error: `no API endpoint ${path}; endpoints: /api/runs, /api/runs/RUN/events?after=SEQ` });
      return;
    }
    if (!hasApp()) {
      sendText(res, 503, `fedtune dashboard: the app is not built (no index.html in ${staticDir}); run "npm run build:dashboard"\n`);
      return;
    }
    serveStatic ??= sirv(staticDir, { etag: true, dev: false, setHeaders: (r) => r.setHeader('Cache-Control', 'no-cache') });
    serveStatic(req, res, () => sendText(res, 404, `fedtune dashboard: no such page ${path}\n`));
  };

  const onRequest = (req: IncomingMessage, res: ServerResponse): void => {
    handle(req, res).catch((err: unknown) => {
      log.error({ err, path: new URL(req.url ?? '/', 'http://localhost').pathname }, 'dashboard request failed');
      if (!res.headersSent) sendJson(res, 500, { error: `internal error: ${(err as Error).message}` });
      else res.destroy();
    });
  };
  const server: Server = tlsOptions ? createHttpsServer(tlsOptions, onRequest) : createServer(onRequest);
  if (tlsOptions) {
    server.on('tlsClientError', (err: Error, socket: Duplex & { remoteAddress?: string }) => {
      log.debug({ err: err.message, peer: socket.remoteAddress }, 'dashboard TLS handshake failed');
      socket.destroy();
    });
  }

  /** Origin header allowed for a WebSocket: absent (not a browser), the dashboard's own origin, or one of allowedOrigins. */
  const originAllowed = (req: IncomingMessage): boolean => {
    const origin = req.headers.origin;
    if (origin === undefined) return true;
    const given = normalizeOrigin(origin);
    if (given === null) return false;
    if (extraOrigins.has(given)) return true;
    const host = req.headers.host;
    if (!host) return false;
    const schemes = servedHttps || forwardedHttps(req) ? ['https:'] : ['http:'];
    return schemes.some((scheme) => normalizeOrigin(`${scheme}//${host}`) === given);
  };

  // ---- WebSocket ----
  const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024 });
  const serialized = new WeakMap<RunEvent, string>();
  const eventFrame = (e: RunEvent): string => {
    let s = serialized.get(e);
    if (s === undefined) serialized.set(e, (s = JSON.stringify({ type: 'event', event: e })));
    return s;
  };

  class Client {
    readonly subs = new Map<string, EventSubscription>();
    alive = true;
    constructor(readonly ws: WebSocket) {}

    send(m: ServerMessage): void {
      if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(m));
    }

    onMessage(data: RawData, isBinary: boolean): void {
      let parsed: unknown;
      try {
        if (isBinary) throw new Error('binary frames are not accepted');
        parsed = JSON.parse(data.toString());
      } catch (err) {
        this.send({ type: 'error', message: `malformed message: ${(err as Error).message}; send JSON like {"type":"subscribe","runId":"RUN","afterSeq":0}` });
        return;
      }
      const r = ClientMessage.safeParse(parsed);
      if (!r.success) {
        const issues = r.error.issues.map((i) => `${i.path.join('.') || 'message'}: ${i.message}`).join('; ');
        this.send({
          type: 'error',
          message: `malformed message (${issues}); allowed: {"type":"subscribe","runId":string,"afterSeq":integer>=0} or {"type":"unsubscribe","runId":string}`,
        });
        return;
      }
      const msg = r.data;
      if (msg.type === 'unsubscribe') {
        this.subs.get(msg.runId)?.close();
        this.subs.delete(msg.runId);
        return;
      }
      if (!knownRun(msg.runId)) {
        this.send({ type: 'error', runId: msg.runId, message: `unknown run "${msg.runId}"; known runs: ${runHeaders().map((h) => h.runId).join(', ') || 'none'}` });
        return;
      }
      void this.pump(msg.runId, msg.afterSeq);
    }

    /** Forward one run's events to this client until it unsubscribes, falls behind or leaves. */
    async pump(runId: string, afterSeq: number): Promise<void> {
      this.subs.get(runId)?.close();
      const sub = bus.subscribe({ runId, afterSeq });
      this.subs.set(runId, sub);
      let last = afterSeq;
      const current = (): boolean => this.subs.get(runId) === sub && this.ws.readyState === WebSocket.OPEN;
      try {
        for await (const e of sub) {
          if (!current()) return;
          if (this.ws.bufferedAmount > maxBuffered && !(await this.drained())) {
            if (current()) this.resync(runId, last);
            return;
          }
          if (!current()) return;
          this.ws.send(eventFrame(e));
          last = e.seq;
        }
      } catch (err) {
        // The bus cut this subscription off (it fell behind); the client resumes from what it has.
        if (current()) this.resync(runId, last);
        log.debug({ err, runId }, 'dashboard client subscription ended early');
      } finally {
        sub.close();
        if (this.subs.get(runId) === sub) this.subs.delete(runId);
      }
    }

    private resync(runId: string, lastSent: number): void {
      this.subs.get(runId)?.close();
      this.subs.delete(runId);
      resyncs++;
      this.send({ type: 'resync', runId, fromSeq: lastSent + 1 });
    }

    /** Wait until the send buffer is below half the limit; false after stallTimeoutMs or when the socket closes. */
    private async drained(): Promise<boolean> {
      const deadline = Date.now() + stallTimeoutMs;
      while (this.ws.readyState === WebSocket.OPEN) {
        if (this.ws.bufferedAmount <= maxBuffered / 2) return true;
        if (Date.now() >= deadline) return false;
        await new Promise((r) => setTimeout(r, 10));
      }
      return false;
    }

    close(): void {
      for (const s of this.subs.values()) s.close();
      this.subs.clear();
    }
  }

  wss.on('connection', (ws: WebSocket) => {
    const c = new Client(ws);
    clients.add(c);
    ws.on('message', (data, isBinary) => c.onMessage(data, isBinary));
    ws.on('pong', () => (c.alive = true));
    ws.on('close', () => {
      c.close();
      clients.delete(c);
    });
    ws.on('error', (err) => log.debug({ err }, 'dashboard WebSocket error'));
    c.send({ type: 'runs', runs: runHeaders() });
  });

  const ping = setInterval(() => {
    for (const c of clients) {
      if (!c.alive) {
        c.ws.terminate();
        continue;
      }
      c.alive = false;
      c.ws.ping();
    }
  }, pingIntervalMs);
  ping.unref();

  server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    const url = new URL(req.url ?? '/', 'http://localhost');
    const refuse = (status: string, text: string): void => {
      socket.end(`HTTP/1.1 ${status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(text)}\r\nConnection: close\r\n\r\n${text}`);
    };
    if (!originAllowed(req)) {
      const origin = String(req.headers.origin).slice(0, 200);
      const r = refusedOrigins.take(origin);
      if (r.ok) {
        log.warn(
          { origin, host: req.headers.host, peer: req.socket.remoteAddress, ...(r.suppressed ? { suppressed: r.suppressed } : {}) },
          `refused a dashboard WebSocket opened by a page of another origin (${origin}); only the dashboard's own pages may read the event stream (allowedOrigins adds origins)`,
        );
      }
      refuse(
        '403 Forbidden',
        `fedtune dashboard: 403 forbidden: WebSocket from origin ${origin} refused; only pages of this dashboard (${servedHttps ? 'https' : 'http'}://${req.headers.host ?? 'HOST'}) may open /ws\n`,
      );
      return;
    }
    if (token !== undefined) {
      const given = requestToken(req, url);
      if (given === undefined || !sameSecret(given, token)) {
        refuse('401 Unauthorized', UNAUTHORIZED);
        return;
      }
    }
    if (url.pathname !== '/ws') {
      refuse('404 Not Found', `fedtune dashboard: WebSocket endpoint is /ws, not ${url.pathname}\n`);
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
  });

  await new Promise<void>((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException): void => {
      const port = opts.port ?? 8080;
      reject(
        new Error(
          err.code === 'EADDRINUSE'
            ? `dashboard: ${host}:${port} is already in use; choose another dashboard port (0 picks a free one)`
            : `dashboard: cannot listen on ${host}:${port}: ${err.message}`,
        ),
      );
    };
    server.once('error', onError);
    server.listen(opts.port ?? 8080, host, () => {
      server.off('error', onError);
      resolve();
    });
  });
  const addr = server.address();
  const port = typeof addr === 'object' && addr ? addr.port : (opts.port ?? 8080);
  const hostInUrl = host.includes(':') ? `[${host}]` : host;
  const url = `${tlsOptions ? 'https' : 'http'}://${hostInUrl}:${port}/`;
  if (!hasApp()) log.warn({ staticDir }, 'dashboard app is not built; pages answer 503 until "npm run build:dashboard" is run');

  return {
    url,
    openUrl: token === undefined ? url : `${url}?token=${encodeURIComponent(token)}`,
    port,
    metrics,
    stats: () => ({
      clients: clients.size,
      subscriptions: [...clients].reduce((n, c) => n + c.subs.size, 0),
      resyncs,
    }),
    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      clearInterval(ping);
      allRuns?.close();
      for (const c of clients) {
        c.close();
        c.ws.terminate();
      }
      clients.clear();
      wss.close();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await folding;
    },
  };
}
