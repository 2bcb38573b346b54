/** In-process driver of a secure-aggregation round for the secagg unit tests. */
import { randomBytes } from 'node:crypto';
import { SecAggServer, SecAggSite, type SecAggObserver } from '../../common/secagg/index.ts';

export interface RoundSpec {
  n: number;
  threshold: number;
  neighbours?: number | null;
  len?: number;
  range?: number;
  dropAfterAdvertise?: number[]; // advertise, then vanish
  dropAfterShare?: number[]; // share keys, then vanish
  dropAfterMask?: number[]; // send the masked input, then vanish
  silentAdvertise?: number[]; // never advertise
  observer?: SecAggObserver;
  seed?: Uint8Array;
  xs?: Float64Array[];
}

export interface RoundOutcome {
  server: SecAggServer;
  sites: Map<number, SecAggSite>;
  xs: Map<number, Float64Array>;
  u1: number[];
  u2: number[];
  u3: number[];
  sum: Float64Array;
}

export function randomVector(len: number, range: number, rng = Math.random): Float64Array {
  const x = new Float64Array(len);
  for (let i = 0; i < len; i++) x[i] = (2 * rng() - 1) * range * 0.9;
  return x;
}

/** Runs every phase; throws what the server throws. */
export async function runRound(spec: RoundSpec): Promise<RoundOutcome> {
  const len = spec.len ?? 64;
  const range = spec.range ?? 1;
  const cohort = Array.from({ length: spec.n }, (_, i) => i + 1);
  const common = {
    cohort,
    threshold: spec.threshold,
    neighbours: spec.neighbours ?? null,
    graphSeed: spec.seed ?? new Uint8Array(randomBytes(32)),
    range,
    maxSummands: spec.n,
    vectorLength: len,
    round: 7,
    attempt: 0,
  };
  const server = new SecAggServer(common, spec.observer);
  const sites = new Map(cohort.map((s) => [s, new SecAggSite({ ...common, self: s })]));
  const xs = new Map(cohort.map((s, i) => [s, spec.xs?.[i] ?? randomVector(len, range)]));
  const gone = new Set<number>(spec.silentAdvertise ?? []);
  for (const [s, site] of sites) if (!gone.has(s)) expectNull(server.addKeys(s, site.advertise()));
  const u1 = server.u1();
  for (const s of spec.dropAfterAdvertise ?? []) gone.add(s);
  for (const s of u1) {
    if (gone.has(s)) continue;
    expectNull(server.addShares(s, await sites.get(s)!.shareKeys(server.keysFor(s))));
  }
  const u2 = server.u2();
  for (const s of spec.dropAfterShare ?? []) gone.add(s);
  for (const s of u2) {
    if (gone.has(s)) continue;
    const site = sites.get(s)!;
    site.receiveShares(server.sharesFor(s));
    expectNull(server.addMaskedInput(s, site.maskInput(xs.get(s)!, u2)));
  }
  const u3 = server.u3();
  for (const s of spec.dropAfterMask ?? []) gone.add(s);
  for (const s of u3) {
    if (gone.has(s)) continue;
    expectNull(server.addUnmask(s, sites.get(s)!.unmask(u2, u3)));
  }
  const sum = await server.finish();
  return { server, sites, xs, u1, u2, u3, sum };
}

function expectNull(e: Error | null): void {
  if (e) throw e;
}

/** The float64 sum over `who` of the inputs clipped to [-range, range]. */
export function exactSum(xs: Map<number, Float64Array>, who: readonly number[], range: number): Float64Array {
  const len = xs.values().next().value!.length;
  const out = new Float64Array(len);
  for (const s of who) {
    const x = xs.get(s)!;
    for (let i = 0; i < len; i++) out[i] += Math.max(-range, Math.min(range, x[i]!));
  }
  return out;
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}
