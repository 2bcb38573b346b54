/**
 * Half-precision base weights (`--compute-dtype float16`), mixed precision as
 * PyTorch's autocast does it (Micikevicius et al. 2018, "Mixed Precision
 * Training"): the frozen base matrices (decoder linears, embeddings, lm_head)
 * are held in float16; on CUDA each product with one of them runs in float16
 * (its input cast down, its output cast back up, and the same for the two
 * products of its backward pass); everything else stays float32: norms,
 * attention, softmax, the loss, the LoRA adapters (the master weights) and
 * AdamW's state. ONNX Runtime's CPU provider has no float16 Gemm, so CPU graphs
 * widen each weight to float32 just before its product instead
 * (model-graph.ts, GraphSpec.half 'storage').
 *
 * Loss scaling: the backward pass is seeded with S / tokens instead of
 * 1 / tokens, so gradients that would fall below float16's smallest normal
 * value (6.1e-5) are carried S times larger through the float16 products, and
 * the engine divides them back in float32. The scale is dynamic, with PyTorch
 * GradScaler's defaults (init 2^16, x2 after 2000 micro-batches without
 * overflow, /2 on one): a micro-batch whose scaled gradients overflow is run
 * again at half the scale, so every step uses finite gradients and no step is
 * skipped (GradScaler skips the optimizer step instead).
 *
 * bfloat16 (`--compute-dtype bfloat16`): onnxruntime-node's Tensor has no
 * bfloat16 type, so bfloat16 weights cannot be fed to a session from JS.
 * Instead the 2-D base weights of a checkpoint stored in bfloat16 stay in its
 * safetensors files, never read into JS: each graph names them as initializers
 * whose bytes ONNX Runtime maps from the file at their offset
 * (Graph.externalInitializer; runtime.ts externalDataDir), once per process on
 * CPU however many sessions name them (the page cache is shared), and copied to
 * the device once per session on CUDA, not per run. Every graph widens them to
 * float32 just before their product ('storage', on CUDA too: bfloat16 has
 * float32's range, so there is no loss scaling, and products run in float32).
 */
import { closeSync, openSync, readSync, statSync, type Stats } from 'node:fs';
import { join } from 'node:path';
import type { FloatArray, TensorMap } from '../../common/tensor.ts';
import type { LoadedModel } from '../../common/model-config.ts';
import { bf16BitsToF32, f16BitsToF32, f32ToF16Bits } from '../../common/update-encoding.ts';
import { cudaProviderInstalled, type Device } from './runtime.ts';

export type ComputeDtype = 'float32' | 'float16' | 'bfloat16';
export const COMPUTE_DTYPES: readonly ComputeDtype[] = ['float32', 'float16', 'bfloat16'];
/** float16's largest finite value. */
export const FLOAT16_MAX = 65504;

/** The base's matrices are held in half precision (float16 in memory, or bfloat16 left in the checkpoint's files). */
export function isHalfCompute(d: ComputeDtype | undefined): d is 'float16' | 'bfloat16' {
  return d === 'float16' || d === 'bfloat16';
}

/** Validates a --compute-dtype value; undefined means float32. */
export function parseComputeDtype(value: unknown, field = '--compute-dtype'): ComputeDtype {
  if (value === undefined || value === null) return 'float32';
  if (typeof value !== 'string' || !(COMPUTE_DTYPES as readonly string[]).includes(value)) {
    throw new Error(`${field} is ${JSON.stringify(value)}, expected one of ${COMPUTE_DTYPES.join(', ')}`);
  }
  return value as ComputeDtype;
}

/**
 * What float16 base weights cannot go with, refused by name: full training (the float16 weights
 * are frozen), a 4-bit base (its products are dequantised to float32) and DP-SGD (per-example
 * gradients are float32 only). Every entry point (CLI, trainer, engine, graph) asks here.
 */
export function checkHalfCombination(o: { computeDtype: ComputeDtype; full?: boolean; quantizeBase?: string | undefined; dpSgd?: boolean }): void {
  const d = o.computeDtype;
  if (d === 'float32') return;
  if (o.full) throw new Error(`--compute-dtype ${d} holds the frozen base weights in ${d}, so it applies to LoRA training only, not --full; drop one of them`);
  if (o.quantizeBase) throw new Error(`--compute-dtype ${d} and --quantize-base cannot be combined (the 4-bit products are dequantised to float32); drop one of them`);
  if (o.dpSgd) throw new Error('DP-SGD (privacy.dp_sgd, --dp-*): per-example gradients are computed in float32 only; use --compute-dtype float32');
}

/**
 * The half-precision graph a session on `device` gets (GraphSpec.half): float16 products where it
 * runs on CUDA (the provider installed), weights widened per product on CPU (no float16 Gemm
 * there) and for bfloat16 everywhere.
 */
