/**
 * Text generation: a prompt's continuation by a base model, optionally with a
 * LoRA adapter applied (the engine's LoRA graph path, so a trained adapter can
 * be sampled as it was trained).
 *
 * Two paths produce the same tokens:
 * - KV cache (default): a prefill graph runs the whole prompt once and returns
 *   every layer's keys and values; then a step graph runs one token at a time
 *   against the cached keys and values of the positions before it
 *   (buildCausalLmGraph with `decode`, model-graph.ts). The cache is a fixed
 *   block of `capacity` positions per layer, held here in JS; each step's
 *   additive mask hides the slots not written yet and, for sliding-window
 *   layers, the positions outside the window; rotary cos/sin (llama family) or
 *   position ids (gpt2) of the new position are fed to the step.
 * - Recompute: the existing forward graph over the whole sequence at every
 *   step (Engine.forward, one padded window): the reference for the equality
 *   test and the baseline of bench/generate.ts.
 *
 * Sampling follows transformers' logits processors, in their order:
 * temperature, then top-k, then top-p (nucleus). Temperature 0 means greedy
 * decoding (argmax; top-k and top-p cannot change the argmax); the draw uses
 * fedtune's seeded RNG (common/random.ts), so a seed reproduces a sample.
 * Generation stops at max_new_tokens, at any of the EOS ids (Llama 3 lists
 * several), or when the decoded new text contains a stop string (the text is
 * cut before it).
 *
 * Models with dynamic NTK or LongRoPE scaling change their rotary frequencies
 * with the sequence length: there, as in transformers' cache, cached keys keep
 * the rotation of the step that computed them, which differs from recomputing
 * the whole sequence once it outgrows the original context.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { FloatArray, TensorMap } from '../../common/tensor.ts';
import type { LoadedModel, LoraConfig } from '../../common/model-config.ts';
import { createRng, type Rng } from '../../common/random.ts';
import type { FloatDType } from './graph.ts';
import { buildCausalLmGraph, ropeCosSin } from './model-graph.ts';
import { Engine, argmax } from './engine.ts';
import { createSession, ort, type Device, type RuntimeSession } from './runtime.ts';
import { externalDataOptions, halfGraphFor, halfModel, halfWeights, isHalfCompute, type ComputeDtype } from './half.ts';

// ---------------------------------------------------------------------------
// Options

export interface SamplingOptions {
  /** 0 (default): greedy decoding. > 0: sample from softmax(logits / temperature). */
  temperature?: number;
  /** Keep the k most likely tokens (ties with the k-th kept, as transformers does); 0 (default): off. */
  topK?: number;
  /** Nucleus: keep the smallest set of most likely tokens whose probability sums to >= p (at least one); 1 (default): off. */
  topP?: number;
  /** Seed of the sampling RNG (default 0). */
  seed?: number;
}

export interface GenerateOptions extends SamplingOptions {
  maxNewTokens: number;
  /** Stop after producing any of these tokens (it is kept in `tokens`, not in `text`). */
  eosIds?: number[];
  /** Stop when the decoded new text contains one of these; `text` ends before it. Needs `decode`. */
  stopStrings?: string[];
  /** Token ids -> text, for stop strings and `text`. */
  decode?: (ids: number[]) => string;
  /** false: recompute the whole sequence at every step instead of using the KV cache. Default true. */
  kvCache?: boolean;
  /** Keep the logits of every step (the distribution each new token was drawn from). */
  keepLogits?: boolean;
}

export type StopReason = 'eos' | 'stop_string' | 'max_new_tokens';

export interface GenerateResult {
  /** The new tokens (the EOS or the token that completed a stop string included). */
  tokens: number[];
  /** With `decode`: the new text, without the EOS and cut before a stop string. */
  text?: string;
  stopReason: StopReason;
  promptTokens: number;
  /** Wall time of prefill and steps (graph building excluded: see buildSeconds). */
  seconds: number;
  /** New tokens per second over `seconds`. */
  tokensPerSec: number;
  /** Seconds spent building and loading graphs for this call (0 when reused). */
  buildSeconds: number;
  /** With keepLogits: step i's logits [V] (raw, before sampling processors). */
  logits?: FloatArray[];
}

