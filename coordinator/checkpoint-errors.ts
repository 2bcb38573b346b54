/**
 * What a failed checkpoint write means for the run, in one message: which
 * checkpoint, where, why, what is safely on disk, and what to do.
 *
 *   cannot write checkpoint round-0003 in /x/run (ENOSPC: the disk is full);
 *   the run stopped after round 2, which is on disk: free space on the disk
 *   that holds /x/run and restart with --resume
 *
 * The store calls this where it knows the checkpoint; errors that are not
 * file-system errors (a bug, a validation error) pass through unchanged.
 */
import { randomBytes } from 'node:crypto';
import { rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { errnoCode, FileWriteError, fsReason, fsRemedy, mkdirp } from '../common/fs-errors.ts';

export interface CheckpointPlace {
  readonly runDir: string;
  readonly unit: 'round' | 'step';
  /** Directory name of checkpoint n (round-0003). */
  dir(n: number): string;
  /** Numbers of the complete checkpoints on disk, ascending. */
  list(): Promise<number[]>;
}

/**
 * The error to throw when writing checkpoint `n` failed with `err`. `part`
 * names what was being written when it is not the checkpoint directory itself
 * (latest.json, state.json of an existing checkpoint).
 */
export async function checkpointWriteError(store: CheckpointPlace, n: number, err: unknown, part?: string): Promise<unknown> {
  const code = errnoCode(err);
  if (code === undefined || err instanceof CheckpointWriteError) return err;
  const name = store.dir(n).slice(store.runDir.length + 1) || store.dir(n);
  const what = part ? `${part} of checkpoint ${name}` : `checkpoint ${name}`;
  const onDisk = await store.list().catch(() => [] as number[]);
  const last = (part ? onDisk.filter((k) => k <= n) : onDisk.filter((k) => k < n)).at(-1);
  const head = `cannot write ${what} in ${store.runDir} (${fsReason(err)})`;
  const message =
    last === undefined
      ? `${head}; no checkpoint of this run is on disk yet: ${fsRemedy(code, dirname(store.runDir))} (or choose another checkpoint.dir) and start the run again`
      : `${head}; the run stopped after ${store.unit} ${last}, which is on disk: ${fsRemedy(code, store.runDir)} and restart with --resume`;
  return new CheckpointWriteError(message, code, err);
}

/** A checkpoint that could not be written; `code` is the errno code of the cause. */
export class CheckpointWriteError extends Error {
  constructor(
    message: string,
    readonly code: string,
    cause: unknown,
  ) {
    super(message, { cause });
    this.name = 'CheckpointWriteError';
  }
}

/**
 * Create the run directory (CHECKPOINT_DIR/<name>) if needed and check that a
 * file can be created in it, before a run starts: a read-only or misplaced
 * checkpoint.dir is refused naming the field and the directory, not later by
 * whichever write happens first.
 */
export async function ensureRunDir(runDir: string): Promise<void> {
  try {
    await mkdirp(runDir);
    // A temporary name (isTempName) so that a crash right here leaves nothing cleanTemp would not remove.
    const probe = join(runDir, `.write-check.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
    try {
      await writeFile(probe, '');
    } catch (err) {
      throw new FileWriteError(runDir, err, 'create files in');
    }
    await rm(probe, { force: true });
  } catch (err) {
    const code = errnoCode(err);
    if (code === undefined) throw err;
    const at = err instanceof FileWriteError ? err.path : runDir;
    const what = err instanceof FileWriteError ? err.message : `cannot create ${runDir} (${fsReason(err)})`;
    // A directory that could not be created needs its parent fixed; one that cannot take files, itself.
    const fix = err instanceof FileWriteError && err.action === 'create the directory' ? dirname(at) : at;
    throw new CheckpointWriteError(
      `checkpoint.dir: ${what}; ${fsRemedy(code, fix)}, or choose another checkpoint.dir (--checkpoint-dir)`,
      code,
      err,
    );
  }
}
