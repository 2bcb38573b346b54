/**
 * The data plan of a distributed run: which examples make up each step, and
 * which worker computes which of them.
 *
 * The global data order does not depend on the workers: epoch e shuffles the
 * examples with seed `seed * 1000 + e` (as `fedtune train` does), cuts them into
 * micro-batches of training.batch_size, and groups training.grad_accumulation
 * micro-batches into one optimizer step (the last step of an epoch takes what is
 * left; a step never spans two epochs). So a run's result is the same whatever
 * the number of workers, and a step retried with fewer workers, or resumed from
 * a checkpoint, sees exactly the same global batch.
 *
 * Each step's micro-batches are split across the epoch's workers balanced by
 * trained-token count (coordinator/sharding.ts, iid); a worker's shard for the
 * epoch is its micro-batches in step order.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { shuffleInPlace } from '../../common/random.ts';
import { loadRecords, type RecordSource } from '../../common/data/dataset.ts';
import { tokenizeRecords, type Example, type Tokenizer } from '../../common/data/tokenize.ts';
import { partition } from '../sharding.ts';

export interface DistributedDataset {
  path: string;
  /** SHA-256 (hex) of the file's bytes: resume and shared-storage workers check it. */
  sha256: string;
  examples: Example[];
  /** Record index (0-based, file order) of each example. */
  recordIndex: number[];
  /** Trained tokens of each example (what a gradient is averaged over). */
  tokens: number[];
  padId: number;
  maxSeqLen: number;
  /** Records dropped because their response does not fit in maxSeqLen. */
  droppedSources: RecordSource[];
}

/** Read, validate (malformed rows name file and line) and tokenize the run's dataset. */
export async function loadDistributedDataset(
  path: string,
  tok: Tokenizer,
  opts: { template: string; maxSeqLen: number },
): Promise<DistributedDataset> {
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new Error(`distributed.dataset: cannot read ${path} (${code === 'ENOENT' ? 'file not found' : (code ?? String(err))})`);
  }
  const records = await loadRecords(path);
  const { examples, droppedSources } = tokenizeRecords(tok, records, { template: opts.template, maxSeqLen: opts.maxSeqLen });
  if (examples.length === 0) {
    throw new Error(`distributed.dataset: ${path}: every record was dropped because its response does not fit in training.max_seq_len ${opts.maxSeqLen}; raise it`);
  }
  const dropped = new Set(droppedSources.map((s) => s.index));
  const recordIndex = records.filter((r) => !dropped.has(r.source.index)).map((r) => r.source.index);
  const tokens = examples.map((ex) => ex.labels.reduce((n, l, i) => n + (i > 0 && l !== -100 ? 1 : 0), 0));
  return {
    path,
    sha256: createHash('sha256').update(bytes).digest('hex'),
    examples,
    recordIndex,
    tokens,
    padId: tok.padId,
    maxSeqLen: opts.maxSeqLen,
    droppedSources,
  };
}

export interface DataOrderOptions {
  examples: number;
  batchSize: number;
  gradAccumulation: number;
  seed: number;
}

/** Step -> epoch and micro-batches (lists of example indices), independent of the workers. */
export class DataOrder {
  readonly microBatchesPerEpoch: number;
  readonly stepsPerEpoch: number;
  private cache: { epoch: number; order: number[] } | null = null;

  constructor(readonly o: DataOrderOptions) {
    if (!Number.isInteger(o.examples) || o.examples < 1) throw new Error(`the dataset has ${o.examples} examples; it needs at least one`);
    this.microBatchesPerEpoch = Math.ceil(o.examples / o.batchSize);
    this.stepsPerEpoch = Math.ceil(this.microBatchesPerEpoch / o.gradAccumulation);
  }

  /** Total steps for `epochs` epochs (fractions round up), as `fedtune train` counts them. */
  stepsForEpochs(epochs: number): number {
    return Math.max(1, Math.ceil(epochs * this.stepsPerEpoch));
  }

  epochOf(step: number): number {
    return Math.floor(step / this.stepsPerEpoch);
  }

  /** First global step of the epoch. */
  epochStart(epoch: number): number {
    return epoch * this.stepsPerEpoch;
  }

  /** Example order of an epoch: the shuffle makeBatches(shuffle: true, seed: seed * 1000 + epoch) makes. */
  epochOrder(epoch: number): number[] {
    if (this.cache?.epoch !== epoch) {
      this.cache = { epoch, order: shuffleInPlace(Array.from({ length: this.o.examples }, (_, i) => i), this.o.seed * 1000 + epoch) };
    }
    return this.cache.order;
  }

  /** The micro-batches (example indices, in batch row order) of a global step. */
  stepMicroBatches(step: number): number[][] {
    const epoch = this.epochOf(step);
    const j = step - this.epochStart(epoch);
    const order = this.epochOrder(epoch);
    const { batchSize: bs, gradAccumulation: ga } = this.o;
    const out: number[][] = [];
    for (let k = j * ga; k < Math.min(this.microBatchesPerEpoch, (j + 1) * ga); k++) out.push(order.slice(k * bs, (k + 1) * bs));
    return out;
  }
}

/**
 * Split one step's micro-batches across `workers` workers, balanced by token
 * count: result[w] = positions (ascending) of the micro-batches worker w
 * computes. With fewer micro-batches than workers, some workers get none.
 */
export function assignMicroBatches(microBatchTokens: readonly number[], workers: number, seed: number): number[][] {
  if (!Number.isInteger(workers) || workers < 1) throw new Error(`number of workers is ${workers}, expected an integer >= 1`);
  const out: number[][] = Array.from({ length: workers }, () => []);
  const n = Math.min(workers, microBatchTokens.length);
  if (n === 0) return out;
  const positions = microBatchTokens.map((_, i) => i);
  const shards = partition(positions, n, { kind: 'iid', seed, weight: (i) => microBatchTokens[i]! });
  shards.forEach((s, w) => (out[w] = [...s].sort((a, b) => a - b)));
  return out;
}

/** What one worker does from the plan's first step to the end of its epoch. */
export interface WorkerPlan {
  workerId: string;
  /** The worker's micro-batches in the order its steps consume them (example indices). */
  microBatches: number[][];
  /** Per step of the plan (index step - fromStep): first micro-batch and how many. */
  perStep: Array<{ start: number; count: number }>;
}

export interface EpochPlan {
  epoch: number;
  /** Steps [fromStep, toStep) of the epoch this plan covers. */
  fromStep: number;
  toStep: number;
  workers: WorkerPlan[];
}

/** Plan steps [fromStep, end of its epoch) over `workerIds` (their order fixes who gets which share). */
export function planEpoch(order: DataOrder, tokens: readonly number[], fromStep: number, workerIds: readonly string[], seed: number): EpochPlan {
  if (workerIds.length === 0) throw new Error('cannot plan an epoch without workers');
  const epoch = order.epochOf(fromStep);
  const toStep = order.epochStart(epoch + 1);
  const workers: WorkerPlan[] = workerIds.map((workerId) => ({ workerId, microBatches: [], perStep: [] }));
  for (let s = fromStep; s < toStep; s++) {
    const mbs = order.stepMicroBatches(s);
    const mbTokens = mbs.map((mb) => mb.reduce((n, i) => n + tokens[i]!, 0));
    const split = assignMicroBatches(mbTokens, workers.length, seed * 1_000_003 + s);
    workers.forEach((w, k) => {
      w.perStep.push({ start: w.microBatches.length, count: split[k]!.length });
      for (const p of split[k]!) w.microBatches.push(mbs[p]!);
    });
  }
  return { epoch, fromStep, toStep, workers };
}
