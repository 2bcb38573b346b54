/**
 * The bulk tensor channel (coordinator/bulk.ts, worker/bulk.ts): worker
 * processes move adapters and updates over it, and at the byte level it holds
 * the gRPC streams' line: a connection that sends nothing holds no upload slot
 * and is closed when idle, a bad preamble, a wrong session, a 64-bit field out
 * of range and a corrupted or cut-off upload are refused by name, and nothing of
 * a refused upload counts.
 */
import { createHash } from 'node:crypto';
import { connect, createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { packTensorMap } from '../../common/chunks.ts';
import { readPeftAdapter } from '../../common/peft.ts';
import { BinaryWriter } from '@bufbuild/protobuf/wire';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { BulkRequest, BulkResponse, UpdateKind, type Task, type UploadHeader } from '../../proto/gen/fedtune/v1/coordinator.ts';
import { DType } from '../../proto/gen/fedtune/v1/tensors.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { initModel } from '../../worker/engine/init.ts';
import { BulkClient } from '../../worker/bulk.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { events, Probe, runConfig, tempDir, tinyModel, waitForEvent, worker, writeData } from './federated-helpers.ts';

let dir: string;
let modelDir: string;
let fingerprint: string;

beforeAll(async () => {
  dir = tempDir('bulk');
  modelDir = await tinyModel(join(dir, 'model'));
  fingerprint = (await loadModel(modelDir)).fingerprint;
});

interface Answer {
  code: number;
  message: string;
  response: BulkResponse | null;
  /** Raw bytes after the response frame (a download's body and digest). */
  rest: Buffer;
}

/** Connect to the bulk port, write `parts` (a part that is a number: wait that many ms), read until the server closes. */
function bulkRaw(port: number, parts: Array<Uint8Array | number>): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const sock = connect(port, '127.0.0.1');
    const got: Buffer[] = [];
    sock.on('data', (d) => got.push(d));
    sock.on('error', () => {});
    sock.on('close', () => {
      const all = Buffer.concat(got);
      if (all.byteLength < 4) return resolve({ code: -1, message: 'closed without an answer', response: null, rest: Buffer.alloc(0) });
      const n = all.readUInt32LE(0);
      const response = BulkResponse.decode(all.subarray(4, 4 + n));
      resolve({ code: response.code, message: response.message, response, rest: all.subarray(4 + n) });
    });
    sock.on('connect', async () => {
      try {
        for (const p of parts) {
          if (typeof p === 'number') await new Promise((r) => setTimeout(r, p));
          else if (!sock.destroyed) sock.write(p);
        }
      } catch (err) {
        reject(err);
      }
    });
  });
}

function frame(body: Uint8Array, magic = 'FTB1'): Buffer {
  const out = Buffer.alloc(8 + body.byteLength);
  out.write(magic, 0, 'latin1');
  out.writeUInt32LE(body.byteLength, 4);
  out.set(body, 8);
  return out;
}

function request(p: Probe, op: BulkRequest['op'], sessionKey?: string): Buffer {
  const reg = p.registration!;
  return frame(BulkRequest.encode({ workerId: reg.workerId, sessionKey: sessionKey ?? reg.sessionKey, op }).finish());
}

function uploadHeader(task: Task, adapter: TensorMap, over: Partial<UploadHeader> = {}): { header: UploadHeader; bytes: Uint8Array; sha256: Uint8Array } {
  const p = packTensorMap(adapter);
  return {
    header: {
      taskId: task.taskId,
      round: task.round,
      kind: UpdateKind.UPDATE_KIND_ADAPTER_WEIGHTS,
      baseVersion: task.global!.version,
      numExamples: 10,
      metrics: { train_loss: 1 },
      stream: { totalBytes: p.bytes.byteLength, chunkBytes: p.bytes.byteLength, content: { $case: 'tensors', value: { tensors: p.manifest.map((e) => ({ name: e.name, dtype: DType.DTYPE_F32, shape: e.shape })) } } },
      ...over,
    },
    bytes: p.bytes,
    sha256: p.sha256,
  };
}

