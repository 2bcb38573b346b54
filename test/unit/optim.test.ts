import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { TensorMap } from '../../common/tensor.ts';
import {
  AdamW,
  clipGradNorm,
  globalNorm,
  GradAccumulator,
  loadOptimizerState,
  lrAt,
  saveOptimizerState,
  taskSchedule,
  type ScheduleKind,
} from '../../common/optim.ts';
import { loadOuterState, OuterOptimizer, saveOuterState, type OuterKind } from '../../common/outer.ts';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'fedtune-optim-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function map64(entries: Record<string, number[]>): TensorMap {
  const m: TensorMap = new Map();
  for (const [k, v] of Object.entries(entries)) m.set(k, { shape: [v.length], data: Float64Array.from(v) });
  return m;
}
function map32(entries: Record<string, { shape: number[]; data: number[] }>): TensorMap {
  const m: TensorMap = new Map();
  for (const [k, v] of Object.entries(entries)) m.set(k, { shape: v.shape, data: Float32Array.from(v.data) });
  return m;
}
function values(m: TensorMap, k: string): number[] {
  return Array.from(m.get(k)!.data);
}
/** Gradient of sum((p - target)^2 * scale): depends on the parameters, so the trajectory does too. */
function quadGrads(params: TensorMap, target: number, scale: number): TensorMap {
  const g: TensorMap = new Map();
  for (const [k, t] of params) {
    const data = t.data instanceof Float64Array ? new Float64Array(t.data.length) : new Float32Array(t.data.length);
    for (let i = 0; i < data.length; i++) data[i] = 2 * scale * (t.data[i]! - target);
    g.set(k, { shape: [...t.shape], data });
  }
  return g;
}

