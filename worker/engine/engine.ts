/**
 * The training engine: one loaded base model, ONNX Runtime sessions built once
 * per batch shape and reused, and the calls a trainer needs: loss and
 * gradients of a batch, forward logits, evaluation and generation.
 *
 * Parameters (LoRA adapters, or every weight in full mode) live in JS as a
 * TensorMap owned by the caller and are fed to each run. Frozen base weights
 * are held once, by the loaded model, and fed to the sessions of every batch
 * shape as tensors over that same memory: never copied per step or per session.
 */
import type { FloatArray, TensorMap } from '../../common/tensor.ts';
import { createRng } from '../../common/random.ts';
import { IGNORE_INDEX, type Batch, type LoadedModel, type LoraConfig } from '../../common/model-config.ts';
import type { FloatDType } from './graph.ts';
import { buildCausalLmGraph, type GraphSpec } from './model-graph.ts';
import { initLoraAdapter, loraTargets, peftKey, peftMagnitudeKey, weightRowNorms } from '../../common/lora.ts';
import { createSession, ort, type Device, type RuntimeSession } from './runtime.ts';
import { checkHalfCombination, externalDataOptions, fileWeights, halfGraphFor, halfModel, halfWeights, isHalfCompute, LossScaler, parseComputeDtype, unscaleFinite, type ComputeDtype, type LossScaleOptions } from './half.ts';
import { baseMemory, baseWeightValues, parseQuantizeBase, quantizedBase, quantizedInputData, quantizeModel, type BaseMemory, type QuantFormat } from './quantize.ts';

export interface EngineOptions {
  mode: 'lora' | 'full';
  lora?: LoraConfig;
  /** float32 for training; float64 for gradient checks. */
  dtype?: FloatDType;
  threads?: number;
  device?: Device;
  /** Seed for dropout masks inside training graphs. */
  seed?: number;
  /**
   * 4-bit base weights (QLoRA; LoRA mode only): the decoder's linear weights are
   * held packed (quantize.ts) and dequantised in the graph. Pass a model already
   * quantised with quantizeModel so that its float32 copies are not kept.
   */
  quantizeBase?: QuantFormat;
  /** Recompute each decoder layer in the backward pass instead of keeping its activations (GraphSpec.recompute). */
  recompute?: boolean;
  /**
   * float16: the 2-D base weights held in float16, the rest and the adapters
   * in float32 (half.ts). On CUDA the products with them run in float16, with
   * dynamic loss scaling; on CPU (no float16 Gemm) each weight is widened to
   * float32 for its product. LoRA mode, float32 graphs, no 4-bit base.
   * bfloat16: the 2-D base weights stay in the checkpoint's files in bfloat16
   * (a model from loadBaseModel with compute bfloat16), mapped by ONNX Runtime
   * and widened to float32 for each product, on every device; no loss scaling.
   */
  computeDtype?: ComputeDtype;
  /** float16: the graphs' variant (GraphSpec.half); default 'compute' where the sessions run on CUDA, 'storage' on CPU. */
  halfVariant?: 'compute' | 'storage';
  /** The dynamic loss scale's start and growth interval (float16 compute). */
  lossScale?: LossScaleOptions;
}

export interface LossAndGrads {
  /** Sum of token negative log-likelihoods over the batch's trained tokens. */
  lossSum: number;
  /** Number of trained tokens (the loss's denominator). */
  tokens: number;
  /** Gradients of lossSum (not of the mean) with respect to each parameter. */
  grads: TensorMap;
}

/** One DP-SGD micro-batch: per-example gradients clipped in the graph and summed. */
export interface ClippedGrads {
  /** Sum over the batch's examples of each example's mean token loss. */
  lossSum: number;
  /** Trained tokens of the batch. */
  tokens: number;
  /** Examples with at least one trained token (padding rows have none and contribute nothing). */
  examples: number;
  /** Sum over the examples of the per-example gradients of the mean token loss, each clipped to `clip`. */
  grads: TensorMap;
  /** Per-example gradient norms before clipping, one per batch row (0 for rows without trained tokens). */
  norms: Float64Array;
  /** With outputClipped: the clipped per-example gradients, [B, ...shape]. */
  clipped?: TensorMap;
}

export interface ForwardResult {
  lossSum: number;
  tokens: number;
  /** [batch * seq, vocab], row-major. */
  logits: FloatArray;
}

