/**
 * Data shards of distributed mode, as they travel from the coordinator to a
 * worker (Download of a data_shard_id). A shard is one worker's share of one
 * epoch, already cut into micro-batches in the order its steps consume them.
 *
 *   application/x-fedtune-shard+jsonl          the tokenized examples themselves:
 *     {"format":"fedtune.shard/1","shard_id":..,"epoch":..,"pad_id":..,"max_seq_len":..,"micro_batches":[3,3,2]}
 *     {"input_ids":[...],"labels":[...]}        one line per example, micro-batch after micro-batch
 *
 *   application/x-fedtune-shard-index+json     for workers that read the same file from shared storage:
 *     {"format":"fedtune.shard-index/1","shard_id":..,"epoch":..,"pad_id":..,"max_seq_len":..,
 *      "path":"/shared/data.jsonl","sha256":"<hex of the file>","micro_batches":[[[start,end],...],...]}
 *     each micro-batch is a list of [start, end) ranges of record indices (0-based, file order).
 *
 * Both sides use this module, so what one encodes the other decodes. Every
 * problem names the shard and what was wrong; an empty shard is an error.
 */
import type { Example } from './data/tokenize.ts';

export const SHARD_MEDIA_TYPE = 'application/x-fedtune-shard+jsonl';
export const SHARD_INDEX_MEDIA_TYPE = 'application/x-fedtune-shard-index+json';

interface ShardHeader {
  shardId: string;
  epoch: number;
  padId: number;
  maxSeqLen: number;
}

export interface ExampleShard extends ShardHeader {
  kind: 'examples';
  microBatches: Example[][];
}

export interface IndexShard extends ShardHeader {
  kind: 'index';
  /** Dataset path as the workers see it, and the SHA-256 (hex) of its bytes. */
  path: string;
  sha256: string;
  /** Per micro-batch: [start, end) ranges of record indices. */
  microBatches: Array<Array<[number, number]>>;
}

export type Shard = ExampleShard | IndexShard;

/** Record indices -> sorted-order-preserving [start, end) runs (indices in the given order). */
export function toRanges(indices: readonly number[]): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const i of indices) {
    const last = out.at(-1);
    if (last && last[1] === i) last[1] = i + 1;
    else out.push([i, i + 1]);
  }
  return out;
}

export function fromRanges(ranges: ReadonlyArray<readonly [number, number]>): number[] {
  const out: number[] = [];
  for (const [s, e] of ranges) for (let i = s; i < e; i++) out.push(i);
  return out;
}

export function encodeShard(shard: Shard): { bytes: Uint8Array; mediaType: string } {
  const head = { shard_id: shard.shardId, epoch: shard.epoch, pad_id: shard.padId, max_seq_len: shard.maxSeqLen };
  if (shard.kind === 'index') {
    const json = JSON.stringify({ format: 'fedtune.shard-index/1', ...head, path: shard.path, sha256: shard.sha256, micro_batches: shard.microBatches });
    return { bytes: new TextEncoder().encode(json), mediaType: SHARD_INDEX_MEDIA_TYPE };
  }
  const lines = [JSON.stringify({ format: 'fedtune.shard/1', ...head, micro_batches: shard.microBatches.map((mb) => mb.length) })];
  for (const mb of shard.microBatches) for (const ex of mb) lines.push(JSON.stringify({ input_ids: ex.inputIds, labels: ex.labels }));
  return { bytes: new TextEncoder().encode(`${lines.join('\n')}\n`), mediaType: SHARD_MEDIA_TYPE };
}

const isInt = (x: unknown, min = 0): x is number => typeof x === 'number' && Number.isInteger(x) && x >= min;
const isIntArray = (x: unknown): x is number[] => Array.isArray(x) && x.every((v) => isInt(v, -100));

function header(o: Record<string, unknown>, what: string): ShardHeader {
  if (typeof o.shard_id !== 'string' || o.shard_id === '') throw new Error(`${what}: header field shard_id must be a non-empty string`);
  if (!isInt(o.epoch)) throw new Error(`${what}: header field epoch must be an integer >= 0 (got ${JSON.stringify(o.epoch)})`);
  if (!isInt(o.pad_id)) throw new Error(`${what}: header field pad_id must be an integer >= 0 (got ${JSON.stringify(o.pad_id)})`);
  if (!isInt(o.max_seq_len, 1)) throw new Error(`${what}: header field max_seq_len must be an integer >= 1 (got ${JSON.stringify(o.max_seq_len)})`);
  return { shardId: o.shard_id, epoch: o.epoch, padId: o.pad_id, maxSeqLen: o.max_seq_len };
}

