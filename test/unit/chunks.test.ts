import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import {
  BufferPool,
  ChunkAssembler,
  ChunkError,
  chunkSlices,
  findNonFinite,
  packTensorMap,
  streamTensorMap,
  tensorViews,
  unpackTensorMap,
} from '../../common/chunks.ts';
import type { TensorMap } from '../../common/tensor.ts';

function sample(): TensorMap {
  const m: TensorMap = new Map();
  m.set('a.lora_A.weight', { shape: [2, 3], data: Float32Array.from([1, -2, 3.5, 0, 1e-7, -1e30]) });
  m.set('a.lora_B.weight', { shape: [3, 2], data: Float64Array.from([0.25, 0.5, 0.75, 1, 1.25, 1.5]) });
  return m;
}

function assemble(bytes: Uint8Array, chunk: number, maxChunk = 1 << 20): Uint8Array {
  const asm = new ChunkAssembler({ totalBytes: bytes.byteLength, maxChunkBytes: maxChunk });
  for (const c of chunkSlices(bytes, chunk)) asm.push(c.offset, c.data);
  return asm.finish({ totalBytes: bytes.byteLength, sha256: createHash('sha256').update(bytes).digest() });
}

describe('tensor packing', () => {
  it('round-trips names, shapes and float32 values, little-endian, in manifest order', () => {
    const p = packTensorMap(sample());
    expect(p.manifest).toEqual([
      { name: 'a.lora_A.weight', dtype: 'F32', shape: [2, 3] },
      { name: 'a.lora_B.weight', dtype: 'F32', shape: [3, 2] },
    ]);
    expect(p.bytes.byteLength).toBe(48);
    const dv = new DataView(p.bytes.buffer, p.bytes.byteOffset);
    expect(dv.getFloat32(4, true)).toBe(-2);
    expect(dv.getFloat32(24, true)).toBe(0.25);
    expect(Buffer.from(p.sha256).toString('hex')).toBe(createHash('sha256').update(p.bytes).digest('hex'));
    const back = unpackTensorMap(p.manifest, assemble(p.bytes, 7));
    expect([...back.keys()]).toEqual(['a.lora_A.weight', 'a.lora_B.weight']);
    expect([...back.get('a.lora_A.weight')!.data]).toEqual([...Float32Array.from([1, -2, 3.5, 0, 1e-7, -1e30])]);
    expect([...back.get('a.lora_B.weight')!.data]).toEqual([0.25, 0.5, 0.75, 1, 1.25, 1.5]);
  });

  it('streams the same bytes and digest as packing, for chunks inside and across tensors', () => {
    const m = sample();
    const p = packTensorMap(m);
    for (const size of [1, 4, 5, 24, 25, 48, 100]) {
      const s = streamTensorMap(m, size);
      expect(s.totalBytes).toBe(48);
      expect(s.manifest).toEqual(p.manifest);
      const parts = [...s.chunks()];
      expect(parts.every((c, i) => c.offset === i * size && c.data.byteLength === Math.min(size, 48 - c.offset))).toBe(true);
      expect(Buffer.concat(parts.map((c) => c.data))).toEqual(Buffer.from(p.bytes));
      expect(Buffer.from(s.sha256())).toEqual(Buffer.from(p.sha256));
    }
    expect(() => streamTensorMap(m, 8).sha256()).toThrow(/before all chunks were consumed/);
  });

  it('packs consecutive float32 views of one whole buffer without copying, anything else into a new buffer', () => {
    const all = Float32Array.from([1, 2, 3, 4, 5, 6, 7]);
    const views: TensorMap = new Map([
      ['x', { shape: [3], data: all.subarray(0, 3) }],
      ['y', { shape: [2, 2], data: all.subarray(3) }],
    ]);
    const copied = (m: TensorMap): TensorMap => new Map([...m].map(([k, t]) => [k, { shape: t.shape, data: Float32Array.from(t.data) }]));
    const shared = packTensorMap(views);
    expect(shared.bytes.buffer).toBe(all.buffer);
    const reference = packTensorMap(copied(views));
    expect(reference.bytes.buffer).not.toBe(all.buffer);
    expect(Buffer.from(shared.bytes).equals(Buffer.from(reference.bytes))).toBe(true);
    expect(Buffer.from(shared.sha256).equals(Buffer.from(reference.sha256))).toBe(true);
    // Out of order, with a gap, or part of a larger buffer: copied.
    const swapped: TensorMap = new Map([['y', views.get('y')!], ['x', views.get('x')!]]);
    const gap: TensorMap = new Map([['x', { shape: [3], data: all.subarray(0, 3) }], ['y', { shape: [3], data: all.subarray(4) }]]);
    const part: TensorMap = new Map([['x', { shape: [3], data: all.subarray(0, 3) }]]);
    for (const m of [swapped, gap, part]) {
      const p = packTensorMap(m);
      expect(p.bytes.buffer).not.toBe(all.buffer);
      expect(Buffer.from(p.bytes).equals(Buffer.from(packTensorMap(copied(m)).bytes))).toBe(true);
    }
  });

  it('refuses a manifest that does not fit the bytes or has a non-F32 dtype', () => {
    const p = packTensorMap(sample());
    expect(() => unpackTensorMap(p.manifest.slice(1), p.bytes)).toThrow(/manifest describes 24 bytes but 48 arrived/);
    expect(() => unpackTensorMap([{ name: 'x', dtype: 'F64', shape: [6] }], p.bytes)).toThrow(/dtype F64 is not supported/);
  });

  it('cuts chunks of the requested size, the last one shorter', () => {
    const sizes = [...chunkSlices(new Uint8Array(10), 4)].map((c) => [c.offset, c.data.byteLength]);
    expect(sizes).toEqual([[0, 4], [4, 4], [8, 2]]);
    expect([...chunkSlices(new Uint8Array(0), 4)]).toEqual([]);
  });

  it('finds the first non-finite value', () => {
    const m = sample();
    expect(findNonFinite(m)).toBeNull();
    m.get('a.lora_B.weight')!.data[4] = NaN;
    expect(findNonFinite(m)).toMatchObject({ name: 'a.lora_B.weight', index: 4 });
  });
});

