/**
 * Refused TLS handshakes on the coordinator's gRPC port, logged with the
 * peer's address: a plaintext client against a TLS port, a client without an
 * accepted certificate (mutual TLS), a revoked one (server.tls.crl), a client
 * that hung up on our certificate. At most one line per peer address and kind
 * of refusal per minute, with the count of those held back.
 *
 * grpc-js has no handshake error event. Its Server keeps the Node
 * Http2SecureServer of each bound port in a private map (`http2Servers`,
 * grpc-js 1.10 to 1.14 at least); this listens on their 'tlsClientError'
 * event. When a grpc-js version has no such map, nothing is logged (one debug
 * line says so) and the server works as before.
 */
import type { Socket } from 'node:net';
import type { Server as TlsServer, TLSSocket } from 'node:tls';
import type * as grpc from '@grpc/grpc-js';
import { logger } from '../common/log.ts';
import { PerKeyLimit } from '../common/rate-limit.ts';

const log = logger('coordinator');

export interface HandshakeLogOptions {
  /** server.tls.client_ca is set: clients must present a certificate. */
  mutual: boolean;
  /** Shortest time between two lines about one peer (default 60000 ms). */
  intervalMs?: number;
  /** Called with each refusal that is logged (same rate limit): the audit log's refusal record. */
  onRefused?: (peer: string, reason: string) => void;
}

/** Why a handshake failed, in the words an operator needs, from Node's TLS error. */
export function describeRefusedHandshake(err: Error & { code?: string }, mutual: boolean): string {
  const text = `${err.code ?? ''} ${err.message}`;
  if (/WRONG_VERSION_NUMBER|wrong version number|HTTP_REQUEST|http request|packet length too long|unknown protocol/i.test(text)) {
    return 'the client does not use TLS (a plaintext client on the TLS port: start the worker with --tls-ca FILE)';
  }
  if (/CERT_REVOKED|certificate revoked/i.test(text)) {
    return 'the client certificate is revoked (server.tls.crl): the site needs a new certificate (fedtune certs issue SITE)';
  }
  if (/PEER_DID_NOT_RETURN_A_CERTIFICATE|did not return a certificate/i.test(text)) {
    return 'the client sent no certificate, and server.tls.client_ca requires one (start the worker with --tls-cert and --tls-key)';
  }
  if (/CERTIFICATE_VERIFY_FAILED|certificate verify failed|unknown ca|bad certificate|unsupported certificate|certificate (has )?expired|self[- ]signed/i.test(text)) {
    return mutual
      ? `the client certificate is not accepted (not signed by server.tls.client_ca, or expired): ${firstLine(err.message)}`
      : `certificate problem: ${firstLine(err.message)}`;
  }
  if (/ECONNRESET|socket hang up/i.test(text)) {
    return "the client hung up during the handshake (it may not trust this coordinator's certificate, or the certificate does not name the address it dialled)";
  }
  if (/NO_SHARED_CIPHER|no shared cipher|UNSUPPORTED_PROTOCOL|unsupported protocol|VERSION_TOO_LOW/i.test(text)) {
    return `the client's TLS version or ciphers are not supported: ${firstLine(err.message)}`;
  }
  return firstLine(err.message);
}

function firstLine(s: string): string {
  const line = s.split('\n')[0]!.trim();
  // OpenSSL messages carry a source path at the end: keep the reason.
  const m = /:SSL routines:[^:]*:([^:]+)/.exec(line);
  return m ? m[1]!.trim() : line;
}

/** The raw socket under a server-side TLS socket (Node keeps it as _parent). */
function rawOf(socket: TLSSocket): Socket | undefined {
  return (socket as TLSSocket & { _parent?: Socket | null })._parent ?? undefined;
}

/** Raw socket bytes the peer sent before the handshake failed (0: it connected and said nothing, e.g. a TCP health check). */
function bytesFromPeer(socket: TLSSocket): number {
  return rawOf(socket)?.bytesRead ?? socket.bytesRead;
}

function http2ServersOf(server: grpc.Server): TlsServer[] | null {
  const map = (server as unknown as { http2Servers?: unknown }).http2Servers;
  if (!(map instanceof Map)) return null;
  return [...map.keys()].filter((s): s is TlsServer => typeof s === 'object' && s !== null && typeof (s as TlsServer).setSecureContext === 'function');
}

/**
 * Log refused handshakes of a bound grpc-js server (call after bindAsync).
 * Returns how many TLS listeners are watched (0 when grpc-js keeps them out of reach).
 */
export function logRefusedHandshakes(server: grpc.Server, opts: HandshakeLogOptions): number {
  const servers = http2ServersOf(server);
  if (servers === null || servers.length === 0) {
    log.debug('refused TLS handshakes are not logged: this grpc-js version keeps its TLS listeners out of reach');
    return 0;
  }
  const limit = new PerKeyLimit(opts.intervalMs ?? 60_000);
  // Addresses noted when a connection arrives: a socket that failed its handshake may be gone, its address with it.
  const peers = new WeakMap<Socket, string>();
  const peerOf = (socket: TLSSocket): string => {
    const raw = rawOf(socket);
    return socket.remoteAddress ?? (raw ? peers.get(raw) : undefined) ?? 'unknown peer';
  };
  const onError = (err: Error & { code?: string }, socket: TLSSocket): void => {
    const peer = peerOf(socket);
    // Node checks a client certificate after the handshake and closes without an alert when it is refused.
    const certError = (socket as TLSSocket & { authorizationError?: string | Error }).authorizationError;
    if (certError !== undefined && certError !== null) {
      err = Object.assign(new Error(`certificate verify failed: ${String(certError)}`), { code: 'CERTIFICATE_VERIFY_FAILED' });
    }
    // A peer that connected and sent nothing (port scan, TCP health check) did not try a handshake.
    if (bytesFromPeer(socket) === 0) {
      log.debug({ peer, err: err.message }, 'connection closed before any TLS handshake');
      socket.destroy();
      return;
    }
    // One line per peer and kind of refusal (the description without the certificate's details): a peer that
    // fails in several ways is told apart, and no peer can flood the log by presenting ever new certificates.
    const kind = describeRefusedHandshake(err, opts.mutual);
    const r = limit.take(`${peer} ${kind}`);
    if (r.ok) {
      log.warn({ peer, code: err.code, ...(r.suppressed ? { suppressedSinceLast: r.suppressed } : {}) }, `refused a TLS handshake from ${peer}: ${kind}`);
      opts.onRefused?.(peer, kind);
    }
    socket.destroy();
  };
  for (const s of servers) {
    s.prependListener('connection', (raw: Socket) => {
      if (raw.remoteAddress) peers.set(raw, raw.remoteAddress);
    });
    s.on('tlsClientError', onError);
  }
  return servers.length;
}
