/**
 * One training step in a fresh process, reporting its memory: run as a child
 * process (one per configuration, so each high-water mark is its own) by
 * bench/activation-memory.ts and test/integration/memory-plan.test.ts.
 *
 *   node bin/run-ts.js bench/memory-probe.ts '{"arch":"llama","hidden":128,"layers":4,"heads":4,"seq":512,"batch":1,"recompute":true}'
 *
 * A random model of the given sizes is built in memory (no files; with
 * computeDtype bfloat16 it is written as a bfloat16 checkpoint by a child
 * process of this script, then loaded as training loads it, its matrices left
 * in the files), then two LoRA (or full) steps run: gradients from the engine and an AdamW update, as
 * the training loop takes them. Prints one JSON line:
 *   baseline   VmHWM (bytes) with the model loaded, before any session exists
 *   peak       VmHWM after the second step
 *   plan       the memory plan (worker/engine/memory-plan.ts) of the same run
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { computeFingerprint, expectedWeightShapes, normalizeConfig } from '../common/hf-model.ts';
import type { LoadedModel, LoraConfig } from '../common/model-config.ts';
import { numel, type TensorMap } from '../common/tensor.ts';
import { createRng } from '../common/random.ts';
import { AdamW } from '../common/optim.ts';
import { Engine } from '../worker/engine/engine.ts';
import { isHalfWeight, toFloat16, type HalfModel, type HalfTensor } from '../worker/engine/half.ts';
import { baseMemory, loadBaseModel } from '../worker/engine/quantize.ts';
import { writeModelFiles } from '../worker/engine/model.ts';
import { memoryPlan } from '../worker/engine/memory-plan.ts';

export interface ProbeConfig {
  arch?: 'llama' | 'gpt2';
  hidden: number;
  layers: number;
  heads: number;
  kvHeads?: number;
  intermediate?: number;
  vocab?: number;
  seq: number;
  batch: number;
  recompute?: boolean;
  mode?: 'lora' | 'full';
  r?: number;
  targets?: string[];
  threads?: number;
  /** float16: the 2-D weights made and held in float16 (--compute-dtype float16); bfloat16: left in a bfloat16 checkpoint's files. */
  computeDtype?: 'float32' | 'float16' | 'bfloat16';
}

export interface ProbeResult {
  baseline: number;
  peak: number;
  plan: ReturnType<typeof memoryPlan>;
}

function vm(field: 'VmHWM' | 'VmRSS'): number {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync('/proc/self/status', 'utf8'));
  if (!m) throw new Error(`/proc/self/status has no ${field}`);
  return Number(m[1]) * 1024;
}

function probeRawConfig(c: ProbeConfig): Record<string, unknown> {
  const arch = c.arch ?? 'llama';
  const raw = arch === 'gpt2'
    ? { model_type: 'gpt2', vocab_size: c.vocab ?? 512, n_embd: c.hidden, n_head: c.heads, n_layer: c.layers, n_positions: Math.max(c.seq, 64), n_inner: c.intermediate ?? 4 * c.hidden }
    : {
        model_type: 'llama',
        vocab_size: c.vocab ?? 512,
        hidden_size: c.hidden,
        intermediate_size: c.intermediate ?? Math.ceil((8 / 3) * c.hidden / 8) * 8,
        num_hidden_layers: c.layers,
        num_attention_heads: c.heads,
        num_key_value_heads: c.kvHeads ?? c.heads,
        max_position_embeddings: Math.max(c.seq, 64),
      };
  return raw;
}

