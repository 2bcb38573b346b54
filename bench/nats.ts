/**
 * NATS event bus bench: events per second from the coordinator's NatsBus
 * through JetStream to 1 and 5 NatsConsumerBus subscribers, and the latency
 * a consumer sees (publish() -> event received) at p50 and p99.
 *
 * Baseline, measured in the same run: the in-process MemoryBus with the same
 * number of subscribers. Throughput is "all N events received by every
 * consumer" / elapsed; latency is measured at a steady rate of about 1000
 * events/s so that it is not queueing delay. Consumers run in this process
 * (one NATS connection each), as a dashboard on another machine would.
 *
 *   npm run bench:nats                       (about 15 s; needs nats-server -js at 127.0.0.1:4222)
 *   npm run bench:nats -- --quick --nats nats://HOST:PORT
 */
process.env.FEDTUNE_LOG_LEVEL ??= 'warn';

const { connect } = await import('nats');
const { MemoryBus } = await import('../coordinator/events/memory.ts');
const { NatsBus } = await import('../coordinator/events/nats.ts');
const { NatsConsumerBus } = await import('../coordinator/events/nats-consumer.ts');
type EventBus = import('../coordinator/events/bus.ts').EventBus;
type NewRunEvent = import('../common/events.ts').NewRunEvent;

const args = process.argv.slice(2);
const quick = args.includes('--quick');
const natsArg = args.indexOf('--nats');
const servers = natsArg >= 0 ? args[natsArg + 1]! : (process.env.FEDTUNE_NATS_URL ?? 'nats://127.0.0.1:4222');
const N = quick ? 5000 : 20_000;
const LATENCY_SAMPLES = quick ? 300 : 1500;
const RUN = 'bench';
const stream = `FT_BENCH_${process.pid}`;
const subjectRoot = `fedtune_bench_${process.pid}`;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function progress(i: number): NewRunEvent {
  return {
    runId: RUN, type: 'worker.progress', workerId: `w${i % 8}-hospital-${i % 8}`, site: `hospital-${i % 8}`, round: 3,
    taskId: 'task-3-7', step: i % 50, totalSteps: 50, loss: 2.5 - (i % 50) * 0.01, tokensPerSec: 1234.5, examples: 17 * (i % 50),
  };
}

interface Side {
  publisher: EventBus;
  /** Buses the subscribers read from (one per consumer for NATS; the same MemoryBus for the baseline). */
  readers: EventBus[];
  close(): Promise<void>;
}

async function natsSide(consumers: number, tag: string): Promise<Side> {
  const publisher = await NatsBus.create(new MemoryBus({ ringSize: 1000 }), {
    connection: { servers },
    stream: `${stream}_${tag}`,
    subjectRoot: `${subjectRoot}_${tag}`,
    queueLimit: N * 2,
  });
  if (!publisher.status().connected) throw new Error(`cannot reach NATS at ${servers}; start nats-server -js or pass --nats URL`);
  const readers: EventBus[] = [];
  for (let i = 0; i < consumers; i++) {
    readers.push(await NatsConsumerBus.create({ connection: { servers }, stream: `${stream}_${tag}`, subjectRoot: `${subjectRoot}_${tag}`, bufferSize: 4096 }));
  }
  return {
    publisher,
    readers,
    close: async () => {
      for (const r of readers) await r.close();
      await publisher.close();
      const nc = await connect({ servers });
      await (await nc.jetstreamManager()).streams.delete(`${stream}_${tag}`).catch(() => undefined);
      await nc.close();
    },
  };
}

function memorySide(consumers: number): Side {
  const bus = new MemoryBus({ ringSize: 1000, subscriberQueue: N * 2 });
  return { publisher: bus, readers: Array.from({ length: consumers }, () => bus), close: () => bus.close() };
}

