/**
 * The gRPC Coordinator service (proto/fedtune/v1/coordinator.proto), kept thin:
 * authenticate, move bytes in checked chunks, and hand what arrived to the
 * registry (workers.ts) and the round loop (run.ts).
 */
import * as grpc from '@grpc/grpc-js';
import {
  BufferPool,
  ChunkAssembler,
  ChunkError,
  chunkSlices,
  type TensorSpecEntry,
} from '../common/chunks.ts';
import type { RunConfig } from '../common/config.ts';
import { fromWireManifest, PROTOCOL_VERSION, SESSION_KEY_HEADER, toWireManifest, WORKER_ID_HEADER } from '../common/wire.ts';
import { logger } from '../common/log.ts';
import { hardenRequestDecoding, isWireRefusal, type WireRefusal } from '../common/wire-decode.ts';
import { CoordinatorService } from '../proto/gen/fedtune/v1/coordinator.ts';
import { encodedStreamBytes, uploadEncodingOf } from '../common/update-encoding.ts';
import {
  WorkerStatus,
  type CoordinatorServer,
  type DownloadMessage,
  type DownloadRequest,
  type RegisterRequest,
  type RegisterResponse,
  type RunInfo,
  type RunInfoRequest,
  type UploadAck,
  type UploadHeader,
  type UploadMessage,
  type WorkerMessage,
} from '../proto/gen/fedtune/v1/coordinator.ts';
import type { StreamHeader } from '../proto/gen/fedtune/v1/tensors.ts';
import type { PackedTensors } from '../common/chunks.ts';
import type { EvalResult, TaskFailed, TaskProgress } from '../proto/gen/fedtune/v1/coordinator.ts';
import { UpdateRejected, trainingSpecOf } from './tasks.ts';
import { Admission } from './identity.ts';
import { UploadBufferPool } from './strategies/math/sum.ts';
import type { SessionStream, WorkerRecord, WorkerRegistry } from './workers.ts';

const log = logger('coordinator.service');

export { PROTOCOL_VERSION, SESSION_KEY_HEADER, WORKER_ID_HEADER } from '../common/wire.ts';

/** A gRPC error with a status code and a message the peer sees. */
export function grpcError(code: grpc.status, details: string): grpc.ServiceError {
  const e = new Error(details) as grpc.ServiceError;
  e.code = code;
  e.details = details;
  e.metadata = new grpc.Metadata();
  return e;
}

/** The gRPC status an error is answered with (refusals keep their code; anything else is INTERNAL). */
export function statusOf(err: unknown): grpc.ServiceError {
  if (err instanceof UpdateRejected || err instanceof ChunkError) return grpcError(grpc.status[err.code], err.message);
  if (typeof err === 'object' && err !== null && 'code' in err && typeof (err as { code: unknown }).code === 'number') return err as grpc.ServiceError;
  return grpcError(grpc.status.INTERNAL, err instanceof Error ? err.message : String(err));
}

/**
 * What the service hands arrivals to: the federated round loop (run.ts) or the
 * distributed step loop (distributed/run.ts). T is the run's task record.
 */
export interface RunController<T = unknown> {
  readonly runId: string;
  readonly globalVersion: number;
  adapterVersion(version: number, rank?: number): PackedTensors | undefined;
  /** A download streams `p` until the returned function is called (its buffer is not reused before). */
  holdVersion?(p: PackedTensors): () => void;
  /**
   * Uploads accepted now are folded by a streaming aggregator that gives each one's buffer back
   * (FitUpdate.release) once read: they may be received into the fold kernels' memory. Absent: no.
   */
  foldsUploads?(): boolean;
  /** Distributed mode: a data shard of the current plan (undefined: unknown, or federated mode). */
  dataShard?(shardId: string): { bytes: Uint8Array; sha256: Uint8Array; mediaType: string } | undefined;
  onHeartbeat(w: WorkerRecord, status: string): void;
  onProgress(w: WorkerRecord, p: TaskProgress): void;
  onTaskFailed(w: WorkerRecord, f: TaskFailed): void;
  onEvalResult(w: WorkerRecord, r: EvalResult): void;
  /** Secure aggregation's answers (SecAggAdvertiseKeys, SecAggShareKeys, SecAggUnmask); absent: ignored. */
  onSecAgg?(w: WorkerRecord, body: NonNullable<WorkerMessage['body']>): void;
  onDownloaded(w: WorkerRecord, bytes: number): void;
  beginUpdate(w: WorkerRecord, h: UploadHeader, manifest: TensorSpecEntry[]): T;
  abandonUpdate(t: T): void;
  /**
   * `release`, when given, returns `bytes` to the upload buffer pool: the run calls it (once) when
   * nothing reads them any more, e.g. through FitUpdate.release once an aggregator folded them in,
   * or right away when it refuses the update. Not calling it is safe (the garbage collector frees them).
   */
  acceptUpdate(w: WorkerRecord, t: T, h: UploadHeader, bytes: Uint8Array, release?: () => void): void;
  rejectUpdate(w: WorkerRecord, h: Pick<UploadHeader, 'taskId' | 'round'> | null, reason: string): void;
}

