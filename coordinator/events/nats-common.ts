/**
 * What the NATS event bus, the NATS consumer bus and worker presence share:
 * connection options (servers, credentials, TLS), the subject layout, the
 * JetStream stream that keeps run history, and error helpers.
 *
 * Subjects (root `fedtune` by default, see Subjects):
 *   fedtune.runs.<run>.<event-type>   every run event, e.g. fedtune.runs.demo-1.round.completed
 *                                     (event types keep their dot: filter one run with
 *                                     `fedtune.runs.demo-1.>`, every round event of every run
 *                                     with `fedtune.runs.*.round.>`, logs with `fedtune.runs.*.log`)
 *   fedtune.workers.<site>            worker presence announcements (core NATS, not stored)
 *   fedtune.presence.ping             asks every worker to announce itself now
 *
 * A run id or site becomes one subject token: characters other than
 * A-Z a-z 0-9 _ - are percent-encoded (UTF-8 bytes as %XX), so `run.1` is
 * `run%2E1` and the token decodes back to the exact id.
 */
import { existsSync, readFileSync } from 'node:fs';
import {
  credsAuthenticator,
  nanos,
  NatsError,
  type ConnectionOptions,
  type JetStreamManager,
  type StreamConfig,
  type StreamInfo,
  type StoredMsg,
} from 'nats';
import type { RunEvent } from '../../common/events.ts';
import { redactText, redactUrl } from '../../common/redact.ts';

export const DEFAULT_SUBJECT_ROOT = 'fedtune';
export const DEFAULT_STREAM = 'FEDTUNE_EVENTS';

/** How to reach NATS: the same shape the coordinator's `--nats*` options produce. */
export interface NatsConnectOptions {
  /** One or more server URLs, comma-separated: nats://host:port, tls://host:port or host:port. */
  servers: string;
  user?: string;
  pass?: string;
  token?: string;
  /** A NATS credentials file (JWT + NKey seed), as `nsc` writes it. */
  credsFile?: string;
  /** PEM files: ca verifies the server; cert + key authenticate this client (mutual TLS). */
  tls?: { ca?: string; cert?: string; key?: string };
}

/** Limits of the JetStream stream that keeps run history; unset means unlimited (server default). */
export interface NatsStreamOptions {
  /** Stream name (default FEDTUNE_EVENTS). */
  stream?: string;
  /** Subject root (default fedtune): events go to <root>.runs.<run>.<type>. */
  subjectRoot?: string;
  /** Drop events older than this many seconds. */
  maxAgeSec?: number;
  /** Keep at most this many bytes (oldest dropped first). */
  maxBytes?: number;
  /** Keep at most this many events (oldest dropped first). */
  maxMsgs?: number;
  /** Window in which a re-published event (same Nats-Msg-Id) is recognised as a duplicate (default 120 s). */
  duplicateWindowSec?: number;
}

const TOKEN_SAFE = /^[A-Za-z0-9_-]$/;