export interface EvalResult {
  /** Mean token loss over all trained tokens. */
  loss: number;
  perplexity: number;
  tokens: number;
  examples: number;
  /** Fraction of examples whose every response token is the model's top prediction. */
  exactMatch: number;
  /** Fraction of response tokens predicted exactly (teacher forcing). */
  tokenAccuracy: number;
}

export interface GenerateOptions {
  maxNewTokens: number;
  /** 0 (default): greedy. */
  temperature?: number;
  topK?: number;
  seed?: number;
  /** Stop when this token is produced. */
  eosId?: number | null;
  /** Token used to fill the fixed-length window. */
  padId?: number;
}

interface CompiledGraph {
  rt: RuntimeSession;
  params: Array<{ name: string; shape: number[] }>;
  /** Frozen base weights fed from the engine's single copy on every run. */
  frozen: Record<string, ort.Tensor>;
  /** float16 products: the graph takes `loss_scale`. */
  lossScaled: boolean;
}

export class Engine {
  private readonly sessions = new Map<string, Promise<CompiledGraph>>();
  private readonly perExampleSpecs = new Map<string, { frozen: string[]; outputClipped: boolean }>();
  private readonly castWeights = new Map<string, FloatArray>();
  readonly dtype: FloatDType;
  private resolvedDevice: Device | null = null;
  /** float16 compute: the dynamic loss scale (null in float32). */
  readonly lossScaler: LossScaler | null;

  private constructor(readonly model: LoadedModel, readonly opts: EngineOptions) {
    this.dtype = opts.dtype ?? 'float32';
    if (quantizedBase(model) && opts.mode !== 'lora') {
      throw new Error('quantize-base: 4-bit base weights are frozen, so they apply to LoRA training only, not full training (--full); drop one of them');
    }
    if (opts.mode === 'lora') {
      if (!opts.lora) throw new Error('engine: LoRA mode needs a LoRA config (r, alpha, dropout, target_modules)');
      loraTargets(model.config, opts.lora); // validates target modules and ranks now, not at the first step
    }
    this.lossScaler = opts.computeDtype === 'float16' ? new LossScaler(opts.lossScale) : null;
    if (opts.halfVariant && opts.computeDtype !== 'float16') throw new Error('engine: halfVariant applies to computeDtype float16 only');
    this.half = isHalfCompute(opts.computeDtype);
  }

  /** The graphs hold half-precision base weights (--compute-dtype float16 or bfloat16). */
  private readonly half: boolean;

  static create(model: LoadedModel, opts: EngineOptions): Engine {
    const q = parseQuantizeBase(opts.quantizeBase, 'quantizeBase');
    if (q && opts.mode !== 'lora') {
      throw new Error('--quantize-base: 4-bit base weights are frozen, so they apply to LoRA training only, not --full; drop --quantize-base or --full');
    }
    const compute = parseComputeDtype(opts.computeDtype, 'computeDtype');
    if (isHalfCompute(compute)) {
      checkHalfCombination({ computeDtype: compute, full: opts.mode !== 'lora', quantizeBase: q });
      if ((opts.dtype ?? 'float32') !== 'float32') throw new Error(`--compute-dtype ${compute} puts ${compute} weights into float32 graphs, not float64 ones`);
      if (compute === 'float16') return new Engine(halfModel(model), opts);
      if (!fileWeights(model)) {
        throw new Error(`engine: --compute-dtype bfloat16 uses the checkpoint's bfloat16 weights where they lie in its files; load ${model.dir} with loadBaseModel(dir, undefined, { compute: 'bfloat16' })`);
      }
      return new Engine(model, opts);
    }
    if (halfWeights(model)) throw new Error('engine: the model holds float16 base weights (loaded for --compute-dtype float16); create the engine with computeDtype float16 or load the model again');
    if (fileWeights(model)) throw new Error('engine: the model leaves its bfloat16 base weights in their files (loaded for --compute-dtype bfloat16); create the engine with computeDtype bfloat16 or load the model again');
    return new Engine(q ? quantizeModel(model, q) : model, opts);
  }

