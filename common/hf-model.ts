/**
 * Hugging Face model directories as files, for both sides of a run: config.json
 * normalized into a ModelConfig, the weights (names and shapes) a config
 * implies, checkpoint discovery (model.safetensors, or shards listed in
 * model.safetensors.index.json), and the base-model fingerprint.
 *
 * `inspectModel` checks a model directory exactly as the worker's `loadModel`
 * does and computes the same fingerprint, but reads only the safetensors
 * headers and streams tensor bytes through the hash in bounded chunks: its
 * memory does not grow with the model, so the coordinator can identify an 8B
 * base model on a host without a GPU or 32 GB of RAM. Loading weights into
 * memory and saving model directories live in worker/engine/model.ts.
 *
 * Supported model_type: llama, mistral, qwen2, qwen3, gemma2, phi3 (family `llama`) and gpt2.
 */
import { createHash, type Hash } from 'node:crypto';
import { access, open, readFile, type FileHandle } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { numel, type TensorMap } from './tensor.ts';
import { DTYPE_SIZE, f16BitsToF32, readSafetensorsHeader, type StDtype } from './safetensors.ts';
import type { ModelConfig, RopeScaling } from './model-config.ts';

export const SUPPORTED_MODEL_TYPES = ['llama', 'mistral', 'qwen2', 'gpt2', 'qwen3', 'gemma2', 'phi3'] as const;
export type SupportedModelType = (typeof SUPPORTED_MODEL_TYPES)[number];

export type ModelDtype = 'float32' | 'float16' | 'bfloat16';

const HF_ARCHITECTURE: Record<SupportedModelType, string> = {
  llama: 'LlamaForCausalLM',
  mistral: 'MistralForCausalLM',
  qwen2: 'Qwen2ForCausalLM',
  qwen3: 'Qwen3ForCausalLM',
  gemma2: 'Gemma2ForCausalLM',
  phi3: 'Phi3ForCausalLM',
  gpt2: 'GPT2LMHeadModel',
};

// ---------------------------------------------------------------------------
// config.json -> ModelConfig

type Raw = Record<string, unknown>;

function cfgError(source: string, field: string, msg: string): never {
  throw new Error(`${source}: field "${field}" ${msg}`);
}

function posInt(raw: Raw, field: string, source: string, fallback?: number): number {
  const v = raw[field] ?? fallback;
  if (v === undefined) cfgError(source, field, 'is missing (a positive integer is required)');
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) cfgError(source, field, `must be a positive integer, got ${JSON.stringify(v)}`);
  return v;
}

function posNum(raw: Raw, field: string, source: string, fallback: number): number {
  const v = raw[field] ?? fallback;
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) cfgError(source, field, `must be a positive number, got ${JSON.stringify(v)}`);
  return v;
}

function bool(raw: Raw, field: string, source: string, fallback: boolean): boolean {
  const v = raw[field] ?? fallback;
  if (typeof v !== 'boolean') cfgError(source, field, `must be true or false, got ${JSON.stringify(v)}`);
  return v;
}

/** bos/eos ids: an integer, a list of integers (the first is used) or null. */
function tokenId(raw: Raw, field: string, source: string): number | null {
  let v = raw[field];
  if (Array.isArray(v)) v = v[0];
  if (v === undefined || v === null) return null;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) cfgError(source, field, `must be a token id (non-negative integer), a list of them, or null; got ${JSON.stringify(raw[field])}`);
  return v;
}

const ROPE_FIELDS: Record<RopeScaling['type'], readonly string[]> = {
  linear: ['factor'],
  dynamic: ['factor', 'original_max_position_embeddings'],
  llama3: ['factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'],
  yarn: ['factor', 'original_max_position_embeddings', 'beta_fast', 'beta_slow', 'attention_factor', 'mscale', 'mscale_all_dim', 'truncate'],
  longrope: ['short_factor', 'long_factor', 'factor', 'attention_factor'],
};

/**
 * `rope_scaling` of the llama family: null, type "default", or one of linear,
 * dynamic, llama3, yarn with the parameters transformers reads for it. Any
 * other type or an unknown parameter is refused by name.
 */