/** One subject token for an arbitrary string (run id, site); reversible with decodeToken. */
export function encodeToken(s: string): string {
  if (s === '') throw new Error('subject token: empty string (a run id or site must be non-empty)');
  let out = '';
  for (const ch of s) {
    if (TOKEN_SAFE.test(ch)) out += ch;
    else for (const b of Buffer.from(ch, 'utf8')) out += `%${b.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

export function decodeToken(token: string): string {
  return decodeURIComponent(token);
}

/**
 * The subjects under one root (default `fedtune`; another root such as
 * `staging.fedtune` keeps several deployments apart on one NATS server, each
 * with its own stream).
 */
export class Subjects {
  readonly root: string;
  private readonly rootTokens: number;
  constructor(root: string = DEFAULT_SUBJECT_ROOT) {
    if (!/^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/.test(root)) {
      throw new Error(
        `subject root ${JSON.stringify(root)} is not allowed; use dot-separated tokens of letters, digits, '_' and '-' (e.g. fedtune or staging.fedtune)`,
      );
    }
    this.root = root;
    this.rootTokens = root.split('.').length;
  }
  /** Every run event: <root>.runs.> */
  get allRuns(): string {
    return `${this.root}.runs.>`;
  }
  /** Subject of one event: <root>.runs.<run>.<type>. */
  event(e: Pick<RunEvent, 'runId' | 'type'>): string {
    return `${this.root}.runs.${encodeToken(e.runId)}.${e.type}`;
  }
  /** Every event of one run: <root>.runs.<run>.> */
  run(runId: string): string {
    return `${this.root}.runs.${encodeToken(runId)}.>`;
  }
  /** Run id from an event subject (undefined when it is not one). */
  runIdOf(subject: string): string | undefined {
    const parts = subject.split('.');
    const n = this.rootTokens;
    if (parts.length < n + 3 || parts.slice(0, n).join('.') !== this.root || parts[n] !== 'runs') return undefined;
    try {
      return decodeToken(parts[n + 1]!);
    } catch {
      return undefined;
    }
  }
  /** Presence announcements of one site: <root>.workers.<site> */
  workers(site: string): string {
    return `${this.root}.workers.${encodeToken(site)}`;
  }
  get allWorkers(): string {
    return `${this.root}.workers.>`;
  }
  /** Asks every worker to announce itself now. */
  get presencePing(): string {
    return `${this.root}.presence.ping`;
  }
}

/** Nats-Msg-Id of an event: `<run>:<seq>` (run encoded as a subject token so the header stays plain ASCII). */
export function eventMsgId(e: Pick<RunEvent, 'runId' | 'seq'>): string {
  return `${encodeToken(e.runId)}:${e.seq}`;
}

function optionalPositive(where: string, name: string, v: number | undefined): void {
  if (v === undefined) return;
  if (!Number.isFinite(v) || v <= 0 || !Number.isInteger(v)) {
    throw new Error(`${where}: ${name} must be a positive integer, got ${String(v)}`);
  }
}

/** Stream names may not contain whitespace, '.', '*', '>', '/' or '\\' (NATS rule). */
export function validateStreamName(where: string, name: string): void {
  if (name === '' || /[\s.*>/\\]/.test(name)) {
    throw new Error(
      `${where}: stream name ${JSON.stringify(name)} is not allowed; use letters, digits, '_' and '-' (no whitespace, '.', '*', '>', '/', '\\')`,
    );
  }
}

export function validateStreamOptions(where: string, o: NatsStreamOptions): void {
  if (o.stream !== undefined) validateStreamName(where, o.stream);
  if (o.subjectRoot !== undefined) new Subjects(o.subjectRoot);
  optionalPositive(where, 'maxAgeSec', o.maxAgeSec);
  optionalPositive(where, 'maxBytes', o.maxBytes);
  optionalPositive(where, 'maxMsgs', o.maxMsgs);
  optionalPositive(where, 'duplicateWindowSec', o.duplicateWindowSec);
}

/** Parse the comma-separated server list; every entry must be nats://, tls://, ws(s):// or host:port. */
export function parseServers(where: string, servers: string): string[] {
  if (typeof servers !== 'string' || servers.trim() === '') {
    throw new Error(`${where}: servers is empty; give a NATS URL such as nats://127.0.0.1:4222`);
  }
  const list = servers.split(',').map((s) => s.trim()).filter((s) => s !== '');
  for (const s of list) {
    // Error messages quote the entry with any credentials in it hidden.
    const shown = JSON.stringify(redactUrl(s));
    const withScheme = /^[a-z]+:\/\//i.test(s) ? s : `nats://${s}`;
    let url: URL;
    try {
      url = new URL(withScheme);
    } catch {
      throw new Error(`${where}: ${shown} is not a NATS URL; expected nats://HOST:PORT (or tls://HOST:PORT)`);
    }
    if (!['nats:', 'tls:'].includes(url.protocol)) {
      throw new Error(`${where}: ${shown} has scheme ${url.protocol.replace(':', '')}; allowed: nats, tls`);
    }
    if (url.hostname === '') throw new Error(`${where}: ${shown} has no host; expected nats://HOST:PORT`);
  }
  return list;
}

