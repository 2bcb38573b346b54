/**
 * Hugging Face PEFT LoRA adapter directories: adapter_config.json +
 * adapter_model.safetensors, with PEFT key names
 * (`base_model.model.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r],
 * and for DoRA `.lora_magnitude_vector` [out]),
 * so that PEFT and LoRA-serving engines load what fedtune writes as it is.
 */
import { readFile, writeFile, access } from 'node:fs/promises';
import { join } from 'node:path';
import type { TensorMap } from './tensor.ts';
import { firstNonFinite, numel } from './tensor.ts';
import { readSafetensors, safetensorsParts, toFloat32, type StWriteEntry } from './safetensors.ts';
import { writeDirAtomic, writeParts } from './atomic.ts';
import type { LoraConfig } from './model-config.ts';
import { checkReadKeys, disallowedWrittenKeys } from './peft-keys.ts';
import { checkLoraPatternFields, layerIndexOf, layerSelected, patternRankAlpha, peftMagnitudeKey } from './lora.ts';

export const ADAPTER_CONFIG = 'adapter_config.json';
export const ADAPTER_WEIGHTS = 'adapter_model.safetensors';

/** gpt2's Conv1D module names (PEFT fan_in_fan_out). */
const CONV1D_MODULES = ['c_attn', 'c_proj', 'c_fc'];

/** `base_model.model.<module>.lora_A.weight`, optionally with PEFT's adapter-name infix (`lora_A.default.weight`). */
const LORA_KEY = /^base_model\.model\.(.+)\.lora_([AB])(?:\.([A-Za-z0-9_-]+))?\.weight$/;

/**
 * A DoRA magnitude: `base_model.model.<module>.lora_magnitude_vector` as PEFT
 * saves it, also with a `.weight` suffix (the parameter's name inside later
 * PEFT's DoraLinearLayer) and/or the adapter-name infix (`.default`).
 */
const MAGNITUDE_KEY = /^base_model\.model\.(.+)\.lora_magnitude_vector(?:\.(?!weight$)([A-Za-z0-9_-]+))?(?:\.weight)?$/;

/** A LoRA config with PEFT's variants fedtune implements. */
export type PeftLoraConfig = LoraConfig;

/**
 * The factor on B A: alpha / sqrt(r) with rsLoRA, else alpha / r (PEFT
 * LoraLayer.update_layer), of a module the patterns leave at lora.r and
 * lora.alpha; a module under rank_pattern / alpha_pattern has its own
 * (LoraTarget.scale, or moduleLoraScale).
 */
export function loraScale(lora: PeftLoraConfig): number {
  return lora.useRslora ? lora.alpha / Math.sqrt(lora.r) : lora.alpha / lora.r;
}

/** The factor on B A of one module, with its rank_pattern / alpha_pattern entries: alpha_k / r_k (alpha_k / sqrt(r_k) with rsLoRA). */
export function moduleLoraScale(lora: PeftLoraConfig, module: string): number {
  const { r, alpha } = patternRankAlpha(lora, module);
  return lora.useRslora ? alpha / Math.sqrt(r) : alpha / r;
}

export interface PeftWriteConfig {
  lora: PeftLoraConfig;
  /** Written as base_model_name_or_path. */
  baseModel: string;
  /** true for gpt2 Conv1D targets (weights stored [in, out]); default: true when every target is c_attn / c_proj / c_fc. */
  fanInFanOut?: boolean;
}

export interface PeftAdapter {
  config: LoraConfig & { useRslora: boolean; baseModel: string; fanInFanOut: boolean };
  /** adapter_config.json as read. */
  raw: Record<string, unknown>;
  /** Float32 tensors under plain PEFT keys (no adapter-name infix). */
  adapter: TensorMap;
}

/** Module path of a PEFT LoRA key, or null when the key is not one. */
export function parsePeftKey(key: string): { module: string; which: 'A' | 'B'; adapterName: string | null } | null {
  const m = LORA_KEY.exec(key);
  if (!m) return null;
  return { module: m[1]!, which: m[2] as 'A' | 'B', adapterName: m[3] ?? null };
}

/** Module path of a PEFT DoRA magnitude key (any of its spellings), or null when the key is not one. */
export function parseMagnitudeKey(key: string): { module: string; adapterName: string | null } | null {
  const m = MAGNITUDE_KEY.exec(key);
  if (!m) return null;
  return { module: m[1]!, adapterName: m[2] ?? null };
}