/** Checks every option and returns them with defaults filled in; each error names the field and the accepted values. */
export function validateGenerateOptions(o: GenerateOptions, vocabSize: number): Required<SamplingOptions> & { maxNewTokens: number; eosIds: number[]; stopStrings: string[] } {
  const bad = (field: string, v: unknown, want: string): never => {
    throw new Error(`generate: ${field} is ${typeof v === 'string' ? JSON.stringify(v) : String(v)}; expected ${want}`);
  };
  if (!Number.isSafeInteger(o.maxNewTokens) || o.maxNewTokens < 1) bad('max_new_tokens (--max-new-tokens)', o.maxNewTokens, 'an integer >= 1');
  const temperature = o.temperature ?? 0;
  if (typeof temperature !== 'number' || !Number.isFinite(temperature) || temperature < 0) {
    bad('temperature (--temperature)', temperature, 'a finite number >= 0 (0: greedy decoding)');
  }
  const topK = o.topK ?? 0;
  if (!Number.isSafeInteger(topK) || topK < 0) bad('top_k (--top-k)', topK, 'an integer >= 0 (0: off)');
  const topP = o.topP ?? 1;
  if (typeof topP !== 'number' || !(topP > 0 && topP <= 1)) bad('top_p (--top-p)', topP, 'a number in (0, 1] (1: off)');
  const seed = o.seed ?? 0;
  if (!Number.isSafeInteger(seed)) bad('seed (--seed)', seed, 'an integer');
  const eosIds = o.eosIds ?? [];
  for (const id of eosIds) {
    if (!Number.isInteger(id) || id < 0 || id >= vocabSize) bad('eos_token_id', id, `token ids in [0, ${vocabSize}) (the model's vocabulary)`);
  }
  const stopStrings = o.stopStrings ?? [];
  for (const s of stopStrings) {
    if (typeof s !== 'string' || s.length === 0) bad('stop string (--stop)', s, 'a non-empty string');
  }
  if (stopStrings.length > 0 && !o.decode) throw new Error('generate: stop strings need a decode function (the tokenizer) to match the text');
  return { maxNewTokens: o.maxNewTokens, temperature, topK, topP, seed, eosIds, stopStrings };
}

// ---------------------------------------------------------------------------
// Sampling

/**
 * The scores sampling draws from, as transformers' warpers make them in
 * order: logits / temperature; top-k (scores below the k-th largest become
 * -Infinity; ties with it stay); top-p (sort ascending, remove the tokens
 * whose cumulative probability is <= 1 - p, always keeping the most likely).
 */
export function processLogits(logits: ArrayLike<number>, o: { temperature: number; topK?: number; topP?: number }): Float64Array {
  const V = logits.length;
  const s = Float64Array.from(logits, (x) => x / o.temperature);
  const k = Math.min(o.topK ?? 0, V);
  if (k > 0 && k < V) {
    const kth = Float64Array.from(s).sort()[V - k]!; // ascending: the k-th largest
    for (let i = 0; i < V; i++) if (s[i]! < kth) s[i] = -Infinity;
  }
  const p = o.topP ?? 1;
  if (p < 1) {
    // Stable ascending order (equal scores by index).
    const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => s[a]! - s[b]! || a - b);
    const probs = softmax(s);
    let cum = 0;
    for (let j = 0; j < V - 1; j++) {
      const i = order[j]!;
      cum += probs[i]!;
      if (cum <= 1 - p) s[i] = -Infinity;
    }
  }
  return s;
}

function softmax(s: Float64Array): Float64Array {
  let max = -Infinity;
  for (const x of s) if (x > max) max = x;
  const e = Float64Array.from(s, (x) => (x === -Infinity ? 0 : Math.exp(x - max)));
  let total = 0;
  for (const x of e) total += x;
  for (let i = 0; i < e.length; i++) e[i] = e[i]! / total;
  return e;
}

