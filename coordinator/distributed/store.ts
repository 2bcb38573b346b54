/**
 * What a distributed run records: its state file (step, data order, dataset
 * digest, recent steps) and one record per step. Checkpoints themselves are
 * written by the run's CheckpointStore (coordinator/store.ts), as
 *
 *   CHECKPOINT_DIR/<run>/step-NNNNNN/
 *     adapter_config.json  adapter_model.safetensors   (PEFT: loads in Hugging Face PEFT as is)
 *     strategy_state.safetensors                        (AdamW moments for sync-sgd; outer momentum for local SGD)
 *     state.json
 *
 * every distributed.checkpoint_every steps and at the end; step-000000 holds
 * the initial adapter. Every step's record is also appended to
 * CHECKPOINT_DIR/<run>/steps.jsonl.
 */
import type { RunConfig } from '../../common/config.ts';
import { storeFor, type CheckpointStore } from '../store.ts';

/** Written by earlier versions next to the adapter; read on resume when strategy_state.safetensors is absent. */
export const LEGACY_OPTIMIZER_FILE = 'optimizer.safetensors';
export const LEGACY_OUTER_OPTIMIZER_FILE = 'outer_optimizer.safetensors';
export const STEPS_LOG = 'steps.jsonl';
export const DIST_FORMAT = 'fedtune.distributed-state/1';

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
  format: typeof DIST_FORMAT;
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

export function distributedStore(cfg: RunConfig, fanInFanOut: boolean): CheckpointStore<DistributedStateFile> {
  return storeFor<DistributedStateFile>(cfg, fanInFanOut, { unit: 'step', format: DIST_FORMAT, numberOf: (s) => s.step });
}
