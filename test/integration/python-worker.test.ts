/**
 * A worker in another language: clients/python/fedtune_worker, written from
 * docs/protocol.md, in a real federated round next to a TypeScript worker.
 * Both updates are known (the Python demo trainer's rule, the noop trainer run
 * here on the same global adapter), so the round's global adapter is checked
 * against the example-weighted FedAvg computed here. Also: the protocol
 * version rule at Register, and the Python client's own tests (session rules,
 * chunk checks) against an in-process Python coordinator.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterEach, describe, expect, it } from 'vitest';
import type { RunEvent } from '../../common/events.ts';
import { inspectModel } from '../../common/hf-model.ts';
import { readPeftAdapter } from '../../common/peft.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { PROTOCOL_VERSION } from '../../common/wire.ts';
import { decodeUpdate, encodeUpdate, type UpdateEncodingName } from '../../common/update-encoding.ts';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { trainingSpecOf } from '../../coordinator/tasks.ts';
import { CoordinatorConnection, localSpecOf } from '../../worker/agent.ts';
import { NoopTrainer } from '../../worker/trainers/noop.ts';
import { events, Probe, ROOT, runConfig, tempDir, tinyModel, worker, writeData, type Proc } from './federated-helpers.ts';
import { hasOpenssl, makePki } from '../helpers/pki.ts';

const PYTHON = '/usr/bin/python3';
const inCI = process.env.CI === 'true' || process.env.CI === '1';
const pythonEnv = { ...process.env, PYTHONPATH: join(ROOT, 'clients', 'python'), PYTHONDONTWRITEBYTECODE: '1' };

function pythonHasGrpc(): boolean {
  if (inCI) return true;
  const ok = spawnSync(PYTHON, ['-c', 'import grpc, google.protobuf, numpy'], { stdio: 'ignore' }).status === 0;
  if (!ok) console.log(`skipping the Python worker tests: ${PYTHON} cannot import grpc, google.protobuf and numpy (apt-get install python3-grpcio python3-protobuf python3-numpy; CI=true always runs them)`);
  return ok;
}
const havePython = pythonHasGrpc();

/** The Python demo trainer's update (clients/python/fedtune_worker/demo.py), recomputed. */
function demoUpdate(global: TensorMap, round: number): TensorMap {
  const out: TensorMap = new Map();
  for (const [name, t] of global) {
    const data = new Float32Array(t.data.length);
    for (let i = 0; i < data.length; i++) data[i] = Math.fround(t.data[i]! + 1e-3 * round * ((i % 7) - 3));
    out.set(name, { shape: [...t.shape], data });
  }
  return out;
}

