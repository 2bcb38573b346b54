/**
 * DoRA's initial magnitudes on the coordinator: m = ||W||_c, the L2 norm of
 * each output feature of every DoRA target's base weight, read from the
 * model's safetensors one weight at a time (only the targeted weights, each
 * converted to float32 as loadModel converts it, then dropped), so the
 * coordinator never holds the model's weights. The values are bit-for-bit
 * the ones a worker computes from its loaded model (weightRowNorms over the
 * same float32 values).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { canonicalWeightName, readModelDir } from './hf-model.ts';
import { readSafetensorsHeader, toFloat32 } from './safetensors.ts';
import { weightRowNorms, type LoraTarget } from './lora.ts';

/** Module -> ||W||_c of its base weight, for every DoRA target (empty when none is). */
export async function readDoraMagnitudes(modelDir: string, targets: readonly LoraTarget[]): Promise<Map<string, Float64Array>> {
  const out = new Map<string, Float64Array>();
  const wanted = new Map(targets.filter((t) => t.dora).map((t) => [t.weight, t] as const));
  if (wanted.size === 0) return out;
  const model = await readModelDir(modelDir);
  for (const file of model.checkpoint.files) {
    const path = join(modelDir, file);
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new Error(`safetensors ${path}: file not found`);
      throw err;
    }
    try {
      const header = await readSafetensorsHeader(fh, path);
      for (const e of header.entries) {
        const canon = canonicalWeightName(model.config, e.name);
        const t = canon === null ? undefined : wanted.get(canon);
        if (!t || out.has(t.module)) continue;
        const expected = t.conv1d ? [t.inFeatures, t.outFeatures] : [t.outFeatures, t.inFeatures];
        if (e.shape.length !== 2 || e.shape[0] !== expected[0] || e.shape[1] !== expected[1]) {
          throw new Error(`${path}: weight ${e.name} has shape [${e.shape.join(', ')}], expected [${expected.join(', ')}]`);
        }
        if (e.dtype !== 'F32' && e.dtype !== 'F16' && e.dtype !== 'BF16' && e.dtype !== 'F64') {
          throw new Error(`${path}: weight ${e.name} has dtype ${e.dtype}; model weights must be F32, F16, BF16 or F64`);
        }
        const bytes = new Uint8Array(e.end - e.begin);
        let off = 0;
        while (off < bytes.length) {
          const { bytesRead } = await fh.read(bytes, off, bytes.length - off, header.dataStart + e.begin + off);
          if (bytesRead === 0) throw new Error(`safetensors ${path}: unexpected end of file reading tensor "${e.name}"`);
          off += bytesRead;
        }
        out.set(t.module, weightRowNorms(t, toFloat32({ dtype: e.dtype, shape: e.shape, bytes })));
      }
    } finally {
      await fh.close();
    }
  }
  const missing = [...wanted.values()].filter((t) => !out.has(t.module));
  if (missing.length) {
    throw new Error(`model ${modelDir}: no weight ${missing[0]!.weight} in its safetensors files (needed for the DoRA magnitude of ${missing[0]!.module})`);
  }
  return out;
}
