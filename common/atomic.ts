/**
 * Atomic file and directory writes: write into a temporary sibling, fsync it,
 * rename it into place, fsync the parent directory, so that a reader (or a
 * machine after power loss) sees either the old content or the new, never half
 * of it. Temporary names end in `.tmp-<pid>-<hex>` / `.old-<pid>-<hex>`
 * (`isTempName`), so whoever owns the directory can clean up after a crash.
 */
import { mkdir, open, readdir, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { asWriteError, FileWriteError, mkdirp } from './fs-errors.ts';

function tmpName(path: string, tag: string): string {
  return join(dirname(path), `.${basename(path)}.${tag}-${process.pid}-${randomBytes(4).toString('hex')}`);
}

/** Whether a directory entry is a temporary left by writeFileAtomic / writeDirAtomic. */
export function isTempName(name: string): boolean {
  return name.startsWith('.') && /\.(tmp|old)-\d+-[0-9a-f]{8}/.test(name);
}

/** fsync a directory, so that the entries created or renamed in it are durable. */
export async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** fsync every file below `dir` and every directory, deepest first. */
async function syncTree(dir: string): Promise<void> {
  for (const e of await readdir(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) await syncTree(p);
    else if (e.isFile()) {
      const fh = await open(p, 'r');
      try {
        await fh.sync();
      } finally {
        await fh.close();
      }
    }
  }
  await syncDir(dir);
}

/**
 * Write `parts` one after another as the content of `path` (created or truncated; not atomic by
 * itself: for files inside a writeDirAtomic temporary, or behind a rename of one's own). Saves
 * joining large pieces into one buffer first.
 */
export async function writeParts(path: string, parts: readonly Uint8Array[]): Promise<void> {
  const fh = await open(path, 'w');
  try {
    for (const p of parts) {
      for (let off = 0; off < p.byteLength; ) {
        const { bytesWritten } = await fh.write(p, off, p.byteLength - off);
        off += bytesWritten;
      }
    }
  } finally {
    await fh.close();
  }
}

/**
 * Write `data` to `path` through a temporary file in the same directory and a
 * rename. A failure is a FileWriteError naming `path` and the reason (its
 * `code` is the errno code: ENOSPC, EROFS, ...).
 */
export async function writeFileAtomic(path: string, data: Uint8Array | string): Promise<void> {
  try {
    await writeFileThenRename(path, data);
  } catch (err) {
    throw asWriteError(path, err);
  }
}

async function writeFileThenRename(path: string, data: Uint8Array | string): Promise<void> {
  await mkdirp(dirname(path));
  const tmp = tmpName(path, 'tmp');
  const fh = await open(tmp, 'w');
  try {
    await fh.writeFile(data);
    await fh.sync();
  } catch (err) {
    await fh.close().catch(() => {});
    await rm(tmp, { force: true });
    throw err;
  }
  await fh.close();
  try {
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  await syncDir(dirname(path));
}

async function isNonEmptyDir(path: string): Promise<boolean | null> {
  try {
    const s = await stat(path);
    if (!s.isDirectory()) throw new Error(`${path} exists and is not a directory`);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  return (await readdir(path)).length > 0;
}

/**
 * Build a directory in a temporary sibling with `fill(tmpDir)`, then move it to
 * `dir`. An existing empty `dir` is replaced; a non-empty one is replaced only
 * with `overwrite` (the old one is moved aside first and removed afterwards,
 * so `dir` never holds a mix of old and new files). A file-system failure is a
 * FileWriteError naming `dir` (or the file in it) and the reason.
 */
export async function writeDirAtomic(
  dir: string,
  fill: (tmpDir: string) => Promise<void>,
  opts: { overwrite?: boolean } = {},
): Promise<void> {
  try {
    await buildThenRename(dir, fill, opts);
  } catch (err) {
    throw inFinalPlace(asWriteError(dir, err), dir);
  }
}

/** An error about a file in dir's temporary sibling, told about the file's final place (what the user will look for). */
function inFinalPlace(err: unknown, dir: string): unknown {
  if (!(err instanceof FileWriteError)) return err;
  const prefix = `${join(dirname(dir), `.${basename(dir)}.tmp-`)}`;
  if (!err.path.startsWith(prefix)) return err;
  const rest = err.path.slice(prefix.length).replace(/^\d+-[0-9a-f]{8}/, '');
  return new FileWriteError(join(dir, rest), err.cause, err.action);
}

async function buildThenRename(dir: string, fill: (tmpDir: string) => Promise<void>, opts: { overwrite?: boolean }): Promise<void> {
  const existing = await isNonEmptyDir(dir);
  if (existing === true && !opts.overwrite) {
    throw new Error(`output directory ${dir} already exists and is not empty (choose another path or allow overwriting)`);
  }
  await mkdirp(dirname(dir));
  const tmp = tmpName(dir, 'tmp');
  await mkdir(tmp);
  try {
    await fill(tmp);
    await syncTree(tmp);
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
  let aside: string | null = null;
  try {
    // An empty directory is replaced by the rename itself; a full one is moved aside first.
    if (existing === true) {
      aside = tmpName(dir, 'old');
      await rename(dir, aside);
    }
    await rename(tmp, dir);
  } catch (err) {
    if (aside) await rename(aside, dir).catch(() => {});
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
  await syncDir(dirname(dir));
  if (aside) await rm(aside, { recursive: true, force: true });
}