/** The next token: argmax with temperature 0, else one draw (u = rng.next()) from softmax(processLogits(...)). */
export function sampleToken(logits: FloatArray, o: { temperature: number; topK?: number; topP?: number }, rng: Rng): number {
  if (o.temperature === 0) return argmax(logits, 0, logits.length);
  const probs = softmax(processLogits(logits, o));
  const u = rng.next();
  let acc = 0;
  let last = 0;
  for (let i = 0; i < probs.length; i++) {
    if (probs[i]! === 0) continue;
    last = i;
    acc += probs[i]!;
    if (u < acc) return i;
  }
  return last; // rounding left u above the total
}

// ---------------------------------------------------------------------------
// EOS ids

function eosField(v: unknown, where: string): number[] {
  if (v === undefined || v === null) return [];
  const list = Array.isArray(v) ? v : [v];
  for (const x of list) {
    if (!Number.isInteger(x) || (x as number) < 0) {
      throw new Error(`${where}: eos_token_id is ${JSON.stringify(v)}; expected a token id or a list of token ids`);
    }
  }
  return list as number[];
}

async function readJsonIfExists(path: string): Promise<Record<string, unknown> | null> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw new Error(`${path}: not valid JSON (${(err as Error).message})`);
  }
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error(`${path}: must be a JSON object`);
  return v as Record<string, unknown>;
}

/**
 * The ids that end generation: generation_config.json's eos_token_id (an int
 * or a list: Llama 3 ships [128001, 128008, 128009]), then config.json's, then
 * the tokenizer's EOS token, without repeats.
 */
export async function readEosIds(modelDir: string, tokenizerEos: number | null = null): Promise<number[]> {
  const ids: number[] = [];
  for (const file of ['generation_config.json', 'config.json']) {
    const path = join(modelDir, file);
    const j = await readJsonIfExists(path);
    if (j) ids.push(...eosField(j.eos_token_id, path));
  }
  if (tokenizerEos !== null) ids.push(tokenizerEos);
  return [...new Set(ids)];
}

// ---------------------------------------------------------------------------
// Generator

export interface GeneratorOptions {
  /** A LoRA adapter to apply: its config and its tensors under PEFT keys (common/peft.ts readPeftAdapter). */
  adapter?: { lora: LoraConfig; params: TensorMap };
  /** float32 (default) or float64. */
  dtype?: FloatDType;
  threads?: number;
  device?: Device;
  /**
   * float16: the model's matrices held in float16 (a model loaded so by loadBaseModel is taken as it
   * is, another converted) under an adapter (half.ts; products in float16 on CUDA, widened on CPU).
   */
  computeDtype?: ComputeDtype;
}

interface DecodeGraph {
  rt: RuntimeSession;
  /** Weights and adapter tensors, fed on every run. */
  fixed: Record<string, ort.Tensor>;
}

/** Next-token logits of a sequence, one new token at a time. */
interface Stepper {
  /** Logits after the prompt. */
  prefill(prompt: number[]): Promise<FloatArray>;
  /** Logits after appending `token` (at position `pos`). */
  step(token: number, pos: number): Promise<FloatArray>;
}

const MASKED = -1e9; // the training graph's mask value

export class Generator {
  private readonly graphs = new Map<string, Promise<DecodeGraph>>();
  private engine: Engine | null = null;
  private readonly dtype: FloatDType;
  private readonly tensors = new Map<string, ort.Tensor>();

  /** The model as the graphs take it: with float16 compute, its matrices in float16 (halfModel keeps a model already so). */
  readonly model: LoadedModel;

  constructor(model: LoadedModel, private readonly opts: GeneratorOptions = {}) {
    this.dtype = opts.dtype ?? 'float32';
    const d = opts.computeDtype ?? 'float32';
    if (d !== 'float32' && !opts.adapter) throw new Error(`--compute-dtype ${d} generates with an adapter on ${d} base weights; give --adapter (the base alone runs in float32)`);
    this.model = d === 'float16' ? halfModel(model) : model;
    // Validates the adapter's targets against the model now (and that a bfloat16 model was loaded for it).
    if (opts.adapter) Engine.create(this.model, { mode: 'lora', lora: opts.adapter.lora, ...(d !== 'float32' ? { computeDtype: d } : {}) });
  }

