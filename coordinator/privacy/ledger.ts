/**
 * The run's privacy ledger: what a federated run has spent, by kind of
 * guarantee, restored exactly on resume.
 *
 * client (DP-FedAvg, client level: a neighbouring run adds or removes one
 *   site's whole data). Each aggregated round is one sampled Gaussian
 *   mechanism with q = sites asked / sites eligible (the candidates with
 *   training data when the cohort was drawn) and the round's effective noise
 *   multiplier (client-dp.ts: sigma, or with adaptive clipping
 *   (sigma^-2 + (2 sigma_b)^-2)^-1/2, Andrew et al. 2021 Thm 1). Rounds are
 *   composed in Renyi DP (common/privacy/rdp.ts) and converted to
 *   (epsilon, delta) at privacy.delta. Attempts that were retried release no
 *   global adapter and cost nothing at this level.
 *
 * sample (DP-SGD on the workers, example level: one training example of one
 *   site). A site's data is touched by every training task it is sent; each
 *   task takes dpSgdSteps(training, q) noisy steps of sampling rate
 *   q = dp_sgd.sample_rate. Every task dispatched counts (also those of
 *   attempts that were retried or whose upload was refused: the coordinator
 *   may have seen the update). The epsilon reported is the worst site's.
 *
 * `epsilon` of a report is the larger of the two: the number privacy.max_epsilon
 * bounds. null stands for unbounded (a noise multiplier of 0).
 */
import type { RunConfig } from '../../common/config.ts';
import type { PrivacyReport } from '../../common/events.ts';
import { dpSgdSteps } from '../../common/privacy/dp-sgd.ts';
import { DEFAULT_ORDERS, RdpLedger, epsilonOf, rdpSampledGaussian, rdpToEpsilon } from '../../common/privacy/rdp.ts';
import type { ClientDpState } from './client-dp.ts';

export const PRIVACY_STATE_FORMAT = 'fedtune.privacy-ledger/1';

/** The ledger as saved in a checkpoint's state.json (`privacy`). */
export interface PrivacyState {
  format: typeof PRIVACY_STATE_FORMAT;
  client: {
    /** Aggregated rounds charged. */
    rounds: number;
    /** RdpLedger.toJSON() of those rounds. */
    rdp: unknown;
    /** C of the next round (adaptive clipping moves it). */
    dp: ClientDpState;
  } | null;
  /** Training tasks dispatched, by site. */
  sample: { tasks: Record<string, number> } | null;
}

/** What the next round would charge. */
export interface RoundPlan {
  /** client level: q and sigma of the round (omitted without client_dp). */
  client?: { q: number; sigma: number };
  /** Sites sent a training task this attempt. */
  sites: readonly string[];
}

const finite = (x: number): number | null => (Number.isFinite(x) ? x : null);

export class PrivacyLedger {
  private readonly orders: number[];
  private readonly delta: number;
  private readonly client: { ledger: RdpLedger; rounds: number; noiseMultiplier: number } | null;
  private readonly sample: { tasks: Map<string, number>; sampleRate: number; noiseMultiplier: number; stepsPerTask: number } | null;
  private clipNorm: number;

  constructor(cfg: RunConfig, state: PrivacyState | null | undefined, roundsDone = 0) {
    const p = cfg.privacy;
    this.orders = [...(p.orders ?? DEFAULT_ORDERS)];
    this.delta = p.delta;
    const dp = p.client_dp;
    this.clipNorm = dp?.clip_norm ?? 0;
    if (state && state.format !== PRIVACY_STATE_FORMAT) throw new Error(`privacy state: format is ${JSON.stringify(state.format)}, expected ${PRIVACY_STATE_FORMAT}`);
    if (roundsDone > 0 && ((dp && !state?.client) || (p.dp_sgd && !state?.sample))) {
      const k = dp && !state?.client ? 'client_dp' : 'dp_sgd';
      throw new Error(
        `privacy.${k} is set but the checkpoint of round ${roundsDone} has no ledger for it: its rounds ran without that noise, so their privacy cost cannot be accounted; start a new run (another name or checkpoint.dir) to use privacy.${k}`,
      );
    }
    this.client = dp
      ? {
          ledger: state?.client ? RdpLedger.fromJSON(state.client.rdp) : new RdpLedger(this.orders),
          rounds: state?.client?.rounds ?? 0,
          noiseMultiplier: dp.noise_multiplier,
        }
      : null;
    if (dp && state?.client) this.clipNorm = state.client.dp.clipNorm;
    const sgd = p.dp_sgd;
    this.sample = sgd
      ? {
          tasks: new Map(Object.entries(state?.sample?.tasks ?? {})),
          sampleRate: sgd.sample_rate,
          noiseMultiplier: sgd.noise_multiplier,
          stepsPerTask: dpSgdSteps(cfg.training, sgd.sample_rate),
        }
      : null;
  }

