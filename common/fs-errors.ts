/**
 * File-system errors a user can act on. Node's own messages name the system
 * call ("ENOSPC: no space left on device, write") but not the file, the
 * purpose or the remedy; these helpers put the path and a plain reason into
 * the message where the write happens, and keep the errno code (`code`) so
 * that callers higher up, who know more (which checkpoint, which round), can
 * build their own message from it.
 *
 *   await mkdirp(dir);                       // mkdir -p that reports the real reason (EROFS, EACCES, ENOTDIR)
 *   throw new FileWriteError(path, err);     // "cannot write PATH (ENOSPC: the disk is full)"
 *   errnoCode(err)                           // 'ENOSPC', also through FileWriteError and `cause` chains
 */
import { mkdirSync, statSync } from 'node:fs';
import { dirname, resolve } from 'node:path';

/** What an errno code means for someone writing a file, in words. */
const REASONS: Readonly<Record<string, string>> = {
  ENOSPC: 'the disk is full',
  EDQUOT: 'the disk quota is exhausted',
  EROFS: 'the file system is read-only',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  ENOTDIR: 'a component of the path is a file, not a directory',
  EISDIR: 'it is a directory',
  ENOENT: 'a directory on the way does not exist',
  EEXIST: 'something else already exists there',
  EMFILE: 'too many open files in this process',
  ENFILE: 'too many open files on this machine',
  EIO: 'an I/O error on the device',
  ENAMETOOLONG: 'the name is too long',
  EFBIG: 'the file is larger than the file system allows',
};

/** The errno code of an error, looking through FileWriteError and `cause` chains (undefined for other errors). */
export function errnoCode(err: unknown): string | undefined {
  for (let e: unknown = err, depth = 0; e && typeof e === 'object' && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && /^E[A-Z0-9]+$/.test(code)) return code;
  }
  return undefined;
}

/** "ENOSPC: the disk is full"; for an error without an errno code, its message. */
export function fsReason(err: unknown): string {
  const code = errnoCode(err);
  if (code === undefined) return err instanceof Error ? err.message : String(err);
  return `${code}: ${REASONS[code] ?? ((err as Error).message ?? code).replace(/^E[A-Z0-9]+: /, '').replace(/, \w+( '.*')?$/, '')}`;
}

/** What to do about a failed write with this errno code, as an imperative phrase ("free space on the disk"). */
export function fsRemedy(code: string | undefined, where: string): string {
  switch (code) {
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return `free space on the disk that holds ${where}`;
    case 'EROFS':
    case 'EACCES':
    case 'EPERM':
      return `make ${where} writable for this user`;
    case 'ENOTDIR':
    case 'EEXIST':
      return `move the file that is in the way of ${where}`;
    case 'EMFILE':
    case 'ENFILE':
      return 'raise the open-file limit (ulimit -n)';
    default:
      return `check ${where}`;
  }
}

/** A write that failed, naming the file (or directory) and why. `code` is the errno code of the cause. */
export class FileWriteError extends Error {
  readonly path: string;
  readonly code: string | undefined;
  /** What could not be done to `path` ("write", "create the directory"). */
  readonly action: string;
  constructor(path: string, cause: unknown, action = 'write') {
    super(`cannot ${action} ${path} (${fsReason(cause)})`, { cause });
    this.name = 'FileWriteError';
    this.path = path;
    this.code = errnoCode(cause);
    this.action = action;
  }
}

/** `err` as a FileWriteError about `path`, unless it already is one or is not a file-system error (returned as is). */
export function asWriteError(path: string, err: unknown, what = 'write'): unknown {
  if (err instanceof FileWriteError || errnoCode(err) === undefined) return err;
  return new FileWriteError(path, err, what);
}

/** The error for a path component that exists but is a file. */
const notADirectory = (p: string): FileWriteError =>
  new FileWriteError(p, Object.assign(new Error(`ENOTDIR: not a directory, mkdir '${p}'`), { code: 'ENOTDIR' }), 'create directories under');

/**
 * mkdir -p whose error names the directory that could not be created and the
 * real reason. Node's recursive mkdir reports ENOENT for a directory it could
 * not create on a read-only file system; on any failure this walks up to the
 * deepest existing ancestor and creates the rest one by one, so the error is
 * the one of the directory that really failed (EROFS, EACCES, ENOTDIR, ...).
 */
export async function mkdirp(dir: string): Promise<void> {
  // A few stat/mkdir calls at most: the synchronous walk below serves both.
  mkdirpSync(dir);
}

/** mkdirp, synchronously. */
export function mkdirpSync(dir: string): void {
  try {
    mkdirSync(dir, { recursive: true });
    return;
  } catch (err) {
    const missing: string[] = [];
    let p = resolve(dir);
    for (;;) {
      let s: ReturnType<typeof statSync> | null = null;
      try {
        s = statSync(p);
      } catch {
        s = null;
      }
      if (s) {
        if (!s.isDirectory()) throw notADirectory(p);
        break;
      }
      missing.unshift(p);
      if (dirname(p) === p) break;
      p = dirname(p);
    }
    if (missing.length === 0) throw asWriteError(dir, err, 'create the directory');
    for (const m of missing) {
      try {
        mkdirSync(m);
      } catch (e) {
        if (errnoCode(e) !== 'EEXIST') throw asWriteError(m, e, 'create the directory');
      }
    }
  }
}
