/**
 * The memory plan of a training run: what one training step will hold, worked
 * out before the model is loaded, against what the device has.
 *
 * - weights: the base model as the engine holds it (float32; with a 4-bit base,
 *   the packed decoder linears and their scales, dequantised in small pieces).
 * - trainable: the trained parameters and, per parameter, its gradient, AdamW's
 *   m and v and (accumulating over micro-batches) the running sum.
 * - activations: the peak of the training graph's live intermediate tensors.
 *   The graph of the run's batch shape is built (from the weight shapes only,
 *   no weight is read) and its nodes are walked in order: each output is
 *   allocated when produced (Reshape / Identity / Unsqueeze / Squeeze alias
 *   their input, as ONNX Runtime's CPU kernels do) and freed after its last
 *   consumer. Without recompute every layer's intermediates stay until the
 *   backward pass reaches the layer; with recompute only each layer's input
 *   does, plus one layer's intermediates at a time.
 * - constants: the graph's stored tensors (causal and sliding-window masks,
 *   rotary tables), held by ONNX Runtime and once more as serialized bytes.
 * - runtime: Node.js, the ONNX Runtime library and its session.
 * The graph's live peak is multiplied by ACTIVATION_OVERHEAD for what ONNX
 * Runtime holds beyond it (both constants measured, below).
 *
 * Figures are checked against the measured peak (VmHWM) of real steps in
 * test/integration/memory-plan.test.ts.
 */
import { freemem, totalmem } from 'node:os';
import { readFileSync } from 'node:fs';
import type { LoadedModel, LoraConfig, ModelConfig } from '../../common/model-config.ts';
import { expectedWeightShapes } from '../../common/hf-model.ts';
import { loraTargets } from '../../common/lora.ts';
import { numel } from '../../common/tensor.ts';
import { bytesPer, type FloatDType, type Graph } from './graph.ts';
import { buildCausalLmGraph } from './model-graph.ts';
import { halfGraphFor, isHalfCompute, isHalfWeight, type ComputeDtype } from './half.ts';
import type { Device } from './runtime.ts';
import { DEQUANT_CHUNK, isQuantizableWeight } from './quantize.ts';

/**
 * Node.js with onnxruntime-node loaded and a training session created, before
 * any tensor; and what ONNX Runtime holds beyond the graph's live tensors
 * (kernel workspace, its fused kernels' extra intermediates, the arena's
 * rounding). Both fitted to the measured peaks (VmHWM) of 9 training steps
 * of llama models, 256 to 2048 tokens, with and without recompute
 * (bench/activation-memory.ts; every one within 9% with these values).
 */
export const RUNTIME_BYTES = 140 * 2 ** 20;
export const ACTIVATION_OVERHEAD = 1.4;
/** Bytes per weight of a 4-bit base: half a byte plus one float32 scale per block of 64. */
const FOUR_BIT_BYTES_PER_WEIGHT = 0.5 + 4 / 64;

export interface PlanOptions {
  mode: 'lora' | 'full';
  lora?: LoraConfig;
  batchSize: number;
  seqLen: number;
  recompute: boolean;
  dtype?: FloatDType;
  /** The decoder linears held 4-bit (`--quantize-base nf4|int4`). */
  quantizeBase?: string;
  /** float16: the 2-D base weights held in float16 (`--compute-dtype float16`, half.ts). */
  computeDtype?: ComputeDtype;
  /** Micro-batch accumulation (more than one micro-batch per step) keeps a running gradient sum. */
  accumulate?: boolean;
  device?: Device;
  /** Bytes of the weights as loaded, when known; otherwise float32 of every weight of the configuration. */
  weightBytes?: number;
}

export interface PlanLine {
  item: string;
  bytes: number;
  detail: string;
}

export interface DeviceMemory {
  device: Device;
  /** Bytes the device has in all (null: unknown). */
  total: number | null;
  /** Bytes free for this run now (null: unknown). */
  available: number | null;
}

