/**
 * Request decoding that refuses, rather than fails, on messages the coordinator
 * cannot represent.
 *
 * The generated decoders (proto/gen, ts-proto with forceLong=number) read every
 * 64-bit integer field into a JavaScript number and throw when the value is
 * outside ±(2^53 - 1). Thrown inside grpc-js' request deserializer, that error
 * becomes an INTERNAL status and ends the call, Session streams included.
 * hardenRequestDecoding() wraps a service definition's request deserializers:
 * a message that does not decode is handed to the handler as a WireRefusal,
 * which names the offending field (found by walking the wire bytes against the
 * message descriptors of proto/fedtune/v1/*.proto) and says what to send; the
 * handler answers it with INVALID_ARGUMENT, or drops it and keeps its stream.
 */
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { BinaryReader, WireType } from '@bufbuild/protobuf/wire';
import type { Field, MapField, Root, Type } from 'protobufjs';
import { logger } from './log.ts';

const log = logger('wire.decode');

/** The largest integer a decoded 64-bit field may hold: 2^53 - 1 (Number.MAX_SAFE_INTEGER). */
export const MAX_EXACT_INTEGER = BigInt(Number.MAX_SAFE_INTEGER);

/** A 64-bit field holding a value outside ±(2^53 - 1). */
export interface UnrepresentableField {
  /** Proto field names from the top-level message down, e.g. ['heartbeat', 'memory_used_bytes']. */
  path: string[];
  /** The declaring message and the field, e.g. 'Heartbeat.memory_used_bytes'. */
  field: string;
  /** Its proto type: uint64, int64, sint64, fixed64 or sfixed64. */
  type: string;
  value: bigint;
}

/**
 * A request message that could not be decoded, handed to the handler in place of
 * the message. `message` is what the peer is told (with INVALID_ARGUMENT).
 */
export class WireRefusal {
  constructor(
    /** Short name of the request message type, e.g. 'WorkerMessage'. */
    readonly messageType: string,
    /** The 64-bit field out of range; null when the message is malformed in another way. */
    readonly unrepresentable: UnrepresentableField | null,
    readonly message: string,
  ) {}

  /** First field name of the path: for a WorkerMessage, the case of its body (e.g. 'heartbeat'); '' when unknown. */
  get topField(): string {
    return this.unrepresentable?.path[0] ?? '';
  }
}

export function isWireRefusal(x: unknown): x is WireRefusal {
  return x instanceof WireRefusal;
}

const PROTO_DIR = join(import.meta.dirname, '..', 'proto');
const PROTO_FILES = ['fedtune/v1/coordinator.proto', 'fedtune/v1/tensors.proto'];
const require = createRequire(import.meta.url);
let schemaRoot: Root | null | undefined;

/** The message descriptors, parsed from proto/ on first use (only when a message fails to decode); null when unavailable. */
function schema(): Root | null {
  if (schemaRoot !== undefined) return schemaRoot;
  try {
    const pb = require('protobufjs') as typeof import('protobufjs');
    const root = new pb.Root();
    root.resolvePath = (_origin: string, target: string) => (target.startsWith('/') ? target : join(PROTO_DIR, target));
    root.loadSync(PROTO_FILES, { keepCase: true });
    root.resolveAll();
    schemaRoot = root;
  } catch (err) {
    log.warn({ err: err instanceof Error ? err.message : String(err), dir: PROTO_DIR }, 'message descriptors unavailable: refused messages will not name their field');
    schemaRoot = null;
  }
  return schemaRoot;
}

const INT64_TYPES = new Set(['int64', 'uint64', 'sint64', 'fixed64', 'sfixed64']);
const MAX_DEPTH = 64;

function outOfRange(v: bigint): boolean {
  return v > MAX_EXACT_INTEGER || v < -MAX_EXACT_INTEGER;
}

function isMessageType(t: unknown): t is Type {
  return typeof t === 'object' && t !== null && 'fieldsById' in t;
}

/** Reads one 64-bit scalar of proto type `type` sent with wire type `wt`; undefined when the wire type does not fit it (the decoder skips such fields). */
function read64(r: BinaryReader, type: string, wt: WireType): bigint | undefined {
  if (wt === WireType.Varint) {
    if (type === 'uint64') return BigInt(r.uint64());
    if (type === 'int64') return BigInt(r.int64());
    if (type === 'sint64') return BigInt(r.sint64());
  } else if (wt === WireType.Bit64) {
    if (type === 'fixed64') return BigInt(r.fixed64());
    if (type === 'sfixed64') return BigInt(r.sfixed64());
  }
  return undefined;
}

function walk(type: Type, bytes: Uint8Array, path: string[], depth: number): UnrepresentableField | null {
  if (depth > MAX_DEPTH) return null;
  const r = new BinaryReader(bytes);
  while (r.pos < r.len) {
    const [no, wt] = r.tag();
    const f: Field | undefined = type.fieldsById[no];
    if (!f) {
      r.skip(wt, no);
      continue;
    }
    const here = [...path, f.name];
    const name = `${type.name}.${f.name}`;
    if (f.map) {
      if (wt !== WireType.LengthDelimited) {
        r.skip(wt, no);
        continue;
      }
      const found = walkMapEntry(f as unknown as MapField, r.bytes(), here, name, depth);
      if (found) return found;
    } else if (isMessageType(f.resolvedType)) {
      if (wt !== WireType.LengthDelimited) {
        r.skip(wt, no);
        continue;
      }
      const found = walk(f.resolvedType, r.bytes(), here, depth + 1);
      if (found) return found;
    } else if (INT64_TYPES.has(f.type)) {
      if (wt === WireType.LengthDelimited && f.repeated) {
        // packed repeated
        const packed = new BinaryReader(r.bytes());
        const elementWt = f.type.includes('fixed') ? WireType.Bit64 : WireType.Varint;
        while (packed.pos < packed.len) {
          const v = read64(packed, f.type, elementWt)!;
          if (outOfRange(v)) return { path: here, field: name, type: f.type, value: v };
        }
        continue;
      }
      const v = read64(r, f.type, wt);
      if (v === undefined) r.skip(wt, no);
      else if (outOfRange(v)) return { path: here, field: name, type: f.type, value: v };
    } else {
      r.skip(wt, no);
    }
  }
  return null;
}

