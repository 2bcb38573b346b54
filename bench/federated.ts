/**
 * Federated transport and aggregation benchmarks. Each number is printed next
 * to a baseline measured in the same run on the same bytes:
 *
 *   (a) FedAvg streaming accumulator GB/s   vs  TypedArray.set / Buffer.copy of the same bytes
 *   (b) adapter download over loopback gRPC  vs  a raw TCP socket sending the same bytes
 *   (c) bench/rounds.ts: one federated round with N `fedtune worker` processes
 *                                            vs  raw TCP moving the round's bytes (N down + N up) once
 *
 * (b) runs the real coordinator pieces (service, round loop, strategy) in this
 * process with a synthetic adapter of Llama-7B attention shapes, r=16.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createServer, connect, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { packTensorMap, unpackTensorMap } from '../common/chunks.ts';
import { parseRunConfig, type RunConfig } from '../common/config.ts';
import { numel, type TensorMap } from '../common/tensor.ts';
import { MemoryBus } from '../coordinator/events/memory.ts';
import { FederatedRun } from '../coordinator/run.ts';
import { createCoordinatorService, createTransfers } from '../coordinator/service.ts';
import { startBulkServer, type BulkServer } from '../coordinator/bulk.ts';
import { rawTcpBetweenProcesses } from './rounds.ts';
import { MeanAggregator } from '../coordinator/strategies/fedavg.ts';
import { UploadBufferPool } from '../coordinator/strategies/math/sum.ts';
import { createStrategy } from '../coordinator/strategies/index.ts';
import { federatedStore, newRunState } from '../coordinator/store.ts';
import { WorkerRegistry } from '../coordinator/workers.ts';
import { CoordinatorService } from '../proto/gen/fedtune/v1/coordinator.ts';
import { CoordinatorConnection } from '../worker/agent.ts';

export interface Row {
  what: string;
  value: string;
  baseline: string;
  ratio: string;
}

const MB = 1e6;

function time<T>(f: () => T): [T, number] {
  const t = process.hrtime.bigint();
  const r = f();
  return [r, Number(process.hrtime.bigint() - t) / 1e6];
}

async function timeAsync<T>(f: () => Promise<T>): Promise<[T, number]> {
  const t = process.hrtime.bigint();
  const r = await f();
  return [r, Number(process.hrtime.bigint() - t) / 1e6];
}

/** A LoRA adapter with Llama-7B attention shapes (hidden 4096, 32 layers, q/k/v/o, r=16): 16.8M parameters. */
export function syntheticAdapter(opts: { hidden?: number; layers?: number; r?: number } = {}): TensorMap {
  const hidden = opts.hidden ?? 4096;
  const layers = opts.layers ?? 32;
  const r = opts.r ?? 16;
  const m: TensorMap = new Map();
  let seed = 1;
  const fill = (n: number): Float32Array => {
    const d = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      seed = (seed * 1664525 + 1013904223) >>> 0;
      d[i] = (seed / 2 ** 32 - 0.5) * 0.02;
    }
    return d;
  };
  for (let l = 0; l < layers; l++) {
    for (const p of ['q_proj', 'k_proj', 'v_proj', 'o_proj']) {
      const mod = `base_model.model.model.layers.${l}.self_attn.${p}`;
      m.set(`${mod}.lora_A.weight`, { shape: [r, hidden], data: fill(r * hidden) });
      m.set(`${mod}.lora_B.weight`, { shape: [hidden, r], data: fill(hidden * r) });
    }
  }
  return m;
}

export function paramCount(m: TensorMap): number {
  let n = 0;
  for (const t of m.values()) n += numel(t.shape);
  return n;
}

// ---------------------------------------------------------------- (a)

