/**
 * What the site and the server of secure aggregation share: the round
 * parameters and their checks, errors, the per-site Shamir threshold, the
 * wire layout of an encrypted share pair, and the derivation of pairwise seeds.
 */
import { derive, KEY_BYTES, sealedBytes, u32s } from './keys.ts';
import { MAX_SHARES, shareBytes } from './shamir.ts';
import { SEED_BYTES } from './prg.ts';
import { fixedPointScale } from './quantise.ts';

export interface SecAggRoundParams {
  round: number;
  attempt: number;
  self: number;
  cohort: number[];
  threshold: number;
  neighbours: number | null;
  graphSeed: Uint8Array;
  range: number;
  maxSummands: number;
  vectorLength: number;
}

export interface PublicKeys {
  encPk: Uint8Array;
  maskPk: Uint8Array;
}

export type SecAggPhase = 'advertise' | 'share-keys' | 'masked-input' | 'unmask';

/** A round attempt cannot go on: fewer than `need` parties are left in `phase`. */
export class SecAggBelowThreshold extends Error {
  readonly phase: string;
  readonly have: number;
  readonly need: number;
  constructor(phase: string, have: number, need: number, detail = '') {
    super(`secure aggregation: ${phase} phase has ${have} of the ${need} sites needed${detail ? ` (${detail})` : ''}; the round attempt fails and is retried`);
    this.name = 'SecAggBelowThreshold';
    this.phase = phase;
    this.have = have;
    this.need = need;
  }
}

/** A message of one site was refused (the server drops that site; a site refuses the attempt). */
export class SecAggSiteError extends Error {
  readonly site: number | null;
  readonly phase: SecAggPhase;
  constructor(phase: SecAggPhase, site: number | null, message: string) {
    super(`secure aggregation, ${phase} phase${site === null ? '' : `, site ${site}`}: ${message}`);
    this.name = 'SecAggSiteError';
    this.site = site;
    this.phase = phase;
  }
}

/** Bytes of a secret-shared value: the 32-byte self-mask seed and the 32-byte mask secret key. */
export const SECRET_BYTES = 32;
export const SHARE_BYTES = shareBytes(SECRET_BYTES);
/** Plaintext of one encrypted share pair: share of b_u | share of the mask secret key. */
export const PAIR_BYTES = 2 * SHARE_BYTES;
export const SEALED_PAIR_BYTES = sealedBytes(PAIR_BYTES);

const U32_MAX = 0xffffffff;

function checkU32(what: string, x: unknown): void {
  if (typeof x !== 'number' || !Number.isInteger(x) || x < 0 || x > U32_MAX) {
    throw new Error(`secure aggregation: ${what} must be an integer in [0, 2^32), got ${String(x)}`);
  }
}

/** Check the parameters shared by site and server (everything but `self`). */
export function checkParams(p: Omit<SecAggRoundParams, 'self'>): void {
  checkU32('round', p.round);
  checkU32('attempt', p.attempt);
  if (!Array.isArray(p.cohort) || p.cohort.length < 2) {
    throw new Error(`secure aggregation: the cohort must list at least 2 sites, got ${Array.isArray(p.cohort) ? p.cohort.length : typeof p.cohort}`);
  }
  const seen = new Set<number>();
  for (const s of p.cohort) {
    checkU32('a cohort site index', s);
    if (seen.has(s)) throw new Error(`secure aggregation: the cohort lists site ${s} twice`);
    seen.add(s);
  }
  if (!Number.isInteger(p.threshold) || p.threshold < 2 || p.threshold > p.cohort.length) {
    throw new Error(`secure aggregation: threshold must be an integer in [2, cohort size ${p.cohort.length}], got ${p.threshold}`);
  }
  if (p.neighbours !== null && (!Number.isInteger(p.neighbours) || p.neighbours < 1)) {
    throw new Error(`secure aggregation: neighbours must be a positive integer or null, got ${p.neighbours}`);
  }
  const k = p.neighbours === null ? p.cohort.length - 1 : Math.min(p.neighbours + 1, p.cohort.length - 1);
  if (k + 1 > MAX_SHARES) {
    throw new Error(
      `secure aggregation: a site shares its keys among itself and ${k} neighbours, more than the ${MAX_SHARES} shares Shamir over GF(256) allows; set privacy.secure_aggregation.neighbours (SecAgg+) to at most ${MAX_SHARES - 2}`,
    );
  }
  if (!(p.graphSeed instanceof Uint8Array) || p.graphSeed.length !== SEED_BYTES) {
    throw new Error(`secure aggregation: graphSeed must be ${SEED_BYTES} bytes`);
  }
  if (!Number.isInteger(p.maxSummands) || p.maxSummands < p.cohort.length) {
    throw new Error(`secure aggregation: maxSummands must be an integer of at least the cohort size ${p.cohort.length}, got ${p.maxSummands}`);
  }
  fixedPointScale(p.range, p.maxSummands);
  if (!Number.isInteger(p.vectorLength) || p.vectorLength < 1 || p.vectorLength > 2 ** 31) {
    throw new Error(`secure aggregation: vectorLength must be a positive integer (at most 2^31), got ${p.vectorLength}`);
  }
}

/** Shamir threshold of site u's shares: the round threshold, capped at the holders (u and its neighbours). */
export function shareThreshold(threshold: number, neighbourCount: number): number {
  return Math.min(threshold, neighbourCount + 1);
}

/** AAD of the share pair that site `from` encrypts for site `to`. */
export function shareAad(round: number, attempt: number, from: number, to: number): Uint8Array {
  return Buffer.concat([Buffer.from('fedtune/secagg/v1/share\0'), u32s(round, attempt, from, to)]);
}

export function shareKey(dh: Uint8Array): Uint8Array {
  return derive(dh, 'share-key', new Uint8Array(0));
}

/** s_{u,v}: the pairwise mask seed of u and v (symmetric in u, v). */
export function pairSeed(dh: Uint8Array, round: number, attempt: number, u: number, v: number): Uint8Array {
  return derive(dh, 'pair-mask', u32s(round, attempt, Math.min(u, v), Math.max(u, v)));
}

/** Sign of the pairwise mask of u with v in u's masked input: +1 if u < v, else -1. */
export function pairSign(u: number, v: number): 1 | -1 {
  return u < v ? 1 : -1;
}

export function isKey(x: unknown): x is Uint8Array {
  return x instanceof Uint8Array && x.length === KEY_BYTES;
}

export function sameSet(a: readonly number[], b: readonly number[]): boolean {
  if (a.length !== b.length) return false;
  const s = new Set(a);
  return b.every((x) => s.has(x)) && s.size === a.length;
}

export function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length));
}
