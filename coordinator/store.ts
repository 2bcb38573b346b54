/**
 * Checkpoints and resume. Each completed round k is one directory
 *
 *   CHECKPOINT_DIR/<run>/round-NNNN/
 *     adapter_config.json  adapter_model.safetensors   (PEFT: loads in Hugging Face PEFT as is)
 *     state.json                                        (round, history, worker stats, run identity)
 *     server_optimizer.safetensors                      (fedavgm / fedadam / fedyogi only)
 *
 * built in a temporary sibling and renamed into place, so a round directory
 * that exists is complete. round-0000 holds the initial adapter. `--resume`
 * continues after the highest complete round.
 */
import { readdir, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { writeDirAtomic, writeFileAtomic } from '../common/atomic.ts';
import type { RunConfig } from '../common/config.ts';
import { readPeftAdapter, writePeftAdapter } from '../common/peft.ts';
import type { TensorMap } from '../common/tensor.ts';
import type { LoraConfig } from '../common/model-config.ts';

export const STATE_FILE = 'state.json';
export const SERVER_OPTIMIZER_FILE = 'server_optimizer.safetensors';
const STATE_FORMAT = 'fedtune.run-state/1';

export interface RoundRecord {
  round: number;
  globalVersion: number;
  participants: number;
  examples: number;
  trainLoss: number | null;
  evalLoss: number | null;
  evalAccuracy: number | null;
  durationMs: number;
  bytesUp: number;
  bytesDown: number;
  retries: number;
  completedAt: string;
}

export interface WorkerStats {
  site: string;
  rounds: number;
  examples: number;
  bytesUp: number;
  bytesDown: number;
  rejected: number;
  failed: number;
}

export interface RunStateFile {
  format: typeof STATE_FORMAT;
  runId: string;
  name: string;
  round: number;
  globalVersion: number;
  modelFingerprint: string;
  /** Eval of the initial adapter (round 0), when it was run. */
  baseline: { evalLoss: number | null; evalAccuracy: number | null } | null;
  history: RoundRecord[];
  /** Keyed by site name (worker ids change on every connection). */
  workers: Record<string, WorkerStats>;
  createdAt: string;
  updatedAt: string;
}

export interface Checkpoint {
  round: number;
  dir: string;
  state: RunStateFile;
}

export function roundDirName(round: number): string {
  return `round-${String(round).padStart(4, '0')}`;
}

/**
 * Numbers of the checkpoint directories in runDir whose names match `pattern`
 * (one capture group: the number) and that hold `stateFile`, which is written
 * last, so a directory without it is incomplete. Ascending.
 */
export async function completeCheckpoints(runDir: string, pattern: RegExp, stateFile: string): Promise<number[]> {
  let names: string[];
  try {
    names = await readdir(runDir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
  const out: number[] = [];
  for (const n of names) {
    const m = pattern.exec(n);
    if (m && (await stat(join(runDir, n, stateFile)).catch(() => null))) out.push(Number(m[1]));
  }
  return out.sort((a, b) => a - b);
}

export class CheckpointStore {
  readonly runDir: string;
  private readonly lora: LoraConfig;
  private readonly baseModel: string;
  private readonly fanInFanOut: boolean;

  constructor(opts: { root: string; runName: string; lora: LoraConfig; baseModel: string; fanInFanOut: boolean }) {
    this.runDir = join(opts.root, opts.runName);
    this.lora = opts.lora;
    this.baseModel = opts.baseModel;
    this.fanInFanOut = opts.fanInFanOut;
  }

  roundDir(round: number): string {
    return join(this.runDir, roundDirName(round));
  }

  /** Complete rounds on disk, ascending. */
  rounds(): Promise<number[]> {
    return completeCheckpoints(this.runDir, /^round-(\d{4,})$/, STATE_FILE);
  }

  /** The highest complete round, or null when the run has none. */
  async latest(): Promise<Checkpoint | null> {
    const rounds = await this.rounds();
    const round = rounds.at(-1);
    if (round === undefined) return null;
    const dir = this.roundDir(round);
    const file = join(dir, STATE_FILE);
    let state: RunStateFile;
    try {
      state = JSON.parse(await readFile(file, 'utf8')) as RunStateFile;
    } catch (err) {
      throw new Error(`checkpoint ${file}: cannot read run state (${(err as Error).message})`);
    }
    if (state.format !== STATE_FORMAT || state.round !== round) {
      throw new Error(`checkpoint ${file}: not a ${STATE_FORMAT} file for round ${round}`);
    }
    return { round, dir, state };
  }

  async loadAdapter(dir: string): Promise<TensorMap> {
    return (await readPeftAdapter(dir)).adapter;
  }

  /** Write round `state.round` atomically; returns its directory and size in bytes. */
  async write(
    state: RunStateFile,
    adapter: TensorMap,
    saveExtra?: (dir: string) => Promise<unknown>,
  ): Promise<{ path: string; bytes: number }> {
    const dir = this.roundDir(state.round);
    await writeDirAtomic(
      dir,
      async (tmp) => {
        await writePeftAdapter(tmp, adapter, {
          lora: this.lora,
          baseModel: this.baseModel,
          fanInFanOut: this.fanInFanOut,
          extra: { fedtune_run: state.name, fedtune_round: state.round },
        });
        if (saveExtra) await saveExtra(tmp);
        await writeFileAtomic(join(tmp, STATE_FILE), `${JSON.stringify(state, null, 2)}\n`);
      },
      { overwrite: true },
    );
    let bytes = 0;
    for (const f of await readdir(dir)) bytes += (await stat(join(dir, f))).size;
    await writeFileAtomic(join(this.runDir, 'latest.json'), `${JSON.stringify({ round: state.round, path: dir }, null, 2)}\n`);
    return { path: dir, bytes };
  }

  /** Remove temporary directories a crash left behind. */
  async cleanTemp(): Promise<void> {
    let names: string[] = [];
    try {
      names = await readdir(this.runDir);
    } catch {
      return;
    }
    for (const n of names) if (/^\.round-\d+.*\.(tmp|old)-/.test(n)) await rm(join(this.runDir, n), { recursive: true, force: true });
  }
}

export function newRunState(cfg: RunConfig, modelFingerprint: string): RunStateFile {
  const now = new Date().toISOString();
  return {
    format: STATE_FORMAT,
    runId: cfg.name,
    name: cfg.name,
    round: 0,
    globalVersion: 0,
    modelFingerprint,
    baseline: null,
    history: [],
    workers: {},
    createdAt: now,
    updatedAt: now,
  };
}
