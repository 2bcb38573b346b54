/**
 * Inner optimizer for LoRA training: AdamW with decoupled weight decay (as
 * torch.optim.AdamW), global-norm gradient clipping (as
 * torch.nn.utils.clip_grad_norm_), weighted gradient accumulation, and the
 * Hugging Face warmup schedules. Everything works on TensorMap in place.
 *
 * Written by hand: the math is a few lines per parameter and no maintained
 * TypeScript library optimizes plain typed arrays keyed by name.
 */
import type { FloatArray, Tensor, TensorMap } from './tensor.ts';
import { numel } from './tensor.ts';
import { readSafetensors, toFloat32, toFloat64, writeSafetensors, type StWriteEntry } from './safetensors.ts';

// ---------------------------------------------------------------------------
// AdamW

export interface AdamWOptions {
  lr: number;
  /** Default 0.9. */
  beta1?: number;
  /** Default 0.999. */
  beta2?: number;
  /** Default 1e-8. */
  eps?: number;
  /** Decoupled weight decay. Default 0. */
  weightDecay?: number;
  /**
   * Parameter groups (torch's param_groups, by name): a parameter takes the
   * learning rate lr x lrScale of the first group whose `match` accepts its
   * name (decoupled weight decay uses that rate too); others take lr.
   */
  groups?: readonly ParamGroup[];
}

export interface ParamGroup {
  /** Named in errors and logs. */
  name: string;
  match: (param: string) => boolean;
  lrScale: number;
}

/**
 * LoRA+ (Hayou, Ghosh and Yu 2024): lora_B learns at `ratio` times the rate of
 * lora_A. A ratio of 1 is plain LoRA (no groups).
 */
export function loraPlusGroups(ratio: number): ParamGroup[] {
  checkNumber('LoRA+ ratio', ratio, Number.MIN_VALUE, Infinity, 'a finite number > 0 (1 is plain LoRA; the paper suggests 16)');
  if (ratio === 1) return [];
  // As PEFT's create_loraplus_optimizer: lora_B and every 1-D parameter (DoRA's lora_magnitude_vector) learn at ratio x lr.
  return [{ name: 'lora_B', match: (n) => /\.lora_B(?:\.[A-Za-z0-9_-]+)?\.weight$|\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$/.test(n), lrScale: ratio }];
}

/** m and v are keyed by parameter name, with the parameter's shape and dtype. */
export type OptimizerState = { kind: 'adamw'; step: number; m: TensorMap; v: TensorMap };

export class AdamW {
  readonly lr: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly eps: number;
  readonly weightDecay: number;
  readonly groups: readonly ParamGroup[];
  private t = 0;
  private m: TensorMap = new Map();
  private v: TensorMap = new Map();
  /** Set by load(): the next step checks the loaded state against the params it is given. */
  private checkAgainstParams = false;

  constructor(opts: AdamWOptions) {
    checkNumber('AdamW lr', opts.lr, 0, Infinity, 'a finite number >= 0');
    this.lr = opts.lr;
    this.beta1 = opts.beta1 ?? 0.9;
    this.beta2 = opts.beta2 ?? 0.999;
    this.eps = opts.eps ?? 1e-8;
    this.weightDecay = opts.weightDecay ?? 0;
    checkBeta('AdamW beta1', this.beta1);
    checkBeta('AdamW beta2', this.beta2);
    checkNumber('AdamW eps', this.eps, 0, Infinity, 'a finite number >= 0');
    checkNumber('AdamW weightDecay', this.weightDecay, 0, Infinity, 'a finite number >= 0');
    this.groups = [...(opts.groups ?? [])];
    for (const g of this.groups) checkNumber(`AdamW group "${g.name}" lrScale`, g.lrScale, 0, Infinity, 'a finite number >= 0');
  }

  /** The learning-rate multiplier of a parameter: its group's lrScale, or 1. */
  lrScaleOf(name: string): number {
    return this.groups.find((g) => g.match(name))?.lrScale ?? 1;
  }

