/**
 * Secure aggregation's cost per round, in process (common/secagg/, no network):
 * for 10 and 50 sites at 1M and 16M parameters, full SecAgg and (at 50 sites)
 * SecAgg+ with k = 2 ceil(log2 n) neighbours. Every round has the dropouts of
 * the integration test: 2 sites vanish after sharing keys, 1 after sending its
 * masked input.
 *
 *   site time    the largest single site's masking (encode + PRG(b) + one PRG per neighbour)
 *   server time  folding the masked inputs into the running sum + unmasking (rebuild secrets,
 *                remove self masks and the dropped sites' pairwise masks) + decode
 *   bytes/site   keys, encrypted shares, masked input and unmask shares, against the plain upload
 *                (4 bytes per float32 parameter)
 *   baselines    measured in the same run: memcpy of one update (Buffer.copy), and the plain
 *                FedAvg server fold (float64 acc += w * x over the U3 updates)
 *
 * Where simulating every site's masking would take too long (cohort * neighbours
 * * params > 2^31 PRG words), only the largest site masks for real; the other
 * sites' masked inputs are copies of its vector (folding costs the same whatever
 * the content), so the round's sum is not meaningful there, only its cost; such
 * rows say "extrapolated". Every site still advertises, shares keys and unmasks
 * for real. Usage: npm run bench:secagg [-- --small]
 */
import { randomBytes } from 'node:crypto';
import { SecAggServer, SecAggSite, SEALED_PAIR_BYTES, SHARE_BYTES, type SecAggServerParams } from '../common/secagg/index.ts';

const small = process.argv.includes('--small');
const M = small ? 1 << 14 : 1 << 20;

interface Case {
  n: number;
  params: number;
  k: number | null;
}

const cases: Case[] = [
  { n: 10, params: M, k: null },
  { n: 10, params: 16 * M, k: null },
  { n: 50, params: M, k: null },
  { n: 50, params: M, k: 2 * Math.ceil(Math.log2(50)) },
  { n: 50, params: 16 * M, k: null },
  { n: 50, params: 16 * M, k: 2 * Math.ceil(Math.log2(50)) },
];

