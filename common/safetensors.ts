/**
 * safetensors reading and writing (https://github.com/huggingface/safetensors).
 *
 * Layout: 8-byte little-endian header length N, N bytes of JSON header
 * (`{"__metadata__": {..}, "name": {"dtype", "shape", "data_offsets": [begin, end]}}`,
 * offsets relative to the data section), then the data section.
 *
 * Written by hand: the npm packages for safetensors either wrap a native
 * library, skip most of the validation below, or do not write the format.
 * The checks follow the reference implementation (safetensors/src/tensor.rs).
 */
import { open, readFile, type FileHandle } from 'node:fs/promises';
import { endianness } from 'node:os';
import { numel } from './tensor.ts';
import { writeFileAtomic } from './atomic.ts';

export type StDtype = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';
export type StFloatDtype = 'F32' | 'F16' | 'BF16' | 'F64';

export const DTYPE_SIZE: Readonly<Record<StDtype, number>> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U8: 1,
  BOOL: 1,
};

export interface StEntry {
  dtype: StDtype;
  shape: number[];
  /** Raw little-endian bytes of the tensor. */
  bytes: Uint8Array;
}

export interface SafetensorsFile {
  metadata: Record<string, string>;
  tensors: Map<string, StEntry>;
}

/** One tensor to write: float data converted to `dtype` on the way out. */
export interface StWriteEntry {
  dtype: StFloatDtype;
  shape: number[];
  data: Float32Array | Float64Array;
}

/** The reference implementation refuses headers above 100 MB. */
export const MAX_HEADER_BYTES = 100_000_000;

const LITTLE_ENDIAN = endianness() === 'LE';

/** One tensor in a safetensors header; begin and end are offsets into the data section. */
export interface SafetensorsHeaderEntry {
  name: string;
  dtype: StDtype;
  shape: number[];
  begin: number;
  end: number;
}

interface ParsedHeader {
  metadata: Record<string, string>;
  entries: SafetensorsHeaderEntry[];
}

function fail(source: string, msg: string): never {
  throw new Error(`safetensors ${source}: ${msg}`);
}

/**
 * Top-level keys of a JSON object text in order, duplicates included.
 * JSON.parse keeps only the last of duplicate keys, so duplicates are found
 * with this small scanner over the (already JSON.parse-validated) text.
 */
