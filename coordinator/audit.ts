/**
 * The run's audit log: CHECKPOINT_DIR/<name>/audit.jsonl, one JSON object per
 * line, opened for appending only (O_APPEND, mode 0600) and never rewritten.
 * Every record is written with one write(2) and fsync'ed before the call
 * returns, so a record that was reported is on disk; commit() writes at once
 * and resolves after an fsync instead (group commit: the records of many
 * registrations in flight share one fsync, and the event loop never waits on
 * the disk). Refusals that a remote
 * peer can cause at will are bounded per address by the caller (the handshake
 * log's rate limit) and here by REFUSALS_PER_MINUTE overall.
 *
 * Records (all with `time`, ISO 8601, and `type`):
 *   join      site, worker_id, address, cert_sha256, cert_serial, token_id
 *   refusal   stage (handshake | run_info | register | session), reason, site (as claimed), address
 *   revoked   site, worker_id, cert_serial: a live session ended because its certificate was revoked
 *   round     round, sites (whose updates were aggregated), privacy (epsilon spent, when the run has DP),
 *             settings (the run's privacy: section, when any part of it is on)
 *   reload    what: crl | join_tokens, and what changed (counts, never secrets)
 *
 * No record holds a join token, a key or any other secret: reasons are the
 * coordinator's own messages, which never echo a token.
 */
import { closeSync, fsync, fsyncSync, mkdirSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { logger } from '../common/log.ts';

const log = logger('coordinator.audit');

export const AUDIT_FILE = 'audit.jsonl';
/** At most this many refusal records per minute in all; the rest are counted in the next one written. */
export const REFUSALS_PER_MINUTE = 600;
/** Longest client-chosen string (a claimed site name) kept in a record. */
const MAX_FIELD = 200;

export type AuditRecord =
  | { type: 'join'; site: string; worker_id: string; address: string; cert_sha256: string | null; cert_serial: string | null; token_id: string | null }
  | { type: 'refusal'; stage: 'handshake' | 'run_info' | 'register' | 'session'; reason: string; site: string | null; address: string; suppressed_before?: number }
  | { type: 'revoked'; site: string; worker_id: string; cert_serial: string }
  | { type: 'round'; round: number; sites: string[]; privacy: unknown; settings?: unknown }
  | { type: 'reload'; what: 'crl' | 'join_tokens'; detail: Record<string, unknown> };

function clip(s: string): string {
  return s.length > MAX_FIELD ? `${s.slice(0, MAX_FIELD)}...` : s;
}

export class AuditLog {
  private fd: number | null;
  private windowStart = 0;
  private refusalsInWindow = 0;
  private refusalsHeld = 0;
  /** commit() callers whose records were written after the fsync now in flight began (or with none in flight). */
  private waiting: Array<() => void> = [];
  /** Those whose records the fsync now in flight covers (null: none in flight). */
  private syncing: Array<() => void> | null = null;

  private constructor(
    readonly path: string,
    fd: number,
    private readonly sync: (fd: number, cb: (err: NodeJS.ErrnoException | null) => void) => void,
  ) {
    this.fd = fd;
  }

  /** Open (create) runDir/audit.jsonl for appending. `sync`: the asynchronous fsync commit() uses (tests count them). */
  static open(runDir: string, sync: (fd: number, cb: (err: NodeJS.ErrnoException | null) => void) => void = fsync): AuditLog {
    mkdirSync(runDir, { recursive: true });
    const path = join(runDir, AUDIT_FILE);
    let fd: number;
    try {
      fd = openSync(path, 'a', 0o600);
    } catch (err) {
      throw new Error(`audit log: cannot open ${path} for appending (${(err as NodeJS.ErrnoException).code ?? String(err)}); check checkpoint.dir`);
    }
    return new AuditLog(path, fd, sync);
  }

  /** Append one record and fsync it. A write error is logged and does not stop the run. */
  write(rec: AuditRecord, now = Date.now()): void {
    if (!this.append(rec, now)) return;
    try {
      fsyncSync(this.fd!);
    } catch (err) {
      log.error({ path: this.path, err: (err as Error).message }, 'audit record not written');
    }
  }

  /**
   * Append one record now and resolve once it is on disk: after an fsync that
   * began after the write. Records written while an fsync is in flight share
   * the next one. Never rejects (a write or fsync error is logged, as in write()).
   */
  commit(rec: AuditRecord, now = Date.now()): Promise<void> {
    if (!this.append(rec, now)) return Promise.resolve();
    return new Promise((resolve) => {
      this.waiting.push(resolve);
      if (!this.syncing) this.flush();
    });
  }

  private flush(): void {
    const batch = this.waiting;
    this.waiting = [];
    if (this.fd === null) {
      for (const r of batch) r();
      return;
    }
    this.syncing = batch;
    this.sync(this.fd, (err) => {
      this.syncing = null;
      // After close() (which synced) an fsync still in flight may find its descriptor gone: nothing was lost.
      if (err && this.fd !== null) log.error({ path: this.path, err: err.message }, 'audit records not synced to disk');
      for (const r of batch) r();
      if (this.waiting.length > 0) this.flush();
    });
  }

  /** One write(2) of the record; false when nothing was written (closed, refusal held back, write error). */
  private append(rec: AuditRecord, now: number): boolean {
    if (this.fd === null) return false;
    if (rec.type === 'refusal') {
      if (now - this.windowStart >= 60_000) {
        this.windowStart = now;
        this.refusalsInWindow = 0;
      }
      if (++this.refusalsInWindow > REFUSALS_PER_MINUTE) {
        this.refusalsHeld++;
        return false;
      }
      rec = { ...rec, reason: clip(rec.reason), site: rec.site === null ? null : clip(rec.site), address: clip(rec.address) };
      if (this.refusalsHeld > 0) {
        rec.suppressed_before = this.refusalsHeld;
        this.refusalsHeld = 0;
      }
    }
    if (rec.type === 'join') rec = { ...rec, site: clip(rec.site), address: clip(rec.address) };
    const line = `${JSON.stringify({ time: new Date(now).toISOString(), ...rec })}\n`;
    try {
      writeSync(this.fd, line);
      return true;
    } catch (err) {
      log.error({ path: this.path, err: (err as Error).message }, 'audit record not written');
      return false;
    }
  }

  close(): void {
    if (this.fd === null) return;
    try {
      fsyncSync(this.fd);
    } catch {
      /* nothing more to save */
    }
    closeSync(this.fd);
    this.fd = null;
    // Synced above: whoever still waits for a commit has its record on disk.
    for (const r of [...(this.syncing ?? []), ...this.waiting.splice(0)]) r();
  }
}

/**
 * Round records from the run's events: the sites whose updates were received
 * since the round (attempt) started, and the `privacy` field of
 * `round.completed` when the run publishes one.
 */
export class RoundAuditor {
  private sites = new Set<string>();
  private round = -1;

  /** `settings`: the run's privacy parameters (privacy: section), written with every round record. */
  constructor(
    private readonly audit: AuditLog,
    private readonly settings: unknown = null,
  ) {}

  onEvent(e: { type: string } & Record<string, unknown>): void {
    if (e.type === 'round.started') {
      this.round = Number(e.round);
      this.sites.clear();
    } else if (e.type === 'update.received' && Number(e.round) === this.round) {
      this.sites.add(String(e.site));
    } else if (e.type === 'round.completed') {
      this.audit.write({ type: 'round', round: Number(e.round), sites: [...this.sites].sort(), privacy: e.privacy ?? null, ...(this.settings ? { settings: this.settings } : {}) });
      this.sites.clear();
    }
  }
}