export interface ServiceContext<T = unknown> {
  cfg: RunConfig;
  run: RunController<T>;
  registry: WorkerRegistry;
  modelFingerprint: string;
  /** Join tokens, certificate-to-site binding, revocation, audit records (default: the config's checks, no audit). */
  admission?: Admission;
  /** The bulk tensor channel's port to advertise at registration (0 or absent: none). */
  bulkPort?: () => number;
}

const STATUS_NAMES: Record<number, string> = {
  [WorkerStatus.WORKER_STATUS_IDLE]: 'idle',
  [WorkerStatus.WORKER_STATUS_FETCHING]: 'fetching',
  [WorkerStatus.WORKER_STATUS_TRAINING]: 'training',
  [WorkerStatus.WORKER_STATUS_UPLOADING]: 'uploading',
  [WorkerStatus.WORKER_STATUS_EVALUATING]: 'evaluating',
};

/** Limits concurrently buffered uploads (each holds one adapter's bytes until it is checked). */
class Semaphore {
  private queue: Array<() => void> = [];
  constructor(private free: number) {}
  async acquire(): Promise<() => void> {
    if (this.free > 0) this.free--;
    else await new Promise<void>((r) => this.queue.push(r));
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = this.queue.shift();
      if (next) next();
      else this.free++;
    };
  }
}

/**
 * Upload and download as the run sees them, shared by the gRPC streams below and the bulk tensor
 * channel (bulk.ts): authentication, what a download serves, and the upload prologue
 * (header checks, one slot taken only after a valid header), reassembly and acceptance.
 */
export interface Transfers {
  /** The worker a (worker id, session key) pair belongs to; throws UNAUTHENTICATED / the revocation's status. */
  authenticate(workerId: string, sessionKey: string, call: { getPeer(): string }): WorkerRecord;
  /**
   * What a DownloadRequest serves: the stream header, the bytes and their digest (packed once per
   * version); `release` once the stream has ended, however it ended (the bytes may be reused after).
   */
  download(w: WorkerRecord, req: DownloadRequest): { header: StreamHeader; bytes: Uint8Array; sha256: Uint8Array; release: () => void };
  downloaded(w: WorkerRecord, bytes: number): void;
  /**
   * A receiver for one upload of this worker. `onTimeout` runs when the upload is still not complete
   * server.upload_timeout_sec after its header was accepted (the receiver has dropped it by then):
   * the transport answers with the error and closes the stream.
   */
  upload(w: WorkerRecord, onTimeout: (err: grpc.ServiceError) => void, opts?: { bufferHeldUntil?: Promise<void> }): UploadReceiver;
  readonly cfg: RunConfig;
  readonly admission: Admission;
}

