/**
 * Who may join a run, and as which site:
 *
 * - mutual TLS (server.tls.client_ca): the site a worker registers as is the
 *   subject CN of its client certificate; a worker claiming another site's
 *   name is refused (PERMISSION_DENIED).
 * - revocation (server.tls.crl): the CRL goes into the TLS context, so OpenSSL
 *   refuses a revoked certificate at the handshake (grpc-js's createSsl has no
 *   CRL option; ReloadableServerCredentials passes Node's `crl` context option
 *   and replaces the secure context when the file changes, which grpc-js
 *   supports through its credentials watchers). Connections opened before a
 *   revocation keep their TLS session, so every RPC also checks the peer
 *   certificate's serial (UNAUTHENTICATED naming it), and live sessions of a
 *   newly revoked certificate are ended on reload.
 * - join tokens: one shared server.join_token, or per-site tokens with expiry
 *   (server.join_tokens, a JSON file holding SHA-256 hashes only; see
 *   TokenFile). A token for site X cannot register site Y; an expired token is
 *   refused saying when it expired. Tokens are compared in constant time and
 *   never logged, echoed or written anywhere but to the operator who issued it.
 *
 * Every refusal and every join is written to the run's audit log (audit.ts).
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { chmodSync, readFileSync, statSync, unwatchFile, watchFile, type Stats } from 'node:fs';
import { readFile } from 'node:fs/promises';
import type { SecureContextOptions } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { writeFileAtomic } from '../common/atomic.ts';
import { fingerprintOf, normalizeSerial, parseCrl, SITE_NAME_RE, type ParsedCrl } from '../common/certs.ts';
import type { RunConfig } from '../common/config.ts';
import { logger } from '../common/log.ts';
import type { AuditLog } from './audit.ts';
import type { WorkerRecord, WorkerRegistry } from './workers.ts';

const log = logger('coordinator.identity');

// ---------------------------------------------------------------------------
// Per-site join tokens

/** admitted() sweeps the certificate bindings of gone workers no sooner than at this many. */
const BOUND_SWEEP_MIN = 64;

/** A token: ftk_<id: 12 hex>_<secret: 32 random bytes, base64url>. Only its SHA-256 is stored. */
export const TOKEN_RE = /^ftk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$/;

export interface TokenRecord {
  /** Public handle of the token (in its text, in the audit log, in `tokens list`). */
  id: string;
  site: string;
  /** SHA-256 of the whole token text, lowercase hex. */
  sha256: string;
  created_at: string;
  expires_at: string;
}

/** The file server.join_tokens names. */
export interface TokenFile {
  version: 1;
  tokens: TokenRecord[];
}

export function hashToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

/** A new token and the record to store for it (the token itself is shown once and kept nowhere). */
export function newToken(site: string, expiresAt: Date, now = new Date()): { token: string; record: TokenRecord } {
  if (!SITE_NAME_RE.test(site)) throw new Error(`site "${site}": must start with a letter or digit and hold only letters, digits, ".", "_" and "-" (at most 64 characters)`);
  if (!(expiresAt.getTime() > now.getTime())) throw new Error(`--expires: ${expiresAt.toISOString()} is not in the future`);
  const id = randomBytes(6).toString('hex');
  const token = `ftk_${id}_${randomBytes(32).toString('base64url')}`;
  return { token, record: { id, site, sha256: hashToken(token), created_at: now.toISOString(), expires_at: expiresAt.toISOString() } };
}

/** "7d", "12h", "30m" from now, or an ISO 8601 date. */
export function parseExpiry(s: string, now = new Date()): Date {
  const m = /^(\d+)\s*(m|h|d)$/.exec(s.trim());
  if (m) {
    const n = Number(m[1]);
    const unit = { m: 60_000, h: 3_600_000, d: 86_400_000 }[m[2] as 'm' | 'h' | 'd'];
    if (n < 1) throw new Error(`--expires ${s}: must be at least 1${m[2]}`);
    return new Date(now.getTime() + n * unit);
  }
  const d = new Date(s);
  if (!/^\d{4}-\d\d-\d\d/.test(s) || Number.isNaN(d.getTime())) throw new Error(`--expires ${s}: give a duration (30m, 12h, 7d) or an ISO 8601 date (2027-01-31T00:00:00Z)`);
  return d;
}