function parseRopeScaling(raw: Raw, maxPositions: number, source: string): RopeScaling | undefined {
  const rs = raw.rope_scaling;
  if (rs === undefined || rs === null) return undefined;
  if (typeof rs !== 'object' || Array.isArray(rs)) cfgError(source, 'rope_scaling', `must be an object or null, got ${JSON.stringify(rs)}`);
  const r = rs as Raw;
  const kind = r.rope_type ?? r.type;
  if (kind === 'default') return undefined;
  if (typeof kind !== 'string' || !(kind in ROPE_FIELDS)) {
    cfgError(source, 'rope_scaling', `has type ${JSON.stringify(kind)}; supported: default, ${Object.keys(ROPE_FIELDS).join(', ')}`);
  }
  const type = kind as RopeScaling['type'];
  const known = new Set(['rope_type', 'type', ...ROPE_FIELDS[type]]);
  const unknown = Object.keys(r).filter((k) => !known.has(k));
  if (unknown.length) cfgError(source, 'rope_scaling', `of type ${type} has unsupported parameter${unknown.length > 1 ? 's' : ''} ${unknown.join(', ')}; known: ${ROPE_FIELDS[type].join(', ')}`);
  const num = (k: string, fallback?: number): number => {
    const v = r[k] ?? fallback;
    if (v === undefined || v === null) cfgError(source, 'rope_scaling', `${JSON.stringify(r)} is not supported: type ${type} requires ${k} (a positive number)`);
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) cfgError(source, `rope_scaling.${k}`, `must be a positive number, got ${JSON.stringify(r[k])}`);
    return v;
  };
  if (type === 'longrope') return parseLongrope(raw, r, maxPositions, source, num);
  const factor = num('factor');
  if (type === 'linear') return { type, factor };
  if (type === 'dynamic') {
    if (factor < 1) cfgError(source, 'rope_scaling.factor', `must be at least 1 for dynamic scaling, got ${factor}`);
    const original = num('original_max_position_embeddings', maxPositions);
    if (original !== maxPositions) {
      cfgError(source, 'rope_scaling.original_max_position_embeddings', `(${original}) differs from max_position_embeddings (${maxPositions}); dynamic scaling is supported only with the two equal`);
    }
    return { type, factor, originalMaxPositions: original };
  }
  if (type === 'llama3') {
    const lowFreqFactor = num('low_freq_factor');
    const highFreqFactor = num('high_freq_factor');
    if (!(highFreqFactor > lowFreqFactor)) cfgError(source, 'rope_scaling.high_freq_factor', `(${highFreqFactor}) must be greater than low_freq_factor (${lowFreqFactor})`);
    return { type, factor, lowFreqFactor, highFreqFactor, originalMaxPositions: num('original_max_position_embeddings') };
  }
  // yarn
  const originalMaxPositions = num('original_max_position_embeddings', maxPositions);
  if (r.original_max_position_embeddings !== undefined && Math.abs(maxPositions / originalMaxPositions - factor) > 1e-9 * factor) {
    // transformers versions disagree on which factor applies when these differ.
    cfgError(
      source,
      'rope_scaling.factor',
      `(${factor}) must equal max_position_embeddings / original_max_position_embeddings (${maxPositions} / ${originalMaxPositions}) for yarn`,
    );
  }
  const mscale = (scale: number, m: number): number => (scale <= 1 ? 1 : 0.1 * m * Math.log(scale) + 1);
  let attentionFactor: number;
  if (r.attention_factor !== undefined && r.attention_factor !== null) attentionFactor = num('attention_factor');
  else if (r.mscale && r.mscale_all_dim) attentionFactor = mscale(factor, num('mscale')) / mscale(factor, num('mscale_all_dim'));
  else attentionFactor = mscale(factor, 1);
  const truncate = r.truncate ?? true;
  if (typeof truncate !== 'boolean') cfgError(source, 'rope_scaling.truncate', `must be true or false, got ${JSON.stringify(truncate)}`);
  return { type, factor, originalMaxPositions, betaFast: num('beta_fast', 32), betaSlow: num('beta_slow', 1), attentionFactor, truncate };
}

/**
 * Phi-3 LongRoPE: short_factor / long_factor (head_dim / 2 positive numbers
 * each), the pretraining context from the top-level
 * `original_max_position_embeddings`, attention factor given or
 * sqrt(1 + ln(max / orig) / ln(orig)) (1 when max <= orig).
 */
function parseLongrope(raw: Raw, r: Raw, maxPositions: number, source: string, num: (k: string, fallback?: number) => number): RopeScaling {
  const original = posInt(raw, 'original_max_position_embeddings', source);
  const factor = maxPositions / original;
  if (r.factor !== undefined && r.factor !== null && Math.abs(num('factor') - factor) > 1e-9 * factor) {
    cfgError(source, 'rope_scaling.factor', `(${String(r.factor)}) must equal max_position_embeddings / original_max_position_embeddings (${maxPositions} / ${original}) for longrope`);
  }
  const hd = raw.head_dim ?? (raw.hidden_size as number) / (raw.num_attention_heads as number);
  const list = (k: string): number[] => {
    const v = r[k];
    if (!Array.isArray(v) || v.length !== (hd as number) / 2 || v.some((x) => typeof x !== 'number' || !Number.isFinite(x) || x <= 0)) {
      cfgError(source, `rope_scaling.${k}`, `must list head_dim / 2 = ${(hd as number) / 2} positive numbers`);
    }
    return [...(v as number[])];
  };
  const attentionFactor =
    r.attention_factor !== undefined && r.attention_factor !== null ? num('attention_factor') : factor <= 1 ? 1 : Math.sqrt(1 + Math.log(factor) / Math.log(original));
  return { type: 'longrope', shortFactor: list('short_factor'), longFactor: list('long_factor'), originalMaxPositions: original, attentionFactor };
}

/**
 * Sliding-window layers, following transformers' rule: mistral and phi3 apply
 * `sliding_window` to every layer; qwen2 / qwen3 only with `use_sliding_window: true`,
 * then to the layers whose `layer_types` entry is "sliding_attention" or,
 * without `layer_types`, to layers l >= `max_window_layers`; gemma2 (window
 * default 4096) to the `layer_types` sliding layers or else the even layers. A window of at
 * least max_position_embeddings can never exclude a key and is left out.
 */
function parseSlidingWindow(raw: Raw, modelType: string, numLayers: number, maxPositions: number, source: string): ModelConfig['slidingWindow'] {
  if (modelType !== 'mistral' && modelType !== 'phi3' && modelType !== 'qwen2' && modelType !== 'qwen3' && modelType !== 'gemma2') return undefined;
  const w = modelType === 'gemma2' ? (raw.sliding_window === undefined ? 4096 : raw.sliding_window) : raw.sliding_window;
  if ((modelType === 'qwen2' || modelType === 'qwen3') && !bool(raw, 'use_sliding_window', source, false)) return undefined;
  if (w === undefined || w === null) return undefined;
  const size = posInt(raw, 'sliding_window', source, modelType === 'gemma2' ? 4096 : undefined);
  let layers = Array.from({ length: numLayers }, (_, l) => l);
  if (modelType !== 'mistral' && modelType !== 'phi3') {
    const types = raw.layer_types;
    if (types !== undefined && types !== null) {
      if (!Array.isArray(types) || types.length !== numLayers || types.some((t) => t !== 'full_attention' && t !== 'sliding_attention')) {
        cfgError(source, 'layer_types', `must list "full_attention" or "sliding_attention" for each of the ${numLayers} layers`);
      }
      layers = layers.filter((l) => types[l] === 'sliding_attention');
    } else if (modelType === 'gemma2') {
      layers = layers.filter((l) => l % 2 === 0); // even layers slide, odd layers attend globally
    } else {
      const from = raw.max_window_layers === undefined || raw.max_window_layers === null ? 28 : posIntOrZero(raw, 'max_window_layers', source);
      layers = layers.filter((l) => l >= from);
    }
  }
  if (size >= maxPositions || layers.length === 0) return undefined;
  return { size, layers };
}