describe('ChunkAssembler', () => {
  const bytes = Uint8Array.from({ length: 100 }, (_, i) => i);
  const digest = createHash('sha256').update(bytes).digest();

  it('reassembles any chunking of the stream', () => {
    for (const size of [1, 3, 64, 100, 1000]) expect([...assemble(bytes, size)]).toEqual([...bytes]);
  });

  const codeOf = (f: () => unknown): string => {
    try {
      f();
    } catch (err) {
      expect(err).toBeInstanceOf(ChunkError);
      return `${(err as ChunkError).code}: ${(err as Error).message}`;
    }
    throw new Error('expected a ChunkError');
  };

  it('refuses an oversized chunk with RESOURCE_EXHAUSTED', () => {
    const asm = new ChunkAssembler({ totalBytes: 100, maxChunkBytes: 16 });
    expect(codeOf(() => asm.push(0, bytes.subarray(0, 17)))).toMatch(/^RESOURCE_EXHAUSTED: .*17 bytes exceeds the limit of 16/);
  });

  it('refuses more bytes than announced, and an announced total over the limit', () => {
    const asm = new ChunkAssembler({ totalBytes: 10 });
    expect(codeOf(() => asm.push(0, bytes.subarray(0, 11)))).toMatch(/^RESOURCE_EXHAUSTED: .*exceed the announced 10 bytes/);
    expect(codeOf(() => new ChunkAssembler({ totalBytes: 1000, maxTotalBytes: 999 }))).toMatch(/^RESOURCE_EXHAUSTED/);
  });

  it('refuses gaps and reordering', () => {
    const asm = new ChunkAssembler({ totalBytes: 100 });
    asm.push(0, bytes.subarray(0, 10));
    expect(codeOf(() => asm.push(20, bytes.subarray(20, 30)))).toMatch(/^INVALID_ARGUMENT: .*offset 20, expected offset 10/);
  });

  it('refuses a short stream and a wrong digest with DATA_LOSS', () => {
    const short = new ChunkAssembler({ totalBytes: 100 });
    short.push(0, bytes.subarray(0, 50));
    expect(codeOf(() => short.finish({ totalBytes: 100, sha256: digest }))).toMatch(/^DATA_LOSS: .*50 arrived/);
    const bad = new ChunkAssembler({ totalBytes: 100 });
    const flipped = bytes.slice();
    flipped[7] ^= 1;
    bad.push(0, flipped);
    expect(codeOf(() => bad.finish({ totalBytes: 100, sha256: digest }))).toMatch(/^DATA_LOSS: .*SHA-256 mismatch/);
  });
});