export function benchAggregation(adapter: TensorMap, updates = 4, repeats = 3): Row[] {
  const packed = packTensorMap(adapter);
  // One buffer per update, as uploads are: the fold reads `updates` distinct
  // buffers (none of them hot in cache for the others), and the baselines copy
  // the same buffers. They come from the pool the coordinator receives uploads
  // into (slots of the fold kernels' memory, math/sum.ts UploadBufferPool).
  const pool = new UploadBufferPool(updates + 1);
  const uploads = Array.from({ length: updates }, () => {
    const b = pool.take(packed.bytes.byteLength);
    b.set(packed.bytes);
    return b;
  });
  const flats = uploads.map((b) => new Float32Array(b.buffer, b.byteOffset, b.byteLength / 4));
  const bytes = packed.bytes.byteLength * updates;
  let best = Infinity;
  for (let r = 0; r < repeats; r++) {
    // Outside the timing, as at round start: allocating and touching the float64 sum.
    const acc = new MeanAggregator(adapter);
    const maps = uploads.map((b) => unpackTensorMap(packed.manifest, b));
    const [, ms] = time(() => {
      for (let k = 0; k < updates; k++) acc.add({ tensors: maps[k]!, weight: 10 + k });
      acc.flush(); // whatever is still queued is folded inside the timed region
    });
    best = Math.min(best, ms);
    acc.dispose();
  }
  const dst = new Float32Array(packed.bytes.byteLength / 4);
  dst.fill(0); // its pages touched, as the aggregator's sum is by its constructor (outside the timing)
  const dstBuf = Buffer.from(dst.buffer);
  const srcBufs = uploads.map((b) => Buffer.from(b.buffer, b.byteOffset, b.byteLength));
  let bestSet = Infinity;
  let bestCopy = Infinity;
  for (let r = 0; r < repeats; r++) {
    bestSet = Math.min(bestSet, time(() => { for (let k = 0; k < updates; k++) dst.set(flats[k]!); })[1]);
    bestCopy = Math.min(bestCopy, time(() => { for (let k = 0; k < updates; k++) srcBufs[k]!.copy(dstBuf); })[1]);
  }
  for (const b of uploads) pool.give(b);
  const gbps = (ms: number): number => bytes / 1e9 / (ms / 1000);
  return [
    {
      what: `(a) FedAvg fold, ${updates} updates x ${(packed.bytes.byteLength / MB).toFixed(0)} MB`,
      value: `${gbps(best).toFixed(2)} GB/s`,
      baseline: `TypedArray.set ${gbps(bestSet).toFixed(2)} GB/s`,
      ratio: `${(gbps(best) / gbps(bestSet)).toFixed(2)}x`,
    },
    {
      what: '',
      value: '',
      baseline: `Buffer.copy ${gbps(bestCopy).toFixed(2)} GB/s`,
      ratio: `${(gbps(best) / gbps(bestCopy)).toFixed(2)}x`,
    },
  ];
}

// ---------------------------------------------------------------- raw TCP baseline

