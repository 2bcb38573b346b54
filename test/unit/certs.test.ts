/**
 * The CA (common/certs.ts), per-site tokens (coordinator/identity.ts) and the
 * audit log (coordinator/audit.ts). Certificates are checked with Node's own
 * X509Certificate and an OpenSSL TLS handshake, not with the library that
 * made them.
 */
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tls from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { afterAll, describe, expect, it } from 'vitest';
import { CertsError, initCa, issueCertificate, normalizeSerial, parseCrl, readCaIndex, refreshCrl, revokeSite } from '../../common/certs.ts';
import { parseRunConfig, RunConfigError } from '../../common/config.ts';
import { AuditLog, REFUSALS_PER_MINUTE, RoundAuditor } from '../../coordinator/audit.ts';
import { hashToken, newToken, parseExpiry, readTokenFile, TokenStore, TOKEN_RE, writeTokenFile } from '../../coordinator/identity.ts';

const dirs: string[] = [];
const temp = (tag: string): string => {
  const d = mkdtempSync(join(tmpdir(), `fedtune-${tag}-`));
  dirs.push(d);
  return d;
};
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

const EKU_CLIENT = '1.3.6.1.5.5.7.3.2';
const EKU_SERVER = '1.3.6.1.5.5.7.3.1';

/** One TLS handshake against a server with the CA and CRL; resolves with what the server saw. */
function handshake(ca: string, crl: string, server: { cert: string; key: string }, client: { cert: string; key: string }): Promise<{ authorized: boolean; error: string | null }> {
  return new Promise((resolve, reject) => {
    const srv = tls.createServer({ cert: readFileSync(server.cert), key: readFileSync(server.key), ca: readFileSync(ca), crl: readFileSync(crl), requestCert: true, rejectUnauthorized: false }, (s) => {
      resolve({ authorized: s.authorized, error: s.authorizationError ? String(s.authorizationError) : null });
      s.end();
      srv.close();
    });
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as { port: number }).port;
      const c = tls.connect({ port, host: '127.0.0.1', servername: 'localhost', ca: readFileSync(ca), cert: readFileSync(client.cert), key: readFileSync(client.key) });
      c.on('data', () => {});
      c.on('error', reject);
    });
  });
}