/** One upload: begin(header) -> push(offset, bytes)* -> finish(trailer), or fail / drop at any point. */
export interface UploadReceiver {
  readonly header: UploadHeader | null;
  readonly receivedBytes: number;
  /** Checks the header against the worker's open task and takes an upload slot (waits for one). */
  begin(header: UploadHeader, maxChunkBytes: number): Promise<void>;
  push(offset: number, data: Uint8Array): void;
  /**
   * For a transport that reads straight into the reassembly buffer: its unwritten rest (empty before
   * the slot is taken and once the upload is over) and `advance(n)` once n bytes were written there.
   * Whoever writes there passes `bufferHeldUntil` to `upload()`, so that a dropped upload's buffer goes
   * back to the pool only when nothing can write into it any more.
   */
  region(): Uint8Array;
  advance(n: number): void;
  /** Checks length and digest, hands the update to the run; releases the slot. */
  finish(trailer: { totalBytes: number; sha256: Uint8Array }): UploadAck;
  /** A refused upload: the task is reopened, the refusal is published; returns the status to answer. */
  fail(err: unknown): grpc.ServiceError;
  /** The peer went away or went quiet: the task is reopened, nothing is published. */
  drop(): void;
}

export function createTransfers<T>(ctx: ServiceContext<T>): Transfers {
  const { cfg, registry } = ctx;
  const admission = ctx.admission ?? Admission.fromConfig(cfg);
  const uploads = new Semaphore(cfg.server.max_concurrent_uploads);
  // Reassembly buffers of the last round's uploads, reused by the next (chunks.ts, BufferPool).
  // Up to max_concurrent_uploads are being filled while the aggregator may hold a few folded-later ones.
  // Uploads a streaming aggregator folds and gives back are received into the fold kernels' own
  // memory where it has room (math/sum.ts, UploadBufferPool); the rest into ordinary buffers.
  const buffers = new BufferPool(cfg.server.max_concurrent_uploads + 4);
  const folded = new UploadBufferPool(cfg.server.max_concurrent_uploads + 4);

  const authenticate = (id: string, key: string, call: { getPeer(): string }): WorkerRecord => {
    const w = id && key ? registry.authenticate(id, key) : null;
    if (!w) {
      throw grpcError(
        grpc.status.UNAUTHENTICATED,
        id ? `worker ${id} is not registered with this coordinator (or its session ended): register again` : `missing ${WORKER_ID_HEADER} / ${SESSION_KEY_HEADER} metadata: call Register first`,
      );
    }
    const revoked = admission.check(w, call.getPeer());
    if (revoked) throw grpcError(revoked.code, revoked.message);
    return w;
  };

  const download = (_w: WorkerRecord, req: DownloadRequest): { header: StreamHeader; bytes: Uint8Array; sha256: Uint8Array; release: () => void } => {
    const target = req.target;
    if (target?.$case === 'dataShardId') {
      const shard = ctx.run.dataShard?.(target.value);
      if (!ctx.run.dataShard) throw grpcError(grpc.status.UNIMPLEMENTED, 'data shards are served in distributed mode only (allowed here: adapter_version)');
      if (!shard) throw grpcError(grpc.status.NOT_FOUND, `data shard ${target.value || '(empty)'} is not part of the current data plan`);
      return {
        header: { totalBytes: shard.bytes.byteLength, chunkBytes: cfg.server.chunk_bytes, content: { $case: 'blob', value: { name: target.value, mediaType: shard.mediaType } } },
        bytes: shard.bytes,
        sha256: shard.sha256,
        release: () => {},
      };
    }
    if (target?.$case === 'adapterVersion') {
      const rank = req.adapterRank;
      const p = ctx.run.adapterVersion(target.value, rank);
      if (!p) {
        throw grpcError(
          grpc.status.NOT_FOUND,
          `global adapter version ${target.value}${rank ? ` at rank ${rank}` : ''} is not available (current: ${ctx.run.globalVersion}; pass the rank of the task's AdapterRef)`,
        );
      }
      return {
        header: { totalBytes: p.bytes.byteLength, chunkBytes: cfg.server.chunk_bytes, content: { $case: 'tensors', value: toWireManifest(p.manifest) } },
        bytes: p.bytes,
        sha256: p.sha256,
        release: ctx.run.holdVersion?.(p) ?? (() => {}),
      };
    }
    throw grpcError(grpc.status.INVALID_ARGUMENT, 'download request names no target (allowed: adapter_version, data_shard_id)');
  };

  const upload = (w: WorkerRecord, onTimeout: (err: grpc.ServiceError) => void, opts: { bufferHeldUntil?: Promise<void> } = {}): UploadReceiver => {
    let release: (() => void) | null = null;
    let header: UploadHeader | null = null;
    let task: T | null = null;
    let asm: ChunkAssembler | null = null;
    let pool: BufferPool = buffers;
    let over = false;
    let deadline: NodeJS.Timeout | null = null;
    const end = (): void => {
      over = true;
      if (deadline) clearTimeout(deadline);
      release?.();
      release = null;
      asm?.discard();
    };
    return {
      get header() {
        return header;
      },
      get receivedBytes() {
        return asm?.receivedBytes ?? 0;
      },
      async begin(h: UploadHeader, maxChunkBytes: number): Promise<void> {
        if (header) throw new UpdateRejected('INVALID_ARGUMENT', 'second upload header in one stream');
        header = h;
        const s = h.stream;
        if (!s || s.content?.$case !== 'tensors') throw new UpdateRejected('INVALID_ARGUMENT', 'upload header: stream must describe tensors (stream.tensors)');
        const manifest = fromWireManifest(s.content.value, (m) => new UpdateRejected('INVALID_ARGUMENT', m));
        const enc = uploadEncodingOf(h, manifest, (m) => new UpdateRejected('INVALID_ARGUMENT', m));
        task = ctx.run.beginUpdate(w, h, manifest);
        const want = encodedStreamBytes(manifest, enc.encoding, enc.blockSize);
        if (s.totalBytes !== want) throw new UpdateRejected('INVALID_ARGUMENT', `stream.total_bytes is ${s.totalBytes}, the manifest needs ${want}`);
        // The buffer is taken once the slot is: uploads waiting for a slot hold no memory.
        const r = await uploads.acquire();
        if (over) return r();
        release = r;
        pool = enc.encoding === 'float32' && ctx.run.foldsUploads?.() ? folded : buffers;
        asm = new ChunkAssembler({ totalBytes: want, maxChunkBytes, what: `upload of task ${h.taskId}`, pool, heldUntil: opts.bufferHeldUntil });
        deadline = setTimeout(() => {
          if (over) return;
          log.warn({ worker: w.workerId, task: h.taskId, received: asm?.receivedBytes ?? 0 }, 'upload past server.upload_timeout_sec; closed');
          if (task !== null) ctx.run.abandonUpdate(task);
          end();
          onTimeout(
            grpcError(
              grpc.status.DEADLINE_EXCEEDED,
              `upload of task ${h.taskId} not complete ${cfg.server.upload_timeout_sec} s after it got its slot (server.upload_timeout_sec; ${asm?.receivedBytes ?? 0} bytes arrived); nothing of it was used`,
            ),
          );
        }, cfg.server.upload_timeout_sec * 1000);
        deadline.unref();
      },
      push(offset: number, data: Uint8Array): void {
        if (!header || !asm || task === null) throw new UpdateRejected('INVALID_ARGUMENT', 'upload must start with a header');
        asm.push(offset, data);
      },
      region(): Uint8Array {
        return asm && !over ? asm.region() : new Uint8Array(0);
      },
      advance(n: number): void {
        if (!header || !asm || task === null) throw new UpdateRejected('INVALID_ARGUMENT', 'upload must start with a header');
        asm.advance(n);
      },
      finish(trailer: { totalBytes: number; sha256: Uint8Array }): UploadAck {
        if (!header || !asm || task === null) throw new UpdateRejected('INVALID_ARGUMENT', 'upload must start with a header (got trailer)');
        const bytes = asm.finish(trailer);
        let given = false;
        const release = (): void => {
          if (given) return;
          given = true;
          pool.give(bytes);
        };
        ctx.run.acceptUpdate(w, task, header, bytes, release);
        end();
        return { taskId: header.taskId, bytes: bytes.byteLength };
      },
      fail(err: unknown): grpc.ServiceError {
        const status = statusOf(err);
        if (!over) {
          if (task !== null) ctx.run.abandonUpdate(task);
          ctx.run.rejectUpdate(w, header, status.details);
          end();
        }
        return status;
      },
      drop(): void {
        if (over) return;
        if (task !== null) ctx.run.abandonUpdate(task);
        end();
      },
    };
  };

  return { authenticate, download, downloaded: (w, n) => ctx.run.onDownloaded(w, n), upload, cfg, admission };
}

