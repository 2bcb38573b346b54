/**
 * The bulk tensor channel: Download and Upload bytes over one plain TCP (or TLS)
 * connection per transfer, without gRPC's framing. Control (registration, the
 * session stream, tasks) stays on gRPC; only the bytes of adapters, updates and
 * data shards move here, authenticated by the worker's session (worker id and
 * session key from Register, and under mutual TLS the same client certificate
 * the worker registered with).
 *
 * Why a second channel: over loopback, grpc-js moves a 64 MiB adapter at about
 * a fifth of raw TCP speed (every 1 MiB chunk is copied into a protobuf message,
 * framed, and copied again on the other side, and the garbage collector pays for
 * it); here a download is the packed bytes of the version written to the socket
 * as they are, and an upload is read once into its reassembly buffer and hashed
 * as it arrives (docs/protocol.md, "Bulk tensor channel").
 *
 * The checks are the gRPC streams' (service.ts, Transfers): the upload slot is
 * taken only after a valid header for an open task of this worker, one upload
 * per task, a connection that goes quiet for server.upload_idle_timeout_sec is
 * closed, and nothing of an upload counts before its digest checks.
 */
import * as grpc from '@grpc/grpc-js';
import { createServer, Socket, type Server } from 'node:net';
import { createServer as createTlsServer, type SecureContextOptions, type TLSSocket } from 'node:tls';
import { BULK_DIGEST_BYTES, BULK_MAGIC, BULK_MAX_REQUEST_BYTES, lengthPrefixed } from '../common/wire.ts';
import { logger } from '../common/log.ts';
import { refusalOf } from '../common/wire-decode.ts';
import { BulkRequest, BulkResponse } from '../proto/gen/fedtune/v1/coordinator.ts';
import { peerIdentityOf } from './identity.ts';
import { grpcError, statusOf, type Transfers, type UploadReceiver } from './service.ts';
import type { WorkerRecord } from './workers.ts';

const log = logger('coordinator.bulk');

/** The longest a connection may take to send its whole request (preamble and BulkRequest frame). */
export const BULK_REQUEST_TIMEOUT_MS = 10_000;

export interface BulkServer {
  readonly port: number;
  /** Swap the TLS context (a reloaded CRL); new handshakes use it. */
  setSecureContext(options: SecureContextOptions): void;
  close(): Promise<void>;
  /** Open connections (tests). */
  readonly connections: number;
  /** Upload bytes the sockets wrote straight into reassembly buffers (plain TCP; tests and benchmarks). */
  readonly bytesReadInPlace: number;
}

/** The scratch buffer of a plain TCP connection: its request, an upload's digest, a body's first bytes. */
const SCRATCH_BYTES = 64 * 1024;

interface StreamHandle {
  useUserBuffer(buf: Uint8Array): void;
}

/**
 * The accepted connection, re-wrapped as a socket that reads through `onread` (node's net offers
 * onread on sockets it creates, not on the ones a server accepts): its handle moves to the new
 * socket, still paused (the server accepts with pauseOnConnect), and the accepted socket is let go of.
 * The callback must read what arrived from the buffer it last handed out (from `buffer()` or
 * `readInto`), not from its `buf` argument, which is the last one `buffer()` returned.
 */
function readingInto(
  accepted: Socket,
  onread: { buffer: () => Uint8Array; callback: (n: number, buf: Uint8Array) => boolean },
): { sock: Socket; readInto(buf: Uint8Array): void } | null {
  const a = accepted as unknown as { _handle: StreamHandle | null };
  const handle = a._handle;
  // A runtime without it reads through 'data' events, copying once, as under TLS.
  if (!handle || typeof handle.useUserBuffer !== 'function') return null;
  a._handle = null;
  accepted.destroy();
  const sock = new Socket({ handle, onread, allowHalfOpen: accepted.allowHalfOpen, readable: true, writable: true, pauseOnCreate: true } as ConstructorParameters<typeof Socket>[0]);
  // Between reads, where the next one goes (onread's buffer() picks it only after a read).
  return { sock, readInto: (buf) => handle.useUserBuffer(buf) };
}