function posIntOrZero(raw: Raw, field: string, source: string): number {
  const v = raw[field];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) cfgError(source, field, `must be a non-negative integer, got ${JSON.stringify(v)}`);
  return v;
}

/** Normalize a config.json object. `source` names the file in error messages. */
export function normalizeConfig(raw: Raw, source = 'config.json'): ModelConfig {
  const modelType = raw.model_type;
  if (typeof modelType !== 'string' || !(SUPPORTED_MODEL_TYPES as readonly string[]).includes(modelType)) {
    throw new Error(
      `${source}: unsupported model_type ${JSON.stringify(modelType)}; supported: ${SUPPORTED_MODEL_TYPES.join(', ')}`,
    );
  }
  const vocabSize = posInt(raw, 'vocab_size', source);
  if (modelType === 'gpt2') {
    const hiddenSize = posInt(raw, 'n_embd', source);
    const numHeads = posInt(raw, 'n_head', source);
    if (hiddenSize % numHeads !== 0) cfgError(source, 'n_embd', `(${hiddenSize}) must be divisible by n_head (${numHeads})`);
    const act = raw.activation_function ?? 'gelu_new';
    if (act !== 'gelu_new' && act !== 'gelu_pytorch_tanh') {
      cfgError(source, 'activation_function', `is ${JSON.stringify(act)}; supported: gelu_new (or its equal gelu_pytorch_tanh)`);
    }
    if (raw.tie_word_embeddings === false) cfgError(source, 'tie_word_embeddings', 'is false; gpt2 models must tie lm_head to wte');
    const nInner = raw.n_inner;
    const scaleAttnWeights = bool(raw, 'scale_attn_weights', source, true);
    const scaleAttnByInverseLayerIdx = bool(raw, 'scale_attn_by_inverse_layer_idx', source, false);
    // reorder_and_upcast_attn only changes the precision of the q·k product under
    // fp16 autocast; the scores are the same, and the engine computes them in float32 or float64.
    bool(raw, 'reorder_and_upcast_attn', source, false);
    return {
      family: 'gpt2',
      modelType,
      vocabSize,
      hiddenSize,
      intermediateSize: nInner === null || nInner === undefined ? 4 * hiddenSize : posInt(raw, 'n_inner', source),
      numLayers: posInt(raw, 'n_layer', source),
      numHeads,
      numKvHeads: numHeads,
      headDim: hiddenSize / numHeads,
      maxPositions: posInt(raw, 'n_positions', source, (raw.n_ctx as number | undefined) ?? 1024),
      normEps: posNum(raw, 'layer_norm_epsilon', source, 1e-5),
      ropeTheta: 10000,
      tieWordEmbeddings: true,
      qkvBias: true,
      activation: 'gelu_new',
      ...(scaleAttnWeights ? {} : { scaleAttnWeights }),
      ...(scaleAttnByInverseLayerIdx ? { scaleAttnByInverseLayerIdx } : {}),
      bosTokenId: tokenId(raw, 'bos_token_id', source),
      eosTokenId: tokenId(raw, 'eos_token_id', source),
    };
  }

  const hiddenSize = posInt(raw, 'hidden_size', source);
  const numHeads = posInt(raw, 'num_attention_heads', source);
  const numKvHeads = posInt(raw, 'num_key_value_heads', source, numHeads);
  if (numHeads % numKvHeads !== 0) {
    cfgError(source, 'num_key_value_heads', `(${numKvHeads}) must divide num_attention_heads (${numHeads})`);
  }
  let headDim: number;
  if (raw.head_dim !== undefined && raw.head_dim !== null) headDim = posInt(raw, 'head_dim', source);
  else {
    if (hiddenSize % numHeads !== 0) {
      cfgError(source, 'hidden_size', `(${hiddenSize}) must be divisible by num_attention_heads (${numHeads}) when head_dim is not given`);
    }
    headDim = hiddenSize / numHeads;
  }
  if (headDim % 2 !== 0) cfgError(source, 'head_dim', `(${headDim}) must be even for rotary embeddings`);
  const gemma = modelType === 'gemma2';
  if (gemma) {
    // transformers' Gemma2 MLP reads hidden_activation (hidden_act is a legacy alias).
    const field = raw.hidden_activation !== undefined && raw.hidden_activation !== null ? 'hidden_activation' : 'hidden_act';
    const act = raw[field] ?? 'gelu_pytorch_tanh';
    if (act !== 'gelu_pytorch_tanh' && act !== 'gelu_new') cfgError(source, field, `is ${JSON.stringify(act)}; supported for gemma2: gelu_pytorch_tanh`);
  } else {
    const act = raw.hidden_act ?? 'silu';
    if (act !== 'silu' && act !== 'swish') cfgError(source, 'hidden_act', `is ${JSON.stringify(act)}; supported: silu`);
  }
  const softcap = (field: string): number | null => (raw[field] === undefined || raw[field] === null ? null : posNum(raw, field, source, 1));
  const ropeTheta = posNum(raw, 'rope_theta', source, 10000);
  const maxPositions = posInt(raw, 'max_position_embeddings', source, 2048);
  const ropeScaling = parseRopeScaling(raw, maxPositions, source);
  if (raw.partial_rotary_factor !== undefined && raw.partial_rotary_factor !== null && raw.partial_rotary_factor !== 1) {
    cfgError(source, 'partial_rotary_factor', `is ${JSON.stringify(raw.partial_rotary_factor)}; only full rotary embeddings (1) are supported`);
  }
  const mlpBias = bool(raw, 'mlp_bias', source, false);
  let qkvBias: boolean;
  let attentionOutBias = false;
  if (modelType === 'qwen2') qkvBias = true;
  else if ((modelType === 'llama' || modelType === 'qwen3' || gemma) && bool(raw, 'attention_bias', source, false)) {
    // Llama's attention_bias puts a bias on q, k, v and o_proj.
    qkvBias = true;
    attentionOutBias = true;
  } else {
    qkvBias = false;
    if (modelType !== 'qwen2' && raw.attention_bias === true) cfgError(source, 'attention_bias', `is true; ${modelType} attention has no biases`);
  }
  if (modelType !== 'llama' && raw.mlp_bias === true) cfgError(source, 'mlp_bias', `is true; MLP biases exist only for model_type llama, not ${modelType}`);
  const numLayers = posInt(raw, 'num_hidden_layers', source);
  const slidingWindow = parseSlidingWindow(raw, modelType, numLayers, maxPositions, source);
  return {
    family: 'llama',
    modelType,
    vocabSize,
    hiddenSize,
    intermediateSize: posInt(raw, 'intermediate_size', source),
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    maxPositions,
    normEps: posNum(raw, 'rms_norm_eps', source, 1e-6),
    ropeTheta,
    tieWordEmbeddings: bool(raw, 'tie_word_embeddings', source, gemma),
    qkvBias,
    activation: gemma ? 'gelu_new' : 'silu',
    // Optional fields enter the config only when they change the computation,
    // so that the fingerprints of plain models stay what they were.
    ...(ropeScaling ? { ropeScaling } : {}),
    ...(attentionOutBias ? { attentionOutBias } : {}),
    ...(mlpBias ? { mlpBias } : {}),
    ...(slidingWindow ? { slidingWindow } : {}),
    ...(modelType === 'qwen3' ? { qkNorm: true } : {}),
    ...(modelType === 'phi3' ? { fusedProjections: true } : {}),
    ...(gemma
      ? {
          gemma2: {
            queryPreAttnScalar: posNum(raw, 'query_pre_attn_scalar', source, 256), // transformers' Gemma2Config default
            attnLogitSoftcap: softcap('attn_logit_softcapping'),
            finalLogitSoftcap: softcap('final_logit_softcapping'),
          },
        }
      : {}),
    bosTokenId: tokenId(raw, 'bos_token_id', source),
    eosTokenId: tokenId(raw, 'eos_token_id', source),
  };
}

