/**
 * A small certificate authority for a federation's sites, on @peculiar/x509
 * and WebCrypto (ECDSA P-256, SHA-256); no openssl binary.
 *
 * Layout of a CA directory (created with mode 0700):
 *
 *   ca.pem              the CA certificate: server.tls.client_ca, and --tls-ca of the workers
 *   ca-key.pem          the CA private key (0600); never leaves this directory
 *   crl.pem             the revocation list signed by the CA: server.tls.crl
 *   index.json          what was issued: kind, name, serial, sha256 fingerprint, validity, revocation
 *   sites/NAME.pem      a site's client certificate (subject CN=NAME, SAN URI fedtune://site/NAME, clientAuth)
 *   sites/NAME-key.pem  its private key (0600)
 *   servers/HOST.pem    a coordinator's server certificate (SAN DNS / IP of each host, serverAuth)
 *   servers/HOST-key.pem
 *
 *   await initCa('pki');                          // ca.pem, ca-key.pem, crl.pem, index.json
 *   await issueCertificate('pki', { kind: 'site', name: 'hospital-a' });
 *   await issueCertificate('pki', { kind: 'server', name: 'coord.example', hosts: ['coord.example', '10.0.0.5'] });
 *   await revokeSite('pki', 'hospital-a');        // rewrites crl.pem; the coordinator reloads it
 */
import { createHash, randomBytes, webcrypto } from 'node:crypto';
import { chmod, mkdir, readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { isIP } from 'node:net';
import { join } from 'node:path';
import * as x509 from '@peculiar/x509';
import { writeFileAtomic } from './atomic.ts';

x509.cryptoProvider.set(webcrypto as unknown as Crypto);

/** ECDSA P-256 with SHA-256: accepted by OpenSSL (grpc-js, Node TLS) and by Python's grpcio. */
export const KEY_ALGORITHM = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;

export const CA_FILES = { cert: 'ca.pem', key: 'ca-key.pem', crl: 'crl.pem', index: 'index.json' } as const;

/** Site and host names usable as file names and certificate subjects. */
export const SITE_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** SAN URI naming a site in its certificate. */
export const SITE_URI_PREFIX = 'fedtune://site/';

const DAY_MS = 86_400_000;

export interface IssuedEntry {
  kind: 'site' | 'server';
  name: string;
  /** Lowercase hex, no leading zeros (normalizeSerial). */
  serial: string;
  /** SHA-256 of the DER certificate, lowercase hex. */
  sha256: string;
  not_before: string;
  not_after: string;
  /** Paths relative to the CA directory. */
  cert: string;
  key: string;
  revoked_at: string | null;
}

export interface CaIndex {
  version: 1;
  subject: string;
  /** Number of the latest CRL (the CRL Number extension). */
  crl_number: number;
  crl_next_update: string;
  issued: IssuedEntry[];
}

export class CertsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'CertsError';
  }
}

/** Serial numbers compared as lowercase hex without leading zeros (Node prints them uppercase, with them). */
export function normalizeSerial(hex: string): string {
  const s = hex.replace(/[^0-9a-fA-F]/g, '').toLowerCase().replace(/^0+/, '');
  return s === '' ? '0' : s;
}

/** SHA-256 fingerprint of a DER certificate, lowercase hex. */
export function fingerprintOf(der: Uint8Array): string {
  return createHash('sha256').update(der).digest('hex');
}

function checkName(name: string, what: string): void {
  if (!SITE_NAME_RE.test(name)) {
    throw new CertsError(`${what} "${name}": must start with a letter or digit and hold only letters, digits, ".", "_" and "-" (at most 64 characters)`);
  }
}

function checkDays(days: number, what: string): void {
  if (!Number.isFinite(days) || days <= 0 || days > 36_500) throw new CertsError(`${what}: must be a number of days between 1 and 36500 (got ${days})`);
}

/** 16 random bytes, positive (RFC 5280: serials are positive, at most 20 octets). */
function randomSerial(): string {
  const b = randomBytes(16);
  b[0] = (b[0]! & 0x7f) | 0x01;
  return b.toString('hex');
}

async function writePrivate(path: string, text: string): Promise<void> {
  // The directory is 0700, so the temporary file is never readable by others; the key itself ends 0600.
  await writeFileAtomic(path, text);
  await chmod(path, 0o600);
}

