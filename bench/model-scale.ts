/**
 * `npm run bench:scale`: real-sized bases on a worker. For the shapes of
 * Qwen2.5-0.5B and Llama-3.2-1B (random weights, bfloat16 on disk as the real
 * checkpoints ship), each measured in a process of its own so that its peak
 * RSS is its alone:
 *
 *   load       seconds to load, peak RSS of loading against the bytes the
 *              weights keep resident (float32)
 *   LoRA step  tokens/s at sequence 512, batch 1, LoRA r 8 on every projection,
 *              peak RSS, the engine's achieved GFLOP/s (model FLOPs of the step,
 *              see stepFlops) and that against the roofline: ONNX Runtime's own
 *              MatMul at the layer's shapes, measured in the same run
 *   PyTorch    the same step on the same shapes and threads in PyTorch CPU
 *              (bench/torch_llama_step.py, Debian's python3-torch)
 *
 * for each engine variant given (--variants: fp32, and nf4 / int4 base weights,
 * fp16 base weights (--compute-dtype float16), bf16 base weights left in the
 * checkpoint's files (--compute-dtype bfloat16; "resident" then counts bytes
 * ONNX Runtime maps from them) and per-layer recompute).
 *
 *   npm run bench:scale [-- --shapes qwen2.5-0.5b,llama-3.2-1b --seq 512 --steps 2 --threads 2 --variants fp32,nf4,fp16,bf16,recompute --no-torch --torch-timeout 900]
 *   node bin/run-ts.js bench/model-scale.ts make qwen2.5-0.5b DIR     # just write the random model
 *   node bin/run-ts.js bench/model-scale.ts probe DIR '{"seq":128}'   # one measurement (JSON line)
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { Engine, type EngineOptions } from '../worker/engine/engine.ts';
import { initWeights } from '../worker/engine/init.ts';
import { loadModel, writeModelFiles } from '../worker/engine/model.ts';
import { baseMemory, loadBaseModel, type QuantFormat } from '../worker/engine/quantize.ts';
import { Graph } from '../worker/engine/graph.ts';
import { createSession, ort } from '../worker/engine/runtime.ts';
import { normalizeConfig } from '../common/hf-model.ts';
import { AdamW } from '../common/optim.ts';
import { trainLoop } from '../worker/engine/train.ts';
import { createRng } from '../common/random.ts';
import type { ModelConfig } from '../common/model-config.ts';

const ROOT = resolve(import.meta.dirname, '..');

/** config.json of each shape, with the fields the real checkpoints ship. */
export const SHAPES: Record<string, Record<string, unknown>> = {
  'qwen2.5-0.5b': {
    model_type: 'qwen2',
    vocab_size: 151936,
    hidden_size: 896,
    intermediate_size: 4864,
    num_hidden_layers: 24,
    num_attention_heads: 14,
    num_key_value_heads: 2,
    max_position_embeddings: 32768,
    rope_theta: 1000000,
    rms_norm_eps: 1e-6,
    tie_word_embeddings: true,
    use_sliding_window: false,
    sliding_window: 32768,
    max_window_layers: 21,
    bos_token_id: 151643,
    eos_token_id: 151643,
  },
  'llama-3.2-1b': {
    model_type: 'llama',
    vocab_size: 128256,
    hidden_size: 2048,
    intermediate_size: 8192,
    num_hidden_layers: 16,
    num_attention_heads: 32,
    num_key_value_heads: 8,
    head_dim: 64,
    max_position_embeddings: 131072,
    rope_theta: 500000,
    rope_scaling: { factor: 32.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
    rms_norm_eps: 1e-5,
    tie_word_embeddings: true,
    bos_token_id: 128000,
    eos_token_id: 128001,
  },
};

const TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];

/** Engine options of each variant the bench knows; a variant the engine does not have fails its row, named. */
const VARIANTS: Record<string, Record<string, unknown>> = {
  fp32: {},
  nf4: { quantizeBase: 'nf4' },
  int4: { quantizeBase: 'int4' },
  recompute: { recompute: true },
  'nf4+recompute': { quantizeBase: 'nf4', recompute: true },
  fp16: { computeDtype: 'float16' },
  bf16: { computeDtype: 'bfloat16' },
};

/** Write a random model of `shape` to dir (bfloat16 safetensors, config.json, a placeholder tokenizer). */
export async function makeModel(shape: string, dir: string): Promise<void> {
  const raw = SHAPES[shape];
  if (!raw) throw new Error(`unknown shape ${shape}; known: ${Object.keys(SHAPES).join(', ')}`);
  const config = normalizeConfig(raw, shape);
  await mkdir(dir, { recursive: true });
  await writeModelFiles(dir, raw, initWeights(config, 0), { dtype: 'bfloat16', shards: 2 });
  await writeFile(join(dir, 'tokenizer.json'), '{}'); // the engine never tokenizes here
}

