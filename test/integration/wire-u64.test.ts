/**
 * 64-bit fields beyond 2^53 - 1 on the wire: the generated decoders cannot
 * represent them as numbers. The coordinator refuses such a message with
 * INVALID_ARGUMENT naming the field (never INTERNAL), and a heartbeat or
 * progress report carrying one is dropped without ending the worker's session.
 */
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { BinaryWriter } from '@bufbuild/protobuf/wire';
import { beforeAll, describe, expect, it } from 'vitest';
import { startCoordinator } from '../../coordinator/main.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { findUnrepresentable, MAX_EXACT_INTEGER } from '../../common/wire-decode.ts';
import {
  Task,
  UploadMessage,
  WorkerMessage,
  WorkerStatus,
  type CoordinatorMessage,
  type RegisterRequest,
} from '../../proto/gen/fedtune/v1/coordinator.ts';
import { DType } from '../../proto/gen/fedtune/v1/tensors.ts';
import { CoordinatorConnection } from '../../worker/agent.ts';
import { Probe, events, header, rawUpload, runConfig, tempDir, tinyModel, waitForEvent } from './federated-helpers.ts';

const U64_MAX = 2n ** 64n - 1n;
const TWO_53 = 2n ** 53n;
/** A bigint where the generated types say number: the generated encoders write it as an exact uint64. */
const big = (v: bigint): number => v as unknown as number;

let dir: string;
let modelDir: string;
let fingerprint: string;

beforeAll(async () => {
  dir = tempDir('wire-u64');
  modelDir = await tinyModel(join(dir, 'model'));
  fingerprint = (await loadModel(modelDir)).fingerprint;
});

function registration(site: string, memoryBytes: number): RegisterRequest {
  return {
    joinToken: 'test-token',
    site,
    previousWorkerId: '',
    capabilities: { device: 'cpu', memoryBytes, backends: ['probe'], modelFingerprint: fingerprint, numTrainExamples: 10, numEvalExamples: 0, client: 'probe', protocolVersion: 1 },
  };
}

function unaryStatus<Req>(fn: (req: Req, cb: (err: grpc.ServiceError | null) => void) => unknown, req: Req): Promise<{ code: string; details: string }> {
  return new Promise((resolve) => {
    fn(req, (err) => resolve(err ? { code: grpc.status[err.code], details: err.details } : { code: 'OK', details: '' }));
  });
}

describe('finding the field (the descriptors of proto/fedtune/v1 against the generated decoders)', () => {
  const heartbeat = (v: bigint): Uint8Array =>
    WorkerMessage.encode({ body: { $case: 'heartbeat', value: { status: WorkerStatus.WORKER_STATUS_IDLE, taskId: 't', memoryUsedBytes: big(v) } } }).finish();

  it('is found exactly where the generated decoder fails: 2^53 - 1 decodes, 2^53 and above are named', () => {
    for (const v of [0n, 1n, MAX_EXACT_INTEGER - 1n, MAX_EXACT_INTEGER, TWO_53, TWO_53 + 1n, 2n ** 63n, U64_MAX]) {
      const bytes = heartbeat(v);
      let decoded: WorkerMessage | null = null;
      try {
        decoded = WorkerMessage.decode(bytes);
      } catch {
        decoded = null;
      }
      const found = findUnrepresentable('fedtune.v1.WorkerMessage', bytes);
      expect(found === null, `value ${v}`).toBe(decoded !== null);
      if (decoded?.body?.$case === 'heartbeat') expect(BigInt(decoded.body.value.memoryUsedBytes)).toBe(v);
      if (found) expect(found).toEqual({ path: ['heartbeat', 'memory_used_bytes'], field: 'Heartbeat.memory_used_bytes', type: 'uint64', value: v });
    }
  });

  it('walks nested, repeated and packed fields (an upload header tensor shape) and signed int64', () => {
    const manifest = [
      { name: 'a', dtype: DType.DTYPE_F32, shape: [4, 2] },
      { name: 'b', dtype: DType.DTYPE_F32, shape: [3, big(2n ** 60n)] },
    ];
    const msg = header({ taskId: 't', round: 1, global: { version: 1 } } as unknown as Task, {}, manifest, 32);
    const bytes = UploadMessage.encode(msg).finish();
    expect(() => UploadMessage.decode(bytes)).toThrow(/MAX_SAFE_INTEGER/);
    expect(findUnrepresentable('fedtune.v1.UploadMessage', bytes)).toEqual({
      path: ['header', 'stream', 'tensors', 'tensors', 'shape'],
      field: 'TensorSpec.shape',
      type: 'uint64',
      value: 2n ** 60n,
    });
    // int64 below -(2^53 - 1): Task.deadline_unix_ms, written by hand (the encoder takes a bigint).
    const task = new BinaryWriter().uint32((3 << 3) | 0).int64(-(2n ** 60n)).finish();
    expect(() => Task.decode(task)).toThrow(/MIN_SAFE_INTEGER/);
    expect(findUnrepresentable('fedtune.v1.Task', task)).toEqual({ path: ['deadline_unix_ms'], field: 'Task.deadline_unix_ms', type: 'int64', value: -(2n ** 60n) });
  });
});

