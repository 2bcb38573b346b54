/**
 * Shared engine types: the normalized model config every architecture is read
 * into, LoRA settings, and the token batches the engine trains on.
 */
import type { TensorMap } from './tensor.ts';

/** Graph family. `llama` covers llama, mistral, qwen2, qwen3, gemma2 and phi3 checkpoints. */
export type ArchFamily = 'llama' | 'gpt2';

export interface ModelConfig {
  family: ArchFamily;
  /** `model_type` from config.json: llama | mistral | qwen2 | qwen3 | gemma2 | phi3 | gpt2. */
  modelType: string;
  vocabSize: number;
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  maxPositions: number;
  normEps: number;
  /** Rotary base (llama family). */
  ropeTheta: number;
  tieWordEmbeddings: boolean;
  /** q/k/v projections carry biases (qwen2). */
  qkvBias: boolean;
  activation: 'silu' | 'gelu_new';
  /** Rotary scaling (llama family, `rope_scaling` in config.json); absent for plain rotary embeddings. */
  ropeScaling?: RopeScaling;
  /** o_proj carries a bias too (llama `attention_bias: true`, which also sets qkvBias). Absent means false. */
  attentionOutBias?: boolean;
  /** gate/up/down projections carry biases (llama `mlp_bias: true`). Absent means false. */
  mlpBias?: boolean;
  /**
   * Sliding-window attention (mistral `sliding_window`, qwen2 with `use_sliding_window`):
   * query i attends key j only when 0 <= i - j < size, in the listed layers.
   * Absent when every layer attends over the whole causal prefix.
   */
  slidingWindow?: { size: number; layers: number[] };
  /** phi3: one fused `qkv_proj` [q + 2 kv, hidden] and one `gate_up_proj` [2 intermediate, hidden] (gate first). */
  fusedProjections?: boolean;
  /** RMSNorm over each head of q and k before the rotary embedding (qwen3: `self_attn.q_norm` / `k_norm`, weight [head_dim]). */
  qkNorm?: boolean;
  /**
   * gemma2: RMSNorm scales by (1 + weight), embeddings are multiplied by
   * sqrt(hidden_size), pre- and post-norms around attention and MLP, scores
   * scaled by query_pre_attn_scalar^-0.5 and soft-capped (cap · tanh(s / cap)),
   * logits soft-capped; the MLP's activation is `activation` (gelu tanh).
   */
  gemma2?: { queryPreAttnScalar: number; attnLogitSoftcap: number | null; finalLogitSoftcap: number | null };
  /** gpt2 `scale_attn_weights: false`: scores are not divided by sqrt(head_dim). Absent means true. */
  scaleAttnWeights?: boolean;
  /** gpt2 `scale_attn_by_inverse_layer_idx: true`: scores of layer l are also divided by l + 1. Absent means false. */
  scaleAttnByInverseLayerIdx?: boolean;
  bosTokenId: number | null;
  eosTokenId: number | null;
}

/**
 * Rotary frequency scaling as Hugging Face's rope_scaling types define it
 * (transformers modeling_rope_utils): the inverse frequencies, and for yarn an
 * attention factor that multiplies cos and sin.
 */
export type RopeScaling =
  | { type: 'linear'; factor: number }
  /** NTK-aware base change, active when the sequence exceeds originalMaxPositions. */
  | { type: 'dynamic'; factor: number; originalMaxPositions: number }
  | { type: 'llama3'; factor: number; lowFreqFactor: number; highFreqFactor: number; originalMaxPositions: number }
  | {
      type: 'yarn';
      factor: number;
      originalMaxPositions: number;
      betaFast: number;
      betaSlow: number;
      /** Multiplies cos and sin (given, or derived from factor / mscale / mscale_all_dim). */
      attentionFactor: number;
      truncate: boolean;
    }
  /**
   * Phi-3 LongRoPE: inv_freq[i] = theta^(-2i/hd) / ext[i] with ext = shortFactor while the
   * sequence fits originalMaxPositions, longFactor beyond; cos and sin times attentionFactor.
   */
  | { type: 'longrope'; shortFactor: number[]; longFactor: number[]; originalMaxPositions: number; attentionFactor: number };

export interface LoadedModel {
  dir: string;
  config: ModelConfig;
  /**
   * Base weights in float32 under canonical Hugging Face names: llama family as
   * saved by *ForCausalLM (`model.layers.0.self_attn.q_proj.weight` [out, in], ...);
   * gpt2 with the `transformer.` prefix (`transformer.h.0.attn.c_attn.weight`
   * [in, out], Conv1D layout). `lm_head.weight` is absent when embeddings are tied.
   */
  weights: TensorMap;
  /** sha256 hex over config and weights: identifies the base model across machines. */
  fingerprint: string;
  /** config.json as read from disk, so that a saved model keeps every original field. */
  rawConfig?: Record<string, unknown>;
}

export interface LoraConfig {
  r: number;
  alpha: number;
  dropout: number;
  /** Module names: llama q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; phi3 qkv_proj o_proj gate_up_proj down_proj; gpt2 c_attn c_proj c_fc. */
  targetModules: string[];
  /** rsLoRA (Kalajdzievski 2023): scale alpha / sqrt(r) instead of alpha / r. PEFT's `use_rslora`. */
  useRslora?: boolean;
  /** DoRA (Liu et al. 2024): weight-decomposed LoRA with a trained magnitude vector. PEFT's `use_dora`. */
  useDora?: boolean;
  /** PEFT `rank_pattern`: module-name pattern -> rank, overriding `r` for the modules it matches. */
  rankPattern?: Record<string, number>;
  /** PEFT `alpha_pattern`: module-name pattern -> alpha, overriding `alpha` for the modules it matches. */
  alphaPattern?: Record<string, number>;
  /** PEFT `layers_to_transform`: the layer indices that get adapters (absent: every layer). */
  layersToTransform?: number[];
  /** PEFT `layers_pattern`: the name(s) of the layer list `layers_to_transform` indexes ("layers", "h"). */
  layersPattern?: string[];
}

export const LLAMA_TARGET_MODULES = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
export const GPT2_TARGET_MODULES = ['c_attn', 'c_proj', 'c_fc'] as const;
export const PHI3_TARGET_MODULES = ['qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj'] as const;

/**
 * A padded batch of token sequences, row-major [batchSize, seqLen].
 * `labels` is aligned with `inputIds` as in Hugging Face (not shifted): the
 * engine predicts labels[t + 1] from position t. -100 marks prompt and padding
 * tokens, which carry no loss.
 */
export interface Batch {
  batchSize: number;
  seqLen: number;
  inputIds: Int32Array;
  labels: Int32Array;
}

export const IGNORE_INDEX = -100;