  /** Number of steps taken (restored by load). */
  get stepCount(): number {
    return this.t;
  }

  /**
   * One AdamW step, in place on `params`. Parameters without an entry in
   * `grads` are left untouched (as torch does for params whose grad is None).
   * `lr` overrides the constructor's learning rate for this step (schedules).
   */
  step(params: TensorMap, grads: TensorMap, lr: number = this.lr): void {
    checkNumber('AdamW.step lr', lr, 0, Infinity, 'a finite number >= 0');
    for (const [name, g] of grads) {
      const p = params.get(name);
      if (!p) throw new Error(`AdamW.step: gradient "${name}" has no matching parameter (parameters: ${listNames(params)})`);
      checkSameShape(`AdamW.step: gradient "${name}"`, g, p);
    }
    if (this.checkAgainstParams) {
      this.validateLoaded(params, grads);
      this.checkAgainstParams = false;
    }

    this.t += 1;
    const { beta1, beta2, eps, weightDecay } = this;
    const bias1 = 1 - beta1 ** this.t;
    const bias2Sqrt = Math.sqrt(1 - beta2 ** this.t);

    for (const [name, g] of grads) {
      const lrP = lr * this.lrScaleOf(name);
      const stepSize = lrP / bias1;
      const decay = 1 - lrP * weightDecay;
      const p = params.get(name)!;
      let m = this.m.get(name);
      let v = this.v.get(name);
      if (!m || !v) {
        m = zerosLike(p);
        v = zerosLike(p);
        this.m.set(name, m);
        this.v.set(name, v);
      }
      const pd = p.data;
      const gd = g.data;
      const md = m.data;
      const vd = v.data;
      for (let i = 0; i < pd.length; i++) {
        const gi = gd[i];
        const mi = beta1 * md[i] + (1 - beta1) * gi;
        const vi = beta2 * vd[i] + (1 - beta2) * gi * gi;
        md[i] = mi;
        vd[i] = vi;
        const denom = Math.sqrt(vd[i]) / bias2Sqrt + eps;
        pd[i] = pd[i] * decay - (stepSize * md[i]) / denom;
      }
    }
  }

  /** A copy of the optimizer state, safe to save while training goes on. */
  state(): OptimizerState {
    return { kind: 'adamw', step: this.t, m: copyMap(this.m), v: copyMap(this.v) };
  }

  /**
   * Restores a state from state() or loadOptimizerState(). The names and shapes
   * are checked against the parameters given to the next step().
   */
  load(state: OptimizerState): void {
    if (state.kind !== 'adamw') throw new Error(`AdamW.load: state kind is "${String(state.kind)}", expected "adamw"`);
    if (!Number.isInteger(state.step) || state.step < 0) {
      throw new Error(`AdamW.load: state step is ${state.step}, expected an integer >= 0`);
    }
    const mNames = [...state.m.keys()].sort();
    const vNames = [...state.v.keys()].sort();
    if (mNames.join('\n') !== vNames.join('\n')) {
      throw new Error(`AdamW.load: first moments (m) cover [${mNames.join(', ')}] but second moments (v) cover [${vNames.join(', ')}]`);
    }
    for (const [name, m] of state.m) checkSameShape(`AdamW.load: second moment "${name}"`, state.v.get(name)!, m);
    this.t = state.step;
    this.m = copyMap(state.m);
    this.v = copyMap(state.v);
    this.checkAgainstParams = true;
  }

