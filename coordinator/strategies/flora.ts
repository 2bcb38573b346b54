/**
 * LoRA aggregation with sites of different ranks (a small GPU trains r = 4, a
 * larger one r = 16), exact in the adapter's product.
 *
 * Averaging A and B separately is not the average of the sites' updates:
 * mean(B) mean(A) != mean(B A). Both strategies here aggregate the products:
 *
 *   flora     FLoRA stacking (Wang et al. 2024): concatenate the sites' A's
 *             (rows) and their weighted B's (columns); the stacked adapter of
 *             rank sum(r_k) has exactly the product sum_k w_k s B_k A_k. The
 *             global adapter is that stacked adapter (exact).
 *   flexlora  FlexLoRA (Bai et al. 2024): the same weighted sum of products,
 *             then a truncated SVD keeps the global adapter at `global_rank`
 *             (the best rank-`global_rank` approximation, Eckart-Young).
 *
 * A site of rank r_k starts each round from the best rank-r_k approximation
 * of the global product (truncated SVD through QR of the factors, never the
 * dense out x in matrix); when r_k is at least the global rank the start is
 * exact, and rows of A without energy get a fresh PEFT initialisation so they
 * can learn (their B columns are zero, so the product is unchanged). Every
 * rank keeps the run's scaling s = lora.alpha / lora.r (alpha = s * rank; with
 * rsLoRA s = alpha / sqrt(r) and alpha = s * sqrt(rank)).
 */
import { z } from 'zod';
import { peftKey } from '../../common/lora.ts';
import { createRng } from '../../common/random.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { stackLora, truncateLowRank, type LoraPart } from './math/lowrank.ts';
import {
  BaseStrategy,
  type Aggregator,
  type Candidate,
  type FitSpec,
  type FitUpdate,
  type GlobalAdapter,
  type StrategyContext,
  type StrategyDefinition,
  type StrategyState,
} from './strategy.ts';
import { loraScale } from '../../common/peft.ts';

/** Keeps each site's factors (stacking needs every one of them). */
class FactorBuffer implements Aggregator {
  readonly kind = 'buffering';
  readonly parts: Array<{ site: string; tensors: TensorMap; rank: number; weight: number }> = [];
  get count(): number {
    return this.parts.length;
  }
  add(u: FitUpdate): void {
    this.parts.push({ site: u.site, tensors: u.tensors, rank: u.spec.rank, weight: u.weight });
    // Stacked in site order, whatever the arrival order: the same round gives the same checkpoint.
    this.parts.sort((a, b) => (a.site < b.site ? -1 : a.site > b.site ? 1 : 0));
  }
}

const paramsSchema = z.strictObject({
  /** LoRA rank per site name; sites not listed train lora.r. */
  ranks: z.record(z.string().min(1), z.number().int().min(1)).default({}),
});
const flexSchema = paramsSchema.extend({
  /** Rank of the global adapter after the SVD step (default: the largest site rank or lora.r). */
  global_rank: z.number().int().min(1).nullable().default(null),
});

class MixedRank extends BaseStrategy {
  readonly description: string;
  private readonly scale: number;
  /** Rank each site was given (kept for the whole run, restored on resume). */
  private assigned = new Map<string, number>();

  constructor(
    ctx: StrategyContext,
    readonly name: 'flora' | 'flexlora',
    private readonly ranks: Record<string, number>,
    private readonly globalRank: number | null,
  ) {
    super(ctx);
    // One rank and one scale for every module of a site: per-module ranks or alphas would be silently flattened.
    const patterned = ctx.targets.find((t) => t.pattern?.rankKey !== undefined || t.pattern?.alphaKey !== undefined);
    if (patterned) {
      const key = patterned.pattern!.rankKey !== undefined ? `rank_pattern key "${patterned.pattern!.rankKey}"` : `alpha_pattern key "${patterned.pattern!.alphaKey}"`;
      throw new Error(
        `strategy ${name} gives each site one LoRA rank for every module, so it cannot keep lora.rank_pattern / lora.alpha_pattern ` +
          `(${key} sets ${patterned.module}); remove rank_pattern and alpha_pattern, or use another strategy`,
      );
    }
    // DoRA's weight m * (W + s B A) / ||W + s B A||_c is not a sum of per-site products, so
    // neither stacking (FLoRA) nor an SVD of the summed B A (FlexLoRA) keeps its meaning.
    if (ctx.lora.useDora || ctx.targets.some((t) => t.dora)) {
      throw new Error(
        `strategy ${name} combines the sites' B·A products, which a DoRA adapter (lora.use_dora) does not add up to: ` +
          'its magnitude rescales each product by a norm that depends on the whole adapter; use fedavg, fedprox, ffa or a robust strategy with use_dora, or train without use_dora',
      );
    }
    this.scale = loraScale(ctx.lora); // alpha / r, or alpha / sqrt(r) with rsLoRA: the same at every site's rank (common/lora-spec.ts)
    const listed = Object.entries(ranks).map(([s, r]) => `${s}=${r}`).join(', ');
    this.description = `${name} (ranks ${listed || `all ${ctx.lora.r}`}${globalRank ? `, global rank ${globalRank}` : ''})`;
  }

