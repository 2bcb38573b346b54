/**
 * The coordinator's side of a secure-aggregation round attempt. It relays
 * keys and encrypted shares, folds every masked input into ONE running sum mod
 * 2^32 as it arrives (it never keeps a site's vector), and at the end rebuilds
 * from the survivors' shares the self masks of U3 and the mask keys of the
 * sites that dropped after sharing keys, removes those masks and decodes.
 * Messages from sites are untrusted: a malformed one drops that site (the
 * add* methods return the SecAggSiteError, and drops() lists them); only too
 * few sites fail the attempt, with SecAggBelowThreshold.
 */
import { graphOf } from './graph.ts';
import { agree, privateKeyFromRaw, publicRawOf } from './keys.ts';
import { addPrg } from './prg.ts';
import {
  bytesEqual,
  checkParams,
  isKey,
  pairSeed,
  pairSign,
  sameSet,
  SEALED_PAIR_BYTES,
  SecAggBelowThreshold,
  SecAggSiteError,
  shareThreshold,
  SHARE_BYTES,
  type PublicKeys,
  type SecAggPhase,
  type SecAggRoundParams,
} from './protocol.ts';
import { decode } from './quantise.ts';
import { combineShares } from './shamir.ts';

/** Told of every buffer the server holds (synchronously: copy it to keep it; it may change later). */
export interface SecAggObserver {
  (what: string, site: number | null, buf: Uint32Array | Float64Array): void;
}

export type SecAggServerParams = Omit<SecAggRoundParams, 'self' | 'round' | 'attempt'> & { round: number; attempt: number };

type Stage = 'advertise' | 'share-keys' | 'masked-input' | 'unmask' | 'done';

export interface UnmaskResponse {
  selfShares: Map<number, Uint8Array>;
  keyShares: Map<number, Uint8Array>;
}

export class SecAggServer {
  private readonly p: SecAggServerParams;
  private readonly cohort: Set<number>;
  private readonly observer: SecAggObserver | undefined;
  private stage: Stage = 'advertise';
  private readonly keys = new Map<number, PublicKeys>();
  private U1: number[] | null = null;
  private graph: Map<number, number[]> | null = null;
  /** inbox.get(to).get(from): the sealed share pair from -> to. */
  private readonly inbox = new Map<number, Map<number, Uint8Array>>();
  private readonly shared = new Set<number>();
  private U2: number[] | null = null;
  private sum: Uint32Array | null = null;
  private readonly masked = new Set<number>();
  private U3: number[] | null = null;
  private readonly unmasks = new Map<number, UnmaskResponse>();
  private readonly dropList: SecAggSiteError[] = [];
  private readonly dropped = new Set<number>();

  constructor(p: SecAggServerParams, observer?: SecAggObserver) {
    checkParams(p);
    this.p = { ...p, cohort: [...p.cohort], graphSeed: new Uint8Array(p.graphSeed) };
    this.cohort = new Set(p.cohort);
    this.observer = observer;
  }

  /** Every message refused so far, each naming the site and the phase. */
  drops(): SecAggSiteError[] {
    return [...this.dropList];
  }

  private drop(phase: SecAggPhase, site: number, msg: string): SecAggSiteError {
    const e = new SecAggSiteError(phase, site, msg);
    this.dropList.push(e);
    if (this.cohort.has(site)) this.dropped.add(site);
    return e;
  }

  /** Checks common to every site message; returns an error (and drops the site) or null. */
  private admit(phase: SecAggPhase, site: number, stage: Stage, members: readonly number[] | null, already: Set<number> | Map<number, unknown>): SecAggSiteError | null {
    if (!Number.isInteger(site) || !this.cohort.has(site)) return this.drop(phase, site, 'is not a site of this round\'s cohort');
    if (this.dropped.has(site)) return this.drop(phase, site, 'was already dropped from this round attempt');
    if (this.stage !== stage) return this.drop(phase, site, `its message arrived after the ${phase} phase closed (or before it opened)`);
    if (members && !members.includes(site)) return this.drop(phase, site, 'did not take part in the previous phase');
    if (already.has(site)) return this.drop(phase, site, 'sent a second message in this phase');
    return null;
  }

