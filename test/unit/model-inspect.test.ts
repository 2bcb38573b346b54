import { describe, expect, it, beforeAll, afterAll } from 'vitest';
import { createHash } from 'node:crypto';
import { cp, mkdtemp, open, readFile, readdir, rm, stat, truncate, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initModel, type InitModelOptions } from '../../worker/engine/init.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { inspectModel, type ModelInfo } from '../../common/hf-model.ts';
import { readSafetensors, writeSafetensors, type StWriteEntry } from '../../common/safetensors.ts';
import { numel } from '../../common/tensor.ts';

let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'fedtune-inspect-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const llama: InitModelOptions = { arch: 'llama', hiddenSize: 32, numLayers: 2, numHeads: 4, numKvHeads: 2, intermediateSize: 48, seed: 3 };
const gpt2: InitModelOptions = { arch: 'gpt2', hiddenSize: 16, numLayers: 2, numHeads: 2, maxPositions: 32, seed: 4 };

async function make(name: string, opts: InitModelOptions): Promise<string> {
  const dir = join(root, name);
  await initModel(dir, opts);
  return dir;
}

async function copy(from: string, name: string): Promise<string> {
  const dir = join(root, name);
  await cp(from, dir, { recursive: true });
  return dir;
}

/** Rewrite model.safetensors of a float32 model directory. */
async function rewriteWeights(dir: string, edit: (m: Map<string, StWriteEntry>) => void): Promise<void> {
  const st = await readSafetensors(join(dir, 'model.safetensors'));
  const m = new Map<string, StWriteEntry>();
  for (const [k, e] of st.tensors) m.set(k, { dtype: 'F32', shape: e.shape, data: new Float32Array(e.bytes.slice().buffer) });
  edit(m);
  await writeSafetensors(join(dir, 'model.safetensors'), m, { format: 'pt' });
}

/** Both paths fail, with the same message. */
async function expectSameError(dir: string, pattern: RegExp): Promise<void> {
  const a = await loadModel(dir).then(
    () => null,
    (e: Error) => e,
  );
  const b = await inspectModel(dir, { chunkBytes: 16 }).then(
    () => null,
    (e: Error) => e,
  );
  expect(a, 'loadModel should fail').toBeInstanceOf(Error);
  expect(b, 'inspectModel should fail').toBeInstanceOf(Error);
  expect(a!.message).toMatch(pattern);
  expect(b!.message).toBe(a!.message);
}

async function safetensorsBytes(dir: string): Promise<number> {
  let n = 0;
  for (const f of await readdir(dir)) if (f.endsWith('.safetensors')) n += (await stat(join(dir, f))).size;
  return n;
}

/** inspectModel agrees with loadModel on fingerprint, config, names, shapes and counts. */
async function expectMatchesLoad(dir: string, info: ModelInfo, dtype: string): Promise<void> {
  const m = await loadModel(dir);
  expect(info.fingerprint).toBe(m.fingerprint);
  expect(info.config).toEqual(m.config);
  expect(info.rawConfig).toEqual(m.rawConfig);
  expect([...info.shapes.keys()]).toEqual([...m.weights.keys()]);
  for (const [k, t] of m.weights) expect(info.shapes.get(k)).toEqual(t.shape);
  expect([...info.dtypes.values()].every((d) => d === dtype)).toBe(true);
  expect(info.dtypes.size).toBe(m.weights.size);
  let params = 0;
  for (const t of m.weights.values()) params += t.data.length;
  expect(info.parameterCount).toBe(params);
  expect(info.bytesOnDisk).toBe(await safetensorsBytes(dir));
}

