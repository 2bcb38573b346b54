/**
 * Connected workers: identity, capabilities, the open session stream each one
 * has, and liveness by heartbeat. The registry knows nothing of rounds; it tells
 * its listener when a worker comes or goes.
 */
import { randomBytes, timingSafeEqual } from 'node:crypto';
import type { ServerDuplexStream } from '@grpc/grpc-js';
import type { CoordinatorMessage, WorkerMessage } from '../proto/gen/fedtune/v1/coordinator.ts';
import type { WorkerInfo } from '../common/events.ts';

export type SessionStream = ServerDuplexStream<WorkerMessage, CoordinatorMessage>;

export interface WorkerRecord {
  workerId: string;
  sessionKey: Buffer;
  site: string;
  device: string;
  memoryBytes: number;
  backends: string[];
  numTrainExamples: number;
  numEvalExamples: number;
  client: string;
  registeredAt: number;
  lastSeen: number;
  status: string;
  stream: SessionStream | null;
  /** False once the worker left (stream closed, heartbeat timeout); it must register again. */
  alive: boolean;
}

export interface RegistryListener {
  onSessionOpened(w: WorkerRecord): void;
  onWorkerGone(w: WorkerRecord, reason: string): void;
}

export class WorkerRegistry {
  private readonly workers = new Map<string, WorkerRecord>();
  /** The live worker of each site (Register looks it up once per call: no scan of every worker). */
  private readonly bySite = new Map<string, WorkerRecord>();
  private sweeper: NodeJS.Timeout | null = null;
  listener: RegistryListener | null = null;

  constructor(private readonly heartbeatTimeoutMs: number) {}

  add(info: Omit<WorkerRecord, 'workerId' | 'sessionKey' | 'registeredAt' | 'lastSeen' | 'status' | 'stream' | 'alive'>): WorkerRecord {
    const slug = info.site.replace(/[^A-Za-z0-9_-]/g, '_').slice(0, 40) || 'worker';
    const w: WorkerRecord = {
      ...info,
      workerId: `${slug}-${randomBytes(4).toString('hex')}`,
      sessionKey: randomBytes(24),
      registeredAt: Date.now(),
      lastSeen: Date.now(),
      status: 'registered',
      stream: null,
      alive: true,
    };
    this.workers.set(w.workerId, w);
    this.bySite.set(w.site, w);
    return w;
  }

  /** The live worker registered for `site`, if any. */
  liveWorkerOf(site: string): WorkerRecord | undefined {
    const w = this.bySite.get(site);
    return w?.alive ? w : undefined;
  }

  /** How many registrations the registry holds (live ones: gone workers are forgotten). */
  get size(): number {
    return this.workers.size;
  }

  /** The worker whose id and session key match, or null. */
  authenticate(workerId: string, sessionKeyHex: string): WorkerRecord | null {
    const w = this.workers.get(workerId);
    if (!w || !w.alive) return null;
    const key = Buffer.from(sessionKeyHex, 'hex');
    return key.length === w.sessionKey.length && timingSafeEqual(key, w.sessionKey) ? w : null;
  }

  get(workerId: string): WorkerRecord | undefined {
    return this.workers.get(workerId);
  }

  /** Workers with an open session. */
  connected(): WorkerRecord[] {
    return [...this.workers.values()].filter((w) => w.alive && w.stream !== null);
  }

  all(): WorkerRecord[] {
    return [...this.workers.values()];
  }

  /** The worker's session stream; a second Session call of the same registration replaces the first (closed, the registration kept). */
  attach(w: WorkerRecord, stream: SessionStream): void {
    const old = w.stream;
    w.stream = stream;
    if (old && old !== stream && !old.destroyed) {
      try {
        old.end();
      } catch {
        /* already broken */
      }
    }
    w.lastSeen = Date.now();
    w.status = 'idle';
    this.listener?.onSessionOpened(w);
  }

  touch(w: WorkerRecord, status?: string): void {
    w.lastSeen = Date.now();
    if (status) w.status = status;
  }

  /** The worker is gone for good: close its stream and forget its session. */
  detach(w: WorkerRecord, reason: string): void {
    if (!w.alive) return;
    w.alive = false;
    w.status = 'gone';
    const s = w.stream;
    w.stream = null;
    if (s && !s.destroyed) {
      try {
        s.end();
      } catch {
        /* the stream is already broken */
      }
    }
    this.workers.delete(w.workerId);
    if (this.bySite.get(w.site) === w) this.bySite.delete(w.site);
    this.listener?.onWorkerGone(w, reason);
  }

  /** Send one message down a worker's session; false when it has none. */
  send(w: WorkerRecord, msg: CoordinatorMessage): boolean {
    const s = w.stream;
    if (!w.alive || !s || s.destroyed || s.writableEnded) return false;
    try {
      s.write(msg);
      return true;
    } catch {
      return false;
    }
  }

  /** Start dropping workers whose last message is older than the heartbeat timeout. */
  startSweeper(intervalMs: number): void {
    this.sweeper = setInterval(() => {
      const now = Date.now();
      // Straight over the map (detach deletes the entry being visited, which a Map iteration allows): no copy of every worker each tick.
      for (const w of this.workers.values()) {
        if (w.alive && now - w.lastSeen > this.heartbeatTimeoutMs) {
          this.detach(w, `no heartbeat for ${Math.round((now - w.lastSeen) / 1000)} s`);
        }
      }
    }, intervalMs);
    this.sweeper.unref();
  }

  close(finished?: CoordinatorMessage, reason = 'coordinator closing'): void {
    if (this.sweeper) clearInterval(this.sweeper);
    for (const w of this.all()) {
      if (finished) this.send(w, finished);
      this.detach(w, reason);
    }
  }
}

export function workerInfo(w: WorkerRecord): WorkerInfo {
  return { workerId: w.workerId, site: w.site, device: w.device, memoryBytes: w.memoryBytes, backends: w.backends };
}