  private validateLoaded(params: TensorMap, grads: TensorMap): void {
    const unknown = [...this.m.keys()].filter((k) => !params.has(k));
    if (unknown.length > 0) {
      throw new Error(
        `AdamW: the loaded optimizer state has entries for ${unknown.length} parameter(s) not being trained: ${unknown.slice(0, 5).join(', ')}` +
          `${unknown.length > 5 ? ', ...' : ''}; the state belongs to a different adapter (trained: ${listNames(params)})`,
      );
    }
    if (this.t > 0) {
      const missing = [...grads.keys()].filter((k) => !this.m.has(k));
      if (missing.length > 0) {
        throw new Error(
          `AdamW: the loaded optimizer state (step ${this.t}) has no entry for parameter(s) ${missing.slice(0, 5).join(', ')}` +
            `${missing.length > 5 ? ', ...' : ''}; the state belongs to a different adapter`,
        );
      }
    }
    for (const [name, m] of this.m) {
      const p = params.get(name)!;
      checkSameShape(`AdamW: loaded optimizer state for "${name}"`, m, p);
      if (m.data.constructor !== p.data.constructor) {
        // Keep the state in the parameter's precision.
        this.m.set(name, { shape: [...p.shape], data: convert(m.data, p.data) });
        this.v.set(name, { shape: [...p.shape], data: convert(this.v.get(name)!.data, p.data) });
      }
    }
  }
}

/** Saves an AdamW state as safetensors (`m.<name>`, `v.<name>`, step in the metadata), atomically. */
export async function saveOptimizerState(path: string, state: OptimizerState): Promise<void> {
  await writeTensorFile(path, 'adamw', state.step, { m: state.m, v: state.v });
}

/** Reads a file written by saveOptimizerState. */
export async function loadOptimizerState(path: string): Promise<OptimizerState> {
  const f = await readTensorFile(path, ['m', 'v']);
  if (f.kind !== 'adamw') throw new Error(`${path}: optimizer state kind is "${f.kind}", expected "adamw"`);
  return { kind: 'adamw', step: f.step, m: f.groups.m, v: f.groups.v };
}

// ---------------------------------------------------------------------------
// Gradient clipping

/**
 * Scales `grads` in place so that their global L2 norm is at most `maxNorm`,
 * as torch.nn.utils.clip_grad_norm_ (coefficient maxNorm / (norm + 1e-6)).
 * Returns the norm before clipping. maxNorm <= 0 or Infinity: no clipping.
 * A non-finite norm is returned without scaling, so the caller can skip the step.
 */
export function clipGradNorm(grads: TensorMap, maxNorm: number): number {
  if (Number.isNaN(maxNorm)) throw new Error('clipGradNorm: maxNorm is NaN; use a positive number, or 0 / Infinity for no clipping');
  const norm = globalNorm(grads);
  if (!(maxNorm > 0) || maxNorm === Infinity || !Number.isFinite(norm)) return norm;
  const coef = maxNorm / (norm + 1e-6);
  if (coef < 1) {
    for (const g of grads.values()) {
      const d = g.data;
      for (let i = 0; i < d.length; i++) d[i] *= coef;
    }
  }
  return norm;
}

/** Global L2 norm over all tensors (accumulated in float64). */
export function globalNorm(grads: TensorMap): number {
  let sq = 0;
  for (const g of grads.values()) {
    const d = g.data;
    for (let i = 0; i < d.length; i++) sq += d[i] * d[i];
  }
  return Math.sqrt(sq);
}

// ---------------------------------------------------------------------------
// Gradient accumulation

/**
 * Sums gradients from micro-batches or workers into one float64 buffer per
 * parameter. mean() is the weighted mean sum(w_i g_i) / sum(w_i): pass token
 * counts as weights to turn per-micro-batch mean gradients into the mean over
 * all tokens.
 */
export class GradAccumulator {
  private acc: Map<string, { shape: number[]; data: Float64Array; f32: boolean }> = new Map();
  private n = 0;
  private w = 0;

