/**
 * Pieces of the secure-aggregation integration tests: worker processes with a
 * fault point, in-process sites whose updates differ (so an aggregate can be
 * told apart from any one of them), and the independent plain FedAvg.
 */
import { join } from 'node:path';
import { fedtune, runConfig, type Proc } from './federated-helpers.ts';
import type { RunConfig } from '../../common/config.ts';
import { NoopTrainer } from '../../worker/trainers/noop.ts';
import { WorkerAgent } from '../../worker/agent.ts';
import type { TrainArgs, TrainOutcome } from '../../worker/trainers/trainer.ts';
import type { TensorMap } from '../../common/tensor.ts';

/** A `fedtune worker` process with the noop trainer; `fault` sets FEDTUNE_FAULT_POINT (e.g. secagg.after-share-keys@1). */
export function secaggWorker(o: { address: string; site: string; data: string; model: string; fault?: string }): Proc {
  return fedtune(
    ['worker', '--coordinator', o.address, '--name', o.site, '--data', o.data, '--model', o.model, '--token', 'test-token', '--trainer', 'noop', '--progress', 'log', '--eval-fraction', '0'],
    o.fault ? { FEDTUNE_FAULT_POINT: o.fault } : {},
  );
}

/** The update a site of `offset` makes from `global`: global + offset * (1 + (i mod 5)) / 5 on every element. */
export function siteUpdate(global: TensorMap, offset: number): TensorMap {
  const out: TensorMap = new Map();
  for (const [name, t] of global) {
    const data = new Float32Array(t.data.length);
    for (let i = 0; i < data.length; i++) data[i] = t.data[i]! + (offset * (1 + (i % 5))) / 5;
    out.set(name, { shape: [...t.shape], data });
  }
  return out;
}

/** A noop trainer whose update is siteUpdate(global, offset): every site's differs. */
export class OffsetTrainer extends NoopTrainer {
  constructor(
    private readonly offset: number,
    o: { numTrainExamples: number; modelFingerprint: string },
  ) {
    super({ numTrainExamples: o.numTrainExamples, numEvalExamples: 0, modelFingerprint: o.modelFingerprint });
  }
  override async train(args: TrainArgs): Promise<TrainOutcome> {
    const r = await super.train(args);
    const adapter = siteUpdate(args.globalAdapter, this.offset);
    // FFA-LoRA: lora_A comes back as it arrived, as a real trainer leaves it.
    if (args.spec.freezeLoraA) for (const [name, t] of args.globalAdapter) if (name.includes('.lora_A.')) adapter.set(name, { shape: [...t.shape], data: Float32Array.from(t.data) });
    return { ...r, adapter };
  }
}

/** In-process sites (WorkerAgent with an OffsetTrainer each) until `stop` aborts. */
export function offsetSites(address: string, fingerprint: string, sites: ReadonlyArray<{ site: string; n: number; offset: number }>, stop: AbortSignal): Promise<unknown>[] {
  return sites.map((s) =>
    new WorkerAgent({
      coordinator: address,
      token: 'test-token',
      site: s.site,
      trainer: 'noop',
      trainerOptions: { seed: 0, modelDir: '', dataPath: '', evalFraction: 0 },
      trainerInstance: new OffsetTrainer(s.offset, { numTrainExamples: s.n, modelFingerprint: fingerprint }),
      progress: 'none',
    }).run(stop),
  );
}

/** Plain FedAvg of updates (weighted), computed in float64: the reference the secure sum must match. */
export function plainFedAvg(updates: ReadonlyArray<{ tensors: TensorMap; weight: number }>): Map<string, Float64Array> {
  const total = updates.reduce((s, u) => s + u.weight, 0);
  const out = new Map<string, Float64Array>();
  for (const u of updates) {
    for (const [name, t] of u.tensors) {
      let acc = out.get(name);
      if (!acc) out.set(name, (acc = new Float64Array(t.data.length)));
      for (let i = 0; i < acc.length; i++) acc[i] = acc[i]! + (t.data[i]! * u.weight) / total;
    }
  }
  return out;
}

/** Largest |a - b| over every element, and the largest allowed: bound + float32 rounding of the values. */
export function maxExcess(got: TensorMap, want: Map<string, Float64Array>, bound: number): number {
  let worst = -Infinity;
  for (const [name, w] of want) {
    const g = got.get(name);
    if (!g) throw new Error(`aggregate lacks tensor ${name}`);
    for (let i = 0; i < w.length; i++) {
      const allowed = bound + Math.abs(w[i]!) * 2 ** -22 + 1e-12;
      worst = Math.max(worst, Math.abs(g.data[i]! - w[i]!) - allowed);
    }
  }
  return worst;
}

export const checkpointDir = (runDir: string, round: number): string => join(runDir, `round-${String(round).padStart(4, '0')}`);

/**
 * A one-round secure-aggregation run config: `sites` workers, results from `results` of them
 * (default all), no evaluation, the secure_aggregation section `secagg` (phase timeout 30 s unless
 * given) and `extra` fields (training, strategy, weighting, more privacy).
 */
export function secureConfig(
  dir: string,
  model: string,
  o: { name: string; sites: number; results?: number; deadline?: number; retries?: number; secagg: Record<string, unknown>; extra?: Record<string, unknown>; privacy?: Record<string, unknown> },
): RunConfig {
  return runConfig(dir, model, {
    name: o.name,
    rounds: 1,
    ...o.extra,
    cohort: { min_workers: o.sites },
    round: { min_results: o.results ?? o.sites, deadline_sec: o.deadline ?? 60, max_retries: o.retries ?? 0 },
    eval: { every: 0 },
    privacy: { secure_aggregation: { phase_timeout_sec: 30, ...o.secagg }, ...o.privacy },
  } as never);
}
