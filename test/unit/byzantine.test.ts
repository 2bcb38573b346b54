import { describe, expect, it } from 'vitest';
import type { TensorMap } from '../../common/tensor.ts';
import type { LocalTrainingSpec, TrainArgs, TrainOutcome, Trainer } from '../../worker/trainers/trainer.ts';
import { ByzantineTrainer, parseByzantine } from '../../worker/trainers/byzantine.ts';

/** A trainer whose "training" adds 0.5 to every weight and that holds 7 training examples. */
class AddHalf implements Trainer {
  readonly backend = 'fake';
  readonly device = 'cpu';
  readonly numTrainExamples = 7;
  readonly numEvalExamples = 3;
  async train(args: TrainArgs): Promise<TrainOutcome> {
    const adapter: TensorMap = new Map();
    for (const [k, t] of args.globalAdapter) adapter.set(k, { shape: [...t.shape], data: Float32Array.from(t.data, (x) => x + 0.5) });
    return { adapter, numExamples: 7, metrics: { train_loss: 1.25 } };
  }
  async evaluate() {
    return { evalLoss: 0.5, evalTokens: 10, evalExamples: 3, evalAccuracy: 1 };
  }
  async close(): Promise<void> {}
}

const global: TensorMap = new Map([
  ['a', { shape: [2], data: Float32Array.from([1, -2]) }],
  ['b', { shape: [1, 1], data: Float32Array.from([0]) }],
]);

describe('Byzantine trainer', () => {
  it('sends global + scale * (local - global) and multiplies the example counts', async () => {
    const t = new ByzantineTrainer(new AddHalf(), { scale: -10, factor: 100 });
    const out = await t.train({ taskId: 't', runId: 'r', round: 1, globalAdapter: global, spec: {} as LocalTrainingSpec, onProgress: () => {}, signal: new AbortController().signal });
    // local - global = 0.5 everywhere, so every weight moves by -10 * 0.5 = -5.
    expect([...out.adapter.get('a')!.data]).toEqual([-4, -7]);
    expect([...out.adapter.get('b')!.data]).toEqual([-5]);
    expect(out.adapter.get('b')!.shape).toEqual([1, 1]);
    expect(out.numExamples).toBe(700);
    expect(t.numTrainExamples).toBe(700);
    expect(out.metrics.train_loss).toBe(1.25);
    // Evaluation stays honest.
    expect(t.numEvalExamples).toBe(3);
    expect((await t.evaluate({ globalAdapter: global, spec: {} as LocalTrainingSpec, signal: new AbortController().signal }))!.evalLoss).toBe(0.5);
    // The global adapter it was given is left as it was.
    expect([...global.get('a')!.data]).toEqual([1, -2]);
  });

  it('offers distributed-mode methods only when the wrapped trainer has them', () => {
    expect(new ByzantineTrainer(new AddHalf(), { scale: -1, factor: 1 }).computeGradients).toBeUndefined();
  });

  it('parses SCALE,FACTOR and names what is wrong', () => {
    expect(parseByzantine('-10,100')).toEqual({ scale: -10, factor: 100 });
    expect(parseByzantine(' 2.5 , 0.5 ')).toEqual({ scale: 2.5, factor: 0.5 });
    expect(() => parseByzantine('-10')).toThrow(/--fault-byzantine must be SCALE,FACTOR, two numbers such as -10,100 \(got "-10"\)/);
    expect(() => parseByzantine('x,1')).toThrow(/two numbers/);
    expect(() => parseByzantine('-10,0')).toThrow(/FACTOR .* must be > 0 \(got 0\)/);
  });
});