describe('AdamW', () => {
  it('follows the Adam paper form of AdamW (efficient step size, eps scaled) for several steps', () => {
    const lr = 0.05;
    const b1 = 0.8;
    const b2 = 0.95;
    const eps = 1e-3;
    const wd = 0.1;
    const opt = new AdamW({ lr, beta1: b1, beta2: b2, eps, weightDecay: wd });
    const params = map64({ a: [1, -2, 0.5], b: [3] });
    // Independent scalar reference: alpha_t = lr sqrt(1-b2^t)/(1-b1^t), eps_hat = eps sqrt(1-b2^t).
    const ref = [1, -2, 0.5, 3].map((p) => ({ p, m: 0, v: 0 }));
    for (let t = 1; t <= 6; t++) {
      const grads = quadGrads(params, 0.25, t);
      opt.step(params, grads);
      for (const r of ref) {
        const g = 2 * t * (r.p - 0.25);
        r.p -= lr * wd * r.p;
        r.m = b1 * r.m + (1 - b1) * g;
        r.v = b2 * r.v + (1 - b2) * g * g;
        const alpha = (lr * Math.sqrt(1 - b2 ** t)) / (1 - b1 ** t);
        r.p -= (alpha * r.m) / (Math.sqrt(r.v) + eps * Math.sqrt(1 - b2 ** t));
      }
      const got = [...values(params, 'a'), ...values(params, 'b')];
      got.forEach((x, i) => expect(x).toBeCloseTo(ref[i]!.p, 12));
    }
    expect(opt.stepCount).toBe(6);
  });

  it('updates float32 parameters in place and uses the per-step lr override', () => {
    const opt = new AdamW({ lr: 1 });
    const params = map32({ w: { shape: [2, 2], data: [1, 2, 3, 4] } });
    const data = params.get('w')!.data;
    opt.step(params, map32({ w: { shape: [2, 2], data: [1, -1, 2, -2] } }), 0.01);
    // First Adam step moves each weight by lr * sign(g) (m_hat / sqrt(v_hat) = sign(g), up to eps).
    expect(params.get('w')!.data).toBe(data);
    [1 - 0.01, 2 + 0.01, 3 - 0.01, 4 + 0.01].forEach((want, i) => expect(data[i]).toBeCloseTo(want, 6));
  });

  it('decays weights decoupled from the gradient: with zero gradients p_t = p_0 (1 - lr wd)^t', () => {
    const opt = new AdamW({ lr: 0.1, weightDecay: 0.5 });
    const params = map64({ w: [2, -4] });
    const zero = map64({ w: [0, 0] });
    for (let t = 0; t < 5; t++) opt.step(params, zero);
    expect(values(params, 'w')[0]).toBeCloseTo(2 * 0.95 ** 5, 14);
    expect(values(params, 'w')[1]).toBeCloseTo(-4 * 0.95 ** 5, 14);
  });

  it('leaves parameters without a gradient untouched and rejects gradients with no parameter', () => {
    const opt = new AdamW({ lr: 0.1 });
    const params = map64({ a: [1], b: [1] });
    opt.step(params, map64({ a: [1] }));
    expect(values(params, 'b')).toEqual([1]);
    expect(values(params, 'a')[0]).toBeLessThan(1);
    expect(() => opt.step(params, map64({ c: [1] }))).toThrow(/gradient "c" has no matching parameter/);
    expect(() => opt.step(params, map64({ a: [1, 2] }))).toThrow(/gradient "a" has shape \[2\], expected \[1\]/);
  });

  it('resumes from a saved state file to the identical trajectory', async () => {
    const make = () => new AdamW({ lr: 0.02, weightDecay: 0.01 });
    const p0 = map32({ 'base_model.model.layers.0.lora_A.weight': { shape: [2, 3], data: [0.1, -0.2, 0.3, 0.4, -0.5, 0.6] }, z: { shape: [1], data: [2] } });
    const a = make();
    for (let t = 1; t <= 3; t++) a.step(p0, quadGrads(p0, 1, t));
    const path = join(dir, 'adamw.safetensors');
    await saveOptimizerState(path, a.state());
    const snapshot = new Map([...p0].map(([k, t]) => [k, { shape: [...t.shape], data: t.data.slice() }]));
    for (let t = 4; t <= 6; t++) a.step(p0, quadGrads(p0, 1, t));

    const b = make();
    const loaded = await loadOptimizerState(path);
    expect(loaded.step).toBe(3);
    expect([...loaded.m.keys()]).toEqual([...p0.keys()]);
    b.load(loaded);
    expect(b.stepCount).toBe(3);
    for (let t = 4; t <= 6; t++) b.step(snapshot, quadGrads(snapshot, 1, t));
    for (const k of p0.keys()) expect(Array.from(snapshot.get(k)!.data)).toEqual(Array.from(p0.get(k)!.data));
  });

  it('checks a loaded state against the parameters it is then given', () => {
    const a = new AdamW({ lr: 0.1 });
    const params = map64({ x: [1, 2] });
    a.step(params, map64({ x: [1, 1] }));
    const s = a.state();

    const wrongShape = new AdamW({ lr: 0.1 });
    wrongShape.load(s);
    expect(() => wrongShape.step(map64({ x: [1, 2, 3] }), map64({ x: [1, 1, 1] }))).toThrow(/optimizer state for "x" has shape \[2\], expected \[3\]/);

    const wrongNames = new AdamW({ lr: 0.1 });
    wrongNames.load(s);
    expect(() => wrongNames.step(map64({ y: [1, 2] }), map64({ y: [1, 1] }))).toThrow(/not being trained: x/);

    expect(() => new AdamW({ lr: 0.1 }).load({ ...s, v: new Map() })).toThrow(/first moments \(m\) cover \[x\] but second moments \(v\) cover \[\]/);
    expect(() => new AdamW({ lr: -1 })).toThrow(/AdamW lr is -1/);
    expect(() => new AdamW({ lr: 1, beta2: 1 })).toThrow(/beta2 is 1, expected a number in \[0, 1\)/);
  });

  it('rejects a file that is not an optimizer state', async () => {
    const { writeSafetensors } = await import('../../common/safetensors.ts');
    const path = join(dir, 'not-state.safetensors');
    await writeSafetensors(path, new Map([['w', { dtype: 'F32', shape: [1], data: new Float32Array([1]) }]]));
    await expect(loadOptimizerState(path)).rejects.toThrow(/not an optimizer state file/);
  });
});

describe('clipGradNorm', () => {
  it('returns the norm before clipping and scales to maxNorm when above it', () => {
    const g = map64({ a: [3, 0], b: [0, 4] });
    expect(clipGradNorm(g, 1)).toBeCloseTo(5, 12);
    expect(globalNorm(g)).toBeCloseTo(1, 5);
    // Direction is kept.
    expect(values(g, 'a')[0]! / values(g, 'b')[1]!).toBeCloseTo(0.75, 12);
  });

  it('leaves gradients alone below maxNorm, for maxNorm <= 0 and Infinity', () => {
    for (const maxNorm of [10, 0, -1, Infinity]) {
      const g = map64({ a: [3, 4] });
      expect(clipGradNorm(g, maxNorm)).toBeCloseTo(5, 12);
      expect(values(g, 'a')).toEqual([3, 4]);
    }
  });

  it('returns a non-finite norm without scaling', () => {
    const g = map64({ a: [NaN, 1] });
    expect(clipGradNorm(g, 1)).toBeNaN();
    expect(values(g, 'a')[1]).toBe(1);
  });
});