  /** Bytes held for the base weights (float ones, and packed 4-bit indices and scales with a quantised base). */
  baseMemory(): BaseMemory {
    const m = baseMemory(this.model);
    let cast = 0;
    for (const c of this.castWeights.values()) cast += c.byteLength;
    return { ...m, floatBytes: m.floatBytes + cast, total: m.total + cast };
  }

  /** Device the sessions run on ('cpu' until the first session is built with CUDA available). */
  get device(): Device {
    return this.resolvedDevice ?? 'cpu';
  }

  /** Names and shapes of the trainable parameters, in graph order. */
  paramSpecs(): Array<{ name: string; shape: number[] }> {
    if (this.opts.mode === 'full') return [...this.model.weights].map(([name, t]) => ({ name, shape: t.shape }));
    // Each module at its own rank: lora.r, or its rank_pattern entry.
    // DoRA targets add their magnitude vector [out] after B (as the graph declares them).
    return loraTargets(this.model.config, this.opts.lora!).flatMap((t) => [
      { name: peftKey(t.module, 'A'), shape: [t.r, t.inFeatures] },
      { name: peftKey(t.module, 'B'), shape: [t.outFeatures, t.r] },
      ...(t.dora ? [{ name: peftMagnitudeKey(t.module), shape: [t.outFeatures] }] : []),
    ]);
  }

  /** Fresh trainable parameters: a PEFT-initialized adapter (B = 0; DoRA m = ||W||_c), or a copy of the base weights in full mode. */
  initParams(seed: number): TensorMap {
    if (this.opts.mode === 'lora') {
      const targets = loraTargets(this.model.config, this.opts.lora!);
      const norms = new Map<string, Float64Array>();
      for (const t of targets) {
        // A 4-bit base: the norms of the dequantised W the graph uses (as PEFT does with bitsandbytes).
        if (t.dora) norms.set(t.module, weightRowNorms(t, baseWeightValues(this.model, t.weight)));
      }
      return initLoraAdapter(targets, undefined, seed, this.dtype, norms);
    }
    const out: TensorMap = new Map();
    for (const [name, t] of this.model.weights) {
      out.set(name, { shape: [...t.shape], data: this.dtype === 'float64' ? Float64Array.from(t.data) : Float32Array.from(t.data) });
    }
    return out;
  }

  async lossAndGrads(params: TensorMap, batch: Batch): Promise<LossAndGrads> {
    const g = await this.compiled('train', batch.batchSize, batch.seqLen);
    const { feeds, tokens } = this.feeds(g, params, batch);
    const scaler = g.lossScaled ? this.lossScaler : null;
    for (;;) {
      // float16: the backward is seeded with S / tokens, so the float16 products carry S x the mean loss's gradients.
      const seed = scaler ? scaler.scale / Math.max(tokens, 1) : 1;
      if (scaler) feeds.loss_scale = new ort.Tensor('float32', Float32Array.of(seed), [1]);
      const out = await g.rt.session.run(feeds);
      const lossSum = Number((out.loss_sum!.data as FloatArray)[0]);
      const grads: TensorMap = new Map();
      for (const p of g.params) {
        grads.set(p.name, { shape: [...p.shape], data: out[`grad:${p.name}`]!.data as FloatArray });
      }
      if (!scaler) return { lossSum, tokens, grads };
      if (!Number.isFinite(lossSum)) {
        throw new Error(`--compute-dtype float16: the loss of this batch is ${lossSum} (an activation overflowed float16's range of ±65504); train this model with --compute-dtype float32`);
      }
      if (unscaleFinite([...grads.values()].map((t) => t.data), seed)) {
        scaler.finite();
        return { lossSum, tokens, grads };
      }
      // Scaled gradients overflowed: run the batch again at half the scale.
      if (!scaler.backoff()) return { lossSum, tokens, grads };
    }
  }

