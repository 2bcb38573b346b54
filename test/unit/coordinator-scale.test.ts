/**
 * Per-worker coordinator state under many registrations: the registry's site
 * index answers Register's "does this site have a live worker" without a scan,
 * and what the coordinator keeps per worker is gone once the worker is.
 */
import * as grpc from '@grpc/grpc-js';
import { fsync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it, vi } from 'vitest';
import { AuditLog } from '../../coordinator/audit.ts';
import { Admission } from '../../coordinator/identity.ts';
import { parseRunConfig } from '../../common/config.ts';
import { MemoryBus } from '../../coordinator/events/memory.ts';
import { HEARTBEAT_REFRESH_PER_SEC, heartbeatRefreshMs, RunBase } from '../../coordinator/run-base.ts';
import { createCoordinatorService, type RunController } from '../../coordinator/service.ts';
import { WorkerRegistry, type RegistryListener, type WorkerRecord } from '../../coordinator/workers.ts';
import { PROTOCOL_VERSION } from '../../common/wire.ts';
import type { RegisterRequest, RegisterResponse } from '../../proto/gen/fedtune/v1/coordinator.ts';
import type { TensorMap } from '../../common/tensor.ts';

const cfg = parseRunConfig({
  name: 'scale-unit',
  model: { path: '/nonexistent-model' },
  training: { steps: 1, batch_size: 1, max_seq_len: 16 },
  rounds: 1,
  server: { listen: '127.0.0.1:0', join_token: 'tok' },
  dashboard: { enabled: false },
  events: { log: false },
});

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});
const temp = (): string => {
  const d = mkdtempSync(join(tmpdir(), 'fedtune-scale-unit-'));
  dirs.push(d);
  return d;
};

const info = (site: string) => ({ site, device: 'cpu', memoryBytes: 1, backends: ['x'], numTrainExamples: 1, numEvalExamples: 0, client: 'unit' });

/** A run base with nothing but the shared per-worker bookkeeping, its heartbeat map visible. */
class Bookkeeping extends RunBase implements RegistryListener {
  constructor(registry: WorkerRegistry, bus: MemoryBus) {
    super({ cfg, bus, registry, global: new Map() as TensorMap, state: { runId: 'scale-unit', globalVersion: 0 }, resumed: false });
  }
  onWorkerGone(w: WorkerRecord, reason: string): void {
    this.workerLeft(w, reason);
  }
  get heartbeatState(): number {
    return this.lastHeartbeatEvent.size;
  }
}

function registerCall(service: ReturnType<typeof createCoordinatorService>, req: Partial<RegisterRequest> & { site: string }): Promise<{ err: grpc.ServiceError | null; res?: RegisterResponse }> {
  const request: RegisterRequest = {
    joinToken: 'tok',
    previousWorkerId: '',
    capabilities: { device: 'cpu', memoryBytes: 1, backends: ['x'], modelFingerprint: '', numTrainExamples: 1, numEvalExamples: 0, client: 'unit', protocolVersion: PROTOCOL_VERSION },
    ...req,
  };
  const call = { request, getPeer: () => '127.0.0.1:1', metadata: new grpc.Metadata() } as unknown as grpc.ServerUnaryCall<RegisterRequest, RegisterResponse>;
  return new Promise((resolve) => service.register(call, (err, res) => resolve({ err: (err as grpc.ServiceError | null) ?? null, res: res ?? undefined })));
}

describe('worker registry site index', () => {
  it('finds the live worker of a site, and forgets it when it leaves', () => {
    const r = new WorkerRegistry(15_000);
    const a = r.add(info('site-a'));
    const b = r.add(info('site-b'));
    expect(r.liveWorkerOf('site-a')).toBe(a);
    expect(r.liveWorkerOf('site-b')).toBe(b);
    expect(r.liveWorkerOf('site-c')).toBeUndefined();
    r.detach(a, 'test');
    expect(r.liveWorkerOf('site-a')).toBeUndefined();
    expect(r.liveWorkerOf('site-b')).toBe(b);
    const a2 = r.add(info('site-a'));
    expect(r.liveWorkerOf('site-a')).toBe(a2);
    // The old record of site-a leaving again (a late duplicate detach) must not unmap the new one.
    r.detach(a, 'again');
    expect(r.liveWorkerOf('site-a')).toBe(a2);
    expect(r.size).toBe(2);
  });

  it('keeps nothing of workers that are gone', () => {
    const r = new WorkerRegistry(15_000);
    const ws = Array.from({ length: 2000 }, (_, i) => r.add(info(`site-${i}`)));
    expect(r.size).toBe(2000);
    for (const w of ws) r.detach(w, 'test');
    expect(r.size).toBe(0);
    expect(ws.some((w) => r.liveWorkerOf(w.site) !== undefined)).toBe(false);
    expect(r.all()).toEqual([]);
  });
});