describe('inspectModel gives loadModel fingerprint without loading weights', () => {
  for (const [arch, base] of [
    ['llama', llama],
    ['gpt2', gpt2],
  ] as const) {
    for (const [dtype, st] of [
      ['float32', 'F32'],
      ['float16', 'F16'],
      ['bfloat16', 'BF16'],
    ] as const) {
      for (const shards of [1, 3]) {
        it(`${arch} ${dtype} ${shards === 1 ? 'single file' : `${shards} shards with an index`}`, async () => {
          const dir = await make(`${arch}-${dtype}-${shards}`, { ...base, dtype, shards });
          if (shards > 1) expect(await readdir(dir)).toContain('model.safetensors.index.json');
          // Default chunks hold whole tensors; 24-byte chunks split every tensor with a short tail.
          const whole = await inspectModel(dir);
          const split = await inspectModel(dir, { chunkBytes: 24 });
          expect(split.fingerprint).toBe(whole.fingerprint);
          await expectMatchesLoad(dir, whole, st);
        });
      }
    }
  }

  it('fingerprint is the documented hash (config JSON, then sorted name, shape, float32 LE values)', async () => {
    const dir = join(root, 'llama-bfloat16-1');
    const info = await inspectModel(dir, { chunkBytes: 64 });
    const st = await readSafetensors(join(dir, 'model.safetensors'));
    const c = info.config as unknown as Record<string, unknown>;
    const h = createHash('sha256');
    h.update(`{${Object.keys(c).sort().map((k) => `${JSON.stringify(k)}:${JSON.stringify(c[k])}`).join(',')}}`);
    for (const name of [...st.tensors.keys()].sort()) {
      const e = st.tensors.get(name)!;
      expect(e.dtype).toBe('BF16');
      h.update(`\n${name}\n${e.shape.join(',')}\n`);
      // bfloat16 -> float32 by hand: the two bytes become the high half of the float32.
      const f = Buffer.alloc(e.bytes.length * 2);
      for (let i = 0; i < e.bytes.length; i += 2) {
        f[2 * i + 2] = e.bytes[i]!;
        f[2 * i + 3] = e.bytes[i + 1]!;
      }
      h.update(f);
    }
    expect(info.fingerprint).toBe(h.digest('hex'));
  });

  it('float64 and mixed-dtype checkpoints convert as loadModel does', async () => {
    const dir = await copy(join(root, 'llama-float32-1'), 'llama-f64');
    const st = await readSafetensors(join(dir, 'model.safetensors'));
    const m = new Map<string, StWriteEntry>();
    let i = 0;
    for (const [k, e] of st.tensors) {
      const f32 = new Float32Array(e.bytes.slice().buffer);
      // Values that float32 cannot hold exactly, so the F64 -> F32 rounding matters.
      const f64 = Float64Array.from(f32, (x, j) => x + j * 1e-12);
      m.set(k, i++ % 2 ? { dtype: 'F64', shape: e.shape, data: f64 } : { dtype: 'BF16', shape: e.shape, data: f32 });
    }
    await writeSafetensors(join(dir, 'model.safetensors'), m);
    const info = await inspectModel(dir, { chunkBytes: 40 });
    const loaded = await loadModel(dir);
    expect(info.fingerprint).toBe(loaded.fingerprint);
    expect(new Set(info.dtypes.values())).toEqual(new Set(['F64', 'BF16']));
  });

  it('skips buffers and tied copies, and reads gpt2 names without the transformer. prefix, as loadModel does', async () => {
    const ref = await inspectModel(join(root, 'gpt2-float32-1'));
    const dir = await copy(join(root, 'gpt2-float32-1'), 'gpt2-bare');
    await rewriteWeights(dir, (m) => {
      const renamed = new Map<string, StWriteEntry>();
      for (const [k, e] of m) renamed.set(k.replace(/^transformer\./, ''), e);
      m.clear();
      for (const [k, e] of renamed) m.set(k, e);
      m.set('h.0.attn.bias', { dtype: 'F32', shape: [1, 1, 32, 32], data: new Float32Array(32 * 32).fill(1) });
      m.set('lm_head.weight', renamed.get('wte.weight')!);
    });
    const info = await inspectModel(dir, { chunkBytes: 8 });
    expect(info.fingerprint).toBe(ref.fingerprint);
    expect([...info.shapes.keys()]).toEqual([...ref.shapes.keys()]);
    expect(info.parameterCount).toBe(ref.parameterCount);
    expect(info.bytesOnDisk).toBeGreaterThan(ref.bytesOnDisk);
  });

  it('reports progress up to the total tensor bytes', async () => {
    const dir = join(root, 'llama-float16-3');
    const seen: Array<[number, number]> = [];
    const info = await inspectModel(dir, { chunkBytes: 1000, onProgress: (d, t) => seen.push([d, t]) });
    let tensorBytes = 0;
    for (const s of info.shapes.values()) tensorBytes += numel(s) * 2;
    expect(seen.length).toBeGreaterThan(info.shapes.size);
    expect(seen.every(([, t]) => t === tensorBytes)).toBe(true);
    expect(seen.every(([d], i) => i === 0 || d > seen[i - 1]![0])).toBe(true);
    expect(seen.at(-1)![0]).toBe(tensorBytes);
  });
});

