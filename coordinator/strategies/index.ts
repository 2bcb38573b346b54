/**
 * The strategy registry: every strategy a run config can name. Adding a
 * strategy is its own file plus one entry here; neither the round loop nor the
 * service changes.
 */
import type { z } from 'zod';
import { clientDpIssues } from '../privacy/client-dp.ts';
import { formatIssue, RunConfigError, type ConfigCheck, type RunConfig } from '../../common/config.ts';
import type { LoraTarget } from '../../common/lora.ts';
import { fedavg } from './fedavg.ts';
import { fedadam, fedavgm, fedyogi } from './fedopt.ts';
import { fedprox } from './fedprox.ts';
import { ffa } from './ffa.ts';
import { flexlora, flora } from './flora.ts';
import { krum, median, norm_bounding, trimmed_mean } from './robust.ts';
import type { Strategy, StrategyDefinition } from './strategy.ts';
import { loraConfigOf } from '../../common/lora-spec.ts';

export const STRATEGY_DEFINITIONS: readonly StrategyDefinition[] = [fedavg, fedavgm, fedadam, fedyogi, fedprox, ffa, flora, flexlora, median, trimmed_mean, krum, norm_bounding];

export const STRATEGY_NAMES: readonly string[] = STRATEGY_DEFINITIONS.map((d) => d.name);

function definition(name: string): StrategyDefinition | undefined {
  return STRATEGY_DEFINITIONS.find((d) => d.name === name);
}

/** Problems with `strategy:` of a run config: an unknown name or bad parameters, each naming its field. */
export const strategyIssues: ConfigCheck = (cfg) => {
  const { name, ...params } = cfg.strategy;
  const def = definition(name);
  const givenAsName = Object.keys(params).length === 0;
  if (!def) {
    return [{ path: givenAsName ? ['strategy'] : ['strategy', 'name'], message: `must be one of ${STRATEGY_NAMES.join(', ')} (got ${JSON.stringify(name)})` }];
  }
  const r = (def.params as z.ZodType).safeParse(params, { reportInput: true });
  const out: Array<{ path: PropertyKey[]; message: string }> = [];
  if (!r.success) {
    const allowed = ['name', ...Object.keys((def.params as unknown as { shape?: Record<string, unknown> }).shape ?? {})];
    for (const issue of r.error.issues) {
      if (issue.code === 'unrecognized_keys') {
        for (const k of issue.keys) out.push({ path: ['strategy', ...issue.path, k], message: `unknown parameter of strategy ${name} (allowed: ${allowed.join(', ')})` });
        continue;
      }
      const path = ['strategy', ...issue.path];
      const text = formatIssue({ ...issue, path } as typeof issue);
      // formatIssue starts with the path; keep the message after it.
      out.push({ path, message: text.slice(text.indexOf(': ') + 2) });
    }
  }
  if (cfg.privacy?.secure_aggregation) out.push(...secureAggregationIssues(cfg));
  out.push(...clientDpIssues(cfg));
  if (cfg.mode === 'distributed' && name !== 'fedavg') {
    out.push({ path: ['strategy'], message: `applies to federated runs; distributed runs choose sync-sgd or local SGD with distributed.sync_every (got ${JSON.stringify(name)})` });
  }
  return out;
};

/** Strategies that need each site's update (or stack them): refused with privacy.secure_aggregation, with why. */
export const SECAGG_REFUSED_STRATEGIES: Readonly<Record<string, string>> = {
  median: 'the coordinate-wise median needs every individual update, and secure aggregation only reveals their sum',
  trimmed_mean: 'the trimmed mean sorts the individual updates per coordinate, and secure aggregation only reveals their sum',
  krum: 'Krum scores and picks individual updates by their distances to each other, and secure aggregation only reveals their sum',
  flora: "FLoRA stacks each site's LoRA factors into the global adapter, so it needs every individual update, not their sum",
  flexlora: "FlexLoRA re-factorises each site's product B A at its own rank, so it needs every individual update, not their sum",
};

/**
 * What cannot run under privacy.secure_aggregation: strategies that need
 * individual updates, norm_bounding's learned (median) bound, and the learned
 * distance bound defence.norm_factor. norm_bounding with a number and
 * defence.max_norm are applied on each site before masking; defence.max_abs is
 * implied by secure_aggregation.range (every coordinate is clipped to it).
 */
function secureAggregationIssues(cfg: RunConfig): Array<{ path: PropertyKey[]; message: string }> {
  const out: Array<{ path: PropertyKey[]; message: string }> = [];
  const { name, ...params } = cfg.strategy;
  const why = SECAGG_REFUSED_STRATEGIES[name];
  if (why) {
    out.push({
      path: Object.keys(params).length === 0 ? ['strategy'] : ['strategy', 'name'],
      message: `${name} cannot run with privacy.secure_aggregation: ${why}; use fedavg, fedavgm, fedadam, fedyogi, fedprox, ffa or norm_bounding with a numeric bound, or remove privacy.secure_aggregation`,
    });
  }
  if (name === 'norm_bounding' && typeof (params as { bound?: unknown }).bound !== 'number') {
    out.push({
      path: ['strategy', 'bound'],
      message: "must be a number with privacy.secure_aggregation: the default 'median' bound is the median of the individual update norms, which secure aggregation hides; the numeric bound is applied on each site before masking",
    });
  }
  if (cfg.defence.norm_factor !== null) {
    out.push({
      path: ['defence', 'norm_factor'],
      message: 'is not available with privacy.secure_aggregation: it compares each update\'s norm with the last round\'s median, and the coordinator never sees an individual update; use defence.max_norm (applied on each site before masking) or remove norm_factor',
    });
  }
  return out;
}

/** The run's strategy, its parameters validated (errors name the field). */
export function createStrategy(cfg: RunConfig, targets: readonly LoraTarget[]): Strategy {
  const issues = strategyIssues(cfg);
  if (issues.length > 0) throw new RunConfigError('config', issues.map((i) => `${i.path.map(String).join('.')}: ${i.message}`));
  const { name, ...params } = cfg.strategy;
  const def = definition(name)!;
  return def.create((def.params as z.ZodType).parse(params), {
    lora: loraConfigOf(cfg.lora),
    targets,
    cohort: { fraction: cfg.cohort.fraction, minWorkers: cfg.cohort.min_workers },
    seed: cfg.training.seed,
  });
}