describe('over gRPC', () => {
  it('Register, Download, Upload and results are refused by field name; bad heartbeats and progress keep the session', async () => {
    const cfg = runConfig(dir, modelDir, {
      name: 'u64',
      rounds: 1,
      cohort: { min_workers: 2 },
      round: { min_results: 2, deadline_sec: 60 },
      eval: { every: 0 },
    } as Record<string, unknown>);
    const coord = await startCoordinator(cfg);
    const conn = new CoordinatorConnection(coord.address);
    const raw = new grpc.Client(coord.address, grpc.credentials.createInsecure());
    const other = new Probe(coord.address, fingerprint);
    try {
      // Register: Capabilities.memory_bytes = 2^64 - 1 is refused, by name; nothing is registered.
      const reg = await unaryStatus(conn.client.register.bind(conn.client), registration('site-a', big(U64_MAX)));
      expect(reg.code).toBe('INVALID_ARGUMENT');
      expect(reg.details).toContain(`Capabilities.memory_bytes is ${U64_MAX}, above ${MAX_EXACT_INTEGER} (2^53 - 1)`);
      expect(reg.details).toContain('sent as RegisterRequest.capabilities.memory_bytes');
      expect(reg.details).toContain(`send a value at most ${MAX_EXACT_INTEGER}`);
      // Bytes that are not a message at all: INVALID_ARGUMENT too, never INTERNAL.
      const garbage = await new Promise<{ code: string; details: string }>((resolve) => {
        raw.makeUnaryRequest(
          '/fedtune.v1.Coordinator/GetRunInfo',
          (b: Buffer) => b,
          (b: Buffer) => b,
          Buffer.from([0x0a, 0x7f, 0x01]),
          (err) => resolve(err ? { code: grpc.status[err.code], details: err.details } : { code: 'OK', details: '' }),
        );
      });
      expect(garbage.code).toBe('INVALID_ARGUMENT');
      expect(garbage.details).toMatch(/^malformed RunInfoRequest \(/);

      // The same worker with an exact memory size registers.
      await conn.register(registration('site-a', Number(MAX_EXACT_INTEGER)));
      const session = conn.session();
      const received: CoordinatorMessage[] = [];
      const taskArrived = new Promise<Task>((resolve) =>
        session.on('data', (m: CoordinatorMessage) => {
          received.push(m);
          if (m.body?.$case === 'task') resolve(m.body.value);
        }),
      );
      const ended = new Promise<{ code: string; details: string }>((resolve) => session.on('error', (e: grpc.ServiceError) => resolve({ code: grpc.status[e.code], details: e.details })));
      const beat = (memoryUsedBytes: number): void =>
        void session.write({ body: { $case: 'heartbeat', value: { status: WorkerStatus.WORKER_STATUS_IDLE, taskId: '', memoryUsedBytes } } });
      beat(0);
      await waitForEvent(coord.bus, coord.runId, 'worker.joined', (e) => e.worker.site === 'site-a');
      // Heartbeats at 2^53 and 2^64 - 1, and a progress report with 2^64 - 1 examples: dropped, the session stays.
      beat(big(TWO_53));
      beat(big(U64_MAX));
      session.write({ body: { $case: 'progress', value: { taskId: 'none', step: 1, totalSteps: 2, loss: 1, tokensPerSec: 1, examples: big(U64_MAX) } } });
      const timer = setInterval(() => beat(big(U64_MAX)), 200);
      try {
        // A second worker completes the cohort: the round starts and site-a's session, still open, gets its task.
        await other.join('site-b');
        const task = await taskArrived;
        expect(task.round).toBe(1);
        expect(received[0]?.body?.$case).toBe('accepted');
        const left = (await events(coord.bus, coord.runId)).filter((e) => e.type === 'worker.left');
        expect(left).toEqual([]);

        // Download of adapter version 2^64 - 1: refused by name.
        const md = (conn as unknown as { metadata(): grpc.Metadata }).metadata();
        const dl = await new Promise<{ code: string; details: string }>((resolve) => {
          const s = conn.client.download({ target: { $case: 'adapterVersion', value: big(U64_MAX) }, adapterRank: 0 }, md);
          s.on('data', () => {});
          s.on('error', (e: grpc.ServiceError) => resolve({ code: grpc.status[e.code], details: e.details }));
          s.on('end', () => resolve({ code: 'OK', details: '' }));
        });
        expect(dl.code).toBe('INVALID_ARGUMENT');
        expect(dl.details).toContain(`DownloadRequest.adapter_version is ${U64_MAX}`);

        // Upload whose header claims 2^53 examples (the aggregation weight): refused by name.
        const manifest = [{ name: 'x', dtype: DType.DTYPE_F32, shape: [1] }];
        const up = await rawUpload(conn, [header(task, { numExamples: big(TWO_53) }, manifest, 4)]);
        expect(grpc.status[up.code]).toBe('INVALID_ARGUMENT');
        expect(up.details).toContain(`UploadHeader.num_examples is ${TWO_53}`);
        expect(up.details).toContain('sent as UploadMessage.header.num_examples');

        // The session lived through all of it. A result that cannot be represented ends it, naming the field.
        expect((await events(coord.bus, coord.runId)).filter((e) => e.type === 'worker.left')).toEqual([]);
        session.write({ body: { $case: 'evalResult', value: { taskId: task.taskId, hasEvalData: true, evalLoss: 1, evalTokens: big(U64_MAX), evalExamples: 1 } } });
        const end = await ended;
        expect(end.code).toBe('INVALID_ARGUMENT');
        expect(end.details).toContain(`EvalResult.eval_tokens is ${U64_MAX}`);
        expect(end.details).toContain('the session is closed (register again)');
        const gone = await waitForEvent(coord.bus, coord.runId, 'worker.left', (e) => e.site === 'site-a');
        expect(gone.reason).toContain('EvalResult.eval_tokens');
      } finally {
        clearInterval(timer);
        session.cancel();
      }
    } finally {
      other.close();
      conn.close();
      raw.close();
      await coord.close();
    }
  });
});