/** A config.json object with the real Hugging Face fields for `config.modelType`. */
export function hfConfig(config: ModelConfig, dtype: ModelDtype = 'float32'): Record<string, unknown> {
  const mt = config.modelType as SupportedModelType;
  if (!(SUPPORTED_MODEL_TYPES as readonly string[]).includes(mt)) {
    throw new Error(`unsupported model_type ${JSON.stringify(config.modelType)}; supported: ${SUPPORTED_MODEL_TYPES.join(', ')}`);
  }
  if (mt === 'gpt2') {
    return {
      architectures: [HF_ARCHITECTURE.gpt2],
      model_type: 'gpt2',
      vocab_size: config.vocabSize,
      n_positions: config.maxPositions,
      n_embd: config.hiddenSize,
      n_layer: config.numLayers,
      n_head: config.numHeads,
      n_inner: config.intermediateSize === 4 * config.hiddenSize ? null : config.intermediateSize,
      activation_function: 'gelu_new',
      resid_pdrop: 0.1,
      embd_pdrop: 0.1,
      attn_pdrop: 0.1,
      layer_norm_epsilon: config.normEps,
      initializer_range: 0.02,
      summary_type: 'cls_index',
      summary_use_proj: true,
      summary_activation: null,
      summary_proj_to_labels: true,
      summary_first_dropout: 0.1,
      scale_attn_weights: config.scaleAttnWeights ?? true,
      scale_attn_by_inverse_layer_idx: config.scaleAttnByInverseLayerIdx ?? false,
      reorder_and_upcast_attn: false,
      use_cache: true,
      bos_token_id: config.bosTokenId,
      eos_token_id: config.eosTokenId,
      tie_word_embeddings: true,
      torch_dtype: dtype,
    };
  }
  const common: Record<string, unknown> = {
    architectures: [HF_ARCHITECTURE[mt]],
    model_type: mt,
    vocab_size: config.vocabSize,
    hidden_size: config.hiddenSize,
    intermediate_size: config.intermediateSize,
    num_hidden_layers: config.numLayers,
    num_attention_heads: config.numHeads,
    num_key_value_heads: config.numKvHeads,
    head_dim: config.headDim,
    hidden_act: 'silu',
    max_position_embeddings: config.maxPositions,
    initializer_range: 0.02,
    rms_norm_eps: config.normEps,
    rope_theta: config.ropeTheta,
    rope_scaling: config.ropeScaling ? hfRopeScaling(config.ropeScaling) : null,
    attention_dropout: 0.0,
    use_cache: true,
    tie_word_embeddings: config.tieWordEmbeddings,
    bos_token_id: config.bosTokenId,
    eos_token_id: config.eosTokenId,
    torch_dtype: dtype,
  };
  const sw = config.slidingWindow;
  if (mt === 'llama') return { ...common, attention_bias: config.attentionOutBias ?? false, mlp_bias: config.mlpBias ?? false, pretraining_tp: 1 };
  if (mt === 'phi3') {
    if (sw && sw.layers.length !== config.numLayers) throw new Error('hfConfig: phi3 applies sliding_window to every layer; config.slidingWindow.layers must list them all');
    const rs = config.ropeScaling;
    const original = rs?.type === 'longrope' ? rs.originalMaxPositions : config.maxPositions;
    return { ...common, original_max_position_embeddings: original, sliding_window: sw ? sw.size : null };
  }
  if (mt === 'mistral') {
    if (sw && sw.layers.length !== config.numLayers) throw new Error('hfConfig: mistral applies sliding_window to every layer; config.slidingWindow.layers must list them all');
    return { ...common, sliding_window: sw ? sw.size : null };
  }
  if (mt === 'gemma2') {
    const gm = config.gemma2;
    if (!gm) throw new Error('hfConfig: a gemma2 config needs its gemma2 fields (query_pre_attn_scalar, soft-capping)');
    const { hidden_act: _act, ...rest } = common;
    return {
      ...rest,
      hidden_activation: 'gelu_pytorch_tanh',
      attention_bias: config.attentionOutBias ?? false,
      query_pre_attn_scalar: gm.queryPreAttnScalar,
      attn_logit_softcapping: gm.attnLogitSoftcap,
      final_logit_softcapping: gm.finalLogitSoftcap,
      sliding_window: sw ? sw.size : config.maxPositions,
      layer_types: Array.from({ length: config.numLayers }, (_, l) => (sw?.layers.includes(l) ? 'sliding_attention' : 'full_attention')),
    };
  }
  const extra = mt === 'qwen3' ? { attention_bias: config.attentionOutBias ?? false } : {};
  if (!sw) return { ...common, ...extra, use_sliding_window: false, sliding_window: null, max_window_layers: config.numLayers };
  return {
    ...common,
    ...extra,
    use_sliding_window: true,
    sliding_window: sw.size,
    max_window_layers: sw.layers[0],
    layer_types: Array.from({ length: config.numLayers }, (_, l) => (sw.layers.includes(l) ? 'sliding_attention' : 'full_attention')),
  };
}