export function halfGraphFor(device: Device | undefined, dtype: ComputeDtype = 'float16'): 'compute' | 'storage' {
  return dtype === 'float16' && device === 'cuda' && cudaProviderInstalled() ? 'compute' : 'storage';
}

/** The base weights held in float16 with --compute-dtype float16: every 2-D one (linears, embeddings, lm_head, gpt2's position table). */
export function isHalfWeight(_name: string, shape: readonly number[]): boolean {
  return shape.length === 2;
}

export interface HalfTensor {
  shape: number[];
  /** IEEE binary16 bits, row-major as stored. */
  data: Uint16Array;
}

/** A loaded model whose 2-D base weights are held in float16 (halfModel / loadBaseModel). */
export interface HalfModel extends LoadedModel {
  /** Weight name -> its float16 form (these names are absent from `weights`). */
  half: Map<string, HalfTensor>;
}

export function halfWeights(model: LoadedModel): Map<string, HalfTensor> | undefined {
  return (model as Partial<HalfModel>).half;
}

/**
 * float32 values -> float16 bits, rounded to nearest even. A finite value
 * beyond float16's range (|x| > 65504 after rounding) fails naming `what`:
 * such a weight cannot be held in float16.
 */
export function toFloat16(data: ArrayLike<number>, what: string): Uint16Array {
  const out = new Uint16Array(data.length);
  toFloat16Into(data, out, 0, what);
  return out;
}

/** toFloat16 of `data` written to out[at ...]; the index an error names is the element's in `out`. */
export function toFloat16Into(data: ArrayLike<number>, out: Uint16Array, at: number, what: string): void {
  for (let i = 0; i < data.length; i++) {
    const x = data[i]!;
    const h = f32ToF16Bits(x);
    if ((h & 0x7c00) === 0x7c00 && Number.isFinite(x)) {
      throw new Error(`--compute-dtype float16: ${what} holds ${x} at index ${at + i}, beyond float16's range (±${FLOAT16_MAX}); use --compute-dtype float32 for this model`);
    }
    out[at + i] = h;
  }
}

/** float16 bits -> float32 values (exact). */
export function fromFloat16(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = f16BitsToF32(bits[i]!);
  return out;
}

/**
 * The model with its 2-D base weights in float16: a new model object whose
 * `weights` keep the rest (norms, biases) in float32. The fingerprint stays the
 * checkpoint's. A model already half is returned as it is.
 */
export function halfModel(model: LoadedModel): HalfModel {
  if (halfWeights(model)) return model as HalfModel;
  const weights: TensorMap = new Map();
  const half = new Map<string, HalfTensor>();
  for (const [name, t] of model.weights) {
    if (isHalfWeight(name, t.shape)) half.set(name, { shape: t.shape, data: toFloat16(t.data, `${model.dir}: ${name}`) });
    else weights.set(name, t);
  }
  return { ...model, weights, half };
}

/** A base weight held in float16 or left in its file in bfloat16, widened to float32 (DoRA's norms), or undefined when it is neither. */
export function halfWeightValues(model: LoadedModel, name: string): FloatArray | undefined {
  const h = halfWeights(model)?.get(name);
  if (h) return fromFloat16(h.data);
  const f = fileWeights(model)?.get(name);
  return f ? readFileWeight(model.dir, f) : undefined;
}

/** A 2-D base weight left in its safetensors file in bfloat16 (--compute-dtype bfloat16): where its bytes are. */
export interface FileWeight {
  shape: number[];
  /** The safetensors file, a name in the model directory. */
  file: string;
  /** Byte offset of the tensor's data in the file. */
  offset: number;
  length: number;
}

/** A loaded model whose 2-D base weights stay in their files in bfloat16 (loadBaseModel with compute bfloat16). */
export interface FileWeightsModel extends LoadedModel {
  /** Weight name -> where it lies (these names are absent from `weights`). */
  inFile: Map<string, FileWeight>;
  /** Each file's identity when its header was read (and the fingerprint taken): ONNX Runtime must map those bytes. */
  fileIds: Map<string, FileIdentity>;
}

export function fileWeights(model: LoadedModel): Map<string, FileWeight> | undefined {
  return (model as Partial<FileWeightsModel>).inFile;
}

/** A file as fedtune read it: a file replaced (another inode) or rewritten (size, mtime) since then has another identity. */
export interface FileIdentity {
  dev: number;
  ino: number;
  size: number;
  mtimeMs: number;
}

export function fileIdentity(st: Stats): FileIdentity {
  return { dev: st.dev, ino: st.ino, size: st.size, mtimeMs: st.mtimeMs };
}