/** One server entry split into the entry without its user part and the user part (percent-decoded). */
function splitUserinfo(entry: string): { server: string; user?: string; pass?: string } {
  const scheme = /^([a-z][a-z0-9+.-]*:\/\/)/i.exec(entry)?.[1] ?? '';
  const rest = entry.slice(scheme.length);
  const end = rest.search(/[/?#]/);
  const authority = end < 0 ? rest : rest.slice(0, end);
  const at = authority.lastIndexOf('@');
  if (at < 0) return { server: entry };
  const userinfo = authority.slice(0, at);
  const server = `${scheme}${rest.slice(at + 1)}`;
  const decode = (x: string): string => {
    try {
      return decodeURIComponent(x);
    } catch {
      return x;
    }
  };
  const colon = userinfo.indexOf(':');
  return colon < 0 ? { server, user: decode(userinfo) } : { server, user: decode(userinfo.slice(0, colon)), pass: decode(userinfo.slice(colon + 1)) };
}

/**
 * Credentials written into the server URLs (nats://USER:PASS@host:4222, or
 * nats://TOKEN@host:4222, the NATS convention) moved into user/pass/token,
 * and the URLs without them: nats.js does not read credentials from URLs,
 * and URLs are what logs and error messages show. Idempotent; throws when the
 * URLs and the other options (or two URLs) give different credentials.
 */
export function withUrlCredentials(where: string, o: NatsConnectOptions): NatsConnectOptions {
  if (typeof o.servers !== 'string' || !o.servers.includes('@')) return o;
  const parts = o.servers.split(',').map((s) => splitUserinfo(s.trim()));
  const found = parts.filter((p) => p.user !== undefined);
  if (found.length === 0) return o;
  const first = found[0]!;
  if (found.some((p) => p.user !== first.user || p.pass !== first.pass)) {
    throw new Error(`${where}: the server URLs carry different credentials (${redactUrl(o.servers)}); give one user:password (or token) for all of them`);
  }
  if (o.user !== undefined || o.pass !== undefined || o.token !== undefined || o.credsFile !== undefined) {
    throw new Error(
      `${where}: the server URL carries credentials (${redactUrl(o.servers)}) and user/pass, token or a credentials file are given too; give one way to authenticate`,
    );
  }
  if (first.user === '') {
    throw new Error(`${where}: the server URL has an empty user part (${redactUrl(o.servers)}); write nats://USER:PASS@HOST:PORT or nats://TOKEN@HOST:PORT`);
  }
  const servers = parts.map((p) => p.server).join(',');
  return first.pass === undefined ? { ...o, servers, token: first.user } : { ...o, servers, user: first.user, pass: first.pass };
}

function readableFile(where: string, field: string, path: string): void {
  if (!existsSync(path)) throw new Error(`${where}: ${field} file ${path} does not exist`);
}

/**
 * nats.js connection options from ours; validates first (URLs, files exist,
 * credentials not mixed) and throws an error naming the field. Credentials in
 * the URLs become user/pass or token (see withUrlCredentials), so the
 * returned servers never carry a secret.
 */
export function toConnectionOptions(where: string, given: NatsConnectOptions): ConnectionOptions {
  const o = withUrlCredentials(where, given);
  const servers = parseServers(where, o.servers);
  const out: ConnectionOptions = { servers };
  const modes = [o.user !== undefined || o.pass !== undefined, o.token !== undefined, o.credsFile !== undefined];
  if (modes.filter(Boolean).length > 1) {
    throw new Error(`${where}: give one way to authenticate: user+pass, token, or credsFile (got more than one)`);
  }
  if ((o.user === undefined) !== (o.pass === undefined)) {
    throw new Error(`${where}: user and pass go together (got only ${o.user === undefined ? 'pass' : 'user'})`);
  }
  if (o.user !== undefined) {
    out.user = o.user;
    out.pass = o.pass;
  }
  if (o.token !== undefined) {
    if (o.token === '') throw new Error(`${where}: token is empty`);
    out.token = o.token;
  }
  if (o.credsFile !== undefined) {
    readableFile(where, 'credsFile', o.credsFile);
    const creds = readFileSync(o.credsFile);
    if (!creds.toString('utf8').includes('BEGIN NATS USER JWT')) {
      throw new Error(`${where}: credsFile ${o.credsFile} is not a NATS credentials file (no "BEGIN NATS USER JWT" block)`);
    }
    out.authenticator = credsAuthenticator(new Uint8Array(creds));
  }
  if (o.tls !== undefined) {
    const { ca, cert, key } = o.tls;
    if ((cert === undefined) !== (key === undefined)) {
      throw new Error(`${where}: tls cert and key go together (got only ${cert === undefined ? 'key' : 'cert'})`);
    }
    const tls: NonNullable<ConnectionOptions['tls']> = {};
    if (ca !== undefined) {
      readableFile(where, 'tls.ca', ca);
      tls.caFile = ca;
    }
    if (cert !== undefined && key !== undefined) {
      readableFile(where, 'tls.cert', cert);
      readableFile(where, 'tls.key', key);
      tls.certFile = cert;
      tls.keyFile = key;
    }
    out.tls = tls;
  }
  return out;
}

/** Direct get (stream must allow it; ensureStream turns it on): by last subject, or next matching from a position. */
export interface DirectGet {
  getMessage(stream: string, query: { last_by_subj: string } | { seq: number; next_by_subj: string }): Promise<StoredMsg>;
}

/**
 * nats.js has `jsm.direct` at run time but leaves it out of the exported
 * JetStreamManager type; this reaches it with a check instead of a cast at every use.
 */
export function directGet(jsm: JetStreamManager): DirectGet {
  const direct = (jsm as JetStreamManager & { direct?: DirectGet }).direct;
  if (!direct || typeof direct.getMessage !== 'function') {
    throw new Error('this nats client has no direct get API (nats.js >= 2.7 needed)');
  }
  return direct;
}

/** One-line description of a NATS/JetStream error for logs and events. */
export function describeNatsError(err: unknown): string {
  return redactText(describeNatsErrorRaw(err));
}

function describeNatsErrorRaw(err: unknown): string {
  if (err instanceof NatsError) {
    const api = err.api_error;
    if (api) return `${api.description} (JetStream error ${api.err_code}, status ${api.code})`;
    if (err.code === '503') return 'no responders: JetStream is not available (is nats-server running with -js?)';
    if (err.code === 'TIMEOUT') return 'timed out waiting for NATS';
    if (err.code === 'CONNECTION_REFUSED') return 'connection refused';
    if (err.chainedError) return `${err.message}: ${err.chainedError.message}`;
    return `${err.message} (${err.code})`;
  }
  return err instanceof Error ? err.message : String(err);
}

/** True for failures that a retry on the same connection can fix: a timeout or no responders (a server that is (re)starting). */
export function isRetryable(err: unknown): boolean {
  return err instanceof NatsError && !err.api_error && (err.code === 'TIMEOUT' || err.code === '503');
}

/**
 * Run a JetStream read, retrying a few times on a timeout or no responders:
 * a request made while the client reconnects can be lost and time out even
 * though the server is back.
 */
export async function retrying<T>(fn: () => Promise<T>, attempts = 4, delayMs = 200): Promise<T> {
  for (let i = 1; ; i++) {
    try {
      return await fn();
    } catch (err) {
      if (i >= attempts || !isRetryable(err)) throw err;
      await new Promise((r) => setTimeout(r, delayMs * i));
    }
  }
}

/** True for "message not found" answers of message get requests. */
export function isNotFound(err: unknown): boolean {
  if (!(err instanceof NatsError)) return false;
  if (err.api_error?.code === 404 || err.code === '404') return true;
  return /no message found|not found/i.test(err.message);
}

/** True for a JetStream answer that says the stream itself does not exist. */
export function isStreamNotFound(err: unknown): boolean {
  return err instanceof NatsError && err.api_error?.err_code === 10059;
}

/** Stream configuration that our options ask for (only fields that were set). */
function desiredLimits(o: NatsStreamOptions): Partial<StreamConfig> {
  const c: Partial<StreamConfig> = {};
  if (o.maxAgeSec !== undefined) c.max_age = nanos(o.maxAgeSec * 1000);
  if (o.maxBytes !== undefined) c.max_bytes = o.maxBytes;
  if (o.maxMsgs !== undefined) c.max_msgs = o.maxMsgs;
  if (o.duplicateWindowSec !== undefined) c.duplicate_window = nanos(o.duplicateWindowSec * 1000);
  return c;
}

/**
 * Make sure the history stream exists and captures fedtune.runs.>: create it
 * when missing (with the limits given), apply limits that were given and
 * differ, and turn on direct get (used to find sequence numbers quickly).
 */
export async function ensureStream(jsm: JetStreamManager, o: NatsStreamOptions): Promise<StreamInfo> {
  const name = o.stream ?? DEFAULT_STREAM;
  const subjects = new Subjects(o.subjectRoot);
  const want = desiredLimits(o);
  let info: StreamInfo | undefined;
  try {
    info = await jsm.streams.info(name);
  } catch (err) {
    if (!isStreamNotFound(err)) throw err;
  }
  if (!info) {
    try {
      return await jsm.streams.add({
        name,
        subjects: [subjects.allRuns],
        allow_direct: true,
        duplicate_window: nanos(120_000),
        ...want,
      });
    } catch (err) {
      // Another process created it in between: fall through to the checks below.
      info = await jsm.streams.info(name).catch(() => {
        const overlap = err instanceof NatsError && err.api_error?.err_code === 10065;
        throw new Error(
          `NATS stream ${name}: cannot create it: ${describeNatsError(err)}` +
            (overlap ? `; another stream already captures ${subjects.allRuns}: use that stream's name or another subject root` : ''),
        );
      });
    }
  }
  const cfg = info.config;
  const captures = cfg.subjects?.some((s) => s === subjects.allRuns || s === `${subjects.root}.>` || s === '>');
  if (!captures) {
    throw new Error(
      `NATS stream ${name} exists but captures ${JSON.stringify(cfg.subjects ?? [])}, not ${subjects.allRuns}; ` +
        'choose another stream name (--nats-stream / --stream) or add the subject to that stream',
    );
  }
  const changed = (Object.keys(want) as Array<keyof StreamConfig>).some((k) => cfg[k] !== want[k]) || !cfg.allow_direct;
  if (changed) {
    info = await jsm.streams.update(name, { ...cfg, ...want, allow_direct: true });
  }
  return info;
}
