/**
 * The base-model fingerprint test vectors (test/fixtures/fingerprint, expected.json):
 * the TypeScript implementation (inspectModel, loadModel), a from-the-spec hash
 * written here after docs/protocol.md, and the Python one in clients/python
 * (run through /usr/bin/python3) must all give the committed digests.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it, onTestFinished } from 'vitest';
import { inspectModel } from '../../common/hf-model.ts';
import { loadModel } from '../../worker/engine/model.ts';

const root = join(import.meta.dirname, '..', '..');
const fixtures = join(root, 'test', 'fixtures', 'fingerprint');
const expected = JSON.parse(readFileSync(join(fixtures, 'expected.json'), 'utf8')) as Record<string, { fingerprint: string; canonical_config: string }>;
const names = Object.keys(expected);

const PYTHON = '/usr/bin/python3';
const inCI = process.env.CI === 'true' || process.env.CI === '1';
const pythonEnv = { ...process.env, PYTHONPATH: join(root, 'clients', 'python'), PYTHONDONTWRITEBYTECODE: '1' };

function pythonHasNumpy(): boolean {
  if (inCI) return true;
  const ok = spawnSync(PYTHON, ['-c', 'import numpy'], { stdio: 'ignore' }).status === 0;
  if (!ok) console.log(`skipping the Python fingerprint checks: ${PYTHON} with numpy not found (apt-get install python3-numpy; CI=true always runs them)`);
  return ok;
}
const havePython = pythonHasNumpy();

function python(args: string[], input?: string): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(PYTHON, args, { env: pythonEnv, encoding: 'utf8', input, cwd: root });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

// ---------------------------------------------------------------- the algorithm of docs/protocol.md, written out

/** IEEE binary16 bits -> value, from the definition (sign, 5-bit exponent with bias 15, 10-bit fraction). */
function halfValue(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return sign * 2 ** -14 * (f / 1024);
  if (e === 31) return f === 0 ? sign * Infinity : NaN;
  return sign * 2 ** (e - 15) * (1 + f / 1024);
}

/** Weight values as float32 little-endian bytes. */
function asF32(dtype: string, b: Buffer): Buffer {
  const out = Buffer.alloc((b.length / (dtype === 'F64' ? 8 : dtype === 'F32' ? 4 : 2)) * 4);
  const n = out.length / 4;
  for (let i = 0; i < n; i++) {
    if (dtype === 'F32') out.writeFloatLE(b.readFloatLE(4 * i), 4 * i);
    else if (dtype === 'F64') out.writeFloatLE(b.readDoubleLE(8 * i), 4 * i); // writeFloatLE rounds to nearest even
    else if (dtype === 'F16') out.writeFloatLE(halfValue(b.readUInt16LE(2 * i)), 4 * i);
    else out.writeUInt32LE(b.readUInt16LE(2 * i) * 65536, 4 * i); // BF16: the top half of a float32
  }
  return out;
}

