/**
 * The single-machine commands as a user runs them: `fedtune train` (LoRA and
 * --full), `fedtune eval`, `fedtune generate`, and their errors.
 */
import { execFile } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { readPeftAdapter } from '../../common/peft.ts';
import { loadOptimizerState } from '../../common/optim.ts';
import { ROOT, tempDir, tinyModel } from './federated-helpers.ts';

const run = promisify(execFile);
const BIN = join(ROOT, 'bin', 'fedtune.js');

async function fedtune(args: string[]): Promise<{ code: number; out: string }> {
  try {
    const r = await run(process.execPath, [BIN, ...args], { cwd: ROOT, env: { ...process.env, VITEST: '', FEDTUNE_LOG_LEVEL: 'warn' } });
    return { code: 0, out: r.stdout + r.stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, out: e.stdout + e.stderr };
  }
}

function colours(path: string): string {
  const c = ['red', 'green', 'blue', 'gold'];
  writeFileSync(path, Array.from({ length: 32 }, (_, i) => JSON.stringify({ instruction: `Item ${i} is ${c[i % 4]}. Its colour?`, output: c[i % 4] })).join('\n') + '\n');
  return path;
}

describe('fedtune train / eval / generate', () => {
  it('trains a base in full mode and an adapter on it, evaluates and generates with them', async () => {
    const dir = tempDir('cli-train');
    const model = join(dir, 'model');
    const init = await fedtune(['model', 'init', '--arch', 'llama', '--out', model, '--hidden', '64', '--layers', '2', '--heads', '4', '--kv-heads', '2']);
    expect(init.code, init.out).toBe(0);
    const data = colours(join(dir, 'colours.jsonl'));
    const heldOut = join(dir, 'held-out.jsonl');
    writeFileSync(heldOut, readFileSync(data, 'utf8').split('\n').slice(0, 8).join('\n') + '\n');

    const full = await fedtune(['train', '--full', '--model', model, '--data', data, '--out', join(dir, 'base'), '--template', 'plain', '--steps', '150', '--lr', '0.01', '--batch-size', '8', '--eval-data', heldOut, '--threads', '1']);
    expect(full.code, full.out).toBe(0);
    expect(full.out).toMatch(/full fine-tuning; 32 train \/ 8 eval examples; 150 steps/);
    const state = JSON.parse(readFileSync(join(dir, 'base', 'trainer_state.json'), 'utf8'));
    expect(state.step).toBe(150);
    expect(state.history).toHaveLength(150);
    expect(state.history.at(-1).loss).toBeLessThan(0.5 * state.history[0].loss);

    const lora = await fedtune(['train', '--model', join(dir, 'base'), '--data', data, '--out', join(dir, 'adapter'), '--template', 'plain', '--steps', '5', '--lr', '0.01', '--lora-r', '4', '--target-modules', 'q_proj,v_proj', '--threads', '1']);
    expect(lora.code, lora.out).toBe(0);
    const adapter = await readPeftAdapter(join(dir, 'adapter'));
    expect(adapter.config.r).toBe(4);
    expect(adapter.config.targetModules).toEqual(['q_proj', 'v_proj']);
    expect(adapter.adapter.size).toBe(8); // two layers, q and v, A and B
    const opt = await loadOptimizerState(join(dir, 'adapter', 'optimizer.safetensors'));
    expect(opt.step).toBe(5);

    // --resume on a finished run does nothing and says so.
    const again = await fedtune(['train', '--model', join(dir, 'base'), '--data', data, '--out', join(dir, 'adapter'), '--template', 'plain', '--steps', '5', '--lora-r', '4', '--target-modules', 'q_proj,v_proj', '--resume']);
    expect(again.code, again.out).toBe(0);
    expect(again.out).toMatch(/resuming at step 5 of 5/);
    expect(again.out).toMatch(/nothing to do/);

    const ev = await fedtune(['eval', '--model', join(dir, 'base'), '--adapter', join(dir, 'adapter'), '--data', data, '--template', 'plain']);
    expect(ev.code, ev.out).toBe(0);
    const metrics = JSON.parse(ev.out.slice(ev.out.indexOf('{')));
    expect(metrics.examples).toBe(32);
    expect(metrics.loss).toBeGreaterThan(0);
    expect(metrics.perplexity).toBeCloseTo(Math.exp(metrics.loss), 6);

    const gen = await fedtune(['generate', '--model', join(dir, 'base'), '--prompt', '### Instruction:\nItem 2 is blue. Its colour?\n### Response:\n', '--max-new-tokens', '6']);
    expect(gen.code, gen.out).toBe(0);
    expect(gen.out.trim()).toBe('blue');
  });

  it('refuses bad input naming it', async () => {
    const dir = tempDir('cli-bad');
    const model = await tinyModel(join(dir, 'model'));
    const data = colours(join(dir, 'd.jsonl'));
    const tmpl = await fedtune(['train', '--model', model, '--data', data, '--out', join(dir, 'o'), '--template', 'vicuna']);
    expect(tmpl.code).toBe(1);
    expect(tmpl.out).toMatch(/prompt template "vicuna" is not known; use one of alpaca, chatml, plain/);
    const mod = await fedtune(['train', '--model', model, '--data', data, '--out', join(dir, 'o'), '--target-modules', 'q_proj,c_fc']);
    expect(mod.code).toBe(1);
    expect(mod.out).toMatch(/c_fc/);
    writeFileSync(join(dir, 'bad.jsonl'), '{"instruction": "a", "output": "b"}\n{"instruction": "c"\n');
    const rows = await fedtune(['train', '--model', model, '--data', join(dir, 'bad.jsonl'), '--out', join(dir, 'o')]);
    expect(rows.code).toBe(1);
    expect(rows.out).toMatch(/bad\.jsonl:2: line is not valid JSON/);
    const steps = await fedtune(['train', '--model', model, '--data', data, '--out', join(dir, 'o'), '--steps', 'many']);
    expect(steps.code).not.toBe(0);
    expect(steps.out).toMatch(/--steps must be an integer >= 1 \(got "many"\)/);
  });
});
