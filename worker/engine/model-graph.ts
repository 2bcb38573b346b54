/**
 * The causal language models as ONNX graphs: llama family (llama, mistral,
 * qwen2, qwen3, gemma2) and gpt2, with LoRA on any subset of target modules or with every
 * weight trainable, for one static batch shape.
 *
 * Graph inputs: input_ids int64 [N], targets int64 [N], loss_mask float [N, 1]
 * (N = batch * seq, rows flattened; targets[i] is the token to predict at row
 * i, loss_mask 0 where it carries no loss), then the trainable parameters.
 * Outputs: loss_sum (sum of token NLLs over the masked-in rows), then
 * `grad:<param>` for each trainable parameter (train graphs) or logits [N, V]
 * (forward graphs).
 */
import { Graph, type FloatDType, type HalfDType, type Value } from './graph.ts';
import type { LoadedModel, LoraConfig, ModelConfig } from '../../common/model-config.ts';
import { loraTargets, peftKey, peftMagnitudeKey, type LoraTarget } from '../../common/lora.ts';
import { quantizedBase, quantizedGraphWeights } from './quantize.ts';
import { checkHalfCombination, fileWeights, halfWeights, isHalfWeight } from './half.ts';

export interface GraphSpec {
  batchSize: number;
  seqLen: number;
  /** 'lora': base weights frozen (stored in the graph), adapters trainable; 'full': every weight trainable. */
  mode: 'lora' | 'full';
  lora?: LoraConfig;
  dtype: FloatDType;
  /** 'train': loss + gradients; 'forward': loss + logits. */
  kind: 'train' | 'forward';
  /** Seed for the graph's dropout ops (training graphs with lora.dropout > 0). */
  dropoutSeed?: number;
  /**
   * DP-SGD (train graphs, LoRA mode): per-example gradients of the adapters in the
   * graph, clipped to the L2 norm fed as `dp_clip` [1]. The graph then takes
   * loss_mask as per-row weights (1 / the example's trained tokens, so each
   * example's loss is the mean over its tokens), and outputs `grad:<param>` = the
   * sum over the batch of the clipped per-example gradients, `per_example_norm`
   * [B] (norms before clipping, over every trained parameter) and, with
   * `outputClipped`, `clipped:<param>` [B, ...shape] (the clipped per-example gradients).
   */
  perExample?: { frozen: string[]; outputClipped?: boolean };
  /**
   * Incremental decoding with a KV cache (forward graphs, batch 1; used by
   * worker/engine/generate.ts): seqLen new tokens after `pastLen` cached
   * positions. Instead of targets and loss_mask the graph takes `rope_cos` /
   * `rope_sin` [seqLen, head_dim] of the new positions (llama family, see
   * ropeCosSin) or `position_ids` [seqLen] (gpt2), the additive masks
   * `attn_mask` [seqLen, pastLen + seqLen] (and `sliding_mask` for models with a
   * sliding window; columns: the cached positions, then the new ones), and per
   * layer `past.<l>.key` / `past.<l>.value` [1, kv_heads, pastLen, head_dim]
   * (none when pastLen is 0). Outputs: `logits` [1, V] of the last new token and
   * per layer `present.<l>.key` / `present.<l>.value` [1, kv_heads, seqLen,
   * head_dim], the new positions' (rotated) keys and values.
   */
  decode?: { pastLen: number };
  /**
   * Half-precision base weights (LoRA mode; worker/engine/half.ts): the 2-D base
   * weights are float16 inputs, or, for a model whose 2-D weights stay in their
   * files in bfloat16 (FileWeightsModel), bfloat16 initializers mapped from the
   * files ('storage' only; the session needs the model's folder, runtime.ts
   * externalDataDir).
   * - 'compute' (CUDA): every product with one runs in float16 (its input cast
   *   down, its output cast back up, likewise in the backward pass); the rest of
   *   the graph stays in `dtype`. Train graphs take `loss_scale` [1], the seed
   *   of the backward pass (the gradients come out multiplied by it).
   * - 'storage' (CPU, whose provider has no float16 Gemm): each weight is
   *   widened to `dtype` just before its product, after the product's input
   *   exists, and again in the backward pass, so no float32 copy of the base
   *   outlives its product.
   */
  half?: 'compute' | 'storage';
  /**
   * Train graphs: recompute each decoder layer's forward in the backward pass
   * from the layer's saved input instead of keeping its intermediates
   * (Graph.checkpoint). Same gradients; activation memory per layer falls from
   * every intermediate to the layer's input.
   */
  recompute?: boolean;
}