describe('worker processes over the bulk channel', () => {
  it('a round moves every adapter and update over the bulk channel; with server.bulk_port null, or for a worker started with --no-bulk, over gRPC, to the same result', async () => {
    const results: Record<string, number[]> = {};
    const finals: Record<string, TensorMap> = {};
    for (const [name, bulkPort, siteBOptsOut] of [
      ['bulk-on', 0, false],
      ['bulk-off', null, false],
      ['worker-no-bulk', 0, true],
    ] as const) {
      const cfg = runConfig(dir, modelDir, {
        name,
        rounds: 2,
        cohort: { min_workers: 2 },
        round: { min_results: 2, deadline_sec: 60 },
        eval: { every: 0 },
        server: { bulk_port: bulkPort },
      } as Record<string, unknown>);
      const coord = await startCoordinator(cfg);
      const onGrpc = (s: string): boolean => bulkPort === null || (siteBOptsOut && s === 'b');
      const ws = ['a', 'b'].map((s) => ({
        s,
        w: worker({ address: coord.address, site: `site-${s}`, data: writeData(join(dir, `${name}-${s}.jsonl`), 20, s), model: modelDir, extra: siteBOptsOut && s === 'b' ? ['--no-bulk'] : [] }),
      }));
      try {
        const done = await coord.run;
        expect(done.state).toBe('completed');
        for (const { s, w } of ws) {
          const out = w.out();
          const transports = [...out.matchAll(/"transport":"([^"]+)"/g)].map((m) => m[1]!);
          expect(transports.length).toBeGreaterThanOrEqual(4); // 2 downloads + 2 uploads
          for (const t of transports) expect(t).toMatch(onGrpc(s) ? /^grpc$/ : /^bulk 127\.0\.0\.1:\d+$/);
        }
        const ev = await events(coord.bus, coord.runId);
        results[name] = ev.filter((e) => e.type === 'update.received').map((e) => (e as { bytes: number }).bytes);
        finals[name] = (await readPeftAdapter(done.finalAdapterPath!)).adapter;
      } finally {
        for (const { w } of ws) w.kill();
        await coord.close();
      }
    }
    expect(results['bulk-on']!.length).toBe(4);
    const bytesOf = (t: { data: Float32Array | Float64Array }): Buffer => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    for (const other of ['bulk-off', 'worker-no-bulk']) {
      expect(results[other]).toEqual(results['bulk-on']);
      // The noop trainer's deterministic perturbation makes the runs' final adapters bit-identical when every byte arrived intact.
      expect([...finals[other]!.keys()]).toEqual([...finals['bulk-on']!.keys()]);
      for (const [k, t] of finals['bulk-on']!) expect(bytesOf(t).equals(bytesOf(finals[other]!.get(k)!)), `${other}: ${k}`).toBe(true);
    }
  });
});

