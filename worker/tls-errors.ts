/**
 * TLS and certificate failures between a worker and its coordinator, told
 * apart from a coordinator that is down, and said in the worker's own options.
 *
 * grpc-js reports all of them as `14 UNAVAILABLE: No connection established.
 * Last error: ...`, the same code as an unreachable address. The text after
 * "Last error:" names the handshake error for most of them (an untrusted or
 * misnamed certificate, TLS against a plaintext port, a missing client
 * certificate); for the rest it says only "Failed to connect" (a plaintext
 * client against a TLS port, a client certificate the coordinator refuses).
 * Then a probe asks the coordinator's address directly: one TLS handshake
 * with node:tls and the worker's own CA, certificate and server name,
 * followed by the HTTP/2 preface, so that a refusal after the handshake
 * (TLS 1.3 checks client certificates last) is seen too.
 *
 *   const f = await diagnoseTlsFailure('10.0.0.5:7070', { caFile: 'ca.pem' }, err);
 *   if (f) throw new FatalWorkerError(f.message);   // retrying would not help
 */
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { checkServerIdentity, connect as tlsConnect, type PeerCertificate, type TLSSocket } from 'node:tls';
import type { TlsClientOptions } from './agent.ts';

export type TlsFailureKind =
  | 'untrusted-certificate'
  | 'server-name'
  | 'tls-required'
  | 'not-tls'
  | 'client-certificate-required'
  | 'client-certificate-refused';

export interface TlsFailure {
  kind: TlsFailureKind;
  /** One line for the operator: what is wrong and which option fixes it. */
  message: string;
}

const UNTRUSTED =
  /unable to verify the first certificate|self[- ]signed certificate|unable to get (local )?issuer certificate|certificate has expired|certificate is not yet valid|certificate signature failure|CERT_UNTRUSTED|UNABLE_TO_VERIFY_LEAF_SIGNATURE|DEPTH_ZERO_SELF_SIGNED_CERT|SELF_SIGNED_CERT_IN_CHAIN|CERT_HAS_EXPIRED|CERT_NOT_YET_VALID|UNABLE_TO_GET_ISSUER_CERT/i;
const NAME_MISMATCH = /ERR_TLS_CERT_ALTNAME_INVALID|does not match certificate's altnames|Hostname\/IP does not match/i;
const NOT_TLS = /wrong version number|packet length too long|unknown protocol|record layer failure|http request/i;
const CERT_REQUIRED = /alert certificate required|alert number 116\b/i;
const CERT_REFUSED = /alert (unknown ca|bad certificate|certificate unknown|certificate expired|certificate revoked|unsupported certificate|decrypt error|access denied)|alert number (42|43|44|45|46|48|49|51)\b/i;
const HANDSHAKE_FAILURE = /alert handshake failure|alert number 40\b/i;
/** Errors that say nothing about TLS: the address does not answer. No probe for these. */
const NETWORK = /ECONNREFUSED|ENOTFOUND|EHOSTUNREACH|ENETUNREACH|EAI_AGAIN|ETIMEDOUT|EADDRNOTAVAIL|Name resolution failed|DNS resolution failed/i;

function where(address: string): string {
  return `cannot connect to the coordinator at ${address}: `;
}

/** The reason part of a Node / OpenSSL error text (drops source paths and grpc-js wrapping). */
function reasonOf(text: string): string {
  const last = /Last error: ([\s\S]*?)(?:\s*\(\d{4}-\d\d-\d\dT[^)]*\))?\.?\s*Resolution note:/.exec(text)?.[1] ?? text;
  const ssl = /SSL routines:[^:]*:([^:\n]+)/.exec(last);
  return (ssl ? ssl[1]! : last.replace(/^Error(?: \[[A-Z_]+\])?: /, '')).trim().replace(/\.$/, '');
}

