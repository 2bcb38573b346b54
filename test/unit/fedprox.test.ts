/**
 * FedProx in the local training loop: the gradient the optimizer receives is
 * that of (mean token loss + mu/2 * ||w - anchor||^2), checked against central
 * finite differences of that objective computed from the engine's separate
 * forward graph (float64, tiny random models); the reported loss includes the
 * proximal term; a large mu keeps the trained adapter near the anchor.
 */
import { describe, expect, it } from 'vitest';
import { Engine } from '../../worker/engine/engine.ts';
import { trainLoop, type StepInfo } from '../../worker/engine/train.ts';
import { AdamW } from '../../common/optim.ts';
import type { Batch, LoraConfig } from '../../common/model-config.ts';
import { cloneTensorMap, type TensorMap } from '../../common/tensor.ts';
import { createRng } from '../../common/random.ts';
import { randomConfig, randomModel } from '../helpers/random-model.ts';

function randomBatch(vocab: number, B: number, T: number, seed: number): Batch {
  const rng = createRng(seed);
  const inputIds = Int32Array.from({ length: B * T }, () => rng.int(vocab));
  const labels = Int32Array.from(inputIds);
  for (let b = 0; b < B; b++) labels[b * T] = -100; // a prompt token without loss
  return { batchSize: B, seqLen: T, inputIds, labels };
}

function withRandomB(params: TensorMap, seed: number): TensorMap {
  const rng = createRng(seed);
  for (const [name, t] of params) {
    if (name.endsWith('lora_B.weight')) for (let i = 0; i < t.data.length; i++) t.data[i] = 0.3 * rng.normal();
  }
  return params;
}

/** A copy of `m` moved by N(0, std) per element: an anchor away from the current point. */
function jitter(m: TensorMap, std: number, seed: number): TensorMap {
  const rng = createRng(seed);
  const out = cloneTensorMap(m);
  for (const t of out.values()) for (let i = 0; i < t.data.length; i++) t.data[i]! += std * rng.normal();
  return out;
}

/** Records the gradients trainLoop hands to the optimizer. */
class RecordingAdamW extends AdamW {
  readonly seen: TensorMap[] = [];
  override step(params: TensorMap, grads: TensorMap, lr?: number): void {
    this.seen.push(cloneTensorMap(grads));
    super.step(params, grads, lr);
  }
}

function squaredDistance(a: TensorMap, b: TensorMap): number {
  let s = 0;
  for (const [name, t] of a) {
    const u = b.get(name)!.data;
    for (let i = 0; i < t.data.length; i++) s += (t.data[i]! - u[i]!) ** 2;
  }
  return s;
}

const LORA: LoraConfig = { r: 3, alpha: 6, dropout: 0, targetModules: ['q_proj', 'v_proj', 'down_proj'] };