/**
 * Structural checks that need no model: every key a PEFT LoRA key, A [r, in]
 * and B [out, r] in pairs with the configured r, module names among the
 * targets, finite values; with use_dora each module also has its magnitude
 * [out] (`<module>.lora_magnitude_vector`), without it none does. `where`
 * names the adapter in errors.
 */
export function checkAdapterStructure(adapter: TensorMap, lora: LoraConfig, where: string): void {
  const pairs = new Map<string, { A?: number[]; B?: number[] }>();
  const magnitudes = new Map<string, number[]>();
  for (const [key, t] of adapter) {
    const mag = parseMagnitudeKey(key);
    if (mag) {
      if (!lora.useDora) {
        throw new Error(`${where}: key ${key} is a DoRA magnitude vector, but the adapter is not DoRA (use_dora is not true); set use_dora: true or remove the key`);
      }
      if (key !== peftMagnitudeKey(mag.module)) throw new Error(`${where}: key ${key} is not in PEFT's saved form ${peftMagnitudeKey(mag.module)}`);
      if (t.shape.length !== 1) throw new Error(`${where}: key ${key} must be a vector [out_features], got shape [${t.shape.join(', ')}]`);
      if (t.data.length !== t.shape[0]) throw new Error(`${where}: key ${key} has ${t.data.length} values for shape [${t.shape.join(', ')}]`);
      const bad = firstNonFinite(t.data);
      if (bad >= 0) throw new Error(`${where}: key ${key} has a non-finite value ${t.data[bad]} at index ${bad}`);
      magnitudes.set(mag.module, t.shape);
      continue;
    }
    const p = parsePeftKey(key);
    if (!p || p.adapterName !== null) {
      throw new Error(`${where}: key ${key} is not a PEFT LoRA key (base_model.model.<module>.lora_A.weight or .lora_B.weight)`);
    }
    const kind = p.module.split('.').pop()!;
    if (!lora.targetModules.includes(kind)) {
      throw new Error(`${where}: key ${key} is for module "${kind}", which is not in target_modules [${lora.targetModules.join(', ')}]`);
    }
    if (t.shape.length !== 2) throw new Error(`${where}: key ${key} must be a 2-D matrix, got shape [${t.shape.join(', ')}]`);
    if (t.data.length !== numel(t.shape)) throw new Error(`${where}: key ${key} has ${t.data.length} values for shape [${t.shape.join(', ')}]`);
    if (!layerSelected(lora, p.module)) {
      const i = layerIndexOf(p.module, lora.layersPattern);
      throw new Error(
        `${where}: key ${key} is for module ${p.module}${i === null ? ', which has no layer index' : ` in layer ${i}`}, ` +
          `but layers_to_transform is [${lora.layersToTransform!.join(', ')}]${lora.layersPattern?.length ? ` (layers_pattern ${JSON.stringify(lora.layersPattern)})` : ''}`,
      );
    }
    const rDim = p.which === 'A' ? t.shape[0] : t.shape[1];
    const want = patternRankAlpha(lora, p.module);
    if (rDim !== want.r) {
      const shape = p.which === 'A' ? `[${want.r}, in_features]` : `[out_features, ${want.r}]`;
      const from = want.rankKey !== undefined ? `rank_pattern key "${want.rankKey}" gives module ${p.module} rank ${want.r}` : `module ${p.module} has r=${want.r}`;
      throw new Error(`${where}: key ${key} has shape [${t.shape.join(', ')}] (rank ${rDim}), expected ${shape}: ${from}`);
    }
    const bad = firstNonFinite(t.data);
    if (bad >= 0) throw new Error(`${where}: key ${key} has a non-finite value ${t.data[bad]} at index ${bad}`);
    const e = pairs.get(p.module) ?? {};
    e[p.which] = t.shape;
    pairs.set(p.module, e);
  }
  if (pairs.size === 0) throw new Error(`${where}: adapter has no LoRA weights`);
  for (const [module, e] of pairs) {
    if (!e.A) throw new Error(`${where}: module ${module} has lora_B but no lora_A (${`base_model.model.${module}.lora_A.weight`} missing)`);
    if (!e.B) throw new Error(`${where}: module ${module} has lora_A but no lora_B (${`base_model.model.${module}.lora_B.weight`} missing)`);
    if (lora.useDora) {
      const m = magnitudes.get(module);
      if (!m) throw new Error(`${where}: DoRA module ${module} has no magnitude vector (${peftMagnitudeKey(module)} missing; use_dora is true)`);
      if (m[0] !== e.B[0]) throw new Error(`${where}: key ${peftMagnitudeKey(module)} has shape [${m.join(', ')}], expected [${e.B[0]}] (out_features of its lora_B)`);
    }
  }
  for (const module of magnitudes.keys()) {
    if (!pairs.has(module)) throw new Error(`${where}: key ${peftMagnitudeKey(module)} is a DoRA magnitude of module ${module}, which has no lora_A / lora_B`);
  }
}

