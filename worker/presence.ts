/**
 * Worker presence on NATS (optional): a worker announces itself every few
 * seconds on `fedtune.workers.<site>` (core NATS, nothing stored) so that an
 * operator can see which GPU machines are idle across runs:
 *
 *   const p = startPresence({ nats: { servers: 'nats://10.0.0.5:4222' }, workerId, site, device, memoryBytes });
 *   p.update('training', runId);  ...  p.update('idle');
 *   await p.close();              // announces 'offline'
 *
 *   fedtune workers --nats nats://10.0.0.5:4222     (listWorkers below)
 *
 * Presence never gets in the way of training: startPresence returns at once,
 * connects in the background (retrying while NATS is down) and only logs
 * when NATS cannot be reached. A listing asks every worker to announce at
 * once by publishing on `fedtune.presence.ping`. (`fedtune` is the default
 * subject root; see Subjects in coordinator/events/nats-common.ts.)
 */
import { freemem, hostname, totalmem } from 'node:os';
import { connect, type NatsConnection } from 'nats';
import { z } from 'zod';
import { logger } from '../common/log.ts';
import {
  describeNatsError,
  Subjects,
  toConnectionOptions,
  type NatsConnectOptions,
} from '../coordinator/events/nats-common.ts';

const log = logger('presence');

export type PresenceStatus = 'idle' | 'training' | 'offline';

/** One announcement, as published on fedtune.workers.<site> (JSON). */
export const PresenceAnnouncement = z.object({
  workerId: z.string().min(1),
  site: z.string().min(1),
  device: z.string(),
  /** Accelerator memory the worker reported (bytes). */
  memoryBytes: z.number().nonnegative(),
  status: z.enum(['idle', 'training', 'offline']),
  runId: z.string().nullable(),
  host: z.string(),
  hostMemoryBytes: z.number().nonnegative(),
  hostFreeMemoryBytes: z.number().nonnegative(),
  /** Milliseconds since the Unix epoch when this was sent. */
  time: z.number(),
  /** The worker announces again within this many milliseconds (0 on 'offline'). */
  intervalMs: z.number().nonnegative(),
});
export type PresenceAnnouncement = z.infer<typeof PresenceAnnouncement>;

export interface PresenceOptions {
  nats: NatsConnectOptions;
  workerId: string;
  site: string;
  device: string;
  memoryBytes: number;
  /** Announcement period (default 5000 ms). */
  intervalMs?: number;
  /** Subject root (default fedtune): announcements go to <root>.workers.<site>. */
  subjectRoot?: string;
}

export interface Presence {
  /** Change what is announced (and announce it now). runId goes with 'training'. */
  update(status: 'idle' | 'training', runId?: string): void;
  /** Announce 'offline' and disconnect. */
  close(): Promise<void>;
}

function nonEmpty(field: string, v: unknown): string {
  if (typeof v !== 'string' || v.trim() === '') throw new Error(`presence: ${field} must be a non-empty string, got ${JSON.stringify(v)}`);
  return v;
}