/** What differs between two identities of a file, or null when they are the same. */
function identityChange(was: FileIdentity, now: FileIdentity): string | null {
  if (was.dev !== now.dev || was.ino !== now.ino) return 'it was replaced by another file';
  if (was.size !== now.size) return `its size changed from ${was.size} to ${now.size} bytes`;
  if (was.mtimeMs !== now.mtimeMs) return 'it was written to (its modification time changed)';
  return null;
}

/**
 * Session options of a graph: with bfloat16 base weights left in the model's files, the model
 * directory ONNX Runtime maps them from, once every such file is checked to be the one whose header
 * gave their offsets and whose bytes the fingerprint covers (a checkpoint replaced or rewritten since
 * fails here, naming the file, instead of training on other weights than the run agreed on).
 */
export function externalDataOptions(model: LoadedModel, hasExternalData: boolean): { externalDataDir?: string } {
  if (!hasExternalData) return {};
  const changed = changedFile(model.dir, (model as Partial<FileWeightsModel>).fileIds ?? new Map());
  if (changed) {
    throw new Error(
      `${changed.path}: ${changed.why} since fedtune fingerprinted it; its bfloat16 weights are mapped from the file, so they would no longer be the checkpoint the run agreed on: restore the file, or restart the worker so that it fingerprints the checkpoint it trains on`,
    );
  }
  return { externalDataDir: model.dir };
}

/** The first of `files` (names in `dir`) that is no longer the file recorded, and what changed; null when none is. */
export function changedFile(dir: string, files: ReadonlyMap<string, FileIdentity>): { path: string; why: string } | null {
  for (const [file, was] of files) {
    const path = join(dir, file);
    let why: string | null;
    try {
      why = identityChange(was, fileIdentity(statSync(path)));
    } catch (err) {
      why = `it cannot be read any more (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`;
    }
    if (why) return { path, why };
  }
  return null;
}

/** bfloat16 bits -> float32 values: the bits are float32's upper half, so exactly. */
export function fromBFloat16(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = bf16BitsToF32(bits[i]!);
  return out;
}

/** A file weight's values as float32, read from its file (off the training path: DoRA's initial norms). */
export function readFileWeight(dir: string, w: FileWeight): Float32Array {
  const fd = openSync(join(dir, w.file), 'r');
  try {
    const buf = new Uint8Array(w.length);
    let got = 0;
    while (got < w.length) {
      const n = readSync(fd, buf, got, w.length - got, w.offset + got);
      if (n === 0) throw new Error(`${join(dir, w.file)}: ended ${w.length - got} bytes before the end of a bfloat16 weight at offset ${w.offset}`);
      got += n;
    }
    return fromBFloat16(new Uint16Array(buf.buffer, 0, w.length / 2));
  } finally {
    closeSync(fd);
  }
}

export interface LossScaleOptions {
  /** Initial scale (default 2^16). */
  init?: number;
  /** Micro-batches without overflow before the scale doubles (default 2000). */
  growthInterval?: number;
}

/** Dynamic loss scale: halve on overflow, double after `growthInterval` clean micro-batches (PyTorch GradScaler's rule). */
export class LossScaler {
  private s: number;
  private clean = 0;
  readonly growthInterval: number;
  /** Micro-batches run again at a smaller scale. */
  overflows = 0;

  constructor(o: LossScaleOptions = {}) {
    this.s = o.init ?? 2 ** 16;
    this.growthInterval = o.growthInterval ?? 2000;
    if (!(this.s > 0) || !Number.isFinite(this.s)) throw new Error(`loss scale init is ${this.s}, expected a finite number > 0`);
    if (!Number.isInteger(this.growthInterval) || this.growthInterval < 1) throw new Error(`loss scale growthInterval is ${this.growthInterval}, expected an integer >= 1`);
  }

  get scale(): number {
    return this.s;
  }

  /** Whether a run whose scaled gradients overflowed may be retried at a smaller scale (the scale is halved). */
  backoff(): boolean {
    if (this.s <= 1) return false;
    this.s /= 2;
    this.clean = 0;
    this.overflows++;
    return true;
  }

  /** A micro-batch's gradients came out finite. */
  finite(): void {
    if (++this.clean >= this.growthInterval) {
      this.clean = 0;
      if (this.s * 2 <= 2 ** 24) this.s *= 2;
    }
  }
}

/**
 * Divides the gradients of a loss-scaled run by `factor` in place (float32)
 * and says whether every value is finite.
 */
export function unscaleFinite(grads: Iterable<FloatArray>, factor: number): boolean {
  const inv = 1 / factor;
  let finite = true;
  for (const d of grads) {
    for (let i = 0; i < d.length; i++) {
      const v = d[i]! * inv;
      d[i] = v;
      if (v - v !== 0) finite = false;
    }
  }
  return finite;
}
