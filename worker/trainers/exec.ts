/**
 * The exec trainer: any local training program (a PyTorch/PEFT script, a
 * binary) becomes a fedtune site. Per task the worker prepares a fresh task
 * directory, runs the command, reads progress from its stdout and, when it
 * exits 0, reads back and checks what it wrote:
 *
 *   TASK_DIR/spec.json        the task: mode (train | eval), training settings, LoRA settings, paths
 *   TASK_DIR/global/          the global adapter (PEFT: adapter_config.json + adapter_model.safetensors)
 *   TASK_DIR/output/          train: the script writes the locally trained PEFT adapter here
 *   TASK_DIR/metrics.json     train: {"num_examples": N, "train_loss": ..., ...}
 *   TASK_DIR/eval.json        eval:  {"eval_loss", "eval_tokens", "eval_examples", "eval_accuracy"?}
 *
 * The command is split into arguments without a shell (quotes and backslashes
 * as in sh; `|`, `;`, `&`, `<`, `>`, `$`, backticks and parentheses are
 * refused unquoted: wrap shell pipelines in `sh -c '...'` yourself), gets
 * `--task-dir TASK_DIR` appended and runs in the worker's working directory
 * with FEDTUNE_* variables naming every path (ENV_VARS below). It runs in its
 * own process group: cancellation sends SIGTERM to the group, then SIGKILL
 * after the grace period.
 *
 * The site's data never leaves the site: the script reads it where it is
 * (FEDTUNE_DATA); only the adapter, counts and numeric metrics go back.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { access, constants, mkdir, mkdtemp, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, isAbsolute, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { logger } from '../../common/log.ts';
import { inspectModel } from '../../common/hf-model.ts';
import { loraTargets, validateAdapter } from '../../common/lora.ts';
import { ADAPTER_WEIGHTS, readPeftAdapter, writePeftAdapter } from '../../common/peft.ts';
import { bf16BitsToF32, f16BitsToF32, f32ToBf16Bits, f32ToF16Bits, readSafetensorsHeader } from '../../common/safetensors.ts';
import type { ModelConfig } from '../../common/model-config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { loadRecords } from '../../common/data/dataset.ts';
import { checkProxMu } from '../engine/train.ts';
import { optimizerStateKey, type EvalOutcome, type LocalTrainingSpec, type Trainer, type TrainArgs, type TrainerFactoryOptions, type TrainOutcome, type TrainProgress } from './trainer.ts';

const log = logger('exec-trainer');

/** `fedtune worker --trainer exec` settings. */
export interface ExecTrainerOptions {
  /** --exec: the command line (split into arguments without a shell). */
  command: string;
  /** --exec-workdir: where task directories are made (default: a fresh temp dir, removed on close). */
  workDir?: string;
  /** --exec-keep: leave each task directory in place after the task. */
  keep?: boolean;
  /** --exec-grace-sec: seconds between SIGTERM and SIGKILL on cancellation (default 10). */
  graceSec?: number;
  /** --exec-no-eval: register no eval data and refuse evaluation tasks. */
  noEval?: boolean;
}

export const DEFAULT_EXEC_GRACE_SEC = 10;

/** The environment the command gets (on top of the worker's own). */
export const ENV_VARS = [
  'FEDTUNE_TASK_DIR',
  'FEDTUNE_GLOBAL_ADAPTER',
  'FEDTUNE_SPEC',
  'FEDTUNE_DATA',
  'FEDTUNE_EVAL_DATA',
  'FEDTUNE_MODEL',
  'FEDTUNE_OUTPUT_ADAPTER',
  'FEDTUNE_METRICS',
  'FEDTUNE_EVAL_OUTPUT',
  'FEDTUNE_OPTIMIZER_STATE',
] as const;
export type ExecEnv = Record<(typeof ENV_VARS)[number], string>;

/** At most this much of the script's stderr is quoted in a failure message. */
export const STDERR_TAIL_LINES = 20;
export const STDERR_TAIL_BYTES = 4096;

// ---------------------------------------------------------------------------
// Command line

const SHELL_ONLY = new Set(['|', '&', ';', '<', '>', '(', ')', '$', '`']);

/**
 * Split a command line into argv as sh would for plain words: whitespace
 * separates, '...' is literal, "..." allows \" \\ \$ \` escapes, a backslash
 * outside quotes escapes the next character. No expansion of any kind happens;
 * characters that would need a shell are refused unquoted.
 * Written by hand: none of the installed libraries splits command lines.
 */
