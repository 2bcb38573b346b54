import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { MultinomialNaiveBayes, naiveBayesAccuracy, readLabeledJsonl, wordTokens } from '../../bench/naive-bayes.ts';

/*
 * Toy corpus, computed by hand with Laplace smoothing (alpha = 1):
 *
 *   "free money"        spam
 *   "free offer free"   spam
 *   "meeting money"     ham
 *
 * Priors: P(spam) = 2/3, P(ham) = 1/3.
 * Vocabulary V = {free, money, offer, meeting}, |V| = 4.
 * spam counts: free 3, money 1, offer 1   -> n_spam = 5, denominator 5 + 4 = 9
 * ham counts:  meeting 1, money 1         -> n_ham  = 2, denominator 2 + 4 = 6
 *
 *   P(free|spam) = 4/9  P(money|spam) = 2/9  P(offer|spam) = 2/9  P(meeting|spam) = 1/9
 *   P(free|ham)  = 1/6  P(money|ham)  = 2/6  P(offer|ham)  = 1/6  P(meeting|ham)  = 2/6
 *
 * "money meeting": spam 2/3 * 2/9 * 1/9 = 4/243, ham 1/3 * 2/6 * 2/6 = 9/243
 *                  -> P(spam|d) = 4/13, P(ham|d) = 9/13
 * "free money":    spam 2/3 * 4/9 * 2/9 = 16/243 = 32/486, ham 1/3 * 1/6 * 2/6 = 1/54 = 9/486
 *                  -> P(spam|d) = 32/41
 * "free":          spam 2/3 * 4/9 = 8/27 = 16/54, ham 1/3 * 1/6 = 1/18 = 3/54
 *                  -> P(spam|d) = 16/19, P(ham|d) = 3/19
 */
const TRAIN = [
  { text: 'free money', label: 'spam' },
  { text: 'free offer free', label: 'spam' },
  { text: 'meeting money', label: 'ham' },
];

const posterior = (nb: MultinomialNaiveBayes, text: string, label: string): number => Math.exp(nb.logPosteriors(text).get(label)!);

describe('multinomial naive Bayes', () => {
  const nb = new MultinomialNaiveBayes().fit(TRAIN);

  it('tokenizes into lower-cased runs of letters and digits', () => {
    expect(wordTokens("FREE, Money!! 100% d'accord été")).toEqual(['free', 'money', '100', 'd', 'accord', 'été']);
  });

  it('matches the hand-computed posteriors', () => {
    expect(nb.vocabularySize).toBe(4);
    expect(posterior(nb, 'money meeting', 'spam')).toBeCloseTo(4 / 13, 12);
    expect(posterior(nb, 'money meeting', 'ham')).toBeCloseTo(9 / 13, 12);
    expect(posterior(nb, 'free money', 'spam')).toBeCloseTo(32 / 41, 12);
    expect(posterior(nb, 'free', 'ham')).toBeCloseTo(3 / 19, 12);
    expect(nb.predict('money meeting')).toBe('ham');
    expect(nb.predict('free money')).toBe('spam');
  });

  it('lower-cases, skips words outside the training vocabulary, and falls back to the priors', () => {
    expect(posterior(nb, 'FREE, Money! unseenword', 'spam')).toBeCloseTo(32 / 41, 12);
    expect(posterior(nb, '', 'spam')).toBeCloseTo(2 / 3, 12);
    expect(posterior(nb, 'nothing known here', 'ham')).toBeCloseTo(1 / 3, 12);
  });

  it('smooths with alpha: alpha 0.5 on "free"', () => {
    // P(free|spam) = 3.5 / (5 + 2) = 1/2, P(free|ham) = 0.5 / (2 + 2) = 1/8
    // spam 2/3 * 1/2 = 1/3, ham 1/3 * 1/8 = 1/24 -> P(spam|free) = 8/9
    const half = new MultinomialNaiveBayes(0.5).fit(TRAIN);
    expect(posterior(half, 'free', 'spam')).toBeCloseTo(8 / 9, 12);
  });

  it('scores accuracy and log loss on held-out documents', () => {
    const test = [
      { text: 'money meeting', label: 'ham' }, // P = 9/13, right
      { text: 'free money', label: 'spam' }, // P = 32/41, right
      { text: 'free', label: 'ham' }, // P = 3/19, wrong
    ];
    const r = naiveBayesAccuracy(TRAIN, test);
    expect(r.correct).toBe(2);
    expect(r.total).toBe(3);
    expect(r.accuracy).toBeCloseTo(2 / 3, 12);
    expect(r.logLoss).toBeCloseTo(-(Math.log(9 / 13) + Math.log(32 / 41) + Math.log(3 / 19)) / 3, 12);
  });

  it('rejects bad input with errors that say what to do', () => {
    expect(() => new MultinomialNaiveBayes(0)).toThrow(/alpha is 0, expected a finite number > 0/);
    expect(() => new MultinomialNaiveBayes().fit([])).toThrow(/no training documents/);
    expect(() => new MultinomialNaiveBayes().logPosteriors('x')).toThrow(/call fit\(\) before scoring/);
    expect(() => new MultinomialNaiveBayes().fit([{ text: 'a', label: '' }])).toThrow(/document 0 has label ""/);
    expect(() => naiveBayesAccuracy(TRAIN, [])).toThrow(/no held-out documents/);
  });
});

describe('readLabeledJsonl', () => {
  const dir = mkdtempSync(join(tmpdir(), 'fedtune-nb-'));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('reads Alpaca records as (input, output) and names a bad line', async () => {
    const good = join(dir, 'good.jsonl');
    writeFileSync(good, '{"instruction":"q","input":"free money","output":"spam"}\n\n{"input":"hi","output":" ham\\n"}\n');
    expect(await readLabeledJsonl(good)).toEqual([
      { text: 'free money', label: 'spam' },
      { text: 'hi', label: 'ham' },
    ]);
    const bad = join(dir, 'bad.jsonl');
    writeFileSync(bad, '{"input":"a","output":"spam"}\n{"text":"no label"}\n');
    await expect(readLabeledJsonl(bad)).rejects.toThrow(/bad\.jsonl:2 needs string "input" \(the text\) and "output" \(the class\)/);
    await expect(readLabeledJsonl(join(dir, 'missing.jsonl'))).rejects.toThrow(/cannot read .*missing\.jsonl \(ENOENT\)/);
  });
});
