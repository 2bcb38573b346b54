/**
 * Compressed updates over real gRPC (round.update_encoding): `fedtune worker` processes
 * with the noop trainer upload float16 / bfloat16 / int8_delta updates, and the round's
 * aggregate must equal, bit for bit, FedAvg in float32 of the decoded updates, computed
 * here from what each worker sent (the noop trainer is deterministic given the run seed,
 * the round and the adapter it starts from). Bytes on the wire shrink accordingly. A
 * worker that ignores the encoding (a hand-driven probe) still uploads float32 and is
 * counted; an encoding or block size the task does not accept is refused by name.
 */
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterEach, describe, expect, it } from 'vitest';
import type { RunEvent } from '../../common/events.ts';
import { inspectModel } from '../../common/hf-model.ts';
import { readPeftAdapter } from '../../common/peft.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { decodeUpdate, encodedStreamBytes, encodeUpdate, type UpdateEncodingName } from '../../common/update-encoding.ts';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { UpdateEncoding, UpdateKind, type Task } from '../../proto/gen/fedtune/v1/coordinator.ts';
import { trainingSpecOf } from '../../coordinator/tasks.ts';
import { DType } from '../../proto/gen/fedtune/v1/tensors.ts';
import { localSpecOf } from '../../worker/agent.ts';
import { NoopTrainer } from '../../worker/trainers/noop.ts';
import { events, header, Probe, rawUpload, runConfig, tempDir, tinyModel, updateMessages, worker, writeData, type Proc } from './federated-helpers.ts';

const procs: Proc[] = [];
const probes: Probe[] = [];
let coord: CoordinatorHandle | null = null;

afterEach(async () => {
  for (const p of procs.splice(0)) p.kill();
  for (const p of probes.splice(0)) p.close();
  await coord?.close();
  coord = null;
});

const SITES = [
  { site: 'site-a', n: 10 },
  { site: 'site-b', n: 30 },
];

/** The noop trainer's update of a site in a round, as the worker computes it. */
async function noopUpdate(task: Task, global: TensorMap, n: number): Promise<TensorMap> {
  if (task.kind?.$case !== 'train') throw new Error('not a train task');
  const tr = new NoopTrainer({ numTrainExamples: n, numEvalExamples: 0 });
  const out = await tr.train({ taskId: task.taskId, runId: 'r', round: task.round, globalAdapter: global, spec: localSpecOf(task.kind.value.spec!), signal: new AbortController().signal, onProgress: () => {} });
  return out.adapter;
}

/** FedAvg as the protocol states it: sum_k w_k x_k in float64, times 1 / sum_k w_k, rounded to float32; in arrival order. */
function fedavg(updates: Array<{ w: number; x: Map<string, Float32Array> }>, names: string[]): Map<string, Float32Array> {
  const W = updates.reduce((s, u) => s + u.w, 0);
  const out = new Map<string, Float32Array>();
  for (const name of names) {
    const n = updates[0]!.x.get(name)!.length;
    const s = new Float64Array(n);
    for (const u of updates) {
      const x = u.x.get(name)!;
      for (let i = 0; i < n; i++) s[i]! += u.w * x[i]!;
    }
    out.set(name, Float32Array.from(s, (v) => v * (1 / W)));
  }
  return out;
}

/** Decoded float32 tensors of an update as sent in `encoding`, by name. */
function decoded(update: TensorMap, encoding: UpdateEncodingName, start: TensorMap, blockSize: number, residual: ReadonlyMap<string, Float32Array> | null): { x: Map<string, Float32Array>; residual: Map<string, Float32Array> | null; bytes: number } {
  const enc = encodeUpdate(update, { encoding, blockSize, start, residual, errorFeedback: residual !== null });
  const flatStart = Float32Array.from([...start.values()].flatMap((t) => [...t.data]));
  const flat = decodeUpdate(enc.manifest, enc.bytes, encoding, blockSize, flatStart);
  const x = new Map<string, Float32Array>();
  let off = 0;
  for (const e of enc.manifest) {
    const n = e.shape.reduce((a, b) => a * b, 1);
    x.set(e.name, flat.slice(off, off + n));
    off += n;
  }
  return { x, residual: enc.residual, bytes: enc.bytes.byteLength };
}

const received = (evs: RunEvent[], round: number): Array<Extract<RunEvent, { type: 'update.received' }>> =>
  evs.filter((e): e is Extract<RunEvent, { type: 'update.received' }> => e.type === 'update.received' && e.round === round);

async function checkpoint(runDir: string, round: number): Promise<TensorMap> {
  return (await readPeftAdapter(join(runDir, `round-${String(round).padStart(4, '0')}`))).adapter;
}

