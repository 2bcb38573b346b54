/**
 * Checkpoints and resume, for federated rounds and distributed steps alike.
 * Each checkpoint is one directory
 *
 *   CHECKPOINT_DIR/<run>/round-NNNN/   (federated)   or   step-NNNNNN/   (distributed)
 *     adapter_config.json  adapter_model.safetensors   PEFT: loads in Hugging Face PEFT as is
 *     strategy_state.safetensors                        server state of the strategy (moments, ranks), when it has any
 *     optimizer.safetensors / outer_optimizer.safetensors   distributed: AdamW / outer optimizer state
 *     state.json                                        run state (written last)
 *
 * built in a temporary sibling and renamed into place, so a directory that
 * exists is complete. Number 0 holds the initial adapter. `--resume` continues
 * after the highest complete checkpoint. state.json may be rewritten in place
 * (atomically) to add what became known after the checkpoint (a round's
 * evaluation).
 */
import { appendFile, mkdir, readdir, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { isTempName, writeDirAtomic, writeFileAtomic } from '../common/atomic.ts';
import type { LoraConfig } from '../common/model-config.ts';
import type { RunConfig } from '../common/config.ts';
import type { PhaseTimes, PrivacyReport } from '../common/events.ts';
import { faultPoint } from '../common/faults.ts';
import { readPeftAdapter, writePeftAdapter } from '../common/peft.ts';
import { readSafetensors, toFloat32, toFloat64, writeSafetensors, type StWriteEntry } from '../common/safetensors.ts';
import type { TensorMap } from '../common/tensor.ts';
import type { PrivacyState } from './privacy/ledger.ts';
import type { StrategyState } from './strategies/strategy.ts';
import { checkpointWriteError } from './checkpoint-errors.ts';
import { loraConfigOf } from '../common/lora-spec.ts';
import { logger } from '../common/log.ts';

const log = logger('store');

export const STATE_FILE = 'state.json';
export const STRATEGY_STATE_FILE = 'strategy_state.safetensors';
/** Written by earlier versions for fedavgm / fedadam / fedyogi; read on resume. */
export const LEGACY_SERVER_OPTIMIZER_FILE = 'server_optimizer.safetensors';
const STATE_FORMAT = 'fedtune.run-state/1';
const STRATEGY_FORMAT = 'fedtune.strategy-state/1';

export interface RoundRecord {
  round: number;
  globalVersion: number;
  /** LoRA rank of the global adapter after the round. */
  rank?: number;
  participants: number;
  examples: number;
  trainLoss: number | null;
  evalLoss: number | null;
  evalAccuracy: number | null;
  durationMs: number;
  bytesUp: number;
  bytesDown: number;
  retries: number;
  /** Updates refused this round (shapes, values, norm, weight), all attempts. */
  refused?: number;
  phases?: PhaseTimes;
  /** Privacy spent after the round (runs with privacy.client_dp or privacy.dp_sgd). */
  privacy?: PrivacyReport;
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
  /** L2 distances of the last round's accepted updates from their start (the defence's reference). */
  updateNorms?: number[];
  /** The privacy ledger after this round (coordinator/privacy/ledger.ts); resume continues from it. */
  privacy?: PrivacyState;
  createdAt: string;
  updatedAt: string;
}

/** `--resume` of a run that has done all its rounds (or steps): nothing was changed. */
export class RunAlreadyComplete extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RunAlreadyComplete';
  }
}

export interface Checkpoint<S> {
  /** Round or step number. */
  n: number;
  dir: string;
  state: S;
}

/** What a checkpoint's state.json must hold for the store to trust it. */
export interface StateShape {
  format: string;
}

export interface StoreOptions<S extends StateShape> {
  root: string;
  runName: string;
  /** `round` (round-NNNN) or `step` (step-NNNNNN). */
  unit: 'round' | 'step';
  /** The state file's format tag and the number it records (its round or step). */
  format: string;
  numberOf: (s: S) => number;
  baseModel: string;
  fanInFanOut: boolean;
  /** The run's LoRA config written to adapter_config.json (dropout, target modules, PEFT variants); r and alpha come with each adapter. */
  lora: Omit<LoraConfig, 'r' | 'alpha'>;
  /** checkpoint.keep_last: keep only the newest K checkpoints; null or absent: every one. */
  keepLast?: number | null;
}

export function roundDirName(round: number): string {
  return `round-${String(round).padStart(4, '0')}`;
}

export function stepDirName(step: number): string {
  return `step-${String(step).padStart(6, '0')}`;
}

export class CheckpointStore<S extends StateShape> {
  readonly runDir: string;

  constructor(private readonly o: StoreOptions<S>) {
    this.runDir = join(o.root, o.runName);
  }

  get unit(): 'round' | 'step' {
    return this.o.unit;
  }

  dir(n: number): string {
    return join(this.runDir, this.o.unit === 'round' ? roundDirName(n) : stepDirName(n));
  }