export function splitCommand(line: string, what = '--exec'): string[] {
  const out: string[] = [];
  let cur = '';
  let inWord = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i]!;
    if (c === ' ' || c === '\t' || c === '\n') {
      if (inWord) out.push(cur);
      cur = '';
      inWord = false;
      continue;
    }
    inWord = true;
    if (c === "'") {
      const end = line.indexOf("'", i + 1);
      if (end < 0) throw new Error(`${what}: unterminated ' quote at character ${i + 1} of ${JSON.stringify(line)}`);
      cur += line.slice(i + 1, end);
      i = end;
    } else if (c === '"') {
      let j = i + 1;
      for (; j < line.length && line[j] !== '"'; j++) {
        if (line[j] === '\\' && j + 1 < line.length && '"\\$`'.includes(line[j + 1]!)) j++;
        cur += line[j];
      }
      if (j >= line.length) throw new Error(`${what}: unterminated " quote at character ${i + 1} of ${JSON.stringify(line)}`);
      i = j;
    } else if (c === '\\') {
      if (i + 1 >= line.length) throw new Error(`${what}: the command ends with a lone backslash: ${JSON.stringify(line)}`);
      cur += line[++i];
    } else if (SHELL_ONLY.has(c)) {
      throw new Error(
        `${what}: "${c}" at character ${i + 1} of ${JSON.stringify(line)} needs a shell, and the command runs without one; ` +
          `quote it to pass it literally, or run a shell yourself: --exec "sh -c '...'"`,
      );
    } else {
      cur += c;
    }
  }
  if (inWord) out.push(cur);
  if (out.length === 0) throw new Error(`${what} is empty: give the command that trains, e.g. --exec "python3 train.py"`);
  return out;
}

/** Absolute path of argv[0] (as spawn would find it), or an error saying why it cannot run. */
export async function findExecutable(program: string, env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const candidates = program.includes('/') ? [resolve(program)] : (env.PATH ?? '').split(delimiter).filter(Boolean).map((d) => join(d, program));
  for (const c of candidates) {
    try {
      await access(c, constants.X_OK);
      return c;
    } catch {
      /* next */
    }
  }
  throw new Error(
    program.includes('/')
      ? `--exec: ${program} does not exist or is not executable (chmod +x it, or name its interpreter: --exec "python3 ${program}")`
      : `--exec: "${program}" is not on PATH (${env.PATH ?? 'PATH is not set'}); give its full path`,
  );
}

// ---------------------------------------------------------------------------
// Task directory

/** spec.json: the task in the run config's words (snake_case). */
export interface ExecSpec {
  mode: 'train' | 'eval';
  task_id: string;
  round: number;
  seed: number;
  steps: number | null;
  epochs: number | null;
  batch_size: number;
  grad_accumulation: number;
  lr: number;
  schedule: LocalTrainingSpec['schedule'];
  warmup_steps: number;
  /**
   * training.schedule_scope 'run': this task is round schedule_round (1-based) of a schedule that
   * spans schedule_rounds rounds of its `steps` (local step s is schedule step
   * (schedule_round - 1) * steps + s of schedule_rounds * steps). 0: the schedule spans this task alone.
   */
  schedule_round: number;
  schedule_rounds: number;
  weight_decay: number;
  max_grad_norm: number;
  max_seq_len: number;
  template: string;
  /** The pattern fields appear only when set, with PEFT's names and meaning (the global adapter's adapter_config.json holds them too). */
  lora: {
    r: number;
    alpha: number;
    dropout: number;
    target_modules: string[];
    rank_pattern?: Record<string, number>;
    alpha_pattern?: Record<string, number>;
    layers_to_transform?: number[];
    layers_pattern?: string[];
    /** rsLoRA: scale alpha / sqrt(r) instead of alpha / r. */
    use_rslora: boolean;
    /** DoRA; a trainer that does not implement it must fail the task naming lora.use_dora. */
    use_dora: boolean;
  };
  /** LoRA+: lora_B learns at lr * lora_plus_ratio (1: plain LoRA); a trainer that cannot must fail naming it. */
  lora_plus_ratio: number;
  prox_mu: number;
  freeze_lora_a: boolean;
  /** Records in the site's training data (what num_examples may be at most). */
  num_train_records: number;
  /** Records in the eval data (0 without --eval-data). */
  num_eval_records: number;
  /** The same paths as the FEDTUNE_* variables. */
  paths: {
    task_dir: string;
    global_adapter: string;
    data: string;
    eval_data: string;
    model: string;
    output_adapter: string;
    metrics: string;
    eval_output: string;
    /**
     * training.optimizer_scope 'run' (train tasks): a directory that outlives the task, where the
     * command keeps its optimizer's state for the site's next train task of the run (empty the first
     * time, and again whenever the adapter or the run changes); null otherwise.
     */
    optimizer_state: string | null;
  };
}

