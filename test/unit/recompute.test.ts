/**
 * Recompute (gradient checkpointing per decoder layer, GraphSpec.recompute):
 * the training graph that re-runs each layer's forward in the backward pass
 * gives the same loss and gradients as the graph that keeps every activation,
 * in float64 to 1e-10, for every architecture, LoRA on every target module,
 * DoRA, LoRA dropout (masks replayed, not redrawn), a 4-bit base, full
 * fine-tuning and the DP-SGD per-example graph. The graph itself must hold the recomputed copy:
 * each layer's ops appear twice, behind a barrier that depends on the
 * incoming gradient.
 */
import { describe, expect, it } from 'vitest';
import { Engine, type EngineOptions } from '../../worker/engine/engine.ts';
import { buildCausalLmGraph } from '../../worker/engine/model-graph.ts';
import { ModelProto } from '../../worker/engine/onnx/gen/onnx.ts';
import type { Batch, LoadedModel, LoraConfig } from '../../common/model-config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { computeFingerprint, normalizeConfig } from '../../common/hf-model.ts';
import { createRng } from '../../common/random.ts';
import { archModel, archRaw, randomIds } from './arch-models.ts';
import { quantizeModel } from '../../worker/engine/quantize.ts';

type Arch = 'llama' | 'mistral' | 'qwen2' | 'qwen3' | 'gemma2' | 'phi3' | 'gpt2';

function model(arch: Arch, over: Record<string, unknown> = {}): LoadedModel {
  const extra: Record<string, unknown> = arch === 'mistral' || arch === 'gemma2' ? { sliding_window: 4 } : {};
  const config = normalizeConfig(archRaw(arch, { ...extra, ...over }), 'recompute-test');
  const weights = archModel(config, 3);
  return { dir: '(memory)', config, weights, fingerprint: computeFingerprint(config, weights) };
}

function batchOf(vocab: number, B: number, T: number, seed: number): Batch {
  const ids = randomIds(vocab, B, T, seed).flat();
  const labels = Int32Array.from(ids);
  labels[0] = -100;
  labels[T] = -100;
  labels[2 * T - 1] = -100;
  return { batchSize: B, seqLen: T, inputIds: Int32Array.from(ids), labels };
}

const TARGETS: Record<Arch, string[]> = {
  llama: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  mistral: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  qwen2: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  qwen3: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  gemma2: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  phi3: ['qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj'],
  gpt2: ['c_attn', 'c_proj', 'c_fc'],
};

/** B = 0 after PEFT's init would make every A gradient zero: draw it instead. */
function randomized(params: TensorMap, seed: number): TensorMap {
  const rng = createRng(seed);
  for (const [name, t] of params) {
    if (name.includes('lora_B')) for (let i = 0; i < t.data.length; i++) t.data[i] = 0.3 * rng.normal();
  }
  return params;
}

/** max |a - b| / max(1, max |b|) over every gradient, and the number of gradients compared. */
function worstDiff(a: TensorMap, b: TensorMap): { worst: number; compared: number; scale: number } {
  let worst = 0;
  let scale = 0;
  let compared = 0;
  for (const [name, tb] of b) {
    const ta = a.get(name);
    if (!ta) throw new Error(`recompute graph has no gradient for ${name}`);
    let m = 0;
    let d = 0;
    for (let i = 0; i < tb.data.length; i++) {
      m = Math.max(m, Math.abs(tb.data[i]!));
      d = Math.max(d, Math.abs(ta.data[i]! - tb.data[i]!));
    }
    scale = Math.max(scale, m);
    worst = Math.max(worst, d / Math.max(1, m));
    compared++;
  }
  return { worst, compared, scale };
}

async function compare(m: LoadedModel, opts: EngineOptions, batch: Batch): Promise<{ worst: number; compared: number; scale: number; loss: [number, number] }> {
  const plain = Engine.create(m, { ...opts, dtype: 'float64', threads: 1 });
  const rec = Engine.create(m, { ...opts, dtype: 'float64', threads: 1, recompute: true });
  try {
    const params = randomized(plain.initParams(5), 6);
    const a = await rec.lossAndGrads(params, batch);
    const b = await plain.lossAndGrads(params, batch);
    return { ...worstDiff(a.grads, b.grads), loss: [a.lossSum, b.lossSum] };
  } finally {
    await plain.close();
    await rec.close();
  }
}

