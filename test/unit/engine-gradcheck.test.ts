/**
 * Gradient check: the gradients the ONNX training graph computes (reverse-mode
 * autodiff in worker/engine/graph.ts) against central finite differences of the
 * loss computed by the separate forward graph, in float64, for LoRA parameters
 * and (full mode) every weight, on tiny random llama, qwen2, mistral and gpt2 models.
 */
import { describe, expect, it } from 'vitest';
import { Engine } from '../../worker/engine/engine.ts';
import type { Batch, LoraConfig } from '../../common/model-config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { createRng } from '../../common/random.ts';
import { randomConfig, randomModel } from '../helpers/random-model.ts';
import { gradCheck } from '../helpers/gradcheck.ts';

function randomBatch(vocab: number, B: number, T: number, seed: number): Batch {
  const rng = createRng(seed);
  const inputIds = Int32Array.from({ length: B * T }, () => rng.int(vocab));
  const labels = Int32Array.from(inputIds);
  // Prompt tokens and right padding carry no loss.
  for (let b = 0; b < B; b++) {
    labels[b * T] = -100;
    labels[b * T + 1] = -100;
    if (b === 1) for (let t = T - 3; t < T; t++) labels[b * T + t] = -100;
  }
  return { batchSize: B, seqLen: T, inputIds, labels };
}

function withRandomB(params: TensorMap, seed: number): TensorMap {
  const rng = createRng(seed);
  for (const [name, t] of params) {
    if (name.endsWith('lora_B.weight')) for (let i = 0; i < t.data.length; i++) t.data[i] = 0.3 * rng.normal();
  }
  return params;
}

const LORA_ALL: Record<string, string[]> = {
  llama: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  gpt2: ['c_attn', 'c_proj', 'c_fc'],
};

describe('gradient check (float64, central differences)', () => {
  for (const arch of ['llama', 'qwen2', 'mistral', 'gpt2'] as const) {
    it(`${arch}: LoRA on every target module`, async () => {
      const model = randomModel(randomConfig(arch));
      const lora: LoraConfig = { r: 3, alpha: 6, dropout: 0, targetModules: LORA_ALL[arch === 'gpt2' ? 'gpt2' : 'llama']! };
      const engine = Engine.create(model, { mode: 'lora', lora, dtype: 'float64', threads: 1 });
      const params = withRandomB(engine.initParams(7), 8);
      const { worst, checked } = await gradCheck(engine, params, randomBatch(model.config.vocabSize, 2, 8, 9), 10);
      expect(checked).toBe(params.size);
      expect(params.size).toBe(2 * model.config.numLayers * (arch === 'gpt2' ? 4 : 7));
      expect(worst).toBeLessThan(1e-6);
      await engine.close();
    });

    it(`${arch}: full fine-tuning, every weight`, async () => {
      const model = randomModel(randomConfig(arch, { numLayers: 1 }));
      const engine = Engine.create(model, { mode: 'full', dtype: 'float64', threads: 1 });
      const params = engine.initParams(0);
      const { worst, checked } = await gradCheck(engine, params, randomBatch(model.config.vocabSize, 2, 8, 11), 12);
      expect(checked).toBe(model.weights.size);
      expect(worst).toBeLessThan(1e-6);
      await engine.close();
    });
  }

  it('gradients of the summed loss add up over micro-batches (distributed steps rely on it)', async () => {
    const model = randomModel(randomConfig('llama'));
    const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj', 'v_proj'] };
    const engine = Engine.create(model, { mode: 'lora', lora, dtype: 'float64', threads: 1 });
    const params = withRandomB(engine.initParams(1), 2);
    const whole = randomBatch(model.config.vocabSize, 2, 8, 3);
    const half = (b: number): Batch => ({
      batchSize: 1,
      seqLen: 8,
      inputIds: whole.inputIds.slice(b * 8, b * 8 + 8),
      labels: whole.labels.slice(b * 8, b * 8 + 8),
    });
    const all = await engine.lossAndGrads(params, whole);
    const a = await engine.lossAndGrads(params, half(0));
    const b = await engine.lossAndGrads(params, half(1));
    expect(a.tokens + b.tokens).toBe(all.tokens);
    expect(a.lossSum + b.lossSum).toBeCloseTo(all.lossSum, 10);
    for (const [name, g] of all.grads) {
      const ga = a.grads.get(name)!.data;
      const gb = b.grads.get(name)!.data;
      for (let i = 0; i < g.data.length; i++) expect(Math.abs(ga[i]! + gb[i]! - g.data[i]!)).toBeLessThan(1e-10);
    }
    await engine.close();
  });
});
