/**
 * DP-SGD's per-example gradients in the training graph (worker/engine/model-graph.ts,
 * batched MatMul over per-example copies of the adapters) against per-example
 * gradients computed one example at a time through the ordinary training graph
 * (batch of 1, summed-loss gradient divided by the example's trained tokens), in
 * float64: norms to 1e-6, clipping factors, the clipped sum, and clipped norms <= C.
 */
import { describe, expect, it } from 'vitest';
import { Engine } from '../../worker/engine/engine.ts';
import type { Batch, LoraConfig } from '../../common/model-config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { createRng } from '../../common/random.ts';
import { l2Norm } from '../../common/privacy/noise.ts';
import { randomConfig, randomModel } from '../helpers/random-model.ts';

function randomBatch(vocab: number, B: number, T: number, seed: number): Batch {
  const rng = createRng(seed);
  const inputIds = Int32Array.from({ length: B * T }, () => rng.int(vocab));
  const labels = Int32Array.from(inputIds);
  for (let b = 0; b < B; b++) {
    // Prompts of different lengths, right padding on some rows, one row with no trained token.
    const prompt = 1 + (b % 3);
    for (let t = 0; t < prompt; t++) labels[b * T + t] = -100;
    if (b % 2 === 1) for (let t = T - 1 - b; t < T; t++) labels[b * T + t] = -100;
    if (b === B - 1) for (let t = 0; t < T; t++) labels[b * T + t] = -100;
  }
  return { batchSize: B, seqLen: T, inputIds, labels };
}

function row(batch: Batch, b: number): Batch {
  const T = batch.seqLen;
  return { batchSize: 1, seqLen: T, inputIds: batch.inputIds.slice(b * T, (b + 1) * T), labels: batch.labels.slice(b * T, (b + 1) * T) };
}

function withRandomB(params: TensorMap, seed: number): TensorMap {
  const rng = createRng(seed);
  for (const [name, t] of params) if (name.endsWith('lora_B.weight')) for (let i = 0; i < t.data.length; i++) t.data[i] = 0.3 * rng.normal();
  return params;
}

const MODULES: Record<string, string[]> = {
  llama: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  gpt2: ['c_attn', 'c_proj', 'c_fc'],
};

/** Per-example gradients of the mean token loss, one example at a time. */
async function oneAtATime(engine: Engine, params: TensorMap, batch: Batch, keep: (n: string) => boolean): Promise<Array<Map<string, Float64Array>>> {
  const out: Array<Map<string, Float64Array>> = [];
  for (let b = 0; b < batch.batchSize; b++) {
    const r = await engine.lossAndGrads(params, row(batch, b));
    const m = new Map<string, Float64Array>();
    for (const [name, g] of r.grads) if (keep(name)) m.set(name, Float64Array.from(g.data, (x) => (r.tokens > 0 ? x / r.tokens : 0)));
    out.push(m);
  }
  return out;
}

describe('per-example gradients in the graph (float64)', () => {
  for (const arch of ['llama', 'gpt2'] as const) {
    it(`${arch}: norms, clipping and the clipped sum match one-at-a-time gradients`, async () => {
      const model = randomModel(randomConfig(arch));
      const lora: LoraConfig = { r: 3, alpha: 6, dropout: 0, targetModules: MODULES[arch]! };
      const engine = Engine.create(model, { mode: 'lora', lora, dtype: 'float64', threads: 1 });
      const params = withRandomB(engine.initParams(3), 4);
      const batch = randomBatch(model.config.vocabSize, 5, 8, 5);
      const ref = await oneAtATime(engine, params, batch, () => true);
      const refNorms = ref.map((m) => l2Norm([...m.values()]));
      // A clip norm between the smallest and largest non-zero norm, so that some examples are clipped and some not.
      const sorted = refNorms.filter((n) => n > 0).sort((a, b) => a - b);
      expect(sorted.length).toBe(4);
      const C = (sorted[1]! + sorted[2]!) / 2;
      const r = await engine.clippedGrads(params, batch, C, { outputClipped: true });
      expect(r.examples).toBe(4);
      for (let b = 0; b < batch.batchSize; b++) {
        expect(Math.abs(r.norms[b]! - refNorms[b]!)).toBeLessThanOrEqual(1e-6 * Math.max(1, refNorms[b]!));
      }
      expect(r.norms[batch.batchSize - 1]).toBe(0);
      // Clipped per-example gradients: factor min(1, C/norm) times the one-at-a-time gradient, norms <= C.
      let clippedCount = 0;
      for (let b = 0; b < batch.batchSize; b++) {
        const f = refNorms[b]! > C ? C / refNorms[b]! : 1;
        if (f < 1) clippedCount++;
        const parts: Float64Array[] = [];
        for (const [name, t] of r.clipped!) {
          const size = t.data.length / batch.batchSize;
          const mine = Float64Array.from(t.data.subarray(b * size, (b + 1) * size));
          parts.push(mine);
          const want = ref[b]!.get(name)!;
          for (let i = 0; i < size; i++) expect(Math.abs(mine[i]! - f * want[i]!)).toBeLessThan(1e-9);
        }
        expect(l2Norm(parts)).toBeLessThanOrEqual(C * (1 + 1e-12));
      }
      expect(clippedCount).toBe(2);
      // The summed output is the sum of the clipped per-example gradients.
      for (const [name, t] of r.grads) {
        for (let i = 0; i < t.data.length; i++) {
          let want = 0;
          for (let b = 0; b < batch.batchSize; b++) want += (refNorms[b]! > C ? C / refNorms[b]! : 1) * ref[b]!.get(name)![i]!;
          expect(Math.abs(t.data[i]! - want)).toBeLessThan(1e-9);
        }
      }
      // The loss is the sum of the examples' mean token losses.
      let lossWant = 0;
      for (let b = 0; b < batch.batchSize; b++) {
        const one = await engine.forward(params, row(batch, b));
        if (one.tokens > 0) lossWant += one.lossSum / one.tokens;
      }
      expect(r.lossSum).toBeCloseTo(lossWant, 10);
      await engine.close();
    });
  }

  it('frozen lora_A (FFA-LoRA) counts in neither the norms nor the sum', async () => {
    const model = randomModel(randomConfig('llama'));
    const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj', 'v_proj', 'down_proj'] };
    const engine = Engine.create(model, { mode: 'lora', lora, dtype: 'float64', threads: 1 });
    const params = withRandomB(engine.initParams(1), 2);
    const batch = randomBatch(model.config.vocabSize, 3, 8, 6);
    const isA = (n: string): boolean => n.endsWith('.lora_A.weight');
    const ref = await oneAtATime(engine, params, batch, (n) => !isA(n));
    const r = await engine.clippedGrads(params, batch, 1e9, { frozen: isA });
    for (let b = 0; b < batch.batchSize; b++) {
      const want = l2Norm([...ref[b]!.values()]);
      expect(Math.abs(r.norms[b]! - want)).toBeLessThanOrEqual(1e-6 * Math.max(1, want));
    }
    for (const [name, t] of r.grads) if (isA(name)) expect(t.data.every((x) => x === 0)).toBe(true);
    await engine.close();
  });

  it('full-parameter mode is refused by name', async () => {
    const model = randomModel(randomConfig('llama', { numLayers: 1 }));
    const engine = Engine.create(model, { mode: 'full', dtype: 'float64', threads: 1 });
    await expect(engine.clippedGrads(engine.initParams(0), randomBatch(model.config.vocabSize, 2, 8, 1), 1)).rejects.toThrow(/privacy\.dp_sgd.*full/);
    await engine.close();
  });
});