describe('recompute: gradients equal to the graph that keeps activations (float64, 1e-10)', () => {
  for (const arch of ['llama', 'mistral', 'qwen2', 'qwen3', 'gemma2', 'phi3', 'gpt2'] as const) {
    it(`${arch}: LoRA on every target module`, async () => {
      const m = model(arch);
      const lora: LoraConfig = { r: 3, alpha: 6, dropout: 0, targetModules: TARGETS[arch] };
      const r = await compare(m, { mode: 'lora', lora }, batchOf(m.config.vocabSize, 2, 8, 1));
      expect(r.compared).toBe(m.config.numLayers * (TARGETS[arch].length + (arch === 'gpt2' ? 1 : 0)) * 2); // gpt2: c_proj names attn.c_proj and mlp.c_proj
      expect(r.scale).toBeGreaterThan(1e-3); // gradients far from zero, so equality means something
      expect(r.worst).toBeLessThan(1e-10);
      expect(Math.abs(r.loss[0] - r.loss[1])).toBeLessThan(1e-10 * Math.abs(r.loss[1]));
    });
  }

  it('llama: DoRA', async () => {
    const m = model('llama');
    const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj', 'v_proj', 'down_proj'], useDora: true };
    const r = await compare(m, { mode: 'lora', lora }, batchOf(m.config.vocabSize, 2, 8, 2));
    expect(r.compared).toBe(m.config.numLayers * 3 * 3);
    expect(r.worst).toBeLessThan(1e-10);
  });

  it('llama and gpt2: LoRA dropout 0.3 (the recomputed layer reuses the forward masks)', async () => {
    for (const arch of ['llama', 'gpt2'] as const) {
      const m = model(arch);
      const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0.3, targetModules: TARGETS[arch] };
      const r = await compare(m, { mode: 'lora', lora, seed: 11 }, batchOf(m.config.vocabSize, 2, 8, 3));
      expect(r.scale).toBeGreaterThan(1e-3);
      expect(r.worst).toBeLessThan(1e-10);
    }
  });

  it('LoRA dropout applies on the first layer too, whose input needs no gradient', async () => {
    // ONNX Runtime removes a Dropout whose mask nothing reads; on layer 0 the backward pass reads none.
    const m = model('llama', { num_hidden_layers: 1 });
    const batch = batchOf(m.config.vocabSize, 2, 8, 7);
    const loss = async (dropout: number): Promise<number> => {
      const e = Engine.create(m, { mode: 'lora', lora: { r: 2, alpha: 4, dropout, targetModules: ['q_proj'] }, dtype: 'float64', threads: 1, seed: 3 });
      const r = await e.lossAndGrads(randomized(e.initParams(5), 6), batch);
      await e.close();
      return r.lossSum;
    };
    const [off, on] = [await loss(0), await loss(0.5)];
    expect(Math.abs(on - off)).toBeGreaterThan(1e-6 * Math.abs(off));
  });

  it('llama and gpt2: 4-bit base weights (nf4), dequantised again in the recomputed layer', async () => {
    for (const arch of ['llama', 'gpt2'] as const) {
      const m = quantizeModel(model(arch), 'nf4');
      const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: TARGETS[arch] };
      const r = await compare(m, { mode: 'lora', lora, quantizeBase: 'nf4' }, batchOf(m.config.vocabSize, 2, 8, 8));
      expect(r.scale).toBeGreaterThan(1e-3);
      expect(r.worst).toBeLessThan(1e-10);
    }
  });

  it('llama and gpt2: full fine-tuning, every weight', async () => {
    for (const arch of ['llama', 'gpt2'] as const) {
      const m = model(arch, arch === 'gpt2' ? { n_layer: 2 } : {});
      const r = await compare(m, { mode: 'full' }, batchOf(m.config.vocabSize, 2, 8, 4));
      expect(r.compared).toBe(m.weights.size);
      expect(r.worst).toBeLessThan(1e-10);
    }
  });

  it('llama: DP-SGD per-example clipped gradients and norms', async () => {
    const m = model('llama');
    const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj', 'v_proj', 'up_proj'] };
    const batch = batchOf(m.config.vocabSize, 2, 8, 5);
    const plain = Engine.create(m, { mode: 'lora', lora, dtype: 'float64', threads: 1 });
    const rec = Engine.create(m, { mode: 'lora', lora, dtype: 'float64', threads: 1, recompute: true });
    const params = randomized(plain.initParams(5), 6);
    const a = await rec.clippedGrads(params, batch, 0.05);
    const b = await plain.clippedGrads(params, batch, 0.05);
    expect(worstDiff(a.grads, b.grads).worst).toBeLessThan(1e-10);
    expect(b.norms[0]).toBeGreaterThan(0.05); // clipping is active
    for (let i = 0; i < 2; i++) expect(Math.abs(a.norms[i]! - b.norms[i]!)).toBeLessThan(1e-10 * b.norms[i]!);
    await plain.close();
    await rec.close();
  });
});

describe('recompute: the graph', () => {
  const opTypes = (bytes: Uint8Array): string[] => ModelProto.decode(bytes).graph!.node.map((n) => n.opType);
  const count = (ops: string[], t: string): number => ops.filter((o) => o === t).length;

  it('re-emits each layer behind a gradient-dependent barrier; forward graphs are unchanged', () => {
    const m = model('llama', { num_hidden_layers: 3 });
    const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj', 'v_proj'] };
    const spec = { batchSize: 1, seqLen: 8, mode: 'lora' as const, lora, dtype: 'float32' as const };
    const plain = opTypes(buildCausalLmGraph(m, { ...spec, kind: 'train' }).bytes);
    const rec = opTypes(buildCausalLmGraph(m, { ...spec, kind: 'train', recompute: true }).bytes);
    // One Softmax per layer in the forward, one more per layer in the recomputation.
    expect(count(plain, 'Softmax')).toBe(3);
    expect(count(rec, 'Softmax')).toBe(6);
    // Per layer a barrier on one element of the incoming gradient (Slice), and (layers 1 and 2, whose
    // input gradient flows on) one element of each adapter gradient the layer computes.
    expect(count(plain, 'Slice')).toBe(0);
    expect(count(rec, 'Slice')).toBe(3 + 2 * 4);
    const fwd = buildCausalLmGraph(m, { ...spec, kind: 'forward' }).bytes;
    const fwdRec = buildCausalLmGraph(m, { ...spec, kind: 'forward', recompute: true }).bytes;
    expect(Buffer.from(fwdRec).equals(Buffer.from(fwd))).toBe(true);
  });
});
