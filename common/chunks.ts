/**
 * Chunked tensor streams: how adapters, gradients and deltas cross the wire.
 *
 * A tensor map is packed into one byte buffer (each tensor's raw little-endian
 * float32 elements, concatenated in manifest order), cut into chunks of
 * `chunkBytes` (default 1 MiB) and closed by a trailer carrying the total length
 * and SHA-256 of all bytes. The receiver reassembles with ChunkAssembler, which
 * enforces the announced size, strictly consecutive offsets and the chunk size
 * limit, and checks the digest before any byte is used.
 */
import { createHash } from 'node:crypto';
import { endianness } from 'node:os';
import { numel, type TensorMap } from './tensor.ts';

export const DEFAULT_CHUNK_BYTES = 1 << 20;
/** Largest chunk a receiver accepts by default (well under gRPC's 4 MiB message limit). */
export const DEFAULT_MAX_CHUNK_BYTES = 2 << 20;

/** I8: int8_delta updates only (common/update-encoding.ts). */
export type WireDType = 'F32' | 'F16' | 'BF16' | 'F64' | 'I8';

export interface TensorSpecEntry {
  name: string;
  dtype: WireDType;
  shape: number[];
}

/** Why a stream was refused; maps onto gRPC status codes in the service layer. */
export type ChunkErrorCode = 'RESOURCE_EXHAUSTED' | 'INVALID_ARGUMENT' | 'DATA_LOSS';

export class ChunkError extends Error {
  readonly code: ChunkErrorCode;
  constructor(code: ChunkErrorCode, message: string) {
    super(message);
    this.name = 'ChunkError';
    this.code = code;
  }
}

if (endianness() !== 'LE') {
  // Typed arrays use the host byte order; the wire format is little-endian.
  throw new Error('fedtune: big-endian hosts are not supported (tensor streams are little-endian)');
}

export function sha256(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(createHash('sha256').update(bytes).digest());
}

export function hex(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex');
}

export function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.byteLength === b.byteLength && Buffer.compare(a, b) === 0;
}

/** Manifest of a tensor map as it travels (float32). */
export function manifestOf(m: TensorMap): TensorSpecEntry[] {
  return [...m].map(([name, t]) => ({ name, dtype: 'F32' as const, shape: [...t.shape] }));
}

export function manifestBytes(manifest: readonly TensorSpecEntry[]): number {
  let n = 0;
  for (const e of manifest) n += numel(e.shape) * dtypeSize(e.dtype);
  return n;
}

export function dtypeSize(d: WireDType): number {
  return d === 'F64' ? 8 : d === 'F32' ? 4 : d === 'I8' ? 1 : 2;
}

export interface PackedTensors {
  manifest: TensorSpecEntry[];
  bytes: Uint8Array;
  sha256: Uint8Array;
}

/**
 * Pack a tensor map into one float32 little-endian buffer plus its manifest and digest. A map whose
 * tensors already are consecutive float32 views of one buffer, in map order and covering all of it
 * (an aggregator's mean, unpackTensorMap's result), is used as it is: the packed bytes are then that
 * buffer, so its tensors must not change afterwards (a global adapter never does).
 */
export function packTensorMap(m: TensorMap): PackedTensors {
  const manifest = manifestOf(m);
  const total = manifestBytes(manifest);
  const shared = sharedFloat32Buffer(m, total);
  if (shared) return { manifest, bytes: shared, sha256: sha256(shared) };
  const out = new Float32Array(total / 4);
  let off = 0;
  for (const t of m.values()) {
    out.set(t.data, off); // Float64Array sources are converted element-wise
    off += t.data.length;
  }
  const bytes = new Uint8Array(out.buffer);
  return { manifest, bytes, sha256: sha256(bytes) };
}

/** The one buffer that `m`'s tensors are consecutive float32 views of, as bytes, or null. */
function sharedFloat32Buffer(m: TensorMap, total: number): Uint8Array | null {
  let buffer: ArrayBufferLike | null = null;
  let start = 0;
  let end = 0;
  for (const t of m.values()) {
    const d = t.data;
    if (!(d instanceof Float32Array)) return null;
    if (buffer === null) {
      buffer = d.buffer;
      start = end = d.byteOffset;
    }
    if (d.buffer !== buffer || d.byteOffset !== end) return null;
    end += d.byteLength;
  }
  if (buffer === null || end - start !== total || buffer.byteLength !== total) return null;
  return new Uint8Array(buffer, start, total);
}

/**
 * View packed float32 bytes as a tensor map (no copy when `bytes` is 4-byte aligned).
 * Throws ChunkError INVALID_ARGUMENT naming the problem when the manifest does not fit the bytes.
 */
