/**
 * `npm run bench:sessions`: one coordinator, many connected sites.
 *
 * A `fedtune coordinator` process (its own process, so that /proc/<pid> is the
 * coordinator alone) runs a two-round federated run on a tiny model with a
 * rank-1 adapter. A bounded load generator (--procs Node processes, each with
 * at most --concurrency registrations in flight) registers --sites sites over
 * loopback: GetRunInfo, Register, Session, then a heartbeat every
 * server.heartbeat_interval_ms, as a real worker does. Each site has its own
 * HTTP/2 connection by default (--connections = --sites): a real site is a
 * machine of its own, so the coordinator must carry one TCP connection, one
 * HTTP/2 session and its keepalive pings per site; --connections N shares N
 * connections (grpc-js channels with a local subchannel pool) among the sites,
 * which shows what the connections themselves cost.
 *
 *   phase register  all sites register; round 1 starts as soon as
 *                   cohort.min_workers (= --cohort) sites are in, and its
 *                   tasks are held (not answered) until the window is over;
 *   phase window    --window seconds of steady heartbeats from every site;
 *   phase rounds    round 1's held tasks are answered; round 2 picks a cohort
 *                   of --cohort out of all --sites (cohort.fraction) and is
 *                   answered at once. Every answer downloads the global
 *                   adapter and uploads start + d_site (d_site a fixed
 *                   per-site constant, num_examples a fixed per-site count).
 *
 * The coordinator's CPU (utime + stime of /proc/<pid>/stat) and RSS (VmRSS of
 * /proc/<pid>/status) are sampled every 250 ms, its event-loop delay scraped
 * from its dashboard's /metrics every second. Printed: registration rate,
 * CPU and RSS per phase, the CPU of a registration late in the registration
 * against one early in it (the same run's baseline), heartbeat CPU per second
 * and per heartbeat, the size of the dashboard's event history, the run's
 * events by type, round times and CPU, and event-loop delays. The aggregated adapters of both rounds are checked against
 * the weighted means of what the sites uploaded, computed here in float64
 * from the checkpoints (round-0000, round-0001, round-0002).
 *
 *   node bin/run-ts.js bench/sessions.ts [--sites 10000] [--cohort 1000]
 *     [--connections SITES] [--procs 2] [--concurrency 64] [--window 30]
 *     [--heartbeat-ms 2000] [--keep] [--cpu-prof DIR]
 */
import { fork, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createWriteStream, readFileSync, statSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';

process.env.FEDTUNE_LOG_LEVEL ??= 'warn';

const ROOT = join(import.meta.dirname, '..');
const TOKEN = 'scale-bench-token';

const arg = (name: string, def: string): string => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : def;
};
const flag = (name: string): boolean => process.argv.includes(`--${name}`);

/** A site's deterministic update: start + delta(site) in every element, trained on examples(site) examples. */
const delta = (site: number): number => ((site % 13) + 1) * 1e-4;
const examples = (site: number): number => (site % 5) + 1;
const TRAIN_EXAMPLES = 5;
/** A generator process reports every this many registered sites (the bench samples the coordinator's CPU then). */
const PROGRESS_EVERY = 50;

// ---------------------------------------------------------------------------------------------------------------
// Messages between the bench and its load-generator processes.

type ToChild =
  | { type: 'start'; address: string; sites: number[]; connections: number; concurrency: number }
  | { type: 'count' }
  | { type: 'release' };

interface Uploaded {
  round: number;
  site: number;
}

type FromChild =
  | { type: 'registered'; sites: number; failed: number; ms: number; retries: number; firstError: string | null }
  | { type: 'count'; heartbeats: number; held: number; tasks: number }
  | { type: 'progress'; sites: number }
  | { type: 'done'; uploaded: Uploaded[]; finished: number; errors: string[]; maxLagMs: number };

// ---------------------------------------------------------------------------------------------------------------
// Load generator (child process).