function failure(kind: TlsFailureKind, address: string, tls: TlsClientOptions | null, reason: string, cert?: PeerCertificate): TlsFailure {
  const about = cert ? describeCert(cert) : '';
  switch (kind) {
    case 'untrusted-certificate':
      return {
        kind,
        message:
          where(address) +
          (tls?.caFile
            ? `the coordinator's certificate${about} is not signed by the CA you gave (--tls-ca ${tls.caFile}): ${reason}; give the CA certificate that signed the coordinator's server.tls.cert`
            : `the coordinator's certificate${about} is not signed by a CA this machine trusts (${reason}); give the CA that signed it with --tls-ca FILE`),
      };
    case 'server-name':
      return {
        kind,
        message:
          where(address) +
          `the coordinator's certificate${about} does not name the address dialled (${reason}); connect by a name the certificate holds, or give it with --tls-server-name NAME`,
      };
    case 'tls-required':
      return { kind, message: `${where(address)}the coordinator requires TLS (start the worker with --tls / --tls-ca FILE)` };
    case 'not-tls':
      return { kind, message: `${where(address)}the coordinator does not speak TLS (drop --tls / --tls-ca / --tls-cert, or turn on server.tls on the coordinator)` };
    case 'client-certificate-required':
      return {
        kind,
        message: `${where(address)}the coordinator requires a client certificate (mutual TLS, server.tls.client_ca): start the worker with --tls-cert FILE --tls-key FILE (${reason})`,
      };
    case 'client-certificate-refused':
      return {
        kind,
        message:
          where(address) +
          `the coordinator refused the client certificate${tls?.certFile ? ` --tls-cert ${tls.certFile}` : ''} (mutual TLS): it is not signed by a CA the coordinator trusts (server.tls.client_ca) or it is not valid now (${reason})`,
      };
  }
}

function describeCert(c: PeerCertificate): string {
  const name = (x: PeerCertificate['subject'] | undefined): string | undefined => (x && typeof x.CN === 'string' ? `CN=${x.CN}` : undefined);
  const subject = name(c.subject);
  const issuer = name(c.issuer);
  if (!subject && !issuer) return '';
  return ` (${subject ?? 'no CN'}${issuer ? `, issued by ${issuer}` : ''})`;
}

/**
 * A TLS failure named by the text of a connection error (grpc-js UNAVAILABLE
 * details), or null when the text does not tell (then probeTls can).
 */
export function classifyTlsError(text: string, address: string, tls: TlsClientOptions | null): TlsFailure | null {
  const reason = reasonOf(text);
  if (tls === null) return null; // a plaintext client gets no TLS error text; only a probe can tell
  if (NAME_MISMATCH.test(text)) return failure('server-name', address, tls, reason);
  if (UNTRUSTED.test(text)) return failure('untrusted-certificate', address, tls, reason);
  if (NOT_TLS.test(text)) return failure('not-tls', address, tls, reason);
  if (CERT_REQUIRED.test(text)) return failure('client-certificate-required', address, tls, reason);
  if (CERT_REFUSED.test(text)) return failure(tls.certFile ? 'client-certificate-refused' : 'client-certificate-required', address, tls, reason);
  if (HANDSHAKE_FAILURE.test(text) && !tls.certFile) return failure('client-certificate-required', address, tls, reason);
  return null;
}

/** HOST and PORT of HOST:PORT or [V6]:PORT; null for anything else (a grpc target such as dns:///h:1). */
export function splitAddress(address: string): { host: string; port: number } | null {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(address) ?? /^([^:[\]/]+):(\d+)$/.exec(address);
  if (!m) return null;
  const port = Number(m[2]);
  return port > 0 && port < 65536 ? { host: m[1]!, port } : null;
}

/** Client connection preface and an empty SETTINGS frame: a gRPC (HTTP/2) server answers it with its SETTINGS. */
const H2_PREFACE = Buffer.concat([Buffer.from('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n', 'latin1'), Buffer.from([0, 0, 0, 4, 0, 0, 0, 0, 0])]);

type ProbeResult =
  | { kind: 'no-answer' } // TCP connect failed or timed out: the network, not TLS
  | { kind: 'handshake-error'; text: string }
  | { kind: 'secure'; socket: TLSSocket };