describe('certs: a CA, site and server certificates, revocation', () => {
  it('init writes the CA with private files, and refuses to overwrite it', async () => {
    const dir = join(temp('ca'), 'pki');
    const r = await initCa(dir, { name: 'Test Federation CA' });
    expect(statSync(dir).mode & 0o777).toBe(0o700);
    expect(statSync(r.key).mode & 0o777).toBe(0o600);
    const ca = new X509Certificate(readFileSync(r.cert));
    expect(ca.ca).toBe(true);
    expect(ca.subject).toBe('CN=Test Federation CA');
    expect(ca.verify(ca.publicKey)).toBe(true);
    expect(ca.checkPrivateKey(createPrivateKey(readFileSync(r.key)))).toBe(true);
    expect(createPrivateKey(readFileSync(r.key)).asymmetricKeyDetails?.namedCurve).toBe('prime256v1');
    await expect(initCa(dir)).rejects.toThrow(/already holds a CA/);
  });

  it('a site certificate names the site in CN and SAN URI, is for client auth, and is signed by the CA', async () => {
    const dir = temp('site');
    const r0 = await initCa(dir);
    const s = await issueCertificate(dir, { kind: 'site', name: 'hospital-a' });
    const ca = new X509Certificate(readFileSync(r0.cert));
    const cert = new X509Certificate(readFileSync(s.cert));
    expect(cert.subject).toBe('CN=hospital-a');
    expect(cert.subjectAltName).toBe('URI:fedtune://site/hospital-a');
    expect(cert.keyUsage).toEqual([EKU_CLIENT]);
    expect(cert.ca).toBe(false);
    expect(cert.checkIssued(ca)).toBe(true);
    expect(cert.verify(ca.publicKey)).toBe(true);
    expect(cert.checkPrivateKey(createPrivateKey(readFileSync(s.key)))).toBe(true);
    expect(statSync(s.key).mode & 0o777).toBe(0o600);
    expect(normalizeSerial(cert.serialNumber)).toBe(s.serial);
    expect(cert.fingerprint256.replace(/:/g, '').toLowerCase()).toBe(s.sha256);
    const idx = await readCaIndex(dir);
    expect(idx.issued.map((e) => [e.kind, e.name, e.serial])).toEqual([['site', 'hospital-a', s.serial]]);
    expect(JSON.stringify(idx)).not.toContain('PRIVATE KEY');
    await expect(issueCertificate(dir, { kind: 'site', name: 'hospital-a' })).rejects.toThrow(/was issued already; pass --force/);
    await expect(issueCertificate(dir, { kind: 'site', name: '../evil' })).rejects.toThrow(CertsError);
  });

  it('a server certificate holds its DNS names and IP addresses and is for server auth', async () => {
    const dir = temp('server');
    await initCa(dir);
    const s = await issueCertificate(dir, { kind: 'server', name: 'coordinator', hosts: ['localhost', '127.0.0.1', 'coord.example'] });
    const cert = new X509Certificate(readFileSync(s.cert));
    expect(cert.subjectAltName).toBe('DNS:localhost, IP Address:127.0.0.1, DNS:coord.example');
    expect(cert.keyUsage).toEqual([EKU_SERVER]);
    expect(cert.checkHost('coord.example')).toBe('coord.example');
    expect(cert.checkIP('127.0.0.1')).toBe('127.0.0.1');
  });

  it('revoke lists the serial in a CRL the CA signed; OpenSSL then refuses that certificate and accepts the others', async () => {
    const dir = temp('revoke');
    await initCa(dir);
    const server = await issueCertificate(dir, { kind: 'server', name: 'localhost', hosts: ['localhost', '127.0.0.1'] });
    const a = await issueCertificate(dir, { kind: 'site', name: 'a' });
    const b = await issueCertificate(dir, { kind: 'site', name: 'b' });
    const ca = join(dir, 'ca.pem');
    const crl = join(dir, 'crl.pem');
    expect((await parseCrl(readFileSync(crl, 'utf8'), readFileSync(ca, 'utf8'), 'f', crl)).revoked.size).toBe(0);
    const r = await revokeSite(dir, 'b');
    expect(r.revoked).toEqual([b.serial]);
    const parsed = await parseCrl(readFileSync(crl, 'utf8'), readFileSync(ca, 'utf8'), 'server.tls.crl', crl);
    expect([...parsed.revoked]).toEqual([b.serial]);
    expect(await handshake(ca, crl, server, b)).toEqual({ authorized: false, error: 'CERT_REVOKED' });
    expect(await handshake(ca, crl, server, a)).toEqual({ authorized: true, error: null });
    // Signed again: same revocations, later next update.
    const before = parsed.nextUpdate!.getTime();
    const again = await refreshCrl(dir, 400);
    expect(again.nextUpdate.getTime()).toBeGreaterThan(before);
    expect([...(await parseCrl(readFileSync(crl, 'utf8'), readFileSync(ca, 'utf8'), 'f', crl)).revoked]).toEqual([b.serial]);
    await expect(revokeSite(dir, 'nobody')).rejects.toThrow(/no certificate was issued to site "nobody".*sites: a, b/);
  });

  it('a CRL from another CA is refused, naming the field', async () => {
    const d1 = temp('ca1');
    const d2 = temp('ca2');
    await initCa(d1);
    await initCa(d2, { name: 'Other CA' });
    await expect(parseCrl(readFileSync(join(d2, 'crl.pem'), 'utf8'), readFileSync(join(d1, 'ca.pem'), 'utf8'), 'server.tls.crl', 'x.pem')).rejects.toThrow(
      /server\.tls\.crl: x\.pem is not signed by the client CA \(issuer CN=Other CA\)/,
    );
    await expect(parseCrl('not a crl', readFileSync(join(d1, 'ca.pem'), 'utf8'), 'server.tls.crl', 'x.pem')).rejects.toThrow(/server\.tls\.crl: x\.pem is not a PEM CRL/);
  });
});

