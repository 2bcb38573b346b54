/**
 * The worker's side of the bulk tensor channel (coordinator/bulk.ts,
 * docs/protocol.md): one TCP (or TLS, with the gRPC channel's certificates)
 * connection per download or upload, authenticated by the session.
 *
 * A download is read straight into its destination buffer (the socket's
 * `onread` hands the kernel a view of it, no intermediate chunks) and hashed as
 * it arrives; an upload writes views of the tensors' own memory.
 */
import * as grpc from '@grpc/grpc-js';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { connect as netConnect, isIP, type Socket } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { bytesEqual, hex, type ChunkSlice } from '../common/chunks.ts';
import { BULK_DIGEST_BYTES, BULK_MAGIC, lengthPrefixed } from '../common/wire.ts';
import { BulkRequest, BulkResponse, type DownloadRequest, type UploadAck, type UploadHeader } from '../proto/gen/fedtune/v1/coordinator.ts';
import type { StreamHeader } from '../proto/gen/fedtune/v1/tensors.ts';

/** A refusal from the coordinator, shaped like a grpc-js ServiceError (code, details) so callers treat both alike. */
export class BulkStatusError extends Error {
  readonly code: number;
  readonly details: string;
  readonly metadata = new grpc.Metadata();
  constructor(code: number, details: string) {
    super(`${code} ${grpc.status[code] ?? ''}: ${details}`);
    this.name = 'BulkStatusError';
    this.code = code;
    this.details = details;
  }
}

/**
 * The channel could not be reached or broke below the protocol (refused connection, TLS failure,
 * reset): UNAVAILABLE, as a broken gRPC stream would be.
 */
export class BulkTransportError extends Error {
  /** True when nothing reached the coordinator (the connection never opened): the caller may use gRPC instead. */
  readonly beforeConnect: boolean;
  readonly code = grpc.status.UNAVAILABLE;
  readonly details: string;
  readonly metadata = new grpc.Metadata();
  constructor(message: string, beforeConnect: boolean) {
    super(message);
    this.name = 'BulkTransportError';
    this.beforeConnect = beforeConnect;
    this.details = message;
  }
}

export interface BulkTls {
  caFile?: string;
  certFile?: string;
  keyFile?: string;
  serverName?: string;
}

const SCRATCH = 64 << 10;

function requestFrame(req: BulkRequest): Buffer {
  return Buffer.concat([Buffer.from(BULK_MAGIC, 'latin1'), lengthPrefixed(BulkRequest.encode(req).finish())]);
}

/** Parses 4-byte length + BulkResponse frames out of arriving bytes. */
class ResponseReader {
  private buf: Buffer = Buffer.alloc(0);
  push(data: Uint8Array): BulkResponse | null {
    this.buf = this.buf.byteLength === 0 ? Buffer.from(data) : Buffer.concat([this.buf, data]);
    if (this.buf.byteLength < 4) return null;
    const n = this.buf.readUInt32LE(0);
    if (n > 16 << 20) throw new BulkTransportError(`bulk channel: response frame of ${n} bytes is not a fedtune coordinator's`, false);
    if (this.buf.byteLength < 4 + n) return null;
    const msg = BulkResponse.decode(this.buf.subarray(4, 4 + n));
    this.buf = this.buf.subarray(4 + n);
    return msg;
  }
  /** Bytes after the frame. */
  rest(): Buffer {
    return this.buf;
  }
}

export class BulkClient {
  private readonly tlsOptions: { ca?: Buffer; cert?: Buffer; key?: Buffer; servername?: string } | null;

