import { describe, expect, it, beforeAll, afterAll } from 'vitest';
import { mkdtemp, open, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  bf16BitsToF32,
  f16BitsToF32,
  f32ToBf16Bits,
  f32ToF16Bits,
  parseSafetensors,
  readSafetensors,
  readSafetensorsHeader,
  readTensorChunks,
  readTensorEntry,
  safetensorsParts,
  serializeSafetensors,
  toFloat32,
  toFloat64,
  writeSafetensors,
  type StWriteEntry,
} from '../../common/safetensors.ts';
import { writeParts } from '../../common/atomic.ts';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'fedtune-st-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Assemble a file from a header (object or raw text) and a data section, as a producer other than fedtune might. */
function rawFile(header: unknown, data: Uint8Array = new Uint8Array(0), lengthOverride?: bigint): Uint8Array {
  const text = typeof header === 'string' ? header : JSON.stringify(header);
  const h = new TextEncoder().encode(text);
  const out = new Uint8Array(8 + h.length + data.length);
  new DataView(out.buffer).setBigUint64(0, lengthOverride ?? BigInt(h.length), true);
  out.set(h, 8);
  out.set(data, 8 + h.length);
  return out;
}

describe('safetensors round trip', () => {
  it('writes a file piece by piece from the tensors\' own float32 memory, byte for byte the serialized file', async () => {
    const big = Float32Array.from({ length: 1000 }, (_, i) => i / 7);
    const small = Float32Array.from([1, 2, 3]);
    const half = Float32Array.from([0.5, 1.5]);
    const tensors = new Map<string, StWriteEntry>([
      ['b', { dtype: 'F32', shape: [10, 100], data: big }],
      ['a', { dtype: 'F32', shape: [3], data: small }],
      ['h', { dtype: 'BF16', shape: [2], data: half }],
    ]);
    const parts = safetensorsParts(tensors, { format: 'pt' });
    // Header, then file order: float32 by name (a, b), then the 2-byte dtype; float32 pieces are views.
    expect(parts).toHaveLength(4);
    expect(parts[1]!.buffer).toBe(small.buffer);
    expect(parts[2]!.buffer).toBe(big.buffer);
    const path = join(dir, 'parts.safetensors');
    await writeParts(path, parts);
    expect(Buffer.from(await readFile(path)).equals(Buffer.from(serializeSafetensors(tensors, { format: 'pt' })))).toBe(true);
    const st = await readSafetensors(path);
    expect(Array.from(toFloat32(st.tensors.get('b')!))).toEqual(Array.from(big));
    expect(Array.from(toFloat32(st.tensors.get('h')!))).toEqual([0.5, 1.5]);
    await rm(path);
  });

  it('writes and reads every float dtype with shapes, values and metadata', async () => {
    const f32 = Float32Array.from([1.5, -2.25, 3.0e-8, 123456.789, 0, -0]);
    const f64 = Float64Array.from([Math.PI, -1e-300, 1e300, 0.1]);
    const exactHalf = Float32Array.from([0.5, -1.25, 2048, 0.0009765625, 65504, -0]); // all exact in f16
    const exactBf = Float32Array.from([1, -3.5, 2 ** 100, 2 ** -100, 0.0078125, 256]); // all exact in bf16
    const tensors = new Map<string, StWriteEntry>([
      ['w.f32', { dtype: 'F32', shape: [2, 3], data: f32 }],
      ['w.f64', { dtype: 'F64', shape: [4], data: f64 }],
      ['w.f16', { dtype: 'F16', shape: [3, 2], data: exactHalf }],
      ['w.bf16', { dtype: 'BF16', shape: [1, 6], data: exactBf }],
      ['empty', { dtype: 'F32', shape: [0, 4], data: new Float32Array(0) }],
      ['scalar', { dtype: 'F32', shape: [], data: Float32Array.from([7]) }],
    ]);
    const path = join(dir, 'all.safetensors');
    await writeSafetensors(path, tensors, { format: 'pt', note: 'hi' });
    const st = await readSafetensors(path);
    expect(st.metadata).toEqual({ format: 'pt', note: 'hi' });
    expect([...st.tensors.keys()].sort()).toEqual([...tensors.keys()].sort());
    expect(st.tensors.get('w.f32')!.shape).toEqual([2, 3]);
    expect(Array.from(toFloat32(st.tensors.get('w.f32')!))).toEqual(Array.from(f32));
    expect(Array.from(toFloat64(st.tensors.get('w.f64')!))).toEqual(Array.from(f64));
    expect(Array.from(toFloat32(st.tensors.get('w.f16')!))).toEqual(Array.from(exactHalf));
    expect(Array.from(toFloat32(st.tensors.get('w.bf16')!))).toEqual(Array.from(exactBf));
    expect(toFloat32(st.tensors.get('empty')!).length).toBe(0);
    expect(st.tensors.get('scalar')!.shape).toEqual([]);
    expect(Array.from(toFloat32(st.tensors.get('scalar')!))).toEqual([7]);
    // no temporary files left next to the output
    expect(await readdir(dir)).toEqual(['all.safetensors']);
  });

  it('reads large files tensor by tensor with the same result and the same checks', async () => {
    const path = join(dir, 'big.safetensors');
    const m = new Map<string, StWriteEntry>([
      ['a', { dtype: 'F16', shape: [5], data: Float32Array.from([1, 2, 3, 4, 5]) }],
      ['b', { dtype: 'F32', shape: [2, 2], data: Float32Array.from([9, 8, 7, 6]) }],
    ]);
    await writeSafetensors(path, m, { format: 'pt' });
    const piecewise = await readSafetensors(path, { wholeFileBytes: 0 });
    const whole = await readSafetensors(path);
    expect(piecewise.metadata).toEqual(whole.metadata);
    for (const k of ['a', 'b']) {
      expect(piecewise.tensors.get(k)!.shape).toEqual(whole.tensors.get(k)!.shape);
      expect(Array.from(toFloat32(piecewise.tensors.get(k)!))).toEqual(Array.from(toFloat32(whole.tensors.get(k)!)));
    }
    const bad = join(dir, 'big-bad.safetensors');
    await writeFile(bad, rawFile({ a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }, new Uint8Array(8)));
    await expect(readSafetensors(bad, { wholeFileBytes: 0 })).rejects.toThrow(/tensor "a": data_offsets \[0, 16\] run past the end of the data section \(8 bytes\)/);
    await rm(bad);
    await rm(path);
  });

  it('lays the file out as the reference implementation does', () => {
    const bytes = serializeSafetensors(
      new Map<string, StWriteEntry>([
        ['b', { dtype: 'F16', shape: [3], data: Float32Array.from([1, 2, 3]) }],
        ['a', { dtype: 'F32', shape: [1], data: Float32Array.from([1]) }],
        ['c', { dtype: 'F64', shape: [1], data: Float64Array.from([1]) }],
      ]),
    );
    const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    expect(n % 8).toBe(0);
    const headerText = new TextDecoder().decode(bytes.subarray(8, 8 + n));
    expect(headerText.trimEnd().endsWith('}')).toBe(true);
    expect(headerText.slice(headerText.trimEnd().length)).toMatch(/^ *$/);
    const header = JSON.parse(headerText) as Record<string, { data_offsets: [number, number] }>;
    // largest element size first, then by name; contiguous from 0
    expect(header.c!.data_offsets).toEqual([0, 8]);
    expect(header.a!.data_offsets).toEqual([8, 12]);
    expect(header.b!.data_offsets).toEqual([12, 18]);
    expect(bytes.length).toBe(8 + n + 18);
  });

  it('converts float32 data from Float64Array and rejects a length mismatch', () => {
    const st = parseSafetensors(
      serializeSafetensors(new Map([['x', { dtype: 'F32' as const, shape: [2], data: Float64Array.from([0.1, 0.2]) }]])),
      'mem',
    );
    expect(Array.from(toFloat32(st.tensors.get('x')!))).toEqual([Math.fround(0.1), Math.fround(0.2)]);
    expect(() => serializeSafetensors(new Map([['x', { dtype: 'F32' as const, shape: [3], data: new Float32Array(2) }]]))).toThrow(
      /"x" has 2 values but shape \[3\] needs 3/,
    );
  });

  it('refuses to convert integer dtypes to float', () => {
    const st = parseSafetensors(rawFile({ ids: { dtype: 'I64', shape: [1], data_offsets: [0, 8] } }, new Uint8Array(8)), 'mem');
    expect(st.tensors.get('ids')!.dtype).toBe('I64');
    expect(() => toFloat32(st.tensors.get('ids')!)).toThrow(/I64 is not a float type/);
  });
});