  /** Generate up to maxNewTokens tokens after `prompt`. */
  async generate(prompt: number[], o: GenerateOptions): Promise<GenerateResult> {
    const { config } = this.model;
    const V = config.vocabSize;
    const v = validateGenerateOptions(o, V);
    if (prompt.length === 0) throw new Error('generate: the prompt is empty (no tokens); give some text, or a tokenizer with a BOS token');
    prompt.forEach((id, i) => {
      if (!Number.isInteger(id) || id < 0 || id >= V) throw new Error(`generate: prompt token ${id} at position ${i} is outside the vocabulary [0, ${V})`);
    });
    // Positions fed: the prompt's, then every new token but the last.
    const fed = prompt.length + v.maxNewTokens - 1;
    if (fed > config.maxPositions && config.ropeScaling?.type !== 'dynamic') {
      throw new Error(
        `generate: the prompt (${prompt.length} tokens) plus max_new_tokens (${v.maxNewTokens}) needs ${fed} positions, ` +
          `more than the model's max_position_embeddings ${config.maxPositions}; shorten the prompt or lower --max-new-tokens`,
      );
    }
    const t0 = performance.now();
    const stepper = o.kvCache === false ? await this.recomputeStepper(fed) : await this.kvStepper(prompt.length, fed);
    const buildSeconds = (performance.now() - t0) / 1000;

    const rng = createRng(v.seed);
    const eos = new Set(v.eosIds);
    const tokens: number[] = [];
    const kept: FloatArray[] = [];
    let stopReason: StopReason = 'max_new_tokens';
    let text: string | undefined;
    const start = performance.now();
    let logits = await stepper.prefill(prompt);
    for (;;) {
      if (o.keepLogits) kept.push(logits.slice());
      const next = sampleToken(logits, v, rng);
      tokens.push(next);
      if (eos.has(next)) {
        stopReason = 'eos';
        break;
      }
      if (v.stopStrings.length > 0) {
        const t = o.decode!(tokens);
        let cut = -1;
        for (const s of v.stopStrings) {
          const at = t.indexOf(s);
          if (at >= 0 && (cut < 0 || at < cut)) cut = at;
        }
        if (cut >= 0) {
          stopReason = 'stop_string';
          text = t.slice(0, cut);
          break;
        }
      }
      if (tokens.length >= v.maxNewTokens) break;
      logits = await stepper.step(next, prompt.length + tokens.length - 1);
    }
    const seconds = (performance.now() - start) / 1000;
    if (text === undefined && o.decode) text = o.decode(stopReason === 'eos' ? tokens.slice(0, -1) : tokens);
    return {
      tokens,
      ...(text !== undefined ? { text } : {}),
      stopReason,
      promptTokens: prompt.length,
      seconds,
      tokensPerSec: seconds > 0 ? tokens.length / seconds : Infinity,
      buildSeconds,
      ...(o.keepLogits ? { logits: kept } : {}),
    };
  }

  async close(): Promise<void> {
    const all = [...this.graphs.values()];
    this.graphs.clear();
    for (const p of all) {
      try {
        await (await p).rt.session.release();
      } catch {
        // a graph that failed to build has nothing to release
      }
    }
    await this.engine?.close();
    this.engine = null;
  }

  // ---- KV cache ----------------------------------------------------------------