describe('bulk channel at the byte level', () => {
  let coord: CoordinatorHandle;
  let p: Probe;
  let port: number;
  let task: Task;
  let adapter: TensorMap;

  beforeAll(async () => {
    const cfg = runConfig(dir, modelDir, {
      name: 'bulk-raw',
      rounds: 1,
      cohort: { min_workers: 1 },
      round: { min_results: 1, deadline_sec: 120 },
      eval: { every: 0 },
      server: { max_concurrent_uploads: 2, upload_idle_timeout_sec: 1.5, upload_timeout_sec: 2.5 },
    } as Record<string, unknown>);
    coord = await startCoordinator(cfg);
    p = new Probe(coord.address, fingerprint);
    await p.join('probe-bulk');
    port = p.registration!.bulkPort;
    task = await p.nextTask();
    adapter = (await p.conn.downloadAdapter(task.global!.version, 1 << 20)).adapter;
  });
  afterAll(async () => {
    p?.close();
    await coord?.close();
  });

  it('the advertised port serves the global adapter: raw bytes then their SHA-256', async () => {
    expect(port).toBeGreaterThan(0);
    expect(p.conn.transport).toBe(`bulk 127.0.0.1:${port}`);
    const a = await bulkRaw(port, [request(p, { $case: 'download', value: { target: { $case: 'adapterVersion', value: task.global!.version }, adapterRank: 0 } })]);
    expect(a.code).toBe(0);
    const total = a.response!.body?.$case === 'header' ? a.response!.body.value.totalBytes : -1;
    const packed = packTensorMap(adapter);
    expect(total).toBe(packed.bytes.byteLength);
    expect(a.rest.byteLength).toBe(total + 32);
    expect(Buffer.compare(a.rest.subarray(0, total), Buffer.from(packed.bytes))).toBe(0);
    const digest = createHash('sha256').update(a.rest.subarray(0, total)).digest();
    expect(Buffer.compare(a.rest.subarray(total), digest)).toBe(0);
    expect(Buffer.from(task.global!.sha256).equals(digest)).toBe(true);
  });

  it('refuses a bad preamble, an unknown session and a 64-bit field out of range, by name', async () => {
    // A request trickled a byte at a time (never idle for the 1.5 s idle timeout) is cut off at the request deadline.
    const t0 = Date.now();
    const trickle = await bulkRaw(port, [Buffer.from('F'), 500, Buffer.from('T'), 500, Buffer.from('B'), 500, Buffer.from('1'), 500, Buffer.from([1]), 500, Buffer.from([0])]);
    expect(grpc.status[trickle.code]).toBe('DEADLINE_EXCEEDED');
    expect(trickle.message).toMatch(/no complete bulk request within 1\.5 s of connecting/);
    expect(Date.now() - t0).toBeLessThan(2900);

    const bad = await bulkRaw(port, [Buffer.from('GET / HTTP/1.1\r\n\r\n')]);
    expect(grpc.status[bad.code]).toBe('INVALID_ARGUMENT');
    expect(bad.message).toMatch(/preamble "FTB1"/);

    const stranger = await bulkRaw(port, [request(p, { $case: 'download', value: { target: { $case: 'adapterVersion', value: 0 }, adapterRank: 0 } }, 'ab'.repeat(32))]);
    expect(grpc.status[stranger.code]).toBe('UNAUTHENTICATED');
    expect(stranger.message).not.toContain(p.registration!.sessionKey);

    // BulkRequest{worker_id, session_key, upload{ task_id, num_examples = 2^60 }} written by hand: 2^60 does not fit a double exactly.
    const reg = p.registration!;
    const inner = new BinaryWriter().uint32(10).string(task.taskId).uint32(40).uint64(1n << 60n).finish();
    const req = new BinaryWriter().uint32(10).string(reg.workerId).uint32(18).string(reg.sessionKey).uint32(34).bytes(inner).finish();
    const huge = await bulkRaw(port, [frame(req)]);
    expect(grpc.status[huge.code]).toBe('INVALID_ARGUMENT');
    expect(huge.message).toMatch(/UploadHeader\.num_examples/);
  });

  it('an upload that trickles (never idle for long) is closed at server.upload_timeout_sec, and nothing of it counts', async () => {
    const u = uploadHeader(task, adapter);
    const parts: Array<Uint8Array | number> = [request(p, { $case: 'upload', value: u.header })];
    for (let i = 0; i < 8; i++) parts.push(500, u.bytes.subarray(i * 10, (i + 1) * 10));
    const t0 = Date.now();
    const slow = await bulkRaw(port, parts);
    expect(grpc.status[slow.code]).toBe('DEADLINE_EXCEEDED');
    expect(slow.message).toMatch(/not complete 2\.5 s after it got its slot \(server\.upload_timeout_sec; \d+ bytes arrived\); nothing of it was used/);
    expect(Date.now() - t0).toBeLessThan(8000);
  });

  it('connections that send nothing hold no slot and are closed, a quiet upload is closed when idle, a corrupted upload is refused and a clean one then counts', async () => {
    // Four silent connections, twice the slots there are, and one that stops after its preamble.
    const silent = Array.from({ length: 4 }, () => bulkRaw(port, []));
    const half = bulkRaw(port, [Buffer.from('FTB1')]);
    await new Promise((r) => setTimeout(r, 200));
    const u = uploadHeader(task, adapter);
    const corrupt = Uint8Array.from(u.bytes);
    corrupt[5]! ^= 0xff;
    const bad = await bulkRaw(port, [request(p, { $case: 'upload', value: u.header }), corrupt, u.sha256]);
    expect(grpc.status[bad.code]).toBe('DATA_LOSS');
    expect(bad.message).toMatch(/SHA-256 mismatch/);
    // Cut off half way: nothing counts, the task stays open.
    // Authenticated, then quiet after 100 bytes: the idle timeout closes it.
    const cut = await bulkRaw(port, [request(p, { $case: 'upload', value: u.header }), u.bytes.subarray(0, 100)]);
    expect(grpc.status[cut.code]).toBe('DEADLINE_EXCEEDED');
    expect(cut.message).toMatch(/bulk transfer sent nothing for 1\.5 s \(server\.upload_idle_timeout_sec\)/);
    const inPlaceBefore = coord.bulk!.bytesReadInPlace;
    const ok = await bulkRaw(port, [request(p, { $case: 'upload', value: u.header }), u.bytes.subarray(0, 1000), 20, u.bytes.subarray(1000), u.sha256]);
    expect(grpc.status[ok.code]).toBe('OK');
    // Plain TCP: what came after the request's own read went from the socket straight into the reassembly buffer.
    const inPlace = coord.bulk!.bytesReadInPlace - inPlaceBefore;
    expect(inPlace).toBeGreaterThanOrEqual(u.bytes.byteLength - 1000);
    expect(inPlace).toBeLessThanOrEqual(u.bytes.byteLength);
    expect(ok.response!.body?.$case === 'ack' && ok.response!.body.value.bytes).toBe(u.bytes.byteLength);
    for (const s of [...(await Promise.all(silent)), await half]) {
      expect(grpc.status[s.code]).toBe('DEADLINE_EXCEEDED');
      // Unauthenticated, so the request deadline (the idle timeout when shorter than 10 s) closes them.
      expect(s.message).toMatch(/no complete bulk request within 1\.5 s of connecting/);
    }
    // A second upload for the same task is refused: one upload per task.
    const again = await bulkRaw(port, [request(p, { $case: 'upload', value: u.header }), u.bytes, u.sha256]);
    expect(grpc.status[again.code]).toMatch(/FAILED_PRECONDITION|ALREADY_EXISTS/);
    const done = await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1);
    expect(done.round).toBe(1);
    const ev = await events(coord.bus, coord.runId);
    expect(ev.filter((e) => e.type === 'update.received')).toHaveLength(1);
    const rejected = ev.filter((e) => e.type === 'update.rejected').map((e) => (e as { reason: string }).reason);
    expect(rejected.some((r) => /SHA-256 mismatch/.test(r))).toBe(true);
  });
});