export function unpackTensorMap(manifest: readonly TensorSpecEntry[], bytes: Uint8Array): TensorMap {
  const need = manifestBytes(manifest);
  if (need !== bytes.byteLength) {
    throw new ChunkError('INVALID_ARGUMENT', `tensor stream: manifest describes ${need} bytes but ${bytes.byteLength} arrived`);
  }
  const aligned = bytes.byteOffset % 4 === 0 ? bytes : bytes.slice();
  const all = new Float32Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 4);
  const m: TensorMap = new Map();
  let off = 0;
  for (const e of manifest) {
    if (e.dtype !== 'F32') {
      throw new ChunkError('INVALID_ARGUMENT', `tensor ${e.name}: dtype ${e.dtype} is not supported (allowed: F32)`);
    }
    if (m.has(e.name)) throw new ChunkError('INVALID_ARGUMENT', `tensor ${e.name}: appears twice in the manifest`);
    const n = numel(e.shape);
    m.set(e.name, { shape: [...e.shape], data: all.subarray(off, off + n) });
    off += n;
  }
  return m;
}

export interface ChunkSlice {
  offset: number;
  data: Uint8Array;
}

/** Consecutive slices of `bytes` of at most chunkBytes each (views, no copies). An empty buffer yields nothing. */
export function* chunkSlices(bytes: Uint8Array, chunkBytes = DEFAULT_CHUNK_BYTES): Generator<ChunkSlice> {
  if (!Number.isInteger(chunkBytes) || chunkBytes < 1) throw new Error(`chunkSlices: chunkBytes must be a positive integer (got ${chunkBytes})`);
  for (let off = 0; off < bytes.byteLength; off += chunkBytes) {
    yield { offset: off, data: bytes.subarray(off, Math.min(off + chunkBytes, bytes.byteLength)) };
  }
}

/**
 * Chunks of a tensor map's packed bytes without packing it first: whole chunks are
 * views into the tensors' own memory, only chunks that straddle two tensors are
 * copied. The SHA-256 is computed as the chunks go by; `sha256()` is valid once
 * `chunks()` has been consumed to the end.
 */
/** A tensor stream as a sender produces it: its pieces (with their number), and the digest once they are consumed. */
export interface OutgoingStream {
  manifest: TensorSpecEntry[];
  totalBytes: number;
  /** How many pieces chunks() yields. */
  count: number;
  chunks(): Generator<ChunkSlice>;
  sha256(): Uint8Array;
}

export function streamTensorMap(m: TensorMap, chunkBytes = DEFAULT_CHUNK_BYTES): OutgoingStream {
  if (!Number.isInteger(chunkBytes) || chunkBytes < 1) throw new Error(`streamTensorMap: chunkBytes must be a positive integer (got ${chunkBytes})`);
  const manifest = manifestOf(m);
  const totalBytes = manifestBytes(manifest);
  const hash = createHash('sha256');
  let digest: Uint8Array | null = null;
  return {
    manifest,
    totalBytes,
    count: Math.ceil(totalBytes / chunkBytes),
    *chunks() {
      let offset = 0;
      let pending: Uint8Array | null = null;
      let fill = 0;
      const emit = (data: Uint8Array): ChunkSlice => {
        hash.update(data);
        const c = { offset, data };
        offset += data.byteLength;
        return c;
      };
      for (const t of m.values()) {
        const f32 = t.data instanceof Float32Array ? t.data : Float32Array.from(t.data);
        let bytes = new Uint8Array(f32.buffer, f32.byteOffset, f32.byteLength);
        while (bytes.byteLength > 0) {
          if (pending === null && bytes.byteLength >= chunkBytes) {
            yield emit(bytes.subarray(0, chunkBytes));
            bytes = bytes.subarray(chunkBytes);
            continue;
          }
          pending ??= new Uint8Array(chunkBytes);
          const n = Math.min(chunkBytes - fill, bytes.byteLength);
          pending.set(bytes.subarray(0, n), fill);
          fill += n;
          bytes = bytes.subarray(n);
          if (fill === chunkBytes) {
            yield emit(pending);
            pending = null;
            fill = 0;
          }
        }
      }
      if (pending !== null && fill > 0) yield emit(pending.subarray(0, fill));
      digest = new Uint8Array(hash.digest());
    },
    sha256() {
      if (!digest) throw new Error('streamTensorMap: sha256() before all chunks were consumed');
      return digest;
    },
  };
}

