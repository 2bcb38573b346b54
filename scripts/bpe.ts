/**
 * A byte-level BPE trainer (GPT-2 style) that writes a standard Hugging Face
 * tokenizer.json, loaded by common/tokenizer.ts like any other.
 *
 * Training (Sennrich et al. 2016, over bytes as in GPT-2):
 *   1. split each text with the ByteLevel pre-tokenizer's regex, map every
 *      UTF-8 byte to its printable character (bytes_to_unicode), count words;
 *   2. start from the 256 bytes; repeatedly merge the most frequent adjacent
 *      pair (counted over word frequencies), ties broken by the smaller pair of
 *      ids, until the vocabulary is full or no pair occurs minFrequency times.
 * Merge ranks are the training order, which is how the BPE model applies them.
 *
 * Written by hand: the maintained trainer (the Rust `tokenizers` crate) ships
 * to Node only as a native add-on, and the project's JavaScript tokenizer
 * package encodes and decodes but does not train.
 */
import { byteLevelBpeJson, bytesToUnicode } from '../worker/engine/init.ts';

/** The ByteLevel pre-tokenizer's split (GPT-2's pattern), as @huggingface/tokenizers applies it. */
const GPT2_SPLIT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

export interface BpeTrainOptions {
  /** Vocabulary size including the 256 bytes and the special tokens. */
  vocabSize: number;
  /** A pair must occur at least this often to be merged (default 2). */
  minFrequency?: number;
  /** Special tokens, appended after the merges in this order (e.g. <s>, </s>, <pad>). */
  specialTokens: string[];
}

export interface BpeModel {
  /** token -> id: bytes 0..255 (in byte order), merges, then special tokens. */
  vocab: Map<string, number>;
  /** Merges in rank order, as [left, right] tokens. */
  merges: Array<[string, string]>;
  specialTokens: string[];
}

/** The pre-tokenized words of `text`, each as its byte characters. */
export function preTokenize(text: string): string[] {
  const byteChars = bytesToUnicode();
  const enc = new TextEncoder();
  return (text.match(GPT2_SPLIT) ?? []).map((w) => Array.from(enc.encode(w), (b) => byteChars[b]!).join(''));
}

/** Max-heap of (count, pair key) with lazy deletion: stale entries are skipped when popped. */
class PairHeap {
  private readonly counts: number[] = [];
  private readonly keys: number[] = [];

  push(count: number, key: number): void {
    this.counts.push(count);
    this.keys.push(key);
    let i = this.counts.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.before(i, p)) break;
      this.swap(i, p);
      i = p;
    }
  }

  pop(): { count: number; key: number } | null {
    if (this.counts.length === 0) return null;
    const top = { count: this.counts[0]!, key: this.keys[0]! };
    const lastC = this.counts.pop()!;
    const lastK = this.keys.pop()!;
    if (this.counts.length > 0) {
      this.counts[0] = lastC;
      this.keys[0] = lastK;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < this.counts.length && this.before(l, m)) m = l;
        if (r < this.counts.length && this.before(r, m)) m = r;
        if (m === i) break;
        this.swap(i, m);
        i = m;
      }
    }
    return top;
  }

  /** Higher count first; on equal counts the smaller key (smaller left id, then right id). */
  private before(a: number, b: number): boolean {
    return this.counts[a]! > this.counts[b]! || (this.counts[a] === this.counts[b] && this.keys[a]! < this.keys[b]!);
  }

  private swap(a: number, b: number): void {
    [this.counts[a], this.counts[b]] = [this.counts[b]!, this.counts[a]!];
    [this.keys[a], this.keys[b]] = [this.keys[b]!, this.keys[a]!];
  }
}

const KEY_BASE = 1 << 20; // ids stay below 2^20, so a pair key a * 2^20 + b is exact in a double

