/**
 * Tiny random models in Hugging Face layout, for tests, demos and benchmarks:
 * config.json with the real fields of the chosen model_type, weights
 * initialized as transformers does (normal(0, 0.02), norms 1, biases 0, gpt2
 * c_proj scaled by 1/sqrt(2 * n_layer)), and a byte-level BPE tokenizer.json
 * that round-trips any UTF-8 text.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { TensorMap } from '../../common/tensor.ts';
import { numel } from '../../common/tensor.ts';
import { createRng } from '../../common/random.ts';
import { writeDirAtomic } from '../../common/atomic.ts';
import type { ModelConfig } from '../../common/model-config.ts';
import { expectedWeightShapes, hfConfig, normalizeConfig, type ModelDtype } from '../../common/hf-model.ts';
import { writeModelFiles } from './model.ts';

export type InitArch = 'llama' | 'qwen2' | 'qwen3' | 'mistral' | 'gemma2' | 'phi3' | 'gpt2';
export const INIT_ARCHS: readonly InitArch[] = ['llama', 'qwen2', 'qwen3', 'mistral', 'gemma2', 'phi3', 'gpt2'];

export interface InitModelOptions {
  arch: InitArch;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  /** llama family only (default numHeads). */
  numKvHeads?: number;
  /** Default: 4 * hidden for gpt2, 8/3 * hidden rounded up to a multiple of 8 for the llama family. */
  intermediateSize?: number;
  /** Default 512. */
  maxPositions?: number;
  /** Default true for gpt2 (always tied), false otherwise. */
  tieWordEmbeddings?: boolean;
  /** Default 0. */
  seed?: number;
  /** Storage dtype (default float32). */
  dtype?: ModelDtype;
  /** Write a sharded checkpoint with this many files and an index (default 1). */
  shards?: number;
  /** Replace a non-empty output directory (default false). */
  overwrite?: boolean;
}

// ---------------------------------------------------------------------------
// Byte-level BPE tokenizer

/** GPT-2's reversible byte -> printable character map (bytes_to_unicode). */
export function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const table: string[] = new Array(256);
  for (const b of bs) table[b] = String.fromCodePoint(b);
  let n = 0;
  for (let b = 0; b < 256; b++) if (table[b] === undefined) table[b] = String.fromCodePoint(256 + n++);
  return table;
}

/** A few common English merges so that the tokenizer does some real BPE work. */
const MERGES: Array<[string, string]> = [
  ['Ġ', 't'],
  ['Ġ', 'a'],
  ['h', 'e'],
  ['i', 'n'],
  ['r', 'e'],
  ['o', 'n'],
  ['Ġt', 'he'],
  ['e', 'r'],
  ['Ġ', 's'],
  ['a', 't'],
  ['e', 'n'],
  ['Ġ', 'w'],
];

interface SpecialTokens {
  tokens: string[];
  bos: string | null;
  eos: string;
  pad: string | null;
}

function specialTokens(arch: InitArch): SpecialTokens {
  switch (arch) {
    case 'gpt2':
      return { tokens: ['<|endoftext|>'], bos: '<|endoftext|>', eos: '<|endoftext|>', pad: null };
    case 'qwen2':
    case 'qwen3':
      return { tokens: ['<|endoftext|>', '<|im_start|>', '<|im_end|>'], bos: null, eos: '<|endoftext|>', pad: '<|endoftext|>' };
    default:
      return { tokens: ['<s>', '</s>', '<pad>'], bos: '<s>', eos: '</s>', pad: '<pad>' };
  }
}

export interface ByteLevelTokenizer {
  tokenizerJson: Record<string, unknown>;
  tokenizerConfig: Record<string, unknown>;
  vocabSize: number;
  bosId: number | null;
  eosId: number;
  padId: number | null;
}

/** tokenizer.json (Hugging Face tokenizers format) of a byte-level BPE model with these pieces, merges and special tokens. */
export function byteLevelBpeJson(
  vocab: Record<string, number>,
  merges: ReadonlyArray<readonly [string, string]>,
  added: ReadonlyArray<{ id: number; content: string }>,
): Record<string, unknown> {
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added.map(({ id, content }) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true })),
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: merges.map(([a, b]) => `${a} ${b}`),
    },
  };
}

