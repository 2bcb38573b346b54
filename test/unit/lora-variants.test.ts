/**
 * rsLoRA (use_rslora: scale alpha / sqrt(r)) and LoRA+ (lora_B at K x lr).
 */
import { describe, expect, it, beforeAll, afterAll } from 'vitest';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initModel } from '../../worker/engine/init.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { Engine } from '../../worker/engine/engine.ts';
import { mergeAdapter } from '../../worker/engine/merge.ts';
import { initLoraAdapter, loraTargets } from '../../common/lora.ts';
import { ADAPTER_CONFIG, ADAPTER_WEIGHTS, loraScale, readPeftAdapter, writePeftAdapter, type PeftLoraConfig } from '../../common/peft.ts';
import { writeSafetensors, type StWriteEntry } from '../../common/safetensors.ts';
import { AdamW, loraPlusGroups } from '../../common/optim.ts';
import { createRng } from '../../common/random.ts';
import type { Batch, LoadedModel } from '../../common/model-config.ts';
import type { TensorMap } from '../../common/tensor.ts';

let root: string;
let llama: LoadedModel;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'fedtune-lora-variants-'));
  await initModel(join(root, 'llama'), { arch: 'llama', hiddenSize: 16, numLayers: 2, numHeads: 2, numKvHeads: 1, intermediateSize: 24 });
  llama = await loadModel(join(root, 'llama'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

function trainedAdapter(lora: PeftLoraConfig, seed: number): TensorMap {
  const a = initLoraAdapter(loraTargets(llama.config, lora), lora.r, seed);
  const rng = createRng(seed + 100);
  for (const [k, t] of a) if (k.endsWith('lora_B.weight')) for (let i = 0; i < t.data.length; i++) t.data[i] = rng.normal() * 0.2;
  return a;
}

function probe(vocab: number): Batch {
  const seqLen = 6;
  const inputIds = new Int32Array(2 * seqLen).map((_, i) => (i * 7 + 3) % vocab);
  return { batchSize: 2, seqLen, inputIds, labels: inputIds.slice() };
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

describe('rsLoRA', () => {
  const r = 3;
  const alpha = 5;
  const rs: PeftLoraConfig = { r, alpha, dropout: 0, targetModules: ['q_proj', 'v_proj', 'down_proj'], useRslora: true };
  // Independent identity: alpha / sqrt(r) = (alpha * sqrt(r)) / r.
  const equivalent: PeftLoraConfig = { ...rs, alpha: alpha * Math.sqrt(r), useRslora: false };

  it('scale is alpha / sqrt(r)', () => {
    expect(loraScale(rs)).toBeCloseTo(5 / Math.sqrt(3), 12);
    expect(loraScale({ ...rs, useRslora: false })).toBeCloseTo(5 / 3, 12);
  });

  it('engine logits with use_rslora equal plain LoRA with alpha * sqrt(r), and differ from plain alpha', async () => {
    const adapter = trainedAdapter(rs, 1);
    const batch = probe(llama.config.vocabSize);
    const withRs = await Engine.create(llama, { mode: 'lora', lora: rs, threads: 1 }).forward(adapter, batch);
    const withAlpha = await Engine.create(llama, { mode: 'lora', lora: equivalent, threads: 1 }).forward(adapter, batch);
    const plainLora: PeftLoraConfig = { ...rs, useRslora: false };
    const plain = await Engine.create(llama, { mode: 'lora', lora: plainLora, threads: 1 }).forward(adapter, batch);
    expect(maxAbsDiff(withRs.logits, withAlpha.logits)).toBeLessThan(1e-5);
    expect(maxAbsDiff(withRs.logits, plain.logits)).toBeGreaterThan(1e-3);
  });

  it('merge with use_rslora equals merge with alpha * sqrt(r)', () => {
    const adapter = trainedAdapter(rs, 2);
    const a = mergeAdapter(llama, adapter, rs);
    const b = mergeAdapter(llama, adapter, equivalent);
    const c = mergeAdapter(llama, adapter, { ...rs, useRslora: false });
    const w = 'model.layers.1.mlp.down_proj.weight';
    expect(maxAbsDiff(a.get(w)!.data, b.get(w)!.data)).toBeLessThan(1e-6);
    expect(maxAbsDiff(a.get(w)!.data, c.get(w)!.data)).toBeGreaterThan(1e-4);
  });

  it('a PEFT-written rsLoRA adapter round-trips through read and write', async () => {
    const dir = join(root, 'peft-rslora');
    const adapter = trainedAdapter({ ...rs, targetModules: ['q_proj'] }, 3);
    const st = new Map<string, StWriteEntry>();
    for (const [k, t] of adapter) st.set(k, { dtype: 'F32', shape: t.shape, data: t.data });
    await rm(dir, { recursive: true, force: true });
    await writePeftAdapter(dir, adapter, { lora: { ...rs, targetModules: ['q_proj'] }, baseModel: 'x' }); // creates the directory
    await writeSafetensors(join(dir, ADAPTER_WEIGHTS), st);
    // adapter_config.json as PEFT 0.10 save_pretrained writes it for LoraConfig(r=3, lora_alpha=5, use_rslora=True).
    const peftJson = {
      alpha_pattern: {}, auto_mapping: null, base_model_name_or_path: 'tiny-llama', bias: 'none', fan_in_fan_out: false,
      inference_mode: true, init_lora_weights: true, layer_replication: null, layers_pattern: null, layers_to_transform: null,
      loftq_config: {}, lora_alpha: 5, lora_dropout: 0.0, megatron_config: null, megatron_core: 'megatron.core',
      modules_to_save: null, peft_type: 'LORA', r: 3, rank_pattern: {}, revision: null, target_modules: ['q_proj'],
      task_type: 'CAUSAL_LM', use_dora: false, use_rslora: true,
    };
    await writeFile(join(dir, ADAPTER_CONFIG), JSON.stringify(peftJson, null, 2));
    const read = await readPeftAdapter(dir);
    expect(read.config).toEqual({ r: 3, alpha: 5, dropout: 0, targetModules: ['q_proj'], useRslora: true, baseModel: 'tiny-llama', fanInFanOut: false });
    const again = join(root, 'peft-rslora-again');
    await writePeftAdapter(again, read.adapter, { lora: read.config, baseModel: read.config.baseModel });
    const written = JSON.parse(await readFile(join(again, ADAPTER_CONFIG), 'utf8'));
    expect(written).toMatchObject({ use_rslora: true, r: 3, lora_alpha: 5, target_modules: ['q_proj'] });
    const back = await readPeftAdapter(again);
    expect(back.config).toEqual(read.config);
    for (const [k, t] of adapter) expect(Array.from(back.adapter.get(k)!.data)).toEqual(Array.from(t.data));
  });
});

describe('LoRA+ (AdamW parameter groups)', () => {
  const A = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight';
  const B = 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight';
  const start = (): TensorMap =>
    new Map([
      [A, { shape: [2, 2], data: Float64Array.from([0.5, -1, 2, 0.25]) }],
      [B, { shape: [2, 2], data: Float64Array.from([1, 0, -0.5, 3]) }],
    ]);
  const grads: TensorMap = new Map([
    [A, { shape: [2, 2], data: Float64Array.from([0.1, -0.2, 3, -4e-3]) }],
    [B, { shape: [2, 2], data: Float64Array.from([-0.7, 2e-4, 5, -1]) }],
  ]);
  const lr = 0.01;
  const eps = 1e-8;

  /** First AdamW step by hand: m_hat = g, v_hat = g^2, so p' = p (1 - lr wd) - lr g / (|g| + eps). */
  function byHand(p: number, g: number, rate: number, wd: number): number {
    return p * (1 - rate * wd) - (rate * g) / (Math.abs(g) + eps);
  }

  for (const wd of [0, 0.1]) {
    it(`one step with ratio K moves lora_B K times as far as ratio 1, lora_A the same (weight decay ${wd})`, () => {
      const K = 16;
      const runs = [1, K].map((ratio) => {
        const p = start();
        new AdamW({ lr, eps, weightDecay: wd, groups: loraPlusGroups(ratio) }).step(p, grads);
        return p;
      });
      const p0 = start();
      for (const name of [A, B]) {
        const rate = name === B ? lr * K : lr;
        for (let i = 0; i < 4; i++) {
          const before = p0.get(name)!.data[i]!;
          const g = grads.get(name)!.data[i]!;
          const moved1 = runs[0]!.get(name)!.data[i]! - before;
          const movedK = runs[1]!.get(name)!.data[i]! - before;
          expect(runs[1]!.get(name)!.data[i]!).toBeCloseTo(byHand(before, g, rate, wd), 12);
          expect(runs[0]!.get(name)!.data[i]!).toBeCloseTo(byHand(before, g, lr, wd), 12);
          if (name === B) expect(movedK).toBeCloseTo(K * moved1, 12);
          else expect(movedK).toBe(moved1);
        }
      }
    });
  }

  it('refuses a ratio that is not a positive number', () => {
    expect(() => loraPlusGroups(0)).toThrow(/LoRA\+ ratio is 0, expected a finite number > 0/);
    expect(loraPlusGroups(1)).toEqual([]);
    expect(loraPlusGroups(4)[0]!.match('base_model.model.x.lora_B.default.weight')).toBe(true);
    // As PEFT groups them: DoRA's 1-D magnitudes learn at the lora_B rate.
    expect(loraPlusGroups(4)[0]!.match('base_model.model.x.lora_magnitude_vector')).toBe(true);
    expect(loraPlusGroups(4)[0]!.match('base_model.model.x.lora_magnitude_vector.default.weight')).toBe(true);
    expect(loraPlusGroups(4)[0]!.match('base_model.model.x.lora_A.weight')).toBe(false);
  });
});