function topLevelKeys(text: string): string[] {
  const keys: string[] = [];
  let depth = 0;
  let i = 0;
  let expectKey = false;
  while (i < text.length) {
    const c = text[i]!;
    if (c === '"') {
      let j = i + 1;
      while (j < text.length && text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      if (depth === 1 && expectKey) keys.push(JSON.parse(text.slice(i, j + 1)) as string);
      expectKey = false;
      i = j + 1;
      continue;
    }
    if (c === '{' || c === '[') {
      depth++;
      expectKey = c === '{' && depth === 1;
    } else if (c === '}' || c === ']') {
      depth--;
    } else if (c === ',' && depth === 1) {
      expectKey = true;
    }
    i++;
  }
  return keys;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function parseHeader(headerBytes: Uint8Array, dataLength: number, source: string): ParsedHeader {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(headerBytes);
  } catch {
    fail(source, 'header is not valid UTF-8');
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    fail(source, `header is not valid JSON (${(err as Error).message})`);
  }
  if (!isPlainObject(json)) fail(source, 'header must be a JSON object mapping tensor names to {dtype, shape, data_offsets}');
  const seen = new Set<string>();
  for (const k of topLevelKeys(text)) {
    if (seen.has(k)) fail(source, `duplicate key "${k}" in header`);
    seen.add(k);
  }

  const metadata: Record<string, string> = {};
  const entries: SafetensorsHeaderEntry[] = [];
  for (const [name, raw] of Object.entries(json)) {
    if (name === '__metadata__') {
      if (!isPlainObject(raw)) fail(source, '__metadata__ must be an object mapping strings to strings');
      for (const [mk, mv] of Object.entries(raw)) {
        if (typeof mv !== 'string') fail(source, `__metadata__ key "${mk}" must be a string, got ${JSON.stringify(mv)}`);
        metadata[mk] = mv;
      }
      continue;
    }
    if (!isPlainObject(raw)) fail(source, `tensor "${name}": entry must be an object {dtype, shape, data_offsets}`);
    const dtype = raw.dtype;
    if (typeof dtype !== 'string' || !(dtype in DTYPE_SIZE)) {
      fail(source, `tensor "${name}": unknown dtype ${JSON.stringify(dtype)} (supported: ${Object.keys(DTYPE_SIZE).join(', ')})`);
    }
    const shape = raw.shape;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) {
      fail(source, `tensor "${name}": shape must be a list of non-negative integers, got ${JSON.stringify(shape)}`);
    }
    const offs = raw.data_offsets;
    if (
      !Array.isArray(offs) ||
      offs.length !== 2 ||
      !offs.every((d) => Number.isSafeInteger(d) && (d as number) >= 0) ||
      (offs[0] as number) > (offs[1] as number)
    ) {
      fail(source, `tensor "${name}": data_offsets must be [begin, end] with 0 <= begin <= end, got ${JSON.stringify(offs)}`);
    }
    const [begin, end] = offs as [number, number];
    const st = dtype as StDtype;
    const want = numel(shape as number[]) * DTYPE_SIZE[st];
    if (end - begin !== want) {
      fail(
        source,
        `tensor "${name}": data_offsets [${begin}, ${end}] span ${end - begin} bytes but ${st} shape [${(shape as number[]).join(', ')}] needs ${want}`,
      );
    }
    if (end > dataLength) {
      fail(source, `tensor "${name}": data_offsets [${begin}, ${end}] run past the end of the data section (${dataLength} bytes)`);
    }
    entries.push({ name, dtype: st, shape: [...(shape as number[])], begin, end });
  }

  // Offsets must tile the data section exactly: no overlap, no hole, nothing left over.
  const sorted = [...entries].sort((a, b) => a.begin - b.begin || a.end - b.end);
  let pos = 0;
  let prev: SafetensorsHeaderEntry | null = null;
  for (const e of sorted) {
    if (e.begin < pos) {
      fail(source, `tensor "${e.name}": data_offsets [${e.begin}, ${e.end}] overlap tensor "${prev!.name}" [${prev!.begin}, ${prev!.end}]`);
    }
    if (e.begin > pos) {
      fail(source, `tensor "${e.name}": data_offsets [${e.begin}, ${e.end}] leave a hole: bytes ${pos}..${e.begin} belong to no tensor`);
    }
    pos = e.end;
    prev = e;
  }
  if (pos !== dataLength) {
    fail(source, `tensors cover ${pos} bytes but the data section has ${dataLength} (trailing bytes belong to no tensor)`);
  }
  return { metadata, entries };
}

function readHeaderLength(prefix: Uint8Array, fileLength: number, source: string): number {
  if (fileLength < 8) fail(source, `file is ${fileLength} bytes, shorter than the 8-byte header length`);
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(MAX_HEADER_BYTES)) fail(source, `header length ${n} is larger than the ${MAX_HEADER_BYTES}-byte limit`);
  const len = Number(n);
  if (8 + len > fileLength) fail(source, `header length ${len} runs past the end of the ${fileLength}-byte file`);
  return len;
}

export interface SafetensorsHeader {
  metadata: Record<string, string>;
  /** File size in bytes. */
  size: number;
  /** Byte offset of the data section (8 + header length). */
  dataStart: number;
  /** Tensors in header order. */
  entries: SafetensorsHeaderEntry[];
}

async function readAt(fh: FileHandle, buf: Uint8Array, position: number, path: string, what: string): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesRead } = await fh.read(buf, off, buf.length - off, position + off);
    if (bytesRead === 0) fail(path, `unexpected end of file reading ${what}`);
    off += bytesRead;
  }
}

/**
 * Read and validate the header of an open safetensors file against the file
 * size, without reading tensor data (same checks as parseSafetensors).
 */
