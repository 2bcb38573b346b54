/**
 * Single-machine commands on the engine:
 *   fedtune train     train a LoRA adapter (or every weight with --full) on one machine;
 *                     with --config run.yaml, the centralised baseline of that run: the
 *                     same model, LoRA and training settings on the union of the data
 *   fedtune generate  continue a prompt with a model and optional adapter
 *   fedtune eval      loss, perplexity and accuracy of a model/adapter on a dataset
 */
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { extname, join, resolve } from 'node:path';
import { Command, Option } from 'commander';
import { parse as parseYaml } from 'yaml';
import { loadRunConfig, type RunConfig } from '../common/config.ts';
import type { RecordSource } from '../common/data/dataset.ts';
import { intArg, numArg } from './args.ts';
import cliProgress from 'cli-progress';
import type { TensorMap } from '../common/tensor.ts';
import { writeFileAtomic } from '../common/atomic.ts';
import { readPeftAdapter, writePeftAdapter, type PeftLoraConfig } from '../common/peft.ts';
import type { LoadedModel } from '../common/model-config.ts';
import { Engine } from '../worker/engine/engine.ts';
import { loadModel, saveModel } from '../worker/engine/model.ts';
import { loadBaseModel, parseQuantizeBase } from '../worker/engine/quantize.ts';
import { checkHalfCombination, parseComputeDtype, type ComputeDtype } from '../worker/engine/half.ts';
import { planRun } from '../worker/engine/memory-plan.ts';
import { readModelDir } from '../common/hf-model.ts';
import { loadTokenizer } from '../common/tokenizer.ts';
import { AdamW, SCHEDULE_KINDS, loadOptimizerState, loraPlusGroups, saveOptimizerState, type ScheduleKind } from '../common/optim.ts';
import { dpTrainLoop, padBatchRows, trainLoop } from '../worker/engine/train.ts';
import { dpSgdSamplingSeed, dpSgdSteps, poissonSampler, type DpSgdParams } from '../common/privacy/dp-sgd.ts';
import { makeBatches } from '../worker/data/batching.ts';
import { prepareDataset } from '../worker/data/prepare.ts';
import { resolveTemplate } from '../common/data/template.ts';
import { droppedWhere } from '../common/data/tokenize.ts';
import { loraTargets, validateAdapter, validTargetModules } from '../common/lora.ts';
import { rankIssue, seqLenIssue } from '../common/limits.ts';
import { errnoCode, fsRemedy } from '../common/fs-errors.ts';


/** What commander hands the train action: --model and --out may come from --config instead. */
interface TrainCliOpts {
  config?: string;
  sites?: number;
  /** Unset: on (commander leaves it unset when both --rounds-equivalent and --no-rounds-equivalent are defined). */
  roundsEquivalent?: boolean;
  model?: string;
  data: string;
  out?: string;
  evalData?: string;
  evalFraction: number;
  template: string;
  full?: boolean;
  loraR: number;
  loraAlpha: number;
  loraDropout: number;
  targetModules?: string;
  /** rsLoRA: scale alpha / sqrt(r). */
  useRslora?: boolean;
  /** DoRA: PEFT use_dora (trained magnitude per output feature). */
  useDora?: boolean;
  /** 4-bit base weights (QLoRA): nf4 or int4. */
  quantizeBase?: string;
  /** Recompute each decoder layer in the backward pass (less activation memory, about a third more compute). */
  recompute?: boolean;
  /** float32 or float16 (base matrices in float16; their products in float16 on CUDA). */
  computeDtype?: string;
  /** Print the memory plan and exit (0 when it fits). */
  plan?: boolean;
  /** PEFT rank_pattern / alpha_pattern as 'pattern=value,...'; layers_to_transform as '0,2'; layers_pattern as 'layers' (or 'a,b'). */
  rankPattern?: string;
  alphaPattern?: string;
  layersToTransform?: string;
  layersPattern?: string;
  /** LoRA+: lora_B learns at this multiple of --lr. */
  loraPlusRatio: number;
  steps?: number;
  epochs?: number;
  batchSize: number;
  gradAccum: number;
  lr: number;
  schedule: ScheduleKind;
  warmup: number;
  weightDecay: number;
  maxGradNorm: number;
  maxSeqLen: number;
  threads?: number;
  device: 'cpu' | 'cuda';
  seed: number;
  resume?: boolean;
  initAdapter?: string;
  /** Local DP-SGD (all three or none): per-example clip norm, noise multiplier, Poisson sample rate. */
  dpMaxGradNorm?: number;
  dpNoiseMultiplier?: number;
  dpSampleRate?: number;
}

/** Options of one training run, resolved from the command line and (with --config) a run config. */
interface TrainOpts extends Omit<TrainCliOpts, 'config' | 'sites' | 'roundsEquivalent' | 'model' | 'out'> {
  model: string;
  out: string;
  /** model.fingerprint of the run config: the base model must have it. */
  fingerprint?: string;
  /** --max-seq-len was left at its default (then a model with fewer positions lowers it instead of refusing it). */
  maxSeqLenIsDefault?: boolean;
  /** Where the settings came from, when a run config gave them. */
  provenance?: Provenance;
}

/** How a run config became the settings of a centralised run (recorded in trainer_state.json). */
export interface Provenance {
  config: string;
  /** "field=value" for every setting taken from the config. */
  fromConfig: string[];
  /** "--flag value (config: field value)" for every command-line option that replaced a config value. */
  overridden: string[];
  /** "field=value" for every field of the file a centralised run has no counterpart for. */
  ignored: string[];
  /** Sections of the file that only run a federation (server, dashboard, ...). */
  operational: string[];
  /** How the number of steps or epochs follows from the config. */
  length: string;
}

/** The recipe of a run, as trained. */
interface TrainSettings {
  model: string;
  mode: 'lora' | 'full';
  lora: PeftLoraConfig | null;
  /** LoRA+ learning-rate ratio of lora_B (1: plain LoRA). */
  loraPlusRatio: number;
  steps: number | null;
  epochs: number | null;
  batchSize: number;
  gradAccumulation: number;
  lr: number;
  schedule: ScheduleKind;
  warmupSteps: number;
  weightDecay: number;
  maxGradNorm: number;
  maxSeqLen: number;
  template: string;
  seed: number;
  config: Provenance | null;
}

interface TrainerState {
  step: number;
  totalSteps: number;
  mode: 'lora' | 'full';
  /** The settings the run was started with (absent in files written before they were recorded). */
  settings?: TrainSettings;
  history: Array<{ step: number; loss: number; lr: number }>;
  evals: Array<{ step: number; loss: number; perplexity: number; exactMatch: number }>;
}