  /**
   * DP-SGD: per-example gradients of each example's mean token loss, computed in
   * the graph for the whole batch at once, clipped to L2 norm `clip` and summed.
   * `frozen` parameters (FFA-LoRA's lora_A) count in neither the norms nor the sum.
   */
  async clippedGrads(
    params: TensorMap,
    batch: Batch,
    clip: number,
    o: { frozen?: (name: string) => boolean; outputClipped?: boolean } = {},
  ): Promise<ClippedGrads> {
    if (!(clip > 0) || !Number.isFinite(clip)) throw new Error(`privacy.dp_sgd.max_grad_norm is ${clip}, expected a finite number > 0`);
    if (this.opts.mode !== 'lora') {
      throw new Error('privacy.dp_sgd: per-example gradients are implemented for LoRA training only (not training mode full); use LoRA or remove privacy.dp_sgd');
    }
    if (this.half) checkHalfCombination({ computeDtype: this.opts.computeDtype!, dpSgd: true });
    const frozen = this.paramSpecs().map((p) => p.name).filter((n) => o.frozen?.(n) ?? false);
    const peKey = `${frozen.join(',')}|${o.outputClipped ? 1 : 0}`;
    this.perExampleSpecs.set(peKey, { frozen, outputClipped: o.outputClipped ?? false });
    const g = await this.compiled('train', batch.batchSize, batch.seqLen, peKey);
    const { feeds, tokens, examples } = this.feeds(g, params, batch, true);
    feeds.dp_clip = new ort.Tensor(this.dtype, this.dtype === 'float64' ? Float64Array.of(clip) : Float32Array.of(clip), [1]);
    const out = await g.rt.session.run(feeds);
    const grads: TensorMap = new Map();
    let clipped: TensorMap | undefined;
    for (const p of g.params) {
      grads.set(p.name, { shape: [...p.shape], data: out[`grad:${p.name}`]!.data as FloatArray });
      const c = out[`clipped:${p.name}`];
      if (c) (clipped ??= new Map()).set(p.name, { shape: [batch.batchSize, ...p.shape], data: c.data as FloatArray });
    }
    return {
      lossSum: Number((out.loss_sum!.data as FloatArray)[0]),
      tokens,
      examples,
      grads,
      norms: Float64Array.from(out.per_example_norm!.data as FloatArray),
      ...(clipped ? { clipped } : {}),
    };
  }

  async forward(params: TensorMap, batch: Batch): Promise<ForwardResult> {
    const g = await this.compiled('forward', batch.batchSize, batch.seqLen);
    const { feeds, tokens } = this.feeds(g, params, batch);
    const out = await g.rt.session.run(feeds);
    return { lossSum: Number((out.loss_sum!.data as FloatArray)[0]), tokens, logits: out.logits!.data as FloatArray };
  }

  /** Loss, perplexity and teacher-forced accuracy of the response tokens over a set of batches. */
  async evaluate(params: TensorMap, batches: Batch[]): Promise<EvalResult> {
    let lossSum = 0;
    let tokens = 0;
    let examples = 0;
    let exact = 0;
    let correctTokens = 0;
    const V = this.model.config.vocabSize;
    for (const batch of batches) {
      const r = await this.forward(params, batch);
      lossSum += r.lossSum;
      tokens += r.tokens;
      const T = batch.seqLen;
      for (let b = 0; b < batch.batchSize; b++) {
        let trained = 0;
        let right = 0;
        for (let t = 0; t + 1 < T; t++) {
          const target = batch.labels[b * T + t + 1]!;
          if (target === IGNORE_INDEX) continue;
          trained++;
          if (argmax(r.logits, (b * T + t) * V, V) === target) right++;
        }
        if (trained === 0) continue;
        examples++;
        correctTokens += right;
        if (right === trained) exact++;
      }
    }
    const loss = tokens > 0 ? lossSum / tokens : NaN;
    return {
      loss,
      perplexity: Math.exp(loss),
      tokens,
      examples,
      exactMatch: examples > 0 ? exact / examples : NaN,
      tokenAccuracy: tokens > 0 ? correctTokens / tokens : NaN,
    };
  }

  /** Greedy (temperature 0) or sampled continuation of `prompt` with the given parameters applied. */
  async generate(params: TensorMap, prompt: number[], opts: GenerateOptions): Promise<number[]> {
    if (prompt.length === 0) throw new Error('generate: the prompt is empty');
    const V = this.model.config.vocabSize;
    const maxLen = this.model.config.maxPositions;
    const window = Math.min(maxLen, roundUp(prompt.length + opts.maxNewTokens, 16));
    const rng = createRng(opts.seed ?? 0);
    const ids = [...prompt];
    const out: number[] = [];
    while (out.length < opts.maxNewTokens && ids.length < window) {
      const inputIds = new Int32Array(window).fill(opts.padId ?? 0);
      inputIds.set(ids);
      const labels = new Int32Array(window).fill(IGNORE_INDEX);
      const r = await this.forward(params, { batchSize: 1, seqLen: window, inputIds, labels });
      const off = (ids.length - 1) * V;
      const next = opts.temperature && opts.temperature > 0 ? sample(r.logits, off, V, opts.temperature, opts.topK ?? 0, rng.next()) : argmax(r.logits, off, V);
      out.push(next);
      ids.push(next);
      if (opts.eosId !== undefined && opts.eosId !== null && next === opts.eosId) break;
    }
    return out;
  }