export interface PreparedTask {
  dir: string;
  spec: ExecSpec;
  env: ExecEnv;
}

/**
 * Make a fresh task directory under `workDir` and fill it: global/ (PEFT),
 * output/ (empty) and spec.json. Also used by tests to run a script by hand.
 */
export async function prepareTaskDir(args: {
  workDir: string;
  mode: 'train' | 'eval';
  taskId: string;
  round: number;
  globalAdapter: TensorMap;
  spec: LocalTrainingSpec;
  modelDir: string;
  dataPath: string;
  evalPath: string;
  template: string;
  maxSeqLen: number;
  numTrainRecords: number;
  numEvalRecords: number;
  optimizerState?: string | null;
}): Promise<PreparedTask> {
  await mkdir(args.workDir, { recursive: true });
  const tag = `${args.mode}-r${args.round}-${args.taskId.replace(/[^A-Za-z0-9_.-]/g, '_').slice(0, 60)}-`;
  const dir = await mkdtemp(join(resolve(args.workDir), tag));
  const paths = {
    task_dir: dir,
    global_adapter: join(dir, 'global'),
    data: args.dataPath ? resolve(args.dataPath) : '',
    eval_data: args.evalPath ? resolve(args.evalPath) : '',
    model: resolve(args.modelDir),
    output_adapter: join(dir, 'output'),
    metrics: join(dir, 'metrics.json'),
    eval_output: join(dir, 'eval.json'),
    optimizer_state: args.optimizerState ?? null,
  };
  const s = args.spec;
  await writePeftAdapter(paths.global_adapter, args.globalAdapter, { lora: s.lora, baseModel: paths.model });
  await mkdir(paths.output_adapter);
  const spec: ExecSpec = {
    mode: args.mode,
    task_id: args.taskId,
    round: args.round,
    seed: s.seed,
    steps: s.steps,
    epochs: s.epochs,
    batch_size: s.batchSize,
    grad_accumulation: s.gradAccumulation,
    lr: s.lr,
    schedule: s.schedule,
    warmup_steps: s.warmupSteps,
    schedule_round: s.scheduleRound,
    schedule_rounds: s.scheduleRounds,
    weight_decay: s.weightDecay,
    max_grad_norm: s.maxGradNorm,
    max_seq_len: args.maxSeqLen,
    template: args.template,
    lora: {
      r: s.lora.r,
      alpha: s.lora.alpha,
      dropout: s.lora.dropout,
      target_modules: [...s.lora.targetModules],
      ...(s.lora.rankPattern && Object.keys(s.lora.rankPattern).length ? { rank_pattern: { ...s.lora.rankPattern } } : {}),
      ...(s.lora.alphaPattern && Object.keys(s.lora.alphaPattern).length ? { alpha_pattern: { ...s.lora.alphaPattern } } : {}),
      ...(s.lora.layersToTransform?.length ? { layers_to_transform: [...s.lora.layersToTransform] } : {}),
      ...(s.lora.layersPattern?.length ? { layers_pattern: [...s.lora.layersPattern] } : {}),
      use_rslora: s.lora.useRslora ?? false,
      use_dora: s.lora.useDora ?? false,
    },
    lora_plus_ratio: s.loraPlusRatio,
    prox_mu: s.proxMu,
    freeze_lora_a: s.freezeLoraA,
    num_train_records: args.numTrainRecords,
    num_eval_records: args.numEvalRecords,
    paths,
  };
  const specPath = join(dir, 'spec.json');
  await writeFile(specPath, `${JSON.stringify(spec, null, 2)}\n`);
  const env: ExecEnv = {
    FEDTUNE_TASK_DIR: dir,
    FEDTUNE_GLOBAL_ADAPTER: paths.global_adapter,
    FEDTUNE_SPEC: specPath,
    FEDTUNE_DATA: paths.data,
    FEDTUNE_EVAL_DATA: paths.eval_data,
    FEDTUNE_MODEL: paths.model,
    FEDTUNE_OUTPUT_ADAPTER: paths.output_adapter,
    FEDTUNE_METRICS: paths.metrics,
    FEDTUNE_EVAL_OUTPUT: paths.eval_output,
    FEDTUNE_OPTIMIZER_STATE: paths.optimizer_state ?? '',
  };
  return { dir, spec, env };
}

// ---------------------------------------------------------------------------
// Running the command