/**
 * `--rank-pattern 'q_proj=16,layers.0.self_attn.v_proj=4'` (or --alpha-pattern)
 * as a PEFT pattern, in the order given (PEFT tries keys in order). A key is a
 * module-name suffix or regex (common/lora.ts patternKeyFor); a comma inside a
 * key (a regex `{1,2}`) stays with it, as only `=` ends a key.
 */
export function parsePatternOption(flag: string, text: string, what: 'rank' | 'alpha'): Record<string, number> {
  const out: Record<string, number> = {};
  const parts: string[] = [];
  let pending = '';
  for (const piece of text.split(',')) {
    pending = pending ? `${pending},${piece}` : piece;
    if (/=\s*[^=,\s][^=,]*$/.test(pending) || /=\s*$/.test(pending)) {
      parts.push(pending);
      pending = '';
    }
  }
  if (pending.trim()) throw new Error(`${flag}: "${pending.trim()}" has no "=${what}"; write pattern=${what} pairs separated by commas, such as q_proj=${what === 'rank' ? 16 : 32},v_proj=${what === 'rank' ? 4 : 8}`);
  for (const part of parts) {
    const at = part.lastIndexOf('=');
    const key = part.slice(0, at).trim();
    const raw = part.slice(at + 1).trim();
    if (!key) throw new Error(`${flag}: "${part.trim()}" has no module pattern before "="`);
    const v = Number(raw);
    if (raw === '' || !Number.isFinite(v)) throw new Error(`${flag}: key "${key}" has ${what} "${raw}", which is not a number`);
    if (what === 'rank' && (!Number.isInteger(v) || v < 1)) throw new Error(`${flag}: key "${key}" has rank ${raw}; a rank must be an integer >= 1`);
    if (what === 'alpha' && !(v > 0)) throw new Error(`${flag}: key "${key}" has alpha ${raw}; alpha must be a number > 0`);
    if (key in out) throw new Error(`${flag}: key "${key}" is given twice`);
    out[key] = v;
  }
  if (Object.keys(out).length === 0) throw new Error(`${flag}: no pattern given; write pattern=${what} pairs such as q_proj=${what === 'rank' ? 16 : 32}`);
  return out;
}

/** `--layers-to-transform 0,2` as layer indices (each once). */
export function parseLayerList(flag: string, text: string): number[] {
  const out: number[] = [];
  for (const piece of text.split(',')) {
    const s = piece.trim();
    if (!/^\d+$/.test(s)) throw new Error(`${flag}: "${s}" is not a layer index; give indices (integers >= 0) separated by commas, such as 0,2`);
    const i = Number(s);
    if (out.includes(i)) throw new Error(`${flag}: layer ${i} is listed twice; list each layer once`);
    out.push(i);
  }
  return out;
}

/** A pattern in --rank-pattern / --alpha-pattern spelling (config values shown as the option would take them). */
function patternText(p: Record<string, number>): string {
  return Object.entries(p).map(([k, v]) => `${k}=${v}`).join(',');
}

export function loraFromOptions(
  model: LoadedModel,
  o: Pick<TrainCliOpts, 'loraR' | 'loraAlpha' | 'loraDropout' | 'targetModules' | 'useRslora' | 'useDora' | 'rankPattern' | 'alphaPattern' | 'layersToTransform' | 'layersPattern'>,
): PeftLoraConfig {
  const all = validTargetModules(model.config);
  const targetModules = o.targetModules ? o.targetModules.split(',').map((s) => s.trim()).filter(Boolean) : [...all];
  const lora: PeftLoraConfig = { r: o.loraR, alpha: o.loraAlpha, dropout: o.loraDropout, targetModules, useRslora: o.useRslora ?? false };
  if (o.useDora) lora.useDora = true;
  if (o.rankPattern) lora.rankPattern = parsePatternOption('--rank-pattern', o.rankPattern, 'rank');
  if (o.alphaPattern) lora.alphaPattern = parsePatternOption('--alpha-pattern', o.alphaPattern, 'alpha');
  if (o.layersToTransform) lora.layersToTransform = parseLayerList('--layers-to-transform', o.layersToTransform);
  if (o.layersPattern) {
    lora.layersPattern = o.layersPattern.split(',').map((s) => s.trim());
    if (lora.layersPattern.some((p) => !p)) throw new Error(`--layers-pattern: "${o.layersPattern}" has an empty name; give the layer list's name, such as layers (llama) or h (gpt2)`);
    if (!lora.layersToTransform) throw new Error('--layers-pattern only names the layer list --layers-to-transform counts in: give --layers-to-transform too, or drop --layers-pattern');
  }
  return lora;
}

/** ", rank_pattern ..., layers 0,2" for the start line ('' without patterns). */
function describePatterns(lora: PeftLoraConfig, targets: ReturnType<typeof loraTargets>): string {
  const parts: string[] = [];
  if (lora.rankPattern) parts.push(`rank_pattern ${patternText(lora.rankPattern)}`);
  if (lora.alphaPattern) parts.push(`alpha_pattern ${patternText(lora.alphaPattern)}`);
  if (lora.layersToTransform) parts.push(`layers ${lora.layersToTransform.join(',')}`);
  if (parts.length === 0) return '';
  return ` (${parts.join(', ')}: ${targets.length} modules, ranks ${[...new Set(targets.map((t) => t.r))].sort((x, y) => x - y).join('/')})`;
}

/**
 * A saved adapter's pattern fields against this run's (for --resume and
 * --init-adapter): null when they agree, else what differs and the options
 * that continue it.
 */
export function patternMismatch(saved: PeftLoraConfig, run: PeftLoraConfig): string | null {
  const show = (v: unknown) => (v === undefined ? 'unset' : JSON.stringify(v));
  const same = (a: unknown, b: unknown) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
  const diffs: string[] = [];
  const fix: string[] = [];
  if (!same(saved.rankPattern, run.rankPattern)) {
    diffs.push(`rank_pattern ${show(saved.rankPattern)} (this run: ${show(run.rankPattern)})`);
    fix.push(saved.rankPattern ? `--rank-pattern '${patternText(saved.rankPattern)}'` : 'no --rank-pattern');
  }
  if (!same(saved.alphaPattern, run.alphaPattern)) {
    diffs.push(`alpha_pattern ${show(saved.alphaPattern)} (this run: ${show(run.alphaPattern)})`);
    fix.push(saved.alphaPattern ? `--alpha-pattern '${patternText(saved.alphaPattern)}'` : 'no --alpha-pattern');
  }
  if (!same(saved.layersToTransform, run.layersToTransform)) {
    diffs.push(`layers_to_transform ${show(saved.layersToTransform)} (this run: ${show(run.layersToTransform)})`);
    fix.push(saved.layersToTransform ? `--layers-to-transform ${saved.layersToTransform.join(',')}` : 'no --layers-to-transform');
  }
  if (!same(saved.layersPattern, run.layersPattern)) {
    diffs.push(`layers_pattern ${show(saved.layersPattern)} (this run: ${show(run.layersPattern)})`);
    fix.push(saved.layersPattern ? `--layers-pattern ${saved.layersPattern.join(',')}` : 'no --layers-pattern');
  }
  return diffs.length ? `it has ${diffs.join(', ')}: give ${fix.join(' ')} to continue it` : null;
}

