import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { DEMO_BASE_DIR, DEMO_SITES, checkHeldOut, emailSnippet, fitRecord, splitDemoCorpus, writeDemoData } from '../../cli/demo.ts';
import { loadTokenizer } from '../../common/tokenizer.ts';
import { prepareDataset } from '../../worker/data/prepare.ts';

const dir = mkdtempSync(join(tmpdir(), 'fedtune-demo-data-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('demo corpus split', () => {
  it('gives every site its mix, shares no email, and leaves every other email for pre-training', () => {
    const split = splitDemoCorpus();
    const key = (e: { group: string; id: string }): string => `${e.group}/${e.id}`; // ids repeat across groups
    const siteIds = split.sites.flatMap((s) => s.emails.map(key));
    expect(new Set(siteIds).size).toBe(siteIds.length);
    split.sites.forEach((s, i) => {
      const want = DEMO_SITES[i]!.mix;
      const got: Record<string, number> = {};
      for (const e of s.emails) got[e.group] = (got[e.group] ?? 0) + 1;
      expect(got).toEqual(want);
    });
    const pre = new Set(split.pretrain.map(key));
    for (const id of siteIds) expect(pre.has(id)).toBe(false);
    // 6046 emails in the corpus, 900 at the sites.
    expect(split.pretrain.length + siteIds.length).toBe(6046);
  });
});

describe('fitting demo records to max_seq_len', () => {
  it('cuts each email until its whole record fits, so the workers drop none', async () => {
    const tok = await loadTokenizer(DEMO_BASE_DIR);
    const maxSeqLen = 64; // short enough that most emails must be cut
    const fit = { tokenizer: tok, maxSeqLen, template: 'plain' };
    const sites = [DEMO_SITES[0]!]; // 300 emails, 60 held out
    const files = await writeDemoData(join(dir, 'fit'), { sites, fit });
    const h = await checkHeldOut(files, tok, maxSeqLen);
    expect(h.records).toBe(60);
    expect(h.dropped).toBe(0);
    expect(h.cut).toBeGreaterThan(150);
    // Without fitting, the same emails lose their answer to truncation and are dropped.
    const raw = await writeDemoData(join(dir, 'raw'), { sites });
    const rawReport = await checkHeldOut(raw, tok, maxSeqLen);
    expect(rawReport.dropped).toBeGreaterThan(30);
    expect(rawReport.droppedWhere[0]).toMatch(/\.eval\.jsonl:\d+$/);
    // Every cut email is a prefix of the uncut one, and each record is the longest that fits.
    const cutRecs = readFileSync(files[0]!.eval, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { input: string; output: string; instruction: string; group: string });
    const rawRecs = readFileSync(raw[0]!.eval, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { input: string });
    cutRecs.forEach((r, i) => expect(rawRecs[i]!.input.startsWith(r.input)).toBe(true));
    const sample = cutRecs.find((r, i) => r.input.length < rawRecs[i]!.input.length)!;
    const longer = { ...sample, input: rawRecs[cutRecs.indexOf(sample)]!.input.slice(0, sample.input.length + 1) };
    expect(fitRecord(longer, fit).cut).toBe(true);
    const prepared = await prepareDataset(files[0]!.eval, tok, { template: 'plain', maxSeqLen });
    for (const ex of prepared.train) expect(ex.inputIds.length).toBeLessThanOrEqual(maxSeqLen);
  });

  it('refuses a max_seq_len too short for the prompt and the answer', async () => {
    const tok = await loadTokenizer(DEMO_BASE_DIR);
    const rec = { instruction: 'Is this email spam or ham?', input: emailSnippet('Subject: hi\n\nhello there', 160), output: 'spam', group: 'spam-1' };
    expect(() => fitRecord(rec, { tokenizer: tok, maxSeqLen: 8, template: 'plain' })).toThrow(/max_seq_len 8 is too short for the prompt and answer alone \(\d+ tokens\); raise it/);
    expect(fitRecord(rec, { tokenizer: tok, maxSeqLen: 128, template: 'plain' })).toEqual({ record: rec, cut: false });
  });
});
