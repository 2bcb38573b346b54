/**
 * PEFT's per-module LoRA fields: rank_pattern / alpha_pattern (per-module rank
 * and alpha) and layers_to_transform / layers_pattern (which layers get an
 * adapter). The name matching is checked against Python's `re` running PEFT's
 * own expressions; logits of adapters using them against the float64 PyTorch
 * reference (test/reference/peft_ref.py merges the adapter from PEFT's field
 * semantics); gradients against finite differences.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Engine } from '../../worker/engine/engine.ts';
import { writeModelFiles } from '../../worker/engine/model.ts';
import { mergeAdapter } from '../../worker/engine/merge.ts';
import { computeFingerprint, normalizeConfig } from '../../common/hf-model.ts';
import { adapterShapes, layerIndexOf, loraTargets, patternKeyFor, validateAdapter } from '../../common/lora.ts';
import { ADAPTER_CONFIG, readPeftAdapter, writePeftAdapter } from '../../common/peft.ts';
import { parseLayerList, parsePatternOption } from '../../cli/train.ts';
import { createRng } from '../../common/random.ts';
import type { Batch, LoraConfig, ModelConfig } from '../../common/model-config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { randomConfig, randomModel } from '../helpers/random-model.ts';
import { gradCheck } from '../helpers/gradcheck.ts';
import { archModel, archRaw, randomIds } from './arch-models.ts';
import { PYTHON, maxAbsDiffToReference, referenceAvailable, referenceLogits } from '../helpers/reference.ts';

const haveTorch = referenceAvailable('lora-patterns');

const root = mkdtempSync(join(tmpdir(), 'fedtune-lora-patterns-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

/** PEFT's matchers run by Python's re: get_pattern_key and check_target_module_exists' layer index. */
function pythonMatch(req: { keys: string[]; names: string[]; layersPattern: string[] | null }): { key: (string | null)[]; layer: (number | null)[] } {
  const code = `
import json, re, sys
req = json.load(sys.stdin)
def key(name):
    return next(filter(lambda k: re.match(rf"(.*\\.)?({k})$", name), req["keys"]), None)
def layer(name):
    lp = req["layersPattern"]
    if not lp:
        m = re.match(r".*?\\.[^.]*\\.(\\d+)\\.", name)
        return int(m.group(1)) if m else None
    for p in lp:
        m = re.match(rf".*?\\.{p}\\.(\\d+)\\.", name)
        if m:
            return int(m.group(1))
    return None
json.dump({"key": [key(n) for n in req["names"]], "layer": [layer(n) for n in req["names"]]}, sys.stdout)
`;
  const r = spawnSync(PYTHON, ['-c', code], { input: JSON.stringify(req), encoding: 'utf8' });
  if (r.status !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout);
}

const NAMES = [
  'model.layers.0.self_attn.q_proj',
  'model.layers.1.self_attn.q_proj',
  'model.layers.10.self_attn.v_proj',
  'model.layers.1.mlp.down_proj',
  'model.layers.0.self_attn.qkv_proj',
  'transformer.h.3.attn.c_attn',
  'transformer.h.11.mlp.c_proj',
  'lm_head',
];

describe('pattern matching as PEFT does it', () => {
  it('rank_pattern / alpha_pattern keys: first match in order, suffix or regex, equal to re.match(rf"(.*\\.)?({k})$")', () => {
    const keySets = [
      ['q_proj', 'v_proj'],
      ['layers.0.self_attn.q_proj', 'q_proj'],
      ['layers\\.[01]\\..*_proj', 'down_proj'],
      ['model\\..*q_proj'],
      ['proj'], // not a module-name suffix: matches nothing
      ['h.3.attn.c_attn', 'c_.*'],
      ['self_attn.q_proj|mlp.down_proj'],
      ['1.self_attn.q_proj'],
    ];
    let matched = 0;
    for (const keys of keySets) {
      const want = pythonMatch({ keys, names: NAMES, layersPattern: null }).key;
      const got = NAMES.map((n) => patternKeyFor(keys, n) ?? null);
      expect(got, `keys ${JSON.stringify(keys)}`).toEqual(want);
      matched += got.filter((k) => k !== null).length;
    }
    expect(matched).toBeGreaterThan(10); // the table exercises matches, not only misses
  });

  it('layer index as layers_to_transform reads it, with and without layers_pattern', () => {
    for (const lp of [null, ['layers'], ['h'], ['blocks', 'h'], ['lay.rs']]) {
      const want = pythonMatch({ keys: [], names: NAMES, layersPattern: lp }).layer;
      expect(NAMES.map((n) => layerIndexOf(n, lp ?? undefined)), `layers_pattern ${JSON.stringify(lp)}`).toEqual(want);
    }
  });
});

