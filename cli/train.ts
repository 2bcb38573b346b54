/**
 * Single-machine commands on the engine:
 *   fedtune train     train a LoRA adapter (or every weight with --full) on one machine
 *   fedtune generate  continue a prompt with a model and optional adapter
 *   fedtune eval      loss, perplexity and accuracy of a model/adapter on a dataset
 */
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Command, Option } from 'commander';
import { intArg, numArg } from './args.ts';
import cliProgress from 'cli-progress';
import type { TensorMap } from '../common/tensor.ts';
import { writeFileAtomic } from '../common/atomic.ts';
import { readPeftAdapter, writePeftAdapter } from '../common/peft.ts';
import { LLAMA_TARGET_MODULES, GPT2_TARGET_MODULES, type LoadedModel, type LoraConfig } from '../common/model-config.ts';
import { Engine } from '../worker/engine/engine.ts';
import { loadModel, saveModel } from '../worker/engine/model.ts';
import { loadTokenizer } from '../common/tokenizer.ts';
import { AdamW, SCHEDULE_KINDS, loadOptimizerState, saveOptimizerState, type ScheduleKind } from '../common/optim.ts';
import { trainLoop } from '../worker/engine/train.ts';
import { makeBatches } from '../worker/data/batching.ts';
import { prepareDataset } from '../worker/data/prepare.ts';
import { getTemplate } from '../common/data/template.ts';


interface TrainOpts {
  model: string;
  data: string;
  out: string;
  evalData?: string;
  evalFraction: number;
  template: string;
  full?: boolean;
  loraR: number;
  loraAlpha: number;
  loraDropout: number;
  targetModules?: string;
  steps?: number;
  epochs?: number;
  batchSize: number;
  gradAccum: number;
  lr: number;
  schedule: ScheduleKind;
  warmup: number;
  weightDecay: number;
  maxGradNorm: number;
  maxSeqLen: number;
  threads?: number;
  device: 'cpu' | 'cuda';
  seed: number;
  resume?: boolean;
  initAdapter?: string;
}

interface TrainerState {
  step: number;
  totalSteps: number;
  mode: 'lora' | 'full';
  history: Array<{ step: number; loss: number; lr: number }>;
  evals: Array<{ step: number; loss: number; perplexity: number; exactMatch: number }>;
}

export function loraFromOptions(model: LoadedModel, o: { loraR: number; loraAlpha: number; loraDropout: number; targetModules?: string }): LoraConfig {
  const all = model.config.family === 'gpt2' ? GPT2_TARGET_MODULES : LLAMA_TARGET_MODULES;
  const targetModules = o.targetModules ? o.targetModules.split(',').map((s) => s.trim()).filter(Boolean) : [...all];
  return { r: o.loraR, alpha: o.loraAlpha, dropout: o.loraDropout, targetModules };
}

