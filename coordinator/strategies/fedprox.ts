/**
 * FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous
 * Networks"): each site minimises its loss plus mu/2 * ||w - w_global||^2,
 * which keeps local models near the global one when sites' data differ;
 * aggregation is FedAvg's. The proximal term and its gradient mu (w - w_global)
 * are computed by the worker's training loop.
 */
import { z } from 'zod';
import { FedAvg } from './fedavg.ts';
import type { Candidate, FitSpec, StrategyContext, StrategyDefinition } from './strategy.ts';

class FedProx extends FedAvg {
  override readonly name = 'fedprox';
  override readonly description: string;
  constructor(
    ctx: StrategyContext,
    private readonly mu: number,
  ) {
    super(ctx);
    this.description = `fedprox (mu ${mu})`;
  }
  protected override fitSpec(c: Candidate): FitSpec {
    return { ...super.fitSpec(c), proxMu: this.mu };
  }
}

export const fedprox: StrategyDefinition = {
  name: 'fedprox',
  summary: 'FedAvg with a proximal term mu/2 ||w - w_global||^2 in every site\'s loss',
  params: z.strictObject({ mu: z.number().positive() }),
  create: (p: { mu: number }, ctx) => new FedProx(ctx, p.mu),
};
