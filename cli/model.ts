/**
 * `fedtune model init|inspect`: create tiny random Hugging Face models and
 * describe existing model directories.
 */
import { Command, Option } from 'commander';
import { intArg } from './args.ts';
import { readdir } from 'node:fs/promises';
import { resolve } from 'node:path';
import { INIT_ARCHS, initModel, type InitArch } from '../worker/engine/init.ts';
import { inspectModel, type ModelDtype } from '../common/hf-model.ts';
import { loadTokenizer } from '../common/tokenizer.ts';


/** Refuse a non-empty output directory unless --force was given. */
export async function checkOutDir(dir: string, force: boolean | undefined): Promise<void> {
  if (force) return;
  const entries = await readdir(dir).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return [] as string[];
    if (err.code === 'ENOTDIR') throw new Error(`--out ${dir} exists and is not a directory`);
    throw err;
  });
  if (entries.length > 0) throw new Error(`--out ${dir} already exists and is not empty; pass --force to replace it`);
}


interface InitOpts {
  arch: InitArch;
  out: string;
  hidden: number;
  layers: number;
  heads: number;
  kvHeads?: number;
  intermediate?: number;
  maxPositions: number;
  dtype: ModelDtype;
  seed: number;
  tied?: boolean;
  shards: number;
  force?: boolean;
}

function formatCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}K`;
  return String(n);
}

export function register(program: Command): void {
  const model = program.command('model').description('create and inspect Hugging Face model directories');

  model
    .command('init')
    .description('write a tiny random model (config.json, safetensors, byte-level BPE tokenizer.json)')
    .addOption(new Option('--arch <arch>', 'architecture').choices([...INIT_ARCHS]).makeOptionMandatory())
    .requiredOption('--out <dir>', 'output model directory (must not exist or be empty, unless --force)')
    .option('--hidden <n>', 'hidden size', intArg('--hidden', 1), 64)
    .option('--layers <n>', 'number of layers', intArg('--layers', 1), 2)
    .option('--heads <n>', 'attention heads', intArg('--heads', 1), 4)
    .option('--kv-heads <n>', 'key/value heads (llama family; default: half the heads when even)', intArg('--kv-heads', 1))
    .option('--intermediate <n>', 'MLP size (default: 4*hidden for gpt2, 8/3*hidden rounded up to 8 otherwise)', intArg('--intermediate', 1))
    .option('--max-positions <n>', 'maximum sequence length', intArg('--max-positions', 1), 512)
    .addOption(new Option('--dtype <dtype>', 'storage dtype of the weights').choices(['float32', 'float16', 'bfloat16']).default('float32'))
    .option('--seed <n>', 'random seed', intArg('--seed', 0), 0)
    .option('--tied', 'tie lm_head to the input embeddings (always on for gpt2)')
    .option('--shards <n>', 'write a sharded checkpoint with this many files', intArg('--shards', 1), 1)
    .option('--force', 'replace a non-empty output directory')
    .action(async (o: InitOpts) => {
      const gpt2 = o.arch === 'gpt2';
      const kvHeads = gpt2 ? o.kvHeads : (o.kvHeads ?? (o.heads % 2 === 0 ? o.heads / 2 : o.heads));
      const out = resolve(o.out);
      await checkOutDir(out, o.force);
      await initModel(out, {
        arch: o.arch,
        hiddenSize: o.hidden,
        numLayers: o.layers,
        numHeads: o.heads,
        numKvHeads: kvHeads,
        intermediateSize: o.intermediate,
        maxPositions: o.maxPositions,
        tieWordEmbeddings: gpt2 ? true : (o.tied ?? false),
        seed: o.seed,
        dtype: o.dtype,
        shards: o.shards,
        overwrite: o.force ?? false,
      });
      const m = await inspectModel(out);
      const params = m.parameterCount;
      const c = m.config;
      console.log(`wrote ${c.modelType} model to ${out}`);
      console.log(
        `  hidden ${c.hiddenSize}, layers ${c.numLayers}, heads ${c.numHeads}/${c.numKvHeads} kv, intermediate ${c.intermediateSize}, ` +
          `vocab ${c.vocabSize}, max positions ${c.maxPositions}, tied ${c.tieWordEmbeddings}`,
      );
      console.log(`  ${formatCount(params)} parameters, ${o.dtype}, ${o.shards === 1 ? 'model.safetensors' : `${o.shards} shards`}, tokenizer.json`);
      console.log(`  fingerprint ${m.fingerprint}`);
    });

  model
    .command('inspect')
    .description('show architecture, parameter count and fingerprint of a model directory')
    .argument('<dir>', 'Hugging Face model directory')
    .option('--json', 'print JSON')
    .action(async (dir: string, o: { json?: boolean }) => {
      const m = await inspectModel(resolve(dir));
      const tok = await loadTokenizer(resolve(dir));
      const params = m.parameterCount;
      const info = {
        dir: m.dir,
        modelType: m.config.modelType,
        family: m.config.family,
        config: m.config,
        torchDtype: m.rawConfig.torch_dtype ?? null,
        parameters: params,
        weights: m.shapes.size,
        bytesOnDisk: m.bytesOnDisk,
        tokenizer: { vocabSize: tok.vocabSize, bosId: tok.bosId, eosId: tok.eosId, padId: tok.padId },
        fingerprint: m.fingerprint,
      };
      if (o.json) {
        console.log(JSON.stringify(info, null, 2));
        return;
      }
      const c = m.config;
      console.log(`${info.dir}`);
      console.log(`  architecture     ${c.modelType} (family ${c.family})`);
      console.log(`  layers           ${c.numLayers}`);
      console.log(`  hidden           ${c.hiddenSize} (intermediate ${c.intermediateSize}, ${c.activation})`);
      console.log(`  heads            ${c.numHeads} query, ${c.numKvHeads} key/value, head dim ${c.headDim}`);
      console.log(`  vocab            ${c.vocabSize} (tokenizer ${tok.vocabSize}; bos ${tok.bosId}, eos ${tok.eosId}, pad ${tok.padId})`);
      console.log(`  max positions    ${c.maxPositions}`);
      if (c.family === 'llama') console.log(`  rope theta       ${c.ropeTheta}, rms eps ${c.normEps}, qkv bias ${c.qkvBias}`);
      else console.log(`  layer norm eps   ${c.normEps}`);
      console.log(`  tied embeddings  ${c.tieWordEmbeddings}`);
      console.log(`  dtype on disk    ${String(info.torchDtype ?? 'unknown')}`);
      console.log(`  parameters       ${formatCount(params)} (${params}) in ${m.shapes.size} tensors (${formatCount(m.bytesOnDisk)}B on disk)`);
      console.log(`  fingerprint      ${m.fingerprint}`);
    });
}
