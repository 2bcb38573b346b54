/**
 * The `privacy:` section of a run config: secure aggregation, client-level
 * differential privacy (DP-FedAvg), sample-level DP-SGD on the workers, and
 * the privacy budget. Every field is validated here; checks that involve
 * other sections (strategy, cohort, mode) are in privacyIssues.
 */
import { z } from 'zod';

const positive = () => z.number().positive();
const int = () => z.number().int();

export const CLIENT_DP_NOISE = ['central', 'distributed'] as const;

export const secureAggregationSchema = z.strictObject({
  /**
   * Fewest sites that must survive every phase of a round (advertise keys, share keys, masked
   * input, unmasking). Below it the round attempt fails and is retried. Also the Shamir threshold:
   * fewer than `threshold` colluding parties learn nothing about a site's masks.
   */
  threshold: int().min(2),
  /** SecAgg+: each site masks with this many neighbours of a random regular graph (null: with every other site). */
  neighbours: int().min(2).nullable().default(null),
  /** Each coordinate of a site's (clipped, weighted) update delta is clipped to [-range, range] before fixed-point encoding. */
  range: positive().default(1),
  /** A phase that has not heard from `threshold` sites after this long fails the round attempt. */
  phase_timeout_sec: positive().default(120),
});

export const adaptiveClippingSchema = z.strictObject({
  /** Quantile of update norms the clip norm tracks (Andrew et al. 2021). */
  target_quantile: z.number().gt(0).lt(1).default(0.5),
  /** Geometric learning rate of the clip norm. */
  learning_rate: positive().default(0.2),
  /** Std of the noise on the count of unclipped updates (null: expected cohort / 20, as the paper suggests). */
  count_stddev: z.number().min(0).nullable().default(null),
});

export const clientDpSchema = z.strictObject({
  /** C: every site's update delta is clipped to this L2 norm (the initial C with adaptive clipping). */
  clip_norm: positive(),
  /** sigma: Gaussian noise of std sigma * C is added to the sum of clipped updates. */
  noise_multiplier: z.number().min(0),
  /** central: the coordinator adds the noise; distributed: each site adds its share, so under secure aggregation the coordinator only sees the noisy sum. */
  noise: z.enum(CLIENT_DP_NOISE).default('central'),
  adaptive_clipping: adaptiveClippingSchema.nullable().default(null),
});

export const dpSgdSchema = z.strictObject({
  /** Per-example gradient clip norm. */
  max_grad_norm: positive(),
  /** sigma: Gaussian noise of std sigma * max_grad_norm on each step's summed clipped gradients. */
  noise_multiplier: z.number().min(0),
  /** q: each training example is in a step's batch with this probability (Poisson sampling). */
  sample_rate: z.number().gt(0).max(1),
});

export const privacySchema = z
  .strictObject({
    secure_aggregation: secureAggregationSchema.nullable().default(null),
    client_dp: clientDpSchema.nullable().default(null),
    dp_sgd: dpSgdSchema.nullable().default(null),
    /** delta of the (epsilon, delta) guarantees reported. */
    delta: z.number().gt(0).lt(1).default(1e-5),
    /** Stop the run cleanly before a round would take any reported epsilon past this (null: no limit). */
    max_epsilon: positive().nullable().default(null),
    /** Renyi orders of the accountant (null: the default grid). */
    orders: z.array(z.number().gt(1)).min(1).nullable().default(null),
  })
  .prefault({});

export type PrivacyConfig = z.output<typeof privacySchema>;
export type SecureAggregationConfig = z.output<typeof secureAggregationSchema>;
export type ClientDpConfig = z.output<typeof clientDpSchema>;
export type DpSgdConfig = z.output<typeof dpSgdSchema>;

/** Cross-section checks of `privacy:` (path and message, for config.ts). */
export function privacyIssues(c: {
  mode: string;
  privacy: PrivacyConfig;
  cohort: { min_workers: number };
  round: { min_results: number };
}): Array<{ path: PropertyKey[]; message: string }> {
  const out: Array<{ path: PropertyKey[]; message: string }> = [];
  const p = c.privacy;
  const sa = p.secure_aggregation;
  if (c.mode === 'distributed') {
    for (const k of ['secure_aggregation', 'client_dp', 'dp_sgd'] as const) {
      if (p[k] !== null) {
        out.push({
          path: ['privacy', k],
          message: 'applies to federated runs only (distributed mode moves data shards from the coordinator, so the coordinator holds the data anyway); remove it or use mode: federated',
        });
      }
    }
  }
  if (sa) {
    if (sa.neighbours !== null && sa.neighbours < sa.threshold - 1) {
      out.push({
        path: ['privacy', 'secure_aggregation', 'neighbours'],
        message: `must be at least threshold - 1 (${sa.threshold - 1}): a site's masks are shared among itself and its neighbours, and the threshold of them must be able to reveal them (got ${sa.neighbours})`,
      });
    }
    if (sa.threshold > c.cohort.min_workers) {
      out.push({
        path: ['privacy', 'secure_aggregation', 'threshold'],
        message: `must not exceed cohort.min_workers (${c.cohort.min_workers}), or a round with the minimum cohort could never unmask (got ${sa.threshold})`,
      });
    }
  }
  const dp = p.client_dp;
  if (dp && dp.noise === 'distributed' && !sa) {
    out.push({
      path: ['privacy', 'client_dp', 'noise'],
      message: 'distributed noise needs privacy.secure_aggregation (without it the coordinator sees each site\'s noisy update, and each site adds only a share of the noise); set secure_aggregation or use noise: central',
    });
  }
  if (p.max_epsilon !== null && !dp && !p.dp_sgd) {
    out.push({
      path: ['privacy', 'max_epsilon'],
      message: 'needs privacy.client_dp or privacy.dp_sgd: without noise there is no epsilon to spend',
    });
  }
  return out;
}
