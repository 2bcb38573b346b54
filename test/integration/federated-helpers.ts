/**
 * Shared pieces of the federated integration tests: a tiny model on disk, small
 * datasets, run configs, real worker / coordinator processes, and waiting on
 * run events.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll } from 'vitest';
import { parseRunConfig, type RunConfig } from '../../common/config.ts';
import type { RunEvent } from '../../common/events.ts';
import type { EventBus } from '../../coordinator/events/bus.ts';
import * as grpc from '@grpc/grpc-js';
import { packTensorMap } from '../../common/chunks.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { UpdateKind, WorkerStatus, type CoordinatorMessage, type Task, type RegisterResponse, type UploadMessage } from '../../proto/gen/fedtune/v1/coordinator.ts';
import { DType } from '../../proto/gen/fedtune/v1/tensors.ts';
import { CoordinatorConnection } from '../../worker/agent.ts';
import { initModel } from '../../worker/engine/init.ts';

export const ROOT = join(import.meta.dirname, '..', '..');

const dirs: string[] = [];
// Registered while the importing test file is collected: runs after all its tests.
afterAll(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** A fresh directory under the OS temp dir, removed after the test file's tests. */
export function tempDir(tag: string): string {
  const d = mkdtempSync(join(tmpdir(), `fedtune-${tag}-`));
  dirs.push(d);
  return d;
}

export async function tinyModel(dir: string, seed = 0, dtype: 'float32' | 'bfloat16' = 'float32'): Promise<string> {
  await initModel(dir, { arch: 'llama', hiddenSize: 32, numLayers: 1, numHeads: 2, numKvHeads: 1, maxPositions: 128, seed, dtype });
  return dir;
}

/** n Alpaca records with a site-specific answer. */
export function writeData(path: string, n: number, tag: string): string {
  const lines: string[] = [];
  for (let i = 0; i < n; i++) lines.push(JSON.stringify({ instruction: `Repeat the word ${tag}.`, input: `#${i}`, output: tag }));
  writeFileSync(path, `${lines.join('\n')}\n`);
  return path;
}

type DeepPartial<T> = { [K in keyof T]?: T[K] extends object ? DeepPartial<T[K]> : T[K] };

export function runConfig(dir: string, modelDir: string, over: DeepPartial<RunConfig> & Record<string, unknown> = {}): RunConfig {
  const o = over as Record<string, Record<string, unknown> | unknown>;
  const sect = (k: string): Record<string, unknown> => (typeof o[k] === 'object' && o[k] !== null ? (o[k] as Record<string, unknown>) : {});
  return parseRunConfig({
    ...over,
    name: (over.name as string | undefined) ?? 'test-run',
    model: { path: modelDir, ...sect('model') },
    training: { steps: 2, batch_size: 2, max_seq_len: 64, ...sect('training') },
    rounds: over.rounds ?? 1,
    checkpoint: { dir: join(dir, 'checkpoints'), ...sect('checkpoint') },
    server: { listen: '127.0.0.1:0', join_token: 'test-token', heartbeat_interval_ms: 300, heartbeat_timeout_ms: 5000, ...sect('server') },
    dashboard: { enabled: false },
  });
}

export interface Proc {
  child: ChildProcess;
  out: () => string;
  exited: Promise<number | null>;
  /** Resolves with the first stdout+stderr match of `re`. */
  waitFor(re: RegExp, timeoutMs?: number): Promise<RegExpMatchArray>;
  kill(sig?: NodeJS.Signals): void;
}

