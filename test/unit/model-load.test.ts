import { describe, expect, it, beforeAll, afterAll } from 'vitest';
import { mkdtemp, readFile, readdir, rm, unlink, writeFile, cp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { initModel } from '../../worker/engine/init.ts';
import { loadModel, saveModel } from '../../worker/engine/model.ts';
import { expectedWeightShapes, normalizeConfig } from '../../common/hf-model.ts';
import { f32ToBf16Bits, bf16BitsToF32, f32ToF16Bits, f16BitsToF32, readSafetensors, writeSafetensors, type StWriteEntry } from '../../common/safetensors.ts';
import type { TensorMap } from '../../common/tensor.ts';

const run = promisify(execFile);
let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'fedtune-model-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const small = { hiddenSize: 32, numLayers: 2, numHeads: 4 } as const;

async function rewriteWeights(dir: string, edit: (m: Map<string, StWriteEntry>) => void): Promise<void> {
  const st = await readSafetensors(join(dir, 'model.safetensors'));
  const m = new Map<string, StWriteEntry>();
  for (const [k, e] of st.tensors) m.set(k, { dtype: 'F32', shape: e.shape, data: new Float32Array(e.bytes.slice().buffer) });
  edit(m);
  await writeSafetensors(join(dir, 'model.safetensors'), m, { format: 'pt' });
}

function std(d: Float32Array): number {
  let s = 0;
  let s2 = 0;
  for (const x of d) {
    s += x;
    s2 += x * x;
  }
  const mean = s / d.length;
  return Math.sqrt(s2 / d.length - mean * mean);
}

describe('loadModel for each architecture', () => {
  it('llama (GQA): normalized config and weight shapes', async () => {
    const dir = join(root, 'llama');
    await initModel(dir, { arch: 'llama', ...small, numKvHeads: 2, intermediateSize: 48, seed: 1 });
    const raw = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8'));
    expect(raw.model_type).toBe('llama');
    expect(raw.architectures).toEqual(['LlamaForCausalLM']);
    const m = await loadModel(dir);
    expect(m.config).toMatchObject({
      family: 'llama',
      modelType: 'llama',
      hiddenSize: 32,
      intermediateSize: 48,
      numLayers: 2,
      numHeads: 4,
      numKvHeads: 2,
      headDim: 8,
      tieWordEmbeddings: false,
      qkvBias: false,
      activation: 'silu',
      ropeTheta: 10000,
    });
    expect(m.config.vocabSize).toBe(raw.vocab_size);
    expect(m.weights.get('model.layers.1.self_attn.q_proj.weight')!.shape).toEqual([32, 32]);
    expect(m.weights.get('model.layers.1.self_attn.k_proj.weight')!.shape).toEqual([16, 32]);
    expect(m.weights.get('model.layers.1.self_attn.v_proj.weight')!.shape).toEqual([16, 32]);
    expect(m.weights.get('model.layers.0.mlp.down_proj.weight')!.shape).toEqual([32, 48]);
    expect(m.weights.get('lm_head.weight')!.shape).toEqual([m.config.vocabSize, 32]);
    expect(m.weights.has('model.layers.0.self_attn.q_proj.bias')).toBe(false);
    expect([...m.weights.keys()]).toEqual([...expectedWeightShapes(m.config).keys()]);
    for (const t of m.weights.values()) expect(t.data).toBeInstanceOf(Float32Array);
    // transformers-style init: norms 1, weights N(0, 0.02)
    expect(Array.from(m.weights.get('model.norm.weight')!.data).every((x) => x === 1)).toBe(true);
    const e = std(m.weights.get('model.embed_tokens.weight')!.data as Float32Array);
    expect(e).toBeGreaterThan(0.018);
    expect(e).toBeLessThan(0.022);
    expect(m.fingerprint).toMatch(/^[0-9a-f]{64}$/);
    expect(m.rawConfig?.model_type).toBe('llama');
  });

  it('qwen2: q/k/v biases, tied embeddings', async () => {
    const dir = join(root, 'qwen2');
    await initModel(dir, { arch: 'qwen2', ...small, numKvHeads: 1, tieWordEmbeddings: true });
    const m = await loadModel(dir);
    expect(m.config).toMatchObject({ family: 'llama', modelType: 'qwen2', qkvBias: true, numKvHeads: 1, tieWordEmbeddings: true });
    expect(m.weights.get('model.layers.0.self_attn.q_proj.bias')!.shape).toEqual([32]);
    expect(m.weights.get('model.layers.0.self_attn.k_proj.bias')!.shape).toEqual([8]);
    expect(Array.from(m.weights.get('model.layers.0.self_attn.v_proj.bias')!.data).every((x) => x === 0)).toBe(true);
    expect(m.weights.has('model.layers.0.self_attn.o_proj.bias')).toBe(false);
    expect(m.weights.has('lm_head.weight')).toBe(false);
  });

  it('mistral: no biases', async () => {
    const dir = join(root, 'mistral');
    await initModel(dir, { arch: 'mistral', ...small, numKvHeads: 2 });
    const m = await loadModel(dir);
    expect(m.config).toMatchObject({ modelType: 'mistral', family: 'llama', qkvBias: false, numKvHeads: 2 });
    expect(JSON.parse(await readFile(join(dir, 'config.json'), 'utf8')).architectures).toEqual(['MistralForCausalLM']);
    expect([...m.weights.keys()].some((k) => k.endsWith('.bias'))).toBe(false);
  });

  it('gpt2: Conv1D shapes, tied, transformer. prefix', async () => {
    const dir = join(root, 'gpt2');
    await initModel(dir, { arch: 'gpt2', ...small, maxPositions: 64 });
    const raw = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8'));
    expect(raw).toMatchObject({ model_type: 'gpt2', n_embd: 32, n_layer: 2, n_head: 4, n_positions: 64, activation_function: 'gelu_new' });
    const m = await loadModel(dir);
    expect(m.config).toMatchObject({
      family: 'gpt2',
      hiddenSize: 32,
      intermediateSize: 128,
      numKvHeads: 4,
      headDim: 8,
      maxPositions: 64,
      tieWordEmbeddings: true,
      activation: 'gelu_new',
      normEps: 1e-5,
    });
    expect(m.weights.get('transformer.h.0.attn.c_attn.weight')!.shape).toEqual([32, 96]);
    expect(m.weights.get('transformer.h.0.mlp.c_fc.weight')!.shape).toEqual([32, 128]);
    expect(m.weights.get('transformer.h.0.mlp.c_proj.weight')!.shape).toEqual([128, 32]);
    expect(m.weights.get('transformer.wpe.weight')!.shape).toEqual([64, 32]);
    expect(m.weights.has('lm_head.weight')).toBe(false);
    // residual projections are initialized with std 0.02 / sqrt(2 * n_layer)
    const s = std(m.weights.get('transformer.h.1.mlp.c_proj.weight')!.data as Float32Array);
    expect(s).toBeGreaterThan(0.008);
    expect(s).toBeLessThan(0.012);
  });

  it('gpt2 checkpoints without the transformer. prefix, with attn.bias buffers and a tied lm_head, load the same', async () => {
    const dir = join(root, 'gpt2-bare');
    await cp(join(root, 'gpt2'), dir, { recursive: true });
    const ref = await loadModel(join(root, 'gpt2'));
    await rewriteWeights(dir, (m) => {
      const renamed = new Map<string, StWriteEntry>();
      for (const [k, e] of m) renamed.set(k.replace(/^transformer\./, ''), e);
      m.clear();
      for (const [k, e] of renamed) m.set(k, e);
      m.set('h.0.attn.bias', { dtype: 'F32', shape: [1, 1, 64, 64], data: new Float32Array(64 * 64).fill(1) });
      m.set('h.1.attn.masked_bias', { dtype: 'F32', shape: [], data: Float32Array.from([-1e4]) });
      m.set('lm_head.weight', renamed.get('wte.weight')!);
    });
    const st = await readSafetensors(join(dir, 'model.safetensors'));
    expect(st.tensors.has('wte.weight')).toBe(true);
    const m = await loadModel(dir);
    expect([...m.weights.keys()]).toEqual([...ref.weights.keys()]);
    expect(m.fingerprint).toBe(ref.fingerprint);
  });

  it('ignores llama rotary inv_freq buffers', async () => {
    const dir = join(root, 'llama-rot');
    await cp(join(root, 'llama'), dir, { recursive: true });
    await rewriteWeights(dir, (m) => {
      m.set('model.layers.0.self_attn.rotary_emb.inv_freq', { dtype: 'F32', shape: [4], data: new Float32Array(4) });
    });
    const m = await loadModel(dir);
    expect(m.fingerprint).toBe((await loadModel(join(root, 'llama'))).fingerprint);
  });
});

describe('dtypes, shards, fingerprint, save', () => {
  it('bf16 and f16 checkpoints load as the rounded float32 values', async () => {
    const f32 = await loadModel(join(root, 'llama'));
    for (const [dtype, enc, dec] of [
      ['bfloat16', f32ToBf16Bits, bf16BitsToF32],
      ['float16', f32ToF16Bits, f16BitsToF32],
    ] as const) {
      const dir = join(root, `llama-${dtype}`);
      await initModel(dir, { arch: 'llama', ...small, numKvHeads: 2, intermediateSize: 48, seed: 1, dtype });
      const st = await readSafetensors(join(dir, 'model.safetensors'));
      expect(st.tensors.get('model.embed_tokens.weight')!.dtype).toBe(dtype === 'bfloat16' ? 'BF16' : 'F16');
      const m = await loadModel(dir);
      expect(m.config).toEqual(f32.config);
      const a = f32.weights.get('model.layers.0.mlp.up_proj.weight')!.data;
      const b = m.weights.get('model.layers.0.mlp.up_proj.weight')!.data;
      expect(b).toBeInstanceOf(Float32Array);
      for (let i = 0; i < a.length; i++) expect(b[i]).toBe(dec(enc(a[i]!)));
      expect(m.fingerprint).not.toBe(f32.fingerprint);
    }
  });

  it('loads a sharded checkpoint to the same weights as a single file', async () => {
    const dir = join(root, 'llama-sharded');
    await initModel(dir, { arch: 'llama', ...small, numKvHeads: 2, intermediateSize: 48, seed: 1, shards: 3 });
    const files = (await readdir(dir)).sort();
    expect(files).toEqual([
      'config.json',
      'model-00001-of-00003.safetensors',
      'model-00002-of-00003.safetensors',
      'model-00003-of-00003.safetensors',
      'model.safetensors.index.json',
      'tokenizer.json',
      'tokenizer_config.json',
    ]);
    const index = JSON.parse(await readFile(join(dir, 'model.safetensors.index.json'), 'utf8'));
    expect(new Set(Object.values(index.weight_map)).size).toBe(3);
    const m = await loadModel(dir);
    const ref = await loadModel(join(root, 'llama'));
    expect(m.fingerprint).toBe(ref.fingerprint);
  });

  it('fingerprint changes when one weight value changes', async () => {
    const dir = join(root, 'llama-edit');
    await cp(join(root, 'llama'), dir, { recursive: true });
    await rewriteWeights(dir, (m) => {
      const t = m.get('model.norm.weight')!;
      t.data[3] = 1.5;
    });
    expect((await loadModel(dir)).fingerprint).not.toBe((await loadModel(join(root, 'llama'))).fingerprint);
  });

  it('saveModel writes a directory that loads back identically and keeps config fields', async () => {
    const src = await loadModel(join(root, 'qwen2'));
    const out = join(root, 'saved', 'qwen2');
    const rawConfig = { ...src.rawConfig!, custom_field: 'kept' };
    await saveModel(out, { config: src.config, rawConfig, weights: src.weights }, join(root, 'qwen2', 'tokenizer.json'));
    expect((await readdir(out)).sort()).toEqual(['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
    expect((await readdir(join(root, 'saved'))).sort()).toEqual(['qwen2']); // no temp dirs left
    const back = await loadModel(out);
    expect(back.fingerprint).toBe(src.fingerprint);
    expect(back.rawConfig!.custom_field).toBe('kept');
    await expect(saveModel(out, { config: src.config, weights: src.weights })).rejects.toThrow(/already exists and is not empty/);
    const bad: TensorMap = new Map(src.weights);
    bad.delete('model.norm.weight');
    await expect(saveModel(join(root, 'saved', 'bad'), { config: src.config, weights: bad })).rejects.toThrow(/missing weight model\.norm\.weight/);
    expect((await readdir(join(root, 'saved'))).sort()).toEqual(['qwen2']);
  });
});

describe('loadModel errors', () => {
  it('missing tokenizer.json', async () => {
    const dir = join(root, 'no-tok');
    await cp(join(root, 'mistral'), dir, { recursive: true });
    await unlink(join(dir, 'tokenizer.json'));
    await expect(loadModel(dir)).rejects.toThrow(/has no tokenizer\.json/);
  });

  it('unsupported model_type lists the supported ones', async () => {
    const dir = join(root, 'bad-type');
    await cp(join(root, 'mistral'), dir, { recursive: true });
    const raw = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8'));
    await writeFile(join(dir, 'config.json'), JSON.stringify({ ...raw, model_type: 'falcon' }));
    await expect(loadModel(dir)).rejects.toThrow(/unsupported model_type "falcon"; supported: llama, mistral, qwen2, gpt2/);
  });

  it('missing weight', async () => {
    const dir = join(root, 'missing-w');
    await cp(join(root, 'mistral'), dir, { recursive: true });
    await rewriteWeights(dir, (m) => m.delete('model.layers.1.mlp.up_proj.weight'));
    await expect(loadModel(dir)).rejects.toThrow(/missing weight model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \[\d+, 32\]\)/);
  });

  it('mis-shaped weight', async () => {
    const dir = join(root, 'shape-w');
    await cp(join(root, 'mistral'), dir, { recursive: true });
    await rewriteWeights(dir, (m) => m.set('model.layers.0.self_attn.k_proj.weight', { dtype: 'F32', shape: [32, 32], data: new Float32Array(1024) }));
    await expect(loadModel(dir)).rejects.toThrow(/weight model\.layers\.0\.self_attn\.k_proj\.weight has shape \[32, 32\], expected \[16, 32\]/);
  });

  it('unexpected weight', async () => {
    const dir = join(root, 'extra-w');
    await cp(join(root, 'mistral'), dir, { recursive: true });
    await rewriteWeights(dir, (m) => m.set('model.layers.0.self_attn.o_proj.bias', { dtype: 'F32', shape: [32], data: new Float32Array(32) }));
    await expect(loadModel(dir)).rejects.toThrow(/unexpected weight model\.layers\.0\.self_attn\.o_proj\.bias/);
  });

  it('shard index pointing at a missing file or a weight not in its file', async () => {
    const dir = join(root, 'bad-shards');
    await cp(join(root, 'llama-sharded'), dir, { recursive: true });
    await unlink(join(dir, 'model-00002-of-00003.safetensors'));
    await expect(loadModel(dir)).rejects.toThrow(/shard file model-00002-of-00003\.safetensors listed in weight_map does not exist/);
    await cp(join(root, 'llama-sharded', 'model-00002-of-00003.safetensors'), join(dir, 'model-00002-of-00003.safetensors'));
    const idxPath = join(dir, 'model.safetensors.index.json');
    const idx = JSON.parse(await readFile(idxPath, 'utf8'));
    idx.weight_map['model.norm.weight'] = 'model-00001-of-00003.safetensors';
    idx.weight_map['lm_head.weight'] = 'model-00001-of-00003.safetensors';
    await writeFile(idxPath, JSON.stringify(idx));
    await expect(loadModel(dir)).rejects.toThrow(/weight (model\.norm|lm_head)\.weight is mapped to model-00001-of-00003\.safetensors but that file does not contain it/);
  });

  it('missing checkpoint and bad config fields', async () => {
    const dir = join(root, 'no-ckpt');
    await cp(join(root, 'mistral'), dir, { recursive: true });
    await unlink(join(dir, 'model.safetensors'));
    await expect(loadModel(dir)).rejects.toThrow(/neither model\.safetensors nor model\.safetensors\.index\.json/);
    expect(() => normalizeConfig({ model_type: 'llama', vocab_size: 10, hidden_size: 8, num_attention_heads: 2, num_hidden_layers: 1 }, 'c.json')).toThrow(
      /c\.json: field "intermediate_size" is missing/,
    );
    expect(() =>
      normalizeConfig({ model_type: 'llama', vocab_size: 10, hidden_size: 8, num_attention_heads: 2, num_hidden_layers: 1, intermediate_size: 4, rope_scaling: { rope_type: 'llama3', factor: 8 } }),
    ).toThrow(/field "rope_scaling" .* is not supported/);
    expect(() => normalizeConfig({ model_type: 'gpt2', vocab_size: 10, n_embd: 8, n_head: 2, n_layer: 1, activation_function: 'relu' })).toThrow(
      /field "activation_function" is "relu"; supported: gelu_new/,
    );
  });

  it('normalizes defaults: kv heads, head_dim, eos lists, tie flag', () => {
    const c = normalizeConfig({
      model_type: 'llama',
      vocab_size: 100,
      hidden_size: 64,
      intermediate_size: 128,
      num_attention_heads: 4,
      num_hidden_layers: 2,
      head_dim: 32,
      eos_token_id: [7, 9],
      tie_word_embeddings: true,
    });
    expect(c).toMatchObject({ numKvHeads: 4, headDim: 32, eosTokenId: 7, bosTokenId: null, tieWordEmbeddings: true, ropeTheta: 10000, normEps: 1e-6 });
    expect(expectedWeightShapes(c).get('model.layers.0.self_attn.q_proj.weight')).toEqual([128, 64]);
    expect(expectedWeightShapes(c).get('model.layers.0.self_attn.o_proj.weight')).toEqual([64, 128]);
    expect(expectedWeightShapes(c).has('lm_head.weight')).toBe(false);
  });
});

describe('fedtune model CLI', () => {
  it('init writes a model that inspect describes', async () => {
    const bin = resolve('bin/fedtune.js');
    const out = join(root, 'cli-gpt2');
    const init = await run(process.execPath, [bin, 'model', 'init', '--arch', 'gpt2', '--out', out, '--hidden', '16', '--layers', '1', '--heads', '2'], {
      env: { ...process.env, FEDTUNE_LOG_LEVEL: 'silent' },
    });
    expect(init.stdout).toMatch(/wrote gpt2 model to/);
    const m = await loadModel(out);
    expect(m.config).toMatchObject({ hiddenSize: 16, numLayers: 1, numHeads: 2 });
    const inspect = await run(process.execPath, [bin, 'model', 'inspect', out, '--json']);
    const info = JSON.parse(inspect.stdout);
    expect(info.fingerprint).toBe(m.fingerprint);
    expect(info.modelType).toBe('gpt2');
    const again = run(process.execPath, [bin, 'model', 'init', '--arch', 'gpt2', '--out', out]);
    await expect(again).rejects.toMatchObject({ stderr: expect.stringMatching(/already exists and is not empty; pass --force/) });
  });
});