/** The last lines of a stream, at most `maxLines` and about `maxBytes`. */
export class TailBuffer {
  private lines: string[] = [];
  constructor(
    private readonly maxLines = STDERR_TAIL_LINES,
    private readonly maxBytes = STDERR_TAIL_BYTES,
  ) {}
  push(line: string): void {
    this.lines.push(line.length > this.maxBytes ? `...${line.slice(-this.maxBytes)}` : line);
    if (this.lines.length > this.maxLines) this.lines.shift();
    while (this.lines.length > 1 && this.lines.reduce((n, l) => n + Buffer.byteLength(l) + 1, 0) > this.maxBytes) this.lines.shift();
  }
  text(): string {
    return this.lines.join('\n');
  }
}

/** A progress line: {"step", "total_steps", "loss", "tokens_per_sec"?, "examples"?}; null for any other line. */
export function parseProgress(line: string): TrainProgress | null {
  const t = line.trim();
  if (!t.startsWith('{')) return null;
  let v: unknown;
  try {
    v = JSON.parse(t);
  } catch {
    return null;
  }
  if (!v || typeof v !== 'object' || Array.isArray(v)) return null;
  const o = v as Record<string, unknown>;
  const num = (k: string): number | null => (typeof o[k] === 'number' && Number.isFinite(o[k]) ? (o[k] as number) : null);
  const step = num('step');
  const total = num('total_steps');
  const loss = num('loss');
  if (step === null || total === null || loss === null || !Number.isInteger(step) || !Number.isInteger(total) || step < 0 || total < 1) return null;
  return { step, totalSteps: total, loss, tokensPerSec: Math.max(0, num('tokens_per_sec') ?? 0), examples: Math.max(0, Math.trunc(num('examples') ?? 0)) };
}

interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Set when we stopped it: why, and whether SIGKILL was needed. */
  stopped: { reason: string; killed: boolean } | null;
  stderr: string;
  seconds: number;
}

function killGroup(child: ChildProcess, sig: NodeJS.Signals): void {
  if (child.pid === undefined) return;
  try {
    process.kill(-child.pid, sig);
  } catch {
    try {
      child.kill(sig);
    } catch {
      /* already gone */
    }
  }
}

function reasonOf(signal: AbortSignal): string {
  const r: unknown = signal.reason;
  return r instanceof Error ? r.message : r === undefined ? 'cancelled' : String(r);
}

// ---------------------------------------------------------------------------
// Reading what the script wrote

async function readJsonObject(path: string, what: string): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new Error(`the script wrote no ${what} (${path}); it must write it before exiting 0`);
    throw err;
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw new Error(`${what} (${path}) is not valid JSON: ${(err as Error).message}; starts with ${JSON.stringify(text.slice(0, 80))}`);
  }
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error(`${what} (${path}) must be a JSON object, got ${JSON.stringify(v)?.slice(0, 80)}`);
  return v as Record<string, unknown>;
}

/** metrics.json -> num_examples and the numeric metrics (every field a finite number). */
export function checkMetrics(raw: Record<string, unknown>, numTrainRecords: number, path = 'metrics.json'): { numExamples: number; metrics: Record<string, number> } {
  const n = raw.num_examples;
  if (n === undefined) throw new Error(`${path}: "num_examples" is missing; write the number of training examples this update was trained on (1..${numTrainRecords})`);
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 1 || n > numTrainRecords) {
    throw new Error(`${path}: "num_examples" is ${JSON.stringify(n)}; expected an integer from 1 to ${numTrainRecords} (the records in this site's data)`);
  }
  const metrics: Record<string, number> = {};
  for (const [k, v] of Object.entries(raw)) {
    if (k === 'num_examples') continue;
    if (typeof v !== 'number' || !Number.isFinite(v)) {
      throw new Error(`${path}: "${k}" is ${JSON.stringify(v)}; every metric must be a finite number (leave out what you cannot measure)`);
    }
    metrics[k] = v;
  }
  return { numExamples: n, metrics };
}

/** eval.json -> EvalOutcome. */
export function checkEvalResult(raw: Record<string, unknown>, path = 'eval.json'): EvalOutcome {
  const need = (k: string, integer: boolean): number => {
    const v = raw[k];
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0 || (integer && !Number.isInteger(v))) {
      throw new Error(`${path}: "${k}" is ${v === undefined ? 'missing' : JSON.stringify(v)}; expected ${integer ? 'an integer' : 'a finite number'} >= 0`);
    }
    return v;
  };
  const acc = raw.eval_accuracy;
  if (acc !== undefined && acc !== null && (typeof acc !== 'number' || !(acc >= 0 && acc <= 1))) {
    throw new Error(`${path}: "eval_accuracy" is ${JSON.stringify(acc)}; expected a number in [0, 1], null, or no field`);
  }
  return { evalLoss: need('eval_loss', false), evalTokens: need('eval_tokens', true), evalExamples: need('eval_examples', true), evalAccuracy: typeof acc === 'number' ? acc : null };
}