function checkLora(lora: LoraConfig, where: string): void {
  if (!Number.isInteger(lora.r) || lora.r < 1) throw new Error(`${where}: r must be an integer >= 1, got ${JSON.stringify(lora.r)}`);
  if (typeof lora.alpha !== 'number' || !Number.isFinite(lora.alpha) || lora.alpha <= 0) {
    throw new Error(`${where}: lora_alpha must be a number > 0, got ${JSON.stringify(lora.alpha)}`);
  }
  if (typeof lora.dropout !== 'number' || !(lora.dropout >= 0 && lora.dropout < 1)) {
    throw new Error(`${where}: lora_dropout must be a number in [0, 1), got ${JSON.stringify(lora.dropout)}`);
  }
  if (!Array.isArray(lora.targetModules) || lora.targetModules.length === 0 || !lora.targetModules.every((m) => typeof m === 'string' && m.length > 0)) {
    throw new Error(`${where}: target_modules must be a non-empty list of module names, got ${JSON.stringify(lora.targetModules)}`);
  }
  try {
    checkLoraPatternFields(lora);
  } catch (err) {
    throw new Error(`${where}: ${(err as Error).message}`);
  }
}

/**
 * The adapter_config.json fedtune writes: only fields of PEFT 0.6's LoraConfig
 * (common/peft-keys.ts), so every PEFT from 0.6 on loads it, plus
 * `use_rslora: true` for rsLoRA adapters (PEFT >= 0.7.0).
 */
export function peftConfigJson(cfg: PeftWriteConfig): Record<string, unknown> {
  const json: Record<string, unknown> = {
    alpha_pattern: { ...(cfg.lora.alphaPattern ?? {}) },
    auto_mapping: null,
    base_model_name_or_path: cfg.baseModel,
    bias: 'none',
    fan_in_fan_out: cfg.fanInFanOut ?? cfg.lora.targetModules.every((m) => CONV1D_MODULES.includes(m)),
    inference_mode: true,
    init_lora_weights: true,
    // PEFT 0.6's LoraConfig types layers_pattern as one string (its matcher also takes a list): one name is written as a string.
    layers_pattern: !cfg.lora.layersPattern?.length ? null : cfg.lora.layersPattern.length === 1 ? cfg.lora.layersPattern[0] : [...cfg.lora.layersPattern],
    layers_to_transform: cfg.lora.layersToTransform?.length ? [...cfg.lora.layersToTransform] : null,
    lora_alpha: cfg.lora.alpha,
    lora_dropout: cfg.lora.dropout,
    modules_to_save: null,
    peft_type: 'LORA',
    r: cfg.lora.r,
    rank_pattern: { ...(cfg.lora.rankPattern ?? {}) },
    revision: null,
    target_modules: [...cfg.lora.targetModules],
    task_type: 'CAUSAL_LM',
  };
  if (cfg.lora.useRslora) json.use_rslora = true;
  // DoRA: PEFT >= 0.9.0 (gpt2 Conv1D targets: >= 0.11.0, common/peft-keys.ts).
  if (cfg.lora.useDora) json.use_dora = true;
  return json;
}

/**
 * Write a PEFT adapter directory atomically: both files are written into a
 * temporary directory that then replaces `dir`, so a reader never sees half an
 * adapter. An existing adapter in `dir` is replaced.
 */
export async function writePeftAdapter(dir: string, adapter: TensorMap, cfg: PeftWriteConfig): Promise<void> {
  const where = `writePeftAdapter(${dir})`;
  checkLora(cfg.lora, where);
  if (cfg.lora.useRslora !== undefined && typeof cfg.lora.useRslora !== 'boolean') {
    throw new Error(`${where}: useRslora must be true or false, got ${JSON.stringify(cfg.lora.useRslora)}`);
  }
  if (cfg.lora.useDora !== undefined && typeof cfg.lora.useDora !== 'boolean') {
    throw new Error(`${where}: useDora must be true or false, got ${JSON.stringify(cfg.lora.useDora)}`);
  }
  checkAdapterStructure(adapter, cfg.lora, where);
  const config = peftConfigJson(cfg);
  const bad = disallowedWrittenKeys(config);
  if (bad.length) throw new Error(`${where}: adapter_config.json would hold ${bad.join(', ')}, which PEFT 0.6 does not define`);
  const tensors = new Map<string, StWriteEntry>();
  for (const [k, t] of adapter) tensors.set(k, { dtype: 'F32', shape: t.shape, data: t.data });
  // Written piece by piece from the adapter's own arrays: no second copy of the weights in memory.
  const parts = safetensorsParts(tensors, { format: 'pt' });
  const json = `${JSON.stringify(config, null, 2)}\n`;
  await writeDirAtomic(
    dir,
    async (tmp) => {
      await writeParts(join(tmp, ADAPTER_WEIGHTS), parts);
      await writeFile(join(tmp, ADAPTER_CONFIG), json);
    },
    { overwrite: true },
  );
}