  get enabled(): boolean {
    return this.client !== null || this.sample !== null;
  }

  /** C saved with the ledger (the ClientDp of a resumed run starts from it). */
  get savedClipNorm(): number {
    return this.clipNorm;
  }

  /** A training task of the current attempt was sent to `site`. */
  taskDispatched(site: string): void {
    if (this.sample) this.sample.tasks.set(site, (this.sample.tasks.get(site) ?? 0) + 1);
  }

  /** An aggregated round: charge its sampled Gaussian mechanism, remember C for the next round. */
  roundAggregated(q: number, sigma: number, nextClipNorm: number): void {
    if (!this.client) return;
    checkQ(q);
    this.client.ledger.add(q, sigma, 1);
    this.client.rounds++;
    this.clipNorm = nextClipNorm;
  }

  /** What has been spent so far. */
  report(): PrivacyReport {
    return this.reportWith(null);
  }

  /** What would have been spent after a round with this plan (nothing is charged). */
  preview(plan: RoundPlan): PrivacyReport {
    return this.reportWith(plan);
  }

  private reportWith(plan: RoundPlan | null): PrivacyReport {
    const out: PrivacyReport = { epsilon: 0, delta: this.delta };
    let worst = 0;
    if (this.client) {
      let rdp = Float64Array.from(this.client.ledger.rdp());
      if (plan?.client) {
        checkQ(plan.client.q);
        const add = rdpSampledGaussian(plan.client.q, plan.client.sigma, this.orders);
        rdp = rdp.map((v, i) => v + add[i]!);
      }
      const eps = this.client.rounds + (plan?.client ? 1 : 0) === 0 ? 0 : rdpToEpsilon(this.orders, rdp, this.delta).epsilon;
      out.client = { epsilon: finite(eps), clipNorm: this.clipNorm, noiseMultiplier: this.client.noiseMultiplier, rounds: this.client.rounds + (plan?.client ? 1 : 0) };
      worst = Math.max(worst, eps);
    }
    if (this.sample) {
      const s = this.sample;
      let maxTasks = 0;
      for (const n of s.tasks.values()) maxTasks = Math.max(maxTasks, n);
      if (plan) for (const site of plan.sites) maxTasks = Math.max(maxTasks, (s.tasks.get(site) ?? 0) + 1);
      const steps = maxTasks * s.stepsPerTask;
      const eps = steps === 0 ? 0 : epsilonOf({ sampleRate: s.sampleRate, noiseMultiplier: s.noiseMultiplier, steps, delta: this.delta, orders: this.orders }).epsilon;
      out.sample = { epsilon: finite(eps), steps, sampleRate: s.sampleRate, noiseMultiplier: s.noiseMultiplier };
      worst = Math.max(worst, eps);
    }
    out.epsilon = finite(worst);
    return out;
  }

  /** The ledger for state.json. */
  state(): PrivacyState {
    return {
      format: PRIVACY_STATE_FORMAT,
      client: this.client ? { rounds: this.client.rounds, rdp: this.client.ledger.toJSON(), dp: { clipNorm: this.clipNorm } } : null,
      sample: this.sample ? { tasks: Object.fromEntries([...this.sample.tasks].sort((a, b) => (a[0] < b[0] ? -1 : 1))) } : null,
    };
  }
}

function checkQ(q: number): void {
  if (!(q > 0 && q <= 1)) throw new Error(`privacy ledger: the cohort's sampling rate must be in (0, 1] (got ${q})`);
}

/** Whether `r` takes any reported epsilon past `max` (null epsilon: unbounded). */
export function exceeds(r: PrivacyReport, max: number): boolean {
  return r.epsilon === null || r.epsilon > max;
}
