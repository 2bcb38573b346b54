/**
 * `npm run bench:coordinator-memory`: what it costs the coordinator to identify
 * a base model. A ~1B-parameter llama-shaped bf16 checkpoint (2 shards, random
 * values) is written to a temporary directory, streaming, and then, each in its
 * own process so that peak RSS belongs to it alone:
 *
 *   floor    read every safetensors file once through one streaming sha256
 *            (the least any fingerprint of the bytes on disk can cost);
 *   inspect  inspectModel (common/hf-model.ts): headers, checks, fingerprint
 *            streamed in 8 MiB chunks, weights never held;
 *   load     loadModel (worker/engine/model.ts): every weight as float32 in
 *            memory (skipped when less than 12 GB is free).
 *
 * It prints time and peak RSS (process.resourceUsage().maxRSS) with ratios to
 * the floor and between inspect and load, checks that both fingerprints agree,
 * and deletes the checkpoint.
 *
 *   node bin/run-ts.js bench/coordinator-memory.ts [--hidden 2048] [--layers 16]
 *     [--intermediate 5632] [--vocab 32000] [--heads 16] [--shards 2]
 */
import { spawn } from 'node:child_process';
import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, open, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { freemem, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash } from 'node:crypto';

process.env.FEDTUNE_LOG_LEVEL ??= 'warn';

const CHILD_MARK = 'bench-result ';
const LOAD_MIN_FREE_BYTES = 12e9;
const RSS_TARGET_MB = 300;

const arg = (name: string, def: string): string => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : def;
};

type Mode = 'floor' | 'inspect' | 'load';

interface ChildResult {
  mode: Mode;
  ms: number;
  maxRssBytes: number;
  fingerprint: string;
}

// ---------------------------------------------------------------------------
// Child: one measurement. Only the modules the measured path needs are loaded.

async function child(mode: Mode, dir: string): Promise<void> {
  let run: () => Promise<string>;
  if (mode === 'floor') {
    run = async () => {
      const files = (await readdir(dir)).filter((f) => f.endsWith('.safetensors')).sort();
      const h = createHash('sha256');
      for (const f of files) {
        for await (const chunk of createReadStream(join(dir, f), { highWaterMark: 8 * 1024 * 1024 })) h.update(chunk as Buffer);
      }
      return h.digest('hex');
    };
  } else if (mode === 'inspect') {
    const { inspectModel } = await import('../common/hf-model.ts');
    run = async () => (await inspectModel(dir)).fingerprint;
  } else {
    const { loadModel } = await import('../worker/engine/model.ts');
    run = async () => (await loadModel(dir)).fingerprint;
  }
  const t0 = performance.now();
  const fingerprint = await run();
  const ms = performance.now() - t0;
  const result: ChildResult = { mode, ms, maxRssBytes: process.resourceUsage().maxRSS * 1024, fingerprint };
  process.stdout.write(`${CHILD_MARK}${JSON.stringify(result)}\n`);
}

function measure(mode: Mode, dir: string): Promise<ChildResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [join(import.meta.dirname, '..', 'bin', 'run-ts.js'), import.meta.filename, '--child', mode, '--dir', dir], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.on('error', reject);
    p.on('close', (code) => {
      const line = out.split('\n').find((l) => l.startsWith(CHILD_MARK));
      if (code !== 0 || !line) reject(new Error(`${mode} child exited with ${code}${line ? '' : ' without a result'}`));
      else resolve(JSON.parse(line.slice(CHILD_MARK.length)) as ChildResult);
    });
  });
}

// ---------------------------------------------------------------------------
// Parent: write the checkpoint, run the children, print the table.

/** A llama-shaped bf16 checkpoint written tensor by tensor in 8 MiB pieces of pseudo-random values. */
async function writeCheckpoint(dir: string, shards: number): Promise<{ params: number; bytes: number }> {
  const { expectedWeightShapes, hfConfig, SHARD_INDEX } = await import('../common/hf-model.ts');
  const { byteLevelTokenizer } = await import('../worker/engine/init.ts');
  const { numel } = await import('../common/tensor.ts');
  const hidden = Number(arg('hidden', '2048'));
  const heads = Number(arg('heads', '16'));
  const config = {
    family: 'llama' as const,
    modelType: 'llama',
    vocabSize: Number(arg('vocab', '32000')),
    hiddenSize: hidden,
    intermediateSize: Number(arg('intermediate', '5632')),
    numLayers: Number(arg('layers', '16')),
    numHeads: heads,
    numKvHeads: heads,
    headDim: hidden / heads,
    maxPositions: 2048,
    normEps: 1e-5,
    ropeTheta: 10000,
    tieWordEmbeddings: false,
    qkvBias: false,
    activation: 'silu' as const,
    bosTokenId: 1,
    eosTokenId: 2,
  };
  await writeFile(join(dir, 'config.json'), JSON.stringify(hfConfig(config, 'bfloat16'), null, 2));
  await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(byteLevelTokenizer('llama').tokenizerJson));

  const names = [...expectedWeightShapes(config)];
  const total = names.reduce((s, [, shape]) => s + numel(shape) * 2, 0);
  const groups: Array<typeof names> = Array.from({ length: shards }, () => []);
  let acc = 0;
  for (const entry of names) {
    groups[Math.min(shards - 1, Math.floor((acc * shards) / total))]!.push(entry);
    acc += numel(entry[1]) * 2;
  }
  const weightMap: Record<string, string> = {};
  const chunk = new Uint32Array(2 * 1024 * 1024); // 8 MiB = 4M bf16 values
  let state = 0x9e3779b9;
  for (let s = 0; s < shards; s++) {
    const file = `model-${String(s + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`;
    const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
    let off = 0;
    for (const [name, shape] of groups[s]!) {
      const n = numel(shape) * 2;
      header[name] = { dtype: 'BF16', shape, data_offsets: [off, off + n] };
      off += n;
      weightMap[name] = file;
    }
    let json = JSON.stringify(header);
    json += ' '.repeat((8 - (json.length % 8)) % 8);
    const fh = await open(join(dir, file), 'w');
    try {
      const len = Buffer.alloc(8);
      len.writeBigUInt64LE(BigInt(json.length));
      await fh.write(len);
      await fh.write(json);
      let left = off;
      while (left > 0) {
        const n = Math.min(left, chunk.byteLength);
        // xorshift32; each word is two bf16 values with random sign and mantissa, magnitude in [2^-7, 2^-6).
        for (let i = 0; i < n / 4; i++) {
          state ^= state << 13;
          state ^= state >>> 17;
          state ^= state << 5;
          chunk[i] = ((state & 0x807f807f) | 0x3c003c00) >>> 0;
        }
        await fh.write(new Uint8Array(chunk.buffer, 0, n));
        left -= n;
      }
    } finally {
      await fh.close();
    }
  }
  await writeFile(join(dir, SHARD_INDEX), JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2));
  return { params: total / 2, bytes: total };
}

