import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { countTokens, makeBatches, splitEval } from '../../worker/data/batching.ts';
import { prepareDataset } from '../../worker/data/prepare.ts';
import type { Example, Tokenizer } from '../../common/data/tokenize.ts';

const M = -100;
function ex(len: number, tag: number, prompt = 1): Example {
  const inputIds = Array.from({ length: len }, (_, i) => tag * 100 + i);
  return { inputIds, labels: inputIds.map((id, i) => (i < prompt ? M : id)) };
}

describe('makeBatches', () => {
  it('pads on the right with padId, labels -100 on padding, seqLen rounded up to padTo', () => {
    const batches = makeBatches([ex(3, 1), ex(5, 2), ex(2, 3)], { batchSize: 2, padId: 7, shuffle: false, seed: 0, padTo: 4, maxSeqLen: 64 });
    expect(batches.map((b) => [b.batchSize, b.seqLen])).toEqual([
      [2, 8],
      [1, 4],
    ]);
    const b = batches[0]!;
    expect(Array.from(b.inputIds)).toEqual([100, 101, 102, 7, 7, 7, 7, 7, 200, 201, 202, 203, 204, 7, 7, 7]);
    expect(Array.from(b.labels)).toEqual([M, 101, 102, M, M, M, M, M, M, 201, 202, 203, 204, M, M, M]);
    expect(Array.from(batches[1]!.inputIds)).toEqual([300, 301, 7, 7]);
  });

  it('caps seqLen at maxSeqLen, drops a short last batch on request, and rejects over-long examples', () => {
    const [b] = makeBatches([ex(10, 1)], { batchSize: 1, padId: 0, shuffle: false, seed: 0, maxSeqLen: 12 });
    expect(b!.seqLen).toBe(12);
    expect(makeBatches([ex(3, 1), ex(3, 2), ex(3, 3)], { batchSize: 2, padId: 0, shuffle: false, seed: 0, maxSeqLen: 16, dropLast: true })).toHaveLength(1);
    expect(() => makeBatches([ex(3, 1), ex(20, 2)], { batchSize: 2, padId: 0, shuffle: false, seed: 0, maxSeqLen: 16 })).toThrow(/example 1 has 20 tokens, more than maxSeqLen 16/);
    expect(() => makeBatches([ex(3, 1)], { batchSize: 0, padId: 0, shuffle: false, seed: 0, maxSeqLen: 16 })).toThrow(/batchSize is 0/);
  });

  it('shuffles deterministically per seed and keeps every example exactly once', () => {
    const examples = Array.from({ length: 20 }, (_, i) => ex(2, i + 1));
    const firsts = (seed: number) =>
      makeBatches(examples, { batchSize: 3, padId: 0, shuffle: true, seed, padTo: 1, maxSeqLen: 8 }).flatMap((b) =>
        Array.from({ length: b.batchSize }, (_, r) => b.inputIds[r * b.seqLen]!),
      );
    const a = firsts(42);
    expect(firsts(42)).toEqual(a);
    expect(firsts(43)).not.toEqual(a);
    expect([...a].sort((x, y) => x - y)).toEqual(examples.map((e) => e.inputIds[0]));
    expect(a).not.toEqual(examples.map((e) => e.inputIds[0]));
  });
});

describe('splitEval and countTokens', () => {
  it('splits deterministically into disjoint parts that keep the input order', () => {
    const items = Array.from({ length: 50 }, (_, i) => i);
    const s = splitEval(items, 0.2, 5);
    expect(s.eval).toHaveLength(10);
    expect(s.train).toHaveLength(40);
    expect([...s.train, ...s.eval].sort((a, b) => a - b)).toEqual(items);
    expect(s.train).toEqual([...s.train].sort((a, b) => a - b));
    expect(splitEval(items, 0.2, 5)).toEqual(s);
    expect(splitEval(items, 0.2, 6).eval).not.toEqual(s.eval);
    expect(splitEval(items, 0, 5)).toEqual({ train: items, eval: [] });
    expect(splitEval([1, 2], 0.01, 0).eval).toHaveLength(1);
    expect(() => splitEval(items, 1, 0)).toThrow(/eval fraction is 1, expected a number in \[0, 1\)/);
  });

  it('counts trained tokens only', () => {
    expect(countTokens([ex(5, 1, 2), ex(3, 2, 3)])).toBe(3);
  });
});

describe('prepareDataset', () => {
  it('loads, splits, tokenizes and counts dropped records', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'fedtune-prep-'));
    try {
      const lines = Array.from({ length: 10 }, (_, i) => JSON.stringify({ instruction: `q${i}`, output: i === 3 ? 'z'.repeat(200) : `a${i}`, site: i % 2 ? 'x' : 'y' }));
      lines[7] = JSON.stringify({ instruction: 'p'.repeat(200), output: 'late' });
      const path = join(dir, 'd.jsonl');
      await writeFile(path, lines.join('\n'));
      const tok: Tokenizer = { encode: (t) => Array.from(Buffer.from(t), (b) => b + 3), bosId: null, eosId: 2, padId: 0 };
      const ds = await prepareDataset(path, tok, { template: 'plain', maxSeqLen: 64, evalFraction: 0.2, seed: 1 });
      expect(ds.records).toBe(10);
      expect(ds.dropped).toBe(1);
      expect(ds.droppedSources[0]!.line).toBe(8);
      expect(ds.train.length + ds.eval.length).toBe(9);
      expect(ds.eval.length).toBeGreaterThanOrEqual(1);
      for (const e of [...ds.train, ...ds.eval]) expect(e.inputIds.length).toBeLessThanOrEqual(64);

      const onlyX = await prepareDataset(path, tok, { template: 'plain', maxSeqLen: 64, filter: (r) => r.meta.site === 'x' });
      expect(onlyX.records).toBe(4); // odd i, except line 8 which has no site
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