/** One `fedtune train` option a run config sets. */
interface ConfigField {
  flag: string;
  key: keyof TrainCliOpts;
  field: string;
  take(o: TrainCliOpts, cfg: RunConfig): void;
}

function field<K extends keyof TrainCliOpts>(flag: string, key: K, path: string, value: (c: RunConfig) => TrainCliOpts[K]): ConfigField {
  return { flag, key, field: path, take: (o, c) => void (o[key] = value(c)) };
}

/** Everything `fedtune train --config` takes from a run config, besides the number of steps or epochs. */
const CONFIG_FIELDS: readonly ConfigField[] = [
  field('--model', 'model', 'model.path', (c) => c.model.path),
  field('--lora-r', 'loraR', 'lora.r', (c) => c.lora.r),
  field('--lora-alpha', 'loraAlpha', 'lora.alpha', (c) => c.lora.alpha),
  field('--lora-dropout', 'loraDropout', 'lora.dropout', (c) => c.lora.dropout),
  field('--target-modules', 'targetModules', 'lora.target_modules', (c) => c.lora.target_modules.join(',')),
  field('--use-dora', 'useDora', 'lora.use_dora', (c) => (c.lora.use_dora ? true : undefined)),
  field('--rank-pattern', 'rankPattern', 'lora.rank_pattern', (c) => patternText(c.lora.rank_pattern ?? {}) || undefined),
  field('--alpha-pattern', 'alphaPattern', 'lora.alpha_pattern', (c) => patternText(c.lora.alpha_pattern ?? {}) || undefined),
  field('--layers-to-transform', 'layersToTransform', 'lora.layers_to_transform', (c) => (c.lora.layers_to_transform === null || c.lora.layers_to_transform === undefined ? undefined : [c.lora.layers_to_transform].flat().join(','))),
  field('--layers-pattern', 'layersPattern', 'lora.layers_pattern', (c) => (c.lora.layers_pattern === null || c.lora.layers_pattern === undefined ? undefined : [c.lora.layers_pattern].flat().join(','))),
  field('--batch-size', 'batchSize', 'training.batch_size', (c) => c.training.batch_size),
  field('--grad-accum', 'gradAccum', 'training.grad_accumulation', (c) => c.training.grad_accumulation),
  field('--lr', 'lr', 'training.lr', (c) => c.training.lr),
  field('--schedule', 'schedule', 'training.schedule', (c) => c.training.schedule),
  field('--warmup', 'warmup', 'training.warmup_steps', (c) => c.training.warmup_steps),
  field('--weight-decay', 'weightDecay', 'training.weight_decay', (c) => c.training.weight_decay),
  field('--max-grad-norm', 'maxGradNorm', 'training.max_grad_norm', (c) => c.training.max_grad_norm),
  field('--max-seq-len', 'maxSeqLen', 'training.max_seq_len', (c) => c.training.max_seq_len),
  field('--template', 'template', 'training.template', (c) => c.training.template),
  field('--seed', 'seed', 'training.seed', (c) => c.training.seed),
];

/**
 * Top-level sections that only say how a federation runs (transport, timing,
 * storage, display, evaluation cadence): nothing a centralised run learns from.
 */
const OPERATIONAL_SECTIONS = new Set(['name', 'server', 'dashboard', 'events', 'checkpoint', 'round', 'eval']);

/** `train` serves nothing, so it needs no join token; the schema requires one, so a placeholder stands in. */
const UNUSED_JOIN_TOKEN = 'unused-by-fedtune-train';