describe('Register with the site index', () => {
  const setup = () => {
    const registry = new WorkerRegistry(15_000);
    const run = { runId: 'scale-unit' } as unknown as RunController;
    return { registry, service: createCoordinatorService({ cfg, run, registry, modelFingerprint: '' }) };
  };

  it('refuses a second live session of a site, accepts its replacement and a new one after it left', async () => {
    const { registry, service } = setup();
    const first = await registerCall(service, { site: 'site-a' });
    expect(first.err).toBeNull();
    const dup = await registerCall(service, { site: 'site-a' });
    expect(dup.err?.code).toBe(grpc.status.ALREADY_EXISTS);
    expect(dup.err?.details).toMatch(/site "site-a" already has a live session/);
    // Surrounding whitespace names the same site.
    expect((await registerCall(service, { site: '  site-a ' })).err?.code).toBe(grpc.status.ALREADY_EXISTS);
    const again = await registerCall(service, { site: 'site-a', previousWorkerId: first.res!.workerId });
    expect(again.err).toBeNull();
    expect(registry.get(first.res!.workerId)).toBeUndefined();
    expect(registry.liveWorkerOf('site-a')?.workerId).toBe(again.res!.workerId);
    registry.detach(registry.get(again.res!.workerId)!, 'left');
    const later = await registerCall(service, { site: 'site-a' });
    expect(later.err).toBeNull();
    expect(registry.size).toBe(1);
  });

  it('registers many sites, each once', async () => {
    const { registry, service } = setup();
    for (let i = 0; i < 3000; i++) expect((await registerCall(service, { site: `site-${i}` })).err).toBeNull();
    expect(registry.size).toBe(3000);
    expect((await registerCall(service, { site: 'site-1234' })).err?.code).toBe(grpc.status.ALREADY_EXISTS);
  });
});

describe('per-worker run state', () => {
  it('drops a worker heartbeat bookkeeping when the worker leaves', () => {
    const registry = new WorkerRegistry(15_000);
    const bus = new MemoryBus({ ringSize: 64 });
    const run = new Bookkeeping(registry, bus);
    registry.listener = run;
    const ws = Array.from({ length: 500 }, (_, i) => registry.add(info(`site-${i}`)));
    for (const w of ws) run.onHeartbeat(w, 'idle');
    expect(run.heartbeatState).toBe(500);
    for (const w of ws.slice(0, 200)) registry.detach(w, 'gone');
    expect(run.heartbeatState).toBe(300);
    // A heartbeat that races with the worker leaving records nothing.
    run.onHeartbeat(ws[0]!, 'idle');
    expect(run.heartbeatState).toBe(300);
    registry.close(undefined, 'closing');
    expect(run.heartbeatState).toBe(0);
    void bus.close();
  });

  it('still publishes a heartbeat event on a status change, and not on a repeat', async () => {
    const registry = new WorkerRegistry(15_000);
    const bus = new MemoryBus({ ringSize: 64 });
    const run = new Bookkeeping(registry, bus);
    const w = registry.add(info('site-a'));
    run.onHeartbeat(w, 'idle');
    run.onHeartbeat(w, 'idle');
    run.onHeartbeat(w, 'training');
    const beats = (await bus.history('scale-unit', 0)).filter((e) => e.type === 'worker.heartbeat');
    expect(beats.map((e) => (e as { status: string }).status)).toEqual(['idle', 'training']);
    await bus.close();
  });
});

describe('heartbeat refresh events with many workers', () => {
  afterEach(() => {
    vi.useRealTimers();
  });

  it('refreshes every 10 s up to a few thousand workers, stretched to at most 25 s beyond', () => {
    expect(heartbeatRefreshMs(1)).toBe(10_000);
    expect(heartbeatRefreshMs(10 * HEARTBEAT_REFRESH_PER_SEC)).toBe(10_000);
    expect(heartbeatRefreshMs(20 * HEARTBEAT_REFRESH_PER_SEC)).toBe(20_000);
    expect(heartbeatRefreshMs(1_000_000)).toBe(25_000);
  });

  const refreshes = async (workers: number, afterMs: number[]): Promise<number> => {
    vi.useFakeTimers({ now: 1_000_000 });
    const registry = new WorkerRegistry(15_000);
    const bus = new MemoryBus({ ringSize: 100_000 });
    const run = new Bookkeeping(registry, bus);
    const ws = Array.from({ length: workers }, (_, i) => registry.add(info(`site-${i}`)));
    const w = ws[0]!;
    run.onHeartbeat(w, 'idle');
    for (const ms of afterMs) {
      vi.setSystemTime(1_000_000 + ms);
      run.onHeartbeat(w, 'idle');
    }
    const n = (await bus.history('scale-unit', 0)).filter((e) => e.type === 'worker.heartbeat').length;
    await bus.close();
    return n;
  };

  it('publishes an unchanged status again after 10 s with few workers, after 25 s with 10,000', async () => {
    expect(await refreshes(10, [5_000, 10_001])).toBe(2);
    expect(await refreshes(10_000, [5_000, 10_001, 24_000])).toBe(1);
    expect(await refreshes(10_000, [5_000, 25_001])).toBe(2);
  });
});