  add(grads: TensorMap, weight = 1): void {
    if (!Number.isFinite(weight) || weight < 0) {
      throw new Error(`GradAccumulator.add: weight is ${weight}, expected a finite number >= 0`);
    }
    if (this.n > 0) {
      for (const name of this.acc.keys()) {
        if (!grads.has(name)) throw new Error(`GradAccumulator.add: gradient "${name}" is missing (earlier gradients had it)`);
      }
    }
    for (const [name, g] of grads) {
      const a = this.acc.get(name);
      if (this.n > 0 && !a) throw new Error(`GradAccumulator.add: gradient "${name}" was not in the earlier gradients (${listNames(this.acc)})`);
      if (a) checkSameShape(`GradAccumulator.add: gradient "${name}"`, g, a);
      else if (g.data.length !== numel(g.shape)) throw new Error(`GradAccumulator.add: gradient "${name}" data length ${g.data.length} does not match shape [${g.shape.join(', ')}]`);
    }
    for (const [name, g] of grads) {
      let a = this.acc.get(name);
      if (!a) {
        a = { shape: [...g.shape], data: new Float64Array(g.data.length), f32: g.data instanceof Float32Array };
        this.acc.set(name, a);
      }
      const d = a.data;
      const gd = g.data;
      for (let i = 0; i < d.length; i++) d[i] += weight * gd[i];
    }
    this.n += 1;
    this.w += weight;
  }

  /** Number of add() calls since the last reset. */
  get count(): number {
    return this.n;
  }

  /** Sum of the weights added. */
  get totalWeight(): number {
    return this.w;
  }

  /** Weighted mean, in the dtype of the first gradients added. */
  mean(): TensorMap {
    if (this.n === 0) throw new Error('GradAccumulator.mean: nothing has been added');
    if (this.w === 0) throw new Error('GradAccumulator.mean: the weights added sum to 0');
    return this.collect(1 / this.w);
  }

  /** Weighted sum sum(w_i g_i), in the dtype of the first gradients added. */
  sum(): TensorMap {
    if (this.n === 0) throw new Error('GradAccumulator.sum: nothing has been added');
    return this.collect(1);
  }

  reset(): void {
    this.acc.clear();
    this.n = 0;
    this.w = 0;
  }

  private collect(scale: number): TensorMap {
    const out: TensorMap = new Map();
    for (const [name, a] of this.acc) {
      const data = a.f32 ? new Float32Array(a.data.length) : new Float64Array(a.data.length);
      for (let i = 0; i < data.length; i++) data[i] = a.data[i] * scale;
      out.set(name, { shape: [...a.shape], data });
    }
    return out;
  }
}

// ---------------------------------------------------------------------------
// Learning-rate schedules

export type ScheduleKind = 'constant' | 'linear' | 'cosine';
export const SCHEDULE_KINDS: readonly ScheduleKind[] = ['constant', 'linear', 'cosine'];

export interface Schedule {
  kind: ScheduleKind;
  baseLr: number;
  warmupSteps: number;
  totalSteps: number;
  /** Floor as a fraction of baseLr after warmup (linear, cosine). Default 0. */
  minLrRatio?: number;
}

/**
 * The schedule a task of `steps` local steps follows, and the index in it of the task's first step.
 * scheduleRounds 0: the schedule spans the task alone (offset 0, totalSteps = steps). Otherwise
 * (training.schedule_scope 'run') it spans scheduleRounds rounds of `steps` steps and the task is
 * round scheduleRound (1-based) of them: warmup once at the start of round 1, the decay ending with
 * the last round, as one run of scheduleRounds * steps steps would.
 */
export function taskSchedule(
  s: { schedule: ScheduleKind; lr: number; warmupSteps: number; scheduleRound: number; scheduleRounds: number },
  steps: number,
): { schedule: Schedule; offset: number } {
  const spans = s.scheduleRounds > 0;
  if (spans && !(Number.isInteger(s.scheduleRound) && s.scheduleRound >= 1 && s.scheduleRound <= s.scheduleRounds)) {
    throw new Error(`the task is round ${s.scheduleRound} of a schedule over ${s.scheduleRounds} round(s): schedule_round must be in 1..schedule_rounds`);
  }
  return {
    schedule: { kind: s.schedule, baseLr: s.lr, warmupSteps: s.warmupSteps, totalSteps: spans ? s.scheduleRounds * steps : steps },
    offset: spans ? (s.scheduleRound - 1) * steps : 0,
  };
}

