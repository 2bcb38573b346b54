import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { chatTemplateFromConfig, getTemplate, loadChatTemplate, modelChatTemplate, renderRecord, type ChatTemplateSource } from '../../common/data/template.ts';
import { tokenizeRecord, type Tokenizer } from '../../common/data/tokenize.ts';
import type { ChatMessage, SftRecord } from '../../common/data/dataset.ts';
import { IGNORE_INDEX } from '../../common/model-config.ts';

const fixture = (name: string) => readFileSync(join(import.meta.dirname, '../fixtures/chat-templates', name), 'utf8');
const llama3: ChatTemplateSource = { template: fixture('llama-3-instruct.jinja'), bosToken: '<|begin_of_text|>', eosToken: '<|eot_id|>', where: 'llama-3' };
const qwen25: ChatTemplateSource = { template: fixture('qwen2.5-instruct.jinja'), bosToken: '', eosToken: '<|im_end|>', where: 'qwen2.5' };

const chat = (messages: ChatMessage[]): SftRecord => ({ kind: 'chat', messages, source: { file: 't.jsonl', line: 1, index: 0 }, meta: {} });
const conversation: ChatMessage[] = [
  { role: 'system', content: 'You are terse.' },
  { role: 'user', content: 'What is 2+2?' },
  { role: 'assistant', content: 'The answer is 4.' },
  { role: 'user', content: 'And 3+3?' },
  { role: 'assistant', content: 'It is 6.' },
];

/**
 * A tokenizer for the test: each special token of the two formats is one id,
 * every other character its own id (code point + 1000). decode inverts it.
 */
const SPECIAL = ['<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>', '<|im_start|>', '<|im_end|>', '<|endoftext|>'];
function testTokenizer(bos: string | null, eos: string): Tokenizer & { decode(ids: number[]): string } {
  return {
    encode(text) {
      const ids: number[] = [];
      for (let i = 0; i < text.length; ) {
        const s = SPECIAL.findIndex((t) => text.startsWith(t, i));
        if (s >= 0) {
          ids.push(s);
          i += SPECIAL[s]!.length;
        } else {
          ids.push(text.codePointAt(i)! + 1000);
          i += text.codePointAt(i)! > 0xffff ? 2 : 1;
        }
      }
      return ids;
    },
    decode: (ids) => ids.map((id) => (id < 1000 ? SPECIAL[id]! : String.fromCodePoint(id - 1000))).join(''),
    bosId: bos === null ? null : SPECIAL.indexOf(bos),
    eosId: SPECIAL.indexOf(eos),
    padId: SPECIAL.indexOf(eos),
  };
}

/** The trained stretches of an example, decoded: labels other than -100, split where a -100 intervenes. */
function trainedRuns(tok: { decode(ids: number[]): string }, labels: number[]): string[] {
  const runs: number[][] = [];
  let cur: number[] | null = null;
  for (const l of labels) {
    if (l === IGNORE_INDEX) cur = null;
    else {
      if (!cur) runs.push((cur = []));
      cur.push(l);
    }
  }
  return runs.map((r) => tok.decode(r));
}