/** A llama-family model written in HF layout, with the real checkpoints' fields. */
async function archDir(name: string, raw: Record<string, unknown>, seed: number): Promise<{ dir: string; config: ModelConfig; weights: TensorMap }> {
  const dir = join(root, name);
  await mkdir(dir, { recursive: true });
  const config = normalizeConfig(raw, name);
  const weights = archModel(config, seed);
  await writeModelFiles(dir, raw, weights);
  return { dir, config, weights };
}

function randomAdapter(shapes: Map<string, number[]>, seed: number): TensorMap {
  const rng = createRng(seed);
  const out: TensorMap = new Map();
  for (const [k, shape] of shapes) {
    const data = new Float32Array(shape[0]! * shape[1]!);
    for (let i = 0; i < data.length; i++) data[i] = 0.3 * rng.normal();
    out.set(k, { shape, data });
  }
  return out;
}

const reference = (script: string, dir: string, ids: number[][], adapter?: string) => referenceLogits(script, dir, ids, adapter ? { adapter } : {});
const maxAbsDiff = maxAbsDiffToReference;

interface RefCase {
  name: string;
  raw: Record<string, unknown>;
  lora: LoraConfig;
  /** Modules the patterns must leave out, and ranks some must have. */
  expectModules: number;
  expectRanks: Record<string, number>;
}

const REF_CASES: RefCase[] = [
  {
    name: 'llama: rank_pattern (suffix, layer-specific, regex), alpha_pattern, rsLoRA',
    raw: archRaw('llama', { num_hidden_layers: 3 }),
    lora: {
      r: 4,
      alpha: 8,
      dropout: 0,
      targetModules: ['q_proj', 'v_proj', 'o_proj', 'down_proj'],
      useRslora: true,
      rankPattern: { 'layers.0.self_attn.q_proj': 2, 'layers\\.[12]\\.self_attn\\.v_proj': 6, down_proj: 3 },
      alphaPattern: { o_proj: 20, 'layers.2.self_attn.q_proj': 1.5 },
    },
    expectModules: 12,
    expectRanks: { 'model.layers.0.self_attn.q_proj': 2, 'model.layers.1.self_attn.q_proj': 4, 'model.layers.2.self_attn.v_proj': 6, 'model.layers.0.self_attn.v_proj': 4, 'model.layers.1.mlp.down_proj': 3 },
  },
  {
    name: 'qwen3: layers_to_transform [0, 2] with layers_pattern "layers", rank_pattern on k_proj',
    raw: archRaw('qwen3', { num_hidden_layers: 3, head_dim: 16 }),
    lora: { r: 3, alpha: 5, dropout: 0, targetModules: ['q_proj', 'k_proj', 'gate_proj'], layersToTransform: [0, 2], layersPattern: ['layers'], rankPattern: { k_proj: 5 } },
    expectModules: 6,
    expectRanks: { 'model.layers.2.self_attn.k_proj': 5, 'model.layers.0.mlp.gate_proj': 3 },
  },
  {
    name: 'phi3: fused qkv_proj at its own rank and alpha, layers_to_transform [1]',
    raw: archRaw('phi3', { original_max_position_embeddings: 64, rope_scaling: null }),
    lora: { r: 2, alpha: 4, dropout: 0, targetModules: ['qkv_proj', 'gate_up_proj'], layersToTransform: [1], rankPattern: { qkv_proj: 6 }, alphaPattern: { gate_up_proj: 9 } },
    expectModules: 2,
    expectRanks: { 'model.layers.1.self_attn.qkv_proj': 6, 'model.layers.1.mlp.gate_up_proj': 2 },
  },
  {
    name: 'gemma2: rank_pattern and alpha_pattern on up_proj / o_proj',
    raw: archRaw('gemma2', { head_dim: 16, query_pre_attn_scalar: 16, attn_logit_softcapping: 50, final_logit_softcapping: 30, sliding_window: 4, tie_word_embeddings: true }),
    lora: { r: 3, alpha: 3, dropout: 0, targetModules: ['o_proj', 'up_proj'], rankPattern: { up_proj: 7 }, alphaPattern: { 'layers.1.self_attn.o_proj': 12 } },
    expectModules: 4,
    expectRanks: { 'model.layers.0.mlp.up_proj': 7, 'model.layers.1.self_attn.o_proj': 3 },
  },
];