  constructor(
    readonly host: string,
    readonly port: number,
    tls: BulkTls | null,
    private readonly auth: { workerId: string; sessionKey: string },
    private readonly idleMs = 60_000,
    private readonly connectMs = 10_000,
  ) {
    this.tlsOptions = tls
      ? {
          ...(tls.caFile ? { ca: readFileSync(tls.caFile) } : {}),
          ...(tls.certFile ? { cert: readFileSync(tls.certFile) } : {}),
          ...(tls.keyFile ? { key: readFileSync(tls.keyFile) } : {}),
          // SNI carries host names only; an IP address is checked against the certificate's IP SANs.
          ...(tls.serverName ? { servername: tls.serverName } : isIP(host) ? {} : { servername: host }),
        }
      : null;
  }

  get endpoint(): string {
    return `${this.host.includes(':') ? `[${this.host}]` : this.host}:${this.port}`;
  }

  private open(onread?: { buffer: () => Uint8Array; callback: (n: number, buf: Uint8Array) => boolean }): Socket {
    const common = { host: this.host, port: this.port, ...(onread ? { onread } : {}) };
    const sock = this.tlsOptions ? tlsConnect({ ...common, ...this.tlsOptions }) : netConnect(common);
    sock.setNoDelay(true);
    sock.setTimeout(this.connectMs);
    sock.once(this.tlsOptions ? 'secureConnect' : 'connect', () => sock.setTimeout(this.idleMs));
    return sock;
  }

  private failure(err: Error & { code?: string }, connected: boolean): BulkTransportError {
    return new BulkTransportError(`bulk channel ${this.endpoint}: ${err.code ?? ''} ${err.message}`.replace(/\s+/g, ' '), !connected);
  }

  /** One download: the stream header, the checked bytes. */
  download(req: DownloadRequest, what: string, maxBytes = Number.MAX_SAFE_INTEGER, reuse: Uint8Array | null = null): Promise<{ header: StreamHeader; bytes: Uint8Array; sha256: Uint8Array }> {
    return new Promise((resolve, reject) => {
      const scratch = new Uint8Array(SCRATCH);
      const hash = createHash('sha256');
      const reader = new ResponseReader();
      let header: StreamHeader | null = null;
      let dest: Uint8Array | null = null;
      let total = 0;
      let got = 0;
      const tail: Uint8Array[] = [];
      let tailBytes = 0;
      let connected = false;
      let settled = false;
      const finish = (err: Error | null, v?: { header: StreamHeader; bytes: Uint8Array; sha256: Uint8Array }): void => {
        if (settled) return;
        settled = true;
        sock.destroy();
        if (err) reject(err);
        else resolve(v!);
      };
      const body = (data: Uint8Array): void => {
        // Bytes that came in through the scratch buffer (with the header frame): copied once into place.
        const n = Math.min(data.byteLength, total - got);
        if (n > 0) {
          dest!.set(data.subarray(0, n), got);
          hash.update(data.subarray(0, n));
          got += n;
        }
        if (n < data.byteLength) digestBytes(data.subarray(n));
      };
      const digestBytes = (data: Uint8Array): void => {
        tail.push(Uint8Array.from(data));
        tailBytes += data.byteLength;
        if (tailBytes > BULK_DIGEST_BYTES) return finish(new BulkTransportError(`bulk download of ${what}: ${tailBytes - BULK_DIGEST_BYTES} bytes after the digest`, false));
        if (tailBytes === BULK_DIGEST_BYTES) {
          const sent = Buffer.concat(tail);
          const computed = new Uint8Array(hash.digest());
          if (!bytesEqual(sent, computed)) {
            return finish(new BulkStatusError(grpc.status.DATA_LOSS, `${what}: SHA-256 mismatch (sent ${hex(sent)}, computed ${hex(computed)})`));
          }
          finish(null, { header: header!, bytes: dest!, sha256: new Uint8Array(sent) });
        }
      };
      const sock = this.open({
        buffer: () => (dest && got < total ? dest.subarray(got, Math.min(total, got + (4 << 20))) : scratch),
        callback: (n: number, buf: Uint8Array) => {
          if (settled) return false;
          try {
            if (dest && buf !== scratch && buf.buffer === dest.buffer) {
              // Read in place: the kernel wrote into dest at `got`.
              hash.update(buf.subarray(0, n));
              got += n;
              return true;
            }
            const data = buf.subarray(0, n);
            if (!header) {
              const msg = reader.push(data);
              if (!msg) return true;
              if (msg.code !== 0) {
                finish(new BulkStatusError(msg.code, msg.message));
                return false;
              }
              if (msg.body?.$case !== 'header') throw new BulkTransportError(`bulk download of ${what}: the answer carries no stream header`, false);
              header = msg.body.value;
              total = header.totalBytes;
              if (total > maxBytes) throw new BulkStatusError(grpc.status.RESOURCE_EXHAUSTED, `${what}: announces ${total} bytes, more than the ${maxBytes} allowed`);
              dest = reuse && reuse.byteLength === total ? reuse : new Uint8Array(total);
              const rest = reader.rest();
              if (rest.byteLength > 0) body(rest);
            } else if (got < total) {
              body(data);
            } else {
              digestBytes(data);
            }
          } catch (err) {
            finish(err as Error);
            return false;
          }
          return true;
        },
      });
      sock.once(this.tlsOptions ? 'secureConnect' : 'connect', () => {
        connected = true;
        sock.write(requestFrame({ workerId: this.auth.workerId, sessionKey: this.auth.sessionKey, op: { $case: 'download', value: req } }));
      });
      sock.on('timeout', () => finish(new BulkTransportError(`bulk download of ${what}: ${connected ? `nothing arrived for ${this.idleMs / 1000} s` : `no connection within ${this.connectMs / 1000} s`}`, !connected)));
      sock.on('error', (err) => finish(this.failure(err, connected)));
      sock.on('close', () => finish(new BulkTransportError(`bulk download of ${what}: connection closed after ${got} of ${total} bytes`, !connected)));
    });
  }

