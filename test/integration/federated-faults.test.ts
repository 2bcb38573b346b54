/**
 * Bad input at the wire: wrong token, wrong base model, and every kind of bad
 * update, sent by a hand-driven client over real gRPC on loopback to a real
 * coordinator. Each is refused with a precise status and the global adapter is
 * left as it was.
 */
import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { packTensorMap, sha256, unpackTensorMap } from '../../common/chunks.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { readPeftAdapter } from '../../common/peft.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { CoordinatorConnection, isServiceError } from '../../worker/agent.ts';
import { UpdateKind, type UploadMessage } from '../../proto/gen/fedtune/v1/coordinator.ts';
import { DType } from '../../proto/gen/fedtune/v1/tensors.ts';
import { events, fedtune, header, Probe, rawUpload, runConfig, tempDir, tinyModel, updateMessages, waitForEvent, writeData } from './federated-helpers.ts';

let dir: string;
let modelDir: string;
let fingerprint: string;
let coord: CoordinatorHandle;

function scaled(m: TensorMap, k: number): TensorMap {
  return new Map([...m].map(([n, t]) => [n, { shape: [...t.shape], data: Float32Array.from(t.data, (x, i) => x * k + (i % 5) * 0.01) }]));
}

beforeAll(async () => {
  dir = tempDir('faults');
  modelDir = await tinyModel(join(dir, 'model'));
  fingerprint = (await loadModel(modelDir)).fingerprint;
  const cfg = runConfig(dir, modelDir, {
    name: 'faults',
    rounds: 2,
    lora: { r: 16 },
    cohort: { min_workers: 2 },
    round: { min_results: 1, deadline_sec: 4 },
    eval: { every: 0 },
    server: { chunk_bytes: 2048, max_chunk_bytes: 4096 },
  });
  coord = await startCoordinator(cfg);
});

afterAll(async () => {
  await coord?.close();
});

describe('registration', () => {
  it('refuses a wrong join token with UNAUTHENTICATED', async () => {
    const c = new CoordinatorConnection(coord.address);
    const err = await c.getRunInfo('wrong').catch((e: unknown) => e);
    expect(isServiceError(err) && err.code).toBe(grpc.status.UNAUTHENTICATED);
    const err2 = await c
      .register({ joinToken: 'nope', site: 's', previousWorkerId: '', capabilities: undefined })
      .catch((e: unknown) => e);
    expect(isServiceError(err2) && err2.code).toBe(grpc.status.UNAUTHENTICATED);
    expect((err2 as grpc.ServiceError).details).toMatch(/join token rejected/);
    c.close();
  });

  it('refuses calls without a session with UNAUTHENTICATED', async () => {
    const c = new CoordinatorConnection(coord.address);
    const err = await new Promise<grpc.ServiceError>((resolve) => {
      const s = c.client.download({ target: { $case: 'adapterVersion', value: 0 }, adapterRank: 0 });
      s.on('error', resolve);
      s.on('data', () => {});
    });
    expect(err.code).toBe(grpc.status.UNAUTHENTICATED);
    c.close();
  });

  it('refuses a worker process whose base model differs, saying so', async () => {
    const other = await tinyModel(join(dir, 'other-model'), 7);
    const data = writeData(join(dir, 'other.jsonl'), 6, 'x');
    const p = fedtune(['worker', '--coordinator', coord.address, '--name', 'stranger', '--data', data, '--model', other, '--token', 'test-token', '--trainer', 'noop']);
    expect(await p.exited).toBe(2);
    expect(p.out()).toMatch(/base model fingerprint mismatch: worker "stranger" has [0-9a-f]{64}, run "faults" expects [0-9a-f]{64}/);
  });
});