/**
 * A byte-level BPE tokenizer.json: ids 0..255 are the 256 bytes, then a few
 * merges, then the special tokens of the architecture.
 */
export function byteLevelTokenizer(arch: InitArch, maxLength = 512): ByteLevelTokenizer {
  const byteChars = bytesToUnicode();
  const vocab: Record<string, number> = {};
  byteChars.forEach((c, i) => (vocab[c] = i));
  let next = 256;
  for (const [a, b] of MERGES) {
    if (vocab[a] === undefined || vocab[b] === undefined) throw new Error(`internal: merge ${a} ${b} uses an unknown piece`);
    vocab[a + b] = next++;
  }
  const sp = specialTokens(arch);
  const added = sp.tokens.map((content) => {
    const id = next++;
    vocab[content] = id;
    return { id, content };
  });
  const idOf = (t: string | null) => (t === null ? null : vocab[t]!);
  const tokenizerJson = byteLevelBpeJson(vocab, MERGES, added);
  const tokenizerConfig: Record<string, unknown> = {
    tokenizer_class: arch === 'gpt2' ? 'GPT2Tokenizer' : 'PreTrainedTokenizerFast',
    bos_token: sp.bos,
    eos_token: sp.eos,
    pad_token: sp.pad,
    unk_token: null,
    add_bos_token: false,
    add_eos_token: false,
    clean_up_tokenization_spaces: false,
    model_max_length: maxLength,
  };
  return { tokenizerJson, tokenizerConfig, vocabSize: next, bosId: idOf(sp.bos), eosId: idOf(sp.eos)!, padId: idOf(sp.pad) };
}

// ---------------------------------------------------------------------------
// Model

function checkPositiveInt(v: unknown, name: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1) throw new Error(`initModel: ${name} must be a positive integer, got ${JSON.stringify(v)}`);
  return v;
}

/** Validate the options and build the normalized config of the model to create. */
export function initConfig(opts: InitModelOptions, tokenizer: ByteLevelTokenizer): ModelConfig {
  if (!INIT_ARCHS.includes(opts.arch)) throw new Error(`initModel: arch must be one of ${INIT_ARCHS.join(', ')}, got ${JSON.stringify(opts.arch)}`);
  const H = checkPositiveInt(opts.hiddenSize, 'hiddenSize');
  const L = checkPositiveInt(opts.numLayers, 'numLayers');
  const nH = checkPositiveInt(opts.numHeads, 'numHeads');
  if (H % nH !== 0) throw new Error(`initModel: hiddenSize (${H}) must be divisible by numHeads (${nH})`);
  const headDim = H / nH;
  const maxPositions = checkPositiveInt(opts.maxPositions ?? 512, 'maxPositions');
  const gpt2 = opts.arch === 'gpt2';
  if (gpt2) {
    if (opts.numKvHeads !== undefined && opts.numKvHeads !== nH) {
      throw new Error(`initModel: gpt2 has no grouped-query attention; numKvHeads must equal numHeads (${nH}) or be left out`);
    }
    if (opts.tieWordEmbeddings === false) throw new Error('initModel: gpt2 always ties its embeddings; tieWordEmbeddings cannot be false');
  }
  const nKv = checkPositiveInt(opts.numKvHeads ?? nH, 'numKvHeads');
  if (nH % nKv !== 0) throw new Error(`initModel: numKvHeads (${nKv}) must divide numHeads (${nH})`);
  if (!gpt2 && headDim % 2 !== 0) throw new Error(`initModel: head dim hiddenSize/numHeads = ${headDim} must be even for rotary embeddings`);
  const intermediate = checkPositiveInt(opts.intermediateSize ?? (gpt2 ? 4 * H : Math.ceil((8 * H) / 3 / 8) * 8), 'intermediateSize');
  if (opts.arch === 'gemma2' || opts.arch === 'phi3') {
    // The fields these checkpoints ship with (Gemma 2 2B: soft-capping 50 / 30, query_pre_attn_scalar = head_dim,
    // a sliding window of half the context (4096 of 8192) on every other layer; Phi-3-mini-4k: fused qkv_proj / gate_up_proj), read back through the loader.
    const shared = {
      model_type: opts.arch,
      vocab_size: tokenizer.vocabSize,
      hidden_size: H,
      intermediate_size: intermediate,
      num_hidden_layers: L,
      num_attention_heads: nH,
      num_key_value_heads: nKv,
      max_position_embeddings: maxPositions,
      rms_norm_eps: 1e-6,
      rope_theta: 10000,
      bos_token_id: tokenizer.bosId,
      eos_token_id: tokenizer.eosId,
    };
    const raw =
      opts.arch === 'gemma2'
        ? { ...shared, head_dim: headDim, hidden_activation: 'gelu_pytorch_tanh', query_pre_attn_scalar: headDim, attn_logit_softcapping: 50.0, final_logit_softcapping: 30.0, sliding_window: Math.max(1, Math.floor(maxPositions / 2)), tie_word_embeddings: opts.tieWordEmbeddings ?? true }
        : { ...shared, hidden_act: 'silu', original_max_position_embeddings: maxPositions, sliding_window: null, rope_scaling: null, tie_word_embeddings: opts.tieWordEmbeddings ?? false };
    return normalizeConfig(raw, `fedtune model init --arch ${opts.arch}`);
  }
  return {
    family: gpt2 ? 'gpt2' : 'llama',
    modelType: opts.arch,
    vocabSize: tokenizer.vocabSize,
    hiddenSize: H,
    intermediateSize: intermediate,
    numLayers: L,
    numHeads: nH,
    numKvHeads: gpt2 ? nH : nKv,
    headDim,
    maxPositions,
    normEps: gpt2 ? 1e-5 : 1e-6,
    ropeTheta: 10000,
    tieWordEmbeddings: gpt2 ? true : (opts.tieWordEmbeddings ?? false),
    qkvBias: gpt2 || opts.arch === 'qwen2',
    activation: gpt2 ? 'gelu_new' : 'silu',
    ...(opts.arch === 'qwen3' ? { qkNorm: true } : {}),
    bosTokenId: tokenizer.bosId,
    eosTokenId: tokenizer.eosId,
  };
}