describe('a worker that cannot reach the bulk port', () => {
  it('uses the gRPC streams after one failed connection, and its transfers still arrive', async () => {
    // The coordinator listens on 127.0.0.2; the worker reaches its gRPC port only through a proxy on
    // 127.0.0.1, where nothing listens on the advertised bulk port (a firewall that passes only gRPC).
    const cfg = runConfig(dir, modelDir, { name: 'bulk-unreachable', rounds: 1, cohort: { min_workers: 1 }, round: { min_results: 1, deadline_sec: 60 }, eval: { every: 0 }, server: { listen: '127.0.0.2:0' } } as Record<string, unknown>);
    const coord = await startCoordinator(cfg);
    const proxy = createServer((c) => {
      const up = connect(coord.port, '127.0.0.2');
      c.pipe(up).pipe(c);
      c.on('error', () => up.destroy());
      up.on('error', () => c.destroy());
    });
    await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', r));
    const p = new Probe(`127.0.0.1:${(proxy.address() as AddressInfo).port}`, fingerprint);
    try {
      await p.join('probe-fallback');
      expect(p.registration!.bulkPort).toBeGreaterThan(0);
      expect(p.conn.transport).toMatch(/^bulk 127\.0\.0\.1:/);
      const task = await p.nextTask();
      const got = await p.conn.downloadAdapter(task.global!.version, 1 << 20);
      expect(Buffer.from(got.sha256).equals(Buffer.from(task.global!.sha256))).toBe(true);
      expect(p.conn.transport).toBe('grpc');
      const ack = await p.conn.upload({ taskId: task.taskId, round: task.round, kind: UpdateKind.UPDATE_KIND_ADAPTER_WEIGHTS, baseVersion: task.global!.version, numExamples: 10, metrics: { train_loss: 1 } }, got.adapter);
      expect(ack.bytes).toBe(got.bytes);
      const done = await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1);
      expect(done.participants).toBe(1);
    } finally {
      p.close();
      proxy.close();
      await coord.close();
    }
  });
});