describe('FedProx proximal term (float64, central differences)', () => {
  for (const arch of ['llama', 'gpt2'] as const) {
    it(`${arch}: the step gradient is the gradient of mean loss + mu/2 ||w - anchor||^2 over accumulated micro-batches`, async () => {
      const model = randomModel(randomConfig(arch));
      const lora: LoraConfig = arch === 'gpt2' ? { ...LORA, targetModules: ['c_attn', 'c_fc'] } : LORA;
      const engine = Engine.create(model, { mode: 'lora', lora, dtype: 'float64', threads: 1 });
      const start = withRandomB(engine.initParams(3), 4);
      const anchor = jitter(start, 0.2, 5);
      const batches = [randomBatch(model.config.vocabSize, 2, 8, 6), randomBatch(model.config.vocabSize, 1, 6, 7)];
      const mu = 0.7;

      const params = cloneTensorMap(start);
      const optimizer = new RecordingAdamW({ lr: 1e-3 });
      const steps: StepInfo[] = [];
      await trainLoop({
        engine,
        params,
        epochBatches: () => batches,
        steps: 1,
        gradAccumulation: 2,
        optimizer,
        schedule: { kind: 'constant', baseLr: 1e-3, warmupSteps: 0, totalSteps: 1 },
        maxGradNorm: 0, // no clipping: the raw gradient reaches the optimizer
        proximal: { mu, anchor },
        onStep: (s) => steps.push(s),
      });
      const grads = optimizer.seen[0]!;
      expect([...grads.keys()]).toEqual([...start.keys()]);

      // The objective, computed independently of the training graph.
      const objective = async (w: TensorMap): Promise<{ task: number; prox: number }> => {
        let lossSum = 0;
        let tokens = 0;
        for (const b of batches) {
          const r = await engine.forward(w, b);
          lossSum += r.lossSum;
          tokens += r.tokens;
        }
        return { task: lossSum / tokens, prox: (mu / 2) * squaredDistance(w, anchor) };
      };
      const at = await objective(start);
      expect(at.prox).toBeGreaterThan(0.05 * at.task); // the term is big enough to matter in the check
      expect(steps[0]!.proxLoss).toBeCloseTo(at.prox, 10);
      expect(steps[0]!.loss).toBeCloseTo(at.task + at.prox, 10);

      const rng = createRng(8);
      const h = 1e-4;
      let worst = 0;
      let worstWithoutProx = 0;
      for (const [name, p] of start) {
        const g = grads.get(name)!.data;
        const v = Float64Array.from({ length: p.data.length }, () => rng.normal());
        const norm = Math.hypot(...v);
        let analytic = 0;
        let proxPart = 0;
        for (let i = 0; i < v.length; i++) {
          v[i]! /= norm;
          analytic += g[i]! * v[i]!;
          proxPart += mu * (p.data[i]! - anchor.get(name)!.data[i]!) * v[i]!;
        }
        const shifted = (sign: number): TensorMap => {
          const m: TensorMap = new Map(start);
          m.set(name, { shape: p.shape, data: Float64Array.from(p.data, (x, i) => x + sign * h * v[i]!) });
          return m;
        };
        const plus = await objective(shifted(1));
        const minus = await objective(shifted(-1));
        const numeric = (plus.task + plus.prox - (minus.task + minus.prox)) / (2 * h);
        const scale = Math.max(Math.abs(analytic), Math.abs(numeric), 1e-3);
        worst = Math.max(worst, Math.abs(analytic - numeric) / scale);
        worstWithoutProx = Math.max(worstWithoutProx, Math.abs(analytic - proxPart - numeric) / scale);
      }
      console.log(`${arch} FedProx gradient check: worst relative error ${worst.toExponential(2)}, ${worstWithoutProx.toExponential(2)} with the proximal part left out`);
      expect(worst).toBeLessThan(1e-6);
      // The same check fails without the proximal part: it is really being measured.
      expect(worstWithoutProx).toBeGreaterThan(1e-2);
      await engine.close();
    });
  }

  it('mu = 0 gives exactly the plain step; a large mu keeps the trained adapter measurably closer to the anchor', async () => {
    const model = randomModel(randomConfig('llama'));
    const engine = Engine.create(model, { mode: 'lora', lora: LORA, dtype: 'float64', threads: 1 });
    const start = withRandomB(engine.initParams(11), 12);
    const batches = [0, 1, 2, 3].map((k) => randomBatch(model.config.vocabSize, 2, 10, 20 + k));
    const steps = 30;
    const train = async (proximal?: { mu: number; anchor: TensorMap }) => {
      const params = cloneTensorMap(start);
      const result = await trainLoop({
        engine,
        params,
        epochBatches: () => batches,
        steps,
        gradAccumulation: 1,
        optimizer: new AdamW({ lr: 1e-2 }),
        schedule: { kind: 'constant', baseLr: 1e-2, warmupSteps: 0, totalSteps: steps },
        maxGradNorm: 1,
        ...(proximal ? { proximal } : {}),
      });
      return { params, result, distance: Math.sqrt(squaredDistance(params, start)) };
    };
    const plain = await train();
    const zero = await train({ mu: 0, anchor: cloneTensorMap(start) });
    const prox = await train({ mu: 10, anchor: cloneTensorMap(start) });

    for (const [name, t] of plain.params) expect(Array.from(zero.params.get(name)!.data)).toEqual(Array.from(t.data));
    expect(zero.result.proxLoss).toBe(0);
    expect(plain.distance).toBeGreaterThan(0.1);
    expect(prox.distance / plain.distance).toBeLessThan(0.5);
    // The mean objective reported includes the (positive) proximal term.
    expect(prox.result.proxLoss).toBeGreaterThan(0);
    expect(prox.result.meanLoss).toBeGreaterThan(prox.result.proxLoss);
    console.log(`FedProx distance to anchor after ${steps} steps: mu=0 ${plain.distance.toFixed(4)}, mu=10 ${prox.distance.toFixed(4)} (ratio ${(prox.distance / plain.distance).toFixed(3)})`);
    await engine.close();
  });

  it('names prox_mu when it is negative, NaN or infinite, and names a tensor the anchor lacks', async () => {
    const model = randomModel(randomConfig('llama', { numLayers: 1 }));
    const engine = Engine.create(model, { mode: 'lora', lora: LORA, dtype: 'float64', threads: 1 });
    const params = engine.initParams(1);
    const batches = [randomBatch(model.config.vocabSize, 1, 6, 2)];
    const run = (proximal: { mu: number; anchor: TensorMap }) =>
      trainLoop({
        engine,
        params: cloneTensorMap(params),
        epochBatches: () => batches,
        steps: 1,
        gradAccumulation: 1,
        optimizer: new AdamW({ lr: 1e-3 }),
        schedule: { kind: 'constant', baseLr: 1e-3, warmupSteps: 0, totalSteps: 1 },
        maxGradNorm: 1,
        proximal,
      });
    for (const mu of [-0.1, NaN, Infinity]) await expect(run({ mu, anchor: params })).rejects.toThrow(/prox_mu is .*expected a finite number >= 0/);
    const partial = cloneTensorMap(params);
    const dropped = [...partial.keys()][1]!;
    partial.delete(dropped);
    await expect(run({ mu: 0.1, anchor: partial })).rejects.toThrow(new RegExp(`anchor .* has no tensor ${dropped.replace(/\./g, '\\.')}`));
    await engine.close();
  });
});
