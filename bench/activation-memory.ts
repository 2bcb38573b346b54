/**
 * `node bin/run-ts.js bench/activation-memory.ts`: peak memory of a LoRA
 * training step against sequence length, with and without recompute
 * (gradient checkpointing per decoder layer), and the memory plan's figure
 * for each. Every configuration runs in its own child process
 * (bench/memory-probe.ts), which reports its VmHWM (/proc/self/status) after
 * two steps; "step" is that minus the high-water mark with the model loaded,
 * before any session.
 *
 *   node bin/run-ts.js bench/activation-memory.ts -- --hidden 128 --layers 4 --heads 4 --seqs 128,256,512,1024,2048
 */
import { execFileSync } from 'node:child_process';
import { resolve } from 'node:path';
import { Command } from 'commander';
import { intArg } from '../cli/args.ts';
import type { ProbeConfig, ProbeResult } from './memory-probe.ts';

const ROOT = resolve(import.meta.dirname, '..');

export function probe(c: ProbeConfig): ProbeResult {
  const out = execFileSync(process.execPath, [resolve(ROOT, 'bin/run-ts.js'), resolve(ROOT, 'bench/memory-probe.ts'), JSON.stringify(c)], {
    encoding: 'utf8',
    maxBuffer: 16 * 2 ** 20,
  });
  return JSON.parse(out.trim().split('\n').pop()!) as ProbeResult;
}

async function main(): Promise<void> {
  const o = new Command()
    .option('--arch <arch>', 'llama or gpt2', 'llama')
    .option('--hidden <n>', 'hidden size', intArg('--hidden', 8), 128)
    .option('--layers <n>', 'layers', intArg('--layers', 1), 4)
    .option('--heads <n>', 'heads', intArg('--heads', 1), 4)
    .option('--batch <n>', 'batch size', intArg('--batch', 1), 1)
    .option('--seqs <list>', 'sequence lengths', '128,256,512,1024,2048')
    .parse(process.argv.filter((a) => a !== '--'))
    .opts<{ arch: 'llama' | 'gpt2'; hidden: number; layers: number; heads: number; batch: number; seqs: string }>();
  const mib = (b: number): string => (b / 2 ** 20).toFixed(0);
  console.log(`${o.arch} hidden ${o.hidden}, ${o.layers} layers, ${o.heads} heads, batch ${o.batch}, LoRA r 8 on every module, float32 (MiB)`);
  console.log('| seq | step peak | step (above model loaded) | plan | recompute: step peak | step | plan | recompute / plain (step) |');
  console.log('| --- | --- | --- | --- | --- | --- | --- | --- |');
  for (const seq of o.seqs.split(',').map(Number)) {
    const base = { arch: o.arch, hidden: o.hidden, layers: o.layers, heads: o.heads, batch: o.batch, seq };
    const plain = probe({ ...base, recompute: false });
    const rec = probe({ ...base, recompute: true });
    const dp = plain.peak - plain.baseline;
    const dr = rec.peak - rec.baseline;
    console.log(
      `| ${seq} | ${mib(plain.peak)} | ${mib(dp)} | ${mib(plain.plan.total)} | ${mib(rec.peak)} | ${mib(dr)} | ${mib(rec.plan.total)} | ${(dr / dp).toFixed(2)} |`,
    );
  }
}

if (process.argv[1] && resolve(process.argv[1]) === resolve(ROOT, 'bench/activation-memory.ts')) {
  await main();
}
