/**
 * LoRA targets, PEFT key names, adapter initialization and validation.
 *
 * A LoRA adapter on a linear map W (out x in) adds (alpha / r) * B A with
 * A [r, in] and B [out, r]. Keys and shapes follow Hugging Face PEFT exactly:
 * `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r],
 * also for gpt2's Conv1D modules (whose base weight is stored [in, out]).
 */
import { numel, type TensorMap } from './tensor.ts';
import { createRng } from './random.ts';
import { GPT2_TARGET_MODULES, LLAMA_TARGET_MODULES, PHI3_TARGET_MODULES, type LoraConfig, type ModelConfig } from './model-config.ts';

export interface LoraTarget {
  /** Canonical module path, e.g. `model.layers.3.self_attn.q_proj` or `transformer.h.0.attn.c_attn`. */
  module: string;
  /** Base weight name: module + '.weight'. */
  weight: string;
  /** Base bias name, or null when the module has no bias. */
  bias: string | null;
  inFeatures: number;
  outFeatures: number;
  /** gpt2 Conv1D: base weight stored [in, out] (PEFT fan_in_fan_out). */
  conv1d: boolean;
  layer: number;
  /** Target module name (q_proj, c_attn, ...). */
  kind: string;
  /** This module's rank: lora.r, or its rank_pattern entry. */
  r: number;
  /** This module's factor on B A: alpha / r (alpha / sqrt(r) with rsLoRA), with its alpha_pattern entry where one matches. */
  scale: number;
}

/** Target module names valid for an architecture family. */
export function validTargetModules(config: ModelConfig): readonly string[] {
  if (config.family === 'gpt2') return GPT2_TARGET_MODULES;
  return config.fusedProjections ? PHI3_TARGET_MODULES : LLAMA_TARGET_MODULES;
}

/** Check r, alpha, dropout and the target list; throws naming the bad field. */
export function checkLoraConfig(config: ModelConfig, lora: LoraConfig): void {
  if (!Number.isInteger(lora.r) || lora.r < 1) throw new Error(`lora.r must be an integer >= 1, got ${lora.r}`);
  if (!Number.isFinite(lora.alpha) || lora.alpha <= 0) throw new Error(`lora.alpha must be a number > 0, got ${lora.alpha}`);
  if (!Number.isFinite(lora.dropout) || lora.dropout < 0 || lora.dropout >= 1) {
    throw new Error(`lora.dropout must be in [0, 1), got ${lora.dropout}`);
  }
  const valid = validTargetModules(config);
  if (!Array.isArray(lora.targetModules) || lora.targetModules.length === 0) {
    throw new Error(`lora.targetModules is empty: list at least one of ${valid.join(', ')} (${config.modelType})`);
  }
  for (const m of lora.targetModules) {
    if (!valid.includes(m)) {
      throw new Error(`lora.targetModules: unknown module "${m}" for ${config.modelType}; valid modules: ${valid.join(', ')}`);
    }
  }
}

/**
 * Every module that gets an adapter, layer by layer, within a layer in the order
 * of LLAMA_TARGET_MODULES / PHI3_TARGET_MODULES / GPT2_TARGET_MODULES (gpt2 `c_proj` matches both
 * attn.c_proj and mlp.c_proj, in that order).
 */
export function loraTargets(config: ModelConfig, lora: LoraConfig): LoraTarget[] {
  checkLoraConfig(config, lora);
  const wanted = new Set(lora.targetModules);
  const scale = lora.useRslora ? lora.alpha / Math.sqrt(lora.r) : lora.alpha / lora.r;
  const out: LoraTarget[] = [];
  const H = config.hiddenSize;
  const I = config.intermediateSize;
  for (let l = 0; l < config.numLayers; l++) {
    if (config.family === 'gpt2') {
      const p = `transformer.h.${l}`;
      const mods: Array<[string, string, number, number]> = [
        ['c_attn', `${p}.attn.c_attn`, H, 3 * H],
        ['c_proj', `${p}.attn.c_proj`, H, H],
        ['c_proj', `${p}.mlp.c_proj`, I, H],
        ['c_fc', `${p}.mlp.c_fc`, H, I],
      ];
      for (const kind of GPT2_TARGET_MODULES) {
        if (!wanted.has(kind)) continue;
        for (const [k, module, inF, outF] of mods) {
          if (k !== kind) continue;
          out.push({ module, weight: `${module}.weight`, bias: `${module}.bias`, inFeatures: inF, outFeatures: outF, conv1d: true, layer: l, kind, r: lora.r, scale });
        }
      }
    } else {
      const p = `model.layers.${l}`;
      const q = config.numHeads * config.headDim;
      const kv = config.numKvHeads * config.headDim;
      const dims: Record<string, [string, number, number, boolean]> = {
        q_proj: ['self_attn', H, q, config.qkvBias],
        k_proj: ['self_attn', H, kv, config.qkvBias],
        v_proj: ['self_attn', H, kv, config.qkvBias],
        o_proj: ['self_attn', q, H, config.attentionOutBias ?? false],
        gate_proj: ['mlp', H, I, config.mlpBias ?? false],
        up_proj: ['mlp', H, I, config.mlpBias ?? false],
        down_proj: ['mlp', I, H, config.mlpBias ?? false],
        qkv_proj: ['self_attn', H, q + 2 * kv, false],
        gate_up_proj: ['mlp', H, 2 * I, false],
      };
      for (const kind of validTargetModules(config)) {
        if (!wanted.has(kind)) continue;
        const [block, inF, outF, hasBias] = dims[kind]!;
        const module = `${p}.${block}.${kind}`;
        out.push({
          module,
          weight: `${module}.weight`,
          bias: hasBias ? `${module}.bias` : null,
          inFeatures: inF,
          outFeatures: outF,
          conv1d: false,
          layer: l,
          kind,
          r: lora.r,
          scale,
        });
      }
    }
  }
  return out;
}