export interface MemoryPlan {
  lines: PlanLine[];
  weights: number;
  trainable: number;
  /** Peak of the training graph's live intermediates (twice that with ONNX Runtime's memory pattern, without recompute). */
  activations: number;
  /** Live intermediates when the loss is computed (what the backward pass starts from). */
  activationsSaved: number;
  /** Attention scores of one layer, B · heads · T · T elements. */
  attentionScores: number;
  constants: number;
  runtime: number;
  total: number;
}

function fmt(bytes: number): string {
  const mib = bytes / 2 ** 20;
  return mib >= 10240 ? `${(mib / 1024).toFixed(1)} GiB` : mib >= 10 ? `${mib.toFixed(0)} MiB` : `${mib.toFixed(1)} MiB`;
}

/** A model of the configuration's weight shapes, no values: enough to build its graph. */
function shapesOnly(config: ModelConfig): LoadedModel {
  const weights = new Map([...expectedWeightShapes(config)].map(([name, shape]) => [name, { shape: [...shape], data: new Float32Array(0) }]));
  return { dir: '(memory plan)', config, weights, fingerprint: '' };
}

const ALIASES = new Set(['Reshape', 'Identity', 'Unsqueeze', 'Squeeze', 'Flatten']);

/**
 * The order ONNX Runtime runs the nodes in (its GraphViewer's default order):
 * a depth-first walk backwards from the nodes whose outputs nothing consumes,
 * a node placed once all its producers are; among siblings, and among the
 * starting nodes, the one added last is walked first.
 */
export function runtimeOrder(nodes: Graph['nodes']): number[] {
  const producer = new Map<string, number>();
  nodes.forEach((n, i) => n.output.forEach((o) => o && producer.set(o, i)));
  const consumed = new Set<number>();
  const inputsOf = nodes.map((n) => {
    const ps = new Set<number>();
    for (const name of n.input) {
      const p = producer.get(name);
      if (p !== undefined) ps.add(p);
    }
    for (const p of ps) consumed.add(p);
    return [...ps].sort((a, b) => a - b);
  });
  const order: number[] = [];
  const visited = new Uint8Array(nodes.length);
  const stack: Array<[number, boolean]> = [];
  nodes.forEach((_, i) => !consumed.has(i) && stack.push([i, false]));
  while (stack.length) {
    const [i, leave] = stack.pop()!;
    if (leave) {
      order.push(i);
      continue;
    }
    if (visited[i]) continue;
    visited[i] = 1;
    stack.push([i, true]);
    for (const p of inputsOf[i]!) stack.push([p, false]);
  }
  return order;
}

/**
 * Walks the graph's nodes in ONNX Runtime's order (or, with `emitted`, in the
 * order they were emitted: the whole forward pass before the backward pass)
 * and returns the peak bytes of live intermediates (graph inputs and stored
 * constants excluded; graph outputs stay live to the end) and the live bytes
 * when `turn` is produced.
 */
export function liveness(g: Graph, turn?: string, emitted = false): { peak: number; atTurn: number } {
  const external = new Set([...g.inputs.map((v) => v.name), ...g.initializers.map((c) => c.name)]);
  const outputs = new Set(g.outputs.map((v) => v.name));
  const nodes = emitted ? g.nodes : runtimeOrder(g.nodes).map((i) => g.nodes[i]!);
  const lastUse = new Map<string, number>();
  nodes.forEach((n, i) => n.input.forEach((name) => lastUse.set(name, i)));
  const buffer = new Map<string, { bytes: number; refs: number }>();
  let live = 0;
  let peak = 0;
  let atTurn = 0;
  const release = (name: string): void => {
    const b = buffer.get(name);
    if (!b) return;
    buffer.delete(name);
    if (--b.refs === 0) live -= b.bytes;
  };
  nodes.forEach((n, i) => {
    for (const name of n.output) {
      if (!name) continue;
      const src = n.input[0];
      const shared = ALIASES.has(n.opType) && src !== undefined ? buffer.get(src) : undefined;
      if (shared) {
        shared.refs++;
        buffer.set(name, shared);
        continue;
      }
      const v = g.values.get(name);
      const bytes = v ? numel(v.shape) * bytesPer(v.dtype) : 0;
      buffer.set(name, { bytes, refs: 1 });
      live += bytes;
    }
    peak = Math.max(peak, live);
    if (turn && n.output.includes(turn)) atTurn = live;
    for (const name of new Set(n.input)) if (lastUse.get(name) === i && !outputs.has(name) && !external.has(name)) release(name);
    for (const name of n.output) if (name && !lastUse.has(name) && !outputs.has(name)) release(name);
  });
  return { peak, atTurn };
}