export function fedtune(args: string[], env: Record<string, string> = {}): Proc {
  const child = spawn(process.execPath, [join(ROOT, 'bin', 'fedtune.js'), ...args], {
    cwd: ROOT,
    env: { ...process.env, FEDTUNE_LOG_LEVEL: 'info', VITEST: '', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let text = '';
  const listeners = new Set<() => void>();
  const onData = (d: Buffer): void => {
    text += d.toString();
    for (const l of [...listeners]) l();
  };
  child.stdout!.on('data', onData);
  child.stderr!.on('data', onData);
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return {
    child,
    out: () => text,
    exited,
    waitFor(re, timeoutMs = 60_000) {
      return new Promise((resolve, reject) => {
        const check = (): void => {
          const m = text.match(re);
          if (m) {
            listeners.delete(check);
            clearTimeout(t);
            resolve(m);
          }
        };
        const t = setTimeout(() => {
          listeners.delete(check);
          reject(new Error(`timed out waiting for ${re} in output of fedtune ${args[0]}:\n${text.slice(-3000)}`));
        }, timeoutMs);
        listeners.add(check);
        check();
      });
    },
    kill(sig = 'SIGKILL') {
      if (child.exitCode === null && child.signalCode === null) child.kill(sig);
    },
  };
}

export function worker(opts: { address: string; site: string; data: string; model: string; trainer?: string; token?: string; extra?: string[] }): Proc {
  return fedtune([
    'worker',
    '--coordinator', opts.address,
    '--name', opts.site,
    '--data', opts.data,
    '--model', opts.model,
    '--token', opts.token ?? 'test-token',
    '--trainer', opts.trainer ?? 'noop',
    '--progress', 'log',
    '--eval-fraction', '0.2',
    ...(opts.extra ?? []),
  ]);
}

/** The first event of the run matching pred (history included). */
export async function waitForEvent<T extends RunEvent['type']>(
  bus: EventBus,
  runId: string,
  type: T,
  pred: (e: Extract<RunEvent, { type: T }>) => boolean = () => true,
  timeoutMs = 60_000,
): Promise<Extract<RunEvent, { type: T }>> {
  const sub = bus.subscribe({ runId, afterSeq: 0 });
  const timer = setTimeout(() => sub.close(), timeoutMs);
  try {
    for await (const e of sub) {
      if (e.type === type && pred(e as Extract<RunEvent, { type: T }>)) return e as Extract<RunEvent, { type: T }>;
    }
  } finally {
    clearTimeout(timer);
    sub.close();
  }
  throw new Error(`no ${type} event within ${timeoutMs} ms`);
}

export async function events(bus: EventBus, runId: string): Promise<RunEvent[]> {
  return bus.history(runId, 0);
}

/** A worker driven by hand: registers, keeps its session alive, collects tasks. */
export class Probe {
  readonly conn: CoordinatorConnection;
  readonly tasks: Task[] = [];
  private waiters: Array<() => void> = [];
  private call: grpc.ClientDuplexStream<unknown, CoordinatorMessage> | null = null;
  private timer: NodeJS.Timeout | null = null;
  chunkBytes = 0;
  /** The Register answer (worker id, session key, bulk_port). */
  registration: RegisterResponse | null = null;

  constructor(
    address: string,
    private readonly fingerprint: string,
  ) {
    this.conn = new CoordinatorConnection(address);
  }

  async join(site: string, numTrainExamples = 10, numEvalExamples = 0): Promise<void> {
    const reg = await this.conn.register({
      joinToken: 'test-token',
      site,
      previousWorkerId: '',
      capabilities: { device: 'cpu', memoryBytes: 1, backends: ['probe'], modelFingerprint: this.fingerprint, numTrainExamples, numEvalExamples, client: 'probe', protocolVersion: 1 },
    });
    this.chunkBytes = reg.chunkBytes;
    this.registration = reg;
    const call = this.conn.session();
    this.call = call as unknown as grpc.ClientDuplexStream<unknown, CoordinatorMessage>;
    call.on('data', (m: CoordinatorMessage) => {
      if (m.body?.$case === 'task') {
        this.tasks.push(m.body.value);
        for (const w of this.waiters.splice(0)) w();
      }
    });
    call.on('error', () => {});
    const beat = (): void => void call.write({ body: { $case: 'heartbeat', value: { status: WorkerStatus.WORKER_STATUS_IDLE, taskId: '', memoryUsedBytes: 0 } } });
    beat();
    this.timer = setInterval(beat, 200);
  }

  async nextTask(): Promise<Task> {
    while (this.tasks.length === 0) await new Promise<void>((r) => this.waiters.push(r));
    return this.tasks.shift()!;
  }

  close(): void {
    if (this.timer) clearInterval(this.timer);
    this.call?.cancel();
    this.conn.close();
  }
}

/** Send raw upload messages; resolves with the status code and message of the reply. */
export function rawUpload(conn: CoordinatorConnection, messages: UploadMessage[]): Promise<{ code: number; details: string }> {
  return new Promise((resolve) => {
    const md = (conn as unknown as { metadata(): grpc.Metadata }).metadata();
    const call = conn.client.upload(md, (err) => resolve(err ? { code: err.code, details: err.details } : { code: grpc.status.OK, details: '' }));
    for (const m of messages) call.write(m);
    call.end();
  });
}

export function header(task: Task, over: Partial<{ round: number; taskId: string; kind: UpdateKind; numExamples: number; baseVersion: number }>, manifest: Array<{ name: string; dtype: DType; shape: number[] }>, totalBytes: number): UploadMessage {
  return {
    body: {
      $case: 'header',
      value: {
        taskId: over.taskId ?? task.taskId,
        round: over.round ?? task.round,
        kind: over.kind ?? UpdateKind.UPDATE_KIND_ADAPTER_WEIGHTS,
        baseVersion: over.baseVersion ?? task.global!.version,
        numExamples: over.numExamples ?? 10,
        metrics: { train_loss: 1 },
        stream: { totalBytes, chunkBytes: totalBytes, content: { $case: 'tensors', value: { tensors: manifest } } },
      },
    },
  };
}

export function updateMessages(task: Task, adapter: TensorMap, over: Parameters<typeof header>[1] = {}, chunk = 2048): UploadMessage[] {
  const p = packTensorMap(adapter);
  const manifest = p.manifest.map((e) => ({ name: e.name, dtype: DType.DTYPE_F32, shape: e.shape }));
  const msgs: UploadMessage[] = [header(task, over, manifest, p.bytes.byteLength)];
  for (let off = 0; off < p.bytes.byteLength; off += chunk) {
    msgs.push({ body: { $case: 'chunk', value: { offset: off, data: p.bytes.subarray(off, off + chunk) } } });
  }
  msgs.push({ body: { $case: 'trailer', value: { totalBytes: p.bytes.byteLength, sha256: p.sha256 } } });
  return msgs;
}
