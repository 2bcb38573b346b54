/**
 * What federated rounds and distributed steps share: the run's identity and
 * event publishing, the global adapter and its downloadable packed versions,
 * the wait-for-condition machinery, and the registry events that do not depend
 * on the mode.
 */
import { packTensorMap, type PackedTensors, type TensorSpecEntry } from '../common/chunks.ts';
import type { RunEvent, RunEventBody } from '../common/events.ts';
import type { TensorMap } from '../common/tensor.ts';
import { Conditions } from './conditions.ts';
import type { EventBus } from './events/bus.ts';
import { workerInfo, type WorkerRecord } from './workers.ts';

export abstract class RunBase {
  protected readonly abort = new AbortController();
  protected readonly conditions = new Conditions(this.abort.signal);
  private readonly lastHeartbeatEvent = new Map<string, { status: string; at: number }>();
  private global: TensorMap;
  private version: number;
  private packed: PackedTensors;
  /**
   * Packed adapters that can still be downloaded (the current version and the
   * one before), keyed `version:rank`; rank 0 is the global adapter itself,
   * other ranks are the copies a mixed-rank strategy gives sites of that rank.
   */
  private readonly versions = new Map<string, PackedTensors>();

  protected constructor(
    readonly runId: string,
    protected readonly bus: EventBus,
    global: TensorMap,
    version: number,
  ) {
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

  /** Heartbeat events only when a worker's status changes, or every 10 s. */
  onHeartbeat(w: WorkerRecord, status: string): void {
    const last = this.lastHeartbeatEvent.get(w.workerId);
    const now = Date.now();
    if (!last || last.status !== status || now - last.at > 10_000) {
      this.lastHeartbeatEvent.set(w.workerId, { status, at: now });
      this.publish({ type: 'worker.heartbeat', workerId: w.workerId, site: w.site, status });
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
    for (const k of this.versions.keys()) if (Number(k.split(':')[0]) < version - 1) this.versions.delete(k);
  }
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
