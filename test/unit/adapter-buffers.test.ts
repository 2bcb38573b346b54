/**
 * Global adapter buffers reused across rounds (coordinator/strategies/math/sum.ts,
 * takeAdapterBuffer / giveAdapterBuffer; RunBase.setGlobal and holdVersion): a mean's
 * buffer serves a later mean only once its version is two versions old and no
 * download streams it; buffers not taken there are never kept. The starting global is
 * copied into one.
 */
import { describe, expect, it } from 'vitest';
import { giveAdapterBuffer, takeAdapterBuffer } from '../../coordinator/strategies/math/sum.ts';
import { MeanAggregator } from '../../coordinator/strategies/fedavg.ts';
import { RunBase } from '../../coordinator/run-base.ts';
import { MemoryBus } from '../../coordinator/events/memory.ts';
import { WorkerRegistry } from '../../coordinator/workers.ts';
import { parseRunConfig } from '../../common/config.ts';
import type { TensorMap } from '../../common/tensor.ts';
import { ClientDp, ClientDpAggregator } from '../../coordinator/privacy/client-dp.ts';
import { clientDpSchema } from '../../common/privacy/config.ts';

const N = 1000;
const adapter = (v: number): TensorMap => {
  const data = takeAdapterBuffer(N);
  data.fill(v);
  return new Map([['a', { shape: [N], data }]]);
};

class Run extends RunBase {
  constructor(start = new Float32Array(N)) {
    super({
      cfg: parseRunConfig({
        name: 'buffers',
        model: { path: '/nonexistent' },
        lora: { r: 4, alpha: 8, target_modules: ['q_proj'] },
        rounds: 5,
        training: { steps: 1 },
        checkpoint: { dir: '/nonexistent' },
        server: { listen: '127.0.0.1:0', join_token: 'buffers-token' },
        dashboard: { enabled: false },
      }),
      bus: new MemoryBus(),
      registry: new WorkerRegistry(60_000),
      global: new Map([['a', { shape: [N], data: start }]]),
      state: { runId: 'r', globalVersion: 0 },
      resumed: false,
    });
  }
  next(adapter: TensorMap, version: number): void {
    this.setGlobal(adapter, version);
  }
}

