/**
 * NATS restarted while a run publishes: its own nats-server child process
 * (never the shared one) is stopped and started again on the same port and
 * store directory. Sequence numbers prove that no event is lost and none is
 * stored or delivered twice, in JetStream and to a live consumer.
 */
import { describe, expect, it } from 'vitest';
import { connect } from 'nats';
import type { NewRunEvent, RunEvent } from '../../common/events.ts';
import { MemoryBus } from '../../coordinator/events/memory.ts';
import { NatsBus } from '../../coordinator/events/nats.ts';
import { NatsConsumerBus } from '../../coordinator/events/nats-consumer.ts';
import { Subjects } from '../../coordinator/events/nats-common.ts';
import { freePort, natsBinaryAvailable, natsTestsEnabled, PrivateNatsServer, uniq, waitFor } from './nats-helpers.ts';

const enabled = (await natsTestsEnabled('NATS restart test')) && natsBinaryAvailable('NATS restart test');

function step(runId: string, s: number): NewRunEvent {
  return { runId, type: 'step.completed', step: s, epoch: 0, loss: 1 / s, lr: 1e-3, tokens: 64, tokensPerSec: 1000, workers: 2, computeMs: 1, communicateMs: 1, aggregateMs: 1, perWorker: [] };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe.skipIf(!enabled)('NATS restarted mid-run', () => {
  it('loses no event and duplicates none', async () => {
    const server = new PrivateNatsServer(await freePort());
    await server.start();
    const stream = 'FT_RESTART';
    const runId = uniq('restart');
    const bus = await NatsBus.create(new MemoryBus(), {
      connection: { servers: server.url },
      stream,
      maxInFlight: 64,
      publishTimeoutMs: 1000,
      connectTimeoutMs: 500,
      retryMinMs: 50,
      retryMaxMs: 300,
    });
    const consumer = await NatsConsumerBus.create({ connection: { servers: server.url }, stream });
    const live: RunEvent[] = [];
    const sub = consumer.subscribe({ runId });
    const reading = (async () => {
      for await (const e of sub) live.push(e);
    })();
    let published = 0;
    const publishSome = async (n: number): Promise<void> => {
      for (let i = 0; i < n; i++) {
        bus.publish(step(runId, ++published));
        if (i % 10 === 9) await sleep(1);
      }
    };
    try {
      await publishSome(300);
      await server.stop(); // while events are in flight
      await publishSome(300);
      await waitFor(() => bus.status().degraded, 10_000, 'the bus to report degraded');
      await server.start();
      await publishSome(300);
      expect(await bus.flush(30_000)).toBe(true);

      const local = await bus.history(runId);
      const n = local.length;
      expect(local.map((e) => e.seq)).toEqual(Array.from({ length: n }, (_, i) => i + 1));
      expect(local.filter((e) => e.type === 'step.completed')).toHaveLength(900);
      expect(local.some((e) => e.type === 'bus.degraded')).toBe(true);
      expect(local.some((e) => e.type === 'bus.restored')).toBe(true);

      // JetStream stored every event exactly once.
      const nc = await connect({ servers: server.url });
      try {
        const jsm = await nc.jetstreamManager();
        const info = await jsm.streams.info(stream, { subjects_filter: new Subjects().run(runId) });
        const stored = Object.values(info.state.subjects ?? {}).reduce((a, b) => a + b, 0);
        expect(stored).toBe(n);
      } finally {
        await nc.close();
      }
      // A consumer reading afterwards sees the same events; the one that followed live through the restart too.
      expect(await consumer.history(runId)).toEqual(local);
      await waitFor(() => live.length >= n, 30_000, `the live subscriber to reach seq ${n} (has ${live.length})`);
      expect(live.map((e) => e.seq)).toEqual(local.map((e) => e.seq));
      expect(live).toEqual(local);
    } finally {
      sub.close();
      await reading.catch(() => undefined);
      await consumer.close();
      await bus.close();
      await server.destroy();
    }
  });
});
