import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { manifestOf } from '../../common/chunks.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { parseRunConfig } from '../../common/config.ts';
import { createStepStrategy } from '../../coordinator/strategies/steps.ts';
import { assignMicroBatches, DataOrder, loadDistributedDataset, planEpoch } from '../../coordinator/distributed/plan.ts';
import { makeBatches } from '../../worker/data/batching.ts';
import type { Example, Tokenizer } from '../../common/data/tokenize.ts';
import { AdamW, clipGradNorm } from '../../common/optim.ts';
import { OuterOptimizer } from '../../common/outer.ts';
import { decodeShard, encodeShard, fromRanges, SHARD_INDEX_MEDIA_TYPE, SHARD_MEDIA_TYPE, toRanges } from '../../common/shard.ts';

const dir = mkdtempSync(join(tmpdir(), 'fedtune-dist-plan-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** One token per character (code point mod 250), enough for the data pipeline. */
const charTok: Tokenizer = { encode: (t) => [...t].map((c) => c.codePointAt(0)! % 250), bosId: null, eosId: 251, padId: 0 };

describe('data order', () => {
  it('epoch e is the shuffle makeBatches(shuffle, seed * 1000 + e) makes, cut into steps of grad_accumulation micro-batches', () => {
    const examples: Example[] = Array.from({ length: 11 }, (_, i) => ({ inputIds: [i + 1, i + 2], labels: [i + 1, i + 2] }));
    const order = new DataOrder({ examples: 11, batchSize: 2, gradAccumulation: 4, seed: 5 });
    expect(order.microBatchesPerEpoch).toBe(6);
    expect(order.stepsPerEpoch).toBe(2);
    for (const epoch of [0, 1]) {
      const batches = makeBatches(examples, { batchSize: 2, padId: 0, shuffle: true, seed: 5 * 1000 + epoch, maxSeqLen: 16 });
      const fromBatches = batches.map((b) => Array.from({ length: b.batchSize }, (_, r) => b.inputIds[r * b.seqLen]! - 1));
      const steps = [order.stepMicroBatches(epoch * 2), order.stepMicroBatches(epoch * 2 + 1)];
      expect(steps[0]).toHaveLength(4);
      expect(steps[1]).toHaveLength(2); // the last step of an epoch takes what is left
      expect([...steps[0]!, ...steps[1]!]).toEqual(fromBatches);
    }
    expect(order.stepMicroBatches(0)).not.toEqual(order.stepMicroBatches(2)); // reshuffled per epoch
    expect(order.stepsForEpochs(1.5)).toBe(3);
  });

  it('a step is split across workers balanced by tokens, every micro-batch exactly once, deterministically', () => {
    const tokens = [50, 10, 10, 10, 10, 10, 40, 30];
    const a = assignMicroBatches(tokens, 3, 1);
    expect(a).toEqual(assignMicroBatches(tokens, 3, 1));
    expect(a.flat().sort((x, y) => x - y)).toEqual([0, 1, 2, 3, 4, 5, 6, 7]);
    const loads = a.map((s) => s.reduce((n, i) => n + tokens[i]!, 0));
    expect(Math.max(...loads) - Math.min(...loads)).toBeLessThanOrEqual(50);
    expect(loads.reduce((x, y) => x + y, 0)).toBe(170);
    // More workers than micro-batches: the extra ones get nothing this step.
    expect(assignMicroBatches([5, 7], 3, 0).map((s) => s.length).sort()).toEqual([0, 1, 1]);
  });

  it('an epoch plan covers each step of the rest of the epoch once, with per-step offsets into each worker shard', () => {
    const order = new DataOrder({ examples: 20, batchSize: 2, gradAccumulation: 3, seed: 0 });
    const tokens = Array.from({ length: 20 }, (_, i) => 1 + (i % 5));
    const plan = planEpoch(order, tokens, 1, ['a', 'b'], 0);
    expect(plan.epoch).toBe(0);
    expect([plan.fromStep, plan.toStep]).toEqual([1, 4]);
    for (let s = plan.fromStep; s < plan.toStep; s++) {
      const got = plan.workers.flatMap((w) => {
        const p = w.perStep[s - plan.fromStep]!;
        return w.microBatches.slice(p.start, p.start + p.count);
      });
      expect(got.map((mb) => mb.join()).sort()).toEqual(order.stepMicroBatches(s).map((mb) => mb.join()).sort());
    }
    expect(() => planEpoch(order, tokens, 0, [], 0)).toThrow(/without workers/);
  });
});

describe('dataset', () => {
  it('malformed rows are reported with file and line', async () => {
    const p = join(dir, 'bad.jsonl');
    writeFileSync(p, '{"instruction":"a","output":"b"}\n{"instruction":"c","output":"d"}\n{"instruction": "e", "output": \n');
    await expect(loadDistributedDataset(p, charTok, { template: 'plain', maxSeqLen: 64 })).rejects.toThrow(`${p}:3: line is not valid JSON`);
    writeFileSync(p, '{"instruction":"a","output":"b"}\n{"prompt":"c"}\n');
    await expect(loadDistributedDataset(p, charTok, { template: 'plain', maxSeqLen: 64 })).rejects.toThrow(`${p}:2: record is neither Alpaca`);
  });

  it('a missing file, and a dataset whose every record is too long, are clear errors', async () => {
    await expect(loadDistributedDataset(join(dir, 'nope.jsonl'), charTok, { template: 'plain', maxSeqLen: 64 })).rejects.toThrow(/distributed.dataset: cannot read .*nope.jsonl \(file not found\)/);
    const p = join(dir, 'long.jsonl');
    writeFileSync(p, `${JSON.stringify({ instruction: 'x'.repeat(100), output: 'y' })}\n`);
    await expect(loadDistributedDataset(p, charTok, { template: 'plain', maxSeqLen: 16 })).rejects.toThrow(/every record was dropped .* training.max_seq_len 16/);
  });

  it('keeps record indices and trained-token counts of the examples it keeps', async () => {
    const p = join(dir, 'mixed.jsonl');
    writeFileSync(p, [{ instruction: 'hi', output: 'yo' }, { instruction: 'x'.repeat(100), output: 'z' }, { instruction: 'a', output: 'bcd' }].map((r) => JSON.stringify(r)).join('\n'));
    const d = await loadDistributedDataset(p, charTok, { template: 'plain', maxSeqLen: 48 });
    expect(d.recordIndex).toEqual([0, 2]);
    expect(d.droppedSources.map((s) => s.line)).toEqual([2]);
    expect(d.tokens).toEqual([3, 4]); // response characters + EOS
    expect(d.sha256).toMatch(/^[0-9a-f]{64}$/);
  });
});

describe('shards', () => {
  it('round-trip examples and index ranges', () => {
    const mbs: Example[][] = [[{ inputIds: [1, 2, 3], labels: [-100, 2, 3] }], [{ inputIds: [4], labels: [4] }, { inputIds: [5, 6], labels: [-100, 6] }]];
    const enc = encodeShard({ kind: 'examples', shardId: 's1', epoch: 2, padId: 0, maxSeqLen: 8, microBatches: mbs });
    expect(enc.mediaType).toBe(SHARD_MEDIA_TYPE);
    expect(decodeShard(enc.bytes, enc.mediaType)).toEqual({ kind: 'examples', shardId: 's1', epoch: 2, padId: 0, maxSeqLen: 8, microBatches: mbs });
    expect(toRanges([3, 4, 5, 9, 1, 2])).toEqual([[3, 6], [9, 10], [1, 3]]);
    expect(fromRanges(toRanges([3, 4, 5, 9, 1, 2]))).toEqual([3, 4, 5, 9, 1, 2]);
    const idx = encodeShard({ kind: 'index', shardId: 's2', epoch: 0, padId: 1, maxSeqLen: 8, path: '/d.jsonl', sha256: 'a'.repeat(64), microBatches: [[[0, 2]], [[5, 6], [3, 4]]] });
    expect(idx.mediaType).toBe(SHARD_INDEX_MEDIA_TYPE);
    expect(decodeShard(idx.bytes, idx.mediaType)).toMatchObject({ kind: 'index', path: '/d.jsonl', microBatches: [[[0, 2]], [[5, 6], [3, 4]]] });
  });

  it('an empty or damaged shard is a clear error naming it', () => {
    const empty = encodeShard({ kind: 'examples', shardId: 'e', epoch: 0, padId: 0, maxSeqLen: 8, microBatches: [] });
    expect(() => decodeShard(empty.bytes, empty.mediaType, 'data shard e')).toThrow('data shard e is empty: it has no micro-batches');
    const emptyIdx = encodeShard({ kind: 'index', shardId: 'e', epoch: 0, padId: 0, maxSeqLen: 8, path: '/d', sha256: 'b'.repeat(64), microBatches: [] });
    expect(() => decodeShard(emptyIdx.bytes, emptyIdx.mediaType, 'data shard e')).toThrow(/is empty/);
    const good = encodeShard({ kind: 'examples', shardId: 'g', epoch: 0, padId: 0, maxSeqLen: 8, microBatches: [[{ inputIds: [1, 2], labels: [1, 2] }]] });
    const text = new TextDecoder().decode(good.bytes);
    expect(() => decodeShard(new TextEncoder().encode(text.replace('[1,2]}', '[1]}')), SHARD_MEDIA_TYPE, 'data shard g')).toThrow('data shard g: line 2: input_ids and labels must be integer lists of the same length');
    expect(() => decodeShard(new TextEncoder().encode(text.split('\n')[0]!), SHARD_MEDIA_TYPE, 'data shard g')).toThrow('announces 1 examples, 0 follow');
    expect(() => decodeShard(good.bytes, 'text/plain', 'data shard g')).toThrow('media type "text/plain" is not known');
  });
});

const stepConfig = (o: Record<string, unknown>) =>
  parseRunConfig({ name: 't', mode: 'distributed', model: { path: 'm' }, distributed: { dataset: 'd.jsonl' }, server: { join_token: 'x' }, ...o });

describe('step strategies', () => {
  const params = (): TensorMap =>
    new Map([
      ['a', { shape: [2, 2], data: Float32Array.from([0.1, -0.2, 0.3, 0.4]) }],
      ['b', { shape: [3], data: Float32Array.from([1, 2, 3]) }],
    ]);
  const flat = (m: TensorMap): Float32Array => Float32Array.from([...m.values()].flatMap((t) => [...t.data]));

  it('a step from summed gradients equals the token-weighted mean gradient, clipped, through AdamW', () => {
    const g1 = Float32Array.from([1, 2, 3, 4, 5, 6, 7]); // summed over 3 tokens
    const g2 = Float32Array.from([-1, 0, 1, 0, 2, 2, 2]); // summed over 5 tokens
    const sync = createStepStrategy(stepConfig({ training: { steps: 1, lr: 0.1, max_grad_norm: 0.5 } }));
    expect(sync.name).toBe('sync-sgd');
    const sum = sync.aggregator(manifestOf(params()));
    sync.fold(sum, g1, 3);
    sync.fold(sum, g2, 5);
    const got = params();
    const norm = sync.step(got, sum, 8, 0.05).gradNorm!;

    const want = params();
    const mean = g1.map((x, i) => (x + g2[i]!) / 8);
    const grads: TensorMap = new Map([
      ['a', { shape: [2, 2], data: mean.slice(0, 4) }],
      ['b', { shape: [3], data: mean.slice(4) }],
    ]);
    expect(norm).toBeCloseTo(clipGradNorm(grads, 0.5), 6);
    new AdamW({ lr: 0.1 }).step(want, grads, 0.05);
    const d = flat(got).map((x, i) => Math.abs(x - flat(want)[i]!));
    expect(Math.max(...d)).toBeLessThan(1e-7);
    expect(flat(got)).not.toEqual(flat(params()));
  });

  it('local SGD: the outer step sees the token-weighted mean delta (Nesterov momentum)', () => {
    const d1 = Float32Array.from([1, 1, 1, 1, 1, 1, 1]);
    const d2 = Float32Array.from([4, 0, 0, 0, 0, 0, -2]);
    const local = createStepStrategy(stepConfig({ training: { steps: 4 }, distributed: { dataset: 'd.jsonl', sync_every: 2, outer_optimizer: { kind: 'nesterov', lr: 0.7, momentum: 0.9 } } }));
    expect(local.name).toBe('local-sgd');
    const sum = local.aggregator(manifestOf(params()));
    local.fold(sum, d1, 1);
    local.fold(sum, d2, 3);
    const got = local.step(params(), sum, 4, 0).next;
    const mean = d1.map((x, i) => (x + 3 * d2[i]!) / 4);
    const delta: TensorMap = new Map([
      ['a', { shape: [2, 2], data: mean.slice(0, 4) }],
      ['b', { shape: [3], data: mean.slice(4) }],
    ]);
    const want = new OuterOptimizer({ kind: 'nesterov', lr: 0.7, momentum: 0.9 }).step(params(), delta);
    const d = flat(got).map((x, i) => Math.abs(x - flat(want)[i]!));
    expect(Math.max(...d)).toBeLessThan(1e-6);
    // Nesterov with lr 0.7, mu 0.9 on a fresh buffer moves by lr * (1 + mu) * delta.
    expect(flat(got)[0]! - 0.1).toBeCloseTo(0.7 * 1.9 * mean[0]!, 5);
  });
});
