/**
 * Examples -> padded batches, and deterministic shuffles and splits.
 *
 * Padding is on the right with the tokenizer's pad id; padded positions get
 * label -100. A batch's seqLen is its longest example rounded up to a multiple
 * of `padTo` (fewer distinct shapes for the engine), capped at maxSeqLen.
 */
import { shuffleInPlace } from '../../common/random.ts';
import { IGNORE_INDEX, type Batch } from '../../common/model-config.ts';
import type { Example } from '../../common/data/tokenize.ts';

export { countTokens } from '../../common/data/tokenize.ts';

export interface BatchOptions {
  batchSize: number;
  padId: number;
  shuffle: boolean;
  seed: number;
  /** Round each batch's sequence length up to a multiple of this. Default 16. */
  padTo?: number;
  maxSeqLen: number;
  /** Drop a last batch smaller than batchSize. Default false. */
  dropLast?: boolean;
}

export function makeBatches(examples: readonly Example[], opts: BatchOptions): Batch[] {
  const padTo = opts.padTo ?? 16;
  if (!Number.isInteger(opts.batchSize) || opts.batchSize < 1) throw new Error(`batchSize is ${opts.batchSize}, expected an integer >= 1`);
  if (!Number.isInteger(padTo) || padTo < 1) throw new Error(`padTo is ${padTo}, expected an integer >= 1`);
  if (!Number.isInteger(opts.maxSeqLen) || opts.maxSeqLen < 1) throw new Error(`maxSeqLen is ${opts.maxSeqLen}, expected an integer >= 1`);
  if (!Number.isInteger(opts.padId)) throw new Error(`padId is ${opts.padId}, expected an integer token id`);
  examples.forEach((ex, i) => {
    if (ex.inputIds.length !== ex.labels.length) {
      throw new Error(`example ${i}: ${ex.inputIds.length} input ids but ${ex.labels.length} labels; they must be the same length`);
    }
    if (ex.inputIds.length === 0) throw new Error(`example ${i} has no tokens`);
    if (ex.inputIds.length > opts.maxSeqLen) {
      throw new Error(`example ${i} has ${ex.inputIds.length} tokens, more than maxSeqLen ${opts.maxSeqLen}; tokenize with the same maxSeqLen`);
    }
  });

  const order = examples.map((_, i) => i);
  if (opts.shuffle) shuffleInPlace(order, opts.seed);
  const batches: Batch[] = [];
  for (let start = 0; start < order.length; start += opts.batchSize) {
    const rows = order.slice(start, start + opts.batchSize).map((i) => examples[i]!);
    if (rows.length < opts.batchSize && opts.dropLast) break;
    const longest = Math.max(...rows.map((r) => r.inputIds.length));
    const seqLen = Math.min(Math.ceil(longest / padTo) * padTo, opts.maxSeqLen);
    const inputIds = new Int32Array(rows.length * seqLen).fill(opts.padId);
    const labels = new Int32Array(rows.length * seqLen).fill(IGNORE_INDEX);
    rows.forEach((r, b) => {
      inputIds.set(r.inputIds, b * seqLen);
      labels.set(r.labels, b * seqLen);
    });
    batches.push({ batchSize: rows.length, seqLen, inputIds, labels });
  }
  return batches;
}

/**
 * Deterministic train/eval split: round(n * fraction) items, chosen by a
 * seeded shuffle, go to eval (at least one when fraction > 0, and at least one
 * item stays in train). Both parts keep the input order.
 */
export function splitEval<T>(items: readonly T[], fraction: number, seed: number): { train: T[]; eval: T[] } {
  if (typeof fraction !== 'number' || !(fraction >= 0 && fraction < 1)) {
    throw new Error(`eval fraction is ${String(fraction)}, expected a number in [0, 1)`);
  }
  const n = items.length;
  if (fraction === 0 || n === 0) return { train: [...items], eval: [] };
  if (n < 2) throw new Error(`cannot split ${n} item into train and eval; use eval fraction 0 or more data`);
  const nEval = Math.min(n - 1, Math.max(1, Math.round(n * fraction)));
  const picked = new Set(shuffleInPlace(items.map((_, i) => i), seed).slice(0, nEval));
  const train: T[] = [];
  const evalItems: T[] = [];
  items.forEach((x, i) => (picked.has(i) ? evalItems : train).push(x));
  return { train, eval: evalItems };
}