  private programming(phase: string, what: string): never {
    throw new Error(`secure aggregation: ${what} during the ${phase} phase (called out of protocol order)`);
  }

  // ---- phase 0: advertise keys

  addKeys(site: number, k: PublicKeys): SecAggSiteError | null {
    const e = this.admit('advertise', site, 'advertise', null, this.keys);
    if (e) return e;
    if (!k || !isKey(k.encPk) || !isKey(k.maskPk)) return this.drop('advertise', site, 'advertised keys must be two 32-byte X25519 public keys');
    if (bytesEqual(k.encPk, k.maskPk)) return this.drop('advertise', site, 'advertised the same key twice; the two key pairs must differ');
    this.keys.set(site, { encPk: new Uint8Array(k.encPk), maskPk: new Uint8Array(k.maskPk) });
    return null;
  }

  /** Close the advertise phase: the sites whose keys arrived. Throws SecAggBelowThreshold if fewer than threshold. */
  u1(): number[] {
    if (this.U1 === null) {
      if (this.stage !== 'advertise') this.programming(this.stage, 'u1()');
      this.U1 = [...this.keys.keys()].filter((s) => !this.dropped.has(s)).sort((a, b) => a - b);
      this.stage = 'share-keys';
      if (this.U1.length < this.p.threshold) {
        this.stage = 'done';
        throw new SecAggBelowThreshold('advertise', this.U1.length, this.p.threshold);
      }
      this.graph = graphOf(this.U1, this.p.neighbours, this.p.graphSeed);
    } else if (this.U1.length < this.p.threshold) {
      throw new SecAggBelowThreshold('advertise', this.U1.length, this.p.threshold);
    }
    return [...this.U1];
  }

  /** The public keys of U1 for a site of U1 (it computes its neighbours from them and the graph seed). */
  keysFor(site: number): Map<number, PublicKeys> {
    if (!this.U1) this.programming(this.stage, 'keysFor() before u1()');
    if (!this.U1.includes(site)) throw new Error(`secure aggregation: site ${site} is not in U1 and gets no keys`);
    return new Map(this.U1.map((s) => [s, { encPk: new Uint8Array(this.keys.get(s)!.encPk), maskPk: new Uint8Array(this.keys.get(s)!.maskPk) }]));
  }

  /** The neighbours of a site of U1 (all of U1 but itself with full secure aggregation). */
  neighbours(site: number): number[] {
    if (!this.graph) this.programming(this.stage, 'neighbours() before u1()');
    const nb = this.graph.get(site);
    if (!nb) throw new Error(`secure aggregation: site ${site} is not in U1`);
    return [...nb];
  }

  // ---- phase 1: share keys

  addShares(site: number, ct: ReadonlyMap<number, Uint8Array>): SecAggSiteError | null {
    const phase = 'share-keys';
    const e = this.admit(phase, site, 'share-keys', this.U1, this.shared);
    if (e) return e;
    if (!(ct instanceof Map)) return this.drop(phase, site, 'its shares are not a map of neighbour to ciphertext');
    const nb = this.graph!.get(site)!;
    if (!sameSet([...ct.keys()], nb)) {
      return this.drop(phase, site, `must send one ciphertext to each of its ${nb.length} neighbours (${nb.join(',')}), sent to ${[...ct.keys()].join(',') || 'none'}`);
    }
    for (const [v, c] of ct) {
      if (!(c instanceof Uint8Array) || c.length !== SEALED_PAIR_BYTES) {
        return this.drop(phase, site, `its ciphertext for site ${v} must be ${SEALED_PAIR_BYTES} bytes, got ${c instanceof Uint8Array ? c.length : typeof c}`);
      }
    }
    for (const [v, c] of ct) {
      let box = this.inbox.get(v);
      if (!box) this.inbox.set(v, (box = new Map()));
      box.set(site, new Uint8Array(c));
    }
    this.shared.add(site);
    return null;
  }

