import { describe, expect, it, beforeAll, afterAll } from 'vitest';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { initModel } from '../../worker/engine/init.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { initLoraAdapter, loraTargets, peftKey } from '../../common/lora.ts';
import { mergeAdapter } from '../../worker/engine/merge.ts';
import { writePeftAdapter } from '../../common/peft.ts';
import { createRng } from '../../common/random.ts';
import type { TensorMap } from '../../common/tensor.ts';
import type { LoadedModel, LoraConfig } from '../../common/model-config.ts';

const run = promisify(execFile);
let root: string;
let llama: LoadedModel;
let gpt2: LoadedModel;

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'fedtune-merge-'));
  await initModel(join(root, 'llama'), { arch: 'llama', hiddenSize: 16, numLayers: 2, numHeads: 2, numKvHeads: 1, intermediateSize: 24 });
  await initModel(join(root, 'gpt2'), { arch: 'gpt2', hiddenSize: 16, numLayers: 1, numHeads: 2 });
  llama = await loadModel(join(root, 'llama'));
  gpt2 = await loadModel(join(root, 'gpt2'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/** An adapter as after training: A from init, B random (non-zero). */
function trainedAdapter(model: LoadedModel, lora: LoraConfig, seed: number): TensorMap {
  const a = initLoraAdapter(loraTargets(model.config, lora), lora.r, seed);
  const rng = createRng(seed + 100);
  for (const [k, t] of a) if (k.endsWith('lora_B.weight')) for (let i = 0; i < t.data.length; i++) t.data[i] = rng.normal() * 0.1;
  return a;
}

function snapshot(m: TensorMap): Map<string, number[]> {
  return new Map([...m].map(([k, t]) => [k, Array.from(t.data)]));
}

describe('mergeAdapter', () => {
  it('llama: W + (alpha/r) * B A for every targeted nn.Linear, other weights unchanged, input untouched', () => {
    const lora: LoraConfig = { r: 4, alpha: 6, dropout: 0, targetModules: ['q_proj', 'k_proj', 'down_proj'] };
    const adapter = trainedAdapter(llama, lora, 1);
    const beforeW = snapshot(llama.weights);
    const beforeA = snapshot(adapter);
    const merged = mergeAdapter(llama, adapter, lora);
    const s = lora.alpha / lora.r;
    const targets = loraTargets(llama.config, lora);
    expect(targets).toHaveLength(6);
    for (const t of targets) {
      const W = llama.weights.get(t.weight)!; // [out, in]
      const A = adapter.get(peftKey(t.module, 'A'))!.data;
      const B = adapter.get(peftKey(t.module, 'B'))!.data;
      const M = merged.get(t.weight)!;
      expect(M.shape).toEqual(W.shape);
      for (let o = 0; o < t.outFeatures; o++) {
        for (let i = 0; i < t.inFeatures; i++) {
          let ba = 0;
          for (let k = 0; k < lora.r; k++) ba += B[o * lora.r + k]! * A[k * t.inFeatures + i]!;
          expect(M.data[o * t.inFeatures + i]).toBeCloseTo(W.data[o * t.inFeatures + i]! + s * ba, 6);
        }
      }
      expect(M.data).not.toEqual(W.data);
    }
    const targeted = new Set(targets.map((t) => t.weight));
    for (const [k, t] of merged) if (!targeted.has(k)) expect(Array.from(t.data)).toEqual(beforeW.get(k));
    expect([...merged.keys()]).toEqual([...llama.weights.keys()]);
    expect(snapshot(llama.weights)).toEqual(beforeW);
    expect(snapshot(adapter)).toEqual(beforeA);
  });

  it('gpt2 Conv1D: merged layer computes the same as base layer plus LoRA branch', () => {
    const lora: LoraConfig = { r: 2, alpha: 8, dropout: 0, targetModules: ['c_attn', 'c_proj', 'c_fc'] };
    const adapter = trainedAdapter(gpt2, lora, 5);
    const merged = mergeAdapter(gpt2, adapter, lora);
    const s = lora.alpha / lora.r;
    const rng = createRng(9);
    for (const t of loraTargets(gpt2.config, lora)) {
      const W = gpt2.weights.get(t.weight)!; // Conv1D: [in, out], y = x W
      expect(W.shape).toEqual([t.inFeatures, t.outFeatures]);
      const A = adapter.get(peftKey(t.module, 'A'))!.data; // [r, in]
      const B = adapter.get(peftKey(t.module, 'B'))!.data; // [out, r]
      const x = Array.from({ length: t.inFeatures }, () => rng.normal());
      // PEFT forward: x W + s * (x A^T) B^T
      const xa = Array.from({ length: lora.r }, (_, k) => x.reduce((acc, xi, i) => acc + xi * A[k * t.inFeatures + i]!, 0));
      for (let o = 0; o < t.outFeatures; o++) {
        let base = 0;
        let mergedY = 0;
        for (let i = 0; i < t.inFeatures; i++) {
          base += x[i]! * W.data[i * t.outFeatures + o]!;
          mergedY += x[i]! * merged.get(t.weight)!.data[i * t.outFeatures + o]!;
        }
        let lora_ = 0;
        for (let k = 0; k < lora.r; k++) lora_ += xa[k]! * B[o * lora.r + k]!;
        expect(mergedY).toBeCloseTo(base + s * lora_, 4);
      }
    }
  });

  it('a fresh adapter (B = 0) leaves the weights unchanged; a mismatched adapter is rejected', () => {
    const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['v_proj'] };
    const fresh = initLoraAdapter(loraTargets(llama.config, lora), 2, 0);
    const merged = mergeAdapter(llama, fresh, lora);
    for (const [k, t] of merged) expect(Array.from(t.data)).toEqual(Array.from(llama.weights.get(k)!.data));
    expect(() => mergeAdapter(llama, fresh, { ...lora, r: 3 })).toThrow(/expected shape \[3, 16\], got \[2, 16\]/);
    expect(() => mergeAdapter(llama, fresh, { ...lora, targetModules: ['c_attn'] })).toThrow(/unknown module "c_attn"/);
  });
});

describe('fedtune adapter CLI', () => {
  it('merge writes a model whose weights equal mergeAdapter; inspect lists modules', async () => {
    const lora: LoraConfig = { r: 2, alpha: 4, dropout: 0, targetModules: ['c_attn', 'c_fc'] };
    const adapter = trainedAdapter(gpt2, lora, 3);
    const adir = join(root, 'adapter');
    await writePeftAdapter(adir, adapter, { lora, baseModel: gpt2.dir, fanInFanOut: true });
    const bin = resolve('bin/fedtune.js');
    const out = join(root, 'merged');
    const env = { ...process.env, FEDTUNE_LOG_LEVEL: 'silent' };
    const res = await run(process.execPath, [bin, 'adapter', 'merge', '--model', gpt2.dir, '--adapter', adir, '--out', out], { env });
    expect(res.stdout).toMatch(/fingerprint [0-9a-f]{64}/);
    const m = await loadModel(out);
    const expected = mergeAdapter(gpt2, adapter, lora);
    for (const [k, t] of expected) expect(Array.from(m.weights.get(k)!.data)).toEqual(Array.from(t.data));
    expect(m.fingerprint).not.toBe(gpt2.fingerprint);
    expect(m.config).toEqual(gpt2.config);

    const info = JSON.parse((await run(process.execPath, [bin, 'adapter', 'inspect', adir, '--json'], { env })).stdout);
    expect(Object.keys(info.modules)).toEqual(['transformer.h.0.attn.c_attn', 'transformer.h.0.mlp.c_fc']);
    expect(info.parameters).toBe(2 * 16 + 48 * 2 + 2 * 16 + 64 * 2);
    expect(info.modules['transformer.h.0.attn.c_attn'].A.shape).toEqual([2, 16]);
    expect(info.config.fanInFanOut).toBe(true);

    const again = run(process.execPath, [bin, 'adapter', 'merge', '--model', gpt2.dir, '--adapter', adir, '--out', out], { env });
    await expect(again).rejects.toMatchObject({ stderr: expect.stringMatching(/already exists and is not empty; pass --force/) });
  });
});
