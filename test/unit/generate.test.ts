/**
 * Generation (worker/engine/generate.ts): the KV-cache path against the
 * recompute path (the whole sequence through the forward graph at each step,
 * itself checked against a float64 PyTorch reference in
 * arch-reference.test.ts) for every architecture; the sampling processors
 * against hand-computed distributions; stop strings, EOS lists and the
 * `fedtune generate` command.
 */
import { runFedtune } from '../helpers/cli.ts';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Generator, processLogits, readEosIds, sampleToken, validateGenerateOptions, type GenerateOptions } from '../../worker/engine/generate.ts';
import { computeFingerprint, normalizeConfig } from '../../common/hf-model.ts';
import type { LoadedModel } from '../../common/model-config.ts';
import { initLoraAdapter, loraTargets } from '../../common/lora.ts';
import { Engine } from '../../worker/engine/engine.ts';
import { writePeftAdapter } from '../../common/peft.ts';
import { createRng } from '../../common/random.ts';
import { archModel, archRaw, randomIds, gemma2As2B } from './arch-models.ts';

const root = mkdtempSync(join(tmpdir(), 'fedtune-generate-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

function tinyModel(raw: Record<string, unknown>, seed: number): LoadedModel {
  const config = normalizeConfig(raw, 'test');
  const weights = archModel(config, seed);
  return { dir: '<test>', config, weights, fingerprint: computeFingerprint(config, weights) };
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  expect(a.length).toBe(b.length);
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
  return worst;
}

interface ArchCase {
  name: string;
  raw: Record<string, unknown>;
  /** The same model with the feature that reaches into the cache switched off: its logits must differ. */
  off?: Record<string, unknown>;
}

const ARCHS: ArchCase[] = [
  { name: 'llama (GQA 4/2)', raw: archRaw('llama') },
  {
    name: 'llama rope_scaling llama3 (short original context)',
    raw: archRaw('llama', { rope_scaling: { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 32 } }),
    off: { rope_scaling: null },
  },
  { name: 'llama linear rope_scaling, attention and mlp biases', raw: archRaw('llama', { rope_scaling: { type: 'linear', factor: 4 }, attention_bias: true, mlp_bias: true }) },
  { name: 'mistral sliding_window 5', raw: archRaw('mistral', { sliding_window: 5 }), off: { sliding_window: null } },
  {
    name: 'qwen2 use_sliding_window 4 on layer 1 (max_window_layers 1)',
    raw: archRaw('qwen2', { use_sliding_window: true, sliding_window: 4, max_window_layers: 1 }),
    off: { use_sliding_window: false },
  },
  { name: 'qwen2 yarn rope_scaling', raw: archRaw('qwen2', { max_position_embeddings: 32, rope_scaling: { rope_type: 'yarn', factor: 4, original_max_position_embeddings: 8 } }) },
  {
    name: 'qwen3 q/k norm, head_dim 16, sliding window on layer 1',
    raw: archRaw('qwen3', { head_dim: 16, attention_bias: false, use_sliding_window: true, sliding_window: 4, max_window_layers: 1, rope_theta: 1000000 }),
    off: { use_sliding_window: false },
  },
  { name: 'phi3 fused projections, sliding_window 5', raw: archRaw('phi3', { original_max_position_embeddings: 64, sliding_window: 5, rope_scaling: null }), off: { sliding_window: null } },
  {
    name: 'phi3 longrope within the original context',
    raw: archRaw('phi3', { original_max_position_embeddings: 48, rope_scaling: { type: 'longrope', short_factor: [1, 1.5, 3, 6], long_factor: [1, 2, 5, 9] } }),
  },
  {
    name: 'gemma2 softcaps 50 / 30, sliding window 4 on alternating layers',
    raw: gemma2As2B(),
    off: { sliding_window: null },
  },
  {
    name: 'gemma2 soft-capping tight enough to bind',
    raw: archRaw('gemma2', { head_dim: 16, query_pre_attn_scalar: 16, attn_logit_softcapping: 1.5, final_logit_softcapping: 2.0, sliding_window: 4096, tie_word_embeddings: true }),
    off: { attn_logit_softcapping: null, final_logit_softcapping: null },
  },
  { name: 'gpt2 (scale_attn_by_inverse_layer_idx)', raw: archRaw('gpt2', { scale_attn_by_inverse_layer_idx: true }) },
];

const NEW_TOKENS = 12;
const PROMPT_LEN = 7;

describe('KV-cache generation equals recomputing the whole sequence', () => {
  ARCHS.forEach((c, i) => {
    it(c.name, async () => {
      const model = tinyModel(c.raw, 300 + i);
      const prompt = randomIds(model.config.vocabSize, 1, PROMPT_LEN, 400 + i)[0]!;
      const gen = new Generator(model, { threads: 1 });
      const opts: GenerateOptions = { maxNewTokens: NEW_TOKENS, keepLogits: true };
      const kv = await gen.generate(prompt, opts);
      const re = await gen.generate(prompt, { ...opts, kvCache: false });
      await gen.close();
      expect(kv.tokens).toHaveLength(NEW_TOKENS);
      expect(kv.tokens).toEqual(re.tokens);
      expect(kv.stopReason).toBe('max_new_tokens');
      let worst = 0;
      for (let s = 0; s < NEW_TOKENS; s++) worst = Math.max(worst, maxAbsDiff(kv.logits![s]!, re.logits![s]!));
      expect(worst).toBeLessThanOrEqual(1e-4);
      if (c.off) {
        // The feature acts on cached positions: with it off, the later steps' logits change.
        const offModel: LoadedModel = { ...model, config: normalizeConfig({ ...c.raw, ...c.off }, 'test') };
        const offGen = new Generator(offModel, { threads: 1 });
        // Feed the same tokens (the first model's), so that only the feature differs.
        const offRe = await offGen.generate([...prompt, ...kv.tokens.slice(0, -1)], { maxNewTokens: 1, keepLogits: true });
        await offGen.close();
        expect(maxAbsDiff(offRe.logits![0]!, kv.logits![NEW_TOKENS - 1]!)).toBeGreaterThan(1e-3);
      }
    });
  });

  for (const variant of [{ name: 'LoRA', useDora: false }, { name: 'DoRA', useDora: true }]) {
    it(`with a ${variant.name} adapter (non-zero B on every target): KV cache equals recompute, and the adapter changes the logits`, async () => {
      const model = tinyModel(archRaw('qwen2', { use_sliding_window: true, sliding_window: 4, max_window_layers: 1 }), 77);
      const lora = { r: 4, alpha: 8, dropout: 0, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], useDora: variant.useDora };
      const params = Engine.create(model, { mode: 'lora', lora }).initParams(5);
      const rng = createRng(9);
      for (const [name, t] of params) {
        if (name.includes('lora_B')) for (let j = 0; j < t.data.length; j++) t.data[j] = 0.5 * rng.normal();
        if (name.includes('magnitude')) for (let j = 0; j < t.data.length; j++) t.data[j] = t.data[j]! * (1 + 0.3 * rng.normal());
      }
      const prompt = randomIds(model.config.vocabSize, 1, PROMPT_LEN, 78)[0]!;
      const gen = new Generator(model, { adapter: { lora, params }, threads: 1 });
      const kv = await gen.generate(prompt, { maxNewTokens: NEW_TOKENS, keepLogits: true });
      const re = await gen.generate(prompt, { maxNewTokens: NEW_TOKENS, keepLogits: true, kvCache: false });
      await gen.close();
      expect(kv.tokens).toEqual(re.tokens);
      for (let s = 0; s < NEW_TOKENS; s++) expect(maxAbsDiff(kv.logits![s]!, re.logits![s]!)).toBeLessThanOrEqual(1e-4);
      const base = new Generator(model, { threads: 1 });
      const plain = await base.generate(prompt, { maxNewTokens: NEW_TOKENS, keepLogits: true });
      await base.close();
      expect(maxAbsDiff(plain.logits![0]!, kv.logits![0]!)).toBeGreaterThan(1e-2);
    });
  }

  it('a one-token prompt and max_new_tokens 1 need no step graph; positions past max_position_embeddings are refused', async () => {
    const model = tinyModel(archRaw('llama', { max_position_embeddings: 16 }), 5);
    const gen = new Generator(model, { threads: 1 });
    const one = await gen.generate([3], { maxNewTokens: 1 });
    expect(one.tokens).toHaveLength(1);
    const full = await gen.generate([3, 4, 5], { maxNewTokens: 14 }); // 16 positions fed: exactly the limit
    expect(full.tokens).toHaveLength(14);
    await expect(gen.generate([3, 4, 5], { maxNewTokens: 15 })).rejects.toThrow(/max_position_embeddings 16.*--max-new-tokens/);
    await expect(gen.generate([], { maxNewTokens: 2 })).rejects.toThrow(/prompt is empty/);
    await expect(gen.generate([40], { maxNewTokens: 2 })).rejects.toThrow(/prompt token 40 at position 0 is outside the vocabulary/);
    await gen.close();
  });
});

describe('sampling processors (transformers order: temperature, top-k, top-p)', () => {
  // Probabilities 0.5, 0.2, 0.15, 0.1, 0.05 in a shuffled order.
  const probs = [0.1, 0.5, 0.05, 0.2, 0.15];
  const logits = probs.map((p) => Math.log(p));
  const kept = (s: Float64Array): number[] => [...s].flatMap((x, i) => (x === -Infinity ? [] : [i])).sort();

  it('top-p keeps the smallest most-likely set whose mass reaches p', () => {
    // 0.75: 0.5 + 0.2 = 0.7 < 0.75, + 0.15 = 0.85 -> {0.5, 0.2, 0.15}
    expect(kept(processLogits(logits, { temperature: 1, topP: 0.75 }))).toEqual([1, 3, 4]);
    // 0.6: 0.5 < 0.6, 0.7 >= 0.6 -> {0.5, 0.2}
    expect(kept(processLogits(logits, { temperature: 1, topP: 0.6 }))).toEqual([1, 3]);
    // below the top probability: the top token alone; tiny p: still one token
    expect(kept(processLogits(logits, { temperature: 1, topP: 0.3 }))).toEqual([1]);
    expect(kept(processLogits(logits, { temperature: 1, topP: 1e-9 }))).toEqual([1]);
    // 0.97: everything but the 0.05 token (0.95 < 0.97 -> all five)
    expect(kept(processLogits(logits, { temperature: 1, topP: 0.97 }))).toEqual([0, 1, 2, 3, 4]);
    expect(kept(processLogits(logits, { temperature: 1, topP: 0.93 }))).toEqual([0, 1, 3, 4]);
    // p = 1: off; kept scores are the logits unchanged
    const s = processLogits(logits, { temperature: 1, topP: 1 });
    expect([...s]).toEqual(logits);
  });

  it('temperature comes before top-p: flattening the distribution widens the nucleus', () => {
    // T = 4: p ∝ probs^(1/4) -> 0.286, 0.227, 0.211, 0.191, 0.085 (sorted): 0.286 + 0.227 + 0.211 = 0.724 < 0.75 -> four tokens
    const t4 = probs.map((p) => Math.pow(p, 0.25));
    const z = t4.reduce((a, b) => a + b, 0);
    const sorted = t4.map((x) => x / z).sort((a, b) => b - a);
    expect(sorted[0]! + sorted[1]! + sorted[2]!).toBeLessThan(0.75);
    expect(sorted[0]! + sorted[1]! + sorted[2]! + sorted[3]!).toBeGreaterThanOrEqual(0.75);
    expect(kept(processLogits(logits, { temperature: 4, topP: 0.75 }))).toEqual([0, 1, 3, 4]);
    expect(processLogits(logits, { temperature: 4 })[1]).toBeCloseTo(Math.log(0.5) / 4, 12);
  });

  it('top-k keeps the k largest, ties with the k-th included, then top-p prunes within them', () => {
    expect(kept(processLogits([1, 3, 3, 2, 0], { temperature: 1, topK: 2 }))).toEqual([1, 2]);
    expect(kept(processLogits([1, 3, 2, 2, 0], { temperature: 1, topK: 2 }))).toEqual([1, 2, 3]);
    expect(kept(processLogits([1, 3, 2, 2, 0], { temperature: 1, topK: 9 }))).toEqual([0, 1, 2, 3, 4]);
    // top-k 3 renormalizes {0.5, 0.2, 0.15} to {0.588, 0.235, 0.176}; top-p 0.8: 0.588 + 0.235 = 0.824 -> two
    expect(kept(processLogits(logits, { temperature: 1, topK: 3, topP: 0.8 }))).toEqual([1, 3]);
    // without top-k the same p keeps three (0.5 + 0.2 = 0.7 < 0.8)
    expect(kept(processLogits(logits, { temperature: 1, topP: 0.8 }))).toEqual([1, 3, 4]);
  });

  it('draws follow the processed distribution (frequencies within 5 sigma over 20000 draws)', () => {
    const rng = createRng(123);
    const n = 20000;
    const counts = new Array(5).fill(0);
    const f32 = Float32Array.from(logits);
    for (let i = 0; i < n; i++) counts[sampleToken(f32, { temperature: 1, topP: 0.75 }, rng)]++;
    const target = [0, 0.5 / 0.85, 0, 0.2 / 0.85, 0.15 / 0.85];
    counts.forEach((c, i) => {
      const p = target[i]!;
      const sigma = Math.sqrt(n * p * (1 - p));
      expect(Math.abs(c - n * p)).toBeLessThanOrEqual(5 * sigma + (p === 0 ? 0 : 1));
    });
  });

  it('greedy is the first maximal logit; temperature 0 is greedy whatever top-k and top-p say', () => {
    const rng = createRng(1);
    expect(sampleToken(Float32Array.of(0, 2, 2, 1), { temperature: 0 }, rng)).toBe(1);
    expect(sampleToken(Float32Array.of(0, 2, 5, 1), { temperature: 0, topK: 3, topP: 0.1 }, rng)).toBe(2);
  });

  it('refuses bad values by name', () => {
    const v = (o: Partial<GenerateOptions>) => () => validateGenerateOptions({ maxNewTokens: 4, ...o }, 40);
    expect(v({ topP: 0 })).toThrow(/top_p \(--top-p\) is 0; expected a number in \(0, 1\]/);
    expect(v({ topP: 1.5 })).toThrow(/top_p .* is 1.5/);
    expect(v({ topP: NaN })).toThrow(/top_p .* is NaN/);
    expect(v({ topK: -1 })).toThrow(/top_k \(--top-k\) is -1; expected an integer >= 0/);
    expect(v({ topK: 1.5 })).toThrow(/top_k/);
    expect(v({ temperature: -0.5 })).toThrow(/temperature \(--temperature\) is -0.5; expected a finite number >= 0/);
    expect(v({ temperature: Infinity })).toThrow(/temperature/);
    expect(v({ maxNewTokens: 0 })).toThrow(/max_new_tokens \(--max-new-tokens\) is 0/);
    expect(v({ seed: 0.5 })).toThrow(/seed/);
    expect(v({ eosIds: [40] })).toThrow(/eos_token_id is 40; expected token ids in \[0, 40\)/);
    expect(v({ stopStrings: [''], decode: () => '' })).toThrow(/stop string \(--stop\) is ""/);
    expect(v({ stopStrings: ['x'] })).toThrow(/stop strings need a decode function/);
    expect(validateGenerateOptions({ maxNewTokens: 4 }, 40)).toMatchObject({ temperature: 0, topK: 0, topP: 1, seed: 0 });
  });
});

describe('sampled generation, stop strings and EOS ids', () => {
  const model = tinyModel(archRaw('llama'), 11);
  const prompt = [1, 2, 3, 4, 5];
  const decode = (ids: number[]): string => ids.map((i) => String.fromCharCode(65 + (i % 26))).join('');

  it('top-k 1 equals greedy; a seed reproduces a sample and another seed gives another; KV cache and recompute sample the same', async () => {
    const gen = new Generator(model, { threads: 1 });
    const greedy = await gen.generate(prompt, { maxNewTokens: NEW_TOKENS });
    for (const seed of [0, 1, 2]) {
      const k1 = await gen.generate(prompt, { maxNewTokens: NEW_TOKENS, temperature: 1.3, topK: 1, seed });
      expect(k1.tokens).toEqual(greedy.tokens);
    }
    const hot = { maxNewTokens: 24, temperature: 2, seed: 42 };
    const a = await gen.generate(prompt, hot);
    const b = await gen.generate(prompt, hot);
    const c = await gen.generate(prompt, { ...hot, seed: 43 });
    const re = await gen.generate(prompt, { ...hot, kvCache: false });
    const nucleus = await gen.generate(prompt, { ...hot, topP: 0.9, topK: 10 });
    const nucleusRe = await gen.generate(prompt, { ...hot, topP: 0.9, topK: 10, kvCache: false });
    await gen.close();
    expect(a.tokens).toEqual(b.tokens);
    expect(c.tokens).not.toEqual(a.tokens);
    expect(a.tokens.slice(0, NEW_TOKENS)).not.toEqual(greedy.tokens);
    expect(re.tokens).toEqual(a.tokens);
    expect(nucleusRe.tokens).toEqual(nucleus.tokens);
  });

  it('stops at the first of several EOS ids (kept in tokens, not in text) and at a stop string (text cut before it)', async () => {
    const gen = new Generator(model, { threads: 1 });
    const free = await gen.generate(prompt, { maxNewTokens: 24, temperature: 2, seed: 7, decode });
    expect(free.stopReason).toBe('max_new_tokens');
    expect(free.text).toBe(decode(free.tokens));
    // EOS list: two ids that occur in the free run; generation ends at the earlier one.
    const eosIds = [free.tokens[9]!, free.tokens[5]!];
    const first = free.tokens.findIndex((t) => eosIds.includes(t));
    const r = await gen.generate(prompt, { maxNewTokens: 24, temperature: 2, seed: 7, decode, eosIds });
    expect(r.stopReason).toBe('eos');
    expect(r.tokens).toEqual(free.tokens.slice(0, first + 1));
    expect(r.text).toBe(decode(free.tokens.slice(0, first)));
    // Stop string: two characters of the free text from position 6; the output ends where it first occurs.
    const stop = free.text!.slice(6, 8);
    const at = free.text!.indexOf(stop);
    const s = await gen.generate(prompt, { maxNewTokens: 24, temperature: 2, seed: 7, decode, stopStrings: ['no such text', stop] });
    expect(s.stopReason).toBe('stop_string');
    expect(s.text).toBe(free.text!.slice(0, at));
    expect(s.tokens).toEqual(free.tokens.slice(0, at + 2)); // one character per token: the stop completes at token at + 1
    await gen.close();
  });

  it('reads EOS ids from generation_config.json (int or list) and config.json', async () => {
    const dir = join(root, 'eos');
    await mkdir(dir);
    writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: [128001, 128008, 128009] }));
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ eos_token_id: 128001 }));
    expect(await readEosIds(dir, 128009)).toEqual([128001, 128008, 128009]);
    expect(await readEosIds(dir, 2)).toEqual([128001, 128008, 128009, 2]);
    writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: 7 }));
    expect(await readEosIds(dir, null)).toEqual([7, 128001]);
    writeFileSync(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: ['x'] }));
    await expect(readEosIds(dir, null)).rejects.toThrow(/generation_config.json: eos_token_id is \["x"\]; expected a token id or a list/);
    expect(await readEosIds(join(root, 'missing'), 3)).toEqual([3]);
  });
});

