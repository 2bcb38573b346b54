import { describe, expect, it } from 'vitest';
import { parseRecords, type SftRecord } from '../../common/data/dataset.ts';
import { getTemplate, renderRecord } from '../../common/data/template.ts';
import { countTokens, tokenizeRecord, tokenizeRecords, type Tokenizer } from '../../common/data/tokenize.ts';

/** Byte-level tokenizer: id = byte + 3; 0 pad, 1 bos, 2 eos. */
const bytes: Tokenizer = {
  encode: (text) => Array.from(new TextEncoder().encode(text), (b) => b + 3),
  bosId: 1,
  eosId: 2,
  padId: 0,
};
const enc = (s: string) => bytes.encode(s);
const M = -100;
const masked = (s: string) => enc(s).map(() => M);

function one(rec: Record<string, unknown>): SftRecord {
  return parseRecords(JSON.stringify(rec), 'test.jsonl')[0]!;
}

const withInput = one({ instruction: 'Add', input: '2 3', output: '5' });
const noInput = one({ instruction: 'Greet', output: 'hi' });
const chat = one({
  messages: [
    { role: 'system', content: 'S' },
    { role: 'user', content: 'Q1' },
    { role: 'assistant', content: 'A1' },
    { role: 'user', content: 'Q2' },
    { role: 'assistant', content: 'A2' },
  ],
});

describe('templates', () => {
  it('alpaca renders the standard Alpaca prompt with and without input', () => {
    expect(renderRecord(withInput, 'alpaca')).toEqual([
      {
        text:
          'Below is an instruction that describes a task, paired with an input that provides further context. ' +
          'Write a response that appropriately completes the request.\n\n### Instruction:\nAdd\n\n### Input:\n2 3\n\n### Response:\n',
        train: false,
      },
      { text: '5', train: true },
    ]);
    expect(renderRecord(noInput, 'alpaca')).toEqual([
      {
        text: 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nGreet\n\n### Response:\n',
        train: false,
      },
      { text: 'hi', train: true },
    ]);
  });

  it('chatml trains only assistant turns and their <|im_end|>', () => {
    const segs = renderRecord(chat, 'chatml');
    expect(segs).toEqual([
      { text: '<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n', train: false },
      { text: 'A1<|im_end|>', train: true },
      { text: '\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n', train: false },
      { text: 'A2<|im_end|>', train: true },
    ]);
    expect(renderRecord(withInput, 'chatml').filter((s) => s.train).map((s) => s.text)).toEqual(['5<|im_end|>']);
    expect(renderRecord(withInput, 'chatml')[0]!.text).toContain('<|im_start|>user\nAdd\n\n2 3<|im_end|>');
  });

  it('plain renders Instruction/Response pairs', () => {
    expect(renderRecord(noInput, 'plain')).toEqual([
      { text: '### Instruction:\nGreet\n### Response:\n', train: false },
      { text: 'hi', train: true },
    ]);
    const segs = renderRecord(chat, 'plain');
    expect(segs.map((s) => s.text).join('')).toBe('S\n### Instruction:\nQ1\n### Response:\nA1\n### Instruction:\nQ2\n### Response:\nA2');
    expect(segs.filter((s) => s.train).map((s) => s.text)).toEqual(['A1', 'A2']);
  });

  it('an unknown template name lists the known ones', () => {
    expect(() => getTemplate('vicuna')).toThrow(/"vicuna" is not known; use one of alpaca, chatml, plain/);
    expect(() => renderRecord(noInput, 'toString')).toThrow(/not known/);
  });
});

describe('tokenizeRecord', () => {
  it('masks the prompt and BOS, trains the response and EOS', () => {
    const ex = tokenizeRecord(bytes, noInput, { template: 'plain', maxSeqLen: 512 })!;
    const prompt = '### Instruction:\nGreet\n### Response:\n';
    expect(ex.inputIds).toEqual([1, ...enc(prompt), ...enc('hi'), 2]);
    expect(ex.labels).toEqual([M, ...masked(prompt), ...enc('hi'), 2]);
    expect(countTokens([ex])).toBe(3);
  });

  it('puts EOS after every assistant turn of a chat and masks user turns', () => {
    const ex = tokenizeRecord(bytes, chat, { template: 'plain', maxSeqLen: 512, addBos: false })!;
    expect(ex.inputIds).toEqual([
      ...enc('S\n### Instruction:\nQ1\n### Response:\n'),
      ...enc('A1'),
      2,
      ...enc('\n### Instruction:\nQ2\n### Response:\n'),
      ...enc('A2'),
      2,
    ]);
    expect(ex.labels).toEqual([
      ...masked('S\n### Instruction:\nQ1\n### Response:\n'),
      ...enc('A1'),
      2,
      ...masked('\n### Instruction:\nQ2\n### Response:\n'),
      ...enc('A2'),
      2,
    ]);
  });

  it('respects addEos false and addBos defaults to the tokenizer having a BOS', () => {
    const noBos: Tokenizer = { ...bytes, bosId: null };
    const ex = tokenizeRecord(noBos, noInput, { template: 'plain', maxSeqLen: 512, addEos: false })!;
    expect(ex.inputIds).toEqual(enc('### Instruction:\nGreet\n### Response:\nhi'));
    expect(() => tokenizeRecord({ ...bytes, eosId: null }, noInput, { template: 'plain', maxSeqLen: 512 })).toThrow(/no EOS token/);
    expect(() => tokenizeRecord(noBos, noInput, { template: 'plain', maxSeqLen: 512, addBos: true })).toThrow(/no BOS token/);
    expect(() => tokenizeRecord(bytes, noInput, { template: 'plain', maxSeqLen: 1 })).toThrow(/maxSeqLen is 1/);
  });

  it('truncates keeping the start, and drops a record whose response is cut off entirely', () => {
    const prompt = '### Instruction:\nGreet\n### Response:\n';
    const full = 1 + enc(prompt).length + 2 + 1;
    const cut = tokenizeRecord(bytes, noInput, { template: 'plain', maxSeqLen: full - 2 })!;
    expect(cut.inputIds).toEqual([1, ...enc(prompt), enc('h')[0]]);
    expect(cut.labels).toEqual([M, ...masked(prompt), enc('h')[0]]);
    expect(tokenizeRecord(bytes, noInput, { template: 'plain', maxSeqLen: 1 + enc(prompt).length })).toBeNull();

    const { examples, dropped, droppedSources } = tokenizeRecords(bytes, [noInput, one({ instruction: 'x'.repeat(100), output: 'y' }), withInput], {
      template: 'plain',
      maxSeqLen: 60,
    });
    expect(examples).toHaveLength(2);
    expect(dropped).toBe(1);
    expect(droppedSources[0]!.file).toBe('test.jsonl');
    for (const ex of examples) expect(ex.inputIds.length).toBeLessThanOrEqual(60);
  });
});