describe.skipIf(!haveTorch)('adapters with per-module ranks, alphas and layers against the float64 PyTorch reference', () => {
  REF_CASES.forEach((c, i) => {
    it(c.name, async () => {
      const { dir, config, weights } = await archDir(`ref${i}`, c.raw, 300 + i);
      const targets = loraTargets(config, c.lora);
      expect(targets).toHaveLength(c.expectModules);
      for (const [m, r] of Object.entries(c.expectRanks)) expect(targets.find((t) => t.module === m)?.r, m).toBe(r);
      const adapter = randomAdapter(adapterShapes(targets), 400 + i);
      const adapterDir = join(root, `ref${i}-adapter`);
      await writePeftAdapter(adapterDir, adapter, { lora: c.lora, baseModel: dir });
      // What PEFT reads: the fields as PEFT names them.
      const json = JSON.parse(await readFile(join(adapterDir, ADAPTER_CONFIG), 'utf8'));
      expect(json.rank_pattern).toEqual(c.lora.rankPattern ?? {});
      expect(json.alpha_pattern).toEqual(c.lora.alphaPattern ?? {});
      expect(json.layers_to_transform).toEqual(c.lora.layersToTransform ?? null);
      // Round trip: read back the same config and tensors.
      const back = await readPeftAdapter(adapterDir);
      expect(back.config.rankPattern).toEqual(c.lora.rankPattern);
      expect(back.config.alphaPattern).toEqual(c.lora.alphaPattern);
      expect(back.config.layersToTransform).toEqual(c.lora.layersToTransform);
      expect(back.config.layersPattern).toEqual(c.lora.layersPattern);

      const model = { dir, config, weights, fingerprint: computeFingerprint(config, weights) };
      const engine = Engine.create(model, { mode: 'lora', lora: back.config, dtype: 'float32', threads: 1 });
      const T = 10;
      const ids = randomIds(config.vocabSize, 2, T, 500 + i);
      const batch: Batch = { batchSize: 2, seqLen: T, inputIds: Int32Array.from(ids.flat()), labels: Int32Array.from(ids.flat()) };
      const { logits } = await engine.forward(back.adapter, batch);
      await engine.close();
      const script = config.gemma2 ? 'gemma2_ref.py' : 'llama_ref.py';
      const diff = maxAbsDiff(logits, reference(script, dir, ids, adapterDir));
      console.log(`${c.name}: max |engine - reference| = ${diff.toExponential(2)}`);
      expect(diff).toBeLessThanOrEqual(1e-4);
      // The adapter matters: without it the reference is far off.
      expect(maxAbsDiff(logits, reference(script, dir, ids))).toBeGreaterThan(1e-2);
      // Merged into the base, the same function.
      const merged = mergeAdapter(model, back.adapter, back.config);
      const plain = Engine.create({ ...model, weights: merged }, { mode: 'full', dtype: 'float32', threads: 1 });
      const { logits: mergedLogits } = await plain.forward(plain.initParams(0), batch);
      await plain.close();
      let worst = 0;
      for (let k = 0; k < logits.length; k++) worst = Math.max(worst, Math.abs(logits[k]! - mergedLogits[k]!));
      expect(worst).toBeLessThanOrEqual(1e-4);
    });
  });

  it('a reference-checked adapter is not what plain r / alpha would give (the patterns are exercised)', async () => {
    const c = REF_CASES[0]!;
    const { config } = await archDir('ref-plain', c.raw, 300);
    const uniform = loraTargets(config, { ...c.lora, rankPattern: undefined, alphaPattern: undefined });
    const patterned = loraTargets(config, c.lora);
    expect(new Set(uniform.map((t) => t.r))).toEqual(new Set([4]));
    expect(new Set(patterned.map((t) => t.r))).toEqual(new Set([2, 3, 4, 6]));
    const o = patterned.find((t) => t.module === 'model.layers.0.self_attn.o_proj')!;
    expect(o.scale).toBeCloseTo(20 / Math.sqrt(4), 12);
    const q2 = patterned.find((t) => t.module === 'model.layers.2.self_attn.q_proj')!;
    expect(q2.scale).toBeCloseTo(1.5 / Math.sqrt(4), 12);
  });
});

