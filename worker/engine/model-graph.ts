/**
 * The causal language models as ONNX graphs: llama family (llama, mistral,
 * qwen2) and gpt2, with LoRA on any subset of target modules or with every
 * weight trainable, for one static batch shape.
 *
 * Graph inputs: input_ids int64 [N], targets int64 [N], loss_mask float [N, 1]
 * (N = batch * seq, rows flattened; targets[i] is the token to predict at row
 * i, loss_mask 0 where it carries no loss), then the trainable parameters.
 * Outputs: loss_sum (sum of token NLLs over the masked-in rows), then
 * `grad:<param>` for each trainable parameter (train graphs) or logits [N, V]
 * (forward graphs).
 */
import { Graph, type FloatDType, type Value } from './graph.ts';
import type { LoadedModel, LoraConfig, ModelConfig } from '../../common/model-config.ts';
import { loraTargets, peftKey, type LoraTarget } from '../../common/lora.ts';

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
  frozen: Array<{ name: string; shape: number[] }>;
}

export function buildCausalLmGraph(model: LoadedModel, spec: GraphSpec): BuiltGraph {
  const { config } = model;
  const g = new Graph(spec.dtype);
  const B = spec.batchSize;
  const T = spec.seqLen;
  const N = B * T;
  if (T > config.maxPositions) {
    throw new Error(`sequence length ${T} exceeds the model's max_position_embeddings ${config.maxPositions}`);
  }

  const inputIds = g.input('input_ids', [N], 'int64');
  const targets = g.input('targets', [N], 'int64');
  const lossMask = g.input('loss_mask', [N, 1], spec.dtype);

  const params: Array<{ name: string; value: Value }> = [];
  const frozen: Array<{ name: string; shape: number[] }> = [];
  const weightValues = new Map<string, Value>();
  /** A base weight: a trainable input in full mode, a stored constant in LoRA mode. */
  const W = (name: string): Value => {
    let v = weightValues.get(name);
    if (v) return v;
    const t = model.weights.get(name);
    if (!t) throw new Error(`model ${model.dir} has no weight ${name}`);
    if (spec.mode === 'full') {
      v = g.input(name, t.shape, spec.dtype, true);
      params.push({ name, value: v });
    } else {
      v = g.input(name, t.shape, spec.dtype, false);
      frozen.push({ name, shape: t.shape });
    }
    weightValues.set(name, v);
    return v;
  };
  const hasWeight = (name: string): boolean => model.weights.has(name);

  let targetsByModule = new Map<string, LoraTarget>();
  let scale = 0;
  if (spec.mode === 'lora') {
    if (!spec.lora) throw new Error('LoRA mode needs a LoRA config');
    const targets = loraTargets(config, spec.lora);
    targetsByModule = new Map(targets.map((t) => [t.module, t]));
    scale = spec.lora.alpha / spec.lora.r;
    // Declare adapter inputs in target order so the parameter order is stable.
    for (const t of targets) {
      for (const which of ['A', 'B'] as const) {
        const name = peftKey(t.module, which);
        const shape = which === 'A' ? [spec.lora.r, t.inFeatures] : [t.outFeatures, spec.lora.r];
        params.push({ name, value: g.input(name, shape, spec.dtype, true) });
      }
    }
  }
  const paramValue = new Map(params.map((p) => [p.name, p.value]));
  const dropout = spec.kind === 'train' ? (spec.lora?.dropout ?? 0) : 0;
  let dropoutSeed = spec.dropoutSeed ?? 0;

  /** y = x Wᵀ (+ b) + (alpha/r) · dropout(x) Aᵀ Bᵀ, x [N, in]. Conv1D weights are stored [in, out]. */
  const linear = (x: Value, module: string, conv1d: boolean): Value => {
    let y = g.gemm(x, W(`${module}.weight`), false, !conv1d);
    if (hasWeight(`${module}.bias`)) y = g.add(y, W(`${module}.bias`));
    const t = targetsByModule.get(module);
    if (t) {
      const A = paramValue.get(peftKey(module, 'A'))!;
      const Bm = paramValue.get(peftKey(module, 'B'))!;
      const xd = g.dropout(x, dropout, dropoutSeed++);
      const low = g.gemm(g.gemm(xd, A, false, true), Bm, false, true);
      y = g.add(y, g.mul(low, g.scalar(scale)));
    }
    return y;
  };

  const causalMask = g.constFloat(
    'causal_mask',
    [T, T],
    Float64Array.from({ length: T * T }, (_, k) => (k % T <= Math.floor(k / T) ? 0 : -1e9)),
  );

  /** Scaled dot-product attention over [B, heads, T, hd] tensors with a causal mask. */
  const attention = (q: Value, k: Value, v: Value, headDim: number): Value => {
    const scores = g.add(g.mul(g.matmul(q, g.swapLast(k)), g.scalar(1 / Math.sqrt(headDim))), causalMask);
    return g.matmul(g.softmax(scores), v);
  };
  const toHeads = (x: Value, heads: number, hd: number): Value =>
    g.transpose(g.reshape(x, [B, T, heads, hd]), [0, 2, 1, 3]);
  const fromHeads = (x: Value, heads: number, hd: number): Value =>
    g.reshape(g.transpose(x, [0, 2, 1, 3]), [N, heads * hd]);

  let x: Value;
  let logitsWeight: Value;
  if (config.family === 'llama') {
    const { numHeads: nh, numKvHeads: nkv, headDim: hd } = config;
    const rms = (h: Value, weight: string): Value => {
      const ms = g.reduceMean(g.mul(h, h), [-1]);
      return g.mul(g.div(h, g.sqrt(g.add(ms, g.scalar(config.normEps)))), W(weight));
    };
    const { cos, sin, rot } = rotaryTables(g, config, T);
    const rope = (t: Value): Value => g.add(g.mul(t, cos), g.mul(g.matmul(t, rot), sin));
    const repeatKv = (t: Value): Value => {
      if (nkv === nh) return t;
      const rep = nh / nkv;
      const e = g.expand(g.reshape(t, [B, nkv, 1, T, hd]), [B, nkv, rep, T, hd]);
      return g.reshape(e, [B, nh, T, hd]);
    };
    x = g.gather(W('model.embed_tokens.weight'), inputIds);
    for (let l = 0; l < config.numLayers; l++) {
      const p = `model.layers.${l}`;
      const h = rms(x, `${p}.input_layernorm.weight`);
      const q = rope(toHeads(linear(h, `${p}.self_attn.q_proj`, false), nh, hd));
      const k = repeatKv(rope(toHeads(linear(h, `${p}.self_attn.k_proj`, false), nkv, hd)));
      const v = repeatKv(toHeads(linear(h, `${p}.self_attn.v_proj`, false), nkv, hd));
      const attn = fromHeads(attention(q, k, v, hd), nh, hd);
      x = g.add(x, linear(attn, `${p}.self_attn.o_proj`, false));
      const h2 = rms(x, `${p}.post_attention_layernorm.weight`);
      const gate = linear(h2, `${p}.mlp.gate_proj`, false);
      const up = linear(h2, `${p}.mlp.up_proj`, false);
      const act = g.mul(g.mul(gate, g.sigmoid(gate)), up);
      x = g.add(x, linear(act, `${p}.mlp.down_proj`, false));
    }
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
    // gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    const gelu = (h: Value): Value => {
      const inner = g.mul(g.add(h, g.mul(g.mul(g.mul(h, h), h), g.scalar(0.044715))), g.scalar(Math.sqrt(2 / Math.PI)));
      return g.mul(g.mul(h, g.scalar(0.5)), g.add(g.tanh(inner), g.scalar(1)));
    };
    const positions = g.initializer(
      'position_ids',
      [N],
      'int64',
      BigInt64Array.from({ length: N }, (_, i) => BigInt(i % T)),
    );
    x = g.add(g.gather(W('transformer.wte.weight'), inputIds), g.gather(W('transformer.wpe.weight'), positions));
    for (let l = 0; l < config.numLayers; l++) {
      const p = `transformer.h.${l}`;
      const h = ln(x, `${p}.ln_1`);
      const [q, k, v] = g.split(linear(h, `${p}.attn.c_attn`, true), 1, [H, H, H]);
      const attn = fromHeads(attention(toHeads(q!, nh, hd), toHeads(k!, nh, hd), toHeads(v!, nh, hd), hd), nh, hd);
      x = g.add(x, linear(attn, `${p}.attn.c_proj`, true));
      const h2 = ln(x, `${p}.ln_2`);
      x = g.add(x, linear(gelu(linear(h2, `${p}.mlp.c_fc`, true)), `${p}.mlp.c_proj`, true));
    }
    x = ln(x, 'transformer.ln_f');
    logitsWeight = W('transformer.wte.weight');
  }

  const logits = g.gemm(x, logitsWeight, false, true); // [N, V]
  const logp = g.logSoftmax(logits);
  const picked = g.reduceSum(g.mul(logp, g.oneHot(targets, config.vocabSize, spec.dtype)), [1]); // [N, 1]
  const lossSum = g.reshape(g.neg(g.reduceSum(g.mul(picked, lossMask), [0, 1])), [1]);
  g.output(lossSum, 'loss_sum');
  if (spec.kind === 'train') {
    const grads = g.backward(lossSum, params.map((p) => p.value));
    grads.forEach((gr, i) => g.output(gr, `grad:${params[i]!.name}`));
  } else {
    g.output(logits, 'logits');
  }
  return { bytes: g.toModel(), params: params.map((p) => ({ name: p.name, shape: p.value.shape })), frozen };
}