export function memoryPlan(config: ModelConfig, o: PlanOptions): MemoryPlan {
  const dtype = o.dtype ?? 'float32';
  const e = bytesPer(dtype);
  const shapes = expectedWeightShapes(config);
  const totalWeights = [...shapes.values()].reduce((s, sh) => s + numel(sh), 0);
  const lines: PlanLine[] = [];

  // Weights.
  let weights = o.weightBytes ?? totalWeights * 4;
  let weightDetail = `${(totalWeights / 1e6).toFixed(1)}M weights, float32`;
  if (o.quantizeBase && o.weightBytes === undefined) {
    // The decoder linear weights are held 4-bit; embeddings, norms and biases stay float32. The graph
    // dequantises them in pieces of DEQUANT_CHUNK values, again for the backward pass, never whole.
    const linear = [...shapes].filter(([name, sh]) => isQuantizableWeight(name, sh)).reduce((s, [, sh]) => s + numel(sh), 0);
    weights = (totalWeights - linear) * 4 + linear * FOUR_BIT_BYTES_PER_WEIGHT;
    weightDetail = `${(linear / 1e6).toFixed(1)}M decoder linear weights ${o.quantizeBase} (4-bit + a float32 scale per 64, dequantised in pieces of ${fmt(DEQUANT_CHUNK * e)}), the rest float32`;
  }
  const halfDtype = isHalfCompute(o.computeDtype);
  if (halfDtype && o.weightBytes === undefined) {
    // 2-D weights in float16 (or bfloat16, mapped from the checkpoint's files); on CPU each is widened to float32 for its product (graph activations below).
    const twoD = [...shapes].filter(([name, sh]) => isHalfWeight(name, sh)).reduce((s, [, sh]) => s + numel(sh), 0);
    weights = (totalWeights - twoD) * 4 + twoD * 2;
    weightDetail = `${(twoD / 1e6).toFixed(1)}M matrix weights ${o.computeDtype === 'bfloat16' ? 'bfloat16 (mapped from the checkpoint\'s files)' : 'float16'}, the rest float32`;
  }
  lines.push({ item: 'weights', bytes: weights, detail: weightDetail });

  // Trainable parameters and optimizer state.
  const trainedCount = o.mode === 'full'
    ? totalWeights
    : loraTargets(config, o.lora!).reduce((s, t) => s + t.r * (t.inFeatures + t.outFeatures) + (t.dora ? t.outFeatures : 0), 0);
  const copies = 4 + (o.accumulate ? 1 : 0) + 1; // params, grads, m, v, (running sum), gradients as ONNX Runtime returns them
  const trainable = trainedCount * 4 * copies;
  lines.push({
    item: o.mode === 'full' ? 'trained weights + AdamW' : 'LoRA + AdamW',
    bytes: trainable,
    detail: `${(trainedCount / 1e6).toFixed(2)}M parameters x ${copies} float32 copies (values, gradients from the graph and as summed, m, v${o.accumulate ? ', running sum' : ''})`,
  });

  // Activations: the graph of this batch shape, walked.
  const built = buildCausalLmGraph(shapesOnly(config), {
    batchSize: o.batchSize,
    seqLen: o.seqLen,
    mode: o.mode,
    ...(o.lora ? { lora: o.lora } : {}),
    dtype,
    kind: 'train',
    recompute: o.recompute,
    // bfloat16 graphs are float16 'storage' graphs in shape and bytes: the plan walks the float16 one.
    ...(halfDtype ? { half: halfGraphFor(o.device, o.computeDtype) } : {}),
  });
  const g = built.graph;
  const { peak } = liveness(g);
  const { atTurn } = liveness(g, 'loss_sum', true);
  const nh = config.numHeads;
  const attentionScores = o.batchSize * nh * o.seqLen * o.seqLen * e;
  lines.push({
    item: `activations${o.recompute ? ' (recompute)' : ''}`,
    bytes: peak * ACTIVATION_OVERHEAD,
    detail: `${fmt(peak)} peak of the graph's live tensors x ${ACTIVATION_OVERHEAD} for ONNX Runtime, at batch ${o.batchSize} x ${o.seqLen} tokens; ${fmt(atTurn)} held when the backward pass starts; one layer's attention scores (B·heads·T·T) ${fmt(attentionScores)}`,
  });
  // Without recompute the session keeps ONNX Runtime's memory pattern (runtime.ts): from the second
  // step on, one more block the size of the step's intermediates beside the arena the first step filled.
  const pattern = o.recompute ? 0 : peak * ACTIVATION_OVERHEAD;
  if (pattern) lines.push({ item: 'memory pattern', bytes: pattern, detail: 'ONNX Runtime\'s preplanned block for the intermediates, beside its arena (off with --recompute)' });
  // The serialized model (JS), and its constants once more inside ONNX Runtime.
  const constants = g.initializers.reduce((s, c) => s + c.bytes.byteLength, 0) * 2 + built.bytes.byteLength;
  lines.push({ item: 'graph constants', bytes: constants, detail: `masks and rotary tables (${fmt(constants / 3)}), in the session and as the serialized model` });
  lines.push({ item: 'runtime', bytes: RUNTIME_BYTES, detail: 'Node.js, ONNX Runtime and its session' });
  const total = lines.reduce((s, l) => s + l.bytes, 0);
  return { lines, weights, trainable, activations: peak * ACTIVATION_OVERHEAD + pattern, activationsSaved: atTurn, attentionScores, constants, runtime: RUNTIME_BYTES, total };
}

