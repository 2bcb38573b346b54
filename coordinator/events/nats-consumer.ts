/**
 * Read-only event bus over NATS JetStream, for dashboards and other consumers
 * that are not the coordinator (`fedtune dashboard --nats ...`). It sees every
 * run on the stream, whoever published it; any number can run at once.
 *
 *   const bus = await NatsConsumerBus.create({ connection: { servers: 'nats://10.0.0.5:4222' } });
 *   for await (const e of bus.subscribe({ runId: 'demo', afterSeq: 120 })) ...
 *
 * subscribe() reads with an ordered JetStream consumer filtered on the run's
 * subject, starting at the stream position found by binary search for
 * afterSeq, then follows live events; it survives NATS restarts (the client
 * reconnects and the ordered consumer resumes after the last stream position
 * it saw). Per run it delivers each sequence number once and in order: an
 * event that arrives ahead of a missing one waits up to gapTimeoutMs for it
 * (an outage retry can store a few events out of order), then the gap is
 * skipped. A subscription reads only as fast as its consumer iterates
 * (bounded buffer, the rest stays in JetStream), so it is never cut off.
 */
import { connect, DeliverPolicy, type ConsumerMessages, type JetStreamManager, type NatsConnection, type Subscription } from 'nats';
import type { NewRunEvent, RunEvent } from '../../common/events.ts';
import { logger } from '../../common/log.ts';
import { redactUrl } from '../../common/redact.ts';
import type { EventBus, EventSubscription } from './bus.ts';
import {
  DEFAULT_STREAM,
  describeNatsError,
  ensureStream,
  retrying,
  Subjects,
  toConnectionOptions,
  validateStreamName,
  type NatsConnectOptions,
} from './nats-common.ts';
import { findStartSeq, parseEvent, readRunHistory } from './nats-read.ts';
import { positiveIntOption } from '../../common/options.ts';

const log = logger('events.nats-consumer');

export interface NatsConsumerBusOptions {
  connection: NatsConnectOptions;
  /** Stream name (default FEDTUNE_EVENTS); created without limits when missing. */
  stream?: string;
  /** Subject root the coordinators publish under (default fedtune). */
  subjectRoot?: string;
  /** How long the first connection may take before create() fails (default 5000 ms). */
  connectTimeoutMs?: number;
  /** How long an event that arrived ahead of a missing sequence number waits for it (default 500 ms). */
  gapTimeoutMs?: number;
  /** Events a subscription buffers ahead of its reader (default 1024). */
  bufferSize?: number;
}


interface Shared {
  nc: NatsConnection;
  jsm: JetStreamManager;
  stream: string;
  subjects: Subjects;
  gapTimeoutMs: number;
  bufferSize: number;
}

export class NatsConsumerBus implements EventBus {
  private readonly runIds = new Set<string>();
  private readonly subs = new Set<NatsSubscription>();
  private discovery: Subscription | undefined;
  private closed = false;

  private constructor(private readonly shared: Shared) {}

  /** Connect (throws a clear error when NATS cannot be reached), prepare the stream, learn the runs it holds. */
  static async create(opts: NatsConsumerBusOptions): Promise<NatsConsumerBus> {
    const natsOpts = toConnectionOptions('NatsConsumerBus', opts.connection);
    const stream = opts.stream ?? DEFAULT_STREAM;
    validateStreamName('NatsConsumerBus', stream);
    const subjects = new Subjects(opts.subjectRoot);
    const gapTimeoutMs = positiveIntOption('NatsConsumerBus', 'gapTimeoutMs', opts.gapTimeoutMs, 500);
    const bufferSize = positiveIntOption('NatsConsumerBus', 'bufferSize', opts.bufferSize, 1024);
    const connectTimeoutMs = positiveIntOption('NatsConsumerBus', 'connectTimeoutMs', opts.connectTimeoutMs, 5000);
    let nc: NatsConnection;
    try {
      nc = await connect({
        ...natsOpts,
        name: 'fedtune-dashboard',
        timeout: connectTimeoutMs,
        reconnect: true,
        maxReconnectAttempts: -1,
        reconnectTimeWait: 500,
        pingInterval: 10_000,
      });
    } catch (err) {
      throw new Error(`cannot connect to NATS at ${redactUrl(opts.connection.servers)}: ${describeNatsError(err)}`);
    }
    try {
      const jsm = await nc.jetstreamManager({ timeout: 2000 });
      await ensureStream(jsm, { stream, subjectRoot: subjects.root });
      const bus = new NatsConsumerBus({ nc, jsm, stream, subjects, gapTimeoutMs, bufferSize });
      // Live discovery first, then what the stream already holds: no run is missed in between.
      bus.discovery = nc.subscribe(subjects.allRuns, {
        callback: (err, msg) => {
          if (err) return;
          const runId = subjects.runIdOf(msg.subject);
          if (runId !== undefined) bus.runIds.add(runId);
        },
      });
      const info = await jsm.streams.info(stream, { subjects_filter: subjects.allRuns });
      for (const subject of Object.keys(info.state.subjects ?? {})) {
        const runId = subjects.runIdOf(subject);
        if (runId !== undefined) bus.runIds.add(runId);
      }
      void (async () => {
        for await (const s of nc.status()) {
          if (s.type === 'disconnect' || s.type === 'reconnect') log.info({ status: s.type, server: s.data }, `NATS ${s.type}`);
        }
      })().catch(() => undefined);
      return bus;
    } catch (err) {
      await nc.close().catch(() => undefined);
      throw new Error(`NATS at ${redactUrl(opts.connection.servers)}: ${describeNatsError(err)}`);
    }
  }

