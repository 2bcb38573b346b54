/**
 * In-process event bus (the default): per-run sequence numbers, a bounded ring
 * of recent events per run, an optional append-only JSONL event log that lets
 * history survive a coordinator restart, and subscriptions as async iterators
 * with a bounded queue each.
 *
 *   const bus = new MemoryBus({ logDir: runDir });
 *   bus.publish({ runId, type: 'log', level: 'info', message: 'hi' });
 *   for await (const e of bus.subscribe({ runId, afterSeq: 0 })) ...
 *
 * A subscriber that falls more than `subscriberQueue` events behind is cut off:
 * its iterator first yields every event it had queued (so nothing it already
 * got is lost) and then throws SlowSubscriberError, which says the last
 * sequence number delivered per run. The consumer resubscribes from there (the
 * WebSocket layer turns this into a `resync` message). publish() never waits
 * on a subscriber or on the disk.
 */
import { appendFileSync, closeSync, createReadStream, existsSync, openSync, readFileSync, truncateSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { isRunEvent, RUN_EVENT_TYPES, type NewRunEvent, type RunEvent } from '../../common/events.ts';
import { logger } from '../../common/log.ts';
import type { EventBus, EventSubscription } from './bus.ts';
import { positiveIntOption } from '../../common/options.ts';
import { asWriteError, fsReason, mkdirpSync } from '../../common/fs-errors.ts';

const log = logger('events.memory');

export const EVENT_LOG_FILE = 'events.jsonl';

export interface MemoryBusOptions {
  /** Events kept in memory per run (default 10000). Older ones are read back from the log when there is one. */
  ringSize?: number;
  /**
   * Directory of the append-only event log `<logDir>/events.jsonl` (one event a
   * line, every run published to this bus). An existing log is reloaded on
   * construction and its sequences continue. Without it history is memory only.
   */
  logDir?: string;
  /** Events a subscriber may have queued before it is cut off with SlowSubscriberError (default 10000). */
  subscriberQueue?: number;
}

/** Thrown by a subscription's iterator when its consumer fell too far behind. */
export class SlowSubscriberError extends Error {
  /** Last sequence number delivered to this subscriber, per run (its afterSeq when none was). Resume with afterSeq = this. */
  readonly lastSeq: ReadonlyMap<string, number>;
  constructor(lastSeq: Map<string, number>, limit: number) {
    const where = [...lastSeq].map(([r, s]) => `${r}@${s}`).join(', ') || 'no events yet';
    super(`subscriber fell more than ${limit} events behind and was cut off; resubscribe after ${where}`);
    this.name = 'SlowSubscriberError';
    this.lastSeq = lastSeq;
  }
}

/** Fixed-capacity ring of consecutive events of one run. */
class Ring {
  private readonly buf: (RunEvent | undefined)[];
  private start = 0;
  private count = 0;
  constructor(readonly capacity: number) {
    this.buf = new Array<RunEvent | undefined>(capacity);
  }
  push(e: RunEvent): void {
    if (this.count < this.capacity) {
      this.buf[(this.start + this.count) % this.capacity] = e;
      this.count++;
    } else {
      this.buf[this.start] = e;
      this.start = (this.start + 1) % this.capacity;
    }
  }
  /** Sequence number of the oldest event held (undefined when empty). */
  firstSeq(): number | undefined {
    return this.count === 0 ? undefined : this.buf[this.start]!.seq;
  }
  /** Events with seq > afterSeq, oldest first. */
  after(afterSeq: number): RunEvent[] {
    const first = this.firstSeq();
    if (first === undefined) return [];
    const skip = Math.max(0, Math.min(this.count, afterSeq - first + 1));
    const out: RunEvent[] = [];
    for (let i = skip; i < this.count; i++) out.push(this.buf[(this.start + i) % this.capacity]!);
    return out;
  }
}

interface RunState {
  lastSeq: number;
  ring: Ring;
}


export class MemoryBus implements EventBus {
  private readonly runsById = new Map<string, RunState>();
  private readonly subs = new Set<MemorySubscription>();
  private readonly ringSize: number;
  readonly subscriberQueue: number;
  private readonly logPath: string | undefined;
  /** Event log file descriptor, written synchronously: an event is in the OS's hands before publish returns, so a killed coordinator loses none. */
  private fd: number | undefined;
  private writeError: Error | undefined;
  private closed = false;

  constructor(opts: MemoryBusOptions = {}) {
    this.ringSize = positiveIntOption('MemoryBus', 'ringSize', opts.ringSize, 10_000);
    this.subscriberQueue = positiveIntOption('MemoryBus', 'subscriberQueue', opts.subscriberQueue, 10_000);
    if (opts.logDir !== undefined) {
      mkdirpSync(opts.logDir);
      this.logPath = join(opts.logDir, EVENT_LOG_FILE);
      if (existsSync(this.logPath)) this.reload(this.logPath);
      try {
        this.fd = openSync(this.logPath, 'a');
      } catch (err) {
        throw asWriteError(this.logPath, err, 'open the event log');
      }
    }
  }

  /** Rebuild the rings and sequence numbers from an existing event log. */
  private reload(file: string): void {
    const text = readFileSync(file, 'utf8');
    const lines = text.split('\n');
    // text ends with '\n' for a clean log, so the last element is ''.
    const tail = lines.pop() ?? '';
    let goodBytes = Buffer.byteLength(text, 'utf8') - Buffer.byteLength(tail, 'utf8');
    const accept = (e: RunEvent, lineNo: number): void => {
      const run = this.runState(e.runId);
      if (e.seq !== run.lastSeq + 1) {
        throw new Error(
          `${file}:${lineNo}: run ${e.runId} has seq ${e.seq} after ${run.lastSeq} (expected ${run.lastSeq + 1}); ` +
            'the event log is not a log this bus wrote; move it aside to start a fresh history',
        );
      }
      run.lastSeq = e.seq;
      run.ring.push(e);
    };
    lines.forEach((line, i) => {
      if (line.trim() === '') return;
      let parsed: unknown;
      try {
        parsed = JSON.parse(line);
      } catch (err) {
        throw new Error(
          `${file}:${i + 1}: not valid JSON (${(err as Error).message}); ` +
            'only a torn last line is skipped; fix or move the file aside to start a fresh history',
        );
      }
      if (!isRunEvent(parsed)) {
        throw new Error(
          `${file}:${i + 1}: not a run event (needs string runId, numeric seq and time, and type one of ${RUN_EVENT_TYPES.join(', ')})`,
        );
      }
      accept(parsed, i + 1);
    });
    if (tail.trim() !== '') {
      // The last line has no newline: the process died while writing it.
      let parsed: unknown;
      try {
        parsed = JSON.parse(tail);
      } catch {
        parsed = undefined;
      }
      const lineNo = lines.length + 1;
      if (isRunEvent(parsed) && parsed.seq === (this.runsById.get(parsed.runId)?.lastSeq ?? 0) + 1) {
        accept(parsed, lineNo);
        goodBytes += Buffer.byteLength(tail, 'utf8');
        // Complete the line so the next append starts on a line of its own.
        truncateSync(file, goodBytes);
        appendFileSync(file, '\n');
      } else {
        log.warn({ file, line: lineNo, bytes: Buffer.byteLength(tail, 'utf8') }, 'event log: skipping torn last line');
        truncateSync(file, goodBytes);
      }
    }
  }

  private runState(runId: string): RunState {
    let run = this.runsById.get(runId);
    if (!run) {
      run = { lastSeq: 0, ring: new Ring(this.ringSize) };
      this.runsById.set(runId, run);
    }
    return run;
  }

  publish(event: NewRunEvent): RunEvent {
    if (this.closed) throw new Error('MemoryBus.publish: the bus is closed');
    if (typeof event.runId !== 'string' || event.runId === '') {
      throw new Error(`MemoryBus.publish: runId must be a non-empty string, got ${JSON.stringify(event.runId)}`);
    }
    if (!(RUN_EVENT_TYPES as readonly string[]).includes(event.type)) {
      throw new Error(`MemoryBus.publish: unknown event type ${JSON.stringify(event.type)}; allowed: ${RUN_EVENT_TYPES.join(', ')}`);
    }
    const run = this.runState(event.runId);
    const full = { ...event, seq: run.lastSeq + 1, time: Date.now() } as RunEvent;
    run.lastSeq = full.seq;
    run.ring.push(full);
    if (this.fd !== undefined && !this.writeError) {
      try {
        writeSync(this.fd, JSON.stringify(full) + '\n');
      } catch (err) {
        // Keep the run going: the dashboard history is not worth failing a run for.
        this.writeError = err as Error;
        log.error({ err, file: this.logPath }, `event log ${this.logPath}: cannot append (${fsReason(err)}); events are kept in memory only from now on`);
      }
    }
    for (const s of this.subs) s.offer(full);
    return full;
  }

  /** Resolves once every event published so far is in the event log: at once, since writes are synchronous. */
  flush(): Promise<void> {
    return Promise.resolve();
  }

  /**
   * Continue a run's sequence after `lastSeq` (e.g. what JetStream already holds
   * for a resumed run without a local log). Only for runs this bus has not seen.
   */
  seedSeq(runId: string, lastSeq: number): void {
    if (!Number.isInteger(lastSeq) || lastSeq < 0) throw new Error(`MemoryBus.seedSeq: lastSeq must be an integer >= 0, got ${lastSeq}`);
    if (this.runsById.has(runId)) return;
    this.runState(runId).lastSeq = lastSeq;
  }

  /** Last sequence number of a run (0 for a run this bus has not seen). */
  lastSeq(runId: string): number {
    return this.runsById.get(runId)?.lastSeq ?? 0;
  }

  subscribe(opts: { runId?: string; afterSeq?: number } = {}): EventSubscription {
    const afterSeq = opts.afterSeq ?? 0;
    if (!Number.isInteger(afterSeq) || afterSeq < 0) {
      throw new Error(`MemoryBus.subscribe: afterSeq must be an integer >= 0, got ${String(opts.afterSeq)}`);
    }
    const sub = new MemorySubscription(this, opts.runId, afterSeq, this.subscriberQueue);
    if (this.closed) {
      sub.close();
      return sub;
    }
    // Register first so no live event is missed; the history snapshot below is
    // taken synchronously and the subscription drops anything it saw twice.
    this.subs.add(sub);
    const runIds = opts.runId === undefined ? this.runs() : [opts.runId];
    sub.backfill(Promise.all(runIds.map((r) => this.history(r, afterSeq))).then((hs) => hs.flat()));
    return sub;
  }

  /** @internal */
  unsubscribe(sub: MemorySubscription): void {
    this.subs.delete(sub);
  }

  history(runId: string, afterSeq = 0): Promise<RunEvent[]> {
    const run = this.runsById.get(runId);
    if (!run) return Promise.resolve([]);
    // Snapshot the ring now (synchronously); older events come from the log.
    const recent = run.ring.after(afterSeq);
    const first = run.ring.firstSeq() ?? run.lastSeq + 1;
    if (afterSeq + 1 >= first || !this.logPath) return Promise.resolve(recent);
    return this.readLog(runId, afterSeq, first).then((older) => older.concat(recent));
  }

  /** Events of runId with afterSeq < seq < beforeSeq, read from the event log. */
  private async readLog(runId: string, afterSeq: number, beforeSeq: number): Promise<RunEvent[]> {
    await this.flush();
    const out: RunEvent[] = [];
    const rl = createInterface({ input: createReadStream(this.logPath!, 'utf8'), crlfDelay: Infinity });
    for await (const line of rl) {
      if (line === '') continue;
      // Cheap prefilter before parsing every line of a long log.
      if (!line.includes(JSON.stringify(runId))) continue;
      let e: unknown;
      try {
        e = JSON.parse(line);
      } catch {
        continue; // a line being written right now
      }
      if (isRunEvent(e) && e.runId === runId && e.seq > afterSeq && e.seq < beforeSeq) out.push(e);
    }
    return out;
  }

  runs(): string[] {
    return [...this.runsById.keys()];
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const s of [...this.subs]) s.close();
    this.subs.clear();
    if (this.fd !== undefined) {
      closeSync(this.fd);
      this.fd = undefined;
    }
  }
}

