/**
 * Compressed updates on the wire (round.update_encoding, docs/protocol.md#compressed-updates).
 *
 * A worker may send its trained adapter as
 *
 *   float32     DTYPE_F32, 4 bytes per element (what every worker can send);
 *   float16     DTYPE_F16, IEEE binary16 rounded to nearest even, 2 bytes per element;
 *   bfloat16    DTYPE_BF16, the upper half of the float32 rounded to nearest even, 2 bytes;
 *   int8_delta  DTYPE_I8, per tensor: delta = update - start adapter (the adapter the task
 *               started from), cut into blocks of `blockSize` consecutive elements (row-major,
 *               the last block may be shorter); each block's scale s = fround(max|delta| / 127)
 *               and q = round-half-to-even(delta / s) clamped to [-127, 127] (0 when s = 0).
 *               The tensor's bytes are its ceil(n / blockSize) scales (float32 LE), then its n
 *               values q (int8). About 1/4 of float32 plus 4 bytes per block.
 *
 * The coordinator decodes every upload into float32 exactly as follows, and checks and
 * aggregates only the decoded values:
 *
 *   float16 / bfloat16: widened exactly to float32;
 *   int8_delta:         x = fround(start + fround(q * s)).
 *
 * Error feedback (int8_delta with round.error_feedback): the worker adds the residual it kept
 * from its previous accepted update to the next delta, d = fround(update - start + r), and
 * keeps r' = fround(d - (x - start)) — exactly what the coordinator's copy of the delta lacks.
 * The residual lives in the worker process's memory (ErrorFeedback below, one per run id);
 * a worker that restarts starts again from zero.
 */
import type { TensorSpecEntry, WireDType } from './chunks.ts';
import { numel, type TensorMap } from './tensor.ts';
import { UpdateEncoding } from '../proto/gen/fedtune/v1/coordinator.ts';

export const UPDATE_ENCODINGS = ['float32', 'float16', 'bfloat16', 'int8_delta'] as const;
export type UpdateEncodingName = (typeof UPDATE_ENCODINGS)[number];
/** Elements per scale block of int8_delta when round.int8_block_size is not set. */
export const DEFAULT_INT8_BLOCK_SIZE = 64;
export const MAX_INT8_BLOCK_SIZE = 1 << 20;

/** What the run asks workers to send. */
export interface EncodingChoice {
  encoding: UpdateEncodingName;
  blockSize: number;
  errorFeedback: boolean;
}

/** Why an encoded update cannot be encoded or decoded; the message names the tensor. */
export class EncodingError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'EncodingError';
  }
}

// ------------------------------------------------------------------ config and wire names

/** The run's choice (round.update_encoding, round.int8_block_size, round.error_feedback). */
export function encodingOfConfig(round: { update_encoding: UpdateEncodingName; int8_block_size: number | null; error_feedback: boolean }): EncodingChoice {
  return { encoding: round.update_encoding, blockSize: round.int8_block_size ?? DEFAULT_INT8_BLOCK_SIZE, errorFeedback: round.error_feedback };
}

/** Config problems of the encoding fields, as [path, message] (common/config.ts reports them). */
export function updateEncodingIssues(c: {
  mode: string;
  round: { update_encoding: UpdateEncodingName; int8_block_size: number | null; error_feedback: boolean };
  privacy: { secure_aggregation: unknown };
  strategy: { name: string };
}): Array<{ path: string[]; message: string }> {
  const out: Array<{ path: string[]; message: string }> = [];
  const e = c.round.update_encoding;
  if (e !== 'int8_delta' && c.round.int8_block_size !== null) {
    out.push({ path: ['round', 'int8_block_size'], message: `only applies to round.update_encoding: int8_delta (got update_encoding: ${e}); remove it or set update_encoding: int8_delta` });
  }
  if (e !== 'int8_delta' && c.round.error_feedback) {
    out.push({ path: ['round', 'error_feedback'], message: `only applies to round.update_encoding: int8_delta (got update_encoding: ${e}); remove it or set update_encoding: int8_delta` });
  }
  if (e !== 'float32' && c.privacy.secure_aggregation) {
    out.push({
      path: ['round', 'update_encoding'],
      message: `${e} cannot be combined with privacy.secure_aggregation: masked inputs are fixed-point words mod 2^32 that only their sum reveals, so the coordinator cannot decode a compressed update; use update_encoding: float32 or drop secure_aggregation`,
    });
  }
  if ((e === 'float16' || e === 'bfloat16') && c.strategy.name === 'ffa') {
    out.push({
      path: ['round', 'update_encoding'],
      message: `${e} rounds every lora_A, but strategy ffa (FFA-LoRA) refuses an update whose lora_A changed; use int8_delta (an unchanged tensor's zero delta is sent exactly) or float32`,
    });
  }
  if (e !== 'float32' && c.mode === 'distributed') {
    out.push({ path: ['round', 'update_encoding'], message: `${e} applies to federated rounds only; distributed step uploads are float32 (set update_encoding: float32 or mode: federated)` });
  }
  return out;
}

