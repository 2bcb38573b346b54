/**
 * Everything a distributed run needs before its first step: the dataset read,
 * checked and tokenized, the data order, the initial (or resumed) adapter and
 * optimizer state, and the checkpoint store. coordinator/main.ts calls this for
 * `mode: distributed` and serves the result over the same gRPC service as a
 * federated run.
 */
import { existsSync } from 'node:fs';
import type { RunConfig } from '../../common/config.ts';
import type { ModelInfo } from '../../common/hf-model.ts';
import { logger } from '../../common/log.ts';
import type { TensorMap } from '../../common/tensor.ts';
import type { LoraConfig } from '../../common/model-config.ts';
import { initLoraAdapter, validateAdapter, type LoraTarget } from '../../common/lora.ts';
import { readDoraMagnitudes } from '../../common/dora-norms.ts';
import { loadOptimizerState } from '../../common/optim.ts';
import { loadOuterState } from '../../common/outer.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { DataOrder, loadDistributedDataset, type DistributedDataset } from './plan.ts';
import type { CheckpointStore } from '../store.ts';
import { createStepStrategy, type StepStrategy } from '../strategies/steps.ts';
import type { StrategyState } from '../strategies/strategy.ts';
import { DIST_FORMAT, distributedStore, LEGACY_OPTIMIZER_FILE, LEGACY_OUTER_OPTIMIZER_FILE, type DataOrderIdentity, type DistributedStateFile } from './store.ts';

const log = logger('coordinator.distributed');

export interface DistributedSetup {
  store: CheckpointStore<DistributedStateFile>;
  data: DistributedDataset;
  order: DataOrder;
  global: TensorMap;
  strategy: StepStrategy;
  state: DistributedStateFile;
  resumed: boolean;
}

export async function setupDistributed(
  cfg: RunConfig,
  o: { model: ModelInfo; lora: LoraConfig; targets: LoraTarget[]; resume: boolean },
): Promise<DistributedSetup> {
  const d = cfg.distributed;
  const t = cfg.training;
  const tok = await loadTokenizer(cfg.model.path);
  const data = await loadDistributedDataset(d.dataset!, tok, { template: t.template, maxSeqLen: t.max_seq_len });
  if (data.droppedSources.length > 0) {
    const first = data.droppedSources.slice(0, 3).map((s) => `${s.file}:${s.line}`).join(', ');
    log.warn({ dropped: data.droppedSources.length }, `records dropped, their response does not fit in training.max_seq_len ${t.max_seq_len} (${first}${data.droppedSources.length > 3 ? ', ...' : ''})`);
  }
  const seed = d.sharding.seed ?? t.seed;
  const order = new DataOrder({ examples: data.examples.length, batchSize: t.batch_size, gradAccumulation: t.grad_accumulation, seed });
  const totalSteps = t.steps ?? order.stepsForEpochs(t.epochs ?? 1);
  const identity: DataOrderIdentity = {
    datasetSha256: data.sha256,
    examples: data.examples.length,
    batchSize: t.batch_size,
    gradAccumulation: t.grad_accumulation,
    seed,
    syncEvery: d.sync_every,
  };
  const store = distributedStore(cfg, o.targets.some((x) => x.conv1d));
  const removed = await store.cleanTemp();
  if (removed.length > 0) log.info({ removed }, 'removed temporary files a crash left behind');
  if (await store.hasOtherMode()) {
    throw new Error(`${store.runDir} holds federated round checkpoints: a distributed run needs its own name or checkpoint.dir`);
  }
  const strategy = createStepStrategy(cfg);

  const latest = await store.latest();
  if (latest && !o.resume) {
    throw new Error(`${store.runDir} already holds checkpoints up to step ${latest.n}: pass --resume to continue that run, or change name / checkpoint.dir to start a new one`);
  }
  if (latest) {
    const s = latest.state;
    if (s.modelFingerprint !== o.model.fingerprint) {
      throw new Error(`cannot resume ${store.runDir}: it was trained on base model ${s.modelFingerprint}, ${cfg.model.path} is ${o.model.fingerprint}`);
    }
    const field: Record<keyof DataOrderIdentity, string> = {
      datasetSha256: `distributed.dataset (${d.dataset} has changed since the checkpoint)`,
      examples: 'distributed.dataset / training.max_seq_len (the number of usable examples differs)',
      batchSize: 'training.batch_size',
      gradAccumulation: 'training.grad_accumulation',
      seed: 'distributed.sharding.seed / training.seed',
      syncEvery: 'distributed.sync_every',
    };
    for (const k of Object.keys(field) as Array<keyof DataOrderIdentity>) {
      if (s.order[k] !== identity[k]) {
        throw new Error(`cannot resume ${latest.dir}: ${field[k]} is ${String(identity[k])}, the run was started with ${String(s.order[k])}; the data order would differ`);
      }
    }
    const global = await store.loadAdapter(latest.dir);
    try {
      validateAdapter(global, o.targets); // each module at its own rank (lora.r or its rank_pattern entry)
    } catch (err) {
      throw new Error(`cannot resume from ${latest.dir}: the adapter does not fit the config's lora section: ${(err as Error).message}`);
    }
    const saved = (await store.readStrategyState(latest.dir)) ?? (await legacyStepState(latest.dir, strategy));
    if (saved) strategy.load(saved);
    else if (strategy.name === 'sync-sgd' && latest.n > 0) throw new Error(`cannot resume from ${latest.dir}: the optimizer state (strategy_state.safetensors) is missing`);
    const state: DistributedStateFile = { ...s, totalSteps };
    log.info({ step: latest.n, dir: latest.dir }, 'resuming after the last checkpoint');
    return { store, data, order, global, strategy, state, resumed: true };
  }
  if (o.resume) log.warn({ runDir: store.runDir }, '--resume given but no checkpoint exists yet: starting the run from step 0');
  // DoRA magnitudes start at ||W||_c, read from the checkpoint one targeted weight at a time.
  const global = initLoraAdapter(o.targets, undefined, t.seed, 'float32', await readDoraMagnitudes(o.model.dir, o.targets));
  const now = new Date().toISOString();
  const state: DistributedStateFile = {
    format: DIST_FORMAT,
    runId: cfg.name,
    name: cfg.name,
    mode: 'distributed',
    step: 0,
    totalSteps,
    globalVersion: 0,
    modelFingerprint: o.model.fingerprint,
    dataset: d.dataset!,
    order: identity,
    tokens: 0,
    recent: [],
    createdAt: now,
    updatedAt: now,
  };
  await store.write(state, global, { r: cfg.lora.r, alpha: cfg.lora.alpha }, { strategy: strategy.state() });
  return { store, data, order, global, strategy, state, resumed: false };
}

/** Checkpoints of earlier versions kept AdamW's or the outer optimizer's state in their own files. */
async function legacyStepState(dir: string, strategy: StepStrategy): Promise<StrategyState | null> {
  const file = `${dir}/${strategy.name === 'sync-sgd' ? LEGACY_OPTIMIZER_FILE : LEGACY_OUTER_OPTIMIZER_FILE}`;
  if (!existsSync(file)) return null;
  const s = strategy.name === 'sync-sgd' ? await loadOptimizerState(file) : await loadOuterState(file);
  const tensors: TensorMap = new Map();
  for (const [k, t] of s.m) tensors.set(`m.${k}`, t);
  for (const [k, t] of s.v) tensors.set(`v.${k}`, t);
  return { json: { kind: s.kind, step: s.step }, tensors };
}
