/**
 * Outer (server) optimizers: what turns the aggregate of the workers' new
 * weights into the next global adapter, for local SGD (DiLoCo) and federated
 * rounds (FedOpt family).
 *
 * delta = aggregated new weights - global. The "pseudo-gradient" is -delta.
 *
 *   average   new = global + delta                                   (FedAvg)
 *   nesterov  b = mu b - delta;  new = global - lr (-delta + mu b)   (DiLoCo: SGD, Nesterov momentum)
 *   fedavgm   b = mu b - delta;  new = global - lr b                 (Hsu et al. 2019)
 *   fedadam   m = b1 m + (1-b1) delta;  v = b2 v + (1-b2) delta^2;
 *             new = global + lr m / (sqrt(v) + tau)                  (Reddi et al. 2021, Alg. 2)
 *   fedyogi   as fedadam with v = v - (1-b2) delta^2 sign(v - delta^2)
 *
 * As in Reddi et al., FedAdam/FedYogi have no bias correction and start from
 * m = 0, v = tau^2. Arithmetic is float64; results and state keep the dtype
 * of the global weights. Written by hand: a few lines of math per kind.
 */
import type { TensorMap } from './tensor.ts';
import { checkBeta, checkNumber, checkSameShape, copyMap, listNames, readTensorFile, writeTensorFile, zerosLike } from './optim.ts';

export type OuterKind = 'average' | 'nesterov' | 'fedavgm' | 'fedadam' | 'fedyogi';
export const OUTER_KINDS: readonly OuterKind[] = ['average', 'nesterov', 'fedavgm', 'fedadam', 'fedyogi'];

export interface OuterOptions {
  kind: OuterKind;
  /** Outer / server learning rate. Defaults: nesterov 0.7, fedavgm 1.0, fedadam 0.1, fedyogi 0.01. */
  lr?: number;
  /** Momentum (nesterov, fedavgm). Default 0.9. */
  momentum?: number;
  /** First-moment decay (fedadam, fedyogi). Default 0.9. */
  beta1?: number;
  /** Second-moment decay (fedadam, fedyogi). Default 0.99. */
  beta2?: number;
  /** Adaptivity (fedadam, fedyogi). Defaults: fedadam 1e-9, fedyogi 1e-3. */
  tau?: number;
}

/** m: momentum / first moment; v: second moment (fedadam, fedyogi). Keyed by parameter name. */
export type OuterOptimizerState = { kind: OuterKind; step: number; m: TensorMap; v: TensorMap };

const DEFAULT_LR: Record<OuterKind, number> = { average: 1, nesterov: 0.7, fedavgm: 1, fedadam: 0.1, fedyogi: 0.01 };
const DEFAULT_TAU: Record<OuterKind, number> = { average: 0, nesterov: 0, fedavgm: 0, fedadam: 1e-9, fedyogi: 1e-3 };

const APPLIES: Record<keyof Omit<OuterOptions, 'kind'>, readonly OuterKind[]> = {
  lr: ['nesterov', 'fedavgm', 'fedadam', 'fedyogi'],
  momentum: ['nesterov', 'fedavgm'],
  beta1: ['fedadam', 'fedyogi'],
  beta2: ['fedadam', 'fedyogi'],
  tau: ['fedadam', 'fedyogi'],
};

export class OuterOptimizer {
  readonly kind: OuterKind;
  readonly lr: number;
  readonly momentum: number;
  readonly beta1: number;
  readonly beta2: number;
  readonly tau: number;
  private t = 0;
  private m: TensorMap = new Map();
  private v: TensorMap = new Map();
  private checkAgainstGlobal = false;

  constructor(opts: OuterOptions) {
    if (!OUTER_KINDS.includes(opts.kind)) {
      throw new Error(`outer optimizer kind "${String(opts.kind)}" is not known; use one of ${OUTER_KINDS.join(', ')}`);
    }
    this.kind = opts.kind;
    for (const [key, kinds] of Object.entries(APPLIES)) {
      if (opts[key as keyof typeof APPLIES] !== undefined && !kinds.includes(opts.kind)) {
        throw new Error(`outer optimizer option "${key}" does not apply to "${opts.kind}" (it applies to ${kinds.join(', ')})`);
      }
    }
    this.lr = opts.lr ?? DEFAULT_LR[opts.kind];
    this.momentum = opts.momentum ?? 0.9;
    this.beta1 = opts.beta1 ?? 0.9;
    this.beta2 = opts.beta2 ?? 0.99;
    this.tau = opts.tau ?? DEFAULT_TAU[opts.kind];
    checkNumber(`outer optimizer (${this.kind}) lr`, this.lr, 0, Infinity, 'a finite number >= 0');
    checkBeta(`outer optimizer (${this.kind}) momentum`, this.momentum);
    checkBeta(`outer optimizer (${this.kind}) beta1`, this.beta1);
    checkBeta(`outer optimizer (${this.kind}) beta2`, this.beta2);
    checkNumber(`outer optimizer (${this.kind}) tau`, this.tau, 0, Infinity, 'a finite number >= 0');
    if ((this.kind === 'fedadam' || this.kind === 'fedyogi') && this.tau === 0) {
      throw new Error(`outer optimizer (${this.kind}) tau is 0, expected a number > 0 (it keeps the division finite)`);
    }
  }

  /** Number of outer steps taken (restored by load). */
  get stepCount(): number {
    return this.t;
  }