describe('one changed value changes the fingerprint', () => {
  it('float32: one element of one weight', async () => {
    const base = join(root, 'llama-float32-1');
    const dir = await copy(base, 'llama-edit');
    await rewriteWeights(dir, (m) => {
      m.get('model.layers.1.mlp.down_proj.weight')!.data[100] += 1e-3;
    });
    const before = await inspectModel(base);
    const after = await inspectModel(dir, { chunkBytes: 64 });
    expect(after.fingerprint).not.toBe(before.fingerprint);
    expect(after.fingerprint).toBe((await loadModel(dir)).fingerprint);
  });

  it('bfloat16 shard: the lowest bit of the last value on disk', async () => {
    const base = join(root, 'gpt2-bfloat16-3');
    const dir = await copy(base, 'gpt2-bf16-flip');
    const file = join(dir, 'model-00003-of-00003.safetensors');
    const size = (await stat(file)).size;
    const fh = await open(file, 'r+');
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, size - 2);
    b[0]! ^= 1;
    await fh.write(b, 0, 1, size - 2);
    await fh.close();
    const before = await inspectModel(base);
    const after = await inspectModel(dir, { chunkBytes: 48 });
    expect(after.fingerprint).not.toBe(before.fingerprint);
    expect(after.fingerprint).toBe((await loadModel(dir)).fingerprint);
  });
});

