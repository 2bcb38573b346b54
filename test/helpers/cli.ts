/** `fedtune` as a user runs it: a child process of bin/fedtune.js, output captured, logs at error level. */
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { join } from 'node:path';
import { expect } from 'vitest';
import { initModel } from '../../worker/engine/init.ts';
import { readPeftAdapter } from '../../common/peft.ts';

const BIN = join(import.meta.dirname, '..', '..', 'bin', 'fedtune.js');
/** A small Alpaca JSONL file shipped with the examples. */
export const SAMPLE_DATA = join(import.meta.dirname, '..', '..', 'examples', 'data', 'site-sample.jsonl');

export function runFedtune(args: string[]): SpawnSyncReturns<string> {
  return spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, FEDTUNE_LOG_LEVEL: 'error' } });
}

/**
 * `fedtune train` of a PEFT adapter on a tiny llama made in `root` (2 steps, batch 2, SAMPLE_DATA)
 * (stored as `o.dtype`, default float32) with the `extra` options; fails the test when the command fails. Returns its output, the model
 * directory (for more commands) and the adapter directory.
 */
export async function trainTinyAdapter(root: string, extra: string[], o: { dtype?: 'float32' | 'bfloat16' } = {}): Promise<{ stdout: string; model: string; out: string }> {
  const model = join(root, 'cli-model');
  await initModel(model, { arch: 'llama', hiddenSize: 64, numLayers: 2, numHeads: 4, numKvHeads: 2, ...(o.dtype ? { dtype: o.dtype } : {}) });
  const out = join(root, 'cli-out');
  const r = runFedtune(['train', '--model', model, '--data', SAMPLE_DATA, '--out', out, '--steps', '2', '--batch-size', '2', '--max-seq-len', '512', ...extra]);
  expect(r.status, r.stderr).toBe(0);
  // Whatever held the base, what is written is a float32 PEFT adapter.
  const saved = await readPeftAdapter(out);
  expect(saved.adapter.size).toBeGreaterThan(0);
  for (const t of saved.adapter.values()) expect(t.data).toBeInstanceOf(Float32Array);
  return { stdout: r.stdout, model, out };
}

/** `fedtune eval` of `adapter` on `model` over SAMPLE_DATA with `--compute-dtype dtype`; fails the test when the command fails. */
export function evalAdapter(model: string, adapter: string, dtype: string): { loss: number; tokens: number } {
  const r = runFedtune(['eval', '--model', model, '--adapter', adapter, '--data', SAMPLE_DATA, '--max-seq-len', '512', '--compute-dtype', dtype]);
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as { loss: number; tokens: number };
}
