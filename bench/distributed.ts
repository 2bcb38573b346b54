/**
 * `npm run bench:distributed`: scaling of distributed mode on loopback.
 *
 * One coordinator (in this process) and 1, 2 and 4 `fedtune worker` processes
 * (ONNX trainer, one thread each) train the same small Llama-style model on the
 * same data with the same global batch, so every run does the same arithmetic.
 * Per configuration it reports, over the steps after the first two (graph
 * build and shard download are warm-up):
 *
 *   step time, split into compute (slowest worker's gradient time) and
 *   communicate + aggregate (the rest of the step's wall time),
 *   throughput (trained tokens / s) and scaling efficiency
 *   (throughput with N workers / (N x throughput with 1)),
 *   payload bytes per optimizer step (gradients up, adapters and shards down)
 *   against the raw bytes of the gradients (N x adapter size),
 *
 * and one local SGD row (sync_every 4) for the bytes it saves per step.
 *
 *   node bin/run-ts.js bench/distributed.ts [--workers 1,2,4] [--steps 10] [--hidden 128] [--layers 2]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

process.env.FEDTUNE_LOG_LEVEL ??= 'warn';
const { parseRunConfig } = await import('../common/config.ts');
const { startCoordinator } = await import('../coordinator/main.ts');
const { STEPS_LOG } = await import('../coordinator/distributed/store.ts');
const { initModel } = await import('../worker/engine/init.ts');
const { readPeftAdapter } = await import('../common/peft.ts');
type StepRecord = import('../coordinator/distributed/store.ts').StepRecord;

const ROOT = join(import.meta.dirname, '..');
const arg = (name: string, def: string): string => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : def;
};
const workerCounts = arg('workers', '1,2,4').split(',').map(Number);
const steps = Number(arg('steps', '10'));
const hidden = Number(arg('hidden', '128'));
const layers = Number(arg('layers', '2'));
const WARMUP = 2;

const dir = mkdtempSync(join(tmpdir(), 'fedtune-bench-dist-'));
const modelDir = join(dir, 'model');
await initModel(modelDir, { arch: 'llama', hiddenSize: hidden, numLayers: layers, numHeads: 4, numKvHeads: 2, maxPositions: 256, seed: 0 });
const dataPath = join(dir, 'data.jsonl');
const words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta'];
writeFileSync(
  dataPath,
  Array.from({ length: 256 }, (_, i) =>
    JSON.stringify({ instruction: `Write the word ${words[i % 8]} ${1 + (i % 5)} times, separated by spaces.`, output: `${words[i % 8]} `.repeat(1 + (i % 5)).trim() }),
  ).join('\n'),
);

interface Result {
  label: string;
  workers: number;
  stepMs: number;
  computeMs: number;
  commMs: number;
  tokensPerSec: number;
  bytesPerStep: number;
  rawGradBytes: number;
}

function spawnWorker(address: string, site: string): ChildProcess {
  return spawn(process.execPath, [join(ROOT, 'bin', 'fedtune.js'), 'worker', '--coordinator', address, '--name', site, '--model', modelDir, '--token', 'bench', '--threads', '1', '--progress', 'none'], {
    cwd: ROOT,
    env: { ...process.env, FEDTUNE_LOG_LEVEL: 'warn' },
    stdio: 'ignore',
  });
}

async function runOne(n: number, syncEvery: number, totalSteps: number): Promise<Result> {
  const name = `bench-${n}-h${syncEvery}`;
  const cfg = parseRunConfig({
    name,
    mode: 'distributed',
    model: { path: modelDir },
    lora: { r: 8, alpha: 16, target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] },
    // 4 micro-batches of 4 per step: the same global batch for 1, 2 and 4 workers.
    training: { steps: totalSteps, batch_size: 4, grad_accumulation: 4, lr: 1e-3, max_seq_len: 128, template: 'plain' },
    distributed: { dataset: dataPath, sync_every: syncEvery, checkpoint_every: 1000 },
    cohort: { min_workers: n },
    checkpoint: { dir: join(dir, 'checkpoints') },
    server: { listen: '127.0.0.1:0', join_token: 'bench' },
    dashboard: { enabled: false },
    events: { log: false },
  });
  const coord = await startCoordinator(cfg);
  const procs = Array.from({ length: n }, (_, i) => spawnWorker(coord.address, `w${i + 1}`));
  try {
    const r = await coord.run;
    if (r.state !== 'completed') throw new Error(`run ${name} ${r.state}: ${r.error}`);
  } finally {
    for (const p of procs) if (p.exitCode === null) p.kill();
    await coord.close();
  }
  const recs = readFileSync(join(coord.runDir, STEPS_LOG), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as StepRecord);
  // Records that start at or after step WARMUP (a local SGD record covers `steps` steps).
  const measured = recs.filter((r) => r.step - r.steps >= WARMUP);
  const sum = (f: (r: StepRecord) => number): number => measured.reduce((s, r) => s + f(r), 0);
  const optSteps = sum((r) => r.steps);
  const latest = JSON.parse(readFileSync(join(coord.runDir, 'latest.json'), 'utf8')) as { path: string };
  let adapterBytes = 0;
  for (const t of (await readPeftAdapter(latest.path)).adapter.values()) adapterBytes += t.data.length * 4;
  return {
    label: syncEvery === 1 ? `sync steps, ${n} worker(s)` : `local SGD H=${syncEvery}, ${n} worker(s)`,
    workers: n,
    stepMs: sum((r) => r.durationMs) / optSteps,
    computeMs: sum((r) => r.computeMs) / optSteps,
    commMs: sum((r) => r.communicateMs + r.aggregateMs) / optSteps,
    tokensPerSec: (sum((r) => r.tokens) * 1000) / sum((r) => r.durationMs),
    bytesPerStep: sum((r) => r.bytesUp + r.bytesDown) / optSteps,
    // What the gradients of one optimizer step weigh, raw: one adapter-sized float32 tensor set per worker.
    rawGradBytes: n * adapterBytes,
  };
}

console.log(`fedtune bench:distributed: llama hidden ${hidden}, ${layers} layer(s), LoRA r=8 on q/k/v/o; ${steps} steps, global batch 16 sequences; ${availableParallelism()} CPU core(s); node ${process.version}`);
const results: Result[] = [];
for (const n of workerCounts) {
  results.push(await runOne(n, 1, steps));
  console.log(`  ${n} worker(s) done`);
}
const maxN = Math.max(...workerCounts);
results.push(await runOne(maxN, 4, Math.max(16, 4 * Math.ceil(steps / 4))));
console.log(`  local SGD done`);

const base = results.find((r) => r.workers === 1 && r.label.startsWith('sync'));
const kb = (b: number): string => `${(b / 1e3).toFixed(1)} kB`;
const rows = results.map((r) => ({
  config: r.label,
  step: `${r.stepMs.toFixed(0)} ms`,
  compute: `${r.computeMs.toFixed(0)} ms`,
  'comm+agg': `${r.commMs.toFixed(0)} ms`,
  'tok/s': r.tokensPerSec.toFixed(0),
  efficiency: base ? `${((r.tokensPerSec / (r.workers * base.tokensPerSec)) * 100).toFixed(0)}%` : 'n/a',
  'bytes/step': kb(r.bytesPerStep),
  'raw grads': kb(r.rawGradBytes),
  'bytes/raw': (r.bytesPerStep / r.rawGradBytes).toFixed(2),
}));
const cols = Object.keys(rows[0]!) as Array<keyof (typeof rows)[0]>;
const width = cols.map((c) => Math.max(c.length, ...rows.map((r) => r[c].length)));
console.log('');
console.log(cols.map((c, i) => c.padEnd(width[i]!)).join('  '));
console.log(width.map((w) => '-'.repeat(w)).join('  '));
for (const r of rows) console.log(cols.map((c, i) => r[c].padEnd(width[i]!)).join('  '));
console.log(`
Steps 1-${WARMUP} (graph build, first shard download; for local SGD the first sync) are left out. "compute" is the slowest worker's
gradient time per step, "comm+agg" the rest of the step's wall time (task dispatch, adapter download,
gradient upload over loopback gRPC, the coordinator's sum / clip / AdamW, packing the next version).
bytes/step counts payload bytes (gradients up, adapter versions and data shards down) per optimizer step;
raw grads is N x the adapter's float32 bytes; sync steps move about 2x that (every worker uploads a gradient
and downloads the new adapter), local SGD divides it by H.
With ${availableParallelism()} core(s) shared by the coordinator and every worker process, N workers cannot
run N times as fast here: efficiency above ${Math.min(availableParallelism(), maxN)} worker(s) measures contention for the cores,
not the protocol. What the numbers do show: that per-step communication and aggregation time is small next
to compute, that bytes per step grow linearly with workers, and what local SGD saves.`);
rmSync(dir, { recursive: true, force: true });
process.exit(0);
