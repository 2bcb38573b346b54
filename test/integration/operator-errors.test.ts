/**
 * Mistakes an operator makes, through the command line with real processes:
 * configs that parse but cannot work, TLS files that are not PEM, a read-only
 * or full checkpoint disk, data that is not UTF-8 or holds a 50 MB record, a
 * worker whose --max-seq-len disagrees with the run, and `fedtune train`
 * failing. Each must stop at once with a message naming the field, file or
 * resource and what to do.
 *
 * The disk tests mount a small tmpfs (root only); elsewhere the read-only case
 * uses a chmod 0555 directory and the full-disk case is skipped, saying so.
 */
import { execFileSync } from 'node:child_process';
import { chmodSync, closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { initModel } from '../../worker/engine/init.ts';
import { fedtune, runConfig, tempDir, tinyModel, worker, writeData, type Proc } from './federated-helpers.ts';

const procs: Proc[] = [];
let coord: CoordinatorHandle | null = null;
const mounts: string[] = [];

afterEach(async () => {
  for (const p of procs.splice(0)) p.kill();
  await coord?.close();
  coord = null;
});
afterAll(() => {
  for (const m of mounts.splice(0)) {
    try {
      execFileSync('umount', [m], { stdio: 'ignore' });
    } catch {
      execFileSync('umount', ['-l', m], { stdio: 'ignore' });
    }
  }
});

/** Mount a tmpfs at `dir` (created); false where this process may not mount. */
function mountTmpfs(dir: string, options: string): boolean {
  mkdirSync(dir, { recursive: true });
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', options, 'tmpfs', dir], { stdio: 'ignore' });
  } catch {
    return false;
  }
  mounts.push(dir);
  return true;
}

const isRoot = process.getuid?.() === 0;
const canMount = ((): boolean => {
  if (!isRoot) return false;
  const probe = tempDir('mount-probe');
  const ok = mountTmpfs(join(probe, 'm'), 'size=64k');
  if (ok) execFileSync('umount', [mounts.pop()!], { stdio: 'ignore' });
  return ok;
})();