export function parseTokenFile(text: string, field: string, path: string): TokenFile {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new Error(`${field}: ${path} is not JSON (${(err as Error).message}); create it with fedtune tokens issue SITE --file ${path}`);
  }
  const f = raw as Partial<TokenFile>;
  if (typeof f !== 'object' || f === null || f.version !== 1 || !Array.isArray(f.tokens)) {
    throw new Error(`${field}: ${path} is not a fedtune token file ({"version": 1, "tokens": [...]}); create it with fedtune tokens issue SITE --file ${path}`);
  }
  f.tokens.forEach((t, i) => {
    const ok =
      typeof t === 'object' && t !== null && /^[0-9a-f]{12}$/.test(t.id) && typeof t.site === 'string' && /^[0-9a-f]{64}$/.test(t.sha256) && !Number.isNaN(Date.parse(t.expires_at));
    if (!ok) throw new Error(`${field}: ${path}: tokens[${i}] needs id (12 hex), site, sha256 (64 hex) and expires_at (ISO date)`);
  });
  return f as TokenFile;
}

export async function readTokenFile(path: string, field = '--file'): Promise<TokenFile> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { version: 1, tokens: [] };
    throw new Error(`${field}: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
  return parseTokenFile(text, field, path);
}

export async function writeTokenFile(path: string, f: TokenFile): Promise<void> {
  await writeFileAtomic(path, `${JSON.stringify(f, null, 2)}\n`);
  chmodSync(path, 0o600);
}

export interface Refusal {
  code: grpc.status;
  message: string;
}

type TokenCheck = { ok: true; id: string | null; site: string | null } | ({ ok: false } & Refusal);

/** server.join_tokens, re-read when the file changes (checked by stat at each use). */
export class TokenStore {
  private file: TokenFile = { version: 1, tokens: [] };
  private seen = '';

  constructor(readonly path: string) {
    this.reload(true);
  }

  private stamp(st: Stats): string {
    return `${st.ino}:${st.size}:${st.mtimeMs}`;
  }

  /** Re-read the file if it changed. At start a bad file throws; later it is logged and the last good one kept. */
  reload(strict = false): boolean {
    try {
      const st = statSync(this.path);
      const stamp = this.stamp(st);
      if (stamp === this.seen) return false;
      this.file = parseTokenFile(readFileSync(this.path, 'utf8'), 'server.join_tokens', this.path);
      this.seen = stamp;
      log.info({ path: this.path, tokens: this.file.tokens.length }, 'join tokens loaded');
      return true;
    } catch (err) {
      const msg = (err as NodeJS.ErrnoException).code ? `server.join_tokens: cannot read ${this.path} (${(err as NodeJS.ErrnoException).code})` : (err as Error).message;
      if (strict) throw new Error(msg);
      log.error({ path: this.path }, `${msg}; keeping the tokens loaded before`);
      return false;
    }
  }

  get size(): number {
    return this.file.tokens.length;
  }

  check(token: string, site: string | null, now = Date.now()): TokenCheck {
    this.reload();
    const m = TOKEN_RE.exec(token);
    const unknown = {
      ok: false as const,
      code: grpc.status.UNAUTHENTICATED,
      message: 'join token rejected: it is not a valid per-site token of this run (server.join_tokens); give the token printed by fedtune tokens issue SITE',
    };
    if (!m) return unknown;
    const rec = this.file.tokens.find((t) => t.id === m[1]);
    const given = Buffer.from(hashToken(token), 'hex');
    // Compared in constant time against the stored hash (or a dummy one, so that a missing id takes as long).
    const stored = Buffer.from(rec?.sha256 ?? '0'.repeat(64), 'hex');
    if (!timingSafeEqual(given, stored) || !rec) return unknown;
    const expires = Date.parse(rec.expires_at);
    if (now >= expires) {
      return {
        ok: false,
        code: grpc.status.UNAUTHENTICATED,
        message: `join token ${rec.id} of site "${rec.site}" expired at ${new Date(expires).toISOString()}: ask the coordinator's operator for a new one (fedtune tokens issue ${rec.site})`,
      };
    }
    if (site !== null && rec.site !== site) {
      return {
        ok: false,
        code: grpc.status.PERMISSION_DENIED,
        message: `join token ${rec.id} is for site "${rec.site}", not for site "${site}": each site registers with its own token`,
      };
    }
    return { ok: true, id: rec.id, site: rec.site };
  }
}