/** Round a float32 to what a tensor of `dtype` can hold (the global lora_A as the script could write it back). */
function roundTo(dtype: string, x: number): number {
  if (dtype === 'F16') return f16BitsToF32(f32ToF16Bits(x));
  if (dtype === 'BF16') return bf16BitsToF32(f32ToBf16Bits(x));
  return x;
}

/**
 * The trained adapter in output/: a PEFT adapter whose config agrees with the
 * task (r, alpha, target modules), with exactly the task's keys and shapes and
 * finite values; with freeze_lora_a every lora_A as it arrived. Returned as
 * float32, lora_A exactly the global's under freeze_lora_a (a half-precision
 * file cannot hold it otherwise).
 */
export async function readOutputAdapter(dir: string, global: TensorMap, spec: LocalTrainingSpec, config: ModelConfig): Promise<TensorMap> {
  const got = await readPeftAdapter(dir);
  const c = got.config;
  const want = spec.lora;
  const problems: string[] = [];
  if (c.r !== want.r) problems.push(`r is ${c.r}, the task's lora.r is ${want.r}`);
  if (c.alpha !== want.alpha) problems.push(`lora_alpha is ${c.alpha}, the task's lora.alpha is ${want.alpha}`);
  const wantT = [...want.targetModules].sort().join(',');
  if ([...c.targetModules].sort().join(',') !== wantT) problems.push(`target_modules is [${c.targetModules.join(', ')}], the task's is [${want.targetModules.join(', ')}]`);
  if ((c.useDora ?? false) !== (want.useDora ?? false)) problems.push(`use_dora is ${c.useDora ?? false}, the task's lora.use_dora is ${want.useDora ?? false}`);
  if ((c.useRslora ?? false) !== (want.useRslora ?? false)) problems.push(`use_rslora is ${c.useRslora ?? false}, the task's lora.use_rslora is ${want.useRslora ?? false}`);
  // Pattern fields: the same entries in the same order (PEFT tries pattern keys in order).
  const same = (a: unknown, b: unknown) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
  if (!same(c.rankPattern, want.rankPattern)) problems.push(`rank_pattern is ${JSON.stringify(c.rankPattern ?? {})}, the task's is ${JSON.stringify(want.rankPattern ?? {})}`);
  if (!same(c.alphaPattern, want.alphaPattern)) problems.push(`alpha_pattern is ${JSON.stringify(c.alphaPattern ?? {})}, the task's is ${JSON.stringify(want.alphaPattern ?? {})}`);
  if (!same(c.layersToTransform, want.layersToTransform)) problems.push(`layers_to_transform is ${JSON.stringify(c.layersToTransform ?? null)}, the task's is ${JSON.stringify(want.layersToTransform ?? null)}`);
  if (!same(c.layersPattern, want.layersPattern)) problems.push(`layers_pattern is ${JSON.stringify(c.layersPattern ?? null)}, the task's is ${JSON.stringify(want.layersPattern ?? null)}`);
  if (problems.length > 0) throw new Error(`${join(dir, 'adapter_config.json')}: ${problems.join('; ')}; write the adapter with the settings of spec.json`);
  try {
    validateAdapter(got.adapter, loraTargets(config, want)); // each module at its own rank
  } catch (e) {
    throw new Error(`${join(dir, ADAPTER_WEIGHTS)}: ${(e as Error).message}`);
  }
  if (!spec.freezeLoraA) return got.adapter;
  const wPath = join(dir, ADAPTER_WEIGHTS);
  const fh = await open(wPath, 'r');
  const dtypes = new Map<string, string>();
  try {
    for (const e of (await readSafetensorsHeader(fh, wPath)).entries) {
      const m = /^(.*\.lora_A)(?:\.[A-Za-z0-9_-]+)?\.weight$/.exec(e.name);
      if (m) dtypes.set(`${m[1]}.weight`, e.dtype);
    }
  } finally {
    await fh.close();
  }
  for (const [name, t] of got.adapter) {
    if (!name.endsWith('.lora_A.weight')) continue;
    const g = global.get(name)!;
    const dtype = dtypes.get(name) ?? 'F32';
    for (let i = 0; i < t.data.length; i++) {
      if (t.data[i] !== roundTo(dtype, g.data[i]!)) {
        throw new Error(
          `${wPath}: ${name}[${i}] is ${t.data[i]} but the global adapter has ${g.data[i]}; with freeze_lora_a (FFA-LoRA) every lora_A must come back unchanged (train lora_B only)`,
        );
      }
    }
    got.adapter.set(name, { shape: [...g.shape], data: Float32Array.from(g.data) });
  }
  return got.adapter;
}