describe('the worker side against a coordinator that lies', () => {
  it('refuses a download announcing more bytes than the task did, before allocating them, and a wrong digest', async () => {
    const answers: Buffer[] = [];
    const fake = createServer((c) => {
      c.once('data', () => {
        const a = answers.shift()!;
        c.end(a);
      });
      c.on('error', () => {});
    });
    await new Promise<void>((r) => fake.listen(0, '127.0.0.1', r));
    const port = (fake.address() as AddressInfo).port;
    const respond = (totalBytes: number, body: Uint8Array, digest: Uint8Array): Buffer => {
      const msg = BulkResponse.encode({ code: 0, message: '', body: { $case: 'header', value: { totalBytes, chunkBytes: 0, content: { $case: 'tensors', value: { tensors: [] } } } } }).finish();
      const len = Buffer.alloc(4);
      len.writeUInt32LE(msg.byteLength, 0);
      return Buffer.concat([len, msg, body, digest]);
    };
    const client = new BulkClient('127.0.0.1', port, null, { workerId: 'w', sessionKey: 'k' });
    const req = { target: { $case: 'adapterVersion' as const, value: 1 }, adapterRank: 0 };
    try {
      answers.push(respond(2 ** 40, new Uint8Array(0), new Uint8Array(32)));
      const huge = await client.download(req, 'global adapter v1', 1024).catch((e: unknown) => e as { code: number; details: string });
      expect(grpc.status[(huge as { code: number }).code]).toBe('RESOURCE_EXHAUSTED');
      expect((huge as { details: string }).details).toMatch(/announces 1099511627776 bytes, more than the 1024 allowed/);
      const body = Uint8Array.from({ length: 100 }, (_, i) => i);
      answers.push(respond(100, body, new Uint8Array(32)));
      const bad = await client.download(req, 'global adapter v1', 1024).catch((e: unknown) => e as { code: number; details: string });
      expect(grpc.status[(bad as { code: number }).code]).toBe('DATA_LOSS');
      const good = createHash('sha256').update(body).digest();
      answers.push(respond(100, body, good));
      const ok = await client.download(req, 'global adapter v1', 1024);
      expect(Buffer.from(ok.bytes).equals(Buffer.from(body))).toBe(true);
    } finally {
      fake.close();
    }
  });
});

describe('the bulk channel copying uploads into place (as under TLS, or where a socket cannot read into place)', () => {
  it('a corrupted upload is refused, a clean one written in pieces counts and is the round\'s mean; nothing was read in place', async () => {
    const cfg = runConfig(dir, modelDir, { name: 'bulk-copying', rounds: 1, cohort: { min_workers: 1 }, round: { min_results: 1, deadline_sec: 120 }, eval: { every: 0 } });
    const coord = await startCoordinator(cfg, { bulkReadInPlace: false });
    const p = new Probe(coord.address, fingerprint);
    try {
      await p.join('probe-copying');
      const port = p.registration!.bulkPort;
      const task = await p.nextTask();
      const start = (await p.conn.downloadAdapter(task.global!.version, 1 << 20)).adapter;
      // A trained update: start + a known offset per element, so the mean (one update) is checkable element by element.
      const trained: TensorMap = new Map([...start].map(([k, t]) => [k, { shape: t.shape, data: Float32Array.from(t.data, (x, i) => x + 0.001 * ((i % 5) + 1)) }]));
      const u = uploadHeader(task, trained);
      const corrupt = Uint8Array.from(u.bytes);
      corrupt[7]! ^= 0x40;
      const bad = await bulkRaw(port, [request(p, { $case: 'upload', value: u.header }), corrupt, u.sha256]);
      expect(grpc.status[bad.code]).toBe('DATA_LOSS');
      const ok = await bulkRaw(port, [request(p, { $case: 'upload', value: u.header }), u.bytes.subarray(0, 333), 20, u.bytes.subarray(333, 5000), 20, u.bytes.subarray(5000), u.sha256]);
      expect(grpc.status[ok.code]).toBe('OK');
      expect(ok.response!.body?.$case === 'ack' && ok.response!.body.value.bytes).toBe(u.bytes.byteLength);
      expect(coord.bulk!.bytesReadInPlace).toBe(0);
      expect((await coord.run).state).toBe('completed');
      const global = (await readPeftAdapter(join(coord.runDir, 'round-0001'))).adapter;
      for (const [k, t] of trained) expect(Array.from(global.get(k)!.data)).toEqual(Array.from(t.data));
    } finally {
      p.close();
      await coord.close();
    }
  });
});

