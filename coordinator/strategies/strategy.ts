/**
 * Strategies: the policy half of a federated run (who trains, how updates are
 * combined), separate from the transport (coordinator/service.ts).
 *
 *   fedavg   new global = weighted mean of the local adapters
 *   fedavgm  \
 *   fedadam   > mean - global is a pseudo-gradient for a server optimizer
 *   fedyogi  /  (Reddi et al. 2021, "Adaptive Federated Optimization")
 */
import { existsSync } from 'node:fs';
import type { TensorSpecEntry } from '../../common/chunks.ts';
import type { RunConfig, StrategyName } from '../../common/config.ts';
import { createRng } from '../../common/random.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { loadOuterState, OuterOptimizer, saveOuterState } from '../../common/outer.ts';
import { FedAvgAccumulator } from './fedavg.ts';

export interface CohortCandidate {
  workerId: string;
  site: string;
  numTrainExamples: number;
}

export interface Strategy {
  readonly name: StrategyName;
  /** Worker ids taking part in a round: a seeded random `fraction` of the candidates, at least minWorkers. */
  selectCohort(candidates: readonly CohortCandidate[], round: number, attempt: number): string[];
  /** A fresh streaming accumulator for one round's updates. */
  accumulator(manifest: readonly TensorSpecEntry[]): FedAvgAccumulator;
  /** The next global adapter from the current one and the round's accumulator. */
  aggregate(global: TensorMap, acc: FedAvgAccumulator): TensorMap;
  /** Persist / restore server-side state (server optimizer moments) next to a checkpoint. */
  save(path: string): Promise<boolean>;
  load(path: string): Promise<void>;
}

export function createStrategy(cfg: RunConfig): Strategy {
  const outer =
    cfg.strategy === 'fedavg'
      ? null
      : new OuterOptimizer({
          kind: cfg.strategy,
          lr: cfg.server_optimizer.lr,
          ...(cfg.strategy === 'fedavgm'
            ? { momentum: cfg.server_optimizer.momentum }
            : { beta1: cfg.server_optimizer.beta1, beta2: cfg.server_optimizer.beta2, tau: cfg.server_optimizer.tau }),
        });
  const { fraction, min_workers: minWorkers } = cfg.cohort;
  const seed = cfg.training.seed;
  return {
    name: cfg.strategy,
    selectCohort(candidates, round, attempt) {
      const want = Math.min(candidates.length, Math.max(minWorkers, Math.ceil(fraction * candidates.length)));
      const pool = [...candidates].sort((a, b) => (a.workerId < b.workerId ? -1 : 1));
      const rng = createRng(seed * 1_000_003 + round * 101 + attempt);
      for (let i = pool.length - 1; i > 0; i--) {
        const j = Math.floor(rng.next() * (i + 1));
        [pool[i], pool[j]] = [pool[j]!, pool[i]!];
      }
      return pool.slice(0, want).map((c) => c.workerId);
    },
    accumulator: (manifest) => new FedAvgAccumulator(manifest),
    aggregate(global, acc) {
      const mean = acc.mean();
      if (!outer) return mean;
      const delta: TensorMap = new Map();
      for (const [name, m] of mean) {
        const g = global.get(name)!;
        const d = new Float32Array(m.data.length);
        for (let i = 0; i < d.length; i++) d[i] = m.data[i]! - g.data[i]!;
        delta.set(name, { shape: [...m.shape], data: d });
      }
      return outer.step(global, delta);
    },
    async save(path) {
      if (!outer) return false;
      await saveOuterState(path, outer.state());
      return true;
    },
    async load(path) {
      if (outer && existsSync(path)) outer.load(await loadOuterState(path));
    },
  };
}