  /** This bus only reads; events come from the coordinators that publish to NATS. */
  publish(event: NewRunEvent): RunEvent {
    throw new Error(
      `NatsConsumerBus is read-only: it cannot publish ${event.type} for run ${event.runId}; ` +
        'publish through the coordinator\'s bus (createEventBus with nats options)',
    );
  }

  subscribe(opts: { runId?: string; afterSeq?: number } = {}): EventSubscription {
    const afterSeq = opts.afterSeq ?? 0;
    if (!Number.isInteger(afterSeq) || afterSeq < 0) {
      throw new Error(`NatsConsumerBus.subscribe: afterSeq must be an integer >= 0, got ${String(opts.afterSeq)}`);
    }
    const sub = new NatsSubscription(this.shared, opts.runId, afterSeq, () => this.subs.delete(sub));
    if (this.closed) {
      sub.close();
      return sub;
    }
    this.subs.add(sub);
    sub.start();
    return sub;
  }

  history(runId: string, afterSeq = 0): Promise<RunEvent[]> {
    const { nc, jsm, stream, subjects } = this.shared;
    return readRunHistory(nc, jsm, stream, subjects, runId, afterSeq);
  }

  runs(): string[] {
    return [...this.runIds];
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const s of [...this.subs]) s.close();
    this.subs.clear();
    this.discovery?.unsubscribe();
    await this.shared.nc.drain().catch(() => undefined);
  }
}

/** Per-run ordering state of one subscription. */
interface RunOrder {
  /** Next sequence number to deliver (undefined until the first event of the run). */
  expected: number | undefined;
  held: Map<number, RunEvent>;
  timer: NodeJS.Timeout | undefined;
}

class NatsSubscription implements EventSubscription {
  private out: RunEvent[] = [];
  private head = 0;
  private readonly order = new Map<string, RunOrder>();
  private messages: ConsumerMessages | undefined;
  private wake: (() => void) | undefined;
  private space: (() => void) | undefined;
  private error: Error | undefined;
  private ended = false;
  private closed = false;
  private iterated = false;

  constructor(
    private readonly shared: Shared,
    private readonly runId: string | undefined,
    private readonly afterSeq: number,
    private readonly onClose: () => void,
  ) {}

  start(): void {
    void this.read()
      .catch((err: unknown) => {
        if (!this.closed) {
          this.error = err instanceof Error ? err : new Error(String(err));
          log.warn({ runId: this.runId, err: describeNatsError(err) }, 'NATS subscription ended');
        }
      })
      .finally(() => {
        this.ended = true;
        this.signal();
      });
  }

