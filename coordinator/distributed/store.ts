/**
 * Checkpoints of a distributed run. After every K optimizer steps (and at the
 * end) one directory
 *
 *   CHECKPOINT_DIR/<run>/step-NNNNNN/
 *     adapter_config.json  adapter_model.safetensors   (PEFT: loads in Hugging Face PEFT as is)
 *     optimizer.safetensors                             (AdamW moments and step; synchronous steps)
 *     outer_optimizer.safetensors                       (Nesterov momentum; local SGD)
 *     state.json                                        (step, data order, dataset digest, recent steps)
 *
 * is built in a temporary sibling and renamed into place, so a step directory
 * that exists is complete. step-000000 holds the initial adapter. Every step's
 * record is also appended to CHECKPOINT_DIR/<run>/steps.jsonl.
 */
import { appendFile, mkdir, readdir, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { writeDirAtomic, writeFileAtomic } from '../../common/atomic.ts';
import { readPeftAdapter, writePeftAdapter } from '../../common/peft.ts';
import type { TensorMap } from '../../common/tensor.ts';
import type { LoraConfig } from '../../common/model-config.ts';
import { completeCheckpoints } from '../store.ts';

export const DIST_STATE_FILE = 'state.json';
export const OPTIMIZER_FILE = 'optimizer.safetensors';
export const OUTER_OPTIMIZER_FILE = 'outer_optimizer.safetensors';
export const STEPS_LOG = 'steps.jsonl';
const FORMAT = 'fedtune.distributed-state/1';

/** One completed step (or local SGD sync) as the run records it. */
export interface StepRecord {
  /** Optimizer steps completed after this one (1-based). */
  step: number;
  epoch: number;
  /** Global steps this record covers (1, or sync_every for local SGD). */
  steps: number;
  loss: number;
  lr: number;
  gradNorm: number | null;
  tokens: number;
  examples: number;
  workers: number;
  retries: number;
  durationMs: number;
  computeMs: number;
  communicateMs: number;
  aggregateMs: number;
  /** Bytes of updates received and of adapters and shards sent for this step. */
  bytesUp: number;
  bytesDown: number;
  completedAt: string;
}

/** What fixes the data order: resuming with any of it changed is refused. */
export interface DataOrderIdentity {
  datasetSha256: string;
  examples: number;
  batchSize: number;
  gradAccumulation: number;
  seed: number;
  syncEvery: number;
}

export interface DistributedStateFile {
  format: typeof FORMAT;
  runId: string;
  name: string;
  mode: 'distributed';
  /** Optimizer steps completed. */
  step: number;
  totalSteps: number;
  globalVersion: number;
  modelFingerprint: string;
  dataset: string;
  order: DataOrderIdentity;
  tokens: number;
  /** The last few step records (the full list is steps.jsonl). */
  recent: StepRecord[];
  createdAt: string;
  updatedAt: string;
}

export interface DistributedCheckpoint {
  step: number;
  dir: string;
  state: DistributedStateFile;
}

export function stepDirName(step: number): string {
  return `step-${String(step).padStart(6, '0')}`;
}

export class DistributedStore {
  readonly runDir: string;

  constructor(private readonly o: { root: string; runName: string; lora: LoraConfig; baseModel: string; fanInFanOut: boolean }) {
    this.runDir = join(o.root, o.runName);
  }

  stepDir(step: number): string {
    return join(this.runDir, stepDirName(step));
  }

  /** Complete step checkpoints on disk, ascending. */
  steps(): Promise<number[]> {
    return completeCheckpoints(this.runDir, /^step-(\d{6,})$/, DIST_STATE_FILE);
  }

  /** Whether the run directory holds federated round checkpoints (another mode's run). */
  async hasRounds(): Promise<boolean> {
    const names = await readdir(this.runDir).catch(() => [] as string[]);
    return names.some((n) => /^round-\d{4,}$/.test(n));
  }

  async latest(): Promise<DistributedCheckpoint | null> {
    const step = (await this.steps()).at(-1);
    if (step === undefined) return null;
    const dir = this.stepDir(step);
    const file = join(dir, DIST_STATE_FILE);
    let state: DistributedStateFile;
    try {
      state = JSON.parse(await readFile(file, 'utf8')) as DistributedStateFile;
    } catch (err) {
      throw new Error(`checkpoint ${file}: cannot read run state (${(err as Error).message})`);
    }
    if (state.format !== FORMAT || state.step !== step) throw new Error(`checkpoint ${file}: not a ${FORMAT} file for step ${step}`);
    return { step, dir, state };
  }

  async loadAdapter(dir: string): Promise<TensorMap> {
    return (await readPeftAdapter(dir)).adapter;
  }

  /** Write step `state.step` atomically; returns its directory and size in bytes. */
  async write(state: DistributedStateFile, adapter: TensorMap, saveExtra?: (dir: string) => Promise<unknown>): Promise<{ path: string; bytes: number }> {
    const dir = this.stepDir(state.step);
    await writeDirAtomic(
      dir,
      async (tmp) => {
        await writePeftAdapter(tmp, adapter, {
          lora: this.o.lora,
          baseModel: this.o.baseModel,
          fanInFanOut: this.o.fanInFanOut,
          extra: { fedtune_run: state.name, fedtune_step: state.step },
        });
        if (saveExtra) await saveExtra(tmp);
        await writeFileAtomic(join(tmp, DIST_STATE_FILE), `${JSON.stringify(state, null, 2)}\n`);
      },
      { overwrite: true },
    );
    let bytes = 0;
    for (const f of await readdir(dir)) bytes += (await stat(join(dir, f))).size;
    await writeFileAtomic(join(this.runDir, 'latest.json'), `${JSON.stringify({ step: state.step, path: dir }, null, 2)}\n`);
    return { path: dir, bytes };
  }

  async appendStep(rec: StepRecord): Promise<void> {
    await mkdir(this.runDir, { recursive: true });
    await appendFile(join(this.runDir, STEPS_LOG), `${JSON.stringify(rec)}\n`);
  }

  async cleanTemp(): Promise<void> {
    const names = await readdir(this.runDir).catch(() => [] as string[]);
    for (const n of names) if (/^\.step-\d+.*\.(tmp|old)-/.test(n)) await rm(join(this.runDir, n), { recursive: true, force: true });
  }
}