const TO_WIRE: Record<UpdateEncodingName, UpdateEncoding> = {
  float32: UpdateEncoding.UPDATE_ENCODING_FLOAT32,
  float16: UpdateEncoding.UPDATE_ENCODING_FLOAT16,
  bfloat16: UpdateEncoding.UPDATE_ENCODING_BFLOAT16,
  int8_delta: UpdateEncoding.UPDATE_ENCODING_INT8_DELTA,
};

export function encodingToWire(e: UpdateEncodingName): UpdateEncoding {
  return TO_WIRE[e];
}

/** The encoding an UpdateEncoding value names (UNSPECIFIED: float32); undefined for an unknown value. */
export function encodingFromWire(e: UpdateEncoding | number): UpdateEncodingName | undefined {
  if (e === UpdateEncoding.UPDATE_ENCODING_UNSPECIFIED) return 'float32';
  return UPDATE_ENCODINGS.find((n) => TO_WIRE[n] === e);
}

/** The manifest dtype of every tensor of an update in encoding `e`. */
export function encodingDType(e: UpdateEncodingName): WireDType {
  return e === 'float16' ? 'F16' : e === 'bfloat16' ? 'BF16' : e === 'int8_delta' ? 'I8' : 'F32';
}

/** Bytes one tensor of n elements takes in encoding `e`. */
export function encodedTensorBytes(e: UpdateEncodingName, n: number, blockSize: number): number {
  if (e === 'float32') return 4 * n;
  if (e === 'float16' || e === 'bfloat16') return 2 * n;
  return 4 * Math.ceil(n / blockSize) + n;
}

/** Bytes of a whole encoded stream with this manifest (names and shapes; dtypes are not read). */
export function encodedStreamBytes(manifest: readonly TensorSpecEntry[], e: UpdateEncodingName, blockSize: number): number {
  let n = 0;
  for (const t of manifest) n += encodedTensorBytes(e, numel(t.shape), blockSize);
  return n;
}

// ------------------------------------------------------------------ element conversions

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** float32 -> IEEE binary16 bits, round to nearest, ties to even; overflow gives +-Inf, NaN stays NaN. */
export function f32ToF16Bits(x: number): number {
  f32[0] = x;
  const b = u32[0]!;
  const sign = (b >>> 16) & 0x8000;
  const exp = (b >>> 23) & 0xff;
  let mant = b & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rem = mant & ((1 << shift) - 1);
    let h = mant >>> shift;
    if (rem > half || (rem === half && (h & 1) === 1)) h++;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (h & 1) === 1)) h++; // a carry into the exponent is the right answer (up to Inf)
  return sign | h;
}

/** IEEE binary16 bits -> its value (exact). */
export function f16BitsToF32(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >>> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 0x1f) return m !== 0 ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/** float32 -> bfloat16 bits (the upper 16 bits, rounded to nearest, ties to even); NaN stays NaN. */
export function f32ToBf16Bits(x: number): number {
  f32[0] = x;
  const b = u32[0]!;
  if ((b & 0x7f800000) === 0x7f800000 && (b & 0x7fffff) !== 0) return (b >>> 16) | 0x40;
  return Math.floor((b + 0x7fff + ((b >>> 16) & 1)) / 0x10000) & 0xffff;
}

/** bfloat16 bits -> its value (exact: the bits become the upper half of a float32). */
export function bf16BitsToF32(h: number): number {
  u32[0] = (h & 0xffff) << 16;
  return f32[0]!;
}