// ---------------------------------------------------------------------------
// Certificates, revocation

/** The client certificate of a call's connection (mutual TLS), or null. */
export interface PeerIdentity {
  /** Subject CN: the site the certificate was issued to. */
  site: string;
  serial: string;
  sha256: string;
}

type CallWithAuth = { getAuthContext?: () => { sslPeerCertificate?: { raw?: Buffer; subject?: Record<string, string | string[]>; serialNumber?: string } } };

export function peerIdentityOf(call: unknown): PeerIdentity | null {
  const c = (call as CallWithAuth).getAuthContext?.()?.sslPeerCertificate;
  if (!c?.raw) return null;
  const cn = c.subject?.CN;
  return { site: (Array.isArray(cn) ? cn[0] : cn) ?? '', serial: normalizeSerial(c.serialNumber ?? ''), sha256: fingerprintOf(c.raw) };
}

/**
 * createSsl's credentials with Node's `crl` added to the secure context; setCrl
 * swaps the context of the bound listeners (new handshakes use the new list).
 */
export class ReloadableServerCredentials extends grpc.ServerCredentials {
  private readonly context: SecureContextOptions;

  constructor(base: grpc.ServerCredentials, crl: Buffer | null) {
    const ctx = base._getSecureContextOptions();
    if (!ctx) throw new Error('ReloadableServerCredentials: the base credentials are not TLS credentials');
    super(base._getConstructorOptions(), { ...ctx, ...(crl ? { crl } : {}) });
    this.context = ctx;
  }

  setCrl(crl: Buffer): void {
    this.updateSecureContextOptions({ ...this.context, crl });
  }

  _equals(other: grpc.ServerCredentials): boolean {
    return other === this;
  }
}

/** server.tls.crl: parsed, checked against client_ca, watched (1 s stat poll) and reloaded on change or on request. */
export class Revocations {
  private current: ParsedCrl;
  private watching = false;

  private constructor(
    readonly path: string,
    private readonly caPem: string,
    first: ParsedCrl,
    private readonly credentials: ReloadableServerCredentials,
  ) {
    this.current = first;
  }

  static async load(path: string, caPath: string, base: grpc.ServerCredentials): Promise<Revocations> {
    const caPem = await readFile(caPath, 'utf8');
    const bytes = await readFile(path).catch((err: NodeJS.ErrnoException) => {
      throw new Error(`server.tls.crl: cannot read ${path} (${err.code ?? String(err)}); fedtune certs init writes crl.pem next to ca.pem`);
    });
    const crl = await parseCrl(bytes.toString('utf8'), caPem, 'server.tls.crl', path);
    if (crl.nextUpdate && crl.nextUpdate.getTime() <= Date.now()) {
      throw new Error(`server.tls.crl: ${path} expired at ${crl.nextUpdate.toISOString()} (its next update); TLS would refuse every site: sign it again with fedtune certs crl --dir CA_DIR`);
    }
    return new Revocations(path, caPem, crl, new ReloadableServerCredentials(base, bytes));
  }

  get serverCredentials(): grpc.ServerCredentials {
    return this.credentials;
  }

  get revokedCount(): number {
    return this.current.revoked.size;
  }

  isRevoked(serial: string): boolean {
    return this.current.revoked.has(serial);
  }

  /** Re-read the file; returns the serials revoked since the last load (null when the file is unusable: the old list stays). */
  async reload(): Promise<string[] | null> {
    let bytes: Buffer;
    let next: ParsedCrl;
    try {
      bytes = await readFile(this.path);
      next = await parseCrl(bytes.toString('utf8'), this.caPem, 'server.tls.crl', this.path);
    } catch (err) {
      log.error({ path: this.path }, `${(err as Error).message}; keeping the revocation list loaded before`);
      return null;
    }
    if (next.nextUpdate && next.nextUpdate.getTime() <= Date.now()) {
      log.error({ path: this.path }, `server.tls.crl: ${this.path} expired at ${next.nextUpdate.toISOString()}; keeping the list loaded before: sign it again with fedtune certs crl --dir CA_DIR`);
      return null;
    }
    const added = [...next.revoked].filter((s) => !this.current.revoked.has(s));
    this.current = next;
    this.credentials.setCrl(bytes);
    log.info({ path: this.path, revoked: next.revoked.size, added: added.length }, 'revocation list reloaded');
    return added;
  }

