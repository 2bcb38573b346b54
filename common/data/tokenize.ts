/**
 * Record -> token ids and labels for supervised fine-tuning.
 *
 * Each template segment is encoded on its own and the pieces concatenated, so
 * the prompt/response boundary is exact. labels equal inputIds on trained
 * tokens and IGNORE_INDEX (-100) on prompt tokens (not shifted: the engine
 * predicts labels[t + 1] from position t). EOS follows every trained segment
 * and is trained. Sequences longer than maxSeqLen are cut, keeping the start;
 * a record with no trained token left is dropped (null).
 *
 * The cut comes before the tokenizer sees a whole field: a segment is first
 * encoded only up to CHARS_PER_TOKEN_BOUND characters per token still free
 * (encodeWithin), so a 50 MB record costs what max_seq_len tokens cost, not
 * 50 MB of token ids. The prefix is accepted only when it already yields
 * CUT_GUARD tokens more than can be kept, so the kept tokens lie well before
 * the cut and are the ones encoding the whole field gives; otherwise the prefix
 * grows (x4) until it does or the field is encoded whole. A record that fits
 * in maxSeqLen is therefore never changed by the cut.
 */
import { IGNORE_INDEX } from '../model-config.ts';
import type { RecordSource, SftRecord } from './dataset.ts';
import { renderRecord, type PromptTemplate } from './template.ts';

/** The minimal tokenizer the data pipeline needs; worker/engine/tokenizer.ts satisfies it. */
export interface Tokenizer {
  /** Token ids of `text`, without special tokens added. */
  encode(text: string): number[];
  bosId: number | null;
  eosId: number | null;
  padId: number;
}

export interface Example {
  inputIds: number[];
  labels: number[];
}

export interface TokenizeOptions {
  /** A template object or a built-in name (alpaca, chatml, plain). */
  template: PromptTemplate | string;
  maxSeqLen: number;
  /** Prepend BOS (not trained). Default: true when the tokenizer has a BOS token, false for a chat template (it writes its own). */
  addBos?: boolean;
  /** Append EOS after each trained segment, trained. Default true, false for a chat template (its end-of-turn token is trained instead). */
  addEos?: boolean;
}

/** Characters (UTF-16 code units) per token that the first prefix allows for; tokens of common tokenizers average 3-5. */
export const CHARS_PER_TOKEN_BOUND = 16;
/** Tokens a prefix must yield beyond what is kept before it is trusted (the tokenizer may split the cut word differently). */
export const CUT_GUARD = 64;

/**
 * encode(text), of which only the first `keep` ids will be used: a long text is
 * encoded from a prefix that yields at least keep + CUT_GUARD ids (so its first
 * `keep` ids are those of the whole text), growing the prefix until one does.
 */
export function encodeWithin(tok: Pick<Tokenizer, 'encode'>, text: string, keep: number): number[] {
  let cap = Math.max(1, keep) * CHARS_PER_TOKEN_BOUND;
  while (text.length > cap) {
    let end = cap;
    const c = text.charCodeAt(end - 1);
    if (c >= 0xd800 && c <= 0xdbff) end--; // a surrogate pair stays whole
    const ids = tok.encode(text.slice(0, end));
    if (ids.length >= keep + CUT_GUARD) return ids;
    cap *= 4;
  }
  return tok.encode(text);
}

function checkOptions(tok: Tokenizer, opts: TokenizeOptions): { addBos: boolean; addEos: boolean } {
  if (!Number.isInteger(opts.maxSeqLen) || opts.maxSeqLen < 2) {
    throw new Error(`maxSeqLen is ${opts.maxSeqLen}, expected an integer >= 2`);
  }
  // A chat template writes BOS and end-of-turn tokens itself.
  const owns = typeof opts.template !== 'string' && opts.template.ownsSpecialTokens === true;
  const addBos = opts.addBos ?? (!owns && tok.bosId !== null);
  const addEos = opts.addEos ?? !owns;
  if (addBos && tok.bosId === null) throw new Error('addBos is set but the tokenizer has no BOS token; set addBos to false');
  if (addEos && tok.eosId === null) throw new Error('the tokenizer has no EOS token, so responses cannot be terminated; set addEos to false');
  return { addBos, addEos };
}

/** Token ids and labels for one record, or null when truncation leaves no trained token. */
export function tokenizeRecord(tok: Tokenizer, rec: SftRecord, opts: TokenizeOptions): Example | null {
  const { addBos, addEos } = checkOptions(tok, opts);
  return tokenizeChecked(tok, rec, opts, addBos, addEos);
}

function tokenizeChecked(tok: Tokenizer, rec: SftRecord, opts: TokenizeOptions, addBos: boolean, addEos: boolean): Example | null {
  const inputIds: number[] = [];
  const labels: number[] = [];
  if (addBos) {
    inputIds.push(tok.bosId!);
    labels.push(IGNORE_INDEX);
  }
  for (const seg of renderRecord(rec, opts.template)) {
    if (inputIds.length >= opts.maxSeqLen) break;
    const ids = encodeWithin(tok, seg.text, opts.maxSeqLen - inputIds.length);
    if (seg.train && addEos) ids.push(tok.eosId!);
    for (const id of ids) {
      inputIds.push(id);
      labels.push(seg.train ? id : IGNORE_INDEX);
    }
  }
  if (inputIds.length > opts.maxSeqLen) {
    inputIds.length = opts.maxSeqLen;
    labels.length = opts.maxSeqLen;
  }
  // The engine predicts labels[t + 1] from position t, so label 0 never counts.
  const trained = labels.some((l, i) => i > 0 && l !== IGNORE_INDEX);
  return trained ? { inputIds, labels } : null;
}

export interface TokenizedRecords {
  examples: Example[];
  /** Records dropped because truncation left no trained token. */
  dropped: number;
  /** Where the dropped records came from (file, line), for a warning. */
  droppedSources: RecordSource[];
}

/** tokenizeRecord over many records, counting the ones dropped. */
export function tokenizeRecords(tok: Tokenizer, records: readonly SftRecord[], opts: TokenizeOptions): TokenizedRecords {
  const { addBos, addEos } = checkOptions(tok, opts);
  const examples: Example[] = [];
  const droppedSources: RecordSource[] = [];
  for (const rec of records) {
    const ex = tokenizeChecked(tok, rec, opts, addBos, addEos);
    if (ex) examples.push(ex);
    else droppedSources.push(rec.source);
  }
  return { examples, dropped: droppedSources.length, droppedSources };
}

/** Where the first dropped records are, "a.jsonl:4, a.jsonl:9, a.jsonl:12, ..." (file:line of each). */
export function droppedWhere(sources: readonly RecordSource[], first = 3): string {
  const shown = sources.slice(0, first).map((s) => `${s.file}:${s.line}`).join(', ');
  return sources.length > first ? `${shown}, ...` : shown;
}

/** Number of trained tokens (labels other than -100). */
export function countTokens(examples: readonly Example[]): number {
  let n = 0;
  for (const ex of examples) for (const l of ex.labels) if (l !== IGNORE_INDEX) n++;
  return n;
}
