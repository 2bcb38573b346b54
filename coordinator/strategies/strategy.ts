/**
 * The strategy contract: the policy half of a federated run (who trains, with
 * what settings, how updates become the next global adapter), separate from
 * the transport (service.ts) and from the round loop's timing, quorum, retries,
 * defences and checkpoints (run.ts). Flower's shape:
 *
 *   configureFit(round, candidates)          -> [{ workerId, spec }]
 *   startAdapter(global, spec)               -> the adapter that worker starts from
 *   aggregator(global)                       -> streaming (O(adapter)) or buffering
 *   aggregateFit(round, global, agg, results, failures) -> next global
 *   configureEvaluate / aggregateEvaluate
 *   state() / load()                         -> server state saved with each checkpoint
 *
 * A strategy never sees a socket, a status code or a file. A new strategy is
 * one file that exports a `StrategyDefinition` plus one line in index.ts.
 */
import type { z } from 'zod';
import type { LoraTarget } from '../../common/lora.ts';
import type { LoraConfig } from '../../common/model-config.ts';
import { adapterShapes, initLoraAdapter } from '../../common/lora.ts';
import { createRng } from '../../common/random.ts';
import type { TensorMap } from '../../common/tensor.ts';

/** A worker the loop may ask to train or evaluate. */
export interface Candidate {
  workerId: string;
  site: string;
  numTrainExamples: number;
  numEvalExamples: number;
}

/** What a strategy may set per worker, on top of the run's `training` section. */
export interface FitSpec {
  /** LoRA rank the worker trains; its adapter's shapes follow (alpha keeps alpha / r of the run). */
  rank: number;
  /** FedProx: mu of the proximal term mu/2 ||w - w_global||^2 in the local loss (0 = off). */
  proxMu: number;
  /** FFA-LoRA: lora_A stays as it arrived; only lora_B is trained. */
  freezeLoraA: boolean;
}

export interface FitInstruction {
  workerId: string;
  spec: FitSpec;
}

/** The global adapter: PEFT tensors in manifest order and their LoRA rank. */
export interface GlobalAdapter {
  tensors: TensorMap;
  rank: number;
}

/** One update the loop has accepted (shapes, values, norm and weight already checked). */
export interface FitUpdate {
  workerId: string;
  site: string;
  spec: FitSpec;
  /** Aggregation weight settled by the loop's weighting policy (examples, capped, or 1). */
  weight: number;
  /** Tensors in the manifest of the worker's start adapter. Owned by the aggregator from now on. */
  tensors: TensorMap;
  /** The adapter the worker started from (same shapes). */
  start: TensorMap;
  /**
   * Gives the memory behind `tensors` back for reuse (the upload buffer pool). An aggregator that
   * has folded the update in and will not read `tensors` again calls it once; one that keeps the
   * tensors (buffering aggregators) never does. Absent: nothing to give back.
   */
  release?: () => void;
}

/**
 * Collects one round attempt's updates. Streaming aggregators fold updates into
 * a running sum, a few queued at a time, and drop them (memory O(adapter)): an
 * update's tensors may still be read after add() returns, until its `release`
 * is called. Buffering ones keep every update because the math needs them all
 * at once (median, Krum, stacking).
 */
export interface Aggregator {
  readonly kind: 'streaming' | 'buffering';
  add(u: FitUpdate): void;
  readonly count: number;
  /**
   * The round loop is done with this aggregator (after aggregateFit, or when the attempt is
   * retried): memory it holds may serve the next one. What aggregateFit returned must not depend
   * on it. Optional.
   */
  dispose?(): void;
}

export interface FitResult {
  workerId: string;
  site: string;
  weight: number;
  numExamples: number;
  metrics: Record<string, number>;
}

export interface FitFailure {
  workerId: string;
  site: string;
  reason: string;
}

export interface EvalReport {
  workerId: string;
  site: string;
  evalLoss: number;
  evalTokens: number;
  evalExamples: number;
  evalAccuracy: number | null;
}

export interface EvalSummary {
  evalLoss: number | null;
  evalAccuracy: number | null;
}

/** Server-side state of a strategy: JSON plus named tensors (saved as one safetensors file). */
export interface StrategyState {
  json: Record<string, unknown>;
  tensors: TensorMap;
}

/** What a strategy knows of the run when it is created. */
export interface StrategyContext {
  /** LoRA section of the run config. */
  lora: LoraConfig;
  /** The adapted modules with their shapes (global adapter = adapterShapes(targets, rank)). */
  targets: readonly LoraTarget[];
  cohort: { fraction: number; minWorkers: number };
  seed: number;
}

export interface Strategy {
  readonly name: string;
  /** Short description for the run.started event and the logs, e.g. "fedprox (mu 0.01)". */
  readonly description: string;
  configureFit(round: number, attempt: number, candidates: readonly Candidate[]): FitInstruction[];
  /** The adapter a worker trained with `spec` starts from: the global itself, or the global at the worker's rank. */
  startAdapter(global: GlobalAdapter, spec: FitSpec): TensorMap;
  aggregator(global: GlobalAdapter): Aggregator;
  /** Why an update the loop accepted is still unfit for this strategy (null: fine), e.g. FFA-LoRA's A changed. */
  checkUpdate(u: FitUpdate): string | null;
  aggregateFit(round: number, global: GlobalAdapter, aggregator: Aggregator, results: readonly FitResult[], failures: readonly FitFailure[]): GlobalAdapter;
  /** Workers that evaluate the global adapter after round `round`. */
  configureEvaluate(round: number, candidates: readonly Candidate[]): string[];
  aggregateEvaluate(round: number, reports: readonly EvalReport[]): EvalSummary;
  state(): StrategyState;
  load(state: StrategyState): void;
}

