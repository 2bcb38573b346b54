/**
 * What 4-bit base weights (`--quantize-base`, worker/engine/quantize.ts) save.
 * A mid-size random llama (default hidden 1024, 8 layers, intermediate 2816,
 * ~100M parameters) is written to a temporary directory; then, each in its own
 * process so that its RSS is its own, the model is loaded for LoRA training
 * with a float32, an nf4 and an int4 base, with float16 compute (its base
 * weights held in float16, --compute-dtype float16) and with bfloat16 (the
 * checkpoint's bfloat16 matrices left in its files and mapped by ONNX Runtime,
 * --compute-dtype bfloat16), an engine is built and a few LoRA training steps
 * run. The checkpoint is stored in bfloat16, as released ones are. Each child reports:
 *
 *   base    bytes the engine holds for the base weights (Engine.baseMemory)
 *   rss     process RSS after the steps and a full GC (steady state)
 *   peak    peak RSS (process.resourceUsage().maxRSS; includes loading the
 *           float32 checkpoint, which every mode goes through)
 *   step    mean seconds per training step after the first
 *
 * and the bench prints the ratios float32 / nf4, float32 / int4 and
 * float32 / float16 (memory) and each mode / float32 (step time), all
 * measured in the same run.
 *
 *   node bin/run-ts.js bench/quantize-memory.ts [--hidden 1024] [--layers 8]
 *     [--intermediate 2816] [--heads 16] [--seq 64] [--steps 3]
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

process.env.FEDTUNE_LOG_LEVEL ??= 'warn';

const CHILD_MARK = 'bench-result ';
const arg = (name: string, def: string): string => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : def;
};

type Mode = 'float32' | 'nf4' | 'int4' | 'float16' | 'bfloat16';
interface ChildResult {
  mode: Mode;
  base: number;
  floatBytes: number;
  fileBytes: number;
  packedBytes: number;
  scaleBytes: number;
  rss: number;
  peak: number;
  step: number;
  loss: number;
}

async function child(mode: Mode, dir: string): Promise<void> {
  const { Engine } = await import('../worker/engine/engine.ts');
  const { loadBaseModel } = await import('../worker/engine/quantize.ts');
  const format = mode === 'nf4' || mode === 'int4' ? mode : undefined;
  const computeDtype = mode === 'float16' || mode === 'bfloat16' ? mode : 'float32';
  const model = await loadBaseModel(dir, format, { compute: computeDtype });
  const lora = { r: 8, alpha: 16, dropout: 0, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] };
  const engine = Engine.create(model, { mode: 'lora', lora, quantizeBase: format, computeDtype });
  const params = engine.initParams(0);
  const T = Number(arg('seq', '64'));
  const steps = Math.max(2, Number(arg('steps', '3')));
  const ids = Int32Array.from({ length: T }, (_, i) => (i * 7) % model.config.vocabSize);
  const batch = { batchSize: 1, seqLen: T, inputIds: ids, labels: Int32Array.from(ids) };
  let loss = 0;
  let t = 0;
  for (let s = 0; s < steps; s++) {
    const t0 = performance.now();
    const r = await engine.lossAndGrads(params, batch);
    if (s > 0) t += performance.now() - t0;
    loss = r.lossSum / r.tokens;
  }
  (globalThis as { gc?: () => void }).gc?.();
  await new Promise((r) => setTimeout(r, 50));
  const m = engine.baseMemory();
  const result: ChildResult = {
    mode,
    base: m.total,
    floatBytes: m.floatBytes,
    fileBytes: m.fileBytes,
    packedBytes: m.packedBytes,
    scaleBytes: m.scaleBytes,
    rss: process.memoryUsage().rss,
    peak: process.resourceUsage().maxRSS * 1024,
    step: t / 1000 / (steps - 1),
    loss,
  };
  console.log(CHILD_MARK + JSON.stringify(result));
  await engine.close();
}

function measure(mode: Mode, dir: string): Promise<ChildResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ['--expose-gc', join(import.meta.dirname, '..', 'bin', 'run-ts.js'), import.meta.filename, '--child', mode, '--dir', dir, ...process.argv.slice(2)], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.on('error', reject);
    p.on('close', (code) => {
      const line = out.split('\n').find((l) => l.startsWith(CHILD_MARK));
      if (code !== 0 || !line) reject(new Error(`${mode} child exited with ${code}${line ? '' : ' without a result'}`));
      else resolve(JSON.parse(line.slice(CHILD_MARK.length)) as ChildResult);
    });
  });
}

const mb = (b: number): string => `${(b / 2 ** 20).toFixed(1)} MiB`;

async function main(): Promise<void> {
  const childMode = arg('child', '');
  if (childMode) return child(childMode as Mode, arg('dir', ''));
  const root = await mkdtemp(join(tmpdir(), 'fedtune-quant-bench-'));
  try {
    const { initModel } = await import('../worker/engine/init.ts');
    const hidden = Number(arg('hidden', '1024'));
    const layers = Number(arg('layers', '8'));
    const intermediate = Number(arg('intermediate', '2816'));
    const heads = Number(arg('heads', '16'));
    const dir = join(root, 'model');
    // `fedtune model init`: normal(0, 0.02) weights, its byte-level tokenizer (a small vocabulary).
    // Stored in bfloat16, as released checkpoints are: every mode reads the same values (exact in float32).
    await initModel(dir, { arch: 'llama', hiddenSize: hidden, numLayers: layers, numHeads: heads, numKvHeads: heads / 2, intermediateSize: intermediate, dtype: 'bfloat16' });
    const { loadModel } = await import('../worker/engine/model.ts');
    let params = 0;
    for (const t of (await loadModel(dir)).weights.values()) params += t.data.length;
    console.log(`model: llama hidden ${hidden}, ${layers} layers, intermediate ${intermediate}, ${(params / 1e6).toFixed(1)}M parameters (float32 ${mb(params * 4)})`);
    const results: ChildResult[] = [];
    for (const mode of ['float32', 'nf4', 'int4', 'float16', 'bfloat16'] as const) {
      const r = await measure(mode, dir);
      results.push(r);
      console.log(
        `${mode.padEnd(7)} base ${mb(r.base).padStart(11)} (float ${mb(r.floatBytes)}, in files ${mb(r.fileBytes)}, packed ${mb(r.packedBytes)}, scales ${mb(r.scaleBytes)})  ` +
          `rss ${mb(r.rss).padStart(11)}  peak ${mb(r.peak).padStart(11)}  step ${r.step.toFixed(3)} s  loss ${r.loss.toFixed(4)}`,
      );
    }
    const f = results[0]!;
    for (const r of results.slice(1)) {
      console.log(
        `float32 / ${r.mode}: base memory ${(f.base / r.base).toFixed(2)}x, steady RSS ${(f.rss / r.rss).toFixed(2)}x ` +
          `(RSS minus base: float32 ${mb(f.rss - f.base)}, ${r.mode} ${mb(r.rss - r.base)}); step time ${r.mode} / float32 ${(r.step / f.step).toFixed(2)}`,
      );
    }
  } finally {
    await rm(root, { recursive: true, force: true });
  }
}

await main();
