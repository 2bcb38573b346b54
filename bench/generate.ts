/**
 * Generation benchmark: tokens/s of `fedtune generate`'s KV-cache path against
 * the recompute path (the whole sequence through the forward graph at every
 * step), measured in the same run on the 6-layer bench model of
 * bench/engine.ts (llama, hidden 384, 6 heads / 2 key-value heads), base
 * model alone and with a LoRA adapter (r 8 on every target module). Greedy
 * decoding of 64 new tokens after a 64-token prompt; graph building is
 * excluded (each path runs once untimed first), each figure is the median of
 * the timed repeats.
 *
 *   npm run bench:generate [-- --threads 2 --repeats 5 --prompt 64 --new 64]
 */
import { Generator } from '../worker/engine/generate.ts';
import { byteLevelTokenizer, initConfig, initWeights } from '../worker/engine/init.ts';
import { computeFingerprint } from '../common/hf-model.ts';
import { initLoraAdapter, loraTargets } from '../common/lora.ts';
import { createRng } from '../common/random.ts';
import type { LoadedModel, LoraConfig } from '../common/model-config.ts';
import type { TensorMap } from '../common/tensor.ts';

const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

async function main(): Promise<void> {
  const threads = arg('--threads', 2);
  const repeats = arg('--repeats', 5);
  const promptLen = arg('--prompt', 64);
  const newTokens = arg('--new', 64);
  const tok = byteLevelTokenizer('llama');
  const config = initConfig({ arch: 'llama', hiddenSize: 384, numLayers: 6, numHeads: 6, numKvHeads: 2, maxPositions: 512 }, tok);
  const weights = initWeights(config, 0);
  const model: LoadedModel = { dir: '<bench>', config, weights, fingerprint: computeFingerprint(config, weights) };
  const rng = createRng(1);
  const prompt = Array.from({ length: promptLen }, () => rng.int(config.vocabSize));

  const lora: LoraConfig = { r: 8, alpha: 16, dropout: 0, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] };
  const adapter: TensorMap = initLoraAdapter(loraTargets(config, lora), undefined, 2, 'float32');
  for (const [name, t] of adapter) if (name.includes('lora_B')) for (let j = 0; j < t.data.length; j++) t.data[j] = 0.02 * rng.normal();

  console.log(
    `fedtune generation benchmark: llama 6L/384h (${config.numHeads}/${config.numKvHeads} heads, vocab ${config.vocabSize}), ` +
      `prompt ${promptLen} tokens, ${newTokens} new tokens (greedy), ${threads} threads, median of ${repeats} after one untimed run`,
  );
  const rows: string[][] = [['model', 'path', 'tokens/s', 'ms/token', 'seconds', 'same tokens']];
  const ratios: string[] = [];
  for (const withAdapter of [false, true]) {
    const gen = new Generator(model, { threads, ...(withAdapter ? { adapter: { lora, params: adapter } } : {}) });
    // One untimed run of each path builds its graphs; then the timed repeats alternate
    // between the paths, so that a change in machine load hits both alike.
    const opts = (kvCache: boolean) => ({ maxNewTokens: newTokens, kvCache });
    const firstKv = await gen.generate(prompt, opts(true));
    const firstRe = await gen.generate(prompt, opts(false));
    const kvSecs: number[] = [];
    const reSecs: number[] = [];
    for (let i = 0; i < repeats; i++) {
      kvSecs.push((await gen.generate(prompt, opts(true))).seconds);
      reSecs.push((await gen.generate(prompt, opts(false))).seconds);
    }
    const kv = { secs: median(kvSecs), tps: firstKv.tokens.length / median(kvSecs), tokens: firstKv.tokens };
    const re = { secs: median(reSecs), tps: firstRe.tokens.length / median(reSecs), tokens: firstRe.tokens };
    await gen.close();
    const same = kv.tokens.length === re.tokens.length && kv.tokens.every((t, i) => t === re.tokens[i]);
    const name = withAdapter ? 'base + LoRA r8' : 'base';
    for (const [path, m] of [['KV cache', kv], ['recompute', re]] as const) {
      rows.push([name, path, m.tps.toFixed(1), ((1000 * m.secs) / kv.tokens.length).toFixed(2), m.secs.toFixed(3), same ? 'yes' : 'NO']);
    }
    ratios.push(`${name}: KV cache ${(kv.tps / re.tps).toFixed(2)}x the recompute path`);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  for (const r of rows) console.log(r.map((x, i) => x.padEnd(widths[i]!)).join('  '));
  for (const r of ratios) console.log(r);
  console.log('tokens/s = new tokens / (prefill + decode seconds); recompute runs the forward graph over a padded window of prompt + new tokens at every step');
}

await main();
