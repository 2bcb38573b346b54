/**
 * The ONNX trainer honours a task's dp_sgd (worker/trainers/onnx.ts): it takes
 * dpSgdSteps steps of Poisson batches, reports DP-SGD's metrics, and is reproducible
 * in everything but the CSPRNG noise; the noop trainer refuses it by name.
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createOnnxTrainer } from '../../worker/trainers/onnx.ts';
import { createTrainer } from '../../worker/trainers/index.ts';
import type { LocalTrainingSpec, TrainArgs } from '../../worker/trainers/trainer.ts';
import { ROOT, tempDir, tinyModel, writeData } from '../integration/federated-helpers.ts';

const spec = (over: Partial<LocalTrainingSpec> = {}): LocalTrainingSpec => ({
  lora: { r: 4, alpha: 8, dropout: 0, targetModules: ['q_proj', 'v_proj'] },
  steps: null, epochs: 2, batchSize: 4, gradAccumulation: 1, lr: 0.02, schedule: 'constant', warmupSteps: 0, scheduleRound: 0, scheduleRounds: 0, keepOptimizerState: false,
  weightDecay: 0, maxGradNorm: 1, maxSeqLen: 128, template: 'plain', seed: 3, proxMu: 0, freezeLoraA: false, loraPlusRatio: 1,
  dpSgd: { maxGradNorm: 1, noiseMultiplier: 0.5, sampleRate: 0.25 },
  ...over,
});

describe('ONNX trainer with dp_sgd', () => {
  it('takes epochs * round(1/q) Poisson steps and reports DP-SGD metrics', async () => {
    const dir = tempDir('dpsgd-trainer');
    const model = await tinyModel(join(dir, 'model'));
    const data = writeData(join(dir, 'd.jsonl'), 20, 'alpha');
    const trainer = await createOnnxTrainer({ modelDir: model, dataPath: data, evalFraction: 0, template: 'plain', maxSeqLen: 128, seed: 0, threads: 1, site: 'alpha' });
    const engineParams = async (): Promise<TrainArgs['globalAdapter']> => {
      const { Engine } = await import('../../worker/engine/engine.ts');
      const { loadModel } = await import('../../worker/engine/model.ts');
      const e = Engine.create(await loadModel(model), { mode: 'lora', lora: spec().lora });
      return e.initParams(1);
    };
    const steps: number[] = [];
    const out = await trainer.train({
      taskId: 't', runId: 'r', round: 1, globalAdapter: await engineParams(), spec: spec(),
      onProgress: (p) => steps.push(p.step), signal: new AbortController().signal,
    });
    expect(steps.length).toBe(8); // 2 epochs * round(1 / 0.25)
    expect(out.metrics.steps).toBe(8);
    expect(out.numExamples).toBe(20);
    // Poisson batches of mean q N = 5; the metric is the realised mean.
    expect(out.metrics.dp_mean_batch_size).toBeGreaterThan(0);
    expect(out.metrics.dp_mean_batch_size).toBeLessThan(20);
    expect(out.metrics.dp_clipped_fraction).toBeGreaterThanOrEqual(0);
    expect(out.metrics.dp_clipped_fraction).toBeLessThanOrEqual(1);
    const moved = [...out.adapter.values()].some((t) => t.data.some((x) => x !== 0));
    expect(moved).toBe(true);
    await expect(
      trainer.computeGradients!({ params: await engineParams(), batches: [], spec: spec(), signal: new AbortController().signal }),
    ).rejects.toThrow(/privacy\.dp_sgd/);
    await trainer.close();
  });

  it('the noop trainer refuses dp_sgd by name', async () => {
    const dir = tempDir('dpsgd-noop');
    const model = await tinyModel(join(dir, 'model'));
    const trainer = await createTrainer('noop', { modelDir: model, dataPath: writeData(join(dir, 'd.jsonl'), 5, 'x'), evalFraction: 0, template: 'plain', maxSeqLen: 128, seed: 0 });
    await expect(trainer.train({
      taskId: 't', runId: 'r', round: 1, globalAdapter: new Map(), spec: spec(), onProgress: () => {}, signal: new AbortController().signal,
    })).rejects.toThrow(/privacy\.dp_sgd/);
    await trainer.close();
  });
});

describe('fedtune train --dp-*', () => {
  const run = (args: string[]): { status: number | null; out: string } => {
    const r = spawnSync(process.execPath, [join(ROOT, 'bin', 'fedtune.js'), 'train', ...args], { encoding: 'utf8', timeout: 120_000 });
    return { status: r.status, out: `${r.stdout}${r.stderr}` };
  };
  it('trains locally with DP-SGD, and refuses an incomplete set of flags by name', async () => {
    const dir = tempDir('dpsgd-cli');
    const model = await tinyModel(join(dir, 'model'));
    const data = writeData(join(dir, 'd.jsonl'), 12, 'alpha');
    const common = ['--model', model, '--data', data, '--template', 'plain', '--lora-r', '2', '--target-modules', 'q_proj,v_proj', '--threads', '1', '--max-seq-len', '64', '--eval-fraction', '0'];
    const ok = run([...common, '--out', join(dir, 'out'), '--epochs', '1', '--dp-max-grad-norm', '1', '--dp-noise-multiplier', '0.5', '--dp-sample-rate', '0.25']);
    expect(ok.out).toMatch(/DP-SGD: per-example clip 1, noise multiplier 0\.5, Poisson sample rate 0\.25/);
    expect(ok.out).toMatch(/trained 4 steps/); // 1 epoch = round(1 / 0.25) steps
    expect(ok.status).toBe(0);
    const bad = run([...common, '--out', join(dir, 'out2'), '--steps', '1', '--dp-max-grad-norm', '1']);
    expect(bad.status).not.toBe(0);
    expect(bad.out).toMatch(/--dp-noise-multiplier and --dp-sample-rate/);
  }, 240_000);
});
