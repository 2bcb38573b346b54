/**
 * Bad input refused by name, in the pure parts: file-system errors with the
 * file and the reason (fs-errors, atomic writes, checkpoint store), settings
 * that parse but cannot work (limits), TLS files (pem), UTF-8 (utf8) and the
 * cut of long records before tokenization (tokenize).
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { writeDirAtomic, writeFileAtomic } from '../../common/atomic.ts';
import { parseRunConfig, RunConfigError } from '../../common/config.ts';
import { loadRecords, parseRecords, type SftRecord } from '../../common/data/dataset.ts';
import { renderRecord } from '../../common/data/template.ts';
import { CHARS_PER_TOKEN_BOUND, CUT_GUARD, droppedWhere, encodeWithin, tokenizeRecord, type Tokenizer } from '../../common/data/tokenize.ts';
import { decodeUtf8, firstInvalidUtf8 } from '../../common/data/utf8.ts';
import { errnoCode, FileWriteError, fsReason, mkdirp, mkdirpSync } from '../../common/fs-errors.ts';
import { natsUrlIssue, rankIssue, seqLenIssue, seqLenMismatch, templateIssue } from '../../common/limits.ts';
import { loraTargets } from '../../common/lora.ts';
import { IGNORE_INDEX } from '../../common/model-config.ts';
import { checkServerTls } from '../../common/pem.ts';
import { createRng } from '../../common/random.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { normalizeConfig } from '../../common/hf-model.ts';
import { ensureRunDir } from '../../coordinator/checkpoint-errors.ts';
import { CheckpointStore } from '../../coordinator/store.ts';
import { byteLevelTokenizer } from '../../worker/engine/init.ts';

const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});
function tempDir(tag: string): string {
  const d = mkdtempSync(join(tmpdir(), `fedtune-${tag}-`));
  dirs.push(d);
  return d;
}
const errno = (code: string, syscall = 'write'): NodeJS.ErrnoException => Object.assign(new Error(`${code}: failed, ${syscall}`), { code });

describe('file-system errors', () => {
  it('say the errno code and its meaning, through FileWriteError and cause chains', () => {
    expect(fsReason(errno('ENOSPC'))).toBe('ENOSPC: the disk is full');
    expect(fsReason(errno('EROFS'))).toBe('EROFS: the file system is read-only');
    expect(fsReason(new Error('plain'))).toBe('plain');
    const wrapped = new FileWriteError('/x/y.json', errno('ENOSPC'));
    expect(wrapped.message).toBe('cannot write /x/y.json (ENOSPC: the disk is full)');
    expect(wrapped.code).toBe('ENOSPC');
    expect(errnoCode(new Error('outer', { cause: wrapped }))).toBe('ENOSPC');
    expect(errnoCode(new Error('no code'))).toBeUndefined();
  });

  it('mkdirp names the path component that is a file (sync and async)', async () => {
    const dir = tempDir('mkdirp');
    const file = join(dir, 'a-file');
    writeFileSync(file, 'x');
    for (const attempt of [() => mkdirp(join(file, 'sub', 'deeper')), async () => mkdirpSync(join(file, 'sub', 'deeper'))]) {
      const err = await attempt().then(() => null, (e: unknown) => e);
      expect(err).toBeInstanceOf(FileWriteError);
      expect((err as FileWriteError).code).toBe('ENOTDIR');
      expect((err as Error).message).toBe(`cannot create directories under ${file} (ENOTDIR: a component of the path is a file, not a directory)`);
    }
    await mkdirp(join(dir, 'new', 'nested'));
    expect(existsSync(join(dir, 'new', 'nested'))).toBe(true);
  });

  it('writeFileAtomic and writeDirAtomic name the file they could not write, not the temporary', async () => {
    const dir = tempDir('atomic');
    writeFileSync(join(dir, 'blocker'), 'x');
    const target = join(dir, 'blocker', 'state.json');
    // The message names what is in the way (more use than the file that could not be written).
    await expect(writeFileAtomic(target, '{}')).rejects.toThrow(`cannot create directories under ${join(dir, 'blocker')} (ENOTDIR: a component of the path is a file, not a directory)`);
    await expect(writeFileAtomic(join(dir, 'blocker'), new Uint8Array(1))).resolves.toBeUndefined();

    // A full disk while a file inside the directory is written: the message names the file at its final place.
    const out = join(dir, 'adapter');
    const err = await writeDirAtomic(out, async (tmp) => {
      writeFileSync(join(tmp, 'adapter_config.json'), '{}');
      await writeFileAtomic(join(tmp, 'sub', 'x.json'), '{}');
      throw new FileWriteError(join(tmp, 'sub', 'x.json'), errno('ENOSPC'));
    }).then(() => null, (e: unknown) => e);
    expect((err as Error).message).toBe(`cannot write ${join(out, 'sub', 'x.json')} (ENOSPC: the disk is full)`);
    expect((err as FileWriteError).code).toBe('ENOSPC');
    // Nothing half-written is left: no target, no temporary sibling.
    expect(readdirSync(dir).sort()).toEqual(['blocker']);

    // An error from the fill that carries no path names the directory.
    const plain = await writeDirAtomic(out, async () => {
      throw errno('ENOSPC');
    }).then(() => null, (e: unknown) => e);
    expect((plain as Error).message).toBe(`cannot write ${out} (ENOSPC: the disk is full)`);
    // Errors that are not about the file system pass through as they are.
    await expect(writeDirAtomic(out, async () => { throw new Error('bad adapter'); })).rejects.toThrow(/^bad adapter$/);
  });
});

describe('checkpoint write failures', () => {
  const adapter = new Map([['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight', { shape: [1, 2], data: new Float32Array(2) }], ['base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight', { shape: [2, 1], data: new Float32Array(2) }]]);
  const store = (root: string, unit: 'round' | 'step' = 'round') =>
    new CheckpointStore<{ format: string; n: number }>({
      root,
      runName: 'run',
      unit,
      format: 'test/1',
      numberOf: (s) => s.n,
      baseModel: 'm',
      fanInFanOut: false,
      lora: { dropout: 0, targetModules: ['q_proj'] },
    });
  const enospc = { extra: async () => { throw errno('ENOSPC'); } };

  it('say which checkpoint, why, which one is on disk and what to do', async () => {
    const root = tempDir('ckpt');
    const s = store(root);
    for (const n of [0, 1, 2]) await s.write({ format: 'test/1', n }, adapter, { r: 1, alpha: 1 });
    const err = await s.write({ format: 'test/1', n: 3 }, adapter, { r: 1, alpha: 1 }, enospc).then(() => null, (e: unknown) => e);
    expect((err as Error).message).toBe(
      `cannot write checkpoint round-0003 in ${s.runDir} (ENOSPC: the disk is full); the run stopped after round 2, which is on disk: ` +
        `free space on the disk that holds ${s.runDir} and restart with --resume`,
    );
    expect(await s.list()).toEqual([0, 1, 2]);
    expect(JSON.parse(readFileSync(join(s.runDir, 'latest.json'), 'utf8')).round).toBe(2);
    expect(readdirSync(s.runDir).filter((n) => n.startsWith('.'))).toEqual([]);
  });

  it('before any checkpoint: nothing is on disk, start again (distributed steps alike)', async () => {
    const s = store(tempDir('ckpt0'), 'step');
    const err = await s.write({ format: 'test/1', n: 0 }, adapter, { r: 1, alpha: 1 }, { extra: async () => { throw errno('EROFS'); } }).then(() => null, (e: unknown) => e);
    expect((err as Error).message).toMatch(/^cannot write checkpoint step-000000 in .* \(EROFS: the file system is read-only\); no checkpoint of this run is on disk yet: make .* writable for this user \(or choose another checkpoint\.dir\) and start the run again$/);
    await s.write({ format: 'test/1', n: 0 }, adapter, { r: 1, alpha: 1 });
    const later = await s.write({ format: 'test/1', n: 100 }, adapter, { r: 1, alpha: 1 }, enospc).then(() => null, (e: unknown) => e);
    expect((later as Error).message).toMatch(/^cannot write checkpoint step-000100 in .*; the run stopped after step 0, which is on disk:/);
  });

  it('a checkpoint.dir that cannot hold the run directory is refused naming the field', async () => {
    const dir = tempDir('rundir');
    writeFileSync(join(dir, 'ck'), 'not a directory');
    await expect(ensureRunDir(join(dir, 'ck', 'run'))).rejects.toThrow(
      `checkpoint.dir: cannot create directories under ${join(dir, 'ck')} (ENOTDIR: a component of the path is a file, not a directory); move the file that is in the way of ${join(dir, 'ck')}, or choose another checkpoint.dir (--checkpoint-dir)`,
    );
    await ensureRunDir(join(dir, 'ok', 'run'));
    expect(readdirSync(join(dir, 'ok', 'run'))).toEqual([]);
  });
});

describe('settings that cannot work', () => {
  const base = () => ({ name: 'demo', model: { path: 'm' }, training: { steps: 3 }, rounds: 2, server: { join_token: 'tok' } });
  const issues = (raw: unknown): string[] => {
    try {
      parseRunConfig(raw, 'run.yaml');
    } catch (err) {
      expect(err).toBeInstanceOf(RunConfigError);
      return (err as RunConfigError).issues;
    }
    throw new Error('expected the config to be refused');
  };

  it('an unknown template, a bad NATS URL and an empty token are refused at config load, each once', () => {
    expect(issues({ ...base(), training: { steps: 3, template: 'vicuna' } })).toEqual([
      'training.template: must be one of alpaca, chatml, plain or auto (the model\'s own chat_template) (got "vicuna"); these are the prompt templates workers know',
    ]);
    expect(issues({ ...base(), events: { nats: { url: 'ht!tp://??' } } })).toEqual([
      'events.nats.url: "ht!tp://??" has scheme "ht!tp"; allowed: nats://, tls:// (e.g. nats://127.0.0.1:4222)',
    ]);
    const empty = issues({ ...base(), server: { join_token: '' } });
    expect(empty).toEqual(['server.join_token: must not be empty: set server.join_token, pass --token or set FEDTUNE_JOIN_TOKEN (got "")']);
    expect(empty[0]).not.toMatch(/must must/);
    for (const t of ['alpaca', 'chatml', 'plain']) expect(parseRunConfig({ ...base(), training: { steps: 3, template: t } }).training.template).toBe(t);
  });

  it('NATS URLs: nats:// and tls:// with a host and a port in range, comma-separated', () => {
    for (const ok of ['nats://127.0.0.1:4222', 'tls://nats.example.com:4443', 'nats://user:pw@10.0.0.5:4222', 'nats://fedtune:p/w?#@x@127.0.0.1:4222', 'nats://127.0.0.1:4222/', 'localhost:4222', 'nats://a:1,nats://b:2', 'nats://[::1]:4222', 'nats://host']) {
      expect(natsUrlIssue(ok), ok).toBeNull();
    }
    const bad: Array<[string, RegExp]> = [
      ['ht!tp://??', /has scheme "ht!tp"; allowed: nats:\/\/, tls:\/\//],
      ['http://x:4222', /has scheme "http"/],
      ['ws://x:4222', /has scheme "ws"/],
      ['nats://:4222', /has no host/],
      ['nats://x:99999', /has port 99999; a port is 1-65535/],
      ['nats://x:0', /has port 0/],
      ['nats://x:42a', /not a NATS URL|port that is not a number/],
      ['nats://x:4222/path', /nothing after the port/],
      ['nats://ex ample:4222', /is not a host name or IP address/],
      ['nats://a:1,,nats://b:2', /has an empty entry/],
    ];
    for (const [url, re] of bad) expect(natsUrlIssue(url), url).toMatch(re);
  });

  it('max_seq_len over the model positions names both numbers', () => {
    expect(seqLenIssue(512, 512, 'm')).toBeNull();
    expect(seqLenIssue(4096, 512, '/models/tiny')).toBe(
      '4096 is more than the 512 positions of the model /models/tiny (max_position_embeddings / n_positions in its config.json); set it to 512 or less',
    );
  });

  it('a LoRA rank above min(in, out) of a targeted module names the module and the limit', () => {
    // hidden 64, 4 heads of 16, 1 kv head: q_proj 64 -> 64, v_proj 64 -> 16, o_proj 64 -> 64 (computed by hand).
    const config = normalizeConfig({ model_type: 'llama', vocab_size: 100, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 1, max_position_embeddings: 512 });
    const qv = loraTargets(config, { r: 8, alpha: 16, dropout: 0, targetModules: ['q_proj', 'v_proj'] });
    expect(rankIssue(16, qv)).toBeNull();
    expect(rankIssue(100000, qv)).toBe(
      '100000 is larger than the rank module v_proj can have: model.layers.0.self_attn.v_proj maps 64 -> 16 features, so lora.r can be at most 16 (min of in and out); ' +
        'lower lora.r to 16 or less, or leave v_proj out of lora.target_modules',
    );
    const q = loraTargets(config, { r: 8, alpha: 16, dropout: 0, targetModules: ['q_proj', 'o_proj'] });
    expect(rankIssue(64, q)).toBeNull();
    expect(rankIssue(65, q)).toMatch(/so lora\.r can be at most 64 \(min of in and out\); lower lora\.r to 64 or less$/);
  });

  it('a worker --max-seq-len that disagrees with the run names both', () => {
    expect(seqLenMismatch(undefined, 256)).toBeNull();
    expect(seqLenMismatch(256, 256)).toBeNull();
    expect(seqLenMismatch(128, 256)).toMatch(/^--max-seq-len 128 disagrees with the run's training\.max_seq_len 256: .*drop --max-seq-len/);
    expect(templateIssue('chatml')).toBeNull();
  });
});

function hasOpenssl(): boolean {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

describe('TLS files', () => {
  const f = (field: string, path: string) => ({ field, path, bytes: readFileSync(path) });

  it('a file that is not PEM is refused naming the field and the file', () => {
    const dir = tempDir('pem');
    const junk = join(dir, 'junk.pem');
    writeFileSync(junk, 'hello');
    const der = join(dir, 'cert.der');
    writeFileSync(der, Buffer.from([0x30, 0x82, 0x01, 0x0a]));
    expect(() => checkServerTls(f('server.tls.cert', junk), f('server.tls.key', junk), null)).toThrow(`server.tls.cert: ${junk} is not a PEM certificate (no -----BEGIN CERTIFICATE----- block)`);
    expect(() => checkServerTls(f('server.tls.cert', der), f('server.tls.key', junk), null)).toThrow(/server\.tls\.cert: .*cert\.der is not a PEM certificate \(it looks like DER \(binary\); convert it: openssl x509 -inform DER/);
  });

  it.skipIf(!hasOpenssl())('the key must be PEM and belong to the certificate; the client CA must parse (skipped without the openssl binary)', () => {
    const dir = tempDir('pem-pair');
    const p = (n: string) => join(dir, n);
    for (const n of ['a', 'b']) {
      execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', p(`${n}-key.pem`), '-out', p(`${n}.pem`), '-days', '1', '-subj', `/CN=${n}`], { stdio: 'ignore' });
    }
    expect(() => checkServerTls(f('server.tls.cert', p('a.pem')), f('server.tls.key', p('a-key.pem')), f('server.tls.client_ca', p('b.pem')))).not.toThrow();
    expect(() => checkServerTls(f('server.tls.cert', p('a.pem')), f('server.tls.key', p('b-key.pem')), null)).toThrow(
      `server.tls.key: ${p('b-key.pem')} is not the private key of the certificate in server.tls.cert (${p('a.pem')}, subject CN=a); give the matching pair`,
    );
    expect(() => checkServerTls(f('server.tls.cert', p('a-key.pem')), f('server.tls.key', p('a-key.pem')), null)).toThrow(/server\.tls\.cert: .*a-key\.pem is not a PEM certificate \(it holds PRIVATE KEY blocks\); is this the key file\?/);
    expect(() => checkServerTls(f('server.tls.cert', p('a.pem')), f('server.tls.key', p('a.pem')), null)).toThrow(/server\.tls\.key: .*a\.pem is not a PEM private key \(it holds CERTIFICATE blocks\); is this the certificate\?/);
    const cut = p('cut.pem');
    writeFileSync(cut, readFileSync(p('b.pem'), 'utf8').split('\n').slice(0, 4).join('\n'));
    expect(() => checkServerTls(f('server.tls.cert', p('a.pem')), f('server.tls.key', p('a-key.pem')), f('server.tls.client_ca', cut))).toThrow(/server\.tls\.client_ca: .*cut\.pem has a -----BEGIN CERTIFICATE----- without its -----END CERTIFICATE-----/);
  });
});

describe('UTF-8', () => {
  const strict = new TextDecoder('utf-8', { fatal: true });
  const valid = (b: Uint8Array): boolean => {
    try {
      strict.decode(b);
      return true;
    } catch {
      return false;
    }
  };

  it('firstInvalidUtf8 agrees with TextDecoder on random bytes: valid prefix before it, an error in every longer prefix', () => {
    const r = createRng(11);
    const rng = (): number => r.next();
    const pieces = [[0x41], [0x0a], [0xc3, 0xa9], [0xe2, 0x82, 0xac], [0xf0, 0x9f, 0x98, 0x80], [0xed, 0xa0, 0x80], [0xc0, 0xaf], [0xe0, 0x80, 0xaf], [0xf4, 0x90, 0x80, 0x80], [0xff], [0x80], [0xc3], [0xe2, 0x82], [0xf5]];
    let invalidSeen = 0;
    for (let trial = 0; trial < 3000; trial++) {
      const parts: number[] = [];
      const n = Math.floor(rng() * 12);
      for (let i = 0; i < n; i++) parts.push(...pieces[Math.floor(rng() * (rng() < 0.8 ? 5 : pieces.length))]!);
      const b = Uint8Array.from(parts);
      const at = firstInvalidUtf8(b);
      expect(at === -1, Buffer.from(b).toString('hex')).toBe(valid(b));
      if (at >= 0) {
        invalidSeen++;
        expect(valid(b.subarray(0, at))).toBe(true);
        for (let m = at + 1; m <= Math.min(b.length, at + 4); m++) expect(valid(b.subarray(0, m)), `${Buffer.from(b).toString('hex')} at ${at}, prefix ${m}`).toBe(false);
      }
    }
    expect(invalidSeen).toBeGreaterThan(500);
  });

  it('a data file with invalid UTF-8 is refused with file, line and byte', async () => {
    const dir = tempDir('utf8');
    const path = join(dir, 'latin1.jsonl');
    const lines = [JSON.stringify({ instruction: 'a', output: 'b' }), JSON.stringify({ instruction: 'é', output: 'c' }), JSON.stringify({ instruction: 'caf\u00e9', output: 'd' })];
    // The third line written as Latin-1: é is the single byte 0xe9.
    const buf = Buffer.concat([Buffer.from(`${lines[0]}\n${lines[1]}\n`, 'utf8'), Buffer.from(`${lines[2]}\n`, 'latin1')]);
    writeFileSync(path, buf);
    const col = Buffer.from(lines[2]!, 'latin1').indexOf(0xe9) + 1;
    await expect(loadRecords(path)).rejects.toThrow(
      `${path}:3: not valid UTF-8 (bytes e9 22 2c 22 at byte ${buf.indexOf(0xe9, Buffer.byteLength(`${lines[0]}\n${lines[1]}\n`))} of the file, byte ${col} of the line); dataset files must be UTF-8 text`,
    );
    expect(() => decodeUtf8(Buffer.from([0xef, 0xbb, 0xbf, 0x41]), 'x')).not.toThrow();
    expect(decodeUtf8(Buffer.from([0xef, 0xbb, 0xbf, 0x41]), 'x')).toBe('A');
  });
});

/** The pipeline before the cut: every segment encoded whole, then the sequence truncated (an independent reference). */
function reference(tok: Tokenizer, rec: SftRecord, template: string, maxSeqLen: number): { inputIds: number[]; labels: number[] } | null {
  const inputIds: number[] = tok.bosId !== null ? [tok.bosId] : [];
  const labels: number[] = tok.bosId !== null ? [IGNORE_INDEX] : [];
  for (const seg of renderRecord(rec, template)) {
    const ids = tok.encode(seg.text);
    if (seg.train) ids.push(tok.eosId!);
    for (const id of ids) {
      inputIds.push(id);
      labels.push(seg.train ? id : IGNORE_INDEX);
    }
  }
  const full = inputIds.length;
  inputIds.length = Math.min(full, maxSeqLen);
  labels.length = Math.min(full, maxSeqLen);
  return labels.some((l, i) => i > 0 && l !== IGNORE_INDEX) ? { inputIds, labels } : null;
}