/**
 * A tensor map's packed bytes as views of the tensors' own memory, in manifest
 * order, each at most `maxBytes` (float64 tensors are converted to float32, the
 * only copy), hashed as they go by: streamTensorMap's shape without its fixed
 * chunk size, for a transport that frames nothing (the bulk channel), so no chunk
 * straddling two tensors is ever copied.
 */
export function tensorViews(m: TensorMap, maxBytes = DEFAULT_CHUNK_BYTES): OutgoingStream {
  if (!Number.isInteger(maxBytes) || maxBytes < 4) throw new Error(`tensorViews: maxBytes must be an integer >= 4 (got ${maxBytes})`);
  const manifest = manifestOf(m);
  const totalBytes = manifestBytes(manifest);
  const step = maxBytes - (maxBytes % 4);
  let count = 0;
  for (const t of m.values()) count += Math.ceil((t.data.length * 4) / step);
  const hash = createHash('sha256');
  let digest: Uint8Array | null = null;
  return {
    manifest,
    totalBytes,
    count,
    *chunks() {
      let offset = 0;
      for (const t of m.values()) {
        const f32 = t.data instanceof Float32Array ? t.data : Float32Array.from(t.data);
        const bytes = new Uint8Array(f32.buffer, f32.byteOffset, f32.byteLength);
        for (let o = 0; o < bytes.byteLength; o += step) {
          const data = bytes.subarray(o, Math.min(o + step, bytes.byteLength));
          hash.update(data);
          yield { offset, data };
          offset += data.byteLength;
        }
      }
      digest = new Uint8Array(hash.digest());
    },
    sha256() {
      if (!digest) throw new Error('tensorViews: sha256() before all views were consumed');
      return digest;
    },
  };
}

/**
 * Reassembly buffers kept for reuse. A fresh 64 MiB buffer costs the kernel
 * 16,384 page faults (about 30 ms on a 2-core host, more than copying into it);
 * a round's uploads are all the same size, so the next round takes the buffers
 * of the last one back. A buffer is given back only by whoever knows nothing
 * reads it any more (a dropped upload, an aggregator that folded it in); what is
 * never given back is left to the garbage collector. At most `maxBuffers` are
 * kept per size. Taken buffers hold old bytes: a ChunkAssembler hands one on
 * only once every byte of it was written.
 */
export class BufferPool {
  private readonly free = new Map<number, Uint8Array[]>();
  private held = 0;
  /**
   * `maxBuffers` per size, and at most `maxBytes` held in all (default 1 GiB): with adapters of
   * gigabytes the pool keeps nothing, and memory is what it would be without it.
   */
  constructor(
    readonly maxBuffers: number,
    readonly maxBytes = 1 << 30,
  ) {}

  take(n: number): Uint8Array {
    const b = this.free.get(n)?.pop();
    if (!b) return new Uint8Array(n);
    this.held -= b.byteLength;
    return b;
  }

  give(buf: Uint8Array): void {
    if (buf.byteOffset !== 0 || buf.byteLength !== buf.buffer.byteLength) return;
    const list = this.free.get(buf.byteLength) ?? [];
    if (list.length >= this.maxBuffers || this.held + buf.byteLength > this.maxBytes || list.includes(buf)) return;
    list.push(buf);
    this.held += buf.byteLength;
    this.free.set(buf.byteLength, list);
  }

  /** Bytes held for reuse (tests). */
  get heldBytes(): number {
    return this.held;
  }

  /** Buffers held for reuse (tests). */
  get size(): number {
    let n = 0;
    for (const l of this.free.values()) n += l.length;
    return n;
  }
}

/**
 * Reassembles one chunked stream into a preallocated buffer, checking as it goes.
 * Memory is the announced total, allocated once; a stream that ends early is simply
 * dropped (nothing of it is ever handed on).
 */
export class ChunkAssembler {
  readonly totalBytes: number;
  readonly maxChunkBytes: number;
  private readonly buf: Uint8Array;
  private readonly hash = createHash('sha256');
  private readonly what: string;
  private received = 0;
  private done = false;
  private readonly pool: BufferPool | null;

  private readonly heldUntil: Promise<void> | null;

