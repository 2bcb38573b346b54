/**
 * Event fan-out bench: events per second delivered to 1, 10 and 100 dashboard
 * WebSocket clients on loopback, and end-to-end latency (event created ->
 * received by the client) at p50 and p99.
 *
 * Baseline, measured in the same run: the same JSON frames broadcast by a bare
 * `ws` server straight from the publisher (no bus, no per-client subscription,
 * no backpressure handling). The ratio column is fedtune / baseline throughput.
 * Clients run in a worker thread so they do not share the server's event loop.
 *
 *   npm run bench:events            (about half a minute)
 *   npm run bench:events -- --quick
 */
import { Worker } from 'node:worker_threads';
import { WebSocketServer, type WebSocket } from 'ws';
import type { NewRunEvent, RunEvent } from '../common/events.ts';
import { MemoryBus } from '../coordinator/events/memory.ts';
import { startDashboardServer } from '../coordinator/http/server.ts';

const quick = process.argv.includes('--quick');
const RUN = 'bench';
const now = (): number => performance.timeOrigin + performance.now();

/** A realistic event: worker progress, ~330 bytes as a frame. The creation stamp rides in taskId. */
function progress(i: number): NewRunEvent {
  return {
    runId: RUN, type: 'worker.progress', workerId: `w${i % 8}-hospital-${i % 8}`, site: `hospital-${i % 8}`, round: 3,
    taskId: String(now()), step: i % 50, totalSteps: 50, loss: 2.5 - (i % 50) * 0.01, tokensPerSec: 1234.5, examples: 17 * (i % 50),
  };
}

interface Target {
  url: string;
  publish(e: NewRunEvent): void;
  close(): Promise<void>;
}

async function busTarget(): Promise<Target> {
  const bus = new MemoryBus();
  bus.publish({ runId: RUN, type: 'log', level: 'info', message: 'bench start' });
  const srv = await startDashboardServer({ bus, port: 0 });
  return {
    url: `${srv.url.replace('http', 'ws')}ws`,
    publish: (e) => void bus.publish(e),
    close: async () => {
      await srv.close();
      await bus.close();
    },
  };
}

/** Baseline: a bare ws server broadcasting the same frames. */
async function rawTarget(): Promise<Target> {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await new Promise<void>((r) => wss.once('listening', () => r()));
  const clients = new Set<WebSocket>();
  let seq = 1;
  const frame = (body: NewRunEvent, s: number): string => JSON.stringify({ type: 'event', event: { ...body, seq: s, time: Date.now() } as RunEvent });
  const first = frame({ runId: RUN, type: 'log', level: 'info', message: 'bench start' }, 1);
  wss.on('connection', (ws) => {
    clients.add(ws);
    ws.on('close', () => clients.delete(ws));
    ws.once('message', () => ws.send(first)); // the subscribe message
  });
  const addr = wss.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  return {
    url: `ws://127.0.0.1:${port}/ws`,
    publish: (e) => {
      const s = frame(e, ++seq);
      for (const c of clients) c.send(s);
    },
    close: () => new Promise<void>((r) => wss.close(() => r())),
  };
}

interface PhaseResult { end: number; latencies: number[]; resyncs: number }

class Clients {
  private readonly worker: Worker;
  private waiting: ((m: { type: string } & Partial<PhaseResult>) => void) | undefined;
  constructor(url: string, n: number) {
    this.worker = new Worker(new URL('./events-client.mjs', import.meta.url), { workerData: { url, clients: n, runId: RUN } });
    this.worker.on('message', (m: { type: string } & Partial<PhaseResult>) => this.waiting?.(m));
    this.worker.on('error', (err) => {
      console.error(err);
      process.exit(1);
    });
  }
  next(type: string): Promise<PhaseResult> {
    return new Promise((resolve) => {
      this.waiting = (m) => {
        if (m.type === type) resolve(m as PhaseResult);
      };
    });
  }
  /** Tell the clients what to expect next; resolves once they know (before anything is published). */
  async phase(events: number, firstSeq: number): Promise<void> {
    const ack = this.next('phase-ready');
    this.worker.postMessage({ type: 'phase', events, firstSeq });
    await ack;
  }
  async close(): Promise<void> {
    this.worker.postMessage({ type: 'close' });
    await this.worker.terminate();
  }
}

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function pct(xs: number[], p: number): number {
  if (xs.length === 0) return Number.NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
}

interface Row { clients: number; kind: string; eventsPerSec: number; deliveriesPerSec: number; p50: number; p99: number; resyncs: number }

async function measure(kind: 'fedtune' | 'raw ws', n: number, burst: number, paced: number): Promise<Row> {
  const target = kind === 'fedtune' ? await busTarget() : await rawTarget();
  const clients = new Clients(target.url, n);
  await clients.next('ready');
  let seq = 1;

  // Throughput: publish a burst as fast as the publisher can, yielding now and then.
  await clients.phase(burst, seq + 1);
  let done = clients.next('done');
  const t0 = now();
  for (let i = 0; i < burst; i++) {
    target.publish(progress(i));
    if (i % 200 === 199) await tick();
  }
  seq += burst;
  const thr = await done;
  const secs = (thr.end - t0) / 1000;

  // Latency: a steady 1000 events/s, well under saturation.
  await clients.phase(paced, seq + 1);
  done = clients.next('done');
  for (let i = 0; i < paced; i += 10) {
    for (let k = 0; k < 10 && i + k < paced; k++) target.publish(progress(i + k));
    await sleep(10);
  }
  const lat = await done;
  await clients.close();
  await target.close();
  return {
    clients: n, kind, eventsPerSec: burst / secs, deliveriesPerSec: (burst * n) / secs,
    p50: pct(lat.latencies, 50), p99: pct(lat.latencies, 99), resyncs: thr.resyncs + lat.resyncs,
  };
}

const fmt = (x: number, d = 0): string => x.toLocaleString('en-US', { maximumFractionDigits: d, minimumFractionDigits: d });

const configs: Array<[number, number, number]> = quick
  ? [[1, 5000, 300], [10, 2000, 300], [100, 500, 200]]
  : [[1, 20000, 1000], [10, 10000, 1000], [100, 2000, 500]];

console.log(`fedtune event fan-out over WebSocket (loopback, ${quick ? 'quick' : 'full'}; latency at ~1000 events/s)\n`);
const header = ['clients', 'path', 'events/s per client', 'deliveries/s', 'p50 ms', 'p99 ms', 'resyncs', 'ratio vs raw'];
const rows: string[][] = [];
for (const [n, burst, paced] of configs) {
  const raw = await measure('raw ws', n, burst, paced);
  const ours = await measure('fedtune', n, burst, paced);
  for (const r of [raw, ours]) {
    rows.push([
      String(r.clients), r.kind, fmt(r.eventsPerSec), fmt(r.deliveriesPerSec), fmt(r.p50, 2), fmt(r.p99, 2), String(r.resyncs),
      r === ours ? `${fmt(ours.eventsPerSec / raw.eventsPerSec, 2)}x` : '1.00x',
    ]);
  }
}
const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
const line = (cells: string[]): string => cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ');
console.log(line(header));
console.log(widths.map((w) => '-'.repeat(w)).join('  '));
for (const r of rows) console.log(line(r));
