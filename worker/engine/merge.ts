/**
 * Fold a LoRA adapter into the base weights: W' = W + s * B A with
 * s = alpha / r (alpha / sqrt(r) for rsLoRA, `useRslora`).
 * gpt2 Conv1D weights are stored [in, out], so there W' = W + s * (B A)^T
 * (PEFT's fan_in_fan_out).
 */
import type { TensorMap } from '../../common/tensor.ts';
import type { LoadedModel } from '../../common/model-config.ts';
import { loraTargets, peftKey, validateAdapter } from '../../common/lora.ts';
import { loraScale, type PeftLoraConfig } from '../../common/peft.ts';

/**
 * New base weights with the adapter merged in. The input model and adapter are
 * not modified: merged tensors are fresh arrays, the others are shared with
 * `model.weights` (treat them as read-only).
 */
export function mergeAdapter(model: LoadedModel, adapter: TensorMap, lora: PeftLoraConfig): TensorMap {
  const targets = loraTargets(model.config, lora);
  validateAdapter(adapter, targets, lora.r);
  const r = lora.r;
  const scale = loraScale(lora);
  const out: TensorMap = new Map(model.weights);
  for (const t of targets) {
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
    out.set(t.weight, { shape: [...base.shape], data: W });
  }
  return out;
}
