/**
 * The float64 PyTorch references of test/reference/ (run with Debian's
 * /usr/bin/python3 and its torch), shared by the tests that check the engine
 * against them: whether torch is there (required in CI), one reference run,
 * and the largest difference to the engine's logits.
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';

export const PYTHON = '/usr/bin/python3';
const REF_DIR = join(import.meta.dirname, '..', 'reference');

/** Whether /usr/bin/python3 has torch and numpy; in CI their absence is an error naming the package. */
export function referenceAvailable(what: string): boolean {
  const ok = spawnSync(PYTHON, ['-c', 'import torch, numpy'], { encoding: 'utf8' }).status === 0;
  if (!ok && process.env.CI === 'true') throw new Error(`${what}: ${PYTHON} with torch and numpy is required in CI (apt install python3-torch)`);
  if (!ok) console.log(`${what}: reference checks skipped, ${PYTHON} has no torch (apt install python3-torch to run them)`);
  return ok;
}

/** The reference's logits [B][T][V] for a model directory; `adapter`: a PEFT adapter directory merged by peft_ref.py. */
export function referenceLogits(script: string, dir: string, ids: number[][], extra: { adapter?: string; config_override?: Record<string, unknown> } = {}): number[][][] {
  const r = spawnSync(PYTHON, [join(REF_DIR, script), dir], {
    input: JSON.stringify({ input_ids: ids, ...extra }),
    encoding: 'utf8',
    maxBuffer: 256 * 1024 * 1024,
    env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' },
  });
  if (r.status !== 0) throw new Error(`${script} failed (${r.status}): ${r.stderr}`);
  return (JSON.parse(r.stdout) as { logits: number[][][] }).logits;
}

/** max |engine - reference| over every logit; throws when the sizes differ. */
export function maxAbsDiffToReference(engine: ArrayLike<number>, ref: number[][][]): number {
  const flat = ref.flat(2);
  if (flat.length !== engine.length) throw new Error(`the engine has ${engine.length} logits, the reference ${flat.length}`);
  let worst = 0;
  for (let i = 0; i < flat.length; i++) worst = Math.max(worst, Math.abs(engine[i]! - flat[i]!));
  return worst;
}
