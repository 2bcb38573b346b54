/**
 * 4-bit base weights (QLoRA, Dettmers et al. 2023): the frozen projection
 * matrices of the decoder layers are quantised once, at load, in blocks of 64
 * values with one float32 scale (the block's absmax) per block, and only that
 * packed form stays resident. The training graph dequantises them on every run
 * (a lookup of each byte's two code values, times the block's scale) and LoRA
 * runs in float32 on top, as bitsandbytes' Linear4bit does.
 *
 * Formats (value = code[q] · absmax, q the 4-bit index):
 * - nf4: NormalFloat4, the 16 code values bitsandbytes ships
 *   (`bitsandbytes/functional.py` get_4bit_type("nf4"); QLoRA §3 and
 *   `create_normal_map(offset=0.9677083)`: quantiles of N(0, 1) normalised to
 *   [-1, 1], with an exact zero). A value goes to its nearest code value, as
 *   bitsandbytes' dQuantizeNF4 decides by the midpoints.
 * - int4: symmetric linear levels (q − 8) / 7, q = 1..15 (q = 0, -8/7, is never
 *   produced): round(x / absmax · 7) + 8, the layout of ONNX Runtime's
 *   MatMulNBits / DequantizeLinear with zero point 8 and scale absmax / 7.
 *
 * Packing: the tensor is flattened row-major as stored (llama [out, in], gpt2
 * Conv1D [in, out]), padded with zeros to whole blocks, two indices per byte,
 * the first value in the high nibble (bitsandbytes' order). No double
 * quantisation of the scales (they cost 0.5 bit per weight).
 *
 * Quantised: the linear layers of the decoder (llama family q/k/v/o_proj,
 * gate/up/down_proj, phi3 qkv_proj / gate_up_proj; gpt2 c_attn, attn.c_proj,
 * c_fc, mlp.c_proj), targeted by LoRA or not. Embeddings, norms, biases and
 * lm_head stay float32, as QLoRA / bitsandbytes quantise only the decoder's
 * nn.Linear layers.
 */
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { numel, type FloatArray, type TensorMap } from '../../common/tensor.ts';
import type { LoadedModel } from '../../common/model-config.ts';
import { collectFileWeights, completeWeights, inspectModel, readModelDir, type CheckpointWeight } from '../../common/hf-model.ts';
import { readSafetensorsHeader, readTensorChunks, readTensorEntry, toFloat32 } from '../../common/safetensors.ts';
import type { FloatDType, Graph, HalfDType, Value } from './graph.ts';
import { loadModel } from './model.ts';
import { checkHalfCombination, fileWeights, halfWeights, halfWeightValues, changedFile, fileIdentity, isHalfWeight, toFloat16Into, type ComputeDtype, type FileIdentity, type FileWeight, type FileWeightsModel, type HalfModel, type HalfTensor } from './half.ts';

export type QuantFormat = 'nf4' | 'int4';
export const QUANT_FORMATS: readonly QuantFormat[] = ['nf4', 'int4'];
/** Values per block, each block with one absmax scale (QLoRA's block size for the weights). */
export const QUANT_BLOCK_SIZE = 64;

/**
 * NF4 code values, index 0..15, as bitsandbytes' get_4bit_type("nf4") lists
 * them (QLoRA paper, appendix; test/unit/quantize.test.ts recomputes them from
 * create_normal_map's definition in float64).
 */
export const NF4_CODE: readonly number[] = [
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
  -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
  0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
];
/** int4 code values (q − 8) / 7 for q = 0..15. */
export const INT4_CODE: readonly number[] = Array.from({ length: 16 }, (_, q) => (q - 8) / 7);

export function codeBook(format: QuantFormat): readonly number[] {
  return format === 'nf4' ? NF4_CODE : INT4_CODE;
}

/**
 * The largest |x − dequantise(quantise(x))| a value of a block with absmax a
 * can have, as a multiple of a: half the widest gap between adjacent code
 * values in [-1, 1] (nf4: (0.6962 − 1)/2 ... 0.1519; int4: 1/14).
 */
export function roundTripBound(format: QuantFormat): number {
  const c = codeBook(format).filter((v) => v >= -1 && v <= 1);
  let gap = 0;
  for (let i = 1; i < c.length; i++) gap = Math.max(gap, c[i]! - c[i - 1]!);
  return gap / 2;
}

