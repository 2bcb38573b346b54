/**
 * The fields of PEFT's LoraConfig, for checking adapter_config.json both ways.
 *
 * Writing: fedtune writes only fields of LoraConfig as PEFT 0.6.0 defines it, so
 * that every PEFT release from 0.6 on loads the file (older PEFT sets only the
 * attributes it knows; newer PEFT fills the rest with defaults). The
 * exceptions are `use_rslora`, written only for an rsLoRA adapter: it needs PEFT
 * 0.7.0 or later, and an older PEFT would silently use the wrong scale; and
 * `use_dora`, written only for a DoRA adapter: it needs PEFT 0.9.0 or later
 * (the release that added DoRA, huggingface/peft#1474), and gpt2 (Conv1D,
 * fan_in_fan_out) DoRA adapters need PEFT 0.11.0 or later (0.9 and 0.10 took
 * the norm over the untransposed Conv1D weight, fixed by huggingface/peft#1588).
 *
 * Source: PEFT v0.6.0, src/peft/config.py (PeftConfigMixin: peft_type,
 * auto_mapping; PeftConfig: base_model_name_or_path, revision, task_type,
 * inference_mode) and src/peft/tuners/lora/config.py (LoraConfig: r,
 * target_modules, lora_alpha, lora_dropout, fan_in_fan_out, bias,
 * modules_to_save, init_lora_weights, layers_to_transform, layers_pattern,
 * rank_pattern, alpha_pattern); documented at
 * https://huggingface.co/docs/peft/v0.6.0/en/package_reference/lora.
 *
 * Reading: every LoraConfig field up to PEFT 0.17 is known. A field fedtune
 * does not implement is accepted only at PEFT's default value, anything else
 * is refused naming the field; a field PEFT never defined is refused too.
 * rank_pattern, alpha_pattern, layers_to_transform, layers_pattern and
 * use_dora are implemented, read and written (common/lora.ts matches them as current PEFT
 * does; patternKeyFor notes where PEFT 0.6's matcher differed).
 */

/** adapter_config.json fields of PEFT 0.6.0's LoraConfig (PeftConfig fields included). */
export const PEFT_06_LORA_KEYS: readonly string[] = [
  'peft_type',
  'auto_mapping',
  'base_model_name_or_path',
  'revision',
  'task_type',
  'inference_mode',
  'r',
  'target_modules',
  'lora_alpha',
  'lora_dropout',
  'fan_in_fan_out',
  'bias',
  'modules_to_save',
  'init_lora_weights',
  'layers_to_transform',
  'layers_pattern',
  'rank_pattern',
  'alpha_pattern',
];

/** Fields beyond the 0.6 set that fedtune writes, with the PEFT version that reads them. */
export const PEFT_LATER_WRITTEN_KEYS: Readonly<Record<string, string>> = { use_rslora: '0.7.0', use_dora: '0.9.0' };

/** Fields fedtune reads and implements (the rest of the 0.6 set is implemented-at-default below). */
export const PEFT_IMPLEMENTED_KEYS: readonly string[] = [
  'peft_type',
  'auto_mapping',
  'base_model_name_or_path',
  'revision',
  'task_type',
  'inference_mode',
  'r',
  'target_modules',
  'lora_alpha',
  'lora_dropout',
  'fan_in_fan_out',
  'bias',
  'init_lora_weights',
  'use_rslora',
  'use_dora',
  'layers_to_transform',
  'layers_pattern',
  'rank_pattern',
  'alpha_pattern',
];

const isNull = (v: unknown) => v === null;
const isEmptyObject = (v: unknown) => v === null || (typeof v === 'object' && !Array.isArray(v) && Object.keys(v as object).length === 0);
const isFalse = (v: unknown) => v === false || v === null;
const isNullOrEmptyList = (v: unknown) => v === null || (Array.isArray(v) && v.length === 0);
const anyValue = () => true;

/**
 * PEFT LoraConfig fields fedtune does not implement, with the test for PEFT's
 * default value (accepted) and what fedtune does instead (said when refused).
 */
export const PEFT_DEFAULT_ONLY_KEYS: Readonly<Record<string, { isDefault: (v: unknown) => boolean; default: string; instead: string }>> = {
  modules_to_save: { isDefault: isNullOrEmptyList, default: 'null', instead: 'fedtune trains and loads only the LoRA matrices of target_modules' },
  loftq_config: { isDefault: isEmptyObject, default: '{}', instead: 'fedtune does not load LoftQ-quantized bases' },
  megatron_config: { isDefault: isNull, default: 'null', instead: 'fedtune does not target Megatron parallel layers' },
  megatron_core: { isDefault: anyValue, default: '"megatron.core"', instead: '' },
  layer_replication: { isDefault: isNull, default: 'null', instead: 'fedtune does not replicate layers' },
  runtime_config: { isDefault: anyValue, default: '{}', instead: '' },
  exclude_modules: { isDefault: (v) => v === null || isNullOrEmptyList(v), default: 'null', instead: 'fedtune targets every module named in target_modules' },
  lora_bias: { isDefault: isFalse, default: 'false', instead: 'fedtune LoRA has no bias on lora_B' },
  eva_config: { isDefault: isNull, default: 'null', instead: 'EVA initialization only matters when training starts; it is not supported' },
  corda_config: { isDefault: isNull, default: 'null', instead: 'CorDA initialization is not supported' },
  trainable_token_indices: { isDefault: isNull, default: 'null', instead: 'fedtune does not train embedding rows' },
  target_parameters: { isDefault: (v) => v === null || isNullOrEmptyList(v), default: 'null', instead: 'fedtune targets modules, not parameters' },
  use_qalora: { isDefault: isFalse, default: 'false', instead: 'QA-LoRA is not supported' },
  qalora_group_size: { isDefault: anyValue, default: '16', instead: '' },
  alora_invocation_tokens: { isDefault: isNull, default: 'null', instead: 'activated LoRA is not supported' },
  arrow_config: { isDefault: isNull, default: 'null', instead: 'Arrow routing is not supported' },
  ensure_weight_tying: { isDefault: isFalse, default: 'false', instead: 'fedtune does not adapt tied embeddings' },
  peft_version: { isDefault: anyValue, default: 'the writing PEFT version', instead: '' },
};

/** Keys that are not allowed in an adapter_config.json fedtune writes; empty when the config is fine for PEFT >= 0.6. */
export function disallowedWrittenKeys(cfg: Record<string, unknown>): string[] {
  return Object.keys(cfg).filter((k) => !PEFT_06_LORA_KEYS.includes(k) && !(k in PEFT_LATER_WRITTEN_KEYS));
}

/**
 * Check a read adapter_config.json's field names and default-only fields;
 * throws naming the first offending field and what fedtune supports.
 */
export function checkReadKeys(raw: Record<string, unknown>, where: string): void {
  for (const [k, v] of Object.entries(raw)) {
    if (PEFT_IMPLEMENTED_KEYS.includes(k)) continue;
    const d = PEFT_DEFAULT_ONLY_KEYS[k];
    if (!d) {
      throw new Error(
        `${where}: field "${k}" is not a field of PEFT's LoraConfig (known: ${[...PEFT_IMPLEMENTED_KEYS, ...Object.keys(PEFT_DEFAULT_ONLY_KEYS)].sort().join(', ')}); remove it`,
      );
    }
    if (!d.isDefault(v)) {
      throw new Error(`${where}: field "${k}" is ${JSON.stringify(v)}; fedtune supports only ${d.default} here (${d.instead})`);
    }
  }
}
