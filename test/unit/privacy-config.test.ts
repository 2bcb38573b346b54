import { describe, expect, it } from 'vitest';
import { parseRunConfig, RunConfigError } from '../../common/config.ts';

const base = () => ({ name: 'demo', model: { path: 'm' }, training: { steps: 3 }, rounds: 2, server: { join_token: 'tok' } });

function issues(raw: unknown): string[] {
  try {
    parseRunConfig(raw, 'run.yaml');
  } catch (err) {
    expect(err).toBeInstanceOf(RunConfigError);
    return (err as RunConfigError).issues;
  }
  throw new Error('expected the config to be rejected');
}

describe('privacy config', () => {
  it('is off by default, with delta 1e-5 and no budget', () => {
    const c = parseRunConfig(base());
    expect(c.privacy).toEqual({ secure_aggregation: null, client_dp: null, dp_sgd: null, delta: 1e-5, max_epsilon: null, orders: null });
  });

  it('fills the defaults of each part', () => {
    const c = parseRunConfig({
      ...base(),
      cohort: { min_workers: 4 },
      privacy: { secure_aggregation: { threshold: 3 }, client_dp: { clip_norm: 0.5, noise_multiplier: 1 }, dp_sgd: { max_grad_norm: 1, noise_multiplier: 1.1, sample_rate: 0.01 } },
    });
    expect(c.privacy.secure_aggregation).toEqual({ threshold: 3, neighbours: null, range: 1, phase_timeout_sec: 120 });
    expect(c.privacy.client_dp).toEqual({ clip_norm: 0.5, noise_multiplier: 1, noise: 'central', adaptive_clipping: null });
    expect(c.privacy.dp_sgd).toEqual({ max_grad_norm: 1, noise_multiplier: 1.1, sample_rate: 0.01 });
  });

  it('names unknown and out-of-range fields', () => {
    const got = issues({ ...base(), privacy: { secure_aggregation: { threshold: 1, treshold: 3 }, dp_sgd: { max_grad_norm: 1, noise_multiplier: 1, sample_rate: 2 } } });
    expect(got.some((i) => i.startsWith('privacy.secure_aggregation.treshold: unknown field (allowed: threshold, neighbours, range, phase_timeout_sec)'))).toBe(true);
    expect(got.some((i) => i.startsWith('privacy.secure_aggregation.threshold: must be >=2'))).toBe(true);
    expect(got.some((i) => i.startsWith('privacy.dp_sgd.sample_rate: must be <=1'))).toBe(true);
  });

  it('refuses a threshold the minimum cohort cannot reach', () => {
    expect(issues({ ...base(), cohort: { min_workers: 3 }, privacy: { secure_aggregation: { threshold: 4 } } })).toEqual([
      'privacy.secure_aggregation.threshold: must not exceed cohort.min_workers (3), or a round with the minimum cohort could never unmask (got 4)',
    ]);
  });

  it('refuses SecAgg+ neighbourhoods smaller than the threshold needs', () => {
    const got = issues({ ...base(), cohort: { min_workers: 10 }, privacy: { secure_aggregation: { threshold: 6, neighbours: 4 } } });
    expect(got).toHaveLength(1);
    expect(got[0]).toMatch(/^privacy\.secure_aggregation\.neighbours: must be at least threshold - 1 \(5\)/);
  });

  it('refuses distributed noise without secure aggregation, and a budget without noise', () => {
    expect(issues({ ...base(), privacy: { client_dp: { clip_norm: 1, noise_multiplier: 1, noise: 'distributed' } } })[0]).toMatch(
      /^privacy\.client_dp\.noise: distributed noise needs privacy\.secure_aggregation/,
    );
    expect(issues({ ...base(), privacy: { max_epsilon: 8 } })[0]).toMatch(/^privacy\.max_epsilon: needs privacy\.client_dp or privacy\.dp_sgd/);
  });

  it('refuses privacy in distributed mode by name', () => {
    const got = issues({ ...base(), mode: 'distributed', distributed: { dataset: 'd.jsonl' }, privacy: { dp_sgd: { max_grad_norm: 1, noise_multiplier: 1, sample_rate: 0.1 } } });
    expect(got).toHaveLength(1);
    expect(got[0]).toMatch(/^privacy\.dp_sgd: applies to federated runs only/);
  });
});