/** `--quantize-base` / `quantize_base`: undefined (not given), 'nf4' or 'int4'; anything else is refused naming `field`. */
export function parseQuantizeBase(value: unknown, field = '--quantize-base'): QuantFormat | undefined {
  if (value === undefined || value === null || value === false) return undefined;
  if (typeof value === 'string' && (QUANT_FORMATS as readonly string[]).includes(value)) return value as QuantFormat;
  throw new Error(`${field} is ${JSON.stringify(value)}; expected one of ${QUANT_FORMATS.join(', ')} (4-bit base weights) or leave it out for float32 base weights`);
}

/** One quantised weight: packed 4-bit indices and one scale per block. */
export interface QuantizedTensor {
  format: QuantFormat;
  /** The weight's shape as stored. */
  shape: number[];
  numel: number;
  blockSize: number;
  /** ceil(numel / blockSize) · blockSize / 2 bytes, two indices per byte (first in the high nibble). */
  packed: Uint8Array;
  /** absmax of each block, [blocks]. */
  scales: Float32Array;
}

/** Sorted code values -> index of the nearest (ties to the lower index). */
function nearestIndex(code: readonly number[], mids: Float64Array, v: number): number {
  // Binary search over the midpoints between adjacent code values.
  let lo = 0;
  let hi = mids.length; // answer in [0, 16)
  while (lo < hi) {
    const m = (lo + hi) >> 1;
    if (v > mids[m]!) lo = m + 1;
    else hi = m;
  }
  return lo < code.length ? lo : code.length - 1;
}

/** Quantise `data` (row-major, any length) in blocks of `blockSize` (even). `what` names the tensor in errors. */
export function quantizeBlockwise(data: ArrayLike<number>, shape: number[], format: QuantFormat, what: string, blockSize = QUANT_BLOCK_SIZE): QuantizedTensor {
  parseQuantizeBase(format, 'quantize format');
  if (!Number.isInteger(blockSize) || blockSize < 2 || blockSize % 2 !== 0) throw new Error(`quantize: block size ${blockSize} must be an even integer >= 2`);
  const n = data.length;
  const blocks = Math.ceil(n / blockSize);
  const packed = new Uint8Array((blocks * blockSize) / 2);
  const scales = new Float32Array(blocks);
  const code = codeBook(format);
  const mids = Float64Array.from({ length: code.length - 1 }, (_, i) => (code[i]! + code[i + 1]!) / 2);
  const zeroIndex = code.indexOf(0);
  for (let b = 0; b < blocks; b++) {
    const start = b * blockSize;
    const end = Math.min(n, start + blockSize);
    let absmax = 0;
    for (let i = start; i < end; i++) {
      const v = data[i]!;
      if (!Number.isFinite(v)) throw new Error(`quantize: ${what} has a non-finite value ${v} at index ${i}; 4-bit quantisation needs finite weights`);
      absmax = Math.max(absmax, Math.abs(v));
    }
    const scale = Math.fround(absmax);
    scales[b] = scale;
    for (let i = start; i < start + blockSize; i++) {
      const q = i < end && scale > 0 ? nearestIndex(code, mids, data[i]! / scale) : zeroIndex;
      const byte = i >> 1;
      packed[byte] = i % 2 === 0 ? q << 4 : packed[byte]! | q;
    }
  }
  return { format, shape: [...shape], numel: n, blockSize, packed, scales };
}