describe('GradAccumulator', () => {
  it('computes the weighted mean and weighted sum, in the input dtype', () => {
    const acc = new GradAccumulator();
    acc.add(map32({ w: { shape: [2], data: [1, 2] } }), 1);
    acc.add(map32({ w: { shape: [2], data: [5, -2] } }), 3);
    expect(acc.count).toBe(2);
    expect(acc.totalWeight).toBe(4);
    const mean = acc.mean().get('w')!;
    expect(mean.data).toBeInstanceOf(Float32Array);
    expect(Array.from(mean.data)).toEqual([(1 + 15) / 4, (2 - 6) / 4]);
    expect(Array.from(acc.sum().get('w')!.data)).toEqual([16, -4]);
    acc.reset();
    expect(acc.count).toBe(0);
    expect(() => acc.mean()).toThrow(/nothing has been added/);
  });

  it('rejects gradients that do not match the earlier ones', () => {
    const acc = new GradAccumulator();
    acc.add(map64({ w: [1, 2] }));
    expect(() => acc.add(map64({ w: [1, 2, 3] }))).toThrow(/gradient "w" has shape \[3\], expected \[2\]/);
    expect(() => acc.add(map64({ v: [1, 2] }))).toThrow(/gradient "w" is missing/);
    expect(() => acc.add(map64({ w: [1, 2] }), -1)).toThrow(/weight is -1/);
    expect(acc.count).toBe(1);
  });
});

describe('lrAt', () => {
  // The lambdas of transformers.optimization, written out as in the Python source.
  function hf(kind: ScheduleKind, step: number, warmup: number, total: number, minLrRate = 0): number {
    if (step < warmup) return step / Math.max(1, warmup);
    if (kind === 'constant') return 1;
    if (kind === 'linear') return Math.max(0, (total - step) / Math.max(1, total - warmup));
    const progress = (step - warmup) / Math.max(1, total - warmup);
    const f = 0.5 * (1 + Math.cos(Math.PI * 0.5 * 2 * progress));
    return Math.max(0, f * (1 - minLrRate) + minLrRate);
  }

  it('matches the transformers schedules at warmup boundaries, midpoints and the end', () => {
    const warmup = 10;
    const total = 110;
    for (const kind of ['constant', 'linear', 'cosine'] as const) {
      for (const step of [0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110]) {
        const s = { kind, baseLr: 3e-4, warmupSteps: warmup, totalSteps: total };
        expect(lrAt(step, s)).toBeCloseTo(3e-4 * hf(kind, step, warmup, total), 15);
      }
    }
    const base = { baseLr: 1, warmupSteps: 10, totalSteps: 110 };
    expect(lrAt(5, { kind: 'linear', ...base })).toBeCloseTo(0.5, 12);
    expect(lrAt(60, { kind: 'linear', ...base })).toBeCloseTo(0.5, 12);
    expect(lrAt(60, { kind: 'cosine', ...base })).toBeCloseTo(0.5, 12);
    expect(lrAt(110, { kind: 'cosine', ...base })).toBeCloseTo(0, 12);
  });

  it('applies minLrRatio as transformers cosine_with_min_lr and holds the floor after the end', () => {
    const s = { kind: 'cosine' as const, baseLr: 2, warmupSteps: 4, totalSteps: 24, minLrRatio: 0.1 };
    for (const step of [0, 4, 9, 14, 19, 24]) expect(lrAt(step, s)).toBeCloseTo(2 * hf('cosine', step, 4, 24, 0.1), 12);
    expect(lrAt(40, s)).toBeCloseTo(0.2, 12);
    expect(lrAt(40, { ...s, kind: 'linear' })).toBeCloseTo(0.2, 12);
    expect(lrAt(40, { ...s, minLrRatio: 0 })).toBeCloseTo(0, 12);
  });

  it('rejects bad schedules with the field named', () => {
    expect(() => lrAt(0, { kind: 'step' as ScheduleKind, baseLr: 1, warmupSteps: 0, totalSteps: 1 })).toThrow(/"step" is not known; use one of constant, linear, cosine/);
    expect(() => lrAt(0, { kind: 'linear', baseLr: 1, warmupSteps: 10, totalSteps: 5 })).toThrow(/totalSteps \(5\) is smaller than warmupSteps \(10\)/);
    expect(() => lrAt(-1, { kind: 'linear', baseLr: 1, warmupSteps: 0, totalSteps: 5 })).toThrow(/step is -1/);
    expect(() => lrAt(0, { kind: 'linear', baseLr: 1, warmupSteps: 0, totalSteps: 5, minLrRatio: 2 })).toThrow(/minLrRatio is 2/);
  });
});

