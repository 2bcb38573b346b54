import { describe, expect, it } from 'vitest';
import { manifestOf, packTensorMap } from '../../common/chunks.ts';
import { parseRunConfig } from '../../common/config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { FedAvgAccumulator } from '../../coordinator/strategies/fedavg.ts';
import { createStrategy } from '../../coordinator/strategies/strategy.ts';

function adapter(a: number[], b: number[]): TensorMap {
  return new Map([
    ['m.lora_A.weight', { shape: [1, a.length], data: Float32Array.from(a) }],
    ['m.lora_B.weight', { shape: [b.length, 1], data: Float32Array.from(b) }],
  ]);
}

const cfg = (strategy: string) =>
  parseRunConfig({ name: 't', model: { path: 'm' }, training: { steps: 1 }, rounds: 1, strategy, server: { join_token: 'x' }, cohort: { min_workers: 1 } });

describe('FedAvg accumulator', () => {
  it('is the example-weighted mean of A and of B separately', () => {
    const u1 = adapter([1, 2], [10, 20, 30]);
    const u2 = adapter([3, -2], [0, 0, 6]);
    const u3 = adapter([0, 1], [1, 1, 1]);
    const acc = new FedAvgAccumulator(manifestOf(u1));
    acc.add(u1, 10);
    acc.addFlat(new Float32Array(packTensorMap(u2).bytes.buffer), 30);
    acc.add(u3, 60);
    const m = acc.mean();
    expect(acc.count).toBe(3);
    expect(acc.totalWeight).toBe(100);
    // sum_k n_k w_k / sum_k n_k, written out per element
    const wantA = [(10 * 1 + 30 * 3 + 60 * 0) / 100, (10 * 2 + 30 * -2 + 60 * 1) / 100];
    const wantB = [(10 * 10 + 60 * 1) / 100, (10 * 20 + 60 * 1) / 100, (10 * 30 + 30 * 6 + 60 * 1) / 100];
    expect([...m.get('m.lora_A.weight')!.data].map((x) => +x.toFixed(5))).toEqual(wantA);
    expect([...m.get('m.lora_B.weight')!.data].map((x) => +x.toFixed(5))).toEqual(wantB);
    // A and B are averaged independently: mean(B)·mean(A) differs from mean(B·A) here.
    expect(m.get('m.lora_B.weight')!.shape).toEqual([3, 1]);
  });

  it('does not grow with the number of updates and refuses bad input', () => {
    const u = adapter([1], [1]);
    const acc = new FedAvgAccumulator(manifestOf(u));
    for (let i = 0; i < 1000; i++) acc.add(u, 1 + (i % 3));
    expect(acc.count).toBe(1000);
    expect([...acc.mean().get('m.lora_A.weight')!.data]).toEqual([1]);
    expect(() => acc.addFlat(new Float32Array(3), 1)).toThrow(/3 elements, the adapter has 2/);
    expect(() => acc.add(u, 0)).toThrow(/weight must be a positive number/);
    expect(() => new FedAvgAccumulator(manifestOf(u)).mean()).toThrow(/no updates/);
  });
});

describe('strategies', () => {
  it('fedavg returns the weighted mean as the new global adapter', () => {
    const s = createStrategy(cfg('fedavg'));
    const g = adapter([0, 0], [0]);
    const acc = s.accumulator(manifestOf(g));
    acc.add(adapter([2, 4], [1]), 1);
    acc.add(adapter([4, 8], [3]), 3);
    const next = s.aggregate(g, acc);
    expect([...next.get('m.lora_A.weight')!.data]).toEqual([3.5, 7]);
    expect([...next.get('m.lora_B.weight')!.data]).toEqual([2.5]);
  });

  it('fedavgm applies server momentum to mean - global (one step: global + lr * delta)', () => {
    const c = cfg('fedavgm');
    const s = createStrategy(c);
    const g = adapter([1, 1], [1]);
    const acc = s.accumulator(manifestOf(g));
    acc.add(adapter([3, 1], [0]), 1);
    const next = s.aggregate(g, acc);
    const lr = c.server_optimizer.lr;
    expect([...next.get('m.lora_A.weight')!.data].map((x) => +x.toFixed(5))).toEqual([1 + lr * 2, 1]);
    expect([...next.get('m.lora_B.weight')!.data].map((x) => +x.toFixed(5))).toEqual([1 - lr]);
  });

  it('selects a seeded cohort of the configured fraction, never below min_workers', () => {
    const c = parseRunConfig({
      name: 't', model: { path: 'm' }, training: { steps: 1, seed: 3 }, rounds: 1, server: { join_token: 'x' },
      cohort: { fraction: 0.3, min_workers: 2 },
    });
    const s = createStrategy(c);
    const cands = Array.from({ length: 10 }, (_, i) => ({ workerId: `w${i}`, site: `s${i}`, numTrainExamples: 5 }));
    const a = s.selectCohort(cands, 1, 0);
    expect(a).toHaveLength(3);
    expect(new Set(a).size).toBe(3);
    expect(s.selectCohort([...cands].reverse(), 1, 0)).toEqual(a); // order of arrival does not matter
    expect(s.selectCohort(cands.slice(0, 4), 1, 0)).toHaveLength(2);
    const rounds = new Set(Array.from({ length: 8 }, (_, r) => s.selectCohort(cands, r + 1, 0).join()));
    expect(rounds.size).toBeGreaterThan(1);
  });
});