/**
 * Learning rate at `step` (counted from 0), as the Hugging Face transformers
 * schedules get_constant_schedule_with_warmup, get_linear_schedule_with_warmup
 * and get_cosine_schedule_with_warmup (half a cosine cycle). With minLrRatio r
 * the decay factor f becomes r + (1 - r) f, as
 * get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=r) (applied to
 * linear in the same way). Past totalSteps: linear stays at its floor, cosine
 * holds its final value.
 */
export function lrAt(step: number, s: Schedule): number {
  validateSchedule(s);
  if (!Number.isInteger(step) || step < 0) throw new Error(`lrAt: step is ${step}, expected an integer >= 0`);
  const r = s.minLrRatio ?? 0;
  if (step < s.warmupSteps) return (s.baseLr * step) / Math.max(1, s.warmupSteps);
  if (s.kind === 'constant') return s.baseLr;
  const decaySteps = Math.max(1, s.totalSteps - s.warmupSteps);
  let f: number;
  if (s.kind === 'linear') {
    f = Math.max(0, (s.totalSteps - step) / decaySteps);
  } else {
    // Past totalSteps the cosine holds its final value (transformers' formula would rise again).
    const progress = Math.min(1, (step - s.warmupSteps) / decaySteps);
    f = Math.max(0, 0.5 * (1 + Math.cos(Math.PI * progress)));
  }
  if (r > 0) f = r + (1 - r) * f;
  return s.baseLr * f;
}

function validateSchedule(s: Schedule): void {
  if (!SCHEDULE_KINDS.includes(s.kind)) {
    throw new Error(`schedule kind "${String(s.kind)}" is not known; use one of ${SCHEDULE_KINDS.join(', ')}`);
  }
  checkNumber('schedule baseLr', s.baseLr, 0, Infinity, 'a finite number >= 0');
  if (!Number.isInteger(s.warmupSteps) || s.warmupSteps < 0) {
    throw new Error(`schedule warmupSteps is ${s.warmupSteps}, expected an integer >= 0`);
  }
  if (!Number.isInteger(s.totalSteps) || s.totalSteps < 0) {
    throw new Error(`schedule totalSteps is ${s.totalSteps}, expected an integer >= 0`);
  }
  if (s.kind !== 'constant' && s.totalSteps < s.warmupSteps) {
    throw new Error(`schedule totalSteps (${s.totalSteps}) is smaller than warmupSteps (${s.warmupSteps})`);
  }
  if (s.minLrRatio !== undefined) checkNumber('schedule minLrRatio', s.minLrRatio, 0, 1, 'a number in [0, 1]');
}

// ---------------------------------------------------------------------------
// helpers shared with outer.ts

export function checkNumber(what: string, x: number, min: number, max: number, allowed: string): void {
  if (typeof x !== 'number' || !Number.isFinite(x) || x < min || x > max) {
    throw new Error(`${what} is ${String(x)}, expected ${allowed}`);
  }
}

export function checkBeta(what: string, x: number): void {
  if (typeof x !== 'number' || !(x >= 0 && x < 1)) throw new Error(`${what} is ${String(x)}, expected a number in [0, 1)`);
}

export function checkSameShape(what: string, t: Tensor, ref: Tensor): void {
  const same = t.shape.length === ref.shape.length && t.shape.every((d, i) => d === ref.shape[i]);
  if (!same) throw new Error(`${what} has shape [${t.shape.join(', ')}], expected [${ref.shape.join(', ')}]`);
  if (t.data.length !== ref.data.length) {
    throw new Error(`${what} has ${t.data.length} values, expected ${ref.data.length} for shape [${ref.shape.join(', ')}]`);
  }
}

export function zerosLike(t: Tensor): Tensor {
  const data = t.data instanceof Float64Array ? new Float64Array(t.data.length) : new Float32Array(t.data.length);
  return { shape: [...t.shape], data };
}

