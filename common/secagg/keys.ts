/**
 * Key agreement and share encryption for secure aggregation, all from Node's
 * crypto: X25519 key pairs (generateKeyPairSync / diffieHellman), HKDF-SHA256
 * (hkdfSync) and AES-256-GCM (createCipheriv). Raw 32-byte keys travel on the
 * wire; they are wrapped in the fixed DER headers of RFC 8410 to make KeyObjects.
 */
import {
  createCipheriv,
  createDecipheriv,
  createPrivateKey,
  createPublicKey,
  diffieHellman,
  generateKeyPairSync,
  hkdfSync,
  randomBytes,
  type KeyObject,
} from 'node:crypto';

export const KEY_BYTES = 32;
const SPKI_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');
const PKCS8_PREFIX = Buffer.from('302e020100300506032b656e04220420', 'hex');
const NONCE_BYTES = 12;
const TAG_BYTES = 16;

export interface X25519Pair {
  publicRaw: Uint8Array;
  privateKey: KeyObject;
}

export function generateX25519(): X25519Pair {
  const { publicKey, privateKey } = generateKeyPairSync('x25519');
  return { publicRaw: publicRawOf(publicKey), privateKey };
}

/** The raw 32 bytes of an X25519 public key (of a public KeyObject, or the public half of a private one). */
export function publicRawOf(k: KeyObject): Uint8Array {
  const der = (k.type === 'private' ? createPublicKey(k) : k).export({ format: 'der', type: 'spki' });
  return new Uint8Array(der.subarray(der.length - KEY_BYTES));
}

/** The raw 32 bytes of an X25519 private KeyObject (to be secret-shared). */
export function privateRawOf(k: KeyObject): Uint8Array {
  const der = k.export({ format: 'der', type: 'pkcs8' });
  return new Uint8Array(der.subarray(der.length - KEY_BYTES));
}

export function publicKeyFromRaw(raw: Uint8Array): KeyObject {
  if (!(raw instanceof Uint8Array) || raw.length !== KEY_BYTES) {
    throw new Error(`an X25519 public key is ${KEY_BYTES} bytes, got ${raw instanceof Uint8Array ? raw.length : typeof raw}`);
  }
  return createPublicKey({ key: Buffer.concat([SPKI_PREFIX, raw]), format: 'der', type: 'spki' });
}

export function privateKeyFromRaw(raw: Uint8Array): KeyObject {
  if (!(raw instanceof Uint8Array) || raw.length !== KEY_BYTES) {
    throw new Error(`an X25519 private key is ${KEY_BYTES} bytes, got ${raw instanceof Uint8Array ? raw.length : typeof raw}`);
  }
  return createPrivateKey({ key: Buffer.concat([PKCS8_PREFIX, raw]), format: 'der', type: 'pkcs8' });
}

/** X25519(priv, pub). Throws on a low-order public key (all-zero shared secret). */
export function agree(privateKey: KeyObject, publicRaw: Uint8Array): Buffer {
  return diffieHellman({ privateKey, publicKey: publicKeyFromRaw(publicRaw) });
}

/** HKDF-SHA256 to 32 bytes, with fedtune's label and the given context. */
export function derive(ikm: Uint8Array, label: string, context: Uint8Array): Uint8Array {
  const info = Buffer.concat([Buffer.from(`fedtune/secagg/v1/${label}\0`), context]);
  return new Uint8Array(hkdfSync('sha256', ikm, Buffer.alloc(0), info, KEY_BYTES));
}

/** Big-endian uint32s (round, attempt, site indices) as a context or AAD. */
export function u32s(...xs: number[]): Buffer {
  const b = Buffer.alloc(4 * xs.length);
  xs.forEach((x, i) => b.writeUInt32BE(x, 4 * i));
  return b;
}

export function sealedBytes(plainBytes: number): number {
  return NONCE_BYTES + plainBytes + TAG_BYTES;
}

/** AES-256-GCM: nonce (12) | ciphertext | tag (16). */
export function seal(key: Uint8Array, aad: Uint8Array, plain: Uint8Array): Uint8Array {
  const nonce = randomBytes(NONCE_BYTES);
  const c = createCipheriv('aes-256-gcm', key, nonce, { authTagLength: TAG_BYTES });
  c.setAAD(aad);
  const body = Buffer.concat([c.update(plain), c.final()]);
  return new Uint8Array(Buffer.concat([nonce, body, c.getAuthTag()]));
}

/** Open a sealed message; null when it does not authenticate under key and aad. */
export function open(key: Uint8Array, aad: Uint8Array, sealed: Uint8Array): Uint8Array | null {
  if (sealed.length < NONCE_BYTES + TAG_BYTES) return null;
  const buf = Buffer.from(sealed.buffer, sealed.byteOffset, sealed.length);
  const d = createDecipheriv('aes-256-gcm', key, buf.subarray(0, NONCE_BYTES), { authTagLength: TAG_BYTES });
  d.setAAD(aad);
  d.setAuthTag(buf.subarray(buf.length - TAG_BYTES));
  try {
    return new Uint8Array(Buffer.concat([d.update(buf.subarray(NONCE_BYTES, buf.length - TAG_BYTES)), d.final()]));
  } catch {
    return null;
  }
}