  /**
   * `heldUntil`: a buffer someone else may still write into (a socket reading straight into `region()`)
   * goes back to the pool only once that settles, whenever the stream is discarded.
   */
  constructor(opts: { totalBytes: number; maxChunkBytes?: number; maxTotalBytes?: number; what?: string; pool?: BufferPool; heldUntil?: Promise<void> }) {
    const what = opts.what ?? 'stream';
    if (!Number.isSafeInteger(opts.totalBytes) || opts.totalBytes < 0) {
      throw new ChunkError('INVALID_ARGUMENT', `${what}: total_bytes must be a non-negative integer (got ${opts.totalBytes})`);
    }
    if (opts.maxTotalBytes !== undefined && opts.totalBytes > opts.maxTotalBytes) {
      throw new ChunkError('RESOURCE_EXHAUSTED', `${what}: announces ${opts.totalBytes} bytes, more than the ${opts.maxTotalBytes} allowed`);
    }
    this.totalBytes = opts.totalBytes;
    this.maxChunkBytes = opts.maxChunkBytes ?? DEFAULT_MAX_CHUNK_BYTES;
    this.pool = opts.pool ?? null;
    this.buf = this.pool ? this.pool.take(opts.totalBytes) : new Uint8Array(opts.totalBytes);
    this.what = what;
    this.heldUntil = opts.heldUntil ?? null;
  }

  /** The stream will not be finished (refused, broken off): its buffer goes back to the pool. */
  discard(): void {
    // Once checked, the bytes were handed on and their new owner gives them back.
    if (this.given || this.checked) return;
    this.given = true;
    this.done = true;
    const pool = this.pool;
    if (!pool) return;
    if (this.heldUntil) void this.heldUntil.then(() => pool.give(this.buf));
    else pool.give(this.buf);
  }

  private checked = false;
  private given = false;

  get receivedBytes(): number {
    return this.received;
  }

  push(offset: number, data: Uint8Array): void {
    if (this.done) throw new ChunkError('INVALID_ARGUMENT', `${this.what}: chunk after the trailer`);
    if (data.byteLength > this.maxChunkBytes) {
      throw new ChunkError('RESOURCE_EXHAUSTED', `${this.what}: chunk of ${data.byteLength} bytes exceeds the limit of ${this.maxChunkBytes} bytes per chunk`);
    }
    if (offset !== this.received) {
      throw new ChunkError('INVALID_ARGUMENT', `${this.what}: chunk at offset ${offset}, expected offset ${this.received} (chunks must be consecutive)`);
    }
    if (this.received + data.byteLength > this.totalBytes) {
      throw new ChunkError('RESOURCE_EXHAUSTED', `${this.what}: chunks exceed the announced ${this.totalBytes} bytes`);
    }
    this.buf.set(data, this.received);
    this.hash.update(data);
    this.received += data.byteLength;
  }

  /**
   * Where the next bytes go, for a reader that writes them in place (a socket's `onread`): the
   * unwritten rest of the buffer. Bytes written there count once `advance` says so.
   */
  region(): Uint8Array {
    return this.done ? new Uint8Array(0) : this.buf.subarray(this.received);
  }

  /** `n` bytes were written at the start of `region()`: hashed and counted as one chunk. */
  advance(n: number): void {
    if (this.done) throw new ChunkError('INVALID_ARGUMENT', `${this.what}: bytes after the trailer`);
    if (!Number.isSafeInteger(n) || n < 0 || this.received + n > this.totalBytes) {
      throw new ChunkError('RESOURCE_EXHAUSTED', `${this.what}: ${n} more bytes exceed the announced ${this.totalBytes} bytes`);
    }
    this.hash.update(this.buf.subarray(this.received, this.received + n));
    this.received += n;
  }

  /** Check the trailer against what arrived; returns the complete bytes. */
  finish(trailer: { totalBytes: number; sha256: Uint8Array }): Uint8Array {
    if (this.done) throw new ChunkError('INVALID_ARGUMENT', `${this.what}: second trailer`);
    this.done = true;
    if (trailer.totalBytes !== this.totalBytes || this.received !== this.totalBytes) {
      throw new ChunkError(
        'DATA_LOSS',
        `${this.what}: incomplete: header announced ${this.totalBytes} bytes, trailer says ${trailer.totalBytes}, ${this.received} arrived`,
      );
    }
    const digest = new Uint8Array(this.hash.digest());
    if (!bytesEqual(digest, trailer.sha256)) {
      throw new ChunkError('DATA_LOSS', `${this.what}: SHA-256 mismatch (sent ${hex(trailer.sha256) || '<empty>'}, computed ${hex(digest)})`);
    }
    this.checked = true;
    return this.buf;
  }
}

/** First non-finite element of a tensor map, or null. */
export function findNonFinite(m: TensorMap): { name: string; index: number; value: number } | null {
  for (const [name, t] of m) {
    const d = t.data;
    for (let i = 0; i < d.length; i++) {
      const v = d[i]!;
      if (!Number.isFinite(v)) return { name, index: i, value: v };
    }
  }
  return null;
}
