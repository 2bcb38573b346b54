/**
 * One site's side of a secure-aggregation round attempt (Bonawitz et al. 2017;
 * SecAgg+ of Bell et al. 2020 when `neighbours` is set). One object per round
 * attempt: fresh keys, a fresh self-mask seed, and the memory of which share it
 * revealed for which peer. Methods are called in protocol order; a message the
 * site cannot accept throws SecAggSiteError and leaves the object refusing
 * everything after (the site then drops out of the attempt).
 */
import { randomBytes, type KeyObject } from 'node:crypto';
import { graphOf } from './graph.ts';
import { agree, generateX25519, open, privateRawOf, seal } from './keys.ts';
import { addPrg, SEED_BYTES } from './prg.ts';
import {
  checkParams,
  isKey,
  pairSeed,
  pairSign,
  PAIR_BYTES,
  sameSet,
  SEALED_PAIR_BYTES,
  SecAggSiteError,
  shareAad,
  shareKey,
  shareThreshold,
  SHARE_BYTES,
  type PublicKeys,
  type SecAggPhase,
  type SecAggRoundParams,
} from './protocol.ts';
import { encode } from './quantise.ts';
import { splitSecret } from './shamir.ts';

type State = 'new' | 'advertised' | 'sharing' | 'shared' | 'received' | 'masked' | 'failed';

interface SharePair {
  self: Uint8Array; // share of the owner's self-mask seed b
  key: Uint8Array; // share of the owner's mask secret key
}

export class SecAggSite {
  private readonly p: SecAggRoundParams;
  private readonly cohort: Set<number>;
  private state: State = 'new';
  private enc: { publicRaw: Uint8Array; privateKey: KeyObject } | null = null;
  private mask: { publicRaw: Uint8Array; privateKey: KeyObject } | null = null;
  private b: Uint8Array | null = null;
  private keys: Map<number, PublicKeys> | null = null;
  private u1: number[] = [];
  private nb: number[] = [];
  /** Share pairs held: from each neighbour, and this site's own. */
  private readonly held = new Map<number, SharePair>();
  private u2: number[] | null = null;
  private answered: { u3: number[]; result: { selfShares: Map<number, Uint8Array>; keyShares: Map<number, Uint8Array> } } | null = null;

  constructor(p: SecAggRoundParams) {
    checkParams(p);
    if (!p.cohort.includes(p.self)) throw new Error(`secure aggregation: site ${p.self} is not in the round's cohort`);
    this.p = { ...p, cohort: [...p.cohort], graphSeed: new Uint8Array(p.graphSeed) };
    this.cohort = new Set(p.cohort);
  }

  private fail(phase: SecAggPhase, site: number | null, msg: string): never {
    this.state = 'failed';
    throw new SecAggSiteError(phase, site, msg);
  }

  private expect(phase: SecAggPhase, ...states: State[]): void {
    if (this.state === 'failed') throw new SecAggSiteError(phase, this.p.self, 'this round attempt already failed on this site');
    if (!states.includes(this.state)) {
      throw new SecAggSiteError(phase, this.p.self, `called out of protocol order (the site is at step '${this.state}')`);
    }
  }

  /** Phase 0: two fresh X25519 key pairs (c for encrypting shares, s for pairwise masks). */
  advertise(): PublicKeys {
    if (this.state === 'new') {
      this.enc = generateX25519();
      this.mask = generateX25519();
      this.state = 'advertised';
    } else {
      this.expect('advertise', 'advertised');
    }
    return { encPk: new Uint8Array(this.enc!.publicRaw), maskPk: new Uint8Array(this.mask!.publicRaw) };
  }