  private async kvStepper(promptLen: number, fed: number): Promise<Stepper> {
    const { config } = this.model;
    const gpt2 = config.family === 'gpt2';
    const kvHeads = gpt2 ? config.numHeads : config.numKvHeads;
    const hd = config.headDim;
    const L = config.numLayers;
    // Cache slots for every position a step attends to (0 .. fed - 2), rounded up so that
    // calls of similar lengths share the step graph.
    const need = fed - 1;
    const limit = config.ropeScaling?.type === 'dynamic' ? Infinity : config.maxPositions - 1;
    const capacity = Math.max(need, Math.min(Math.ceil(need / 32) * 32, limit));
    const [prefillGraph, stepGraph] = await Promise.all([
      this.decodeGraph(promptLen, 0),
      need > 0 ? this.decodeGraph(1, capacity) : Promise.resolve(null),
    ]);
    const floats = (n: number): FloatArray => (this.dtype === 'float64' ? new Float64Array(n) : new Float32Array(n));
    const slot = kvHeads * capacity * hd;
    const cache = Array.from({ length: L }, () => ({ key: floats(slot), value: floats(slot) }));
    const sw = config.slidingWindow;

    /** Write the new positions' keys and values [1, kvHeads, S, hd] into slots p0 .. p0 + S - 1. */
    const store = (out: ort.InferenceSession.ReturnType, p0: number, S: number): void => {
      if (need === 0) return;
      for (let l = 0; l < L; l++) {
        for (const which of ['key', 'value'] as const) {
          const src = out[`present.${l}.${which}`]!.data as FloatArray;
          const dst = cache[l]![which];
          for (let h = 0; h < kvHeads; h++) {
            for (let s = 0; s < S && p0 + s < capacity; s++) {
              dst.set(src.subarray((h * S + s) * hd, (h * S + s + 1) * hd), (h * capacity + p0 + s) * hd);
            }
          }
        }
      }
    };
    /** Masks [S, past + S] for new positions p0..p0+S-1 over cache slots 0..past-1 (valid below p0) and the new ones. */
    const masks = (p0: number, S: number, past: number, window: number): FloatArray => {
      const m = floats(S * (past + S));
      for (let i = 0; i < S; i++) {
        const q = p0 + i;
        for (let j = 0; j < past + S; j++) {
          const k = j < past ? j : p0 + (j - past);
          const visible = (j < past ? k < p0 : k <= q) && q - k < window;
          m[i * (past + S) + j] = visible ? 0 : MASKED;
        }
      }
      return m;
    };
    const run = async (graph: DecodeGraph, ids: number[], p0: number, past: number): Promise<FloatArray> => {
      const S = ids.length;
      const positions = ids.map((_, i) => p0 + i);
      const feeds: Record<string, ort.Tensor> = {
        ...graph.fixed,
        input_ids: new ort.Tensor('int64', BigInt64Array.from(ids, (x) => BigInt(x)), [S]),
        attn_mask: new ort.Tensor(this.dtype, masks(p0, S, past, Infinity), [S, past + S]),
      };
      if (sw) feeds.sliding_mask = new ort.Tensor(this.dtype, masks(p0, S, past, sw.size), [S, past + S]);
      if (gpt2) {
        feeds.position_ids = new ort.Tensor('int64', BigInt64Array.from(positions, (x) => BigInt(x)), [S]);
      } else {
        // transformers' rotary scaling sees the sequence length p0 + S (dynamic NTK, LongRoPE).
        const { cos, sin } = ropeCosSin(config, positions, p0 + S, this.dtype);
        const cast = (a: Float64Array): FloatArray => (this.dtype === 'float64' ? a : Float32Array.from(a));
        feeds.rope_cos = new ort.Tensor(this.dtype, cast(cos), [S, hd]);
        feeds.rope_sin = new ort.Tensor(this.dtype, cast(sin), [S, hd]);
      }
      if (past > 0) {
        for (let l = 0; l < L; l++) {
          feeds[`past.${l}.key`] = new ort.Tensor(this.dtype, cache[l]!.key, [1, kvHeads, past, hd]);
          feeds[`past.${l}.value`] = new ort.Tensor(this.dtype, cache[l]!.value, [1, kvHeads, past, hd]);
        }
      }
      const out = await graph.rt.session.run(feeds);
      store(out, p0, S);
      return out.logits!.data as FloatArray;
    };
    return {
      prefill: (prompt) => run(prefillGraph, prompt, 0, 0),
      step: (token, pos) => {
        if (!stepGraph || pos > need) throw new Error(`generate: position ${pos} is past the KV cache (${capacity} positions)`);
        return run(stepGraph, [token], pos, capacity);
      },
    };
  }

