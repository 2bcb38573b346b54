/**
 * The strategy registry: every strategy a run config can name. Adding a
 * strategy is its own file plus one entry here; neither the round loop nor the
 * service changes.
 */
import type { z } from 'zod';
import { formatIssue, RunConfigError, type ConfigCheck, type RunConfig } from '../../common/config.ts';
import type { LoraTarget } from '../../common/lora.ts';
import { fedavg } from './fedavg.ts';
import { fedadam, fedavgm, fedyogi } from './fedopt.ts';
import { fedprox } from './fedprox.ts';
import { ffa } from './ffa.ts';
import { flexlora, flora } from './flora.ts';
import { krum, median, norm_bounding, trimmed_mean } from './robust.ts';
import type { Strategy, StrategyDefinition } from './strategy.ts';

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
  if (cfg.mode === 'distributed' && name !== 'fedavg') {
    out.push({ path: ['strategy'], message: `applies to federated runs; distributed runs choose sync-sgd or local SGD with distributed.sync_every (got ${JSON.stringify(name)})` });
  }
  return out;
};

/** The run's strategy, its parameters validated (errors name the field). */
export function createStrategy(cfg: RunConfig, targets: readonly LoraTarget[]): Strategy {
  const issues = strategyIssues(cfg);
  if (issues.length > 0) throw new RunConfigError('config', issues.map((i) => `${i.path.map(String).join('.')}: ${i.message}`));
  const { name, ...params } = cfg.strategy;
  const def = definition(name)!;
  return def.create((def.params as z.ZodType).parse(params), {
    lora: { r: cfg.lora.r, alpha: cfg.lora.alpha, dropout: cfg.lora.dropout, targetModules: [...cfg.lora.target_modules] },
    targets,
    cohort: { fraction: cfg.cohort.fraction, minWorkers: cfg.cohort.min_workers },
    seed: cfg.training.seed,
  });
}