/** One subscriber: history first, then live events, through a bounded queue. */
class MemorySubscription implements EventSubscription {
  private queue: RunEvent[] = [];
  private head = 0;
  private history: Promise<RunEvent[]> = Promise.resolve([]);
  private readonly delivered = new Map<string, number>();
  private wake: (() => void) | undefined;
  private closed = false;
  private overflowed = false;
  private iterated = false;

  constructor(
    private readonly bus: MemoryBus,
    private readonly runId: string | undefined,
    /** Events with seq <= afterSeq are not delivered (history or live). */
    private readonly afterSeq: number,
    private readonly limit: number,
  ) {}

  backfill(p: Promise<RunEvent[]>): void {
    this.history = p;
  }

  /** Called by the bus on publish; never blocks. */
  offer(e: RunEvent): void {
    if (this.closed || this.overflowed) return;
    if (this.runId !== undefined && e.runId !== this.runId) return;
    if (this.queue.length - this.head >= this.limit) {
      this.overflowed = true;
      this.bus.unsubscribe(this);
    } else {
      this.queue.push(e);
    }
    this.signal();
  }

  private signal(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  private take(): RunEvent | undefined {
    if (this.head >= this.queue.length) return undefined;
    const e = this.queue[this.head++]!;
    if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
    return e;
  }

  /** True when e is the next event of its run for this subscriber (drops duplicates of history). */
  private fresh(e: RunEvent): boolean {
    const last = this.delivered.get(e.runId) ?? this.afterSeq;
    if (e.seq <= last) return false;
    this.delivered.set(e.runId, e.seq);
    return true;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.bus.unsubscribe(this);
    this.queue = [];
    this.head = 0;
    this.signal();
  }

  [Symbol.asyncIterator](): AsyncIterator<RunEvent> {
    if (this.iterated) throw new Error('EventSubscription can be iterated only once');
    this.iterated = true;
    return this.iterate();
  }

  private async *iterate(): AsyncGenerator<RunEvent> {
    try {
      const hist = await this.history;
      for (const e of hist) {
        if (this.closed) return;
        if (this.fresh(e)) yield e;
      }
      for (;;) {
        let e: RunEvent | undefined;
        while ((e = this.take()) !== undefined) {
          if (this.closed) return;
          if (this.fresh(e)) yield e;
        }
        if (this.closed) return;
        if (this.overflowed) {
          const lastSeq = new Map(this.delivered);
          if (this.runId !== undefined && !lastSeq.has(this.runId)) lastSeq.set(this.runId, this.afterSeq);
          throw new SlowSubscriberError(lastSeq, this.limit);
        }
        await new Promise<void>((resolve) => (this.wake = resolve));
      }
    } finally {
      this.close();
    }
  }
}
