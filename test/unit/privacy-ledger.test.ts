import { describe, expect, it } from 'vitest';
import { parseRunConfig } from '../../common/config.ts';
import type { RunEvent } from '../../common/events.ts';
import { dpSgdSteps } from '../../common/privacy/dp-sgd.ts';
import { DEFAULT_ORDERS, epsilonOf } from '../../common/privacy/rdp.ts';
import { createRunMetrics } from '../../coordinator/http/metrics.ts';
import { RunView } from '../../dashboard/src/model.ts';
import { exceeds, PrivacyLedger } from '../../coordinator/privacy/ledger.ts';

const cfg = (privacy: Record<string, unknown>, training: Record<string, unknown> = {}) =>
  parseRunConfig({ name: 't', model: { path: 'm' }, training: { steps: 10, batch_size: 4, ...training }, rounds: 100, server: { join_token: 'x' }, weighting: { mode: 'equal' }, privacy });

const DP = { client_dp: { clip_norm: 1, noise_multiplier: 1.1 } };

describe('privacy ledger: client level', () => {
  it('matches epsilonOf for the same q, sigma and number of rounds', () => {
    const l = new PrivacyLedger(cfg(DP), null);
    expect(l.report()).toEqual({ epsilon: 0, delta: 1e-5, client: { epsilon: 0, clipNorm: 1, noiseMultiplier: 1.1, rounds: 0 } });
    for (let r = 1; r <= 50; r++) l.roundAggregated(0.1, 1.1, 1);
    const want = epsilonOf({ sampleRate: 0.1, noiseMultiplier: 1.1, steps: 50, delta: 1e-5 }).epsilon;
    expect(l.report().client!.epsilon).toBeCloseTo(want, 9);
    expect(l.report().epsilon).toBe(l.report().client!.epsilon);
    expect(l.report().client!.rounds).toBe(50);
  });

  it('stays under the classic RDP-to-(epsilon, delta) bound of the Gaussian mechanism at q = 1', () => {
    // Mironov 2017: T rounds of the Gaussian mechanism have RDP alpha T / (2 sigma^2); epsilon <= min over alpha of
    // RDP + log(1/delta) / (alpha - 1). The accountant may convert more tightly, never more loosely.
    const sigma = 3;
    const T = 20;
    const l = new PrivacyLedger(cfg({ client_dp: { clip_norm: 1, noise_multiplier: sigma } }), null);
    for (let r = 0; r < T; r++) l.roundAggregated(1, sigma, 1);
    const classic = Math.min(...DEFAULT_ORDERS.map((a) => (a * T) / (2 * sigma * sigma) + Math.log(1e5) / (a - 1)));
    const got = l.report().epsilon!;
    expect(got).toBeGreaterThan(0);
    expect(got).toBeLessThanOrEqual(classic * (1 + 1e-12));
    expect(got).toBeGreaterThan(classic * 0.5);
  });

  it('previews a round without charging it', () => {
    const l = new PrivacyLedger(cfg(DP), null);
    l.roundAggregated(0.2, 1.1, 1);
    const before = l.report();
    const next = l.preview({ client: { q: 0.2, sigma: 1.1 }, sites: ['a'] });
    expect(l.report()).toEqual(before);
    l.roundAggregated(0.2, 1.1, 1);
    expect(l.report().epsilon).toBeCloseTo(next.epsilon!, 12);
    expect(next.epsilon!).toBeGreaterThan(before.epsilon!);
    expect(exceeds(next, next.epsilon! * 0.999)).toBe(true);
    expect(exceeds(next, next.epsilon!)).toBe(false);
    expect(() => l.roundAggregated(0, 1, 1)).toThrow(/sampling rate must be in \(0, 1\]/);
  });

  it('reports a noiseless run as unbounded (null), which every budget refuses', () => {
    const l = new PrivacyLedger(cfg({ client_dp: { clip_norm: 1, noise_multiplier: 0 } }), null);
    l.roundAggregated(0.5, 0, 1);
    expect(l.report().epsilon).toBeNull();
    expect(l.report().client!.epsilon).toBeNull();
    expect(exceeds(l.report(), 1e9)).toBe(true);
  });
});

