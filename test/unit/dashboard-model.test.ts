import { describe, expect, it } from 'vitest';
import type { RunEvent } from '../../common/events.ts';
import { MemoryBus } from '../../coordinator/events/memory.ts';
import { runSynthetic } from '../../dashboard/dev/synthetic-run.ts';
import { describeEvent, eventKind } from '../../dashboard/src/describe.ts';
import { elapsedMs, etaMs, HeaderFold, RunView } from '../../dashboard/src/model.ts';

async function syntheticEvents(mode: 'federated' | 'distributed'): Promise<RunEvent[]> {
  const bus = new MemoryBus();
  await runSynthetic(bus, { runId: 'r', mode, rounds: 3, workers: 2, stepsPerRound: 4, stepMs: 0 });
  const events = await bus.history('r');
  await bus.close();
  return events;
}

describe('dashboard run view', () => {
  it('folds a federated run into header, workers, rounds and loss curves', async () => {
    const events = await syntheticEvents('federated');
    const v = new RunView('r');
    for (const e of events) v.apply(e);
    expect(v.header).toMatchObject({ name: 'synthetic federated run', mode: 'federated', strategy: 'fedavg', state: 'completed', round: 3, totalRounds: 3, workers: 2, lastSeq: events.length });
    expect(v.rounds.map((r) => r.round)).toEqual([1, 2, 3]);
    const workers = [...v.workers.values()];
    expect(workers).toHaveLength(2);
    const rc = events.filter((e) => e.type === 'round.completed');
    expect(v.rounds.map((r) => r.trainLoss)).toEqual(rc.map((e) => (e.type === 'round.completed' ? e.trainLoss : null)));
    for (const w of workers) {
      const down = events.reduce((a, e) => a + (e.type === 'task.dispatched' && e.workerId === w.workerId ? e.bytes : 0), 0);
      const up = events.reduce((a, e) => a + (e.type === 'update.received' && e.workerId === w.workerId ? e.bytes : 0), 0);
      expect(w.bytesDown).toBe(down);
      expect(w.bytesUp).toBe(up);
      expect(w.step).toBe(4);
      expect(v.curves.get(w.workerId)!.x).toHaveLength(12); // 3 rounds x 4 steps
      expect(v.curves.get(w.workerId)!.x.at(-1)).toBe(3); // fractional round: round - 1 + step/steps
    }
    expect(v.log).toHaveLength(events.length);
    expect(etaMs(v.header, Date.now())).toBeUndefined(); // completed
  });

  it('shows the event bus degraded from bus.degraded until bus.restored', () => {
    const v = new RunView('r');
    const at = (seq: number, body: Record<string, unknown>): RunEvent => ({ runId: 'r', seq, time: 1000 + seq, ...body }) as RunEvent;
    v.apply(at(1, { type: 'run.started', name: 'n', mode: 'federated', strategy: 'fedavg', totalRounds: 2, totalSteps: 0, config: {}, resumedFromRound: 0 }));
    expect(v.header.busDegraded).toBeNull();
    v.apply(at(2, { type: 'bus.degraded', backend: 'nats', message: 'connection refused', buffered: 12 }));
    expect(v.header.busDegraded).toEqual({ backend: 'nats', message: 'connection refused', buffered: 12 });
    v.apply(at(3, { type: 'bus.restored', backend: 'nats', republished: 12 }));
    expect(v.header.busDegraded).toBeNull();
  });

  it('ignores events it has already applied (resume and resync overlap)', async () => {
    const events = await syntheticEvents('federated');
    const v = new RunView('r');
    for (const e of events.slice(0, 30)) v.apply(e);
    const applied = events.slice(20).map((e) => v.apply(e));
    expect(applied.slice(0, 10).every((a) => !a)).toBe(true);
    expect(applied.slice(10).every((a) => a)).toBe(true);
    expect(v.log.map((e) => e.seq)).toEqual(events.map((e) => e.seq));
  });

  it('folds a distributed run into step points', async () => {
    const events = await syntheticEvents('distributed');
    const v = new RunView('r');
    for (const e of events) v.apply(e);
    expect(v.header).toMatchObject({ mode: 'distributed', step: 12, totalSteps: 12 });
    expect(v.steps.map((s) => s.step)).toEqual(Array.from({ length: 12 }, (_, i) => i + 1));
    expect([...v.workers.values()].every((w) => w.tokensPerSec > 0)).toBe(true);
  });

  it('estimates time left from the rounds done in this process', () => {
    const f = new HeaderFold('r');
    const t0 = 1_000_000;
    const base = { runId: 'r', time: t0 };
    f.apply({ ...base, seq: 1, type: 'run.started', name: 'n', mode: 'federated', strategy: 'fedavg', totalRounds: 10, totalSteps: 0, config: {}, resumedFromRound: 4 });
    expect(etaMs(f.header, t0 + 1000)).toBeUndefined();
    const round = (seq: number, r: number, time: number): RunEvent => ({
      runId: 'r', seq, time, type: 'round.completed', round: r, globalVersion: r, participants: 1, examples: 1, trainLoss: 1, evalLoss: null,
      evalAccuracy: null, durationMs: 1, phases: { dispatchMs: 0, trainMs: 1, uploadMs: 0, aggregateMs: 0 }, bytesUp: 0, bytesDown: 0,
    });
    f.apply(round(2, 5, t0 + 60_000));
    f.apply(round(3, 6, t0 + 120_000));
    // 2 rounds in 120 s since the resume, 4 rounds left -> 240 s.
    expect(etaMs(f.header, t0 + 120_000)).toBe(240_000);
    expect(elapsedMs(f.header, t0 + 120_000)).toBe(120_000);
    f.apply({ runId: 'r', seq: 4, time: t0 + 130_000, type: 'run.failed', error: 'boom' });
    expect(f.header).toMatchObject({ state: 'failed', message: 'boom', endedAt: t0 + 130_000 });
    expect(elapsedMs(f.header, t0 + 999_999)).toBe(130_000);
  });

  it('describes every event of a run in one line', async () => {
    const events = [...(await syntheticEvents('federated')), ...(await syntheticEvents('distributed'))];
    for (const e of events) expect(describeEvent(e)).toMatch(/\S/);
    const rc = events.find((e) => e.type === 'round.completed')!;
    expect(describeEvent(rc)).toMatch(/^round 1 done in \d+(\.\d)?(ms|s): 2 workers, train loss \d\.\d{3}/);
    expect(eventKind({ runId: 'r', seq: 1, time: 0, type: 'worker.error', workerId: 'w', site: 's', message: 'x' })).toBe('problem');
  });
});