export interface BuiltGraph {
  bytes: Uint8Array;
  /** Trainable parameters, in graph-input order. */
  params: Array<{ name: string; shape: number[] }>;
  /**
   * Frozen base weights (LoRA mode). They are graph inputs too, fed on every
   * run from the one copy the engine holds: sessions of every batch shape
   * share it, nothing is copied per step, and no weight is serialized into a
   * model. (Storing them as initializers instead measured the same speed but
   * one more copy of the model per session.)
   */
  frozen: Array<{ name: string; shape: number[]; dtype?: 'uint8' | FloatDType | HalfDType }>;
  /** The graph's nodes and value shapes (memory planning: worker/engine/memory-plan.ts). */
  graph: Graph;
}

export function buildCausalLmGraph(model: LoadedModel, spec: GraphSpec): BuiltGraph {
  const { config } = model;
  const g = new Graph(spec.dtype);
  const B = spec.batchSize;
  const T = spec.seqLen;
  const N = B * T;
  const dec = spec.decode;
  if (dec && (B !== 1 || spec.kind !== 'forward')) throw new Error('graph: decode graphs are forward graphs of batch 1');
  // Dynamic NTK scaling exists to run past max_position_embeddings; every other model stops there.
  if ((dec ? dec.pastLen + T : T) > config.maxPositions && config.ropeScaling?.type !== 'dynamic') {
    throw new Error(`sequence length ${dec ? dec.pastLen + T : T} exceeds the model's max_position_embeddings ${config.maxPositions}`);
  }

  const inputIds = g.input('input_ids', [N], 'int64');
  const targets = dec ? null : g.input('targets', [N], 'int64');
  const lossMask = dec ? null : g.input('loss_mask', [N, 1], spec.dtype);

  const params: Array<{ name: string; value: Value }> = [];
  const frozen: BuiltGraph['frozen'] = [];
  const weightValues = new Map<string, Value>();
  const quantized = quantizedBase(model);
  if (quantized && spec.mode !== 'lora') throw new Error('quantize-base: 4-bit base weights are frozen, so they apply to LoRA training only, not full training (--full); drop one of them');
  const qw = quantized ? quantizedGraphWeights(g, quantized, frozen) : null;
  const inFile = fileWeights(model);
  const half: HalfDType | null = spec.half ? (inFile ? 'bfloat16' : 'float16') : null;
  if (half) checkHalfCombination({ computeDtype: half, full: spec.mode === 'full', quantizeBase: quantized?.format, dpSgd: spec.perExample !== undefined });
  else if (halfWeights(model) || inFile) throw new Error(`graph: ${model.dir} holds ${inFile ? 'bfloat16' : 'float16'} base weights (--compute-dtype); its graphs need GraphSpec.half`);
  if (inFile && spec.half === 'compute') throw new Error(`graph: bfloat16 base weights are widened per product (GraphSpec.half 'storage'), not multiplied in bfloat16`);
  /** A base weight: a trainable input in full mode, a stored constant in LoRA mode (4-bit ones dequantised in the graph, quantize.ts). */
  const W = (name: string): Value => {
    let v = weightValues.get(name);
    if (v) return v;
    const qv = qw?.weight(name);
    if (qv) {
      weightValues.set(name, qv);
      return qv;
    }
    const f = inFile?.get(name);
    if (f) {
      // Left in its safetensors file: ONNX Runtime maps the bytes (runtime.ts externalDataDir).
      v = g.externalInitializer(name, f.shape, 'bfloat16', { location: f.file, offset: f.offset, length: f.length });
      weightValues.set(name, v);
      return v;
    }
    const t = model.weights.get(name) ?? halfWeights(model)?.get(name);
    if (!t) throw new Error(`model ${model.dir} has no weight ${name}`);
    if (spec.mode === 'full') {
      v = g.input(name, t.shape, spec.dtype, true);
      params.push({ name, value: v });
    } else if (half && isHalfWeight(name, t.shape)) {
      v = g.input(name, t.shape, half, false);
      frozen.push({ name, shape: t.shape, dtype: half });
    } else {
      v = g.input(name, t.shape, spec.dtype, false);
      frozen.push({ name, shape: t.shape });
    }
    weightValues.set(name, v);
    return v;
  };
  const hasWeight = (name: string): boolean =>
    model.weights.has(name) || (halfWeights(model)?.has(name) ?? false) || (inFile?.has(name) ?? false) || (quantized?.tensors.has(name) ?? false);
  /** x op(w). A float16 w: the product in float16 ('compute'), or w widened after x and again for the backward pass ('storage'). */
  const product = (x: Value, w: Value, transB: boolean): Value => {
    if (w.dtype === spec.dtype) return g.gemm(x, w, false, transB);
    if (spec.half === 'compute') return g.castTo(g.gemm(g.castTo(x, w.dtype), w, false, transB), spec.dtype);
    return g.gemmFrozen(x, widenAfter(g, w, x), transB, (after) => widenAfter(g, w, after));
  };
  /** Rows of an embedding table, in the graph's dtype. */
  const embed = (name: string, ids: Value): Value => g.castTo(g.gather(W(name), ids), spec.dtype);

  let targetsByModule = new Map<string, LoraTarget>();
  if (spec.mode === 'lora') {
    if (!spec.lora) throw new Error('LoRA mode needs a LoRA config');
    const targets = loraTargets(config, spec.lora);
    targetsByModule = new Map(targets.map((t) => [t.module, t]));
    // Declare adapter inputs in target order so the parameter order is stable.
    for (const t of targets) {
      for (const which of ['A', 'B'] as const) {
        const name = peftKey(t.module, which);
        // Each module at its own rank (lora.r or its rank_pattern entry, common/lora.ts).
        const shape = which === 'A' ? [t.r, t.inFeatures] : [t.outFeatures, t.r];
        params.push({ name, value: g.input(name, shape, spec.dtype, true) });
      }
      // DoRA: the magnitude vector m [out] is trained like A and B.
      if (t.dora) params.push({ name: peftMagnitudeKey(t.module), value: g.input(peftMagnitudeKey(t.module), [t.outFeatures], spec.dtype, true) });
    }
  }
  const paramValue = new Map(params.map((p) => [p.name, p.value]));
  const pe = spec.kind === 'train' ? spec.perExample : undefined;
  if (pe && spec.mode !== 'lora') {
    throw new Error('privacy.dp_sgd: per-example gradients are implemented for LoRA training only (not training mode full); use LoRA or remove privacy.dp_sgd');
  }
  /**
   * Per-example copies of each trained adapter, [B, ...shape]: leaves of the
   * backward pass, so the gradient with respect to one is the batch of
   * per-example gradients (batched MatMul keeps the batch axis).
   */
  const perExampleLeaf = new Map<string, Value>();
  if (pe) {
    for (const p of params) {
      if (pe.frozen.includes(p.name)) continue;
      perExampleLeaf.set(p.name, g.emit('Expand', [p.value, g.constInt64([B, ...p.value.shape])], [B, ...p.value.shape], spec.dtype, {}, true));
    }
  }
  const dropout = spec.kind === 'train' ? (spec.lora?.dropout ?? 0) : 0;
  let dropoutSeed = spec.dropoutSeed ?? 0;

  /**
   * DoRA's term on top of the base output (PEFT DoraLinearLayer.forward, Liu et al. 2024 eq. 5):
   * (m / n - 1) · xd Wᵀ + (m / n) · low, with low = scale · xd Aᵀ Bᵀ, xd = dropout(x) and
   * n = ||W + scale · B A||_c, the L2 norm of each output feature's row of [out, in].
   * n is detached, a constant for the backward pass (paper §4.3, as PEFT does), so the
   * gradients are those of this function with n held at its current value. `xw`: xd Wᵀ
   * when already computed (no dropout: the base output without bias).
   */
  const doraTerm = (t: LoraTarget, xd: Value, xw: Value | null, low: Value, A: Value, Bm: Value): Value => {
    const wh = W(t.weight);
    const w = wh.dtype === spec.dtype ? wh : widenAfter(g, wh, xd);
    const dense = g.add(t.conv1d ? g.transpose(w, [1, 0]) : w, g.mul(g.gemm(Bm, A), g.scalar(t.scale)));
    const norm = g.reshape(g.sqrt(g.reduceSum(g.mul(dense, dense), [1])), [t.outFeatures]);
    const n = g.emit('Identity', [norm], norm.shape, norm.dtype, {}, false); // detached: no gradient flows into the norm
    const base = xw ?? product(xd, W(t.weight), !t.conv1d);
    const key = peftMagnitudeKey(t.module);
    const mb = pe ? perExampleLeaf.get(key) : undefined;
    if (mb) {
      // Per-example magnitudes [B, out]: the factor broadcasts over each example's T rows.
      const f = g.reshape(g.div(mb, n), [B, 1, t.outFeatures]);
      const out3 = g.add(g.mul(g.sub(f, g.scalar(1)), g.reshape(base, [B, T, t.outFeatures])), g.mul(f, g.reshape(low, [B, T, t.outFeatures])));
      return g.reshape(out3, [N, t.outFeatures]);
    }
    const f = g.div(paramValue.get(key)!, n);
    return g.add(g.mul(g.sub(f, g.scalar(1)), base), g.mul(f, low));
  };

  /** y = x Wᵀ (+ b) + (alpha/r) · dropout(x) Aᵀ Bᵀ, x [N, in] (DoRA targets: doraTerm instead). Conv1D weights are stored [in, out]. */
  const linear = (x: Value, module: string, conv1d: boolean): Value => {
    const xw = qw?.product(x, `${module}.weight`, !conv1d) ?? product(x, W(`${module}.weight`), !conv1d);
    let y = xw;
    if (hasWeight(`${module}.bias`)) y = g.add(y, W(`${module}.bias`));
    const t = targetsByModule.get(module);
    if (t) {
      const A = paramValue.get(peftKey(module, 'A'))!;
      const Bm = paramValue.get(peftKey(module, 'B'))!;
      const xd = g.dropout(x, dropout, dropoutSeed++);
      let low: Value;
      if (pe) {
        // [B, T, in] @ [B, in, r] @ [B, r, out]: the adapters' gradients keep the batch axis.
        const Ab = perExampleLeaf.get(peftKey(module, 'A')) ?? A;
        const Bb = perExampleLeaf.get(peftKey(module, 'B')) ?? Bm;
        const u = g.matmul(g.reshape(xd, [B, T, t.inFeatures]), g.swapLast(Ab));
        low = g.reshape(g.matmul(u, g.swapLast(Bb)), [N, t.outFeatures]);
      } else {
        low = g.gemm(g.gemm(xd, A, false, true), Bm, false, true);
      }
      // t.scale: alpha / r, or alpha / sqrt(r) with rsLoRA, with this module's rank_pattern / alpha_pattern entries (common/lora.ts).
      const scaled = g.mul(low, g.scalar(t.scale));
      y = g.add(y, t.dora ? doraTerm(t, xd, xd === x ? xw : null, scaled, A, Bm) : scaled);
    }
    return y;
  };

  const causalMask = dec ? g.input('attn_mask', [T, dec.pastLen + T], spec.dtype) : g.constFloat(
    'causal_mask',
    [T, T],
    Float64Array.from({ length: T * T }, (_, k) => (k % T <= Math.floor(k / T) ? 0 : -1e9)),
  );
  // Sliding window: query i sees key j when 0 <= i - j < size (transformers' sliding_window mask).
  const sw = config.slidingWindow;
  const windowMask = sw && dec
    ? g.input('sliding_mask', [T, dec.pastLen + T], spec.dtype)
    : sw && T > sw.size
      ? g.constFloat(
          'sliding_window_mask',
          [T, T],
          Float64Array.from({ length: T * T }, (_, k) => {
            const d = Math.floor(k / T) - (k % T);
            return d >= 0 && d < sw.size ? 0 : -1e9;
          }),
        )
      : null;
  const maskOf = (layer: number): Value => (windowMask && sw!.layers.includes(layer) ? windowMask : causalMask);
  /** Decode graphs: the new keys or values [B, heads, T, hd] become outputs and follow the cached ones. */
  const cached = (t: Value, layer: number, which: 'key' | 'value'): Value => {
    if (!dec) return t;
    g.output(t, `present.${layer}.${which}`);
    if (dec.pastLen === 0) return t;
    const past = g.input(`past.${layer}.${which}`, [B, t.shape[1]!, dec.pastLen, t.shape[3]!], spec.dtype);
    return g.concat([past, t], 2);
  };

  /** cap · tanh(x / cap) (gemma2 soft-capping). */
  const softcap = (x: Value, cap: number | null): Value => (cap === null ? x : g.mul(g.tanh(g.mul(x, g.scalar(1 / cap))), g.scalar(cap)));
  /** Dot-product attention over [B, heads, T, hd] tensors: softmax(softcap(q kᵀ · scale) + mask) v. */
  const attention = (q: Value, k: Value, v: Value, scale: number, mask: Value, cap: number | null = null): Value => {
    const qk = g.matmul(q, g.swapLast(k));
    const scores = g.add(softcap(scale === 1 ? qk : g.mul(qk, g.scalar(scale)), cap), mask);
    return g.matmul(g.softmax(scores), v);
  };
  // gelu_new / gelu_pytorch_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
  const gelu = (h: Value): Value => {
    const inner = g.mul(g.add(h, g.mul(g.mul(g.mul(h, h), h), g.scalar(0.044715))), g.scalar(Math.sqrt(2 / Math.PI)));
    return g.mul(g.mul(h, g.scalar(0.5)), g.add(g.tanh(inner), g.scalar(1)));
  };
  const toHeads = (x: Value, heads: number, hd: number): Value =>
    g.transpose(g.reshape(x, [B, T, heads, hd]), [0, 2, 1, 3]);
  const fromHeads = (x: Value, heads: number, hd: number): Value =>
    g.reshape(g.transpose(x, [0, 2, 1, 3]), [N, heads * hd]);
  /** One decoder layer, x -> x: recomputed in the backward pass with spec.recompute. */
  const recompute = spec.recompute === true && spec.kind === 'train' && !dec;
  const layer = (x0: Value, body: (x: Value) => Value): Value => (recompute ? g.checkpoint([x0], ([xi]) => [body(xi!)])[0]! : body(x0));

  let x: Value;
  let logitsWeight: Value;
  if (config.family === 'llama') {
    const { numHeads: nh, numKvHeads: nkv, headDim: hd } = config;
    const gm = config.gemma2;
    const rms = (h: Value, weight: string): Value => {
      const ms = g.reduceMean(g.mul(h, h), [-1]);
      const n = g.div(h, g.sqrt(g.add(ms, g.scalar(config.normEps))));
      return g.mul(n, gm ? g.add(W(weight), g.scalar(1)) : W(weight)); // gemma2 scales by (1 + weight)
    };
    const { cos, sin, rot } = rotaryTables(g, config, T, dec !== undefined);
    const rope = (t: Value): Value => g.add(g.mul(t, cos), g.mul(g.matmul(t, rot), sin));
    const repeatKv = (t: Value): Value => {
      if (nkv === nh) return t;
      const rep = nh / nkv;
      const L = t.shape[2]!; // T, or the cached positions and T in decode graphs
      const e = g.expand(g.reshape(t, [B, nkv, 1, L, hd]), [B, nkv, rep, L, hd]);
      return g.reshape(e, [B, nh, L, hd]);
    };
    x = embed('model.embed_tokens.weight', inputIds);
    // gemma2 multiplies the embeddings by sqrt(hidden_size), rounded to the compute dtype as transformers does.
    if (gm) x = g.mul(x, g.scalar(g.dtype === 'float32' ? Math.fround(Math.sqrt(config.hiddenSize)) : Math.sqrt(config.hiddenSize)));
    const attnScale = gm ? Math.pow(gm.queryPreAttnScalar, -0.5) : 1 / Math.sqrt(hd);
    for (let l = 0; l < config.numLayers; l++) x = layer(x, (x) => {
      const p = `model.layers.${l}`;
      const h = rms(x, `${p}.input_layernorm.weight`);
      // qwen3: RMSNorm over each head's head_dim values of q and k, before the rotation.
      const headNorm = (t: Value, which: 'q' | 'k'): Value => (config.qkNorm ? rms(t, `${p}.self_attn.${which}_norm.weight`) : t);
      // phi3 fuses q, k, v into qkv_proj (rows: q, then k, then v).
      const [qx, kx, vx] = config.fusedProjections
        ? g.split(linear(h, `${p}.self_attn.qkv_proj`, false), 1, [nh * hd, nkv * hd, nkv * hd])
        : [linear(h, `${p}.self_attn.q_proj`, false), linear(h, `${p}.self_attn.k_proj`, false), linear(h, `${p}.self_attn.v_proj`, false)];
      const q = rope(headNorm(toHeads(qx!, nh, hd), 'q'));
      const k = repeatKv(cached(rope(headNorm(toHeads(kx!, nkv, hd), 'k')), l, 'key'));
      const v = repeatKv(cached(toHeads(vx!, nkv, hd), l, 'value'));
      const attn = fromHeads(attention(q, k, v, attnScale, maskOf(l), gm?.attnLogitSoftcap ?? null), nh, hd);
      const o = linear(attn, `${p}.self_attn.o_proj`, false);
      // llama: x + attn(norm(x)), x + mlp(norm(x)); gemma2 also normalizes each branch's output.
      x = g.add(x, gm ? rms(o, `${p}.post_attention_layernorm.weight`) : o);
      const h2 = rms(x, gm ? `${p}.pre_feedforward_layernorm.weight` : `${p}.post_attention_layernorm.weight`);
      // phi3 fuses gate and up into gate_up_proj (gate rows first).
      const [gate, up] = config.fusedProjections
        ? (g.split(linear(h2, `${p}.mlp.gate_up_proj`, false), 1, [config.intermediateSize, config.intermediateSize]) as [Value, Value])
        : [linear(h2, `${p}.mlp.gate_proj`, false), linear(h2, `${p}.mlp.up_proj`, false)];
      const act = g.mul(config.activation === 'gelu_new' ? gelu(gate) : g.mul(gate, g.sigmoid(gate)), up);
      const down = linear(act, `${p}.mlp.down_proj`, false);
      return g.add(x, gm ? rms(down, `${p}.post_feedforward_layernorm.weight`) : down);
    });
    x = rms(x, 'model.norm.weight');
    logitsWeight = config.tieWordEmbeddings ? W('model.embed_tokens.weight') : W('lm_head.weight');
  } else {
    const { hiddenSize: H, numHeads: nh, headDim: hd } = config;
    const ln = (h: Value, prefix: string): Value => {
      const c = g.sub(h, g.reduceMean(h, [-1]));
      const variance = g.reduceMean(g.mul(c, c), [-1]);
      const n = g.div(c, g.sqrt(g.add(variance, g.scalar(config.normEps))));
      return g.add(g.mul(n, W(`${prefix}.weight`)), W(`${prefix}.bias`));
    };
    const positions = dec ? g.input('position_ids', [N], 'int64') : g.initializer(
      'position_ids',
      [N],
      'int64',
      BigInt64Array.from({ length: N }, (_, i) => BigInt(i % T)),
    );
    x = g.add(embed('transformer.wte.weight', inputIds), embed('transformer.wpe.weight', positions));
    for (let l = 0; l < config.numLayers; l++) x = layer(x, (x) => {
      const p = `transformer.h.${l}`;
      const h = ln(x, `${p}.ln_1`);
      const [q, k, v] = g.split(linear(h, `${p}.attn.c_attn`, true), 1, [H, H, H]);
      const scale = ((config.scaleAttnWeights ?? true) ? 1 / Math.sqrt(hd) : 1) / (config.scaleAttnByInverseLayerIdx ? l + 1 : 1);
      const kc = cached(toHeads(k!, nh, hd), l, 'key');
      const attn = fromHeads(attention(toHeads(q!, nh, hd), kc, cached(toHeads(v!, nh, hd), l, 'value'), scale, causalMask), nh, hd);
      x = g.add(x, linear(attn, `${p}.attn.c_proj`, true));
      const h2 = ln(x, `${p}.ln_2`);
      return g.add(x, linear(gelu(linear(h2, `${p}.mlp.c_fc`, true)), `${p}.mlp.c_proj`, true));
    });
    x = ln(x, 'transformer.ln_f');
    logitsWeight = W('transformer.wte.weight');
  }

  let logits = product(x, logitsWeight, true); // [N, V]
  if (config.gemma2) logits = softcap(logits, config.gemma2.finalLogitSoftcap);
  if (dec) {
    g.output(g.gather(logits, g.constInt64([N - 1])), 'logits'); // the last new token's
    return { bytes: g.toModel(), params: params.map((p) => ({ name: p.name, shape: p.value.shape })), frozen, graph: g };
  }
  const logp = g.logSoftmax(logits);
  const picked = g.reduceSum(g.mul(logp, g.oneHot(targets!, config.vocabSize, spec.dtype)), [1]); // [N, 1]
  const lossSum = g.reshape(g.neg(g.reduceSum(g.mul(picked, lossMask!), [0, 1])), [1]);
  g.output(lossSum, 'loss_sum');
  if (pe) {
    perExampleOutputs(g, lossSum, params, perExampleLeaf, B, pe.outputClipped ?? false);
  } else if (spec.kind === 'train') {
    const grads = g.backward(lossSum, params.map((p) => p.value), spec.half === 'compute' ? g.input('loss_scale', [1], spec.dtype) : undefined);
    grads.forEach((gr, i) => g.output(gr, `grad:${params[i]!.name}`));
  } else {
    g.output(logits, 'logits');
  }
  return { bytes: g.toModel(), params: params.map((p) => ({ name: p.name, shape: p.value.shape })), frozen, graph: g };
}

