/**
 * One owner per run directory. A coordinator takes `<runDir>/coordinator.lock`
 * (its pid, host and start time, created with O_EXCL) before it touches
 * anything in the directory, and removes it when it closes. A second
 * coordinator on the same directory is refused with a message naming the
 * holder. A lock left by a process that died (same host, pid no longer alive)
 * is stale: it is moved aside with an atomic rename, so of two coordinators
 * finding it stale only one takes it over.
 *
 * Written by hand rather than with a lock-file package: the holder's identity
 * in the refusal and pid-based staleness (no mtime heartbeat that a loaded
 * machine can miss) are the point.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';

export const LOCK_FILE = 'coordinator.lock';

interface Holder {
  pid: number;
  host: string;
  startedAt: string;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export class RunDirLock {
  private released = false;

  private constructor(readonly path: string) {}

  /** Take the lock of `runDir` (created if missing), or throw naming who holds it. */
  static async acquire(runDir: string): Promise<RunDirLock> {
    await mkdir(runDir, { recursive: true });
    const path = join(runDir, LOCK_FILE);
    const me: Holder = { pid: process.pid, host: hostname(), startedAt: new Date().toISOString() };
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        const fh = await open(path, 'wx');
        try {
          await fh.writeFile(`${JSON.stringify(me)}\n`);
          await fh.sync();
        } finally {
          await fh.close();
        }
        return new RunDirLock(path);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') {
          throw new Error(`cannot lock run directory ${runDir}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message} on ${path}`);
        }
      }
      const holder = await readHolder(path);
      if (holder === 'gone') continue;
      if (holder === 'unreadable') {
        // Being written right now, or left empty by a crash between create and write.
        const age = Date.now() - ((await stat(path).catch(() => null))?.mtimeMs ?? Date.now());
        if (age < 5000) {
          await new Promise((r) => setTimeout(r, 200));
          continue;
        }
      } else if (holder.host !== me.host || alive(holder.pid)) {
        throw new Error(
          `run directory ${runDir} is in use by a coordinator (pid ${holder.pid} on ${holder.host}, since ${holder.startedAt}): ` +
            `stop that coordinator first${holder.host !== me.host ? `, or, if it is gone for good, remove ${path}` : ''}`,
        );
      }
      // Stale: its holder is dead. Move it aside atomically; whoever wins the rename takes over.
      const aside = `${path}.stale-${process.pid}-${randomBytes(4).toString('hex')}`;
      try {
        await rename(path, aside);
        await rm(aside, { force: true });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      }
    }
    throw new Error(`cannot lock run directory ${runDir}: ${path} keeps changing hands; is another coordinator starting on it?`);
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    const holder = await readHolder(this.path);
    if (typeof holder === 'object' && holder.pid === process.pid && holder.host === hostname()) await rm(this.path, { force: true });
  }
}

async function readHolder(path: string): Promise<Holder | 'gone' | 'unreadable'> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 'gone';
    throw err;
  }
  try {
    const h = JSON.parse(text) as Holder;
    return Number.isInteger(h.pid) && typeof h.host === 'string' ? h : 'unreadable';
  } catch {
    return 'unreadable';
  }
}