function procStatus(field: 'VmRSS' | 'VmHWM'): number {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync('/proc/self/status', 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

/** Decoder linear weights and the LM head, in parameters. */
function matmulParams(c: ModelConfig): { decoder: number; head: number } {
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  const perLayer = c.hiddenSize * (q + 2 * kv) + q * c.hiddenSize + 3 * c.hiddenSize * c.intermediateSize;
  return { decoder: perLayer * c.numLayers, head: c.vocabSize * c.hiddenSize };
}

/**
 * Model FLOPs of one LoRA step over T tokens (one sequence): the frozen
 * matmuls forward (2 T P) and their input gradients backward (2 T P), the
 * attention scores and weighted sums forward (4 T^2 d per layer, d = heads x
 * head_dim) and backward (twice that). LoRA's own matmuls are left out (r is
 * small), and so is what recompute adds: achieved GFLOP/s compares like with like.
 */
export function stepFlops(c: ModelConfig, T: number): number {
  const { decoder, head } = matmulParams(c);
  const d = c.numHeads * c.headDim;
  return 4 * T * (decoder + head) + 12 * T * T * d * c.numLayers;
}

interface ProbeOptions {
  seq?: number;
  steps?: number;
  warmup?: number;
  threads?: number;
  variant?: string;
}

/** One measurement in this process: load, then LoRA steps. Prints one JSON line. */
export async function probe(dir: string, o: ProbeOptions): Promise<void> {
  const seq = o.seq ?? 512;
  const variant = o.variant ?? 'fp32';
  const extra = VARIANTS[variant];
  if (!extra) throw new Error(`unknown variant ${variant}; known: ${Object.keys(VARIANTS).join(', ')}`);
  const rss0 = procStatus('VmRSS');
  const t0 = performance.now();
  // As a worker loads it: with a 4-bit base each weight is quantised as it is read (worker/engine/quantize.ts).
  const quantize = (extra as { quantizeBase?: QuantFormat }).quantizeBase;
  const compute = (extra as { computeDtype?: 'float16' | 'bfloat16' }).computeDtype;
  const model = quantize || compute ? await loadBaseModel(dir, quantize, { compute }) : await loadModel(dir);
  const loadSecs = (performance.now() - t0) / 1000;
  const resident = baseMemory(model).total;
  const loadPeak = procStatus('VmHWM') - rss0;
  const lora = { r: 8, alpha: 16, dropout: 0, targetModules: TARGETS };
  const engine = Engine.create(model, { mode: 'lora', lora, threads: o.threads ?? 2, ...(extra as Partial<EngineOptions>) });
  const params = engine.initParams(0);
  const rng = createRng(1);
  const batch = {
    batchSize: 1,
    seqLen: seq,
    inputIds: Int32Array.from({ length: seq }, () => rng.int(model.config.vocabSize)),
    labels: Int32Array.from({ length: seq }, () => rng.int(model.config.vocabSize)),
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
  if ((o.warmup ?? 1) > 0) await run(o.warmup ?? 1);
  const steps = o.steps ?? 2;
  const t1 = performance.now();
  const r = await run(steps);
  const secs = (performance.now() - t1) / 1000;
  await engine.close();
  console.log(
    JSON.stringify({
      variant,
      loadSecs,
      residentBytes: resident,
      loadPeakBytes: loadPeak,
      peakRssBytes: procStatus('VmHWM'),
      tokensPerSec: (seq * steps) / secs,
      stepSecs: secs / steps,
      gflops: (stepFlops(model.config, seq) * steps) / secs / 1e9,
      loss: Number.isFinite(r.lastLoss) ? r.lastLoss : null,
    }),
  );
}

/** ONNX Runtime's MatMul [T, k] x [k, n] in GFLOP/s, best of a few runs: the roofline the engine is held against. */
async function matmulGflops(T: number, k: number, n: number, threads: number): Promise<number> {
  const g = new Graph('float32');
  const x = g.input('x', [T, k], 'float32');
  const w = g.input('w', [k, n], 'float32');
  g.output(g.matmul(x, w), 'y');
  const { session } = await createSession(g.toModel(), { threads });
  const rng = createRng(2);
  const feeds = {
    x: new ort.Tensor('float32', Float32Array.from({ length: T * k }, () => rng.normal()), [T, k]),
    w: new ort.Tensor('float32', Float32Array.from({ length: k * n }, () => rng.normal()), [k, n]),
  };
  await session.run(feeds);
  let best = Infinity;
  for (let i = 0; i < 5; i++) {
    const t0 = performance.now();
    await session.run(feeds);
    best = Math.min(best, (performance.now() - t0) / 1000);
  }
  await session.release();
  return (2 * T * k * n) / best / 1e9;
}

function runChild(cmd: string, args: string[], timeoutSec = 0): Record<string, number | string | null> | string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 24, env: { ...process.env, FEDTUNE_LOG_LEVEL: 'warn' }, ...(timeoutSec > 0 ? { timeout: timeoutSec * 1000 } : {}) });
  if (r.error && (r.error as NodeJS.ErrnoException).code === 'ETIMEDOUT') return `did not finish within ${timeoutSec} s (--torch-timeout)`;
  const line = r.stdout?.trim().split('\n').pop();
  if (r.status !== 0 || !line?.startsWith('{')) return `failed: ${(r.stderr || r.stdout || '').trim().split('\n').slice(-2).join(' | ')}`;
  return JSON.parse(line) as Record<string, number | string | null>;
}