/**
 * Rotary embedding tables for positions 0..T-1 as Hugging Face computes them:
 * inv_freq[i] = theta^(-2i/hd), angle = pos · inv_freq, cos/sin = cat(angle, angle);
 * rotate_half(x) = cat(-x2, x1) expressed as x @ rot.
 */
function rotaryTables(g: Graph, config: ModelConfig, T: number): { cos: Value; sin: Value; rot: Value } {
  const hd = config.headDim;
  const half = hd / 2;
  const cos = new Float64Array(T * hd);
  const sin = new Float64Array(T * hd);
  for (let t = 0; t < T; t++) {
    for (let i = 0; i < half; i++) {
      // Hugging Face computes inv_freq in float32 and the angles in float32.
      const invFreq = Math.fround(1 / Math.pow(config.ropeTheta, (2 * i) / hd));
      const angle = g.dtype === 'float32' ? Math.fround(t * invFreq) : t * invFreq;
      cos[t * hd + i] = cos[t * hd + i + half] = Math.cos(angle);
      sin[t * hd + i] = sin[t * hd + i + half] = Math.sin(angle);
    }
  }
  const rot = new Float64Array(hd * hd);
  for (let j = 0; j < half; j++) rot[(j + half) * hd + j] = -1; // out[j] = -x[j + half]
  for (let j = half; j < hd; j++) rot[(j - half) * hd + j] = 1; // out[j] = x[j - half]
  return {
    cos: g.constFloat('rope_cos', [T, hd], cos),
    sin: g.constFloat('rope_sin', [T, hd], sin),
    rot: g.constFloat('rope_rot', [hd, hd], rot),
  };
}