/**
 * A float16 weight as a float32 value computed after `after`: the weight is
 * reshaped to its own shape by a shape that depends on `after` (an int64 zero
 * made from its first element; Reshape keeps float16 on the CPU provider), then
 * cast. Without the dependency ONNX Runtime may widen every weight first and
 * hold all their float32 copies at once. Off the tape: no gradient flows into
 * a base weight.
 */
function widenAfter(g: Graph, w: Value, after: Value): Value {
  const flat = g.emit('Reshape', [after, g.constInt64([-1])], [after.shape.reduce((a, b) => a * b, 1)], after.dtype, {}, false);
  const first = g.emit('Slice', [flat, g.constInt64([0]), g.constInt64([1])], [1], after.dtype, {}, false);
  const zero = g.emit('Mul', [g.cast(first, 'int64'), g.constInt64([0])], [1], 'int64', {}, false);
  const shape = g.emit('Add', [g.constInt64(w.shape), zero], [w.rank], 'int64', {}, false);
  return g.cast(g.emit('Reshape', [w, shape], w.shape, w.dtype, {}, false), g.dtype);
}

/**
 * Per-example gradients (the gradients with respect to the per-example leaves),
 * their joint L2 norms, the clip factors min(1, C / norm) = C / max(norm, C), and
 * the sum of the clipped gradients. Frozen parameters get zero gradients.
 */