describe('chat templates rendered with @huggingface/jinja', () => {
  it('Llama 3: the rendering equals the documented format', () => {
    const expected =
      '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>' +
      '<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>' +
      '<|start_header_id|>assistant<|end_header_id|>\n\nThe answer is 4.<|eot_id|>' +
      '<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>' +
      '<|start_header_id|>assistant<|end_header_id|>\n\nIt is 6.<|eot_id|>';
    const t = new Template(llama3.template);
    expect(t.render({ messages: conversation, bos_token: llama3.bosToken, add_generation_prompt: false })).toBe(expected);
    const segs = modelChatTemplate(llama3).render(chat(conversation));
    expect(segs.map((s) => s.text).join('')).toBe(expected);
    expect(segs.filter((s) => s.train).map((s) => s.text)).toEqual(['The answer is 4.<|eot_id|>', 'It is 6.<|eot_id|>']);
    expect(t.render({ messages: conversation.slice(0, 2), bos_token: llama3.bosToken, add_generation_prompt: true })).toBe(
      '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>' +
        '<|start_header_id|>assistant<|end_header_id|>\n\n',
    );
  });

  it('Qwen2.5: ChatML with the default system prompt when there is none', () => {
    const noSystem = conversation.slice(1);
    const expected =
      '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' +
      '<|im_start|>user\nWhat is 2+2?<|im_end|>\n' +
      '<|im_start|>assistant\nThe answer is 4.<|im_end|>\n' +
      '<|im_start|>user\nAnd 3+3?<|im_end|>\n' +
      '<|im_start|>assistant\nIt is 6.<|im_end|>\n';
    const segs = modelChatTemplate(qwen25).render(chat(noSystem));
    // The final "\n" after the last <|im_end|> carries no loss, so the segments stop before it.
    expect(segs.map((s) => s.text).join('')).toBe(expected.slice(0, -1));
    expect(new Template(qwen25.template).render({ messages: noSystem, add_generation_prompt: false }).replace(/\n$/, '')).toBe(expected.slice(0, -1));
    expect(segs.filter((s) => s.train).map((s) => s.text)).toEqual(['The answer is 4.<|im_end|>', 'It is 6.<|im_end|>']);
    const withSystem = modelChatTemplate(qwen25).render(chat(conversation));
    expect(withSystem[0]!.text.startsWith('<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n')).toBe(true);
  });

  for (const [name, src, bos, eos, turnEnd] of [
    ['Llama 3', llama3, '<|begin_of_text|>', '<|eot_id|>', '<|eot_id|>'],
    ['Qwen2.5', qwen25, null, '<|im_end|>', '<|im_end|>'],
  ] as const) {
    it(`${name}: the loss mask covers exactly the assistant turns, token by token`, () => {
      const tok = testTokenizer(bos, eos);
      const ex = tokenizeRecord(tok, chat(conversation), { template: modelChatTemplate(src), maxSeqLen: 4096 })!;
      const text = tok.decode(ex.inputIds);
      // No BOS or EOS added beyond what the template writes.
      expect(text).toBe(renderRecord(chat(conversation), modelChatTemplate(src)).map((s) => s.text).join(''));
      expect(text.split('<|begin_of_text|>').length - 1).toBe(bos ? 1 : 0);
      expect(trainedRuns(tok, ex.labels)).toEqual([`The answer is 4.${turnEnd}`, `It is 6.${turnEnd}`]);
      const trained = ex.labels.filter((l) => l !== IGNORE_INDEX).length;
      expect(trained).toBe(tok.encode(`The answer is 4.${turnEnd}`).length + tok.encode(`It is 6.${turnEnd}`).length);
      for (let i = 0; i < ex.labels.length; i++) if (ex.labels[i] !== IGNORE_INDEX) expect(ex.labels[i]).toBe(ex.inputIds[i]);
    });
  }

  it('alpaca records become one user and one assistant turn', () => {
    const rec: SftRecord = { kind: 'alpaca', instruction: 'Add', input: '2 and 2', output: '4', source: { file: 'a.jsonl', line: 1, index: 0 }, meta: {} };
    const segs = modelChatTemplate(qwen25).render(rec);
    expect(segs.map((s) => s.text).join('')).toContain('<|im_start|>user\nAdd\n\n2 and 2<|im_end|>\n<|im_start|>assistant\n4<|im_end|>');
    expect(segs.filter((s) => s.train).map((s) => s.text)).toEqual(['4<|im_end|>']);
  });

  it('refuses templates that rewrite earlier turns, and models without a chat_template', async () => {
    // Drops every assistant reply but the last: not prefix-stable.
    const rewriting: ChatTemplateSource = {
      template: "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
      bosToken: '',
      eosToken: '',
      where: 'rewriting',
    };
    expect(() => modelChatTemplate(rewriting).render(chat(conversation))).toThrow(/rewriting: chat_template does not render conversations prefix by prefix \(message 3.*use --template chatml/);
    expect(() => modelChatTemplate({ ...rewriting, template: '{% for m in messages %}' })).toThrow(/rewriting: chat_template is not a template @huggingface\/jinja can parse/);
    expect(() => chatTemplateFromConfig({ bos_token: '<s>' }, 'm/tokenizer_config.json')).toThrow(/m\/tokenizer_config.json: has no chat_template.*--template chatml/);
    expect(chatTemplateFromConfig({ chat_template: [{ name: 'tool_use', template: 'x' }, { name: 'default', template: 'y' }] }, 'c').template).toBe('y');
    expect(() => getTemplate('auto')).toThrow(/renders the model's own chat_template/);
    const dir = await mkdtemp(join(tmpdir(), 'fedtune-chat-'));
    try {
      await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ chat_template: llama3.template, bos_token: { content: '<|begin_of_text|>' }, eos_token: '<|eot_id|>' }));
      expect(await loadChatTemplate(dir)).toMatchObject({ template: llama3.template, bosToken: '<|begin_of_text|>', eosToken: '<|eot_id|>' });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