describe('gradients with per-module ranks (float64, central differences)', () => {
  for (const arch of ['llama', 'gpt2'] as const) {
    it(`${arch}: rank_pattern, alpha_pattern and layers_to_transform`, async () => {
      const model = randomModel(randomConfig(arch));
      const lora: LoraConfig =
        arch === 'gpt2'
          ? { r: 2, alpha: 4, dropout: 0, targetModules: ['c_attn', 'c_fc'], rankPattern: { c_fc: 5 }, alphaPattern: { 'h.1.attn.c_attn': 11 }, layersToTransform: [1] }
          : { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj', 'v_proj', 'down_proj'], rankPattern: { down_proj: 5, 'layers.1.self_attn.q_proj': 1 }, alphaPattern: { v_proj: 9 } };
      const engine = Engine.create(model, { mode: 'lora', lora, dtype: 'float64', threads: 1 });
      const params = engine.initParams(3);
      const rng = createRng(4);
      for (const [k, t] of params) if (k.endsWith('lora_B.weight')) for (let i = 0; i < t.data.length; i++) t.data[i] = 0.3 * rng.normal();
      const targets = loraTargets(model.config, lora);
      validateAdapter(params, targets);
      expect(params.size).toBe(2 * targets.length);
      expect(new Set(targets.map((t) => t.r)).size).toBeGreaterThan(1);
      const B = 2;
      const T = 6;
      const inputIds = Int32Array.from({ length: B * T }, () => rng.int(model.config.vocabSize));
      const { worst, checked } = await gradCheck(engine, params, { batchSize: B, seqLen: T, inputIds, labels: Int32Array.from(inputIds) }, 5);
      expect(checked).toBe(params.size);
      expect(worst).toBeLessThan(1e-6);
      await engine.close();
    });
  }
});

describe('refusals name the field, the key and what to do', () => {
  const llama = normalizeConfig(archRaw('llama', { num_hidden_layers: 3 }), 'llama');
  const base: LoraConfig = { r: 4, alpha: 8, dropout: 0, targetModules: ['q_proj', 'v_proj'] };
  const cases: [string, Partial<LoraConfig>, RegExp][] = [
    ['a key that matches no adapted module', { rankPattern: { k_proj: 2 } }, /lora\.rank_pattern: key "k_proj" matches none of the 6 adapted modules .*fix or remove it/],
    ['a key shadowed by an earlier one', { alphaPattern: { q_proj: 2, 'layers.0.self_attn.q_proj': 3 } }, /lora\.alpha_pattern: key "layers\.0\.self_attn\.q_proj" never applies: .*matched first by the earlier key "q_proj"/],
    ['a rank above min(in, out)', { rankPattern: { v_proj: 17 } }, /key "v_proj" gives model\.layers\.0\.self_attn\.v_proj rank 17, but it maps 32 -> 16 features, so its rank can be at most 16/],
    ['a rank that is not a positive integer', { rankPattern: { v_proj: 1.5 } }, /lora\.rank_pattern: key "v_proj" has rank 1\.5; a rank must be an integer >= 1/],
    ['an alpha <= 0', { alphaPattern: { v_proj: 0 } }, /lora\.alpha_pattern: key "v_proj" has alpha 0; alpha must be a number > 0/],
    ['a key that is not a regular expression', { rankPattern: { 'q_proj(': 2 } }, /lora\.rank_pattern: key "q_proj\(" is not a regular expression/],
    ['a layer out of range', { layersToTransform: [0, 3] }, /lora\.layers_to_transform: layer 3 is out of range; llama has 3 layers \(0 to 2\)/],
    ['a layers_pattern that names no layer list', { layersToTransform: [0], layersPattern: ['h'] }, /lora\.layers_pattern \["h"\] names no layer list of llama .*set layers_pattern to "layers"/],
    ['layers_pattern without layers_to_transform', { layersPattern: ['layers'] }, /layers_pattern is set but lora\.layers_to_transform is not/],
  ];
  for (const [what, over, re] of cases) {
    it(what, () => {
      expect(() => loraTargets(llama, { ...base, ...over })).toThrow(re);
    });
  }

  it('one uniform rank for per-module targets (FLoRA / FlexLoRA site ranks) is refused', () => {
    const t = loraTargets(llama, { ...base, rankPattern: { v_proj: 2 } });
    expect(adapterShapes(t, 4).get('base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight')).toEqual([2, 32]); // r = lora.r: the patterns stand
    expect(() => adapterShapes(t, 8)).toThrow(/one LoRA rank 8 for every module cannot be used with lora\.rank_pattern .*v_proj has rank 2 from rank_pattern key "v_proj"/);
  });

  it('an adapter at the wrong per-module rank names the key and the pattern that set it', async () => {
    const lora: LoraConfig = { ...base, rankPattern: { v_proj: 2 } };
    const wrong = randomAdapter(adapterShapes(loraTargets(llama, { ...base })), 1); // every module at r = 4
    await expect(writePeftAdapter(join(root, 'bad-rank'), wrong, { lora, baseModel: 'm' })).rejects.toThrow(
      /lora_A\.weight has shape \[4, 32\] \(rank 4\), expected \[2, in_features\]: rank_pattern key "v_proj" gives module model\.layers\.0\.self_attn\.v_proj rank 2/,
    );
    const extraLayer = randomAdapter(adapterShapes(loraTargets(llama, base)), 2);
    await expect(writePeftAdapter(join(root, 'bad-layer'), extraLayer, { lora: { ...base, layersToTransform: [1] }, baseModel: 'm' })).rejects.toThrow(
      /key base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight is for module model\.layers\.0\.self_attn\.q_proj in layer 0, but layers_to_transform is \[1\]/,
    );
  });
});

describe('fedtune train options', () => {
  it('--rank-pattern keeps the order and a comma inside a regex key', () => {
    expect(parsePatternOption('--rank-pattern', 'layers.0.self_attn.q_proj=2, q_proj=8', 'rank')).toEqual({ 'layers.0.self_attn.q_proj': 2, q_proj: 8 });
    expect(Object.keys(parsePatternOption('--rank-pattern', 'b=1,a=2', 'rank'))).toEqual(['b', 'a']);
    expect(parsePatternOption('--rank-pattern', 'layers\\.[0-9]{1,2}\\.mlp.down_proj=4', 'rank')).toEqual({ 'layers\\.[0-9]{1,2}\\.mlp.down_proj': 4 });
    expect(parsePatternOption('--alpha-pattern', 'o_proj=0.5', 'alpha')).toEqual({ o_proj: 0.5 });
  });

  it('refuses malformed values by name', () => {
    expect(() => parsePatternOption('--rank-pattern', 'q_proj', 'rank')).toThrow(/--rank-pattern: "q_proj" has no "=rank"/);
    expect(() => parsePatternOption('--rank-pattern', 'q_proj=two', 'rank')).toThrow(/--rank-pattern: key "q_proj" has rank "two", which is not a number/);
    expect(() => parsePatternOption('--rank-pattern', 'q_proj=0', 'rank')).toThrow(/a rank must be an integer >= 1/);
    expect(() => parsePatternOption('--rank-pattern', 'q_proj=2,q_proj=3', 'rank')).toThrow(/key "q_proj" is given twice/);
    expect(() => parsePatternOption('--alpha-pattern', 'q_proj=-1', 'alpha')).toThrow(/alpha must be a number > 0/);
    expect(parseLayerList('--layers-to-transform', '0, 2')).toEqual([0, 2]);
    expect(() => parseLayerList('--layers-to-transform', '0,x')).toThrow(/"x" is not a layer index/);
    expect(() => parseLayerList('--layers-to-transform', '1,1')).toThrow(/layer 1 is listed twice/);
  });
});