async function train(o: TrainOpts): Promise<void> {
  getTemplate(o.template); // unknown template: fail before loading anything
  if (o.steps !== undefined && o.epochs !== undefined) throw new Error('give --steps or --epochs, not both');
  const model = await loadModel(o.model);
  const tok = await loadTokenizer(o.model);
  const mode = o.full ? 'full' : 'lora';
  const lora = mode === 'lora' ? loraFromOptions(model, o) : undefined;
  const engine = Engine.create(model, { mode, lora, threads: o.threads, device: o.device, seed: o.seed });
  const data = await prepareDataset(o.data, tok, { template: o.template, maxSeqLen: o.maxSeqLen, evalFraction: o.evalData ? 0 : o.evalFraction, seed: o.seed });
  const evalSet = o.evalData ? (await prepareDataset(o.evalData, tok, { template: o.template, maxSeqLen: o.maxSeqLen, seed: o.seed })).train : data.eval;
  const batchesPerEpoch = Math.ceil(data.train.length / o.batchSize);
  const totalSteps = o.steps ?? Math.max(1, Math.ceil(((o.epochs ?? 1) * batchesPerEpoch) / o.gradAccum));
  console.log(
    `fedtune train: ${model.config.modelType} ${mode === 'lora' ? `LoRA r=${lora!.r} alpha=${lora!.alpha} on ${lora!.targetModules.join(',')}` : 'full fine-tuning'}; ` +
      `${data.train.length} train / ${evalSet.length} eval examples${data.dropped ? ` (${data.dropped} dropped: too long)` : ''}; ${totalSteps} steps`,
  );

  let params: TensorMap;
  const optimizer = new AdamW({ lr: o.lr, weightDecay: o.weightDecay });
  let state: TrainerState = { step: 0, totalSteps, mode, history: [], evals: [] };
  const statePath = join(o.out, 'trainer_state.json');
  if (o.resume && existsSync(statePath)) {
    state = JSON.parse(await readFile(statePath, 'utf8')) as TrainerState;
    if (state.mode !== mode) throw new Error(`--resume: ${o.out} holds a ${state.mode} run, not ${mode}`);
    params = mode === 'lora' ? (await readPeftAdapter(o.out)).adapter : (await loadModel(o.out)).weights;
    optimizer.load(await loadOptimizerState(join(o.out, 'optimizer.safetensors')));
    console.log(`resuming at step ${state.step} of ${state.totalSteps}`);
  } else if (o.initAdapter) {
    if (mode !== 'lora') throw new Error('--init-adapter applies to LoRA training, not --full');
    params = (await readPeftAdapter(o.initAdapter)).adapter;
  } else {
    params = engine.initParams(o.seed);
  }
  const remaining = state.totalSteps - state.step;
  if (remaining <= 0) {
    console.log('nothing to do: the run already reached its last step');
    return;
  }

  const evalBatches = evalSet.length
    ? makeBatches(evalSet, { batchSize: o.batchSize, padId: tok.padId, shuffle: false, seed: 0, maxSeqLen: o.maxSeqLen })
    : [];
  const bar = new cliProgress.SingleBar(
    { format: 'train [{bar}] {value}/{total} steps | loss {loss} | lr {lr} | {tps} tok/s | eta {eta_formatted}', hideCursor: true, noTTYOutput: true, notTTYSchedule: 2000 },
    cliProgress.Presets.shades_classic,
  );
  bar.start(state.totalSteps, state.step, { loss: '-', lr: '-', tps: '-' });
  const save = async (): Promise<void> => {
    if (mode === 'lora') {
      await writePeftAdapter(o.out, params, { lora: lora!, baseModel: o.model, fanInFanOut: model.config.family === 'gpt2' });
    } else {
      await saveModel(o.out, { config: model.config, rawConfig: model.rawConfig, weights: params }, join(o.model, 'tokenizer.json'), { overwrite: true });
    }
    await saveOptimizerState(join(o.out, 'optimizer.safetensors'), optimizer.state());
    await writeFileAtomic(statePath, JSON.stringify(state, null, 2));
  };
  const startStep = state.step;
  const result = await trainLoop({
    engine,
    params,
    epochBatches: (epoch) => makeBatches(data.train, { batchSize: o.batchSize, padId: tok.padId, shuffle: true, seed: o.seed * 1000 + epoch, maxSeqLen: o.maxSeqLen }),
    steps: remaining,
    gradAccumulation: o.gradAccum,
    optimizer,
    schedule: { kind: o.schedule, baseLr: o.lr, warmupSteps: o.warmup, totalSteps: state.totalSteps },
    scheduleOffset: startStep,
    maxGradNorm: o.maxGradNorm,
    onStep: (s) => {
      state.step = startStep + s.step;
      state.history.push({ step: state.step, loss: s.loss, lr: s.lr });
      bar.update(state.step, { loss: s.loss.toFixed(4), lr: s.lr.toExponential(2), tps: Math.round(s.tokensPerSec) });
    },
  });
  bar.stop();
  if (evalBatches.length) {
    const r = await engine.evaluate(params, evalBatches);
    state.evals.push({ step: state.step, loss: r.loss, perplexity: r.perplexity, exactMatch: r.exactMatch });
    console.log(`eval: loss ${r.loss.toFixed(4)}  perplexity ${r.perplexity.toFixed(2)}  exact match ${(100 * r.exactMatch).toFixed(1)}%  (${r.examples} examples)`);
  }
  await save();
  console.log(
    `trained ${result.steps} steps in ${result.seconds.toFixed(1)} s (${Math.round(result.tokens / result.seconds)} tok/s); ` +
      `mean loss ${result.meanLoss.toFixed(4)}, last ${result.lastLoss.toFixed(4)}; wrote ${o.out}`,
  );
  await engine.close();
}

async function withAdapter(modelDir: string, adapterDir: string | undefined, threads?: number): Promise<{ engine: Engine; params: TensorMap }> {
  const model = await loadModel(modelDir);
  if (!adapterDir) {
    const engine = Engine.create(model, { mode: 'full', threads });
    return { engine, params: model.weights };
  }
  const a = await readPeftAdapter(adapterDir);
  const engine = Engine.create(model, { mode: 'lora', lora: a.config, threads });
  return { engine, params: a.adapter };
}