export function copyMap(m: TensorMap): TensorMap {
  const out: TensorMap = new Map();
  for (const [k, t] of m) out.set(k, { shape: [...t.shape], data: t.data.slice() });
  return out;
}

export function listNames(m: Map<string, unknown>): string {
  const names = [...m.keys()];
  return names.length === 0 ? '(none)' : names.length > 6 ? `${names.slice(0, 6).join(', ')}, ... (${names.length} in all)` : names.join(', ');
}

function convert(src: FloatArray, like: FloatArray): FloatArray {
  return like instanceof Float64Array ? Float64Array.from(src) : Float32Array.from(src);
}

// ---------------------------------------------------------------------------
// Optimizer state files (shared with outer.ts)

const STATE_FORMAT = 'fedtune-optimizer-state';

/**
 * Writes groups of tensors (`<group>.<param name>`) to a safetensors file,
 * atomically, with kind and step in the metadata and the parameter order kept.
 */
export async function writeTensorFile(path: string, kind: string, step: number, groups: Record<string, TensorMap>): Promise<void> {
  const tensors = new Map<string, StWriteEntry>();
  const order: Record<string, string[]> = {};
  for (const [group, map] of Object.entries(groups)) {
    order[group] = [...map.keys()];
    for (const [name, t] of map) {
      tensors.set(`${group}.${name}`, { dtype: t.data instanceof Float64Array ? 'F64' : 'F32', shape: [...t.shape], data: t.data });
    }
  }
  await writeSafetensors(path, tensors, { format: STATE_FORMAT, kind, step: String(step), order: JSON.stringify(order) });
}

/** Reads a file written by writeTensorFile, checking that it holds exactly the expected groups. */
export async function readTensorFile(
  path: string,
  groupNames: readonly string[],
): Promise<{ kind: string; step: number; groups: Record<string, TensorMap> }> {
  const file = await readSafetensors(path);
  const md = file.metadata;
  if (md.format !== STATE_FORMAT) {
    throw new Error(`${path}: not an optimizer state file (metadata "format" is ${JSON.stringify(md.format ?? null)}, expected "${STATE_FORMAT}")`);
  }
  const step = Number(md.step);
  if (!Number.isInteger(step) || step < 0) throw new Error(`${path}: metadata "step" is ${JSON.stringify(md.step)}, expected an integer >= 0`);
  let order: Record<string, string[]> = {};
  try {
    order = JSON.parse(md.order ?? '{}') as Record<string, string[]>;
  } catch {
    throw new Error(`${path}: metadata "order" is not valid JSON`);
  }
  const groups: Record<string, TensorMap> = {};
  for (const g of groupNames) groups[g] = new Map();
  const found = new Map<string, Tensor>();
  for (const [key, entry] of file.tensors) {
    const dot = key.indexOf('.');
    const group = dot > 0 ? key.slice(0, dot) : '';
    if (!groupNames.includes(group)) {
      throw new Error(`${path}: tensor "${key}" is not of the form <group>.<parameter> with group one of ${groupNames.join(', ')}`);
    }
    if (entry.dtype !== 'F32' && entry.dtype !== 'F64') throw new Error(`${path}: tensor "${key}" has dtype ${entry.dtype}, expected F32 or F64`);
    found.set(key, { shape: [...entry.shape], data: entry.dtype === 'F64' ? toFloat64(entry) : toFloat32(entry) });
  }
  for (const g of groupNames) {
    const names = Array.isArray(order[g]) ? order[g] : [];
    for (const name of names) {
      const t = found.get(`${g}.${name}`);
      if (!t) throw new Error(`${path}: tensor "${g}.${name}" is listed in the metadata but missing from the file`);
      groups[g]!.set(name, t);
    }
    // Tensors not listed in the order (hand-made files) follow in file order.
    for (const [key, t] of found) {
      if (key.startsWith(`${g}.`) && !groups[g]!.has(key.slice(g.length + 1))) groups[g]!.set(key.slice(g.length + 1), t);
    }
  }
  return { kind: md.kind ?? '', step, groups };
}
