/**
 * A base of real size on a worker: a random model with the shapes of
 * Qwen2.5-0.5B (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab
 * 151936; bfloat16 on disk in two shards) loads, one LoRA step runs with a
 * finite loss, and loading peaks at no more than 1.2x the bytes the weights
 * keep resident, in float32 (each tensor read, converted and dropped in
 * turn) and with --compute-dtype float16 (matrices held in float16, each read
 * and rounded a chunk at a time); with --compute-dtype bfloat16 the matrices
 * stay in the files and loading reads almost nothing. Runs in child processes (bench/model-scale.ts make / probe) so that the peak RSS is
 * theirs; only with FEDTUNE_BIG_TESTS=1 (about a minute and 4 GB; CI sets it).
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ROOT } from './federated-helpers.ts';

const BIG = process.env.FEDTUNE_BIG_TESTS === '1';
const dir = mkdtempSync(join(tmpdir(), 'fedtune-big-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function bench(args: string[]): string {
  const r = spawnSync(process.execPath, [join(ROOT, 'bin', 'run-ts.js'), join(ROOT, 'bench', 'model-scale.ts'), ...args], {
    encoding: 'utf8',
    maxBuffer: 1 << 24,
    env: { ...process.env, FEDTUNE_LOG_LEVEL: 'warn' },
  });
  expect(r.status, r.stderr).toBe(0);
  return r.stdout;
}

describe.runIf(BIG)('a real-sized base (FEDTUNE_BIG_TESTS=1)', () => {
  it('Qwen2.5-0.5B shapes in bf16: loads within 1.2x its resident bytes, one LoRA step, finite loss', { timeout: 600_000 }, () => {
    const model = join(dir, 'qwen2.5-0.5b');
    bench(['make', 'qwen2.5-0.5b', model]);
    const r = JSON.parse(bench(['probe', model, JSON.stringify({ seq: 64, steps: 1, warmup: 0, threads: 2 })]).trim().split('\n').pop()!);
    console.log(`qwen2.5-0.5b shapes: load ${r.loadSecs.toFixed(1)} s, peak ${(r.loadPeakBytes / 2 ** 30).toFixed(2)} GiB for ${(r.residentBytes / 2 ** 30).toFixed(2)} GiB resident, step loss ${r.loss}`);
    expect(r.residentBytes / 4).toBeGreaterThan(490e6); // float32, 4 bytes a parameter: Qwen2.5-0.5B has 494M
    expect(r.loadPeakBytes).toBeLessThanOrEqual(1.2 * r.residentBytes);
    expect(Number.isFinite(r.loss)).toBe(true);
    // Random weights and labels: the loss is near ln(vocab).
    expect(Math.abs(r.loss - Math.log(151936))).toBeLessThan(1);

    // --compute-dtype float16: the matrices held in float16 (2 bytes a parameter), read and rounded a chunk at a time.
    const h = JSON.parse(bench(['probe', model, JSON.stringify({ seq: 64, steps: 1, warmup: 0, threads: 2, variant: 'fp16' })]).trim().split('\n').pop()!);
    console.log(`qwen2.5-0.5b shapes, float16 base: load ${h.loadSecs.toFixed(1)} s, peak ${(h.loadPeakBytes / 2 ** 30).toFixed(2)} GiB for ${(h.residentBytes / 2 ** 30).toFixed(2)} GiB resident, step loss ${h.loss}`);
    expect(h.residentBytes).toBeLessThan(0.51 * r.residentBytes);
    expect(h.residentBytes / 2).toBeGreaterThan(490e6);
    expect(h.loadPeakBytes).toBeLessThanOrEqual(1.2 * h.residentBytes);
    // Float32 compute on float16-rounded weights (the CPU graphs): the same loss to within float16's rounding.
    expect(Math.abs(h.loss - r.loss) / r.loss).toBeLessThan(1e-3);

    // --compute-dtype bfloat16: the matrices stay in the two shards (2 bytes a parameter, mapped by ONNX Runtime); loading reads the rest only.
    const b = JSON.parse(bench(['probe', model, JSON.stringify({ seq: 64, steps: 1, warmup: 0, threads: 2, variant: 'bf16' })]).trim().split('\n').pop()!);
    console.log(`qwen2.5-0.5b shapes, bfloat16 base in place: load ${b.loadSecs.toFixed(1)} s, peak ${(b.loadPeakBytes / 2 ** 30).toFixed(2)} GiB for ${(b.residentBytes / 2 ** 30).toFixed(2)} GiB in files, step loss ${b.loss}`);
    expect(b.residentBytes).toBe(h.residentBytes); // the same 2 bytes a matrix weight, float32 for the rest
    expect(b.loadPeakBytes).toBeLessThan(0.1 * b.residentBytes);
    // bfloat16 -> float32 is exact: float32's loss on the same checkpoint.
    expect(Math.abs(b.loss - r.loss) / r.loss).toBeLessThan(1e-5);
  });
});