/** The float32 values a quantised tensor stands for (code value times block scale, rounded to float32 as the graph computes it). */
export function dequantizeBlockwise(q: QuantizedTensor): Float32Array {
  const code = Float32Array.from(codeBook(q.format));
  const out = new Float32Array(q.numel);
  for (let i = 0; i < q.numel; i++) {
    const byte = q.packed[i >> 1]!;
    const idx = i % 2 === 0 ? byte >> 4 : byte & 15;
    out[i] = Math.fround(code[idx]! * q.scales[Math.floor(i / q.blockSize)]!);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Models

/** The decoder's linear-layer weights: what --quantize-base quantises. */
export function isQuantizableWeight(name: string, shape: number[]): boolean {
  if (shape.length !== 2) return false;
  return /^model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj\.weight$/.test(name) || /^transformer\.h\.\d+\.(attn|mlp)\.c_(attn|proj|fc)\.weight$/.test(name);
}

export interface QuantizedBase {
  format: QuantFormat;
  blockSize: number;
  /** Weight name -> its quantised form (these names are absent from the model's float weights). */
  tensors: Map<string, QuantizedTensor>;
  /** Most values per dequantised piece in the graphs (default DEQUANT_CHUNK). */
  pieceValues?: number;
}

/** A loaded model whose decoder linear weights are held 4-bit (quantizeModel). */
export interface QuantizedModel extends LoadedModel {
  quantized: QuantizedBase;
}

export function quantizedBase(model: LoadedModel): QuantizedBase | undefined {
  return (model as Partial<QuantizedModel>).quantized;
}

/**
 * The model with its decoder linear weights quantised: a new model object whose
 * `weights` hold only the float32 weights that stay (embeddings, norms, biases,
 * lm_head) and whose `quantized` holds the rest, packed. The fingerprint stays
 * the float32 checkpoint's (every site quantises the same base the same way).
 * Drop the original model afterwards so its float32 copies can be freed. A
 * model already quantised in `format` is returned as it is.
 */
export function quantizeModel(model: LoadedModel, format: QuantFormat, blockSize = QUANT_BLOCK_SIZE): QuantizedModel {
  parseQuantizeBase(format);
  const have = quantizedBase(model);
  if (have) {
    if (have.format !== format || have.blockSize !== blockSize) {
      throw new Error(`quantize-base: the model is already quantised as ${have.format} (block ${have.blockSize}); load it again to quantise it as ${format} (block ${blockSize})`);
    }
    return model as QuantizedModel;
  }
  const weights = new Map(model.weights);
  const tensors = new Map<string, QuantizedTensor>();
  for (const [name, t] of model.weights) {
    if (!isQuantizableWeight(name, t.shape)) continue;
    tensors.set(name, quantizeBlockwise(t.data, t.shape, format, `${model.dir}: ${name}`, blockSize));
    weights.delete(name);
  }
  return { ...model, weights, quantized: { format, blockSize, tensors } };
}

/** Elements a float16 base weight is read and rounded in at a time (4 MiB of float32). */
const HALF_CHUNK = 1 << 20;

/**
 * Load a model directory for training: loadModel without `format` or half
 * compute; with either, the same checks and weights, but each weight is read
 * from its file, converted to float32 and then quantised (decoder linears,
 * `format`) one at a time, or rounded to float16 (2-D weights, `compute`
 * float16) a chunk at a time, so that the float32 model is never held whole
 * (and never grows the process's heap to its size). With `compute` bfloat16 the 2-D weights are not
 * read at all: each is recorded where it lies in its file (FileWeight), and
 * must be stored as BF16. The fingerprint is the checkpoint's, streamed by
 * inspectModel.
 */
export async function loadBaseModel(
  dir: string,
  format: QuantFormat | undefined,
  o: { blockSize?: number; compute?: ComputeDtype } = {},
): Promise<LoadedModel> {
  const half = (o.compute ?? 'float32') === 'float16';
  const inFile = o.compute === 'bfloat16';
  if (!format && !half && !inFile) return loadModel(dir);
  checkHalfCombination({ computeDtype: o.compute ?? 'float32', quantizeBase: format });
  if (format) parseQuantizeBase(format);
  const blockSize = o.blockSize ?? QUANT_BLOCK_SIZE;
  const md = await readModelDir(dir);
  const found = new Map<string, CheckpointWeight>();
  const weights: TensorMap = new Map();
  const tensors = new Map<string, QuantizedTensor>();
  const halves = new Map<string, HalfTensor>();
  const files = new Map<string, FileWeight>();
  const fileIds = new Map<string, FileIdentity>();
  for (const file of md.checkpoint.files) {
    const path = join(dir, file);
    const fh = await open(path, 'r');
    try {
      if (inFile) fileIds.set(file, fileIdentity(await fh.stat()));
      const header = await readSafetensorsHeader(fh, path);
      const byName = new Map(header.entries.map((e) => [e.name, e]));
      for (const w of collectFileWeights(md, file, byName, found)) {
        const e = byName.get(w.name)!;
        if (inFile && isHalfWeight(w.canonical, w.shape)) {
          if (e.dtype !== 'BF16') {
            throw new Error(
              `${path}: ${w.name} is stored as ${e.dtype}; --compute-dtype bfloat16 trains on the checkpoint's own bfloat16 weights where they lie, so every 2-D weight must be BF16 (use --compute-dtype float16 or float32 with this checkpoint)`,
            );
          }
          files.set(w.canonical, { shape: w.shape, file, offset: header.dataStart + e.begin, length: e.end - e.begin });
          continue;
        }
        if (half && isHalfWeight(w.canonical, w.shape)) {
          // Straight to float16 a chunk at a time: neither the raw bytes nor a float32 copy of the tensor is held whole.
          const data = new Uint16Array(numel(w.shape));
          await readTensorChunks(fh, header, e, path, HALF_CHUNK, (chunk, start) => toFloat16Into(toFloat32(chunk), data, start, `${path}: ${w.name}`));
          halves.set(w.canonical, { shape: w.shape, data });
          continue;
        }
        const data = toFloat32(await readTensorEntry(fh, header, e, path));
        if (format && isQuantizableWeight(w.canonical, w.shape)) tensors.set(w.canonical, quantizeBlockwise(data, w.shape, format, `${path}: ${w.name}`, blockSize));
        else weights.set(w.canonical, { shape: w.shape, data });
      }
    } finally {
      await fh.close();
    }
  }
  // Checkpoint order of the expected weights, as loadModel keeps them.
  const ordered: TensorMap = new Map();
  const qOrdered = new Map<string, QuantizedTensor>();
  const hOrdered = new Map<string, HalfTensor>();
  const fOrdered = new Map<string, FileWeight>();
  for (const name of completeWeights(md, found).keys()) {
    const t = weights.get(name);
    if (t) ordered.set(name, t);
    else if (halves.has(name)) hOrdered.set(name, halves.get(name)!);
    else if (files.has(name)) fOrdered.set(name, files.get(name)!);
    else qOrdered.set(name, tensors.get(name)!);
  }
  const { fingerprint } = await inspectModel(dir);
  // The fingerprint streamed the files after their headers were read: they must still be those files.
  const changed = inFile ? changedFile(dir, fileIds) : null;
  if (changed) throw new Error(`${changed.path}: ${changed.why} while fedtune was loading and fingerprinting it; load the model again once it is no longer being written`);
  const base: LoadedModel = { dir, config: md.config, weights: ordered, fingerprint, rawConfig: md.rawConfig };
  if (half) {
    const m: HalfModel = { ...base, half: hOrdered };
    return m;
  }
  if (inFile) {
    const m: FileWeightsModel = { ...base, inFile: fOrdered, fileIds };
    return m;
  }
  const m: QuantizedModel = { ...base, quantized: { format: format!, blockSize, tensors: qOrdered } };
  return m;
}

/** A base weight as float32 values: the float weight, or the dequantised one (DoRA's norms use this W, as PEFT does with bitsandbytes). */
export function baseWeightValues(model: LoadedModel, name: string): FloatArray {
  const t = model.weights.get(name);
  if (t) return t.data;
  const h = halfWeightValues(model, name);
  if (h) return h;
  const q = quantizedBase(model)?.tensors.get(name);
  if (!q) throw new Error(`model ${model.dir} has no weight ${name}`);
  return dequantizeBlockwise(q);
}

export interface BaseMemory {
  /** Bytes of the float weights held (float32 or float64 arrays as loaded; float16 with --compute-dtype float16). */
  floatBytes: number;
  /** Bytes of the bfloat16 weights left in their files (--compute-dtype bfloat16): mapped by ONNX Runtime, not held in JS. */
  fileBytes: number;
  /** Bytes of packed 4-bit indices. */
  packedBytes: number;
  /** Bytes of the float32 block scales. */
  scaleBytes: number;
  total: number;
}

/** Bytes the model holds for its base weights. */
export function baseMemory(model: LoadedModel): BaseMemory {
  let floatBytes = 0;
  for (const t of model.weights.values()) floatBytes += t.data.byteLength;
  for (const t of halfWeights(model)?.values() ?? []) floatBytes += t.data.byteLength;
  let fileBytes = 0;
  for (const f of fileWeights(model)?.values() ?? []) fileBytes += f.length;
  let packedBytes = 0;
  let scaleBytes = 0;
  for (const q of quantizedBase(model)?.tensors.values() ?? []) {
    packedBytes += q.packed.byteLength;
    scaleBytes += q.scales.byteLength;
  }
  return { floatBytes, fileBytes, packedBytes, scaleBytes, total: floatBytes + fileBytes + packedBytes + scaleBytes };
}

// ---------------------------------------------------------------------------
// Graphs

/** Graph input names of a quantised weight. */
export function quantizedInputNames(weight: string): { packed: string; scales: string } {
  return { packed: `${weight}.qweight`, scales: `${weight}.absmax` };
}

/** Most values of one dequantised piece of a weight in a product (16 MiB of float32): a bigger matrix is dequantised and multiplied in pieces of rows. */
export const DEQUANT_CHUNK = 1 << 22;

const pairTables = new WeakMap<Graph, Map<QuantFormat, Value>>();
/** 256 x 2 table: byte -> its two code values (high nibble first), one per graph and format. */
function pairTable(g: Graph, format: QuantFormat): Value {
  let m = pairTables.get(g);
  if (!m) pairTables.set(g, (m = new Map()));
  let t = m.get(format);
  if (!t) {
    const code = codeBook(format);
    const pairs = new Float64Array(512);
    for (let b = 0; b < 256; b++) {
      pairs[2 * b] = code[b >> 4]!;
      pairs[2 * b + 1] = code[b & 15]!;
    }
    t = g.constFloat(`${format}_pairs`, [256, 2], pairs);
    m.set(format, t);
  }
  return t;
}

/**
 * Rows [row0, row0 + rows) of a 2-D quantised weight, [rows, cols], from its
 * packed bytes [bytes] uint8 and scales [blocks, 1]: each byte of the covering
 * blocks indexes the pair table, times its block's scale, trimmed to the rows.
 * With `after`, the chain starts from Where(false, bytes, bytes) with the
 * condition computed from `after`, so ONNX Runtime cannot run it before
 * `after` exists (it would otherwise run every weight's dequantisation first
 * and hold all their float copies at once). Nodes off the tape: no gradient
 * flows into a base weight.
 */
function dequantizeRows(g: Graph, q: QuantizedTensor, packed: Value, scales: Value, row0: number, rows: number, after?: Value): Value {
  const dt = g.dtype;
  const cols = q.shape.length === 2 ? q.shape[1]! : q.numel;
  const bs = q.blockSize;
  const start = row0 * cols;
  const end = start + rows * cols;
  const b0 = Math.floor(start / bs);
  const b1 = Math.ceil(end / bs);
  const whole = b0 === 0 && b1 === q.scales.length;
  let bytes: Value = whole ? packed : g.emit('Slice', [packed, g.constInt64([(b0 * bs) / 2]), g.constInt64([(b1 * bs) / 2])], [((b1 - b0) * bs) / 2], 'uint8', {}, false);
  const sc = whole ? scales : g.emit('Slice', [scales, g.constInt64([b0]), g.constInt64([b1])], [b1 - b0, 1], dt, {}, false);
  if (after) {
    const flat = g.emit('Reshape', [after, g.constInt64([-1])], [after.shape.reduce((a, b) => a * b, 1)], after.dtype, {}, false);
    const first = g.emit('Slice', [flat, g.constInt64([0]), g.constInt64([1])], [1], after.dtype, {}, false);
    const never = g.cast(g.emit('Mul', [first, g.scalar(0, dt)], [1], dt, {}, false), 'bool');
    bytes = g.emit('Where', [never, bytes, bytes], bytes.shape, 'uint8', {}, false);
  }
  const n = bytes.shape[0]!;
  const vals = g.emit('Gather', [pairTable(g, q.format), g.cast(bytes, 'int64')], [n, 2], dt, { axis: 0 }, false);
  const byBlock = g.emit('Reshape', [vals, g.constInt64([b1 - b0, bs])], [b1 - b0, bs], dt, {}, false);
  let flat = g.emit('Mul', [byBlock, sc], [b1 - b0, bs], dt, {}, false);
  if (start !== b0 * bs || end !== b1 * bs) {
    flat = g.emit('Reshape', [flat, g.constInt64([(b1 - b0) * bs])], [(b1 - b0) * bs], dt, {}, false);
    flat = g.emit('Slice', [flat, g.constInt64([start - b0 * bs]), g.constInt64([end - b0 * bs])], [end - start], dt, {}, false);
  }
  return g.emit('Reshape', [flat, g.constInt64([rows, cols])], [rows, cols], dt, {}, false);
}

/**
 * The 4-bit base weights of one graph. Each quantised weight becomes two frozen
 * inputs, `<weight>.qweight` uint8 [bytes] and `<weight>.absmax` [blocks, 1]
 * (graph dtype), pushed onto `frozen` at first use.
 */
export function quantizedGraphWeights(
  g: Graph,
  base: QuantizedBase,
  frozen: Array<{ name: string; shape: number[]; dtype?: 'uint8' | FloatDType | HalfDType }>,
): {
  /** W dequantised (undefined: not a quantised weight). */
  weight(name: string): Value | undefined;
  /**
   * x · Wᵀ (`transB`) or x · W, undefined when `name` is not quantised. W is
   * dequantised in pieces of at most DEQUANT_CHUNK values (rows of W), each
   * used by its part of the product, and dequantised again in the backward
   * pass (Graph.gemmFrozen) instead of being kept from the forward pass, so
   * that no float copy of the base outlives its use. Each piece is computed
   * after x (forward) or after its gradient (backward), dequantizeRows'
   * `after`, so it runs only when its product does.
   */
  product(x: Value, name: string, transB: boolean): Value | undefined;
} {
  const declared = new Map<string, { q: QuantizedTensor; packed: Value; scales: Value }>();
  const inputsOf = (name: string) => {
    let d = declared.get(name);
    if (d) return d;
    const q = base.tensors.get(name);
    if (!q) return undefined;
    const names = quantizedInputNames(name);
    d = { q, packed: g.input(names.packed, [q.packed.length], 'uint8'), scales: g.input(names.scales, [q.scales.length, 1], g.dtype) };
    frozen.push({ name: names.packed, shape: [q.packed.length], dtype: 'uint8' }, { name: names.scales, shape: [q.scales.length, 1], dtype: g.dtype });
    declared.set(name, d);
    return d;
  };
  return {
    weight(name) {
      const d = inputsOf(name);
      return d ? dequantizeRows(g, d.q, d.packed, d.scales, 0, d.q.shape[0]!) : undefined;
    },
    product(x, name, transB) {
      const d = inputsOf(name);
      if (!d) return undefined;
      const [rowsAll, cols] = d.q.shape as [number, number];
      const per = Math.max(1, Math.floor((base.pieceValues ?? DEQUANT_CHUNK) / cols));
      const chunks: Array<[number, number]> = [];
      for (let r = 0; r < rowsAll; r += per) chunks.push([r, Math.min(per, rowsAll - r)]);
      // Each piece's W: dequantised after x for the forward product, and again after the
      // piece's gradient for the backward one (Graph.gemmFrozen), never kept in between.
      const piece = (xin: Value, r0: number, n: number): Value =>
        g.gemmFrozen(xin, dequantizeRows(g, d.q, d.packed, d.scales, r0, n, xin), transB, (after) => dequantizeRows(g, d.q, d.packed, d.scales, r0, n, after));
      if (transB) {
        // x Wᵀ, W [out, in]: pieces of output features, side by side.
        const parts = chunks.map(([r0, n]) => piece(x, r0, n));
        return parts.length === 1 ? parts[0]! : g.concat(parts, 1);
      }
      // x W, W [in, out] (Conv1D): pieces of input features, summed.
      const xs = chunks.length === 1 ? [x] : g.split(x, 1, chunks.map(([, n]) => n));
      let y = piece(xs[0]!, chunks[0]![0], chunks[0]![1]);
      for (let k = 1; k < chunks.length; k++) y = g.add(y, piece(xs[k]!, chunks[k]![0], chunks[k]![1]));
      return y;
    },
  };
}

/**
 * Data of a frozen graph input that belongs to a quantised weight (packed bytes,
 * or the scales in `dtype`), or undefined when `name` is not one.
 */
export function quantizedInputData(model: LoadedModel, name: string, dtype: FloatDType): Uint8Array | Float32Array | Float64Array | undefined {
  const base = quantizedBase(model);
  if (!base) return undefined;
  const m = /^(.*)\.(qweight|absmax)$/.exec(name);
  if (!m) return undefined;
  const q = base.tensors.get(m[1]!);
  if (!q) return undefined;
  if (m[2] === 'qweight') return q.packed;
  return dtype === 'float64' ? Float64Array.from(q.scales) : q.scales;
}