function walkMapEntry(f: MapField, bytes: Uint8Array, path: string[], name: string, depth: number): UnrepresentableField | null {
  const r = new BinaryReader(bytes);
  while (r.pos < r.len) {
    const [no, wt] = r.tag();
    const t = no === 1 ? f.keyType : no === 2 ? f.type : '';
    if (no === 2 && isMessageType(f.resolvedType) && wt === WireType.LengthDelimited) {
      const found = walk(f.resolvedType, r.bytes(), path, depth + 1);
      if (found) return found;
      continue;
    }
    const v = INT64_TYPES.has(t) ? read64(r, t, wt) : undefined;
    if (v === undefined) r.skip(wt, no);
    else if (outOfRange(v)) return { path, field: name, type: t, value: v };
  }
  return null;
}

/**
 * The first 64-bit field in `bytes` (a message of type `typeName`, e.g.
 * 'fedtune.v1.WorkerMessage') whose value is outside ±(2^53 - 1); null when there
 * is none, the bytes do not parse, or the descriptors are unavailable.
 */
export function findUnrepresentable(typeName: string, bytes: Uint8Array): UnrepresentableField | null {
  const root = schema();
  if (!root) return null;
  try {
    return walk(root.lookupType(typeName), bytes, [], 0);
  } catch {
    return null;
  }
}

function describe(f: UnrepresentableField, top: string): string {
  const bound = f.value < 0n ? `below -${MAX_EXACT_INTEGER} (-(2^53 - 1))` : `above ${MAX_EXACT_INTEGER} (2^53 - 1)`;
  const where = f.path.length > 1 ? ` (sent as ${top}.${f.path.join('.')})` : '';
  const allowed = f.type.startsWith('u') || f.type === 'fixed64' ? `at most ${MAX_EXACT_INTEGER}` : `from -${MAX_EXACT_INTEGER} to ${MAX_EXACT_INTEGER}`;
  return `${f.field} is ${f.value}, ${bound}, outside the integers the coordinator represents exactly${where}; send a value ${allowed}`;
}

/**
 * What a request of type `typeName` that failed to decode with `err` is answered
 * with: the out-of-range field named when there is one, else the decoder's error.
 */
export function refusalOf(typeName: string, bytes: Uint8Array, err: unknown): WireRefusal {
  const short = typeName.slice(typeName.lastIndexOf('.') + 1);
  const found = findUnrepresentable(typeName, bytes);
  if (found) return new WireRefusal(short, found, describe(found, short));
  const why = err instanceof Error ? err.message : String(err);
  if (/MAX_SAFE_INTEGER|MIN_SAFE_INTEGER/.test(why)) {
    return new WireRefusal(
      short,
      null,
      `${short} carries a 64-bit integer outside ±${MAX_EXACT_INTEGER} (2^53 - 1), which the coordinator cannot represent exactly; every 64-bit field must be from -${MAX_EXACT_INTEGER} to ${MAX_EXACT_INTEGER}`,
    );
  }
  return new WireRefusal(short, null, `malformed ${short} (${why}): it is not a valid ${typeName} encoding (proto/fedtune/v1/coordinator.proto)`);
}

interface MethodDefinition {
  path: string;
  requestDeserialize: (bytes: Buffer) => unknown;
}

const HARDENED = Symbol.for('fedtune.wire-decode.hardened');

/** Request message type of a method path ('/fedtune.v1.Coordinator/Register'), from the descriptors; null when unknown. */
function requestTypeOf(path: string): string | null {
  const m = /^\/([^/]+)\/([^/]+)$/.exec(path);
  const root = schema();
  if (!m || !root) return null;
  try {
    const method = root.lookupService(m[1]!).methods[m[2]!];
    const t = method?.resolvedRequestType;
    return t ? t.fullName.replace(/^\./, '') : null;
  } catch {
    return null;
  }
}

/**
 * Wraps each method's requestDeserialize in `def` (in place; idempotent): a
 * message that fails to decode is handed on as a WireRefusal instead of
 * throwing, so grpc-js does not end the call with INTERNAL. Handlers of `def`
 * must check isWireRefusal() on every request message.
 */
export function hardenRequestDecoding<D extends object>(def: D): D {
  for (const m of Object.values(def) as MethodDefinition[]) {
    const decode = m.requestDeserialize as MethodDefinition['requestDeserialize'] & { [HARDENED]?: true };
    if (decode[HARDENED]) continue;
    const hardened = Object.assign(
      (bytes: Buffer): unknown => {
        try {
          return decode(bytes);
        } catch (err) {
          // Without descriptors the refusal names the method ('Register') instead of its message type.
          return refusalOf(requestTypeOf(m.path) ?? m.path.slice(m.path.lastIndexOf('/') + 1), bytes, err);
        }
      },
      { [HARDENED]: true as const },
    );
    m.requestDeserialize = hardened;
  }
  return def;
}
