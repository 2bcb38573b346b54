/**
 * The single-machine commands as a user runs them: `fedtune train` (LoRA and
 * --full, and --config: the centralised baseline of a federated run config),
 * `fedtune eval`, `fedtune generate`, and their errors.
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
    // stdout holds the text; stderr the token counts and tokens/s.
    expect(gen.out.trim().split('\n')[0]).toBe('blue');
    expect(gen.out).toMatch(/tokens\/s/);
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

  describe('--config: the centralised baseline of a federated run', () => {
    // A federated run config whose recipe differs from every default of `fedtune train`
    // (dropout 0.05, cosine, lr 2e-4, r 8, all modules) and of the config schema.
    const configText = (model: string, training = '  steps: 2\n'): string =>
      [
        'name: colours',
        'model:',
        `  path: ${model}`,
        'lora:',
        '  r: 2',
        '  alpha: 5',
        '  dropout: 0.2',
        '  target_modules: [q_proj, v_proj]',
        'training:',
        training.trimEnd(),
        '  batch_size: 4',
        '  lr: 0.003',
        '  schedule: constant',
        '  max_seq_len: 96',
        '  template: plain',
        '  seed: 3',
        'rounds: 3',
        'cohort:',
        '  fraction: 0.5',
        'strategy: fedavgm',
        'round:',
        '  deadline_sec: 30',
        'server:',
        '  join_token: not-printed-token',
        '',
      ].join('\n');

    it('takes model, LoRA and training settings from the config, and rounds x steps x sites steps', async () => {
      const dir = tempDir('cli-config');
      const model = await tinyModel(join(dir, 'model'));
      const data = colours(join(dir, 'colours.jsonl'));
      const cfg = join(dir, 'run.yaml');
      writeFileSync(cfg, configText(model));
      const out = join(dir, 'adapter');
      const r = await fedtune(['train', '--config', cfg, '--data', data, '--sites', '2', '--out', out, '--threads', '1']);
      expect(r.code, r.out).toBe(0);

      const ac = JSON.parse(readFileSync(join(out, 'adapter_config.json'), 'utf8'));
      expect([ac.r, ac.lora_alpha, ac.lora_dropout, ac.target_modules]).toEqual([2, 5, 0.2, ['q_proj', 'v_proj']]);
      const state = JSON.parse(readFileSync(join(out, 'trainer_state.json'), 'utf8'));
      // 3 rounds x 2 local steps x 2 sites.
      expect(state.step).toBe(12);
      expect(state.history).toHaveLength(12);
      // A constant schedule at the config's lr: every step's lr is 0.003 (cosine would decay it).
      expect(new Set(state.history.map((h: { lr: number }) => h.lr))).toEqual(new Set([0.003]));
      expect(state.settings).toMatchObject({ lr: 0.003, schedule: 'constant', batchSize: 4, maxSeqLen: 96, template: 'plain', seed: 3, lora: { r: 2, alpha: 5, dropout: 0.2 } });
      const opt = await loadOptimizerState(join(out, 'optimizer.safetensors'));
      expect(opt.step).toBe(12);

      expect(r.out).toMatch(/from .*run\.yaml \(federated run colours\): .*lora\.r=2, lora\.alpha=5, lora\.dropout=0\.2.*training\.lr=0\.003, training\.schedule=constant/);
      expect(r.out).toMatch(/length: 12 steps = rounds 3 × training\.steps 2 × sites 2/);
      expect(r.out).toMatch(/ignored by design for a centralised baseline: cohort\.fraction=0\.5, strategy=fedavgm; sections that only run a federation, not used: name, round, server/);
      expect(r.out).not.toMatch(/command line overrides/);
      expect(r.out).not.toMatch(/not-printed-token/);
    });

    it('lets command-line options win over the config and says which', async () => {
      const dir = tempDir('cli-config-override');
      const model = await tinyModel(join(dir, 'model'));
      const data = colours(join(dir, 'colours.jsonl'));
      const cfg = join(dir, 'run.yaml');
      writeFileSync(cfg, configText(model));
      const out = join(dir, 'adapter');
      const r = await fedtune(['train', '--config', cfg, '--data', data, '--out', out, '--lr', '0.01', '--lora-r', '4', '--steps', '3', '--threads', '1']);
      expect(r.code, r.out).toBe(0);
      const ac = JSON.parse(readFileSync(join(out, 'adapter_config.json'), 'utf8'));
      expect([ac.r, ac.lora_alpha, ac.lora_dropout]).toEqual([4, 5, 0.2]); // r from the command line, the rest from the config
      const adapter = await readPeftAdapter(out);
      expect(adapter.adapter.get('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')?.shape).toEqual([4, 32]);
      const state = JSON.parse(readFileSync(join(out, 'trainer_state.json'), 'utf8'));
      expect(state.step).toBe(3);
      expect(new Set(state.history.map((h: { lr: number }) => h.lr))).toEqual(new Set([0.01]));
      expect(state.settings.config.overridden).toHaveLength(3);
      expect(r.out).toMatch(/command line overrides the config: --lora-r 4 \(config: lora\.r 2\); --lr 0\.01 \(config: training\.lr 0\.003\); --steps 3 \(config: 6 steps = rounds 3 × training\.steps 2 × sites 1\)/);
      // Taken from the config: neither lr nor r (they were overridden), but the schedule.
      const from = r.out.split('\n').find((l) => l.startsWith('from '))!;
      expect(from).toMatch(/training\.schedule=constant/);
      expect(from).not.toMatch(/training\.lr=|lora\.r=/);
    });

    it('refuses a bad config with the config error naming the field and line, and options that need --config', async () => {
      const dir = tempDir('cli-config-bad');
      const model = await tinyModel(join(dir, 'model'));
      const data = colours(join(dir, 'colours.jsonl'));
      const cfg = join(dir, 'run.yaml');
      const text = configText(model, '  grad_accumulation: 1\n'); // neither steps nor epochs
      writeFileSync(cfg, text);
      const line = text.split('\n').indexOf('training:') + 2; // the training mapping starts on the line after its key
      const r = await fedtune(['train', '--config', cfg, '--data', data, '--out', join(dir, 'o')]);
      expect(r.code).toBe(1);
      expect(r.out).toContain(`run config ${cfg} is invalid:`);
      expect(r.out).toContain(`training.steps (line ${line}): set exactly one of steps or epochs (got neither)`);

      writeFileSync(cfg, configText(model).replace('  r: 2', '  r: 0'));
      const rank = await fedtune(['train', '--config', cfg, '--data', data, '--out', join(dir, 'o')]);
      expect(rank.code).toBe(1);
      expect(rank.out).toContain('lora.r (line 5): must be >=1 (got 0)');

      const sites = await fedtune(['train', '--model', model, '--data', data, '--out', join(dir, 'o'), '--sites', '2']);
      expect(sites.code).toBe(1);
      expect(sites.out).toMatch(/--sites only applies with --config/);
      const noModel = await fedtune(['train', '--data', data, '--out', join(dir, 'o')]);
      expect(noModel.code).toBe(1);
      expect(noModel.out).toMatch(/--model <dir> is required \(or take it from a run config: --config run\.yaml\)/);
    });
  });

  it('eval and train report the records dropped because they do not fit --max-seq-len', async () => {
    const dir = tempDir('cli-dropped');
    const model = await tinyModel(join(dir, 'model'));
    const data = colours(join(dir, 'colours.jsonl'));
    // Record 33: an 80-character instruction. The tokenizer is byte-level, so its prompt alone
    // ("### Instruction:\n" + 80 + "\n### Response:\n") is 112 tokens, over 96, and no response
    // token is left; the 32 short records fit. At 128 (the model's maximum) it fits too.
    writeFileSync(data, readFileSync(data, 'utf8') + JSON.stringify({ instruction: 'x'.repeat(80), output: 'red' }) + '\n');
    const ev = await fedtune(['eval', '--model', model, '--data', data, '--template', 'plain', '--max-seq-len', '96']);
    expect(ev.code, ev.out).toBe(0);
    const metrics = JSON.parse(ev.out.slice(ev.out.indexOf('{'), ev.out.lastIndexOf('}') + 1));
    expect(metrics.examples).toBe(32);
    expect(metrics.dropped).toBe(1);
    expect(ev.out).toContain(`warning: 1 record dropped: the response does not fit in --max-seq-len 96 tokens (${data}:33)`);
    // Long enough for every record: nothing dropped, and the count says so.
    const all = await fedtune(['eval', '--model', model, '--data', data, '--template', 'plain', '--max-seq-len', '128', '--batch-size', '33']);
    expect(all.code, all.out).toBe(0);
    const allMetrics = JSON.parse(all.out.slice(all.out.indexOf('{'), all.out.lastIndexOf('}') + 1));
    expect([allMetrics.examples, allMetrics.dropped]).toEqual([33, 0]);
    expect(all.out).not.toMatch(/dropped:/);

    const tr = await fedtune(['train', '--model', model, '--data', data, '--out', join(dir, 'o'), '--template', 'plain', '--max-seq-len', '96', '--steps', '1', '--eval-fraction', '0', '--threads', '1']);
    expect(tr.code, tr.out).toBe(0);
    expect(tr.out).toContain(`warning: 1 record dropped: the response does not fit in --max-seq-len 96 tokens (${data}:33)`);
    expect(tr.out).toMatch(/32 train \/ 0 eval examples \(1 dropped: too long\)/);
  });
});