  watch(onChange: () => void, intervalMs = 1000): void {
    if (this.watching) return;
    this.watching = true;
    watchFile(this.path, { interval: intervalMs, persistent: false }, (cur, prev) => {
      if (cur.mtimeMs !== prev.mtimeMs || cur.size !== prev.size || cur.ino !== prev.ino) onChange();
    });
  }

  close(): void {
    if (this.watching) unwatchFile(this.path);
    this.watching = false;
  }
}

// ---------------------------------------------------------------------------
// Admission: what the gRPC service asks

export interface AdmissionOptions {
  /** One shared token (server.join_token). */
  sharedToken?: string;
  tokens?: TokenStore | null;
  /** Mutual TLS: bind the site to the certificate's CN. */
  mutual?: boolean;
  revocations?: Revocations | null;
  audit?: AuditLog | null;
}

type Admitted = { ok: true; peer: PeerIdentity | null; tokenId: string | null };

export class Admission {
  private readonly bound = new Map<string, { w: WorkerRecord; peer: PeerIdentity }>();
  /** Size of `bound` at which admitted() next sweeps out the bindings of gone workers. */
  private sweepBoundAt = BOUND_SWEEP_MIN;

  constructor(private readonly o: AdmissionOptions) {
    if ((o.sharedToken === undefined) === !o.tokens) throw new Error('Admission: give exactly one of sharedToken and tokens');
  }

  /** The checks a config asks for, without revocation or audit (tests that build the service by hand). */
  static fromConfig(cfg: RunConfig): Admission {
    return new Admission({
      ...(cfg.server.join_token !== undefined ? { sharedToken: cfg.server.join_token } : { tokens: new TokenStore(cfg.server.join_tokens!) }),
      mutual: cfg.server.tls?.client_ca != null,
    });
  }

  private refuse(stage: 'run_info' | 'register' | 'session', r: Refusal, site: string | null, address: string): { ok: false } & Refusal {
    this.o.audit?.write({ type: 'refusal', stage, reason: r.message, site, address });
    return { ok: false, ...r };
  }

  private token(token: string, site: string | null): TokenCheck {
    if (this.o.tokens) return this.o.tokens.check(token, site);
    const want = Buffer.from(this.o.sharedToken!);
    const given = Buffer.from(token);
    const ok = given.length === want.length && timingSafeEqual(given, want);
    return ok
      ? { ok: true, id: null, site: null }
      : { ok: false, code: grpc.status.UNAUTHENTICATED, message: 'join token rejected: check --token against server.join_token of the run' };
  }

  private certificate(call: unknown, claimed: string | null): { ok: true; peer: PeerIdentity | null } | ({ ok: false } & Refusal) {
    if (!this.o.mutual) return { ok: true, peer: null };
    const peer = peerIdentityOf(call);
    if (!peer) {
      return { ok: false, code: grpc.status.UNAUTHENTICATED, message: 'no client certificate on this connection (mutual TLS, server.tls.client_ca): start the worker with --tls-cert FILE --tls-key FILE' };
    }
    if (this.o.revocations?.isRevoked(peer.serial)) {
      return {
        ok: false,
        code: grpc.status.UNAUTHENTICATED,
        message: `the client certificate of site "${peer.site}" (serial ${peer.serial}) is revoked (server.tls.crl): ask the coordinator's operator for a new one (fedtune certs issue ${peer.site})`,
      };
    }
    if (claimed !== null && peer.site !== claimed) {
      return {
        ok: false,
        code: grpc.status.PERMISSION_DENIED,
        message: `site "${claimed}" refused: the client certificate on this connection was issued to site "${peer.site}" (CN=${peer.site}, serial ${peer.serial}); a worker registers as the site its certificate names: start it with --name ${peer.site}, or with the certificate of site "${claimed}"`,
      };
    }
    return { ok: true, peer };
  }

  /** GetRunInfo: null when admitted. */
  runInfo(token: string, call: { getPeer(): string }): Refusal | null {
    const address = call.getPeer();
    const cert = this.certificate(call, null);
    if (!cert.ok) return this.refuse('run_info', cert, null, address);
    const t = this.token(token, cert.peer?.site ?? null);
    if (!t.ok) return this.refuse('run_info', t, cert.peer?.site ?? null, address);
    return null;
  }

