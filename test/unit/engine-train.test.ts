/**
 * The engine end to end on real model directories: LoRA starts exactly at the
 * base model, a trained adapter survives PEFT save/load bit for bit, merging
 * matches the adapter, and training drives the loss down.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initModel } from '../../worker/engine/init.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { Engine } from '../../worker/engine/engine.ts';
import { mergeAdapter } from '../../worker/engine/merge.ts';
import { AdamW } from '../../common/optim.ts';
import { trainLoop } from '../../worker/engine/train.ts';
import { readPeftAdapter, writePeftAdapter } from '../../common/peft.ts';
import { makeBatches } from '../../worker/data/batching.ts';
import { prepareDataset } from '../../worker/data/prepare.ts';
import type { Batch, LoadedModel, LoraConfig } from '../../common/model-config.ts';
import type { Example } from '../../common/data/tokenize.ts';
import type { TensorMap } from '../../common/tensor.ts';

let dir: string;
const COLOURS = ['red', 'green', 'blue', 'gold'];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'fedtune-engine-'));
  const lines = Array.from({ length: 48 }, (_, i) =>
    JSON.stringify({ instruction: `Item ${i} is ${COLOURS[i % 4]}. What colour is item ${i}?`, output: COLOURS[i % 4] }),
  );
  await writeFile(join(dir, 'colours.jsonl'), lines.join('\n') + '\n');
  // The same questions with the answers rotated: a new task for an adapter on the trained base.
  const rotated = Array.from({ length: 48 }, (_, i) =>
    JSON.stringify({ instruction: `Item ${i} is ${COLOURS[i % 4]}. What colour is item ${i}?`, output: COLOURS[(i + 1) % 4] }),
  );
  await writeFile(join(dir, 'rotated.jsonl'), rotated.join('\n') + '\n');
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function setup(arch: 'llama' | 'qwen2' | 'gpt2', file = 'colours.jsonl'): Promise<{ model: LoadedModel; examples: Example[]; padId: number }> {
  const mdir = join(dir, `model-${arch}`);
  await initModel(mdir, { arch, hiddenSize: 32, numLayers: 2, numHeads: 4, numKvHeads: arch === 'gpt2' ? undefined : 2, overwrite: true, seed: 3 });
  const model = await loadModel(mdir);
  const tok = await loadTokenizer(mdir);
  const data = await prepareDataset(join(dir, file), tok, { template: 'plain', maxSeqLen: 96 });
  return { model, examples: data.train, padId: tok.padId };
}

const loraFor = (arch: string): LoraConfig => ({
  r: 4,
  alpha: 8,
  dropout: 0,
  targetModules: arch === 'gpt2' ? ['c_attn', 'c_proj', 'c_fc'] : ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
});

async function trainSome(engine: Engine, params: TensorMap, batches: Batch[], steps: number, lr: number): Promise<void> {
  await trainLoop({
    engine,
    params,
    epochBatches: () => batches,
    steps,
    gradAccumulation: 1,
    optimizer: new AdamW({ lr }),
    schedule: { kind: 'constant', baseLr: lr, warmupSteps: 0, totalSteps: steps },
    maxGradNorm: 1,
  });
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

describe('LoRA adapters on real model directories', () => {
  for (const arch of ['llama', 'qwen2', 'gpt2'] as const) {
    it(`${arch}: B = 0 gives the base logits exactly; saved adapter reloads to the same logits; merge matches within 1e-5`, async () => {
      const { model, examples, padId } = await setup(arch);
      const lora = loraFor(arch);
      const batches = makeBatches(examples, { batchSize: 4, padId, shuffle: false, seed: 0, maxSeqLen: 96 });
      const probe = batches[0]!;

      const base = Engine.create(model, { mode: 'full', threads: 1 });
      const baseOut = await base.forward(model.weights, probe);
      const engine = Engine.create(model, { mode: 'lora', lora, threads: 1 });
      const adapter = engine.initParams(5);
      const fresh = await engine.forward(adapter, probe);
      expect(maxAbsDiff(fresh.logits, baseOut.logits)).toBe(0);

      await trainSome(engine, adapter, batches, 5, 1e-2);
      const trained = await engine.forward(adapter, probe);
      expect(maxAbsDiff(trained.logits, baseOut.logits)).toBeGreaterThan(1e-3); // training moved the model

      const adir = join(dir, `adapter-${arch}`);
      await writePeftAdapter(adir, adapter, { lora, baseModel: model.dir, fanInFanOut: arch === 'gpt2' });
      const reloaded = await readPeftAdapter(adir);
      const again = await engine.forward(reloaded.adapter, probe);
      expect(maxAbsDiff(again.logits, trained.logits)).toBe(0);

      const merged = mergeAdapter(model, reloaded.adapter, reloaded.config);
      const mergedOut = await base.forward(merged, probe);
      expect(maxAbsDiff(mergedOut.logits, trained.logits)).toBeLessThan(1e-5);
      await engine.close();
      await base.close();
    });
  }
});

describe('training', () => {
  it('full mode from scratch, then LoRA on top, each drives the eval loss far below its start', async () => {
    const { model, examples, padId } = await setup('llama');
    const batches = makeBatches(examples, { batchSize: 8, padId, shuffle: false, seed: 0, maxSeqLen: 96 });

    const full = Engine.create(model, { mode: 'full', threads: 1 });
    const weights = full.initParams(0);
    const before = await full.evaluate(weights, batches);
    await trainSome(full, weights, batches, 40, 1e-2);
    const afterFull = await full.evaluate(weights, batches);
    expect(afterFull.loss).toBeLessThan(0.25 * before.loss);
    await full.close();

    // A new task on the trained base (answers rotated to the next colour), learned by an adapter alone.
    const rotated = await setup('llama', 'rotated.jsonl');
    const newTask = makeBatches(rotated.examples, { batchSize: 8, padId, shuffle: false, seed: 0, maxSeqLen: 96 });
    const tunedModel: LoadedModel = { ...model, weights };
    const engine = Engine.create(tunedModel, { mode: 'lora', lora: loraFor('llama'), threads: 1 });
    const adapter = engine.initParams(1);
    expect((await engine.evaluate(adapter, batches)).loss).toBeCloseTo(afterFull.loss, 5); // B = 0: the base itself
    const loraBefore = await engine.evaluate(adapter, newTask);
    await trainSome(engine, adapter, newTask, 40, 1e-2);
    const loraAfter = await engine.evaluate(adapter, newTask);
    expect(loraAfter.loss).toBeLessThan(0.4 * loraBefore.loss);
    expect(loraAfter.exactMatch).toBeGreaterThan(loraBefore.exactMatch);
    await engine.close();
  });
});

describe('engine errors and devices', () => {
  it('names the unknown target module, the wrong parameter shape and the out-of-vocabulary token', async () => {
    const { model, examples, padId } = await setup('llama');
    expect(() => Engine.create(model, { mode: 'lora', lora: { r: 4, alpha: 8, dropout: 0, targetModules: ['q_proj', 'c_attn'] } })).toThrow(/c_attn/);
    const engine = Engine.create(model, { mode: 'lora', lora: loraFor('llama'), threads: 1 });
    const batch = makeBatches(examples, { batchSize: 2, padId, shuffle: false, seed: 0, maxSeqLen: 96 })[0]!;
    const params = engine.initParams(0);
    const key = [...params.keys()][0]!;
    const bad = new Map(params);
    bad.set(key, { shape: [2, 2], data: new Float32Array(4) });
    await expect(engine.forward(bad, batch)).rejects.toThrow(new RegExp(`${key.replace(/\./g, '\\.')} has shape \\[2,2\\]`));
    const missing = new Map(params);
    missing.delete(key);
    await expect(engine.lossAndGrads(missing, batch)).rejects.toThrow(/missing/);
    const oov = { ...batch, inputIds: Int32Array.from(batch.inputIds, (x, i) => (i === 3 ? model.config.vocabSize + 5 : x)) };
    await expect(engine.forward(params, oov)).rejects.toThrow(/token id .* outside the vocabulary/);
    await engine.close();
  });

  it('falls back to CPU when CUDA is requested but its execution provider is absent', async () => {
    const { model, examples, padId } = await setup('llama');
    const engine = Engine.create(model, { mode: 'lora', lora: loraFor('llama'), threads: 1, device: 'cuda' });
    const batch = makeBatches(examples, { batchSize: 2, padId, shuffle: false, seed: 0, maxSeqLen: 96 })[0]!;
    const cpu = Engine.create(model, { mode: 'lora', lora: loraFor('llama'), threads: 1 });
    const params = engine.initParams(0);
    const a = await engine.forward(params, batch);
    const b = await cpu.forward(params, batch);
    expect(engine.device).toBe('cpu');
    expect(maxAbsDiff(a.logits, b.logits)).toBe(0);
    await engine.close();
    await cpu.close();
  });
});

describe('generation', () => {
  it('greedy decoding is deterministic and follows the trained answers; sampling is seeded', async () => {
    const { model, examples, padId } = await setup('llama');
    const batches = makeBatches(examples, { batchSize: 8, padId, shuffle: false, seed: 0, maxSeqLen: 96 });
    const engine = Engine.create(model, { mode: 'full', threads: 1 });
    const weights = engine.initParams(0);
    await trainSome(engine, weights, batches, 60, 1e-2);
    const tok = await loadTokenizer(model.dir);
    const prompt = [tok.bosId!, ...tok.encode('### Instruction:\nItem 5 is green. What colour is item 5?\n\n### Response:\n')];
    const out1 = await engine.generate(weights, prompt, { maxNewTokens: 8, eosId: tok.eosId, padId });
    const out2 = await engine.generate(weights, prompt, { maxNewTokens: 8, eosId: tok.eosId, padId });
    expect(out1).toEqual(out2);
    expect(tok.decode(out1, true)).toBe('green');
    const s1 = await engine.generate(weights, prompt, { maxNewTokens: 8, temperature: 1.5, seed: 3, padId });
    const s2 = await engine.generate(weights, prompt, { maxNewTokens: 8, temperature: 1.5, seed: 3, padId });
    expect(s1).toEqual(s2);
    await engine.close();
  });
});

describe('frozen base weights', () => {
  it('are fed from the loaded model itself to the sessions of every batch shape, not copied into them', async () => {
    const { model, examples, padId } = await setup('llama');
    const engine = Engine.create(model, { mode: 'lora', lora: loraFor('llama'), threads: 1 });
    const adapter = engine.initParams(0);
    const [b16, b32] = [16, 32].map((padTo) => makeBatches(examples.slice(0, 2), { batchSize: 2, padId, shuffle: false, seed: 0, maxSeqLen: 96, padTo })[0]!);
    expect(b16!.seqLen).not.toBe(b32!.seqLen); // two shape families, two sessions
    const before = [await engine.forward(adapter, b16!), await engine.forward(adapter, b32!)];
    const w = model.weights.get('model.norm.weight')!.data;
    const saved = Float32Array.from(w);
    w.fill(0.5); // change the one copy in place: both existing sessions see it
    const after = [await engine.forward(adapter, b16!), await engine.forward(adapter, b32!)];
    w.set(saved);
    const restored = await engine.forward(adapter, b16!);
    for (let i = 0; i < 2; i++) expect(maxAbsDiff(after[i]!.logits, before[i]!.logits)).toBeGreaterThan(1e-3);
    expect(maxAbsDiff(restored.logits, before[0]!.logits)).toBe(0);
    await engine.close();
  });
});