async function main(): Promise<void> {
  const shards = Number(arg('shards', '2'));
  const root = await mkdtemp(join(tmpdir(), 'fedtune-bench-coord-mem-'));
  const dir = join(root, 'model');
  const cleanup = () => rm(root, { recursive: true, force: true });
  process.once('SIGINT', () => void cleanup().then(() => process.exit(130)));
  try {
    await mkdir(dir);
    const t0 = performance.now();
    const { params, bytes } = await writeCheckpoint(dir, shards);
    let onDisk = 0;
    for (const f of await readdir(dir)) onDisk += (await stat(join(dir, f))).size;
    console.log(
      `fedtune bench: coordinator memory, llama-shaped bf16 checkpoint of ${(params / 1e9).toFixed(3)}B parameters ` +
        `(${(onDisk / 2 ** 30).toFixed(2)} GiB in ${shards} shards, written in ${((performance.now() - t0) / 1000).toFixed(1)} s), node ${process.version}`,
    );

    const results: ChildResult[] = [];
    for (const mode of ['floor', 'inspect'] as const) results.push(await measure(mode, dir));
    const free = freemem();
    if (free < LOAD_MIN_FREE_BYTES) {
      console.log(`load: skipped, ${(free / 1e9).toFixed(1)} GB free memory is below the ${LOAD_MIN_FREE_BYTES / 1e9} GB loadModel needs here`);
    } else {
      results.push(await measure('load', dir));
    }

    const floor = results[0]!;
    const mb = (b: number) => (b / 2 ** 20).toFixed(0);
    const rows = results.map((r) => ({
      path: r.mode === 'floor' ? 'floor: streaming sha256 of the files' : r.mode === 'inspect' ? 'inspectModel (common/hf-model.ts)' : 'loadModel (worker/engine/model.ts)',
      time: `${(r.ms / 1000).toFixed(2)} s`,
      rate: `${(bytes / 2 ** 30 / (r.ms / 1000)).toFixed(2)} GiB/s`,
      rss: `${mb(r.maxRssBytes)} MB`,
      rssRatio: `${(r.maxRssBytes / floor.maxRssBytes).toFixed(2)}x`,
      timeRatio: `${(r.ms / floor.ms).toFixed(2)}x`,
    }));
    const head = { path: 'path', time: 'time', rate: 'bf16 bytes/s', rss: 'peak RSS', rssRatio: 'RSS / floor', timeRatio: 'time / floor' };
    const cols = Object.keys(head) as Array<keyof typeof head>;
    const width = cols.map((c) => Math.max(head[c].length, ...rows.map((r) => r[c].length)));
    const line = (r: typeof head) => cols.map((c, i) => r[c].padEnd(width[i]!)).join('  ');
    console.log(line(head));
    console.log(width.map((w) => '-'.repeat(w)).join('  '));
    for (const r of rows) console.log(line(r));

    const inspect = results[1]!;
    const load = results[2];
    if (load) {
      console.log(
        `inspect vs load: ${(load.maxRssBytes / inspect.maxRssBytes).toFixed(1)}x less peak RSS, ${(load.ms / inspect.ms).toFixed(2)}x the speed; ` +
          `fingerprints ${inspect.fingerprint === load.fingerprint ? 'match' : `DIFFER (${inspect.fingerprint} vs ${load.fingerprint})`}`,
      );
    }
    const rssMb = inspect.maxRssBytes / 2 ** 20;
    console.log(`inspectModel peak RSS ${rssMb.toFixed(0)} MB: ${rssMb < RSS_TARGET_MB ? 'under' : 'OVER'} the ${RSS_TARGET_MB} MB target`);
    if (load && inspect.fingerprint !== load.fingerprint) process.exitCode = 1;
  } finally {
    await cleanup();
  }
}

const childMode = arg('child', '');
if (childMode) await child(childMode as Mode, arg('dir', ''));
else await main();