function field<T>(raw: Record<string, unknown>, name: string, path: string, ok: (v: unknown) => boolean, allowed: string, fallback?: T): T {
  const v = raw[name] === undefined ? fallback : raw[name];
  if (v === undefined || !ok(v)) throw new Error(`${path}: field "${name}" ${v === undefined ? 'is missing' : `is ${JSON.stringify(v)}`}; expected ${allowed}`);
  return v as T;
}

/**
 * rank_pattern, alpha_pattern, layers_to_transform and layers_pattern as PEFT
 * writes them ({} / null when unused; layers_to_transform an int or a list,
 * layers_pattern a string or a list), as LoraConfig fields (absent when unused).
 */
function readPatternFields(raw: Record<string, unknown>, path: string): Pick<LoraConfig, 'rankPattern' | 'alphaPattern' | 'layersToTransform' | 'layersPattern'> {
  const out: Pick<LoraConfig, 'rankPattern' | 'alphaPattern' | 'layersToTransform' | 'layersPattern'> = {};
  for (const [name, key, what] of [
    ['rank_pattern', 'rankPattern', 'an integer rank >= 1'],
    ['alpha_pattern', 'alphaPattern', 'an alpha > 0'],
  ] as const) {
    const v = raw[name];
    if (v === undefined || v === null) continue;
    if (typeof v !== 'object' || Array.isArray(v)) throw new Error(`${path}: field "${name}" is ${JSON.stringify(v)}; expected an object of module pattern -> ${what}`);
    const entries = Object.entries(v as Record<string, unknown>);
    for (const [k, x] of entries) {
      if (typeof x !== 'number') throw new Error(`${path}: field "${name}": key "${k}" is ${JSON.stringify(x)}; expected ${what}`);
    }
    if (entries.length) out[key] = Object.fromEntries(entries) as Record<string, number>;
  }
  const lt = raw.layers_to_transform;
  if (lt !== undefined && lt !== null) {
    const list = typeof lt === 'number' ? [lt] : lt;
    if (!Array.isArray(list) || !list.every((i) => Number.isInteger(i) && (i as number) >= 0)) {
      throw new Error(`${path}: field "layers_to_transform" is ${JSON.stringify(lt)}; expected null, a layer index or a list of layer indices (integers >= 0)`);
    }
    if (list.length) out.layersToTransform = [...(list as number[])];
  }
  const lp = raw.layers_pattern;
  if (lp !== undefined && lp !== null && lp !== '') {
    const list = typeof lp === 'string' ? [lp] : lp;
    if (!Array.isArray(list) || !list.every((p) => typeof p === 'string' && p.length > 0)) {
      throw new Error(`${path}: field "layers_pattern" is ${JSON.stringify(lp)}; expected null, a layer list name such as "layers" or "h", or a list of them`);
    }
    if (list.length) out.layersPattern = [...(list as string[])];
  }
  return out;
}