async function exportKeyPem(key: CryptoKey): Promise<string> {
  const der = await webcrypto.subtle.exportKey('pkcs8', key as webcrypto.CryptoKey);
  return x509.PemConverter.encode(der, 'PRIVATE KEY');
}

async function importKeyPem(pem: string, path: string): Promise<CryptoKey> {
  try {
    const der = x509.PemConverter.decode(pem)[0]!;
    return (await webcrypto.subtle.importKey('pkcs8', der, KEY_ALGORITHM, false, ['sign'])) as unknown as CryptoKey;
  } catch (err) {
    throw new CertsError(`${path}: not an ECDSA P-256 private key in PEM (${(err as Error).message}); was this CA made by fedtune certs init?`);
  }
}

async function generateKeys(): Promise<CryptoKeyPair> {
  return (await webcrypto.subtle.generateKey(KEY_ALGORITHM, true, ['sign', 'verify'])) as unknown as CryptoKeyPair;
}

interface LoadedCa {
  dir: string;
  cert: x509.X509Certificate;
  key: CryptoKey;
  index: CaIndex;
}

async function readText(path: string, what: string): Promise<string> {
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new CertsError(`${what}: cannot read ${path} (${code ?? String(err)})${code === 'ENOENT' ? '; create the CA first: fedtune certs init --dir DIR' : ''}`);
  }
}

export async function readCaIndex(dir: string): Promise<CaIndex> {
  const path = join(dir, CA_FILES.index);
  const text = await readText(path, 'CA index');
  try {
    const idx = JSON.parse(text) as CaIndex;
    if (idx.version !== 1 || !Array.isArray(idx.issued)) throw new Error('unknown version or no issued list');
    return idx;
  } catch (err) {
    throw new CertsError(`CA index ${path} does not parse (${(err as Error).message}); restore it from a backup`);
  }
}

async function loadCa(dir: string): Promise<LoadedCa> {
  const certPath = join(dir, CA_FILES.cert);
  const keyPath = join(dir, CA_FILES.key);
  const cert = new x509.X509Certificate(await readText(certPath, 'CA certificate'));
  const key = await importKeyPem(await readText(keyPath, 'CA key'), keyPath);
  return { dir, cert, key, index: await readCaIndex(dir) };
}

async function writeIndex(dir: string, index: CaIndex): Promise<void> {
  await writeFileAtomic(join(dir, CA_FILES.index), `${JSON.stringify(index, null, 2)}\n`);
}

async function signCrl(ca: LoadedCa, days: number): Promise<{ path: string; nextUpdate: Date }> {
  checkDays(days, '--crl-days');
  const now = new Date();
  const nextUpdate = new Date(now.getTime() + days * DAY_MS);
  ca.index.crl_number += 1;
  const crl = await x509.X509CrlGenerator.create({
    issuer: ca.cert.subject,
    thisUpdate: now,
    nextUpdate,
    signingAlgorithm: KEY_ALGORITHM,
    signingKey: ca.key,
    entries: ca.index.issued
      .filter((e) => e.revoked_at !== null)
      .map((e) => ({ serialNumber: e.serial.length % 2 ? `0${e.serial}` : e.serial, revocationDate: new Date(e.revoked_at!), reason: x509.X509CrlReason.keyCompromise })),
    extensions: [
      new x509.Extension('2.5.29.20', false, crlNumberDer(ca.index.crl_number)), // CRL Number
      await x509.AuthorityKeyIdentifierExtension.create(ca.cert.publicKey),
    ],
  });
  ca.index.crl_next_update = nextUpdate.toISOString();
  const path = join(ca.dir, CA_FILES.crl);
  // OpenSSL (Node's tls `crl` option) reads the X509 CRL label only.
  await writeFileAtomic(path, x509.PemConverter.encode(crl.rawData, 'X509 CRL') + '\n');
  return { path, nextUpdate };
}

/** DER INTEGER of a small positive number (the CRL Number extension's value). */
function crlNumberDer(n: number): ArrayBuffer {
  const bytes: number[] = [];
  let v = n;
  do {
    bytes.unshift(v & 0xff);
    v = Math.floor(v / 256);
  } while (v > 0);
  if (bytes[0]! & 0x80) bytes.unshift(0);
  return new Uint8Array([0x02, bytes.length, ...bytes]).buffer;
}

export interface InitCaOptions {
  /** Subject CN of the CA (default "fedtune CA"). */
  name?: string;
  days?: number;
  crlDays?: number;
}

