/**
 * Atomic file and directory writes: write into a temporary sibling, flush, then
 * rename into place, so that a reader sees either the old content or the new,
 * never half of it.
 */
import { mkdir, open, readdir, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';

function tmpName(path: string, tag: string): string {
  return join(dirname(path), `.${basename(path)}.${tag}-${process.pid}-${randomBytes(4).toString('hex')}`);
}

/** Write `data` to `path` through a temporary file in the same directory and a rename. */
export async function writeFileAtomic(path: string, data: Uint8Array | string): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
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
 * so `dir` never holds a mix of old and new files).
 */
export async function writeDirAtomic(
  dir: string,
  fill: (tmpDir: string) => Promise<void>,
  opts: { overwrite?: boolean } = {},
): Promise<void> {
  const existing = await isNonEmptyDir(dir);
  if (existing === true && !opts.overwrite) {
    throw new Error(`output directory ${dir} already exists and is not empty (choose another path or allow overwriting)`);
  }
  await mkdir(dirname(dir), { recursive: true });
  const tmp = tmpName(dir, 'tmp');
  await mkdir(tmp);
  try {
    await fill(tmp);
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
  let aside: string | null = null;
  try {
    if (existing !== null) {
      aside = tmpName(dir, 'old');
      await rename(dir, aside);
    }
    await rename(tmp, dir);
  } catch (err) {
    if (aside) await rename(aside, dir).catch(() => {});
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
  if (aside) await rm(aside, { recursive: true, force: true });
}