/** PEFT state-dict key of a LoRA matrix. */
export function peftKey(module: string, which: 'A' | 'B'): string {
  return `base_model.model.${module}.lora_${which}.weight`;
}

/** Expected adapter keys and shapes for these targets, in target order (A then B per module). */
export function adapterShapes(targets: LoraTarget[], r: number): Map<string, number[]> {
  const m = new Map<string, number[]>();
  for (const t of targets) {
    m.set(peftKey(t.module, 'A'), [r, t.inFeatures]);
    m.set(peftKey(t.module, 'B'), [t.outFeatures, r]);
  }
  return m;
}

/**
 * A fresh adapter as PEFT initializes it: A ~ U(-1/sqrt(in), 1/sqrt(in))
 * (torch kaiming_uniform_ with a = sqrt(5)), B = 0. Deterministic per seed.
 */
export function initLoraAdapter(targets: LoraTarget[], r: number, seed: number, dtype: 'float32' | 'float64' = 'float32'): TensorMap {
  if (!Number.isInteger(r) || r < 1) throw new Error(`initLoraAdapter: r must be an integer >= 1, got ${r}`);
  const rng = createRng(seed);
  const make = (n: number) => (dtype === 'float64' ? new Float64Array(n) : new Float32Array(n));
  const out: TensorMap = new Map();
  for (const t of targets) {
    const bound = 1 / Math.sqrt(t.inFeatures);
    const a = make(r * t.inFeatures);
    for (let i = 0; i < a.length; i++) a[i] = (2 * rng.next() - 1) * bound;
    out.set(peftKey(t.module, 'A'), { shape: [r, t.inFeatures], data: a });
    out.set(peftKey(t.module, 'B'), { shape: [t.outFeatures, r], data: make(t.outFeatures * r) });
  }
  return out;
}

/**
 * Check an adapter against the targets: every expected key present with the
 * right shape and finite values, no unknown keys. Throws one error listing
 * every problem found.
 */
export function validateAdapter(adapter: TensorMap, targets: LoraTarget[], r: number): void {
  const expected = adapterShapes(targets, r);
  const problems: string[] = [];
  for (const [key, shape] of expected) {
    const t = adapter.get(key);
    if (!t) {
      problems.push(`missing key ${key} (expected shape [${shape.join(', ')}])`);
      continue;
    }
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      problems.push(`key ${key}: expected shape [${shape.join(', ')}], got [${t.shape.join(', ')}]`);
      continue;
    }
    if (t.data.length !== numel(shape)) {
      problems.push(`key ${key}: has ${t.data.length} values but shape [${shape.join(', ')}] needs ${numel(shape)}`);
      continue;
    }
    const d = t.data;
    for (let i = 0; i < d.length; i++) {
      if (!Number.isFinite(d[i]!)) {
        problems.push(`key ${key}: non-finite value ${d[i]} at index ${i}`);
        break;
      }
    }
  }
  for (const key of adapter.keys()) {
    if (!expected.has(key)) problems.push(`unknown key ${key} (not a LoRA matrix of the configured target modules)`);
  }
  if (problems.length) {
    const shown = problems.slice(0, 10);
    const more = problems.length > 10 ? `\n  ... and ${problems.length - 10} more` : '';
    throw new Error(`adapter does not match the LoRA configuration (r=${r}, ${targets.length} modules):\n  ${shown.join('\n  ')}${more}`);
  }
}
