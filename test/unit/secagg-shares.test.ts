import { describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { combineShares, splitSecret } from '../../common/secagg/index.ts';
import { generateX25519, privateKeyFromRaw, privateRawOf, publicRawOf } from '../../common/secagg/keys.ts';

describe('secure aggregation secret shares', () => {
  it('rebuilds a secret from threshold shares (any of them) and not from fewer', async () => {
    const secret = new Uint8Array(randomBytes(32));
    const shares = await splitSecret(secret, 9, 5);
    expect(shares.length).toBe(9);
    expect(shares.every((s) => s.length === 33)).toBe(true);
    expect(await combineShares(shares.slice(0, 5))).toEqual(secret);
    expect(await combineShares([shares[8]!, shares[1]!, shares[6]!, shares[3]!, shares[4]!])).toEqual(secret);
    expect(await combineShares(shares)).toEqual(secret);
    // 4 of threshold 5: a wrong value, for every choice of 4.
    for (let skip = 0; skip < 5; skip++) {
      const four = shares.slice(0, 5).filter((_, i) => i !== skip);
      expect(await combineShares(four)).not.toEqual(secret);
    }
    await expect(combineShares(shares.slice(0, 1))).rejects.toThrow(/at least 2 shares/);
  });

  it('shares an X25519 secret key so that the rebuilt key has the advertised public key', async () => {
    const pair = generateX25519();
    const shares = await splitSecret(privateRawOf(pair.privateKey), 4, 3);
    const raw = await combineShares([shares[3]!, shares[0]!, shares[2]!]);
    expect(publicRawOf(privateKeyFromRaw(raw))).toEqual(pair.publicRaw);
    const wrong = await combineShares([shares[0]!, shares[1]!]);
    expect(publicRawOf(privateKeyFromRaw(wrong))).not.toEqual(pair.publicRaw);
  });

  it('refuses impossible splits by name', async () => {
    await expect(splitSecret(new Uint8Array(32), 256, 3)).rejects.toThrow(/2\.\.255 shares, asked for 256/);
    await expect(splitSecret(new Uint8Array(32), 4, 5)).rejects.toThrow(/threshold must be in \[2, 4\], got 5/);
    await expect(splitSecret(new Uint8Array(32), 4, 1)).rejects.toThrow(/threshold must be in \[2, 4\], got 1/);
  });
});
