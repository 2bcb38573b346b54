/**
 * NATS event bus for the coordinator. It wraps the in-process MemoryBus, which
 * assigns sequence numbers and serves the coordinator's own dashboard, and
 * copies every event to JetStream on `fedtune.runs.<run>.<type>` for
 * dashboards and consumers on other machines (see nats-consumer.ts).
 *
 *   publish(e) -> MemoryBus.publish (seq, time, local subscribers)  -> returns at once
 *              -> bounded queue -> background publisher -> JetStream (Nats-Msg-Id `<run>:<seq>`)
 *
 * The run never waits on NATS. When NATS is down or unreachable the queue
 * keeps growing up to `queueLimit` events (then the oldest progress,
 * heartbeat and info-log events are dropped first, and the log says which),
 * each active run gets a `bus.degraded` event, and the publisher reconnects
 * with backoff. On reconnect it asks JetStream for the last sequence stored
 * for each run, skips what already arrived, republishes the rest in order and
 * publishes `bus.restored`. The Nats-Msg-Id header makes JetStream drop a
 * republished event it already holds, so nothing is stored twice.
 *
 * The publisher uses a connection without automatic reconnect on purpose:
 * with it, the client would buffer publishes while disconnected and replay
 * them after the ones our retry sends, storing events out of order. A fresh
 * connection per outage means that what JetStream stored from the old
 * connection is a prefix of what was sent on it, which the "last stored
 * sequence" check relies on.
 */
import { connect, type JetStreamClient, type JetStreamManager, type NatsConnection, NatsError } from 'nats';
import type { NewRunEvent, RunEvent } from '../../common/events.ts';
import { logger } from '../../common/log.ts';
import type { EventBus, EventSubscription } from './bus.ts';
import type { MemoryBus } from './memory.ts';
import {
  DEFAULT_STREAM,
  describeNatsError,
  directGet,
  ensureStream,
  eventMsgId,
  isNotFound,
  retrying,
  Subjects,
  toConnectionOptions,
  validateStreamOptions,
  type NatsConnectOptions,
  type NatsStreamOptions,
} from './nats-common.ts';
import { readRunHistory } from './nats-read.ts';
import { positiveIntOption } from '../../common/options.ts';

const log = logger('events.nats');

export interface NatsBusOptions extends NatsStreamOptions {
  connection: NatsConnectOptions;
  /** Events kept for NATS while it is slow or down (default 50000); beyond it events are dropped from the NATS copy only. */
  queueLimit?: number;
  /** Events published to JetStream without waiting for their acknowledgement (default 256). */
  maxInFlight?: number;
  /** How long to wait for JetStream to acknowledge an event (default 5000 ms). */
  publishTimeoutMs?: number;
  /** How long one connection attempt may take (default 2000 ms); also what create() waits at most when NATS is down. */
  connectTimeoutMs?: number;
  /** Reconnect backoff: first and largest delay (default 250 ms and 5000 ms). */
  retryMinMs?: number;
  retryMaxMs?: number;
  /** How long close() keeps trying to deliver what is queued (default 5000 ms). */
  closeTimeoutMs?: number;
}

export interface NatsBusStatus {
  connected: boolean;
  degraded: boolean;
  /** Events waiting to reach JetStream. */
  pending: number;
  /** Events JetStream acknowledged (duplicates included). */
  published: number;
  /** Events dropped from the NATS copy because the queue was full or JetStream refused them. */
  dropped: number;
}

type EntryState = 'queued' | 'inflight' | 'gone';
interface Entry {
  event: RunEvent;
  state: EntryState;
  /** Sent to JetStream at least once. */
  sent: boolean;
  /** Must be resent even if JetStream holds a later sequence of the run (it failed while a later one succeeded). */
  force: boolean;
}

/** Events that may be dropped first when the queue is full: frequent and superseded by the next one. */
function droppable(e: RunEvent): boolean {
  return (
    e.type === 'worker.progress' || e.type === 'worker.heartbeat' || (e.type === 'log' && e.level === 'info')
  );
}

/** Events after which a run publishes nothing more. */
function isTerminal(e: RunEvent): boolean {
  return (
    e.type === 'run.completed' ||
    e.type === 'run.failed' ||
    (e.type === 'run.state' && (e.state === 'completed' || e.state === 'failed' || e.state === 'stopped'))
  );
}


interface Conn {
  nc: NatsConnection;
  js: JetStreamClient;
  jsm: JetStreamManager;
}