  /** Register: the identity admitted, or why not. */
  register(token: string, site: string, call: { getPeer(): string }): Admitted | ({ ok: false } & Refusal) {
    const address = call.getPeer();
    const cert = this.certificate(call, site);
    if (!cert.ok) return this.refuse('register', cert, site, address);
    const t = this.token(token, site);
    if (!t.ok) return this.refuse('register', t, site, address);
    return { ok: true, peer: cert.peer, tokenId: t.id };
  }

  /**
   * A registration went through: remember the certificate behind it and write
   * the join record. Resolves once the record is on disk (answer the Register
   * then); the event loop does not wait for the disk meanwhile.
   */
  admitted(w: WorkerRecord, a: Admitted, address: string): Promise<void> {
    if (a.peer) {
      // Bindings of workers that are gone are swept when the map has doubled since the last sweep: O(1) per registration.
      if (this.bound.size >= this.sweepBoundAt) {
        for (const [id, b] of this.bound) if (!b.w.alive) this.bound.delete(id);
        this.sweepBoundAt = Math.max(BOUND_SWEEP_MIN, 2 * this.bound.size);
      }
      this.bound.set(w.workerId, { w, peer: a.peer });
    }
    const written = this.o.audit?.commit({
      type: 'join',
      site: w.site,
      worker_id: w.workerId,
      address,
      cert_sha256: a.peer?.sha256 ?? null,
      cert_serial: a.peer?.serial ?? null,
      token_id: a.tokenId,
    });
    return written ?? Promise.resolve();
  }

  /** Certificate bindings held (live workers, and gone ones not yet swept). */
  get boundCount(): number {
    return this.bound.size;
  }

  /** Every call of a registered worker: refused once its certificate is revoked. */
  check(w: WorkerRecord, address: string): Refusal | null {
    const b = this.bound.get(w.workerId);
    if (!b || !this.o.revocations?.isRevoked(b.peer.serial)) return null;
    return this.refuse(
      'session',
      {
        code: grpc.status.UNAUTHENTICATED,
        message: `the client certificate of site "${b.peer.site}" (serial ${b.peer.serial}) was revoked (server.tls.crl); this worker's session is over`,
      },
      w.site,
      address,
    );
  }

  /**
   * A second channel of a registered worker (the bulk tensor channel): revocation as check(), and
   * under mutual TLS the connection must present the certificate the worker registered with.
   */
  checkChannel(w: WorkerRecord, peer: PeerIdentity | null, address: string): Refusal | null {
    const revoked = this.check(w, address);
    if (revoked || !this.o.mutual) return revoked;
    const b = this.bound.get(w.workerId);
    if (!peer || !b || peer.sha256 !== b.peer.sha256) {
      return this.refuse(
        'session',
        {
          code: grpc.status.PERMISSION_DENIED,
          message: peer
            ? `the client certificate on this connection (site "${peer.site}", serial ${peer.serial}) is not the one worker ${w.workerId} registered with: use one certificate for every connection of a worker`
            : 'no client certificate on this connection (mutual TLS, server.tls.client_ca): every connection of a worker presents its certificate',
        },
        w.site,
        address,
      );
    }
    return null;
  }

  /** After a CRL reload: end the sessions of workers whose certificate is now revoked. Returns how many. */
  endRevoked(registry: WorkerRegistry): number {
    let n = 0;
    for (const [id, b] of this.bound) {
      if (!b.w.alive) {
        this.bound.delete(id);
        continue;
      }
      if (!this.o.revocations?.isRevoked(b.peer.serial)) continue;
      const msg = `the client certificate of site "${b.peer.site}" (serial ${b.peer.serial}) was revoked (server.tls.crl); this worker's session is over`;
      const s = b.w.stream;
      if (s && !s.destroyed) {
        const e = Object.assign(new Error(msg), { code: grpc.status.UNAUTHENTICATED, details: msg, metadata: new grpc.Metadata() });
        try {
          s.emit('error', e);
        } catch {
          /* the stream is already broken */
        }
      }
      registry.detach(b.w, `certificate revoked (serial ${b.peer.serial})`);
      this.o.audit?.write({ type: 'revoked', site: b.w.site, worker_id: b.w.workerId, cert_serial: b.peer.serial });
      log.warn({ site: b.w.site, worker: b.w.workerId, serial: b.peer.serial }, 'session ended: its client certificate was revoked');
      this.bound.delete(id);
      n++;
    }
    return n;
  }
}
