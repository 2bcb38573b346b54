/**
 * Fingerprint of everything the built dashboard (dashboard/dist) is made from:
 * the app sources, index.html, the Vite config and the uPlot version. The build
 * writes it to dist/build-info.json; a test recomputes it and fails when the
 * committed dist is stale.
 */
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

export const DASHBOARD_DIR = fileURLToPath(new URL('.', import.meta.url));
export const DIST_DIR = join(DASHBOARD_DIR, 'dist');
export const BUILD_INFO_FILE = 'build-info.json';

/** Files (relative to dashboard/) the build depends on, sorted. */
export function sourceFiles(): string[] {
  const out: string[] = [];
  const walk = (dir: string): void => {
    for (const name of readdirSync(dir)) {
      const p = join(dir, name);
      if (statSync(p).isDirectory()) walk(p);
      else out.push(relative(DASHBOARD_DIR, p).split(sep).join('/'));
    }
  };
  walk(join(DASHBOARD_DIR, 'src'));
  out.push('index.html', 'vite.config.ts', 'build-info.ts');
  return out.sort();
}

export function sourceHash(): string {
  const h = createHash('sha256');
  for (const f of sourceFiles()) {
    // Normalise line endings so a checkout with CRLF gives the same hash.
    h.update(`${f}\n`).update(readFileSync(join(DASHBOARD_DIR, f), 'utf8').replace(/\r\n/g, '\n')).update('\n');
  }
  const uplot = JSON.parse(readFileSync(join(DASHBOARD_DIR, '..', 'node_modules', 'uplot', 'package.json'), 'utf8')) as { version: string };
  h.update(`uplot@${uplot.version}\n`);
  return h.digest('hex');
}
