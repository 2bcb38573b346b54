/**
 * The masks' pseudo-random generator: the AES-256-CTR keystream (Node's crypto,
 * zero IV) of a 32-byte seed, read as little-endian uint32 words. Every seed is
 * used for one keystream only (self-mask seeds are drawn fresh per round
 * attempt; pairwise seeds are derived per attempt), so the zero IV never
 * repeats under one key.
 */
import { createCipheriv } from 'node:crypto';
import { endianness } from 'node:os';

export const SEED_BYTES = 32;
/** Words of keystream produced per cipher call. */
export const PRG_CHUNK = 1 << 16;
const ZERO_IV = Buffer.alloc(16);
const ZEROS = Buffer.alloc(PRG_CHUNK * 4);
const LITTLE = endianness() === 'LE';

function checkSeed(seed: Uint8Array): void {
  if (!(seed instanceof Uint8Array) || seed.length !== SEED_BYTES) {
    throw new Error(`secure aggregation: a PRG seed must be ${SEED_BYTES} bytes, got ${seed instanceof Uint8Array ? seed.length : typeof seed}`);
  }
}

/** Call fn with consecutive keystream words (a view valid only during the call) covering n words. */
export function prgStream(seed: Uint8Array, n: number, fn: (words: Uint32Array, offset: number) => void): void {
  checkSeed(seed);
  const cipher = createCipheriv('aes-256-ctr', seed, ZERO_IV);
  for (let off = 0; off < n; off += PRG_CHUNK) {
    const len = Math.min(PRG_CHUNK, n - off);
    const ks = cipher.update(len === PRG_CHUNK ? ZEROS : ZEROS.subarray(0, len * 4));
    let words: Uint32Array;
    if (LITTLE) {
      const aligned = ks.byteOffset % 4 === 0 ? ks : Buffer.from(ks);
      words = new Uint32Array(aligned.buffer, aligned.byteOffset, len);
    } else {
      words = new Uint32Array(len);
      for (let i = 0; i < len; i++) words[i] = ks.readUInt32LE(4 * i);
    }
    fn(words, off);
  }
  cipher.final();
}

/** The first n words of PRG(seed) (tests and small vectors; masking streams with addPrg). */
export function prgWords(seed: Uint8Array, n: number): Uint32Array {
  const out = new Uint32Array(n);
  prgStream(seed, n, (w, off) => out.set(w, off));
  return out;
}

/** acc += sign * PRG(seed) mod 2^32, streaming the keystream in chunks. */
export function addPrg(acc: Uint32Array, seed: Uint8Array, sign: 1 | -1): void {
  if (sign !== 1 && sign !== -1) throw new Error(`secure aggregation: addPrg sign must be 1 or -1, got ${sign}`);
  if (sign === 1) {
    prgStream(seed, acc.length, (w, off) => {
      for (let i = 0; i < w.length; i++) acc[off + i] += w[i]!;
    });
  } else {
    prgStream(seed, acc.length, (w, off) => {
      for (let i = 0; i < w.length; i++) acc[off + i] -= w[i]!;
    });
  }
}