describe('bad updates', () => {
  it('are each rejected with a clear error, and the global adapter is unchanged', async () => {
    const a = new Probe(coord.address, fingerprint);
    const b = new Probe(coord.address, fingerprint);
    await a.join('probe-a');
    await b.join('probe-b');
    const [ta, tb] = await Promise.all([a.nextTask(), b.nextTask()]);
    expect(ta.kind?.$case).toBe('train');
    const g = await a.conn.downloadAdapter(ta.global!.version, 1 << 20);
    const good = scaled(g.adapter, 1);
    const p = packTensorMap(good);
    const f32 = p.manifest.map((e) => ({ name: e.name, dtype: DType.DTYPE_F32, shape: e.shape }));
    const trailer = (bytes: Uint8Array): UploadMessage => ({ body: { $case: 'trailer', value: { totalBytes: bytes.byteLength, sha256: sha256(bytes) } } });
    const chunk = (off: number, data: Uint8Array): UploadMessage => ({ body: { $case: 'chunk', value: { offset: off, data } } });

    const cases: Array<[string, UploadMessage[], grpc.status, RegExp]> = [];
    // wrong shape
    const badShape = f32.map((e, i) => (i === 0 ? { ...e, shape: [e.shape[0]! + 1, e.shape[1]!] } : e));
    cases.push(['wrong shape', [header(ta, {}, badShape, p.bytes.byteLength)], grpc.status.INVALID_ARGUMENT, /tensor .*lora_A\.weight: shape \[17, 32\], expected \[16, 32\]/]);
    // wrong dtype
    const badDtype = f32.map((e, i) => (i === 1 ? { ...e, dtype: DType.DTYPE_F64 } : e));
    cases.push(['wrong dtype', [header(ta, {}, badDtype, p.bytes.byteLength)], grpc.status.INVALID_ARGUMENT, /dtype F64, expected F32/]);
    // missing tensor
    cases.push(['missing tensor', [header(ta, {}, f32.slice(1), p.bytes.byteLength)], grpc.status.INVALID_ARGUMENT, /missing tensor/]);
    // NaN and Inf
    for (const [label, v] of [['NaN', NaN], ['Inf', Infinity]] as const) {
      const bad = scaled(g.adapter, 1);
      bad.get(p.manifest[2]!.name)!.data[3] = v;
      cases.push([label, updateMessages(ta, bad), grpc.status.INVALID_ARGUMENT, new RegExp(`tensor ${p.manifest[2]!.name.replace(/\./g, '\\.')} has a non-finite value \\(${v}\\) at element 3`)]);
    }
    // a task it was not given, one that does not exist, the wrong round, a gradient
    cases.push(['task of another worker', updateMessages(tb, good), grpc.status.PERMISSION_DENIED, /was not given to worker probe-a-/]);
    cases.push(['unknown task', updateMessages(ta, good, { taskId: 'r1-train-0-deadbeef' }), grpc.status.NOT_FOUND, /task r1-train-0-deadbeef is not known/]);
    cases.push(['wrong round', updateMessages(ta, good, { round: 7 }), grpc.status.INVALID_ARGUMENT, /round 7 in the header, but task .* belongs to round 1/]);
    cases.push(['wrong kind', updateMessages(ta, good, { kind: UpdateKind.UPDATE_KIND_GRADIENT }), grpc.status.INVALID_ARGUMENT, /UPDATE_KIND_GRADIENT is not accepted/]);
    cases.push(['zero examples', updateMessages(ta, good, { numExamples: 0 }), grpc.status.INVALID_ARGUMENT, /num_examples must be a positive integer/]);
    // A site cannot outweigh the others: finite values near 1e38, or more examples than it registered (10)
    const huge = scaled(g.adapter, 1);
    huge.get(p.manifest[1]!.name)!.data[2] = 1e38;
    cases.push(['values near 1e38', updateMessages(ta, huge), grpc.status.INVALID_ARGUMENT, /has a value of 9\.99.*e\+37 at element 2, beyond defence\.max_abs = 10000/]);
    cases.push(['inflated examples', updateMessages(ta, good, { numExamples: 2 ** 53 - 1 }), grpc.status.INVALID_ARGUMENT, /num_examples 9007199254740991 is more than the 10 training examples site probe-a registered/]);
    cases.push(['11 of 10 examples', updateMessages(ta, good, { numExamples: 11 }), grpc.status.INVALID_ARGUMENT, /num_examples 11 is more than the 10 training examples/]);
    // oversized chunk (limit 4096), bad digest, chunk before header
    cases.push(['oversized chunk', [header(ta, {}, f32, p.bytes.byteLength), chunk(0, p.bytes.subarray(0, 5000))], grpc.status.RESOURCE_EXHAUSTED, /chunk of 5000 bytes exceeds the limit of 4096 bytes/]);
    const flipped = p.bytes.slice();
    flipped[10]! ^= 0xff;
    cases.push(['corrupt bytes', [header(ta, {}, f32, p.bytes.byteLength), chunk(0, flipped.subarray(0, 4096)), chunk(4096, flipped.subarray(4096)), trailer(p.bytes)], grpc.status.DATA_LOSS, /SHA-256 mismatch/]);
    cases.push(['no header', [chunk(0, p.bytes.subarray(0, 16))], grpc.status.INVALID_ARGUMENT, /must start with a header/]);

    for (const [label, msgs, code, re] of cases) {
      const r = await rawUpload(a.conn, msgs);
      expect({ label, code: grpc.status[r.code] }).toEqual({ label, code: grpc.status[code] });
      expect(r.details, label).toMatch(re);
    }
    // Nothing was aggregated: round 1 is still open and no checkpoint beyond round 0 exists.
    expect(existsSync(join(coord.runDir, 'round-0001'))).toBe(false);
    const rejected = (await events(coord.bus, coord.runId)).filter((e) => e.type === 'update.rejected');
    expect(rejected.length).toBe(cases.length);

    // The good update goes through; b never answers, so the round closes at its deadline with a's alone.
    expect((await rawUpload(a.conn, updateMessages(ta, good))).code).toBe(grpc.status.OK);
    const dup = await rawUpload(a.conn, updateMessages(ta, good));
    expect(grpc.status[dup.code]).toBe('ALREADY_EXISTS');
    expect(dup.details).toMatch(/duplicate update: task .* was already received/);
    const done = await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1);
    expect(done.participants).toBe(1);
    // b's late upload for the closed round is stale.
    const late = await rawUpload(b.conn, updateMessages(tb, good));
    expect(grpc.status[late.code]).toBe('FAILED_PRECONDITION');
    expect(late.details).toMatch(/stale update: task .* of round 1 is closed/);

    // With one update, FedAvg's result is exactly that update: none of the rejected ones leaked in.
    const saved = (await readPeftAdapter(join(coord.runDir, 'round-0001'))).adapter;
    for (const [name, t] of good) expect([...saved.get(name)!.data], name).toEqual([...t.data]);
    const again = unpackTensorMap(p.manifest, p.bytes);
    expect(again.size).toBe(good.size);
    a.close();
    b.close();
  });
});

describe('transport', () => {
  it('round-trips a multi-chunk adapter download with the announced digest', async () => {
    const c = new CoordinatorConnection(coord.address);
    await c.register({
      joinToken: 'test-token', site: 'reader', previousWorkerId: '',
      capabilities: { device: 'cpu', memoryBytes: 1, backends: [], modelFingerprint: fingerprint, numTrainExamples: 0, numEvalExamples: 0, client: 't', protocolVersion: 1 },
    });
    const got = await c.downloadAdapter(0, 4096);
    const init = await readPeftAdapter(join(coord.runDir, 'round-0000'));
    expect(got.bytes).toBeGreaterThan(4096); // several 2048-byte chunks
    for (const [name, t] of init.adapter) expect([...got.adapter.get(name)!.data]).toEqual([...t.data]);
    expect(JSON.parse(readFileSync(join(coord.runDir, 'round-0000', 'state.json'), 'utf8')).round).toBe(0);
    c.close();
  });
});
