/**
 * Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"):
 * the round's example-weighted mean minus the global adapter is a
 * pseudo-gradient, and a server optimizer takes one step along it.
 *
 *   fedavgm   momentum (Hsu et al. 2019)      lr 1, momentum 0.9
 *   fedadam   Adam without bias correction     lr, beta1, beta2, tau
 *   fedyogi   Yogi's additive second moment    lr, beta1, beta2, tau
 *
 * The optimizer's moments are server state: saved with every checkpoint and
 * restored on resume, so a resumed run continues the same trajectory.
 */
import { z } from 'zod';
import { OuterOptimizer, type OuterKind } from '../../common/outer.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { meanOf, FedAvg } from './fedavg.ts';
import type { Aggregator, GlobalAdapter, StrategyContext, StrategyDefinition, StrategyState } from './strategy.ts';

const beta = () => z.number().min(0).lt(1);

class FedOpt extends FedAvg {
  override readonly name: string;
  override readonly description: string;
  private readonly outer: OuterOptimizer;

  constructor(ctx: StrategyContext, kind: 'fedavgm' | 'fedadam' | 'fedyogi', opts: { lr: number; momentum?: number; beta1?: number; beta2?: number; tau?: number }) {
    super(ctx);
    this.name = kind;
    this.outer = new OuterOptimizer({ kind, ...opts });
    this.description = `${kind} (server lr ${opts.lr})`;
  }

  override aggregateFit(_round: number, global: GlobalAdapter, aggregator: Aggregator): GlobalAdapter {
    const mean = meanOf(aggregator, this.name);
    const delta: TensorMap = new Map();
    for (const [name, m] of mean) {
      const g = global.tensors.get(name)!;
      const d = new Float32Array(m.data.length);
      for (let i = 0; i < d.length; i++) d[i] = m.data[i]! - g.data[i]!;
      delta.set(name, { shape: [...m.shape], data: d });
    }
    return { tensors: this.outer.step(global.tensors, delta), rank: global.rank };
  }

  override state(): StrategyState {
    const s = this.outer.state();
    const tensors: TensorMap = new Map();
    for (const [k, t] of s.m) tensors.set(`m.${k}`, t);
    for (const [k, t] of s.v) tensors.set(`v.${k}`, t);
    return { json: { kind: s.kind, step: s.step }, tensors };
  }

  override load(state: StrategyState): void {
    const m: TensorMap = new Map();
    const v: TensorMap = new Map();
    for (const [k, t] of state.tensors) {
      if (k.startsWith('m.')) m.set(k.slice(2), t);
      else if (k.startsWith('v.')) v.set(k.slice(2), t);
      else throw new Error(`${this.name} state: unexpected tensor ${k} (expected m.* and v.*)`);
    }
    this.outer.load({ kind: state.json.kind as OuterKind, step: Number(state.json.step), m, v });
  }
}

export const fedavgm: StrategyDefinition = {
  name: 'fedavgm',
  summary: 'FedAvg with server momentum on mean - global',
  params: z.strictObject({ lr: z.number().positive().default(1), momentum: beta().default(0.9) }),
  create: (p: { lr: number; momentum: number }, ctx) => new FedOpt(ctx, 'fedavgm', p),
};

const adaptive = z.strictObject({
  lr: z.number().positive().default(1),
  beta1: beta().default(0.9),
  beta2: beta().default(0.99),
  tau: z.number().positive().default(1e-3),
});
type Adaptive = z.output<typeof adaptive>;

export const fedadam: StrategyDefinition = {
  name: 'fedadam',
  summary: 'Adam on the server, pseudo-gradient mean - global',
  params: adaptive,
  create: (p: Adaptive, ctx) => new FedOpt(ctx, 'fedadam', p),
};

export const fedyogi: StrategyDefinition = {
  name: 'fedyogi',
  summary: 'Yogi on the server, pseudo-gradient mean - global',
  params: adaptive,
  create: (p: Adaptive, ctx) => new FedOpt(ctx, 'fedyogi', p),
};