/** A strategy as registered: its config name, parameter schema and constructor. */
export interface StrategyDefinition<P extends z.ZodType = z.ZodType> {
  name: string;
  /** One line for `strategy` errors and docs. */
  summary: string;
  /** Parameters other than `name` (a z.strictObject, so unknown keys are refused by name). */
  params: P;
  create(params: z.output<P>, ctx: StrategyContext): Strategy;
}

// ---------------------------------------------------------------------------
// Shared building blocks

/**
 * A seeded random `fraction` of the candidates (at least minWorkers, at most
 * all of them), the same for the same seed, round and attempt.
 */
export function sampleCohort(candidates: readonly Candidate[], fraction: number, minWorkers: number, seed: number, round: number, attempt: number): Candidate[] {
  const want = Math.min(candidates.length, Math.max(minWorkers, Math.ceil(fraction * candidates.length)));
  const pool = [...candidates].sort((a, b) => (a.workerId < b.workerId ? -1 : 1));
  const rng = createRng(seed * 1_000_003 + round * 101 + attempt);
  for (let i = pool.length - 1; i > 0; i--) {
    const j = Math.floor(rng.next() * (i + 1));
    [pool[i], pool[j]] = [pool[j]!, pool[i]!];
  }
  return pool.slice(0, want);
}

/** Weighted mean of finite values (null when nothing has weight). */
export function weightedMean(pairs: Iterable<readonly [value: number, weight: number]>): number | null {
  let s = 0;
  let w = 0;
  for (const [v, k] of pairs) {
    if (Number.isFinite(v) && k > 0) {
      s += v * k;
      w += k;
    }
  }
  return w > 0 ? s / w : null;
}

/** The keys and shapes of an adapter of rank r on these targets, in manifest order. */
export function shapesAt(targets: readonly LoraTarget[], r: number): Map<string, number[]> {
  return adapterShapes([...targets], r);
}

/** A fresh adapter of rank r (A as PEFT initializes it, B = 0). */
export function freshAdapter(targets: readonly LoraTarget[], r: number, seed: number): TensorMap {
  return initLoraAdapter([...targets], r, seed);
}

/**
 * The defaults every strategy starts from: a seeded cohort with the run's rank
 * and no FedProx or frozen A, the global adapter as every worker's start,
 * evaluation on every worker holding eval data (loss weighted by tokens,
 * accuracy by examples), no server state.
 */
export abstract class BaseStrategy implements Strategy {
  abstract readonly name: string;
  abstract readonly description: string;

  constructor(protected readonly ctx: StrategyContext) {}

  protected fitSpec(_c: Candidate): FitSpec {
    return { rank: this.ctx.lora.r, proxMu: 0, freezeLoraA: false };
  }

  configureFit(round: number, attempt: number, candidates: readonly Candidate[]): FitInstruction[] {
    const { fraction, minWorkers } = this.ctx.cohort;
    return sampleCohort(candidates, fraction, minWorkers, this.ctx.seed, round, attempt).map((c) => ({ workerId: c.workerId, spec: this.fitSpec(c) }));
  }

  startAdapter(global: GlobalAdapter, spec: FitSpec): TensorMap {
    if (spec.rank !== global.rank) throw new Error(`${this.name}: a worker of rank ${spec.rank} cannot start from the global adapter of rank ${global.rank}`);
    return global.tensors;
  }

  abstract aggregator(global: GlobalAdapter): Aggregator;

  checkUpdate(_u: FitUpdate): string | null {
    return null;
  }

  abstract aggregateFit(round: number, global: GlobalAdapter, aggregator: Aggregator, results: readonly FitResult[], failures: readonly FitFailure[]): GlobalAdapter;

  configureEvaluate(_round: number, candidates: readonly Candidate[]): string[] {
    return candidates.filter((c) => c.numEvalExamples > 0).map((c) => c.workerId);
  }

  aggregateEvaluate(_round: number, reports: readonly EvalReport[]): EvalSummary {
    return {
      evalLoss: weightedMean(reports.map((r) => [r.evalLoss, r.evalTokens > 0 ? r.evalTokens : r.evalExamples] as const)),
      evalAccuracy: weightedMean(reports.filter((r) => r.evalAccuracy !== null).map((r) => [r.evalAccuracy!, r.evalExamples] as const)),
    };
  }

  state(): StrategyState {
    return { json: {}, tensors: new Map() };
  }

  load(_state: StrategyState): void {}
}

/** Tensor map -> one flat float32 vector in the map's order (a copy). */
export function flatten(m: TensorMap): Float32Array {
  let n = 0;
  for (const t of m.values()) n += t.data.length;
  const out = new Float32Array(n);
  let off = 0;
  for (const t of m.values()) {
    out.set(t.data, off);
    off += t.data.length;
  }
  return out;
}

/** A flat vector back into tensors shaped like `like` (same order). */
export function unflatten(flat: ArrayLike<number>, like: TensorMap): TensorMap {
  const out: TensorMap = new Map();
  let off = 0;
  for (const [name, t] of like) {
    const n = t.data.length;
    const data = new Float32Array(n);
    for (let i = 0; i < n; i++) data[i] = flat[off + i]!;
    out.set(name, { shape: [...t.shape], data });
    off += n;
  }
  if (off !== flat.length) throw new Error(`unflatten: ${flat.length} values for ${off} elements`);
  return out;
}