/** Random weights as transformers initializes them, deterministic per seed. */
export function initWeights(config: ModelConfig, seed = 0): TensorMap {
  const rng = createRng(seed);
  const std = 0.02;
  const projStd = std / Math.sqrt(2 * config.numLayers);
  const weights: TensorMap = new Map();
  for (const [name, shape] of expectedWeightShapes(config)) {
    const data = new Float32Array(numel(shape));
    const isNorm = /(layernorm|norm|ln_\d|ln_f)\.weight$/.test(name);
    if (name.endsWith('.bias')) {
      // zeros
    } else if (isNorm) {
      data.fill(config.gemma2 ? 0 : 1); // gemma2's RMSNorm scales by (1 + weight): transformers initialises it at 0
    } else {
      const s = config.family === 'gpt2' && name.endsWith('c_proj.weight') ? projStd : std;
      for (let i = 0; i < data.length; i++) data[i] = rng.normal() * s;
    }
    weights.set(name, { shape: [...shape], data });
  }
  return weights;
}

/** Write a tiny random model directory (config.json, safetensors, tokenizer.json, tokenizer_config.json). */
export async function initModel(dir: string, opts: InitModelOptions): Promise<void> {
  const tokenizer = byteLevelTokenizer(opts.arch, opts.maxPositions ?? 512);
  const config = initConfig(opts, tokenizer);
  const dtype = opts.dtype ?? 'float32';
  if (!['float32', 'float16', 'bfloat16'].includes(dtype)) {
    throw new Error(`initModel: dtype must be float32, float16 or bfloat16, got ${JSON.stringify(dtype)}`);
  }
  const weights = initWeights(config, opts.seed ?? 0);
  const raw = hfConfig(config, dtype);
  await writeDirAtomic(
    dir,
    async (tmp) => {
      await writeModelFiles(tmp, raw, weights, { dtype, shards: opts.shards });
      await writeFile(join(tmp, 'tokenizer.json'), `${JSON.stringify(tokenizer.tokenizerJson, null, 2)}\n`);
      await writeFile(join(tmp, 'tokenizer_config.json'), `${JSON.stringify(tokenizer.tokenizerConfig, null, 2)}\n`);
    },
    { overwrite: opts.overwrite },
  );
}