/** The device's memory: for the CPU, the machine's total and what is available now; a CUDA device's is unknown here. */
export function deviceMemory(device: Device = 'cpu'): DeviceMemory {
  if (device === 'cuda') return { device, total: null, available: null };
  let available = freemem();
  try {
    const m = /^MemAvailable:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'));
    if (m) available = Number(m[1]) * 1024;
  } catch {
    // no /proc: os.freemem() it is
  }
  return { device, total: totalmem(), available };
}

/** The plan as a table, with the device's memory under it. */
export function formatPlan(plan: MemoryPlan, dev: DeviceMemory): string {
  const rows = plan.lines.map((l) => `  ${l.item.padEnd(26)} ${fmt(l.bytes).padStart(10)}  ${l.detail}`);
  const device = dev.available === null
    ? `  ${'device'.padEnd(26)} ${'unknown'.padStart(10)}  ${dev.device}: its memory cannot be read here; the figures are what the run needs`
    : `  ${'available'.padEnd(26)} ${fmt(dev.available).padStart(10)}  ${dev.device} (of ${fmt(dev.total!)} in all)`;
  return ['memory plan:', ...rows, `  ${'total'.padEnd(26)} ${fmt(plan.total).padStart(10)}`, device].join('\n');
}

/** Whether the plan fits (null: the device's memory is unknown). */
export function planFits(plan: MemoryPlan, dev: DeviceMemory): boolean | null {
  return dev.available === null ? null : plan.total <= dev.available;
}

/**
 * What to change so a run that does not fit would: each option worked out with
 * the plan (recompute, a smaller batch, a shorter sequence, a 4-bit base).
 */
