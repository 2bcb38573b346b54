/**
 * The NATS options of the real commands: `fedtune coordinator --nats` publishes
 * its run's events to JetStream (read back by a consumer bus, as a standalone
 * dashboard would), and `fedtune worker --presence-nats` announces the worker
 * on fedtune.workers.<site> while it takes part.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { afterAll, describe, expect, it } from 'vitest';
import { createConsumerBus } from '../../coordinator/events/index.ts';
import { listWorkers } from '../../worker/presence.ts';
import type { RunEvent } from '../../common/events.ts';
import { fedtune, tempDir, tinyModel, worker, writeData, type Proc } from './federated-helpers.ts';
import { SHARED_NATS, deleteStreams, natsTestsEnabled, uniq, waitFor } from './nats-helpers.ts';

const procs: Proc[] = [];
const streams: string[] = [];
afterAll(async () => {
  for (const p of procs) p.kill();
  if (streams.length) await deleteStreams(SHARED_NATS, streams).catch(() => undefined);
});

describe('NATS flags of fedtune coordinator and fedtune worker', async () => {
  const enabled = await natsTestsEnabled('NATS wiring tests');
  it.skipIf(!enabled)('coordinator events reach JetStream; the worker announces its presence', async () => {
    const dir = tempDir('nats-wiring');
    const model = await tinyModel(join(dir, 'model'));
    const run = uniq('wired');
    const stream = uniq('WIRED').toUpperCase().replace(/[^A-Z0-9_]/g, '_');
    const root = uniq('ftw').replace(/[^a-zA-Z0-9_]/g, '_');
    streams.push(stream);
    const cfgPath = join(dir, 'run.yaml');
    writeFileSync(
      cfgPath,
      stringify({
        name: run,
        model: { path: model },
        training: { steps: 2, batch_size: 2, max_seq_len: 64 },
        rounds: 2,
        cohort: { min_workers: 1 },
        round: { min_results: 1, deadline_sec: 60 },
        checkpoint: { dir: join(dir, 'checkpoints') },
        server: { listen: '127.0.0.1:0', join_token: 'test-token', heartbeat_interval_ms: 300 },
        dashboard: { enabled: false },
        events: { nats: { url: 'nats://127.0.0.1:1', stream, subject_root: root } },
      }),
    );
    // --nats on the command line overrides the (unreachable) url in the file.
    const coord = fedtune(['coordinator', '--config', cfgPath, '--nats', SHARED_NATS]);
    procs.push(coord);
    const address = (await coord.waitFor(/listening on (\S+)/))[1]!;
    const site = uniq('site').replace(/[^a-zA-Z0-9_-]/g, '_');
    const w = worker({ address, site, data: writeData(join(dir, 'd.jsonl'), 8, 'x'), model, extra: ['--presence-nats', SHARED_NATS, '--noop-step-ms', '300'] });
    procs.push(w);
    // While it works, the worker is listed (default subject root).
    await waitFor(async () => (await listWorkers({ nats: { servers: SHARED_NATS }, waitMs: 700 })).some((a) => a.site === site), 30_000, 'presence');
    expect(await coord.exited).toBe(0);
    expect(await w.exited).toBe(0);

    const consumer = await createConsumerBus({ nats: { servers: SHARED_NATS, stream, subjectRoot: root } });
    try {
      await waitFor(async () => (await consumer.history(run, 0)).some((e) => e.type === 'run.completed'), 30_000, 'run.completed on NATS');
      const events: RunEvent[] = await consumer.history(run, 0);
      expect(events.map((e) => e.seq)).toEqual(events.map((_, i) => i + 1));
      expect(events.filter((e) => e.type === 'round.completed')).toHaveLength(2);
      expect(events.some((e) => e.type === 'worker.joined' && e.worker.site === site)).toBe(true);
    } finally {
      await consumer.close();
    }
    const after = await listWorkers({ nats: { servers: SHARED_NATS }, waitMs: 700 });
    expect(after.filter((a) => a.site === site && a.status !== 'offline')).toHaveLength(0);
  });
});