  protected override fitSpec(c: Candidate): FitSpec {
    let r = this.assigned.get(c.site);
    if (r === undefined) {
      r = this.ranks[c.site] ?? this.ctx.lora.r;
      this.assigned.set(c.site, r);
    }
    return { rank: r, proxMu: 0, freezeLoraA: false };
  }

  override startAdapter(global: GlobalAdapter, spec: FitSpec): TensorMap {
    if (spec.rank === global.rank) return global.tensors;
    const out: TensorMap = new Map();
    for (const t of this.ctx.targets) {
      const A = global.tensors.get(peftKey(t.module, 'A'))!.data as Float32Array;
      const B = global.tensors.get(peftKey(t.module, 'B'))!.data as Float32Array;
      const tr = truncateLowRank(A, B, global.rank, t.inFeatures, t.outFeatures, this.scale, spec.rank, this.scale);
      // Rows of A that carry no energy would never learn (their B columns are 0 too): initialise them as PEFT does.
      const rng = createRng(this.ctx.seed * 7919 + spec.rank * 31 + t.layer);
      const bound = 1 / Math.sqrt(t.inFeatures);
      for (let k = 0; k < spec.rank; k++) {
        let e = 0;
        for (let j = 0; j < t.inFeatures; j++) e += tr.A[k * t.inFeatures + j]! ** 2;
        let b = 0;
        for (let o = 0; o < t.outFeatures; o++) b += tr.B[o * spec.rank + k]! ** 2;
        if (e === 0 || b === 0) {
          for (let j = 0; j < t.inFeatures; j++) tr.A[k * t.inFeatures + j] = (2 * rng.next() - 1) * bound;
          for (let o = 0; o < t.outFeatures; o++) tr.B[o * spec.rank + k] = 0;
        }
      }
      out.set(peftKey(t.module, 'A'), { shape: [spec.rank, t.inFeatures], data: tr.A });
      out.set(peftKey(t.module, 'B'), { shape: [t.outFeatures, spec.rank], data: tr.B });
    }
    return out;
  }

  aggregator(): Aggregator {
    return new FactorBuffer();
  }

  aggregateFit(_round: number, _global: GlobalAdapter, aggregator: Aggregator): GlobalAdapter {
    if (!(aggregator instanceof FactorBuffer)) throw new Error(`${this.name}: expects the aggregator it created`);
    if (aggregator.count === 0) throw new Error(`${this.name}: no updates to aggregate`);
    const total = aggregator.parts.reduce((s, p) => s + p.weight, 0);
    const stackedRank = aggregator.parts.reduce((s, p) => s + p.rank, 0);
    const rank = this.name === 'flora' ? stackedRank : Math.min(stackedRank, this.globalRank ?? Math.max(this.ctx.lora.r, ...aggregator.parts.map((p) => p.rank)));
    const out: TensorMap = new Map();
    for (const t of this.ctx.targets) {
      const parts: LoraPart[] = aggregator.parts.map((p) => ({
        A: p.tensors.get(peftKey(t.module, 'A'))!.data as Float32Array,
        B: p.tensors.get(peftKey(t.module, 'B'))!.data as Float32Array,
        r: p.rank,
        weight: p.weight / total,
        scale: this.scale,
      }));
      let f = stackLora(parts, t.inFeatures, t.outFeatures, this.scale);
      if (rank !== f.r) f = truncateLowRank(f.A, f.B, f.r, t.inFeatures, t.outFeatures, this.scale, rank, this.scale);
      out.set(peftKey(t.module, 'A'), { shape: [rank, t.inFeatures], data: f.A });
      out.set(peftKey(t.module, 'B'), { shape: [t.outFeatures, rank], data: f.B });
    }
    return { tensors: out, rank };
  }

  override state(): StrategyState {
    return { json: { assigned: Object.fromEntries(this.assigned) }, tensors: new Map() };
  }

  override load(state: StrategyState): void {
    const a = state.json.assigned;
    if (typeof a !== 'object' || a === null) throw new Error(`${this.name} state: "assigned" (site -> rank) is missing`);
    this.assigned = new Map(Object.entries(a as Record<string, number>).map(([s, r]) => [s, Number(r)]));
  }
}

export const flora: StrategyDefinition = {
  name: 'flora',
  summary: 'FLoRA: sites of different ranks, stacked so the global product is exactly the weighted mean of theirs',
  params: paramsSchema,
  create: (p: z.output<typeof paramsSchema>, ctx: StrategyContext) => new MixedRank(ctx, 'flora', p.ranks, null),
};

export const flexlora: StrategyDefinition = {
  name: 'flexlora',
  summary: 'FlexLoRA: weighted mean of the sites\' products, truncated by SVD to global_rank',
  params: flexSchema,
  create: (p: z.output<typeof flexSchema>, ctx: StrategyContext) => new MixedRank(ctx, 'flexlora', p.ranks, p.global_rank),
};