describe('inspectModel errors are loadModel errors', () => {
  it('missing tokenizer.json', async () => {
    const dir = await copy(join(root, 'llama-float32-1'), 'no-tok');
    await unlink(join(dir, 'tokenizer.json'));
    await expectSameError(dir, /has no tokenizer\.json/);
  });

  it('missing or unsupported config.json', async () => {
    const dir = await copy(join(root, 'llama-float32-1'), 'bad-config');
    const raw = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8'));
    await writeFile(join(dir, 'config.json'), JSON.stringify({ ...raw, model_type: 'falcon' }));
    await expectSameError(dir, /unsupported model_type "falcon"; supported: llama, mistral, qwen2, gpt2/);
    await unlink(join(dir, 'config.json'));
    await expectSameError(dir, /config\.json not found/);
  });

  it('wrong shape, missing weight, unexpected weight', async () => {
    const dir = await copy(join(root, 'llama-float32-1'), 'bad-weights');
    await rewriteWeights(dir, (m) => m.set('model.layers.0.self_attn.k_proj.weight', { dtype: 'F32', shape: [32, 32], data: new Float32Array(1024) }));
    await expectSameError(dir, /weight model\.layers\.0\.self_attn\.k_proj\.weight has shape \[32, 32\], expected \[16, 32\]/);
    await rewriteWeights(dir, (m) => {
      m.set('model.layers.0.self_attn.k_proj.weight', { dtype: 'F32', shape: [16, 32], data: new Float32Array(512) });
      m.delete('model.layers.1.mlp.up_proj.weight');
    });
    await expectSameError(dir, /missing weight model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \[48, 32\]\)/);
    await rewriteWeights(dir, (m) => {
      m.set('model.layers.1.mlp.up_proj.weight', { dtype: 'F32', shape: [48, 32], data: new Float32Array(48 * 32) });
      m.set('model.layers.0.self_attn.o_proj.bias', { dtype: 'F32', shape: [32], data: new Float32Array(32) });
    });
    await expectSameError(dir, /unexpected weight model\.layers\.0\.self_attn\.o_proj\.bias for llama/);
  });

  it('a weight present twice (gpt2 with and without the prefix)', async () => {
    const dir = await copy(join(root, 'gpt2-float32-1'), 'gpt2-dup');
    await rewriteWeights(dir, (m) => m.set('wte.weight', m.get('transformer.wte.weight')!));
    await expectSameError(dir, /weight transformer\.wte\.weight also appears in model\.safetensors/);
  });

  it('corrupted headers', async () => {
    const base = join(root, 'llama-bfloat16-1');
    const dir = await copy(base, 'bad-header');
    const file = join(dir, 'model.safetensors');
    const good = await readFile(file);
    const hlen = Number(good.readBigUInt64LE(0));

    const lenTooBig = Buffer.from(good);
    lenTooBig.writeBigUInt64LE(BigInt(good.length), 0);
    await writeFile(file, lenTooBig);
    await expectSameError(dir, /header length \d+ runs past the end of the \d+-byte file/);

    const lenHuge = Buffer.from(good);
    lenHuge.writeBigUInt64LE(1n << 40n, 0);
    await writeFile(file, lenHuge);
    await expectSameError(dir, /larger than the 100000000-byte limit/);

    const notJson = Buffer.from(good);
    notJson[8] = 0x5b; // '[' instead of '{'
    await writeFile(file, notJson);
    await expectSameError(dir, /header is not valid JSON/);

    const badOffsets = Buffer.from(good.toString('latin1').replace('"data_offsets":[0,', '"data_offsets":[2,'), 'latin1');
    expect(badOffsets.equals(good)).toBe(false);
    await writeFile(file, badOffsets);
    await expectSameError(dir, /data_offsets \[2, \d+\] span \d+ bytes but BF16 shape/);

    await writeFile(file, good.subarray(0, 8 + hlen + 100));
    await expectSameError(dir, /run past the end of the data section/);

    await writeFile(file, good);
    await truncate(file, 5);
    await expectSameError(dir, /file is 5 bytes, shorter than the 8-byte header length/);
  });

  it('a non-float weight dtype', async () => {
    const dir = await copy(join(root, 'llama-float32-1'), 'int-weight');
    const st = await readSafetensors(join(dir, 'model.safetensors'));
    // Hand-built file: the norm weight stored as I32.
    const header: Record<string, unknown> = {};
    const blobs: Uint8Array[] = [];
    let off = 0;
    for (const [k, e] of st.tensors) {
      const dtype = k === 'model.norm.weight' ? 'I32' : e.dtype;
      header[k] = { dtype, shape: e.shape, data_offsets: [off, off + e.bytes.length] };
      off += e.bytes.length;
      blobs.push(e.bytes);
    }
    const json = Buffer.from(JSON.stringify(header));
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    await writeFile(join(dir, 'model.safetensors'), Buffer.concat([len, json, ...blobs]));
    await expectSameError(dir, /weight model\.norm\.weight has dtype I32; model weights must be F32, F16, BF16 or F64/);
  });

  it('a shard index naming a missing file, or a weight its file lacks', async () => {
    const dir = await copy(join(root, 'llama-float16-3'), 'bad-shards');
    const shard2 = join(dir, 'model-00002-of-00003.safetensors');
    const keep = await readFile(shard2);
    await unlink(shard2);
    await expectSameError(dir, /shard file model-00002-of-00003\.safetensors listed in weight_map does not exist/);
    await writeFile(shard2, keep);
    const idxPath = join(dir, 'model.safetensors.index.json');
    const idx = JSON.parse(await readFile(idxPath, 'utf8'));
    idx.weight_map['model.norm.weight'] = 'model-00001-of-00003.safetensors';
    await writeFile(idxPath, JSON.stringify(idx));
    await expectSameError(dir, /weight model\.norm\.weight is mapped to model-00001-of-00003\.safetensors but that file does not contain it/);
    await unlink(idxPath);
    await expectSameError(dir, /neither model\.safetensors nor model\.safetensors\.index\.json/);
  });

  it('refuses a chunk size below 8 bytes', async () => {
    await expect(inspectModel(join(root, 'llama-float32-1'), { chunkBytes: 4 })).rejects.toThrow(/chunkBytes must be an integer of at least 8, got 4/);
  });
});
