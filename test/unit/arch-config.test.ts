/**
 * config.json fields of the architecture features: what normalizeConfig reads,
 * what it refuses (by field name), that hfConfig writes back what it reads, and
 * that plain models keep the normalized config (and so the fingerprint) they had.
 */
import { describe, expect, it } from 'vitest';
import { expectedWeightShapes, hfConfig, normalizeConfig } from '../../common/hf-model.ts';
import { ropeInvFreq } from '../../worker/engine/model-graph.ts';
import { archRaw } from './arch-models.ts';
import { loraTargets, validTargetModules } from '../../common/lora.ts';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initModel } from '../../worker/engine/init.ts';
import { loadModel } from '../../worker/engine/model.ts';

const NEW_FIELDS = ['ropeScaling', 'attentionOutBias', 'mlpBias', 'slidingWindow', 'scaleAttnWeights', 'scaleAttnByInverseLayerIdx'];

describe('architecture config fields', () => {
  it('plain configs carry none of the optional fields (fingerprints unchanged)', () => {
    for (const mt of ['llama', 'mistral', 'qwen2', 'gpt2'] as const) {
      const c = normalizeConfig(archRaw(mt, mt === 'mistral' ? { sliding_window: 4096 } : {}));
      for (const k of NEW_FIELDS) expect(Object.keys(c)).not.toContain(k);
    }
    // A window as long as the context can never exclude a key.
    expect(normalizeConfig(archRaw('mistral', { sliding_window: 64 })).slidingWindow).toBeUndefined();
  });

  it('reads rope_scaling types and writes them back', () => {
    const raws = [
      { rope_type: 'llama3', factor: 32, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
      { type: 'linear', factor: 2 },
      { rope_type: 'dynamic', factor: 2 },
      { rope_type: 'yarn', factor: 4, original_max_position_embeddings: 16, beta_fast: 16, mscale: 2, mscale_all_dim: 1 },
    ];
    for (const rs of raws) {
      const c = normalizeConfig(archRaw('llama', { rope_scaling: rs }));
      expect(c.ropeScaling?.type).toBe(rs.rope_type ?? rs.type);
      expect(normalizeConfig(hfConfig(c))).toEqual(c);
    }
    const yarn = normalizeConfig(archRaw('llama', { rope_scaling: raws[3] })).ropeScaling;
    // mscale / mscale_all_dim: (0.1·2·ln 4 + 1) / (0.1·1·ln 4 + 1)
    expect(yarn).toMatchObject({ betaFast: 16, betaSlow: 1, truncate: true });
    expect(yarn?.type === 'yarn' && yarn.attentionFactor).toBeCloseTo((0.2 * Math.log(4) + 1) / (0.1 * Math.log(4) + 1), 12);
    expect(normalizeConfig(archRaw('llama', { rope_scaling: { rope_type: 'default' } })).ropeScaling).toBeUndefined();
  });

  it('llama3 inverse frequencies: unchanged above, divided by factor below, blended between (hand-computed)', () => {
    const c = normalizeConfig(
      archRaw('llama', {
        rope_theta: 500000,
        head_dim: 16,
        rope_scaling: { rope_type: 'llama3', factor: 32, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
      }),
    );
    const { invFreq, attentionFactor } = ropeInvFreq(c, 10);
    expect(attentionFactor).toBe(1);
    const plain = (i: number) => Math.pow(500000, -i / 8);
    // wavelength 2π/f: i <= 3 below 8192/4 = 2048 (kept); i = 4: 4443 (blended); i >= 5 above 8192 (divided by 32).
    for (const i of [0, 1, 2, 3]) expect(invFreq[i]! / plain(i)).toBeCloseTo(1, 6);
    const s = (8192 / ((2 * Math.PI) / plain(4)) - 1) / 3;
    expect(invFreq[4]! / plain(4)).toBeCloseTo((1 - s) / 32 + s, 6);
    for (const i of [5, 6, 7]) expect(invFreq[i]! / plain(i)).toBeCloseTo(1 / 32, 6);
  });

  it('llama attention_bias and mlp_bias add the bias weights; head_dim sets the projection sizes', () => {
    const c = normalizeConfig(archRaw('llama', { attention_bias: true, mlp_bias: true, head_dim: 16 }));
    const shapes = expectedWeightShapes(c);
    expect(shapes.get('model.layers.0.self_attn.q_proj.weight')).toEqual([64, 32]);
    expect(shapes.get('model.layers.0.self_attn.k_proj.bias')).toEqual([32]);
    expect(shapes.get('model.layers.0.self_attn.o_proj.bias')).toEqual([32]);
    expect(shapes.get('model.layers.0.mlp.gate_proj.bias')).toEqual([24]);
    expect(shapes.get('model.layers.1.mlp.down_proj.bias')).toEqual([32]);
    expect(normalizeConfig(hfConfig(c))).toEqual(c);
  });

  it('sliding-window layers follow transformers: mistral all, qwen2 from max_window_layers or layer_types', () => {
    expect(normalizeConfig(archRaw('mistral', { sliding_window: 8 })).slidingWindow).toEqual({ size: 8, layers: [0, 1] });
    expect(normalizeConfig(archRaw('qwen2', { sliding_window: 8 })).slidingWindow).toBeUndefined(); // use_sliding_window false
    expect(normalizeConfig(archRaw('qwen2', { use_sliding_window: true, sliding_window: 8, max_window_layers: 1 })).slidingWindow).toEqual({ size: 8, layers: [1] });
    // Default max_window_layers is 28: no layer of a 2-layer model.
    expect(normalizeConfig(archRaw('qwen2', { use_sliding_window: true, sliding_window: 8 })).slidingWindow).toBeUndefined();
    const lt = normalizeConfig(archRaw('qwen2', { use_sliding_window: true, sliding_window: 8, layer_types: ['sliding_attention', 'full_attention'] }));
    expect(lt.slidingWindow).toEqual({ size: 8, layers: [0] });
    expect(normalizeConfig(hfConfig(lt))).toEqual(lt);
    const m = normalizeConfig(archRaw('mistral', { sliding_window: 8 }));
    expect(normalizeConfig(hfConfig(m))).toEqual(m);
  });

  it('qwen3: q_norm / k_norm weights [head_dim], attention_bias, sliding window as qwen2; init writes a loadable model', async () => {
    const c = normalizeConfig(archRaw('qwen3', { head_dim: 16, attention_bias: false, use_sliding_window: true, sliding_window: 8, max_window_layers: 1 }));
    expect(c).toMatchObject({ family: 'llama', modelType: 'qwen3', qkNorm: true, qkvBias: false, headDim: 16, slidingWindow: { size: 8, layers: [1] } });
    expect(c.attentionOutBias).toBeUndefined();
    const shapes = expectedWeightShapes(c);
    expect(shapes.get('model.layers.1.self_attn.q_norm.weight')).toEqual([16]);
    expect(shapes.get('model.layers.1.self_attn.k_norm.weight')).toEqual([16]);
    expect(shapes.has('model.layers.0.self_attn.q_proj.bias')).toBe(false);
    expect(normalizeConfig(hfConfig(c))).toEqual(c);
    const b = normalizeConfig(archRaw('qwen3', { attention_bias: true }));
    expect(b).toMatchObject({ qkvBias: true, attentionOutBias: true });
    expect(hfConfig(b)).toMatchObject({ architectures: ['Qwen3ForCausalLM'], attention_bias: true });
    expect(() => normalizeConfig(archRaw('qwen3', { mlp_bias: true }))).toThrow(/field "mlp_bias" is true; MLP biases exist only for model_type llama, not qwen3/);
    const dir = mkdtempSync(join(tmpdir(), 'fedtune-qwen3-'));
    try {
      await initModel(join(dir, 'm'), { arch: 'qwen3', hiddenSize: 16, numLayers: 1, numHeads: 2, numKvHeads: 1, intermediateSize: 24 });
      const m = await loadModel(join(dir, 'm'));
      expect(m.config).toMatchObject({ modelType: 'qwen3', qkNorm: true, qkvBias: false });
      expect(m.weights.get('model.layers.0.self_attn.k_norm.weight')!.data[0]).toBe(1);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('gemma2: defaults as transformers (window 4096 on even layers, query_pre_attn_scalar 256, tied), extra norms, round trip', () => {
    const c = normalizeConfig(archRaw('gemma2', { num_hidden_layers: 3, max_position_embeddings: 8192, head_dim: 16, tie_word_embeddings: undefined }));
    expect(c).toMatchObject({
      modelType: 'gemma2',
      activation: 'gelu_new',
      tieWordEmbeddings: true,
      slidingWindow: { size: 4096, layers: [0, 2] },
      gemma2: { queryPreAttnScalar: 256, attnLogitSoftcap: null, finalLogitSoftcap: null },
    });
    expect(expectedWeightShapes(c).get('model.layers.2.pre_feedforward_layernorm.weight')).toEqual([32]);
    expect(expectedWeightShapes(c).get('model.layers.2.post_feedforward_layernorm.weight')).toEqual([32]);
    expect(normalizeConfig(hfConfig(c))).toEqual(c);
    const capped = normalizeConfig(archRaw('gemma2', { attn_logit_softcapping: 50, final_logit_softcapping: 30, query_pre_attn_scalar: 224, sliding_window: 8 }));
    expect(capped.gemma2).toEqual({ queryPreAttnScalar: 224, attnLogitSoftcap: 50, finalLogitSoftcap: 30 });
    expect(normalizeConfig(hfConfig(capped))).toEqual(capped);
    expect(() => normalizeConfig(archRaw('gemma2', { hidden_activation: 'relu' }), 'g.json')).toThrow(/g\.json: field "hidden_activation" is "relu"; supported for gemma2: gelu_pytorch_tanh/);
    expect(() => normalizeConfig(archRaw('gemma2', { attn_logit_softcapping: -1 }))).toThrow(/field "attn_logit_softcapping" must be a positive number/);
  });

  it('phi3: fused weights, PEFT target names, longrope fields, round trip', () => {
    const rope = { type: 'longrope', short_factor: [1, 1, 1, 1], long_factor: [1, 2, 3, 4] };
    const c = normalizeConfig(archRaw('phi3', { max_position_embeddings: 64, original_max_position_embeddings: 16, sliding_window: 8, rope_scaling: rope }));
    expect(c).toMatchObject({ modelType: 'phi3', fusedProjections: true, slidingWindow: { size: 8, layers: [0, 1] } });
    // attention factor sqrt(1 + ln(64 / 16) / ln 16) = sqrt(1.5)
    expect(c.ropeScaling).toEqual({ type: 'longrope', shortFactor: [1, 1, 1, 1], longFactor: [1, 2, 3, 4], originalMaxPositions: 16, attentionFactor: Math.sqrt(1.5) });
    const shapes = expectedWeightShapes(c);
    expect(shapes.get('model.layers.0.self_attn.qkv_proj.weight')).toEqual([64, 32]); // 4·8 + 2·(2·8)
    expect(shapes.get('model.layers.0.mlp.gate_up_proj.weight')).toEqual([48, 32]);
    expect(shapes.has('model.layers.0.self_attn.q_proj.weight')).toBe(false);
    expect(validTargetModules(c)).toEqual(['qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj']);
    expect(() => loraTargets(c, { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj'] })).toThrow(/unknown module "q_proj" for phi3; valid modules: qkv_proj, o_proj, gate_up_proj, down_proj/);
    expect(normalizeConfig(hfConfig(c))).toEqual(c);
    const bad = (over: Record<string, unknown>, re: RegExp) => expect(() => normalizeConfig(archRaw('phi3', { original_max_position_embeddings: 16, ...over }))).toThrow(re);
    bad({ rope_scaling: { ...rope, short_factor: [1, 1] } }, /field "rope_scaling.short_factor" must list head_dim \/ 2 = 4 positive numbers/);
    bad({ rope_scaling: { ...rope, factor: 2 } }, /field "rope_scaling.factor" \(2\) must equal max_position_embeddings \/ original_max_position_embeddings \(64 \/ 16\)/);
    bad({ attention_bias: true }, /field "attention_bias" is true; phi3 attention has no biases/);
    expect(() => normalizeConfig(archRaw('phi3', { rope_scaling: rope }))).toThrow(/field "original_max_position_embeddings" is missing/);
  });

  it('model init writes gemma2 and phi3 models with their checkpoints\' fields that load back', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fedtune-init-'));
    try {
      await initModel(join(dir, 'g'), { arch: 'gemma2', hiddenSize: 32, numLayers: 3, numHeads: 4, numKvHeads: 2, maxPositions: 64 });
      const g = await loadModel(join(dir, 'g'));
      expect(g.config).toMatchObject({ modelType: 'gemma2', headDim: 8, slidingWindow: { size: 32, layers: [0, 2] }, gemma2: { queryPreAttnScalar: 8, attnLogitSoftcap: 50, finalLogitSoftcap: 30 } });
      // (1 + weight) norms start at weight 0, as transformers initialises Gemma2RMSNorm: the identity scale.
      expect([...g.weights.get('model.layers.1.pre_feedforward_layernorm.weight')!.data].every((x) => x === 0)).toBe(true);
      await initModel(join(dir, 'p'), { arch: 'phi3', hiddenSize: 32, numLayers: 2, numHeads: 4, numKvHeads: 2, maxPositions: 64 });
      const p = await loadModel(join(dir, 'p'));
      expect(p.config).toMatchObject({ modelType: 'phi3', fusedProjections: true });
      expect(p.weights.get('model.layers.0.self_attn.qkv_proj.weight')!.shape).toEqual([32 + 2 * 16, 32]);
      expect([...p.weights.get('model.norm.weight')!.data].every((x) => x === 1)).toBe(true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('gpt2 attention flags', () => {
    const c = normalizeConfig(archRaw('gpt2', { scale_attn_weights: false, scale_attn_by_inverse_layer_idx: true, reorder_and_upcast_attn: true }));
    expect(c).toMatchObject({ scaleAttnWeights: false, scaleAttnByInverseLayerIdx: true });
    expect(normalizeConfig(hfConfig(c))).toEqual(c);
    expect(() => normalizeConfig(archRaw('gpt2', { scale_attn_weights: 'yes' }))).toThrow(/field "scale_attn_weights" must be true or false/);
  });

  it('refuses what it does not implement, naming the field', () => {
    const bad = (over: Record<string, unknown>, re: RegExp, mt: 'llama' | 'mistral' | 'qwen2' = 'llama') =>
      expect(() => normalizeConfig(archRaw(mt, over), 'c.json')).toThrow(re);
    bad({ rope_scaling: { rope_type: 'mrope', factor: 2 } }, /c\.json: field "rope_scaling" has type "mrope"; supported: default, linear, dynamic, llama3, yarn, longrope/);
    bad({ rope_scaling: { rope_type: 'linear', factor: 2, extra: 1 } }, /field "rope_scaling" of type linear has unsupported parameter extra/);
    bad({ rope_scaling: { rope_type: 'linear', factor: -1 } }, /field "rope_scaling.factor" must be a positive number/);
    bad({ rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 4, high_freq_factor: 1, original_max_position_embeddings: 64 } }, /high_freq_factor.*must be greater than low_freq_factor/);
    bad({ rope_scaling: { rope_type: 'yarn', factor: 2, original_max_position_embeddings: 8 } }, /field "rope_scaling.factor" \(2\) must equal max_position_embeddings \/ original_max_position_embeddings \(64 \/ 8\)/);
    bad({ rope_scaling: { rope_type: 'dynamic', factor: 2, original_max_position_embeddings: 8 } }, /rope_scaling.original_max_position_embeddings" \(8\) differs from max_position_embeddings/);
    bad({ partial_rotary_factor: 0.5 }, /field "partial_rotary_factor" is 0.5/);
    bad({ mlp_bias: true }, /field "mlp_bias" is true; MLP biases exist only for model_type llama/, 'mistral');
    bad({ use_sliding_window: true, sliding_window: 4, layer_types: ['full_attention'] }, /field "layer_types" must list/, 'qwen2');
    bad({ sliding_window: 0 }, /field "sliding_window" must be a positive integer/, 'mistral');
  });
});