export function probeModel(c: ProbeConfig): LoadedModel {
  const config = normalizeConfig(probeRawConfig(c), 'memory-probe');
  const rng = createRng(1);
  const weights: TensorMap = new Map();
  const half = new Map<string, HalfTensor>();
  for (const [name, shape] of expectedWeightShapes(config)) {
    const data = new Float32Array(numel(shape));
    const norm = /(norm|ln_\d|ln_f)\.weight$/.test(name);
    for (let i = 0; i < data.length; i++) data[i] = norm ? 1 : 0.02 * rng.normal();
    // float16: converted tensor by tensor, so that the float32 model is never held whole.
    if (c.computeDtype === 'float16' && isHalfWeight(name, shape)) half.set(name, { shape: [...shape], data: toFloat16(data, name) });
    else weights.set(name, { shape: [...shape], data });
  }
  if (c.computeDtype === 'float16') {
    const m: HalfModel = { dir: '(memory)', config, weights, half, fingerprint: 'memory-probe' };
    return m;
  }
  return { dir: '(memory)', config, weights, fingerprint: computeFingerprint(config, weights) };
}

/** Writes the probe's model as a bfloat16 checkpoint (in a child process: its float32 weights must not count in the probe's peak). */
function writeBf16Checkpoint(c: ProbeConfig): string {
  const dir = join(mkdtempSync(join(tmpdir(), 'fedtune-probe-')), 'model');
  const r = spawnSync(process.execPath, [join(import.meta.dirname, '..', 'bin', 'run-ts.js'), fileURLToPath(import.meta.url), JSON.stringify(c), '--write', dir], { stdio: ['ignore', 'ignore', 'inherit'] });
  if (r.status !== 0) throw new Error(`memory-probe: writing the bfloat16 checkpoint failed (${r.status})`);
  return dir;
}

async function main(): Promise<void> {
  const c = JSON.parse(process.argv[2] ?? '{}') as ProbeConfig;
  if (process.argv[3] === '--write') {
    mkdirSync(process.argv[4]!, { recursive: true });
    await writeModelFiles(process.argv[4]!, probeRawConfig(c), probeModel({ ...c, computeDtype: 'float32' }).weights, { dtype: 'bfloat16' });
    writeFileSync(join(process.argv[4]!, 'tokenizer.json'), '{}'); // the engine never tokenizes here
    return;
  }
  const bfDir = c.computeDtype === 'bfloat16' ? writeBf16Checkpoint(c) : null;
  const model = bfDir ? await loadBaseModel(bfDir, undefined, { compute: 'bfloat16' }) : probeModel(c);
  const mode = c.mode ?? 'lora';
  const lora: LoraConfig = {
    r: c.r ?? 8,
    alpha: 16,
    dropout: 0,
    targetModules: c.targets ?? (model.config.family === 'gpt2' ? ['c_attn', 'c_proj', 'c_fc'] : ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']),
  };
  const engine = Engine.create(model, { mode, ...(mode === 'lora' ? { lora } : {}), threads: c.threads ?? 2, recompute: c.recompute ?? false, computeDtype: c.computeDtype ?? 'float32' });
  const params = engine.initParams(0);
  const optimizer = new AdamW({ lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0 });
  const rng = createRng(2);
  const N = c.batch * c.seq;
  const inputIds = Int32Array.from({ length: N }, () => rng.int(model.config.vocabSize));
  const batch = { batchSize: c.batch, seqLen: c.seq, inputIds, labels: Int32Array.from(inputIds) };
  const baseline = vm('VmHWM');
  // Two steps: from the second on, ONNX Runtime runs as it will for the rest of training.
  for (let step = 0; step < 2; step++) {
    const { grads } = await engine.lossAndGrads(params, batch);
    optimizer.step(params, grads, 1e-4);
  }
  const peak = vm('VmHWM');
  const plan = memoryPlan(model.config, {
    mode,
    lora,
    batchSize: c.batch,
    seqLen: c.seq,
    recompute: c.recompute ?? false,
    dtype: 'float32',
    computeDtype: c.computeDtype ?? 'float32',
    weightBytes: baseMemory(model).total,
  });
  const out: ProbeResult = { baseline, peak, plan };
  process.stdout.write(`${JSON.stringify(out)}\n`);
  await engine.close();
  if (bfDir) rmSync(dirname(bfDir), { recursive: true, force: true });
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await main();
}
