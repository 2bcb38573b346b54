/**
 * Multinomial naive Bayes on bag-of-words: the classical reference a spam
 * classifier has to beat. Words are lower-cased runs of letters and digits.
 * With Laplace (add-alpha) smoothing over the training vocabulary V:
 *
 *   P(c)     = N_c / N                          (documents of class c / documents)
 *   P(w | c) = (n_cw + alpha) / (n_c + alpha |V|)  (count of w in class c / words in class c)
 *   log P(c | d) = log P(c) + sum_w count_d(w) log P(w | c) - log Z
 *
 * Words of d that are not in V are skipped (they carry no estimate). Ties go
 * to the class that sorts first.
 *
 * As a command it trains on the union of training files and scores held-out
 * files of Alpaca records (input = the text, output = the class):
 *
 *   node bin/run-ts.js bench/naive-bayes.ts --train a.jsonl,b.jsonl --eval a.eval.jsonl,b.eval.jsonl
 *
 * Written by hand: it is twenty lines of counting, and the JavaScript NB
 * packages either tokenize their own way or do not expose posteriors.
 */
import { readFile } from 'node:fs/promises';
import { pathToFileURL } from 'node:url';

export interface LabeledText {
  text: string;
  label: string;
}

/** Lower-cased word tokens: maximal runs of Unicode letters and digits. */
export function wordTokens(text: string): string[] {
  return text.toLowerCase().match(/[\p{L}\p{N}]+/gu) ?? [];
}

export class MultinomialNaiveBayes {
  private classes: string[] = [];
  private logPrior = new Map<string, number>();
  private wordCounts = new Map<string, Map<string, number>>();
  private classWords = new Map<string, number>();
  private vocab = new Set<string>();

  constructor(readonly alpha = 1) {
    if (!(alpha > 0) || !Number.isFinite(alpha)) throw new Error(`naive Bayes: alpha is ${alpha}, expected a finite number > 0 (1 is Laplace smoothing)`);
  }

  fit(docs: readonly LabeledText[]): this {
    if (docs.length === 0) throw new Error('naive Bayes: no training documents; give at least one per class');
    const docsPerClass = new Map<string, number>();
    for (const [i, d] of docs.entries()) {
      if (typeof d.label !== 'string' || d.label === '') throw new Error(`naive Bayes: training document ${i} has label ${JSON.stringify(d.label)}, expected a non-empty string`);
      if (typeof d.text !== 'string') throw new Error(`naive Bayes: training document ${i} has no text (got ${typeof d.text})`);
      docsPerClass.set(d.label, (docsPerClass.get(d.label) ?? 0) + 1);
      let counts = this.wordCounts.get(d.label);
      if (!counts) this.wordCounts.set(d.label, (counts = new Map()));
      for (const w of wordTokens(d.text)) {
        counts.set(w, (counts.get(w) ?? 0) + 1);
        this.classWords.set(d.label, (this.classWords.get(d.label) ?? 0) + 1);
        this.vocab.add(w);
      }
    }
    this.classes = [...docsPerClass.keys()].sort();
    for (const c of this.classes) this.logPrior.set(c, Math.log(docsPerClass.get(c)! / docs.length));
    return this;
  }

  /** Vocabulary size |V| of the training documents. */
  get vocabularySize(): number {
    return this.vocab.size;
  }

  /** Normalized log posteriors log P(c | text), one per class in sorted class order. */
  logPosteriors(text: string): Map<string, number> {
    if (this.classes.length === 0) throw new Error('naive Bayes: call fit() before scoring');
    const words = wordTokens(text).filter((w) => this.vocab.has(w));
    const V = this.vocab.size;
    const joint = this.classes.map((c) => {
      const counts = this.wordCounts.get(c)!;
      const denom = Math.log((this.classWords.get(c) ?? 0) + this.alpha * V);
      let s = this.logPrior.get(c)!;
      for (const w of words) s += Math.log((counts.get(w) ?? 0) + this.alpha) - denom;
      return s;
    });
    const max = Math.max(...joint);
    const logZ = max + Math.log(joint.reduce((acc, j) => acc + Math.exp(j - max), 0));
    return new Map(this.classes.map((c, i) => [c, joint[i]! - logZ]));
  }

  predict(text: string): string {
    let best = '';
    let bestLp = -Infinity;
    for (const [c, lp] of this.logPosteriors(text)) {
      if (lp > bestLp) {
        best = c;
        bestLp = lp;
      }
    }
    return best;
  }
}

export interface NaiveBayesResult {
  accuracy: number;
  correct: number;
  total: number;
  /** Mean negative log posterior of the true class (nats), comparable in spirit to an eval loss. */
  logLoss: number;
  vocabularySize: number;
}

export function naiveBayesAccuracy(train: readonly LabeledText[], test: readonly LabeledText[], alpha = 1): NaiveBayesResult {
  if (test.length === 0) throw new Error('naive Bayes: no held-out documents to score');
  const nb = new MultinomialNaiveBayes(alpha).fit(train);
  let correct = 0;
  let nll = 0;
  for (const d of test) {
    const lp = nb.logPosteriors(d.text);
    if (nb.predict(d.text) === d.label) correct++;
    nll -= lp.get(d.label) ?? Math.log(Number.MIN_VALUE);
  }
  return { accuracy: correct / test.length, correct, total: test.length, logLoss: nll / test.length, vocabularySize: nb.vocabularySize };
}

/** Alpaca JSONL records -> (input, output) pairs; every line must have both as strings. */
export async function readLabeledJsonl(path: string): Promise<LabeledText[]> {
  const text = await readFile(path, 'utf8').catch((err: NodeJS.ErrnoException) => {
    throw new Error(`naive Bayes: cannot read ${path} (${err.code ?? err.message})`);
  });
  const out: LabeledText[] = [];
  for (const [i, line] of text.split('\n').entries()) {
    if (line.trim() === '') continue;
    let rec: unknown;
    try {
      rec = JSON.parse(line);
    } catch (err) {
      throw new Error(`naive Bayes: ${path}:${i + 1} is not JSON (${(err as Error).message})`);
    }
    const r = rec as { input?: unknown; output?: unknown };
    if (typeof r.input !== 'string' || typeof r.output !== 'string') {
      throw new Error(`naive Bayes: ${path}:${i + 1} needs string "input" (the text) and "output" (the class) fields`);
    }
    out.push({ text: r.input, label: r.output.trim() });
  }
  return out;
}

async function main(argv: string[]): Promise<void> {
  const { Command } = await import('commander');
  const o = new Command('naive-bayes')
    .description('multinomial naive Bayes (bag of words, Laplace smoothing) on Alpaca JSONL files')
    .requiredOption('--train <files>', 'comma-separated training files (their union is the training set)')
    .requiredOption('--eval <files>', 'comma-separated held-out files')
    .option('--alpha <x>', 'smoothing (1: Laplace)', '1')
    .parse(argv, { from: 'user' })
    .opts<{ train: string; eval: string; alpha: string }>();
  const read = async (list: string): Promise<LabeledText[]> => (await Promise.all(list.split(',').map((p) => readLabeledJsonl(p.trim())))).flat();
  const r = naiveBayesAccuracy(await read(o.train), await read(o.eval), Number(o.alpha));
  console.log(`naive Bayes: ${(100 * r.accuracy).toFixed(1)}% (${r.correct}/${r.total}), log loss ${r.logLoss.toFixed(4)}, |V| ${r.vocabularySize}`);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await main(process.argv.slice(2));
}