/** Milliseconds for a loopback TCP socket to carry `total` bytes written as `chunk`-sized writes of `payload`. */
export async function rawTcp(payload: Uint8Array, total: number, chunk = 1 << 20): Promise<number> {
  const server = createServer((sock) => {
    let sent = 0;
    const pump = (): void => {
      while (sent < total) {
        const n = Math.min(chunk, total - sent);
        const off = sent % payload.byteLength;
        const piece = payload.subarray(off, Math.min(off + n, payload.byteLength));
        sent += piece.byteLength;
        if (!sock.write(piece)) {
          sock.once('drain', pump);
          return;
        }
      }
      sock.end();
    };
    pump();
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;
  const [, ms] = await timeAsync(
    () =>
      new Promise<void>((resolve, reject) => {
        let got = 0;
        const c = connect(port, '127.0.0.1');
        c.on('data', (d: Buffer) => (got += d.byteLength));
        c.on('end', () => (got === total ? resolve() : reject(new Error(`raw TCP: got ${got} of ${total} bytes`))));
        c.on('error', reject);
      }),
  );
  server.close();
  return ms;
}

// ---------------------------------------------------------------- an in-process coordinator around a synthetic adapter

interface BenchCoordinator {
  address: string;
  cfg: RunConfig;
  bus: MemoryBus;
  run: FederatedRun;
  close(): Promise<void>;
}

async function benchCoordinator(adapter: TensorMap, over: Record<string, unknown>): Promise<BenchCoordinator> {
  const dir = mkdtempSync(join(tmpdir(), 'fedtune-bench-'));
  const cfg = parseRunConfig({
    name: 'bench',
    model: { path: '(synthetic)' },
    lora: { r: 16, alpha: 32, target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] },
    training: { steps: 1, batch_size: 1 },
    rounds: 1,
    eval: { every: 0 },
    checkpoint: { dir },
    server: { listen: '127.0.0.1:0', join_token: 'bench', heartbeat_timeout_ms: 120_000 },
    ...over,
  });
  const store = federatedStore(cfg, false);
  const bus = new MemoryBus({ ringSize: 100_000 });
  const registry = new WorkerRegistry(cfg.server.heartbeat_timeout_ms);
  const run = new FederatedRun({ cfg, bus, registry, store, strategy: createStrategy(cfg, []), global: adapter, globalRank: 16, state: newRunState(cfg, ''), resumed: false });
  registry.listener = run;
  const server = new grpc.Server();
  let bulk: BulkServer | null = null;
  const ctx = { cfg, run, registry, modelFingerprint: '', bulkPort: () => bulk?.port ?? 0 };
  const transfers = createTransfers(ctx);
  server.addService(CoordinatorService, createCoordinatorService(ctx, transfers));
  const port = await new Promise<number>((res, rej) => server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (e, p) => (e ? rej(e) : res(p))));
  bulk = await startBulkServer({ transfers, host: '127.0.0.1', port: 0, tls: null, mutual: false });
  return {
    address: `127.0.0.1:${port}`,
    cfg,
    bus,
    run,
    async close() {
      run.stop();
      registry.close();
      server.forceShutdown();
      await bulk?.close();
      await bus.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

// ---------------------------------------------------------------- (b)

const PYTHON = '/usr/bin/python3';

/** Debian's Python can run the Python client (grpcio, protobuf, numpy). */
function pythonClientRuns(): boolean {
  return spawnSync(PYTHON, ['-c', 'import grpc, google.protobuf, numpy'], { stdio: 'ignore' }).status === 0;
}

/**
 * Milliseconds of each download by a separate process over `mode`: a fedtune worker's connection
 * (bench/transfer-client.ts), or with `python` the Python client (bench/transfer_client.py).
 */
async function downloadsFromChild(address: string, mode: 'bulk' | 'grpc', n: number, python = false): Promise<number[]> {
  const out = await new Promise<string>((resolve, reject) => {
    const [cmd, args] = python
      ? [PYTHON, [join(import.meta.dirname, 'transfer_client.py'), address, mode, String(n)]]
      : [process.execPath, [join(import.meta.dirname, '..', 'bin', 'run-ts.js'), join(import.meta.dirname, 'transfer-client.ts'), address, mode, String(n)]];
    const p = spawn(cmd, args, {
      stdio: ['ignore', 'pipe', 'inherit'],
      env: { ...process.env, FEDTUNE_LOG_LEVEL: 'warn', PYTHONPATH: join(import.meta.dirname, '..', 'clients', 'python'), PYTHONDONTWRITEBYTECODE: '1' },
    });
    let text = '';
    p.stdout!.on('data', (d: Buffer) => (text += d.toString()));
    p.on('error', reject);
    p.on('exit', (code) => (code === 0 ? resolve(text) : reject(new Error(`bench (b): ${python ? 'Python ' : ''}transfer client (${mode}) exited with ${code}`))));
  });
  return (JSON.parse(out.trim().split('\n').at(-1)!) as { ms: number[] }).ms;
}

export async function benchTransfer(adapter: TensorMap, repeats = 3): Promise<{ rows: Row[]; tcpBytesPerMs: number }> {
  const c = await benchCoordinator(adapter, {});
  const packed = packTensorMap(adapter);
  const bytes = packed.bytes.byteLength;
  // The downloading side is its own process, as a worker is; the baseline moves the same bytes between two processes.
  const n = Math.max(3, repeats * 2);
  const bulkMs = await downloadsFromChild(c.address, 'bulk', n);
  const grpcMs = await downloadsFromChild(c.address, 'grpc', Math.max(2, repeats));
  const py = pythonClientRuns();
  const pyBulkMs = py ? await downloadsFromChild(c.address, 'bulk', n, true) : [];
  const pyGrpcMs = py ? await downloadsFromChild(c.address, 'grpc', Math.max(2, repeats), true) : [];
  const tcpBytesPerMs = await rawTcpBetweenProcesses(bytes, Math.max(3, repeats));
  // The receiver checks the digest of every byte: SHA-256's own rate on this machine bounds the transfer too.
  let hashMs = Infinity;
  for (let r = 0; r < 3; r++) hashMs = Math.min(hashMs, time(() => createHash('sha256').update(packed.bytes).digest())[1]);
  await c.close();
  const mbps = (ms: number): number => bytes / MB / (ms / 1000);
  const tcp = (tcpBytesPerMs * 1000) / MB;
  const best = (xs: number[]): number => Math.min(...xs);
  // A download row: its best rate against raw TCP between processes.
  const vsTcp = (what: string, ms: number[]): Row => ({
    what,
    value: `${mbps(best(ms)).toFixed(0)} MB/s`,
    baseline: `raw TCP between processes ${tcp.toFixed(0)} MB/s`,
    ratio: `${(mbps(best(ms)) / tcp).toFixed(2)}x`,
  });
  return {
    rows: [
      vsTcp(`(b) adapter download over the bulk channel by a worker process, ${(bytes / MB).toFixed(0)} MB + SHA-256 (best of ${n})`, bulkMs),
      { what: '', value: '', baseline: `SHA-256 alone ${mbps(hashMs).toFixed(0)} MB/s`, ratio: `${(mbps(best(bulkMs)) / mbps(hashMs)).toFixed(2)}x` },
      vsTcp('    the same over gRPC, 1 MiB chunks + SHA-256', grpcMs),
      ...(py
        ? [vsTcp('    the Python client (clients/python), bulk channel, into numpy arrays', pyBulkMs), vsTcp('    the Python client over gRPC', pyGrpcMs)]
        : [{ what: `    the Python client: not measured (${PYTHON} lacks grpcio, protobuf or numpy)`, value: '', baseline: '', ratio: '' }]),
    ],
    tcpBytesPerMs,
  };
}