describe('fedtune generate (child process)', () => {
  const run = runFedtune;
  const modelDir = join(root, 'cli-model');

  it('prints the continuation and a tokens/s line; KV cache and --no-kv-cache agree; an adapter is applied; bad values are refused', async () => {
    const init = run(['model', 'init', '--arch', 'qwen2', '--out', modelDir, '--hidden', '32', '--layers', '2', '--heads', '4', '--max-positions', '128']);
    expect(init.status, init.stderr).toBe(0);
    const base = ['generate', '--model', modelDir, '--prompt', 'The quick brown fox', '--max-new-tokens', '10', '--threads', '1'];
    const kv = run(base);
    expect(kv.status, kv.stderr).toBe(0);
    expect(kv.stderr).toMatch(/prompt \d+ tokens, \d+ new tokens in [\d.]+ s: [\d.]+ tokens\/s \(KV cache; stopped by (max_new_tokens|eos)/);
    const re = run([...base, '--no-kv-cache']);
    expect(re.status, re.stderr).toBe(0);
    expect(re.stdout).toBe(kv.stdout);
    expect(re.stderr).toMatch(/recompute/);

    const promptFile = join(root, 'prompt.txt');
    writeFileSync(promptFile, 'The quick brown fox');
    const fromFile = run(['generate', '--model', modelDir, '--prompt-file', promptFile, '--max-new-tokens', '10', '--threads', '1']);
    expect(fromFile.stdout).toBe(kv.stdout);

    const sampled = run([...base, '--temperature', '1.5', '--top-k', '20', '--top-p', '0.95', '--seed', '3', '--template', 'chatml']);
    expect(sampled.status, sampled.stderr).toBe(0);
    expect(run([...base, '--temperature', '1.5', '--top-k', '20', '--top-p', '0.95', '--seed', '3', '--template', 'chatml']).stdout).toBe(sampled.stdout);

    // An adapter with non-zero B: the same tokens as the Generator with that adapter in this process.
    const { loadModel } = await import('../../worker/engine/model.ts');
    const { loadTokenizer } = await import('../../common/tokenizer.ts');
    const model = await loadModel(modelDir);
    const tok = await loadTokenizer(modelDir);
    const lora = { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj', 'v_proj', 'down_proj'] };
    const params = initLoraAdapter(loraTargets(model.config, lora), undefined, 1, 'float32');
    const rng = createRng(2);
    for (const [name, t] of params) if (name.includes('lora_B')) for (let j = 0; j < t.data.length; j++) t.data[j] = 2 * rng.normal();
    const adapterDir = join(root, 'adapter');
    await writePeftAdapter(adapterDir, params, { lora, baseModel: modelDir });
    const withAdapter = run([...base, '--adapter', adapterDir]);
    expect(withAdapter.status, withAdapter.stderr).toBe(0);
    const gen = new Generator(model, { adapter: { lora, params }, threads: 1 });
    const prompt = [...(tok.bosId !== null ? [tok.bosId] : []), ...tok.encode('The quick brown fox')];
    const expected = await gen.generate(prompt, { maxNewTokens: 10, eosIds: await readEosIds(modelDir, tok.eosId), decode: (ids) => tok.decode(ids, false) });
    await gen.close();
    expect(withAdapter.stdout).toBe(`${expected.text}\n`);
    expect(withAdapter.stdout).not.toBe(kv.stdout);

    const stopAt = kv.stdout.slice(2, 4);
    if (stopAt.trim().length === 2) {
      const stopped = run([...base, '--stop', stopAt]);
      expect(stopped.stdout).toBe(`${kv.stdout.slice(0, kv.stdout.indexOf(stopAt))}\n`);
      expect(stopped.stderr).toMatch(/stopped by stop_string/);
    }

    for (const [args, msg] of [
      [['--top-p', '0'], /top_p \(--top-p\) is 0; expected a number in \(0, 1\]/],
      [['--top-k', '-2'], /top_k \(--top-k\) is -2/],
      [['--temperature', '-1'], /temperature \(--temperature\) is -1/],
      [['--max-new-tokens', '0'], /--max-new-tokens must be an integer >= 1/],
    ] as Array<[string[], RegExp]>) {
      const bad = run([...base, ...args]);
      expect(bad.status).toBe(1);
      expect(bad.stderr).toMatch(msg);
    }
    const both = run(['generate', '--model', modelDir, '--prompt', 'a', '--prompt-file', promptFile]);
    expect(both.status).toBe(1);
    expect(both.stderr).toMatch(/--prompt TEXT or --prompt-file FILE/);
  }, 60_000);
});
