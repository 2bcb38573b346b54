import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { describe, expect, it, onTestFinished } from 'vitest';

const root = join(import.meta.dirname, '..', '..');

function files(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true, recursive: true })
    .filter((e) => e.isFile())
    .map((e) => relative(dir, join(e.parentPath, e.name)))
    .sort();
}

describe('generated protobuf code', () => {
  it('proto/gen and worker/engine/onnx/gen are what `npm run proto` generates (regenerate and commit if this fails)', () => {
    const out = mkdtempSync(join(tmpdir(), 'fedtune-proto-'));
    onTestFinished(() => rmSync(out, { recursive: true, force: true }));
    execFileSync('sh', [join(root, 'scripts', 'gen-proto.sh'), out], { cwd: root, stdio: 'pipe' });
    for (const dir of ['proto/gen', 'worker/engine/onnx/gen']) {
      const fresh = join(out, dir);
      const committed = join(root, dir);
      expect(files(committed)).toEqual(files(fresh));
      for (const f of files(fresh)) {
        expect(readFileSync(join(committed, f), 'utf8'), `${dir}/${f} is stale`).toBe(readFileSync(join(fresh, f), 'utf8'));
      }
    }
  });
});
