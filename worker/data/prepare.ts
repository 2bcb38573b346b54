/**
 * One call from a dataset file to tokenized train and eval examples:
 * load -> split records (seeded) -> render with the template -> tokenize.
 * The split is made on records, before tokenization, so the eval set does not
 * change with maxSeqLen. Records dropped because their response does not fit
 * are logged with where the first of them are (file:line), not only counted.
 */
import { splitEval } from './batching.ts';
import { loadRecords, type RecordSource, type SftRecord } from '../../common/data/dataset.ts';
import { droppedWhere, tokenizeRecords, type Example, type TokenizeOptions, type Tokenizer } from '../../common/data/tokenize.ts';
import { logger } from '../../common/log.ts';

const log = logger('data');

export interface PrepareOptions extends TokenizeOptions {
  /** Fraction of records held out for evaluation, in [0, 1). Default 0. */
  evalFraction?: number;
  /** Seed of the train/eval split. Default 0. */
  seed?: number;
  /** Keep only these records (e.g. one shard from coordinator/sharding.ts). */
  filter?: (rec: SftRecord) => boolean;
  /** Log a warning naming the first dropped records (default true; off for callers that print their own). */
  reportDropped?: boolean;
}

export interface PreparedDataset {
  train: Example[];
  eval: Example[];
  /** Records dropped because truncation left no trained token (train and eval). */
  dropped: number;
  droppedSources: RecordSource[];
  /** Records read from the file (after `filter`). */
  records: number;
}

export async function prepareDataset(path: string, tok: Tokenizer, opts: PrepareOptions): Promise<PreparedDataset> {
  let records = await loadRecords(path);
  if (opts.filter) {
    records = records.filter(opts.filter);
    if (records.length === 0) throw new Error(`${path}: no record passes the filter`);
  }
  const split = splitEval(records, opts.evalFraction ?? 0, opts.seed ?? 0);
  const train = tokenizeRecords(tok, split.train, opts);
  const evalSet = tokenizeRecords(tok, split.eval, opts);
  if (train.examples.length === 0) {
    throw new Error(
      `${path}: every training record was dropped because its response does not fit in maxSeqLen ${opts.maxSeqLen}; raise maxSeqLen`,
    );
  }
  const droppedSources = [...train.droppedSources, ...evalSet.droppedSources];
  if (droppedSources.length > 0 && opts.reportDropped !== false) {
    const n = droppedSources.length;
    log.warn(
      { dropped: n, first: droppedSources.slice(0, 3).map((s) => `${s.file}:${s.line}`) },
      `${n} record${n === 1 ? '' : 's'} dropped: the response does not fit in max_seq_len ${opts.maxSeqLen} tokens (${droppedWhere(droppedSources)}); raise max_seq_len to keep them`,
    );
  }
  return {
    train: train.examples,
    eval: evalSet.examples,
    dropped: train.dropped + evalSet.dropped,
    droppedSources,
    records: records.length,
  };
}