  /** Numbers of the complete checkpoints (their state.json exists: it is written last), ascending. */
  async list(): Promise<number[]> {
    return this.listUnit(this.o.unit);
  }

  private async listUnit(unit: 'round' | 'step'): Promise<number[]> {
    const pattern = unit === 'round' ? /^round-(\d{4,})$/ : /^step-(\d{6,})$/;
    let names: string[];
    try {
      names = await readdir(this.runDir);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    const out: number[] = [];
    for (const n of names) {
      const m = pattern.exec(n);
      if (m && (await stat(join(this.runDir, n, STATE_FILE)).catch(() => null))) out.push(Number(m[1]));
    }
    return out.sort((a, b) => a - b);
  }

  /** Whether the run directory holds checkpoints of the other mode (a federated run's rounds in a distributed run's place, or the reverse). */
  async hasOtherMode(): Promise<boolean> {
    return (await this.listUnit(this.o.unit === 'round' ? 'step' : 'round')).length > 0;
  }

  /** The highest complete checkpoint, or null when the run has none. */
  async latest(): Promise<Checkpoint<S> | null> {
    const n = (await this.list()).at(-1);
    if (n === undefined) return null;
    const dir = this.dir(n);
    const file = join(dir, STATE_FILE);
    let state: S;
    try {
      state = JSON.parse(await readFile(file, 'utf8')) as S;
    } catch (err) {
      throw new Error(`checkpoint ${file}: cannot read run state (${(err as Error).message})`);
    }
    if (state.format !== this.o.format || this.o.numberOf(state) !== n) {
      throw new Error(`checkpoint ${file}: not a ${this.o.format} file for ${this.o.unit} ${n}`);
    }
    return { n, dir, state };
  }

  async loadAdapter(dir: string): Promise<TensorMap> {
    return (await readPeftAdapter(dir)).adapter;
  }

  /**
   * Write checkpoint numberOf(state) atomically: the PEFT adapter (rank r,
   * alpha), the strategy's state, any extra files, then state.json. Returns its
   * directory and size in bytes. A failure says which checkpoint, why, what
   * is on disk and what to do (checkpoint-errors.ts).
   */
  async write(
    state: S,
    adapter: TensorMap,
    lora: { r: number; alpha: number },
    o: { strategy?: StrategyState | null; extra?: (dir: string) => Promise<unknown> } = {},
  ): Promise<{ path: string; bytes: number }> {
    try {
      return await this.writeCheckpoint(state, adapter, lora, o);
    } catch (err) {
      throw await checkpointWriteError(this, this.o.numberOf(state), err);
    }
  }

  private async writeCheckpoint(
    state: S,
    adapter: TensorMap,
    lora: { r: number; alpha: number },
    o: { strategy?: StrategyState | null; extra?: (dir: string) => Promise<unknown> } = {},
  ): Promise<{ path: string; bytes: number }> {
    const n = this.o.numberOf(state);
    const dir = this.dir(n);
    await writeDirAtomic(
      dir,
      async (tmp) => {
        await writePeftAdapter(tmp, adapter, {
          lora: { ...this.o.lora, r: lora.r, alpha: lora.alpha },
          baseModel: this.o.baseModel,
          fanInFanOut: this.o.fanInFanOut,
        });
        if (o.strategy && (o.strategy.tensors.size > 0 || Object.keys(o.strategy.json).length > 0)) {
          await writeStrategyState(join(tmp, STRATEGY_STATE_FILE), o.strategy);
        }
        if (o.extra) await o.extra(tmp);
        faultPoint('checkpoint.before-state', n);
        await writeFileAtomic(join(tmp, STATE_FILE), `${JSON.stringify(state, null, 2)}\n`);
        faultPoint('checkpoint.before-rename', n);
      },
      { overwrite: true },
    );
    faultPoint('checkpoint.before-latest', n);
    const bytes = await this.sizeOf(n);
    await writeFileAtomic(join(this.runDir, 'latest.json'), `${JSON.stringify({ [this.o.unit]: n, path: dir }, null, 2)}\n`).catch(async (err: unknown) => {
      throw await checkpointWriteError(this, n, err, 'latest.json');
    });
    await this.prune(n);
    return { path: dir, bytes };
  }

  /**
   * checkpoint.keep_last K: remove the checkpoints older than the newest K, once checkpoint `newest`
   * is durable and latest.json names it. A checkpoint that cannot be removed is logged and left (the
   * run goes on: nothing it needs is lost).
   */
  private async prune(newest: number): Promise<void> {
    const k = this.o.keepLast;
    if (!k) return;
    const all = await this.list();
    for (const n of all.slice(0, Math.max(0, all.length - k))) {
      if (n >= newest) continue;
      await rm(this.dir(n), { recursive: true, force: true }).catch((err: NodeJS.ErrnoException) =>
        log.warn({ checkpoint: this.dir(n), code: err.code ?? err.message }, `checkpoint.keep_last ${k}: could not remove an older checkpoint; remove it by hand`),
      );
    }
  }

  /** Whether checkpoint n is on disk (checkpoint.keep_last removes older ones). */
  async has(n: number): Promise<boolean> {
    return (await stat(join(this.dir(n), STATE_FILE)).catch(() => null)) !== null;
  }

  /** Bytes of checkpoint n on disk. */
  async sizeOf(n: number): Promise<number> {
    let bytes = 0;
    for (const f of await readdir(this.dir(n))) bytes += (await stat(join(this.dir(n), f))).size;
    return bytes;
  }

  /** Replace state.json of an existing checkpoint (atomically), e.g. with the round's evaluation added. */
  async updateState(state: S): Promise<void> {
    await writeFileAtomic(join(this.dir(this.o.numberOf(state)), STATE_FILE), `${JSON.stringify(state, null, 2)}\n`).catch(async (err: unknown) => {
      throw await checkpointWriteError(this, this.o.numberOf(state), err, STATE_FILE);
    });
  }

  /** The strategy state saved with a checkpoint, or null when it has none. */
  async readStrategyState(dir: string): Promise<StrategyState | null> {
    const path = join(dir, STRATEGY_STATE_FILE);
    if (!(await stat(path).catch(() => null))) return null;
    return readStrategyState(path);
  }

  /** Append one JSON line to a log file of the run directory (steps.jsonl). */
  async appendLog(file: string, record: unknown): Promise<void> {
    await mkdir(this.runDir, { recursive: true });
    await appendFile(join(this.runDir, file), `${JSON.stringify(record)}\n`);
  }

  /**
   * Remove every temporary entry a crash left behind (checkpoint directories
   * being built or moved aside, latest.json being replaced). Only the holder of
   * the run directory's lock may call this: a live coordinator's temporaries
   * look the same.
   */
  async cleanTemp(): Promise<string[]> {
    const names = await readdir(this.runDir).catch(() => [] as string[]);
    const removed = names.filter(isTempName);
    for (const n of removed) await rm(join(this.runDir, n), { recursive: true, force: true });
    return removed;
  }
}

/** Strategy state as safetensors: tensors as they are (F32 / F64), the JSON part in the metadata. */
export async function writeStrategyState(path: string, s: StrategyState): Promise<void> {
  const tensors = new Map<string, StWriteEntry>();
  for (const [k, t] of s.tensors) tensors.set(k, { dtype: t.data instanceof Float64Array ? 'F64' : 'F32', shape: [...t.shape], data: t.data });
  await writeSafetensors(path, tensors, { format: STRATEGY_FORMAT, state: JSON.stringify(s.json), order: JSON.stringify([...s.tensors.keys()]) });
}

export async function readStrategyState(path: string): Promise<StrategyState> {
  const f = await readSafetensors(path);
  if (f.metadata.format !== STRATEGY_FORMAT) throw new Error(`${path}: not a strategy state file (metadata "format" is ${JSON.stringify(f.metadata.format ?? null)})`);
  let json: Record<string, unknown>;
  let order: string[];
  try {
    json = JSON.parse(f.metadata.state ?? '{}') as Record<string, unknown>;
    order = JSON.parse(f.metadata.order ?? '[]') as string[];
  } catch {
    throw new Error(`${path}: metadata "state" or "order" is not valid JSON`);
  }
  const tensors: TensorMap = new Map();
  for (const name of [...order, ...[...f.tensors.keys()].filter((k) => !order.includes(k))]) {
    const e = f.tensors.get(name);
    if (!e) throw new Error(`${path}: tensor ${name} is listed in the metadata but missing`);
    if (e.dtype !== 'F32' && e.dtype !== 'F64') throw new Error(`${path}: tensor ${name} has dtype ${e.dtype}, expected F32 or F64`);
    tensors.set(name, { shape: [...e.shape], data: e.dtype === 'F64' ? toFloat64(e) : toFloat32(e) });
  }
  return { json, tensors };
}

/** The checkpoint store of a run: its directory, unit, state format and the LoRA fields of its adapters. */
export function storeFor<S extends StateShape>(
  cfg: RunConfig,
  fanInFanOut: boolean,
  kind: { unit: 'round' | 'step'; format: string; numberOf: (s: S) => number },
): CheckpointStore<S> {
  return new CheckpointStore<S>({
    root: cfg.checkpoint.dir,
    runName: cfg.name,
    ...kind,
    baseModel: cfg.model.path,
    fanInFanOut,
    lora: loraConfigOf(cfg.lora),
    keepLast: cfg.checkpoint.keep_last,
  });
}

export function federatedStore(cfg: RunConfig, fanInFanOut: boolean): CheckpointStore<RunStateFile> {
  return storeFor<RunStateFile>(cfg, fanInFanOut, { unit: 'round', format: STATE_FORMAT, numberOf: (s) => s.round });
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
    updateNorms: [],
    createdAt: now,
    updatedAt: now,
  };
}
