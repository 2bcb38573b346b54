/**
 * Shared engine types: the normalized model config every architecture is read
 * into, LoRA settings, and the token batches the engine trains on.
 */
import type { TensorMap } from './tensor.ts';

/** Graph family. `llama` covers llama, mistral and qwen2 checkpoints. */
export type ArchFamily = 'llama' | 'gpt2';

export interface ModelConfig {
  family: ArchFamily;
  /** `model_type` from config.json: llama | mistral | qwen2 | gpt2. */
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
  bosTokenId: number | null;
  eosTokenId: number | null;
}

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
  /** Module names: llama q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; gpt2 c_attn c_proj c_fc. */
  targetModules: string[];
}

export const LLAMA_TARGET_MODULES = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
export const GPT2_TARGET_MODULES = ['c_attn', 'c_proj', 'c_fc'] as const;

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