function perExampleOutputs(
  g: Graph,
  lossSum: Value,
  params: Array<{ name: string; value: Value }>,
  leaves: Map<string, Value>,
  B: number,
  outputClipped: boolean,
): void {
  const dt = g.dtype;
  const clip = g.input('dp_clip', [1], dt);
  const trained = params.filter((p) => leaves.has(p.name));
  const perGrads = g.backward(lossSum, trained.map((p) => leaves.get(p.name)!));
  let sq: Value | null = null;
  for (const gp of perGrads) {
    const axes = gp.shape.slice(1).map((_, i) => i + 1);
    const s = g.emit('ReduceSum', [g.emit('Mul', [gp, gp], gp.shape, dt, {}, false), g.constInt64(axes)], [B, ...axes.map(() => 1)], dt, { keepdims: 1 }, false);
    const s2 = g.emit('Reshape', [s, g.constInt64([B])], [B], dt, {}, false);
    sq = sq ? g.emit('Add', [sq, s2], [B], dt, {}, false) : s2;
  }
  const norm = g.emit('Sqrt', [sq!], [B], dt, {}, false);
  g.output(norm, 'per_example_norm');
  const factor = g.emit('Div', [clip, g.emit('Max', [norm, clip], [B], dt, {}, false)], [B], dt, {}, false);
  const byName = new Map(trained.map((p, i) => [p.name, perGrads[i]!]));
  for (const p of params) {
    const gp = byName.get(p.name);
    if (!gp) {
      g.output(g.zeros(p.value.shape, dt), `grad:${p.name}`);
      continue;
    }
    const f = g.emit('Reshape', [factor, g.constInt64([B, ...p.value.shape.map(() => 1)])], [B, ...p.value.shape.map(() => 1)], dt, {}, false);
    const clipped = g.emit('Mul', [gp, f], gp.shape, dt, {}, false);
    g.output(g.emit('ReduceSum', [clipped, g.constInt64([0])], p.value.shape, dt, { keepdims: 0 }, false), `grad:${p.name}`);
    if (outputClipped) g.output(clipped, `clipped:${p.name}`);
  }
}