interface DropStats {
  count: number;
  firstSeq: number;
  lastSeq: number;
  types: Map<string, number>;
}

const encoder = new TextEncoder();

export class NatsBus implements EventBus {
  readonly stream: string;
  readonly subjects: Subjects;
  private readonly natsOpts: ReturnType<typeof toConnectionOptions>;
  private readonly streamOpts: NatsStreamOptions;
  private readonly queueLimit: number;
  private readonly maxInFlight: number;
  private readonly publishTimeoutMs: number;
  private readonly connectTimeoutMs: number;
  private readonly retryMinMs: number;
  private readonly retryMaxMs: number;
  private readonly closeTimeoutMs: number;

  private conn: Conn | undefined;
  private queue: Entry[] = [];
  private head = 0;
  private pendingCount = 0;
  private dropCursor = 0;
  private needResync = false;
  private degraded = false;
  private degradedReason = '';
  private publishedCount = 0;
  private droppedCount = 0;
  private readonly dropped = new Map<string, DropStats>();
  /** Runs published through this bus in this process that have not finished. */
  private readonly activeRuns = new Set<string>();
  /** Runs told about the current outage (bus.degraded); they get bus.restored when it ends. */
  private readonly notified = new Set<string>();
  /** Highest sequence sent to JetStream per run by this process. */
  private readonly maxSent = new Map<string, number>();
  private readonly conflictLogged = new Set<string>();
  private wake: (() => void) | undefined;
  private flushWaiters: Array<() => void> = [];
  private closing = false;
  private closeDeadline = Infinity;
  private closeSignal!: Promise<void>;
  private signalClose!: () => void;
  private pumpDone: Promise<void> = Promise.resolve();
  private closed = false;

  /** Use NatsBus.create: it connects, prepares the stream and starts the publisher. */
  private constructor(
    private readonly local: MemoryBus,
    opts: NatsBusOptions,
  ) {
    validateStreamOptions('NatsBus', opts);
    this.natsOpts = toConnectionOptions('NatsBus', opts.connection);
    this.stream = opts.stream ?? DEFAULT_STREAM;
    this.subjects = new Subjects(opts.subjectRoot);
    this.streamOpts = { ...opts, stream: this.stream };
    this.queueLimit = positiveIntOption('NatsBus', 'queueLimit', opts.queueLimit, 50_000);
    this.maxInFlight = positiveIntOption('NatsBus', 'maxInFlight', opts.maxInFlight, 256);
    this.publishTimeoutMs = positiveIntOption('NatsBus', 'publishTimeoutMs', opts.publishTimeoutMs, 5000);
    this.connectTimeoutMs = positiveIntOption('NatsBus', 'connectTimeoutMs', opts.connectTimeoutMs, 2000);
    this.retryMinMs = positiveIntOption('NatsBus', 'retryMinMs', opts.retryMinMs, 250);
    this.retryMaxMs = positiveIntOption('NatsBus', 'retryMaxMs', opts.retryMaxMs, 5000);
    this.closeTimeoutMs = positiveIntOption('NatsBus', 'closeTimeoutMs', opts.closeTimeoutMs, 5000);
    this.closeSignal = new Promise((resolve) => (this.signalClose = resolve));
  }

  /**
   * Wrap `local` (which this bus then owns and closes). Tries to connect once
   * (at most connectTimeoutMs): when that works, sequence numbers of runs that
   * JetStream already holds continue from there. When NATS is down the bus
   * starts degraded and keeps trying in the background; it never throws for
   * that. It throws for bad options and for a stream that cannot hold events.
   */
  static async create(local: MemoryBus, opts: NatsBusOptions): Promise<NatsBus> {
    const bus = new NatsBus(local, opts);
    try {
      await bus.connectOnce();
    } catch (err) {
      if (isConfigError(err)) {
        await local.close();
        throw err;
      }
      bus.enterDegraded(describeNatsError(err));
    }
    if (bus.conn) {
      try {
        await bus.seedFromStream(bus.conn);
      } catch (err) {
        log.warn({ err: describeNatsError(err) }, 'could not read the last sequence numbers from NATS; runs start from the local ones');
      }
    }
    bus.pumpDone = bus.pump();
    return bus;
  }

  // ---------------------------------------------------------------- EventBus