describe('tensorViews (the bulk channel\'s upload)', () => {
  it('yields the packed bytes in order, float32 tensors as views of their own memory, with the SHA-256 of it all', () => {
    const m = sample();
    const v = tensorViews(m, 8);
    const pieces = [...v.chunks()];
    expect(pieces).toHaveLength(v.count);
    expect(v.count).toBe(6); // 24 bytes per tensor in pieces of at most 8
    const packed = packTensorMap(m);
    const joined = Buffer.concat(pieces.map((p) => p.data));
    expect(joined.equals(Buffer.from(packed.bytes))).toBe(true);
    let off = 0;
    for (const p of pieces) {
      expect(p.offset).toBe(off);
      off += p.data.byteLength;
    }
    expect(Buffer.from(v.sha256()).equals(createHash('sha256').update(joined).digest())).toBe(true);
    // The float32 tensor is not copied: its pieces are views of its buffer.
    const a = m.get('a.lora_A.weight')!.data as Float32Array;
    expect(pieces[0]!.data.buffer).toBe(a.buffer);
    expect(v.manifest.map((e) => e.dtype)).toEqual(['F32', 'F32']);
  });

  it('refuses a piece size below one element, and a digest asked for before the end', () => {
    expect(() => tensorViews(sample(), 3)).toThrow(/maxBytes must be an integer >= 4 \(got 3\)/);
    const v = tensorViews(sample());
    expect(() => v.sha256()).toThrow(/before all views were consumed/);
  });
});

describe('BufferPool', () => {
  it('hands a given-back buffer out again for the same size only, keeps at most maxBuffers per size, and never holds one twice', () => {
    const pool = new BufferPool(2);
    const a = pool.take(16);
    const b = pool.take(16);
    const c = pool.take(16);
    expect(new Set([a, b, c]).size).toBe(3);
    pool.give(a);
    pool.give(a);
    expect(pool.size).toBe(1);
    pool.give(b);
    pool.give(c);
    expect(pool.size).toBe(2);
    expect(pool.take(32)).not.toBe(a);
    const again = [pool.take(16), pool.take(16)];
    expect(again).toContain(a);
    expect(again).toContain(b);
    expect(pool.size).toBe(0);
    // A view into a larger buffer is not pooled (a later taker would share memory with its owner).
    pool.give(new Uint8Array(64).subarray(0, 16));
    expect(pool.size).toBe(0);
  });

  it('holds at most maxBytes in all, so buffers too large for it are left to the garbage collector', () => {
    const pool = new BufferPool(8, 100);
    const small = [pool.take(40), pool.take(40), pool.take(40)];
    for (const b of small) pool.give(b);
    expect(pool.size).toBe(2);
    expect(pool.heldBytes).toBe(80);
    pool.give(new Uint8Array(200));
    expect(pool.size).toBe(2);
    pool.take(40);
    expect(pool.heldBytes).toBe(40);
    pool.give(new Uint8Array(60));
    expect(pool.heldBytes).toBe(100);
  });

  it('a ChunkAssembler gives its buffer back when discarded unfinished, not once its checked bytes were handed on', () => {
    const pool = new BufferPool(4);
    const bytes = Uint8Array.from({ length: 32 }, (_, i) => i);
    const digest = new Uint8Array(createHash('sha256').update(bytes).digest());
    const broken = new ChunkAssembler({ totalBytes: 32, pool });
    broken.push(0, bytes.subarray(0, 10));
    broken.discard();
    broken.discard();
    expect(pool.size).toBe(1);
    const ok = new ChunkAssembler({ totalBytes: 32, pool });
    expect(pool.size).toBe(0); // the same buffer again, old bytes and all
    ok.push(0, bytes);
    const out = ok.finish({ totalBytes: 32, sha256: digest });
    expect(Buffer.from(out).equals(Buffer.from(bytes))).toBe(true);
    ok.discard();
    expect(pool.size).toBe(0);
  });

  it('reads written in place count through advance; a buffer held for a reader goes back only once that reader is done', async () => {
    const pool = new BufferPool(4);
    const bytes = Uint8Array.from({ length: 32 }, (_, i) => 100 + i);
    const digest = new Uint8Array(createHash('sha256').update(bytes).digest());
    const a = new ChunkAssembler({ totalBytes: 32, pool });
    a.push(0, bytes.subarray(0, 5));
    const region = a.region();
    expect(region.byteLength).toBe(27);
    region.set(bytes.subarray(5, 20));
    a.advance(15);
    expect(a.receivedBytes).toBe(20);
    a.region().set(bytes.subarray(20));
    expect(() => a.advance(13)).toThrow(/13 more bytes exceed the announced 32 bytes/);
    a.advance(12);
    expect(Buffer.from(a.finish({ totalBytes: 32, sha256: digest })).equals(Buffer.from(bytes))).toBe(true);
    expect(a.region().byteLength).toBe(0);

    let readerDone!: () => void;
    const held = new ChunkAssembler({ totalBytes: 32, pool, heldUntil: new Promise<void>((r) => (readerDone = r)) });
    held.region().set(bytes.subarray(0, 8));
    held.advance(8);
    held.discard();
    expect(pool.size).toBe(0); // a socket may still write into it
    readerDone();
    await new Promise((r) => setImmediate(r));
    expect(pool.size).toBe(1);
  });
});