/** Read a PEFT LoRA adapter directory, normalizing `lora_A.default.weight` style keys to the plain form. */
export async function readPeftAdapter(dir: string): Promise<PeftAdapter> {
  const cfgPath = join(dir, ADAPTER_CONFIG);
  let text: string;
  try {
    text = await readFile(cfgPath, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new Error(`adapter directory ${dir} has no ${ADAPTER_CONFIG}`);
    throw err;
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new Error(`${cfgPath}: not valid JSON (${(err as Error).message})`);
  }
  if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) throw new Error(`${cfgPath}: must be a JSON object`);
  const raw = parsed as Record<string, unknown>;
  if (raw.peft_type !== 'LORA') throw new Error(`${cfgPath}: peft_type is ${JSON.stringify(raw.peft_type)}; only "LORA" adapters are supported`);

  const r = field<number>(raw, 'r', cfgPath, (v) => Number.isInteger(v) && (v as number) >= 1, 'an integer >= 1');
  const alpha = field<number>(raw, 'lora_alpha', cfgPath, (v) => typeof v === 'number' && Number.isFinite(v) && v > 0, 'a number > 0');
  const dropout = field<number>(raw, 'lora_dropout', cfgPath, (v) => typeof v === 'number' && v >= 0 && v < 1, 'a number in [0, 1)', 0);
  const targets = raw.target_modules;
  if (typeof targets === 'string') {
    throw new Error(`${cfgPath}: target_modules is the pattern ${JSON.stringify(targets)}; fedtune needs an explicit list of module names`);
  }
  const targetModules = field<string[]>(
    raw,
    'target_modules',
    cfgPath,
    (v) => Array.isArray(v) && v.length > 0 && v.every((x) => typeof x === 'string' && x.length > 0),
    'a non-empty list of module names',
  );
  const fanInFanOut = field<boolean>(raw, 'fan_in_fan_out', cfgPath, (v) => typeof v === 'boolean', 'true or false', false);
  const base = raw.base_model_name_or_path;
  if (base !== undefined && base !== null && typeof base !== 'string') {
    throw new Error(`${cfgPath}: field "base_model_name_or_path" is ${JSON.stringify(base)}; expected a string or null`);
  }
  if (raw.bias !== undefined && raw.bias !== 'none') {
    throw new Error(`${cfgPath}: field "bias" is ${JSON.stringify(raw.bias)}; fedtune supports only bias "none" (LoRA without trained biases)`);
  }
  const useRslora = field<boolean>(raw, 'use_rslora', cfgPath, (v) => typeof v === 'boolean', 'true or false', false);
  // PEFT writes use_dora from 0.9.0 on; null is how a config round-tripped through some tools spells the default.
  const useDora = raw.use_dora === null ? false : field<boolean>(raw, 'use_dora', cfgPath, (v) => typeof v === 'boolean', 'true or false', false);
  const patterns = readPatternFields(raw, cfgPath);
  const init = raw.init_lora_weights;
  if (init !== undefined && typeof init !== 'boolean' && init !== 'gaussian') {
    throw new Error(
      `${cfgPath}: field "init_lora_weights" is ${JSON.stringify(init)}; fedtune loads adapters initialized with true, false or "gaussian" ` +
        '(PiSSA / OLoRA / LoftQ style adapters change the base weights: convert them to plain LoRA in PEFT first)',
    );
  }
  checkReadKeys(raw, cfgPath);

  const wPath = join(dir, ADAPTER_WEIGHTS);
  try {
    await access(wPath);
  } catch {
    let hint = '';
    try {
      await access(join(dir, 'adapter_model.bin'));
      hint = ' (found adapter_model.bin: convert PyTorch .bin adapters to safetensors)';
    } catch {
      /* no .bin either */
    }
    throw new Error(`adapter directory ${dir} has no ${ADAPTER_WEIGHTS}${hint}`);
  }
  const st = await readSafetensors(wPath);
  const adapter: TensorMap = new Map();
  for (const [key, entry] of st.tensors) {
    const mag = parseMagnitudeKey(key);
    const p = mag ? null : parsePeftKey(key);
    if (!p && !mag) throw new Error(`${wPath}: key ${key} is not a PEFT LoRA key (base_model.model.<module>.lora_A.weight, .lora_B.weight or, for DoRA, .lora_magnitude_vector)`);
    const plain = mag ? peftMagnitudeKey(mag.module) : `base_model.model.${p!.module}.lora_${p!.which}.weight`;
    if (adapter.has(plain)) throw new Error(`${wPath}: key ${key} duplicates ${plain} (one adapter per directory)`);
    if (entry.dtype !== 'F32' && entry.dtype !== 'F16' && entry.dtype !== 'BF16' && entry.dtype !== 'F64') {
      throw new Error(`${wPath}: key ${key} has dtype ${entry.dtype}; expected F32, F16, BF16 or F64`);
    }
    adapter.set(plain, { shape: [...entry.shape], data: toFloat32(entry) });
  }
  const lora: LoraConfig = { r, alpha, dropout, targetModules: [...targetModules], ...patterns };
  if (useRslora) lora.useRslora = true;
  if (useDora) lora.useDora = true;
  try {
    checkLoraPatternFields(lora);
  } catch (err) {
    throw new Error(`${cfgPath}: ${(err as Error).message.replace(/lora\.(rank_pattern|alpha_pattern|layers_to_transform|layers_pattern)/g, 'field "$1"')}`);
  }
  checkAdapterStructure(adapter, lora, wPath);
  return {
    config: { ...lora, useRslora, baseModel: typeof base === 'string' ? base : '', fanInFanOut },
    raw,
    adapter,
  };
}
