/**
 * The spine end to end: a coordinator and three `fedtune worker` processes with
 * the built-in ONNX trainer, over real gRPC on loopback, run three federated
 * rounds; the global adapter's eval loss on the workers' held-out data goes down.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { readPeftAdapter } from '../../common/peft.ts';
import { initModel } from '../../worker/engine/init.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { runConfig, tempDir, tinyModel, worker, writeData, type Proc } from './federated-helpers.ts';

const procs: Proc[] = [];
/** LoRA and local training of the runs below: enough steps that a round visibly lowers the eval loss. */
const RECIPE = {
  lora: { r: 4, alpha: 8, target_modules: ['q_proj', 'v_proj', 'o_proj'] },
  training: { steps: 6, batch_size: 4, lr: 0.02, max_seq_len: 128, template: 'plain' },
};
let coord: CoordinatorHandle | null = null;

afterAll(async () => {
  for (const p of procs) p.kill();
  await coord?.close();
});

describe('federated rounds with the onnx trainer', () => {
  it('3 rounds over gRPC with 3 worker processes: global eval loss goes down', async () => {
    const dir = tempDir('onnx');
    const model = await tinyModel(join(dir, 'model'));
    const cfg = runConfig(dir, model, {
      name: 'onnx-3',
      rounds: 3,
      ...RECIPE,
      cohort: { min_workers: 3 },
      round: { min_results: 3, deadline_sec: 120 },
      eval: { every: 1, initial: true },
    });
    coord = await startCoordinator(cfg);
    for (const site of ['alpha', 'beta', 'gamma']) {
      procs.push(worker({ address: coord.address, site, data: writeData(join(dir, `${site}.jsonl`), 24, site), model, trainer: 'onnx', extra: ['--threads', '1'] }));
    }
    const result = await coord.run;
    expect(result.error ?? '').toBe('');
    expect(result.state).toBe('completed');
    expect(result.rounds).toBe(3);
    const state = JSON.parse(readFileSync(join(coord.runDir, 'round-0003', 'state.json'), 'utf8'));
    const baseline = state.baseline.evalLoss as number;
    const losses = (state.history as Array<{ evalLoss: number; participants: number }>).map((h) => h.evalLoss);
    expect(state.history.map((h: { participants: number }) => h.participants)).toEqual([3, 3, 3]);
    expect(Number.isFinite(baseline)).toBe(true);
    expect(losses[2]!).toBeLessThan(baseline);
    expect(losses[2]!).toBeLessThan(losses[0]!);
    // The final adapter is a PEFT adapter whose B matrices moved away from their zero init.
    const final = await readPeftAdapter(result.finalAdapterPath!);
    const b = [...final.adapter].filter(([k]) => k.includes('lora_B'));
    expect(b.length).toBeGreaterThan(0);
    expect(b.some(([, t]) => t.data.some((x) => x !== 0))).toBe(true);
    expect(await Promise.all(procs.map((p) => p.exited))).toEqual([0, 0, 0]);
  });
});

describe('workers with --compute-dtype float16 and bfloat16', () => {
  it('train beside a float32 worker over gRPC on one bfloat16 checkpoint: every update counts and the global eval loss goes down', async () => {
    const dir = tempDir('onnx-half');
    const model = await tinyModel(join(dir, 'model'), 0, 'bfloat16');
    coord = await startCoordinator(runConfig(dir, model, {
      name: 'onnx-half',
      rounds: 2,
      ...RECIPE,
      cohort: { min_workers: 3 },
      round: { min_results: 3, deadline_sec: 120 },
      eval: { every: 1, initial: true },
    }));
    const half = worker({ address: coord.address, site: 'half', data: writeData(join(dir, 'half.jsonl'), 24, 'half'), model, trainer: 'onnx', extra: ['--threads', '1', '--compute-dtype', 'float16'] });
    const bf = worker({ address: coord.address, site: 'bf16', data: writeData(join(dir, 'bf16.jsonl'), 24, 'bf16'), model, trainer: 'onnx', extra: ['--threads', '1', '--compute-dtype', 'bfloat16'] });
    const full = worker({ address: coord.address, site: 'full', data: writeData(join(dir, 'full.jsonl'), 24, 'full'), model, trainer: 'onnx', extra: ['--threads', '1'] });
    procs.push(half, bf, full);
    const result = await coord.run;
    expect(result.error ?? '').toBe('');
    expect(result.state).toBe('completed');
    const state = JSON.parse(readFileSync(join(coord.runDir, 'round-0002', 'state.json'), 'utf8'));
    expect(state.history.map((h: { participants: number }) => h.participants)).toEqual([3, 3]);
    expect(state.history[1].evalLoss).toBeLessThan(state.baseline.evalLoss);
    expect(half.out()).toMatch(/"computeDtype":"float16".*trainer ready|trainer ready.*"computeDtype":"float16"/);
    expect(bf.out()).toMatch(/"computeDtype":"bfloat16".*trainer ready|trainer ready.*"computeDtype":"bfloat16"/);
    expect(full.out()).not.toMatch(/computeDtype/);
    expect(await Promise.all([half.exited, bf.exited, full.exited])).toEqual([0, 0, 0]);
  });
});

