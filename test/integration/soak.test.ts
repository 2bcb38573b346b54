/**
 * A 10-round soak in the test suite (`npm run soak -- --rounds 100` is the long
 * one): random kill -9 of the coordinator and of workers, NATS restarts and
 * corrupted uploads; no round lost, no corrupt checkpoint, no event missing or
 * doubled.
 */
import { describe, expect, it } from 'vitest';
import { runSoak } from '../../scripts/soak.ts';

describe('soak', () => {
  it('10 rounds under random faults lose nothing', async () => {
    const r = await runSoak({ rounds: 10, seed: 2, timeoutSec: 400, log: () => {} });
    console.log(r.line);
    expect(r.problems).toEqual([]);
    expect(r.roundsCompleted).toBe(10);
    expect({ lost: r.roundsLost, corrupt: r.corruptCheckpoints, missing: r.eventsMissing, doubled: r.eventsDoubled, seq: r.seqBreaks, temps: r.tempFilesLeft }).toEqual({
      lost: 0, corrupt: 0, missing: 0, doubled: 0, seq: 0, temps: 0,
    });
    // Faults really were injected.
    expect(r.faults.coordinatorKills + r.faults.workerKills + r.faults.natsRestarts).toBeGreaterThan(0);
    expect(r.faults.corruptedUploads).toBeGreaterThan(0);
  }, 420_000);
});