describe('float16 / bfloat16 bit patterns', () => {
  const f16Cases: Array<[number, number]> = [
    [1.0, 0x3c00],
    [-2.5, 0xc100],
    [65504, 0x7bff],
    [2 ** -24, 0x0001], // smallest subnormal
    [2 ** -14, 0x0400], // smallest normal
    [Infinity, 0x7c00],
    [-Infinity, 0xfc00],
    [0, 0x0000],
    [-0, 0x8000],
  ];
  it('encodes float16 exactly for known values', () => {
    for (const [v, bits] of f16Cases) expect(f32ToF16Bits(v), `f16(${v})`).toBe(bits);
    for (const [v, bits] of f16Cases) expect(Object.is(f16BitsToF32(bits), v), `decode 0x${bits.toString(16)}`).toBe(true);
    expect(Number.isNaN(f16BitsToF32(f32ToF16Bits(NaN)))).toBe(true);
    expect(Number.isNaN(f16BitsToF32(0x7e00))).toBe(true);
  });
  it('rounds float16 to nearest even', () => {
    expect(f32ToF16Bits(1 + 2 ** -11)).toBe(0x3c00); // tie -> even (down)
    expect(f32ToF16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02); // tie -> even (up)
    expect(f32ToF16Bits(1 + 2 ** -11 + 2 ** -20)).toBe(0x3c01); // above the tie
    expect(f32ToF16Bits(65519)).toBe(0x7bff);
    expect(f32ToF16Bits(65520)).toBe(0x7c00); // overflows to Inf
    expect(f32ToF16Bits(2 ** -25)).toBe(0x0000); // half the smallest subnormal: tie -> 0
    expect(f32ToF16Bits(3 * 2 ** -25)).toBe(0x0002); // 1.5 subnormal steps: tie -> even
    expect(f32ToF16Bits(-1e-10)).toBe(0x8000);
  });
  it('encodes bfloat16 exactly for known values and rounds to nearest even', () => {
    const cases: Array<[number, number]> = [
      [1.0, 0x3f80],
      [-2.5, 0xc020],
      [2 ** -133, 0x0001], // smallest subnormal
      [Infinity, 0x7f80],
      [-Infinity, 0xff80],
      [-0, 0x8000],
    ];
    for (const [v, bits] of cases) {
      expect(f32ToBf16Bits(v), `bf16(${v})`).toBe(bits);
      expect(Object.is(bf16BitsToF32(bits), v)).toBe(true);
    }
    expect(f32ToBf16Bits(65504)).toBe(0x4780); // 65504 rounds up to 65536 in bf16
    expect(f32ToBf16Bits(1 + 2 ** -8)).toBe(0x3f80); // tie -> even (down)
    expect(f32ToBf16Bits(1 + 3 * 2 ** -8)).toBe(0x3f82); // tie -> even (up)
    expect(Number.isNaN(bf16BitsToF32(f32ToBf16Bits(NaN)))).toBe(true);
  });
  it('applies the same rounding when writing F16 and BF16 tensors', () => {
    const data = Float32Array.from([1 + 3 * 2 ** -11, 65520, 1 + 3 * 2 ** -8]);
    const st = parseSafetensors(
      serializeSafetensors(
        new Map<string, StWriteEntry>([
          ['h', { dtype: 'F16', shape: [3], data }],
          ['b', { dtype: 'BF16', shape: [3], data }],
        ]),
      ),
      'mem',
    );
    const h = new Uint16Array(st.tensors.get('h')!.bytes.slice().buffer);
    expect(Array.from(h)).toEqual([0x3c02, 0x7c00, f32ToF16Bits(1 + 3 * 2 ** -8)]);
    const b = new Uint16Array(st.tensors.get('b')!.bytes.slice().buffer);
    expect(b[2]).toBe(0x3f82);
    expect(Array.from(toFloat32(st.tensors.get('h')!)).slice(0, 2)).toEqual([1 + 2 ** -9, Infinity]);
  });
});