describe('training.schedule_scope in a federated run', () => {
  it("'run': warmup spans the rounds (round 1 at lr 0, round 2 at half the rate); 'round': every round warms up from lr 0", async () => {
    const dir = tempDir('onnx-schedule');
    const model = await tinyModel(join(dir, 'model'));
    const lr = 0.01;
    const data = writeData(join(dir, 'site.jsonl'), 8, 'site');
    const maxB = async (round: number): Promise<number> => {
      let m = 0;
      for (const [k, t] of (await readPeftAdapter(join(coord!.runDir, `round-000${round}`))).adapter) if (k.includes('lora_B')) for (const x of t.data) m = Math.max(m, Math.abs(x));
      return m;
    };
    for (const scope of ['run', 'round'] as const) {
      coord = await startCoordinator(
        runConfig(dir, model, {
          name: `schedule-${scope}`,
          rounds: 2,
          lora: { r: 4, alpha: 8, target_modules: ['q_proj', 'v_proj'] },
          // One local step per round, warmup 2: schedule step g = round - 1 runs at lr * g / 2 ('run'); every task's
          // only step is its step 0, at lr 0 ('round'). B starts at 0 and AdamW's first step moves it by +-lr per entry.
          training: { steps: 1, batch_size: 4, lr, warmup_steps: 2, schedule_scope: scope, max_grad_norm: 0, weight_decay: 0, max_seq_len: 128, template: 'plain' },
          cohort: { min_workers: 1 },
          round: { min_results: 1, deadline_sec: 120 },
          eval: { every: 0 },
        }),
      );
      const w = worker({ address: coord.address, site: 'site', data, model, trainer: 'onnx', extra: ['--threads', '1', '--eval-fraction', '0'] });
      procs.push(w);
      const result = await coord.run;
      expect(result.error ?? '').toBe('');
      expect(await maxB(1)).toBe(0);
      if (scope === 'run') {
        expect(await maxB(2)).toBeGreaterThan((lr / 2) * 0.99);
        expect(await maxB(2)).toBeLessThanOrEqual((lr / 2) * 1.001);
      } else {
        expect(await maxB(2)).toBe(0);
      }
      expect(await w.exited).toBe(0);
      await coord.close();
      coord = null;
    }
  });
});

describe('PEFT LoRA variants in a federated run', () => {
  it('rsLoRA, rank_pattern, alpha_pattern, layers_to_transform and LoRA+ reach worker processes; the checkpoint is that PEFT adapter', async () => {
    const dir = tempDir('onnx-variants');
    const model = join(dir, 'model');
    await initModel(model, { arch: 'llama', hiddenSize: 32, numLayers: 2, numHeads: 2, numKvHeads: 1, maxPositions: 128, seed: 3 });
    const lr = 0.01;
    const ratio = 8;
    const lora = {
      r: 4,
      alpha: 8,
      target_modules: ['q_proj', 'v_proj'],
      use_rslora: true,
      rank_pattern: { v_proj: 2 },
      alpha_pattern: { 'layers.1.self_attn.q_proj': 3 },
      layers_to_transform: [1],
    };
    const cfg = runConfig(dir, model, {
      name: 'onnx-variants',
      rounds: 1,
      lora,
      // One step: B starts at 0, so A's gradient is 0 and every B entry moves by +-lr * ratio under AdamW's first step.
      training: { steps: 1, batch_size: 4, lr, max_grad_norm: 0, weight_decay: 0, max_seq_len: 128, template: 'plain', lora_plus_ratio: ratio },
      cohort: { min_workers: 2 },
      round: { min_results: 2, deadline_sec: 120 },
      eval: { every: 0 },
    });
    coord = await startCoordinator(cfg);
    const ws = ['north', 'south'].map((site) =>
      worker({ address: coord!.address, site, data: writeData(join(dir, `${site}.jsonl`), 8, site), model, trainer: 'onnx', extra: ['--threads', '1', '--eval-fraction', '0'] }),
    );
    procs.push(...ws);
    const result = await coord.run;
    expect(result.error ?? '').toBe('');
    expect(result.state).toBe('completed');
    const final = await readPeftAdapter(result.finalAdapterPath!);
    expect(final.config).toMatchObject({ r: 4, alpha: 8, useRslora: true, rankPattern: { v_proj: 2 }, alphaPattern: { 'layers.1.self_attn.q_proj': 3 }, layersToTransform: [1] });
    const shapes = Object.fromEntries([...final.adapter].map(([k, t]) => [k.replace('base_model.model.model.layers.', ''), t.shape]));
    expect(shapes).toEqual({
      '1.self_attn.q_proj.lora_A.weight': [4, 32],
      '1.self_attn.q_proj.lora_B.weight': [32, 4],
      '1.self_attn.v_proj.lora_A.weight': [2, 32],
      '1.self_attn.v_proj.lora_B.weight': [16, 2],
    });
    // LoRA+: each site's B moved by lr * ratio per entry (AdamW's first step is +-lr per unit of learning rate); the mean of
    // two sites is at most that, and where the sites agree it is that.
    let maxB = 0;
    for (const [k, t] of final.adapter) if (k.includes('lora_B')) for (const x of t.data) maxB = Math.max(maxB, Math.abs(x));
    expect(maxB).toBeLessThanOrEqual(lr * ratio * 1.001);
    expect(maxB).toBeGreaterThan(lr * ratio * 0.99);
    expect(await Promise.all(ws.map((p) => p.exited))).toEqual([0, 0]);
  });
});