  /**
   * Phase 1: given the public keys of U1 (including this site's), secret-share
   * the self-mask seed b and the mask secret key among this site and its
   * neighbours in U1, and return one AES-256-GCM ciphertext per neighbour.
   */
  async shareKeys(keys: ReadonlyMap<number, PublicKeys>): Promise<Map<number, Uint8Array>> {
    this.expect('share-keys', 'advertised');
    this.state = 'sharing';
    const phase = 'share-keys';
    const me = this.p.self;
    if (!(keys instanceof Map)) this.fail(phase, null, 'the key list is not a map of site to keys');
    const own = keys.get(me);
    if (!own || !isKey(own.encPk) || !isKey(own.maskPk)) this.fail(phase, me, 'the key list lacks this site\'s own keys');
    if (!Buffer.from(own.encPk).equals(Buffer.from(this.enc!.publicRaw)) || !Buffer.from(own.maskPk).equals(Buffer.from(this.mask!.publicRaw))) {
      this.fail(phase, me, 'the key list carries other keys for this site than it advertised; refusing (the keys were substituted)');
    }
    for (const [s, k] of keys) {
      if (!this.cohort.has(s)) this.fail(phase, s, 'a key list entry names a site outside the round\'s cohort');
      if (!k || !isKey(k.encPk) || !isKey(k.maskPk)) this.fail(phase, s, 'advertised keys must be two 32-byte X25519 public keys');
    }
    if (keys.size < this.p.threshold) {
      this.fail(phase, null, `only ${keys.size} sites advertised keys, fewer than the threshold ${this.p.threshold}`);
    }
    this.keys = new Map([...keys].map(([s, k]) => [s, { encPk: new Uint8Array(k.encPk), maskPk: new Uint8Array(k.maskPk) }]));
    this.u1 = [...keys.keys()].sort((a, b) => a - b);
    this.nb = graphOf(this.u1, this.p.neighbours, this.p.graphSeed).get(me)!;
    const holders = this.nb.length + 1;
    const t = shareThreshold(this.p.threshold, this.nb.length);
    this.b = new Uint8Array(randomBytes(SEED_BYTES));
    const bShares = await splitSecret(this.b, holders, t);
    const kShares = await splitSecret(privateRawOf(this.mask!.privateKey), holders, t);
    this.held.set(me, { self: bShares[0]!, key: kShares[0]! });
    const out = new Map<number, Uint8Array>();
    for (let i = 0; i < this.nb.length; i++) {
      const v = this.nb[i]!;
      let dh: Uint8Array;
      try {
        dh = agree(this.enc!.privateKey, this.keys.get(v)!.encPk);
      } catch {
        this.fail(phase, v, 'its encryption public key is not a usable X25519 key (low order or malformed)');
      }
      const plain = Buffer.concat([bShares[i + 1]!, kShares[i + 1]!]);
      out.set(v, seal(shareKey(dh), shareAad(this.p.round, this.p.attempt, me, v), plain));
    }
    this.state = 'shared';
    return out;
  }

  /** Phase 2 (first half): the ciphertexts addressed to this site by its neighbours in U2. */
  receiveShares(ct: ReadonlyMap<number, Uint8Array>): void {
    this.expect('masked-input', 'shared');
    const phase = 'masked-input';
    const me = this.p.self;
    if (!(ct instanceof Map)) this.fail(phase, null, 'the share list is not a map of site to ciphertext');
    const nbs = new Set(this.nb);
    for (const [u, c] of ct) {
      if (!nbs.has(u)) this.fail(phase, u, 'a share ciphertext comes from a site that is not a neighbour of this site in U1');
      if (!(c instanceof Uint8Array) || c.length !== SEALED_PAIR_BYTES) {
        this.fail(phase, u, `a share ciphertext must be ${SEALED_PAIR_BYTES} bytes, got ${c instanceof Uint8Array ? c.length : typeof c}`);
      }
      let dh: Uint8Array;
      try {
        dh = agree(this.enc!.privateKey, this.keys!.get(u)!.encPk);
      } catch {
        this.fail(phase, u, 'its encryption public key is not a usable X25519 key');
      }
      const plain = open(shareKey(dh), shareAad(this.p.round, this.p.attempt, u, me), c);
      if (!plain || plain.length !== PAIR_BYTES) {
        this.fail(phase, u, 'its share ciphertext does not authenticate (tampered, or sealed for another site, round or attempt); refusing it');
      }
      this.held.set(u, { self: plain.slice(0, SHARE_BYTES), key: plain.slice(SHARE_BYTES) });
    }
    this.state = 'received';
  }

