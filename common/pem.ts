/**
 * TLS files checked before they reach gRPC, whose own error for a file that is
 * not PEM ("PEM routines::no start line") surfaces at bind time and names
 * neither the field nor the file. Parsed with node:crypto (X509Certificate,
 * createPrivateKey), so a refusal says which field, which file, what is wrong
 * and what to do; and the key is checked against the certificate.
 */
import { createPrivateKey, X509Certificate, type KeyObject } from 'node:crypto';

export interface PemFile {
  /** The config field or option that names the file (server.tls.cert). */
  field: string;
  path: string;
  bytes: Buffer;
}

function pemBlocks(text: string): string[] {
  return [...text.matchAll(/-----BEGIN ([A-Z0-9 ]+)-----/g)].map((m) => m[1]!);
}

function looksBinary(bytes: Buffer): boolean {
  return bytes.length > 0 && bytes[0] === 0x30; // DER: an ASN.1 SEQUENCE
}

const CONVERT = (kind: string, path: string): string =>
  kind === 'key' ? `openssl pkey -inform DER -in ${path} -out key.pem` : `openssl x509 -inform DER -in ${path} -out cert.pem`;

/** Every certificate of a PEM file (a chain or a CA bundle); throws naming the field and the file. */
export function parseCertificates(f: PemFile): X509Certificate[] {
  const text = f.bytes.toString('latin1');
  if (f.bytes.length === 0) throw new Error(`${f.field}: ${f.path} is empty; expected a PEM certificate (-----BEGIN CERTIFICATE-----)`);
  const blocks = pemBlocks(text);
  if (!blocks.includes('CERTIFICATE')) {
    const found = blocks.length ? `it holds ${[...new Set(blocks)].join(', ')} blocks` : looksBinary(f.bytes) ? `it looks like DER (binary); convert it: ${CONVERT('cert', f.path)}` : 'no -----BEGIN CERTIFICATE----- block';
    throw new Error(`${f.field}: ${f.path} is not a PEM certificate (${found})${blocks.some((b) => b.includes('PRIVATE KEY')) ? `; is this the key file? ${f.field} takes the certificate (chain)` : ''}`);
  }
  const certs: X509Certificate[] = [];
  for (const m of text.matchAll(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g)) {
    try {
      certs.push(new X509Certificate(m[0]));
    } catch (err) {
      throw new Error(`${f.field}: ${f.path} holds a certificate block that does not parse (${(err as Error).message}); replace the file with a valid PEM certificate`);
    }
  }
  if (certs.length === 0) throw new Error(`${f.field}: ${f.path} has a -----BEGIN CERTIFICATE----- without its -----END CERTIFICATE-----; the file is cut short`);
  return certs;
}

/** The private key of a PEM file; throws naming the field and the file. */
export function parsePrivateKey(f: PemFile): KeyObject {
  const text = f.bytes.toString('latin1');
  if (f.bytes.length === 0) throw new Error(`${f.field}: ${f.path} is empty; expected a PEM private key (-----BEGIN PRIVATE KEY-----)`);
  const blocks = pemBlocks(text);
  if (blocks.includes('ENCRYPTED PRIVATE KEY') || /Proc-Type: 4,ENCRYPTED/.test(text)) {
    throw new Error(`${f.field}: ${f.path} is an encrypted private key; gRPC needs it unencrypted: openssl pkey -in ${f.path} -out key.pem`);
  }
  if (!blocks.some((b) => b.endsWith('PRIVATE KEY'))) {
    const found = blocks.length ? `it holds ${[...new Set(blocks)].join(', ')} blocks` : looksBinary(f.bytes) ? `it looks like DER (binary); convert it: ${CONVERT('key', f.path)}` : 'no -----BEGIN PRIVATE KEY----- block';
    throw new Error(`${f.field}: ${f.path} is not a PEM private key (${found})${blocks.includes('CERTIFICATE') ? `; is this the certificate? ${f.field} takes the private key` : ''}`);
  }
  try {
    return createPrivateKey({ key: f.bytes, format: 'pem' });
  } catch (err) {
    throw new Error(`${f.field}: ${f.path} holds a private key that does not parse (${(err as Error).message}); replace the file with a valid PEM private key`);
  }
}

/**
 * Check a server's TLS files: the certificate chain and key parse, the key
 * belongs to the first certificate, and the client CA (when given) parses.
 */
export function checkServerTls(cert: PemFile, key: PemFile, clientCa: PemFile | null): void {
  const certs = parseCertificates(cert);
  const k = parsePrivateKey(key);
  if (!certs[0]!.checkPrivateKey(k)) {
    throw new Error(`${key.field}: ${key.path} is not the private key of the certificate in ${cert.field} (${cert.path}, subject ${certs[0]!.subject.replace(/\n/g, ', ')}); give the matching pair`);
  }
  if (clientCa) parseCertificates(clientCa);
}