/**
 * Rotary inverse frequencies inv_freq[i] for i < hd/2 and the factor that
 * multiplies cos and sin, as transformers' modeling_rope_utils computes them
 * for a sequence of T positions (float32 rounding as there):
 * - default: theta^(-2i/hd)
 * - linear: default / factor
 * - dynamic: default with base theta · (factor·T/orig - (factor-1))^(hd/(hd-2)) when T > orig
 * - llama3: wavelength 2π/f above orig/low_freq_factor: f/factor; below orig/high_freq_factor: f;
 *   between: (1-s)·f/factor + s·f with s = (orig/wavelength - low)/(high - low)
 * - yarn: ramp between interpolated f/factor and extrapolated f over the dimensions between
 *   the correction range of beta_fast and beta_slow rotations; cos and sin times attention_factor.
 * - longrope: default / short_factor[i] (T <= original context) or / long_factor[i]; cos and sin
 *   times attention_factor.
 */
export function ropeInvFreq(config: ModelConfig, T: number): { invFreq: Float64Array; attentionFactor: number } {
  const hd = config.headDim;
  const half = hd / 2;
  const rs = config.ropeScaling;
  let base = config.ropeTheta;
  if (rs?.type === 'dynamic' && T > rs.originalMaxPositions) {
    base = Math.fround(base * Math.pow((rs.factor * T) / rs.originalMaxPositions - (rs.factor - 1), hd / (hd - 2)));
  }
  const f = (i: number): number => Math.fround(1 / Math.fround(Math.pow(base, Math.fround((2 * i) / hd))));
  const invFreq = Float64Array.from({ length: half }, (_, i) => f(i));
  let attentionFactor = 1;
  if (rs?.type === 'linear') {
    for (let i = 0; i < half; i++) invFreq[i] = Math.fround(invFreq[i]! / rs.factor);
  } else if (rs?.type === 'llama3') {
    const lowWavelen = rs.originalMaxPositions / rs.lowFreqFactor;
    const highWavelen = rs.originalMaxPositions / rs.highFreqFactor;
    for (let i = 0; i < half; i++) {
      const fr = invFreq[i]!;
      const wavelen = (2 * Math.PI) / fr;
      if (wavelen > lowWavelen) invFreq[i] = Math.fround(fr / rs.factor);
      else if (wavelen >= highWavelen) {
        const s = (rs.originalMaxPositions / wavelen - rs.lowFreqFactor) / (rs.highFreqFactor - rs.lowFreqFactor);
        invFreq[i] = Math.fround(((1 - s) * fr) / rs.factor + s * fr);
      }
    }
  } else if (rs?.type === 'yarn') {
    const corrDim = (rot: number): number => (hd * Math.log(rs.originalMaxPositions / (rot * 2 * Math.PI))) / (2 * Math.log(base));
    let low = corrDim(rs.betaFast);
    let high = corrDim(rs.betaSlow);
    if (rs.truncate) {
      low = Math.floor(low);
      high = Math.ceil(high);
    }
    low = Math.max(low, 0);
    high = Math.min(high, hd - 1);
    if (low === high) high += 0.001;
    for (let i = 0; i < half; i++) {
      const ramp = Math.min(1, Math.max(0, (i - low) / (high - low)));
      const extrapolation = 1 - ramp; // weight of the unscaled frequency
      const pos = Math.fround(Math.pow(base, Math.fround((2 * i) / hd)));
      const inter = Math.fround(1 / (rs.factor * pos));
      const extra = Math.fround(1 / pos);
      invFreq[i] = Math.fround(inter * (1 - extrapolation) + extra * extrapolation);
    }
    attentionFactor = rs.attentionFactor;
  } else if (rs?.type === 'longrope') {
    const ext = T > rs.originalMaxPositions ? rs.longFactor : rs.shortFactor;
    for (let i = 0; i < half; i++) invFreq[i] = Math.fround(1 / (ext[i]! * Math.fround(Math.pow(base, Math.fround((2 * i) / hd)))));
    attentionFactor = rs.attentionFactor;
  }
  return { invFreq, attentionFactor };
}