function bySpec(dir: string, canonicalConfig: string, isGpt2: boolean, tied: boolean): string {
  const files = (() => {
    try {
      return [...new Set(Object.values(JSON.parse(readFileSync(join(dir, 'model.safetensors.index.json'), 'utf8')).weight_map as Record<string, string>))];
    } catch {
      return ['model.safetensors'];
    }
  })();
  const weights = new Map<string, { dtype: string; shape: number[]; bytes: Buffer }>();
  for (const f of files) {
    const buf = readFileSync(join(dir, f));
    const hlen = Number(buf.readBigUInt64LE(0));
    const header = JSON.parse(buf.subarray(8, 8 + hlen).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
    for (const [name, e] of Object.entries(header)) {
      if (name === '__metadata__') continue;
      let canon = name;
      if (isGpt2) {
        if (name === 'lm_head.weight') continue;
        canon = name.startsWith('transformer.') ? name : `transformer.${name}`;
        if (/\.attn\.(bias|masked_bias)$/.test(canon)) continue;
      } else if (name.endsWith('.rotary_emb.inv_freq') || (name === 'lm_head.weight' && tied)) continue;
      weights.set(canon, { dtype: e.dtype, shape: e.shape, bytes: buf.subarray(8 + hlen + e.data_offsets[0], 8 + hlen + e.data_offsets[1]) });
    }
  }
  const h = createHash('sha256').update(Buffer.from(canonicalConfig, 'utf8'));
  for (const name of [...weights.keys()].sort()) {
    const w = weights.get(name)!;
    h.update(Buffer.from(`\n${name}\n${w.shape.join(',')}\n`, 'utf8'));
    h.update(asF32(w.dtype, w.bytes));
  }
  return h.digest('hex');
}

describe('fingerprint test vectors (test/fixtures/fingerprint)', () => {
  it('cover what the spec has rules for: every float dtype, buffers, an index, unprefixed gpt2 names', () => {
    expect(names.sort()).toEqual(['gpt2-sharded', 'llama-mixed']);
    const idx = JSON.parse(readFileSync(join(fixtures, 'gpt2-sharded', 'model.safetensors.index.json'), 'utf8')).weight_map as Record<string, string>;
    expect(new Set(Object.values(idx)).size).toBe(2);
    expect(Object.keys(idx)).toEqual(expect.arrayContaining(['wte.weight', 'h.0.attn.bias', 'lm_head.weight']));
  });

  for (const name of names) {
    const dir = join(fixtures, name);
    it(`${name}: inspectModel and loadModel give the committed digest`, async () => {
      const a = await inspectModel(dir);
      const b = await inspectModel(dir, { chunkBytes: 8 });
      expect(new Set(a.dtypes.values())).toEqual(new Set(['F32', 'F16', 'BF16', 'F64']));
      expect(a.fingerprint).toBe(expected[name]!.fingerprint);
      expect(b.fingerprint).toBe(expected[name]!.fingerprint);
      expect((await loadModel(dir)).fingerprint).toBe(expected[name]!.fingerprint);
    });

    it(`${name}: the algorithm of docs/protocol.md, written out here, gives the committed digest`, async () => {
      const info = await inspectModel(dir);
      expect(bySpec(dir, expected[name]!.canonical_config, info.config.family === 'gpt2', info.config.tieWordEmbeddings)).toBe(expected[name]!.fingerprint);
      // The canonical config is the normalised config with sorted keys and JavaScript number formatting.
      const c = info.config as unknown as Record<string, unknown>;
      expect(`{${Object.keys(c).sort().map((k) => `${JSON.stringify(k)}:${JSON.stringify(c[k])}`).join(',')}}`).toBe(expected[name]!.canonical_config);
    });

    it.skipIf(!havePython)(`${name}: the Python implementation (python3 -m fedtune_worker fingerprint) gives the committed digest`, () => {
      for (const args of [[], ['--chunk-bytes=8']]) {
        const r = python(['-m', 'fedtune_worker', 'fingerprint', dir, ...args]);
        expect(r.stderr).toBe('');
        expect(r.stdout.trim()).toBe(expected[name]!.fingerprint);
      }
      const c = python(['-m', 'fedtune_worker', 'fingerprint', dir, '--canonical-config']);
      expect(c.stdout.trim()).toBe(expected[name]!.canonical_config);
    });
  }

  it('the digest changes with one weight value and with one config field', async () => {
    const tmp = mkdtempSync(join(tmpdir(), 'fedtune-fp-'));
    onTestFinished(() => rmSync(tmp, { recursive: true, force: true }));
    const dir = join(tmp, 'm');
    cpSync(join(fixtures, 'llama-mixed'), dir, { recursive: true });
    const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...cfg, rms_norm_eps: 1e-6 }));
    const changed = (await inspectModel(dir)).fingerprint;
    expect(changed).not.toBe(expected['llama-mixed']!.fingerprint);
    if (havePython) expect(python(['-m', 'fedtune_worker', 'fingerprint', dir]).stdout.trim()).toBe(changed);
    // A config.json field the normalised config does not hold (torch_dtype) changes nothing.
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...cfg, torch_dtype: 'float32' }));
    expect((await inspectModel(dir)).fingerprint).toBe(expected['llama-mixed']!.fingerprint);
    const st = readFileSync(join(dir, 'model.safetensors'));
    const last = st.length - 1;
    st[last] = st[last]! ^ 0x01; // lm_head's last F32 element
    writeFileSync(join(dir, 'model.safetensors'), st);
    const flipped = (await inspectModel(dir)).fingerprint;
    expect(flipped).not.toBe(expected['llama-mixed']!.fingerprint);
    if (havePython) expect(python(['-m', 'fedtune_worker', 'fingerprint', dir]).stdout.trim()).toBe(flipped);
  });

  it.skipIf(!havePython)('Python writes numbers as JavaScript does (String(x)) for 4000 doubles', () => {
    const xs: number[] = [0, -0, 1, -1, 0.1, 1e-7, 1e-6, 9.999999e-7, 1e21, 1e20, 999999999999999900000, 123456789012345680000, 5e-324, Number.MAX_VALUE, 2 ** 53 - 1, 1e-5, 500000, 0.000001234];
    const view = new DataView(new ArrayBuffer(8));
    let s = 12345;
    const next = (): number => (s = (Math.imul(s, 1103515245) + 12345) >>> 0);
    while (xs.length < 4000) {
      // Random bit patterns over the whole exponent range, and decimal-looking values near the format thresholds.
      view.setUint32(0, next());
      view.setUint32(4, next());
      const x = view.getFloat64(0);
      if (Number.isFinite(x)) xs.push(x);
      xs.push((next() % 100000) * 10 ** ((next() % 40) - 20));
    }
    const hex = xs.map((x) => {
      view.setFloat64(0, x);
      return [...new Uint8Array(view.buffer)].map((b) => b.toString(16).padStart(2, '0')).join('');
    });
    const prog = 'import sys, struct\nfrom fedtune_worker.fingerprint import es_number\nfor l in sys.stdin.read().split():\n    print(es_number(struct.unpack(">d", bytes.fromhex(l))[0]))\n';
    const r = python(['-c', prog], hex.join('\n'));
    expect(r.stderr).toBe('');
    const got = r.stdout.trim().split('\n');
    expect(got.length).toBe(xs.length);
    const bad = xs.map((x, i) => [String(x), got[i]]).filter(([a, b]) => a !== b);
    expect(bad.slice(0, 5)).toEqual([]);
  });

  it.skipIf(!havePython)('Python refuses a model it cannot fingerprint, naming the file and field', () => {
    const tmp = mkdtempSync(join(tmpdir(), 'fedtune-fp-bad-'));
    onTestFinished(() => rmSync(tmp, { recursive: true, force: true }));
    const dir = join(tmp, 'm');
    cpSync(join(fixtures, 'llama-mixed'), dir, { recursive: true });
    const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...cfg, model_type: 'bert' }));
    let r = python(['-m', 'fedtune_worker', 'fingerprint', dir]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/config\.json: unsupported model_type "bert"; supported: llama, mistral, qwen2, gpt2/);
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...cfg, intermediate_size: 8 }));
    r = python(['-m', 'fedtune_worker', 'fingerprint', dir]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/model\.safetensors: weight model\.layers\.0\.mlp\.gate_proj\.weight has shape \[6, 4\], expected \[8, 4\]/);
  });
});