/** config.json `rope_scaling` for a normalized RopeScaling. */
function hfRopeScaling(rs: RopeScaling): Record<string, unknown> {
  switch (rs.type) {
    case 'linear':
      return { rope_type: 'linear', factor: rs.factor };
    case 'dynamic':
      return { rope_type: 'dynamic', factor: rs.factor };
    case 'llama3':
      return {
        rope_type: 'llama3',
        factor: rs.factor,
        low_freq_factor: rs.lowFreqFactor,
        high_freq_factor: rs.highFreqFactor,
        original_max_position_embeddings: rs.originalMaxPositions,
      };
    case 'yarn':
      return {
        rope_type: 'yarn',
        factor: rs.factor,
        original_max_position_embeddings: rs.originalMaxPositions,
        beta_fast: rs.betaFast,
        beta_slow: rs.betaSlow,
        attention_factor: rs.attentionFactor,
        truncate: rs.truncate,
      };
    case 'longrope':
      return { rope_type: 'longrope', short_factor: rs.shortFactor, long_factor: rs.longFactor, attention_factor: rs.attentionFactor };
  }
}

// ---------------------------------------------------------------------------
// Weights

/** Every weight the model must have, canonical name -> shape, in checkpoint order. */
export function expectedWeightShapes(config: ModelConfig): Map<string, number[]> {
  const m = new Map<string, number[]>();
  const H = config.hiddenSize;
  const V = config.vocabSize;
  const I = config.intermediateSize;
  if (config.family === 'gpt2') {
    m.set('transformer.wte.weight', [V, H]);
    m.set('transformer.wpe.weight', [config.maxPositions, H]);
    for (let l = 0; l < config.numLayers; l++) {
      const p = `transformer.h.${l}`;
      m.set(`${p}.ln_1.weight`, [H]);
      m.set(`${p}.ln_1.bias`, [H]);
      m.set(`${p}.attn.c_attn.weight`, [H, 3 * H]);
      m.set(`${p}.attn.c_attn.bias`, [3 * H]);
      m.set(`${p}.attn.c_proj.weight`, [H, H]);
      m.set(`${p}.attn.c_proj.bias`, [H]);
      m.set(`${p}.ln_2.weight`, [H]);
      m.set(`${p}.ln_2.bias`, [H]);
      m.set(`${p}.mlp.c_fc.weight`, [H, I]);
      m.set(`${p}.mlp.c_fc.bias`, [I]);
      m.set(`${p}.mlp.c_proj.weight`, [I, H]);
      m.set(`${p}.mlp.c_proj.bias`, [H]);
    }
    m.set('transformer.ln_f.weight', [H]);
    m.set('transformer.ln_f.bias', [H]);
    return m;
  }
  const q = config.numHeads * config.headDim;
  const kv = config.numKvHeads * config.headDim;
  m.set('model.embed_tokens.weight', [V, H]);
  for (let l = 0; l < config.numLayers; l++) {
    const p = `model.layers.${l}`;
    m.set(`${p}.input_layernorm.weight`, [H]);
    if (config.fusedProjections) m.set(`${p}.self_attn.qkv_proj.weight`, [q + 2 * kv, H]);
    else {
      m.set(`${p}.self_attn.q_proj.weight`, [q, H]);
      if (config.qkvBias) m.set(`${p}.self_attn.q_proj.bias`, [q]);
      m.set(`${p}.self_attn.k_proj.weight`, [kv, H]);
      if (config.qkvBias) m.set(`${p}.self_attn.k_proj.bias`, [kv]);
      m.set(`${p}.self_attn.v_proj.weight`, [kv, H]);
      if (config.qkvBias) m.set(`${p}.self_attn.v_proj.bias`, [kv]);
    }
    if (config.qkNorm) {
      m.set(`${p}.self_attn.q_norm.weight`, [config.headDim]);
      m.set(`${p}.self_attn.k_norm.weight`, [config.headDim]);
    }
    m.set(`${p}.self_attn.o_proj.weight`, [H, q]);
    if (config.attentionOutBias) m.set(`${p}.self_attn.o_proj.bias`, [H]);
    m.set(`${p}.post_attention_layernorm.weight`, [H]);
    if (config.gemma2) {
      m.set(`${p}.pre_feedforward_layernorm.weight`, [H]);
      m.set(`${p}.post_feedforward_layernorm.weight`, [H]);
    }
    if (config.fusedProjections) m.set(`${p}.mlp.gate_up_proj.weight`, [2 * I, H]);
    else {
      m.set(`${p}.mlp.gate_proj.weight`, [I, H]);
      if (config.mlpBias) m.set(`${p}.mlp.gate_proj.bias`, [I]);
      m.set(`${p}.mlp.up_proj.weight`, [I, H]);
      if (config.mlpBias) m.set(`${p}.mlp.up_proj.bias`, [I]);
    }
    m.set(`${p}.mlp.down_proj.weight`, [H, I]);
    if (config.mlpBias) m.set(`${p}.mlp.down_proj.bias`, [H]);
  }
  m.set('model.norm.weight', [H]);
  if (!config.tieWordEmbeddings) m.set('lm_head.weight', [V, H]);
  return m;
}

/**
 * Canonical name of a checkpoint tensor, or null for buffers and tied copies
 * that are dropped (gpt2 attn.bias / attn.masked_bias, rotary inv_freq, a tied lm_head).
 */