  /**
   * One upload: the header (with its stream), the chunks as views, the digest. Resolves with the
   * coordinator's ack once it checked and accepted the update.
   */
  upload(header: UploadHeader, chunks: Iterable<ChunkSlice>, digest: () => Uint8Array, what: string): Promise<UploadAck> {
    return new Promise((resolve, reject) => {
      const reader = new ResponseReader();
      let connected = false;
      let settled = false;
      const finish = (err: Error | null, ack?: UploadAck): void => {
        if (settled) return;
        settled = true;
        sock.destroy();
        if (err) reject(err);
        else resolve(ack!);
      };
      const sock = this.open();
      sock.on('data', (data: Buffer) => {
        try {
          const msg = reader.push(data);
          if (!msg) return;
          if (msg.code !== 0) return finish(new BulkStatusError(msg.code, msg.message));
          if (msg.body?.$case !== 'ack') return finish(new BulkTransportError(`bulk upload of ${what}: the answer carries no ack`, false));
          finish(null, msg.body.value);
        } catch (err) {
          finish(err as Error);
        }
      });
      const pump = async (): Promise<void> => {
        const write = (b: Uint8Array): Promise<void> =>
          new Promise((res) => {
            if (sock.write(b)) res();
            else sock.once('drain', res);
          });
        await write(requestFrame({ workerId: this.auth.workerId, sessionKey: this.auth.sessionKey, op: { $case: 'upload', value: header } }));
        for (const c of chunks) {
          if (settled) return;
          await write(c.data);
        }
        if (!settled) await write(digest());
      };
      sock.once(this.tlsOptions ? 'secureConnect' : 'connect', () => {
        connected = true;
        pump().catch((err: Error) => finish(err));
      });
      sock.on('timeout', () => finish(new BulkTransportError(`bulk upload of ${what}: ${connected ? `no answer for ${this.idleMs / 1000} s` : `no connection within ${this.connectMs / 1000} s`}`, !connected)));
      sock.on('error', (err) => finish(this.failure(err, connected)));
      sock.on('close', () => finish(new BulkTransportError(`bulk upload of ${what}: connection closed before the coordinator answered`, !connected)));
    });
  }
}
