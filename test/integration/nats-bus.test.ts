/**
 * NATS event bus against a real nats-server: subjects and message ids,
 * publish and replay from a sequence number, NATS down at start (publish
 * never blocks, bus.degraded, republish in order once NATS is up).
 */
import { afterAll, describe, expect, it } from 'vitest';
import { connect } from 'nats';
import type { NewRunEvent, RunEvent } from '../../common/events.ts';
import { MemoryBus } from '../../coordinator/events/memory.ts';
import { NatsBus } from '../../coordinator/events/nats.ts';
import { NatsConsumerBus } from '../../coordinator/events/nats-consumer.ts';
import { createEventBus } from '../../coordinator/events/index.ts';
import { directGet, Subjects } from '../../coordinator/events/nats-common.ts';
import {
  deleteStreams,
  freePort,
  natsBinaryAvailable,
  natsTestsEnabled,
  PrivateNatsServer,
  SHARED_NATS,
  uniq,
  waitFor,
} from './nats-helpers.ts';

const enabled = await natsTestsEnabled('NATS event bus tests');
const streams: string[] = [];
afterAll(() => deleteStreams(SHARED_NATS, streams));

function progress(runId: string, step: number): NewRunEvent {
  return { runId, type: 'worker.progress', workerId: 'w1', site: 's1', round: 1, taskId: 't1', step, totalSteps: 100, loss: 1 / step, tokensPerSec: 10, examples: step };
}

async function collect(it: AsyncIterable<RunEvent>, n: number, timeoutMs = 15_000): Promise<RunEvent[]> {
  const out: RunEvent[] = [];
  const timer = setTimeout(() => (it as { close?: () => void }).close?.(), timeoutMs);
  for await (const e of it) {
    out.push(e);
    if (out.length >= n) break;
  }
  clearTimeout(timer);
  return out;
}

