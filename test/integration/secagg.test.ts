/**
 * Secure aggregation over real gRPC (coordinator/secagg-round.ts,
 * worker/secagg-site.ts, common/secagg/): sites dropping at each phase, an
 * attempt below the threshold retried, the coordinator holding no individual
 * update, and the strategies that need individual updates refused.
 *
 * The references are computed independently of the protocol: the plain
 * (float64) FedAvg of the sites' updates, each made by a function the test
 * calls itself; the tolerance is the fixed-point bound |U3| / S of the sum
 * (common/secagg/quantise.ts) divided by the summed weight, plus float32
 * rounding of the stored adapter.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { RunEvent } from '../../common/events.ts';
import { inspectModel } from '../../common/hf-model.ts';
import { readPeftAdapter } from '../../common/peft.ts';
import { decode, quantisationBound } from '../../common/secagg/quantise.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { setSecAggObserver } from '../../coordinator/secagg-round.ts';
import { strategyIssues } from '../../coordinator/strategies/index.ts';
import { WorkerAgent } from '../../worker/agent.ts';
import { NoopTrainer } from '../../worker/trainers/noop.ts';
import { localSpecOf } from '../../worker/agent.ts';
import { trainingSpecOf } from '../../coordinator/tasks.ts';
import * as grpc from '@grpc/grpc-js';
import { events, Probe, rawUpload, runConfig, tempDir, tinyModel, updateMessages, waitForEvent, writeData, type Proc } from './federated-helpers.ts';
import { checkpointDir, maxExcess, offsetSites, OffsetTrainer, plainFedAvg, secaggWorker, secureConfig, siteUpdate } from './secagg-helpers.ts';

const procs: Proc[] = [];
let coord: CoordinatorHandle | null = null;

afterEach(async () => {
  for (const p of procs.splice(0)) p.kill();
  setSecAggObserver(undefined);
  await coord?.close();
  coord = null;
});

const adapterOf = async (runDir: string, round: number): Promise<TensorMap> => (await readPeftAdapter(checkpointDir(runDir, round))).adapter;

describe('secure aggregation with worker processes', () => {
  it('10 sites, threshold 6: 2 drop after sharing keys, 1 after its masked input; the round equals the plain FedAvg of the inputs summed', async () => {
    const dir = tempDir('secagg10');
    const model = await tinyModel(join(dir, 'model'));
    const range = 0.01;
    const cfg = secureConfig(dir, model, { name: 'secagg10', sites: 10, results: 6, deadline: 120, extra: { training: { steps: 2 } }, secagg: { threshold: 6, range, phase_timeout_sec: 60 } });
    coord = await startCoordinator(cfg);
    const sizes = [10, 12, 14, 16, 18, 20, 22, 24, 26, 28];
    const faults: Record<number, string> = { 2: 'secagg.after-share-keys@1', 5: 'secagg.after-share-keys@1', 7: 'secagg.after-masked-input@1' };
    for (const [i, n] of sizes.entries()) {
      const site = `site-${i}`;
      procs.push(secaggWorker({ address: coord.address, site, data: writeData(join(dir, `${site}.jsonl`), n, site), model, ...(faults[i] ? { fault: faults[i] } : {}) }));
    }
    const done = await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1, 170_000);
    expect((await coord.run).state).toBe('completed');
    // The masked-input drop is in U3 (its input arrived; the others' shares remove its self mask): 8 inputs summed.
    expect(done.participants).toBe(8);
    for (const i of [2, 5, 7]) {
      await procs[i]!.exited;
      expect(procs[i]!.child.signalCode).toBe('SIGKILL');
    }
    expect(procs[7]!.out()).toMatch(/masked input uploaded/);
    expect(procs[2]!.out()).not.toMatch(/masked input uploaded/);

    // Reference: the noop trainer's update of each summed site, computed here from the initial adapter.
    const g0 = await adapterOf(coord.runDir, 0);
    const spec = localSpecOf(trainingSpecOf(cfg));
    const summed = sizes.map((n, i) => ({ n, i })).filter((x) => x.i !== 2 && x.i !== 5);
    const updates = [];
    for (const x of summed) {
      const tr = new NoopTrainer({ numTrainExamples: x.n, numEvalExamples: 0 });
      const out = await tr.train({ taskId: 't', runId: 'r', round: 1, globalAdapter: g0, spec, signal: new AbortController().signal, onProgress: () => {} });
      updates.push({ tensors: out.adapter, weight: x.n });
    }
    const want = plainFedAvg(updates);
    const got = await adapterOf(coord.runDir, 1);
    const sumW = summed.reduce((s, x) => s + x.n, 0) / Math.max(...sizes);
    expect(maxExcess(got, want, quantisationBound(range, 10, 8) / sumW)).toBeLessThanOrEqual(0);
    // The global moved: the aggregate is not the start adapter.
    expect(maxExcess(got, plainFedAvg([{ tensors: g0, weight: 1 }]), 1e-7)).toBeGreaterThan(0);

    const evs = await events(coord.bus, coord.runId);
    const received = evs.filter((e): e is Extract<RunEvent, { type: 'update.received' }> => e.type === 'update.received');
    expect(received).toHaveLength(8);
    const elements = [...g0.values()].reduce((s, t) => s + t.data.length, 0);
    for (const e of received) expect(e.bytes).toBe(elements * 4);

    // The audit log records the round's sites and the secure-aggregation parameters it ran under.
    await coord.close();
    const audit = readFileSync(join(coord.runDir, 'audit.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { type: string; round?: number; sites?: string[]; settings?: { secure_aggregation?: { threshold: number } } });
    const roundRec = audit.find((r) => r.type === 'round' && r.round === 1)!;
    expect(roundRec.sites).toEqual(summed.map((x) => `site-${x.i}`).sort());
    expect(roundRec.settings?.secure_aggregation?.threshold).toBe(6);
  }, 200_000);

  it('below the threshold the attempt fails naming the phase, and the retry with a rejoined site succeeds', async () => {
    const dir = tempDir('secagg-retry');
    const model = await tinyModel(join(dir, 'model'));
    const cfg = secureConfig(dir, model, { name: 'secagg-retry', sites: 4, deadline: 120, retries: 2, extra: { training: { steps: 2 } }, secagg: { threshold: 4, range: 0.01, phase_timeout_sec: 60 } });
    coord = await startCoordinator(cfg);
    const data = (site: string): string => writeData(join(dir, `${site}.jsonl`), 10, site);
    for (let i = 0; i < 4; i++) {
      procs.push(secaggWorker({ address: coord.address, site: `s${i}`, data: data(`s${i}`), model, ...(i === 1 ? { fault: 'secagg.after-share-keys@1' } : {}) }));
    }
    const retried = await waitForEvent(coord.bus, coord.runId, 'round.retried', (e) => e.round === 1, 120_000);
    expect(retried.reason).toMatch(/masked-input phase has 3 of the 4 sites needed/);
    await procs[1]!.exited;
    expect(procs[1]!.child.signalCode).toBe('SIGKILL');
    // The same site comes back as a new process (a new worker id: it is not re-admitted to the failed attempt).
    procs.push(secaggWorker({ address: coord.address, site: 's1', data: data('s1'), model }));
    const done = await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1, 120_000);
    expect(done.participants).toBe(4);
    expect((await coord.run).state).toBe('completed');
    const evs = await events(coord.bus, coord.runId);
    const logs = evs.filter((e): e is Extract<RunEvent, { type: 'log' }> => e.type === 'log').map((e) => e.message);
    expect(logs.some((m) => /round 1, attempt 1: secure aggregation: masked-input phase has 3 of the 4/.test(m))).toBe(true);
    const state = (await import('node:fs')).readFileSync(join(checkpointDir(coord.runDir, 1), 'state.json'), 'utf8');
    expect(JSON.parse(state).history[0].retries).toBe(1);
  }, 200_000);
});

describe('what the coordinator holds', () => {
  it('in-process coordinator with an observer: no buffer the server held is (or is within quantisation of) any site\'s update; the aggregate is the plain FedAvg', async () => {
    const dir = tempDir('secagg-observe');
    const model = await tinyModel(join(dir, 'model'));
    const range = 0.01;
    const cfg = secureConfig(dir, model, { name: 'secagg-observe', sites: 4, results: 3, secagg: { threshold: 3, range } });
    const held: Array<{ what: string; buf: Uint32Array | Float64Array }> = [];
    setSecAggObserver((what, _site, buf) => held.push({ what, buf: buf.slice() }));
    coord = await startCoordinator(cfg);
    const fingerprint = (await inspectModel(model)).fingerprint;
    const sites = [
      { site: 'a', n: 10, offset: 0.001 },
      { site: 'b', n: 20, offset: -0.0015 },
      { site: 'c', n: 30, offset: 0.002 },
      { site: 'd', n: 40, offset: 0.0005 },
    ];
    const stop = new AbortController();
    const agents = sites.map((s) =>
      new WorkerAgent({
        coordinator: coord!.address,
        token: 'test-token',
        site: s.site,
        trainer: 'noop',
        trainerOptions: { seed: 0, modelDir: '', dataPath: '', evalFraction: 0 },
        trainerInstance: new OffsetTrainer(s.offset, { numTrainExamples: s.n, modelFingerprint: fingerprint }),
        progress: 'none',
      }).run(stop.signal),
    );
    await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1, 60_000);
    expect((await coord.run).state).toBe('completed');
    await Promise.allSettled(agents);

    const g0 = await adapterOf(coord.runDir, 0);
    const got = await adapterOf(coord.runDir, 1);
    const maxN = Math.max(...sites.map((s) => s.n));
    const sumW = sites.reduce((s, x) => s + x.n / maxN, 0);
    const want = plainFedAvg(sites.map((s) => ({ tensors: siteUpdate(g0, s.offset), weight: s.n })));
    expect(maxExcess(got, want, quantisationBound(range, 4, 4) / sumW)).toBeLessThanOrEqual(0);

    // Each site's individual update as it entered the masks (w_k * delta_k) and unweighted (delta_k), in manifest order.
    const flat = (m: TensorMap): Float64Array => {
      const parts = [...g0.keys()].map((k) => m.get(k)!.data);
      const out = new Float64Array(parts.reduce((s, p) => s + p.length, 0));
      let off = 0;
      for (const p of parts) for (let i = 0; i < p.length; i++) out[off++] = p[i]!;
      return out;
    };
    const start = flat(g0);
    const individual: Float64Array[] = [];
    for (const s of sites) {
      const u = flat(siteUpdate(g0, s.offset));
      const d = u.map((v, i) => v - start[i]!);
      individual.push(d, d.map((v) => (v * s.n) / maxN), u);
    }
    expect(held.length).toBeGreaterThanOrEqual(4 * 2 + 1);
    expect(held.some((h) => h.what === 'masked-input')).toBe(true);
    const bound = quantisationBound(range, 4, 4);
    for (const h of held) {
      const values = h.buf instanceof Uint32Array ? decode(h.buf, range, 4) : h.buf;
      if (values.length !== start.length) continue;
      for (const x of individual) {
        let far = 0;
        for (let i = 0; i < x.length; i++) far = Math.max(far, Math.abs(values[i]! - x[i]!));
        expect(far, `a ${h.what} buffer is within ${bound} of an individual update`).toBeGreaterThan(bound);
      }
    }
    // Every upload was a masked input of the adapter's size (4 bytes per element), never the plaintext adapter.
    const evs = await events(coord.bus, coord.runId);
    const received = evs.filter((e): e is Extract<RunEvent, { type: 'update.received' }> => e.type === 'update.received');
    expect(received).toHaveLength(4);
    for (const e of received) expect(e.bytes).toBe(start.length * 4);
    stop.abort();
  }, 90_000);
});

describe('strategies and client DP under secure aggregation', () => {
  const sites = [
    { site: 'a', n: 10, offset: 0.001 },
    { site: 'b', n: 20, offset: -0.0015 },
    { site: 'c', n: 30, offset: 0.002 },
  ];

  it('FFA-LoRA: only lora_B is masked and uploaded; every lora_A stays bit-identical; B is the plain FedAvg', async () => {
    const dir = tempDir('secagg-ffa');
    const model = await tinyModel(join(dir, 'model'));
    const range = 0.01;
    const cfg = secureConfig(dir, model, { name: 'secagg-ffa', sites: 3, extra: { strategy: 'ffa' }, secagg: { threshold: 2, range } });
    coord = await startCoordinator(cfg);
    const stop = new AbortController();
    const agents = offsetSites(coord.address, (await inspectModel(model)).fingerprint, sites, stop.signal);
    await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1, 60_000);
    stop.abort();
    await Promise.allSettled(agents);
    const g0 = await adapterOf(coord.runDir, 0);
    const got = await adapterOf(coord.runDir, 1);
    let bElements = 0;
    for (const [name, t] of g0) {
      if (name.includes('.lora_A.')) expect(Buffer.from(got.get(name)!.data.buffer).equals(Buffer.from(t.data.buffer)), name).toBe(true);
      else bElements += t.data.length;
    }
    const want = plainFedAvg(sites.map((s) => ({ tensors: new Map([...siteUpdate(g0, s.offset)].filter(([k]) => !k.includes('.lora_A.'))), weight: s.n })));
    const sumW = sites.reduce((x, s) => x + s.n / 30, 0);
    expect(maxExcess(got, want, quantisationBound(range, 3, 3) / sumW)).toBeLessThanOrEqual(0);
    const received = (await events(coord.bus, coord.runId)).filter((e): e is Extract<RunEvent, { type: 'update.received' }> => e.type === 'update.received');
    expect(received.map((e) => e.bytes)).toEqual([bElements * 4, bElements * 4, bElements * 4]);
  }, 90_000);

  it('SecAgg+ (neighbours: 2 of 6 sites, a random 2-regular graph): the aggregate is the plain FedAvg', async () => {
    const dir = tempDir('secagg-plus');
    const model = await tinyModel(join(dir, 'model'));
    const range = 0.01;
    const six = [...sites, { site: 'd', n: 15, offset: 0.0007 }, { site: 'e', n: 25, offset: -0.0004 }, { site: 'f', n: 5, offset: 0.0012 }];
    const cfg = secureConfig(dir, model, { name: 'secagg-plus', sites: 6, secagg: { threshold: 3, neighbours: 2, range } });
    coord = await startCoordinator(cfg);
    const stop = new AbortController();
    const agents = offsetSites(coord.address, (await inspectModel(model)).fingerprint, six, stop.signal);
    await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1, 60_000);
    stop.abort();
    await Promise.allSettled(agents);
    const g0 = await adapterOf(coord.runDir, 0);
    const got = await adapterOf(coord.runDir, 1);
    const want = plainFedAvg(six.map((s) => ({ tensors: siteUpdate(g0, s.offset), weight: s.n })));
    const sumW = six.reduce((x, s) => x + s.n / 30, 0);
    expect(maxExcess(got, want, quantisationBound(range, 6, 6) / sumW)).toBeLessThanOrEqual(0);
  }, 90_000);

  it('client DP: sites clip to C before masking; the coordinator divides the decoded sum by the sites asked', async () => {
    const dir = tempDir('secagg-dp');
    const model = await tinyModel(join(dir, 'model'));
    const range = 0.05;
    const clip = 0.01;
    const cfg = secureConfig(dir, model, {
      name: 'secagg-dp',
      sites: 3,
      extra: { weighting: { mode: 'equal' } },
      secagg: { threshold: 2, range },
      privacy: { client_dp: { clip_norm: clip, noise_multiplier: 0, noise: 'distributed' } },
    });
    coord = await startCoordinator(cfg);
    const stop = new AbortController();
    const agents = offsetSites(coord.address, (await inspectModel(model)).fingerprint, sites, stop.signal);
    await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1, 60_000);
    stop.abort();
    await Promise.allSettled(agents);
    const g0 = await adapterOf(coord.runDir, 0);
    const got = await adapterOf(coord.runDir, 1);
    // Reference: each delta clipped to L2 norm C (computed here), summed, divided by the 3 sites asked.
    const want = new Map<string, Float64Array>();
    for (const [name, t] of g0) want.set(name, Float64Array.from(t.data));
    for (const s of sites) {
      const u = siteUpdate(g0, s.offset);
      let sq = 0;
      for (const [name, t] of g0) for (let i = 0; i < t.data.length; i++) sq += (u.get(name)!.data[i]! - t.data[i]!) ** 2;
      const f = Math.min(1, clip / Math.sqrt(sq));
      expect(f).toBeLessThan(1); // the clip is active
      for (const [name, t] of g0) {
        const w = want.get(name)!;
        for (let i = 0; i < w.length; i++) w[i] = w[i]! + ((u.get(name)!.data[i]! - t.data[i]!) * f) / 3;
      }
    }
    expect(maxExcess(got, want, quantisationBound(range, 3, 3) / 3)).toBeLessThanOrEqual(0);
  }, 90_000);
});

describe('the Upload path under secure aggregation', () => {
  it('a site that advertises malformed keys is dropped (named in the log) and the round completes with the others', async () => {
    const dir = tempDir('secagg-bad');
    const model = await tinyModel(join(dir, 'model'));
    const range = 0.01;
    const cfg = secureConfig(dir, model, { name: 'secagg-bad', sites: 4, results: 3, secagg: { threshold: 3, range } });
    coord = await startCoordinator(cfg);
    const fingerprint = (await inspectModel(model)).fingerprint;
    const probe = new Probe(coord.address, fingerprint);
    const stop = new AbortController();
    try {
      await probe.join('bad', 10);
      const three = [
        { site: 'a', n: 10, offset: 0.001 },
        { site: 'b', n: 20, offset: -0.0015 },
        { site: 'c', n: 30, offset: 0.002 },
      ];
      const agents = offsetSites(coord.address, fingerprint, three, stop.signal);
      const task = await probe.nextTask();
      expect(task.kind?.$case).toBe('secaggAdvertise');
      const call = (probe as unknown as { call: { write(m: unknown): void } }).call;
      call.write({ body: { $case: 'secaggKeys', value: { taskId: task.taskId, encPk: new Uint8Array(16), maskPk: new Uint8Array(32) } } });
      const done = await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1, 60_000);
      expect(done.participants).toBe(3);
      const logs = (await events(coord.bus, coord.runId)).filter((e): e is Extract<RunEvent, { type: 'log' }> => e.type === 'log').map((e) => e.message);
      expect(logs.some((m) => /secure aggregation, advertise phase: site bad dropped: .*advertised keys must be two 32-byte X25519 public keys/.test(m))).toBe(true);
      stop.abort();
      await Promise.allSettled(agents);
      const g0 = await adapterOf(coord.runDir, 0);
      const want = plainFedAvg(three.map((s) => ({ tensors: siteUpdate(g0, s.offset), weight: s.n })));
      expect(maxExcess(await adapterOf(coord.runDir, 1), want, quantisationBound(range, 4, 3) / (60 / 30))).toBeLessThanOrEqual(0);
    } finally {
      stop.abort();
      probe.close();
    }
  }, 90_000);

  it('a plaintext adapter upload for a secure round is refused, naming the masked kind', async () => {
    const dir = tempDir('secagg-plain');
    const model = await tinyModel(join(dir, 'model'));
    const cfg = secureConfig(dir, model, { name: 'secagg-plain', sites: 2, deadline: 30, secagg: { threshold: 2, range: 0.01 } });
    coord = await startCoordinator(cfg);
    const fingerprint = (await inspectModel(model)).fingerprint;
    const probes = [new Probe(coord.address, fingerprint), new Probe(coord.address, fingerprint)];
    try {
      await probes[0]!.join('p0');
      await probes[1]!.join('p1');
      const task = await probes[0]!.nextTask();
      expect(task.kind?.$case).toBe('secaggAdvertise');
      expect(task.taskId.endsWith('.keys')).toBe(true);
      const { adapter } = await probes[0]!.conn.downloadAdapter(task.global!.version, 1 << 20);
      const trainTaskId = task.taskId.slice(0, -'.keys'.length);
      const r = await rawUpload(probes[0]!.conn, updateMessages(task, adapter, { taskId: trainTaskId }));
      expect(r.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(r.details).toMatch(/update kind UPDATE_KIND_ADAPTER_WEIGHTS is not accepted here \(allowed: UPDATE_KIND_SECAGG_MASKED: the run uses privacy.secure_aggregation/);
    } finally {
      for (const p of probes) p.close();
    }
  });
});

describe('configuration', () => {
  it('median and krum with secure aggregation are refused naming the field and why; fedavg is not', async () => {
    const dir = tempDir('secagg-cfg');
    const model = await tinyModel(join(dir, 'model'));
    const base = { cohort: { min_workers: 3 }, privacy: { secure_aggregation: { threshold: 3 } } };
    const median = runConfig(dir, model, { ...base, strategy: 'median' } as never);
    const issues = strategyIssues(median);
    expect(issues).toEqual([{ path: ['strategy'], message: expect.stringMatching(/^median cannot run with privacy.secure_aggregation: the coordinate-wise median needs every individual update/) }]);
    await expect(startCoordinator(median)).rejects.toThrow(/strategy: median cannot run with privacy\.secure_aggregation/);
    const krum = runConfig(dir, model, { ...base, strategy: { name: 'krum', f: 0 } } as never);
    expect(strategyIssues(krum).map((i) => i.path.join('.'))).toContain('strategy.name');
    expect(strategyIssues(krum)[0]!.message).toMatch(/Krum scores and picks individual updates/);
    expect(strategyIssues(runConfig(dir, model, { ...base, strategy: 'fedavg' } as never))).toEqual([]);
    const nf = runConfig(dir, model, { ...base, strategy: 'fedavg', defence: { norm_factor: 3 } } as never);
    expect(strategyIssues(nf).map((i) => i.path.join('.'))).toEqual(['defence.norm_factor']);
  });
});
