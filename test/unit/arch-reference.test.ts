/**
 * Architecture features against an independent float64 PyTorch reference
 * (test/reference/*.py, run with the system python3 and its torch): tiny random
 * models in Hugging Face layout with the real checkpoints' config fields, the
 * engine's float32 logits against the reference's, max |diff| <= 1e-4. Each
 * case also reruns the reference with its feature switched off and requires a
 * clear difference, so that the feature is exercised, not merely tolerated.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Engine } from '../../worker/engine/engine.ts';
import { writeModelFiles } from '../../worker/engine/model.ts';
import { computeFingerprint, normalizeConfig } from '../../common/hf-model.ts';
import { archModel, archRaw, randomIds, gemma2As2B } from './arch-models.ts';
import { maxAbsDiffToReference, referenceAvailable, referenceLogits } from '../helpers/reference.ts';

const haveTorch = referenceAvailable('arch-reference');

const root = mkdtempSync(join(tmpdir(), 'fedtune-arch-ref-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const reference = (script: string, dir: string, ids: number[][], override?: Record<string, unknown>) => referenceLogits(script, dir, ids, override ? { config_override: override } : {});
const maxAbsDiff = maxAbsDiffToReference;

interface Case {
  name: string;
  raw: Record<string, unknown>;
  seqLen: number;
  /** Config fields that switch the feature off in the reference. */
  off: Record<string, unknown>;
}

const CASES: Case[] = [
  {
    name: 'llama 3.2 rope_scaling (llama3, factor 32, 8192) with attention_bias, mlp_bias, head_dim != hidden/heads',
    raw: archRaw('llama', {
      rope_theta: 500000,
      max_position_embeddings: 131072,
      rope_scaling: { factor: 32.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
      attention_bias: true,
      mlp_bias: true,
      head_dim: 16,
    }),
    seqLen: 20,
    off: { rope_scaling: null },
  },
  {
    name: 'llama3 rope_scaling with a short original context (every frequency band exercised at short positions)',
    raw: archRaw('llama', {
      rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 32 },
    }),
    seqLen: 24,
    off: { rope_scaling: null },
  },
  { name: 'linear rope_scaling', raw: archRaw('llama', { rope_scaling: { type: 'linear', factor: 4 } }), seqLen: 16, off: { rope_scaling: null } },
  {
    name: 'dynamic rope_scaling past max_position_embeddings',
    raw: archRaw('llama', { max_position_embeddings: 12, rope_scaling: { rope_type: 'dynamic', factor: 2 } }),
    seqLen: 20,
    off: { rope_scaling: null },
  },
  {
    name: 'yarn rope_scaling (qwen2, factor 4, original 8, default betas and attention factor)',
    raw: archRaw('qwen2', { max_position_embeddings: 32, rope_scaling: { rope_type: 'yarn', factor: 4, original_max_position_embeddings: 8 } }),
    seqLen: 20,
    off: { rope_scaling: null },
  },
  {
    name: 'mistral sliding_window 5 over 16 tokens',
    raw: archRaw('mistral', { sliding_window: 5 }),
    seqLen: 16,
    off: { sliding_window: null },
  },
  {
    name: 'qwen2 use_sliding_window, max_window_layers 1 (layer 1 windowed, layer 0 full)',
    raw: archRaw('qwen2', { use_sliding_window: true, sliding_window: 4, max_window_layers: 1 }),
    seqLen: 14,
    off: { use_sliding_window: false },
  },
  {
    name: 'qwen3 (q/k per-head RMSNorm, head_dim 16, no biases) with use_sliding_window on layer 1',
    raw: archRaw('qwen3', { head_dim: 16, attention_bias: false, use_sliding_window: true, sliding_window: 4, max_window_layers: 1, rope_theta: 1000000 }),
    seqLen: 12,
    off: { use_sliding_window: false },
  },
  {
    name: 'qwen3 q_norm / k_norm matter (attention_bias true: q/k/v/o biases)',
    raw: archRaw('qwen3', { head_dim: 16, attention_bias: true }),
    seqLen: 10,
    off: { model_type: 'qwen2' }, // the reference then skips q_norm / k_norm
  },
  {
    name: 'gemma2 (as Gemma 2 2B ships: softcaps 50 / 30, query_pre_attn_scalar, sliding window on even layers)',
    raw: gemma2As2B(),
    seqLen: 12,
    off: { sliding_window: null },
  },
  {
    name: 'gemma2 soft-capping tight enough to bind',
    raw: archRaw('gemma2', { head_dim: 16, query_pre_attn_scalar: 16, attn_logit_softcapping: 1.5, final_logit_softcapping: 2.0, sliding_window: 4096, tie_word_embeddings: true }),
    seqLen: 10,
    off: { attn_logit_softcapping: null, final_logit_softcapping: null },
  },
  {
    name: 'phi3 (fused qkv_proj / gate_up_proj, sliding_window) as Phi-3-mini-4k',
    raw: archRaw('phi3', { original_max_position_embeddings: 64, sliding_window: 5, rope_scaling: null }),
    seqLen: 12,
    off: { sliding_window: null },
  },
  {
    name: 'phi3 longrope past the original context (long factors, attention factor)',
    raw: archRaw('phi3', {
      max_position_embeddings: 64,
      original_max_position_embeddings: 8,
      rope_scaling: { type: 'longrope', short_factor: [1, 1.1, 1.3, 1.7], long_factor: [1, 2, 5, 9] },
    }),
    seqLen: 12,
    off: { rope_scaling: null },
  },
  {
    name: 'phi3 longrope within the original context (short factors)',
    raw: archRaw('phi3', {
      max_position_embeddings: 64,
      original_max_position_embeddings: 16,
      rope_scaling: { type: 'longrope', short_factor: [1, 1.5, 3, 6], long_factor: [1, 2, 5, 9] },
    }),
    seqLen: 12,
    off: { rope_scaling: null },
  },
  {
    name: 'gpt2 scale_attn_weights false, scale_attn_by_inverse_layer_idx true, reorder_and_upcast_attn true',
    raw: archRaw('gpt2', { scale_attn_weights: false, scale_attn_by_inverse_layer_idx: true, reorder_and_upcast_attn: true }),
    seqLen: 12,
    off: { scale_attn_weights: true, scale_attn_by_inverse_layer_idx: false },
  },
];

