/**
 * Shamir secret sharing over GF(256), a thin wrapper over the audited
 * `shamir-secret-sharing` package. A share is the secret's length plus one
 * byte (the share's x-coordinate, drawn at random by the package).
 */
import { combine, split } from 'shamir-secret-sharing';

/** Share length for a secret of `secretBytes` bytes. */
export function shareBytes(secretBytes: number): number {
  return secretBytes + 1;
}

/** The most shares of one secret (GF(256) has 255 non-zero x-coordinates). */
export const MAX_SHARES = 255;

/** Split secret into `shares` shares, any `threshold` of which rebuild it. */
export async function splitSecret(secret: Uint8Array, shares: number, threshold: number): Promise<Uint8Array[]> {
  if (!Number.isInteger(shares) || shares < 2 || shares > MAX_SHARES) {
    throw new Error(`secure aggregation: a secret is split into 2..${MAX_SHARES} shares, asked for ${shares}`);
  }
  if (!Number.isInteger(threshold) || threshold < 2 || threshold > shares) {
    throw new Error(`secure aggregation: the Shamir threshold must be in [2, ${shares}], got ${threshold}`);
  }
  return split(new Uint8Array(secret), shares, threshold);
}

/**
 * Rebuild a secret from shares. With fewer shares than the threshold the
 * result is a wrong value (Shamir cannot tell); callers check what they can.
 */
export async function combineShares(shares: readonly Uint8Array[]): Promise<Uint8Array> {
  if (shares.length < 2) throw new Error(`secure aggregation: at least 2 shares are needed to combine, got ${shares.length}`);
  return combine(shares.map((s) => new Uint8Array(s)));
}