function expectSame(got: TensorMap, want: Map<string, Float32Array>): void {
  expect([...got.keys()].sort()).toEqual([...want.keys()].sort());
  for (const [name, w] of want) {
    const g = got.get(name)!.data;
    expect(Buffer.from(new Float32Array(g).buffer).equals(Buffer.from(new Float32Array(w).buffer)), `${name} differs from FedAvg of the decoded updates`).toBe(true);
  }
}

describe('compressed updates', () => {
  for (const encoding of ['float32', 'float16', 'bfloat16'] as const) {
    it(`${encoding}: the aggregate is FedAvg of the decoded updates exactly; ${encoding === 'float32' ? '4' : '2'} bytes per element on the wire`, async () => {
      const dir = tempDir(`enc-${encoding}`);
      const model = await tinyModel(join(dir, 'model'));
      const cfg = runConfig(dir, model, {
        name: `enc-${encoding}`,
        rounds: 1,
        training: { steps: 2 },
        cohort: { min_workers: 2 },
        round: { min_results: 2, deadline_sec: 60, update_encoding: encoding },
        eval: { every: 0 },
        server: { chunk_bytes: 1024 },
      });
      coord = await startCoordinator(cfg);
      // An observer (no training data) downloads the initial adapter in manifest order, as the workers see it.
      const probe = new Probe(coord.address, (await inspectModel(model)).fingerprint);
      probes.push(probe);
      await probe.join('observer', 0);
      const g0 = (await probe.conn.downloadAdapter(0, 1 << 20)).adapter;
      for (const s of SITES) procs.push(worker({ address: coord.address, site: s.site, data: writeData(join(dir, `${s.site}.jsonl`), s.n, s.site), model, extra: ['--eval-fraction', '0'] }));
      const result = await coord.run;
      expect(result.state).toBe('completed');

      const evs = await events(coord.bus, coord.runId);
      const dispatched = evs.find((e): e is Extract<RunEvent, { type: 'task.dispatched' }> => e.type === 'task.dispatched')!;
      const task: Task = { taskId: dispatched.taskId, round: 1, deadlineUnixMs: 0, global: undefined, kind: { $case: 'train', value: { spec: trainingSpecOf(cfg), uploadKind: UpdateKind.UPDATE_KIND_ADAPTER_WEIGHTS } } };
      const got = received(evs, 1);
      expect(got.map((e) => e.site).sort()).toEqual(['site-a', 'site-b']);
      const numel = [...g0.values()].reduce((s, t) => s + t.data.length, 0);
      for (const e of got) expect(e.bytes).toBe((encoding === 'float32' ? 4 : 2) * numel);
      const ups = [];
      for (const e of got) {
        const n = SITES.find((s) => s.site === e.site)!.n;
        ups.push({ w: n, x: decoded(await noopUpdate(task, g0, n), encoding, g0, 0, null).x });
      }
      expectSame(await checkpoint(coord.runDir, 1), fedavg(ups, [...g0.keys()]));
      const done = evs.find((e): e is Extract<RunEvent, { type: 'round.completed' }> => e.type === 'round.completed')!;
      expect(done.bytesUp).toBe(got[0]!.bytes * 2);
    });
  }

  it('int8_delta with error feedback, two rounds: exact aggregate, ~1/4 of the bytes plus scales; a float32 worker is still counted; other encodings refused by name', async () => {
    const dir = tempDir('enc-int8');
    const model = await tinyModel(join(dir, 'model'));
    const block = 32;
    const cfg = runConfig(dir, model, {
      name: 'enc-int8',
      rounds: 2,
      training: { steps: 2 },
      cohort: { min_workers: 3 },
      round: { min_results: 3, deadline_sec: 60, update_encoding: 'int8_delta', int8_block_size: block, error_feedback: true },
      eval: { every: 0 },
      server: { chunk_bytes: 1024 },
    });
    coord = await startCoordinator(cfg);
    const probe = new Probe(coord.address, (await inspectModel(model)).fingerprint);
    probes.push(probe);
    await probe.join('legacy', 20);
    for (const s of SITES) procs.push(worker({ address: coord.address, site: s.site, data: writeData(join(dir, `${s.site}.jsonl`), s.n, s.site), model, extra: ['--eval-fraction', '0'] }));

    // The probe plays a worker that predates encodings: it uploads float32 whatever the task asks.
    const seen: Array<{ task: Task; global: TensorMap; mine: TensorMap }> = [];
    const refusals: Array<{ code: number; details: string }> = [];
    for (let round = 1; round <= 2; round++) {
      const task = await probe.nextTask();
      const g = (await probe.conn.downloadAdapter(task.global!.version, 1 << 20, task.global!.rank)).adapter;
      const mine: TensorMap = new Map([...g].map(([k, t]) => [k, { shape: [...t.shape], data: Float32Array.from(t.data, (v, i) => v + 1e-3 * ((i % 5) - 2) * round) }]));
      if (round === 1) {
        expect(task.kind?.$case === 'train' && task.kind.value.encoding).toEqual({
          encoding: UpdateEncoding.UPDATE_ENCODING_INT8_DELTA,
          blockSize: block,
          errorFeedback: true,
          accepted: [UpdateEncoding.UPDATE_ENCODING_FLOAT32, UpdateEncoding.UPDATE_ENCODING_INT8_DELTA],
        });
        // bfloat16 is not accepted in this run; int8_delta with another block size neither.
        const bf = encodeUpdate(mine, { encoding: 'bfloat16' });
        const bfMsgs = [header(task, { numExamples: 20 }, bf.manifest.map((e) => ({ name: e.name, dtype: DType.DTYPE_BF16, shape: e.shape })), bf.bytes.byteLength)];
        (bfMsgs[0]!.body as { value: { encoding?: number } }).value.encoding = UpdateEncoding.UPDATE_ENCODING_BFLOAT16;
        refusals.push(await rawUpload(probe.conn, bfMsgs));
        const i8 = encodeUpdate(mine, { encoding: 'int8_delta', blockSize: 16, start: g });
        const i8Msgs = [header(task, { numExamples: 20 }, i8.manifest.map((e) => ({ name: e.name, dtype: DType.DTYPE_I8, shape: e.shape })), i8.bytes.byteLength)];
        Object.assign((i8Msgs[0]!.body as { value: object }).value, { encoding: UpdateEncoding.UPDATE_ENCODING_INT8_DELTA, blockSize: 16 });
        refusals.push(await rawUpload(probe.conn, i8Msgs));
      }
      const ok = await rawUpload(probe.conn, updateMessages(task, mine, { numExamples: 20 }));
      expect(ok.code, ok.details).toBe(grpc.status.OK);
      seen.push({ task, global: g, mine });
    }
    const result = await coord.run;
    expect(result.state).toBe('completed');
    expect(refusals[0]).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, details: expect.stringMatching(/encoding bfloat16 is not accepted for task .* \(accepted: float32, int8_delta; round.update_encoding of the run is int8_delta\)/) });
    expect(refusals[1]).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, details: expect.stringMatching(/block_size 16 in the header, but task .* asks for int8_delta blocks of 32 \(round.int8_block_size\)/) });

    const evs = await events(coord.bus, coord.runId);
    const names = [...seen[0]!.global.keys()];
    const numel = [...seen[0]!.global.values()].reduce((s, t) => s + t.data.length, 0);
    const int8Bytes = encodedStreamBytes([...seen[0]!.global].map(([name, t]) => ({ name, dtype: 'I8' as const, shape: t.shape })), 'int8_delta', block);
    // The residual each worker keeps (both sites get the same update from the noop trainer, so the same residual).
    const residual = new Map<string, Map<string, Float32Array>>();
    for (const [k, { task, global, mine }] of seen.entries()) {
      const round = k + 1;
      const got = received(evs, round);
      expect(got.map((e) => e.site).sort()).toEqual(['legacy', 'site-a', 'site-b']);
      const ups = [];
      for (const e of got) {
        if (e.site === 'legacy') {
          expect(e.bytes).toBe(4 * numel);
          ups.push({ w: 20, x: new Map([...mine].map(([n, t]) => [n, t.data as Float32Array])) });
          continue;
        }
        expect(e.bytes).toBe(int8Bytes);
        const n = SITES.find((s) => s.site === e.site)!.n;
        const d = decoded(await noopUpdate(task, global, n), 'int8_delta', global, block, residual.get(e.site) ?? new Map());
        residual.set(e.site, d.residual!);
        ups.push({ w: n, x: d.x });
      }
      const agg = fedavg(ups, names);
      expectSame(await checkpoint(coord.runDir, round), agg);
      // Round 2's global is round 1's aggregate: the probe downloaded exactly that.
      if (round === 2) expectSame(global, new Map([...(await checkpoint(coord.runDir, 1))].map(([n, t]) => [n, t.data as Float32Array])));
    }
    // The residual is not zero (error feedback had something to carry) and int8 is about a quarter of float32.
    expect([...residual.get('site-a')!.values()].some((r) => r.some((v) => v !== 0))).toBe(true);
    expect(int8Bytes / (4 * numel)).toBeCloseTo(0.25 + 1 / block, 2);
  });
});
