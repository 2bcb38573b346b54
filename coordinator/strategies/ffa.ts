/**
 * FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated
 * Learning"): every lora_A stays at the shared random initialisation and only
 * lora_B is trained and averaged. With A fixed and common, the mean of the
 * sites' B_k gives exactly the mean of their products B_k A, so FedAvg is exact
 * for the adapter's update (it is not for plain LoRA). The adapter stays a
 * normal PEFT adapter. An update whose A differs from the one sent is refused.
 * A DoRA adapter's magnitudes train with B and are averaged as tensors; there
 * the mean is no longer exact for the weight (m / ||W + s B A||_c is not
 * linear in B), as for any DoRA average.
 */
import { z } from 'zod';
import { FedAvg } from './fedavg.ts';
import type { Candidate, FitSpec, FitUpdate, StrategyDefinition } from './strategy.ts';

class FfaLora extends FedAvg {
  override readonly name = 'ffa';
  override readonly description = 'ffa (lora_A frozen, lora_B averaged)';
  protected override fitSpec(c: Candidate): FitSpec {
    return { ...super.fitSpec(c), freezeLoraA: true };
  }
  override checkUpdate(u: FitUpdate): string | null {
    for (const [name, t] of u.tensors) {
      if (!name.includes('.lora_A.')) continue;
      const s = u.start.get(name)!.data;
      const d = t.data;
      for (let i = 0; i < d.length; i++) {
        if (d[i] !== s[i]) return `tensor ${name} changed at element ${i} (${s[i]} -> ${d[i]}); with strategy ffa lora_A must stay frozen`;
      }
    }
    return null;
  }
}

export const ffa: StrategyDefinition = {
  name: 'ffa',
  summary: 'FFA-LoRA: lora_A frozen at its shared init, only lora_B trained and averaged',
  params: z.strictObject({}),
  create: (_p, ctx) => new FfaLora(ctx),
};