describe('a download that outlives its version', () => {
  it('a stalled download of version 1, resumed after version 5, still gets version 1\'s bytes: the buffer the later means reuse is not its', async () => {
    // A 32 MiB adapter (r 512 on q/k/v/o of 4 layers of 512): far more than the socket buffers take
    // while the reader is stalled, so most of it stays queued on the coordinator until it reads again.
    const bigModel = join(dir, 'model-512');
    await initModel(bigModel, { arch: 'llama', hiddenSize: 512, numLayers: 4, numHeads: 8, numKvHeads: 8, intermediateSize: 512 });
    const cfg = runConfig(dir, bigModel, {
      name: 'bulk-lease',
      rounds: 5,
      lora: { r: 512, alpha: 512, target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] },
      training: { steps: 1, batch_size: 1, max_seq_len: 64 },
      cohort: { min_workers: 1 },
      round: { min_results: 1, deadline_sec: 120 },
      eval: { every: 0 },
    } as Record<string, unknown>);
    const coord = await startCoordinator(cfg);
    // The watcher has no data, so it is never picked: it only downloads.
    const p = new Probe(coord.address, (await loadModel(bigModel)).fingerprint);
    const w = worker({ address: coord.address, site: 'trainer', data: writeData(join(dir, 'lease.jsonl'), 8, 'lease'), model: bigModel, extra: ['--noop-step-ms', '400'] });
    try {
      await p.join('watcher', 0, 0);
      await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1);
      const download1 = request(p, { $case: 'download', value: { target: { $case: 'adapterVersion', value: 1 }, adapterRank: 0 } });
      const ref = await bulkRaw(p.registration!.bulkPort, [download1]); // read at once: version 1 as it is
      expect(ref.code).toBe(0);
      const sock = connect(p.registration!.bulkPort, '127.0.0.1');
      const got: Buffer[] = [];
      let received = 0;
      sock.on('data', (d) => {
        got.push(d);
        received += d.byteLength;
      });
      const closed = new Promise<void>((resolve) => sock.on('close', () => resolve()));
      await new Promise<void>((resolve) => sock.on('connect', () => resolve()));
      sock.pause(); // stalled from the start: the coordinator's write of what the socket buffers cannot take waits
      sock.write(download1);
      await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 2);
      const stalledAt = received;
      expect((await coord.run).state).toBe('completed'); // versions 2..5 made meanwhile: 1 is long retired
      sock.resume();
      await closed;
      const all = Buffer.concat(got);
      const n = all.readUInt32LE(0);
      const response = BulkResponse.decode(all.subarray(4, 4 + n));
      const total = response.body?.$case === 'header' ? response.body.value.totalBytes : -1;
      expect(total).toBe(32 << 20);
      expect(stalledAt).toBeLessThan(total / 2); // most of it was still queued when the later versions were made
      const body = all.subarray(4 + n, 4 + n + total);
      const trailer = all.subarray(4 + n + total);
      expect(createHash('sha256').update(body).digest().equals(trailer)).toBe(true);
      // And they are version 1's bytes, as the download read at once got them.
      expect(Buffer.concat([body, trailer]).equals(ref.rest)).toBe(true);
    } finally {
      w.kill();
      p.close();
      await coord.close();
    }
  }, 120_000);
});
