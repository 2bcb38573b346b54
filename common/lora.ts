/**
 * LoRA targets, PEFT key names, adapter initialization and validation.
 *
 * A LoRA adapter on a linear map W (out x in) adds (alpha / r) * B A with
 * A [r, in] and B [out, r]. Keys and shapes follow Hugging Face PEFT exactly:
 * `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r],
 * also for gpt2's Conv1D modules (whose base weight is stored [in, out]).
 */
import { firstNonFinite, numel, type TensorMap } from './tensor.ts';
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
  /**
   * Present on every target of a config with a rank_pattern or alpha_pattern:
   * the config's own r, and the pattern keys that set this module's rank and
   * alpha (absent where lora.r / lora.alpha apply). A uniform rank override
   * (adapterShapes(targets, r) with r other than `r`) is refused for such targets.
   */
  pattern?: { r: number; rankKey?: string; alphaKey?: string };
  /**
   * DoRA (lora.useDora): the module also has a trained magnitude vector m
   * [out] (PEFT `lora_magnitude_vector`), and its weight becomes
   * m * (W + scale * B A) / ||W + scale * B A|| per output feature.
   */
  dora?: true;
}

/**
 * PEFT's rank_pattern / alpha_pattern lookup (peft/utils/other.py
 * `get_pattern_key`, used by LoraModel._create_and_replace): the keys are
 * tried in their order and the first key k with
 * `re.match(rf"(.*\.)?({k})$", name)` wins, k being a regular expression
 * matched against the module's full name (`model.layers.0.self_attn.q_proj`).
 * So "q_proj" matches every q_proj, "layers.0.self_attn.q_proj" only the one
 * in layer 0, and "layers\.[01]\..*v_proj" a regex choice. This is current
 * PEFT; PEFT 0.6 to 0.13 tried `re.match(rf".*\.{k}$", name)` and then an
 * exact-name lookup, which agrees except for a regex key that only matches
 * from the name's first character (e.g. "model\..*q_proj"): that key matches
 * here and in current PEFT, and silently matched nothing in the older releases.
 */
export function patternKeyFor(keys: readonly string[], module: string, compiled?: ReadonlyMap<string, RegExp>): string | undefined {
  for (const k of keys) {
    const re = compiled?.get(k) ?? new RegExp(`^(?:.*\\.)?(?:${k})$`);
    if (re.test(module)) return k;
  }
  return undefined;
}

/** The regex of a pattern key, or an error naming the field and the key. */
function compilePatternKeys(field: string, pattern: Record<string, number>): Map<string, RegExp> {
  const out = new Map<string, RegExp>();
  for (const k of Object.keys(pattern)) {
    if (k.length === 0) throw new Error(`${field}: empty key; use a module name suffix such as "q_proj" or "layers.0.self_attn.q_proj"`);
    try {
      out.set(k, new RegExp(`^(?:.*\\.)?(?:${k})$`));
    } catch (err) {
      throw new Error(`${field}: key "${k}" is not a regular expression fedtune can evaluate (${(err as Error).message}); use a module name suffix such as "q_proj" or a plain regex`);
    }
  }
  return out;
}

/**
 * The layer index PEFT's check_target_module_exists reads from a module name
 * when layers_to_transform is set (peft/tuners/tuners_utils.py, current):
 * without layers_pattern `re.match(r".*?\.[^.]*\.(\d+)\.", name)` (the first
 * numbered segment), with it `re.match(rf".*?\.{p}\.(\d+)\.", name)` for each
 * name p in turn. A module with no index is not adapted. (PEFT 0.6 used a greedy
 * `.*` and, without layers_pattern, tried "layers", "h", "block", "blocks",
 * "layer": the same index for every module fedtune targets.)
 */
export function layerIndexOf(module: string, layersPattern?: readonly string[]): number | null {
  if (!layersPattern || layersPattern.length === 0) {
    const m = /^.*?\.[^.]*\.(\d+)\./.exec(module);
    return m ? Number(m[1]) : null;
  }
  for (const p of layersPattern) {
    const m = new RegExp(`^.*?\\.${p}\\.(\\d+)\\.`).exec(module);
    if (m) return Number(m[1]);
  }
  return null;
}