function hasOpenssl(): boolean {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** A run config file for `fedtune coordinator`, from the test defaults with `over` merged per section. */
function configFile(dir: string, model: string, over: Record<string, unknown>, name = 'run.yaml'): string {
  const base = runConfig(dir, model, { name: 'ops' }) as unknown as Record<string, unknown>;
  const merged: Record<string, unknown> = { ...base, dashboard: { enabled: false } };
  for (const [k, v] of Object.entries(over)) {
    const b = merged[k];
    merged[k] = typeof v === 'object' && v !== null && !Array.isArray(v) && typeof b === 'object' && b !== null ? { ...b, ...v } : v;
  }
  const path = join(dir, name);
  writeFileSync(path, stringify(merged));
  return path;
}

/** Run a command to its end; a process still running after `limitMs` is killed (and the test fails on its exit code). */
async function finish(p: Proc, limitMs = 60_000): Promise<number | null> {
  procs.push(p);
  const t = setTimeout(() => p.kill('SIGKILL'), limitMs);
  const code = await p.exited;
  clearTimeout(t);
  return code;
}

describe('the coordinator refuses what cannot work, naming it', () => {
  it('unknown template, bad NATS URL, empty token (at config load); max_seq_len over the positions and an absurd LoRA rank (at start)', async () => {
    const dir = tempDir('ops-config');
    const model = join(dir, 'model');
    // hidden 64, 4 heads of 16, 1 kv head: v_proj maps 64 -> 16; 512 positions.
    await initModel(model, { arch: 'llama', hiddenSize: 64, numLayers: 1, numHeads: 4, numKvHeads: 1, maxPositions: 512 });
    const cases: Array<[Record<string, unknown>, RegExp]> = [
      [{ training: { template: 'vicuna' } }, /training\.template \(line \d+\): must be one of alpaca, chatml, plain or auto \(the model's own chat_template\) \(got "vicuna"\)/],
      [{ events: { nats: { url: 'ht!tp://??' } } }, /events\.nats\.url \(line \d+\): "ht!tp:\/\/\?\?" has scheme "ht!tp"; allowed: nats:\/\/, tls:\/\//],
      [{ server: { join_token: '' } }, /server\.join_token \(line \d+\): must not be empty: set server\.join_token, pass --token or set FEDTUNE_JOIN_TOKEN/],
      [{ training: { max_seq_len: 4096 } }, /training\.max_seq_len: 4096 is more than the 512 positions of the model .*; set it to 512 or less/],
      [{ lora: { r: 100000 } }, /lora\.r: 100000 is larger than the rank module v_proj can have: model\.layers\.0\.self_attn\.v_proj maps 64 -> 16 features, so lora\.r can be at most 16/],
    ];
    const runs = cases.map(([over], i) => fedtune(['coordinator', '--config', configFile(join(dir), model, { ...over, name: `ops-${i}` }, `run-${i}.yaml`)]));
    const codes = await Promise.all(runs.map((p) => finish(p)));
    for (const [i, [, re]] of cases.entries()) {
      expect(codes[i], runs[i]!.out()).toBe(1);
      expect(runs[i]!.out()).toMatch(re);
      expect(runs[i]!.out()).not.toMatch(/must must/);
      // Refused before anything was written: no checkpoint of the run exists.
      expect(existsSync(join(dir, 'checkpoints', `ops-${i}`, 'round-0000'))).toBe(false);
    }
  });

  it('TLS files that are not PEM are refused naming server.tls.cert / key / client_ca and the file', async () => {
    const dir = tempDir('ops-pem');
    const model = await tinyModel(join(dir, 'model'));
    const junk = join(dir, 'junk.pem');
    writeFileSync(junk, 'this is not a certificate\n');
    const cases: Array<[Record<string, unknown>, string]> = [[{ cert: junk, key: junk }, `server.tls.cert: ${junk} is not a PEM certificate (no -----BEGIN CERTIFICATE----- block)`]];
    if (hasOpenssl()) {
      const p = (n: string) => join(dir, n);
      for (const n of ['a', 'b']) {
        execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', p(`${n}-key.pem`), '-out', p(`${n}.pem`), '-days', '1', '-subj', `/CN=${n}`], { stdio: 'ignore' });
      }
      cases.push([{ cert: p('a.pem'), key: p('a.pem') }, `server.tls.key: ${p('a.pem')} is not a PEM private key (it holds CERTIFICATE blocks); is this the certificate? server.tls.key takes the private key`]);
      cases.push([{ cert: p('a.pem'), key: p('b-key.pem') }, `server.tls.key: ${p('b-key.pem')} is not the private key of the certificate in server.tls.cert (${p('a.pem')}, subject CN=a)`]);
      cases.push([{ cert: p('a.pem'), key: p('a-key.pem'), client_ca: junk }, `server.tls.client_ca: ${junk} is not a PEM certificate`]);
    } else {
      console.log('operator-errors: openssl binary not found; only the junk-PEM case of the TLS test runs');
    }
    const runs = cases.map(([tls], i) => fedtune(['coordinator', '--config', configFile(dir, model, { name: `pem-${i}`, server: { tls } }, `pem-${i}.yaml`)]));
    const codes = await Promise.all(runs.map((p) => finish(p)));
    for (const [i, [, text]] of cases.entries()) {
      expect(codes[i], runs[i]!.out()).toBe(1);
      expect(runs[i]!.out()).toContain(text);
      expect(runs[i]!.out()).not.toMatch(/server\.listen/);
      expect(existsSync(join(dir, 'checkpoints', `pem-${i}`, 'round-0000'))).toBe(false);
    }
  });
});

describe('checkpoint disk', () => {
  it.skipIf(isRoot && !canMount)('a read-only checkpoint.dir is refused naming it and the reason (skipped as root where tmpfs cannot be mounted)', async () => {
    const dir = tempDir('ops-ro');
    const model = await tinyModel(join(dir, 'model'));
    const ro = join(dir, 'ro');
    if (isRoot) {
      expect(mountTmpfs(ro, 'ro,size=64k')).toBe(true);
    } else {
      mkdirSync(ro);
      chmodSync(ro, 0o555);
    }
    const p = fedtune(['coordinator', '--config', configFile(dir, model, { checkpoint: { dir: join(ro, 'ck') } })]);
    expect(await finish(p), p.out()).toBe(1);
    const reason = isRoot ? 'EROFS: the file system is read-only' : 'EACCES: permission denied';
    expect(p.out()).toContain(`checkpoint.dir: cannot create the directory ${join(ro, 'ck')} (${reason}); make ${ro} writable for this user, or choose another checkpoint.dir (--checkpoint-dir)`);
    expect(p.out()).not.toMatch(/ENOENT/);
    if (!isRoot) chmodSync(ro, 0o755);
  });

  it.skipIf(!canMount)('the disk filling up mid-run: the failed checkpoint is named with the round on disk; after freeing space --resume finishes the run (needs root to mount a tmpfs)', async () => {
    const dir = tempDir('ops-full');
    const model = await tinyModel(join(dir, 'model'));
    const disk = join(dir, 'disk');
    expect(mountTmpfs(disk, 'size=1m')).toBe(true);
    const config = configFile(dir, model, { rounds: 3, eval: { every: 0 }, checkpoint: { dir: join(disk, 'ck') } });
    const runDir = join(disk, 'ck', 'ops');
    const data = writeData(join(dir, 'site.jsonl'), 8, 'site');

    const c1 = fedtune(['coordinator', '--config', config]);
    procs.push(c1);
    const [, address] = await c1.waitFor(/listening on (\S+)/);
    procs.push(worker({ address: address!, site: 'site', data, model, extra: ['--noop-step-ms', '1500', '--eval-fraction', '0'] }));
    await c1.waitFor(/round 1\/3 done/);
    // Fill the disk while round 2 trains.
    const filler = join(disk, 'filler');
    const fd = openSync(filler, 'w');
    const block = Buffer.alloc(16 * 1024);
    try {
      for (;;) writeSync(fd, block);
    } catch (err) {
      expect((err as NodeJS.ErrnoException).code).toBe('ENOSPC');
    } finally {
      closeSync(fd);
    }
    expect(await finish(c1), c1.out()).toBe(1);
    expect(c1.out()).toContain(
      `run failed: cannot write checkpoint round-0002 in ${runDir} (ENOSPC: the disk is full); the run stopped after round 1, which is on disk: ` +
        `free space on the disk that holds ${runDir} and restart with --resume`,
    );
    // Nothing half-written: round 1 is the last checkpoint, no temporary left.
    expect(readdirSync(runDir).filter((n) => n.startsWith('round-')).sort()).toEqual(['round-0000', 'round-0001']);
    expect(readdirSync(runDir).filter((n) => n.startsWith('.round-'))).toEqual([]);

    // Do what the message says.
    rmSync(filler);
    const c2 = fedtune(['coordinator', '--config', config, '--resume', '--listen', address!]);
    procs.push(c2);
    await c2.waitFor(/listening on/);
    procs.push(worker({ address: address!, site: 'site', data, model, extra: ['--noop-step-ms', '50', '--eval-fraction', '0'] }));
    expect(await finish(c2), c2.out()).toBe(0);
    expect(c2.out()).toMatch(/resumed after round 1/);
    expect(c2.out()).toMatch(/round 3\/3 done/);
    expect(JSON.parse(readFileSync(join(runDir, 'round-0003', 'state.json'), 'utf8')).history.map((h: { round: number }) => h.round)).toEqual([1, 2, 3]);
  });
});

describe('workers refuse bad data and settings at start', () => {
  it('data that is not UTF-8 is refused with file and line; a --max-seq-len that disagrees with the run names both', async () => {
    const dir = tempDir('ops-worker');
    const model = await tinyModel(join(dir, 'model'));
    coord = await startCoordinator(runConfig(dir, model, { name: 'ops-worker', training: { max_seq_len: 64 } }));
    const latin1 = join(dir, 'latin1.jsonl');
    writeFileSync(latin1, Buffer.concat([Buffer.from('{"instruction":"a","output":"b"}\n', 'utf8'), Buffer.from('{"instruction":"caf\u00e9","output":"c"}\n', 'latin1')]));
    const good = writeData(join(dir, 'good.jsonl'), 4, 'good');
    const bad = worker({ address: coord.address, site: 'latin1', data: latin1, model });
    const disagree = worker({ address: coord.address, site: 'long', data: good, model, extra: ['--max-seq-len', '128'] });
    const [badCode, disagreeCode] = await Promise.all([finish(bad), finish(disagree)]);
    expect(badCode, bad.out()).toBe(2);
    expect(bad.out()).toMatch(new RegExp(`${latin1.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:2: not valid UTF-8 \\(bytes e9 .*byte 20 of the line\\); dataset files must be UTF-8 text`));
    expect(disagreeCode, disagree.out()).toBe(2);
    expect(disagree.out()).toMatch(/--max-seq-len 128 disagrees with the run's training\.max_seq_len 64: .*drop --max-seq-len/);
  });

  it('an ONNX worker names the records it drops (file:line), not only how many', async () => {
    const dir = tempDir('ops-dropped');
    const model = await tinyModel(join(dir, 'model'));
    coord = await startCoordinator(runConfig(dir, model, { name: 'ops-dropped', training: { max_seq_len: 48, template: 'plain' } }));
    const data = join(dir, 'site.jsonl');
    const recs = Array.from({ length: 6 }, (_, i) => ({ instruction: i === 2 || i === 4 ? `long ${'x'.repeat(200)}` : `q${i}`, output: 'a' }));
    writeFileSync(data, `${recs.map((r) => JSON.stringify(r)).join('\n')}\n`);
    const w = worker({ address: coord.address, site: 'site', data, model, trainer: 'onnx', extra: ['--eval-fraction', '0', '--threads', '1'] });
    procs.push(w);
    const [line] = await w.waitFor(/2 records dropped: the response does not fit in max_seq_len 48 tokens \([^)]*\)/);
    expect(line).toContain(`(${data}:3, ${data}:5)`);
  });
});

describe('fedtune train', () => {
  it('a 20 MB record trains in a 256 MB heap: it is cut before it is tokenized, and kept', async () => {
    const dir = tempDir('ops-big');
    const model = await tinyModel(join(dir, 'model'));
    const data = join(dir, 'big.jsonl');
    const recs = Array.from({ length: 6 }, (_, i) => JSON.stringify({ instruction: `q${i}`, output: 'a' }));
    recs.splice(2, 0, JSON.stringify({ instruction: 'Summarise', output: 'lorem ipsum dolor sit amet '.repeat(750_000) }));
    writeFileSync(data, `${recs.join('\n')}\n`);
    const p = fedtune(['train', '--model', model, '--data', data, '--out', join(dir, 'out'), '--template', 'plain', '--max-seq-len', '64', '--steps', '1', '--eval-fraction', '0', '--threads', '1'], {
      NODE_OPTIONS: '--max-old-space-size=256',
      FEDTUNE_LOG_LEVEL: 'warn',
    });
    expect(await finish(p, 120_000), p.out()).toBe(0);
    expect(p.out()).toMatch(/7 train \/ 0 eval examples; 1 steps/);
    expect(p.out()).not.toMatch(/dropped/);
  });

  it('exits with status 1 within seconds of an error (nothing keeps the process alive)', async () => {
    const dir = tempDir('ops-train-exit');
    const model = await tinyModel(join(dir, 'model'));
    const data = writeData(join(dir, 'd.jsonl'), 8, 'x');
    const blocker = join(dir, 'a-file');
    writeFileSync(blocker, 'x');
    const a4 = fedtune(['train', '--model', model, '--data', data, '--out', join(dir, 'a4'), '--lora-r', '4', '--steps', '1', '--threads', '1', '--template', 'plain']);
    expect(await finish(a4), a4.out()).toBe(0);
    // Left at its default, --max-seq-len follows a model with fewer positions (given explicitly, it is refused below).
    expect(a4.out()).toContain('note: --max-seq-len defaults to 256, more than the 128 positions of');
    const cases: Array<[string[], RegExp]> = [
      // Fails after training ran with the progress bar: the output directory cannot be written.
      [['--out', join(blocker, 'out')], new RegExp(`cannot write ${blocker.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}/out \\(ENOTDIR: .*\\); the 1 steps just trained are not saved: move the file that is in the way`)],
      [['--out', join(dir, 'a8'), '--init-adapter', join(dir, 'a4')], /--init-adapter .* was trained with r 4 .* this run has r 8 .*: give --lora-r 4/],
      [['--out', join(dir, 'o'), '--max-seq-len', '4096'], /--max-seq-len: 4096 is more than the 128 positions of the model/],
      [['--out', join(dir, 'o'), '--lora-r', '100000'], /--lora-r: 100000 is larger than the rank module k_proj can have: .* so --lora-r can be at most 16/],
      [['--out', join(dir, 'o'), '--template', 'vicuna'], /prompt template "vicuna" is not known; use one of alpaca, chatml, plain/],
    ];
    for (const [args, re] of cases) {
      const p = fedtune(['train', '--model', model, '--data', data, '--steps', '1', '--threads', '1', '--template', 'plain', ...args]);
      procs.push(p);
      await p.waitFor(/fedtune: /);
      const errorAt = Date.now();
      expect(await finish(p, 5_000), `${args.join(' ')}\n${p.out()}`).toBe(1);
      expect(Date.now() - errorAt).toBeLessThan(5_000);
      expect(p.out()).toMatch(re);
    }
  });
});
