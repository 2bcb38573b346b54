/**
 * checkpoint.keep_last (coordinator/store.ts): the newest K checkpoints stay, older ones are removed
 * only once a newer one is durable and latest.json names it; a write that fails removes nothing.
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parseRunConfig } from '../../common/config.ts';
import { CheckpointStore } from '../../coordinator/store.ts';

const root = mkdtempSync(join(tmpdir(), 'fedtune-keep-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));

const adapter = new Map([
  ['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', { shape: [1, 2], data: new Float32Array([1, 2]) }],
  ['base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight', { shape: [2, 1], data: new Float32Array([3, 4]) }],
]);

function store(name: string, keepLast: number | null, unit: 'round' | 'step' = 'round'): CheckpointStore<{ format: string; n: number }> {
  return new CheckpointStore({ root, runName: name, unit, format: 'test/1', numberOf: (s) => s.n, baseModel: 'm', fanInFanOut: false, lora: { dropout: 0, targetModules: ['q_proj'] }, keepLast });
}

describe('checkpoint.keep_last', () => {
  it('keeps the newest K, removes the older ones after each write, and keeps every one without it', async () => {
    const kept = store('two', 2);
    const all = store('all', null);
    for (const n of [1, 2, 3, 4, 5]) {
      await kept.write({ format: 'test/1', n }, adapter, { r: 1, alpha: 1 });
      await all.write({ format: 'test/1', n }, adapter, { r: 1, alpha: 1 });
      expect(await kept.list()).toEqual(n === 1 ? [1] : [n - 1, n]);
    }
    expect(await all.list()).toEqual([1, 2, 3, 4, 5]);
    expect((await kept.latest())!.n).toBe(5);
    expect(JSON.parse(readFileSync(join(kept.runDir, 'latest.json'), 'utf8')).round).toBe(5);
    expect((await kept.loadAdapter(kept.dir(5))).get('base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight')!.data).toEqual(new Float32Array([3, 4]));
    expect(await kept.has(3)).toBe(false);
    expect(await kept.has(4)).toBe(true);
    // Distributed step checkpoints alike.
    const steps = store('steps', 1, 'step');
    for (const n of [100, 200, 300]) await steps.write({ format: 'test/1', n }, adapter, { r: 1, alpha: 1 });
    expect(readdirSync(steps.runDir).filter((d) => d.startsWith('step-'))).toEqual(['step-000300']);
  });

  it('a write that fails removes nothing', async () => {
    const s = store('fails', 1);
    await s.write({ format: 'test/1', n: 1 }, adapter, { r: 1, alpha: 1 });
    const err = await s
      .write({ format: 'test/1', n: 2 }, adapter, { r: 1, alpha: 1 }, { extra: async () => { throw Object.assign(new Error('no space'), { code: 'ENOSPC' }); } })
      .then(() => null, (e: unknown) => e as Error);
    expect(err?.message).toMatch(/cannot write checkpoint round-0002 .* the run stopped after round 1, which is on disk/);
    expect(await s.list()).toEqual([1]);
  });

  it('is a positive integer or null, named when it is not', () => {
    const base = { name: 'r', model: { path: 'm' }, rounds: 1, training: { steps: 1 }, server: { join_token: 't' } };
    expect(parseRunConfig({ ...base }).checkpoint.keep_last).toBeNull();
    expect(parseRunConfig({ ...base, checkpoint: { keep_last: 3 } }).checkpoint.keep_last).toBe(3);
    expect(() => parseRunConfig({ ...base, checkpoint: { keep_last: 0 } })).toThrow(/checkpoint\.keep_last/);
    expect(() => parseRunConfig({ ...base, checkpoint: { keep_last: 1.5 } })).toThrow(/checkpoint\.keep_last/);
  });
});
