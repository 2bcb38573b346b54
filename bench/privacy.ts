/**
 * `npm run bench:privacy`: what privacy costs.
 *
 *   (a) one federated round with 10 worker processes (`fedtune worker`, noop trainer) over real
 *       gRPC on loopback: plain FedAvg against secure aggregation and SecAgg+ on the same cohort
 *       and adapter, in the same run. Round time (the coordinator's round.completed durationMs)
 *       and bytes up per round.
 *   (b) bench/secagg.ts: the protocol's own cost in process for 10 and 50 sites at 1M and 16M
 *       parameters (full SecAgg and SecAgg+), against a plain FedAvg fold and memcpy.
 *   (c) bench/dp-sgd.ts: DP-SGD's step time against the non-private step on the demo model, and
 *       held-out accuracy on the demo's sites at epsilon 1, 4, 8 (delta 1e-5) against the
 *       non-private run.
 *
 * Usage: npm run bench:privacy [-- --only a|b|c] [--small]
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseRunConfig, type RunConfig } from '../common/config.ts';
import type { RunEvent } from '../common/events.ts';
import { startCoordinator } from '../coordinator/main.ts';
import { initModel } from '../worker/engine/init.ts';

const ROOT = join(import.meta.dirname, '..');
const only = process.argv.includes('--only') ? process.argv[process.argv.indexOf('--only') + 1] : null;
const small = process.argv.includes('--small');

function writeData(path: string, n: number, tag: string): string {
  const lines: string[] = [];
  for (let i = 0; i < n; i++) lines.push(JSON.stringify({ instruction: `Repeat the word ${tag}.`, input: `#${i}`, output: tag }));
  writeFileSync(path, `${lines.join('\n')}\n`);
  return path;
}

interface RoundRow {
  mode: string;
  params: number;
  roundMs: number;
  bytesUp: number;
}

async function oneRound(dir: string, model: string, sites: number, privacy: Record<string, unknown>, mode: string): Promise<RoundRow> {
  const cfg: RunConfig = parseRunConfig({
    name: `bench-${mode.replace(/[^a-z0-9]+/gi, '-')}`,
    model: { path: model },
    lora: { r: 16, target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] },
    training: { steps: 1, batch_size: 2, max_seq_len: 64 },
    rounds: 2,
    cohort: { min_workers: sites, wait_timeout_sec: 300 },
    round: { min_results: sites, deadline_sec: 600 },
    eval: { every: 0 },
    checkpoint: { dir: join(dir, 'checkpoints') },
    server: { listen: '127.0.0.1:0', join_token: 'bench-token' },
    dashboard: { enabled: false },
    privacy,
  });
  const coord = await startCoordinator(cfg);
  const procs = Array.from({ length: sites }, (_, i) =>
    spawn(process.execPath, [join(ROOT, 'bin/fedtune.js'), 'worker', '--coordinator', coord.address, '--name', `site-${i}`, '--data', writeData(join(dir, `s${i}.jsonl`), 8, `s${i}`), '--model', model, '--token', 'bench-token', '--trainer', 'noop', '--progress', 'none', '--eval-fraction', '0'], {
      stdio: 'ignore',
    }),
  );
  try {
    const result = await coord.run;
    if (result.state !== 'completed') throw new Error(`bench round (${mode}): ${result.error ?? result.state}`);
    const evs = (await coord.bus.history(coord.runId, 0)) as RunEvent[];
    // Round 2: every worker process is connected and warm; round 1 includes their start-up.
    const r = evs.find((e): e is Extract<RunEvent, { type: 'round.completed' }> => e.type === 'round.completed' && e.round === 2)!;
    const params = evs.find((e): e is Extract<RunEvent, { type: 'update.received' }> => e.type === 'update.received')!.bytes / 4;
    return { mode, params, roundMs: r.durationMs, bytesUp: r.bytesUp };
  } finally {
    for (const p of procs) p.kill('SIGKILL');
    await coord.close();
  }
}

async function processRounds(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'fedtune-bench-privacy-'));
  try {
    const model = join(dir, 'model');
    await initModel(model, { arch: 'llama', hiddenSize: small ? 64 : 512, numLayers: small ? 1 : 4, numHeads: 8, numKvHeads: 8, maxPositions: 128, seed: 0 });
    const sites = 10;
    const rows: RoundRow[] = [];
    rows.push(await oneRound(dir, model, sites, {}, 'plain FedAvg'));
    rows.push(await oneRound(dir, model, sites, { secure_aggregation: { threshold: 7, range: 1 } }, 'secure aggregation (full)'));
    rows.push(await oneRound(dir, model, sites, { secure_aggregation: { threshold: 4, neighbours: 4, range: 1 } }, 'SecAgg+ (k = 4)'));
    const base = rows[0]!;
    console.log(`\n(a) one round, ${sites} worker processes, noop trainer, ${base.params.toLocaleString()} adapter parameters (round 2 of 2)`);
    console.log('| mode | round time | vs plain | bytes up | vs plain |');
    console.log('|---|---|---|---|---|');
    for (const r of rows) console.log(`| ${r.mode} | ${(r.roundMs / 1000).toFixed(2)} s | ${(r.roundMs / base.roundMs).toFixed(2)}x | ${(r.bytesUp / 1e6).toFixed(1)} MB | ${(r.bytesUp / base.bytesUp).toFixed(4)}x |`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function child(script: string, args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [join(ROOT, 'bin/run-ts.js'), join(ROOT, script), ...args], { stdio: 'inherit' });
    p.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`${script} exited with ${code}`))));
  });
}

if (only === null || only === 'a') await processRounds();
if (only === null || only === 'b') {
  console.log('\n(b) the protocol in process (bench/secagg.ts)');
  await child('bench/secagg.ts', small ? ['--small'] : []);
}
if (only === null || only === 'c') {
  console.log('\n(c) DP-SGD (bench/dp-sgd.ts)');
  await child('bench/dp-sgd.ts', []);
}
process.exit(0);
