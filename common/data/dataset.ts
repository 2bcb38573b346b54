/**
 * SFT records from disk: a JSON array file or JSONL (one record per line).
 *
 * Three record shapes:
 *   Alpaca  {"instruction": "...", "input": "..." (optional), "output": "..."}
 *   chat    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
 *   text    {"text": "..."}  plain text, every token trained (pre-training, domain adaptation)
 * Any other field (a `label`, a `site`, an `id`) is kept in `meta` for
 * partitioning and evaluation. Every problem is reported with the file and the
 * line (JSONL) or array index (JSON) it is at; bytes that are not UTF-8 too
 * (utf8.ts), rather than trained on as replacement characters.
 */
import { readFile } from 'node:fs/promises';
import { decodeUtf8 } from './utf8.ts';

export type ChatRole = 'system' | 'user' | 'assistant';
export const CHAT_ROLES: readonly ChatRole[] = ['system', 'user', 'assistant'];

export interface ChatMessage {
  role: ChatRole;
  content: string;
}

/** Where a record came from: file, 1-based line where it starts, 0-based position among the file's records. */
export interface RecordSource {
  file: string;
  line: number;
  index: number;
}

export type SftRecord =
  | {
      kind: 'alpaca';
      instruction: string;
      input: string;
      output: string;
      source: RecordSource;
      meta: Record<string, unknown>;
    }
  | {
      kind: 'chat';
      messages: ChatMessage[];
      source: RecordSource;
      meta: Record<string, unknown>;
    }
  | {
      kind: 'text';
      text: string;
      source: RecordSource;
      meta: Record<string, unknown>;
    };

/** Reads every record of a JSON array or JSONL file (format chosen by the first non-blank character). */
export async function loadRecords(path: string): Promise<SftRecord[]> {
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new Error(`${path}: dataset file not found`);
    if (code === 'EISDIR') throw new Error(`${path}: is a directory, expected a .json or .jsonl dataset file`);
    throw err;
  }
  return parseRecords(decodeUtf8(bytes, path), path);
}

/** Parses dataset text; `file` is used in error messages and record sources. */
export function parseRecords(text: string, file: string): SftRecord[] {
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  const first = text.search(/\S/);
  if (first < 0) throw new Error(`${file}: dataset file is empty (expected a JSON array of records or JSONL, one record per line)`);
  const records = text[first] === '[' ? parseJsonArray(text, file) : parseJsonl(text, file);
  if (records.length === 0) throw new Error(`${file}: dataset has no records`);
  return records;
}

function parseJsonl(text: string, file: string): SftRecord[] {
  const out: SftRecord[] = [];
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === '') continue;
    const where = `${file}:${i + 1}`;
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch (err) {
      throw new Error(`${where}: line is not valid JSON (${(err as Error).message}); JSONL needs one complete JSON record per line`);
    }
    out.push(toRecord(value, where, { file, line: i + 1, index: out.length }));
  }
  return out;
}

function parseJsonArray(text: string, file: string): SftRecord[] {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    const msg = (err as Error).message;
    const pos = /position (\d+)/.exec(msg);
    const at = pos ? `:${lineOf(text, Number(pos[1]))}` : '';
    throw new Error(`${file}${at}: file is not valid JSON (${msg}); expected a JSON array of records or JSONL`);
  }
  if (!Array.isArray(value)) throw new Error(`${file}: expected a JSON array of records`);
  const starts = elementStarts(text);
  return value.map((v, i) => {
    const line = starts[i] !== undefined ? lineOf(text, starts[i]!) : 0;
    return toRecord(v, `${file}: record [${i}] (line ${line})`, { file, line, index: i });
  });
}

function lineOf(text: string, offset: number): number {
  let line = 1;
  for (let i = 0; i < offset && i < text.length; i++) if (text.charCodeAt(i) === 10) line++;
  return line;
}

/**
 * Offsets where each element of the top-level array starts. Runs on text that
 * JSON.parse has accepted, so it only tracks strings and nesting depth.
 * Written by hand: JSON.parse gives no positions.
 */
