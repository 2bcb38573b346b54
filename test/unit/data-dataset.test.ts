import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadRecords } from '../../common/data/dataset.ts';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'fedtune-data-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function file(name: string, text: string): Promise<string> {
  const p = join(dir, name);
  await writeFile(p, text);
  return p;
}

const alpacaWithInput = { instruction: 'Translate', input: 'bonjour', output: 'hello', site: 'paris' };
const alpacaNoInput = { instruction: 'Say hi', output: 'hi', label: 'greeting' };
const chat = {
  messages: [
    { role: 'system', content: 'Be brief.' },
    { role: 'user', content: 'Capital of France?' },
    { role: 'assistant', content: 'Paris.' },
  ],
  id: 7,
};

describe('loadRecords', () => {
  it('reads JSONL: Alpaca with and without input, chat, blank lines skipped, other fields kept in meta', async () => {
    const p = await file('mixed.jsonl', [JSON.stringify(alpacaWithInput), '', JSON.stringify(alpacaNoInput), '   ', JSON.stringify(chat), ''].join('\n'));
    const recs = await loadRecords(p);
    expect(recs).toHaveLength(3);
    const [a, b, c] = recs;
    expect(a).toMatchObject({ kind: 'alpaca', instruction: 'Translate', input: 'bonjour', output: 'hello', meta: { site: 'paris' } });
    expect(a!.source).toEqual({ file: p, line: 1, index: 0 });
    expect(b).toMatchObject({ kind: 'alpaca', input: '', output: 'hi', meta: { label: 'greeting' }, source: { line: 3, index: 1 } });
    expect(c).toMatchObject({ kind: 'chat', meta: { id: 7 }, source: { line: 5, index: 2 } });
    if (c!.kind !== 'chat') throw new Error('expected a chat record');
    expect(c!.messages.map((m) => m.role)).toEqual(['system', 'user', 'assistant']);
  });

  it('reads a JSON array to the same records, with the line each record starts on', async () => {
    const text = `[\n  ${JSON.stringify(alpacaWithInput)},\n  ${JSON.stringify(alpacaNoInput, null, 2)},\n  ${JSON.stringify(chat)}\n]\n`;
    const fromArray = await loadRecords(await file('data.json', text));
    const fromLines = await loadRecords(await file('data2.jsonl', [alpacaWithInput, alpacaNoInput, chat].map((r) => JSON.stringify(r)).join('\n')));
    const strip = (rs: typeof fromArray) => rs.map(({ source: _s, ...rest }) => rest);
    expect(strip(fromArray)).toEqual(strip(fromLines));
    expect(fromArray.map((r) => r.source.line)).toEqual([2, 3, 8]);
  });

  it('names the file and line of a malformed JSONL line', async () => {
    const p = await file('bad.jsonl', `${JSON.stringify(alpacaNoInput)}\n\n{"instruction": "x", "output": \n`);
    await expect(loadRecords(p)).rejects.toThrow(new RegExp(`${p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:3: line is not valid JSON`));
  });

  it('names the line and the problem for bad records', async () => {
    const cases: Array<[unknown, RegExp]> = [
      [{ instruction: 'x' }, /:2: Alpaca record is missing "output"/],
      [{ instruction: 'x', output: 5 }, /:2: "output" must be a string, got a number/],
      [{ messages: [] }, /:2: "messages" is empty/],
      [{ messages: [{ role: 'bot', content: 'x' }] }, /:2: messages\[0\] has unknown role "bot"; allowed roles: system, user, assistant/],
      [{ messages: [{ role: 'assistant', content: 'x' }, { role: 'user', content: 'y' }] }, /:2: the last message is from "user", expected "assistant"/],
      [{ messages: [{ role: 'user' }, { role: 'assistant', content: 'y' }] }, /:2: messages\[0\] is missing "content"/],
      [{ prompt: 'hello' }, /:2: record is neither Alpaca .*, chat .* nor text .*; fields found: prompt/],
      [[1, 2], /:2: a record must be a JSON object, got an array/],
      [{ messages: [{ role: 'user', content: 'q' }, { role: 'assistant', content: 'a' }], output: 'z' }, /:2: record has both "messages"/],
    ];
    for (const [rec, re] of cases) {
      const p = await file('case.jsonl', `${JSON.stringify(alpacaNoInput)}\n${JSON.stringify(rec)}\n`);
      await expect(loadRecords(p), JSON.stringify(rec)).rejects.toThrow(re);
    }
  });

  it('names the array index of a bad record in a JSON array', async () => {
    const p = await file('bad.json', JSON.stringify([alpacaNoInput, { instruction: 'y' }], null, 1));
    await expect(loadRecords(p)).rejects.toThrow(/bad\.json: record \[1\] \(line \d+\): Alpaca record is missing "output"/);
    const broken = await file('broken.json', '[\n{"instruction": "a", "output": "b"},\n{"instruction": }\n]');
    await expect(loadRecords(broken)).rejects.toThrow(/broken\.json(:3)?: file is not valid JSON/);
  });

  it('rejects empty files and missing files clearly', async () => {
    await expect(loadRecords(await file('empty.jsonl', ''))).rejects.toThrow(/empty\.jsonl: dataset file is empty/);
    await expect(loadRecords(await file('blank.jsonl', '\n  \n'))).rejects.toThrow(/blank\.jsonl: dataset file is empty/);
    await expect(loadRecords(await file('none.json', '[]'))).rejects.toThrow(/none\.json: dataset has no records/);
    await expect(loadRecords(join(dir, 'nope.jsonl'))).rejects.toThrow(/nope\.jsonl: dataset file not found/);
  });
});

describe('plain-text records', () => {
  it('are read as text records whose every token is trained, under any template', async () => {
    const { parseRecords } = await import('../../common/data/dataset.ts');
    const { renderRecord } = await import('../../common/data/template.ts');
    const recs = parseRecords('{"text": "hello world", "source": "web"}\n', 'pre.jsonl');
    expect(recs[0]!.kind).toBe('text');
    expect(recs[0]!.meta).toEqual({ source: 'web' });
    for (const t of ['alpaca', 'chatml', 'plain']) expect(renderRecord(recs[0]!, t)).toEqual([{ text: 'hello world', train: true }]);
    expect(() => parseRecords('{"text": "  "}\n', 'pre.jsonl')).toThrow(/pre\.jsonl:1: "text" is empty/);
    expect(() => parseRecords('{"text": 3}\n', 'pre.jsonl')).toThrow(/pre\.jsonl:1: "text" must be a string/);
  });
});