export function planAdvice(config: ModelConfig, o: PlanOptions, available: number): string[] {
  const fits = (p: Partial<PlanOptions>): boolean => memoryPlan(config, { ...o, ...p }).total <= available;
  const out: string[] = [];
  if (!o.recompute && fits({ recompute: true })) out.push('--recompute (recompute each layer in the backward pass)');
  if (o.batchSize > 1 && fits({ batchSize: 1 })) {
    // The largest batch that fits (memory grows with the batch).
    let lo = 1;
    let hi = o.batchSize - 1;
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      if (fits({ batchSize: mid })) lo = mid;
      else hi = mid - 1;
    }
    out.push(`a batch size of ${lo} (now ${o.batchSize}; raise gradient accumulation to keep the tokens per step)`);
  }
  for (let t = Math.floor(o.seqLen / 2); t >= 16; t = Math.floor(t / 2)) {
    if (fits({ seqLen: t })) {
      out.push(`a sequence length of ${t} (now ${o.seqLen})`);
      break;
    }
  }
  if (!o.quantizeBase && o.mode === 'lora' && o.computeDtype === 'float32' && fits({ computeDtype: 'float16' })) out.push('--compute-dtype float16 (float16 base weights)');
  if (!o.quantizeBase && o.mode === 'lora' && fits({ quantizeBase: 'nf4', computeDtype: 'float32' })) out.push(`--quantize-base nf4 (4-bit base weights${o.computeDtype === 'float16' ? ', instead of --compute-dtype float16' : ''})`);
  if (!o.recompute && out.length === 0) {
    const both = { recompute: true, batchSize: 1 };
    if (fits(both)) out.push('--recompute together with a batch size of 1');
  }
  return out;
}

/**
 * Refuses a run that cannot fit, before anything is loaded: throws an error
 * that gives the plan's total, what is available and what to change.
 */
export function checkPlan(config: ModelConfig, o: PlanOptions, dev: DeviceMemory = deviceMemory(o.device)): MemoryPlan {
  const plan = memoryPlan(config, o);
  if (planFits(plan, dev) === false) {
    const advice = planAdvice(config, o, dev.available!);
    throw new Error(
      `memory plan: this run needs about ${fmt(plan.total)} but ${fmt(dev.available!)} is available on the ${dev.device} ` +
        `(activations ${fmt(plan.activations)}, weights ${fmt(plan.weights)}, trainable + AdamW ${fmt(plan.trainable)}); ` +
        (advice.length ? `it would fit with ${advice.join(', or ')}` : 'no single change of batch size, sequence length, --recompute or --quantize-base makes it fit; use a smaller model') +
        ' (--plan prints the whole plan)',
    );
  }
  return plan;
}

/**
 * `--plan` and the check every run makes before loading: the plan of a run of
 * `config`, printed with `print`; throws (checkPlan's message) when it cannot
 * fit. Returns whether it fits (null: the device's memory is unknown).
 */
export function planRun(config: ModelConfig, o: PlanOptions, print: (line: string) => void = () => {}, dev: DeviceMemory = deviceMemory(o.device)): boolean | null {
  const seqLen = Math.min(o.seqLen, config.maxPositions);
  const opts = { ...o, seqLen };
  const plan = memoryPlan(config, opts);
  print(formatPlan(plan, dev));
  const fits = planFits(plan, dev);
  if (fits === false) checkPlan(config, opts, dev);
  return fits;
}

/**
 * The device's memory as a process that already holds part of the plan (the
 * loaded model, the runtime) sees it: what is available plus what this
 * process holds now (VmRSS), since the plan counts those too.
 */
export function withOwnMemory(dev: DeviceMemory): DeviceMemory {
  if (dev.available === null) return dev;
  let rss = process.memoryUsage.rss();
  try {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync('/proc/self/status', 'utf8'));
    if (m) rss = Number(m[1]) * 1024;
  } catch {
    // no /proc: Node's figure
  }
  return { ...dev, available: dev.available + rss };
}