function showValue(v: unknown): string {
  const s = typeof v === 'string' ? v : JSON.stringify(v);
  return s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

/** Every leaf a config file writes (objects flattened to dotted paths; arrays and nulls are leaves), in file order. */
async function writtenFields(path: string): Promise<Array<[string, unknown]>> {
  const text = await readFile(path, 'utf8');
  const raw: unknown = extname(path).toLowerCase() === '.json' ? JSON.parse(text) : parseYaml(text);
  const out: Array<[string, unknown]> = [];
  const walk = (v: unknown, at: string): void => {
    if (typeof v === 'object' && v !== null && !Array.isArray(v)) {
      for (const [k, x] of Object.entries(v)) walk(x, at ? `${at}.${k}` : k);
    } else {
      out.push([at, v]);
    }
  };
  walk(raw, '');
  return out;
}

/** Steps or epochs of the centralised run that match the federated run `cfg`, and how they were reached. */
function lengthFromConfig(cfg: RunConfig, o: { roundsEquivalent: boolean; sites?: number }): { steps?: number; epochs?: number; how: string; usesSites: boolean } {
  const t = cfg.training;
  const unit = t.steps !== null ? 'steps' : 'epochs';
  const per = t.steps ?? t.epochs!;
  const as = (n: number): { steps?: number; epochs?: number } => (unit === 'steps' ? { steps: n } : { epochs: n });
  if (cfg.mode === 'distributed') {
    return { ...as(per), how: `${per} ${unit} = training.${unit} (a distributed run's ${unit} already count global batches over all the data)`, usesSites: false };
  }
  if (!o.roundsEquivalent) {
    return { ...as(per), how: `${per} ${unit} = training.${unit}: one site's local training in one round (--no-rounds-equivalent)`, usesSites: false };
  }
  if (unit === 'epochs') {
    const n = cfg.rounds * per;
    return {
      epochs: n,
      how: `${n} epochs = rounds ${cfg.rounds} × training.epochs ${per}: each round every site passes over its own data training.epochs times, so the union is passed over as often`,
      usesSites: false,
    };
  }
  const sites = o.sites ?? 1;
  const n = cfg.rounds * per * sites;
  return {
    steps: n,
    how: `${n} steps = rounds ${cfg.rounds} × training.steps ${per} × sites ${sites}: as many batches of training.batch_size as the federated run trains`,
    usesSites: true,
  };
}

/**
 * The options of `fedtune train`: without --config the command line as given;
 * with it, the run config's model, LoRA and training settings, each replaced
 * by an option given explicitly on the command line. Prints what came from
 * where and which fields of the config a centralised run cannot honour.
 */
async function resolveTrainOptions(cli: TrainCliOpts, explicit: (key: keyof TrainCliOpts) => boolean): Promise<TrainOpts> {
  const { config, sites, roundsEquivalent, model, out, ...rest } = cli;
  if (!config) {
    if (explicit('sites')) throw new Error('--sites only applies with --config run.yaml (it counts the sites of a federated run)');
    if (explicit('roundsEquivalent')) throw new Error('--rounds-equivalent / --no-rounds-equivalent only apply with --config run.yaml');
    if (!model) throw new Error('--model <dir> is required (or take it from a run config: --config run.yaml)');
    if (!out) throw new Error('--out <dir> is required (or give --config run.yaml, which writes to <checkpoint.dir>/<name>-centralised)');
    return { ...rest, model, out, maxSeqLenIsDefault: !explicit('maxSeqLen') };
  }
  if (cli.full) throw new Error('--full trains every weight, but a run config describes a LoRA run: drop --full or --config');
  const cfg = await loadRunConfig(config, { joinToken: UNUSED_JOIN_TOKEN });
  const o: TrainCliOpts = { ...cli };
  const fromConfig: string[] = [];
  const overridden: string[] = [];
  const fromFile: TrainCliOpts = { ...cli };
  for (const f of CONFIG_FIELDS) {
    f.take(fromFile, cfg);
    const unset = fromFile[f.key] === undefined; // an optional field the config leaves out (lora.rank_pattern, ...)
    const cfgValue = unset ? '(unset)' : String(fromFile[f.key]);
    if (explicit(f.key)) {
      overridden.push(`${f.flag} ${String(cli[f.key])} (config: ${f.field} ${cfgValue})`);
    } else {
      f.take(o, cfg);
      if (!unset) fromConfig.push(`${f.field}=${cfgValue}`);
    }
  }

  const length = lengthFromConfig(cfg, { roundsEquivalent: roundsEquivalent ?? true, sites });
  const lengthOverride = explicit('steps') || explicit('epochs');
  let lengthLine = length.how;
  if (lengthOverride) {
    const given = [explicit('steps') ? `--steps ${cli.steps}` : '', explicit('epochs') ? `--epochs ${cli.epochs}` : ''].filter(Boolean).join(' ');
    lengthLine = `${given} (config: ${length.how.split(':')[0]})`;
    overridden.push(lengthLine);
  } else {
    o.steps = length.steps;
    o.epochs = length.epochs;
  }
  const notes: string[] = [];
  if (sites !== undefined && (lengthOverride || !length.usesSites)) {
    const why = lengthOverride
      ? 'the length is given with --steps / --epochs'
      : cfg.mode === 'distributed'
        ? 'a distributed run config counts global batches'
        : roundsEquivalent === false
          ? 'with --no-rounds-equivalent'
          : 'a config in epochs is matched by passes over the union';
    notes.push(`--sites ${sites} does not change the length: ${why}`);
  }
  if (cfg.mode === 'federated' && cfg.training.schedule_scope === 'round') {
    notes.push(`training.schedule_scope round: the sites warm up${cfg.training.schedule === 'constant' ? '' : ' and decay'} every round; this run follows the schedule once over all its steps, as schedule_scope run does`);
  }
  if (cfg.mode === 'distributed') {
    // A distributed run trains on every record of distributed.dataset: hold nothing out unless asked to.
    if (!explicit('evalFraction') && !cli.evalData) {
      o.evalFraction = 0;
      notes.push('--eval-fraction 0 (a distributed run trains on all of its dataset; give --eval-fraction or --eval-data to hold data out)');
    }
    const dataset = cfg.distributed.dataset;
    if (dataset !== null && resolve(dataset) !== resolve(cli.data)) notes.push(`--data ${cli.data} is not the run's distributed.dataset ${dataset}`);
  }

  const ignored: string[] = [];
  const operational = new Set<string>();
  for (const [path, value] of await writtenFields(config)) {
    const top = path.split('.')[0]!;
    if (value === null) continue; // a null sets nothing
    if (path === 'mode' || path === 'model.path' || path === 'model.fingerprint' || top === 'lora' || top === 'training') continue;
    if (path === 'rounds' && cfg.mode === 'federated') continue;
    if (path === 'distributed.dataset' && cfg.mode === 'distributed') continue; // compared with --data above
    if (OPERATIONAL_SECTIONS.has(top)) operational.add(top);
    else ignored.push(`${path}=${showValue(value)}`);
  }

  const outDir = out ?? join(cfg.checkpoint.dir, `${cfg.name}-centralised`);
  const provenance: Provenance = { config, fromConfig, overridden, ignored, operational: [...operational], length: lengthLine };
  console.log(`from ${config} (${cfg.mode} run ${cfg.name}): ${fromConfig.join(', ')}`);
  console.log(`length: ${lengthOverride ? `from the command line, ${lengthLine}` : lengthLine}`);
  for (const n of notes) console.log(`note: ${n}`);
  if (overridden.length) console.log(`command line overrides the config: ${overridden.join('; ')}`);
  console.log(
    `ignored by design for a centralised baseline: ${ignored.length ? ignored.join(', ') : '(nothing)'}` +
      (operational.size ? `; sections that only run a federation, not used: ${[...operational].join(', ')}` : ''),
  );
  if (!out) console.log(`writing to ${outDir} (--out to choose)`);
  const { config: _c, sites: _s, roundsEquivalent: _r, model: m, out: _o, ...resolved } = o;
  return { ...resolved, model: m!, out: outDir, fingerprint: cfg.model.fingerprint ?? undefined, provenance };
}

/** One warning, the same from `train` and `eval`, for records whose response does not fit in max_seq_len. */
function warnDropped(sources: readonly RecordSource[], maxSeqLen: number, what: string): void {
  const n = sources.length;
  if (n === 0) return;
  console.warn(
    `warning: ${n} record${n === 1 ? '' : 's'} dropped: the response does not fit in ${what} ${maxSeqLen} tokens (${droppedWhere(sources)}); raise ${what} to keep them`,
  );
}

const templateFor = resolveTemplate;

async function train(o: TrainOpts): Promise<void> {
  const template = await templateFor(o.template, o.model); // unknown template: fail before loading anything
  if (o.steps !== undefined && o.epochs !== undefined) throw new Error('give --steps or --epochs, not both');
  const quantizeBase = parseQuantizeBase(o.quantizeBase, '--quantize-base');
  if (quantizeBase && o.full) throw new Error('--quantize-base applies to LoRA training (the 4-bit base weights stay frozen), not --full; drop one of them');
  const computeDtype = parseComputeDtype(o.computeDtype);
  checkHalfCombination({
    computeDtype,
    full: o.full,
    quantizeBase,
    dpSgd: o.dpMaxGradNorm !== undefined || o.dpNoiseMultiplier !== undefined || o.dpSampleRate !== undefined,
  });
  // The memory plan, from config.json alone: --plan prints it; a run that cannot fit is refused before loading.
  const planConfig = (await readModelDir(o.model)).config;
  planRun(planConfig, {
    mode: o.full ? 'full' : 'lora',
    ...(o.full ? {} : { lora: loraFromOptions({ config: planConfig } as LoadedModel, o) }),
    batchSize: o.batchSize,
    seqLen: o.maxSeqLen,
    recompute: o.recompute ?? false,
    ...(quantizeBase ? { quantizeBase } : {}),
    computeDtype,
    accumulate: o.gradAccum > 1,
    device: o.device,
  }, o.plan ? (line) => console.log(line) : undefined);
  if (o.plan) return;
  const model = await loadBaseModel(o.model, quantizeBase, { compute: computeDtype });
  if (o.fingerprint && model.fingerprint !== o.fingerprint) {
    throw new Error(`model.fingerprint: ${o.model} has fingerprint ${model.fingerprint}, the config expects ${o.fingerprint}`);
  }
  // How the user spelled a setting: the run config's field when --config gave it, else the option.
  const named = (field: string, flag: string): string => (o.provenance?.fromConfig.some((f) => f.startsWith(`${field}=`)) ? field : flag);
  const seqLenName = named('training.max_seq_len', '--max-seq-len');
  const tooLong = seqLenIssue(o.maxSeqLen, model.config.maxPositions, o.model);
  if (tooLong && o.maxSeqLenIsDefault) {
    console.log(`note: --max-seq-len defaults to ${o.maxSeqLen}, more than the ${model.config.maxPositions} positions of ${o.model}: using ${model.config.maxPositions}`);
    o.maxSeqLen = model.config.maxPositions;
  } else if (tooLong) {
    throw new Error(`${seqLenName}: ${tooLong}`);
  }
  const tok = await loadTokenizer(o.model);
  const mode = o.full ? 'full' : 'lora';
  if (mode === 'full' && o.useRslora) throw new Error('--use-rslora applies to LoRA training, not --full');
  if (mode === 'full' && o.useDora) throw new Error('--use-dora applies to LoRA training, not --full');
  if (mode === 'full' && o.loraPlusRatio !== 1) throw new Error('--lora-plus-ratio applies to LoRA training (it scales the learning rate of lora_B), not --full');
  const lora = mode === 'lora' ? loraFromOptions(model, o) : undefined;
  if (mode === 'full' && (o.rankPattern || o.alphaPattern || o.layersToTransform || o.layersPattern)) {
    throw new Error('--rank-pattern, --alpha-pattern, --layers-to-transform and --layers-pattern apply to LoRA training, not --full');
  }
  let targets: ReturnType<typeof loraTargets> = [];
  try {
    targets = lora ? loraTargets(model.config, lora) : [];
  } catch (err) {
    // Name the pattern fields as the user gave them: run-config field or option.
    const flags: Record<string, string> = { rank_pattern: '--rank-pattern', alpha_pattern: '--alpha-pattern', layers_to_transform: '--layers-to-transform', layers_pattern: '--layers-pattern' };
    throw new Error((err as Error).message.replace(/lora\.(rank_pattern|alpha_pattern|layers_to_transform|layers_pattern)/g, (m, f: string) => named(m, flags[f]!)));
  }
  // lora.r applies to the modules --rank-pattern leaves alone (loraTargets checks the pattern ranks).
  const plainTargets = targets.filter((t) => t.pattern?.rankKey === undefined);
  const tooHigh = lora ? rankIssue(lora.r, plainTargets, { r: named('lora.r', '--lora-r'), modules: named('lora.target_modules', '--target-modules') }) : null;
  if (tooHigh) throw new Error(`${named('lora.r', '--lora-r')}: ${tooHigh}`);
  const engine = Engine.create(model, { mode, lora, threads: o.threads, device: o.device, seed: o.seed, quantizeBase, recompute: o.recompute ?? false, computeDtype });
  // This command prints its own warning about dropped records (warnDropped), so prepareDataset stays quiet.
  const data = await prepareDataset(o.data, tok, { template, maxSeqLen: o.maxSeqLen, evalFraction: o.evalData ? 0 : o.evalFraction, seed: o.seed, reportDropped: false });
  const evalData = o.evalData ? await prepareDataset(o.evalData, tok, { template, maxSeqLen: o.maxSeqLen, seed: o.seed, reportDropped: false }) : undefined;
  const evalSet = evalData ? evalData.train : data.eval;
  const batchesPerEpoch = Math.ceil(data.train.length / o.batchSize);
  const dpGiven = [o.dpMaxGradNorm, o.dpNoiseMultiplier, o.dpSampleRate].filter((x) => x !== undefined).length;
  if (dpGiven > 0 && dpGiven < 3) throw new Error('DP-SGD needs all three of --dp-max-grad-norm, --dp-noise-multiplier and --dp-sample-rate');
  if (dpGiven === 3 && mode === 'full') throw new Error('--dp-* (DP-SGD) applies to LoRA training only, not --full');
  const dp: DpSgdParams | null = dpGiven === 3 ? { maxGradNorm: o.dpMaxGradNorm!, noiseMultiplier: o.dpNoiseMultiplier!, sampleRate: o.dpSampleRate! } : null;
  const totalSteps = dp
    ? dpSgdSteps({ steps: o.steps ?? null, epochs: o.steps === undefined ? (o.epochs ?? 1) : null }, dp.sampleRate)
    : (o.steps ?? Math.max(1, Math.ceil(((o.epochs ?? 1) * batchesPerEpoch) / o.gradAccum)));
  if (dp && !(dp.maxGradNorm > 0)) throw new Error(`--dp-max-grad-norm must be > 0 (got ${dp.maxGradNorm})`);
  if (dp && !(dp.sampleRate > 0 && dp.sampleRate <= 1)) throw new Error(`--dp-sample-rate must be in (0, 1] (got ${dp.sampleRate})`);
  if (dp) {
    console.log(
      `DP-SGD: per-example clip ${dp.maxGradNorm}, noise multiplier ${dp.noiseMultiplier}, Poisson sample rate ${dp.sampleRate} (expected batch ${(dp.sampleRate * data.train.length).toFixed(1)}); ` +
        '--max-grad-norm and --grad-accum are not used (--batch-size is the micro-batch)',
    );
  }
  warnDropped([...data.droppedSources, ...(evalData?.droppedSources ?? [])], o.maxSeqLen, seqLenName);
  const dropped = data.dropped + (evalData?.dropped ?? 0);
  console.log(
    `fedtune train: ${model.config.modelType} ${mode === 'lora' ? `${lora!.useRslora ? 'rsLoRA' : 'LoRA'}${lora!.useDora ? ' + DoRA' : ''} r=${lora!.r} alpha=${lora!.alpha} dropout=${lora!.dropout} on ${lora!.targetModules.join(',')}${describePatterns(lora!, targets)}${o.loraPlusRatio !== 1 ? `, LoRA+ ratio ${o.loraPlusRatio}` : ''}${quantizeBase ? `, ${quantizeBase} base weights` : ''}${computeDtype === 'float16' ? ', float16 base weights' : computeDtype === 'bfloat16' ? ', bfloat16 base weights mapped from the checkpoint' : ''}` : 'full fine-tuning'}; ` +
      `${data.train.length} train / ${evalSet.length} eval examples${dropped ? ` (${dropped} dropped: too long)` : ''}; ${totalSteps} steps; ` +
      `lr ${o.lr} ${o.schedule}, warmup ${o.warmup}, batch ${o.batchSize} x ${o.gradAccum}`,
  );

  let params: TensorMap;
  // LoRA+ with DoRA: PEFT's create_loraplus_optimizer puts every 1-D parameter (the magnitudes) in lora_B's group.
  const doraPlus = lora?.useDora && o.loraPlusRatio !== 1 ? [{ name: 'lora_magnitude_vector', match: (n: string) => n.endsWith('.lora_magnitude_vector'), lrScale: o.loraPlusRatio }] : [];
  const optimizer = new AdamW({ lr: o.lr, weightDecay: o.weightDecay, groups: mode === 'lora' ? [...loraPlusGroups(o.loraPlusRatio), ...doraPlus] : [] });
  const settings: TrainSettings = {
    model: o.model,
    mode,
    lora: lora ?? null,
    loraPlusRatio: o.loraPlusRatio,
    steps: o.steps ?? null,
    epochs: o.steps === undefined ? (o.epochs ?? 1) : null,
    batchSize: o.batchSize,
    gradAccumulation: o.gradAccum,
    lr: o.lr,
    schedule: o.schedule,
    warmupSteps: o.warmup,
    weightDecay: o.weightDecay,
    maxGradNorm: o.maxGradNorm,
    maxSeqLen: o.maxSeqLen,
    template: o.template,
    seed: o.seed,
    config: o.provenance ?? null,
  };
  let state: TrainerState = { step: 0, totalSteps, mode, settings, history: [], evals: [] };
  const statePath = join(o.out, 'trainer_state.json');
  if (o.resume && existsSync(statePath)) {
    state = JSON.parse(await readFile(statePath, 'utf8')) as TrainerState;
    if (state.mode !== mode) throw new Error(`--resume: ${o.out} holds a ${state.mode} run, not ${mode}`);
    if (mode === 'lora') {
      const saved = await readPeftAdapter(o.out);
      if (saved.config.useRslora !== (lora!.useRslora ?? false)) {
        throw new Error(`--resume: ${o.out} was trained with use_rslora ${saved.config.useRslora}: ${saved.config.useRslora ? 'add' : 'drop'} --use-rslora to continue it`);
      }
      if ((saved.config.useDora ?? false) !== (lora!.useDora ?? false)) {
        throw new Error(`--resume: ${o.out} was trained with use_dora ${saved.config.useDora ?? false}: ${saved.config.useDora ? 'add' : 'drop'} --use-dora to continue it`);
      }
      const patterns = patternMismatch(saved.config, lora!);
      if (patterns) throw new Error(`--resume: ${o.out} was trained with other per-module settings: ${patterns}`);
      params = saved.adapter;
    } else {
      params = (await loadModel(o.out)).weights;
    }
    optimizer.load(await loadOptimizerState(join(o.out, 'optimizer.safetensors')));
    console.log(`resuming at step ${state.step} of ${state.totalSteps}`);
  } else if (o.initAdapter) {
    if (mode !== 'lora') throw new Error('--init-adapter applies to LoRA training, not --full');
    const init = await readPeftAdapter(o.initAdapter);
    const same = (a: string[], b: string[]): boolean => [...a].sort().join() === [...b].sort().join();
    if (init.config.r !== lora!.r || !same(init.config.targetModules, lora!.targetModules)) {
      throw new Error(
        `--init-adapter ${o.initAdapter} was trained with r ${init.config.r} on ${init.config.targetModules.join(',')}, this run has r ${lora!.r} on ${lora!.targetModules.join(',')}: ` +
          `give --lora-r ${init.config.r} --target-modules ${init.config.targetModules.join(',')}, or another adapter`,
      );
    }
    if (init.config.useRslora !== (lora!.useRslora ?? false)) {
      throw new Error(
        `--init-adapter ${o.initAdapter} has use_rslora ${init.config.useRslora}, this run ${lora!.useRslora ? 'uses' : 'does not use'} rsLoRA scaling: ` +
          `${init.config.useRslora ? 'add' : 'drop'} --use-rslora so the adapter keeps its scale`,
      );
    }
    if ((init.config.useDora ?? false) !== (lora!.useDora ?? false)) {
      throw new Error(
        `--init-adapter ${o.initAdapter} has use_dora ${init.config.useDora ?? false}, this run ${lora!.useDora ? 'uses' : 'does not use'} DoRA: ` +
          `${init.config.useDora ? 'add' : 'drop'} --use-dora so the adapter keeps its magnitudes`,
      );
    }
    const patterns = patternMismatch(init.config, lora!);
    if (patterns) throw new Error(`--init-adapter ${o.initAdapter} does not have this run's per-module settings: ${patterns}`);
    params = init.adapter;
    try {
      validateAdapter(params, targets); // each module at its own rank
    } catch (err) {
      throw new Error(`--init-adapter ${o.initAdapter} does not fit the model ${o.model}: ${(err as Error).message}`);
    }
  } else {
    params = engine.initParams(o.seed);
  }
  const remaining = state.totalSteps - state.step;
  if (remaining <= 0) {
    console.log('nothing to do: the run already reached its last step');
    return;
  }

  const evalBatches = evalSet.length
    ? makeBatches(evalSet, { batchSize: o.batchSize, padId: tok.padId, shuffle: false, seed: 0, maxSeqLen: o.maxSeqLen })
    : [];
  const bar = new cliProgress.SingleBar(
    { format: 'train [{bar}] {value}/{total} steps | loss {loss} | lr {lr} | {tps} tok/s | eta {eta_formatted}', hideCursor: true, noTTYOutput: true, notTTYSchedule: 2000 },
    cliProgress.Presets.shades_classic,
  );
  bar.start(state.totalSteps, state.step, { loss: '-', lr: '-', tps: '-' });
  const save = async (): Promise<void> => {
    if (mode === 'lora') {
      await writePeftAdapter(o.out, params, { lora: lora!, baseModel: o.model, fanInFanOut: model.config.family === 'gpt2' });
    } else {
      await saveModel(o.out, { config: model.config, rawConfig: model.rawConfig, weights: params }, join(o.model, 'tokenizer.json'), { overwrite: true });
    }
    await saveOptimizerState(join(o.out, 'optimizer.safetensors'), optimizer.state());
    await writeFileAtomic(statePath, JSON.stringify(state, null, 2));
  };
  const startStep = state.step;
  // The bar's timer keeps the process alive: it is stopped whatever happens in the loop.
  const onStep = (s: { step: number; loss: number; lr: number; tokensPerSec: number }): void => {
    state.step = startStep + s.step;
    state.history.push({ step: state.step, loss: s.loss, lr: s.lr });
    bar.update(state.step, { loss: s.loss.toFixed(4), lr: s.lr.toExponential(2), tps: Math.round(s.tokensPerSec) });
  };
  const result = dp ? await dpTrainLoop({
    engine,
    params,
    numRecords: data.train.length,
    sample: poissonSampler(data.train.length, dp.sampleRate, dpSgdSamplingSeed(o.seed, startStep, 'fedtune-train')),
    microBatches: (idx) =>
      makeBatches(idx.map((i) => data.train[i]!), { batchSize: o.batchSize, padId: tok.padId, shuffle: false, seed: 0, maxSeqLen: o.maxSeqLen })
        .map((b) => padBatchRows(b, o.batchSize, tok.padId)),
    dp,
    steps: remaining,
    optimizer,
    schedule: { kind: o.schedule, baseLr: o.lr, warmupSteps: o.warmup, totalSteps: state.totalSteps },
    scheduleOffset: startStep,
    onStep,
  }).finally(() => bar.stop()) : await trainLoop({
    engine,
    params,
    epochBatches: (epoch) => makeBatches(data.train, { batchSize: o.batchSize, padId: tok.padId, shuffle: true, seed: o.seed * 1000 + epoch, maxSeqLen: o.maxSeqLen }),
    steps: remaining,
    gradAccumulation: o.gradAccum,
    optimizer,
    schedule: { kind: o.schedule, baseLr: o.lr, warmupSteps: o.warmup, totalSteps: state.totalSteps },
    scheduleOffset: startStep,
    maxGradNorm: o.maxGradNorm,
    onStep,
  }).finally(() => bar.stop());
  if (evalBatches.length) {
    const r = await engine.evaluate(params, evalBatches);
    state.evals.push({ step: state.step, loss: r.loss, perplexity: r.perplexity, exactMatch: r.exactMatch });
    console.log(`eval: loss ${r.loss.toFixed(4)}  perplexity ${r.perplexity.toFixed(2)}  exact match ${(100 * r.exactMatch).toFixed(1)}%  (${r.examples} examples)`);
  }
  await save().catch((err: unknown) => {
    const code = errnoCode(err);
    if (code === undefined) throw err;
    throw new Error(`${(err as Error).message}; the ${result.steps} steps just trained are not saved: ${fsRemedy(code, o.out)} (or choose another --out) and run the command again`, { cause: err });
  });
  console.log(
    `trained ${result.steps} steps in ${result.seconds.toFixed(1)} s (${Math.round(result.tokens / result.seconds)} tok/s); ` +
      `mean loss ${result.meanLoss.toFixed(4)}, last ${result.lastLoss.toFixed(4)}; wrote ${o.out}`,
  );
  await engine.close();
}

async function withAdapter(modelDir: string, adapterDir: string | undefined, computeDtype: ComputeDtype = 'float32'): Promise<{ engine: Engine; params: TensorMap }> {
  if (!adapterDir) {
    if (computeDtype !== 'float32') throw new Error(`--compute-dtype ${computeDtype} evaluates an adapter on ${computeDtype} base weights; give --adapter (the base alone is evaluated in float32)`);
    const model = await loadModel(modelDir);
    const engine = Engine.create(model, { mode: 'full' });
    return { engine, params: model.weights };
  }
  const a = await readPeftAdapter(adapterDir);
  const model = await loadBaseModel(modelDir, undefined, { compute: computeDtype });
  const engine = Engine.create(model, { mode: 'lora', lora: a.config, computeDtype });
  return { engine, params: a.adapter };
}

export function register(program: Command): void {
  program
    .command('train')
    .description('train a LoRA adapter (or the full model) on one machine: the single-machine baseline; --config run.yaml takes the recipe of a federated run')
    .option('--config <file>', "run config (YAML/JSON) of a federated or distributed run: its model, lora and training settings become this run's; options given on the command line still win")
    .option('--sites <n>', 'with --config: sites that train in each round (steps = rounds x training.steps x sites; default 1)', intArg('--sites', 1))
    .option('--rounds-equivalent', 'with --config (the default): as many examples as the whole federated run, steps = rounds x training.steps x sites (epochs = rounds x training.epochs)')
    .option('--no-rounds-equivalent', 'with --config: training.steps (or epochs) once, as one site trains in one round')
    .option('--model <dir>', 'base model directory (Hugging Face layout); required unless --config gives model.path')
    .requiredOption('--data <file>', 'training data: JSON array or JSONL of Alpaca or chat records (with --config: the union of the sites\' data)')
    .option('--out <dir>', 'output directory (PEFT adapter, or full model with --full); required unless --config (default <checkpoint.dir>/<name>-centralised)')
    .option('--eval-data <file>', 'held-out data (default: split off --eval-fraction of --data)')
    .option('--eval-fraction <f>', 'fraction of --data held out for evaluation', numArg('--eval-fraction', 0, 1), 0.1)
    .option('--template <name>', "prompt template: alpaca, chatml, plain, or auto (the model's chat_template from tokenizer_config.json; assistant turns trained)", 'alpaca')
    .option('--full', 'train every weight (full fine-tuning or pre-training) instead of LoRA')
    .option('--lora-r <n>', 'LoRA rank', intArg('--lora-r', 1), 8)
    .option('--lora-alpha <n>', 'LoRA alpha (scale alpha/r)', numArg('--lora-alpha', 0), 16)
    .option('--lora-dropout <p>', 'dropout on the LoRA input', numArg('--lora-dropout', 0, 1), 0.05)
    .option('--target-modules <list>', 'comma-separated modules (default: all of the architecture)')
    .option('--use-rslora', 'rsLoRA (Kalajdzievski 2023): scale the adapter by alpha/sqrt(r) instead of alpha/r (PEFT use_rslora)')
    .option('--use-dora', 'DoRA (Liu et al. 2024): W becomes m * (W + s*B*A) / ||W + s*B*A|| per output feature, m trained (PEFT use_dora)')
    .option('--quantize-base <format>', '4-bit base weights (QLoRA): nf4 or int4, blocks of 64 with one scale each; the decoder linear layers are held 4-bit, LoRA trains in float32 on top')
    .option('--recompute', 'recompute each decoder layer in the backward pass instead of keeping its activations (less memory, about a third more compute)')
    .option('--compute-dtype <dtype>', 'float32 (default), float16 (the base model\'s matrices held in float16, half the memory; on CUDA their products run in float16 with dynamic loss scaling) or bfloat16 (a bfloat16 checkpoint\'s matrices left in its files, mapped by ONNX Runtime, widened per product); LoRA and AdamW stay float32')
    .option('--plan', 'print the memory plan (weights, LoRA + AdamW, activations at --batch-size x --max-seq-len) against the device\'s memory and exit: 0 when it fits')
    .option('--rank-pattern <list>', "per-module ranks, PEFT rank_pattern: 'pattern=r,...' (a pattern is a module-name suffix or regex, first match wins), e.g. 'q_proj=16,layers.0.self_attn.v_proj=4'")
    .option('--alpha-pattern <list>', "per-module alphas, PEFT alpha_pattern: 'pattern=alpha,...', e.g. 'q_proj=32'")
    .option('--layers-to-transform <list>', 'adapt only these layer indices, PEFT layers_to_transform, e.g. 0,2 (default: every layer)')
    .option('--layers-pattern <name>', 'with --layers-to-transform: the layer list the indices count in, PEFT layers_pattern (layers for llama-style models, h for gpt2)')
    .option('--lora-plus-ratio <k>', 'LoRA+ (Hayou et al. 2024): lora_B learns at k x --lr (1: plain LoRA; the paper suggests 16)', numArg('--lora-plus-ratio', 0), 1)
    .option('--steps <n>', 'optimizer steps', intArg('--steps', 1))
    .option('--epochs <n>', 'epochs over the training data (default 1 when --steps is not given)', numArg('--epochs', 0))
    .option('--batch-size <n>', 'sequences per micro-batch', intArg('--batch-size', 1), 8)
    .option('--grad-accum <n>', 'micro-batches per optimizer step', intArg('--grad-accum', 1), 1)
    .option('--lr <x>', 'peak learning rate', numArg('--lr', 0), 2e-4)
    .addOption(new Option('--schedule <kind>', 'learning-rate schedule').choices([...SCHEDULE_KINDS]).default('cosine'))
    .option('--warmup <n>', 'warmup steps', intArg('--warmup', 0), 0)
    .option('--weight-decay <x>', 'AdamW decoupled weight decay', numArg('--weight-decay', 0), 0)
    .option('--max-grad-norm <x>', 'clip the global gradient norm (0: off)', numArg('--max-grad-norm', 0), 1)
    .option('--max-seq-len <n>', 'truncate sequences to this many tokens', intArg('--max-seq-len', 1), 256)
    .option('--threads <n>', 'ONNX Runtime intra-op threads (default: one per core)', intArg('--threads', 1))
    .addOption(new Option('--device <d>', 'execution provider').choices(['cpu', 'cuda']).default('cpu'))
    .option('--seed <n>', 'seed for initialization, shuffling and dropout', intArg('--seed', 0), 0)
    .option('--init-adapter <dir>', 'start from this PEFT adapter instead of a fresh one')
    .option('--dp-max-grad-norm <x>', 'DP-SGD: clip each example\'s gradient to this L2 norm (with --dp-noise-multiplier and --dp-sample-rate)', numArg('--dp-max-grad-norm', 0))
    .option('--dp-noise-multiplier <x>', 'DP-SGD: noise std = this x --dp-max-grad-norm on each step\'s summed gradients', numArg('--dp-noise-multiplier', 0))
    .option('--dp-sample-rate <q>', 'DP-SGD: Poisson sampling rate of each record per step (steps = --steps, or --epochs x round(1/q))', numArg('--dp-sample-rate', 0, 1 + Number.EPSILON))
    .option('--resume', 'continue the run saved in --out (adapter, optimizer state, step)')
    .action(async (o: TrainCliOpts, cmd: Command) => train(await resolveTrainOptions(o, (key) => cmd.getOptionValueSource(key) === 'cli')));

  // `fedtune generate` lives in cli/generate.ts (KV cache, top-p, stop strings, EOS lists).

  program
    .command('eval')
    .description('evaluation loss, perplexity and exact-match accuracy of a model (and adapter) on a dataset')
    .requiredOption('--model <dir>', 'base model directory')
    .option('--adapter <dir>', 'PEFT adapter directory')
    .requiredOption('--data <file>', 'JSON array or JSONL of Alpaca or chat records')
    .option('--template <name>', 'prompt template: alpaca, chatml, plain, or auto (the model\'s chat_template)', 'alpaca')
    .option('--max-seq-len <n>', 'truncate sequences to this many tokens', intArg('--max-seq-len', 1), 256)
    .option('--batch-size <n>', 'sequences per batch', intArg('--batch-size', 1), 8)
    .option('--compute-dtype <dtype>', 'float32 (default), float16 or bfloat16: the base model\'s matrices held in float16, or left in a bfloat16 checkpoint\'s files (with --adapter), as `fedtune train --compute-dtype` holds them')
    .action(async (o: { model: string; adapter?: string; data: string; template: string; maxSeqLen: number; batchSize: number; computeDtype?: string }) => {
      const tok = await loadTokenizer(o.model);
      const { engine, params } = await withAdapter(o.model, o.adapter, parseComputeDtype(o.computeDtype));
      const data = await prepareDataset(o.data, tok, { template: await templateFor(o.template, o.model), maxSeqLen: o.maxSeqLen, reportDropped: false });
      warnDropped(data.droppedSources, o.maxSeqLen, '--max-seq-len');
      const r = await engine.evaluate(params, makeBatches(data.train, { batchSize: o.batchSize, padId: tok.padId, shuffle: false, seed: 0, maxSeqLen: o.maxSeqLen }));
      // dropped: records left out of every number above because their response does not fit in --max-seq-len.
      console.log(JSON.stringify({ ...r, dropped: data.dropped }, null, 2));
      await engine.close();
    });
}