describe('reading a tensor in chunks', () => {
  it('yields every element once, in order, for each float dtype and lengths that are not a multiple of the chunk', async () => {
    const values = Float32Array.from({ length: 23 }, (_, i) => (i - 11) * 0.375);
    const path = join(dir, 'chunks.safetensors');
    await writeSafetensors(
      path,
      new Map<string, StWriteEntry>([
        ['f32', { dtype: 'F32', shape: [23], data: values }],
        ['f16', { dtype: 'F16', shape: [23], data: values }],
        ['bf16', { dtype: 'BF16', shape: [23], data: values }],
        ['f64', { dtype: 'F64', shape: [23], data: Float64Array.from(values) }],
      ]),
    );
    const fh = await open(path, 'r');
    try {
      const header = await readSafetensorsHeader(fh, path);
      for (const e of header.entries) {
        const whole = Array.from(toFloat32(await readTensorEntry(fh, header, e, path)));
        expect(whole, e.name).toEqual(Array.from(values)); // exact in every dtype (multiples of 0.375 up to 4.5)
        for (const chunk of [1, 5, 23, 64]) {
          const got: number[] = [];
          const starts: number[] = [];
          await readTensorChunks(fh, header, e, path, chunk, (c, start) => {
            expect(c.shape[0]).toBeLessThanOrEqual(chunk);
            starts.push(start);
            got.push(...toFloat32(c));
          });
          expect(got, `${e.name} in chunks of ${chunk}`).toEqual(whole);
          expect(starts).toEqual(Array.from({ length: Math.ceil(23 / chunk) }, (_, i) => i * chunk));
        }
      }
    } finally {
      await fh.close();
    }
  });
});