describe('per-site join tokens', () => {
  it('tokens are 256-bit random, only their SHA-256 is stored, and each binds one site until it expires', async () => {
    const dir = temp('tokens');
    const file = join(dir, 'tokens.json');
    const now = new Date('2026-01-01T00:00:00Z');
    const a = newToken('site-a', new Date('2026-01-08T00:00:00Z'), now);
    const old = newToken('site-b', new Date('2026-01-02T00:00:00Z'), now);
    expect(a.token).toMatch(TOKEN_RE);
    expect(Buffer.from(TOKEN_RE.exec(a.token)![2]!, 'base64url').length).toBe(32);
    expect(a.record.sha256).toBe(hashToken(a.token));
    await writeTokenFile(file, { version: 1, tokens: [a.record, old.record] });
    expect(statSync(file).mode & 0o777).toBe(0o600);
    const text = readFileSync(file, 'utf8');
    expect(text).not.toContain(a.token);
    expect(text).not.toContain(TOKEN_RE.exec(a.token)![2]!);

    const store = new TokenStore(file);
    const t = Date.parse('2026-01-03T00:00:00Z');
    expect(store.check(a.token, 'site-a', t)).toEqual({ ok: true, id: a.record.id, site: 'site-a' });
    expect(store.check(a.token, null, t)).toMatchObject({ ok: true });
    const wrongSite = store.check(a.token, 'site-b', t);
    expect(wrongSite).toMatchObject({ ok: false, code: grpc.status.PERMISSION_DENIED });
    expect((wrongSite as { message: string }).message).toBe(`join token ${a.record.id} is for site "site-a", not for site "site-b": each site registers with its own token`);
    const expired = store.check(old.token, 'site-b', t);
    expect(expired).toMatchObject({ ok: false, code: grpc.status.UNAUTHENTICATED });
    expect((expired as { message: string }).message).toContain(`join token ${old.record.id} of site "site-b" expired at 2026-01-02T00:00:00.000Z`);
    const forged = a.token.slice(0, -1) + (a.token.endsWith('A') ? 'B' : 'A');
    for (const bad of [forged, 'test-token', '']) {
      const r = store.check(bad, 'site-a', t);
      expect(r).toMatchObject({ ok: false, code: grpc.status.UNAUTHENTICATED });
      expect((r as { message: string }).message).toMatch(/^join token rejected: it is not a valid per-site token/);
      if (bad) expect((r as { message: string }).message).not.toContain(bad);
    }
    for (const r of [wrongSite, expired]) expect((r as { message: string }).message).not.toContain(TOKEN_RE.exec(a.token)![2]!);

    // The file changes: the store re-reads it at the next check.
    const c = newToken('site-c', new Date('2026-02-01T00:00:00Z'), now);
    const f = await readTokenFile(file);
    await writeTokenFile(file, { version: 1, tokens: [...f.tokens.filter((x) => x.site !== 'site-a'), c.record] });
    expect(store.check(c.token, 'site-c', t)).toMatchObject({ ok: true });
    expect(store.check(a.token, 'site-a', t)).toMatchObject({ ok: false, code: grpc.status.UNAUTHENTICATED });
  });

  it('a broken token file is refused at start naming server.join_tokens, and ignored (last good kept) later', async () => {
    const dir = temp('tokens-bad');
    const file = join(dir, 'tokens.json');
    writeFileSync(file, '{"version": 2}');
    expect(() => new TokenStore(file)).toThrow(/server\.join_tokens: .*tokens\.json is not a fedtune token file/);
    expect(() => new TokenStore(join(dir, 'missing.json'))).toThrow(/server\.join_tokens: cannot read .*missing\.json \(ENOENT\)/);
    const a = newToken('site-a', new Date(Date.now() + 3_600_000));
    await writeTokenFile(file, { version: 1, tokens: [a.record] });
    const store = new TokenStore(file);
    writeFileSync(file, 'garbage that is longer than before');
    expect(store.check(a.token, 'site-a')).toMatchObject({ ok: true });
  });

  it('expiry: durations and dates', () => {
    const now = new Date('2026-01-01T00:00:00Z');
    expect(parseExpiry('7d', now).toISOString()).toBe('2026-01-08T00:00:00.000Z');
    expect(parseExpiry('12h', now).toISOString()).toBe('2026-01-01T12:00:00.000Z');
    expect(parseExpiry('30m', now).toISOString()).toBe('2026-01-01T00:30:00.000Z');
    expect(parseExpiry('2027-01-31T00:00:00Z', now).toISOString()).toBe('2027-01-31T00:00:00.000Z');
    expect(() => parseExpiry('soon', now)).toThrow(/--expires soon: give a duration/);
    expect(() => newToken('a', new Date('2025-01-01T00:00:00Z'), now)).toThrow(/not in the future/);
  });
});