export function createCoordinatorService<T>(ctx: ServiceContext<T>, transfers: Transfers = createTransfers(ctx)): CoordinatorServer {
  const { cfg, registry } = ctx;
  const admission = transfers.admission;
  // A request that does not decode (a 64-bit field beyond 2^53 - 1, malformed bytes) reaches the
  // handlers below as a WireRefusal naming the field, not as an INTERNAL error that ends the call.
  hardenRequestDecoding(CoordinatorService);
  const refusalStatus = (r: WireRefusal): grpc.ServiceError => grpcError(grpc.status.INVALID_ARGUMENT, r.message);
  const telemetryWarned = new WeakMap<WorkerRecord, Set<string>>();

  const runInfo = (): RunInfo => ({
    runId: ctx.run.runId,
    runName: cfg.name,
    mode: cfg.mode,
    modelFingerprint: ctx.modelFingerprint,
    training: trainingSpecOf(cfg),
    protocolVersion: PROTOCOL_VERSION,
  });

  const authenticate = (md: grpc.Metadata, call: { getPeer(): string }): WorkerRecord =>
    transfers.authenticate(String(md.get(WORKER_ID_HEADER)[0] ?? ''), String(md.get(SESSION_KEY_HEADER)[0] ?? ''), call);

  return {
    getRunInfo(call: grpc.ServerUnaryCall<RunInfoRequest, RunInfo>, cb: grpc.sendUnaryData<RunInfo>) {
      if (isWireRefusal(call.request)) return cb(refusalStatus(call.request));
      const refused = admission.runInfo(call.request.joinToken, call);
      if (refused) return cb(grpcError(refused.code, refused.message));
      cb(null, runInfo());
    },

    register(call: grpc.ServerUnaryCall<RegisterRequest, RegisterResponse>, cb: grpc.sendUnaryData<RegisterResponse>) {
      if (isWireRefusal(call.request)) {
        log.warn({ peer: call.getPeer() }, `registration refused: ${call.request.message}`);
        return cb(refusalStatus(call.request));
      }
      const req = call.request;
      const peer = call.getPeer();
      const admitted = admission.register(req.joinToken, req.site.trim(), call);
      if (!admitted.ok) {
        log.warn({ peer, site: req.site }, `registration refused: ${admitted.message}`);
        return cb(grpcError(admitted.code, admitted.message));
      }
      const caps = req.capabilities;
      if (!req.site.trim()) return cb(grpcError(grpc.status.INVALID_ARGUMENT, 'site: must not be empty (pass --name SITE)'));
      if (!caps) return cb(grpcError(grpc.status.INVALID_ARGUMENT, 'capabilities: missing'));
      if (caps.protocolVersion !== PROTOCOL_VERSION) {
        const msg =
          `protocol version mismatch: worker "${req.site}" (${caps.client || 'unnamed client'}) speaks fedtune protocol version ${caps.protocolVersion || '0 (unset)'}, ` +
          `this coordinator speaks version ${PROTOCOL_VERSION}; use a worker built for protocol version ${PROTOCOL_VERSION} (docs/protocol.md)`;
        log.warn({ peer, site: req.site }, msg);
        return cb(grpcError(grpc.status.FAILED_PRECONDITION, msg));
      }
      if (ctx.modelFingerprint && caps.modelFingerprint !== ctx.modelFingerprint) {
        const msg =
          `base model fingerprint mismatch: worker "${req.site}" has ${caps.modelFingerprint || '(none)'}, ` +
          `run "${cfg.name}" expects ${ctx.modelFingerprint}; the worker must load the same base model (same config and weights)`;
        log.warn({ peer, site: req.site }, msg);
        return cb(grpcError(grpc.status.FAILED_PRECONDITION, msg));
      }
      // One live session per site: a second worker for the same site would be averaged twice.
      const live = registry.liveWorkerOf(req.site.trim());
      if (live) {
        if (req.previousWorkerId === live.workerId) {
          registry.detach(live, 'replaced by a new registration of the same worker');
        } else {
          const msg =
            `site "${live.site}" already has a live session (worker ${live.workerId}, registered ${new Date(live.registeredAt).toISOString()}): ` +
            `one site must not be averaged twice; stop the other worker of this site, or wait until its session ends (server.heartbeat_timeout_ms = ${cfg.server.heartbeat_timeout_ms})`;
          log.warn({ peer, site: live.site, live: live.workerId }, 'registration refused: the site already has a live session');
          return cb(grpcError(grpc.status.ALREADY_EXISTS, msg));
        }
      }
      const w = registry.add({
        site: req.site.trim(),
        device: caps.device || 'unknown',
        memoryBytes: caps.memoryBytes,
        backends: [...caps.backends],
        numTrainExamples: caps.numTrainExamples,
        numEvalExamples: caps.numEvalExamples,
        client: caps.client,
      });
      log.info({ worker: w.workerId, site: w.site, device: w.device, peer, train: w.numTrainExamples, eval: w.numEvalExamples }, 'worker registered');
      // Answered once the join record is on disk; registrations in flight share one fsync.
      void admission.admitted(w, admitted, peer).then(() =>
        cb(null, {
          workerId: w.workerId,
          sessionKey: w.sessionKey.toString('hex'),
          runId: ctx.run.runId,
          heartbeatIntervalMs: cfg.server.heartbeat_interval_ms,
          chunkBytes: cfg.server.chunk_bytes,
          maxChunkBytes: cfg.server.max_chunk_bytes,
          bulkPort: ctx.bulkPort?.() ?? 0,
        }),
      );
    },

    session(call: SessionStream) {
      let w: WorkerRecord;
      try {
        w = authenticate(call.metadata, call);
      } catch (err) {
        call.emit('error', statusOf(err));
        return;
      }
      registry.attach(w, call);
      registry.send(w, { body: { $case: 'accepted', value: { workerId: w.workerId, heartbeatIntervalMs: cfg.server.heartbeat_interval_ms } } });
      call.on('data', (msg: WorkerMessage) => {
        if (!w.alive) return;
        registry.touch(w);
        if (isWireRefusal(msg)) {
          // Telemetry (heartbeat, progress) is dropped and the session goes on; a refused result would be
          // lost without the worker knowing, so the session ends with INVALID_ARGUMENT naming the field.
          if (msg.topField === 'heartbeat' || msg.topField === 'progress') {
            const warned = telemetryWarned.get(w) ?? new Set<string>();
            telemetryWarned.set(w, warned);
            const key = msg.unrepresentable?.field ?? msg.message;
            if (!warned.has(key)) log.warn({ worker: w.workerId, site: w.site }, `${msg.topField} dropped (warned once per worker and field): ${msg.message}`);
            warned.add(key);
            return;
          }
          log.warn({ worker: w.workerId, site: w.site }, `session message refused, session closed: ${msg.message}`);
          call.emit('error', grpcError(grpc.status.INVALID_ARGUMENT, `${msg.message}; the session is closed (register again)`));
          return;
        }
        const b = msg.body;
        if (!b) return; // a case this build does not know (a newer worker): ignored
        switch (b.$case) {
          case 'heartbeat': {
            const status = STATUS_NAMES[b.value.status] ?? 'unknown';
            registry.touch(w, status);
            ctx.run.onHeartbeat(w, status);
            break;
          }
          case 'progress':
            ctx.run.onProgress(w, b.value);
            break;
          case 'taskFailed':
            ctx.run.onTaskFailed(w, b.value);
            break;
          case 'evalResult':
            ctx.run.onEvalResult(w, b.value);
            break;
          case 'secaggKeys':
          case 'secaggShares':
          case 'secaggUnmask':
            ctx.run.onSecAgg?.(w, b);
            break;
        }
      });
      const gone = (reason: string) => () => {
        if (w.stream === call) registry.detach(w, reason);
      };
      call.on('end', gone('session closed by the worker'));
      call.on('cancelled', gone('session cancelled (connection lost)'));
      call.on('error', (err: Error) => gone(`session error: ${err.message}`)());
    },

    download(call: grpc.ServerWritableStream<DownloadRequest, DownloadMessage>) {
      void (async () => {
        const w = authenticate(call.metadata, call);
        if (isWireRefusal(call.request)) throw refusalStatus(call.request);
        const { header, bytes, sha256, release } = transfers.download(w, call.request);
        // Each message is serialised (its bytes copied) by call.write: once the loop is left, nothing
        // reads `bytes`. A call cancelled while waiting for 'drain' never leaves it: released then.
        call.once('cancelled', release);
        try {
          const chunk = cfg.server.chunk_bytes;
          const write = (m: DownloadMessage): Promise<void> =>
            new Promise((resolve) => {
              if (call.write(m)) resolve();
              else call.once('drain', resolve);
            });
          await write({ body: { $case: 'header', value: header } });
          for (const c of chunkSlices(bytes, chunk)) {
            if (call.cancelled) return;
            await write({ body: { $case: 'chunk', value: { offset: c.offset, data: c.data } } });
          }
          await write({ body: { $case: 'trailer', value: { totalBytes: bytes.byteLength, sha256 } } });
        } finally {
          release();
        }
        call.end();
        transfers.downloaded(w, bytes.byteLength);
      })().catch((err: unknown) => call.emit('error', statusOf(err)));
    },

    upload(call: grpc.ServerReadableStream<UploadMessage, UploadAck>, cb: grpc.sendUnaryData<UploadAck>) {
      void (async () => {
        let w: WorkerRecord;
        try {
          w = authenticate(call.metadata, call);
        } catch (err) {
          return cb(statusOf(err));
        }
        // An upload slot is taken only once a header for an open task of this worker has been accepted,
        // and a stream that goes quiet is closed: streams that send nothing cannot hold the slots.
        let replied = false;
        const rx = transfers.upload(w, (err) => reply(err));
        const idleMs = cfg.server.upload_idle_timeout_sec * 1000;
        let idle: NodeJS.Timeout | null = null;
        const reply = (err: grpc.ServiceError | null, ack?: UploadAck): void => {
          if (replied) return;
          replied = true;
          if (idle) clearTimeout(idle);
          if (err) cb(err);
          else cb(null, ack);
        };
        const touch = (): void => {
          if (idle) clearTimeout(idle);
          idle = setTimeout(() => {
            if (replied) return;
            log.warn({ worker: w.workerId, task: rx.header?.taskId, received: rx.receivedBytes }, 'upload idle; closed');
            rx.drop();
            reply(grpcError(grpc.status.DEADLINE_EXCEEDED, `upload sent nothing for ${cfg.server.upload_idle_timeout_sec} s (server.upload_idle_timeout_sec); nothing of it was used`));
          }, idleMs);
          idle.unref();
        };
        touch();
        call.on('cancelled', () => {
          if (!replied) {
            log.warn({ worker: w.workerId, task: rx.header?.taskId, received: rx.receivedBytes }, 'upload broke off; partial update discarded');
            rx.drop();
            replied = true;
            if (idle) clearTimeout(idle);
          }
        });
        try {
          for await (const msg of call as AsyncIterable<UploadMessage>) {
            if (replied) return;
            touch();
            if (isWireRefusal(msg)) throw new UpdateRejected('INVALID_ARGUMENT', msg.message);
            const b = msg.body;
            if (!b) throw new UpdateRejected('INVALID_ARGUMENT', 'empty upload message');
            if (b.$case === 'header') {
              // Waiting for a slot is the coordinator's doing, not the sender's: no idle clock meanwhile.
              if (idle) clearTimeout(idle);
              await rx.begin(b.value, cfg.server.max_chunk_bytes);
              if (replied) {
                rx.drop();
                return;
              }
              touch();
            } else if (!rx.header) {
              throw new UpdateRejected('INVALID_ARGUMENT', `upload must start with a header (got ${b.$case})`);
            } else if (b.$case === 'chunk') {
              rx.push(b.value.offset, b.value.data);
            } else {
              reply(null, rx.finish(b.value));
              return;
            }
          }
          if (!replied) {
            // The client half-closed without a trailer.
            rx.drop();
            log.warn({ worker: w.workerId, task: rx.header?.taskId }, 'upload ended without a trailer; partial update discarded');
            reply(grpcError(grpc.status.DATA_LOSS, `upload ended after ${rx.receivedBytes} bytes without a trailer; nothing was used`));
          }
        } catch (err) {
          if (!replied && !call.cancelled) reply(rx.fail(err));
          else if (!replied) {
            rx.drop();
            reply(statusOf(err));
          }
        }
      })();
    },
  };
}