function ms(t0: bigint): number {
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

function randomUpdate(len: number): Float32Array {
  const x = new Float32Array(len);
  for (let i = 0; i < len; i++) x[i] = Math.random() * 1.8 - 0.9;
  return x;
}

async function runCase(c: Case) {
  const cohort = Array.from({ length: c.n }, (_, i) => i + 1);
  const threshold = Math.max(2, Math.ceil(c.n / 2));
  const p: SecAggServerParams = {
    cohort,
    threshold: c.k === null ? threshold : Math.min(threshold, Math.floor(c.k / 2) + 1),
    neighbours: c.k,
    graphSeed: new Uint8Array(randomBytes(32)),
    range: 1,
    maxSummands: c.n,
    vectorLength: c.params,
    round: 1,
    attempt: 0,
  };
  const server = new SecAggServer(p);
  const sites = new Map(cohort.map((s) => [s, new SecAggSite({ ...p, self: s })]));
  for (const [s, site] of sites) server.addKeys(s, site.advertise());
  const u1 = server.u1();
  let tShare = 0;
  for (const s of u1) {
    const t0 = process.hrtime.bigint();
    const ct = await sites.get(s)!.shareKeys(server.keysFor(s));
    tShare = Math.max(tShare, ms(t0));
    server.addShares(s, ct);
  }
  const nb = (s: number) => server.neighbours(s);
  // Drops: 2 after sharing keys, 1 after its masked input; in SecAgg+ mode chosen apart in the graph so every neighbourhood keeps its threshold.
  const drops: number[] = [];
  for (const s of cohort) {
    if (drops.length === 3) break;
    if (drops.some((d) => nb(d).includes(s) || nb(s).some((v) => nb(d).includes(v)))) continue;
    drops.push(s);
  }
  const dropAfterShare = drops.slice(0, 2);
  const dropAfterMask = drops[2]!;
  for (const d of dropAfterShare) sites.delete(d);
  const simulate = c.n * (c.k ?? c.n) * c.params > 2 ** 31;
  // The site with the most neighbours in U2 masks first, for real.
  const order = [...sites.keys()].sort((a, b) => nb(b).filter((v) => !dropAfterShare.includes(v)).length - nb(a).filter((v) => !dropAfterShare.includes(v)).length);
  const x = randomUpdate(c.params);
  let tMask = 0;
  let tFold = 0;
  let first: Uint32Array | null = null;
  const u2full = server.u2();
  for (const s of order) {
    const site = sites.get(s)!;
    site.receiveShares(server.sharesFor(s));
    let y: Uint32Array;
    if (!simulate || first === null) {
      const t0 = process.hrtime.bigint();
      y = site.maskInput(x, u2full);
      tMask = Math.max(tMask, ms(t0));
      first ??= y;
    } else {
      // Extrapolated: the site's state moves on as if it had masked (bench only; its vector is a copy).
      y = first.slice();
      Object.assign(site as unknown as { state: string; u2: number[] }, { state: 'masked', u2: [...u2full] });
    }
    const t0 = process.hrtime.bigint();
    server.addMaskedInput(s, y);
    tFold += ms(t0);
  }
  const u3 = server.u3();
  sites.delete(dropAfterMask);
  const unmaskBytes = new Map<number, number>();
  let tUnmaskSite = 0;
  for (const [s, site] of sites) {
    const t0 = process.hrtime.bigint();
    const r = site.unmask(u2full, u3);
    tUnmaskSite = Math.max(tUnmaskSite, ms(t0));
    unmaskBytes.set(s, (r.selfShares.size + r.keyShares.size) * SHARE_BYTES);
    server.addUnmask(s, r);
  }
  const t0 = process.hrtime.bigint();
  await server.finish();
  const tUnmask = ms(t0);

  // Baselines on the same sizes.
  const a = Buffer.from(x.buffer);
  const b = Buffer.alloc(a.length);
  let t1 = process.hrtime.bigint();
  a.copy(b);
  const tCopy = ms(t1);
  const acc = new Float64Array(c.params);
  t1 = process.hrtime.bigint();
  for (let k = 0; k < u3.length; k++) {
    const w = 1 / (k + 1);
    for (let i = 0; i < c.params; i++) acc[i] += w * x[i]!;
  }
  const tPlainFold = ms(t1);

  const maxNb = Math.max(...u1.map((s) => nb(s).length));
  const bytesPerSite =
    64 + // advertise: two public keys
    u1.length * 64 + // the U1 key list
    2 * maxNb * SEALED_PAIR_BYTES + // shares out and in
    4 * c.params + // masked input
    Math.max(...unmaskBytes.values()) + // unmask shares
    4 * u3.length; // U2 / U3 lists
  return { c, threshold: p.threshold, maxNb, simulate, tShare, tMask, tFold, tUnmask, tUnmaskSite, tCopy, tPlainFold, bytesPerSite, plainBytes: 4 * c.params, u3: u3.length };
}

const fmt = (x: number) => (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));
console.log(`secure aggregation per round (node ${process.version}, ${small ? 'SMALL sizes' : 'full sizes'}); times in ms`);
console.log('| sites | params | mode | t | nbrs | site: share keys | site: mask (largest) | memcpy 1 update | server: fold | server: unmask+decode | plain FedAvg fold | bytes/site | plain upload | overhead | note |');
console.log('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|');
for (const c of cases) {
  const r = await runCase(c);
  const mode = c.k === null ? 'SecAgg' : `SecAgg+ k=${c.k}`;
  console.log(
    `| ${c.n} | ${c.params / (1 << 20)}M | ${mode} | ${r.threshold} | ${r.maxNb} | ${fmt(r.tShare)} | ${fmt(r.tMask)} | ${fmt(r.tCopy)} | ${fmt(r.tFold)} | ${fmt(r.tUnmask)} | ${fmt(r.tPlainFold)} | ${r.bytesPerSite} | ${r.plainBytes} | +${(((r.bytesPerSite - r.plainBytes) / r.plainBytes) * 100).toFixed(3)}% | ${r.simulate ? 'other sites\' masking extrapolated (copies of the largest site\'s)' : 'all sites masked'} |`,
  );
}
