import { describe, expect, it } from 'vitest';
import { Tokenizer } from '@huggingface/tokenizers';
import { applyMerges, bpeTokenizerJson, preTokenize, trainByteLevelBpe } from '../../scripts/bpe.ts';

const SPECIAL = ['<s>', '</s>', '<pad>'];

describe('byte-level BPE trainer', () => {
  it('learns the merges computed by hand on a toy corpus', () => {
    // Words: "low", "Ġlower", "Ġlowest" (Ġ is the space byte). Pair counts: l o 3, o w 3, Ġ l 2, w e 2, e r 1, e s 1, s t 1.
    // 1. l o (3; ties with o w, and l = 108 < o = 111)   -> lo
    // 2. lo w (3)                                          -> low
    // 3. Ġ low (2; ties with low e, and Ġ = byte 32 < id 257 of "low") -> Ġlow
    // 4. Ġlow e (2)                                        -> Ġlowe
    // then every pair occurs once: below minFrequency 2, training stops.
    const m = trainByteLevelBpe(['low lower lowest'], { vocabSize: 1000, specialTokens: SPECIAL });
    expect(m.merges.map(([l, r]) => `${l} ${r}`)).toEqual(['l o', 'lo w', 'Ġ low', 'Ġlow e']);
    expect(m.vocab.get('lo')).toBe(256);
    expect(m.vocab.get('Ġlowe')).toBe(259);
    expect(SPECIAL.map((t) => m.vocab.get(t))).toEqual([260, 261, 262]);
    expect(m.vocab.size).toBe(263);
  });

  it('stops at the vocabulary size', () => {
    const m = trainByteLevelBpe(['low lower lowest'], { vocabSize: 256 + 2 + 3, specialTokens: SPECIAL });
    expect(m.merges.length).toBe(2);
    expect(m.vocab.size).toBe(261);
    expect(() => trainByteLevelBpe(['x'], { vocabSize: 200, specialTokens: SPECIAL })).toThrow(/vocabSize 200 must be an integer from 259/);
  });

  it('writes a tokenizer.json that @huggingface/tokenizers encodes exactly as the trained merges do and decodes losslessly', () => {
    const texts = [
      'From: Alice <alice@example.com>\nSubject: Re: meeting tomorrow\nSee you at the meeting tomorrow, the room changed.',
      'From: "Deals" <win@prizes.biz>\nSubject: FREE money!!! Act now\nYou have won $1,000,000. Click here to claim your prize now.',
      'From: Bob\nSubject: lunch?\nAre we still on for lunch? The usual place at noon.',
    ];
    const m = trainByteLevelBpe(texts.concat(texts, texts), { vocabSize: 400, specialTokens: SPECIAL });
    const tok = new Tokenizer(bpeTokenizerJson(m), {});
    for (const text of [...texts, 'Unseen words: zebra café 東京 ñ — and numbers 12345.']) {
      const ids = tok.encode(text, { add_special_tokens: false }).ids;
      const mine = preTokenize(text).flatMap((w) => applyMerges(m, w)).map((t) => m.vocab.get(t));
      expect(ids).toEqual(mine);
      expect(tok.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false })).toBe(text);
    }
    // Frequent words became single tokens.
    expect(tok.encode(' meeting', { add_special_tokens: false }).ids).toHaveLength(1);
    expect(tok.token_to_id('</s>')).toBe(m.vocab.get('</s>'));
  });
});