/** Check the pattern fields' types and values that need no model; throws naming the field (and key). */
export function checkLoraPatternFields(lora: LoraConfig): void {
  for (const [field, pattern, what] of [
    ['lora.rank_pattern', lora.rankPattern, 'rank'],
    ['lora.alpha_pattern', lora.alphaPattern, 'alpha'],
  ] as const) {
    if (pattern === undefined) continue;
    if (pattern === null || typeof pattern !== 'object' || Array.isArray(pattern)) {
      throw new Error(`${field} must be an object of module pattern -> ${what}, got ${JSON.stringify(pattern)}`);
    }
    for (const [k, v] of Object.entries(pattern)) {
      if (what === 'rank' && (typeof v !== 'number' || !Number.isInteger(v) || v < 1)) {
        throw new Error(`${field}: key "${k}" has rank ${JSON.stringify(v)}; a rank must be an integer >= 1`);
      }
      if (what === 'alpha' && (typeof v !== 'number' || !Number.isFinite(v) || v <= 0)) {
        throw new Error(`${field}: key "${k}" has alpha ${JSON.stringify(v)}; alpha must be a number > 0`);
      }
    }
    compilePatternKeys(field, pattern);
  }
  const lt = lora.layersToTransform;
  if (lt !== undefined) {
    if (!Array.isArray(lt) || !lt.every((i) => typeof i === 'number' && Number.isInteger(i) && i >= 0)) {
      throw new Error(`lora.layers_to_transform must be a list of layer indices (integers >= 0), got ${JSON.stringify(lt)}`);
    }
  }
  const lp = lora.layersPattern;
  if (lp !== undefined) {
    if (!Array.isArray(lp) || !lp.every((p) => typeof p === 'string' && p.length > 0)) {
      throw new Error(`lora.layers_pattern must be the name (or names) of the layer list, such as "layers" or "h", got ${JSON.stringify(lp)}`);
    }
    for (const p of lp) {
      try {
        new RegExp(p);
      } catch (err) {
        throw new Error(`lora.layers_pattern: "${p}" is not a regular expression fedtune can evaluate (${(err as Error).message})`);
      }
    }
    // PEFT's LoraConfig.__post_init__ refuses layers_pattern without layers_to_transform.
    if (lp.length > 0 && !(lt && lt.length > 0)) {
      throw new Error('lora.layers_pattern is set but lora.layers_to_transform is not: layers_pattern only says which list layers_to_transform indexes; set layers_to_transform too, or remove layers_pattern');
    }
  }
}

/** The rank and alpha PEFT gives a module under these patterns (name-only; no model needed). */
export function patternRankAlpha(lora: LoraConfig, module: string): { r: number; alpha: number; rankKey?: string; alphaKey?: string } {
  const rankKey = lora.rankPattern ? patternKeyFor(Object.keys(lora.rankPattern), module) : undefined;
  const alphaKey = lora.alphaPattern ? patternKeyFor(Object.keys(lora.alphaPattern), module) : undefined;
  const out: { r: number; alpha: number; rankKey?: string; alphaKey?: string } = {
    r: rankKey !== undefined ? lora.rankPattern![rankKey]! : lora.r,
    alpha: alphaKey !== undefined ? lora.alphaPattern![alphaKey]! : lora.alpha,
  };
  if (rankKey !== undefined) out.rankKey = rankKey;
  if (alphaKey !== undefined) out.alphaKey = alphaKey;
  return out;
}

/** Whether a module gets an adapter under layers_to_transform / layers_pattern (PEFT check_target_module_exists). */
export function layerSelected(lora: LoraConfig, module: string): boolean {
  const lt = lora.layersToTransform;
  if (!lt || lt.length === 0) return true;
  const i = layerIndexOf(module, lora.layersPattern);
  return i !== null && lt.includes(i);
}