/**
 * cos and sin rows [positions.length, hd] of the rotary embedding as Hugging Face
 * computes them: angle = pos · inv_freq (ropeInvFreq for a sequence of T
 * positions), cos/sin = cat(angle, angle) · attention factor, angles in float32
 * for float32 graphs. Decode graphs are fed these rows for their new positions.
 */
export function ropeCosSin(config: ModelConfig, positions: ArrayLike<number>, T: number, dtype: FloatDType): { cos: Float64Array; sin: Float64Array } {
  const hd = config.headDim;
  const half = hd / 2;
  const { invFreq, attentionFactor } = ropeInvFreq(config, T);
  const cos = new Float64Array(positions.length * hd);
  const sin = new Float64Array(positions.length * hd);
  for (let r = 0; r < positions.length; r++) {
    const t = positions[r]!;
    for (let i = 0; i < half; i++) {
      // Hugging Face computes the angles in float32.
      const angle = dtype === 'float32' ? Math.fround(t * invFreq[i]!) : t * invFreq[i]!;
      cos[r * hd + i] = cos[r * hd + i + half] = Math.cos(angle) * attentionFactor;
      sin[r * hd + i] = sin[r * hd + i + half] = Math.sin(angle) * attentionFactor;
    }
  }
  return { cos, sin };
}

/**
 * Rotary embedding tables for positions 0..T-1 (ropeCosSin), or with `fed` the
 * graph inputs rope_cos / rope_sin [T, hd] (decode graphs);
 * rotate_half(x) = cat(-x2, x1) expressed as x @ rot.
 */
function rotaryTables(g: Graph, config: ModelConfig, T: number, fed = false): { cos: Value; sin: Value; rot: Value } {
  const hd = config.headDim;
  const half = hd / 2;
  const rot = new Float64Array(hd * hd);
  for (let j = 0; j < half; j++) rot[(j + half) * hd + j] = -1; // out[j] = -x[j + half]
  for (let j = half; j < hd; j++) rot[(j - half) * hd + j] = 1; // out[j] = x[j - half]
  const rotV = g.constFloat('rope_rot', [hd, hd], rot);
  if (fed) return { cos: g.input('rope_cos', [T, hd], g.dtype), sin: g.input('rope_sin', [T, hd], g.dtype), rot: rotV };
  const { cos, sin } = ropeCosSin(config, Array.from({ length: T }, (_, t) => t), T, g.dtype);
  return { cos: g.constFloat('rope_cos', [T, hd], cos), sin: g.constFloat('rope_sin', [T, hd], sin), rot: rotV };
}
