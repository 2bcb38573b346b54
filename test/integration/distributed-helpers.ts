/**
 * Shared pieces of the distributed-mode integration tests: a tiny model, a
 * dataset of uneven records, run configs, worker processes, and the
 * single-process reference (worker/engine/train.ts trainLoop) that N workers
 * must reproduce.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { RunConfig } from '../../common/config.ts';
import { parseRunConfig } from '../../common/config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { makeBatches } from '../../worker/data/batching.ts';
import { prepareDataset } from '../../worker/data/prepare.ts';
import { Engine } from '../../worker/engine/engine.ts';
import { initModel } from '../../worker/engine/init.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { AdamW } from '../../common/optim.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { trainLoop } from '../../worker/engine/train.ts';
import { fedtune, type Proc } from './federated-helpers.ts';

export async function tinyLlama(dir: string): Promise<string> {
  await initModel(dir, { arch: 'llama', hiddenSize: 32, numLayers: 1, numHeads: 4, numKvHeads: 2, maxPositions: 128, overwrite: true, seed: 1 });
  return dir;
}

/** n Alpaca records of uneven length (so that balancing by tokens matters). */
export function writeDataset(path: string, n: number): string {
  const words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta'];
  const lines: string[] = [];
  for (let i = 0; i < n; i++) {
    const w = words[i % words.length]!;
    lines.push(JSON.stringify({ instruction: `Say ${w}${' again'.repeat(i % 4)}`, output: `${w} `.repeat(1 + (i % 3)).trim() }));
  }
  writeFileSync(path, `${lines.join('\n')}\n`);
  return path;
}

export function distConfig(dir: string, modelDir: string, dataset: string, over: Record<string, unknown> = {}): RunConfig {
  const sect = (k: string): Record<string, unknown> => (typeof over[k] === 'object' && over[k] !== null ? (over[k] as Record<string, unknown>) : {});
  return parseRunConfig({
    ...over,
    name: (over.name as string | undefined) ?? 'dist',
    mode: 'distributed',
    model: { path: modelDir },
    lora: { r: 4, alpha: 8, dropout: 0, target_modules: ['q_proj', 'v_proj'], ...sect('lora') },
    training: { steps: 4, batch_size: 2, grad_accumulation: 3, lr: 0.01, max_seq_len: 96, template: 'plain', seed: 7, ...sect('training') },
    distributed: { dataset, checkpoint_every: 2, step_deadline_sec: 60, ...sect('distributed') },
    cohort: { min_workers: 1, wait_timeout_sec: 60, ...sect('cohort') },
    checkpoint: { dir: join(dir, 'checkpoints') },
    server: { listen: '127.0.0.1:0', join_token: 'test-token', heartbeat_interval_ms: 300, heartbeat_timeout_ms: 4000, ...sect('server') },
    dashboard: { enabled: false },
    events: { log: false },
  });
}

/** A `fedtune worker` process for a distributed run (no local data). */
export function distWorker(address: string, site: string, model: string, extra: string[] = []): Proc {
  return fedtune(['worker', '--coordinator', address, '--name', site, '--model', model, '--token', 'test-token', '--trainer', 'onnx', '--threads', '1', '--progress', 'log', ...extra]);
}

/** What one process computes with trainLoop on the same data, order and settings. */
export async function referenceTraining(cfg: RunConfig, steps = cfg.training.steps!): Promise<TensorMap> {
  const t = cfg.training;
  const model = await loadModel(cfg.model.path);
  const tok = await loadTokenizer(cfg.model.path);
  const data = await prepareDataset(cfg.distributed.dataset!, tok, { template: t.template, maxSeqLen: t.max_seq_len, evalFraction: 0 });
  const lora = { r: cfg.lora.r, alpha: cfg.lora.alpha, dropout: cfg.lora.dropout, targetModules: [...cfg.lora.target_modules] };
  const engine = Engine.create(model, { mode: 'lora', lora, threads: 1, seed: t.seed });
  const params = engine.initParams(t.seed);
  const seed = cfg.distributed.sharding.seed ?? t.seed;
  try {
    await trainLoop({
      engine,
      params,
      epochBatches: (e) => makeBatches(data.train, { batchSize: t.batch_size, padId: tok.padId, shuffle: true, seed: seed * 1000 + e, maxSeqLen: t.max_seq_len }),
      steps,
      gradAccumulation: t.grad_accumulation,
      optimizer: new AdamW({ lr: t.lr, weightDecay: t.weight_decay }),
      schedule: { kind: t.schedule, baseLr: t.lr, warmupSteps: t.warmup_steps, totalSteps: cfg.training.steps! },
      maxGradNorm: t.max_grad_norm,
    });
  } finally {
    await engine.close();
  }
  return params;
}

/** Largest |a - b| over every element of every tensor (throws when the names differ). */
export function maxAbsDiff(a: TensorMap, b: TensorMap): number {
  const names = [...a.keys()].sort();
  if (names.join() !== [...b.keys()].sort().join()) throw new Error(`tensor names differ: ${names.join()} vs ${[...b.keys()].sort().join()}`);
  let m = 0;
  for (const [k, t] of a) {
    const u = b.get(k)!.data;
    for (let i = 0; i < t.data.length; i++) m = Math.max(m, Math.abs(t.data[i]! - u[i]!));
  }
  return m;
}