/** Create a CA in `dir` (refused when one is there already). */
export async function initCa(dir: string, o: InitCaOptions = {}): Promise<{ cert: string; key: string; crl: string }> {
  const days = o.days ?? 3650;
  checkDays(days, '--days');
  const name = o.name ?? 'fedtune CA';
  if (/[,=+<>#;"\\]/.test(name)) throw new CertsError(`--name "${name}": must not hold , = + < > # ; " or \\`);
  if (existsSync(join(dir, CA_FILES.key)) || existsSync(join(dir, CA_FILES.cert))) {
    throw new CertsError(`${dir} already holds a CA (${CA_FILES.cert}, ${CA_FILES.key}); use another --dir, or remove it to start over (certificates it issued stop working)`);
  }
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await chmod(dir, 0o700);
  const keys = await generateKeys();
  const now = new Date();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerial(),
    name: `CN=${name}`,
    notBefore: new Date(now.getTime() - 60_000),
    notAfter: new Date(now.getTime() + days * DAY_MS),
    keys,
    signingAlgorithm: KEY_ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  const keyPath = join(dir, CA_FILES.key);
  const certPath = join(dir, CA_FILES.cert);
  await writePrivate(keyPath, await exportKeyPem(keys.privateKey));
  await writeFileAtomic(certPath, cert.toString('pem') + '\n');
  const ca: LoadedCa = { dir, cert, key: keys.privateKey, index: { version: 1, subject: cert.subject, crl_number: 0, crl_next_update: '', issued: [] } };
  const crl = await signCrl(ca, o.crlDays ?? 365);
  await writeIndex(dir, ca.index);
  return { cert: certPath, key: keyPath, crl: crl.path };
}

export interface IssueOptions {
  kind: 'site' | 'server';
  /** Site name (subject CN), or the server certificate's file name and CN. */
  name: string;
  /** Server certificates: DNS names and IP addresses the coordinator is reached by (default: name). */
  hosts?: string[];
  days?: number;
  /** Replace the files of an earlier certificate of this name (the earlier one stays valid until revoked). */
  force?: boolean;
}

export interface Issued {
  cert: string;
  key: string;
  serial: string;
  sha256: string;
  notAfter: Date;
}

/** Issue a key and certificate for a site (client) or a coordinator (server). */
export async function issueCertificate(dir: string, o: IssueOptions): Promise<Issued> {
  checkName(o.name, o.kind === 'site' ? 'site' : 'server name');
  const days = o.days ?? 825;
  checkDays(days, '--days');
  const ca = await loadCa(dir);
  const sub = o.kind === 'site' ? 'sites' : 'servers';
  const certRel = join(sub, `${o.name}.pem`);
  const keyRel = join(sub, `${o.name}-key.pem`);
  if (!o.force && (existsSync(join(dir, certRel)) || existsSync(join(dir, keyRel)))) {
    throw new CertsError(
      `${join(dir, certRel)} exists: a certificate for ${o.kind} "${o.name}" was issued already; pass --force to issue a new one` +
        (o.kind === 'site' ? ` (revoke the old one with: fedtune certs revoke ${o.name} --dir ${dir}, which revokes every certificate of the site)` : ''),
    );
  }
  const hosts = o.kind === 'server' ? (o.hosts && o.hosts.length > 0 ? o.hosts : [o.name]) : [];
  for (const h of hosts) if (!isIP(h) && !/^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$/.test(h)) throw new CertsError(`--host "${h}": not a DNS name or an IP address`);
  const keys = await generateKeys();
  const now = new Date();
  const notAfter = new Date(Math.min(now.getTime() + days * DAY_MS, ca.cert.notAfter.getTime()));
  const names: x509.JsonGeneralName[] =
    o.kind === 'site'
      ? [{ type: 'url', value: `${SITE_URI_PREFIX}${o.name}` }]
      : hosts.map((h) => (isIP(h) ? { type: 'ip', value: h } : { type: 'dns', value: h }));
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: randomSerial(),
    subject: `CN=${o.name}`,
    issuer: ca.cert.subject,
    notBefore: new Date(now.getTime() - 60_000),
    notAfter,
    publicKey: keys.publicKey,
    signingKey: ca.key,
    signingAlgorithm: KEY_ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([o.kind === 'site' ? x509.ExtendedKeyUsage.clientAuth : x509.ExtendedKeyUsage.serverAuth], false),
      new x509.SubjectAlternativeNameExtension(names, false),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      await x509.AuthorityKeyIdentifierExtension.create(ca.cert.publicKey),
    ],
  });
  await mkdir(join(dir, sub), { recursive: true, mode: 0o700 });
  await writePrivate(join(dir, keyRel), await exportKeyPem(keys.privateKey));
  await writeFileAtomic(join(dir, certRel), cert.toString('pem') + '\n');
  const entry: IssuedEntry = {
    kind: o.kind,
    name: o.name,
    serial: normalizeSerial(cert.serialNumber),
    sha256: fingerprintOf(new Uint8Array(cert.rawData)),
    not_before: cert.notBefore.toISOString(),
    not_after: cert.notAfter.toISOString(),
    cert: certRel,
    key: keyRel,
    revoked_at: null,
  };
  ca.index.issued.push(entry);
  await writeIndex(dir, ca.index);
  return { cert: join(dir, certRel), key: join(dir, keyRel), serial: entry.serial, sha256: entry.sha256, notAfter: cert.notAfter };
}