export async function readSafetensorsHeader(fh: FileHandle, path: string): Promise<SafetensorsHeader> {
  const size = (await fh.stat()).size;
  const prefix = new Uint8Array(8);
  if (size >= 8) await readAt(fh, prefix, 0, path, 'the header length');
  const hlen = readHeaderLength(prefix, size, path);
  const hbuf = new Uint8Array(hlen);
  await readAt(fh, hbuf, 8, path, 'the header');
  const dataStart = 8 + hlen;
  const { metadata, entries } = parseHeader(hbuf, size - dataStart, path);
  return { metadata, size, dataStart, entries };
}

/** One tensor of an open safetensors file (its header read by readSafetensorsHeader), its bytes in a buffer of their own. */
export async function readTensorEntry(fh: FileHandle, header: SafetensorsHeader, e: SafetensorsHeaderEntry, path: string): Promise<StEntry> {
  const bytes = new Uint8Array(e.end - e.begin);
  let off = 0;
  while (off < bytes.length) {
    const { bytesRead } = await fh.read(bytes, off, bytes.length - off, header.dataStart + e.begin + off);
    if (bytesRead === 0) fail(path, `unexpected end of file reading tensor "${e.name}"`);
    off += bytesRead;
  }
  return { dtype: e.dtype, shape: e.shape, bytes };
}

/**
 * One tensor of an open safetensors file read a chunk at a time into one
 * reused buffer of at most `chunkElements` elements: `each` gets every chunk
 * as an entry of shape [length] and the index of its first element, and must
 * be done with the chunk's bytes when it returns. Converting a large tensor
 * this way never holds its raw bytes whole.
 */
export async function readTensorChunks(
  fh: FileHandle,
  header: SafetensorsHeader,
  e: SafetensorsHeaderEntry,
  path: string,
  chunkElements: number,
  each: (chunk: StEntry, start: number) => void,
): Promise<void> {
  const size = DTYPE_SIZE[e.dtype as keyof typeof DTYPE_SIZE];
  if (!size) fail(path, `tensor "${e.name}" has dtype ${e.dtype}, which has no fixed element size`);
  const total = (e.end - e.begin) / size;
  const buf = new Uint8Array(Math.min(total, chunkElements) * size);
  for (let start = 0; start < total; start += chunkElements) {
    const n = Math.min(chunkElements, total - start);
    const bytes = n * size === buf.length ? buf : buf.subarray(0, n * size);
    await readAt(fh, bytes, header.dataStart + e.begin + start * size, path, `tensor "${e.name}"`);
    each({ dtype: e.dtype, shape: [n], bytes }, start);
  }
}

/** Parse a whole safetensors file held in memory. Tensor bytes are views into `buf`. */
export function parseSafetensors(buf: Uint8Array, source: string): SafetensorsFile {
  const hlen = readHeaderLength(buf, buf.length, source);
  const dataStart = 8 + hlen;
  const header = parseHeader(buf.subarray(8, dataStart), buf.length - dataStart, source);
  const tensors = new Map<string, StEntry>();
  for (const e of header.entries) {
    tensors.set(e.name, { dtype: e.dtype, shape: e.shape, bytes: buf.subarray(dataStart + e.begin, dataStart + e.end) });
  }
  return { metadata: header.metadata, tensors };
}

/**
 * Read a safetensors file. Files up to `wholeFileBytes` (default 64 MiB) are
 * read in one go; larger ones have their header validated against the file
 * size first and their tensors read one by one, so that files larger than one
 * Node buffer still load.
 */
export async function readSafetensors(path: string, opts: { wholeFileBytes?: number } = {}): Promise<SafetensorsFile> {
  const fh = await open(path, 'r').catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') fail(path, 'file not found');
    throw err;
  });
  try {
    const size = (await fh.stat()).size;
    if (size <= (opts.wholeFileBytes ?? 64 * 1024 * 1024)) return parseSafetensors(new Uint8Array(await readFile(fh)), path);
    const header = await readSafetensorsHeader(fh, path);
    const tensors = new Map<string, StEntry>();
    for (const e of header.entries) tensors.set(e.name, await readTensorEntry(fh, header, e, path));
    return { metadata: header.metadata, tensors };
  } finally {
    await fh.close();
  }
}

// ---------------------------------------------------------------------------
// float16 / bfloat16 conversion

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

let halfTable: Float32Array | null = null;

