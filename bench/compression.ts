/**
 * `npm run bench:compression`: what compressed updates (round.update_encoding) save on the
 * wire and what they cost in quality, on the demo's task ("Is this email spam or ham?"),
 * base model and sites (cli/demo.ts), with real `fedtune coordinator` and `fedtune worker`
 * processes running FedAvg (cli/demo.ts runFederated, as bench/quality.ts does):
 *
 *   float32                  the baseline: 4 bytes per element
 *   float16, bfloat16        2 bytes per element
 *   int8_delta (block 64)    1 byte per element + one float32 scale per 64
 *   int8_delta + error feedback
 *
 * For each: upload bytes per round (the coordinator's count of bytes as sent, from the
 * run's state.json), the ratio to float32 measured in the same run, and held-out accuracy
 * and eval loss of the final adapter (the same held-out emails for every row).
 *
 *   npm run bench:compression -- --rounds 3 --steps 8 --only 'float32|int8'
 */
import { readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { Command } from 'commander';
import { intArg } from '../cli/args.ts';
import { demoTraining, prepareDemo, runFederated, type FederatedSite } from '../cli/demo.ts';
import type { RoundRecord } from '../coordinator/store.ts';

const ROOT = resolve(import.meta.dirname, '..');

interface Row {
  label: string;
  round: Record<string, unknown>;
}

const ROWS: Row[] = [
  { label: 'float32', round: { update_encoding: 'float32' } },
  { label: 'float16', round: { update_encoding: 'float16' } },
  { label: 'bfloat16', round: { update_encoding: 'bfloat16' } },
  { label: 'int8_delta (block 64)', round: { update_encoding: 'int8_delta', int8_block_size: 64 } },
  { label: 'int8_delta + error feedback', round: { update_encoding: 'int8_delta', int8_block_size: 64, error_feedback: true } },
];

interface Options {
  dir: string;
  rounds: number;
  steps: number;
  seed: number;
  only?: string;
}

interface Result {
  label: string;
  bytesPerRound: number | null;
  accuracy: number | null;
  evalLoss: number | null;
  seconds: number;
  error?: string;
}

async function main(o: Options): Promise<void> {
  const t0 = Date.now();
  const dir = resolve(o.dir);
  const only = o.only ? new RegExp(o.only, 'i') : null;
  const rows = ROWS.filter((r) => r.label === 'float32' || !only || only.test(r.label)); // float32 is the baseline of every ratio
  console.log(`bench:compression: FedAvg, ${o.rounds} rounds x ${o.steps} local steps x 3 demo sites, ${rows.length} encodings (working dir ${dir})`);
  const demo = await prepareDemo(join(dir, 'demo'));
  const sites: FederatedSite[] = demo.files.map((f) => ({ name: f.site, train: f.train, eval: f.eval }));
  const results: Result[] = [];
  for (const [i, row] of rows.entries()) {
    const run = await runFederated({
      dir: join(dir, `run-${i}`),
      name: 'compression',
      modelDir: demo.modelDir,
      sites,
      config: {
        training: demoTraining(o.steps, o.seed),
        rounds: o.rounds,
        strategy: { name: 'fedavg' },
        // Every site in every round (min_results = sites): the bytes per round compare like with like.
        round: { deadline_sec: 240, min_results: sites.length, max_retries: 2, ...row.round },
        eval: { every: o.rounds, initial: false, deadline_sec: 120 },
      },
    });
    // The final checkpoint's state.json also holds each round's upload bytes (as sent).
    const hist = run.finalAdapter ? (JSON.parse(await readFile(join(run.finalAdapter, 'state.json'), 'utf8')) as { history: RoundRecord[] }).history : [];
    const last = hist.filter((h) => h.evalAccuracy !== null).at(-1);
    const r: Result = {
      label: row.label,
      bytesPerRound: hist.length > 0 ? hist.reduce((s, h) => s + h.bytesUp, 0) / hist.length : null,
      accuracy: last?.evalAccuracy ?? null,
      evalLoss: last?.evalLoss ?? null,
      seconds: run.seconds,
      ...(!run.ok || !last ? { error: (run.failure ?? 'no evaluated round in the final state').split('\n')[0]!.slice(0, 200) } : {}),
    };
    results.push(r);
    console.log(`- ${row.label}: ${r.error ? `failed: ${r.error}` : `${r.bytesPerRound!.toFixed(0)} bytes up per round, accuracy ${(100 * r.accuracy!).toFixed(1)}%, eval loss ${r.evalLoss!.toFixed(4)}`} (${r.seconds.toFixed(0)} s)`);
  }
  const base = results[0]!;
  const cells: string[][] = [['encoding', 'bytes up / round', 'bytes / float32', 'accuracy', 'acc - float32', 'eval loss', 'wall s']];
  for (const r of results) {
    cells.push([
      r.label,
      r.bytesPerRound === null ? 'n/a' : r.bytesPerRound.toFixed(0),
      r.bytesPerRound === null || !base.bytesPerRound ? 'n/a' : (r.bytesPerRound / base.bytesPerRound).toFixed(3),
      r.accuracy === null ? 'failed' : `${(100 * r.accuracy).toFixed(1)}%`,
      r.accuracy === null || base.accuracy === null ? 'n/a' : `${(100 * (r.accuracy - base.accuracy)).toFixed(1)} pt`,
      r.evalLoss === null ? 'n/a' : r.evalLoss.toFixed(4),
      r.seconds.toFixed(0),
    ]);
  }
  const widths = cells[0]!.map((_, c) => Math.max(...cells.map((row) => row[c]!.length)));
  const lines = cells.map((row) => row.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join('  '));
  lines.splice(1, 0, widths.map((w) => '-'.repeat(w)).join('  '));
  console.log(`\n${lines.join('\n')}`);
  console.log(`\nheld-out: the same ${demo.naiveBayes.total} emails for every row; bench:compression took ${((Date.now() - t0) / 1000).toFixed(0)} s`);
}

const program = new Command('bench:compression')
  .description('upload bytes per round and held-out accuracy of FedAvg on the demo with float32, float16, bfloat16 and int8_delta updates')
  .option('--dir <dir>', 'working directory', join(ROOT, '.fedtune', 'bench-compression'))
  .option('--rounds <n>', 'federated rounds', intArg('--rounds', 1), 6)
  .option('--steps <n>', 'local steps per round', intArg('--steps', 1), 10)
  .option('--seed <n>', 'seed of training', intArg('--seed', 0), 0)
  .option('--only <regex>', 'run only the encodings whose label matches (float32, the baseline, always runs)')
  .parse(process.argv.slice(2), { from: 'user' });

await main(program.opts<Options>());
