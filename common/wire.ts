/**
 * Wire constants both sides of the gRPC contract use, defined once: the
 * protocol version, the metadata keys of an authenticated call, and the
 * mapping between the proto's DType and the tensor manifest's dtype names.
 */
import type { TensorSpecEntry, WireDType } from './chunks.ts';
import { DType, type TensorManifest } from '../proto/gen/fedtune/v1/tensors.ts';

export const PROTOCOL_VERSION = 1;
/** Metadata of Session, Download and Upload calls: the worker id and session key from Register. */
export const WORKER_ID_HEADER = 'fedtune-worker-id';
export const SESSION_KEY_HEADER = 'fedtune-session-key';

/** Bulk tensor channel (proto: BulkRequest): the preamble a connection starts with, the digest after raw bytes, the largest request frame. */
export const BULK_MAGIC = 'FTB1';
export const BULK_DIGEST_BYTES = 32;
export const BULK_MAX_REQUEST_BYTES = 4 << 20;

/** A bulk-channel frame: the message's length (4 bytes, little-endian), then the message. */
export function lengthPrefixed(body: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(4 + body.byteLength);
  out.writeUInt32LE(body.byteLength, 0);
  out.set(body, 4);
  return out;
}

export const DTYPE_NAMES: Record<number, WireDType | undefined> = {
  [DType.DTYPE_F32]: 'F32',
  [DType.DTYPE_F16]: 'F16',
  [DType.DTYPE_BF16]: 'BF16',
  [DType.DTYPE_F64]: 'F64',
  [DType.DTYPE_I8]: 'I8',
};
export const DTYPE_OF: Record<WireDType, DType> = { F32: DType.DTYPE_F32, F16: DType.DTYPE_F16, BF16: DType.DTYPE_BF16, F64: DType.DTYPE_F64, I8: DType.DTYPE_I8 };

export function toWireManifest(m: readonly TensorSpecEntry[]): TensorManifest {
  return { tensors: m.map((e) => ({ name: e.name, dtype: DTYPE_OF[e.dtype], shape: [...e.shape] })) };
}

/** The manifest of a stream header; `refuse` builds the error for an unknown dtype. */
export function fromWireManifest(m: TensorManifest, refuse: (message: string) => Error): TensorSpecEntry[] {
  return m.tensors.map((t, i) => {
    const dtype = DTYPE_NAMES[t.dtype];
    if (!dtype) throw refuse(`tensor ${t.name || `#${i}`}: unknown dtype ${t.dtype} (allowed: DTYPE_F32)`);
    return { name: t.name, dtype, shape: t.shape.map(Number) };
  });
}