function handshake(host: string, port: number, tls: TlsClientOptions | null, timeoutMs: number): Promise<ProbeResult> {
  return new Promise((resolve) => {
    let tcpUp = false;
    let done = false;
    const servername = tls?.serverName ?? (isIP(host) ? undefined : host);
    const socket = tlsConnect({
      host,
      port,
      ...(servername ? { servername } : {}),
      ALPNProtocols: ['h2'],
      rejectUnauthorized: false, // checked below, so that the probe can say which check failed
      ...(tls?.caFile ? { ca: readFileSync(tls.caFile) } : {}),
      ...(tls?.certFile && tls.keyFile ? { cert: readFileSync(tls.certFile), key: readFileSync(tls.keyFile) } : {}),
    });
    const finish = (r: ProbeResult): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (r.kind !== 'secure') socket.destroy();
      resolve(r);
    };
    const timer = setTimeout(() => finish(tcpUp ? { kind: 'handshake-error', text: 'TLS handshake timed out' } : { kind: 'no-answer' }), timeoutMs);
    socket.once('connect', () => (tcpUp = true));
    socket.once('secureConnect', () => finish({ kind: 'secure', socket }));
    socket.once('error', (err: NodeJS.ErrnoException) => finish(tcpUp ? { kind: 'handshake-error', text: `${err.code ?? ''} ${err.message}` } : { kind: 'no-answer' }));
    socket.once('close', () => finish(tcpUp ? { kind: 'handshake-error', text: 'the connection was closed during the TLS handshake' } : { kind: 'no-answer' }));
  });
}

const CLOSED_AFTER_HANDSHAKE = 'the coordinator closed the connection right after the TLS handshake';

/** After a handshake: send the HTTP/2 preface; resolves with the error text if the server refuses us now, null if it answers. */
function afterHandshake(socket: TLSSocket, timeoutMs: number): Promise<string | null> {
  return new Promise((resolve) => {
    let done = false;
    const finish = (r: string | null): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(r);
    };
    const timer = setTimeout(() => finish(null), timeoutMs);
    socket.once('data', () => finish(null));
    socket.once('error', (err: NodeJS.ErrnoException) => finish(`${err.code ?? ''} ${err.message}`));
    socket.once('close', () => finish(CLOSED_AFTER_HANDSHAKE));
    socket.write(H2_PREFACE);
  });
}

/**
 * Connect to the coordinator's address with node:tls the way the worker's
 * gRPC channel does, and name what fails; null when TLS is not the problem
 * (the address does not answer, or the handshake works).
 */
export async function probeTls(address: string, tls: TlsClientOptions | null, timeoutMs = 3000): Promise<TlsFailure | null> {
  const hp = splitAddress(address);
  if (!hp) return null;
  const r = await handshake(hp.host, hp.port, tls, timeoutMs);
  if (r.kind === 'no-answer') return null;
  if (tls === null) {
    // A plaintext worker: if a TLS handshake works, the port speaks TLS and the worker must too.
    if (r.kind === 'secure') {
      r.socket.end(); // a clean close: the coordinator then logs only the worker's own refused attempt
      return failure('tls-required', address, tls, 'TLS handshake accepted');
    }
    return null;
  }
  if (r.kind === 'handshake-error') {
    return classifyTlsError(r.text, address, tls) ?? (NOT_TLS.test(r.text) ? failure('not-tls', address, tls, reasonOf(r.text)) : null);
  }
  const socket = r.socket;
  const cert = socket.getPeerCertificate();
  if (!socket.authorized) {
    socket.destroy();
    return failure('untrusted-certificate', address, tls, String(socket.authorizationError ?? 'not trusted'), cert);
  }
  const name = tls.serverName ?? hp.host;
  const identity = checkServerIdentity(name, cert);
  if (identity) {
    socket.destroy();
    return failure('server-name', address, tls, identity.message, cert);
  }
  const refused = await afterHandshake(socket, Math.min(timeoutMs, 1500));
  if (refused === null) return null;
  const named = classifyTlsError(refused, address, tls);
  if (named) return named;
  // Node servers check a client certificate after the handshake and close without an alert when they refuse it.
  if (tls.certFile && refused === CLOSED_AFTER_HANDSHAKE) return failure('client-certificate-refused', address, tls, refused);
  return null;
}

/**
 * What a failed first connection means when it is a TLS problem: from the
 * error text, else from a probe. Null when the coordinator is just not
 * reachable (retrying may help) or the error is not a connection failure.
 */
export async function diagnoseTlsFailure(address: string, tls: TlsClientOptions | null, err: unknown): Promise<TlsFailure | null> {
  const text = err instanceof Error ? `${(err as { details?: string }).details ?? ''} ${err.message}` : String(err);
  if (NETWORK.test(text)) return null;
  const named = classifyTlsError(text, address, tls);
  if (named) return named;
  try {
    return await probeTls(address, tls);
  } catch {
    return null; // unreadable files and the like: the gRPC channel reports those itself
  }
}
