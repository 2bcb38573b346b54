/**
 * Prompt templates: turn a record into text segments, each marked as trained
 * (the assistant's response) or not (the prompt). Only trained segments carry
 * loss; tokenize.ts appends EOS after each trained segment.
 *
 *   alpaca  the Stanford Alpaca prompt (with and without input)
 *   chatml  <|im_start|>role\n...<|im_end|>\n  (the assistant's <|im_end|> is trained)
 *   plain   ### Instruction:\n...\n### Response:\n...
 *   auto    the model's own `chat_template` (tokenizer_config.json), rendered
 *           with @huggingface/jinja: see modelChatTemplate()
 *
 * Alpaca records under chatml become one user turn (instruction, then a blank
 * line and the input when there is one) and one assistant turn. Chat records
 * under alpaca/plain become one Instruction/Response pair per exchange; a
 * system message replaces the alpaca preamble (plain: it is written first).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Template } from '@huggingface/jinja';
import type { ChatMessage, SftRecord } from './dataset.ts';

export interface Segment {
  text: string;
  train: boolean;
}

export interface PromptTemplate {
  name: string;
  render(rec: SftRecord): Segment[];
  /**
   * The rendered text already holds the model's BOS and end-of-turn tokens
   * (chat templates): tokenize.ts then adds no BOS and no EOS unless asked to.
   */
  ownsSpecialTokens?: boolean;
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
  if (name === AUTO_TEMPLATE) {
    throw new Error(`prompt template "auto" renders the model's own chat_template: build it with loadChatTemplate(modelDir) and modelChatTemplate()`);
  }
  const t = Object.hasOwn(TEMPLATES, name) ? TEMPLATES[name] : undefined;
  if (!t) throw new Error(`prompt template "${name}" is not known; use one of ${Object.keys(TEMPLATES).join(', ')}`);
  return t;
}

/** A built-in template by name, or with `auto` the model's own chat_template (tokenizer_config.json or chat_template.jinja of modelDir). */
export async function resolveTemplate(name: string, modelDir: string): Promise<PromptTemplate> {
  return name === AUTO_TEMPLATE ? modelChatTemplate(await loadChatTemplate(modelDir)) : getTemplate(name);
}

/** Segments of a record under a template (a template object, or a built-in name). */
export function renderRecord(rec: SftRecord, template: PromptTemplate | string): Segment[] {
  const t = typeof template === 'string' ? getTemplate(template) : template;
  // Plain-text records carry no prompt: the whole text is trained, under any template.
  if (rec.kind === 'text') return [{ text: rec.text, train: true }];
  return t.render(rec);
}

// ---------------------------------------------------------------------------
// The model's own chat template

/** Template name that selects the model's chat_template from tokenizer_config.json. */
export const AUTO_TEMPLATE = 'auto';

export interface ChatTemplateSource {
  /** The Jinja source of chat_template. */
  template: string;
  /** bos_token / eos_token as tokenizer_config.json gives them ('' when absent). */
  bosToken: string;
  eosToken: string;
  /** Where the template came from, for errors. */
  where: string;
}

function tokenText(v: unknown): string {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as { content?: unknown }).content === 'string') return (v as { content: string }).content;
  return '';
}

/**
 * The chat template of a parsed tokenizer_config.json. `chat_template` is a
 * string, or a list of {name, template} (the one named "default" is used).
 */
export function chatTemplateFromConfig(config: Record<string, unknown>, where: string): ChatTemplateSource {
  let t = config.chat_template;
  if (Array.isArray(t)) {
    const named = t.find((x: unknown) => x && typeof x === 'object' && (x as { name?: unknown }).name === 'default') as { template?: unknown } | undefined;
    if (!named) throw new Error(`${where}: chat_template is a list without an entry named "default"; fedtune uses the default template`);
    t = named.template;
  }
  if (typeof t !== 'string' || t.trim() === '') {
    throw new Error(`${where}: has no chat_template, so --template auto has nothing to render; use --template chatml, alpaca or plain`);
  }
  return { template: t, bosToken: tokenText(config.bos_token), eosToken: tokenText(config.eos_token), where };
}

/** The chat template of a model directory's tokenizer_config.json (or chat_template.jinja beside it, as newer transformers save it). */
export async function loadChatTemplate(modelDir: string): Promise<ChatTemplateSource> {
  const path = join(modelDir, 'tokenizer_config.json');
  let config: Record<string, unknown> = {};
  try {
    const parsed: unknown = JSON.parse(await readFile(path, 'utf8'));
    if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) config = parsed as Record<string, unknown>;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new Error(`${path}: cannot read it (${(err as Error).message})`);
  }
  if (config.chat_template === undefined) {
    try {
      config = { ...config, chat_template: await readFile(join(modelDir, 'chat_template.jinja'), 'utf8') };
    } catch {
      /* neither: chatTemplateFromConfig says so */
    }
  }
  return chatTemplateFromConfig(config, path);
}

/**
 * A PromptTemplate that renders a model's chat_template, training only the
 * assistant turns.
 *
 * Method (prefix by prefix): with R(m, g) the template rendered for messages m
 * with add_generation_prompt g, the text of assistant turn i is what
 * R(m[0..i], false) adds to R(m[0..i-1], true): the reply and the template's
 * end-of-turn token (e.g. <|eot_id|>, <|im_end|>), without trailing
 * whitespace, which stays untrained like the text around it. This needs no
 * marker in the template and works for any template whose rendering of a
 * conversation starts with its rendering of every shorter prefix; a template
 * that rewrites earlier turns (e.g. one that drops earlier reasoning) is
 * refused with the turn it changes.
 */
export function modelChatTemplate(src: ChatTemplateSource): PromptTemplate {
  let tpl: Template;
  try {
    tpl = new Template(src.template);
  } catch (err) {
    throw new Error(`${src.where}: chat_template is not a template @huggingface/jinja can parse (${(err as Error).message}); use --template chatml, alpaca or plain`);
  }
  const render = (messages: ChatMessage[], addGenerationPrompt: boolean): string => {
    try {
      return tpl.render({ messages, add_generation_prompt: addGenerationPrompt, bos_token: src.bosToken, eos_token: src.eosToken });
    } catch (err) {
      throw new Error(`${src.where}: chat_template failed on a ${messages.length}-message conversation: ${(err as Error).message}`);
    }
  };
  return {
    name: AUTO_TEMPLATE,
    ownsSpecialTokens: true,
    render(rec) {
      const messages = toMessages(rec);
      const full = render(messages, false);
      const out: Segment[] = [];
      let pos = 0;
      for (let i = 0; i < messages.length; i++) {
        if (messages[i]!.role !== 'assistant') continue;
        const before = render(messages.slice(0, i), true);
        const through = render(messages.slice(0, i + 1), false);
        if (!through.startsWith(before) || !full.startsWith(through) || before.length < pos) {
          throw new Error(
            `${src.where}: chat_template does not render conversations prefix by prefix (message ${i + 1}, an assistant turn, changes the text around it), ` +
              'so the assistant turns cannot be found; use --template chatml, alpaca or plain',
          );
        }
        const body = through.slice(before.length);
        const reply = body.replace(/\s+$/u, '');
        out.push({ text: full.slice(pos, before.length), train: false });
        out.push({ text: reply, train: true });
        out.push({ text: body.slice(reply.length), train: false });
        pos = through.length;
      }
      return tidy(out);
    },
  };
}