/** Subscribe every reader; resolves per reader when it has seen seq `until()` (checked as events come). */
function follow(side: Side, onEvent?: (seq: number) => void): { seen: number[]; stop(): void } {
  const seen = side.readers.map(() => 0);
  const subs = side.readers.map((r, i) => {
    const sub = r.subscribe({ runId: RUN });
    void (async () => {
      for await (const e of sub) {
        seen[i] = e.seq;
        if (i === 0) onEvent?.(e.seq);
      }
    })().catch(() => undefined);
    return sub;
  });
  return { seen, stop: () => subs.forEach((s) => s.close()) };
}

async function waitAll(seen: number[], seq: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (seen.some((s) => s < seq)) {
    if (Date.now() > deadline) throw new Error(`consumers stuck at ${seen.join(', ')} of ${seq}`);
    await new Promise((r) => setImmediate(r));
  }
}

/** Events per second until every consumer has all N. */
async function throughput(side: Side): Promise<number> {
  const f = follow(side);
  const first = side.publisher.publish(progress(0)).seq; // warm-up: subscriptions are live
  await waitAll(f.seen, first, 30_000);
  const t0 = performance.now();
  let last = first;
  for (let i = 1; i <= N; i++) {
    last = side.publisher.publish(progress(i)).seq;
    if (i % 500 === 0) await new Promise((r) => setImmediate(r));
  }
  await waitAll(f.seen, last, 120_000);
  const ms = performance.now() - t0;
  f.stop();
  return (N / ms) * 1000;
}

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}

/** publish() -> first consumer receives, at about 1000 events/s. */
async function latency(side: Side): Promise<{ p50: number; p99: number }> {
  const sentAt = new Map<number, number>();
  const lat: number[] = [];
  const f = follow(side, (seq) => {
    const t = sentAt.get(seq);
    if (t !== undefined) lat.push(performance.now() - t);
  });
  const first = side.publisher.publish(progress(0)).seq;
  await waitAll(f.seen, first, 30_000);
  let last = first;
  for (let i = 1; i <= LATENCY_SAMPLES; i++) {
    const e = side.publisher.publish(progress(i));
    sentAt.set(e.seq, performance.now());
    last = e.seq;
    await sleep(1);
  }
  await waitAll(f.seen, last, 30_000);
  f.stop();
  return { p50: pct(lat, 50), p99: pct(lat, 99) };
}

const t0 = Date.now();
console.log(`fedtune bench:nats: ${N} worker.progress events per throughput run, ${LATENCY_SAMPLES} latency samples; NATS at ${servers} (JetStream, file storage); node ${process.version}`);
const rows: string[][] = [];
const fmt = (n: number, digits = 0): string => n.toFixed(digits);
for (const k of [1, 5]) {
  const nats = await natsSide(k, `t${k}`);
  const natsRate = await throughput(nats);
  await nats.close();
  const mem = memorySide(k);
  const memRate = await throughput(mem);
  await mem.close();
  rows.push([`events/s to ${k} consumer${k > 1 ? 's' : ''}`, fmt(natsRate), fmt(memRate), (natsRate / memRate).toFixed(3)]);
  console.log(`  throughput, ${k} consumer(s) done`);
}
const natsL = await natsSide(1, 'lat');
const nl = await latency(natsL);
await natsL.close();
const memL = memorySide(1);
const ml = await latency(memL);
await memL.close();
rows.push(['latency p50 (ms)', fmt(nl.p50, 3), fmt(ml.p50, 3), `+${fmt(nl.p50 - ml.p50, 3)} ms`]);
rows.push(['latency p99 (ms)', fmt(nl.p99, 3), fmt(ml.p99, 3), `+${fmt(nl.p99 - ml.p99, 3)} ms`]);

const head = ['measure', 'NATS + JetStream', 'MemoryBus (same run)', 'NATS / memory'];
const width = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
const line = (r: string[]): string => r.map((c, i) => c.padEnd(width[i]!)).join('  ');
console.log('');
console.log(line(head));
console.log(width.map((w) => '-'.repeat(w)).join('  '));
for (const r of rows) console.log(line(r));
console.log(`\nlatency ratio column: added latency of NATS over the in-process bus. total ${((Date.now() - t0) / 1000).toFixed(0)} s`);
