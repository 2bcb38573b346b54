/**
 * Who masks with whom. Full secure aggregation: every other site of the cohort.
 * SecAgg+ (Bell et al. 2020): the k neighbours of a site in a random k-regular
 * graph, a Harary graph (each site joined to the k/2 nearest on either side of
 * a ring, plus the opposite site when k is odd) over a random permutation of
 * the cohort. The permutation is a Fisher-Yates shuffle driven by the
 * AES-256-CTR keystream of HKDF(graphSeed), so every party that knows the
 * cohort and the 32-byte seed computes the same graph. A k-regular graph with
 * k odd needs an even number of sites; with an odd cohort k is rounded up to
 * k + 1. When k >= n - 1 (or k is null) every site neighbours every other.
 */
import { derive } from './keys.ts';
import { prgStream, SEED_BYTES } from './prg.ts';

function checkCohort(cohort: readonly number[], what: string): number[] {
  const sorted = [...cohort].sort((a, b) => a - b);
  for (let i = 0; i < sorted.length; i++) {
    const s = sorted[i]!;
    if (!Number.isInteger(s) || s < 0 || s > 0xffffffff) {
      throw new Error(`secure aggregation: ${what} holds ${s}, not a site index (an integer in [0, 2^32))`);
    }
    if (i > 0 && sorted[i - 1] === s) throw new Error(`secure aggregation: ${what} lists site ${s} twice`);
  }
  return sorted;
}

/** The seeded permutation of the sorted cohort. */
function permutation(sorted: readonly number[], graphSeed: Uint8Array): number[] {
  const perm = [...sorted];
  const n = perm.length;
  if (n < 2) return perm;
  const key = derive(graphSeed, 'graph', new Uint8Array(0));
  // Rejection sampling needs on average < 2 words per draw; ask for plenty, then more if it ran out.
  let words = new Uint32Array(0);
  let pos = 0;
  let fetched = 0;
  const next = (): number => {
    if (pos >= words.length) {
      const want = fetched + 4 * n + 64;
      const all = new Uint32Array(want);
      prgStream(key, want, (w, off) => all.set(w, off));
      words = all.subarray(fetched);
      pos = 0;
      fetched = want;
    }
    return words[pos++]!;
  };
  for (let i = n - 1; i > 0; i--) {
    const m = i + 1;
    const limit = Math.floor(2 ** 32 / m) * m;
    let r: number;
    do r = next();
    while (r >= limit);
    const j = r % m;
    const t = perm[i]!;
    perm[i] = perm[j]!;
    perm[j] = t;
  }
  return perm;
}

/** Every site's neighbours (sorted) in the graph over cohort. */
export function graphOf(cohort: readonly number[], k: number | null, graphSeed: Uint8Array): Map<number, number[]> {
  const sorted = checkCohort(cohort, 'the cohort');
  if (k !== null && (!Number.isInteger(k) || k < 1)) {
    throw new Error(`secure aggregation: neighbours must be a positive integer or null, got ${k}`);
  }
  if (!(graphSeed instanceof Uint8Array) || graphSeed.length !== SEED_BYTES) {
    throw new Error(`secure aggregation: the graph seed must be ${SEED_BYTES} bytes`);
  }
  const n = sorted.length;
  const out = new Map<number, number[]>();
  let keff = k === null ? n - 1 : k;
  if (keff % 2 === 1 && n % 2 === 1) keff += 1;
  if (keff >= n - 1) {
    for (const s of sorted) out.set(s, sorted.filter((t) => t !== s));
    return out;
  }
  const perm = permutation(sorted, graphSeed);
  const half = Math.floor(keff / 2);
  perm.forEach((s, p) => {
    const nb: number[] = [];
    for (let d = 1; d <= half; d++) nb.push(perm[(p + d) % n]!, perm[(p - d + n) % n]!);
    if (keff % 2 === 1) nb.push(perm[(p + n / 2) % n]!);
    out.set(s, nb.sort((a, b) => a - b));
  });
  return out;
}

/** The neighbours of `site` (sorted, without itself). */
export function neighboursOf(site: number, cohort: readonly number[], k: number | null, graphSeed: Uint8Array): number[] {
  const g = graphOf(cohort, k, graphSeed);
  const nb = g.get(site);
  if (!nb) throw new Error(`secure aggregation: site ${site} is not in the cohort`);
  return nb;
}
