/**
 * The spine end to end: a coordinator and three `fedtune worker` processes with
 * the built-in ONNX trainer, over real gRPC on loopback, run three federated
 * rounds; the global adapter's eval loss on the workers' held-out data goes down.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { readPeftAdapter } from '../../common/peft.ts';
import { runConfig, tempDir, tinyModel, worker, writeData, type Proc } from './federated-helpers.ts';

const procs: Proc[] = [];
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
      lora: { r: 4, alpha: 8, target_modules: ['q_proj', 'v_proj', 'o_proj'] },
      training: { steps: 6, batch_size: 4, lr: 0.02, max_seq_len: 128, template: 'plain' },
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