// ---------------------------------------------------------------------------
// The trainer

export class ExecTrainer implements Trainer {
  readonly backend = 'exec';
  readonly device = 'exec';
  readonly numTrainExamples: number;
  readonly numEvalExamples: number;
  readonly modelFingerprint: string;
  private readonly running = new Set<ChildProcess>();
  /** training.optimizer_scope run: the directory the command keeps its optimizer state in, and what it belongs to. */
  private optimizerState: { key: string; dir: string } | null = null;

  constructor(
    private readonly argv: string[],
    private readonly opts: {
      command: string;
      workDir: string;
      ownsWorkDir: boolean;
      keep: boolean;
      graceSec: number;
      noEval: boolean;
      modelDir: string;
      config: ModelConfig;
      fingerprint: string;
      dataPath: string;
      evalPath: string;
      template: string;
      maxSeqLen: number;
      numTrainRecords: number;
      numEvalRecords: number;
    },
  ) {
    this.numTrainExamples = opts.numTrainRecords;
    this.numEvalExamples = opts.noEval ? 0 : opts.numEvalRecords;
    this.modelFingerprint = opts.fingerprint;
  }

  async train(args: TrainArgs): Promise<TrainOutcome> {
    const { spec } = args;
    checkProxMu(spec.proxMu);
    if (spec.dpSgd) {
      throw new Error('privacy.dp_sgd is set, but the exec trainer runs an external command that fedtune cannot make clip per example and add noise; use the onnx trainer (--trainer onnx) or remove privacy.dp_sgd');
    }
    this.checkGlobal(args.globalAdapter, spec);
    const state = await this.optimizerStateFor(args);
    try {
      return await this.withTask('train', args.taskId, args.round, args.globalAdapter, spec, args.signal, args.onProgress, async (task, run) => {
        const metricsRaw = await readJsonObject(task.env.FEDTUNE_METRICS, 'metrics.json');
        const { numExamples, metrics } = checkMetrics(metricsRaw, this.numTrainExamples, task.env.FEDTUNE_METRICS);
        const adapter = await readOutputAdapter(task.env.FEDTUNE_OUTPUT_ADAPTER, args.globalAdapter, spec, this.opts.config);
        if (state && (await readdir(state)).length === 0) {
          throw new Error(
            `training.optimizer_scope is 'run', but the command left paths.optimizer_state (${state}, also FEDTUNE_OPTIMIZER_STATE) empty: save the optimizer's state there for this site's next round (with PyTorch: torch.save(optimizer.state_dict(), ...); examples/trainers/torch_lora.py does it) or set training.optimizer_scope: round`,
          );
        }
        return { adapter, numExamples, metrics: { ...metrics, exec_seconds: run.seconds } };
      }, state);
    } catch (err) {
      await this.dropOptimizerState(); // a task that failed part-way leaves no state to continue from
      throw err;
    }
  }

  /**
   * The directory of the task's optimizer state (training.optimizer_scope 'run'): the one the last
   * train task of the same run used, when it had the same adapter tensors and shapes and the same
   * decay and LoRA+ groups (the onnx trainer's rule), else a new empty one; null for 'round'.
   */
  private async optimizerStateFor(args: TrainArgs): Promise<string | null> {
    const { spec } = args;
    if (!spec.keepOptimizerState) {
      await this.dropOptimizerState();
      return null;
    }
    const key = optimizerStateKey(args);
    if (this.optimizerState?.key === key) return this.optimizerState.dir;
    if (this.optimizerState) log.info({ round: args.round }, 'optimizer state not kept: the adapter or the run changed; the command starts with an empty optimizer_state directory');
    await this.dropOptimizerState();
    await mkdir(this.opts.workDir, { recursive: true });
    const dir = await mkdtemp(join(resolve(this.opts.workDir), 'optimizer-state-'));
    this.optimizerState = { key, dir };
    return dir;
  }

  private async dropOptimizerState(): Promise<void> {
    const st = this.optimizerState;
    this.optimizerState = null;
    if (st) await rm(st.dir, { recursive: true, force: true });
  }