describe('training.template: auto in a federated run', () => {
  it("each site renders chat records with the model's own chat_template; a model without one is refused at start naming the field", async () => {
    const dir = tempDir('onnx-auto');
    const model = await tinyModel(join(dir, 'model'));
    const cfgOf = (name: string) =>
      runConfig(dir, model, {
        name,
        rounds: 1,
        lora: { r: 2, alpha: 4, target_modules: ['q_proj', 'v_proj'] },
        training: { steps: 2, batch_size: 2, lr: 0.01, max_seq_len: 128, template: 'auto' },
        cohort: { min_workers: 1 },
        round: { min_results: 1, deadline_sec: 120 },
        eval: { every: 0 },
      });
    await expect(startCoordinator(cfgOf('no-template'))).rejects.toThrow(/training\.template: auto renders the model's chat_template, but .*has no chat_template/);

    // A short template of the model's own (a real model's system preamble would not fit the tiny model's 128 positions).
    const template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
    const tc = join(model, 'tokenizer_config.json');
    writeFileSync(tc, JSON.stringify({ ...JSON.parse(readFileSync(tc, 'utf8')), chat_template: template }));
    coord = await startCoordinator(cfgOf('auto'));
    const data = join(dir, 'chat.jsonl');
    const recs = Array.from({ length: 6 }, (_, i) => ({ messages: [{ role: 'user', content: `Say ${i}.` }, { role: 'assistant', content: `${i}` }] }));
    writeFileSync(data, recs.map((r) => JSON.stringify(r)).join('\n'));
    const w = worker({ address: coord.address, site: 'chat', data, model, trainer: 'onnx', extra: ['--threads', '1', '--eval-fraction', '0'] });
    procs.push(w);
    const early = await Promise.race([coord.run, w.exited.then(() => null)]);
    expect(early, w.out()).not.toBeNull();
    const result = await coord.run;
    expect(result.error ?? '').toBe('');
    expect(result.state).toBe('completed');
    expect(await w.exited).toBe(0);
    expect(w.out()).toMatch(/local data loaded/);
  });
});

describe('DoRA in a federated run', () => {
  it('the coordinator starts m at the base row norms, worker processes train A, B and m, and the checkpoint is a PEFT DoRA adapter', async () => {
    const dir = tempDir('onnx-dora');
    const model = await tinyModel(join(dir, 'model'), 4);
    const cfg = runConfig(dir, model, {
      name: 'onnx-dora',
      rounds: 2,
      lora: { r: 2, alpha: 4, target_modules: ['q_proj', 'v_proj'], use_dora: true },
      training: { steps: 2, batch_size: 2, lr: 0.01, max_seq_len: 128, template: 'plain' },
      cohort: { min_workers: 2 },
      round: { min_results: 2, deadline_sec: 120 },
      eval: { every: 0 },
    });
    coord = await startCoordinator(cfg);
    const ws = ['east', 'west'].map((site) =>
      worker({ address: coord!.address, site, data: writeData(join(dir, `${site}.jsonl`), 6, site), model, trainer: 'onnx', extra: ['--threads', '1', '--eval-fraction', '0'] }),
    );
    procs.push(...ws);
    const result = await coord.run;
    expect(result.error ?? '').toBe('');
    expect(result.state).toBe('completed');
    const initial = await readPeftAdapter(join(coord.runDir, 'round-0000'));
    const final = await readPeftAdapter(result.finalAdapterPath!);
    expect(final.config.useDora).toBe(true);
    const base = (await loadModel(model)).weights;
    for (const module of ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj']) {
      const key = `base_model.model.${module}.lora_magnitude_vector`;
      const w = base.get(`${module}.weight`)!;
      const [out, inF] = w.shape as [number, number];
      const m0 = initial.adapter.get(key)!;
      expect(m0.shape).toEqual([out]);
      for (let o = 0; o < out; o++) {
        let ss = 0;
        for (let i = 0; i < inF; i++) ss += w.data[o * inF + i]! ** 2;
        expect(m0.data[o]).toBeCloseTo(Math.sqrt(ss), 5); // m = ||W|| per output feature at the start
      }
      const m = final.adapter.get(key)!;
      expect(m.data.some((x, o) => Math.abs(x - m0.data[o]!) > 1e-6)).toBe(true);
    }
    expect(await Promise.all(ws.map((p) => p.exited))).toEqual([0, 0]);
  });
});
