import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative, sep } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

const root = join(import.meta.dirname, '..', '..');
const inCI = process.env.CI === 'true' || process.env.CI === '1';

/** Files under dir, relative and sorted; Python's __pycache__ (written when the package is imported) is not part of it. */
function files(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true, recursive: true })
    .filter((e) => e.isFile())
    .map((e) => relative(dir, join(e.parentPath, e.name)))
    .filter((f) => !f.split(sep).includes('__pycache__'))
    .sort();
}

function expectSame(fresh: string, committed: string, dir: string): void {
  expect(files(committed)).toEqual(files(fresh));
  for (const f of files(fresh)) {
    expect(readFileSync(join(committed, f), 'utf8'), `${dir}/${f} is stale`).toBe(readFileSync(join(fresh, f), 'utf8'));
  }
}

const onPath = (cmd: string): boolean => spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
const pythonTools = onPath('protoc') && onPath('grpc_python_plugin');

describe('generated protobuf code', () => {
  const out = mkdtempSync(join(tmpdir(), 'fedtune-proto-'));
  let generated = false;
  const generate = (): void => {
    if (generated) return;
    execFileSync('sh', [join(root, 'scripts', 'gen-proto.sh'), out], { cwd: root, stdio: 'pipe' });
    generated = true;
  };
  afterAll(() => rmSync(out, { recursive: true, force: true }));

  it('proto/gen and worker/engine/onnx/gen are what `npm run proto` generates (regenerate and commit if this fails)', () => {
    generate();
    for (const dir of ['proto/gen', 'worker/engine/onnx/gen']) expectSame(join(out, dir), join(root, dir), dir);
  });

  it('clients/python/fedtune_worker/gen is what `npm run proto` generates (regenerate and commit if this fails)', (ctx) => {
    if (!pythonTools) {
      if (inCI) throw new Error('protoc or grpc_python_plugin is missing: CI must install protobuf-compiler and protobuf-compiler-grpc (see .ci/run)');
      console.log('skipping the Python stub check: protoc or grpc_python_plugin not found (apt-get install protobuf-compiler protobuf-compiler-grpc; CI=true always runs it)');
      ctx.skip();
    }
    generate();
    const dir = 'clients/python/fedtune_worker/gen';
    expectSame(join(out, dir), join(root, dir), dir);
  });
});
