import { describe, expect, it, beforeAll, afterAll } from 'vitest';
import { mkdtemp, readFile, rm, unlink, writeFile, cp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { initModel } from '../../worker/engine/init.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';

let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'fedtune-tok-'));
  for (const arch of ['llama', 'qwen2', 'gpt2'] as const) {
    await initModel(join(root, arch), { arch, hiddenSize: 16, numLayers: 1, numHeads: 2 });
  }
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const texts = [
  'Hello, world! The quick brown fox jumps over the lazy dog. 0123456789',
  'Crème brûlée, naïve café, Ångström, señor, Übermäßig',
  'Emoji: 🙂👍🏽 👩‍👩‍👧‍👦 🇫🇷 ✨',
  '中文文本测试：你好，世界！日本語のテキスト、한국어',
  '  leading and trailing spaces  \n\ttabs\r\nand newlines\n\n',
  "it's, they're, we'll -- punctuation!?;:[]{}<>",
];

describe('byte-level tokenizer', () => {
  for (const arch of ['llama', 'qwen2', 'gpt2'] as const) {
    it(`${arch}: round-trips ASCII, accents, emoji and CJK exactly`, async () => {
      const tok = await loadTokenizer(join(root, arch));
      for (const text of texts) {
        const ids = tok.encode(text);
        expect(ids.length).toBeGreaterThan(0);
        expect(ids.every((i) => Number.isInteger(i) && i >= 0 && i < tok.vocabSize)).toBe(true);
        expect(tok.decode(ids)).toBe(text);
      }
    });
  }

  it('maps each UTF-8 byte to its own id and applies the merges', async () => {
    const tok = await loadTokenizer(join(root, 'llama'));
    expect(tok.encode('中文')).toEqual([...Buffer.from('中文', 'utf8')]);
    expect(tok.encode('é')).toEqual([0xc3, 0xa9]);
    const the = tok.encode(' the');
    expect(the).toHaveLength(1);
    expect(the[0]).toBeGreaterThanOrEqual(256);
    expect(tok.encode('')).toEqual([]);
    expect(tok.decode([])).toBe('');
  });

  it('adds no special tokens when encoding; special ids come from tokenizer_config.json', async () => {
    const llama = await loadTokenizer(join(root, 'llama'));
    const cfg = JSON.parse(await readFile(join(root, 'llama', 'config.json'), 'utf8'));
    expect(llama.vocabSize).toBe(cfg.vocab_size);
    expect(llama.bosId).toBe(cfg.bos_token_id);
    expect(llama.eosId).toBe(cfg.eos_token_id);
    expect(llama.padId).not.toBe(llama.eosId);
    expect(llama.encode('a')).toEqual([97]);
    const withSpecial = [llama.bosId!, ...llama.encode('hi'), llama.eosId!];
    expect(llama.decode(withSpecial)).toBe('<s>hi</s>');
    expect(llama.decode(withSpecial, true)).toBe('hi');

    const gpt2 = await loadTokenizer(join(root, 'gpt2'));
    expect(gpt2.bosId).toBe(gpt2.eosId);
    expect(gpt2.padId).toBe(gpt2.eosId); // no pad token: falls back to eos
    const qwen = await loadTokenizer(join(root, 'qwen2'));
    expect(qwen.bosId).toBeNull();
    expect(qwen.eosId).not.toBeNull();
  });

  it('falls back to config.json ids without tokenizer_config.json, and to 0 for pad', async () => {
    const dir = join(root, 'no-cfg');
    await cp(join(root, 'gpt2'), dir, { recursive: true });
    await unlink(join(dir, 'tokenizer_config.json'));
    const cfg = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8'));
    const tok = await loadTokenizer(dir);
    expect(tok.eosId).toBe(cfg.eos_token_id);
    expect(tok.padId).toBe(cfg.eos_token_id);
    await writeFile(join(dir, 'config.json'), JSON.stringify({ ...cfg, eos_token_id: null, bos_token_id: null }));
    const bare = await loadTokenizer(dir);
    expect(bare.eosId).toBeNull();
    expect(bare.padId).toBe(0);
  });

  it('reports bad input clearly', async () => {
    const tok = await loadTokenizer(join(root, 'llama'));
    expect(() => tok.decode([1, tok.vocabSize])).toThrow(new RegExp(`token id ${tok.vocabSize} at position 1 is outside the vocabulary`));
    await expect(loadTokenizer(join(root, 'nowhere'))).rejects.toThrow(/tokenizer\.json not found/);
    const dir = join(root, 'bad-special');
    await cp(join(root, 'llama'), dir, { recursive: true });
    const tc = JSON.parse(await readFile(join(dir, 'tokenizer_config.json'), 'utf8'));
    await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ ...tc, eos_token: { content: '<|eot|>' } }));
    await expect(loadTokenizer(dir)).rejects.toThrow(/eos_token "<\|eot\|>" .* is not in the vocabulary/);
    await writeFile(join(dir, 'tokenizer.json'), '{ not json');
    await expect(loadTokenizer(dir)).rejects.toThrow(/tokenizer\.json is not valid JSON/);
  });
});
