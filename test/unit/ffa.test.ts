/**
 * FFA-LoRA: with lora_A frozen, training changes only lora_B. Every lora_A
 * comes back bit for bit as it went in (no gradient step, no optimizer state,
 * no weight decay on it) while the loss still goes down; the same holds for
 * the worker's ONNX and noop trainers, and the ONNX trainer refuses a global
 * adapter whose rank is not the task's.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Engine } from '../../worker/engine/engine.ts';
import { trainLoop, type StepInfo } from '../../worker/engine/train.ts';
import { initModel } from '../../worker/engine/init.ts';
import { createOnnxTrainer } from '../../worker/trainers/onnx.ts';
import { NoopTrainer } from '../../worker/trainers/noop.ts';
import type { LocalTrainingSpec, Trainer } from '../../worker/trainers/trainer.ts';
import { AdamW } from '../../common/optim.ts';
import { initLoraAdapter, loraTargets } from '../../common/lora.ts';
import type { Batch, LoraConfig } from '../../common/model-config.ts';
import { cloneTensorMap, type TensorMap } from '../../common/tensor.ts';
import { createRng } from '../../common/random.ts';
import { randomConfig, randomModel, randomBatch } from '../helpers/random-model.ts';

const isA = (name: string): boolean => name.endsWith('.lora_A.weight');

function expectFrozenA(before: TensorMap, after: TensorMap): void {
  let aCount = 0;
  let bChanged = 0;
  for (const [name, t] of before) {
    const now = after.get(name)!.data;
    if (isA(name)) {
      aCount++;
      expect(Buffer.from(now.buffer, now.byteOffset, now.byteLength).equals(Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength)), `${name} changed`).toBe(true);
    } else {
      let diff = 0;
      for (let i = 0; i < now.length; i++) diff = Math.max(diff, Math.abs(now[i]! - t.data[i]!));
      if (diff > 1e-4) bChanged++;
    }
  }
  expect(aCount).toBe(before.size / 2);
  expect(bChanged).toBe(before.size / 2); // every lora_B moved
}

const LORA: LoraConfig = { r: 4, alpha: 8, dropout: 0, targetModules: ['q_proj', 'v_proj', 'up_proj', 'down_proj'] };

describe('trainLoop with frozen lora_A', () => {
  it('leaves every lora_A bit-identical, trains every lora_B, keeps A out of the optimizer, and lowers the loss', async () => {
    const model = randomModel(randomConfig('llama'));
    const engine = Engine.create(model, { mode: 'lora', lora: LORA, threads: 1 });
    const start = engine.initParams(2);
    const params = cloneTensorMap(start);
    const batches = [0, 1, 2].map((k) => randomBatch(model.config.vocabSize, 2, 12, 30 + k));
    const before = await engine.evaluate(params, batches);
    // Weight decay on: were it applied to A, A would shrink.
    const optimizer = new AdamW({ lr: 2e-2, weightDecay: 0.1 });
    const seen: string[][] = [];
    const stepped = optimizer.step.bind(optimizer);
    optimizer.step = (p, g, lr) => {
      seen.push([...g.keys()]);
      stepped(p, g, lr);
    };
    const steps: StepInfo[] = [];
    await trainLoop({
      engine,
      params,
      epochBatches: () => batches,
      steps: 30,
      gradAccumulation: 1,
      optimizer,
      schedule: { kind: 'constant', baseLr: 2e-2, warmupSteps: 0, totalSteps: 30 },
      maxGradNorm: 1,
      frozen: isA,
      onStep: (s) => steps.push(s),
    });
    const after = await engine.evaluate(params, batches);

    expectFrozenA(start, params);
    const bNames = [...start.keys()].filter((n) => !isA(n));
    for (const names of seen) expect(names).toEqual(bNames);
    expect([...optimizer.state().m.keys()]).toEqual(bNames);
    expect(after.loss).toBeLessThan(before.loss - 0.05);
    expect(steps.at(-1)!.loss).toBeLessThan(steps[0]!.loss);
    console.log(`FFA-LoRA on a random llama: loss ${before.loss.toFixed(4)} -> ${after.loss.toFixed(4)} with lora_A frozen`);
    await engine.close();
  });

  it('refuses a filter that freezes every parameter', async () => {
    const model = randomModel(randomConfig('llama', { numLayers: 1 }));
    const engine = Engine.create(model, { mode: 'lora', lora: LORA, threads: 1 });
    const params = engine.initParams(0);
    await expect(
      trainLoop({
        engine,
        params,
        epochBatches: () => [randomBatch(model.config.vocabSize, 1, 6, 1)],
        steps: 1,
        gradAccumulation: 1,
        optimizer: new AdamW({ lr: 1e-3 }),
        schedule: { kind: 'constant', baseLr: 1e-3, warmupSteps: 0, totalSteps: 1 },
        maxGradNorm: 1,
        frozen: () => true,
      }),
    ).rejects.toThrow(/all \d+ parameters are frozen/);
    await engine.close();
  });
});

describe('worker trainers honour freeze_lora_a and prox_mu', () => {
  let dir: string;
  let onnx: Trainer;
  const lora: LoraConfig = { r: 4, alpha: 8, dropout: 0, targetModules: ['q_proj', 'v_proj'] };
  const spec = (over: Partial<LocalTrainingSpec> = {}): LocalTrainingSpec => ({
    lora,
    steps: 8,
    epochs: null,
    batchSize: 4,
    gradAccumulation: 1,
    lr: 2e-2,
    schedule: 'constant',
    warmupSteps: 0,
    scheduleRound: 0,
    scheduleRounds: 0,
    keepOptimizerState: false,
    weightDecay: 0.01,
    maxGradNorm: 1,
    maxSeqLen: 64,
    template: 'plain',
    seed: 1,
    proxMu: 0,
    freezeLoraA: false,
    loraPlusRatio: 1,
    ...over,
  });
  const train = (tr: Trainer, globalAdapter: TensorMap, s: LocalTrainingSpec) =>
    tr.train({ taskId: 't1', runId: 'r', round: 0, globalAdapter, spec: s, onProgress: () => {}, signal: new AbortController().signal });

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'fedtune-ffa-'));
    const colours = ['red', 'green', 'blue', 'gold'];
    const lines = Array.from({ length: 16 }, (_, i) => JSON.stringify({ instruction: `Item ${i} is ${colours[i % 4]}. Its colour?`, output: colours[i % 4] }));
    await writeFile(join(dir, 'data.jsonl'), lines.join('\n') + '\n');
    await initModel(join(dir, 'model'), { arch: 'llama', hiddenSize: 32, numLayers: 2, numHeads: 4, numKvHeads: 2, overwrite: true, seed: 3 });
    onnx = await createOnnxTrainer({ modelDir: join(dir, 'model'), dataPath: join(dir, 'data.jsonl'), evalFraction: 0, template: 'plain', maxSeqLen: 64, threads: 1, seed: 1 });
  });
  afterAll(async () => {
    await onnx?.close();
    await rm(dir, { recursive: true, force: true });
  });

  const globalFor = async (r: number): Promise<TensorMap> => {
    const { loadModel } = await import('../../worker/engine/model.ts');
    const model = await loadModel(join(dir, 'model'));
    const g = initLoraAdapter(loraTargets(model.config, { ...lora, r }), r, 9);
    // Non-zero B, so that a global adapter after some rounds is what gets trained.
    const rng = createRng(4);
    for (const [name, t] of g) if (!isA(name)) for (let i = 0; i < t.data.length; i++) t.data[i] = 0.05 * rng.normal();
    return g;
  };

  it('onnx: keepOptimizerState (training.optimizer_scope run) continues the last task\'s AdamW within a run; otherwise every task starts afresh', async () => {
    // One step, no decay, no clipping: a fresh AdamW's first step moves every entry with a gradient by lr * |g| / (|g| + eps),
    // i.e. by lr where |g| >> eps. A continued one (its second step: moments of two gradients) moves most entries by other amounts.
    const lr = 2e-2;
    const s = (keep: boolean) => spec({ steps: 1, lr, weightDecay: 0, maxGradNorm: 0, keepOptimizerState: keep });
    const run = (runId: string, g: TensorMap, keep: boolean) => onnx.train({ taskId: 't', runId, round: 0, globalAdapter: g, spec: s(keep), onProgress: () => {}, signal: new AbortController().signal });
    /** Share of the entries that moved whose move is not lr (beyond 1%). */
    const offLr = (from: TensorMap, to: TensorMap): number => {
      let moved = 0;
      let off = 0;
      for (const [name, t] of to) {
        const f = from.get(name)!.data;
        for (let i = 0; i < t.data.length; i++) {
          const d = Math.abs(t.data[i]! - f[i]!);
          if (d === 0) continue;
          moved++;
          if (Math.abs(d - lr) > 0.01 * lr) off++;
        }
      }
      expect(moved).toBeGreaterThan(100);
      return off / moved;
    };
    const g0 = await globalFor(4);
    const first = (await run('run-1', g0, true)).adapter;
    expect(offLr(g0, first)).toBeLessThan(0.01); // a fresh optimizer (the rare entries off are those whose |g| is near eps)
    const g1 = cloneTensorMap(first);
    const continued = (await run('run-1', g1, true)).adapter;
    expect(offLr(g1, continued)).toBeGreaterThan(0.2);
    // The same task without keeping, or in another run, or after a task that did not keep: a fresh optimizer.
    expect(offLr(g1, (await run('run-1', g1, false)).adapter)).toBeLessThan(0.01);
    expect(offLr(g1, (await run('run-1', g1, true)).adapter)).toBeLessThan(0.01);
    await run('run-1', g1, true);
    expect(offLr(g1, (await run('run-2', g1, true)).adapter)).toBeLessThan(0.01);
  });

  it('onnx: freeze_lora_a returns every lora_A unchanged and trains lora_B; prox_mu adds a prox_loss metric', async () => {
    const global = await globalFor(4);
    const sent = cloneTensorMap(global);
    const frozen = await train(onnx, global, spec({ freezeLoraA: true }));
    expectFrozenA(sent, frozen.adapter);
    const free = await train(onnx, global, spec());
    expect([...free.adapter].filter(([n, t]) => isA(n) && t.data.some((x, i) => x !== sent.get(n)!.data[i]!)).length).toBe(sent.size / 2);
    for (const [name, t] of sent) expect(Array.from(global.get(name)!.data)).toEqual(Array.from(t.data)); // the received adapter is not modified

    const prox = await train(onnx, global, spec({ proxMu: 1 }));
    expect(prox.metrics.prox_loss).toBeGreaterThan(0);
    expect(prox.metrics.train_loss).toBeGreaterThan(prox.metrics.prox_loss!);
    expect(free.metrics.prox_loss).toBeUndefined();
  });

  it('onnx: names prox_mu when it is invalid and the rank when the global adapter does not match spec.lora.r', async () => {
    const global = await globalFor(4);
    await expect(train(onnx, global, spec({ proxMu: -1 }))).rejects.toThrow(/prox_mu is -1/);
    await expect(train(onnx, global, spec({ proxMu: NaN }))).rejects.toThrow(/prox_mu is NaN/);
    await expect(train(onnx, global, spec({ lora: { ...lora, r: 8 } }))).rejects.toThrow(/global adapter has LoRA rank 4 .* lora\.r is 8/);
    const missing = cloneTensorMap(global);
    const dropped = [...missing.keys()].find((n) => !isA(n))!;
    missing.delete(dropped);
    await expect(train(onnx, missing, spec())).rejects.toThrow(new RegExp(`missing key ${dropped.replace(/\./g, '\\.')}`));
  });

  it('noop: freeze_lora_a leaves lora_A bit-identical while lora_B is perturbed; a bad prox_mu is refused', async () => {
    const noop = new NoopTrainer({ numTrainExamples: 8, numEvalExamples: 0 });
    const global = await globalFor(4);
    const out = await train(noop, global, spec({ freezeLoraA: true, steps: 1 }));
    let aSame = 0;
    let bMoved = 0;
    for (const [name, t] of global) {
      const d = out.adapter.get(name)!.data;
      if (isA(name)) aSame += d.every((x, i) => x === t.data[i]) ? 1 : 0;
      else bMoved += d.some((x, i) => x !== t.data[i]) ? 1 : 0;
    }
    expect(aSame).toBe(global.size / 2);
    expect(bMoved).toBe(global.size / 2);
    const plain = await train(noop, global, spec({ steps: 1 }));
    for (const [name, t] of plain.adapter) if (!isA(name)) expect(Array.from(t.data)).toEqual(Array.from(out.adapter.get(name)!.data)); // B as without the freeze
    await expect(train(noop, global, spec({ proxMu: Infinity, steps: 1 }))).rejects.toThrow(/prox_mu is Infinity/);
  });
});