/** The ranks of these targets for an adapter of rank `r`: each target's own rank, or r for every module (see LoraTarget.pattern). */
export function targetRanks(targets: readonly LoraTarget[], r?: number): number[] {
  if (r === undefined) return targets.map((t) => t.r);
  const patterned = targets.find((t) => t.pattern);
  if (!patterned) return targets.map(() => r);
  if (r === patterned.pattern!.r) return targets.map((t) => t.r);
  const keyed = targets.find((t) => t.pattern?.rankKey !== undefined || t.pattern?.alphaKey !== undefined) ?? patterned;
  const key = keyed.pattern!.rankKey !== undefined ? `rank_pattern key "${keyed.pattern!.rankKey}"` : `alpha_pattern key "${keyed.pattern!.alphaKey}"`;
  throw new Error(
    `one LoRA rank ${r} for every module cannot be used with lora.rank_pattern / lora.alpha_pattern (${keyed.module} has rank ${keyed.r} from ${key}); ` +
      'per-site ranks (FLoRA / FlexLoRA) need a config without rank_pattern and alpha_pattern',
  );
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
  checkLoraPatternFields(lora);
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
  const patterned = applyLoraPatterns(config, lora, out);
  return lora.useDora ? patterned.map((t) => ({ ...t, dora: true as const })) : patterned;
}

/**
 * layers_to_transform / layers_pattern, then rank_pattern / alpha_pattern, on
 * the uniform targets, as PEFT applies them; refuses what PEFT would silently
 * ignore (a pattern key or layer index that selects nothing) and ranks a
 * module cannot have.
 */
function applyLoraPatterns(config: ModelConfig, lora: LoraConfig, all: LoraTarget[]): LoraTarget[] {
  const lt = lora.layersToTransform ?? [];
  const lp = lora.layersPattern ?? [];
  let out = all;
  if (lt.length > 0) {
    for (const i of lt) {
      if (i >= config.numLayers) {
        throw new Error(`lora.layers_to_transform: layer ${i} is out of range; ${config.modelType} has ${config.numLayers} layers (0 to ${config.numLayers - 1})`);
      }
    }
    out = all.filter((t) => layerSelected(lora, t.module));
    if (out.length === 0) {
      const own = config.family === 'gpt2' ? 'h' : 'layers';
      throw new Error(
        `lora.layers_pattern ${JSON.stringify(lp)} names no layer list of ${config.modelType} (its layers are ${all[0]?.module.replace(/\.\d+\..*$/, '') ?? `"${own}"`}.<i>): ` +
          `no module would get an adapter; set layers_pattern to "${own}" or remove it`,
      );
    }
  }
  const rp = lora.rankPattern ?? {};
  const ap = lora.alphaPattern ?? {};
  const rankKeys = Object.keys(rp);
  const alphaKeys = Object.keys(ap);
  if (rankKeys.length === 0 && alphaKeys.length === 0) return out;
  const rankRe = compilePatternKeys('lora.rank_pattern', rp);
  const alphaRe = compilePatternKeys('lora.alpha_pattern', ap);
  const rankUsed = new Set<string>();
  const alphaUsed = new Set<string>();
  const patterned = out.map((t): LoraTarget => {
    const rankKey = patternKeyFor(rankKeys, t.module, rankRe);
    const alphaKey = patternKeyFor(alphaKeys, t.module, alphaRe);
    const r = rankKey !== undefined ? rp[rankKey]! : lora.r;
    const alpha = alphaKey !== undefined ? ap[alphaKey]! : lora.alpha;
    if (rankKey !== undefined) {
      rankUsed.add(rankKey);
      const limit = Math.min(t.inFeatures, t.outFeatures);
      if (r > limit) {
        throw new Error(
          `lora.rank_pattern: key "${rankKey}" gives ${t.module} rank ${r}, but it maps ${t.inFeatures} -> ${t.outFeatures} features, ` +
            `so its rank can be at most ${limit} (min of in and out); lower the rank of "${rankKey}" to ${limit} or less`,
        );
      }
    }
    if (alphaKey !== undefined) alphaUsed.add(alphaKey);
    const pattern: NonNullable<LoraTarget['pattern']> = { r: lora.r };
    if (rankKey !== undefined) pattern.rankKey = rankKey;
    if (alphaKey !== undefined) pattern.alphaKey = alphaKey;
    return { ...t, r, scale: lora.useRslora ? alpha / Math.sqrt(r) : alpha / r, pattern };
  });
  for (const [field, keys, used] of [
    ['lora.rank_pattern', rankKeys, rankUsed],
    ['lora.alpha_pattern', alphaKeys, alphaUsed],
  ] as const) {
    for (const k of keys) {
      if (used.has(k)) continue;
      const re = (field === 'lora.rank_pattern' ? rankRe : alphaRe).get(k)!;
      const shadowedBy = out.find((t) => re.test(t.module));
      if (shadowedBy) {
        const first = patternKeyFor(keys, shadowedBy.module, field === 'lora.rank_pattern' ? rankRe : alphaRe);
        throw new Error(
          `${field}: key "${k}" never applies: every module it matches (such as ${shadowedBy.module}) is matched first by the earlier key "${first}"; ` +
            'keys are tried in order (as in PEFT), so put the more specific key first or remove it',
        );
      }
      throw new Error(
        `${field}: key "${k}" matches none of the ${out.length} adapted modules (such as ${out[0]!.module}); ` +
          `a key is a module-name suffix or regex such as "${out[0]!.kind}" or "${out[0]!.module.split('.').slice(1).join('.')}"; fix or remove it`,
      );
    }
  }
  return patterned;
}