  private async read(): Promise<void> {
    const { nc, jsm, stream, subjects } = this.shared;
    const filter = this.runId === undefined ? subjects.allRuns : subjects.run(this.runId);
    let startSeq: number | undefined;
    if (this.runId !== undefined && this.afterSeq > 0) {
      startSeq = await findStartSeq(jsm, stream, subjects, this.runId, this.afterSeq);
      // Nothing stored after afterSeq yet: follow from the end of the stream.
      startSeq ??= (await retrying(() => jsm.streams.info(stream))).state.last_seq + 1;
    }
    if (this.closed) return;
    const consumer = await retrying(() =>
      nc.jetstream().consumers.get(stream, {
        filterSubjects: filter,
        // Without a start the ordered consumer starts at stream position 1, i.e. everything.
        // (DeliverPolicy.All must not be given: the client adds a start sequence and the server refuses both.)
        ...(startSeq !== undefined ? { deliver_policy: DeliverPolicy.StartSequence, opt_start_seq: startSeq } : {}),
      }),
    );
    if (this.closed) return;
    const messages = await consumer.consume({ max_messages: 256 });
    this.messages = messages;
    if (this.closed) {
      messages.stop();
      return;
    }
    for await (const m of messages) {
      if (this.closed) break;
      const e = parseEvent(m.data);
      if (e === undefined) {
        log.debug({ subject: m.subject, streamSeq: m.seq }, 'skipping a message that is not a run event');
        continue;
      }
      if ((this.runId !== undefined && e.runId !== this.runId) || e.seq <= this.afterSeq) continue;
      this.offer(e);
      while (!this.closed && this.out.length - this.head >= this.shared.bufferSize) {
        await new Promise<void>((resolve) => (this.space = resolve));
      }
    }
  }

  /** Deliver e in order of its run, holding it while an earlier sequence number is missing. */
  private offer(e: RunEvent): void {
    let o = this.order.get(e.runId);
    if (!o) {
      o = { expected: undefined, held: new Map(), timer: undefined };
      this.order.set(e.runId, o);
    }
    if (o.expected === undefined || e.seq === o.expected) {
      this.emit(e);
      o.expected = e.seq + 1;
      this.drainHeld(o);
    } else if (e.seq > o.expected) {
      o.held.set(e.seq, e);
      if (o.held.size > this.shared.bufferSize) this.skipGap(o);
      else o.timer ??= setTimeout(() => this.skipGap(o), this.shared.gapTimeoutMs);
    }
    // e.seq < expected: delivered already (a republished duplicate) or given up on.
  }

  private drainHeld(o: RunOrder): void {
    let next: RunEvent | undefined;
    while (o.expected !== undefined && (next = o.held.get(o.expected)) !== undefined) {
      o.held.delete(o.expected);
      this.emit(next);
      o.expected++;
    }
    if (o.held.size === 0 && o.timer) {
      clearTimeout(o.timer);
      o.timer = undefined;
    }
  }

  /** The missing sequence numbers did not come: continue from the lowest held one. */
  private skipGap(o: RunOrder): void {
    if (o.timer) clearTimeout(o.timer);
    o.timer = undefined;
    if (this.closed || o.held.size === 0) return;
    const lowest = Math.min(...o.held.keys());
    log.debug({ runId: this.runId, missing: `${o.expected}..${lowest - 1}` }, 'skipping missing sequence numbers');
    o.expected = lowest;
    this.drainHeld(o);
    if (o.held.size > 0) o.timer = setTimeout(() => this.skipGap(o), this.shared.gapTimeoutMs);
    this.signal();
  }

  private emit(e: RunEvent): void {
    this.out.push(e);
    this.signal();
  }

  private signal(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  private take(): RunEvent | undefined {
    if (this.head >= this.out.length) return undefined;
    const e = this.out[this.head++]!;
    if (this.head > 1024 && this.head * 2 > this.out.length) {
      this.out = this.out.slice(this.head);
      this.head = 0;
    }
    if (this.space && this.out.length - this.head < this.shared.bufferSize / 2) {
      const s = this.space;
      this.space = undefined;
      s();
    }
    return e;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.messages?.stop();
    for (const o of this.order.values()) if (o.timer) clearTimeout(o.timer);
    this.out = [];
    this.head = 0;
    this.onClose();
    this.signal();
    const s = this.space;
    this.space = undefined;
    s?.();
  }

  [Symbol.asyncIterator](): AsyncIterator<RunEvent> {
    if (this.iterated) throw new Error('EventSubscription can be iterated only once');
    this.iterated = true;
    return this.iterate();
  }

  private async *iterate(): AsyncGenerator<RunEvent> {
    try {
      for (;;) {
        let e: RunEvent | undefined;
        while ((e = this.take()) !== undefined) {
          if (this.closed) return;
          yield e;
        }
        if (this.closed) return;
        if (this.error) throw this.error;
        if (this.ended) return;
        await new Promise<void>((resolve) => (this.wake = resolve));
      }
    } finally {
      this.close();
    }
  }
}
