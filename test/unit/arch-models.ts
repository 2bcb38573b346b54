/**
 * Tiny random models for the architecture tests: config.json objects with the
 * real fields of each model_type, and weights drawn so that every term
 * matters (norm weights away from 1, non-zero biases).
 */
import type { ModelConfig } from '../../common/model-config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { numel } from '../../common/tensor.ts';
import { expectedWeightShapes } from '../../common/hf-model.ts';
import { createRng } from '../../common/random.ts';

export function archRaw(modelType: 'llama' | 'mistral' | 'qwen2' | 'qwen3' | 'gemma2' | 'phi3' | 'gpt2', over: Record<string, unknown> = {}): Record<string, unknown> {
  if (modelType === 'gpt2') {
    return { model_type: 'gpt2', vocab_size: 40, n_embd: 16, n_head: 2, n_layer: 2, n_positions: 32, layer_norm_epsilon: 1e-5, ...over };
  }
  return {
    model_type: modelType,
    vocab_size: 40,
    hidden_size: 32,
    intermediate_size: 24,
    num_hidden_layers: 2,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    max_position_embeddings: 64,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    tie_word_embeddings: false,
    ...over,
  };
}

export function archModel(config: ModelConfig, seed: number): TensorMap {
  const rng = createRng(seed);
  const w: TensorMap = new Map();
  for (const [name, shape] of expectedWeightShapes(config)) {
    const data = new Float32Array(numel(shape));
    const isNorm = /(layernorm|norm|ln_\d|ln_f)\.weight$/.test(name);
    for (let i = 0; i < data.length; i++) data[i] = isNorm ? 1 + 0.3 * rng.normal() : name.endsWith('.bias') ? 0.3 * rng.normal() : 0.3 * rng.normal();
    w.set(name, { shape: [...shape], data });
  }
  return w;
}

export function randomIds(vocab: number, B: number, T: number, seed: number): number[][] {
  const rng = createRng(seed);
  return Array.from({ length: B }, () => Array.from({ length: T }, () => rng.int(vocab)));
}

/** gemma2 with the fields Gemma 2 2B ships (soft-capping 50 / 30, query_pre_attn_scalar, a sliding window on alternating layers), at tiny size. */
export function gemma2As2B(): Record<string, unknown> {
  return archRaw('gemma2', {
    num_hidden_layers: 3,
    head_dim: 16,
    hidden_activation: 'gelu_pytorch_tanh',
    query_pre_attn_scalar: 24,
    attn_logit_softcapping: 50.0,
    final_logit_softcapping: 30.0,
    sliding_window: 4,
    tie_word_embeddings: true,
  });
}