function pythonWorker(args: string[]): { child: ChildProcess; out: () => string; exited: Promise<number | null> } {
  const child = spawn(PYTHON, ['-m', 'fedtune_worker', ...args], { cwd: ROOT, env: pythonEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  let text = '';
  child.stdout!.on('data', (d: Buffer) => (text += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (text += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  return { child, out: () => text, exited };
}

const procs: Array<Pick<Proc, 'child'>> = [];
let coord: CoordinatorHandle | null = null;
afterEach(async () => {
  for (const p of procs.splice(0)) if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
  await coord?.close();
  coord = null;
});

describe.skipIf(!havePython)('a Python worker (clients/python) next to a TypeScript worker', () => {
  it.each(['grpc', 'bulk'] as const)("over %s: the round's global adapter is the example-weighted FedAvg of the Python and the TypeScript update; the Python worker evaluates it", async (transport) => {
    const dir = tempDir(`python-worker-${transport}`);
    const model = await tinyModel(join(dir, 'model'));
    const cfg = runConfig(dir, model, {
      name: 'python-worker',
      rounds: 1,
      training: { steps: 3 },
      cohort: { min_workers: 2 },
      round: { min_results: 2, deadline_sec: 90 },
      eval: { every: 1, initial: false, deadline_sec: 60 },
      // Small chunks: over gRPC the adapter crosses the wire in several chunks each way, the last one shorter.
      // 'grpc': no bulk channel offered (bulk_port null), so both workers use the gRPC streams.
      server: { chunk_bytes: 1024, max_chunk_bytes: 2048, ...(transport === 'grpc' ? { bulk_port: null } : {}) },
    });
    coord = await startCoordinator(cfg);
    // The global adapter v0 exactly as workers receive it (an observer without training data is never given a task).
    const observer = new Probe(coord.address, (await inspectModel(model)).fingerprint);
    await observer.join('observer', 0, 0);
    const v0 = await observer.conn.downloadAdapter(0, 2048);
    observer.close();
    expect(v0.bytes % 1024).not.toBe(0);
    expect(v0.bytes).toBeGreaterThan(2 * 1024);

    const py = pythonWorker([
      '--coordinator', coord.address, '--token', 'test-token', '--name', 'py-site', '--model', model,
      '--data', writeData(join(dir, 'py.jsonl'), 30, 'python'),
      '--eval-data', writeData(join(dir, 'py-eval.jsonl'), 5, 'python'),
    ]);
    procs.push(py);
    const ts = worker({ address: coord.address, site: 'ts-site', data: writeData(join(dir, 'ts.jsonl'), 10, 'ts'), model, extra: ['--eval-fraction', '0'] });
    procs.push(ts);

    const result = await coord.run;
    expect(result.state, py.out().slice(-2000)).toBe('completed');
    expect(await py.exited, py.out().slice(-2000)).toBe(0);
    expect(await ts.exited).toBe(0);
    expect(py.out()).toMatch(/round 1: update uploaded \(\d+ bytes, 30 examples\)/);
    if (transport === 'grpc') {
      expect(coord.bulk).toBeNull();
      expect(py.out()).toMatch(/global adapter v0 downloaded \(\d+ bytes, grpc\)/);
      expect(py.out()).toMatch(/update uploaded \(\d+ bytes, 30 examples\) over grpc/);
    } else {
      const at = `bulk 127\\.0\\.0\\.1:${coord.bulk!.port}`;
      expect(py.out()).toMatch(new RegExp(`global adapter v0 downloaded \\((\\d+) bytes, ${at}\\)`));
      expect(py.out()).toMatch(new RegExp(`update uploaded \\(${v0.bytes} bytes, 30 examples\\) over ${at}`));
      expect(py.out()).not.toMatch(/bulk tensor channel/); // no fallback warning
    }

    const evs = await events(coord.bus, coord.runId);
    const received = evs.filter((e): e is Extract<RunEvent, { type: 'update.received' }> => e.type === 'update.received');
    expect(received.map((e) => [e.site, e.examples]).sort()).toEqual([['py-site', 30], ['ts-site', 10]]);
    expect(received.find((e) => e.site === 'py-site')!.metrics).toEqual({ train_loss: 0.5, examples: 30 });
    expect(evs.some((e) => e.type === 'update.rejected')).toBe(false);

    // Both updates, recomputed here from v0: the Python demo rule and the noop trainer (deterministic given seed, round, global).
    const pyUpdate = demoUpdate(v0.adapter, 1);
    const noop = await new NoopTrainer({ numTrainExamples: 10, numEvalExamples: 0 }).train({
      taskId: 'recomputed',
      runId: 'r',
      round: 1,
      globalAdapter: v0.adapter,
      spec: localSpecOf(trainingSpecOf(cfg)),
      signal: new AbortController().signal,
      onProgress: () => {},
    });
    expect(noop.numExamples).toBe(10);
    const v1 = (await readPeftAdapter(join(coord.runDir, 'round-0001'))).adapter;
    expect([...v1.keys()].sort()).toEqual([...v0.adapter.keys()].sort());
    let worst = 0;
    let equalWeightGap = 0;
    let sq = 0;
    let n = 0;
    for (const [name, got] of v1) {
      const a = pyUpdate.get(name)!.data;
      const b = noop.adapter.get(name)!.data;
      for (let i = 0; i < got.data.length; i++) {
        const want = Math.fround((30 * a[i]! + 10 * b[i]!) / 40);
        worst = Math.max(worst, Math.abs(got.data[i]! - want) / Math.max(Math.abs(want), 1e-30));
        equalWeightGap = Math.max(equalWeightGap, Math.abs(Math.fround((a[i]! + b[i]!) / 2) - want));
        sq += got.data[i]! * got.data[i]!;
        n++;
      }
    }
    expect(worst).toBeLessThanOrEqual(2 ** -23); // float32 precision
    expect(equalWeightGap).toBeGreaterThan(1e-4); // the check tells example weighting from a plain mean

    // Evaluation: only the Python site holds eval data; its demo eval loss is the mean square of v1.
    const done = evs.find((e): e is Extract<RunEvent, { type: 'round.completed' }> => e.type === 'round.completed')!;
    expect(done.participants).toBe(2);
    expect(done.examples).toBe(40);
    expect(done.evalLoss).toBeCloseTo(sq / n, 12);
  });

  it.each([
    ['float16', 1],
    ['int8_delta', 2],
  ] as const)("a compressed update, %s over %i round(s) (int8_delta with error feedback): the Python worker's bytes decode to what fedtune's own encoder sends, and the global is exactly that", async (encoding: UpdateEncodingName, rounds: number) => {
    const dir = tempDir(`python-worker-${encoding}`);
    const model = await tinyModel(join(dir, 'model'));
    const block = 64;
    const cfg = runConfig(dir, model, {
      name: `python-${encoding}`,
      rounds,
      cohort: { min_workers: 1 },
      round: { min_results: 1, deadline_sec: 90, update_encoding: encoding, ...(encoding === 'int8_delta' ? { int8_block_size: block, error_feedback: true } : {}) },
    });
    coord = await startCoordinator(cfg);
    const observer = new Probe(coord.address, (await inspectModel(model)).fingerprint);
    await observer.join('observer', 0, 0);
    const v0 = (await observer.conn.downloadAdapter(0, 1 << 20)).adapter;
    observer.close();
    const py = pythonWorker(['--coordinator', coord.address, '--token', 'test-token', '--name', 'py-site', '--model', model, '--data', writeData(join(dir, 'py.jsonl'), 9, 'python')]);
    procs.push(py);
    const result = await Promise.race([
      coord.run,
      py.exited.then((code) => (code === 0 ? coord!.run : Promise.reject(new Error(`the Python worker exited with ${code}:\n${py.out().slice(-2000)}`)))),
    ]);
    expect(result.state, py.out().slice(-2000)).toBe('completed');
    const received = (await events(coord.bus, coord.runId)).filter((e): e is Extract<RunEvent, { type: 'update.received' }> => e.type === 'update.received');
    expect(received).toHaveLength(rounds);
    // Each round recomputed here: the Python demo rule's update of the global, encoded by fedtune's worker code and decoded as the coordinator does.
    let global = v0;
    let residual: Map<string, Float32Array> | null = null;
    for (let round = 1; round <= rounds; round++) {
      const sent = encodeUpdate(demoUpdate(global, round), { encoding, blockSize: block, start: global, residual, errorFeedback: encoding === 'int8_delta' });
      residual = sent.residual;
      expect(received[round - 1]!.bytes).toBe(sent.bytes.byteLength); // the bytes as sent: 2 (float16) or about 1 (int8) per element
      const start = new Float32Array([...global.values()].flatMap((t) => [...t.data]));
      const decoded = decodeUpdate(sent.manifest, sent.bytes, encoding, encoding === 'int8_delta' ? block : 0, start);
      const next = (await readPeftAdapter(join(coord.runDir, `round-${String(round).padStart(4, '0')}`))).adapter;
      let at = 0;
      for (const [name, t] of global) {
        const got = next.get(name)!.data;
        for (let i = 0; i < t.data.length; i++) expect(got[i], `round ${round} ${name}[${i}]`).toBe(decoded[at + i]);
        at += t.data.length;
      }
      global = next;
    }
    expect(py.out()).toMatch(new RegExp(`round ${rounds}: update uploaded \\(\\d+ bytes, 9 examples\\) over bulk .* as ${encoding}`));
  });

  it.skipIf(!hasOpenssl())('under mutual TLS the Python worker moves its tensors over the bulk channel with the certificate it registered with', async () => {
    const dir = tempDir('python-worker-mtls');
    const pki = makePki(dir);
    const model = await tinyModel(join(dir, 'model'));
    const cfg = runConfig(dir, model, {
      name: 'python-mtls',
      rounds: 1,
      cohort: { min_workers: 1 },
      round: { min_results: 1, deadline_sec: 90 },
      server: { tls: { cert: pki.serverCert, key: pki.serverKey, client_ca: pki.ca } },
    });
    coord = await startCoordinator(cfg);
    // A worker registers as the site its client certificate names (CN=site-a).
    const py = pythonWorker([
      '--coordinator', coord.address, '--token', 'test-token', '--name', 'site-a', '--model', model,
      '--data', writeData(join(dir, 'py.jsonl'), 12, 'python'),
      '--tls-ca', pki.ca, '--tls-cert', pki.clientCert, '--tls-key', pki.clientKey,
    ]);
    procs.push(py);
    // A worker that gives up ends the test at once, with its output.
    const result = await Promise.race([
      coord.run,
      py.exited.then((code) => (code === 0 ? coord!.run : Promise.reject(new Error(`the Python worker exited with ${code}:\n${py.out().slice(-2000)}`)))),
    ]);
    expect(result.state, py.out().slice(-2000)).toBe('completed');
    expect(await py.exited, py.out().slice(-2000)).toBe(0);
    const at = `bulk 127\\.0\\.0\\.1:${coord.bulk!.port}`;
    expect(py.out()).toMatch(new RegExp(`global adapter v0 downloaded \\(\\d+ bytes, ${at}\\)`));
    expect(py.out()).toMatch(new RegExp(`round 1: update uploaded \\(\\d+ bytes, 12 examples\\) over ${at}`));
    expect(py.out()).not.toMatch(/bulk tensor channel/);
    expect(coord.bulk!.bytesReadInPlace).toBe(0); // under TLS the coordinator copies the decrypted bytes into place once
  });

  it("the Python client's own tests pass (session rules, chunk and digest checks, upload chunking) against an in-process Python coordinator", () => {
    const r = spawnSync(PYTHON, ['-m', 'unittest', 'discover', '-s', join(ROOT, 'clients', 'python', 'tests'), '-v'], {
      cwd: ROOT,
      env: pythonEnv,
      encoding: 'utf8',
      timeout: 120_000,
    });
    expect(r.status, r.stderr.slice(-4000)).toBe(0);
    expect(r.stderr).toMatch(/^Ran \d+ tests/m);
    expect(r.stderr).not.toMatch(/skipped/);
  });
});

describe('protocol version rule', () => {
  it('Register refuses another protocol version with FAILED_PRECONDITION naming both versions', async () => {
    const dir = tempDir('protocol-version');
    const model = await tinyModel(join(dir, 'model'));
    coord = await startCoordinator(runConfig(dir, model, { name: 'protocol-version', cohort: { min_workers: 1 }, round: { min_results: 1 } }));
    const fingerprint = (await inspectModel(model)).fingerprint;
    const conn = new CoordinatorConnection(coord.address);
    const register = (protocolVersion: number) =>
      conn.register({
        joinToken: 'test-token',
        site: `v${protocolVersion}`,
        previousWorkerId: '',
        capabilities: { device: 'cpu', memoryBytes: 1, backends: [], modelFingerprint: fingerprint, numTrainExamples: 0, numEvalExamples: 0, client: 'probe/9', protocolVersion },
      });
    try {
      for (const [v, said] of [[PROTOCOL_VERSION + 1, String(PROTOCOL_VERSION + 1)], [0, '0 (unset)']] as const) {
        const err = await register(v).then(
          () => null,
          (e: grpc.ServiceError) => e,
        );
        expect(err?.code).toBe(grpc.status.FAILED_PRECONDITION);
        expect(err?.details).toBe(
          `protocol version mismatch: worker "v${v}" (probe/9) speaks fedtune protocol version ${said}, this coordinator speaks version ${PROTOCOL_VERSION}; use a worker built for protocol version ${PROTOCOL_VERSION} (docs/protocol.md)`,
        );
      }
      const ok = await register(PROTOCOL_VERSION);
      expect(ok.workerId).toMatch(/^v1-[0-9a-f]{8}$/);
      expect((await conn.getRunInfo('test-token')).protocolVersion).toBe(PROTOCOL_VERSION);
    } finally {
      conn.close();
    }
  });
});
