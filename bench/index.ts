/**
 * `npm run bench`: fedtune's federated benchmarks, each against a baseline
 * measured in the same run (see bench/federated.ts). Other suites have their own
 * scripts: bench:engine, bench:events, bench:nats.
 *
 *   node bin/run-ts.js bench/index.ts [--quick] [--keep-last K]
 *   (--quick: 10 workers only, smaller repeats; --keep-last: bench (c)'s runs with checkpoint.keep_last K)
 */
import type { Row } from './federated.ts';

// Quiet logs unless asked for; set before the modules that create loggers are loaded.
process.env.FEDTUNE_LOG_LEVEL ??= 'warn';
const { benchAggregation, benchTransfer, paramCount, syntheticAdapter } = await import('./federated.ts');
const { benchProcessRoundsIsolated } = await import('./rounds.ts');
const quick = process.argv.includes('--quick');
const keepAt = process.argv.indexOf('--keep-last');
const keepLast = keepAt > 0 ? Number(process.argv[keepAt + 1]) : undefined;
if (keepLast !== undefined && !(Number.isInteger(keepLast) && keepLast >= 1)) throw new Error(`--keep-last: a positive integer (got ${process.argv[keepAt + 1]})`);
const t0 = Date.now();

function print(rows: Row[]): void {
  const cols: Array<keyof Row> = ['what', 'value', 'baseline', 'ratio'];
  const width = cols.map((c) => Math.max(c.length, ...rows.map((r) => r[c].length)));
  const line = (r: Record<keyof Row, string>): string => cols.map((c, i) => r[c].padEnd(width[i]!)).join('  ');
  console.log(line({ what: 'benchmark', value: 'fedtune', baseline: 'baseline (same run)', ratio: 'ratio' }));
  console.log(width.map((w) => '-'.repeat(w)).join('  '));
  for (const r of rows) console.log(line(r));
}

const adapter = syntheticAdapter();
console.log(`fedtune bench: adapter of ${(paramCount(adapter) / 1e6).toFixed(1)}M parameters (Llama-7B attention shapes, r=16), node ${process.version}`);
const rows: Row[] = [];
rows.push(...benchAggregation(adapter, 4, quick ? 1 : 3));
console.log('  (a) done');
const transfer = await benchTransfer(adapter, quick ? 1 : 3);
rows.push(...transfer.rows);
console.log('  (b) done');
const rounds = await benchProcessRoundsIsolated(quick ? [10] : [10, 50], keepLast ? { keepLast } : {});
console.log('');
print(rows);
console.log(`\n(c) rounds with separate \`fedtune worker\` processes (noop trainer, no perturbation), a fresh process per row as the coordinator; warm rounds 2-5 of 5; the round time includes writing the checkpoint${keepLast ? ` (checkpoint.keep_last ${keepLast}: older ones removed)` : ' (every one kept)'}:\n`);
console.log(rounds.table);
console.log(`total ${((Date.now() - t0) / 1000).toFixed(0)} s`);