describe('malformed safetensors files', () => {
  const ok = { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } };
  const cases: Array<[string, Uint8Array, RegExp]> = [
    ['file shorter than 8 bytes', new Uint8Array(5), /5 bytes, shorter than the 8-byte header length/],
    ['header length past the end', rawFile(ok, new Uint8Array(8), 10_000n), /header length 10000 runs past the end/],
    ['absurd header length', rawFile(ok, new Uint8Array(8), 2n ** 40n), /larger than the 100000000-byte limit/],
    ['header not JSON', rawFile('{"a": nope}', new Uint8Array(0)), /header is not valid JSON/],
    ['header not an object', rawFile('[1,2]'), /header must be a JSON object/],
    ['unknown dtype', rawFile({ a: { dtype: 'F8', shape: [2], data_offsets: [0, 2] } }, new Uint8Array(2)), /tensor "a": unknown dtype "F8"/],
    ['negative dim', rawFile({ a: { dtype: 'F32', shape: [-1], data_offsets: [0, 0] } }), /tensor "a": shape must be a list of non-negative integers/],
    ['offsets reversed', rawFile({ a: { dtype: 'U8', shape: [0], data_offsets: [4, 0] } }, new Uint8Array(4)), /tensor "a": data_offsets must be \[begin, end\]/],
    ['byte length mismatch', rawFile({ a: { dtype: 'F32', shape: [3], data_offsets: [0, 8] } }, new Uint8Array(8)), /tensor "a": data_offsets \[0, 8\] span 8 bytes but F32 shape \[3\] needs 12/],
    [
      'overlapping offsets',
      rawFile(
        { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } },
        new Uint8Array(12),
      ),
      /tensor "b": data_offsets \[4, 12\] overlap tensor "a"/,
    ],
    [
      'hole between tensors',
      rawFile(
        { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] }, b: { dtype: 'F32', shape: [1], data_offsets: [8, 12] } },
        new Uint8Array(12),
      ),
      /tensor "b": .*leave a hole: bytes 4\.\.8/,
    ],
    ['offset past the end', rawFile({ a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] } }, new Uint8Array(4)), /tensor "a": data_offsets \[0, 8\] run past the end of the data section \(4 bytes\)/],
    ['trailing bytes', rawFile(ok, new Uint8Array(12)), /tensors cover 8 bytes but the data section has 12/],
    [
      'duplicate key',
      rawFile('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', new Uint8Array(4)),
      /duplicate key "a"/,
    ],
    ['metadata not strings', rawFile({ __metadata__: { n: 1 }, ...ok }, new Uint8Array(8)), /__metadata__ key "n" must be a string/],
  ];
  for (const [name, bytes, msg] of cases) {
    it(`rejects ${name}`, async () => {
      expect(() => parseSafetensors(bytes, 'bad.safetensors')).toThrow(msg);
      const path = join(dir, `${name.replace(/\W+/g, '-')}.safetensors`);
      await writeFile(path, bytes);
      await expect(readSafetensors(path)).rejects.toThrow(new RegExp(`${path.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}: `));
    });
  }

  it('accepts nested keys that look like duplicates at another depth', () => {
    const st = parseSafetensors(rawFile({ __metadata__: { a: 'x' }, a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, new Uint8Array(4)), 'm');
    expect(st.metadata).toEqual({ a: 'x' });
    expect(st.tensors.has('a')).toBe(true);
  });

  it('reads a file written by fedtune back byte for byte', async () => {
    const path = join(dir, 'bytes.safetensors');
    const m = new Map<string, StWriteEntry>([['x', { dtype: 'F32', shape: [2], data: Float32Array.from([1, 2]) }]]);
    await writeSafetensors(path, m);
    expect(new Uint8Array(await readFile(path))).toEqual(serializeSafetensors(m));
  });
});