  publish(event: NewRunEvent): RunEvent {
    const full = this.publishInternal(event);
    // A run that starts (or speaks again) during an outage learns of it right after its event.
    if (this.degraded && !this.closing && !this.notified.has(full.runId) && !isTerminal(full)) this.notifyDegraded(full.runId);
    return full;
  }

  subscribe(opts: { runId?: string; afterSeq?: number }): EventSubscription {
    return this.local.subscribe(opts);
  }

  /** Local history; events the local bus no longer keeps are read back from JetStream when it is reachable. */
  async history(runId: string, afterSeq = 0): Promise<RunEvent[]> {
    const recent = await this.local.history(runId, afterSeq);
    const firstLocal = recent.length > 0 ? recent[0]!.seq : this.local.lastSeq(runId) + 1;
    if (firstLocal <= afterSeq + 1 || !this.conn) return recent;
    try {
      const older = await readRunHistory(this.conn.nc, this.conn.jsm, this.stream, this.subjects, runId, afterSeq, firstLocal);
      return older.concat(recent);
    } catch (err) {
      log.warn({ runId, err: describeNatsError(err) }, 'could not read older events from NATS');
      return recent;
    }
  }

  runs(): string[] {
    return this.local.runs();
  }

  status(): NatsBusStatus {
    return {
      connected: this.conn !== undefined,
      degraded: this.degraded,
      pending: this.pendingCount,
      published: this.publishedCount,
      dropped: this.droppedCount,
    };
  }