  /** Free every session. */
  async close(): Promise<void> {
    const all = [...this.sessions.values()];
    this.sessions.clear();
    for (const p of all) {
      try {
        await (await p).rt.session.release();
      } catch {
        // a session that failed to build has nothing to release
      }
    }
  }

  // ---------------------------------------------------------------------------

  private compiled(kind: 'train' | 'forward', batchSize: number, seqLen: number, perExample?: string): Promise<CompiledGraph> {
    const key = `${kind}:${batchSize}x${seqLen}${perExample !== undefined ? `:pe:${perExample}` : ''}`;
    let p = this.sessions.get(key);
    if (!p) {
      p = (async () => {
        const spec: GraphSpec = {
          batchSize,
          seqLen,
          mode: this.opts.mode,
          lora: this.opts.lora,
          dtype: this.dtype,
          kind,
          dropoutSeed: this.opts.seed ?? 0,
          ...(this.opts.recompute ? { recompute: true } : {}),
          ...(this.half ? { half: this.halfVariant() } : {}),
          ...(perExample !== undefined ? { perExample: this.perExampleSpecs.get(perExample)! } : {}),
        };
        const session = (sp: GraphSpec) => {
          const b = buildCausalLmGraph(this.model, sp);
          return createSession(b.bytes, {
            threads: this.opts.threads,
            device: this.opts.device,
            ...externalDataOptions(this.model, b.graph.hasExternalData),
            optimization: this.dtype === 'float64' ? 'basic' : 'all',
            // Recompute is for memory: without the memory pattern a step's activations are held once, not twice.
            ...(this.opts.recompute && kind === 'train' ? { memPattern: false } : {}),
          }).then((rt) => ({ built: b, rt }));
        };
        let { built, rt } = await session(spec);
        if (spec.half === 'compute' && rt.device === 'cpu' && !this.opts.halfVariant) {
          // CUDA was expected but the session fell back to CPU: float16 products would be widened by ONNX Runtime, all at once.
          await rt.session.release();
          ({ built, rt } = await session({ ...spec, half: 'storage' }));
        }
        this.resolvedDevice = rt.device;
        const frozen: Record<string, ort.Tensor> = {};
        for (const f of built.frozen) {
          const data = this.weightAs(f.name);
          frozen[f.name] = f.dtype === 'uint8' || f.dtype === 'float16' ? new ort.Tensor(f.dtype, data as Uint8Array | Uint16Array, f.shape) : new ort.Tensor(this.dtype, data as FloatArray, f.shape);
        }
        return { rt, params: built.params, frozen, lossScaled: built.graph.inputs.some((v) => v.name === 'loss_scale') };
      })();
      p.catch(() => this.sessions.delete(key));
      this.sessions.set(key, p);
    }
    return p;
  }

  /** float16 graphs: products in float16 where the sessions run on CUDA, widened to float32 on CPU. */
  private halfVariant(): 'compute' | 'storage' {
    return this.opts.halfVariant ?? halfGraphFor(this.resolvedDevice ?? this.opts.device, this.opts.computeDtype);
  }

  private weightAs(name: string): FloatArray | Uint8Array | Uint16Array {
    const t = this.model.weights.get(name);
    const h = halfWeights(this.model)?.get(name);
    if (h) return h.data;
    if (!t) {
      // A 4-bit weight's packed bytes or scales (the scales cast once for float64 graphs).
      const c = this.castWeights.get(name);
      if (c) return c;
      const d = quantizedInputData(this.model, name, this.dtype);
      if (!d) throw new Error(`engine: the model has no base weight ${name}`);
      if (d instanceof Float64Array) this.castWeights.set(name, d);
      return d;
    }
    if (this.dtype === 'float32' || t.data instanceof Float64Array) return t.data;
    let c = this.castWeights.get(name);
    if (!c) {
      c = Float64Array.from(t.data);
      this.castWeights.set(name, c);
    }
    return c;
  }