  /** Close the share-keys phase. Throws SecAggBelowThreshold if fewer than threshold sites shared. */
  u2(): number[] {
    if (this.U2 === null) {
      if (this.stage !== 'share-keys') this.programming(this.stage, 'u2()');
      this.U2 = [...this.shared].filter((s) => !this.dropped.has(s)).sort((a, b) => a - b);
      this.stage = 'masked-input';
      if (this.U2.length < this.p.threshold) {
        this.stage = 'done';
        throw new SecAggBelowThreshold('share-keys', this.U2.length, this.p.threshold);
      }
    } else if (this.U2.length < this.p.threshold) {
      throw new SecAggBelowThreshold('share-keys', this.U2.length, this.p.threshold);
    }
    return [...this.U2];
  }

  /** The ciphertexts addressed to a site of U2 by its neighbours in U2. */
  sharesFor(site: number): Map<number, Uint8Array> {
    if (!this.U2) this.programming(this.stage, 'sharesFor() before u2()');
    if (!this.U2.includes(site)) throw new Error(`secure aggregation: site ${site} is not in U2 and gets no shares`);
    const box = this.inbox.get(site) ?? new Map<number, Uint8Array>();
    const u2 = new Set(this.U2);
    return new Map([...box].filter(([from]) => u2.has(from)).map(([from, c]) => [from, new Uint8Array(c)]));
  }

  // ---- phase 2: masked input

  /** Fold a site's masked input into the running sum at once; the vector is not kept. */
  addMaskedInput(site: number, y: Uint32Array): SecAggSiteError | null {
    const phase = 'masked-input';
    const e = this.admit(phase, site, 'masked-input', this.U2, this.masked);
    if (e) return e;
    if (!(y instanceof Uint32Array) || y.length !== this.p.vectorLength) {
      return this.drop(phase, site, `its masked input must be a Uint32Array of ${this.p.vectorLength} values, got ${(y as { length?: number })?.length ?? typeof y}`);
    }
    this.observer?.('masked-input', site, y);
    if (!this.sum) this.sum = new Uint32Array(this.p.vectorLength);
    const s = this.sum;
    for (let i = 0; i < s.length; i++) s[i] += y[i]!;
    this.masked.add(site);
    this.observer?.('sum', site, s);
    return null;
  }

  /** Close the masked-input phase. Throws SecAggBelowThreshold if fewer than threshold inputs arrived. */
  u3(): number[] {
    if (this.U3 === null) {
      if (this.stage !== 'masked-input') this.programming(this.stage, 'u3()');
      this.U3 = [...this.masked].sort((a, b) => a - b);
      this.stage = 'unmask';
      if (this.U3.length < this.p.threshold) {
        this.stage = 'done';
        this.sum = null;
        throw new SecAggBelowThreshold('masked-input', this.U3.length, this.p.threshold);
      }
    } else if (this.U3.length < this.p.threshold) {
      throw new SecAggBelowThreshold('masked-input', this.U3.length, this.p.threshold);
    }
    return [...this.U3];
  }

  // ---- phase 3: unmasking