export function canonicalWeightName(config: ModelConfig, name: string): string | null {
  if (config.family === 'gpt2') {
    if (name === 'lm_head.weight') return null;
    const full = name.startsWith('transformer.') ? name : `transformer.${name}`;
    if (/\.attn\.(bias|masked_bias)$/.test(full)) return null;
    return full;
  }
  if (name.endsWith('.rotary_emb.inv_freq')) return null;
  if (name === 'lm_head.weight' && config.tieWordEmbeddings) return null;
  return name;
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

function describe(config: ModelConfig): string {
  return config.family === 'gpt2'
    ? `n_embd=${config.hiddenSize}, n_layer=${config.numLayers}, n_inner=${config.intermediateSize}, vocab_size=${config.vocabSize}, n_positions=${config.maxPositions}`
    : `hidden_size=${config.hiddenSize}, intermediate_size=${config.intermediateSize}, heads=${config.numHeads}, kv_heads=${config.numKvHeads}, head_dim=${config.headDim}, vocab_size=${config.vocabSize}`;
}


/**
 * Check that `shapes` (canonical name -> shape) holds exactly the weights the
 * config implies, with the implied shapes. `source` names the model in errors.
 */
export function checkWeightShapes(config: ModelConfig, shapes: ReadonlyMap<string, readonly number[]>, source: string): void {
  const expected = expectedWeightShapes(config);
  for (const [name, shape] of expected) {
    const got = shapes.get(name);
    if (!got) throw new Error(`${source}: missing weight ${name} (expected shape [${shape.join(', ')}])`);
    if (!sameShape(got, shape)) {
      throw new Error(`${source}: weight ${name} has shape [${got.join(', ')}], expected [${shape.join(', ')}] for ${describe(config)}`);
    }
  }
  const extra = [...shapes.keys()].filter((k) => !expected.has(k));
  if (extra.length) {
    throw new Error(
      `${source}: unexpected weight${extra.length > 1 ? 's' : ''} ${extra.slice(0, 5).join(', ')}${extra.length > 5 ? ` (+${extra.length - 5} more)` : ''} for ${config.modelType}`,
    );
  }
}

// ---------------------------------------------------------------------------
// Fingerprint

function canonicalJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(',')}]`;
  if (v && typeof v === 'object') {
    const o = v as Record<string, unknown>;
    return `{${Object.keys(o)
      .sort()
      .filter((k) => o[k] !== undefined)
      .map((k) => `${JSON.stringify(k)}:${canonicalJson(o[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(v);
}

/**
 * The base-model fingerprint, fed incrementally: sha256 hex over the canonical
 * JSON of the normalized config and then, for each weight in sorted name order,
 * `\n${name}\n${shape joined by ','}\n` and its values as float32 little-endian
 * bytes. Weights must be begun in sorted order and each fed exactly its values.
 */
export class FingerprintHash {
  private readonly h: Hash = createHash('sha256');
  private last: string | null = null;
  private left = 0;
  private current = '';

  constructor(config: ModelConfig) {
    this.h.update(canonicalJson(config));
  }

  /** Start the next weight (names strictly increasing). */
  begin(name: string, shape: readonly number[]): void {
    if (this.left !== 0) throw new Error(`fingerprint: weight ${this.current} still needs ${this.left} values`);
    if (this.last !== null && !(name > this.last)) throw new Error(`fingerprint: weight ${name} comes after ${this.last}; weights must be added in sorted order`);
    this.last = name;
    this.current = name;
    this.left = numel(shape);
    this.h.update(`\n${name}\n${shape.join(',')}\n`);
  }

  /** The current weight's next values. */
  update(values: Float32Array): void {
    if (values.length > this.left) throw new Error(`fingerprint: weight ${this.current} got ${values.length - this.left} values more than its shape holds`);
    this.left -= values.length;
    this.h.update(new Uint8Array(values.buffer, values.byteOffset, values.byteLength));
  }

  digest(): string {
    if (this.left !== 0) throw new Error(`fingerprint: weight ${this.current} still needs ${this.left} values`);
    return this.h.digest('hex');
  }
}

/** The fingerprint of weights held in memory (see FingerprintHash). */
export function computeFingerprint(config: ModelConfig, weights: TensorMap): string {
  const fp = new FingerprintHash(config);
  for (const name of [...weights.keys()].sort()) {
    const t = weights.get(name)!;
    fp.begin(name, t.shape);
    fp.update(t.data instanceof Float32Array ? t.data : Float32Array.from(t.data));
  }
  return fp.digest();
}

// ---------------------------------------------------------------------------
// Model directory files

export async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

/** Parse a JSON file; `what` says what the file is for when it is missing. */
export async function readJson(path: string, what: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new Error(`${what}: ${path} not found`);
    throw err;
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new Error(`${path}: not valid JSON (${(err as Error).message})`);
  }
}

export const SHARD_INDEX = 'model.safetensors.index.json';

export interface CheckpointFiles {
  /** safetensors file names in the model directory, sorted. */
  files: string[];
  /** For a sharded checkpoint: the file that holds each weight (from the index); null for model.safetensors. */
  weightMap: Map<string, string> | null;
}

/** The safetensors files of a model dir and, for a sharded checkpoint, which file holds each weight. */
export async function checkpointFiles(dir: string): Promise<CheckpointFiles> {
  if (await exists(join(dir, 'model.safetensors'))) return { files: ['model.safetensors'], weightMap: null };
  const indexPath = join(dir, SHARD_INDEX);
  if (!(await exists(indexPath))) {
    throw new Error(`model directory ${dir} has neither model.safetensors nor ${SHARD_INDEX} (only safetensors checkpoints are supported)`);
  }
  const index = await readJson(indexPath, 'shard index');
  const wm = (index as Raw | null)?.weight_map;
  if (!wm || typeof wm !== 'object' || Array.isArray(wm)) throw new Error(`${indexPath}: "weight_map" must be an object mapping weight names to shard files`);
  const weightMap = new Map<string, string>();
  for (const [name, file] of Object.entries(wm as Raw)) {
    if (typeof file !== 'string' || file !== basename(file) || !file.endsWith('.safetensors')) {
      throw new Error(`${indexPath}: weight_map["${name}"] must be a .safetensors file name in the same directory, got ${JSON.stringify(file)}`);
    }
    weightMap.set(name, file);
  }
  if (weightMap.size === 0) throw new Error(`${indexPath}: weight_map is empty`);
  const files = [...new Set(weightMap.values())].sort();
  for (const f of files) {
    if (!(await exists(join(dir, f)))) throw new Error(`${indexPath}: shard file ${f} listed in weight_map does not exist in ${dir}`);
  }
  return { files, weightMap };
}

export interface ModelDir {
  dir: string;
  config: ModelConfig;
  /** config.json as read from disk. */
  rawConfig: Record<string, unknown>;
  checkpoint: CheckpointFiles;
}

/** Read config.json, check that tokenizer.json is there, and find the checkpoint files. */
export async function readModelDir(dir: string): Promise<ModelDir> {
  const configPath = join(dir, 'config.json');
  const rawConfig = await readJson(configPath, `model directory ${dir}`);
  if (!rawConfig || typeof rawConfig !== 'object' || Array.isArray(rawConfig)) throw new Error(`${configPath}: must be a JSON object`);
  const config = normalizeConfig(rawConfig as Raw, configPath);
  if (!(await exists(join(dir, 'tokenizer.json')))) {
    throw new Error(`model directory ${dir} has no tokenizer.json (a Hugging Face fast-tokenizer file is required)`);
  }
  return { dir, config, rawConfig: rawConfig as Raw, checkpoint: await checkpointFiles(dir) };
}

/** A model weight found in a checkpoint file. */
export interface CheckpointWeight {
  /** Canonical name (see canonicalWeightName). */
  canonical: string;
  /** Name in the file. */
  name: string;
  file: string;
  dtype: StDtype;
  shape: number[];
}

/**
 * Check one checkpoint file's tensors (name -> dtype and shape, in file order)
 * and record the model weights it holds in `found` (canonical name -> weight).
 * Every weight the shard index maps to `file` must be in it; buffers and tied
 * copies are skipped; a weight must not appear twice, must have the shape the
 * config implies and a float dtype. Returns the weights of this file in order.
 */
export function collectFileWeights(
  model: ModelDir,
  file: string,
  tensors: ReadonlyMap<string, { dtype: StDtype; shape: readonly number[] }>,
  found: Map<string, CheckpointWeight>,
): CheckpointWeight[] {
  const { dir, config, checkpoint } = model;
  const path = join(dir, file);
  if (checkpoint.weightMap) {
    for (const [name, f] of checkpoint.weightMap) {
      if (f === file && !tensors.has(name)) {
        throw new Error(`${join(dir, SHARD_INDEX)}: weight ${name} is mapped to ${file} but that file does not contain it`);
      }
    }
  }
  const expected = expectedWeightShapes(config);
  const out: CheckpointWeight[] = [];
  for (const [name, entry] of tensors) {
    const canon = canonicalWeightName(config, name);
    if (canon === null) continue;
    const prev = found.get(canon);
    if (prev) throw new Error(`${path}: weight ${canon} also appears in ${prev.file}`);
    const expectedShape = expected.get(canon);
    if (expectedShape && !sameShape(entry.shape, expectedShape)) {
      throw new Error(
        `${path}: weight ${name} has shape [${entry.shape.join(', ')}], expected [${expectedShape.join(', ')}] for ${describe(config)}`,
      );
    }
    if (entry.dtype !== 'F32' && entry.dtype !== 'F16' && entry.dtype !== 'BF16' && entry.dtype !== 'F64') {
      throw new Error(`${path}: weight ${name} has dtype ${entry.dtype}; model weights must be F32, F16, BF16 or F64`);
    }
    const w: CheckpointWeight = { canonical: canon, name, file, dtype: entry.dtype, shape: [...entry.shape] };
    found.set(canon, w);
    out.push(w);
  }
  return out;
}

/** After every file: the complete weight set, checked, in the checkpoint order of expectedWeightShapes. */
export function completeWeights(model: ModelDir, found: ReadonlyMap<string, CheckpointWeight>): Map<string, CheckpointWeight> {
  const shapes = new Map<string, readonly number[]>();
  for (const [k, w] of found) shapes.set(k, w.shape);
  checkWeightShapes(model.config, shapes, model.dir);
  const ordered = new Map<string, CheckpointWeight>();
  for (const name of expectedWeightShapes(model.config).keys()) ordered.set(name, found.get(name)!);
  return ordered;
}

// ---------------------------------------------------------------------------
// Tensor bytes from a file handle

async function openSafetensors(path: string): Promise<FileHandle> {
  return open(path, 'r').catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') throw new Error(`safetensors ${path}: file not found`);
    throw err;
  });
}

/** Read `length` bytes at `position` into the start of `buf`; the file must have them. */
async function readFully(fh: FileHandle, buf: Uint8Array, length: number, position: number, path: string, what: string): Promise<number> {
  let off = 0;
  while (off < length) {
    const { bytesRead } = await fh.read(buf, off, length - off, position + off);
    if (bytesRead === 0) throw new Error(`safetensors ${path}: unexpected end of file reading ${what}`);
    off += bytesRead;
  }
  return length;
}

// ---------------------------------------------------------------------------
// inspectModel

/** What the coordinator needs to know about a base model: everything but the weight values. */
export interface ModelInfo {
  dir: string;
  config: ModelConfig;
  /** config.json as read from disk. */
  rawConfig: Record<string, unknown>;
  /** Canonical weight name -> shape, in the checkpoint order of expectedWeightShapes. */
  shapes: Map<string, number[]>;
  /** Canonical weight name -> dtype on disk. */
  dtypes: Map<string, StDtype>;
  /** The same fingerprint loadModel computes (see FingerprintHash). */
  fingerprint: string;
  /** Number of values over all weights (buffers and tied copies not counted). */
  parameterCount: number;
  /** Total size of the checkpoint's safetensors files. */
  bytesOnDisk: number;
}

export interface InspectOptions {
  /** Bytes read from disk at a time (default 8 MiB; rounded down to a multiple of 8). Memory is about 4x this. */
  chunkBytes?: number;
  /** Called after each chunk with the tensor bytes hashed so far and the total. */
  onProgress?: (doneBytes: number, totalBytes: number) => void;
}

export const DEFAULT_INSPECT_CHUNK_BYTES = 8 * 1024 * 1024;

let halfTable: Float32Array | null = null;

/** F16 bits -> float32, as a table built from the same conversion loadModel uses. */
function f16Table(): Float32Array {
  if (!halfTable) {
    halfTable = new Float32Array(65536);
    for (let i = 0; i < 65536; i++) halfTable[i] = f16BitsToF32(i);
  }
  return halfTable;
}

/**
 * Convert one chunk of little-endian tensor bytes (`bytes` starts at offset 0
 * of its buffer, so views are aligned) to float32, as toFloat32 does for a
 * whole tensor. `out` is reused; the result may be a view of `bytes` (F32).
 */
function chunkToFloat32(dtype: StDtype, bytes: Uint8Array, out: Float32Array): Float32Array {
  const n = bytes.length / DTYPE_SIZE[dtype];
  switch (dtype) {
    case 'F32':
      return new Float32Array(bytes.buffer, bytes.byteOffset, n);
    case 'F64':
      return Float32Array.from(new Float64Array(bytes.buffer, bytes.byteOffset, n));
    case 'F16': {
      const h = new Uint16Array(bytes.buffer, bytes.byteOffset, n);
      const table = f16Table();
      const o = out.subarray(0, n);
      for (let i = 0; i < n; i++) o[i] = table[h[i]!]!;
      return o;
    }
    case 'BF16': {
      const h = new Uint16Array(bytes.buffer, bytes.byteOffset, n);
      const o = out.subarray(0, n);
      const bits = new Uint32Array(o.buffer, o.byteOffset, n);
      for (let i = 0; i < n; i++) bits[i] = h[i]! << 16;
      return o;
    }
    default:
      throw new Error(`chunkToFloat32: dtype ${dtype} is not a float type`);
  }
}

/**
 * Tensor bytes [begin, end) of a file in chunks of at most `buffers[i].length`
 * bytes, reading the next chunk while the caller works on the current one.
 * A yielded chunk is valid until the next one is requested.
 */
async function* readChunks(
  fh: FileHandle,
  path: string,
  name: string,
  begin: number,
  end: number,
  buffers: [Uint8Array, Uint8Array],
): AsyncGenerator<Uint8Array> {
  const what = `tensor "${name}"`;
  let pos = begin;
  let i = 0;
  const next = (): Promise<number> | null => {
    if (pos >= end) return null;
    const n = Math.min(buffers[i]!.length, end - pos);
    const p = readFully(fh, buffers[i]!, n, pos, path, what);
    pos += n;
    return p;
  };
  let pending = next();
  while (pending) {
    const n = await pending;
    const buf = buffers[i]!;
    i ^= 1;
    pending = next();
    // A read in flight must not be left unobserved if the caller stops early.
    pending?.catch(() => {});
    yield buf.subarray(0, n);
  }
}

/**
 * Check a Hugging Face model directory as loadModel does (config.json,
 * tokenizer.json, checkpoint files, every weight's name, shape and dtype, with
 * the same errors) and compute its fingerprint, without holding the weights:
 * only the safetensors headers are parsed, and tensor bytes stream from disk
 * through the hash `chunkBytes` at a time, converted to float32 chunk by chunk.
 */
export async function inspectModel(dir: string, opts: InspectOptions = {}): Promise<ModelInfo> {
  const requested = opts.chunkBytes ?? DEFAULT_INSPECT_CHUNK_BYTES;
  if (!Number.isSafeInteger(requested) || requested < 8) {
    throw new Error(`inspectModel: chunkBytes must be an integer of at least 8, got ${JSON.stringify(opts.chunkBytes)}`);
  }
  const chunkBytes = requested - (requested % 8);
  const model = await readModelDir(dir);
  const handles: FileHandle[] = [];
  try {
    const found = new Map<string, CheckpointWeight>();
    const where = new Map<string, { fh: FileHandle; path: string; begin: number; end: number }>();
    let bytesOnDisk = 0;
    for (const file of model.checkpoint.files) {
      const path = join(dir, file);
      const fh = await openSafetensors(path);
      handles.push(fh);
      const header = await readSafetensorsHeader(fh, path);
      bytesOnDisk += header.size;
      const tensors = new Map(header.entries.map((e) => [e.name, e] as const));
      for (const w of collectFileWeights(model, file, tensors, found)) {
        const e = tensors.get(w.name)!;
        where.set(w.canonical, { fh, path, begin: header.dataStart + e.begin, end: header.dataStart + e.end });
      }
    }
    const weights = completeWeights(model, found);

    let total = 0;
    for (const name of weights.keys()) total += where.get(name)!.end - where.get(name)!.begin;
    const buffers: [Uint8Array, Uint8Array] = [new Uint8Array(chunkBytes), new Uint8Array(chunkBytes)];
    const out = new Float32Array(chunkBytes / 2);
    const fp = new FingerprintHash(model.config);
    let done = 0;
    for (const name of [...weights.keys()].sort()) {
      const w = weights.get(name)!;
      const loc = where.get(name)!;
      fp.begin(name, w.shape);
      for await (const bytes of readChunks(loc.fh, loc.path, w.name, loc.begin, loc.end, buffers)) {
        fp.update(chunkToFloat32(w.dtype, bytes, out));
        done += bytes.length;
        opts.onProgress?.(done, total);
      }
    }

    const shapes = new Map<string, number[]>();
    const dtypes = new Map<string, StDtype>();
    let parameterCount = 0;
    for (const [name, w] of weights) {
      shapes.set(name, w.shape);
      dtypes.set(name, w.dtype);
      parameterCount += numel(w.shape);
    }
    return { dir, config: model.config, rawConfig: model.rawConfig, shapes, dtypes, fingerprint: fp.digest(), parameterCount, bytesOnDisk };
  } finally {
    await Promise.allSettled(handles.map((fh) => fh.close()));
  }
}