  /**
   * Graph feeds of a batch. With `perExampleMean` the loss mask holds 1 / (the
   * example's trained tokens) on its trained rows, so the loss is the sum over
   * examples of each one's mean token loss.
   */
  private feeds(
    g: CompiledGraph,
    params: TensorMap,
    batch: Batch,
    perExampleMean = false,
  ): { feeds: Record<string, ort.Tensor>; tokens: number; examples: number } {
    const { batchSize: B, seqLen: T } = batch;
    const N = B * T;
    if (batch.inputIds.length !== N || batch.labels.length !== N) {
      throw new Error(`batch: inputIds/labels have ${batch.inputIds.length}/${batch.labels.length} entries, expected ${B}x${T}=${N}`);
    }
    const V = this.model.config.vocabSize;
    const ids = new BigInt64Array(N);
    const targets = new BigInt64Array(N);
    const mask = this.dtype === 'float64' ? new Float64Array(N) : new Float32Array(N);
    let tokens = 0;
    for (let i = 0; i < N; i++) {
      const id = batch.inputIds[i]!;
      if (id < 0 || id >= V) throw new Error(`batch: token id ${id} at position ${i} is outside the vocabulary (size ${V})`);
      ids[i] = BigInt(id);
      const t = i % T;
      const next = t + 1 < T ? batch.labels[i + 1]! : IGNORE_INDEX;
      if (next !== IGNORE_INDEX) {
        if (next < 0 || next >= V) throw new Error(`batch: label ${next} at position ${i + 1} is outside the vocabulary (size ${V})`);
        targets[i] = BigInt(next);
        mask[i] = 1;
        tokens++;
      }
    }
    let examples = 0;
    if (perExampleMean) {
      for (let b = 0; b < B; b++) {
        let n = 0;
        for (let t = 0; t < T; t++) n += mask[b * T + t]!;
        if (n === 0) continue;
        examples++;
        for (let t = 0; t < T; t++) mask[b * T + t] = mask[b * T + t]! / n;
      }
    }
    const feeds: Record<string, ort.Tensor> = {
      ...g.frozen,
      input_ids: new ort.Tensor('int64', ids, [N]),
      targets: new ort.Tensor('int64', targets, [N]),
      loss_mask: new ort.Tensor(this.dtype, mask, [N, 1]),
    };
    for (const p of g.params) {
      const t = params.get(p.name);
      if (!t) throw new Error(`parameters: missing ${p.name}`);
      if (t.shape.length !== p.shape.length || t.shape.some((d, i) => d !== p.shape[i])) {
        throw new Error(`parameters: ${p.name} has shape [${t.shape}], expected [${p.shape}]`);
      }
      const data = this.dtype === 'float64'
        ? (t.data instanceof Float64Array ? t.data : Float64Array.from(t.data))
        : (t.data instanceof Float32Array ? t.data : Float32Array.from(t.data));
      feeds[p.name] = new ort.Tensor(this.dtype, data, p.shape);
    }
    return { feeds, tokens, examples };
  }
}

function roundUp(n: number, m: number): number {
  return Math.ceil(n / m) * m;
}

export function argmax(a: FloatArray, off: number, n: number): number {
  let best = 0;
  let bv = -Infinity;
  for (let i = 0; i < n; i++) {
    const v = a[off + i]!;
    if (v > bv) {
      bv = v;
      best = i;
    }
  }
  return best;
}

function sample(logits: FloatArray, off: number, V: number, temperature: number, topK: number, u: number): number {
  let idx = Array.from({ length: V }, (_, i) => i);
  if (topK > 0 && topK < V) idx = idx.sort((a, b) => logits[off + b]! - logits[off + a]!).slice(0, topK);
  let max = -Infinity;
  for (const i of idx) max = Math.max(max, logits[off + i]!);
  const w = idx.map((i) => Math.exp((logits[off + i]! - max) / temperature));
  const total = w.reduce((s, x) => s + x, 0);
  let acc = 0;
  for (let j = 0; j < idx.length; j++) {
    acc += w[j]! / total;
    if (u < acc) return idx[j]!;
  }
  return idx[idx.length - 1]!;
}