function halfBitsToFloatSlow(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** IEEE half bits -> number. */
export function f16BitsToF32(h: number): number {
  if (!halfTable) {
    halfTable = new Float32Array(65536);
    for (let i = 0; i < 65536; i++) halfTable[i] = halfBitsToFloatSlow(i);
  }
  return halfTable[h & 0xffff]!;
}

/** bfloat16 bits -> number. */
export function bf16BitsToF32(b: number): number {
  u32[0] = (b & 0xffff) << 16;
  return f32[0]!;
}

/** number -> IEEE half bits, rounding to nearest even (values past 65504 become Inf, NaN stays NaN). */
export function f32ToF16Bits(x: number): number {
  f32[0] = x;
  let f = u32[0]!;
  const sign = (f >>> 16) & 0x8000;
  f &= 0x7fffffff;
  let o: number;
  if (f >= 0x47800000) {
    // 65536 and above (after rounding), Inf or NaN.
    o = f > 0x7f800000 ? 0x7e00 | ((f >>> 13) & 0x3ff) : 0x7c00;
  } else if (f < 0x38800000) {
    // Result is subnormal or zero: let the float adder do the rounding.
    u32[0] = f;
    const v = f32[0]!;
    u32[0] = 0x3f000000; // 0.5 (the "denorm magic": 2^-1)
    f32[0] = Math.fround(v + f32[0]!);
    o = (u32[0]! - 0x3f000000) & 0xffff;
  } else {
    const mantOdd = (f >>> 13) & 1;
    f = (f + ((15 - 127) << 23) + 0xfff + mantOdd) >>> 0;
    o = f >>> 13;
  }
  return (o | sign) & 0xffff;
}

/** number -> bfloat16 bits, rounding to nearest even. */
export function f32ToBf16Bits(x: number): number {
  f32[0] = x;
  const u = u32[0]!;
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff; // quiet NaN
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

// ---------------------------------------------------------------------------
// Decoding entries

/**
 * Bytes as an ArrayBuffer that typed-array views can start at 0: the entry's
 * own buffer where the bytes are all of it (readTensorEntry's), else a copy,
 * aligned and independent of the file buffer.
 */
function aligned(bytes: Uint8Array): ArrayBuffer {
  if (bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength && bytes.buffer instanceof ArrayBuffer) return bytes.buffer;
  const out = new ArrayBuffer(bytes.length);
  new Uint8Array(out).set(bytes);
  return out;
}

function checkFloat(entry: StEntry, what: string): void {
  if (entry.dtype !== 'F32' && entry.dtype !== 'F16' && entry.dtype !== 'BF16' && entry.dtype !== 'F64') {
    throw new Error(`${what}: dtype ${entry.dtype} is not a float type (F32, F16, BF16 or F64 can be converted)`);
  }
  if (!LITTLE_ENDIAN) throw new Error(`${what}: big-endian hosts are not supported`);
}

/** Convert an F32/F16/BF16/F64 entry to float32. */
export function toFloat32(entry: StEntry): Float32Array {
  checkFloat(entry, 'toFloat32');
  const n = numel(entry.shape);
  switch (entry.dtype) {
    case 'F32':
      return new Float32Array(aligned(entry.bytes), 0, n);
    case 'F64':
      return Float32Array.from(new Float64Array(aligned(entry.bytes), 0, n));
    case 'F16': {
      const h = new Uint16Array(aligned(entry.bytes), 0, n);
      const out = new Float32Array(n);
      f16BitsToF32(0); // build the table
      const table = halfTable!;
      for (let i = 0; i < n; i++) out[i] = table[h[i]!]!;
      return out;
    }
    default: {
      const h = new Uint16Array(aligned(entry.bytes), 0, n);
      const out = new Float32Array(n);
      const bits = new Uint32Array(out.buffer);
      for (let i = 0; i < n; i++) bits[i] = h[i]! << 16;
      return out;
    }
  }
}

/** Convert an F32/F16/BF16/F64 entry to float64. */
export function toFloat64(entry: StEntry): Float64Array {
  checkFloat(entry, 'toFloat64');
  if (entry.dtype === 'F64') return new Float64Array(aligned(entry.bytes), 0, numel(entry.shape));
  return Float64Array.from(toFloat32(entry));
}

// ---------------------------------------------------------------------------
// Writing

function encode(entry: StWriteEntry, name: string): Uint8Array {
  const n = numel(entry.shape);
  if (entry.data.length !== n) {
    throw new Error(`safetensors write: tensor "${name}" has ${entry.data.length} values but shape [${entry.shape.join(', ')}] needs ${n}`);
  }
  if (!LITTLE_ENDIAN) throw new Error('safetensors write: big-endian hosts are not supported');
  switch (entry.dtype) {
    case 'F32': {
      const a = entry.data instanceof Float32Array ? entry.data : Float32Array.from(entry.data);
      return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
    }
    case 'F64': {
      const a = entry.data instanceof Float64Array ? entry.data : Float64Array.from(entry.data);
      return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
    }
    case 'F16':
    case 'BF16': {
      const conv = entry.dtype === 'F16' ? f32ToF16Bits : f32ToBf16Bits;
      const out = new Uint16Array(n);
      const d = entry.data;
      for (let i = 0; i < n; i++) out[i] = conv(d[i]!);
      return new Uint8Array(out.buffer);
    }
    default:
      throw new Error(`safetensors write: tensor "${name}": unsupported dtype ${JSON.stringify(entry.dtype)} (F32, F16, BF16, F64)`);
  }
}

/**
 * Serialize tensors to safetensors bytes. As in the reference implementation,
 * tensors are laid out contiguously sorted by element size (largest first, which
 * keeps every tensor aligned to its element size) then by name, and the header
 * is padded with spaces to a multiple of 8 bytes.
 */
export function serializeSafetensors(tensors: Map<string, StWriteEntry>, metadata?: Record<string, string>): Uint8Array {
  const parts = safetensorsParts(tensors, metadata);
  const out = new Uint8Array(parts.reduce((n, b) => n + b.byteLength, 0));
  let pos = 0;
  for (const b of parts) {
    out.set(b, pos);
    pos += b.byteLength;
  }
  return out;
}

/**
 * The bytes of a safetensors file as the pieces it is made of, to be written one after another:
 * the length-prefixed header, then each tensor's bytes in file order. Float32 and float64 tensors
 * are views of the caller's arrays (not copies), so they must not change until the pieces are written.
 */
export function safetensorsParts(tensors: Map<string, StWriteEntry>, metadata?: Record<string, string>): Uint8Array[] {
  for (const [name, e] of tensors) {
    if (name === '__metadata__') throw new Error('safetensors write: "__metadata__" cannot be a tensor name');
    if (!e.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new Error(`safetensors write: tensor "${name}" shape must be non-negative integers, got ${JSON.stringify(e.shape)}`);
    }
  }
  if (metadata) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') throw new Error(`safetensors write: metadata "${k}" must be a string`);
    }
  }
  const names = [...tensors.keys()].sort((a, b) => {
    const d = DTYPE_SIZE[tensors.get(b)!.dtype] - DTYPE_SIZE[tensors.get(a)!.dtype];
    return d !== 0 ? d : a < b ? -1 : a > b ? 1 : 0;
  });
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  const blobs: Uint8Array[] = [];
  let offset = 0;
  for (const name of names) {
    const e = tensors.get(name)!;
    const bytes = encode(e, name);
    header[name] = { dtype: e.dtype, shape: e.shape, data_offsets: [offset, offset + bytes.length] };
    offset += bytes.length;
    blobs.push(bytes);
  }
  let json = new TextEncoder().encode(JSON.stringify(header));
  const pad = (8 - (json.length % 8)) % 8;
  if (pad) {
    const padded = new Uint8Array(json.length + pad).fill(0x20);
    padded.set(json);
    json = padded;
  }
  const head = new Uint8Array(8 + json.length);
  new DataView(head.buffer).setBigUint64(0, BigInt(json.length), true);
  head.set(json, 8);
  return [head, ...blobs];
}

/** Write a safetensors file atomically (temporary file + rename). */
export async function writeSafetensors(
  path: string,
  tensors: Map<string, StWriteEntry>,
  metadata?: Record<string, string>,
): Promise<void> {
  await writeFileAtomic(path, serializeSafetensors(tensors, metadata));
}