/** PEFT state-dict key of a LoRA matrix. */
export function peftKey(module: string, which: 'A' | 'B'): string {
  return `base_model.model.${module}.lora_${which}.weight`;
}

/**
 * PEFT state-dict key of a DoRA magnitude vector [out_features]. PEFT from
 * 0.9 (the first with DoRA) through current releases saves it without a
 * `.weight` suffix: get_peft_model_state_dict strips the `.weight` that the
 * later DoraLinearLayer module (which replaced 0.9's ParameterDict) adds, to
 * keep the file format. common/peft.ts reads both spellings.
 */
export function peftMagnitudeKey(module: string): string {
  return `base_model.model.${module}.lora_magnitude_vector`;
}

/**
 * Expected adapter keys and shapes for these targets, in target order (A then
 * B per module, then the DoRA magnitude [out] for DoRA targets): each module
 * at its own rank (t.r), or at rank r for every module when r is given (targetRanks).
 */
export function adapterShapes(targets: readonly LoraTarget[], r?: number): Map<string, number[]> {
  const ranks = targetRanks(targets, r);
  const m = new Map<string, number[]>();
  targets.forEach((t, i) => {
    const rk = ranks[i]!;
    m.set(peftKey(t.module, 'A'), [rk, t.inFeatures]);
    m.set(peftKey(t.module, 'B'), [t.outFeatures, rk]);
    if (t.dora) m.set(peftMagnitudeKey(t.module), [t.outFeatures]);
  });
  return m;
}

/**
 * ||W||_c of a base weight as DoRA uses it: the L2 norm of each output
 * feature's weights (PEFT get_weight_norm, dim=1 of W [out, in]), accumulated
 * in float64. `data` is the weight as the checkpoint stores it: [out, in], or
 * [in, out] for gpt2's Conv1D (t.conv1d), whose output features are columns.
 */
export function weightRowNorms(t: LoraTarget, data: ArrayLike<number>): Float64Array {
  const nIn = t.inFeatures;
  const nOut = t.outFeatures;
  if (data.length !== nIn * nOut) {
    throw new Error(`weightRowNorms: ${t.weight} has ${data.length} values, expected ${nOut} x ${nIn} = ${nIn * nOut}`);
  }
  const sq = new Float64Array(nOut);
  if (t.conv1d) {
    for (let i = 0; i < nIn; i++) for (let o = 0; o < nOut; o++) sq[o] += data[i * nOut + o]! * data[i * nOut + o]!;
  } else {
    for (let o = 0; o < nOut; o++) {
      let s = 0;
      for (let i = 0; i < nIn; i++) s += data[o * nIn + i]! * data[o * nIn + i]!;
      sq[o] = s;
    }
  }
  for (let o = 0; o < nOut; o++) {
    if (!(sq[o]! > 0)) {
      // PEFT would divide by this norm and produce NaN from the first step on.
      throw new Error(
        `DoRA (use_dora): output feature ${o} of ${t.weight} has all-zero weights (norm 0), so m / ||W|| is undefined; ` +
          `leave ${t.kind} out of target_modules or train it without use_dora`,
      );
    }
    sq[o] = Math.sqrt(sq[o]!);
  }
  return sq;
}