describe('privacy ledger: sample level (DP-SGD on the workers)', () => {
  it('charges dpSgdSteps per task and reports the site with the most tasks', () => {
    const c = cfg({ dp_sgd: { max_grad_norm: 1, noise_multiplier: 1, sample_rate: 0.05 } });
    const l = new PrivacyLedger(c, null);
    const per = dpSgdSteps(c.training, 0.05);
    expect(per).toBeGreaterThan(0);
    for (const s of ['a', 'b', 'a', 'c', 'a']) l.taskDispatched(s);
    const r = l.report();
    expect(r.client).toBeUndefined();
    expect(r.sample!.steps).toBe(3 * per);
    expect(r.sample!.epsilon).toBeCloseTo(epsilonOf({ sampleRate: 0.05, noiseMultiplier: 1, steps: 3 * per, delta: 1e-5 }).epsilon, 9);
    // b's fourth task would not change the worst site; a's would.
    expect(l.preview({ sites: ['b'] }).sample!.steps).toBe(3 * per);
    expect(l.preview({ sites: ['a', 'b'] }).sample!.steps).toBe(4 * per);
  });

  it('reports the larger of the client-level and sample-level epsilons as the run\'s epsilon', () => {
    const l = new PrivacyLedger(cfg({ ...DP, dp_sgd: { max_grad_norm: 1, noise_multiplier: 0.8, sample_rate: 0.1 } }), null);
    l.taskDispatched('a');
    l.roundAggregated(0.5, 1.1, 1);
    const r = l.report();
    expect(r.epsilon).toBe(Math.max(r.client!.epsilon!, r.sample!.epsilon!));
  });
});

describe('privacy ledger: checkpoint and resume', () => {
  it('restores exactly: the same reports and the same future as a ledger that never stopped', () => {
    const c = cfg({ ...DP, dp_sgd: { max_grad_norm: 1, noise_multiplier: 1, sample_rate: 0.1 } });
    const a = new PrivacyLedger(c, null);
    for (let r = 0; r < 7; r++) {
      a.roundAggregated(0.3 + r / 100, 1.1, 0.9 ** r);
      a.taskDispatched(r % 2 ? 'x' : 'y');
    }
    const saved = JSON.parse(JSON.stringify(a.state()));
    const b = new PrivacyLedger(c, saved, 7);
    expect(b.report()).toEqual(a.report());
    expect(b.state()).toEqual(a.state());
    expect(b.savedClipNorm).toBe(0.9 ** 6);
    for (const l of [a, b]) {
      l.roundAggregated(0.4, 1.1, 1);
      l.taskDispatched('y');
    }
    expect(b.report()).toEqual(a.report());
  });

  it('refuses to add client_dp or dp_sgd to a run whose checkpoints have no ledger for it', () => {
    expect(() => new PrivacyLedger(cfg(DP), undefined, 3)).toThrow(/privacy\.client_dp is set but the checkpoint of round 3 has no ledger for it/);
    const onlyClient = new PrivacyLedger(cfg(DP), null).state();
    expect(() => new PrivacyLedger(cfg({ ...DP, dp_sgd: { max_grad_norm: 1, noise_multiplier: 1, sample_rate: 0.1 } }), onlyClient, 3)).toThrow(/privacy\.dp_sgd is set/);
    expect(() => new PrivacyLedger(cfg(DP), { ...onlyClient, format: 'other' as never })).toThrow(/format/);
    // A fresh run (round 0) starts an empty ledger.
    expect(new PrivacyLedger(cfg(DP), undefined, 0).report().client!.rounds).toBe(0);
  });
});

describe('privacy in /metrics and the dashboard model', () => {
  it('sets fedtune_privacy_epsilon by kind from round.completed', async () => {
    const m = createRunMetrics({ processMetrics: false });
    const e = {
      type: 'round.completed', runId: 'r', seq: 1, time: 0, round: 1, globalVersion: 1, participants: 2, examples: 4,
      trainLoss: null, evalLoss: null, evalAccuracy: null, durationMs: 10, phases: { dispatchMs: 0, trainMs: 0, uploadMs: 0, aggregateMs: 0 },
      bytesUp: 0, bytesDown: 0,
      privacy: { epsilon: 2.5, delta: 1e-5, client: { epsilon: 2.5, clipNorm: 1, noiseMultiplier: 1, rounds: 1 }, sample: { epsilon: null, steps: 0, sampleRate: 0.1, noiseMultiplier: 0 } },
    } as RunEvent;
    m.observe(e);
    // The dashboard folds the same event into its header and its epsilon chart's rounds.
    const v = new RunView('r');
    v.apply(e);
    expect(v.header.privacy?.epsilon).toBe(2.5);
    expect(v.rounds[0]!.privacy?.client?.epsilon).toBe(2.5);
    const text = await m.text();
    expect(text).toMatch(/^fedtune_privacy_epsilon\{run="r",kind="total"\} 2\.5$/m);
    expect(text).toMatch(/^fedtune_privacy_epsilon\{run="r",kind="client"\} 2\.5$/m);
    expect(text).toMatch(/^fedtune_privacy_epsilon\{run="r",kind="sample"\} \+Inf$/m);
  });
});