  /** Resolves true once every event published so far reached JetStream, false after timeoutMs. */
  flush(timeoutMs = 10_000): Promise<boolean> {
    if (this.pendingCount === 0) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.flushWaiters = this.flushWaiters.filter((w) => w !== done);
        resolve(false);
      }, timeoutMs);
      const done = (): void => {
        clearTimeout(timer);
        resolve(true);
      };
      this.flushWaiters.push(done);
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.closing = true;
    this.closeDeadline = Date.now() + this.closeTimeoutMs;
    this.signalClose();
    this.poke();
    await this.pumpDone;
    if (this.pendingCount > 0) {
      log.warn(
        { pending: this.pendingCount, runs: this.pendingRanges() },
        `closing with ${this.pendingCount} events not delivered to NATS (they remain in the local event history)`,
      );
    }
    this.logDropSummary();
    const conn = this.conn;
    this.conn = undefined;
    if (conn) await conn.nc.close().catch(() => undefined);
    await this.local.close();
  }

  // ------------------------------------------------------------ local side

  private publishInternal(event: NewRunEvent): RunEvent {
    const full = this.local.publish(event);
    if (isTerminal(full)) this.activeRuns.delete(full.runId);
    else this.activeRuns.add(full.runId);
    this.enqueue(full);
    return full;
  }

  private enqueue(event: RunEvent): void {
    if (this.closing) return;
    if (this.pendingCount >= this.queueLimit) this.dropOne();
    this.queue.push({ event, state: 'queued', sent: false, force: false });
    this.pendingCount++;
    this.poke();
  }

  /** Drop the oldest droppable queued event, else the oldest queued one; never one in flight. */
  private dropOne(): void {
    let victim: Entry | undefined;
    let i = Math.max(this.dropCursor, this.head);
    for (; i < this.queue.length; i++) {
      const e = this.queue[i]!;
      if (e.state === 'queued' && droppable(e.event)) {
        victim = e;
        break;
      }
    }
    this.dropCursor = i;
    if (!victim) {
      for (let j = this.head; j < this.queue.length; j++) {
        if (this.queue[j]!.state === 'queued') {
          victim = this.queue[j];
          break;
        }
      }
    }
    if (!victim) return; // everything is in flight: the queue is over its bound by at most maxInFlight
    victim.state = 'gone';
    this.pendingCount--;
    this.noteDropped(victim.event, 'queue full');
  }

  private noteDropped(e: RunEvent, why: string): void {
    this.droppedCount++;
    let d = this.dropped.get(e.runId);
    if (!d) {
      d = { count: 0, firstSeq: e.seq, lastSeq: e.seq, types: new Map() };
      this.dropped.set(e.runId, d);
      log.warn(
        { runId: e.runId, seq: e.seq, type: e.type, queueLimit: this.queueLimit, why },
        `NATS queue: dropping events of run ${e.runId} from the NATS copy (first: seq ${e.seq}, ${e.type}); a summary follows when NATS is back`,
      );
    }
    d.count++;
    d.firstSeq = Math.min(d.firstSeq, e.seq);
    d.lastSeq = Math.max(d.lastSeq, e.seq);
    d.types.set(e.type, (d.types.get(e.type) ?? 0) + 1);
  }

  /** Log what was dropped per run and put a warning into each run's history; then forget it. */
  private logDropSummary(): void {
    for (const [runId, d] of this.dropped) {
      const types = [...d.types].map(([t, n]) => `${t} x${n}`).join(', ');
      const message =
        `NATS event copy: ${d.count} events of seq ${d.firstSeq}..${d.lastSeq} are missing from it ` +
        `(queue limit ${this.queueLimit} reached while NATS was unavailable, or refused by JetStream): ${types}; ` +
        "the coordinator's own history still has them";
      log.warn({ runId, dropped: d.count, firstSeq: d.firstSeq, lastSeq: d.lastSeq, types }, message);
      if (!this.closing) this.publishInternal({ runId, type: 'log', level: 'warn', message });
    }
    this.dropped.clear();
  }

  private enterDegraded(reason: string): void {
    this.needResync = true;
    if (this.degraded) return;
    this.degraded = true;
    this.degradedReason = reason;
    log.warn(
      { servers: this.natsOpts.servers, reason, pending: this.pendingCount, queueLimit: this.queueLimit },
      `NATS bus degraded: ${reason}; buffering events (up to ${this.queueLimit}) and retrying`,
    );
    if (this.closing) return;
    for (const runId of this.activeRuns) this.notifyDegraded(runId);
  }

  private notifyDegraded(runId: string): void {
    this.notified.add(runId);
    this.publishInternal({
      runId,
      type: 'bus.degraded',
      backend: 'nats',
      message: `NATS unreachable (${this.degradedReason}); events are buffered and republished when it returns`,
      buffered: this.pendingCount,
    });
  }

  private leaveDegraded(alreadyStored: number): void {
    if (!this.degraded) return;
    this.degraded = false;
    const perRun = new Map<string, number>();
    for (let i = this.head; i < this.queue.length; i++) {
      const e = this.queue[i]!;
      if (e.state !== 'gone') perRun.set(e.event.runId, (perRun.get(e.event.runId) ?? 0) + 1);
    }
    log.info(
      { republishing: this.pendingCount, alreadyStored },
      `NATS bus restored: republishing ${this.pendingCount} buffered events in order`,
    );
    if (!this.closing) {
      for (const runId of this.notified) {
        this.publishInternal({ runId, type: 'bus.restored', backend: 'nats', republished: perRun.get(runId) ?? 0 });
      }
    }
    this.notified.clear();
    this.logDropSummary();
  }

  // -------------------------------------------------------- publisher side

  private poke(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  private waitForWork(): Promise<void> {
    return new Promise((resolve) => (this.wake = resolve));
  }

  /** Sleep for ms, cut short by the close deadline. */
  private async sleep(ms: number): Promise<void> {
    const wait = this.closing ? Math.min(ms, Math.max(0, this.closeDeadline - Date.now())) : ms;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      new Promise<void>((resolve) => (timer = setTimeout(resolve, wait))),
      this.closing ? new Promise<void>(() => undefined) : this.closeSignal,
    ]);
    clearTimeout(timer);
  }

  private async pump(): Promise<void> {
    let backoff = this.retryMinMs;
    const retry = async (reason: string): Promise<void> => {
      this.enterDegraded(reason);
      await this.sleep(backoff);
      backoff = Math.min(backoff * 2, this.retryMaxMs);
    };
    for (;;) {
      if (this.closing && (this.pendingCount === 0 || Date.now() >= this.closeDeadline)) return;
      if (!this.conn) {
        try {
          await this.connectOnce();
        } catch (err) {
          if (isConfigError(err)) log.error({ err: describeNatsError(err) }, 'NATS refuses this coordinator; fix the NATS options');
          await retry(describeNatsError(err));
          continue;
        }
      }
      const conn = this.conn!;
      if (this.needResync) {
        let stored: number;
        try {
          stored = await this.resync(conn);
        } catch (err) {
          await retry(describeNatsError(err));
          continue;
        }
        this.needResync = false;
        backoff = this.retryMinMs;
        this.leaveDegraded(stored);
      }
      const batch = this.takeBatch();
      if (batch.length === 0) {
        this.resolveFlushWaiters();
        if (this.closing) return;
        await this.waitForWork();
        continue;
      }
      const failure = await this.sendBatch(conn, batch);
      if (failure !== undefined) await retry(failure);
    }
  }

  private async connectOnce(): Promise<void> {
    const nc = await connect({
      ...this.natsOpts,
      name: 'fedtune-coordinator',
      reconnect: false,
      timeout: this.connectTimeoutMs,
      pingInterval: 5000,
      maxPingOut: 2,
    });
    try {
      const jsm = await nc.jetstreamManager({ timeout: this.publishTimeoutMs });
      await ensureStream(jsm, this.streamOpts);
      const conn: Conn = { nc, jsm, js: nc.jetstream({ timeout: this.publishTimeoutMs }) };
      this.conn = conn;
      void nc.closed().then((err) => {
        if (this.conn !== conn) return;
        this.conn = undefined;
        if (!this.closing) this.enterDegraded(err ? `connection lost: ${describeNatsError(err)}` : 'connection closed');
        this.poke();
      });
    } catch (err) {
      await nc.close().catch(() => undefined);
      throw err;
    }
  }

  /** First queued entries (up to maxInFlight), marked in flight. */
  private takeBatch(): Entry[] {
    const out: Entry[] = [];
    for (let i = this.head; i < this.queue.length && out.length < this.maxInFlight; i++) {
      const e = this.queue[i]!;
      if (e.state === 'queued') {
        e.state = 'inflight';
        out.push(e);
      }
    }
    return out;
  }

  /** Publish a batch concurrently; returns a reason when some event must be retried. */
  private async sendBatch(conn: Conn, batch: Entry[]): Promise<string | undefined> {
    const results = await Promise.allSettled(
      batch.map((e) => {
        e.sent = true;
        this.maxSent.set(e.event.runId, Math.max(this.maxSent.get(e.event.runId) ?? 0, e.event.seq));
        return conn.js.publish(this.subjects.event(e.event), encoder.encode(JSON.stringify(e.event)), {
          msgID: eventMsgId(e.event),
          timeout: this.publishTimeoutMs,
        });
      }),
    );
    let failure: string | undefined;
    const failedByRun = new Map<string, Entry[]>();
    results.forEach((r, i) => {
      const e = batch[i]!;
      if (r.status === 'fulfilled') {
        this.finish(e);
        this.publishedCount++;
        // An earlier event of this run failed although this one is stored: resend it whatever JetStream's last seq says.
        for (const f of failedByRun.get(e.event.runId) ?? []) f.force = true;
      } else if (isPermanentPublishError(r.reason)) {
        this.finish(e);
        log.error(
          { runId: e.event.runId, seq: e.event.seq, type: e.event.type, err: describeNatsError(r.reason) },
          'JetStream refused an event; it is left out of the NATS copy',
        );
        this.noteDropped(e.event, 'refused');
      } else {
        e.state = 'queued';
        const list = failedByRun.get(e.event.runId) ?? [];
        list.push(e);
        failedByRun.set(e.event.runId, list);
        failure ??= describeNatsError(r.reason);
      }
    });
    if (failure !== undefined) this.dropCursor = this.head;
    this.advanceHead();
    if (this.pendingCount === 0) this.resolveFlushWaiters();
    return failure;
  }

  private finish(e: Entry): void {
    e.state = 'gone';
    this.pendingCount--;
  }

  private advanceHead(): void {
    while (this.head < this.queue.length && this.queue[this.head]!.state === 'gone') this.head++;
    if (this.head > 4096 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.dropCursor = Math.max(0, this.dropCursor - this.head);
      this.head = 0;
    }
  }

  private resolveFlushWaiters(): void {
    if (this.pendingCount !== 0 || this.flushWaiters.length === 0) return;
    const ws = this.flushWaiters;
    this.flushWaiters = [];
    for (const w of ws) w();
  }

  /**
   * After an outage: make sure the stream is there, then for each run with
   * queued events ask JetStream for the last sequence it stored and skip
   * queued events that are already there. Returns how many were skipped.
   */
  private async resync(conn: Conn): Promise<number> {
    await ensureStream(conn.jsm, this.streamOpts);
    const firstQueued = new Map<string, number>();
    for (let i = this.head; i < this.queue.length; i++) {
      const e = this.queue[i]!;
      if (e.state === 'queued' && !firstQueued.has(e.event.runId)) firstQueued.set(e.event.runId, e.event.seq);
    }
    let skipped = 0;
    for (const [runId, first] of firstQueued) {
      const last = await lastStoredSeq(conn.jsm, this.stream, this.subjects.run(runId));
      const sent = this.maxSent.get(runId) ?? 0;
      // JetStream holds more of this run than this process ever sent: an earlier process numbered them.
      const conflict = last > sent;
      if (conflict && last >= first && !this.conflictLogged.has(runId)) {
        this.conflictLogged.add(runId);
        log.error(
          { runId, storedUpTo: last, localFrom: first },
          `run ${runId}: the NATS stream already holds seq up to ${last} from an earlier process, but this coordinator ` +
            `numbered its events from ${first}; NATS consumers will see both. Give the coordinator the run's event log ` +
            '(MemoryBus logDir) or reach NATS at start so sequence numbers continue',
        );
      }
      for (let i = this.head; i < this.queue.length; i++) {
        const e = this.queue[i]!;
        if (conflict || e.event.runId !== runId || e.state !== 'queued' || !e.sent || e.force) continue;
        if (e.event.seq <= last) {
          this.finish(e);
          this.publishedCount++;
          skipped++;
        }
      }
    }
    this.advanceHead();
    return skipped;
  }

  /** On startup: continue each run's sequence numbers from what JetStream holds. */
  private async seedFromStream(conn: Conn): Promise<void> {
    const info = await conn.jsm.streams.info(this.stream, { subjects_filter: this.subjects.allRuns });
    const runIds = new Set<string>();
    for (const subject of Object.keys(info.state.subjects ?? {})) {
      const runId = this.subjects.runIdOf(subject);
      if (runId !== undefined) runIds.add(runId);
    }
    const ids = [...runIds];
    for (let i = 0; i < ids.length; i += 32) {
      const chunk = ids.slice(i, i + 32);
      const lasts = await Promise.all(chunk.map((r) => lastStoredSeq(conn.jsm, this.stream, this.subjects.run(r))));
      chunk.forEach((runId, k) => {
        const stored = lasts[k]!;
        const localSeq = this.local.lastSeq(runId);
        if (stored <= localSeq) return;
        if (localSeq === 0) {
          this.local.seedSeq(runId, stored);
          this.maxSent.set(runId, stored);
        } else {
          log.warn(
            { runId, storedUpTo: stored, localUpTo: localSeq },
            `run ${runId}: NATS holds events up to seq ${stored} but the local bus is at ${localSeq}; ` +
              'if this run is resumed its NATS history will repeat sequence numbers',
          );
        }
      });
    }
  }

  private pendingRanges(): Record<string, string> {
    const r: Record<string, [number, number]> = {};
    for (let i = this.head; i < this.queue.length; i++) {
      const e = this.queue[i]!;
      if (e.state === 'gone') continue;
      const cur = r[e.event.runId];
      r[e.event.runId] = cur ? [Math.min(cur[0], e.event.seq), Math.max(cur[1], e.event.seq)] : [e.event.seq, e.event.seq];
    }
    return Object.fromEntries(Object.entries(r).map(([k, [a, b]]) => [k, `${a}..${b}`]));
  }
}

/** Last run sequence number stored in the stream under runFilter (a run's subject filter; 0 when none). */
export async function lastStoredSeq(jsm: JetStreamManager, stream: string, runFilter: string): Promise<number> {
  try {
    const m = await retrying(() => directGet(jsm).getMessage(stream, { last_by_subj: runFilter }));
    const e = JSON.parse(new TextDecoder().decode(m.data)) as Partial<RunEvent>;
    return typeof e.seq === 'number' ? e.seq : 0;
  } catch (err) {
    if (isNotFound(err)) return 0;
    throw err;
  }
}

/** Problems that retrying does not fix: wrong credentials, no permission, a stream that cannot hold our subjects. */
function isConfigError(err: unknown): boolean {
  if (err instanceof NatsError) return err.isAuthError() || err.isPermissionError();
  return err instanceof Error && /^NATS stream .* (exists but captures|cannot create)/.test(err.message);
}

/** JetStream refused this one event (too large, malformed); resending it will not help. */
function isPermanentPublishError(err: unknown): boolean {
  if (!(err instanceof NatsError)) return false;
  if (err.code === 'MAX_PAYLOAD_EXCEEDED') return true;
  return err.api_error !== undefined && err.api_error.code === 400;
}
