/**
 * The exec trainer with a real coordinator and real `fedtune worker`
 * processes: an update written by a stand-in script is averaged with a
 * built-in onnx worker's exactly as FedAvg says; broken scripts (exit 1,
 * garbage output, a wrong-shaped adapter, a hang past the deadline) are clear
 * task failures after which the worker trains the next round; and
 * examples/trainers/torch_lora.py (PyTorch) trains next to the onnx trainer,
 * evaluates to the same loss as fedtune's engine and keeps FFA-LoRA's A fixed.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { RunEvent } from '../../common/events.ts';
import { initLoraAdapter, loraTargets } from '../../common/lora.ts';
import { readPeftAdapter } from '../../common/peft.ts';
import type { TensorMap } from '../../common/tensor.ts';
import type { LocalTrainingSpec } from '../../worker/trainers/trainer.ts';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { Engine } from '../../worker/engine/engine.ts';
import { loadModel } from '../../worker/engine/model.ts';
import { makeBatches } from '../../worker/data/batching.ts';
import { prepareDataset } from '../../worker/data/prepare.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { createExecTrainer, prepareTaskDir, readOutputAdapter, splitCommand } from '../../worker/trainers/exec.ts';
import { distConfig, distWorker, tinyLlama, writeDataset } from './distributed-helpers.ts';
import { ROOT, events, runConfig, tempDir, tinyModel, waitForEvent, worker, writeData, type Proc } from './federated-helpers.ts';

const PY = existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
const TORCH_SCRIPT = join(ROOT, 'examples', 'trainers', 'torch_lora.py');
const hasTorch = spawnSync(PY, ['-c', 'import torch, numpy'], { stdio: 'ignore' }).status === 0;
if (!hasTorch && process.env.CI === 'true') throw new Error(`CI needs PyTorch for the exec trainer tests: ${PY} -c "import torch, numpy" fails (apt-get install python3-torch python3-numpy)`);
if (!hasTorch) console.log(`exec-trainer: skipping the PyTorch tests: ${PY} -c "import torch, numpy" fails (apt-get install python3-torch python3-numpy)`);

const procs: Proc[] = [];
let coord: CoordinatorHandle | null = null;

afterEach(async () => {
  for (const p of procs.splice(0)) p.kill();
  await coord?.close();
  coord = null;
});

/**
 * A stand-in training script, standard library only. Behaviour by argv[1]:
 *   good DELTA N      output = global + DELTA * (i % 7 + 1) per element, num_examples N
 *   by-round DELTA N  round 1 exits 1, round 2 garbage + broken metrics.json,
 *                     round 3 a wrong-shaped adapter, round 4 hangs ignoring SIGTERM, later rounds good
 */
const FAKE = String.raw`
import json, os, signal, struct, sys, time, array
def read_st(path):
    data = open(path, 'rb').read()
    n = struct.unpack('<Q', data[:8])[0]
    h = json.loads(data[8:8 + n]); base = 8 + n
    out = {}
    for k, e in h.items():
        if k == '__metadata__': continue
        a = array.array('f'); a.frombytes(data[base + e['data_offsets'][0]:base + e['data_offsets'][1]])
        out[k] = (e['shape'], a)
    return out
def write_st(path, tensors):
    header, blobs, off = {}, [], 0
    for k in sorted(tensors):
        shape, a = tensors[k]; b = a.tobytes()
        header[k] = {'dtype': 'F32', 'shape': shape, 'data_offsets': [off, off + len(b)]}
        blobs.append(b); off += len(b)
    h = json.dumps(header).encode(); h += b' ' * ((8 - len(h) % 8) % 8)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(h))); f.write(h); [f.write(b) for b in blobs]
task = sys.argv[sys.argv.index('--task-dir') + 1]
assert task == os.environ['FEDTUNE_TASK_DIR']
spec = json.load(open(os.environ['FEDTUNE_SPEC']))
mode, delta, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rnd = spec['round']
act = 'good' if mode == 'good' or rnd >= 5 else ['exit1', 'garbage', 'shape', 'hang'][rnd - 1]
g = read_st(os.path.join(os.environ['FEDTUNE_GLOBAL_ADAPTER'], 'adapter_model.safetensors'))
out = os.environ['FEDTUNE_OUTPUT_ADAPTER']
print('fake: starting round %d (%s)' % (rnd, act), file=sys.stderr, flush=True)
if act == 'exit1':
    for i in range(30): print('fake: noise line %d' % i, file=sys.stderr)
    print('fake: round 1 fails on purpose', file=sys.stderr); sys.exit(1)
if act == 'hang':
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.path.join(os.path.dirname(task), 'hang.pid'), 'w').write(str(os.getpid()))
    print('fake: sleeping past the deadline', file=sys.stderr, flush=True)
    time.sleep(600)
print('this line is not JSON', flush=True)
print('{"step": "one", "total_steps": 3, "loss": 1}', flush=True)
print('{broken json', flush=True)
for s in (1, 2, 3): print(json.dumps({'step': s, 'total_steps': 3, 'loss': 0.25 * (4 - s), 'tokens_per_sec': 100.0, 'examples': s}), flush=True)
res = {}
for k, (shape, a) in g.items():
    res[k] = (shape, array.array('f', [x + delta * (i % 7 + 1) for i, x in enumerate(a)]))
if act == 'shape':
    k = sorted(x for x in res if 'lora_B' in x)[0]
    shape, a = res[k]; res[k] = ([shape[0] - 1, shape[1]], a[:(shape[0] - 1) * shape[1]])
write_st(os.path.join(out, 'adapter_model.safetensors'), res)
cfg = json.load(open(os.path.join(os.environ['FEDTUNE_GLOBAL_ADAPTER'], 'adapter_config.json')))
json.dump(cfg, open(os.path.join(out, 'adapter_config.json'), 'w'))
if act == 'garbage':
    open(os.environ['FEDTUNE_METRICS'], 'w').write('{"num_examples": %d, "train_loss": ' % n)
    print('fake: wrote a broken metrics.json', file=sys.stderr); sys.exit(0)
json.dump({'num_examples': n, 'train_loss': 0.25}, open(os.environ['FEDTUNE_METRICS'], 'w'))
print('fake: wrote a %s adapter' % ('wrong-shaped' if act == 'shape' else 'good'), file=sys.stderr)
`;

