/**
 * What federated rounds and distributed steps share: the run's identity and
 * event publishing, the global adapter and its downloadable packed versions,
 * the wait-for-condition machinery, and the registry events that do not depend
 * on the mode.
 */
import { packTensorMap, type PackedTensors, type TensorSpecEntry } from '../common/chunks.ts';
import type { RunConfig } from '../common/config.ts';
import type { RunEvent, RunEventBody } from '../common/events.ts';
import { logger } from '../common/log.ts';
import type { TensorMap } from '../common/tensor.ts';
import { giveAdapterBuffer, takeAdapterBuffer } from './strategies/math/sum.ts';
import type { TaskFailed } from '../proto/gen/fedtune/v1/coordinator.ts';
import { Conditions } from './conditions.ts';
import type { EventBus } from './events/bus.ts';
import type { RoundRecord } from './store.ts';
import { redactedConfig } from './tasks.ts';
import { workerInfo, type WorkerRecord, type WorkerRegistry } from './workers.ts';

const log = logger('coordinator.run');

export interface RunResult {
  state: 'completed' | 'failed' | 'stopped';
  /** Rounds (federated) or optimizer steps (distributed) completed. */
  rounds: number;
  finalAdapterPath: string | null;
  history: RoundRecord[];
  error?: string;
}

/** What both run loops are built from. */
export interface RunBaseOptions {
  cfg: RunConfig;
  bus: EventBus;
  registry: WorkerRegistry;
  global: TensorMap;
  state: { runId: string; globalVersion: number };
  resumed: boolean;
}

/** About how many unchanged-status heartbeat events per second all workers together publish (at most one per worker per 10 s). */
export const HEARTBEAT_REFRESH_PER_SEC = 400;

/** How often an unchanged status is published again, with `workers` registered: 10 s, stretched up to 25 s. */
export function heartbeatRefreshMs(workers: number): number {
  return Math.min(25_000, Math.max(10_000, (workers / HEARTBEAT_REFRESH_PER_SEC) * 1000));
}

export abstract class RunBase {
  protected readonly abort = new AbortController();
  protected readonly conditions = new Conditions(this.abort.signal);
  /** Per connected worker: the last heartbeat event published for it (dropped when the worker leaves). */
  protected readonly lastHeartbeatEvent = new Map<string, { status: string; at: number }>();
  private global: TensorMap;
  private version: number;
  private packed: PackedTensors;
  /**
   * Packed adapters that can still be downloaded (the current version and the
   * one before), keyed `version:rank`; rank 0 is the global adapter itself,
   * other ranks are the copies a mixed-rank strategy gives sites of that rank.
   */
  private readonly versions = new Map<string, PackedTensors>();
  /** Downloads streaming each packed version now (holdVersion). */
  private readonly readers = new Map<PackedTensors, number>();
  /** Versions no longer downloadable whose buffer goes back once their last download ends. */
  private readonly retired = new Set<PackedTensors>();

  readonly runId: string;
  protected readonly cfg: RunConfig;
  protected readonly bus: EventBus;
  protected readonly registry: WorkerRegistry;
  protected readonly resumed: boolean;
  /** Set by a loop that ends before its last round or step (run.completed carries it as `reason`). */
  protected completionReason: string | null = null;

  protected constructor(o: RunBaseOptions) {
    this.runId = o.state.runId;
    this.cfg = o.cfg;
    this.bus = o.bus;
    this.registry = o.registry;
    this.resumed = o.resumed;
    const global = inAdapterBuffer(o.global);
    const version = o.state.globalVersion;
    this.global = global;
    this.version = version;
    this.packed = packTensorMap(global);
    this.versions.set(`${version}:0`, this.packed);
  }

  get globalVersion(): number {
    return this.version;
  }
  get globalAdapter(): TensorMap {
    return this.global;
  }
  /** The current global adapter as it goes on the wire. */
  get packedGlobal(): PackedTensors {
    return this.packed;
  }
  get manifest(): readonly TensorSpecEntry[] {
    return this.packed.manifest;
  }