/** Parse and check a shard; `what` names it in errors (e.g. "data shard e0-w1"). */
export function decodeShard(bytes: Uint8Array, mediaType: string, what = 'data shard'): Shard {
  const text = new TextDecoder().decode(bytes);
  if (mediaType === SHARD_INDEX_MEDIA_TYPE) {
    let o: Record<string, unknown>;
    try {
      o = JSON.parse(text) as Record<string, unknown>;
    } catch (err) {
      throw new Error(`${what}: not valid JSON (${(err as Error).message})`);
    }
    if (o?.format !== 'fedtune.shard-index/1') throw new Error(`${what}: format is ${JSON.stringify(o?.format)}, expected "fedtune.shard-index/1"`);
    const h = header(o, what);
    if (typeof o.path !== 'string' || o.path === '') throw new Error(`${what}: path must name the dataset file on shared storage`);
    if (typeof o.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(o.sha256)) throw new Error(`${what}: sha256 must be 64 lowercase hex digits`);
    const mbs = o.micro_batches;
    if (!Array.isArray(mbs)) throw new Error(`${what}: micro_batches must be an array`);
    if (mbs.length === 0) throw new Error(`${what} is empty: it has no micro-batches (the coordinator must not send an empty shard)`);
    const microBatches = mbs.map((mb: unknown, k) => {
      if (!Array.isArray(mb) || mb.length === 0) throw new Error(`${what}: micro-batch ${k} must be a non-empty list of [start, end) ranges`);
      return mb.map((r: unknown, j): [number, number] => {
        if (!Array.isArray(r) || r.length !== 2 || !isInt(r[0]) || !isInt(r[1]) || r[1] <= r[0]) {
          throw new Error(`${what}: micro-batch ${k} range ${j} is ${JSON.stringify(r)}, expected [start, end) with 0 <= start < end`);
        }
        return [r[0], r[1]];
      });
    });
    return { kind: 'index', ...h, path: o.path, sha256: o.sha256, microBatches };
  }
  if (mediaType !== SHARD_MEDIA_TYPE) {
    throw new Error(`${what}: media type "${mediaType}" is not known (allowed: ${SHARD_MEDIA_TYPE}, ${SHARD_INDEX_MEDIA_TYPE})`);
  }
  const lines = text.split('\n');
  if (lines.at(-1) === '') lines.pop();
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(lines[0] ?? '') as Record<string, unknown>;
  } catch (err) {
    throw new Error(`${what}: line 1 (header) is not valid JSON (${(err as Error).message})`);
  }
  if (o?.format !== 'fedtune.shard/1') throw new Error(`${what}: line 1: format is ${JSON.stringify(o?.format)}, expected "fedtune.shard/1"`);
  const h = header(o, what);
  const sizes = o.micro_batches;
  if (!Array.isArray(sizes) || !sizes.every((n) => isInt(n, 1))) throw new Error(`${what}: line 1: micro_batches must be a list of sizes >= 1`);
  if (sizes.length === 0) throw new Error(`${what} is empty: it has no micro-batches (the coordinator must not send an empty shard)`);
  const total = (sizes as number[]).reduce((a, b) => a + b, 0);
  if (lines.length - 1 !== total) throw new Error(`${what}: the header announces ${total} examples, ${lines.length - 1} follow`);
  const microBatches: Example[][] = [];
  let line = 1;
  for (const n of sizes as number[]) {
    const mb: Example[] = [];
    for (let k = 0; k < n; k++, line++) {
      let ex: Record<string, unknown>;
      try {
        ex = JSON.parse(lines[line]!) as Record<string, unknown>;
      } catch (err) {
        throw new Error(`${what}: line ${line + 1} is not valid JSON (${(err as Error).message})`);
      }
      const ids = ex?.input_ids;
      const labels = ex?.labels;
      if (!isIntArray(ids) || !isIntArray(labels) || ids.length === 0 || ids.length !== labels.length || ids.length > h.maxSeqLen) {
        throw new Error(`${what}: line ${line + 1}: input_ids and labels must be integer lists of the same length, 1 to ${h.maxSeqLen}`);
      }
      mb.push({ inputIds: ids, labels });
    }
    microBatches.push(mb);
  }
  return { kind: 'examples', ...h, microBatches };
}
