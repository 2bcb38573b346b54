/**
 * The memory plan (worker/engine/memory-plan.ts) against the measured peak of
 * real training steps: each configuration runs two LoRA steps in a child
 * process of its own (bench/memory-probe.ts) that reports its VmHWM. The
 * configurations differ from the ones the plan's two constants were fitted to
 * (bench/activation-memory.ts: llama 128 x 4 layers, 64 x 8, 256 x 2). Then
 * `fedtune train --plan` and `fedtune worker --plan`, and the refusal of a run
 * that cannot fit, with what to change.
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import type { ProbeConfig, ProbeResult } from '../../bench/memory-probe.ts';
import { memoryPlan, planRun } from '../../worker/engine/memory-plan.ts';
import { normalizeConfig } from '../../common/hf-model.ts';

const run = promisify(execFile);
const ROOT = resolve(import.meta.dirname, '../..');
const RUN_TS = join(ROOT, 'bin/run-ts.js');
const linux = process.platform === 'linux';

async function probe(c: ProbeConfig): Promise<ProbeResult> {
  const { stdout } = await run(process.execPath, [RUN_TS, join(ROOT, 'bench/memory-probe.ts'), JSON.stringify(c)], { maxBuffer: 16 * 2 ** 20 });
  return JSON.parse(stdout.trim().split('\n').pop()!) as ProbeResult;
}

const tmp = mkdtempSync(join(tmpdir(), 'fedtune-plan-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe.runIf(linux)('memory plan against the measured peak (VmHWM, one child process per configuration)', () => {
  const results = new Map<string, ProbeResult>();
  const CASES: Array<{ name: string; c: ProbeConfig }> = [
    { name: 'llama 192 x 3 layers, 6 heads / 2 kv heads, batch 2 x 768', c: { hidden: 192, layers: 3, heads: 6, kvHeads: 2, batch: 2, seq: 768, recompute: false } },
    { name: 'the same with recompute', c: { hidden: 192, layers: 3, heads: 6, kvHeads: 2, batch: 2, seq: 768, recompute: true } },
    { name: 'llama 128 x 4 layers, 1536 tokens, recompute', c: { hidden: 128, layers: 4, heads: 4, batch: 1, seq: 1536, recompute: true } },
    { name: 'gpt2 128 x 4 layers, 1024 tokens, recompute', c: { arch: 'gpt2', hidden: 128, layers: 4, heads: 4, batch: 1, seq: 1024, recompute: true } },
    { name: 'llama 512 x 4 layers, vocab 8192, batch 1 x 512, float16 base weights', c: { hidden: 512, layers: 4, heads: 8, vocab: 8192, batch: 1, seq: 512, recompute: false, computeDtype: 'float16' } },
    { name: 'the same with bfloat16 base weights left in the checkpoint', c: { hidden: 512, layers: 4, heads: 8, vocab: 8192, batch: 1, seq: 512, recompute: false, computeDtype: 'bfloat16' } },
  ];
  for (const { name, c } of CASES) {
    it(`${name}: plan within 15% of the peak`, async () => {
      const r = await probe({ ...c, threads: 2 });
      results.set(name, r);
      const ratio = r.plan.total / r.peak;
      console.log(`${name}: measured ${(r.peak / 2 ** 20).toFixed(0)} MiB, plan ${(r.plan.total / 2 ** 20).toFixed(0)} MiB (${ratio.toFixed(3)})`);
      // The step itself must dominate, so that agreement is not just the fixed runtime's.
      expect(r.peak - r.baseline).toBeGreaterThan(r.baseline);
      expect(Math.abs(ratio - 1)).toBeLessThan(0.15);
    }, 60_000);
  }

  it('recompute lowers the measured peak, as the plan says', () => {
    const plain = results.get(CASES[0]!.name);
    const rec = results.get(CASES[1]!.name);
    if (!plain || !rec) throw new Error('the two llama 192 cases did not run');
    expect(rec.peak).toBeLessThan(0.7 * plain.peak);
    expect(rec.plan.total).toBeLessThan(0.7 * plain.plan.total);
  });
});

describe('memory plan: figures and refusal', () => {
  const config = normalizeConfig({ model_type: 'llama', vocab_size: 300, hidden_size: 128, intermediate_size: 344, num_hidden_layers: 4, num_attention_heads: 4, max_position_embeddings: 4096 });
  const lora = { r: 8, alpha: 16, dropout: 0, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] };
  const base = { mode: 'lora' as const, lora, batchSize: 4, seqLen: 2048, recompute: false };

  it('counts the LoRA parameters with AdamW state and one layer of attention scores', () => {
    const p = memoryPlan(config, base);
    // r (in + out) per module: q, o [128 -> 128], k, v [128 -> 128], gate, up [128 -> 344], down [344 -> 128].
    const perLayer = 8 * (4 * 256 + 3 * 472);
    expect(p.trainable).toBe(4 * perLayer * 4 * 5);
    expect(p.attentionScores).toBe(4 * 4 * 2048 * 2048 * 4);
    // Without recompute every layer's scores (softmax outputs) are held when the backward pass starts.
    expect(p.activationsSaved).toBeGreaterThan(4 * p.attentionScores);
    expect(memoryPlan(config, { ...base, recompute: true }).activationsSaved).toBeLessThan(p.attentionScores);
  });

  it('refuses a run that cannot fit, naming what to change', () => {
    const plain = memoryPlan(config, base);
    const rec = memoryPlan(config, { ...base, recompute: true });
    // A device with room for the recomputed run only.
    const dev = { device: 'cpu' as const, total: 2 * plain.total, available: (rec.total + plain.total) / 2 };
    let message = '';
    try {
      planRun(config, base, () => {}, dev);
    } catch (err) {
      message = (err as Error).message;
    }
    expect(message).toMatch(/memory plan: this run needs about .* but .* is available on the cpu/);
    expect(message).toContain('--recompute');
    expect(message).toMatch(/a batch size of \d+ \(now 4/);
    expect(message).toMatch(/a sequence length of \d+ \(now 2048\)/);
    expect(planRun(config, { ...base, recompute: true }, () => {}, dev)).toBe(true);
  });

  it('says the memory of a CUDA device is unknown and does not refuse', () => {
    const lines: string[] = [];
    expect(planRun(config, { ...base, batchSize: 512, device: 'cuda' }, (l) => lines.push(l), { device: 'cuda', total: null, available: null })).toBeNull();
    expect(lines.join('\n')).toMatch(/device\s+unknown\s+cuda/);
  });
});

describe('--plan on the command line', () => {
  const model = join(tmp, 'model');
  const data = join(tmp, 'data.json');
  const cli = (args: string[]) => run(process.execPath, [RUN_TS, join(ROOT, 'cli/main.ts'), ...args], { maxBuffer: 16 * 2 ** 20 });

  it('fedtune train --plan prints the plan and exits 0; an impossible run is refused before loading', async () => {
    await cli(['model', 'init', '--arch', 'llama', '--out', model, '--hidden', '64', '--layers', '2', '--heads', '4', '--max-positions', '2048']);
    writeFileSync(data, JSON.stringify([{ instruction: 'hi', output: 'there' }]));
    const { stdout } = await cli(['train', '--model', model, '--data', data, '--out', join(tmp, 'out'), '--plan', '--batch-size', '2', '--max-seq-len', '512', '--recompute']);
    expect(stdout).toMatch(/memory plan:/);
    expect(stdout).toMatch(/activations \(recompute\)/);
    expect(stdout).toMatch(/LoRA \+ AdamW/);
    expect(stdout).toMatch(/total\s+\d/);
    const refused = await cli(['train', '--model', model, '--data', data, '--out', join(tmp, 'out2'), '--batch-size', '4096', '--max-seq-len', '2048', '--steps', '1']).then(
      () => null,
      (err: { code: number; stderr: string }) => err,
    );
    expect(refused).not.toBeNull();
    expect(refused!.code).not.toBe(0);
    expect(refused!.stderr).toMatch(/memory plan: this run needs about/);
    expect(refused!.stderr).toMatch(/--recompute|batch size of|sequence length of/);
  }, 60_000);

  it('fedtune worker --plan prints the plan of a task without joining', async () => {
    const { stdout } = await cli(['worker', '--coordinator', '127.0.0.1:1', '--name', 'site-a', '--model', model, '--plan', '--batch-size', '2', '--max-seq-len', '256']);
    expect(stdout).toMatch(/memory plan:/);
    expect(stdout).toMatch(/memory pattern/); // no --recompute: ONNX Runtime's preplanned block too
  }, 60_000);
});