/** Trains byte-level BPE on `texts`. Deterministic: the same texts and options give the same model. */
export function trainByteLevelBpe(texts: Iterable<string>, opts: BpeTrainOptions): BpeModel {
  const minFrequency = opts.minFrequency ?? 2;
  const maxMerges = opts.vocabSize - 256 - opts.specialTokens.length;
  if (!Number.isInteger(opts.vocabSize) || maxMerges < 0 || opts.vocabSize >= KEY_BASE) {
    throw new Error(`bpe: vocabSize ${opts.vocabSize} must be an integer from ${256 + opts.specialTokens.length} (bytes + special tokens) to ${KEY_BASE - 1}`);
  }
  const byteChars = bytesToUnicode();
  const tokens: string[] = [...byteChars]; // id -> token
  const vocab = new Map<string, number>(tokens.map((t, i) => [t, i]));

  // Distinct words and their frequencies, each as a sequence of ids.
  const wordCount = new Map<string, number>();
  for (const text of texts) for (const w of preTokenize(text)) wordCount.set(w, (wordCount.get(w) ?? 0) + 1);
  const words = [...wordCount.keys()].sort();
  const freq = words.map((w) => wordCount.get(w)!);
  const symbols = words.map((w) => Array.from(w, (c) => vocab.get(c)!));

  const pairCount = new Map<number, number>();
  const pairWords = new Map<number, Set<number>>();
  const addPairs = (wi: number, sign: 1 | -1): void => {
    const s = symbols[wi]!;
    for (let i = 0; i + 1 < s.length; i++) {
      const key = s[i]! * KEY_BASE + s[i + 1]!;
      pairCount.set(key, (pairCount.get(key) ?? 0) + sign * freq[wi]!);
      if (sign > 0) {
        let set = pairWords.get(key);
        if (!set) pairWords.set(key, (set = new Set()));
        set.add(wi);
      }
    }
  };
  for (let wi = 0; wi < words.length; wi++) addPairs(wi, 1);
  const heap = new PairHeap();
  for (const [key, c] of pairCount) heap.push(c, key);

  const merges: Array<[string, string]> = [];
  while (merges.length < maxMerges) {
    const top = heap.pop();
    if (!top) break;
    const current = pairCount.get(top.key) ?? 0;
    if (current !== top.count) {
      if (current > 0) heap.push(current, top.key); // stale entry: requeue with the live count
      continue;
    }
    if (current < minFrequency) break;
    const a = Math.floor(top.key / KEY_BASE);
    const b = top.key % KEY_BASE;
    const merged = tokens[a]! + tokens[b]!;
    const id = tokens.length;
    tokens.push(merged);
    vocab.set(merged, id);
    merges.push([tokens[a]!, tokens[b]!]);
    const touched = new Set<number>();
    for (const wi of pairWords.get(top.key) ?? []) {
      const s = symbols[wi]!;
      let has = false;
      for (let i = 0; i + 1 < s.length; i++) if (s[i] === a && s[i + 1] === b) has = true;
      if (!has) continue; // stale index entry
      addPairs(wi, -1);
      const next: number[] = [];
      for (let i = 0; i < s.length; i++) {
        if (i + 1 < s.length && s[i] === a && s[i + 1] === b) {
          next.push(id);
          i++;
        } else next.push(s[i]!);
      }
      symbols[wi] = next;
      addPairs(wi, 1);
      for (let i = 0; i + 1 < next.length; i++) touched.add(next[i]! * KEY_BASE + next[i + 1]!);
    }
    pairCount.delete(top.key);
    pairWords.delete(top.key);
    // Pairs whose counts went down are requeued lazily (when their stale entry is popped); new or grown ones now.
    for (const key of touched) heap.push(pairCount.get(key)!, key);
  }
  for (const t of opts.specialTokens) {
    if (vocab.has(t)) throw new Error(`bpe: special token ${JSON.stringify(t)} is already a learned token`);
    vocab.set(t, tokens.length);
    tokens.push(t);
  }
  return { vocab, merges, specialTokens: [...opts.specialTokens] };
}

/** The BPE model's own segmentation of one pre-tokenized word (merges applied by rank), for checks. */
export function applyMerges(model: BpeModel, word: string): string[] {
  const rank = new Map(model.merges.map(([l, r], i) => [`${l} ${r}`, i]));
  let parts = Array.from(word);
  for (;;) {
    let best = -1;
    let bestRank = Infinity;
    for (let i = 0; i + 1 < parts.length; i++) {
      const r = rank.get(`${parts[i]} ${parts[i + 1]}`);
      if (r !== undefined && r < bestRank) {
        bestRank = r;
        best = i;
      }
    }
    if (best < 0) return parts;
    const l = parts[best]!;
    const r = parts[best + 1]!;
    const next: string[] = [];
    for (let i = 0; i < parts.length; i++) {
      if (i + 1 < parts.length && parts[i] === l && parts[i + 1] === r) {
        next.push(l + r);
        i++;
      } else next.push(parts[i]!);
    }
    parts = next;
  }
}

/** tokenizer.json (Hugging Face tokenizers format) for a trained byte-level BPE model. */
export function bpeTokenizerJson(model: BpeModel): Record<string, unknown> {
  const vocab: Record<string, number> = {};
  for (const [t, id] of model.vocab) if (!model.specialTokens.includes(t)) vocab[t] = id;
  return byteLevelBpeJson(vocab, model.merges, model.specialTokens.map((content) => ({ id: model.vocab.get(content)!, content })));
}
