import { describe, expect, it } from 'vitest';
import { encode, quantisationBound } from '../../common/secagg/index.ts';
import { exactSum, maxAbsDiff, runRound } from './secagg-harness.ts';

const RANGE = 1;

describe('secure aggregation: what the coordinator holds', () => {
  it('every buffer the server holds is reported, and none equals or is near any single site\'s input', async () => {
    const held: Array<{ what: string; site: number | null; buf: Uint32Array | Float64Array }> = [];
    const n = 10;
    const len = 400;
    const r = await runRound({
      n,
      threshold: 6,
      len,
      dropAfterShare: [3, 4],
      dropAfterMask: [5],
      observer: (what, site, buf) => held.push({ what, site, buf: buf.slice() }),
    });
    // One report per masked input, one running sum after each, one per unmasking step, and the decoded sum.
    const kinds = held.map((h) => h.what);
    expect(kinds.filter((k) => k === 'masked-input').length).toBe(r.u3.length);
    expect(kinds.filter((k) => k === 'sum').length).toBe(r.u3.length + r.u3.length + (r.u2.length - r.u3.length));
    expect(kinds.at(-1)).toBe('decoded');
    expect(held.at(-1)!.buf).toEqual(r.sum);
    expect(maxAbsDiff(r.sum, exactSum(r.xs, r.u3, RANGE))).toBeLessThanOrEqual(quantisationBound(RANGE, n, r.u3.length));

    const bound = quantisationBound(RANGE, n, n);
    const s = Math.floor((2 ** 31 - 1) / (n * RANGE));
    for (const [site, x] of r.xs) {
      // The site's encoding with any rounding is within 1 of S*x, so compare integer buffers against S*x (mod 2^32).
      const enc = encode(x, RANGE, n);
      for (const h of held) {
        if (h.buf instanceof Uint32Array) {
          let near = 0;
          for (let i = 0; i < len; i++) {
            const d = (h.buf[i]! - enc[i]!) | 0;
            if (Math.abs(d) <= 2) near++;
          }
          // A masked buffer matches a given integer within +-2 with chance 5 / 2^32 per coordinate.
          expect(near, `${h.what} after site ${h.site} vs site ${site}'s encoded input`).toBeLessThan(len / 10);
          // As decoded reals: no buffer held is within the quantisation bound of x.
          let close = 0;
          for (let i = 0; i < len; i++) if (Math.abs((h.buf[i]! | 0) / s - x[i]!) <= bound) close++;
          expect(close, `${h.what} after site ${h.site} vs site ${site}'s input`).toBeLessThan(len / 10);
        } else {
          expect(maxAbsDiff(h.buf, x), `${h.what} vs site ${site}'s input`).toBeGreaterThan(bound);
        }
      }
    }
  });
});
