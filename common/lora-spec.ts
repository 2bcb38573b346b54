/**
 * One LoRA configuration, three spellings: the run config's `lora` section
 * (snake_case, PEFT's field names), the engine's `LoraConfig`, and the wire's
 * `LoraSpec`. The coordinator builds every LoraConfig it uses (tasks, the
 * strategy's shapes, checkpoint adapters) with `loraConfigOf`, sends it with
 * `loraSpecOf`, and the worker reads it back with `loraConfigFromSpec`:
 * the three round-trip exactly (test/unit/lora-spec.test.ts).
 */
import type { LoraConfig } from './model-config.ts';
import type { LoraSpec, PatternEntry } from '../proto/gen/fedtune/v1/coordinator.ts';

/** The run config's `lora` section as parsed (common/config.ts). */
export interface RunLoraSection {
  r: number;
  alpha: number;
  dropout: number;
  target_modules: string[];
  use_rslora: boolean;
  use_dora: boolean;
  rank_pattern: Record<string, number>;
  alpha_pattern: Record<string, number>;
  layers_to_transform: number | number[] | null;
  layers_pattern: string | string[] | null;
}

/**
 * The LoraConfig of a run, optionally at a site's own rank (FLoRA / FlexLoRA
 * give each site its rank). A site's alpha keeps the run's scale on B·A:
 * alpha·r/r0 for plain LoRA (scale alpha/r), alpha·sqrt(r/r0) for rsLoRA
 * (scale alpha/sqrt(r)).
 */
export function loraConfigOf(l: RunLoraSection, rank?: number): LoraConfig {
  const r = rank ?? l.r;
  const alpha = r === l.r ? l.alpha : l.use_rslora ? l.alpha * Math.sqrt(r / l.r) : (l.alpha * r) / l.r;
  const out: LoraConfig = { r, alpha, dropout: l.dropout, targetModules: [...l.target_modules] };
  if (l.use_rslora) out.useRslora = true;
  if (l.use_dora) out.useDora = true;
  if (Object.keys(l.rank_pattern).length) out.rankPattern = { ...l.rank_pattern };
  if (Object.keys(l.alpha_pattern).length) out.alphaPattern = { ...l.alpha_pattern };
  if (l.layers_to_transform !== null) out.layersToTransform = Array.isArray(l.layers_to_transform) ? [...l.layers_to_transform] : [l.layers_to_transform];
  if (l.layers_pattern !== null) out.layersPattern = Array.isArray(l.layers_pattern) ? [...l.layers_pattern] : [l.layers_pattern];
  return out;
}

/** The wire form of a LoraConfig. */
export function loraSpecOf(l: LoraConfig): LoraSpec {
  return {
    r: l.r,
    alpha: l.alpha,
    dropout: l.dropout,
    targetModules: [...l.targetModules],
    useRslora: l.useRslora ?? false,
    useDora: l.useDora ?? false,
    rankPattern: Object.entries(l.rankPattern ?? {}).map(([key, value]) => ({ key, value })),
    alphaPattern: Object.entries(l.alphaPattern ?? {}).map(([key, value]) => ({ key, value })),
    layersToTransform: [...(l.layersToTransform ?? [])],
    layersPattern: [...(l.layersPattern ?? [])],
  };
}

/** The LoraConfig a task's LoraSpec describes (absent fields: the proto's defaults). */
export function loraConfigFromSpec(s: LoraSpec | undefined): LoraConfig {
  const out: LoraConfig = { r: s?.r ?? 8, alpha: s?.alpha ?? 16, dropout: s?.dropout ?? 0, targetModules: [...(s?.targetModules ?? [])] };
  if (s?.useRslora) out.useRslora = true;
  if (s?.useDora) out.useDora = true;
  if (s?.rankPattern.length) out.rankPattern = patternOf(s.rankPattern, 'rank_pattern');
  if (s?.alphaPattern.length) out.alphaPattern = patternOf(s.alphaPattern, 'alpha_pattern');
  if (s?.layersToTransform.length) out.layersToTransform = [...s.layersToTransform];
  if (s?.layersPattern.length) out.layersPattern = [...s.layersPattern];
  return out;
}

/**
 * A wire pattern list as a LoraConfig pattern, in its order. A key given twice,
 * or a key a JavaScript object would reorder (an integer such as "0"), is refused:
 * the order is the meaning (the first matching key wins).
 */
function patternOf(entries: readonly PatternEntry[], field: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const { key, value } of entries) {
    if (key in out) throw new Error(`LoraSpec.${field}: key "${key}" is given twice; each pattern key once`);
    if (/^(0|[1-9]\d*)$/.test(key)) throw new Error(`LoraSpec.${field}: key "${key}" is a bare number, which names no module; use a module-name suffix such as "q_proj"`);
    out[key] = value;
  }
  return out;
}

/** The variant fields of a LoraConfig that are set, by their run-config names (for refusals). */
export function loraVariantsSet(l: LoraConfig): string[] {
  const out: string[] = [];
  if (l.useRslora) out.push('use_rslora');
  if (l.useDora) out.push('use_dora');
  if (l.rankPattern && Object.keys(l.rankPattern).length) out.push('rank_pattern');
  if (l.alphaPattern && Object.keys(l.alphaPattern).length) out.push('alpha_pattern');
  if (l.layersToTransform?.length) out.push('layers_to_transform');
  if (l.layersPattern?.length) out.push('layers_pattern');
  return out;
}