/**
 * Revoke every unrevoked certificate of a site (or only the one with `serial`)
 * and sign a new crl.pem. Returns the serials revoked now.
 */
export async function revokeSite(dir: string, site: string, o: { serial?: string; crlDays?: number; kind?: 'site' | 'server' } = {}): Promise<{ revoked: string[]; crl: string; nextUpdate: Date }> {
  const ca = await loadCa(dir);
  const kind = o.kind ?? 'site';
  const want = o.serial === undefined ? null : normalizeSerial(o.serial);
  const of = ca.index.issued.filter((e) => e.kind === kind && e.name === site);
  if (of.length === 0) {
    const known = [...new Set(ca.index.issued.filter((e) => e.kind === kind).map((e) => e.name))];
    throw new CertsError(`no certificate was issued to ${kind} "${site}" by the CA in ${dir} (${kind}s: ${known.join(', ') || 'none'})`);
  }
  const now = new Date().toISOString();
  const revoked: string[] = [];
  for (const e of of) {
    if (e.revoked_at !== null || (want !== null && e.serial !== want)) continue;
    e.revoked_at = now;
    revoked.push(e.serial);
  }
  if (want !== null && revoked.length === 0 && !of.some((e) => e.serial === want)) {
    throw new CertsError(`serial ${want} is not a certificate of ${kind} "${site}" (its serials: ${of.map((e) => e.serial).join(', ')})`);
  }
  const crl = await signCrl(ca, o.crlDays ?? 365);
  await writeIndex(dir, ca.index);
  return { revoked, crl: crl.path, nextUpdate: crl.nextUpdate };
}

/** Sign crl.pem again (same revocations, a new validity): a CRL past its next update refuses every site. */
export async function refreshCrl(dir: string, crlDays = 365): Promise<{ crl: string; nextUpdate: Date }> {
  const ca = await loadCa(dir);
  const crl = await signCrl(ca, crlDays);
  await writeIndex(dir, ca.index);
  return { crl: crl.path, nextUpdate: crl.nextUpdate };
}

export interface ParsedCrl {
  issuer: string;
  thisUpdate: Date;
  nextUpdate: Date | null;
  /** Normalized serials (normalizeSerial). */
  revoked: Set<string>;
}

/**
 * Parse a PEM CRL and check it against the CA certificate(s) that must have
 * signed it. Throws naming `field` and the file.
 */
export async function parseCrl(pem: string, caPems: string, field: string, path: string): Promise<ParsedCrl> {
  let crl: x509.X509Crl;
  try {
    crl = new x509.X509Crl(pem);
  } catch (err) {
    throw new CertsError(`${field}: ${path} is not a PEM CRL (-----BEGIN X509 CRL-----): ${(err as Error).message}`);
  }
  const cas = [...caPems.matchAll(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g)].map((m) => new x509.X509Certificate(m[0]));
  let signed = false;
  for (const ca of cas) {
    if (ca.subject !== crl.issuer) continue;
    if (await crl.verify({ publicKey: ca.publicKey }).catch(() => false)) signed = true;
  }
  if (!signed) {
    throw new CertsError(`${field}: ${path} is not signed by the client CA (issuer ${crl.issuer}); give the crl.pem of the CA in server.tls.client_ca`);
  }
  return { issuer: crl.issuer, thisUpdate: crl.thisUpdate, nextUpdate: crl.nextUpdate ?? null, revoked: new Set(crl.entries.map((e) => normalizeSerial(e.serialNumber))) };
}