  async evaluate(args: { globalAdapter: TensorMap; spec: LocalTrainingSpec; signal: AbortSignal }): Promise<EvalOutcome | null> {
    if (this.opts.noEval) {
      throw new Error('evaluation is turned off on this worker (--exec-no-eval); it registered no eval data, so the coordinator should not send it evaluation tasks');
    }
    if (this.opts.numEvalRecords === 0) return null;
    this.checkGlobal(args.globalAdapter, args.spec);
    return this.withTask('eval', 'eval', 0, args.globalAdapter, args.spec, args.signal, () => {}, async (task) =>
      checkEvalResult(await readJsonObject(task.env.FEDTUNE_EVAL_OUTPUT, 'eval.json'), task.env.FEDTUNE_EVAL_OUTPUT),
    );
  }

  async close(): Promise<void> {
    for (const c of this.running) killGroup(c, 'SIGKILL');
    await this.dropOptimizerState();
    if (this.opts.ownsWorkDir && !this.opts.keep) await rm(this.opts.workDir, { recursive: true, force: true });
  }

  private checkGlobal(adapter: TensorMap, spec: LocalTrainingSpec): void {
    try {
      validateAdapter(adapter, loraTargets(this.opts.config, spec.lora)); // each module at its own rank
    } catch (e) {
      throw new Error(`global adapter received for this task: ${(e as Error).message}`);
    }
  }

  /** Prepare a task dir, run the command, read its results; the dir goes afterwards unless --exec-keep. */
  private async withTask<T>(
    mode: 'train' | 'eval',
    taskId: string,
    round: number,
    global: TensorMap,
    spec: LocalTrainingSpec,
    signal: AbortSignal,
    onProgress: (p: TrainProgress) => void,
    read: (task: PreparedTask, run: RunResult) => Promise<T>,
    optimizerState: string | null = null,
  ): Promise<T> {
    signal.throwIfAborted();
    const o = this.opts;
    const task = await prepareTaskDir({
      workDir: o.workDir,
      mode,
      taskId,
      round,
      globalAdapter: global,
      spec,
      modelDir: o.modelDir,
      dataPath: o.dataPath,
      evalPath: o.evalPath,
      template: o.template,
      maxSeqLen: o.maxSeqLen,
      numTrainRecords: o.numTrainRecords,
      numEvalRecords: o.numEvalRecords,
      optimizerState,
    });
    const what = `${mode === 'train' ? `round ${round} training` : 'evaluation'} command \`${o.command}\``;
    try {
      const run = await this.runCommand(task, signal, onProgress);
      const tail = run.stderr ? `\nlast stderr lines:\n${run.stderr}` : '\n(the script wrote nothing to stderr)';
      if (run.stopped) {
        const how = run.stopped.killed ? `it did not exit within --exec-grace-sec ${o.graceSec} s of SIGTERM and was killed (SIGKILL)` : 'it exited on SIGTERM';
        throw new Error(`${what} was stopped because ${run.stopped.reason}; ${how}${tail}`);
      }
      if (run.signal) throw new Error(`${what} was killed by signal ${run.signal} after ${run.seconds.toFixed(1)} s${tail}`);
      if (run.code !== 0) throw new Error(`${what} exited with code ${run.code} after ${run.seconds.toFixed(1)} s${tail}`);
      try {
        return await read(task, run);
      } catch (err) {
        throw new Error(`${what} exited 0 but its output is not usable: ${(err as Error).message}${tail}`);
      }
    } finally {
      if (o.keep) log.info({ taskDir: task.dir }, 'task directory kept (--exec-keep)');
      else await rm(task.dir, { recursive: true, force: true });
    }
  }

