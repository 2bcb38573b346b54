/**
 * Fold a LoRA adapter into the base weights: W' = W + s * B A with
 * s = alpha / r (alpha / sqrt(r) for rsLoRA, `useRslora`), per module with
 * rank_pattern / alpha_pattern (LoraTarget.r and .scale).
 * gpt2 Conv1D weights are stored [in, out], so there W' = W + s * (B A)^T
 * (PEFT's fan_in_fan_out). DoRA (useDora): W' = m * V / ||V||_c with
 * V = W + s * B A and ||V||_c the norm of each output feature's weights (row
 * of [out, in], column of a Conv1D [in, out]), as PEFT's Linear.merge does.
 */
import type { TensorMap } from '../../common/tensor.ts';
import type { LoadedModel } from '../../common/model-config.ts';
import { loraTargets, peftKey, peftMagnitudeKey, validateAdapter } from '../../common/lora.ts';
import type { PeftLoraConfig } from '../../common/peft.ts';

/**
 * New base weights with the adapter merged in. The input model and adapter are
 * not modified: merged tensors are fresh arrays, the others are shared with
 * `model.weights` (treat them as read-only).
 */
export function mergeAdapter(model: LoadedModel, adapter: TensorMap, lora: PeftLoraConfig): TensorMap {
  const targets = loraTargets(model.config, lora);
  validateAdapter(adapter, targets);
  const out: TensorMap = new Map(model.weights);
  for (const t of targets) {
    // This module's rank and factor: lora.r and alpha / r (alpha / sqrt(r) with rsLoRA), or its rank_pattern / alpha_pattern entries.
    const r = t.r;
    const scale = t.scale;
    const base = model.weights.get(t.weight);
    if (!base) throw new Error(`mergeAdapter: base weight ${t.weight} not found in the model`);
    const A = adapter.get(peftKey(t.module, 'A'))!.data; // [r, in]
    const B = adapter.get(peftKey(t.module, 'B'))!.data; // [out, r]
    const nIn = t.inFeatures;
    const nOut = t.outFeatures;
    const W = new Float32Array(base.data);
    const row = new Float64Array(nIn);
    for (let o = 0; o < nOut; o++) {
      // row = scale * sum_k B[o, k] A[k, :], accumulated in float64.
      row.fill(0);
      for (let k = 0; k < r; k++) {
        const b = B[o * r + k]!;
        if (b === 0) continue;
        const aOff = k * nIn;
        for (let i = 0; i < nIn; i++) row[i] += b * A[aOff + i]!;
      }
      if (t.conv1d) {
        for (let i = 0; i < nIn; i++) W[i * nOut + o] = W[i * nOut + o]! + scale * row[i]!;
      } else {
        const wOff = o * nIn;
        for (let i = 0; i < nIn; i++) W[wOff + i] = W[wOff + i]! + scale * row[i]!;
      }
    }
    if (t.dora) {
      // W' = (m / ||V||_c) V per output feature, norms and factors in float64 over the merged float32 V.
      const m = adapter.get(peftMagnitudeKey(t.module))!.data; // [out]
      const sq = new Float64Array(nOut);
      for (let i = 0; i < nIn; i++) {
        for (let o = 0; o < nOut; o++) {
          const v = t.conv1d ? W[i * nOut + o]! : W[o * nIn + i]!;
          sq[o] += v * v;
        }
      }
      const f = Float64Array.from(sq, (q, o) => m[o]! / Math.sqrt(q));
      for (let i = 0; i < nIn; i++) {
        for (let o = 0; o < nOut; o++) {
          const k = t.conv1d ? i * nOut + o : o * nIn + i;
          W[k] = f[o]! * W[k]!;
        }
      }
    }
    out.set(t.weight, { shape: [...base.shape], data: W });
  }
  return out;
}