  publish(e: RunEventBody): RunEvent {
    return this.bus.publish({ ...e, runId: this.runId });
  }

  /** Packed bytes of a downloadable global adapter version (rank 0: the global's own shapes). */
  adapterVersion(version: number, rank = 0): PackedTensors | undefined {
    return this.versions.get(`${version}:${rank}`);
  }

  /**
   * A download streams `p`: its bytes are not reused (math/sum.ts, giveAdapterBuffer) until the
   * returned function is called, once, when the stream ends however it ends.
   */
  holdVersion(p: PackedTensors): () => void {
    this.readers.set(p, (this.readers.get(p) ?? 0) + 1);
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const n = (this.readers.get(p) ?? 1) - 1;
      if (n > 0) return void this.readers.set(p, n);
      this.readers.delete(p);
      if (this.retired.delete(p)) this.free(p);
    };
  }

  /** A retired version's buffer, unless a live version shares it (a strategy that kept the global). */
  private free(p: PackedTensors): void {
    for (const q of this.versions.values()) if (q.bytes.buffer === p.bytes.buffer) return;
    giveAdapterBuffer(p.bytes);
  }

  /** Make the current version downloadable at another rank (what a mixed-rank strategy starts such sites from). */
  protected addVariant(rank: number, adapter: TensorMap): PackedTensors {
    const key = `${this.version}:${rank}`;
    let p = this.versions.get(key);
    if (!p) {
      p = packTensorMap(adapter);
      this.versions.set(key, p);
    }
    return p;
  }

  onSessionOpened(w: WorkerRecord): void {
    this.publish({ type: 'worker.joined', worker: workerInfo(w) });
    this.conditions.notify();
  }

  /**
   * Heartbeat events only when a worker's status changes, or as a refresh of
   * an unchanged one every 10 s; with many workers the refresh is stretched so
   * that all of them together publish about HEARTBEAT_REFRESH_PER_SEC, up to
   * 25 s (the dashboard marks a worker stale after 30 s without an event).
   */
  onHeartbeat(w: WorkerRecord, status: string): void {
    if (!w.alive) return;
    const last = this.lastHeartbeatEvent.get(w.workerId);
    const now = Date.now();
    if (!last || last.status !== status || now - last.at > heartbeatRefreshMs(this.registry.size)) {
      this.lastHeartbeatEvent.set(w.workerId, { status, at: now });
      this.publish({ type: 'worker.heartbeat', workerId: w.workerId, site: w.site, status });
    }
  }

  /** A worker's session ended: tell the run's consumers. */
  protected workerLeft(w: WorkerRecord, reason: string): void {
    this.lastHeartbeatEvent.delete(w.workerId);
    this.publish({ type: 'worker.left', workerId: w.workerId, site: w.site, reason });
    log.info({ worker: w.workerId, site: w.site, reason }, 'worker left');
  }

  /** A worker reported that it could not do a task. */
  protected taskFailedEvent(w: WorkerRecord, f: TaskFailed): void {
    this.publish({ type: 'worker.error', workerId: w.workerId, site: w.site, message: `task ${f.taskId}: ${f.message}` });
    log.warn({ worker: w.workerId, site: w.site, task: f.taskId }, f.message);
  }

  /**
   * The run's lifecycle around its loop: run.started, the loop, then
   * run.completed, run.failed or (after stop()) a stopped state. Never throws.
   * `done` says how far the run got and where its adapter is.
   */
  protected async lifecycle(
    start: { strategy: string; totalRounds: number; totalSteps: number; resumedFrom: number },
    loop: () => Promise<Record<string, number | null | undefined>>,
    done: () => { n: number; path: string | null; history: RoundRecord[] },
  ): Promise<RunResult> {
    const cfg = this.cfg;
    this.publish({
      type: 'run.started',
      name: cfg.name,
      mode: cfg.mode,
      strategy: start.strategy,
      totalRounds: start.totalRounds,
      totalSteps: start.totalSteps,
      config: redactedConfig(cfg),
      resumedFromRound: this.resumed ? start.resumedFrom : 0,
    });
    try {
      const metrics = await loop();
      const d = done();
      this.publish({
        type: 'run.completed',
        rounds: d.n,
        finalAdapterPath: d.path ?? '',
        metrics: Object.fromEntries(Object.entries(metrics).filter((e): e is [string, number] => typeof e[1] === 'number')),
        ...(this.completionReason !== null ? { reason: this.completionReason } : {}),
      });
      this.publish({ type: 'run.state', state: 'completed' });
      return { state: 'completed', rounds: d.n, finalAdapterPath: d.path, history: d.history };
    } catch (err) {
      const stopped = this.abort.signal.aborted;
      const error = err instanceof Error ? err.message : String(err);
      if (stopped) {
        this.publish({ type: 'run.state', state: 'stopped', message: error });
      } else {
        log.error({ err }, 'run failed');
        this.publish({ type: 'run.failed', error });
        this.publish({ type: 'run.state', state: 'failed', message: error });
      }
      const d = done();
      return { state: stopped ? 'stopped' : 'failed', rounds: d.n, finalAdapterPath: d.n > 0 ? d.path : null, history: d.history, error };
    }
  }

  stop(): void {
    this.abort.abort(new Error('run stopped'));
    this.conditions.notify();
  }

  /** Make `adapter` the global adapter `version`; the version before stays downloadable for late workers. */
  protected setGlobal(adapter: TensorMap, version: number): void {
    this.global = adapter;
    this.version = version;
    this.packed = packTensorMap(adapter);
    this.versions.set(`${version}:0`, this.packed);
    for (const [k, p] of this.versions) {
      if (Number(k.split(':')[0]) >= version - 1) continue;
      // Two versions old: no task starts from it and no new download gets it, so the buffer of an
      // aggregator's mean can serve a later mean once no download streams it.
      this.versions.delete(k);
      if (this.readers.has(p)) this.retired.add(p);
      else this.free(p);
    }
  }
}