  private runCommand(task: PreparedTask, signal: AbortSignal, onProgress: (p: TrainProgress) => void): Promise<RunResult> {
    const [program, ...rest] = this.argv;
    const t0 = performance.now();
    return new Promise<RunResult>((resolvePromise, reject) => {
      let child: ChildProcess;
      try {
        child = spawn(program!, [...rest, '--task-dir', task.dir], {
          env: { ...process.env, ...task.env },
          stdio: ['ignore', 'pipe', 'pipe'],
          detached: true, // its own process group: a stop reaches what it starts, too
        });
      } catch (err) {
        reject(new Error(`cannot start \`${this.opts.command}\`: ${(err as Error).message}`));
        return;
      }
      this.running.add(child);
      const stderr = new TailBuffer();
      let stopped: RunResult['stopped'] = null;
      let killTimer: NodeJS.Timeout | null = null;
      const onAbort = (): void => {
        if (stopped) return;
        stopped = { reason: reasonOf(signal), killed: false };
        log.warn({ pid: child.pid, graceSec: this.opts.graceSec }, `stopping the exec command: ${stopped.reason}`);
        killGroup(child, 'SIGTERM');
        killTimer = setTimeout(() => {
          if (stopped) stopped.killed = true;
          killGroup(child, 'SIGKILL');
        }, this.opts.graceSec * 1000);
      };
      signal.addEventListener('abort', onAbort, { once: true });
      if (signal.aborted) onAbort();

      const out = createInterface({ input: child.stdout!, crlfDelay: Infinity });
      out.on('line', (line) => {
        const p = parseProgress(line);
        if (p) onProgress(p);
        else if (line.trim() !== '') log.info({ stream: 'stdout' }, line);
      });
      const err = createInterface({ input: child.stderr!, crlfDelay: Infinity });
      err.on('line', (line) => {
        stderr.push(line);
        log.info({ stream: 'stderr' }, line);
      });

      let exit: { code: number | null; signal: NodeJS.Signals | null } | null = null;
      let settled = false;
      const finish = (): void => {
        if (settled || !exit) return;
        settled = true;
        this.running.delete(child);
        signal.removeEventListener('abort', onAbort);
        if (killTimer) clearTimeout(killTimer);
        // Whatever the script started in its group goes with it.
        if (child.pid !== undefined) killGroup(child, 'SIGKILL');
        resolvePromise({ code: exit.code, signal: exit.signal, stopped, stderr: stderr.text(), seconds: (performance.now() - t0) / 1000 });
      };
      child.on('error', (e: NodeJS.ErrnoException) => {
        if (child.pid !== undefined) return; // a kill error after start; 'exit' follows
        this.running.delete(child);
        signal.removeEventListener('abort', onAbort);
        if (killTimer) clearTimeout(killTimer);
        reject(new Error(`cannot start \`${this.opts.command}\`: ${e.code === 'ENOENT' ? `${program} not found` : e.message}`));
      });
      child.on('exit', (code, sig) => {
        exit = { code, signal: sig };
        // stdout/stderr close right after, unless something the script started still holds them.
        setTimeout(finish, 2000).unref();
      });
      child.on('close', finish);
    });
  }
}

/** The exec trainer for `fedtune worker --trainer exec --exec CMD`. */
export async function createExecTrainer(opts: TrainerFactoryOptions & { exec?: ExecTrainerOptions }): Promise<ExecTrainer> {
  const e = opts.exec;
  if (!e || !e.command) throw new Error('the exec trainer needs the command to run: --exec "python3 train.py"');
  const argv = splitCommand(e.command);
  argv[0] = await findExecutable(argv[0]!);
  const graceSec = e.graceSec ?? DEFAULT_EXEC_GRACE_SEC;
  if (!(graceSec >= 0) || !Number.isFinite(graceSec)) throw new Error(`--exec-grace-sec is ${graceSec}; expected a number of seconds >= 0`);
  if (!opts.modelDir) throw new Error('the exec trainer needs the base model directory (--model DIR) to hand to the command');
  const info = await inspectModel(opts.modelDir);
  const numTrainRecords = opts.dataPath ? (await loadRecords(opts.dataPath)).length : 0;
  const evalPath = opts.evalPath ?? '';
  const numEvalRecords = evalPath && !e.noEval ? (await loadRecords(evalPath)).length : 0;
  let workDir: string;
  let ownsWorkDir = false;
  if (e.workDir) {
    workDir = isAbsolute(e.workDir) ? e.workDir : resolve(e.workDir);
    await mkdir(workDir, { recursive: true });
  } else {
    workDir = await mkdtemp(join(tmpdir(), 'fedtune-exec-'));
    ownsWorkDir = true;
  }
  log.info(
    { command: argv, workDir, train: numTrainRecords, eval: numEvalRecords, keep: e.keep ?? false, graceSec, evaluation: e.noEval ? 'off' : evalPath ? 'on' : 'no --eval-data' },
    'exec trainer ready',
  );
  return new ExecTrainer(argv, {
    command: e.command,
    workDir,
    ownsWorkDir,
    keep: e.keep ?? false,
    graceSec,
    noEval: e.noEval ?? false,
    modelDir: opts.modelDir,
    config: info.config,
    fingerprint: info.fingerprint,
    dataPath: opts.dataPath,
    evalPath,
    template: opts.template,
    maxSeqLen: opts.maxSeqLen,
    numTrainRecords,
    numEvalRecords,
  });
}