/**
 * A fresh adapter as PEFT initializes it: A ~ U(-1/sqrt(in), 1/sqrt(in))
 * (torch kaiming_uniform_ with a = sqrt(5)), B = 0, and for DoRA targets the
 * magnitude m = ||W + scale B A||_c = ||W||_c (B = 0), which needs the base
 * weights' row norms: `magnitudes` maps each DoRA module to weightRowNorms of
 * its base weight (worker/engine/engine.ts computes them from the loaded model,
 * common/dora-norms.ts reads them from the checkpoint one weight at a time).
 * Deterministic per seed.
 */
export function initLoraAdapter(
  targets: readonly LoraTarget[],
  r: number | undefined,
  seed: number,
  dtype: 'float32' | 'float64' = 'float32',
  magnitudes?: ReadonlyMap<string, ArrayLike<number>>,
): TensorMap {
  if (r !== undefined && (!Number.isInteger(r) || r < 1)) throw new Error(`initLoraAdapter: r must be an integer >= 1, got ${r}`);
  const ranks = targetRanks(targets, r);
  const rng = createRng(seed);
  const make = (n: number) => (dtype === 'float64' ? new Float64Array(n) : new Float32Array(n));
  const out: TensorMap = new Map();
  for (const [ti, t] of targets.entries()) {
    const r = ranks[ti]!;
    const bound = 1 / Math.sqrt(t.inFeatures);
    const a = make(r * t.inFeatures);
    for (let i = 0; i < a.length; i++) a[i] = (2 * rng.next() - 1) * bound;
    out.set(peftKey(t.module, 'A'), { shape: [r, t.inFeatures], data: a });
    out.set(peftKey(t.module, 'B'), { shape: [t.outFeatures, r], data: make(t.outFeatures * r) });
    if (t.dora) {
      const norms = magnitudes?.get(t.module);
      if (!norms) throw new Error(`initLoraAdapter: DoRA module ${t.module} needs the row norms of its base weight ${t.weight} (the initial magnitude ||W||)`);
      if (norms.length !== t.outFeatures) throw new Error(`initLoraAdapter: DoRA magnitude of ${t.module} has ${norms.length} values, expected ${t.outFeatures}`);
      const m = make(t.outFeatures);
      for (let o = 0; o < m.length; o++) m[o] = norms[o]!;
      out.set(peftMagnitudeKey(t.module), { shape: [t.outFeatures], data: m });
    }
  }
  return out;
}

/**
 * Check an adapter against the targets: every expected key present with the
 * right shape and finite values, no unknown keys. Throws one error listing
 * every problem found.
 */
export function validateAdapter(adapter: TensorMap, targets: readonly LoraTarget[], r?: number): void {
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
    const bad = firstNonFinite(t.data);
    if (bad >= 0) problems.push(`key ${key}: non-finite value ${t.data[bad]} at index ${bad}`);
  }
  for (const key of adapter.keys()) {
    if (!expected.has(key)) {
      const hint = key.endsWith('.lora_magnitude_vector') ? ' (a DoRA magnitude, but the configuration has no use_dora)' : '';
      problems.push(`unknown key ${key} (not a LoRA matrix of the configured target modules)${hint}`);
    }
  }
  if (problems.length) {
    const shown = problems.slice(0, 10);
    const more = problems.length > 10 ? `\n  ... and ${problems.length - 10} more` : '';
    const rs = [...new Set(targetRanks(targets, r))];
    throw new Error(`adapter does not match the LoRA configuration (r=${rs.length === 1 ? rs[0] : `per module ${rs.join('/')}`}, ${targets.length} modules):\n  ${shown.join('\n  ')}${more}`);
  }
}