/** Start announcing; returns at once. Throws only for invalid options. */
export function startPresence(opts: PresenceOptions): Presence {
  const natsOpts = toConnectionOptions('presence', opts.nats);
  const workerId = nonEmpty('workerId', opts.workerId);
  const site = nonEmpty('site', opts.site);
  const intervalMs = opts.intervalMs ?? 5000;
  if (!Number.isInteger(intervalMs) || intervalMs < 100) {
    throw new Error(`presence: intervalMs must be an integer >= 100, got ${String(opts.intervalMs)}`);
  }
  if (!Number.isFinite(opts.memoryBytes) || opts.memoryBytes < 0) {
    throw new Error(`presence: memoryBytes must be a number >= 0, got ${String(opts.memoryBytes)}`);
  }
  const subjects = new Subjects(opts.subjectRoot);
  const subject = subjects.workers(site);
  let status: PresenceStatus = 'idle';
  let runId: string | null = null;
  let nc: NatsConnection | undefined;
  let closed = false;
  let retryTimer: NodeJS.Timeout | undefined;
  let tick: NodeJS.Timeout | undefined;
  let warned = false;
  let backoff = 500;

  const announcement = (): PresenceAnnouncement => ({
    workerId,
    site,
    device: opts.device,
    memoryBytes: opts.memoryBytes,
    status,
    runId,
    host: hostname(),
    hostMemoryBytes: totalmem(),
    hostFreeMemoryBytes: freemem(),
    time: Date.now(),
    intervalMs: status === 'offline' ? 0 : intervalMs,
  });
  const announce = (): void => {
    if (!nc || nc.isClosed()) return;
    try {
      nc.publish(subject, JSON.stringify(announcement()));
    } catch (err) {
      log.debug({ err: describeNatsError(err) }, 'presence announcement failed');
    }
  };

  const tryConnect = async (): Promise<void> => {
    retryTimer = undefined;
    try {
      const c = await connect({
        ...natsOpts,
        name: `fedtune-worker-${workerId}`,
        timeout: 2000,
        reconnect: true,
        maxReconnectAttempts: -1,
        reconnectTimeWait: 1000,
      });
      if (closed) {
        await c.close();
        return;
      }
      nc = c;
      c.subscribe(subjects.presencePing, { callback: () => announce() });
      announce();
      tick = setInterval(announce, intervalMs);
      tick.unref();
      log.info({ subject, servers: natsOpts.servers }, 'announcing worker presence on NATS');
    } catch (err) {
      if (closed) return;
      if (!warned) {
        warned = true;
        log.warn({ servers: natsOpts.servers, err: describeNatsError(err) }, 'presence: cannot reach NATS; retrying in the background');
      }
      retryTimer = setTimeout(() => void tryConnect(), backoff);
      retryTimer.unref();
      backoff = Math.min(backoff * 2, 10_000);
    }
  };
  void tryConnect();

  return {
    update(s: 'idle' | 'training', run?: string): void {
      if (s !== 'idle' && s !== 'training') throw new Error(`presence.update: status must be idle or training, got ${JSON.stringify(s)}`);
      status = s;
      runId = s === 'training' ? (run ?? null) : null;
      announce();
    },
    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      if (retryTimer) clearTimeout(retryTimer);
      if (tick) clearInterval(tick);
      if (nc && !nc.isClosed()) {
        status = 'offline';
        runId = null;
        announce();
        await nc.drain().catch(() => undefined);
      }
    },
  };
}

/**
 * Workers that announce themselves on NATS: asks all of them to announce now
 * and collects answers for waitMs. One entry per worker (its latest), sorted
 * by site and worker id; workers that said goodbye are listed as offline.
 */
export async function listWorkers(opts: {
  nats: NatsConnectOptions;
  waitMs?: number;
  subjectRoot?: string;
}): Promise<PresenceAnnouncement[]> {
  const natsOpts = toConnectionOptions('workers', opts.nats);
  const subjects = new Subjects(opts.subjectRoot);
  const waitMs = opts.waitMs ?? 1500;
  let nc: NatsConnection;
  try {
    nc = await connect({ ...natsOpts, name: 'fedtune-workers-list', timeout: 5000 });
  } catch (err) {
    throw new Error(`cannot connect to NATS at ${opts.nats.servers}: ${describeNatsError(err)}`);
  }
  const latest = new Map<string, PresenceAnnouncement>();
  try {
    nc.subscribe(subjects.allWorkers, {
      callback: (err, msg) => {
        if (err) return;
        let parsed: unknown;
        try {
          parsed = JSON.parse(msg.string());
        } catch {
          return;
        }
        const r = PresenceAnnouncement.safeParse(parsed);
        if (!r.success) {
          log.debug({ subject: msg.subject }, 'ignoring a malformed presence announcement');
          return;
        }
        const prev = latest.get(r.data.workerId);
        if (!prev || prev.time <= r.data.time) latest.set(r.data.workerId, r.data);
      },
    });
    await nc.flush();
    nc.publish(subjects.presencePing);
    await new Promise((resolve) => setTimeout(resolve, waitMs));
  } finally {
    await nc.close();
  }
  return [...latest.values()].sort((a, b) => a.site.localeCompare(b.site) || a.workerId.localeCompare(b.workerId));
}