describe('adapter buffers', () => {
  it('a given-back buffer is taken again; a foreign or partial one is not kept', () => {
    const a = takeAdapterBuffer(N);
    giveAdapterBuffer(new Uint8Array(a.buffer));
    const b = takeAdapterBuffer(N);
    expect(b.buffer).toBe(a.buffer);
    giveAdapterBuffer(new Uint8Array(new Float32Array(N).buffer)); // not taken here
    giveAdapterBuffer(new Uint8Array(b.buffer, 4)); // not the whole buffer
    expect(takeAdapterBuffer(N).buffer).not.toBe(b.buffer);
  });

  it('MeanAggregator.mean writes into one such buffer, packed for the wire as it is', () => {
    const m = new MeanAggregator(new Map([['a', { shape: [2], data: new Float32Array(2) }], ['b', { shape: [3], data: new Float32Array(3) }]]));
    m.add({ tensors: new Map([['a', { shape: [2], data: Float32Array.of(1, 2) }], ['b', { shape: [3], data: Float32Array.of(3, 4, 5) }]]), weight: 1 });
    m.add({ tensors: new Map([['a', { shape: [2], data: Float32Array.of(3, 4) }], ['b', { shape: [3], data: Float32Array.of(5, 6, 7) }]]), weight: 3 });
    const out = m.mean();
    m.dispose();
    expect(Array.from(out.get('a')!.data)).toEqual([2.5, 3.5]); // (1 + 3·3) / 4, (2 + 3·4) / 4
    expect(Array.from(out.get('b')!.data)).toEqual([4.5, 5.5, 6.5]);
    expect(out.get('b')!.data.buffer).toBe(out.get('a')!.data.buffer);
    expect(out.get('a')!.data.buffer.byteLength).toBe(5 * 4);
  });

  it('the run gives a version\'s buffer back two versions later, or when the last download of it ends', () => {
    const run = new Run();
    const v1 = adapter(1);
    run.next(v1, 1);
    const v2 = adapter(2);
    run.next(v2, 2);
    const p2 = run.adapterVersion(2)!;
    expect(p2.bytes.buffer).toBe(v2.get('a')!.data.buffer);
    // A slow download of version 2 is still streaming when versions 3 and 4 arrive.
    const release = run.holdVersion(p2);
    run.next(adapter(3), 3); // version 1 retired, nothing reads it: its buffer is free
    const reused = takeAdapterBuffer(N);
    expect(reused.buffer).toBe(v1.get('a')!.data.buffer);
    reused.fill(7);
    run.next(new Map([['a', { shape: [N], data: reused }]]), 4); // version 2 retired while downloaded: kept
    expect(run.adapterVersion(2)).toBeUndefined();
    const fresh = takeAdapterBuffer(N);
    expect(fresh.buffer).not.toBe(v2.get('a')!.data.buffer);
    expect(p2.bytes.every((b, i) => b === new Uint8Array(Float32Array.of(2).buffer)[i % 4])).toBe(true);
    release();
    release(); // once only
    expect(takeAdapterBuffer(N).buffer).toBe(v2.get('a')!.data.buffer);
    expect(takeAdapterBuffer(N).buffer).not.toBe(v2.get('a')!.data.buffer);
  });

  it('the starting global is copied once into such a buffer, which serves a mean two versions later', () => {
    const start = Float32Array.from({ length: N }, (_, i) => i / 8);
    const run = new Run(start);
    const g0 = run.globalAdapter.get('a')!.data;
    expect(g0.buffer).not.toBe(start.buffer);
    expect(Array.from(g0)).toEqual(Array.from(start));
    expect(run.adapterVersion(0)!.bytes.buffer).toBe(g0.buffer); // packed for the wire without a second copy
    run.next(adapter(1), 1);
    expect(takeAdapterBuffer(N).buffer).not.toBe(g0.buffer); // version 0 is still downloadable
    run.next(adapter(2), 2); // version 0 retired
    expect(takeAdapterBuffer(N).buffer).toBe(g0.buffer);
  });

  it('a buffer a live version still uses (a strategy that kept the global) is not given back', () => {
    const run = new Run();
    const kept = adapter(5);
    run.next(kept, 1);
    run.next(kept, 2);
    run.next(kept, 3); // version 1 retires, but versions 2 and 3 are the same buffer
    expect(takeAdapterBuffer(N).buffer).not.toBe(kept.get('a')!.data.buffer);
    expect(run.adapterVersion(3)!.bytes.every((b, i) => b === new Uint8Array(Float32Array.of(5).buffer)[i % 4])).toBe(true);
  });

  it('every update\'s buffer goes back: after its fold, at dispose() when still queued (a retried attempt), and under client DP once its delta is copied', () => {
    const like: TensorMap = new Map([['a', { shape: [3], data: new Float32Array(3) }]]);
    const up = (v: number): TensorMap => new Map([['a', { shape: [3], data: new Float32Array(3).fill(v) }]]);
    const released: number[] = [];
    const m = new MeanAggregator(like);
    m.add({ tensors: up(1), weight: 1, release: () => released.push(1) });
    m.add({ tensors: up(2), weight: 1, release: () => released.push(2) });
    expect(released).toEqual([]); // queued, not folded yet (four per fold)
    m.dispose();
    expect(released).toEqual([1, 2]);

    const dp = new ClientDpAggregator({ tensors: like, rank: 1 }, new ClientDp(clientDpSchema.parse({ clip_norm: 1, noise_multiplier: 0 })), 2);
    dp.add({ tensors: up(0.5), weight: 1, start: like, release: () => released.push(3) });
    expect(released).toEqual([1, 2, 3]);
    expect(Array.from(dp.mean().get('a')!.data)).toEqual([0.25, 0.25, 0.25]); // clipped delta (norm 0.87 < 1) over the 2 sites asked
  });
});
