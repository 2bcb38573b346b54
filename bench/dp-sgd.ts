/**
 * DP-SGD bench (part of `npm run bench:privacy`; alone: node bin/run-ts.js bench/dp-sgd.ts):
 *
 * 1. Step time of DP-SGD (per-example gradients and clipping in the graph,
 *    noise, AdamW) against the non-private step (summed-loss gradients, global
 *    clip, AdamW) on the demo base model (examples/models/demo-base), the same
 *    batch of demo records (batch 8).
 * 2. Held-out accuracy on the demo's three mail sites (cli/demo.ts) after
 *    in-process FedAvg (rounds x local steps, every site trains on its own
 *    records), non-private and with DP-SGD at epsilon 1, 4 and 8 (delta 1e-5)
 *    per site, sigma from the RDP accountant for the run's q and steps; and
 *    DP-SGD with sigma 0 (Poisson batches and per-example clipping only).
 *
 *   node bin/run-ts.js bench/dp-sgd.ts [-- --rounds 2 --steps 10 --batch 8 --threads 2 --q 0.1 --lr 0.005 --targets q_proj,v_proj]
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DEMO_LORA, DEMO_MAX_SEQ_LEN, DEMO_TEMPLATE, prepareDemo } from '../cli/demo.ts';
import { loadTokenizer } from '../common/tokenizer.ts';
import { loadModel } from '../worker/engine/model.ts';
import { Engine } from '../worker/engine/engine.ts';
import { dpTrainLoop, padBatchRows, trainLoop } from '../worker/engine/train.ts';
import { makeBatches } from '../worker/data/batching.ts';
import { prepareDataset } from '../worker/data/prepare.ts';
import { AdamW } from '../common/optim.ts';
import { poissonSampler } from '../common/privacy/dp-sgd.ts';
import { noiseForEpsilon } from '../common/privacy/rdp.ts';
import type { TensorMap } from '../common/tensor.ts';
import type { Example } from '../common/data/tokenize.ts';
import type { LoraConfig } from '../common/model-config.ts';

const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
};

const DELTA = 1e-5;

// ---------------------------------------------------------------------------
// sigma for a target epsilon: the run's accountant (common/privacy/rdp.ts).

type SigmaFor = (o: { sampleRate: number; steps: number; epsilon: number; delta: number }) => number;

async function sigmaSource(): Promise<{ sigmaFor: SigmaFor; name: string }> {
  return {
    name: 'common/privacy/rdp.ts noiseForEpsilon',
    sigmaFor: (o) => noiseForEpsilon({ targetEpsilon: o.epsilon, sampleRate: o.sampleRate, steps: o.steps, delta: o.delta }),
  };
}

// ---------------------------------------------------------------------------

function copy(m: TensorMap): TensorMap {
  const out: TensorMap = new Map();
  for (const [k, t] of m) out.set(k, { shape: [...t.shape], data: Float32Array.from(t.data) });
  return out;
}

/** Runs the bench; reads its options from process.argv. */
export async function runDpSgdBench(): Promise<void> {
  const rounds = arg('--rounds', 2);
  const localSteps = arg('--steps', 10);
  const batch = arg('--batch', 8);
  const threads = arg('--threads', 2);
  const q = arg('--q', 0.1);
  const timingReps = arg('--timing-steps', 5);
  const lr = arg('--lr', 0.005);
  const ti = process.argv.indexOf('--targets');
  // Few adapted modules by default: DP noise grows with the square root of the trained parameters.
  const targetModules = ti >= 0 ? process.argv[ti + 1]!.split(',') : ['q_proj', 'v_proj'];
  const dir = await mkdtemp(join(tmpdir(), 'fedtune-dpsgd-bench-'));
  try {
    const demo = await prepareDemo(dir);
    const tok = await loadTokenizer(demo.modelDir);
    const model = await loadModel(demo.modelDir);
    const lora: LoraConfig = { r: DEMO_LORA.r, alpha: DEMO_LORA.alpha, dropout: 0, targetModules };
    const engine = Engine.create(model, { mode: 'lora', lora, threads });
    const sites: Array<{ name: string; train: Example[]; eval: Example[] }> = [];
    for (const f of demo.files) {
      const tr = await prepareDataset(f.train, tok, { template: DEMO_TEMPLATE, maxSeqLen: DEMO_MAX_SEQ_LEN, seed: 0 });
      const ev = await prepareDataset(f.eval, tok, { template: DEMO_TEMPLATE, maxSeqLen: DEMO_MAX_SEQ_LEN, seed: 0 });
      sites.push({ name: f.site, train: tr.train, eval: ev.train });
    }
    const padId = tok.padId;
    const batchesOf = (ex: Example[]) => makeBatches(ex, { batchSize: batch, padId, shuffle: false, seed: 0, maxSeqLen: DEMO_MAX_SEQ_LEN });

    // 1. Step time on one batch of the same records.
    const init = engine.initParams(0);
    const fixed = sites[0]!.train.slice(0, batch);
    const fixedBatch = padBatchRows(batchesOf(fixed)[0]!, batch, padId);
    const time = async (f: () => Promise<unknown>): Promise<number> => {
      await f(); // session build and warm-up
      const t0 = performance.now();
      for (let i = 0; i < timingReps; i++) await f();
      return (performance.now() - t0) / timingReps;
    };
    const sched = { kind: 'constant' as const, baseLr: 0.002, warmupSteps: 0, totalSteps: 1 };
    const plainMs = await time(() =>
      trainLoop({ engine, params: copy(init), epochBatches: () => [fixedBatch], steps: 1, gradAccumulation: 1, optimizer: new AdamW({ lr: 0.002, weightDecay: 0 }), schedule: sched, maxGradNorm: 1 }));
    const dpMs = await time(() =>
      dpTrainLoop({ engine, params: copy(init), numRecords: 1000, sample: () => fixed.map((_, i) => i), microBatches: () => [fixedBatch], dp: { maxGradNorm: 1, noiseMultiplier: 1, sampleRate: batch / 1000 }, steps: 1, optimizer: new AdamW({ lr: 0.002, weightDecay: 0 }), schedule: sched }));
    console.log(`step time, demo-base (4 layers, hidden 128), LoRA r ${lora.r} on ${lora.targetModules.length} modules, batch ${batch} x seq ${fixedBatch.seqLen}, ${threads} threads:`);
    console.log(`  non-private ${plainMs.toFixed(1)} ms   DP-SGD ${dpMs.toFixed(1)} ms   ratio ${(dpMs / plainMs).toFixed(2)}x`);

    // 2. Accuracy after in-process FedAvg.
    const { sigmaFor, name } = await sigmaSource();
    const totalSteps = rounds * localSteps;
    const evalAll = async (params: TensorMap): Promise<number[]> => {
      const out: number[] = [];
      for (const s of sites) out.push((await engine.evaluate(params, batchesOf(s.eval))).exactMatch);
      return out;
    };
    const fedAvg = async (dp: { epsilon: number } | null): Promise<{ acc: number[]; sigmas: number[] }> => {
      let global = engine.initParams(0);
      const sigmas = sites.map((s) => (dp && Number.isFinite(dp.epsilon) ? sigmaFor({ sampleRate: q, steps: totalSteps, epsilon: dp.epsilon, delta: DELTA }) : 0));
      for (let r = 0; r < rounds; r++) {
        const updates: Array<{ params: TensorMap; n: number }> = [];
        for (const [si, s] of sites.entries()) {
          const params = copy(global);
          const optimizer = new AdamW({ lr, weightDecay: 0 });
          const schedule = { kind: 'constant' as const, baseLr: lr, warmupSteps: 0, totalSteps: localSteps };
          if (dp) {
            await dpTrainLoop({
              engine, params, numRecords: s.train.length, sample: poissonSampler(s.train.length, q, 1000 * r + si),
              microBatches: (idx) => batchesOf(idx.map((i) => s.train[i]!)).map((b) => padBatchRows(b, batch, padId)),
              dp: { maxGradNorm: 1, noiseMultiplier: sigmas[si]!, sampleRate: q }, steps: localSteps, optimizer, schedule,
            });
          } else {
            await trainLoop({
              engine, params, epochBatches: (e) => makeBatches(s.train, { batchSize: batch, padId, shuffle: true, seed: 1000 * r + 10 * si + e, maxSeqLen: DEMO_MAX_SEQ_LEN }),
              steps: localSteps, gradAccumulation: 1, optimizer, schedule, maxGradNorm: 1,
            });
          }
          updates.push({ params, n: s.train.length });
        }
        const total = updates.reduce((a, u) => a + u.n, 0);
        global = new Map([...global].map(([k, t]) => {
          const d = new Float32Array(t.data.length);
          for (const u of updates) {
            const x = u.params.get(k)!.data;
            for (let i = 0; i < d.length; i++) d[i]! += (u.n / total) * x[i]!;
          }
          return [k, { shape: [...t.shape], data: d }];
        }));
      }
      return { acc: await evalAll(global), sigmas };
    };
    const base = await evalAll(engine.initParams(0));
    console.log(`\naccuracy (exact match) on each site's held-out emails, FedAvg ${rounds} rounds x ${localSteps} local steps, batch ${batch}, AdamW lr ${lr}, LoRA r ${lora.r} on ${targetModules.join(',')}`);
    console.log(`DP-SGD: q ${q} (expected batch q N), C 1, delta ${DELTA}, ${totalSteps} steps per site; sigma from ${name}`);
    console.log(`sites: ${sites.map((s) => `${s.name} (${s.train.length} train / ${s.eval.length} eval)`).join(', ')}`);
    const fmt = (a: number[]) => `${a.map((x) => x.toFixed(3)).join('  ')}   mean ${(a.reduce((s, x) => s + x, 0) / a.length).toFixed(3)}`;
    console.log(`  base model           ${fmt(base)}`);
    const plain = await fedAvg(null);
    console.log(`  non-private          ${fmt(plain.acc)}`);
    // Poisson batches and per-example clipping without noise (epsilon unbounded): what clipping alone costs.
    const clipOnly = await fedAvg({ epsilon: Infinity });
    console.log(`  DP-SGD, sigma 0      ${fmt(clipOnly.acc)}`);
    for (const epsilon of [8, 4, 1]) {
      const r = await fedAvg({ epsilon });
      console.log(`  eps ${String(epsilon).padEnd(2)} (sigma ${r.sigmas[0]!.toFixed(2)})  ${fmt(r.acc)}`);
    }
    await engine.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

if (import.meta.url === `file://${process.argv[1]}` || process.argv[1]?.endsWith('bench/dp-sgd.ts')) {
  runDpSgdBench().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