  /** Returns the new global weights; `global` and `delta` are not modified. */
  step(global: TensorMap, delta: TensorMap): TensorMap {
    for (const [name, g] of global) {
      const d = delta.get(name);
      if (!d) throw new Error(`outer optimizer: delta has no entry for "${name}" (delta has: ${listNames(delta)})`);
      checkSameShape(`outer optimizer: delta "${name}"`, d, g);
      for (let i = 0; i < d.data.length; i++) {
        if (!Number.isFinite(d.data[i])) throw new Error(`outer optimizer: delta "${name}" has a non-finite value (${d.data[i]}) at index ${i}`);
      }
    }
    for (const name of delta.keys()) {
      if (!global.has(name)) throw new Error(`outer optimizer: delta "${name}" has no matching global parameter (global has: ${listNames(global)})`);
    }
    if (this.checkAgainstGlobal) {
      for (const [name, m] of this.m) {
        const g = global.get(name);
        if (!g) throw new Error(`outer optimizer: the loaded state has an entry for "${name}", which is not a global parameter (global has: ${listNames(global)})`);
        checkSameShape(`outer optimizer: loaded state for "${name}"`, m, g);
      }
      this.checkAgainstGlobal = false;
    }

    this.t += 1;
    const { kind, lr, momentum: mu, beta1: b1, beta2: b2, tau } = this;
    const out: TensorMap = new Map();
    for (const [name, g] of global) {
      const gd = g.data;
      const dd = delta.get(name)!.data;
      const nd = gd.slice();
      out.set(name, { shape: [...g.shape], data: nd });
      if (kind === 'average') {
        for (let i = 0; i < nd.length; i++) nd[i] = gd[i] + dd[i];
        continue;
      }
      const m = this.buffer(this.m, name, g, 0).data;
      if (kind === 'nesterov' || kind === 'fedavgm') {
        for (let i = 0; i < nd.length; i++) {
          const grad = -dd[i];
          m[i] = mu * m[i] + grad;
          nd[i] = gd[i] - lr * (kind === 'nesterov' ? grad + mu * m[i] : m[i]);
        }
        continue;
      }
      const v = this.buffer(this.v, name, g, tau * tau).data;
      for (let i = 0; i < nd.length; i++) {
        const di = dd[i];
        const d2 = di * di;
        m[i] = b1 * m[i] + (1 - b1) * di;
        v[i] = kind === 'fedadam' ? b2 * v[i] + (1 - b2) * d2 : v[i] - (1 - b2) * d2 * Math.sign(v[i] - d2);
        nd[i] = gd[i] + (lr * m[i]) / (Math.sqrt(v[i]) + tau);
      }
    }
    return out;
  }

  state(): OuterOptimizerState {
    return { kind: this.kind, step: this.t, m: copyMap(this.m), v: copyMap(this.v) };
  }

  /** Restores state(); names and shapes are checked against the next step's global weights. */
  load(state: OuterOptimizerState): void {
    if (state.kind !== this.kind) {
      throw new Error(`outer optimizer: the state is for "${String(state.kind)}" but this optimizer is "${this.kind}"`);
    }
    if (!Number.isInteger(state.step) || state.step < 0) {
      throw new Error(`outer optimizer: state step is ${state.step}, expected an integer >= 0`);
    }
    const adaptive = this.kind === 'fedadam' || this.kind === 'fedyogi';
    if (this.kind === 'average' && (state.m.size > 0 || state.v.size > 0)) {
      throw new Error('outer optimizer: "average" keeps no state, but the state given has tensors');
    }
    if (!adaptive && state.v.size > 0) throw new Error(`outer optimizer: "${this.kind}" keeps no second moments, but the state has ${state.v.size}`);
    if (adaptive) {
      for (const [name, m] of state.m) {
        const v = state.v.get(name);
        if (!v) throw new Error(`outer optimizer: state has a first moment for "${name}" but no second moment`);
        checkSameShape(`outer optimizer: second moment "${name}"`, v, m);
      }
      for (const name of state.v.keys()) {
        if (!state.m.has(name)) throw new Error(`outer optimizer: state has a second moment for "${name}" but no first moment`);
      }
    }
    this.t = state.step;
    this.m = copyMap(state.m);
    this.v = copyMap(state.v);
    this.checkAgainstGlobal = true;
  }

  private buffer(map: TensorMap, name: string, like: { shape: number[]; data: Float32Array | Float64Array }, init: number) {
    let b = map.get(name);
    if (!b) {
      b = zerosLike(like);
      if (init !== 0) b.data.fill(init);
      map.set(name, b);
    }
    return b;
  }
}

/** Saves an outer optimizer state as safetensors (`m.<name>`, `v.<name>`), atomically. */
export async function saveOuterState(path: string, state: OuterOptimizerState): Promise<void> {
  await writeTensorFile(path, state.kind, state.step, { m: state.m, v: state.v });
}

/** Reads a file written by saveOuterState. */
export async function loadOuterState(path: string): Promise<OuterOptimizerState> {
  const f = await readTensorFile(path, ['m', 'v']);
  if (!OUTER_KINDS.includes(f.kind as OuterKind)) {
    throw new Error(`${path}: state kind is "${f.kind}", expected an outer optimizer (${OUTER_KINDS.join(', ')})`);
  }
  return { kind: f.kind as OuterKind, step: f.step, m: f.groups.m, v: f.groups.v };
}