describe.skipIf(!haveTorch)('architectures against the float64 PyTorch reference', () => {
  CASES.forEach((c, i) => {
    it(c.name, async () => {
      const dir = join(root, `case${i}`);
      const config = normalizeConfig(c.raw, c.name);
      const weights = archModel(config, 100 + i);
      const { mkdir } = await import('node:fs/promises');
      await mkdir(dir);
      await writeModelFiles(dir, c.raw, weights);
      const model = { dir, config, weights, fingerprint: computeFingerprint(config, weights) };
      const engine = Engine.create(model, { mode: 'full', dtype: 'float32', threads: 1 });
      const ids = randomIds(config.vocabSize, 2, c.seqLen, 200 + i);
      const batch = { batchSize: 2, seqLen: c.seqLen, inputIds: Int32Array.from(ids.flat()), labels: Int32Array.from(ids.flat()) };
      const { logits } = await engine.forward(engine.initParams(0), batch);
      await engine.close();
      const script = config.family === 'gpt2' ? 'gpt2_ref.py' : config.gemma2 ? 'gemma2_ref.py' : 'llama_ref.py';
      const diff = maxAbsDiff(logits, reference(script, dir, ids));
      console.log(`${c.name}: max |engine - reference| = ${diff.toExponential(2)}`);
      expect(diff).toBeLessThanOrEqual(1e-4);
      const offDiff = maxAbsDiff(logits, reference(script, dir, ids, c.off));
      console.log(`${c.name}: feature off in the reference: max diff ${offDiff.toExponential(5)}`);
      expect(offDiff).toBeGreaterThan(1e-2);
    });
  });
});