  addUnmask(site: number, r: UnmaskResponse): SecAggSiteError | null {
    const phase = 'unmask';
    const e = this.admit(phase, site, 'unmask', this.U3, this.unmasks);
    if (e) return e;
    if (!r || !(r.selfShares instanceof Map) || !(r.keyShares instanceof Map)) {
      return this.drop(phase, site, 'its unmask answer must carry selfShares and keyShares maps');
    }
    const u3 = new Set(this.U3!);
    const holders = [site, ...this.graph!.get(site)!].filter((u) => this.U2!.includes(u));
    const wantSelf = holders.filter((u) => u3.has(u));
    const wantKey = holders.filter((u) => !u3.has(u));
    if (!sameSet([...r.selfShares.keys()], wantSelf)) {
      return this.drop(phase, site, `must reveal self-mask shares for exactly ${wantSelf.join(',') || 'none'}, revealed ${[...r.selfShares.keys()].join(',') || 'none'}`);
    }
    if (!sameSet([...r.keyShares.keys()], wantKey)) {
      return this.drop(phase, site, `must reveal key shares for exactly ${wantKey.join(',') || 'none'}, revealed ${[...r.keyShares.keys()].join(',') || 'none'}`);
    }
    for (const [u, s] of [...r.selfShares, ...r.keyShares]) {
      if (!(s instanceof Uint8Array) || s.length !== SHARE_BYTES) {
        return this.drop(phase, site, `its share for site ${u} must be ${SHARE_BYTES} bytes`);
      }
    }
    this.unmasks.set(site, {
      selfShares: new Map([...r.selfShares].map(([u, s]) => [u, new Uint8Array(s)])),
      keyShares: new Map([...r.keyShares].map(([u, s]) => [u, new Uint8Array(s)])),
    });
    return null;
  }

  /**
   * Remove the masks and decode: the sum over U3 of the sites' encoded inputs,
   * as float64. Throws SecAggBelowThreshold (phase 'unmask') when fewer than
   * threshold sites answered, or too few shares of some site's secret arrived.
   */
  async finish(): Promise<Float64Array> {
    if (this.stage !== 'unmask') this.programming(this.stage, 'finish()');
    this.stage = 'done';
    const t = this.p.threshold;
    const responders = [...this.unmasks.keys()].sort((a, b) => a - b);
    if (responders.length < t) {
      this.sum = null;
      throw new SecAggBelowThreshold('unmask', responders.length, t);
    }
    const sum = this.sum!;
    const u3 = this.U3!;
    const u3set = new Set(u3);
    const collect = (u: number, kind: 'selfShares' | 'keyShares'): Uint8Array[] =>
      responders.map((r) => this.unmasks.get(r)![kind].get(u)).filter((s): s is Uint8Array => s !== undefined);
    const rebuild = async (u: number, kind: 'selfShares' | 'keyShares', what: string): Promise<Uint8Array> => {
      const need = shareThreshold(t, this.graph!.get(u)!.length);
      const shares = collect(u, kind);
      if (shares.length < need) {
        this.sum = null;
        throw new SecAggBelowThreshold('unmask', shares.length, need, `shares of site ${u}'s ${what}`);
      }
      try {
        return await combineShares(shares.slice(0, need));
      } catch (e) {
        this.sum = null;
        throw new SecAggSiteError('unmask', u, `the shares of its ${what} do not combine: ${(e as Error).message}`);
      }
    };
    for (const u of u3) {
      addPrg(sum, await rebuild(u, 'selfShares', 'self-mask seed'), -1);
      this.observer?.('sum', u, sum);
    }
    for (const u of this.U2!) {
      if (u3set.has(u)) continue;
      const peers = this.graph!.get(u)!.filter((v) => u3set.has(v));
      if (peers.length === 0) continue;
      const raw = await rebuild(u, 'keyShares', 'mask key');
      let priv;
      try {
        priv = privateKeyFromRaw(raw);
      } catch {
        priv = null;
      }
      if (!priv || !bytesEqual(publicRawOf(priv), this.keys.get(u)!.maskPk)) {
        this.sum = null;
        throw new SecAggSiteError('unmask', u, 'the revealed shares of its mask key do not rebuild the key it advertised (a share is corrupt)');
      }
      for (const v of peers) {
        const seed = pairSeed(agree(priv, this.keys.get(v)!.maskPk), this.p.round, this.p.attempt, u, v);
        // v added pairSign(v, u) * PRG(seed); take it out.
        addPrg(sum, seed, pairSign(v, u) === 1 ? -1 : 1);
      }
      this.observer?.('sum', u, sum);
    }
    const out = decode(sum, this.p.range, this.p.maxSummands);
    this.sum = null;
    this.observer?.('decoded', null, out);
    return out;
  }
}
