/**
 * Gradient check shared by the engine's tests: for each parameter tensor, a
 * random unit direction v, the analytic g·v against the central difference
 * (L(p + h v) - L(p - h v)) / 2h of the engine's own forward pass.
 */
import { createRng } from '../../common/random.ts';
import type { TensorMap } from '../../common/tensor.ts';
import type { Batch } from '../../common/model-config.ts';
import type { Engine } from '../../worker/engine/engine.ts';

/**
 * `adjust(shifted, name)` may rewrite the shifted parameters before the loss is
 * taken (DoRA's check holds the detached norm at its value that way).
 */
export async function gradCheck(
  engine: Engine,
  params: TensorMap,
  batch: Batch,
  seed: number,
  adjust?: (shifted: TensorMap, name: string) => TensorMap,
): Promise<{ worst: number; checked: number }> {
  const { grads } = await engine.lossAndGrads(params, batch);
  const rng = createRng(seed);
  const h = 1e-4;
  let worst = 0;
  let checked = 0;
  for (const [name, p] of params) {
    const g = grads.get(name)!;
    const v = Float64Array.from({ length: p.data.length }, () => rng.normal());
    const norm = Math.hypot(...v);
    let analytic = 0;
    for (let i = 0; i < v.length; i++) {
      v[i]! /= norm;
      analytic += g.data[i]! * v[i]!;
    }
    const shifted = (sign: number): TensorMap => {
      const m: TensorMap = new Map(params);
      m.set(name, { shape: p.shape, data: Float64Array.from(p.data, (x, i) => x + sign * h * v[i]!) });
      return adjust ? adjust(m, name) : m;
    };
    const lp = (await engine.forward(shifted(1), batch)).lossSum;
    const lm = (await engine.forward(shifted(-1), batch)).lossSum;
    const numeric = (lp - lm) / (2 * h);
    const rel = Math.abs(analytic - numeric) / Math.max(Math.abs(analytic), Math.abs(numeric), 1e-3);
    if (rel > worst) worst = rel;
    checked++;
  }
  return { worst, checked };
}

