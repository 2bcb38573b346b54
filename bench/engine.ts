/**
 * Engine benchmark: training-step tokens/s and peak memory of fedtune's ONNX
 * engine for llama configurations (LoRA on every target module, and full mode),
 * next to the same step in PyTorch CPU (bench/torch_llama_step.py: same shapes,
 * same thread count, Debian's python3-torch) measured in the same run.
 * Each measurement runs in its own process so peak RSS belongs to it alone.
 *
 *   npm run bench:engine [-- --threads 2 --steps 10]
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';
import { Engine } from '../worker/engine/engine.ts';
import { byteLevelTokenizer, initConfig, initWeights } from '../worker/engine/init.ts';
import { computeFingerprint } from '../common/hf-model.ts';
import { AdamW } from '../common/optim.ts';
import { trainLoop } from '../worker/engine/train.ts';
import { createRng } from '../common/random.ts';
import type { LoadedModel } from '../common/model-config.ts';

interface Case {
  name: string;
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  batch: number;
  seq: number;
  r: number;
  mode: 'lora' | 'full';
  threads: number;
  warmup: number;
  steps: number;
}

interface Measured {
  tokensPerSec: number;
  stepMs: number;
  peakRssBytes: number;
  trainable: number;
}

const here = dirname(fileURLToPath(import.meta.url));
const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};

async function child(c: Case): Promise<void> {
  const tok = byteLevelTokenizer('llama');
  const config = initConfig({ arch: 'llama', hiddenSize: c.hidden, numLayers: c.layers, numHeads: c.heads, numKvHeads: c.kvHeads, maxPositions: Math.max(512, c.seq) }, tok);
  const weights = initWeights(config, 0);
  const model: LoadedModel = { dir: '<bench>', config, weights, fingerprint: computeFingerprint(config, weights) };
  const lora = { r: c.r, alpha: 2 * c.r, dropout: 0, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] };
  const engine = Engine.create(model, { mode: c.mode, lora: c.mode === 'lora' ? lora : undefined, threads: c.threads });
  const params = engine.initParams(0);
  const rng = createRng(1);
  const n = c.batch * c.seq;
  const batch = {
    batchSize: c.batch,
    seqLen: c.seq,
    inputIds: Int32Array.from({ length: n }, () => rng.int(config.vocabSize)),
    labels: Int32Array.from({ length: n }, () => rng.int(config.vocabSize)),
  };
  const run = (steps: number) =>
    trainLoop({
      engine,
      params,
      epochBatches: () => [batch],
      steps,
      gradAccumulation: 1,
      optimizer: new AdamW({ lr: 1e-4 }),
      schedule: { kind: 'constant', baseLr: 1e-4, warmupSteps: 0, totalSteps: steps },
      maxGradNorm: 1,
    });
  await run(c.warmup);
  const t0 = performance.now();
  await run(c.steps);
  const secs = (performance.now() - t0) / 1000;
  let trainable = 0;
  for (const t of params.values()) trainable += t.data.length;
  const m: Measured = {
    tokensPerSec: (n * c.steps) / secs,
    stepMs: (1000 * secs) / c.steps,
    peakRssBytes: process.resourceUsage().maxRSS * 1024,
    trainable,
  };
  console.log(JSON.stringify(m));
  await engine.close();
}

function runChild(cmd: string, args: string[]): Measured | string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 24, env: { ...process.env, FEDTUNE_LOG_LEVEL: 'warn' } });
  const line = r.stdout?.trim().split('\n').pop();
  if (r.status !== 0 || !line) return `failed: ${(r.stderr || r.stdout || '').trim().split('\n').slice(-3).join(' | ')}`;
  return JSON.parse(line) as Measured;
}

const TORCH_PY = '/usr/bin/python3';

function torchAvailable(): boolean {
  if (!existsSync(TORCH_PY)) return false;
  return spawnSync(TORCH_PY, ['-c', 'import torch'], { encoding: 'utf8' }).status === 0;
}

async function main(): Promise<void> {
  const ci = process.argv.indexOf('--child');
  if (ci > 0) return child(JSON.parse(process.argv[ci + 1]!) as Case);
  const threads = arg('--threads', 2);
  const steps = arg('--steps', 10);
  const cases: Case[] = [];
  for (const size of [
    { name: 'llama 2L/64h', hidden: 64, layers: 2, heads: 4, kvHeads: 2, batch: 8 },
    { name: 'llama 6L/384h', hidden: 384, layers: 6, heads: 6, kvHeads: 2, batch: 4 },
  ]) {
    for (const mode of ['lora', 'full'] as const) {
      cases.push({ ...size, seq: 128, r: 8, mode, threads, warmup: 2, steps });
    }
  }
  const hasTorch = torchAvailable();
  console.log(`fedtune engine benchmark: seq 128, ${threads} threads, ${steps} timed steps after 2 warm-up steps`);
  if (!hasTorch) console.log('PyTorch reference skipped: python3-torch is not installed (apt-get install -y python3-torch)');
  const rows: string[][] = [['config', 'mode', 'trainable', 'fedtune tok/s', 'fedtune peak RSS', 'torch tok/s', 'torch peak RSS', 'speed ratio', 'memory ratio']];
  for (const c of cases) {
    const ours = runChild(process.execPath, [join(here, '..', 'bin', 'run-ts.js'), join(here, 'engine.ts'), '--child', JSON.stringify(c)]);
    const intermediate = Math.ceil((8 * c.hidden) / 3 / 8) * 8;
    const theirs = hasTorch
      ? runChild(TORCH_PY, [join(here, 'torch_llama_step.py'), JSON.stringify({ ...c, intermediate, vocab: byteLevelTokenizer('llama').vocabSize })])
      : 'skipped';
    const fmt = (m: Measured | string, f: (x: Measured) => string) => (typeof m === 'string' ? m : f(m));
    rows.push([
      `${c.name} b${c.batch}`,
      c.mode === 'lora' ? `LoRA r${c.r}` : 'full',
      fmt(ours, (m) => m.trainable.toLocaleString('en-US')),
      fmt(ours, (m) => m.tokensPerSec.toFixed(0)),
      fmt(ours, (m) => `${(m.peakRssBytes / 2 ** 20).toFixed(0)} MiB`),
      fmt(theirs, (m) => m.tokensPerSec.toFixed(0)),
      fmt(theirs, (m) => `${(m.peakRssBytes / 2 ** 20).toFixed(0)} MiB`),
      typeof ours !== 'string' && typeof theirs !== 'string' ? `${(ours.tokensPerSec / theirs.tokensPerSec).toFixed(2)}x` : '-',
      typeof ours !== 'string' && typeof theirs !== 'string' ? `${(ours.peakRssBytes / theirs.peakRssBytes).toFixed(2)}x` : '-',
    ]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  for (const r of rows) console.log(r.map((x, i) => x.padEnd(widths[i]!)).join('  '));
  console.log('speed ratio = fedtune tok/s / PyTorch tok/s (above 1: fedtune faster); memory ratio = fedtune peak RSS / PyTorch peak RSS');
}

await main();
