/**
 * Compressed updates (common/update-encoding.ts): float16 / bfloat16 rounding, int8_delta
 * block scales and layout, decoding, error feedback, the header checks and the config
 * fields. Hand-computed values, plus random vectors against test/reference/update_encoding_ref.py
 * (numpy / torch, written from docs/protocol.md).
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseRunConfig } from '../../common/config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import {
  bf16BitsToF32,
  decodeUpdate,
  encodeUpdate,
  encodedStreamBytes,
  EncodingError,
  ErrorFeedback,
  f16BitsToF32,
  f32ToBf16Bits,
  f32ToF16Bits,
  uploadEncodingOf,
} from '../../common/update-encoding.ts';
import { UpdateEncoding } from '../../proto/gen/fedtune/v1/coordinator.ts';
import { uploadEncodingFor } from '../../worker/agent.ts';

const one = (data: number[], name = 't'): TensorMap => new Map([[name, { shape: [data.length], data: Float32Array.from(data) }]]);
const refuse = (m: string): Error => new Error(m);

describe('float16', () => {
  it('rounds to nearest, ties to even, with subnormals and overflow (hand-computed bits)', () => {
    expect(f32ToF16Bits(1)).toBe(0x3c00);
    expect(f32ToF16Bits(-2)).toBe(0xc000);
    expect(f32ToF16Bits(65504)).toBe(0x7bff); // largest finite
    expect(f32ToF16Bits(65519)).toBe(0x7bff); // below the tie
    expect(f32ToF16Bits(65520)).toBe(0x7c00); // the tie between 65504 and 65536 goes to even: Inf
    expect(f32ToF16Bits(1 + 2 ** -11)).toBe(0x3c00); // tie between 1 and 1 + 2^-10: even (1)
    expect(f32ToF16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02); // tie between mantissas 1 and 2: even (2)
    expect(f32ToF16Bits(1 + 2 ** -11 + 2 ** -20)).toBe(0x3c01); // above the tie
    expect(f32ToF16Bits(2 ** -24)).toBe(0x0001); // smallest subnormal
    expect(f32ToF16Bits(2 ** -25)).toBe(0x0000); // tie between 0 and 2^-24: even (0)
    expect(f32ToF16Bits(3 * 2 ** -26)).toBe(0x0001);
    expect(f32ToF16Bits(3 * 2 ** -25)).toBe(0x0002); // 1.5 x 2^-24: tie, even (2)
    expect(f32ToF16Bits(2 ** -14 - 2 ** -25)).toBe(0x0400); // largest subnormal + half: rounds up into the normals
    expect(f32ToF16Bits(-0)).toBe(0x8000);
    expect(f32ToF16Bits(Infinity)).toBe(0x7c00);
    expect(f32ToF16Bits(NaN) & 0x7c00).toBe(0x7c00);
    expect(f32ToF16Bits(NaN) & 0x3ff).not.toBe(0);
  });

  it('widens exactly', () => {
    expect(f16BitsToF32(0x3c00)).toBe(1);
    expect(f16BitsToF32(0x7bff)).toBe(65504);
    expect(f16BitsToF32(0x0001)).toBe(2 ** -24);
    expect(f16BitsToF32(0x03ff)).toBe(1023 * 2 ** -24);
    expect(f16BitsToF32(0x3555)).toBe((1 + 0x155 / 1024) / 4); // exponent 13, mantissa 0x155
    expect(f16BitsToF32(0xfc00)).toBe(-Infinity);
    expect(Number.isNaN(f16BitsToF32(0x7e00))).toBe(true);
    for (let h = 0; h < 0x7c00; h++) expect(f32ToF16Bits(f16BitsToF32(h))).toBe(h); // every finite value round-trips
  });
});

describe('bfloat16', () => {
  it('keeps the upper 16 bits, rounded to nearest even (hand-computed bits)', () => {
    expect(f32ToBf16Bits(1)).toBe(0x3f80);
    expect(f32ToBf16Bits(1 + 2 ** -8)).toBe(0x3f80); // tie between 1 and 1 + 2^-7: even
    expect(f32ToBf16Bits(1 + 3 * 2 ** -8)).toBe(0x3f82); // tie between mantissas 1 and 2: even
    expect(f32ToBf16Bits(1 + 2 ** -8 + 2 ** -20)).toBe(0x3f81); // above the tie
    expect(f32ToBf16Bits(-1.5)).toBe(0xbfc0);
    expect(f32ToBf16Bits(3.4028234663852886e38)).toBe(0x7f80); // float32 max rounds up to Inf
    expect(f32ToBf16Bits(2 ** -149)).toBe(0x0000); // float32's smallest subnormal: below half of bf16's
    expect(f32ToBf16Bits(NaN) & 0x7f80).toBe(0x7f80);
    expect(bf16BitsToF32(0x3f81)).toBe(1 + 2 ** -7);
    expect(bf16BitsToF32(0xc0a0)).toBe(-5);
  });

  it('refuses to send what does not fit, naming the tensor and the fix', () => {
    expect(() => encodeUpdate(one([1, 7e4], 'layers.0.q.lora_B.weight'), { encoding: 'float16' })).toThrow(/tensor layers.0.q.lora_B.weight: element 1 \(70000\) is beyond the range of float16; use round.update_encoding: bfloat16 or float32/);
    expect(() => encodeUpdate(one([3.4028234663852886e38]), { encoding: 'bfloat16' })).toThrow(/beyond the range of bfloat16/);
  });
});

describe('int8_delta', () => {
  // start + delta with exact float32 deltas; blocks of 2: [63.5, 10.25] [-127, 0.75] [-0]
  const start = [1, 2, 3, 4, 5];
  const delta = [63.5, 10.25, -127, 0.75, -0];
  const update = one(start.map((s, i) => s + delta[i]!));

  it('per-block absmax scales, round-half-even values, the documented layout', () => {
    const enc = encodeUpdate(update, { encoding: 'int8_delta', blockSize: 2, start: one(start) });
    expect(enc.manifest).toEqual([{ name: 't', dtype: 'I8', shape: [5] }]);
    expect(enc.bytes.byteLength).toBe(3 * 4 + 5);
    const v = new DataView(enc.bytes.buffer);
    expect([0, 1, 2].map((b) => v.getFloat32(4 * b, true))).toEqual([0.5, 1, 0]); // 63.5/127, 127/127, 0
    // 63.5/0.5 = 127; 10.25/0.5 = 20.5 -> 20 (even); -127; 0.75 -> 1; 0 (scale 0)
    expect([0, 1, 2, 3, 4].map((i) => v.getInt8(12 + i))).toEqual([127, 20, -127, 1, 0]);
    const dec = decodeUpdate([{ name: 't', dtype: 'F32', shape: [5] }], enc.bytes, 'int8_delta', 2, Float32Array.from(start));
    expect([...dec]).toEqual([64.5, 12, -124, 5, 5]);
  });

  it('several tensors: each its own blocks, scales before values', () => {
    const m: TensorMap = new Map([
      ['a', { shape: [1, 3], data: Float32Array.from([2, 0, -1]) }],
      ['b', { shape: [2], data: Float32Array.from([0.25, 0]) }],
    ]);
    const s: TensorMap = new Map([
      ['a', { shape: [1, 3], data: new Float32Array(3) }],
      ['b', { shape: [2], data: new Float32Array(2) }],
    ]);
    const enc = encodeUpdate(m, { encoding: 'int8_delta', blockSize: 4, start: s });
    expect(encodedStreamBytes(enc.manifest, 'int8_delta', 4)).toBe(4 + 3 + 4 + 2);
    const v = new DataView(enc.bytes.buffer);
    expect(v.getFloat32(0, true)).toBe(Math.fround(2 / 127));
    expect([v.getInt8(4), v.getInt8(5), v.getInt8(6)]).toEqual([127, 0, -64]); // -1 / (2/127) = -63.5000.. -> -64 (above the tie: fround(2/127) < 2/127)
    expect(v.getFloat32(7, true)).toBe(Math.fround(0.25 / 127)); // unaligned: right after a's values
    expect([v.getInt8(11), v.getInt8(12)]).toEqual([127, 0]);
  });

  it('matches the numpy / torch reference on random vectors (f16 and bf16 bits, scales, values, decoded)', () => {
    let seed = 7;
    const rnd = (): number => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31) * 2 - 1;
    const n = 1000;
    const values = Array.from({ length: n }, (_, i) => Math.fround(rnd() * 10 ** ((i % 9) - 6)));
    const startV = Array.from({ length: n }, () => Math.fround(rnd() * 0.1));
    const block = 37;
    const r = spawnSync('/usr/bin/python3', [join(import.meta.dirname, '..', 'reference', 'update_encoding_ref.py')], { input: JSON.stringify({ values, start: startV, block }), encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const ref = JSON.parse(r.stdout) as { f16: number[]; bf16: number[]; scales: number[]; q: number[]; decoded: number[] };
    expect(values.map(f32ToF16Bits)).toEqual(ref.f16);
    expect(values.map(f32ToBf16Bits)).toEqual(ref.bf16);
    const enc = encodeUpdate(one(values), { encoding: 'int8_delta', blockSize: block, start: one(startV) });
    const v = new DataView(enc.bytes.buffer);
    const nb = Math.ceil(n / block);
    expect(Array.from({ length: nb }, (_, b) => v.getFloat32(4 * b, true))).toEqual(ref.scales);
    expect(Array.from({ length: n }, (_, i) => v.getInt8(4 * nb + i))).toEqual(ref.q);
    expect([...decodeUpdate([{ name: 't', dtype: 'F32', shape: [n] }], enc.bytes, 'int8_delta', block, Float32Array.from(startV))]).toEqual(ref.decoded);
    // float16 / bfloat16 updates decode to exactly the reference's widened values
    const f16 = encodeUpdate(one(values), { encoding: 'float16' });
    expect([...decodeUpdate([{ name: 't', dtype: 'F32', shape: [n] }], f16.bytes, 'float16', 0, null)]).toEqual(ref.f16.map(f16BitsToF32));
  });

  it('decoding refuses bad scales and values, naming the tensor and block', () => {
    const m = [{ name: 'w', dtype: 'F32' as const, shape: [3] }];
    const bytes = new Uint8Array(2 * 4 + 3);
    const v = new DataView(bytes.buffer);
    v.setFloat32(4, -1, true);
    expect(() => decodeUpdate(m, bytes, 'int8_delta', 2, new Float32Array(3))).toThrow(/tensor w: scale of block 1 is -1; scales must be finite and >= 0/);
    v.setFloat32(4, 1, true);
    v.setInt8(10, -128);
    expect(() => decodeUpdate(m, bytes, 'int8_delta', 2, new Float32Array(3))).toThrow(/tensor w: element 2 is -128; int8_delta values are -127..127/);
    expect(() => decodeUpdate(m, bytes.subarray(1), 'int8_delta', 2, new Float32Array(3))).toThrow(EncodingError);
    expect(() => encodeUpdate(one([1]), { encoding: 'int8_delta', blockSize: 0, start: one([0]) })).toThrow(/block size must be an integer from 1/);
    expect(() => encodeUpdate(one([1]), { encoding: 'int8_delta', start: new Map() })).toThrow(/tensor t has no start value/);
  });
});

describe('error feedback', () => {
  it('carries exactly the residual: the sum of what was sent plus the residual is the sum of the deltas', () => {
    // One block of 2, delta [127, 0.75] each round: the scale is 1 and the second element is what is rounded.
    const start = one([0, 0]);
    const update = one([127, 0.75]);
    const ef = new ErrorFeedback();
    const sent: number[] = [];
    const residuals: number[] = [];
    for (let round = 0; round < 3; round++) {
      const enc = encodeUpdate(update, { encoding: 'int8_delta', blockSize: 2, start, residual: ef.take('run-1'), errorFeedback: true });
      const dec = decodeUpdate([{ name: 't', dtype: 'F32', shape: [2] }], enc.bytes, 'int8_delta', 2, new Float32Array(2));
      sent.push(dec[1]!);
      residuals.push(enc.residual!.get('t')![1]!);
      expect(enc.residual!.get('t')![0]).toBe(0);
      ef.commit('run-1', enc.residual!);
    }
    // d = 0.75 -> q 1, r -0.25; d = 0.5 -> q 0 (tie, even), r 0.5; d = 1.25 -> q 1, r 0.25
    expect(sent).toEqual([1, 0, 1]);
    expect(residuals).toEqual([-0.25, 0.5, 0.25]);
    expect(3 * 0.75 - sent.reduce((a, b) => a + b)).toBe(residuals[2]);
  });

  it('only an accepted update commits its residual; another run starts from zero; a changed shape starts from zero', () => {
    const ef = new ErrorFeedback();
    ef.commit('run-1', new Map([['t', Float32Array.from([0, 0.5])]]));
    expect([...ef.take('run-1').get('t')!]).toEqual([0, 0.5]);
    const enc = encodeUpdate(one([127, 0.75]), { encoding: 'int8_delta', blockSize: 2, start: one([0, 0]), residual: ef.take('run-1'), errorFeedback: true });
    expect([...enc.residual!.get('t')!]).toEqual([0, 0.25]); // 1.25 -> 1
    expect([...ef.take('run-1').get('t')!]).toEqual([0, 0.5]); // not committed: unchanged
    expect(ef.take('run-2').size).toBe(0);
    const grown = encodeUpdate(one([127, 0.75, 0]), { encoding: 'int8_delta', blockSize: 2, start: one([0, 0, 0]), residual: new Map([['t', Float32Array.from([0, 0.5])]]), errorFeedback: true });
    expect([...grown.residual!.get('t')!]).toEqual([0, -0.25, 0]);
    expect(encodeUpdate(one([1]), { encoding: 'int8_delta', start: one([0]) }).residual).toBeNull();
  });
});

describe('negotiation', () => {
  it('the upload header: a known encoding, a block size for int8_delta, every dtype the encoding\'s', () => {
    const f16 = [{ name: 'a', dtype: 'F16' as const, shape: [2] }];
    expect(uploadEncodingOf({}, [{ name: 'a', dtype: 'F32', shape: [2] }], refuse)).toEqual({ encoding: 'float32', blockSize: 0 });
    expect(uploadEncodingOf({ encoding: UpdateEncoding.UPDATE_ENCODING_FLOAT16 }, f16, refuse)).toEqual({ encoding: 'float16', blockSize: 0 });
    expect(() => uploadEncodingOf({ encoding: 9 }, f16, refuse)).toThrow(/unknown encoding 9 \(allowed: UPDATE_ENCODING_FLOAT32, UPDATE_ENCODING_FLOAT16/);
    expect(() => uploadEncodingOf({ encoding: UpdateEncoding.UPDATE_ENCODING_BFLOAT16 }, f16, refuse)).toThrow(/tensor a: dtype F16, but an upload with encoding bfloat16 has every tensor in BF16/);
    expect(() => uploadEncodingOf({ encoding: UpdateEncoding.UPDATE_ENCODING_INT8_DELTA }, [{ name: 'a', dtype: 'I8', shape: [2] }], refuse)).toThrow(/block_size must be from 1 to 1048576 with encoding int8_delta \(got 0\)/);
  });

  it('a worker sends what the task asks only when the task accepts it; an older coordinator gets float32', () => {
    const F = UpdateEncoding;
    expect(uploadEncodingFor(undefined).encoding).toBe('float32');
    expect(uploadEncodingFor({ encoding: F.UPDATE_ENCODING_BFLOAT16, blockSize: 0, errorFeedback: false, accepted: [F.UPDATE_ENCODING_FLOAT32, F.UPDATE_ENCODING_BFLOAT16] })).toEqual({ encoding: 'bfloat16', blockSize: 0, errorFeedback: false });
    expect(uploadEncodingFor({ encoding: F.UPDATE_ENCODING_BFLOAT16, blockSize: 0, errorFeedback: false, accepted: [F.UPDATE_ENCODING_FLOAT32] }).encoding).toBe('float32');
    expect(uploadEncodingFor({ encoding: F.UPDATE_ENCODING_INT8_DELTA, blockSize: 32, errorFeedback: true, accepted: [F.UPDATE_ENCODING_FLOAT32, F.UPDATE_ENCODING_INT8_DELTA] })).toEqual({ encoding: 'int8_delta', blockSize: 32, errorFeedback: true });
    expect(uploadEncodingFor({ encoding: 42 as UpdateEncoding, blockSize: 0, errorFeedback: false, accepted: [42 as UpdateEncoding] }).encoding).toBe('float32');
  });
});

describe('config', () => {
  const base = { name: 'c', model: { path: '/m' }, training: { steps: 1 }, rounds: 1, server: { join_token: 't' } };
  const issue = (round: Record<string, unknown>, extra: Record<string, unknown> = {}): string => {
    try {
      parseRunConfig({ ...base, round, ...extra });
      return '';
    } catch (err) {
      return (err as Error).message;
    }
  };

  it('defaults to float32; takes each encoding; refuses bad values by name', () => {
    expect(parseRunConfig(base).round).toMatchObject({ update_encoding: 'float32', int8_block_size: null, error_feedback: false });
    expect(parseRunConfig({ ...base, round: { update_encoding: 'int8_delta', int8_block_size: 128, error_feedback: true } }).round.int8_block_size).toBe(128);
    expect(issue({ update_encoding: 'int4' })).toMatch(/round\.update_encoding/);
    expect(issue({ update_encoding: 'int8_delta', int8_block_size: 0 })).toMatch(/round\.int8_block_size/);
    expect(issue({ update_encoding: 'float16', int8_block_size: 64 })).toMatch(/round\.int8_block_size.*only applies to round.update_encoding: int8_delta/);
    expect(issue({ update_encoding: 'bfloat16', error_feedback: true })).toMatch(/round\.error_feedback.*only applies to round.update_encoding: int8_delta/);
  });

  it('refuses compression with secure aggregation, naming both', () => {
    const sa = { privacy: { secure_aggregation: { threshold: 2 } }, cohort: { min_workers: 3 } };
    expect(issue({ update_encoding: 'int8_delta' }, sa)).toMatch(/round\.update_encoding.*int8_delta cannot be combined with privacy.secure_aggregation/);
    expect(issue({ update_encoding: 'float32' }, sa)).toBe('');
    expect(issue({ update_encoding: 'bfloat16' }, { strategy: 'ffa' })).toMatch(/round\.update_encoding.*bfloat16 rounds every lora_A, but strategy ffa/);
    expect(issue({ update_encoding: 'int8_delta' }, { strategy: 'ffa' })).toBe('');
  });
});
