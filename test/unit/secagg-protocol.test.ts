import { describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import {
  graphOf,
  quantisationBound,
  SecAggBelowThreshold,
  SecAggServer,
  SecAggSite,
  SecAggSiteError,
} from '../../common/secagg/index.ts';
import { open, seal } from '../../common/secagg/keys.ts';
import { shareAad } from '../../common/secagg/protocol.ts';
import { exactSum, maxAbsDiff, randomVector, runRound } from './secagg-harness.ts';

const RANGE = 1;

function params(n: number, threshold: number, extra: Partial<{ neighbours: number | null; len: number; attempt: number; seed: Uint8Array }> = {}) {
  return {
    cohort: Array.from({ length: n }, (_, i) => i + 1),
    threshold,
    neighbours: extra.neighbours ?? null,
    graphSeed: extra.seed ?? new Uint8Array(32).fill(3),
    range: RANGE,
    maxSummands: n,
    vectorLength: extra.len ?? 16,
    round: 1,
    attempt: extra.attempt ?? 0,
  };
}

async function belowAt(p: Promise<unknown>): Promise<SecAggBelowThreshold> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(SecAggBelowThreshold);
    return e as SecAggBelowThreshold;
  }
  throw new Error('the round did not fail');
}

describe('secure aggregation protocol (in process)', () => {
  it('10 sites, no dropouts: the unmasked sum equals the float64 sum within the quantisation bound', async () => {
    const r = await runRound({ n: 10, threshold: 6, len: 1000 });
    expect(r.u3).toEqual(r.u1);
    const err = maxAbsDiff(r.sum, exactSum(r.xs, r.u3, RANGE));
    expect(err).toBeLessThanOrEqual(quantisationBound(RANGE, 10, 10));
  });

  it('10 sites with drops after advertise, after sharing keys (2) and after the masked input (1): equals the sum over U3', async () => {
    const r = await runRound({
      n: 10,
      threshold: 5,
      len: 500,
      silentAdvertise: [10],
      dropAfterAdvertise: [9],
      dropAfterShare: [3, 4],
      dropAfterMask: [5],
    });
    expect(r.u1).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9]);
    expect(r.u2).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(r.u3).toEqual([1, 2, 5, 6, 7, 8]);
    const exact = exactSum(r.xs, r.u3, RANGE);
    expect(maxAbsDiff(r.sum, exact)).toBeLessThanOrEqual(quantisationBound(RANGE, 10, r.u3.length));
    // Not the sum over U2: the dropped sites' inputs are not in it.
    expect(maxAbsDiff(r.sum, exactSum(r.xs, r.u2, RANGE))).toBeGreaterThan(0.01);
  });

  it('SecAgg+ with k = 4 at 20 sites: masks with 4 neighbours and still unmasks the survivors\' sum', async () => {
    const seed = new Uint8Array(32).fill(9);
    const n = 20;
    const k = 4;
    const t = 3;
    const g = graphOf(Array.from({ length: n }, (_, i) => i + 1), k, seed);
    // Drops that every neighbourhood survives: no two dropped sites adjacent, no site next to more than 2 of them.
    const drops: number[] = [];
    for (let s = 1; s <= n && drops.length < 3; s++) {
      const trial = [...drops, s];
      const ok = trial.every((d) => !trial.some((e) => g.get(d)!.includes(e))) &&
        [...g.keys()].every((u) => g.get(u)!.filter((v) => trial.includes(v)).length <= k + 1 - t);
      if (ok) drops.push(s);
    }
    expect(drops.length).toBe(3);
    const r = await runRound({ n, threshold: t, neighbours: k, seed, len: 300, dropAfterShare: drops.slice(0, 2), dropAfterMask: drops.slice(2) });
    for (const u of r.u1) expect(r.server.neighbours(u).length).toBe(k);
    expect(r.u3.length).toBe(n - 2);
    expect(maxAbsDiff(r.sum, exactSum(r.xs, r.u3, RANGE))).toBeLessThanOrEqual(quantisationBound(RANGE, n, r.u3.length));
  });

  it('SecAgg+ fails cleanly when a dropped site has fewer than threshold surviving neighbours', async () => {
    const seed = new Uint8Array(32).fill(9);
    const g = graphOf(Array.from({ length: 20 }, (_, i) => i + 1), 4, seed);
    const nb = g.get(1)!;
    const e = await belowAt(runRound({ n: 20, threshold: 4, neighbours: 4, seed, dropAfterShare: [1, nb[0]!, nb[1]!] }));
    expect(e.phase).toBe('unmask');
    expect(e.need).toBe(4);
    expect(e.have).toBeLessThan(4);
    expect(e.message).toMatch(/shares of site \d+'s (mask key|self-mask seed)/);
  });

  it('below the threshold at each phase: SecAggBelowThreshold names the phase and the counts', async () => {
    let e = await belowAt(runRound({ n: 10, threshold: 6, silentAdvertise: [1, 2, 3, 4, 5] }));
    expect([e.phase, e.have, e.need]).toEqual(['advertise', 5, 6]);
    expect(e.message).toMatch(/advertise phase has 5 of the 6 sites needed/);
    e = await belowAt(runRound({ n: 10, threshold: 6, dropAfterAdvertise: [1, 2, 3, 4, 5] }));
    expect([e.phase, e.have, e.need]).toEqual(['share-keys', 5, 6]);
    e = await belowAt(runRound({ n: 10, threshold: 6, dropAfterShare: [1, 2, 3, 4, 5] }));
    expect([e.phase, e.have, e.need]).toEqual(['masked-input', 5, 6]);
    e = await belowAt(runRound({ n: 10, threshold: 6, dropAfterShare: [1], dropAfterMask: [2, 3, 4, 5] }));
    expect([e.phase, e.have, e.need]).toEqual(['unmask', 5, 6]);
  });

  it('a site never reveals both shares for one peer: an unmask request with another U3 is refused', async () => {
    const p = params(5, 3);
    const server = new SecAggServer(p);
    const sites = p.cohort.map((s) => new SecAggSite({ ...p, self: s }));
    sites.forEach((s, i) => server.addKeys(i + 1, s.advertise()));
    const u1 = server.u1();
    for (const s of u1) server.addShares(s, await sites[s - 1]!.shareKeys(server.keysFor(s)));
    const u2 = server.u2();
    for (const s of u2) {
      sites[s - 1]!.receiveShares(server.sharesFor(s));
      server.addMaskedInput(s, sites[s - 1]!.maskInput(randomVector(16, RANGE), u2));
    }
    const site = sites[0]!;
    const first = site.unmask(u2, [1, 2, 3, 4, 5]);
    expect([...first.selfShares.keys()].sort()).toEqual([1, 2, 3, 4, 5]);
    expect(first.keyShares.size).toBe(0);
    // The same request again gets the same answer (nothing new revealed).
    expect(site.unmask(u2, [5, 4, 3, 2, 1]).selfShares.get(2)).toEqual(first.selfShares.get(2));
    // Claiming now that 5 dropped would reveal the share of 5's mask key as well as of its self mask.
    expect(() => site.unmask(u2, [1, 2, 3, 4])).toThrow(/would reveal both the self-mask share and the key share/);
    // A fresh site asked with 5 dropped reveals the key share and not the self share.
    const other = sites[1]!.unmask(u2, [1, 2, 3, 4]);
    expect(other.keyShares.has(5)).toBe(true);
    expect(other.selfShares.has(5)).toBe(false);
    // Requests that break the protocol's invariants are refused too.
    expect(() => sites[2]!.unmask(u2, [2, 3])).toThrow(/U3 has 2 sites, fewer than the threshold 3/);
    expect(() => sites[2]!.unmask(u2, [1, 2, 3, 9])).toThrow(/U3 lists site 9, which is not in U2/);
    expect(() => sites[2]!.unmask([1, 2, 3, 4], [1, 2, 3])).toThrow(/another U2 than the one this site masked against/);
  });

  it('a receiving site refuses a tampered ciphertext, one addressed to another site, and one reflected back to its sender', async () => {
    const p = params(4, 3);
    const server = new SecAggServer(p);
    const fresh = () => p.cohort.map((s) => new SecAggSite({ ...p, self: s }));
    const sites = fresh();
    sites.forEach((s, i) => server.addKeys(i + 1, s.advertise()));
    server.u1();
    const out = new Map<number, Map<number, Uint8Array>>();
    for (const s of p.cohort) out.set(s, await sites[s - 1]!.shareKeys(server.keysFor(s)));
    // Bit flip in 1 -> 2.
    const flipped = new Uint8Array(out.get(1)!.get(2)!);
    flipped[20] ^= 1;
    expect(() => sites[1]!.receiveShares(new Map([[1, flipped], [3, out.get(3)!.get(2)!], [4, out.get(4)!.get(2)!]]))).toThrow(
      /site 1: its share ciphertext does not authenticate/,
    );
    // The site stays out of this attempt after refusing.
    expect(() => sites[1]!.maskInput(new Float64Array(16), [1, 2, 3, 4])).toThrow(/already failed on this site/);
    // 1 -> 3 delivered to site 4 as coming from 1.
    expect(() => sites[3]!.receiveShares(new Map([[1, out.get(1)!.get(3)!]]))).toThrow(/site 1: its share ciphertext does not authenticate/);
    // 3 -> 1 given back to site 3 as if 1 had sent it: same key (X25519 is symmetric), other AAD.
    expect(() => sites[2]!.receiveShares(new Map([[1, out.get(3)!.get(1)!]]))).toThrow(/site 1: its share ciphertext does not authenticate/);
    // Wrong length and a sender outside the neighbourhood.
    expect(() => sites[0]!.receiveShares(new Map([[2, new Uint8Array(10)]]))).toThrow(/share ciphertext must be 94 bytes, got 10/);
  });

  it('the share AAD binds round, attempt, sender and receiver', () => {
    const key = new Uint8Array(randomBytes(32));
    const ct = seal(key, shareAad(4, 1, 2, 3), new Uint8Array(66));
    expect(open(key, shareAad(4, 1, 2, 3), ct)).not.toBeNull();
    expect(open(key, shareAad(4, 2, 2, 3), ct)).toBeNull(); // another attempt
    expect(open(key, shareAad(5, 1, 2, 3), ct)).toBeNull(); // another round
    expect(open(key, shareAad(4, 1, 2, 5), ct)).toBeNull(); // addressed to another site
    expect(open(key, shareAad(4, 1, 3, 2), ct)).toBeNull(); // other direction
  });

  it('a ciphertext from another round attempt (same sites) is refused', async () => {
    // Attempt 1 of the round reuses site objects' roles with fresh keys: a replay of attempt 0's ciphertext fails.
    const p0 = params(3, 2);
    const p1 = params(3, 2, { attempt: 1 });
    const a0 = p0.cohort.map((s) => new SecAggSite({ ...p0, self: s }));
    const a1 = p1.cohort.map((s) => new SecAggSite({ ...p1, self: s }));
    const keys = (xs: SecAggSite[]) => new Map(xs.map((s, i) => [i + 1, s.advertise()]));
    const k0 = keys(a0);
    keys(a1);
    const ct0 = await a0[0]!.shareKeys(k0);
    expect(() => a1[1]!.receiveShares(new Map([[1, ct0.get(2)!]]))).toThrow(/out of protocol order/);
    await a1[1]!.shareKeys(new Map([...k0].map(([s, k]) => [s, s === 2 ? a1[1]!.advertise() : k])));
    expect(() => a1[1]!.receiveShares(new Map([[1, ct0.get(2)!]]))).toThrow(/does not authenticate/);
  });

  it('malformed messages drop the sending site with a named error; the round goes on', async () => {
    const p = params(8, 2);
    const server = new SecAggServer(p);
    const sites = p.cohort.map((s) => new SecAggSite({ ...p, self: s }));
    const xs = p.cohort.map(() => randomVector(16, RANGE));
    const keys = sites.map((s) => s.advertise());
    for (let i = 0; i < 7; i++) expect(server.addKeys(i + 1, keys[i]!)).toBeNull();
    let e = server.addKeys(8, { encPk: new Uint8Array(31), maskPk: keys[7]!.maskPk });
    expect(e).toBeInstanceOf(SecAggSiteError);
    expect(e!.message).toMatch(/advertise phase, site 8: advertised keys must be two 32-byte X25519 public keys/);
    expect(server.addKeys(99, keys[0]!)!.message).toMatch(/site 99: is not a site of this round's cohort/);
    expect(server.addKeys(7, keys[6]!)!.message).toMatch(/site 7: sent a second message in this phase/);
    const u1 = server.u1();
    expect(u1).toEqual([1, 2, 3, 4, 5, 6]);
    const shares = new Map<number, Map<number, Uint8Array>>();
    for (const s of u1) shares.set(s, await sites[s - 1]!.shareKeys(server.keysFor(s)));
    for (const s of [1, 2, 3, 4, 5]) expect(server.addShares(s, shares.get(s)!)).toBeNull();
    const partial = new Map(shares.get(6)!);
    partial.delete(1);
    expect(server.addShares(6, partial)!.message).toMatch(/share-keys phase, site 6: must send one ciphertext to each of its 5 neighbours/);
    expect(server.addShares(8, shares.get(5)!)!.message).toMatch(/site 8: was already dropped/);
    const u2 = server.u2();
    expect(u2).toEqual([1, 2, 3, 4, 5]);
    for (const s of u2) sites[s - 1]!.receiveShares(server.sharesFor(s));
    for (const s of [1, 2, 3, 4]) expect(server.addMaskedInput(s, sites[s - 1]!.maskInput(xs[s - 1]!, u2))).toBeNull();
    expect(server.addMaskedInput(5, new Uint32Array(15))!.message).toMatch(/masked-input phase, site 5: its masked input must be a Uint32Array of 16 values, got 15/);
    expect(server.addMaskedInput(4, new Uint32Array(16))!.message).toMatch(/site 4: sent a second message/);
    const u3 = server.u3();
    expect(u3).toEqual([1, 2, 3, 4]);
    for (const s of [1, 2]) expect(server.addUnmask(s, sites[s - 1]!.unmask(u2, u3))).toBeNull();
    const bad = sites[2]!.unmask(u2, u3);
    bad.selfShares.set(1, new Uint8Array(5));
    expect(server.addUnmask(3, bad)!.message).toMatch(/unmask phase, site 3: its share for site 1 must be 33 bytes/);
    const missing = sites[3]!.unmask(u2, u3);
    expect(server.addUnmask(4, missing)!.message).toMatch(/unmask phase, site 4: was already dropped/);
    expect(server.drops().map((d) => [d.phase, d.site])).toEqual([
      ['advertise', 8], ['advertise', 99], ['advertise', 7], ['share-keys', 6], ['share-keys', 8], ['masked-input', 5], ['masked-input', 4], ['unmask', 3], ['unmask', 4],
    ]);
    // Site 4's duplicate dropped it, but its first masked input is in the sum: 1 and 2's shares unmask U3 = 1..4.
    const sum = await server.finish();
    const exact = exactSum(new Map(xs.map((x, i) => [i + 1, x])), u3, RANGE);
    expect(maxAbsDiff(sum, exact)).toBeLessThanOrEqual(quantisationBound(RANGE, 8, 4));
  });

  it('a site refuses substituted or malformed key lists and a U2 that does not match the shares it got', async () => {
    const p = params(4, 3);
    const sites = p.cohort.map((s) => new SecAggSite({ ...p, self: s }));
    const keys = new Map(sites.map((s, i) => [i + 1, s.advertise()]));
    const swapped = new Map(keys);
    swapped.set(1, keys.get(2)!);
    await expect(sites[0]!.shareKeys(swapped)).rejects.toThrow(/site 1: the key list carries other keys for this site than it advertised/);
    const outsider = new Map(keys);
    outsider.set(77, keys.get(3)!);
    await expect(sites[1]!.shareKeys(outsider)).rejects.toThrow(/site 77: a key list entry names a site outside the round's cohort/);
    const short = new Map(keys);
    short.set(4, { encPk: new Uint8Array(8), maskPk: keys.get(4)!.maskPk });
    await expect(sites[2]!.shareKeys(short)).rejects.toThrow(/site 4: advertised keys must be two 32-byte X25519 public keys/);
    // Site 4 shares keys normally, gets only site 1's ciphertext, then is told U2 = everyone.
    const s1 = new SecAggSite({ ...p, self: 1 });
    const s4 = sites[3]!;
    const k2 = new Map(keys);
    k2.set(1, s1.advertise());
    await s4.shareKeys(k2);
    const from1 = await s1.shareKeys(k2);
    s4.receiveShares(new Map([[1, from1.get(4)!]]));
    expect(() => s4.maskInput(new Float64Array(16), [1, 2, 3, 4])).toThrow(/the shares received \(from sites 1\) are not those of this site's neighbours in U2 \(1,2,3\)/);
  });

  it('a corrupt share of a dropped site\'s key is detected against the advertised key', async () => {
    const p = params(5, 3);
    const server = new SecAggServer(p);
    const sites = p.cohort.map((s) => new SecAggSite({ ...p, self: s }));
    sites.forEach((s, i) => server.addKeys(i + 1, s.advertise()));
    const u1 = server.u1();
    for (const s of u1) server.addShares(s, await sites[s - 1]!.shareKeys(server.keysFor(s)));
    const u2 = server.u2();
    for (const s of [1, 2, 3, 4]) {
      sites[s - 1]!.receiveShares(server.sharesFor(s));
      server.addMaskedInput(s, sites[s - 1]!.maskInput(randomVector(16, RANGE), u2));
    }
    const u3 = server.u3();
    for (const s of u3) {
      const r = sites[s - 1]!.unmask(u2, u3);
      // A byte in the middle of the share: the reconstructed X25519 scalar changes there whatever the Lagrange
      // coefficient (a change to byte 0 can fall in the three low bits that clamping clears, and then the key is the same).
      if (s === 1) r.keyShares.get(5)![10] ^= 0xff;
      server.addUnmask(s, r);
    }
    await expect(server.finish()).rejects.toThrow(/site 5: the revealed shares of its mask key do not rebuild the key it advertised/);
  });

  it('refuses bad round parameters by name', () => {
    expect(() => new SecAggServer({ ...params(5, 3), threshold: 6 })).toThrow(/threshold must be an integer in \[2, cohort size 5\]/);
    expect(() => new SecAggServer({ ...params(5, 3), maxSummands: 4 })).toThrow(/maxSummands must be an integer of at least the cohort size 5/);
    expect(() => new SecAggServer({ ...params(300, 3) })).toThrow(/more than the 255 shares.*neighbours \(SecAgg\+\)/);
    expect(() => new SecAggSite({ ...params(5, 3), self: 9 })).toThrow(/site 9 is not in the round's cohort/);
    expect(() => new SecAggServer({ ...params(5, 3), graphSeed: new Uint8Array(3) })).toThrow(/graphSeed must be 32 bytes/);
  });
});
