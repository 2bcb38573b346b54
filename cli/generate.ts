/**
 * `fedtune generate`: continue a prompt with a model and an optional LoRA
 * adapter, with the KV cache (worker/engine/generate.ts). Prints the new text
 * on stdout and, on stderr, the prompt and new token counts and the
 * generation speed.
 */
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { intArg } from './args.ts';
import { loadModel } from '../worker/engine/model.ts';
import { loadBaseModel } from '../worker/engine/quantize.ts';
import { parseComputeDtype } from '../worker/engine/half.ts';
import { loadTokenizer } from '../common/tokenizer.ts';
import { readPeftAdapter } from '../common/peft.ts';
import { AUTO_TEMPLATE, getTemplate, loadChatTemplate, modelChatTemplate, renderRecord, type PromptTemplate } from '../common/data/template.ts';
import { Generator, readEosIds, validateGenerateOptions } from '../worker/engine/generate.ts';
import type { Device } from '../worker/engine/runtime.ts';

/** --template none: the prompt text is used as it is. */
export const RAW_TEMPLATE = 'none';

interface GenerateCliOpts {
  model: string;
  adapter?: string;
  prompt?: string;
  promptFile?: string;
  template: string;
  maxNewTokens: number;
  temperature: number;
  topK: number;
  topP: number;
  seed: number;
  stop?: string[];
  kvCache: boolean;
  threads?: number;
  device: Device;
  computeDtype?: string;
}

/** Any number; the ranges are checked by validateGenerateOptions, whose errors name the field. */
const anyNumber = (name: string) => (v: string): number => {
  const n = Number(v);
  if (v.trim() === '' || Number.isNaN(n)) throw new InvalidArgumentError(`${name} must be a number (got "${v}")`);
  return n;
};

/**
 * The text a template puts before the response to `text` (one user turn): the
 * generation prompt. Rendered with a placeholder response and cut where the
 * response starts.
 */
export function templatePrompt(template: PromptTemplate, text: string): string {
  const marker = '\u0000fedtune-response\u0000';
  const segs = renderRecord({ kind: 'alpaca', instruction: text, input: '', output: marker, source: { file: '<prompt>', line: 0, index: 0 }, meta: {} }, template);
  let out = '';
  for (const s of segs) {
    if (s.train) break;
    out += s.text;
  }
  return out;
}

async function generate(o: GenerateCliOpts): Promise<void> {
  if ((o.prompt === undefined) === (o.promptFile === undefined)) throw new Error('give the prompt with --prompt TEXT or --prompt-file FILE (one of them)');
  const text = o.prompt ?? (await readFile(o.promptFile!, 'utf8').catch((err: NodeJS.ErrnoException) => {
    throw new Error(`--prompt-file ${o.promptFile}: cannot read it (${err.code ?? err.message})`);
  }));
  const modelDir = resolve(o.model);
  const template = o.template === RAW_TEMPLATE ? null : o.template === AUTO_TEMPLATE ? modelChatTemplate(await loadChatTemplate(modelDir)) : getTemplate(o.template);
  const tok = await loadTokenizer(modelDir);
  const computeDtype = parseComputeDtype(o.computeDtype);
  if (computeDtype !== 'float32' && !o.adapter) throw new Error(`--compute-dtype ${computeDtype} generates with an adapter on ${computeDtype} base weights; give --adapter (the base alone runs in float32)`);
  const model = computeDtype !== 'float32' ? await loadBaseModel(modelDir, undefined, { compute: computeDtype }) : await loadModel(modelDir);
  const eosIds = await readEosIds(modelDir, tok.eosId);
  const outside = eosIds.filter((id) => id >= model.config.vocabSize);
  if (outside.length > 0) console.warn(`warning: EOS id${outside.length > 1 ? 's' : ''} ${outside.join(', ')} outside the model's vocabulary (${model.config.vocabSize}) ignored`);
  const options = {
    maxNewTokens: o.maxNewTokens,
    temperature: o.temperature,
    topK: o.topK,
    topP: o.topP,
    seed: o.seed,
    stopStrings: o.stop ?? [],
    eosIds: eosIds.filter((id) => id < model.config.vocabSize),
    decode: (ids: number[]) => tok.decode(ids, false),
    kvCache: o.kvCache,
  };
  validateGenerateOptions(options, model.config.vocabSize); // bad values fail before any graph is built
  if (o.temperature === 0 && (o.topK > 0 || o.topP < 1)) {
    console.warn('warning: --temperature 0 decodes greedily, so --top-k / --top-p change nothing; give --temperature > 0 to sample');
  }
  const adapter = o.adapter ? await readPeftAdapter(resolve(o.adapter)) : null;
  // A chat template writes the BOS itself; otherwise the prompt starts with the tokenizer's BOS, as in training.
  const addBos = !(template?.ownsSpecialTokens ?? false) && tok.bosId !== null;
  const prompt = [...(addBos ? [tok.bosId!] : []), ...tok.encode(template ? templatePrompt(template, text) : text)];
  const gen = new Generator(model, { ...(adapter ? { adapter: { lora: adapter.config, params: adapter.adapter } } : {}), threads: o.threads, device: o.device, computeDtype });
  try {
    const r = await gen.generate(prompt, options);
    process.stdout.write(`${r.text ?? ''}\n`);
    console.error(
      `prompt ${r.promptTokens} tokens, ${r.tokens.length} new tokens in ${r.seconds.toFixed(2)} s: ${r.tokensPerSec.toFixed(1)} tokens/s ` +
        `(${o.kvCache ? 'KV cache' : 'recompute'}; stopped by ${r.stopReason}; graphs built in ${r.buildSeconds.toFixed(2)} s)`,
    );
  } finally {
    await gen.close();
  }
}

export function register(program: Command): void {
  program
    .command('generate')
    .description('continue a prompt with a model and optional LoRA adapter (KV cache; greedy, temperature, top-k, top-p)')
    .requiredOption('--model <dir>', 'base model directory (Hugging Face layout)')
    .option('--adapter <dir>', 'PEFT LoRA adapter directory to apply')
    .option('--prompt <text>', 'prompt text')
    .option('--prompt-file <file>', 'read the prompt text from this file')
    .option('--template <name>', "prompt template: none (the text as is), alpaca, chatml, plain, or auto (the model's chat_template)", RAW_TEMPLATE)
    .option('--max-new-tokens <n>', 'most tokens to generate', intArg('--max-new-tokens', 1), 32)
    .option('--temperature <t>', 'sampling temperature (0: greedy decoding)', anyNumber('--temperature'), 0)
    .option('--top-k <k>', 'sample among the k most likely tokens (0: off)', anyNumber('--top-k'), 0)
    .option('--top-p <p>', 'nucleus sampling: the smallest set of likely tokens with probability >= p (1: off)', anyNumber('--top-p'), 1)
    .option('--seed <n>', 'sampling seed', anyNumber('--seed'), 0)
    .option('--stop <text...>', 'stop when the new text contains one of these (the output ends before it)')
    .option('--no-kv-cache', 'recompute the whole sequence at every step (slow; for comparison)')
    .option('--threads <n>', 'ONNX Runtime intra-op threads (default: one per core)', intArg('--threads', 1))
    .addOption(new Option('--device <d>', 'execution provider').choices(['cpu', 'cuda']).default('cpu'))
    .option('--compute-dtype <dtype>', 'float32 (default), float16 or bfloat16: the base model\'s matrices held in float16, or left in a bfloat16 checkpoint\'s files (with --adapter), as `fedtune train --compute-dtype` holds them')
    .action(async (o: GenerateCliOpts) => generate(o));
}
