/**
 * Tokenizers from a model directory's tokenizer.json (Hugging Face fast-tokenizer
 * format), run by @huggingface/tokenizers (pure JavaScript).
 *
 * encode() never adds special tokens: the data pipeline adds bos/eos itself.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';

export interface FedTokenizer {
  encode(text: string): number[];
  decode(ids: number[], skipSpecial?: boolean): string;
  /** Largest token id + 1, added tokens included. */
  vocabSize: number;
  bosId: number | null;
  eosId: number | null;
  /** Pad token id; falls back to eos, then 0. */
  padId: number;
}

type Json = Record<string, unknown>;

async function readJsonFile(path: string, required: boolean): Promise<Json | null> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      if (required) throw new Error(`tokenizer: ${path} not found (a Hugging Face tokenizer.json is required)`);
      return null;
    }
    throw err;
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    throw new Error(`tokenizer: ${path} is not valid JSON (${(err as Error).message})`);
  }
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error(`tokenizer: ${path} must be a JSON object`);
  return v as Json;
}

/** tokenizer_config.json writes special tokens as a string or as {"content": "..."}. */
function tokenContent(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as Json).content === 'string') return (v as Json).content as string;
  return null;
}

function firstId(v: unknown): number | null {
  const x = Array.isArray(v) ? v[0] : v;
  return typeof x === 'number' && Number.isInteger(x) && x >= 0 ? x : null;
}

export async function loadTokenizer(dir: string): Promise<FedTokenizer> {
  const tokPath = join(dir, 'tokenizer.json');
  const tokJson = (await readJsonFile(tokPath, true))!;
  if (!tokJson.model || typeof tokJson.model !== 'object') {
    throw new Error(`tokenizer: ${tokPath} has no "model" section; is it a Hugging Face tokenizers file?`);
  }
  if (!Array.isArray(tokJson.added_tokens)) tokJson.added_tokens = [];
  const tokConfig = (await readJsonFile(join(dir, 'tokenizer_config.json'), false)) ?? {};
  const modelConfig = (await readJsonFile(join(dir, 'config.json'), false)) ?? {};

  let tok: Tokenizer;
  try {
    tok = new Tokenizer(tokJson, tokConfig);
  } catch (err) {
    throw new Error(`tokenizer: cannot load ${tokPath}: ${(err as Error).message}`);
  }
  let maxId = -1;
  for (const id of tok.get_vocab(true).values()) if (id > maxId) maxId = id;
  const vocabSize = maxId + 1;

  const resolve = (field: 'bos_token' | 'eos_token' | 'pad_token', idField: string): number | null => {
    const content = tokenContent(tokConfig[field]);
    if (content !== null) {
      const id = tok.token_to_id(content);
      if (id === undefined) throw new Error(`tokenizer: ${field} ${JSON.stringify(content)} in ${join(dir, 'tokenizer_config.json')} is not in the vocabulary of ${tokPath}`);
      return id;
    }
    return firstId(modelConfig[idField]);
  };
  const bosId = resolve('bos_token', 'bos_token_id');
  const eosId = resolve('eos_token', 'eos_token_id');
  const padId = resolve('pad_token', 'pad_token_id') ?? eosId ?? 0;
  // Exact round trips by default; a tokenizer that asks for the cleanup gets it.
  const cleanUp = tokConfig.clean_up_tokenization_spaces === true;

  return {
    vocabSize,
    bosId,
    eosId,
    padId,
    encode(text: string): number[] {
      if (typeof text !== 'string') throw new Error(`tokenizer.encode: expected a string, got ${typeof text}`);
      if (text.length === 0) return [];
      return tok.encode(text, { add_special_tokens: false }).ids;
    },
    decode(ids: number[], skipSpecial = false): string {
      if (ids.length === 0) return '';
      for (let i = 0; i < ids.length; i++) {
        const id = ids[i]!;
        if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
          throw new Error(`tokenizer.decode: token id ${id} at position ${i} is outside the vocabulary [0, ${vocabSize})`);
        }
      }
      return tok.decode(ids, { skip_special_tokens: skipSpecial, clean_up_tokenization_spaces: cleanUp });
    },
  };
}
