/**
 * In-memory random models for engine tests (no files): weights N(0, std) with
 * norms around 1, so that gradients are far from zero everywhere.
 */
import type { Batch, LoadedModel, ModelConfig } from '../../common/model-config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { createRng } from '../../common/random.ts';

export function randomConfig(modelType: 'llama' | 'qwen2' | 'mistral' | 'gpt2', over: Partial<ModelConfig> = {}): ModelConfig {
  const gpt2 = modelType === 'gpt2';
  const c: ModelConfig = {
    family: gpt2 ? 'gpt2' : 'llama',
    modelType,
    vocabSize: 40,
    hiddenSize: 16,
    intermediateSize: gpt2 ? 64 : 24,
    numLayers: 2,
    numHeads: 4,
    numKvHeads: gpt2 ? 4 : 2,
    headDim: 4,
    maxPositions: 64,
    normEps: 1e-5,
    ropeTheta: 10000,
    tieWordEmbeddings: gpt2 || modelType === 'qwen2',
    qkvBias: modelType === 'qwen2',
    activation: gpt2 ? 'gelu_new' : 'silu',
    bosTokenId: null,
    eosTokenId: null,
    ...over,
  };
  c.headDim = over.headDim ?? c.hiddenSize / c.numHeads;
  return c;
}

export function randomModel(config: ModelConfig, seed = 1, std = 0.2): LoadedModel {
  const rng = createRng(seed);
  const w: TensorMap = new Map();
  const add = (name: string, shape: number[], kind: 'normal' | 'norm' | 'bias' = 'normal') => {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      data[i] = kind === 'norm' ? 1 + 0.1 * rng.normal() : kind === 'bias' ? 0.05 * rng.normal() : std * rng.normal();
    }
    w.set(name, { shape, data });
  };
  const { hiddenSize: H, intermediateSize: I, vocabSize: V, numHeads: nh, numKvHeads: nkv, headDim: hd } = config;
  if (config.family === 'llama') {
    add('model.embed_tokens.weight', [V, H]);
    for (let l = 0; l < config.numLayers; l++) {
      const p = `model.layers.${l}`;
      add(`${p}.input_layernorm.weight`, [H], 'norm');
      add(`${p}.self_attn.q_proj.weight`, [nh * hd, H]);
      add(`${p}.self_attn.k_proj.weight`, [nkv * hd, H]);
      add(`${p}.self_attn.v_proj.weight`, [nkv * hd, H]);
      if (config.qkvBias) {
        add(`${p}.self_attn.q_proj.bias`, [nh * hd], 'bias');
        add(`${p}.self_attn.k_proj.bias`, [nkv * hd], 'bias');
        add(`${p}.self_attn.v_proj.bias`, [nkv * hd], 'bias');
      }
      add(`${p}.self_attn.o_proj.weight`, [H, nh * hd]);
      add(`${p}.post_attention_layernorm.weight`, [H], 'norm');
      add(`${p}.mlp.gate_proj.weight`, [I, H]);
      add(`${p}.mlp.up_proj.weight`, [I, H]);
      add(`${p}.mlp.down_proj.weight`, [H, I]);
    }
    add('model.norm.weight', [H], 'norm');
    if (!config.tieWordEmbeddings) add('lm_head.weight', [V, H]);
  } else {
    add('transformer.wte.weight', [V, H]);
    add('transformer.wpe.weight', [config.maxPositions, H]);
    for (let l = 0; l < config.numLayers; l++) {
      const p = `transformer.h.${l}`;
      add(`${p}.ln_1.weight`, [H], 'norm');
      add(`${p}.ln_1.bias`, [H], 'bias');
      add(`${p}.attn.c_attn.weight`, [H, 3 * H]);
      add(`${p}.attn.c_attn.bias`, [3 * H], 'bias');
      add(`${p}.attn.c_proj.weight`, [H, H]);
      add(`${p}.attn.c_proj.bias`, [H], 'bias');
      add(`${p}.ln_2.weight`, [H], 'norm');
      add(`${p}.ln_2.bias`, [H], 'bias');
      add(`${p}.mlp.c_fc.weight`, [H, I]);
      add(`${p}.mlp.c_fc.bias`, [I], 'bias');
      add(`${p}.mlp.c_proj.weight`, [I, H]);
      add(`${p}.mlp.c_proj.bias`, [H], 'bias');
    }
    add('transformer.ln_f.weight', [H], 'norm');
    add('transformer.ln_f.bias', [H], 'bias');
  }
  return { dir: `<random ${config.modelType}>`, config, weights: w, fingerprint: `random-${config.modelType}-${seed}` };
}

/** B random sequences of T tokens trained on themselves, the first token of each carrying no loss. */
export function randomBatch(vocab: number, B: number, T: number, seed: number): Batch {
  const rng = createRng(seed);
  const inputIds = Int32Array.from({ length: B * T }, () => rng.int(vocab));
  const labels = Int32Array.from(inputIds);
  for (let b = 0; b < B; b++) labels[b * T] = -100;
  return { batchSize: B, seqLen: T, inputIds, labels };
}