/** A byte-level BPE tokenizer whose merges build runs of "a" up to 64 bytes in one token (longer than CHARS_PER_TOKEN_BOUND). */
async function longTokenBpe(): Promise<Tokenizer> {
  const dir = tempDir('bpe');
  const t = byteLevelTokenizer('llama');
  const json = t.tokenizerJson as { model: { vocab: Record<string, number>; merges: string[] } };
  let next = Math.max(...Object.values(json.model.vocab), ...((t.tokenizerJson as { added_tokens: Array<{ id: number }> }).added_tokens.map((a) => a.id))) + 1;
  for (let piece = 'a'; piece.length < 64; piece += piece) {
    json.model.merges.push(`${piece} ${piece}`);
    json.model.vocab[piece + piece] = next++;
  }
  writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify(t.tokenizerJson));
  writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify(t.tokenizerConfig));
  return loadTokenizer(dir);
}

describe('long records are cut before they are tokenized', () => {
  const chars: Tokenizer = { encode: (s) => Array.from(s, (c) => c.codePointAt(0)! + 3), bosId: 1, eosId: 2, padId: 0 };

  it('no record is changed by the cut: tokens equal encoding every field whole, for records that fit and records that do not', async () => {
    const bpe = await longTokenBpe();
    expect(bpe.encode('a'.repeat(64))).toHaveLength(1); // a token of 64 bytes: 4x the bound the first prefix assumes
    const r = createRng(5);
    const rng = (): number => r.next();
    const words = ['the ', 'cat ', 'é', '😀', 'a'.repeat(64), 'a'.repeat(7), '\n', '  ', 'lorem ', 'ipsum'];
    const text = (n: number): string => Array.from({ length: n }, () => words[Math.floor(rng() * words.length)]!).join('');
    let fitted = 0;
    let cut = 0;
    for (let trial = 0; trial < 300; trial++) {
      const maxSeqLen = 8 + Math.floor(rng() * 56);
      const long = (): number => (rng() < 0.3 ? Math.floor(rng() * 400) : Math.floor(rng() * 20));
      // Some fields are one run of "a": 64 characters per token, where a prefix of 16 characters per token holds too few.
      const field = (): string => (rng() < 0.25 ? 'a'.repeat(Math.floor(rng() * 64 * 80)) : text(long()));
      const raw = rng() < 0.5 ? { instruction: `q ${field()}`, input: field(), output: `r ${field()}` } : { text: `t ${field()}` };
      const rec = parseRecords(JSON.stringify(raw), 'r.jsonl')[0]!;
      for (const tok of [bpe, chars]) {
        const want = reference(tok, rec, 'alpaca', maxSeqLen);
        const got = tokenizeRecord(tok, rec, { template: 'alpaca', maxSeqLen });
        expect(got).toEqual(want);
        const whole = renderRecord(rec, 'alpaca').reduce((n, s) => n + tok.encode(s.text).length + (s.train ? 1 : 0), 1);
        if (whole <= maxSeqLen) {
          fitted++;
          expect(got, 'a record that fits is never dropped').not.toBeNull();
          expect(got!.inputIds).toHaveLength(whole);
        }
        if (renderRecord(rec, 'alpaca').some((s) => s.text.length > maxSeqLen * CHARS_PER_TOKEN_BOUND)) cut++;
      }
    }
    // Both cases occurred often enough to mean something.
    expect(fitted).toBeGreaterThan(50);
    expect(cut).toBeGreaterThan(50);
  });

  it('a 50 MB field costs what max_seq_len tokens cost: the tokenizer never sees more than a bounded prefix', () => {
    let longest = 0;
    const counting: Tokenizer = { ...chars, encode: (s) => ((longest = Math.max(longest, s.length)), chars.encode(s)) };
    const huge = 'lorem ipsum dolor sit amet '.repeat(2_000_000); // 54 MB
    const rec = parseRecords(JSON.stringify({ instruction: 'Summarise', output: huge }), 'big.jsonl')[0]!;
    const maxSeqLen = 256;
    const got = tokenizeRecord(counting, rec, { template: 'plain', maxSeqLen })!;
    expect(got.inputIds).toHaveLength(maxSeqLen);
    expect(longest).toBeLessThanOrEqual(maxSeqLen * CHARS_PER_TOKEN_BOUND);
    // The same tokens as encoding a prefix far longer than any cut (the whole field would be the cost this avoids).
    const short = parseRecords(JSON.stringify({ instruction: 'Summarise', output: huge.slice(0, 100_000) }), 'big.jsonl')[0]!;
    expect(got).toEqual(reference(chars, short, 'plain', maxSeqLen));
  });

  it('encodeWithin grows a prefix that yields too few tokens and keeps surrogate pairs whole', () => {
    const calls: number[] = [];
    const sparse: Tokenizer = { ...chars, encode: (s) => (calls.push(s.length), chars.encode(s.replace(/x/g, ''))) };
    // 'x' yields no token: the first prefix (16 x 10 chars) holds no token, so the prefix grows until the text is whole.
    const text = `${'x'.repeat(5000)}${'y'.repeat(100)}`;
    expect(encodeWithin(sparse, text, 10)).toEqual(chars.encode('y'.repeat(100)));
    expect(calls).toEqual([160, 640, 2560, 5100]);
    const emoji = '😀'.repeat(1000);
    const ids = encodeWithin(chars, emoji, 10);
    expect(ids.length).toBeGreaterThanOrEqual(10 + CUT_GUARD);
    expect(ids.every((id) => id === '😀'.codePointAt(0)! + 3)).toBe(true);
  });

  it('dropped records are named by file and line', () => {
    const src = (line: number) => ({ file: 'a.jsonl', line, index: line - 1 });
    expect(droppedWhere([src(4)])).toBe('a.jsonl:4');
    expect(droppedWhere([src(4), src(9), src(12), src(20)])).toBe('a.jsonl:4, a.jsonl:9, a.jsonl:12, ...');
  });
});
