/**
 * Hugging Face model directories in memory: load (config.json + safetensors +
 * tokenizer.json) into a normalized ModelConfig and float32 weights under
 * canonical names, checked and fingerprinted, and save a model directory back.
 * What a model directory must contain, and the fingerprint, are defined in
 * common/hf-model.ts (shared with the coordinator, which only inspects).
 */
import { copyFile, open, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { numel, type Tensor, type TensorMap } from '../../common/tensor.ts';
import { readSafetensorsHeader, readTensorEntry, serializeSafetensors, toFloat32, type StWriteEntry } from '../../common/safetensors.ts';
import { writeDirAtomic } from '../../common/atomic.ts';
import {
  checkWeightShapes,
  collectFileWeights,
  completeWeights,
  computeFingerprint,
  exists,
  hfConfig,
  readModelDir,
  SHARD_INDEX,
  type CheckpointWeight,
  type ModelDtype,
} from '../../common/hf-model.ts';
import type { LoadedModel, ModelConfig } from '../../common/model-config.ts';

const ST_DTYPE: Record<ModelDtype, 'F32' | 'F16' | 'BF16'> = { float32: 'F32', float16: 'F16', bfloat16: 'BF16' };

/** Check that `weights` holds exactly the expected weights with the expected shapes, each with as many values as its shape. */
export function checkWeights(config: ModelConfig, weights: TensorMap, source: string): void {
  const shapes = new Map<string, number[]>();
  for (const [name, t] of weights) {
    if (t.data.length !== numel(t.shape)) throw new Error(`${source}: weight ${name} has ${t.data.length} values, shape needs ${numel(t.shape)}`);
    shapes.set(name, t.shape);
  }
  checkWeightShapes(config, shapes, source);
}

// ---------------------------------------------------------------------------
// Loading

/** Load a Hugging Face model directory (see common/hf-model.ts for what is supported). */
export async function loadModel(dir: string): Promise<LoadedModel> {
  const model = await readModelDir(dir);
  const found = new Map<string, CheckpointWeight>();
  const weights: TensorMap = new Map();
  // One tensor at a time: read, convert to float32, let the file's bytes go. Peak memory is the float32
  // weights plus one tensor as stored (an F32 tensor is used in place, not copied).
  for (const file of model.checkpoint.files) {
    const path = join(dir, file);
    const fh = await open(path, 'r').catch((err: NodeJS.ErrnoException) => {
      throw err.code === 'ENOENT' ? new Error(`${path}: file not found`) : err;
    });
    try {
      const header = await readSafetensorsHeader(fh, path);
      const entries = new Map(header.entries.map((e) => [e.name, e]));
      for (const w of collectFileWeights(model, file, entries, found)) {
        weights.set(w.canonical, { shape: w.shape, data: toFloat32(await readTensorEntry(fh, header, entries.get(w.name)!, path)) });
      }
    } finally {
      await fh.close();
    }
  }
  // Stable order: checkpoint order of expectedWeightShapes.
  const ordered: TensorMap = new Map();
  for (const name of completeWeights(model, found).keys()) ordered.set(name, weights.get(name)!);
  return { dir, config: model.config, weights: ordered, fingerprint: computeFingerprint(model.config, ordered), rawConfig: model.rawConfig };
}

// ---------------------------------------------------------------------------
// Saving

export interface SaveModelOptions {
  /** Storage dtype of the weights (default float32). */
  dtype?: ModelDtype;
  /** Split the weights across this many files with a model.safetensors.index.json (default 1: model.safetensors). */
  shards?: number;
  /** Replace a non-empty output directory (default false: refuse). */
  overwrite?: boolean;
}

function shardName(i: number, n: number): string {
  return `model-${String(i + 1).padStart(5, '0')}-of-${String(n).padStart(5, '0')}.safetensors`;
}

/** Write config.json and the weights (one file or shards with an index) into an existing directory. */
export async function writeModelFiles(
  dir: string,
  rawConfig: Record<string, unknown>,
  weights: TensorMap,
  opts: { dtype?: ModelDtype; shards?: number } = {},
): Promise<string[]> {
  const dtype = opts.dtype ?? 'float32';
  if (!(dtype in ST_DTYPE)) throw new Error(`dtype must be one of ${Object.keys(ST_DTYPE).join(', ')}, got ${JSON.stringify(dtype)}`);
  const shards = opts.shards ?? 1;
  const names = [...weights.keys()];
  if (!Number.isInteger(shards) || shards < 1 || shards > Math.max(1, names.length)) {
    throw new Error(`shards must be an integer from 1 to the number of weights (${names.length}), got ${shards}`);
  }
  const entry = (t: Tensor): StWriteEntry => ({ dtype: ST_DTYPE[dtype], shape: t.shape, data: t.data });
  const meta = { format: 'pt' };
  const written: string[] = ['config.json'];
  await writeFile(join(dir, 'config.json'), `${JSON.stringify({ ...rawConfig, torch_dtype: dtype }, null, 2)}\n`);
  if (shards === 1) {
    const m = new Map<string, StWriteEntry>();
    for (const [k, t] of weights) m.set(k, entry(t));
    await writeFile(join(dir, 'model.safetensors'), serializeSafetensors(m, meta));
    written.push('model.safetensors');
    return written;
  }
  // Contiguous groups of roughly equal byte size.
  const total = names.reduce((s, k) => s + numel(weights.get(k)!.shape), 0);
  const groups: string[][] = Array.from({ length: shards }, () => []);
  let acc = 0;
  let g = 0;
  for (let i = 0; i < names.length; i++) {
    const namesLeft = names.length - i;
    const groupsAfter = shards - 1 - g;
    if (groupsAfter > 0 && groups[g]!.length > 0 && (namesLeft <= groupsAfter || acc >= (total * (g + 1)) / shards)) g++;
    groups[g]!.push(names[i]!);
    acc += numel(weights.get(names[i]!)!.shape);
  }
  const weightMap: Record<string, string> = {};
  let totalBytes = 0;
  for (let s = 0; s < shards; s++) {
    const file = shardName(s, shards);
    const m = new Map<string, StWriteEntry>();
    for (const k of groups[s]!) {
      m.set(k, entry(weights.get(k)!));
      weightMap[k] = file;
    }
    const bytes = serializeSafetensors(m, meta);
    for (const e of m.values()) totalBytes += numel(e.shape) * (dtype === 'float32' ? 4 : 2);
    await writeFile(join(dir, file), bytes);
    written.push(file);
  }
  const sortedMap: Record<string, string> = {};
  for (const k of Object.keys(weightMap).sort()) sortedMap[k] = weightMap[k]!;
  const index = { metadata: { total_size: totalBytes }, weight_map: sortedMap };
  await writeFile(join(dir, SHARD_INDEX), `${JSON.stringify(index, null, 2)}\n`);
  written.push(SHARD_INDEX);
  return written;
}

/** Tokenizer side files copied along with tokenizer.json when they sit next to it. */
const TOKENIZER_SIDE_FILES = ['tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json'];

/**
 * Write a full Hugging Face model directory (config.json, model.safetensors,
 * tokenizer.json and its side files copied) atomically: everything goes into a
 * temporary directory that is renamed to `dir` at the end.
 */
export async function saveModel(
  dir: string,
  model: { config: ModelConfig; rawConfig?: Record<string, unknown>; weights: TensorMap },
  tokenizerJsonPath?: string,
  opts: SaveModelOptions = {},
): Promise<void> {
  checkWeights(model.config, model.weights, `saveModel(${dir})`);
  for (const [name, t] of model.weights) {
    for (let i = 0; i < t.data.length; i++) {
      if (!Number.isFinite(t.data[i]!)) throw new Error(`saveModel(${dir}): weight ${name} has a non-finite value ${t.data[i]} at index ${i}`);
    }
  }
  const rawConfig = model.rawConfig ?? hfConfig(model.config, opts.dtype);
  if (tokenizerJsonPath !== undefined && !(await exists(tokenizerJsonPath))) {
    throw new Error(`saveModel: tokenizer file ${tokenizerJsonPath} not found`);
  }
  await writeDirAtomic(
    dir,
    async (tmp) => {
      await writeModelFiles(tmp, rawConfig, model.weights, { dtype: opts.dtype, shards: opts.shards });
      if (tokenizerJsonPath !== undefined) {
        await copyFile(tokenizerJsonPath, join(tmp, 'tokenizer.json'));
        for (const f of TOKENIZER_SIDE_FILES) {
          const src = join(dirname(tokenizerJsonPath), f);
          if (await exists(src)) await copyFile(src, join(tmp, f));
        }
      }
    },
    { overwrite: opts.overwrite },
  );
}