  /** A decode graph for S new tokens after `pastLen` cache slots, built once per shape. */
  private decodeGraph(S: number, pastLen: number): Promise<DecodeGraph> {
    const key = `${S}:${pastLen}`;
    let p = this.graphs.get(key);
    if (!p) {
      p = (async () => {
        const a = this.opts.adapter;
        const built = buildCausalLmGraph(this.model, {
          batchSize: 1,
          seqLen: S,
          mode: a ? 'lora' : 'full',
          lora: a?.lora,
          dtype: this.dtype,
          kind: 'forward',
          decode: { pastLen },
          ...(isHalfCompute(this.opts.computeDtype) ? { half: halfGraphFor(this.opts.device, this.opts.computeDtype) } : {}),
        });
        const rt = await createSession(built.bytes, {
          threads: this.opts.threads,
          device: this.opts.device,
          ...externalDataOptions(this.model, built.graph.hasExternalData),
          optimization: this.dtype === 'float64' ? 'basic' : 'all',
        });
        const fixed: Record<string, ort.Tensor> = {};
        // Full mode takes every weight as a "parameter" input; LoRA mode takes the adapter's tensors and the frozen weights.
        for (const f of [...built.frozen, ...(a ? [] : built.params)]) {
          const h = halfWeights(this.model)?.get(f.name);
          fixed[f.name] = h ? new ort.Tensor('float16', h.data, f.shape) : this.tensor(f.name, this.model.weights, f.shape, 'model');
        }
        if (a) for (const f of built.params) fixed[f.name] = this.tensor(f.name, a.params, f.shape, 'adapter');
        return { rt, fixed };
      })();
      p.catch(() => this.graphs.delete(key));
      this.graphs.set(key, p);
    }
    return p;
  }

  /** One ort tensor per weight, shared by every graph (cast once for float64 graphs). */
  private tensor(name: string, from: TensorMap, shape: number[], what: string): ort.Tensor {
    const cacheKey = `${what}:${name}`;
    let t = this.tensors.get(cacheKey);
    if (!t) {
      const w = from.get(name);
      if (!w) throw new Error(`generate: the ${what} has no tensor ${name}`);
      if (w.shape.length !== shape.length || w.shape.some((d, i) => d !== shape[i])) {
        throw new Error(`generate: the ${what}'s ${name} has shape [${w.shape}], the model needs [${shape}]`);
      }
      const data = this.dtype === 'float64'
        ? (w.data instanceof Float64Array ? w.data : Float64Array.from(w.data))
        : (w.data instanceof Float32Array ? w.data : Float32Array.from(w.data));
      t = new ort.Tensor(this.dtype, data, shape);
      this.tensors.set(cacheKey, t);
    }
    return t;
  }

  // ---- recompute -----------------------------------------------------------------

  /** The whole sequence through the forward graph at every step, in one window of `fed` positions rounded up (causal: the padding after the sequence changes nothing before it). */
  private async recomputeStepper(fed: number): Promise<Stepper> {
    const { config } = this.model;
    const a = this.opts.adapter;
    this.engine ??= Engine.create(this.model, {
      mode: a ? 'lora' : 'full',
      lora: a?.lora,
      dtype: this.dtype,
      threads: this.opts.threads,
      device: this.opts.device,
      ...(isHalfCompute(this.opts.computeDtype) ? { computeDtype: this.opts.computeDtype } : {}),
    });
    const engine = this.engine;
    const params = a ? a.params : this.model.weights;
    const limit = config.ropeScaling?.type === 'dynamic' ? Infinity : config.maxPositions;
    const T = Math.max(fed, Math.min(Math.ceil(fed / 16) * 16, limit));
    const V = config.vocabSize;
    const ids: number[] = [];
    const forward = async (): Promise<FloatArray> => {
      const inputIds = new Int32Array(T);
      inputIds.set(ids);
      const labels = new Int32Array(T).fill(-100);
      const r = await engine.forward(params, { batchSize: 1, seqLen: T, inputIds, labels });
      return r.logits.slice((ids.length - 1) * V, ids.length * V);
    };
    // Build the session now, outside the timed part.
    ids.push(0);
    await forward();
    ids.length = 0;
    return {
      prefill: async (prompt) => {
        ids.push(...prompt);
        return forward();
      },
      step: async (token) => {
        ids.push(token);
        return forward();
      },
    };
  }
}
