/**
 * Worker presence on NATS: announcements on <root>.workers.<site>, status
 * changes, goodbye on close, the `fedtune workers` listing, and a worker
 * that cannot reach NATS carrying on.
 */
import { spawn } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { listWorkers, startPresence, type PresenceAnnouncement } from '../../worker/presence.ts';
import { freePort, natsTestsEnabled, SHARED_NATS, uniq, waitFor } from './nats-helpers.ts';

const enabled = await natsTestsEnabled('worker presence tests');

describe.skipIf(!enabled)('worker presence on NATS', () => {
  it('announces idle, then training with its run; listWorkers sees each', async () => {
    const subjectRoot = uniq('ft');
    const site = uniq('lab.gpu'); // a dot: encoded in the subject
    const p = startPresence({ nats: { servers: SHARED_NATS }, workerId: 'w-1', site, device: 'cuda:0 (test)', memoryBytes: 80 * 2 ** 30, intervalMs: 200, subjectRoot });
    const find = async (): Promise<PresenceAnnouncement | undefined> =>
      (await listWorkers({ nats: { servers: SHARED_NATS }, waitMs: 400, subjectRoot })).find((w) => w.site === site);
    try {
      let seen: PresenceAnnouncement | undefined;
      await waitFor(async () => (seen = await find()) !== undefined, 10_000, 'the worker to announce itself');
      expect(seen).toMatchObject({ workerId: 'w-1', site, device: 'cuda:0 (test)', memoryBytes: 80 * 2 ** 30, status: 'idle', runId: null });
      p.update('training', 'run-42');
      await waitFor(async () => (seen = await find())?.status === 'training', 10_000, 'status training');
      expect(seen?.runId).toBe('run-42');
      // Another root does not see it.
      const other = await listWorkers({ nats: { servers: SHARED_NATS }, waitMs: 300, subjectRoot: uniq('ft') });
      expect(other.find((w) => w.site === site)).toBeUndefined();
    } finally {
      await p.close();
    }
  });

  it('says offline on close, and `fedtune workers` lists it', async () => {
    const subjectRoot = uniq('ft');
    const site = uniq('site');
    const p = startPresence({ nats: { servers: SHARED_NATS }, workerId: 'w-2', site, device: 'cpu', memoryBytes: 0, intervalMs: 10_000, subjectRoot });
    // The listing's ping (or the worker's first announcement on connect) answers well before its 10 s period.
    const proc = spawn(process.execPath, ['bin/fedtune.js', 'workers', '--nats', SHARED_NATS, '--subject-root', subjectRoot, '--wait', '1000', '--json'], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, FEDTUNE_LOG_LEVEL: 'warn' },
    });
    let out = '';
    proc.stdout.on('data', (d: Buffer) => (out += d.toString()));
    const code = await new Promise<number | null>((resolve) => proc.once('exit', resolve));
    expect(code).toBe(0);
    const listed = JSON.parse(out) as PresenceAnnouncement[];
    expect(listed.map((w) => [w.workerId, w.site, w.status])).toEqual([['w-2', site, 'idle']]);

    const seenClose: PresenceAnnouncement[] = [];
    const listing = listWorkers({ nats: { servers: SHARED_NATS }, waitMs: 1500, subjectRoot }).then((l) => seenClose.push(...l));
    await new Promise((r) => setTimeout(r, 500));
    await p.close();
    await listing;
    expect(seenClose.find((w) => w.workerId === 'w-2')?.status).toBe('offline');
  });

  it('does not get in the way when NATS is unreachable', async () => {
    const p = startPresence({ nats: { servers: `nats://127.0.0.1:${await freePort()}` }, workerId: 'w-3', site: 's', device: 'cpu', memoryBytes: 0 });
    p.update('training', 'r');
    await p.close(); // returns although it never connected
    expect(() => startPresence({ nats: { servers: SHARED_NATS }, workerId: '', site: 's', device: 'cpu', memoryBytes: 0 })).toThrow(/workerId must be a non-empty string/);
  });
});