const arg = (name: string, dflt: string): string => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1]! : dflt;
};

async function main(): Promise<void> {
  const [cmd, a, b] = process.argv.slice(2);
  if (cmd === 'make') return makeModel(a!, b!);
  if (cmd === 'probe') return probe(a!, JSON.parse(b ?? '{}') as ProbeOptions);
  const shapes = arg('--shapes', 'qwen2.5-0.5b,llama-3.2-1b').split(',');
  const seq = Number(arg('--seq', '512'));
  const steps = Number(arg('--steps', '2'));
  const threads = Number(arg('--threads', '2'));
  const variants = arg('--variants', 'fp32,nf4,fp16,bf16,recompute').split(',');
  const cache = resolve(arg('--dir', join(tmpdir(), 'fedtune-bench-scale')));
  const self = join(ROOT, 'bench', 'model-scale.ts');
  const haveTorch = !process.argv.includes('--no-torch') && spawnSync('/usr/bin/python3', ['-c', 'import torch'], { encoding: 'utf8' }).status === 0;
  const torchTimeout = Number(arg('--torch-timeout', '900'));
  const load = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  console.log(`bench:scale  seq ${seq}, batch 1, LoRA r 8 on every projection, ${steps} measured steps, ${threads} threads; load average ${load()}`);
  for (const shape of shapes) {
    const dir = join(cache, shape);
    if (!existsSync(join(dir, 'config.json'))) {
      const t0 = performance.now();
      const made = spawnSync(process.execPath, [join(ROOT, 'bin', 'run-ts.js'), self, 'make', shape, dir], { encoding: 'utf8', stdio: ['ignore', 'inherit', 'inherit'] });
      if (made.status !== 0) throw new Error(`writing the ${shape} model failed`);
      console.log(`  wrote ${dir} in ${((performance.now() - t0) / 1000).toFixed(0)} s`);
    }
    const config = normalizeConfig(SHAPES[shape]!, shape);
    const { decoder, head } = matmulParams(config);
    const roof = Math.max(
      await matmulGflops(seq, config.hiddenSize, config.intermediateSize, threads),
      await matmulGflops(seq, config.intermediateSize, config.hiddenSize, threads),
      await matmulGflops(seq, config.hiddenSize, config.numHeads * config.headDim, threads),
    );
    console.log(`\n${shape}: ${((decoder + head) / 1e6).toFixed(0)}M matmul parameters; ONNX Runtime MatMul roofline at its layer shapes ${roof.toFixed(1)} GFLOP/s`);
    console.log('  variant          load s   load peak / resident   peak RSS    tokens/s   GFLOP/s   of roofline   loss');
    for (const v of variants) {
      const r = runChild(process.execPath, [join(ROOT, 'bin', 'run-ts.js'), self, 'probe', dir, JSON.stringify({ seq, steps, threads, variant: v })]);
      if (typeof r === 'string') {
        console.log(`  ${v.padEnd(15)}  ${r}`);
        continue;
      }
      const n = (k: string) => Number(r[k]);
      console.log(
        `  ${v.padEnd(15)}  ${n('loadSecs').toFixed(1).padStart(6)}   ${(n('loadPeakBytes') / n('residentBytes')).toFixed(2).padStart(8)}x of ${(n('residentBytes') / 2 ** 30).toFixed(2)} GiB` +
          `   ${(n('peakRssBytes') / 2 ** 30).toFixed(2).padStart(5)} GiB   ${n('tokensPerSec').toFixed(1).padStart(8)}   ${n('gflops').toFixed(1).padStart(7)}   ${((100 * n('gflops')) / roof).toFixed(0).padStart(9)}%   ${r.loss === null ? '-' : n('loss').toFixed(3)}`,
      );
    }
    if (haveTorch) {
      const t = runChild('/usr/bin/python3', [
        join(ROOT, 'bench', 'torch_llama_step.py'),
        JSON.stringify({ hidden: config.hiddenSize, layers: config.numLayers, heads: config.numHeads, kvHeads: config.numKvHeads, intermediate: config.intermediateSize, vocab: config.vocabSize, batch: 1, seq, r: 8, mode: 'lora', threads, warmup: 1, steps }),
      ], torchTimeout);
      if (typeof t === 'string') console.log(`  PyTorch CPU      ${t}`);
      else console.log(`  PyTorch CPU      (random init in process)              ${(Number(t.peakRssBytes) / 2 ** 30).toFixed(2).padStart(5)} GiB   ${Number(t.tokensPerSec).toFixed(1).padStart(8)}   ${((stepFlops(config, seq) * Number(t.tokensPerSec)) / seq / 1e9).toFixed(1).padStart(7)}`);
    } else {
      console.log(`  PyTorch CPU      skipped: ${process.argv.includes('--no-torch') ? '--no-torch' : '/usr/bin/python3 has no torch (apt install python3-torch)'}`);
    }
  }
  console.log(`\nload average at the end ${load()}`);
}

await main();