export interface BulkServerOptions {
  transfers: Transfers;
  host: string;
  port: number;
  /** The gRPC server's TLS options (cert, key, ca, crl); null: plain TCP. */
  tls: SecureContextOptions | null;
  /** Client certificates required (server.tls.client_ca). */
  mutual: boolean;
  /**
   * false: plain-TCP uploads are read through 'data' events and copied into place once, as under TLS
   * and on a runtime that cannot read sockets into place (tests of that path). Default true.
   */
  readInPlace?: boolean;
}

function frame(msg: BulkResponse): Buffer {
  return lengthPrefixed(BulkResponse.encode(msg).finish());
}

export async function startBulkServer(o: BulkServerOptions): Promise<BulkServer> {
  const { transfers } = o;
  const idleMs = transfers.cfg.server.upload_idle_timeout_sec * 1000;
  const open = new Set<Socket>();

  let inPlaceBytes = 0;
  let warnedCopying = false;

  const handle = (accepted: Socket): void => {
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    let state: 'preamble' | 'request' | 'wait' | 'body' | 'digest' | 'done' = 'preamble';
    let requestBytes = 0;
    let rx: UploadReceiver | null = null;
    let bodyBytes = 0;
    let received = 0;
    let w: WorkerRecord | null = null;

    // Plain TCP: the socket reads an upload's body straight into its reassembly buffer (net's onread),
    // everything else (request, digest) into a small scratch buffer. TLS connections read through
    // 'data' events, and the body is copied into place once.
    const scratch = Buffer.allocUnsafe(SCRATCH_BYTES);
    let current: Uint8Array = scratch;
    const onread = {
      buffer: (): Uint8Array => {
        const region = state === 'body' && rx ? rx.region() : null;
        current = region && region.byteLength > 0 ? region : scratch;
        return current;
      },
      callback: (n: number): boolean => {
        try {
          if (current === scratch) onData(Buffer.from(scratch.subarray(0, n)));
          else if (state === 'body' && rx) {
            rx.advance(n);
            inPlaceBytes += n;
            bodyArrived(n);
          }
        } catch (err) {
          refuse(err);
        }
        return true;
      },
    };
    const wantInPlace = !o.tls && o.readInPlace !== false;
    const inPlace = wantInPlace ? readingInto(accepted, onread) : null;
    if (wantInPlace && !inPlace && !warnedCopying) {
      warnedCopying = true;
      log.warn({}, 'bulk channel: this Node.js cannot read sockets into place; uploads are copied once');
    }
    const sock = inPlace?.sock ?? accepted;
    // Where the socket reads into an upload's buffer, a dropped upload's buffer is reused only once the socket is closed.
    const closed = new Promise<void>((resolve) => sock.once('close', () => resolve()));
    open.add(sock);
    sock.setNoDelay(true);
    const address = `${sock.remoteAddress ?? '?'}:${sock.remotePort ?? 0}`;
    const peerCall = { getPeer: () => address };

    // A refusal: answer, stop reading what the client still sends, close after a grace period
    // (closing with unread bytes would reset the connection before the client reads the answer).
    const refuse = (err: unknown): void => {
      if (state === 'done') return;
      state = 'done';
      // A refused upload is published as such (fail); one refused before its header only let go of (drop).
      if (rx && !rx.header) rx.drop();
      const status = rx?.header ? rx.fail(err) : statusOf(err);
      sock.end(frame({ code: status.code, message: status.details, body: undefined }));
      sock.resume();
      setTimeout(() => sock.destroy(), 5000).unref();
    };
    const take = (n: number): Buffer => {
      const all = pending.length === 1 ? pending[0]! : Buffer.concat(pending, pendingBytes);
      const head = all.subarray(0, n);
      const rest = all.subarray(n);
      pending = rest.byteLength > 0 ? [rest] : [];
      pendingBytes = rest.byteLength;
      return head;
    };

    // Before it is authenticated a connection gets one short deadline for its whole request, however it
    // trickles: unauthenticated peers cannot hold connections open.
    const requestMs = Math.min(idleMs, BULK_REQUEST_TIMEOUT_MS);
    const requestTimer = setTimeout(() => {
      if (state !== 'preamble' && state !== 'request') return;
      refuse(grpcError(grpc.status.DEADLINE_EXCEEDED, `no complete bulk request within ${requestMs / 1000} s of connecting; connect when the request is ready to send`));
    }, requestMs);
    requestTimer.unref();
    sock.on('close', () => {
      open.delete(sock);
      clearTimeout(requestTimer);
    });

    sock.setTimeout(idleMs, () => {
      if (state === 'done') return sock.destroy();
      log.warn({ worker: w?.workerId, task: rx?.header?.taskId, received }, 'bulk transfer idle; closed');
      if (rx) rx.drop();
      rx = null;
      refuse(grpcError(grpc.status.DEADLINE_EXCEEDED, `bulk transfer sent nothing for ${transfers.cfg.server.upload_idle_timeout_sec} s (server.upload_idle_timeout_sec); nothing of it was used`));
    });
    sock.on('error', () => {
      if (rx && state !== 'done') {
        log.warn({ worker: w?.workerId, task: rx.header?.taskId, received }, 'bulk upload broke off; partial update discarded');
        rx.drop();
      }
      state = 'done';
    });
    sock.on('end', () => {
      if (state === 'body' || state === 'digest' || state === 'wait') {
        log.warn({ worker: w?.workerId, task: rx?.header?.taskId, received }, 'bulk upload ended before its digest; partial update discarded');
        rx?.drop();
        rx = null;
        refuse(grpcError(grpc.status.DATA_LOSS, `upload ended after ${received} of ${bodyBytes} bytes without its digest; nothing was used`));
      } else if (state !== 'done') {
        sock.end();
      }
    });

    const serveDownload = (wr: WorkerRecord, req: BulkRequest & { op: { $case: 'download' } }): void => {
      const { header, bytes, sha256, release } = transfers.download(wr, req.op.value);
      // The socket reads `bytes` until it is done with them: closed, however it closes.
      if (sock.destroyed) release();
      else sock.once('close', release);
      state = 'done';
      sock.write(frame({ code: 0, message: '', body: { $case: 'header', value: header } }));
      sock.write(bytes);
      sock.end(sha256, () => transfers.downloaded(wr, bytes.byteLength));
    };

    const onRequest = async (bytes: Buffer): Promise<void> => {
      let req: BulkRequest;
      try {
        req = BulkRequest.decode(bytes);
      } catch (err) {
        throw grpcError(grpc.status.INVALID_ARGUMENT, refusalOf('fedtune.v1.BulkRequest', bytes, err).message);
      }
      w = transfers.authenticate(req.workerId, req.sessionKey, peerCall);
      const bad = transfers.admission.checkChannel(w, (sock as TLSSocket).encrypted ? peerIdentityOf({ getAuthContext: () => ({ sslPeerCertificate: (sock as TLSSocket).getPeerCertificate() }) }) : null, address);
      if (bad) throw grpcError(bad.code, bad.message);
      const op = req.op;
      if (!op) throw grpcError(grpc.status.INVALID_ARGUMENT, 'bulk request names no operation (allowed: download, upload)');
      if (op.$case === 'download') return serveDownload(w, req as BulkRequest & { op: { $case: 'download' } });
      rx = transfers.upload(
        w,
        (err) => {
          rx = null;
          refuse(err);
        },
        inPlace ? { bufferHeldUntil: closed } : {},
      );
      sock.pause();
      // Waiting for a slot is the coordinator's doing, not the sender's: no idle clock meanwhile.
      sock.setTimeout(0);
      // The whole upload arrives in socket-sized reads: no per-read limit beyond the announced total.
      await rx.begin(op.value, Number.MAX_SAFE_INTEGER);
      if ((state as string) === 'done') return;
      sock.setTimeout(idleMs);
      bodyBytes = op.value.stream?.totalBytes ?? 0;
      state = 'body';
      if (pendingBytes > 0) {
        const rest = take(pendingBytes);
        onData(rest);
      }
      // The socket's next read goes straight into the body's place (after what came with the request), not into scratch.
      if (inPlace && state === 'body') inPlace.readInto(onread.buffer());
      sock.resume();
    };

    /** `n` more body bytes are in the reassembly buffer (copied or read in place); after the last, the digest. */
    const bodyArrived = (n: number): void => {
      received += n;
      if (received === bodyBytes) state = 'digest';
    };

    const onData = (chunk: Buffer): void => {
      if (state === 'done') return;
      if (state === 'body' && rx) {
        const n = Math.min(chunk.byteLength, bodyBytes - received);
        if (n > 0) rx.push(received, chunk.subarray(0, n));
        bodyArrived(n);
        if ((state as string) === 'body') return;
        chunk = chunk.subarray(n);
        if (chunk.byteLength === 0) return;
      }
      pending.push(chunk);
      pendingBytes += chunk.byteLength;
      if (state === 'preamble' && pendingBytes >= 8) {
        const head = take(8);
        if (head.subarray(0, 4).toString('latin1') !== BULK_MAGIC) {
          throw grpcError(grpc.status.INVALID_ARGUMENT, `not a fedtune bulk request (expected the preamble "${BULK_MAGIC}"): connect to this port with a fedtune worker, or use the gRPC address`);
        }
        requestBytes = head.readUInt32LE(4);
        if (requestBytes > BULK_MAX_REQUEST_BYTES) {
          throw grpcError(grpc.status.RESOURCE_EXHAUSTED, `bulk request of ${requestBytes} bytes exceeds the limit of ${BULK_MAX_REQUEST_BYTES}`);
        }
        state = 'request';
      }
      if (state === 'request' && pendingBytes >= requestBytes) {
        clearTimeout(requestTimer);
        state = 'wait';
        onRequest(take(requestBytes)).catch(refuse);
        return;
      }
      if (state === 'digest' && rx) {
        if (pendingBytes < BULK_DIGEST_BYTES) return;
        if (pendingBytes > BULK_DIGEST_BYTES) throw grpcError(grpc.status.INVALID_ARGUMENT, `upload sent ${pendingBytes - BULK_DIGEST_BYTES} bytes after its digest`);
        const digest = take(BULK_DIGEST_BYTES);
        const ack = rx.finish({ totalBytes: bodyBytes, sha256: new Uint8Array(digest) });
        state = 'done';
        rx = null;
        sock.end(frame({ code: 0, message: '', body: { $case: 'ack', value: ack } }));
      }
    };
    if (!inPlace) {
      sock.on('data', (chunk: Buffer) => {
        try {
          onData(chunk);
        } catch (err) {
          refuse(err);
        }
      });
    }
    // Accepted paused (pauseOnConnect) so that no byte is read before the handlers are in place.
    sock.resume();
  };

  const server: Server = o.tls
    ? createTlsServer({ ...o.tls, requestCert: o.mutual, rejectUnauthorized: o.mutual }, handle)
    : createServer({ pauseOnConnect: true }, handle);
  server.on('tlsClientError', (err: Error, s: TLSSocket) => {
    log.warn({ address: `${s.remoteAddress ?? '?'}:${s.remotePort ?? 0}`, reason: err.message }, 'bulk channel: TLS handshake refused');
  });
  const port = await new Promise<number>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) =>
      reject(new Error(`server.bulk_port: cannot listen on ${o.host}:${o.port} (${err.code ?? err.message}); choose another port, 0 for any free one, or null to carry transfers on gRPC only`)),
    );
    server.listen(o.port, o.host, () => {
      const a = server.address();
      resolve(typeof a === 'object' && a ? a.port : o.port);
    });
  });
  return {
    port,
    get connections() {
      return open.size;
    },
    get bytesReadInPlace() {
      return inPlaceBytes;
    },
    setSecureContext(options: SecureContextOptions) {
      if ('setSecureContext' in server) (server as unknown as { setSecureContext(o: SecureContextOptions): void }).setSecureContext(options);
    },
    close() {
      return new Promise<void>((resolve) => {
        for (const s of open) s.destroy();
        server.close(() => resolve());
      });
    },
  };
}