  /**
   * Phase 2: encode x (the site's clipped, weighted update) to Z_2^32 and add
   * PRG(b) and the pairwise masks with every neighbour in U2.
   */
  maskInput(x: Float32Array | Float64Array, u2: readonly number[]): Uint32Array {
    this.expect('masked-input', 'received');
    const phase = 'masked-input';
    const me = this.p.self;
    if (!(x instanceof Float32Array || x instanceof Float64Array) || x.length !== this.p.vectorLength) {
      this.fail(phase, me, `the update must be a Float32Array or Float64Array of ${this.p.vectorLength} values, got ${(x as { length?: number })?.length}`);
    }
    const set = this.checkSubset(phase, u2, this.u1, 'U2', 'U1');
    if (!set.has(me)) this.fail(phase, me, 'U2 does not include this site');
    if (set.size < this.p.threshold) this.fail(phase, null, `U2 has ${set.size} sites, fewer than the threshold ${this.p.threshold}`);
    const expected = this.nb.filter((v) => set.has(v));
    const got = [...this.held.keys()].filter((v) => v !== me);
    if (!sameSet(expected, got)) {
      this.fail(phase, null, `the shares received (from sites ${got.join(',') || 'none'}) are not those of this site's neighbours in U2 (${expected.join(',') || 'none'})`);
    }
    let y: Uint32Array;
    try {
      y = encode(x, this.p.range, this.p.maxSummands);
    } catch (e) {
      this.fail(phase, me, (e as Error).message);
    }
    addPrg(y, this.b!, 1);
    for (const v of expected) {
      let dh: Uint8Array;
      try {
        dh = agree(this.mask!.privateKey, this.keys!.get(v)!.maskPk);
      } catch {
        this.fail(phase, v, 'its mask public key is not a usable X25519 key');
      }
      addPrg(y, pairSeed(dh, this.p.round, this.p.attempt, me, v), pairSign(me, v));
    }
    this.u2 = [...set].sort((a, b) => a - b);
    this.state = 'masked';
    return y;
  }

  /**
   * Phase 3: reveal, for this site and each neighbour u in U2, the share of b_u
   * if u is in U3 and the share of u's mask secret key if u is in U2 \ U3.
   * Answered once per attempt: a later request with another U3 (which would
   * reveal the other kind of share for some peer) is refused.
   */
  unmask(u2: readonly number[], u3: readonly number[]): { selfShares: Map<number, Uint8Array>; keyShares: Map<number, Uint8Array> } {
    const phase = 'unmask';
    if (this.state === 'failed') throw new SecAggSiteError(phase, this.p.self, 'this round attempt already failed on this site');
    if (this.state !== 'masked') throw new SecAggSiteError(phase, this.p.self, `called out of protocol order (the site is at step '${this.state}')`);
    const me = this.p.self;
    const s2 = this.checkSubset(phase, u2, this.u1, 'U2', 'U1', false);
    if (!sameSet([...s2], this.u2!)) throw new SecAggSiteError(phase, null, 'the unmask request carries another U2 than the one this site masked against; refusing');
    const s3 = this.checkSubset(phase, u3, this.u2!, 'U3', 'U2', false);
    if (this.answered) {
      if (sameSet([...s3], this.answered.u3)) return copyResult(this.answered.result);
      throw new SecAggSiteError(
        phase,
        null,
        'a second unmask request with another U3 would reveal both the self-mask share and the key share of some site; refusing',
      );
    }
    if (!s3.has(me)) throw new SecAggSiteError(phase, me, 'U3 does not include this site, so it has no masked input to unmask');
    if (s3.size < this.p.threshold) throw new SecAggSiteError(phase, null, `U3 has ${s3.size} sites, fewer than the threshold ${this.p.threshold}; refusing to unmask`);
    const selfShares = new Map<number, Uint8Array>();
    const keyShares = new Map<number, Uint8Array>();
    for (const u of [me, ...this.nb]) {
      if (!this.u2!.includes(u)) continue;
      const pair = this.held.get(u)!;
      if (s3.has(u)) selfShares.set(u, new Uint8Array(pair.self));
      else keyShares.set(u, new Uint8Array(pair.key));
    }
    const result = { selfShares, keyShares };
    this.answered = { u3: [...s3].sort((a, b) => a - b), result };
    return copyResult(result);
  }

  private checkSubset(phase: SecAggPhase, xs: readonly number[], of: readonly number[], name: string, ofName: string, failState = true): Set<number> {
    const bad = (msg: string): never => {
      if (failState) this.fail(phase, null, msg);
      throw new SecAggSiteError(phase, null, msg);
    };
    if (!Array.isArray(xs)) bad(`${name} must be a list of site indices`);
    const ofSet = new Set(of);
    const set = new Set<number>();
    for (const s of xs) {
      if (!ofSet.has(s)) bad(`${name} lists site ${s}, which is not in ${ofName}`);
      if (set.has(s)) bad(`${name} lists site ${s} twice`);
      set.add(s);
    }
    return set;
  }
}

function copyResult(r: { selfShares: Map<number, Uint8Array>; keyShares: Map<number, Uint8Array> }) {
  return {
    selfShares: new Map([...r.selfShares].map(([k, v]) => [k, new Uint8Array(v)])),
    keyShares: new Map([...r.keyShares].map(([k, v]) => [k, new Uint8Array(v)])),
  };
}
