/**
 * Prompt templates: turn a record into text segments, each marked as trained
 * (the assistant's response) or not (the prompt). Only trained segments carry
 * loss; tokenize.ts appends EOS after each trained segment.
 *
 *   alpaca  the Stanford Alpaca prompt (with and without input)
 *   chatml  <|im_start|>role\n...<|im_end|>\n  (the assistant's <|im_end|> is trained)
 *   plain   ### Instruction:\n...\n### Response:\n...
 *
 * Alpaca records under chatml become one user turn (instruction, then a blank
 * line and the input when there is one) and one assistant turn. Chat records
 * under alpaca/plain become one Instruction/Response pair per exchange; a
 * system message replaces the alpaca preamble (plain: it is written first).
 */
import type { ChatMessage, SftRecord } from './dataset.ts';

export interface Segment {
  text: string;
  train: boolean;
}

export interface PromptTemplate {
  name: string;
  render(rec: SftRecord): Segment[];
}

const ALPACA_PREAMBLE_INPUT =
  'Below is an instruction that describes a task, paired with an input that provides further context. ' +
  'Write a response that appropriately completes the request.';
const ALPACA_PREAMBLE = 'Below is an instruction that describes a task. Write a response that appropriately completes the request.';

/** Alpaca record -> chat messages (instruction, blank line, input). */
export function toMessages(rec: SftRecord): ChatMessage[] {
  if (rec.kind === 'chat') return rec.messages;
  if (rec.kind === 'text') return [{ role: 'assistant', content: rec.text }];
  const user = rec.input.trim() === '' ? rec.instruction : `${rec.instruction}\n\n${rec.input}`;
  return [
    { role: 'user', content: user },
    { role: 'assistant', content: rec.output },
  ];
}

const alpaca: PromptTemplate = {
  name: 'alpaca',
  render(rec) {
    if (rec.kind === 'alpaca') {
      const prompt =
        rec.input.trim() === ''
          ? `${ALPACA_PREAMBLE}\n\n### Instruction:\n${rec.instruction}\n\n### Response:\n`
          : `${ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\n${rec.instruction}\n\n### Input:\n${rec.input}\n\n### Response:\n`;
      return [
        { text: prompt, train: false },
        { text: rec.output, train: true },
      ];
    }
    return renderTurns(toMessages(rec), {
      system: (s) => `${s}\n\n`,
      defaultSystem: `${ALPACA_PREAMBLE}\n\n`,
      instruction: (u) => `### Instruction:\n${u}\n\n`,
      response: '### Response:\n',
      afterAssistant: '\n\n',
    });
  },
};

const plain: PromptTemplate = {
  name: 'plain',
  render(rec) {
    return renderTurns(toMessages(rec), {
      system: (s) => `${s}\n`,
      defaultSystem: '',
      instruction: (u) => `### Instruction:\n${u}\n`,
      response: '### Response:\n',
      afterAssistant: '\n',
    });
  },
};

const chatml: PromptTemplate = {
  name: 'chatml',
  render(rec) {
    const out: Segment[] = [];
    for (const m of toMessages(rec)) {
      if (m.role === 'assistant') {
        out.push({ text: '<|im_start|>assistant\n', train: false });
        out.push({ text: `${m.content}<|im_end|>`, train: true });
        out.push({ text: '\n', train: false });
      } else {
        out.push({ text: `<|im_start|>${m.role}\n${m.content}<|im_end|>\n`, train: false });
      }
    }
    return tidy(out);
  },
};

interface TurnStyle {
  system: (s: string) => string;
  /** Written first when the record has no system message. */
  defaultSystem: string;
  instruction: (u: string) => string;
  response: string;
  /** Separator after an assistant turn that is followed by another turn (not trained). */
  afterAssistant: string;
}

function renderTurns(messages: ChatMessage[], style: TurnStyle): Segment[] {
  const out: Segment[] = [];
  let start = 0;
  if (messages[0]?.role === 'system') {
    out.push({ text: style.system(messages[0].content), train: false });
    start = 1;
  } else {
    out.push({ text: style.defaultSystem, train: false });
  }
  for (let i = start; i < messages.length; i++) {
    const m = messages[i]!;
    if (messages[i - 1]?.role === 'assistant') out.push({ text: style.afterAssistant, train: false });
    if (m.role === 'assistant') {
      out.push({ text: style.response, train: false });
      out.push({ text: m.content, train: true });
    } else {
      out.push({ text: style.instruction(m.content), train: false });
    }
  }
  return tidy(out);
}

/** Drops empty and trailing prompt segments and joins neighbouring prompt segments (trained ones stay separate: each gets its EOS). */
function tidy(segs: Segment[]): Segment[] {
  const out: Segment[] = [];
  for (const s of segs) {
    if (s.text === '') continue;
    const prev = out[out.length - 1];
    if (prev && !prev.train && !s.train) prev.text += s.text;
    else out.push({ ...s });
  }
  // Prompt text after the last response carries no loss: leave it out.
  while (out.length > 0 && !out[out.length - 1]!.train) out.pop();
  return out;
}

export const TEMPLATES: Readonly<Record<string, PromptTemplate>> = { alpaca, chatml, plain };

/** A built-in template by name; an unknown name is an error listing the known ones. */
export function getTemplate(name: string): PromptTemplate {
  const t = Object.hasOwn(TEMPLATES, name) ? TEMPLATES[name] : undefined;
  if (!t) throw new Error(`prompt template "${name}" is not known; use one of ${Object.keys(TEMPLATES).join(', ')}`);
  return t;
}

/** Segments of a record under a template (a template object, or a built-in name). */
export function renderRecord(rec: SftRecord, template: PromptTemplate | string): Segment[] {
  const t = typeof template === 'string' ? getTemplate(template) : template;
  // Plain-text records carry no prompt: the whole text is trained, under any template.
  if (rec.kind === 'text') return [{ text: rec.text, train: true }];
  return t.render(rec);
}