/** Round half to even. */
function rint(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

// ------------------------------------------------------------------ encode (worker)

export interface EncodedUpdate {
  encoding: UpdateEncodingName;
  /** int8_delta: elements per scale block (0 otherwise). */
  blockSize: number;
  /** The upload's manifest: the update's names and shapes with the encoding's dtype. */
  manifest: TensorSpecEntry[];
  bytes: Uint8Array;
  /** int8_delta with error feedback: the residual to keep once the coordinator accepted this update. */
  residual: Map<string, Float32Array> | null;
}

export interface EncodeOptions {
  encoding: UpdateEncodingName;
  blockSize?: number;
  /** int8_delta: the adapter the task started from (same names and shapes as the update). */
  start?: TensorMap;
  /** int8_delta with error feedback: the residual kept from the previous accepted update (missing tensors: zero). */
  residual?: ReadonlyMap<string, Float32Array> | null;
  /** int8_delta: compute the residual of this update (error feedback). */
  errorFeedback?: boolean;
}

/** Encode an update (the full adapter after local training) for upload. */
export function encodeUpdate(update: TensorMap, o: EncodeOptions): EncodedUpdate {
  const e = o.encoding;
  const blockSize = e === 'int8_delta' ? (o.blockSize ?? DEFAULT_INT8_BLOCK_SIZE) : 0;
  if (e === 'int8_delta' && (!Number.isInteger(blockSize) || blockSize < 1 || blockSize > MAX_INT8_BLOCK_SIZE)) {
    throw new EncodingError(`int8_delta: block size must be an integer from 1 to ${MAX_INT8_BLOCK_SIZE} (got ${blockSize})`);
  }
  const dtype = encodingDType(e);
  const manifest: TensorSpecEntry[] = [...update].map(([name, t]) => ({ name, dtype, shape: [...t.shape] }));
  const bytes = new Uint8Array(encodedStreamBytes(manifest, e, blockSize));
  const view = new DataView(bytes.buffer);
  const residual = e === 'int8_delta' && o.errorFeedback ? new Map<string, Float32Array>() : null;
  let off = 0;
  for (const [name, t] of update) {
    const n = t.data.length;
    if (e === 'float32') {
      for (let i = 0; i < n; i++) view.setFloat32(off + 4 * i, t.data[i]!, true);
      off += 4 * n;
    } else if (e === 'float16' || e === 'bfloat16') {
      const conv = e === 'float16' ? f32ToF16Bits : f32ToBf16Bits;
      for (let i = 0; i < n; i++) {
        const x = t.data[i]!;
        const h = conv(x);
        if ((h & 0x7fff) >= (e === 'float16' ? 0x7c00 : 0x7f80) && Number.isFinite(x)) {
          throw new EncodingError(`tensor ${name}: element ${i} (${x}) is beyond the range of ${e}; use round.update_encoding: ${e === 'float16' ? 'bfloat16 or ' : ''}float32`);
        }
        view.setUint16(off + 2 * i, h, true);
      }
      off += 2 * n;
    } else {
      const s = o.start?.get(name);
      if (!s || s.data.length !== n) throw new EncodingError(`int8_delta: tensor ${name} has no start value of ${n} elements to take the delta against`);
      const r = o.residual?.get(name);
      const rr = r && r.length === n ? r : null; // a tensor whose shape changed (another rank) starts from zero
      const nb = Math.ceil(n / blockSize);
      const d = new Float32Array(n);
      for (let i = 0; i < n; i++) d[i] = t.data[i]! - s.data[i]! + (rr ? rr[i]! : 0);
      const out = residual ? new Float32Array(n) : null;
      const qOff = off + 4 * nb;
      for (let b = 0; b < nb; b++) {
        const lo = b * blockSize;
        const hi = Math.min(n, lo + blockSize);
        let amax = 0;
        for (let i = lo; i < hi; i++) {
          const v = d[i]!;
          if (!Number.isFinite(v)) throw new EncodingError(`tensor ${name}: delta element ${i} is not finite (${v}); the update cannot be sent`);
          const a = Math.abs(v);
          if (a > amax) amax = a;
        }
        const scale = Math.fround(amax / 127);
        view.setFloat32(off + 4 * b, scale, true);
        for (let i = lo; i < hi; i++) {
          const q = scale === 0 ? 0 : Math.max(-127, Math.min(127, rint(d[i]! / scale)));
          view.setInt8(qOff + i, q);
          if (out) {
            const x = Math.fround(s.data[i]! + Math.fround(q * scale));
            out[i] = d[i]! - (x - s.data[i]!);
          }
        }
      }
      if (residual && out) residual.set(name, out);
      off = qOff + n;
    }
  }
  return { encoding: e, blockSize, manifest, bytes, residual };
}

// ------------------------------------------------------------------ decode (coordinator)

/**
 * Decode an upload's bytes into float32 elements (manifest order), exactly as the module
 * comment says. `manifest` gives names and shapes; `start` is the flat adapter the task
 * started from (int8_delta). Throws EncodingError naming the tensor on a bad scale or value.
 */
export function decodeUpdate(manifest: readonly TensorSpecEntry[], bytes: Uint8Array, e: UpdateEncodingName, blockSize: number, start: Float32Array | null): Float32Array {
  const need = encodedStreamBytes(manifest, e, blockSize);
  if (bytes.byteLength !== need) throw new EncodingError(`${e} update: the manifest needs ${need} bytes, ${bytes.byteLength} arrived`);
  let total = 0;
  for (const t of manifest) total += numel(t.shape);
  const out = new Float32Array(total);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (e === 'float32') {
    for (let i = 0; i < total; i++) out[i] = view.getFloat32(4 * i, true);
    return out;
  }
  if (e === 'float16' || e === 'bfloat16') {
    const conv = e === 'float16' ? f16BitsToF32 : bf16BitsToF32;
    for (let i = 0; i < total; i++) out[i] = conv(view.getUint16(2 * i, true));
    return out;
  }
  if (!start || start.length !== total) throw new EncodingError(`int8_delta update: no start adapter of ${total} elements to add the deltas to`);
  let off = 0;
  let el = 0;
  for (const t of manifest) {
    const n = numel(t.shape);
    const nb = Math.ceil(n / blockSize);
    const qOff = off + 4 * nb;
    for (let b = 0; b < nb; b++) {
      const scale = view.getFloat32(off + 4 * b, true);
      if (!Number.isFinite(scale) || scale < 0) throw new EncodingError(`tensor ${t.name}: scale of block ${b} is ${scale}; scales must be finite and >= 0`);
      const hi = Math.min(n, (b + 1) * blockSize);
      for (let i = b * blockSize; i < hi; i++) {
        const q = view.getInt8(qOff + i);
        if (q === -128) throw new EncodingError(`tensor ${t.name}: element ${i} is -128; int8_delta values are -127..127`);
        out[el + i] = start[el + i]! + Math.fround(q * scale);
      }
    }
    off = qOff + n;
    el += n;
  }
  return out;
}

// ------------------------------------------------------------------ error feedback (worker)

/**
 * A worker's error-feedback residuals: per run id, per tensor name, in process memory.
 * `take` gives the residual to add to the next delta; `commit` stores the new one once the
 * coordinator has accepted the update it came from (a refused or lost upload changes nothing).
 */
export class ErrorFeedback {
  private runId: string | null = null;
  private residual = new Map<string, Float32Array>();

  take(runId: string): ReadonlyMap<string, Float32Array> {
    if (runId !== this.runId) {
      this.runId = runId;
      this.residual = new Map();
    }
    return this.residual;
  }

  commit(runId: string, residual: Map<string, Float32Array>): void {
    this.runId = runId;
    this.residual = residual;
  }
}

// ------------------------------------------------------------------ upload headers (coordinator)

/**
 * The encoding an upload header declares, checked against its manifest: a known encoding,
 * a block size from 1 to MAX_INT8_BLOCK_SIZE for int8_delta, and (compressed encodings)
 * every tensor of the encoding's dtype. `refuse` builds the error (INVALID_ARGUMENT in the service).
 */
export function uploadEncodingOf(
  h: { encoding?: number | undefined; blockSize?: number | undefined },
  manifest: readonly TensorSpecEntry[],
  refuse: (message: string) => Error,
): { encoding: UpdateEncodingName; blockSize: number } {
  const encoding = encodingFromWire(h.encoding ?? 0);
  if (!encoding) throw refuse(`upload header: unknown encoding ${h.encoding} (allowed: ${UPDATE_ENCODINGS.map((e) => UpdateEncoding[encodingToWire(e)]).join(', ')})`);
  let blockSize = 0;
  if (encoding === 'int8_delta') {
    blockSize = h.blockSize ?? 0;
    if (!Number.isInteger(blockSize) || blockSize < 1 || blockSize > MAX_INT8_BLOCK_SIZE) {
      throw refuse(`upload header: block_size must be from 1 to ${MAX_INT8_BLOCK_SIZE} with encoding int8_delta (got ${blockSize}); send the task's UpdateEncodingSpec.block_size`);
    }
  }
  // float32 manifests are compared with the task's by the run (naming the expected dtype).
  const dtype = encodingDType(encoding);
  const bad = encoding === 'float32' ? undefined : manifest.find((t) => t.dtype !== dtype);
  if (bad) throw refuse(`tensor ${bad.name}: dtype ${bad.dtype}, but an upload with encoding ${encoding} has every tensor in ${dtype}`);
  return { encoding, blockSize };
}