describe('audit join records under many registrations', () => {
  const join1 = (i: number) => ({ type: 'join' as const, site: `site-${i}`, worker_id: `w${i}`, address: 'ipv4:127.0.0.1:1', cert_sha256: null, cert_serial: null, token_id: null });

  it('commits each record before it resolves, many records sharing one fsync', async () => {
    const dir = temp();
    const lineCountAtSync: number[] = [];
    let path = '';
    const countingSync = (fd: number, cb: (err: NodeJS.ErrnoException | null) => void): void => {
      lineCountAtSync.push(readFileSync(path, 'utf8').split('\n').filter(Boolean).length);
      fsync(fd, cb);
    };
    const a = AuditLog.open(dir, countingSync);
    path = a.path;
    const resolvedAfter: number[] = [];
    const all = Array.from({ length: 300 }, (_, i) =>
      a.commit(join1(i)).then(() => {
        // The fsyncs started so far: one of them must have begun after this record was written.
        resolvedAfter[i] = Math.max(...lineCountAtSync);
      }),
    );
    await Promise.all(all);
    for (let i = 0; i < 300; i++) expect(resolvedAfter[i]).toBeGreaterThanOrEqual(i + 1);
    // The first record's fsync starts at once; the other 299 were written while it ran and share the next one.
    expect(lineCountAtSync.length).toBeLessThanOrEqual(3);
    expect(lineCountAtSync.at(-1)).toBe(300);
    a.close();
    const lines = readFileSync(path, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { worker_id: string });
    expect(lines.map((l) => l.worker_id)).toEqual(Array.from({ length: 300 }, (_, i) => `w${i}`));
  });

  it('resolves commits still waiting when the log is closed (close syncs), and commits after close are no-ops', async () => {
    const dir = temp();
    let calls = 0;
    // An fsync that never completes: only close() can settle the waiters.
    const stuck = (): void => void calls++;
    const a = AuditLog.open(dir, stuck);
    const p1 = a.commit(join1(1));
    const p2 = a.commit(join1(2));
    a.close();
    await Promise.all([p1, p2, a.commit(join1(3))]);
    expect(calls).toBe(1);
    expect(readFileSync(a.path, 'utf8').trim().split('\n')).toHaveLength(2);
  });

  it('Register answers only once its join record is on disk', async () => {
    const dir = temp();
    let release: (() => void) | null = null;
    const held = (fd: number, cb: (err: NodeJS.ErrnoException | null) => void): void => {
      release = () => fsync(fd, cb);
    };
    const audit = AuditLog.open(dir, held);
    const registry = new WorkerRegistry(15_000);
    const service = createCoordinatorService({ cfg, run: { runId: 'scale-unit' } as unknown as RunController, registry, modelFingerprint: '', admission: new Admission({ sharedToken: 'tok', audit }) });
    let answered = false;
    const reply = registerCall(service, { site: 'site-a' }).then((r) => {
      answered = true;
      return r;
    });
    await new Promise((r) => setTimeout(r, 20));
    expect(answered).toBe(false);
    expect(readFileSync(audit.path, 'utf8')).toContain('"site":"site-a"');
    release!();
    const r = await reply;
    expect(r.err).toBeNull();
    expect(registry.get(r.res!.workerId)?.site).toBe('site-a');
    audit.close();
  });
});

describe('certificate bindings of gone workers', () => {
  it('are swept as registrations go on, so the map stays within twice the live workers', async () => {
    const registry = new WorkerRegistry(15_000);
    const admission = new Admission({ sharedToken: 'tok', mutual: true });
    type Admitted = Parameters<Admission['admitted']>[1];
    const admit = (i: number): WorkerRecord => {
      const w = registry.add(info(`site-${i}`));
      void admission.admitted(w, { ok: true, peer: { site: w.site, serial: String(i), sha256: 'ab' }, tokenId: null } as Admitted, 'ipv4:127.0.0.1:1');
      return w;
    };
    // Churn: 20 live workers at any time, 5000 registrations in all.
    const live: WorkerRecord[] = [];
    let most = 0;
    for (let i = 0; i < 5000; i++) {
      live.push(admit(i));
      if (live.length > 20) registry.detach(live.shift()!, 'left');
      most = Math.max(most, admission.boundCount);
    }
    expect(most).toBeLessThanOrEqual(2 * 21 + 64);
    expect(admission.boundCount).toBeGreaterThanOrEqual(20);
  });
});