describe('OuterOptimizer', () => {
  const deltas = [0.5, -0.2, 0.3, 0.05];

  /** Scalar reference per kind, written from the papers' update rules. */
  function reference(kind: OuterKind, x0: number, o: { lr: number; mu: number; b1: number; b2: number; tau: number }): number[] {
    let x = x0;
    let mom = 0;
    let m = 0;
    let v = o.tau * o.tau;
    const out: number[] = [];
    for (const d of deltas) {
      if (kind === 'average') x = x + d;
      else if (kind === 'nesterov') {
        // torch.optim.SGD(nesterov=True) on the pseudo-gradient -d.
        const g = -d;
        mom = o.mu * mom + g;
        x = x - o.lr * (g + o.mu * mom);
      } else if (kind === 'fedavgm') {
        mom = o.mu * mom + -d;
        x = x - o.lr * mom;
      } else {
        m = o.b1 * m + (1 - o.b1) * d;
        if (kind === 'fedadam') v = o.b2 * v + (1 - o.b2) * d * d;
        else v = v - (1 - o.b2) * d * d * Math.sign(v - d * d);
        x = x + (o.lr * m) / (Math.sqrt(v) + o.tau);
      }
      out.push(x);
    }
    return out;
  }

  const settings: Record<OuterKind, { lr: number; mu: number; b1: number; b2: number; tau: number }> = {
    average: { lr: 1, mu: 0, b1: 0, b2: 0, tau: 0 },
    nesterov: { lr: 0.7, mu: 0.9, b1: 0, b2: 0, tau: 0 },
    fedavgm: { lr: 1, mu: 0.9, b1: 0, b2: 0, tau: 0 },
    fedadam: { lr: 0.1, mu: 0, b1: 0.9, b2: 0.99, tau: 1e-9 },
    fedyogi: { lr: 0.01, mu: 0, b1: 0.9, b2: 0.99, tau: 1e-3 },
  };

  for (const kind of Object.keys(settings) as OuterKind[]) {
    it(`${kind}: matches the scalar update rule over several rounds with default settings`, () => {
      const opt = new OuterOptimizer({ kind });
      const ref = reference(kind, 1.5, settings[kind]);
      let global = map64({ w: [1.5, 1.5] });
      deltas.forEach((d, r) => {
        const before = values(global, 'w');
        const delta = map64({ w: [d, d] });
        const next = opt.step(global, delta);
        expect(values(global, 'w')).toEqual(before);
        expect(values(delta, 'w')).toEqual([d, d]);
        expect(values(next, 'w')[0]).toBeCloseTo(ref[r]!, 12);
        expect(values(next, 'w')[1]).toBeCloseTo(ref[r]!, 12);
        global = next;
      });
      expect(opt.stepCount).toBe(deltas.length);
    });
  }

  it('fedyogi grows v more slowly than fedadam when updates shrink (sign rule)', () => {
    const kinds = ['fedadam', 'fedyogi'] as const;
    const [adam, yogi] = kinds.map((kind) => new OuterOptimizer({ kind, lr: 0.1, tau: 1e-3, beta2: 0.9 }));
    let ga = map64({ w: [0] });
    let gy = map64({ w: [0] });
    for (const d of [1, 0.1, 0.1]) {
      ga = adam!.step(ga, map64({ w: [d] }));
      gy = yogi!.step(gy, map64({ w: [d] }));
    }
    const va = values(adam!.state().v, 'w')[0]!;
    const vy = values(yogi!.state().v, 'w')[0]!;
    // Adam: v decays toward d^2 multiplicatively; Yogi: additively by (1-b2) d^2, so it stays larger.
    expect(vy).toBeGreaterThan(va);
  });

  it('resumes from a saved state to the identical result, and validates inputs', async () => {
    const opt = new OuterOptimizer({ kind: 'fedadam', lr: 0.05 });
    let g = map32({ a: { shape: [2], data: [1, 2] } });
    g = opt.step(g, map32({ a: { shape: [2], data: [0.1, -0.3] } }));
    const path = join(dir, 'outer.safetensors');
    await saveOuterState(path, opt.state());
    const resumed = new OuterOptimizer({ kind: 'fedadam', lr: 0.05 });
    resumed.load(await loadOuterState(path));
    const d = map32({ a: { shape: [2], data: [0.2, 0.2] } });
    expect(Array.from(resumed.step(g, d).get('a')!.data)).toEqual(Array.from(opt.step(g, d).get('a')!.data));

    expect(() => new OuterOptimizer({ kind: 'nesterov' }).load(opt.state())).toThrow(/state is for "fedadam" but this optimizer is "nesterov"/);
    expect(() => opt.step(g, map32({ b: { shape: [2], data: [0, 0] } }))).toThrow(/delta has no entry for "a"/);
    expect(() => opt.step(g, map32({ a: { shape: [2], data: [NaN, 0] } }))).toThrow(/delta "a" has a non-finite value/);
    expect(() => new OuterOptimizer({ kind: 'fedadam', momentum: 0.9 })).toThrow(/option "momentum" does not apply to "fedadam"/);
    expect(() => new OuterOptimizer({ kind: 'sgd' as OuterKind })).toThrow(/"sgd" is not known; use one of average, nesterov, fedavgm, fedadam, fedyogi/);
  });
});