describe('config: identities', () => {
  const base = { name: 'r', model: { path: 'm' }, training: { steps: 1 }, rounds: 1 };
  const issues = (server: Record<string, unknown>): string[] => {
    try {
      parseRunConfig({ ...base, server }, 'run.yaml');
    } catch (err) {
      return (err as RunConfigError).issues;
    }
    return [];
  };
  it('one of join_token and join_tokens, and a CRL only with client_ca', () => {
    expect(issues({ join_token: 't', join_tokens: 'tokens.json' })).toEqual([
      'server.join_tokens: contradicts server.join_token (or --token / FEDTUNE_JOIN_TOKEN): give either one shared token or a file of per-site tokens, not both',
    ]);
    expect(issues({})[0]).toMatch(/^server\.join_token: is required: set server\.join_token .* or give per-site tokens in server\.join_tokens/);
    expect(issues({ join_token: 't', tls: { cert: 'c', key: 'k', crl: 'crl.pem' } })).toEqual([
      'server.tls.crl: needs server.tls.client_ca: a revocation list applies to the client certificates of mutual TLS',
    ]);
    expect(issues({ join_tokens: 'tokens.json', tls: { cert: 'c', key: 'k', client_ca: 'ca.pem', crl: 'crl.pem' } })).toEqual([]);
  });
});

describe('audit log', () => {
  it('appends records, one JSON object per line, across reopenings; refusals are bounded per minute', () => {
    const dir = temp('audit');
    const a = AuditLog.open(dir);
    a.write({ type: 'join', site: 's', worker_id: 'w1', address: 'ipv4:127.0.0.1:1', cert_sha256: 'ab', cert_serial: '1', token_id: null });
    a.close();
    const b = AuditLog.open(dir);
    expect(statSync(b.path).mode & 0o777).toBe(0o600);
    const t0 = 1_000_000;
    for (let i = 0; i < REFUSALS_PER_MINUTE + 5; i++) b.write({ type: 'refusal', stage: 'register', reason: 'r', site: 'x'.repeat(500), address: 'a' }, t0);
    b.write({ type: 'refusal', stage: 'register', reason: 'later', site: null, address: 'a' }, t0 + 60_000);
    const rounds = new RoundAuditor(b);
    rounds.onEvent({ type: 'round.started', round: 1 });
    rounds.onEvent({ type: 'update.received', round: 1, site: 'z' });
    rounds.onEvent({ type: 'update.received', round: 1, site: 'a' });
    rounds.onEvent({ type: 'round.completed', round: 1, privacy: { epsilon: 1.5 } });
    b.close();
    const lines = readFileSync(b.path, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines[0]).toMatchObject({ type: 'join', site: 's', worker_id: 'w1' });
    expect(lines.filter((l) => l.type === 'refusal')).toHaveLength(REFUSALS_PER_MINUTE + 1);
    expect((lines[1]!.site as string).length).toBeLessThan(210);
    expect(lines.at(-2)).toMatchObject({ type: 'refusal', reason: 'later', suppressed_before: 5 });
    expect(lines.at(-1)).toMatchObject({ type: 'round', round: 1, sites: ['a', 'z'], privacy: { epsilon: 1.5 } });
  });
});