async function child(): Promise<void> {
  const grpc = await import('@grpc/grpc-js');
  const gen = await import('../proto/gen/fedtune/v1/coordinator.ts');
  const { PROTOCOL_VERSION, WORKER_ID_HEADER, SESSION_KEY_HEADER } = await import('../common/wire.ts');
  const { CoordinatorClient, WorkerStatus, UpdateKind } = gen;
  type Client = InstanceType<typeof CoordinatorClient>;
  type Task = import('../proto/gen/fedtune/v1/coordinator.ts').Task;
  type CoordinatorMessage = import('../proto/gen/fedtune/v1/coordinator.ts').CoordinatorMessage;
  type WorkerMessage = import('../proto/gen/fedtune/v1/coordinator.ts').WorkerMessage;
  type TensorSpec = import('../proto/gen/fedtune/v1/tensors.ts').TensorSpec;

  const send = (m: FromChild): void => void process.send!(m);
  // The generator's own event-loop delay: a keepalive ping whose ack it reads more than 5 s late drops the connection.
  const { monitorEventLoopDelay } = await import('node:perf_hooks');
  const lag = monitorEventLoopDelay({ resolution: 20 });
  lag.enable();
  let heartbeats = 0;
  let released = false;
  let tasksSeen = 0;
  const held: Array<() => void> = [];
  const uploaded: Uploaded[] = [];
  const errors: string[] = [];
  let finished = 0;
  let ended = 0;
  let total = 0;
  let clients: Client[] = [];
  let heartbeatMs = 2000;

  const note = (what: string, err: unknown): void => {
    if (errors.length < 20) errors.push(`${what}: ${(err as Error).message ?? String(err)}`);
    if (errors.length === 1) console.error(`scale bench generator: ${errors[0]}`);
  };

  type RunInfo = import('../proto/gen/fedtune/v1/coordinator.ts').RunInfo;
  type RegisterRequest = import('../proto/gen/fedtune/v1/coordinator.ts').RegisterRequest;
  type RegisterResponse = import('../proto/gen/fedtune/v1/coordinator.ts').RegisterResponse;
  const getRunInfo = (c: Client): Promise<RunInfo> => new Promise((resolve, reject) => c.getRunInfo({ joinToken: TOKEN }, (err, r) => (err ? reject(err) : resolve(r!))));
  const register = (c: Client, req: RegisterRequest): Promise<RegisterResponse> => new Promise((resolve, reject) => c.register(req, (err, r) => (err ? reject(err) : resolve(r!))));

  const checkEnd = (): void => {
    if (ended === total) {
      for (const c of clients) c.close();
      send({ type: 'done', uploaded, finished, errors, maxLagMs: lag.max / 1e6 });
    }
  };

  /** One site: register, open the session, heartbeat, answer tasks. Resolves once SessionAccepted came. */
  const site = async (client: Client, index: number): Promise<number> => {
    let retries = 0;
    for (;;) {
      try {
        const info = await getRunInfo(client);
        const reg = await register(client, {
          joinToken: TOKEN,
          site: `site-${index}`,
          previousWorkerId: '',
          capabilities: {
            device: 'cpu',
            memoryBytes: 1 << 30,
            backends: ['scale-bench'],
            modelFingerprint: info.modelFingerprint,
            numTrainExamples: TRAIN_EXAMPLES,
            numEvalExamples: 0,
            client: 'fedtune-scale-bench/1',
            protocolVersion: PROTOCOL_VERSION,
          },
        });
        heartbeatMs = reg.heartbeatIntervalMs;
        const md = new grpc.Metadata();
        md.set(WORKER_ID_HEADER, reg.workerId);
        md.set(SESSION_KEY_HEADER, reg.sessionKey);
        await openSession(client, index, md, reg.maxChunkBytes);
        return retries;
      } catch (err) {
        const code = (err as { code?: number }).code;
        // Worth retrying (docs/protocol.md): UNAVAILABLE, DEADLINE_EXCEEDED; anything else is a failure.
        if ((code !== grpc.status.UNAVAILABLE && code !== grpc.status.DEADLINE_EXCEEDED) || retries >= 5) throw err;
        retries++;
        await new Promise((r) => setTimeout(r, 200 * retries));
      }
    }
  };

  const openSession = (client: Client, index: number, md: InstanceType<typeof grpc.Metadata>, maxChunkBytes: number): Promise<void> =>
    new Promise((resolve, reject) => {
      const call = client.session(md);
      let accepted = false;
      let timer: NodeJS.Timeout | null = null;
      let status: number = WorkerStatus.WORKER_STATUS_IDLE;
      const beat = (taskId = ''): void => {
        if (call.writable) {
          call.write({ body: { $case: 'heartbeat', value: { status, taskId, memoryUsedBytes: 0 } } } satisfies WorkerMessage);
          heartbeats++;
        }
      };
      const answer = (task: Task): void => {
        void train(client, md, index, task, maxChunkBytes, (s) => {
          status = s;
          beat(task.taskId);
        }).catch((err: unknown) => note(`site ${index} task ${task.taskId}`, err));
      };
      let closed = false;
      const close = (): void => {
        if (closed) return;
        closed = true;
        if (timer) clearInterval(timer);
        if (accepted) {
          ended++;
          checkEnd();
        }
      };
      call.on('data', (m: CoordinatorMessage) => {
        const b = m.body;
        if (!b) return;
        if (b.$case === 'accepted') {
          accepted = true;
          heartbeatMs = b.value.heartbeatIntervalMs;
          beat();
          // Spread the sites' heartbeats over the interval, as independent machines would be.
          setTimeout(() => {
            if (closed) return;
            beat();
            timer = setInterval(beat, heartbeatMs);
          }, Math.random() * heartbeatMs);
          resolve();
        } else if (b.$case === 'task') {
          tasksSeen++;
          if (b.value.kind?.$case !== 'train') {
            call.write({ body: { $case: 'taskFailed', value: { taskId: b.value.taskId, message: 'the scale bench only trains', unsupported: true } } });
          } else if (released) answer(b.value);
          else held.push(() => answer(b.value));
        } else if (b.$case === 'finished') {
          finished++;
        }
      });
      call.on('error', (err: Error) => {
        if (!accepted) reject(err);
        else if (!finished) note(`site ${index} session`, err);
        close();
      });
      call.on('end', () => {
        call.end();
        close();
      });
    });

  /** Download the task's global adapter, upload start + delta(site). */
  const train = async (client: Client, md: InstanceType<typeof grpc.Metadata>, index: number, task: Task, maxChunkBytes: number, setStatus: (s: number) => void): Promise<void> => {
    setStatus(WorkerStatus.WORKER_STATUS_FETCHING);
    const ref = task.global!;
    const stream = client.download({ target: { $case: 'adapterVersion', value: ref.version }, adapterRank: ref.rank }, md.clone());
    const parts: Buffer[] = [];
    let manifest: TensorSpec[] = [];
    for await (const msg of stream as AsyncIterable<import('../proto/gen/fedtune/v1/coordinator.ts').DownloadMessage>) {
      const b = msg.body;
      if (b?.$case === 'header' && b.value.content?.$case === 'tensors') manifest = b.value.content.value.tensors;
      else if (b?.$case === 'chunk') parts.push(Buffer.from(b.value.data));
    }
    const start = Buffer.concat(parts);
    const flat = new Float32Array(start.buffer.slice(start.byteOffset, start.byteOffset + start.byteLength));
    const d = delta(index);
    for (let i = 0; i < flat.length; i++) flat[i] = flat[i]! + d;
    const bytes = new Uint8Array(flat.buffer);
    setStatus(WorkerStatus.WORKER_STATUS_UPLOADING);
    const chunk = Math.min(maxChunkBytes, 1 << 20);
    await new Promise<void>((resolve, reject) => {
      const call = client.upload(md.clone(), (err) => (err ? reject(err) : resolve()));
      call.write({
        body: {
          $case: 'header',
          value: {
            taskId: task.taskId,
            round: task.round,
            kind: UpdateKind.UPDATE_KIND_ADAPTER_WEIGHTS,
            baseVersion: ref.version,
            numExamples: examples(index),
            metrics: { train_loss: 1 },
            stream: { totalBytes: bytes.byteLength, chunkBytes: chunk, content: { $case: 'tensors', value: { tensors: manifest } } },
          },
        },
      });
      for (let off = 0; off < bytes.byteLength; off += chunk) call.write({ body: { $case: 'chunk', value: { offset: off, data: bytes.subarray(off, off + chunk) } } });
      call.write({ body: { $case: 'trailer', value: { totalBytes: bytes.byteLength, sha256: createHash('sha256').update(bytes).digest() } } });
      call.end();
    });
    uploaded.push({ round: task.round, site: index });
    setStatus(WorkerStatus.WORKER_STATUS_IDLE);
  };

  process.on('message', (m: ToChild) => {
    if (m.type === 'count') {
      send({ type: 'count', heartbeats, held: held.length, tasks: tasksSeen });
    } else if (m.type === 'release') {
      released = true;
      for (const h of held.splice(0)) h();
    } else if (m.type === 'start') {
      total = m.sites.length;
      const options = { 'grpc.keepalive_time_ms': 10_000, 'grpc.keepalive_timeout_ms': 5_000, 'grpc.use_local_subchannel_pool': 1 };
      clients = Array.from({ length: m.connections }, () => new CoordinatorClient(m.address, grpc.credentials.createInsecure(), options));
      const queue = [...m.sites];
      let failed = 0;
      let retries = 0;
      let joined = 0;
      let firstError: string | null = null;
      const t0 = performance.now();
      const lane = async (): Promise<void> => {
        for (let index = queue.shift(); index !== undefined; index = queue.shift()) {
          const pos = m.sites.length - queue.length - 1;
          try {
            retries += await site(clients[pos % clients.length]!, index);
            if (++joined % PROGRESS_EVERY === 0) send({ type: 'progress', sites: PROGRESS_EVERY });
          } catch (err) {
            failed++;
            total--;
            firstError ??= `site ${index}: ${(err as Error).message}`;
          }
        }
      };
      void Promise.all(Array.from({ length: m.concurrency }, lane)).then(() => {
        send({ type: 'registered', sites: m.sites.length - failed, failed, ms: performance.now() - t0, retries, firstError });
        checkEnd();
      });
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The bench (parent process).

interface Sample {
  t: number;
  cpuSec: number;
  rssBytes: number;
}

const CLK_TCK = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;

/** CPU seconds (user + system) a process has used so far; 0 once it is gone. */
function cpuSecondsOf(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch {
    return 0;
  }
}

function procSampler(pid: number): { samples: Sample[]; stop(): void; now(): Sample | null } {
  const tick = CLK_TCK;
  const samples: Sample[] = [];
  const read = (): Sample | null => {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      // Fields after the command (which may hold spaces) start at state; utime and stime are fields 14 and 15.
      const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      const cpuSec = (Number(f[11]) + Number(f[12])) / tick;
      const status = readFileSync(`/proc/${pid}/status`, 'utf8');
      const rssKb = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
      return { t: performance.now(), cpuSec, rssBytes: rssKb * 1024 };
    } catch {
      return null;
    }
  };
  const timer = setInterval(() => {
    const s = read();
    if (s) samples.push(s);
  }, 250);
  return {
    samples,
    stop: () => clearInterval(timer),
    now: () => {
      const s = read();
      if (s) samples.push(s);
      return s;
    },
  };
}

const mb = (b: number): string => `${(b / 2 ** 20).toFixed(b < 10 * 2 ** 20 ? 1 : 0)} MiB`;

async function main(): Promise<void> {
  const sites = Number(arg('sites', '10000'));
  const cohort = Number(arg('cohort', '1000'));
  const connections = Number(arg('connections', String(sites)));
  const procs = Number(arg('procs', '2'));
  const concurrency = Number(arg('concurrency', '64'));
  const windowSec = Number(arg('window', '30'));
  const heartbeatMs = Number(arg('heartbeat-ms', '2000'));
  for (const [k, v] of Object.entries({ sites, cohort, connections, procs, concurrency, windowSec, heartbeatMs })) {
    if (!Number.isInteger(v) || v < 1) throw new Error(`--${k}: must be a positive integer (got ${v})`);
  }
  if (cohort > sites) throw new Error(`--cohort: must not exceed --sites (${sites}) (got ${cohort})`);
  if (connections > sites) throw new Error(`--connections: must not exceed --sites (${sites}) (got ${connections})`);

  const dir = await mkdtemp(join(tmpdir(), 'fedtune-scale-'));
  const { initModel } = await import('../worker/engine/init.ts');
  const { readPeftAdapter } = await import('../common/peft.ts');
  const modelDir = join(dir, 'model');
  await initModel(modelDir, { arch: 'llama', hiddenSize: 32, numLayers: 1, numHeads: 2, numKvHeads: 1, maxPositions: 64, seed: 1 });
  const configPath = join(dir, 'run.json');
  writeFileSync(
    configPath,
    JSON.stringify({
      name: 'scale',
      model: { path: modelDir },
      lora: { r: 1, alpha: 2 },
      training: { steps: 1, batch_size: 1, max_seq_len: 16 },
      rounds: 2,
      // Round 2: ceil(fraction x sites) = cohort of all sites; round 1 starts with the first `cohort` sites in.
      cohort: { fraction: cohort / sites, min_workers: cohort, wait_timeout_sec: 600 },
      round: { deadline_sec: 600, min_results: cohort, max_retries: 0 },
      eval: { every: 0 },
      checkpoint: { dir: join(dir, 'checkpoints') },
      server: { listen: '127.0.0.1:0', join_token: TOKEN, heartbeat_interval_ms: heartbeatMs, heartbeat_timeout_ms: Math.max(15_000, 5 * heartbeatMs) },
      // The dashboard server runs in the coordinator process, as it does by default: its folding of every event is part of the cost.
      dashboard: { enabled: true, host: '127.0.0.1', port: 0 },
    }),
  );

  console.log(`scale bench: ${sites} sites over ${connections} HTTP/2 connection(s) from ${procs} generator process(es), ` + `${concurrency} registrations in flight each; heartbeat every ${heartbeatMs} ms; cohort ${cohort}; rank-1 adapter on a tiny llama`);
  const logPath = join(dir, 'coordinator.log');
  const logFile = createWriteStream(logPath);
  // --cpu-prof DIR: the coordinator writes a V8 CPU profile there when it exits.
  const prof = arg('cpu-prof', '');
  const nodeArgs = prof ? ['--cpu-prof', `--cpu-prof-dir=${prof}`] : [];
  const coord = spawn(process.execPath, [...nodeArgs, join(ROOT, 'bin', 'fedtune.js'), 'coordinator', '--config', configPath], {
    cwd: ROOT,
    env: { ...process.env, FEDTUNE_LOG_LEVEL: 'info', FEDTUNE_LOG_FORMAT: 'json' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  coord.stderr!.pipe(logFile);
  let out = '';
  const exited = new Promise<number | null>((r) => coord.on('exit', (c) => r(c)));
  const address = await new Promise<string>((resolve, reject) => {
    coord.stdout!.on('data', (d: Buffer) => {
      logFile.write(d);
      if (out.length < 1e5) out += d.toString();
      const m = /listening on (\S+)/.exec(out);
      if (m) resolve(m[1]!);
    });
    void exited.then((c) => reject(new Error(`the coordinator exited (${c}) before listening:\n${out}\nsee ${logPath}`)));
  });
  const sampler = procSampler(coord.pid!);
  const base = sampler.now()!;
  console.log(`coordinator pid ${coord.pid} on ${address}: RSS ${mb(base.rssBytes)} before any site`);

  // Registration cost of the second and the last tenth of the sites (the first warms up the JIT and starts round 1):
  // equal when a registration costs the same at any registry size.
  const tenth = Math.max(PROGRESS_EVERY * procs, Math.round(sites / 10));
  let joinedSoFar = 0;
  const marks: Array<{ at: number; cpuSec: number; t: number }> = [];
  const onProgress = (n: number): void => {
    const before = joinedSoFar;
    joinedSoFar += n;
    for (const at of [tenth, 2 * tenth, sites - tenth, sites]) {
      if (before < at && joinedSoFar >= at) marks.push({ at: joinedSoFar, cpuSec: cpuSecondsOf(coord.pid!), t: performance.now() });
    }
  };

  // Generator processes, each with its share of sites and connections.
  const kids: ChildProcess[] = [];
  const inbox: FromChild[][] = [];
  const waiters: Array<() => void> = [];
  for (let p = 0; p < procs; p++) {
    const k = fork(join(ROOT, 'bin', 'run-ts.js'), [import.meta.filename, '--child'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    inbox.push([]);
    k.on('message', (m: FromChild) => {
      if (m.type === 'progress') return onProgress(m.sites);
      inbox[p]!.push(m);
      for (const w of waiters.splice(0)) w();
    });
    kids.push(k);
  }
  const collect = async <T extends FromChild['type']>(type: T): Promise<Array<Extract<FromChild, { type: T }>>> => {
    for (;;) {
      const got = inbox.map((q) => q.findIndex((m) => m.type === type));
      if (got.every((i) => i >= 0)) return got.map((i, p) => inbox[p]!.splice(i, 1)[0] as Extract<FromChild, { type: T }>);
      await new Promise<void>((r) => waiters.push(r));
    }
  };
  const heartbeatsSent = async (): Promise<number> => {
    for (const k of kids) k.send({ type: 'count' } satisfies ToChild);
    return (await collect('count')).reduce((s, c) => s + c.heartbeats, 0);
  };

  try {
    // The coordinator's event-loop delay, from its own /metrics (prom-client resets the maximum at every scrape).
    const lagSamples: Array<{ t: number; maxSec: number }> = [];
    for (let i = 0; i < 100 && !out.includes('dashboard'); i++) await new Promise((r) => setTimeout(r, 100));
    const dashUrl = /dashboard: open (\S+)/.exec(out)?.[1];
    let polling = dashUrl !== undefined;
    const pollLag = async (): Promise<void> => {
      while (polling) {
        try {
          const text = await (await fetch(new URL('metrics', dashUrl))).text();
          const m = /^fedtune_process_nodejs_eventloop_lag_max_seconds (\S+)/m.exec(text);
          if (m) lagSamples.push({ t: performance.now(), maxSec: Number(m[1]) });
        } catch {
          polling = false; // the coordinator is gone
        }
        await new Promise((r) => setTimeout(r, 1000));
      }
    };
    const lagPolling = pollLag();
    // A scrape reports the largest delay since the one before: those after a, up to `slack` ms after b, cover [a, b].
    const lagBetween = (a: number, b: number, slack = 1000): string => {
      const xs = lagSamples.filter((x) => x.t > a && x.t <= b + slack).map((x) => x.maxSec * 1000);
      return xs.length ? `${Math.max(...xs).toFixed(0)} ms` : 'n/a';
    };

    // Phase 1: registration.
    const genCpu = (): number => kids.reduce((a, k) => a + cpuSecondsOf(k.pid!), 0);
    const g0 = genCpu();
    const r0 = sampler.now()!;
    kids.forEach((k, p) => {
      const mine = Array.from({ length: sites }, (_, i) => i).filter((i) => i % procs === p);
      const conns = Math.max(1, Math.round((connections * mine.length) / sites));
      k.send({ type: 'start', address, sites: mine, connections: conns, concurrency } satisfies ToChild);
    });
    const reg = await collect('registered');
    const r1 = sampler.now()!;
    const g1 = genCpu();
    const registered = reg.reduce((s, r) => s + r.sites, 0);
    const failed = reg.reduce((s, r) => s + r.failed, 0);
    const regSec = (r1.t - r0.t) / 1000;
    console.log(
      `register: ${registered} of ${sites} sites in ${regSec.toFixed(1)} s (${(registered / regSec).toFixed(0)} sites/s), ${failed} failed` +
        `${reg.some((r) => r.firstError) ? ` (first: ${reg.find((r) => r.firstError)!.firstError})` : ''}, ${reg.reduce((s, r) => s + r.retries, 0)} retried; ` +
        `coordinator CPU ${(r1.cpuSec - r0.cpuSec).toFixed(1)} s (${(((r1.cpuSec - r0.cpuSec) / regSec) * 100).toFixed(0)}% of a core), ` +
        `${(((r1.cpuSec - r0.cpuSec) * 1e3) / Math.max(1, registered)).toFixed(2)} ms per site; RSS ${mb(r1.rssBytes)} (+${((r1.rssBytes - base.rssBytes) / 1024 / Math.max(1, registered)).toFixed(0)} KiB per site); generator CPU ${(g1 - g0).toFixed(1)} s; coordinator event-loop delay at most ${lagBetween(r0.t, r1.t)}`,
    );

    // Phase 2: steady heartbeats (round 1's tasks are held open meanwhile).
    await new Promise((r) => setTimeout(r, Math.min(5000, heartbeatMs * 2))); // let every site reach its interval
    const h0 = await heartbeatsSent();
    const w0 = sampler.now()!;
    const gw0 = genCpu();
    await new Promise((r) => setTimeout(r, windowSec * 1000));
    const h1 = await heartbeatsSent();
    const w1 = sampler.now()!;
    const gw1 = genCpu();
    const wSec = (w1.t - w0.t) / 1000;
    const hbPerSec = (h1 - h0) / wSec;
    const cpuPerSec = (w1.cpuSec - w0.cpuSec) / wSec;
    console.log(
      `heartbeats: ${hbPerSec.toFixed(0)}/s from ${registered} sites over ${wSec.toFixed(0)} s; coordinator CPU ${(cpuPerSec * 100).toFixed(1)}% of a core ` +
        `(${((cpuPerSec / Math.max(1, hbPerSec)) * 1e6).toFixed(0)} us per heartbeat, keepalive pings included); RSS ${mb(w1.rssBytes)}; generator CPU ${(((gw1 - gw0) / wSec) * 100).toFixed(0)}% of a core; coordinator event-loop delay at most ${lagBetween(w0.t, w1.t)}`,
    );

    const a0 = marks.find((m) => m.at >= tenth && m.at < 2 * tenth);
    const a1 = marks.find((m) => m.at >= 2 * tenth && m.at < sites - tenth);
    const b0 = marks.find((m) => m.at >= sites - tenth && m.at < sites);
    const b1 = marks.find((m) => m.at >= sites);
    if (a0 && a1 && b0 && b1) {
      // The sites already in heartbeat meanwhile: their cost (from the window, per live site) is taken out.
      const perSite = cpuPerSec / Math.max(1, registered);
      const net = (x: (typeof marks)[0], y: (typeof marks)[0]): number =>
        ((y.cpuSec - x.cpuSec - perSite * ((x.at + y.at) / 2) * ((y.t - x.t) / 1000)) * 1e3) / (y.at - x.at);
      const first = net(a0, a1);
      const last = net(b0, b1);
      console.log(
        `register cost by registry size: ${first.toFixed(2)} ms CPU per registration (heartbeats of the sites already in taken out) for sites ${a0.at}-${a1.at}, ${last.toFixed(2)} ms for sites ${b0.at}-${b1.at} ` +
          `(ratio ${(last / first).toFixed(2)}; 1 = independent of how many are registered)`,
      );
    }


    // What a dashboard opening now loads: the run's event history.
    const dash = /dashboard: open (\S+)/.exec(out)?.[1];
    if (dash) {
      const d0 = sampler.now()!;
      const res = await fetch(new URL('api/runs/scale/events?after=0', dash));
      const body = await res.arrayBuffer();
      const d1 = sampler.now()!;
      console.log(`dashboard history: ${res.status}, ${mb(body.byteLength)} in ${((d1.t - d0.t) / 1000).toFixed(2)} s; coordinator CPU ${(d1.cpuSec - d0.cpuSec).toFixed(2)} s`);
    } else console.log('dashboard history: the dashboard did not start');

    // Phase 3: the rounds.
    const t0 = sampler.now()!;
    for (const k of kids) k.send({ type: 'release' } satisfies ToChild);
    const code = await exited;
    const t1 = sampler.samples.at(-1)!;
    polling = false;
    await lagPolling;
    const done = await collect('done');
    sampler.stop();
    const peak = Math.max(...sampler.samples.map((s) => s.rssBytes));
    const errors = done.flatMap((d) => d.errors);
    const finished = done.reduce((s, d) => s + d.finished, 0);

    // Round times from the run's own events; CPU between them from the samples.
    const events = readFileSync(join(dir, 'checkpoints', 'scale', 'events.jsonl'), 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as { type: string; round?: number; time: number; durationMs?: number; cohort?: string[]; participants?: number });
    const byType = new Map<string, number>();
    for (const e of events) byType.set(e.type, (byType.get(e.type) ?? 0) + 1);
    const top = [...byType].sort((a, b) => b[1] - a[1]).slice(0, 5).map(([k, n]) => `${k} ${n}`).join(', ');
    const logBytes = statSync(join(dir, 'checkpoints', 'scale', 'events.jsonl')).size;
    console.log(`events: ${events.length} in the run's event log (${mb(logBytes)}); most: ${top}`);
    const cpuAt = (wall: number): number => {
      // Sample times are performance.now(); event times are wall clock: map through the offset taken now.
      const t = wall - (Date.now() - performance.now());
      const s = sampler.samples;
      const j = s.findIndex((x) => x.t >= t);
      return j < 0 ? s.at(-1)!.cpuSec : s[j]!.cpuSec;
    };
    let roundsEnd = t1.t;
    for (const round of [1, 2]) {
      const st = events.find((e) => e.type === 'round.started' && e.round === round);
      const co = events.find((e) => e.type === 'round.completed' && e.round === round);
      if (!st || !co) {
        console.log(`round ${round}: did not complete (coordinator exit ${code}; see ${logPath})`);
        continue;
      }
      const a = round === 1 ? t0.t + (Date.now() - performance.now()) : st.time;
      const b = co.time;
      roundsEnd = b - (Date.now() - performance.now());
      const sec = (b - a) / 1000;
      const cpu = cpuAt(b) - (round === 1 ? t0.cpuSec : cpuAt(a));
      console.log(
        `round ${round}: cohort ${st.cohort?.length} of ${round === 1 ? `the first ${cohort} in` : registered}, ${co.participants} updates aggregated in ${sec.toFixed(1)} s ` +
          `${round === 1 ? '(from the release of its held tasks) ' : ''}; coordinator CPU ${cpu.toFixed(1)} s`,
      );
    }
    console.log(`run: coordinator exited with ${code}; ${finished} sites got RunFinished; peak RSS ${mb(peak)}; ${errors.length} site error(s)${errors.length ? `: ${errors.slice(0, 3).join('; ')}` : ''}`);
    console.log(
      `event-loop delay during the rounds: coordinator at most ${lagBetween(t0.t, roundsEnd, 0)} (${lagBetween(roundsEnd, t1.t)} while it ends every session after the run); generator processes at most ${Math.max(...done.map((d) => d.maxLagMs)).toFixed(0)} ms over the whole run ` +
        '(a site drops its connection when a keepalive ack is read more than 5 s late)',
    );

    // The aggregates: global_r = sum_i w_i fl32(global_{r-1} + d_i) / sum_i w_i over the round's uploads (fedavg, weights = examples).
    const uploads = done.flatMap((d) => d.uploaded);
    let bad = 0;
    for (const round of [1, 2]) {
      const ckpt = (n: number): string => join(dir, 'checkpoints', 'scale', `round-${String(n).padStart(4, '0')}`);
      let prev, next;
      try {
        prev = (await readPeftAdapter(ckpt(round - 1))).adapter;
        next = (await readPeftAdapter(ckpt(round))).adapter;
      } catch (err) {
        console.log(`check round ${round}: no checkpoint (${(err as Error).message})`);
        bad++;
        continue;
      }
      const mine = uploads.filter((u) => u.round === round);
      const wsum = mine.reduce((s, u) => s + examples(u.site), 0);
      let worst = 0;
      for (const [name, t] of prev) {
        const got = next.get(name)!;
        for (let j = 0; j < t.data.length; j++) {
          let acc = 0;
          for (const u of mine) acc += examples(u.site) * Math.fround(t.data[j]! + delta(u.site));
          worst = Math.max(worst, Math.abs(acc / wsum - got.data[j]!));
        }
      }
      const ok = worst < 1e-6;
      if (!ok) bad++;
      console.log(`check round ${round}: ${mine.length} uploads, global adapter = weighted mean of the uploads within ${worst.toExponential(2)} (${ok ? 'ok' : 'MISMATCH'})`);
    }
    if (bad > 0 || code !== 0 || failed > 0) process.exitCode = 1;
  } finally {
    for (const k of kids) if (k.exitCode === null) k.kill();
    if (coord.exitCode === null) coord.kill('SIGKILL');
    logFile.end();
    if (flag('keep')) console.log(`kept ${dir}`);
    else await rm(dir, { recursive: true, force: true });
  }
}

if (flag('child')) await child();
else await main();