describe('taskSchedule (training.schedule_scope)', () => {
  const lrs = (o: { schedule: 'constant' | 'linear' | 'cosine'; warmupSteps: number; scheduleRound: number; scheduleRounds: number }, steps: number): number[] => {
    const { schedule, offset } = taskSchedule({ lr: 1, ...o }, steps);
    return Array.from({ length: steps }, (_, s) => lrAt(offset + s, schedule));
  };

  it("'run': warmup once over the first rounds, then the base rate, as one run of rounds x steps", () => {
    // Warmup 5, 3 local steps per round: schedule step g = (round - 1) * 3 + s has lr g / 5 below 5, then 1.
    const at = (r: number) => lrs({ schedule: 'constant', warmupSteps: 5, scheduleRound: r, scheduleRounds: 4 }, 3);
    expect(at(1)).toEqual([0, 0.2, 0.4]);
    expect(at(2)).toEqual([0.6, 0.8, 1]);
    expect(at(3)).toEqual([1, 1, 1]);
    expect(at(4)).toEqual([1, 1, 1]);
  });

  it("'run' with cosine: the decay spans all rounds and ends with the last", () => {
    // 4 rounds x 3 steps = 12, warmup 2: lr(g) = 0.5 (1 + cos(pi (g - 2) / 10)) from g = 2.
    const cos = (g: number) => 0.5 * (1 + Math.cos((Math.PI * (g - 2)) / 10));
    const r1 = lrs({ schedule: 'cosine', warmupSteps: 2, scheduleRound: 1, scheduleRounds: 4 }, 3);
    const r4 = lrs({ schedule: 'cosine', warmupSteps: 2, scheduleRound: 4, scheduleRounds: 4 }, 3);
    expect(r1[0]).toBe(0);
    expect(r1[1]).toBe(0.5);
    expect(r1[2]).toBeCloseTo(1, 12);
    [9, 10, 11].forEach((g, s) => expect(r4[s]).toBeCloseTo(cos(g), 12));
    expect(r4[2]).toBeCloseTo(0.0244717418524232, 12); // 0.5 (1 + cos(0.9 pi))
  });

  it("'round' (schedule_rounds 0): every task warms up and decays on its own", () => {
    for (const r of [0, 1, 7]) expect(lrs({ schedule: 'constant', warmupSteps: 5, scheduleRound: r, scheduleRounds: 0 }, 3)).toEqual([0, 0.2, 0.4]);
    expect(lrs({ schedule: 'linear', warmupSteps: 0, scheduleRound: 0, scheduleRounds: 0 }, 4)).toEqual([1, 0.75, 0.5, 0.25]);
  });

  it('refuses a round outside 1..schedule_rounds by name', () => {
    for (const r of [0, 5, 1.5]) {
      expect(() => taskSchedule({ schedule: 'constant', lr: 1, warmupSteps: 0, scheduleRound: r, scheduleRounds: 4 }, 3)).toThrow(/schedule_round must be in 1\.\.schedule_rounds/);
    }
  });
});
