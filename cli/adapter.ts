/**
 * `fedtune adapter inspect|merge`: describe a PEFT LoRA adapter, or fold one
 * into its base model and write a full model directory.
 */
import { Command, Option } from 'commander';
import { join, resolve } from 'node:path';
import { numel, type FloatArray } from '../common/tensor.ts';
import { loraScale, parseMagnitudeKey, parsePeftKey, readPeftAdapter } from '../common/peft.ts';
import { loadModel, saveModel } from '../worker/engine/model.ts';
import type { ModelDtype } from '../common/hf-model.ts';
import { mergeAdapter } from '../worker/engine/merge.ts';
import { checkOutDir } from './model.ts';

function norm(d: FloatArray): number {
  let s = 0;
  for (let i = 0; i < d.length; i++) s += d[i]! * d[i]!;
  return Math.sqrt(s);
}

export function register(program: Command): void {
  const adapter = program.command('adapter').description('inspect PEFT LoRA adapters and merge them into base models');

  adapter
    .command('inspect')
    .description('show the LoRA config, keys, shapes, parameter count and per-module norms of A and B (and of the DoRA magnitude)')
    .argument('<dir>', 'PEFT adapter directory (adapter_config.json + adapter_model.safetensors)')
    .option('--json', 'print JSON')
    .action(async (dir: string, o: { json?: boolean }) => {
      const a = await readPeftAdapter(resolve(dir));
      type Entry = { shape: number[]; norm: number };
      const modules = new Map<string, { A?: Entry; B?: Entry; magnitude?: Entry }>();
      let params = 0;
      for (const [key, t] of a.adapter) {
        const mag = parseMagnitudeKey(key);
        const p = mag ? null : parsePeftKey(key)!;
        const module = mag ? mag.module : p!.module;
        const e = modules.get(module) ?? {};
        e[mag ? 'magnitude' : p!.which] = { shape: t.shape, norm: norm(t.data) };
        modules.set(module, e);
        params += numel(t.shape);
      }
      if (o.json) {
        console.log(JSON.stringify({ dir: resolve(dir), config: a.config, parameters: params, modules: Object.fromEntries(modules) }, null, 2));
        return;
      }
      const c = a.config;
      console.log(resolve(dir));
      console.log(`  base model       ${c.baseModel || '(not set)'}`);
      console.log(`  r ${c.r}, alpha ${c.alpha} (scale ${(c.alpha / c.r).toPrecision(4)}), dropout ${c.dropout}, fan_in_fan_out ${c.fanInFanOut}`);
      console.log(`  target modules   ${c.targetModules.join(', ')}`);
      if (c.useDora) console.log('  DoRA             use_dora: magnitude vector per module (|m| below)');
      if (c.rankPattern) console.log(`  rank_pattern     ${Object.entries(c.rankPattern).map(([k, v]) => `${k}=${v}`).join(', ')}`);
      if (c.alphaPattern) console.log(`  alpha_pattern    ${Object.entries(c.alphaPattern).map(([k, v]) => `${k}=${v}`).join(', ')}`);
      if (c.layersToTransform) console.log(`  layers           ${c.layersToTransform.join(', ')}${c.layersPattern ? ` of ${c.layersPattern.join(' / ')}` : ''}`);
      console.log(`  ${modules.size} modules, ${a.adapter.size} tensors, ${params} parameters`);
      const width = Math.max(...[...modules.keys()].map((k) => k.length));
      console.log(`  ${'module'.padEnd(width)}  ${'A shape'.padEnd(12)} ${'|A|'.padStart(10)}  ${'B shape'.padEnd(12)} ${'|B|'.padStart(10)}${c.useDora ? `  ${'|m|'.padStart(10)}` : ''}`);
      for (const [m, e] of modules) {
        const shape = (s?: number[]) => (s ? `[${s.join(', ')}]` : '-').padEnd(12);
        const n = (x?: number) => (x === undefined ? '-' : x.toExponential(3)).padStart(10);
        console.log(`  ${m.padEnd(width)}  ${shape(e.A?.shape)} ${n(e.A?.norm)}  ${shape(e.B?.shape)} ${n(e.B?.norm)}${c.useDora ? `  ${n(e.magnitude?.norm)}` : ''}`);
      }
    });

  adapter
    .command('merge')
    .description('merge a LoRA adapter into its base model (W + alpha/r * B A; DoRA: m * (W + alpha/r * B A) / row norm) and write a full model directory')
    .requiredOption('--model <dir>', 'base model directory')
    .requiredOption('--adapter <dir>', 'PEFT adapter directory')
    .requiredOption('--out <dir>', 'output model directory (must not exist or be empty, unless --force)')
    .addOption(new Option('--dtype <dtype>', 'storage dtype of the merged weights').choices(['float32', 'float16', 'bfloat16']).default('float32'))
    .option('--force', 'replace a non-empty output directory')
    .action(async (o: { model: string; adapter: string; out: string; dtype: ModelDtype; force?: boolean }) => {
      const modelDir = resolve(o.model);
      const out = resolve(o.out);
      if (out === modelDir) throw new Error('--out must differ from --model');
      await checkOutDir(out, o.force);
      process.stderr.write(`reading adapter ${resolve(o.adapter)}\n`);
      const a = await readPeftAdapter(resolve(o.adapter));
      process.stderr.write(`loading model ${modelDir}\n`);
      const m = await loadModel(modelDir);
      if (m.config.family !== 'gpt2' && a.config.fanInFanOut) {
        throw new Error(`${o.adapter}: fan_in_fan_out is true but ${m.config.modelType} uses nn.Linear weights ([out, in]); this adapter is not for this model`);
      }
      const lora = {
        r: a.config.r,
        alpha: a.config.alpha,
        dropout: a.config.dropout,
        targetModules: a.config.targetModules,
        ...(a.config.useRslora ? { useRslora: true } : {}),
        // Per-module ranks, alphas and layers as the adapter was trained (PEFT rank_pattern, alpha_pattern, layers_to_transform, layers_pattern).
        ...(a.config.rankPattern ? { rankPattern: a.config.rankPattern } : {}),
        ...(a.config.alphaPattern ? { alphaPattern: a.config.alphaPattern } : {}),
        ...(a.config.layersToTransform ? { layersToTransform: a.config.layersToTransform } : {}),
        ...(a.config.layersPattern ? { layersPattern: a.config.layersPattern } : {}),
      };
      const perModule = lora.rankPattern || lora.alphaPattern ? ', per module with rank_pattern / alpha_pattern' : '';
      process.stderr.write(`merging ${a.adapter.size / 2} modules (scale ${loraScale(lora)}${perModule}${lora.useRslora ? ', rsLoRA' : ''})\n`);
      const weights = mergeAdapter(m, a.adapter, lora);
      process.stderr.write(`writing ${out}\n`);
      const rawConfig = m.rawConfig ? { ...m.rawConfig } : undefined;
      await saveModel(out, { config: m.config, rawConfig, weights }, join(modelDir, 'tokenizer.json'), { dtype: o.dtype, overwrite: o.force ?? false });
      const merged = await loadModel(out);
      console.log(`merged ${resolve(o.adapter)} into ${modelDir}`);
      console.log(`  wrote ${out} (${o.dtype})`);
      console.log(`  fingerprint ${merged.fingerprint}`);
    });
}