function writeFake(dir: string): string {
  const p = join(dir, 'fake_trainer.py');
  writeFileSync(p, FAKE);
  return p;
}

function ofType<T extends RunEvent['type']>(evs: RunEvent[], type: T): Array<Extract<RunEvent, { type: T }>> {
  return evs.filter((e): e is Extract<RunEvent, { type: T }> => e.type === type);
}

/** Task directories kept under `workDir` (--exec-keep), train tasks of `round`. */
function keptTaskDirs(workDir: string, round: number): string[] {
  return readdirSync(workDir)
    .filter((d) => d.startsWith(`train-r${round}-`))
    .map((d) => join(workDir, d));
}

function maxAbsDiff(a: TensorMap, b: TensorMap): number {
  let m = 0;
  for (const [k, t] of a) {
    const u = b.get(k)!;
    expect(u.shape).toEqual(t.shape);
    for (let i = 0; i < t.data.length; i++) m = Math.max(m, Math.abs(t.data[i]! - u.data[i]!));
  }
  return m;
}

describe('exec trainer: command line', () => {
  it('splits --exec like sh splits plain words and refuses what needs a shell', () => {
    expect(splitCommand(`/usr/bin/python3 'my dir/train.py' --lr "1e-3" a\\ b`)).toEqual(['/usr/bin/python3', 'my dir/train.py', '--lr', '1e-3', 'a b']);
    expect(splitCommand(`sh -c 'python3 t.py | tee log'`)).toEqual(['sh', '-c', 'python3 t.py | tee log']);
    expect(() => splitCommand('python3 t.py > log')).toThrow(/">" at character 14 .* needs a shell/);
    expect(() => splitCommand(`python3 'unterminated`)).toThrow(/unterminated ' quote/);
    expect(() => splitCommand('   ')).toThrow(/--exec is empty/);
  });
});

describe('exec trainer: creation, evaluation switch, cancellation', () => {
  it('counts records, refuses evaluation with --exec-no-eval, names a missing program, and stops a cancelled script with SIGTERM', { timeout: 60_000 }, async () => {
    const dir = tempDir('exec-unit');
    const modelDir = await tinyModel(join(dir, 'model'));
    const data = writeData(join(dir, 'd.jsonl'), 7, 'u');
    const evalData = writeData(join(dir, 'e.jsonl'), 3, 'u');
    const base = { modelDir, dataPath: data, evalPath: evalData, evalFraction: 0.2, template: 'plain', maxSeqLen: 64, seed: 0 };
    const spec = localSpec({ lora: { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj'] }, template: 'plain', maxSeqLen: 64, batchSize: 2 });
    const m = await loadModel(modelDir);
    const global = initLoraAdapter(loraTargets(m.config, spec.lora), 2, 1);

    await expect(createExecTrainer({ ...base, exec: { command: 'no-such-trainer-program --x' } })).rejects.toThrow(/"no-such-trainer-program" is not on PATH/);

    const off = await createExecTrainer({ ...base, exec: { command: `${PY} -c pass`, noEval: true } });
    expect(off.numTrainExamples).toBe(7);
    expect(off.numEvalExamples).toBe(0);
    await expect(off.evaluate({ globalAdapter: global, spec, signal: new AbortController().signal })).rejects.toThrow(/evaluation is turned off on this worker \(--exec-no-eval\)/);
    await off.close();

    // A script that stops on SIGTERM: the task fails at once (well within the grace period) saying so.
    const sleeper = join(dir, 'sleeper.py');
    writeFileSync(sleeper, "import sys, time\nprint('sleeper: waiting', file=sys.stderr, flush=True)\ntime.sleep(600)\n");
    const tr = await createExecTrainer({ ...base, exec: { command: `${PY} ${sleeper}`, graceSec: 30, workDir: join(dir, 'work') } });
    expect(tr.numEvalExamples).toBe(3);
    const ac = new AbortController();
    const t0 = Date.now();
    const running = tr.train({ taskId: 't', runId: 'r', round: 2, globalAdapter: global, spec, signal: ac.signal, onProgress: () => {} });
    await new Promise((r) => setTimeout(r, 1500));
    ac.abort(new Error('cancelled by the test'));
    await expect(running).rejects.toThrow(/round 2 training command .* was stopped because cancelled by the test; it exited on SIGTERM\nlast stderr lines:\nsleeper: waiting$/);
    expect(Date.now() - t0).toBeLessThan(15_000);
    expect(readdirSync(join(dir, 'work'))).toEqual([]);
    await tr.close();
  });
});

/**
 * A script that keeps a counter in paths.optimizer_state (as a trainer keeps its optimizer there): it
 * reports how many earlier tasks left one (seen) and whether it got a directory (given), and returns
 * the global adapter unchanged. With a file named "forget" next to it, it leaves the directory empty.
 */
const STATEFUL = String.raw`
import json, os, shutil, sys
task = sys.argv[sys.argv.index('--task-dir') + 1]
spec = json.load(open(os.path.join(task, 'spec.json')))
state = spec['paths']['optimizer_state']
assert (state or '') == os.environ['FEDTUNE_OPTIMIZER_STATE']
seen = 0
if state:
    f = os.path.join(state, 'count')
    seen = int(open(f).read()) if os.path.exists(f) else 0
    if not os.path.exists(os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), 'forget')):
        open(f, 'w').write(str(seen + 1))
for name in ('adapter_model.safetensors', 'adapter_config.json'):
    shutil.copy(os.path.join(spec['paths']['global_adapter'], name), spec['paths']['output_adapter'])
json.dump({'num_examples': 1, 'train_loss': 0.5, 'seen': seen, 'given': 1 if state else 0}, open(spec['paths']['metrics'], 'w'))
`;

describe('exec trainer: optimizer state (training.optimizer_scope run)', () => {
  it('hands the command a directory that outlives its task, afresh when the run or the adapter changes, after a failure, and when the command left it empty', { timeout: 60_000 }, async () => {
    const dir = tempDir('exec-state');
    const modelDir = await tinyModel(join(dir, 'model'));
    const data = writeData(join(dir, 'd.jsonl'), 4, 's');
    const script = join(dir, 'stateful.py');
    writeFileSync(script, STATEFUL);
    const spec = localSpec({ lora: { r: 2, alpha: 4, dropout: 0, targetModules: ['q_proj'] }, template: 'plain', maxSeqLen: 64, batchSize: 2 });
    const m = await loadModel(modelDir);
    const global = initLoraAdapter(loraTargets(m.config, spec.lora), 2, 1);
    const wider = initLoraAdapter(loraTargets(m.config, { ...spec.lora, r: 4 }), 4, 1);
    const work = join(dir, 'work');
    const tr = await createExecTrainer({ modelDir, dataPath: data, evalPath: '', evalFraction: 0, template: 'plain', maxSeqLen: 64, seed: 0, exec: { command: `${PY} ${script}`, workDir: work } });
    let round = 0;
    const train = (o: { keep?: boolean; runId?: string; adapter?: TensorMap } = {}) =>
      tr.train({
        taskId: `t${++round}`,
        runId: o.runId ?? 'run-1',
        round,
        globalAdapter: o.adapter ?? global,
        spec: { ...spec, ...(o.adapter === wider ? { lora: { ...spec.lora, r: 4, alpha: 8 } } : {}), keepOptimizerState: o.keep ?? true },
        signal: new AbortController().signal,
        onProgress: () => {},
      });
    const seen = async (o?: Parameters<typeof train>[0]): Promise<[number, number]> => {
      const r = await train(o);
      return [r.metrics.seen!, r.metrics.given!];
    };
    expect(await seen()).toEqual([0, 1]);
    expect(await seen()).toEqual([1, 1]);
    expect(await seen()).toEqual([2, 1]); // the same directory, task after task
    expect(await seen({ runId: 'run-2' })).toEqual([0, 1]); // another run: afresh
    expect(await seen({ runId: 'run-2' })).toEqual([1, 1]);
    expect(await seen({ runId: 'run-2', adapter: wider })).toEqual([0, 1]); // another rank: afresh
    expect(readdirSync(work).filter((d) => d.startsWith('optimizer-state-'))).toHaveLength(1); // the old ones are removed

    // A command that leaves the directory empty fails the task naming the field, and the next task starts afresh.
    writeFileSync(join(dir, 'forget'), '');
    await expect(train({ runId: 'run-3' })).rejects.toThrow(/training\.optimizer_scope is 'run', but the command left paths\.optimizer_state \(.*optimizer-state-.*, also FEDTUNE_OPTIMIZER_STATE\) empty: save the optimizer's state there/);
    rmSync(join(dir, 'forget'));
    expect(await seen({ runId: 'run-3' })).toEqual([0, 1]);
    expect(await seen({ runId: 'run-3' })).toEqual([1, 1]);
    // optimizer_scope round: no directory (paths.optimizer_state null, FEDTUNE_OPTIMIZER_STATE empty), and the kept one is dropped.
    expect(await seen({ keep: false })).toEqual([0, 0]);
    expect(readdirSync(work).filter((d) => d.startsWith('optimizer-state-'))).toEqual([]);
    expect(await seen({ runId: 'run-3' })).toEqual([0, 1]);
    await tr.close();
    expect(readdirSync(work)).toEqual([]);
  });
});

describe('exec trainer in a federated round', () => {
  it("an exec worker's update and an onnx worker's update are averaged by example count", { timeout: 120_000 }, async () => {
    const dir = tempDir('exec-avg');
    const model = await tinyModel(join(dir, 'model'));
    const base = { training: { steps: 2, batch_size: 4, lr: 0.02, max_seq_len: 128, template: 'plain' }, eval: { every: 0 }, round: { deadline_sec: 60 } };
    const onnxData = writeData(join(dir, 'onnx.jsonl'), 8, 'onnx');

    // The onnx worker alone first: FedAvg of one update is that update, so this run's global is a2.
    coord = await startCoordinator(runConfig(dir, model, { ...base, name: 'alone', cohort: { min_workers: 1 } }));
    procs.push(worker({ address: coord.address, site: 'onnx', data: onnxData, model, trainer: 'onnx', extra: ['--eval-fraction', '0'] }));
    expect((await coord.run).state).toBe('completed');
    const a2 = (await readPeftAdapter(join(coord.runDir, 'round-0001'))).adapter;
    const init = (await readPeftAdapter(join(coord.runDir, 'round-0000'))).adapter;
    expect(maxAbsDiff(a2, init)).toBeGreaterThan(1e-4);
    await coord.close();
    for (const p of procs.splice(0)) p.kill();

    // Both together, from the same initial adapter (same training.seed).
    coord = await startCoordinator(runConfig(dir, model, { ...base, name: 'both', cohort: { min_workers: 2 }, round: { min_results: 2, deadline_sec: 60 } }));
    const workDir = join(dir, 'exec-work');
    const fake = writeFake(dir);
    const n1 = 5;
    procs.push(worker({ address: coord.address, site: 'onnx', data: onnxData, model, trainer: 'onnx', extra: ['--eval-fraction', '0'] }));
    const ex = worker({
      address: coord.address,
      site: 'exec',
      data: writeData(join(dir, 'exec.jsonl'), 6, 'exec'),
      model,
      trainer: 'exec',
      extra: ['--exec', `${PY} ${fake} good 0.001 ${n1}`, '--exec-workdir', workDir, '--exec-keep'],
    });
    procs.push(ex);
    const done = await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1);
    expect((await coord.run).state).toBe('completed');
    const evs = await events(coord.bus, coord.runId);
    const got = ofType(evs, 'update.received');
    expect(got.map((e) => e.site).sort()).toEqual(['exec', 'onnx']);
    const n2 = got.find((e) => e.site === 'onnx')!.examples;
    expect(n2).toBe(8);
    expect(got.find((e) => e.site === 'exec')!.examples).toBe(n1);
    expect(got.find((e) => e.site === 'exec')!.metrics.train_loss).toBe(0.25);
    expect(done.examples).toBe(n1 + n2);
    // Progress lines became progress events; the rest of stdout was only logged.
    const prog = ofType(evs, 'worker.progress').filter((e) => e.site === 'exec');
    expect(prog.at(-1)).toMatchObject({ step: 3, totalSteps: 3, loss: 0.25 });
    expect(ex.out()).toMatch(/this line is not JSON/);
    expect(ex.out()).toMatch(/\{broken json/);

    // The kept task dir: global/ is the initial adapter, output/ is global + the known delta.
    const [taskDir] = keptTaskDirs(workDir, 1);
    expect(taskDir).toBeDefined();
    const spec = JSON.parse(readFileSync(join(taskDir!, 'spec.json'), 'utf8'));
    expect(spec).toMatchObject({ mode: 'train', round: 1, steps: 2, batch_size: 4, lr: 0.02, template: 'plain', max_seq_len: 128, prox_mu: 0, freeze_lora_a: false, num_train_records: 6 });
    // training.schedule_scope defaults to 'run': round 1 of a schedule over the run's 1 round.
    expect(spec).toMatchObject({ schedule_round: 1, schedule_rounds: 1 });
    expect(spec.lora).toEqual({ r: 8, alpha: 16, dropout: 0, target_modules: ['q_proj', 'v_proj'], use_rslora: false, use_dora: false });
    expect(spec.lora_plus_ratio).toBe(1);
    expect(maxAbsDiff((await readPeftAdapter(join(taskDir!, 'global'))).adapter, init)).toBe(0);
    const a1 = (await readPeftAdapter(join(taskDir!, 'output'))).adapter;
    for (const [k, t] of a1) {
      const g = init.get(k)!;
      for (const i of [0, 1, 6, t.data.length - 1]) expect(t.data[i]).toBeCloseTo(g.data[i]! + 0.001 * ((i % 7) + 1), 6);
    }

    // The round's global adapter is (n1 a1 + n2 a2) / (n1 + n2), element by element.
    const global = (await readPeftAdapter(join(coord.runDir, 'round-0001'))).adapter;
    const mean: TensorMap = new Map();
    for (const [k, t] of a1) {
      const u = a2.get(k)!;
      mean.set(k, { shape: t.shape, data: Float32Array.from(t.data, (x, i) => (n1 * x + n2 * u.data[i]!) / (n1 + n2)) });
    }
    expect(maxAbsDiff(global, mean)).toBeLessThan(1e-6);
    // ... and differs from either update alone.
    expect(maxAbsDiff(global, a1)).toBeGreaterThan(1e-5);
    expect(maxAbsDiff(global, a2)).toBeGreaterThan(1e-5);
  });

  it('exit 1, garbage output with a broken metrics.json, a wrong-shaped adapter and a hang past the deadline: each a clear task failure, then the worker trains again', { timeout: 120_000 }, async () => {
    const dir = tempDir('exec-fail');
    const model = await tinyModel(join(dir, 'model'));
    const deadline = 4;
    coord = await startCoordinator(
      runConfig(dir, model, {
        name: 'fail',
        rounds: 5,
        training: { steps: 2, batch_size: 2, max_seq_len: 128, template: 'plain' },
        cohort: { min_workers: 2 },
        round: { min_results: 1, deadline_sec: deadline },
        eval: { every: 0 },
      }),
    );
    const workDir = join(dir, 'exec-work');
    const fake = writeFake(dir);
    procs.push(worker({ address: coord.address, site: 'steady', data: writeData(join(dir, 'steady.jsonl'), 6, 'steady'), model, extra: ['--eval-fraction', '0'] }));
    const ex = worker({
      address: coord.address,
      site: 'exec',
      data: writeData(join(dir, 'exec.jsonl'), 6, 'exec'),
      model,
      trainer: 'exec',
      extra: ['--exec', `${PY} ${fake} by-round 0.001 3`, '--exec-workdir', workDir, '--exec-grace-sec', '1'],
    });
    procs.push(ex);
    const result = await coord.run;
    expect(result.state).toBe('completed');
    const evs = await events(coord.bus, coord.runId);
    const errors = ofType(evs, 'worker.error').filter((e) => e.site === 'exec').map((e) => e.message);
    expect(errors).toHaveLength(4);
    const [exit1, garbage, shape, hang] = errors as [string, string, string, string];

    expect(exit1).toMatch(/round 1 training command `.*fake_trainer\.py by-round 0\.001 3` exited with code 1 after [\d.]+ s\nlast stderr lines:\n/);
    expect(exit1.endsWith('fake: round 1 fails on purpose')).toBe(true);
    // Only the tail of stderr is quoted: 20 lines at most.
    const quoted = exit1.split('last stderr lines:\n')[1]!.split('\n');
    expect(quoted).toHaveLength(20);
    expect(quoted[0]).toBe('fake: noise line 11');

    expect(garbage).toMatch(/round 2 training command .* exited 0 but its output is not usable: metrics\.json \(.*metrics\.json\) is not valid JSON/);
    expect(garbage.endsWith('fake: wrote a broken metrics.json')).toBe(true);

    expect(shape).toMatch(/round 3 training command .* exited 0 but its output is not usable: .*adapter_model\.safetensors: adapter does not match the LoRA configuration/);
    expect(shape).toMatch(/q_proj\.lora_B\.weight: expected shape \[32, 8\], got \[31, 8\]/);
    expect(shape.endsWith('fake: wrote a wrong-shaped adapter')).toBe(true);

    expect(hang).toMatch(new RegExp(`^task \\S+: cancelled: round 4 deadline of ${deadline} s passed; round 4 training command .* was stopped because round 4 deadline of ${deadline} s passed; it did not exit within --exec-grace-sec 1 s of SIGTERM and was killed \\(SIGKILL\\)\\nlast stderr lines:\\n`));
    expect(hang.endsWith('fake: sleeping past the deadline')).toBe(true);
    // The hung script is gone (its whole process group was killed).
    const pid = Number(readFileSync(join(workDir, 'hang.pid'), 'utf8'));
    expect(() => process.kill(pid, 0)).toThrow();

    // Every round completed; the exec worker's update arrived in round 5 and it never left.
    expect(ofType(evs, 'round.completed').map((e) => e.round)).toEqual([1, 2, 3, 4, 5]);
    expect(ofType(evs, 'update.received').filter((e) => e.site === 'exec').map((e) => e.round)).toEqual([5]);
    expect(ofType(evs, 'worker.left').filter((e) => e.site === 'exec' && e.reason !== 'run completed')).toEqual([]);
    expect(ofType(evs, 'worker.joined').filter((e) => e.worker.site === 'exec')).toHaveLength(1);
    // Task directories are removed without --exec-keep.
    expect(readdirSync(workDir).filter((d) => d.startsWith('train-'))).toEqual([]);
    expect(await ex.exited).toBe(0);
  });
});

describe('exec trainer in a distributed run', () => {
  it('refuses step tasks, saying it supports federated rounds only', { timeout: 60_000 }, async () => {
    const dir = tempDir('exec-dist');
    const model = await tinyLlama(join(dir, 'model'));
    coord = await startCoordinator(distConfig(dir, model, writeDataset(join(dir, 'ds.jsonl'), 8), { name: 'dist-exec' }));
    const w = distWorker(coord.address, 'exec', model, ['--trainer', 'exec', '--exec', `${PY} -c pass`, '--exec-workdir', join(dir, 'work')]);
    procs.push(w);
    const err = await waitForEvent(coord.bus, coord.runId, 'worker.error', (e) => e.site === 'exec');
    expect(err.message).toMatch(/the exec trainer supports federated rounds only: it can neither compute gradients nor take local steps, which distributed runs need \(use --trainer onnx\)/);
  });
});

describe.skipIf(!hasTorch)('examples/trainers/torch_lora.py (PyTorch)', () => {
  it('evaluates a LoRA adapter to the same loss and token count as fedtune\'s engine (llama and qwen2, three templates)', { timeout: 120_000 }, async () => {
    const dir = tempDir('torch-eval');
    const data = join(dir, 'data.jsonl');
    const recs = [
      { instruction: 'Repeat the word apple.', input: '', output: 'apple' },
      { instruction: 'Name a colour.', input: 'Think of the sky', output: "blue, it's blue" },
      { messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi there #3?' }, { role: 'assistant', content: 'Hello 42!' }] },
      { text: 'plain text, every token trained' },
      { instruction: 'Count to three', output: '1 2 3' },
    ];
    writeFileSync(data, recs.map((r) => JSON.stringify(r)).join('\n'));
    for (const arch of ['llama', 'qwen2'] as const) {
      const modelDir = join(dir, arch);
      const { initModel } = await import('../../worker/engine/init.ts');
      await initModel(modelDir, { arch, hiddenSize: 32, numLayers: 2, numHeads: 4, numKvHeads: 2, maxPositions: 512, seed: 5 });
      const m = await loadModel(modelDir);
      const tok = await loadTokenizer(modelDir);
      const lora = { r: 4, alpha: 8, dropout: 0, targetModules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] };
      const adapter = initLoraAdapter(loraTargets(m.config, lora), 4, 11);
      // Non-zero B, so that the LoRA path changes the logits.
      for (const [k, t] of adapter) if (k.includes('lora_B')) for (let i = 0; i < t.data.length; i++) t.data[i] = 0.3 * Math.sin(1.7 * i + k.length);
      const engine = Engine.create(m, { mode: 'lora', lora, seed: 0 });
      try {
        for (const template of ['alpaca', 'chatml', 'plain']) {
          const spec = localSpec({ lora, template, maxSeqLen: 320, batchSize: 2 });
          const task = await prepareTaskDir({ workDir: join(dir, 'work'), mode: 'eval', taskId: 'eval', round: 0, globalAdapter: adapter, spec, modelDir, dataPath: data, evalPath: data, template, maxSeqLen: 320, numTrainRecords: recs.length, numEvalRecords: recs.length });
          const r = spawnSync(PY, [TORCH_SCRIPT, '--task-dir', task.dir], { encoding: 'utf8', env: { ...process.env, ...task.env } });
          expect(r.stderr).toBe('');
          expect(r.status).toBe(0);
          const py = JSON.parse(readFileSync(task.env.FEDTUNE_EVAL_OUTPUT, 'utf8'));
          const ds = await prepareDataset(data, tok, { template, maxSeqLen: 320 });
          const ev = await engine.evaluate(adapter, makeBatches(ds.train, { batchSize: 2, padId: tok.padId, shuffle: false, seed: 0, maxSeqLen: 320 }));
          expect(py.eval_tokens).toBe(ev.tokens);
          expect(py.eval_examples).toBe(ev.examples);
          expect(Math.abs(py.eval_loss - ev.loss)).toBeLessThan(1e-5);
          expect(py.eval_accuracy).toBe(ev.exactMatch);
        }
        // Without the LoRA path the loss differs: the adapter was really applied.
        const zeroB: TensorMap = new Map([...adapter].map(([k, t]) => [k, k.includes('lora_B') ? { shape: t.shape, data: new Float32Array(t.data.length) } : t]));
        const ds = await prepareDataset(data, tok, { template: 'plain', maxSeqLen: 320 });
        const batches = makeBatches(ds.train, { batchSize: 2, padId: tok.padId, shuffle: false, seed: 0, maxSeqLen: 320 });
        expect(Math.abs((await engine.evaluate(zeroB, batches)).loss - (await engine.evaluate(adapter, batches)).loss)).toBeGreaterThan(1e-3);
      } finally {
        await engine.close();
      }
    }
  });

  it('honours rsLoRA, rank_pattern, alpha_pattern, layers_to_transform and LoRA+, and refuses DoRA by name', { timeout: 120_000 }, async () => {
    const dir = tempDir('torch-variants');
    const modelDir = join(dir, 'model');
    const { initModel } = await import('../../worker/engine/init.ts');
    await initModel(modelDir, { arch: 'llama', hiddenSize: 32, numLayers: 3, numHeads: 4, numKvHeads: 2, maxPositions: 256, seed: 9 });
    const data = writeData(join(dir, 'd.jsonl'), 6, 'variants');
    const m = await loadModel(modelDir);
    const tok = await loadTokenizer(modelDir);
    const lora: LocalTrainingSpec['lora'] = {
      r: 4,
      alpha: 8,
      dropout: 0,
      targetModules: ['q_proj', 'v_proj', 'down_proj'],
      useRslora: true,
      rankPattern: { 'layers.2.self_attn.v_proj': 6, v_proj: 2 },
      alphaPattern: { down_proj: 20 },
      layersToTransform: [0, 2],
    };
    const adapter = initLoraAdapter(loraTargets(m.config, lora), undefined, 4);
    for (const [k, t] of adapter) if (k.includes('lora_B')) for (let i = 0; i < t.data.length; i++) t.data[i] = 0.3 * Math.sin(1.3 * i + k.length);
    const engine = Engine.create(m, { mode: 'lora', lora, seed: 0 });
    try {
      const spec = localSpec({ lora, template: 'plain', maxSeqLen: 128, batchSize: 2 });
      const ev = await prepareTaskDir({ workDir: join(dir, 'work'), mode: 'eval', taskId: 'e', round: 0, globalAdapter: adapter, spec, modelDir, dataPath: data, evalPath: data, template: 'plain', maxSeqLen: 128, numTrainRecords: 6, numEvalRecords: 6 });
      const r = spawnSync(PY, [TORCH_SCRIPT, '--task-dir', ev.dir], { encoding: 'utf8', env: { ...process.env, ...ev.env } });
      expect(r.status, r.stderr).toBe(0);
      const py = JSON.parse(readFileSync(ev.env.FEDTUNE_EVAL_OUTPUT, 'utf8'));
      const ds = await prepareDataset(data, tok, { template: 'plain', maxSeqLen: 128 });
      const batches = makeBatches(ds.train, { batchSize: 2, padId: tok.padId, shuffle: false, seed: 0, maxSeqLen: 128 });
      const ours = await engine.evaluate(adapter, batches);
      expect(Math.abs(py.eval_loss - ours.loss)).toBeLessThan(1e-5);
      // The variants matter: the same tensors read as plain LoRA at alpha / r give another loss.
      const plain = Engine.create(m, { mode: 'lora', lora: { ...lora, useRslora: false, alphaPattern: undefined }, seed: 0 });
      expect(Math.abs((await plain.evaluate(adapter, batches)).loss - ours.loss)).toBeGreaterThan(1e-3);
      await plain.close();
    } finally {
      await engine.close();
    }
    // LoRA+: one step from B = 0 moves every B entry by at most lr * ratio, and some by that much (A's gradient is 0).
    const zeroB = initLoraAdapter(loraTargets(m.config, lora), undefined, 4);
    const lr = 0.01;
    const ratio = 8;
    const spec = { ...localSpec({ lora, template: 'plain', maxSeqLen: 128, batchSize: 3 }), steps: 1, lr, maxGradNorm: 0, loraPlusRatio: ratio };
    const task = await prepareTaskDir({ workDir: join(dir, 'work'), mode: 'train', taskId: 't', round: 1, globalAdapter: zeroB, spec, modelDir, dataPath: data, evalPath: '', template: 'plain', maxSeqLen: 128, numTrainRecords: 6, numEvalRecords: 0 });
    const t = spawnSync(PY, [TORCH_SCRIPT, '--task-dir', task.dir], { encoding: 'utf8', env: { ...process.env, ...task.env } });
    expect(t.status, t.stderr).toBe(0);
    const out = await readOutputAdapter(task.env.FEDTUNE_OUTPUT_ADAPTER, zeroB, spec, m.config);
    let maxB = 0;
    for (const [k, x] of out) if (k.includes('lora_B')) for (const v of x.data) maxB = Math.max(maxB, Math.abs(v));
    expect(maxB).toBeLessThanOrEqual(lr * ratio * 1.001);
    expect(maxB).toBeGreaterThan(lr * ratio * 0.99);
    // DoRA is refused by name, not trained as plain LoRA.
    const doraLora = { ...lora, useDora: true };
    const doraAdapter: TensorMap = new Map(zeroB);
    for (const t of loraTargets(m.config, doraLora)) doraAdapter.set(`base_model.model.${t.module}.lora_magnitude_vector`, { shape: [t.outFeatures], data: new Float32Array(t.outFeatures).fill(1) });
    const dora = await prepareTaskDir({ workDir: join(dir, 'work'), mode: 'train', taskId: 'd', round: 1, globalAdapter: doraAdapter, spec: { ...spec, lora: doraLora }, modelDir, dataPath: data, evalPath: '', template: 'plain', maxSeqLen: 128, numTrainRecords: 6, numEvalRecords: 0 });
    const d = spawnSync(PY, [TORCH_SCRIPT, '--task-dir', dora.dir], { encoding: 'utf8', env: { ...process.env, ...dora.env } });
    expect(d.status).toBe(1);
    expect(d.stderr).toMatch(/lora\.use_dora is true, but this trainer implements plain LoRA and rsLoRA only/);
  });

  it('writes a valid PEFT adapter; freeze_lora_a keeps every lora_A; prox_mu adds its term', { timeout: 120_000 }, async () => {
    const dir = tempDir('torch-ffa');
    const modelDir = await tinyModel(join(dir, 'model'));
    const data = writeData(join(dir, 'd.jsonl'), 6, 'ffa');
    const m = await loadModel(modelDir);
    const lora = { r: 4, alpha: 8, dropout: 0.1, targetModules: ['q_proj', 'v_proj', 'down_proj'] };
    const global = initLoraAdapter(loraTargets(m.config, lora), 4, 3);
    for (const [freeze, mu] of [[true, 0], [false, 0.5]] as const) {
      const spec = { ...localSpec({ lora, template: 'plain', maxSeqLen: 128, batchSize: 3 }), steps: 3, lr: 0.01, freezeLoraA: freeze, proxMu: mu };
      const task = await prepareTaskDir({ workDir: join(dir, 'work'), mode: 'train', taskId: 't', round: 1, globalAdapter: global, spec, modelDir, dataPath: data, evalPath: '', template: 'plain', maxSeqLen: 128, numTrainRecords: 6, numEvalRecords: 0 });
      const r = spawnSync(PY, [TORCH_SCRIPT, '--task-dir', task.dir], { encoding: 'utf8', env: { ...process.env, ...task.env } });
      expect(r.status, r.stderr).toBe(0);
      const progress = r.stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
      expect(progress.map((p) => p.step)).toEqual([1, 2, 3]);
      const adapter = await readOutputAdapter(task.env.FEDTUNE_OUTPUT_ADAPTER, global, spec, m.config);
      expect([...adapter.keys()].sort()).toEqual([...global.keys()].sort());
      const metrics = JSON.parse(readFileSync(task.env.FEDTUNE_METRICS, 'utf8'));
      expect(metrics.num_examples).toBe(6);
      let movedA = 0;
      let movedB = 0;
      for (const [k, t] of adapter) {
        const g = global.get(k)!;
        const moved = t.data.some((x, i) => x !== g.data[i]);
        if (k.includes('lora_A')) movedA += moved ? 1 : 0;
        else movedB += moved ? 1 : 0;
      }
      expect(movedB).toBe(3);
      expect(movedA).toBe(freeze ? 0 : 3);
      if (mu > 0) expect(metrics.prox_loss).toBeGreaterThan(0);
      else expect(metrics.prox_loss).toBeUndefined();
    }
  });

  it('continues AdamW from paths.optimizer_state: the saved step counts add up, and the task differs from one with a fresh optimizer', { timeout: 120_000 }, async () => {
    const dir = tempDir('torch-state');
    const modelDir = await tinyModel(join(dir, 'model'));
    const data = writeData(join(dir, 'd.jsonl'), 6, 'state');
    const m = await loadModel(modelDir);
    const lora = { r: 4, alpha: 8, dropout: 0, targetModules: ['q_proj', 'v_proj'] };
    const global = initLoraAdapter(loraTargets(m.config, lora), 4, 3);
    const spec = { ...localSpec({ lora, template: 'plain', maxSeqLen: 128, batchSize: 3 }), steps: 3, lr: 0.01 };
    const stateDir = join(dir, 'state');
    mkdirSync(stateDir);
    const task = async (round: number, optimizerState: string | null): Promise<{ adapter: TensorMap; metrics: Record<string, number> }> => {
      const t = await prepareTaskDir({ workDir: join(dir, 'work'), mode: 'train', taskId: `t${round}`, round, globalAdapter: global, spec, modelDir, dataPath: data, evalPath: '', template: 'plain', maxSeqLen: 128, numTrainRecords: 6, numEvalRecords: 0, optimizerState });
      const r = spawnSync(PY, [TORCH_SCRIPT, '--task-dir', t.dir], { encoding: 'utf8', env: { ...process.env, ...t.env } });
      expect(r.status, r.stderr).toBe(0);
      return { adapter: await readOutputAdapter(t.env.FEDTUNE_OUTPUT_ADAPTER, global, spec, m.config), metrics: JSON.parse(readFileSync(t.env.FEDTUNE_METRICS, 'utf8')) };
    };
    // AdamW's step count of every parameter in the saved state.
    const savedSteps = (): number[] => {
      const r = spawnSync(PY, ['-c', `import torch, json; s = torch.load(${JSON.stringify(join(stateDir, 'adamw.pt'))}); print(json.dumps(sorted({int(v['step']) for v in s['state'].values()})))`], { encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      return JSON.parse(r.stdout) as number[];
    };
    const first = await task(1, stateDir);
    expect(first.metrics.optimizer_state_resumed).toBe(0);
    expect(savedSteps()).toEqual([3]);
    const second = await task(2, stateDir);
    expect(second.metrics.optimizer_state_resumed).toBe(1);
    expect(savedSteps()).toEqual([6]);
    const fresh = await task(2, null);
    expect(fresh.metrics.optimizer_state_resumed).toBeUndefined();
    expect(maxAbsDiff(second.adapter, fresh.adapter)).toBeGreaterThan(1e-6); // the moments carried over change the steps
  });

  it('trains next to an onnx worker: both updates arrive, the loss goes down, eval runs through the script', { timeout: 180_000 }, async () => {
    const dir = tempDir('torch-round');
    const model = await tinyModel(join(dir, 'model'));
    coord = await startCoordinator(
      runConfig(dir, model, {
        name: 'torch',
        rounds: 2,
        // optimizer_scope run: torch_lora.py keeps its AdamW state in paths.optimizer_state between the rounds.
        training: { steps: 4, batch_size: 4, lr: 0.02, max_seq_len: 128, template: 'plain', optimizer_scope: 'run' },
        cohort: { min_workers: 2 },
        round: { min_results: 2, deadline_sec: 120 },
        eval: { every: 1, initial: false },
      }),
    );
    const data = writeData(join(dir, 'site.jsonl'), 8, 'torch');
    const evalData = writeData(join(dir, 'eval.jsonl'), 3, 'torch');
    procs.push(worker({ address: coord.address, site: 'onnx', data, model, trainer: 'onnx', extra: ['--eval-fraction', '0'] }));
    const ex = worker({ address: coord.address, site: 'torch', data, model, trainer: 'exec', extra: ['--exec', `${PY} ${TORCH_SCRIPT}`, '--eval-data', evalData, '--exec-workdir', join(dir, 'work')] });
    procs.push(ex);
    const result = await coord.run;
    expect(result.state, ex.out().slice(-3000)).toBe('completed');
    const evs = await events(coord.bus, coord.runId);
    expect(ofType(evs, 'worker.error')).toEqual([]);
    const got = ofType(evs, 'update.received');
    expect(got.map((e) => `${e.round}:${e.site}`).sort()).toEqual(['1:onnx', '1:torch', '2:onnx', '2:torch']);
    const torch = got.filter((e) => e.site === 'torch');
    for (const e of torch) {
      expect(e.examples).toBe(8);
      expect(e.metrics.last_loss).toBeLessThan(e.metrics.first_loss!);
    }
    expect(torch[1]!.metrics.train_loss).toBeLessThan(torch[0]!.metrics.train_loss!);
    expect(torch.map((e) => e.metrics.optimizer_state_resumed)).toEqual([0, 1]);
    // Both sites trained on the same data from the same adapter: their round-1 losses agree.
    const onnx1 = got.find((e) => e.site === 'onnx' && e.round === 1)!;
    expect(Math.abs(torch[0]!.metrics.train_loss! - onnx1.metrics.train_loss!)).toBeLessThan(0.01);
    expect(ofType(evs, 'worker.progress').some((e) => e.site === 'torch' && e.totalSteps === 4 && e.step === 4)).toBe(true);
    const rounds = ofType(evs, 'round.completed');
    expect(rounds.map((e) => e.evalLoss !== null && Number.isFinite(e.evalLoss))).toEqual([true, true]);
  });
});

function localSpec(o: { lora: LocalTrainingSpec['lora']; template: string; maxSeqLen: number; batchSize: number }): LocalTrainingSpec {
  return {
    lora: o.lora,
    steps: 1,
    epochs: null,
    batchSize: o.batchSize,
    gradAccumulation: 1,
    lr: 1e-3,
    schedule: 'constant',
    warmupSteps: 0,
    scheduleRound: 0,
    scheduleRounds: 0,
    keepOptimizerState: false,
    weightDecay: 0,
    maxGradNorm: 1,
    maxSeqLen: o.maxSeqLen,
    template: o.template,
    seed: 0,
    proxMu: 0,
    freezeLoraA: false,
    loraPlusRatio: 1,
  };
}