function elementStarts(text: string): number[] {
  const starts: number[] = [];
  let depth = 0;
  let expectValue = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === ' ' || c === '\n' || c === '\r' || c === '\t') continue;
    if (depth === 1 && expectValue && c !== ']') {
      starts.push(i);
      expectValue = false;
    }
    if (c === '"') {
      i++;
      while (i < text.length && text[i] !== '"') i += text[i] === '\\' ? 2 : 1;
    } else if (c === '[' || c === '{') {
      depth++;
      if (depth === 1) expectValue = true;
    } else if (c === ']' || c === '}') {
      depth--;
    } else if (c === ',' && depth === 1) {
      expectValue = true;
    }
  }
  return starts;
}

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'string') return `a string (${JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}...` : v)})`;
  return `${typeof v === 'object' ? 'an object' : `a ${typeof v}`}`;
}

const ALPACA_KEYS = new Set(['instruction', 'input', 'output']);

function toRecord(value: unknown, where: string, source: RecordSource): SftRecord {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new Error(`${where}: a record must be a JSON object, got ${describe(value)}`);
  }
  const obj = value as Record<string, unknown>;
  const hasChat = 'messages' in obj;
  const hasAlpaca = 'instruction' in obj || 'output' in obj;
  if (hasChat && hasAlpaca) {
    throw new Error(`${where}: record has both "messages" (chat) and "instruction"/"output" (Alpaca); use one shape per record`);
  }
  if (hasChat) return toChat(obj, where, source);
  if (!hasAlpaca && 'text' in obj) {
    const text = obj.text;
    if (typeof text !== 'string') throw new Error(`${where}: "text" must be a string, got ${describe(text)}`);
    if (text.trim() === '') throw new Error(`${where}: "text" is empty; there would be nothing to train on`);
    const meta: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(obj)) if (k !== 'text') meta[k] = v;
    return { kind: 'text', text, source, meta };
  }
  if (!hasAlpaca) {
    throw new Error(
      `${where}: record is neither Alpaca ({instruction, input?, output}), chat ({messages: [...]}) nor text ({text}); ` +
        `fields found: ${Object.keys(obj).join(', ') || '(none)'}`,
    );
  }
  const instruction = obj.instruction;
  const input = obj.input ?? '';
  const output = obj.output;
  if (instruction === undefined) throw new Error(`${where}: Alpaca record is missing "instruction"`);
  if (typeof instruction !== 'string') throw new Error(`${where}: "instruction" must be a string, got ${describe(instruction)}`);
  if (instruction.trim() === '') throw new Error(`${where}: "instruction" is empty`);
  if (typeof input !== 'string') throw new Error(`${where}: "input" must be a string (or absent), got ${describe(input)}`);
  if (output === undefined) throw new Error(`${where}: Alpaca record is missing "output" (the response to train on)`);
  if (typeof output !== 'string') throw new Error(`${where}: "output" must be a string, got ${describe(output)}`);
  if (output.trim() === '') throw new Error(`${where}: "output" is empty; there would be nothing to train on`);
  const meta: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(obj)) if (!ALPACA_KEYS.has(k)) meta[k] = v;
  return { kind: 'alpaca', instruction, input, output, source, meta };
}

function toChat(obj: Record<string, unknown>, where: string, source: RecordSource): SftRecord {
  const raw = obj.messages;
  if (!Array.isArray(raw)) throw new Error(`${where}: "messages" must be an array of {role, content}, got ${describe(raw)}`);
  if (raw.length === 0) throw new Error(`${where}: "messages" is empty`);
  const messages: ChatMessage[] = raw.map((m: unknown, j) => {
    const at = `${where}: messages[${j}]`;
    if (typeof m !== 'object' || m === null || Array.isArray(m)) throw new Error(`${at} must be an object {role, content}, got ${describe(m)}`);
    const { role, content } = m as Record<string, unknown>;
    if (role === undefined) throw new Error(`${at} is missing "role"`);
    if (typeof role !== 'string' || !CHAT_ROLES.includes(role as ChatRole)) {
      throw new Error(`${at} has unknown role ${JSON.stringify(role)}; allowed roles: ${CHAT_ROLES.join(', ')}`);
    }
    if (content === undefined) throw new Error(`${at} is missing "content"`);
    if (typeof content !== 'string') throw new Error(`${at}: "content" must be a string, got ${describe(content)}`);
    return { role: role as ChatRole, content };
  });
  const sysLater = messages.findIndex((m, j) => j > 0 && m.role === 'system');
  if (sysLater > 0) throw new Error(`${where}: messages[${sysLater}] is a system message; only the first message may be "system"`);
  const last = messages[messages.length - 1]!;
  if (last.role !== 'assistant') {
    throw new Error(`${where}: the last message is from "${last.role}", expected "assistant" (the response to train on)`);
  }
  const emptyAssistant = messages.findIndex((m) => m.role === 'assistant' && m.content.trim() === '');
  if (emptyAssistant >= 0) throw new Error(`${where}: messages[${emptyAssistant}] is an assistant message with empty content`);
  const meta: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(obj)) if (k !== 'messages') meta[k] = v;
  return { kind: 'chat', messages, source, meta };
}
