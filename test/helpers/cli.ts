/** `fedtune` as a user runs it: a child process of bin/fedtune.js, output captured, logs at error level. */
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { join } from 'node:path';

const BIN = join(import.meta.dirname, '..', '..', 'bin', 'fedtune.js');
/** A small Alpaca JSONL file shipped with the examples. */
export const SAMPLE_DATA = join(import.meta.dirname, '..', '..', 'examples', 'data', 'site-sample.jsonl');

export function runFedtune(args: string[]): SpawnSyncReturns<string> {
  return spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, FEDTUNE_LOG_LEVEL: 'error' } });
}
