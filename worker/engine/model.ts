/**
 * Hugging Face model directories: load (config.json + safetensors + tokenizer.json)
 * into a normalized ModelConfig and float32 weights under canonical names, check
 * every weight's shape, fingerprint the result, and save a model directory back.
 *
 * Supported model_type: llama, mistral, qwen2 (family `llama`) and gpt2.
 */
import { createHash } from 'node:crypto';
import { access, copyFile, readFile, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { numel, type Tensor, type TensorMap } from '../../common/tensor.ts';
import { readSafetensors, serializeSafetensors, toFloat32, type StEntry, type StWriteEntry } from '../../common/safetensors.ts';
import { writeDirAtomic } from '../../common/atomic.ts';
import { logger } from '../../common/log.ts';
import type { LoadedModel, ModelConfig } from '../../common/model-config.ts';

const log = logger('model');

export const SUPPORTED_MODEL_TYPES = ['llama', 'mistral', 'qwen2', 'gpt2'] as const;
export type SupportedModelType = (typeof SUPPORTED_MODEL_TYPES)[number];

export type ModelDtype = 'float32' | 'float16' | 'bfloat16';
const ST_DTYPE: Record<ModelDtype, 'F32' | 'F16' | 'BF16'> = { float32: 'F32', float16: 'F16', bfloat16: 'BF16' };

const HF_ARCHITECTURE: Record<SupportedModelType, string> = {
  llama: 'LlamaForCausalLM',
  mistral: 'MistralForCausalLM',
  qwen2: 'Qwen2ForCausalLM',
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
  const act = raw.hidden_act ?? 'silu';
  if (act !== 'silu' && act !== 'swish') cfgError(source, 'hidden_act', `is ${JSON.stringify(act)}; supported: silu`);
  const ropeScaling = raw.rope_scaling as Raw | null | undefined;
  if (ropeScaling !== undefined && ropeScaling !== null) {
    const kind = typeof ropeScaling === 'object' ? (ropeScaling.rope_type ?? ropeScaling.type) : ropeScaling;
    if (kind !== 'default') {
      cfgError(source, 'rope_scaling', `${JSON.stringify(ropeScaling)} is not supported (only plain rotary embeddings: rope_scaling null)`);
    }
  }
  if (bool(raw, 'mlp_bias', source, false)) cfgError(source, 'mlp_bias', 'is true; MLP biases are not supported');
  let qkvBias: boolean;
  if (modelType === 'qwen2') qkvBias = true;
  else if (modelType === 'llama' && bool(raw, 'attention_bias', source, false)) {
    // Llama's attention_bias also puts a bias on o_proj, which the engine does not model.
    cfgError(source, 'attention_bias', 'is true; llama with q/k/v/o biases is not supported (qwen2 q/k/v biases are)');
  } else qkvBias = false;
  if (modelType === 'qwen2' && raw.use_sliding_window === true) {
    log.warn({ source }, 'use_sliding_window is true: fedtune attends over the whole sequence (same result for sequences shorter than sliding_window)');
  }
  return {
    family: 'llama',
    modelType,
    vocabSize,
    hiddenSize,
    intermediateSize: posInt(raw, 'intermediate_size', source),
    numLayers: posInt(raw, 'num_hidden_layers', source),
    numHeads,
    numKvHeads,
    headDim,
    maxPositions: posInt(raw, 'max_position_embeddings', source, 2048),
    normEps: posNum(raw, 'rms_norm_eps', source, 1e-6),
    ropeTheta: posNum(raw, 'rope_theta', source, 10000),
    tieWordEmbeddings: bool(raw, 'tie_word_embeddings', source, false),
    qkvBias,
    activation: 'silu',
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
      scale_attn_weights: true,
      scale_attn_by_inverse_layer_idx: false,
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
    rope_scaling: null,
    attention_dropout: 0.0,
    use_cache: true,
    tie_word_embeddings: config.tieWordEmbeddings,
    bos_token_id: config.bosTokenId,
    eos_token_id: config.eosTokenId,
    torch_dtype: dtype,
  };
  if (mt === 'llama') return { ...common, attention_bias: false, mlp_bias: false, pretraining_tp: 1 };
  if (mt === 'mistral') return { ...common, sliding_window: null };
  return { ...common, use_sliding_window: false, sliding_window: null, max_window_layers: config.numLayers };
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
    m.set(`${p}.self_attn.q_proj.weight`, [q, H]);
    if (config.qkvBias) m.set(`${p}.self_attn.q_proj.bias`, [q]);
    m.set(`${p}.self_attn.k_proj.weight`, [kv, H]);
    if (config.qkvBias) m.set(`${p}.self_attn.k_proj.bias`, [kv]);
    m.set(`${p}.self_attn.v_proj.weight`, [kv, H]);
    if (config.qkvBias) m.set(`${p}.self_attn.v_proj.bias`, [kv]);
    m.set(`${p}.self_attn.o_proj.weight`, [H, q]);
    m.set(`${p}.post_attention_layernorm.weight`, [H]);
    m.set(`${p}.mlp.gate_proj.weight`, [I, H]);
    m.set(`${p}.mlp.up_proj.weight`, [I, H]);
    m.set(`${p}.mlp.down_proj.weight`, [H, I]);
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

/** Check that `weights` holds exactly the expected weights with the expected shapes. */
export function checkWeights(config: ModelConfig, weights: TensorMap, source: string): void {
  const expected = expectedWeightShapes(config);
  for (const [name, shape] of expected) {
    const t = weights.get(name);
    if (!t) throw new Error(`${source}: missing weight ${name} (expected shape [${shape.join(', ')}])`);
    if (!sameShape(t.shape, shape)) {
      throw new Error(`${source}: weight ${name} has shape [${t.shape.join(', ')}], expected [${shape.join(', ')}] for ${describe(config)}`);
    }
    if (t.data.length !== numel(shape)) throw new Error(`${source}: weight ${name} has ${t.data.length} values, shape needs ${numel(shape)}`);
  }
  const extra = [...weights.keys()].filter((k) => !expected.has(k));
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
 * sha256 hex over the canonical JSON of the normalized config and, in sorted
 * name order, each weight's name, shape and float32 little-endian bytes.
 */
export function computeFingerprint(config: ModelConfig, weights: TensorMap): string {
  const h = createHash('sha256');
  h.update(canonicalJson(config));
  for (const name of [...weights.keys()].sort()) {
    const t = weights.get(name)!;
    h.update(`\n${name}\n${t.shape.join(',')}\n`);
    const d = t.data instanceof Float32Array ? t.data : Float32Array.from(t.data);
    h.update(new Uint8Array(d.buffer, d.byteOffset, d.byteLength));
  }
  return h.digest('hex');
}

// ---------------------------------------------------------------------------
// Loading

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

async function readJson(path: string, what: string): Promise<unknown> {
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

/** The safetensors files of a model dir and, for a sharded checkpoint, which file holds each weight. */
async function checkpointFiles(dir: string): Promise<{ files: string[]; weightMap: Map<string, string> | null }> {
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

function convert(entry: StEntry, name: string, file: string): Float32Array {
  if (entry.dtype !== 'F32' && entry.dtype !== 'F16' && entry.dtype !== 'BF16' && entry.dtype !== 'F64') {
    throw new Error(`${file}: weight ${name} has dtype ${entry.dtype}; model weights must be F32, F16, BF16 or F64`);
  }
  return toFloat32(entry);
}

/** Load a Hugging Face model directory (see the module comment for what is supported). */
export async function loadModel(dir: string): Promise<LoadedModel> {
  const configPath = join(dir, 'config.json');
  const rawConfig = await readJson(configPath, `model directory ${dir}`);
  if (!rawConfig || typeof rawConfig !== 'object' || Array.isArray(rawConfig)) throw new Error(`${configPath}: must be a JSON object`);
  const config = normalizeConfig(rawConfig as Raw, configPath);
  if (!(await exists(join(dir, 'tokenizer.json')))) {
    throw new Error(`model directory ${dir} has no tokenizer.json (a Hugging Face fast-tokenizer file is required)`);
  }
  const { files, weightMap } = await checkpointFiles(dir);
  const expected = expectedWeightShapes(config);
  const weights: TensorMap = new Map();
  const origin = new Map<string, string>();
  for (const file of files) {
    const path = join(dir, file);
    const st = await readSafetensors(path);
    if (weightMap) {
      for (const [name, f] of weightMap) {
        if (f === file && !st.tensors.has(name)) {
          throw new Error(`${join(dir, SHARD_INDEX)}: weight ${name} is mapped to ${file} but that file does not contain it`);
        }
      }
    }
    for (const [name, entry] of st.tensors) {
      const canon = canonicalWeightName(config, name);
      if (canon === null) continue;
      if (weights.has(canon)) throw new Error(`${path}: weight ${canon} also appears in ${origin.get(canon)}`);
      const expectedShape = expected.get(canon);
      if (expectedShape && !sameShape(entry.shape, expectedShape)) {
        throw new Error(
          `${path}: weight ${name} has shape [${entry.shape.join(', ')}], expected [${expectedShape.join(', ')}] for ${describe(config)}`,
        );
      }
      weights.set(canon, { shape: [...entry.shape], data: convert(entry, name, path) });
      origin.set(canon, file);
    }
  }
  checkWeights(config, weights, dir);
  // Stable order: checkpoint order of expectedWeightShapes.
  const ordered: TensorMap = new Map();
  for (const name of expected.keys()) ordered.set(name, weights.get(name)!);
  return { dir, config, weights: ordered, fingerprint: computeFingerprint(config, ordered), rawConfig: rawConfig as Raw };
}

// ---------------------------------------------------------------------------
// Saving

export interface SaveModelOptions {
  /** Storage dtype of the weights (default float32). */
  dtype?: ModelDtype;
  /** Split the weights across this many files with a model.safetensors.index.json (default 1: model.safetensors). */
  shards?: number;
  /** Replace a non-empty output directory (default false: refuse). */
  overwrite?: boolean;
}

function shardName(i: number, n: number): string {
  return `model-${String(i + 1).padStart(5, '0')}-of-${String(n).padStart(5, '0')}.safetensors`;
}

/** Write config.json and the weights (one file or shards with an index) into an existing directory. */
export async function writeModelFiles(
  dir: string,
  rawConfig: Record<string, unknown>,
  weights: TensorMap,
  opts: { dtype?: ModelDtype; shards?: number } = {},
): Promise<string[]> {
  const dtype = opts.dtype ?? 'float32';
  if (!(dtype in ST_DTYPE)) throw new Error(`dtype must be one of ${Object.keys(ST_DTYPE).join(', ')}, got ${JSON.stringify(dtype)}`);
  const shards = opts.shards ?? 1;
  const names = [...weights.keys()];
  if (!Number.isInteger(shards) || shards < 1 || shards > Math.max(1, names.length)) {
    throw new Error(`shards must be an integer from 1 to the number of weights (${names.length}), got ${shards}`);
  }
  const entry = (t: Tensor): StWriteEntry => ({ dtype: ST_DTYPE[dtype], shape: t.shape, data: t.data });
  const meta = { format: 'pt' };
  const written: string[] = ['config.json'];
  await writeFile(join(dir, 'config.json'), `${JSON.stringify({ ...rawConfig, torch_dtype: dtype }, null, 2)}\n`);
  if (shards === 1) {
    const m = new Map<string, StWriteEntry>();
    for (const [k, t] of weights) m.set(k, entry(t));
    await writeFile(join(dir, 'model.safetensors'), serializeSafetensors(m, meta));
    written.push('model.safetensors');
    return written;
  }
  // Contiguous groups of roughly equal byte size.
  const total = names.reduce((s, k) => s + numel(weights.get(k)!.shape), 0);
  const groups: string[][] = Array.from({ length: shards }, () => []);
  let acc = 0;
  let g = 0;
  for (let i = 0; i < names.length; i++) {
    const namesLeft = names.length - i;
    const groupsAfter = shards - 1 - g;
    if (groupsAfter > 0 && groups[g]!.length > 0 && (namesLeft <= groupsAfter || acc >= (total * (g + 1)) / shards)) g++;
    groups[g]!.push(names[i]!);
    acc += numel(weights.get(names[i]!)!.shape);
  }
  const weightMap: Record<string, string> = {};
  let totalBytes = 0;
  for (let s = 0; s < shards; s++) {
    const file = shardName(s, shards);
    const m = new Map<string, StWriteEntry>();
    for (const k of groups[s]!) {
      m.set(k, entry(weights.get(k)!));
      weightMap[k] = file;
    }
    const bytes = serializeSafetensors(m, meta);
    for (const e of m.values()) totalBytes += numel(e.shape) * (dtype === 'float32' ? 4 : 2);
    await writeFile(join(dir, file), bytes);
    written.push(file);
  }
  const sortedMap: Record<string, string> = {};
  for (const k of Object.keys(weightMap).sort()) sortedMap[k] = weightMap[k]!;
  const index = { metadata: { total_size: totalBytes }, weight_map: sortedMap };
  await writeFile(join(dir, SHARD_INDEX), `${JSON.stringify(index, null, 2)}\n`);
  written.push(SHARD_INDEX);
  return written;
}

/** Tokenizer side files copied along with tokenizer.json when they sit next to it. */
const TOKENIZER_SIDE_FILES = ['tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json'];

/**
 * Write a full Hugging Face model directory (config.json, model.safetensors,
 * tokenizer.json and its side files copied) atomically: everything goes into a
 * temporary directory that is renamed to `dir` at the end.
 */
export async function saveModel(
  dir: string,
  model: { config: ModelConfig; rawConfig?: Record<string, unknown>; weights: TensorMap },
  tokenizerJsonPath?: string,
  opts: SaveModelOptions = {},
): Promise<void> {
  checkWeights(model.config, model.weights, `saveModel(${dir})`);
  for (const [name, t] of model.weights) {
    for (let i = 0; i < t.data.length; i++) {
      if (!Number.isFinite(t.data[i]!)) throw new Error(`saveModel(${dir}): weight ${name} has a non-finite value ${t.data[i]} at index ${i}`);
    }
  }
  const rawConfig = model.rawConfig ?? hfConfig(model.config, opts.dtype);
  if (tokenizerJsonPath !== undefined && !(await exists(tokenizerJsonPath))) {
    throw new Error(`saveModel: tokenizer file ${tokenizerJsonPath} not found`);
  }
  await writeDirAtomic(
    dir,
    async (tmp) => {
      await writeModelFiles(tmp, rawConfig, model.weights, { dtype: opts.dtype, shards: opts.shards });
      if (tokenizerJsonPath !== undefined) {
        await copyFile(tokenizerJsonPath, join(tmp, 'tokenizer.json'));
        for (const f of TOKENIZER_SIDE_FILES) {
          const src = join(dirname(tokenizerJsonPath), f);
          if (await exists(src)) await copyFile(src, join(tmp, f));
        }
      }
    },
    { overwrite: opts.overwrite },
  );
}