describe.skipIf(!enabled)('NatsBus on a real nats-server', () => {
  it('publishes each event on fedtune.runs.<run>.<type> with Nats-Msg-Id <run>:<seq>', async () => {
    const stream = uniq('FT_SUBJ');
    streams.push(stream);
    const subjectRoot = uniq('ft');
    const runId = uniq('run.with dots');
    const bus = await NatsBus.create(new MemoryBus(), { connection: { servers: SHARED_NATS }, stream, subjectRoot });
    const nc = await connect({ servers: SHARED_NATS });
    try {
      const e = bus.publish({ runId, type: 'round.completed', round: 1, globalVersion: 1, participants: 2, examples: 10, trainLoss: 0.5, evalLoss: null, evalAccuracy: null, durationMs: 5, phases: { dispatchMs: 1, trainMs: 2, uploadMs: 1, aggregateMs: 1 }, bytesUp: 1, bytesDown: 1 });
      expect(e.seq).toBe(1);
      expect(await bus.flush()).toBe(true);
      const subjects = new Subjects(subjectRoot);
      const subject = subjects.event(e);
      const token = runId.replace(/\./g, '%2E').replace(/ /g, '%20');
      expect(subject).toBe(`${subjectRoot}.runs.${token}.round.completed`);
      expect(subjects.runIdOf(subject)).toBe(runId);
      const jsm = await nc.jetstreamManager();
      const stored = await directGet(jsm).getMessage(stream, { last_by_subj: subjects.run(runId) });
      expect(stored.subject).toBe(subject);
      expect(stored.header.get('Nats-Msg-Id')).toBe(`${token}:1`);
      expect(JSON.parse(stored.string())).toEqual(e);
    } finally {
      await nc.close();
      await bus.close();
    }
  });

  it('replays a run from any sequence number, then follows live events', async () => {
    const stream = uniq('FT_REPLAY');
    streams.push(stream);
    const subjectRoot = uniq('ft');
    const runA = uniq('runA');
    const runB = uniq('runB');
    const bus = await NatsBus.create(new MemoryBus(), { connection: { servers: SHARED_NATS }, stream, subjectRoot });
    const consumer = await NatsConsumerBus.create({ connection: { servers: SHARED_NATS }, stream, subjectRoot });
    try {
      // Interleave two runs so that stream positions and run sequence numbers differ.
      for (let i = 1; i <= 60; i++) {
        bus.publish(progress(runA, i));
        if (i % 2 === 0) bus.publish(progress(runB, i));
      }
      expect(await bus.flush()).toBe(true);

      await waitFor(() => consumer.runs().includes(runA) && consumer.runs().includes(runB), 5000, 'runs to be discovered');
      const hist = await consumer.history(runA, 25);
      expect(hist.map((e) => e.seq)).toEqual(Array.from({ length: 35 }, (_, i) => 26 + i));
      expect(hist.every((e) => e.runId === runA)).toBe(true);
      expect((await consumer.history(runB)).map((e) => e.seq)).toEqual(Array.from({ length: 30 }, (_, i) => i + 1));
      expect(await consumer.history(runA, 60)).toEqual([]);

      // Subscribe from seq 40: 41..60 from history, then 61..65 published afterwards.
      const sub = consumer.subscribe({ runId: runA, afterSeq: 40 });
      const got = collect(sub, 25);
      await new Promise((r) => setTimeout(r, 200));
      for (let i = 61; i <= 65; i++) bus.publish(progress(runA, i));
      const events = await got;
      expect(events.map((e) => e.seq)).toEqual(Array.from({ length: 25 }, (_, i) => 41 + i));
      // The consumer sees exactly what the coordinator's own bus holds.
      const local = await bus.history(runA, 40);
      expect(events).toEqual(local);
    } finally {
      await consumer.close();
      await bus.close();
    }
  });

  it('delivers each run in sequence order, waiting briefly for a late event and skipping a gap that never fills', async () => {
    const stream = uniq('FT_ORDER');
    streams.push(stream);
    const subjectRoot = uniq('ft');
    const runId = uniq('order');
    const subjects = new Subjects(subjectRoot);
    const consumer = await NatsConsumerBus.create({ connection: { servers: SHARED_NATS }, stream, subjectRoot, gapTimeoutMs: 300 });
    const nc = await connect({ servers: SHARED_NATS });
    try {
      const js = nc.jetstream();
      const put = async (seq: number): Promise<void> => {
        const e = { runId, seq, time: Date.now(), type: 'log', level: 'info', message: `event ${seq}` };
        // No message id: the second copy of 2 is stored, as after an outage longer than the duplicate window.
        await js.publish(subjects.event({ runId, type: 'log' }), JSON.stringify(e));
      };
      // Stored as after an outage retry: 3 lands after 4 and 5, 2 twice; 7 never comes.
      for (const seq of [1, 2, 4, 5, 3, 2, 6, 8, 9]) await put(seq);
      const got = await collect(consumer.subscribe({ runId }), 8);
      expect(got.map((e) => e.seq)).toEqual([1, 2, 3, 4, 5, 6, 8, 9]);
      // history() sorts and de-duplicates too.
      expect((await consumer.history(runId)).map((e) => e.seq)).toEqual([1, 2, 3, 4, 5, 6, 8, 9]);
    } finally {
      await nc.close();
      await consumer.close();
    }
  });

  it('continues a run\'s sequence numbers from what JetStream holds when the coordinator restarts', async () => {
    const stream = uniq('FT_SEED');
    streams.push(stream);
    const subjectRoot = uniq('ft');
    const runId = uniq('resumed');
    const first = await createEventBus({ nats: { servers: SHARED_NATS, stream, subjectRoot }, memory: {} });
    for (let i = 1; i <= 7; i++) first.publish(progress(runId, i));
    await first.close();
    const second = await createEventBus({ nats: { servers: SHARED_NATS, stream, subjectRoot }, memory: {} });
    try {
      const e = second.publish(progress(runId, 8));
      expect(e.seq).toBe(8);
      expect((await second.history(runId)).map((x) => x.seq)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    } finally {
      await second.close();
    }
  });
});

const privateOk = enabled && natsBinaryAvailable('NATS down-at-start test');

describe.skipIf(!privateOk)('NatsBus when NATS is down', () => {
  it('starts degraded without blocking, buffers, and republishes in order when NATS comes up', async () => {
    const server = new PrivateNatsServer(await freePort());
    const runId = uniq('down');
    const bus = await NatsBus.create(new MemoryBus(), {
      connection: { servers: server.url },
      stream: 'FT_DOWN',
      connectTimeoutMs: 500,
      retryMinMs: 50,
      retryMaxMs: 200,
    });
    try {
      expect(bus.status()).toMatchObject({ connected: false, degraded: true });
      // publish() returns the complete event at once while nobody is listening on the port.
      const published: RunEvent[] = [];
      for (let i = 1; i <= 200; i++) published.push(bus.publish(progress(runId, i)));
      // seq 2 is the bus.degraded event that follows the run's first event.
      expect(published.map((e) => e.seq)).toEqual([1, ...Array.from({ length: 199 }, (_, i) => i + 3)]);
      const local = await bus.history(runId);
      const degraded = local.find((e) => e.type === 'bus.degraded');
      expect(degraded).toMatchObject({ type: 'bus.degraded', backend: 'nats', seq: 2 });
      expect(bus.status().pending).toBe(local.length);

      await server.start();
      expect(await bus.flush(20_000)).toBe(true);
      const consumer = await NatsConsumerBus.create({ connection: { servers: server.url }, stream: 'FT_DOWN' });
      try {
        const remote = await consumer.history(runId);
        const all = await bus.history(runId);
        expect(all.some((e) => e.type === 'bus.restored')).toBe(true);
        expect(remote).toEqual(all);
        expect(remote.map((e) => e.seq)).toEqual(Array.from({ length: remote.length }, (_, i) => i + 1));
      } finally {
        await consumer.close();
      }
    } finally {
      await bus.close();
      await server.destroy();
    }
  });

  it('keeps at most queueLimit events for NATS and drops progress events first', async () => {
    const server = new PrivateNatsServer(await freePort());
    const runId = uniq('bounded');
    const bus = await NatsBus.create(new MemoryBus(), {
      connection: { servers: server.url },
      stream: 'FT_BOUNDED',
      queueLimit: 20,
      connectTimeoutMs: 500,
      retryMinMs: 50,
      retryMaxMs: 200,
    });
    try {
      bus.publish({ runId, type: 'run.state', state: 'running' }); // seq 1, then bus.degraded seq 2
      for (let i = 1; i <= 100; i++) bus.publish(progress(runId, i)); // seq 3..102
      const s = bus.status();
      expect(s.pending).toBe(20);
      expect(s.dropped).toBe(82);
      // The coordinator's own history is complete.
      expect((await bus.history(runId)).length).toBe(102);

      await server.start();
      expect(await bus.flush(20_000)).toBe(true);
      const consumer = await NatsConsumerBus.create({ connection: { servers: server.url }, stream: 'FT_BOUNDED' });
      try {
        const remote = await consumer.history(runId);
        // Kept: run.state, bus.degraded and the newest progress events; then bus.restored and a warning saying what was dropped.
        // (bus.restored and the warning enter a full queue too, so two more progress events make room for them.)
        expect(remote.map((e) => e.seq)).toEqual([1, 2, ...Array.from({ length: 16 }, (_, i) => 87 + i), 103, 104]);
        expect(remote.map((e) => e.type).slice(0, 2)).toEqual(['run.state', 'bus.degraded']);
        expect(remote.slice(2, 18).every((e) => e.type === 'worker.progress')).toBe(true);
        expect(remote[18]).toMatchObject({ type: 'bus.restored', backend: 'nats' });
        expect(remote[19]).toMatchObject({ type: 'log', level: 'warn' });
        expect((remote[19] as { message: string }).message).toContain('83 events of seq 3..85');
      } finally {
        await consumer.close();
      }
    } finally {
      await bus.close();
      await server.destroy();
    }
  });
});