/**
 * A float32 adapter as views of one buffer from takeAdapterBuffer (copied once): the starting global
 * then packs without a second copy, and once it is two versions old its buffer serves a later
 * round's mean (a fresh 64 MiB buffer costs ~16k page faults, measured 0.2 s of system time per
 * round in bench (c)). An adapter holding float64 stays as it is.
 */
function inAdapterBuffer(m: TensorMap): TensorMap {
  let n = 0;
  for (const t of m.values()) {
    if (!(t.data instanceof Float32Array)) return m;
    n += t.data.length;
  }
  if (n === 0) return m;
  const all = takeAdapterBuffer(n);
  const out: TensorMap = new Map();
  let off = 0;
  for (const [name, t] of m) {
    const v = all.subarray(off, off + t.data.length);
    v.set(t.data);
    out.set(name, { ...t, data: v });
    off += t.data.length;
  }
  return out;
}

/** Why an update's tensors do not match the global adapter's manifest (null when they do). */
export function manifestMismatch(got: readonly TensorSpecEntry[], want: readonly TensorSpecEntry[]): string | null {
  const wantByName = new Map(want.map((e) => [e.name, e]));
  for (const e of got) {
    const w = wantByName.get(e.name);
    if (!w) return `unknown tensor ${e.name} (not part of the global adapter)`;
    if (e.dtype !== w.dtype) return `tensor ${e.name}: dtype ${e.dtype}, expected ${w.dtype}`;
    if (e.shape.length !== w.shape.length || e.shape.some((d, i) => d !== w.shape[i])) {
      return `tensor ${e.name}: shape [${e.shape.join(', ')}], expected [${w.shape.join(', ')}]`;
    }
  }
  const gotNames = new Set(got.map((e) => e.name));
  const missing = want.filter((e) => !gotNames.has(e.name));
  if (missing.length > 0) return `missing tensor ${missing[0]!.name}${missing.length > 1 ? ` and ${missing.length - 1} more` : ''}`;
  if (got.length !== want.length) return `${got.length} tensors, expected ${want.length}`;
  if (got.some((e, i) => e.name !== want[i]!.name)) return 'tensors are not in the order of the global adapter manifest';
  return null;
}