export function register(program: Command): void {
  program
    .command('train')
    .description('train a LoRA adapter (or the full model) on one machine: the single-machine baseline')
    .requiredOption('--model <dir>', 'base model directory (Hugging Face layout)')
    .requiredOption('--data <file>', 'training data: JSON array or JSONL of Alpaca or chat records')
    .requiredOption('--out <dir>', 'output directory (PEFT adapter, or full model with --full)')
    .option('--eval-data <file>', 'held-out data (default: split off --eval-fraction of --data)')
    .option('--eval-fraction <f>', 'fraction of --data held out for evaluation', numArg('--eval-fraction', 0, 1), 0.1)
    .option('--template <name>', 'prompt template: alpaca, chatml, plain', 'alpaca')
    .option('--full', 'train every weight (full fine-tuning or pre-training) instead of LoRA')
    .option('--lora-r <n>', 'LoRA rank', intArg('--lora-r', 1), 8)
    .option('--lora-alpha <n>', 'LoRA alpha (scale alpha/r)', numArg('--lora-alpha', 0), 16)
    .option('--lora-dropout <p>', 'dropout on the LoRA input', numArg('--lora-dropout', 0, 1), 0.05)
    .option('--target-modules <list>', 'comma-separated modules (default: all of the architecture)')
    .option('--steps <n>', 'optimizer steps', intArg('--steps', 1))
    .option('--epochs <n>', 'epochs over the training data (default 1 when --steps is not given)', numArg('--epochs', 0))
    .option('--batch-size <n>', 'sequences per micro-batch', intArg('--batch-size', 1), 8)
    .option('--grad-accum <n>', 'micro-batches per optimizer step', intArg('--grad-accum', 1), 1)
    .option('--lr <x>', 'peak learning rate', numArg('--lr', 0), 2e-4)
    .addOption(new Option('--schedule <kind>', 'learning-rate schedule').choices([...SCHEDULE_KINDS]).default('cosine'))
    .option('--warmup <n>', 'warmup steps', intArg('--warmup', 0), 0)
    .option('--weight-decay <x>', 'AdamW decoupled weight decay', numArg('--weight-decay', 0), 0)
    .option('--max-grad-norm <x>', 'clip the global gradient norm (0: off)', numArg('--max-grad-norm', 0), 1)
    .option('--max-seq-len <n>', 'truncate sequences to this many tokens', intArg('--max-seq-len', 1), 256)
    .option('--threads <n>', 'ONNX Runtime intra-op threads (default: one per core)', intArg('--threads', 1))
    .addOption(new Option('--device <d>', 'execution provider').choices(['cpu', 'cuda']).default('cpu'))
    .option('--seed <n>', 'seed for initialization, shuffling and dropout', intArg('--seed', 0), 0)
    .option('--init-adapter <dir>', 'start from this PEFT adapter instead of a fresh one')
    .option('--resume', 'continue the run saved in --out (adapter, optimizer state, step)')
    .action(async (o: TrainOpts) => train(o));

  program
    .command('generate')
    .description('continue a prompt with a model and optional LoRA adapter')
    .requiredOption('--model <dir>', 'base model directory')
    .option('--adapter <dir>', 'PEFT adapter directory')
    .requiredOption('--prompt <text>', 'prompt text (used as is; apply a template yourself)')
    .option('--max-new-tokens <n>', 'tokens to generate', intArg('--max-new-tokens', 1), 32)
    .option('--temperature <t>', '0 for greedy decoding', numArg('--temperature', 0), 0)
    .option('--top-k <k>', 'sample among the k most likely tokens (0: all)', intArg('--top-k', 0), 0)
    .option('--seed <n>', 'sampling seed', intArg('--seed', 0), 0)
    .action(async (o: { model: string; adapter?: string; prompt: string; maxNewTokens: number; temperature: number; topK: number; seed: number }) => {
      const tok = await loadTokenizer(o.model);
      const { engine, params } = await withAdapter(o.model, o.adapter);
      const prompt = [...(tok.bosId !== null ? [tok.bosId] : []), ...tok.encode(o.prompt)];
      const out = await engine.generate(params, prompt, { maxNewTokens: o.maxNewTokens, temperature: o.temperature, topK: o.topK, seed: o.seed, eosId: tok.eosId, padId: tok.padId });
      console.log(tok.decode(out, true));
      await engine.close();
    });

  program
    .command('eval')
    .description('evaluation loss, perplexity and exact-match accuracy of a model (and adapter) on a dataset')
    .requiredOption('--model <dir>', 'base model directory')
    .option('--adapter <dir>', 'PEFT adapter directory')
    .requiredOption('--data <file>', 'JSON array or JSONL of Alpaca or chat records')
    .option('--template <name>', 'prompt template', 'alpaca')
    .option('--max-seq-len <n>', 'truncate sequences to this many tokens', intArg('--max-seq-len', 1), 256)
    .option('--batch-size <n>', 'sequences per batch', intArg('--batch-size', 1), 8)
    .action(async (o: { model: string; adapter?: string; data: string; template: string; maxSeqLen: number; batchSize: number }) => {
      const tok = await loadTokenizer(o.model);
      const { engine, params } = await withAdapter(o.model, o.adapter);
      const data = await prepareDataset(o.data, tok, { template: o.template, maxSeqLen: o.maxSeqLen });
      const r = await engine.evaluate(params, makeBatches(data.train, { batchSize: o.batchSize, padId: tok.padId, shuffle: false, seed: 0, maxSeqLen: o.maxSeqLen }));
      console.log(JSON.stringify(r, null, 2));
      await engine.close();
    });
}
