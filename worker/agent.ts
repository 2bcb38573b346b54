/**
 * The worker agent: one site's side of a federated run.
 *
 *   GetRunInfo -> create the trainer (loads model + local data) -> Register
 *   (fingerprint, counts) -> Session: heartbeats up, tasks down; per task:
 *   Download the global adapter (cached by version) -> train or evaluate ->
 *   Upload the adapter in checked chunks. When the coordinator goes away the
 *   agent reconnects by itself with exponential backoff.
 *
 * Only adapters, example counts and aggregate metrics ever leave the site.
 */
import { readFileSync } from 'node:fs';
import { totalmem } from 'node:os';
import * as grpc from '@grpc/grpc-js';
import { SingleBar, Presets } from 'cli-progress';
import {
  ChunkAssembler,
  DEFAULT_CHUNK_BYTES,
  hex,
  manifestBytes,
  manifestOf,
  streamTensorMap,
  tensorViews,
  unpackTensorMap,
  bytesEqual,
  chunkSlices,
  sha256,
  type OutgoingStream,
  type TensorSpecEntry,
} from '../common/chunks.ts';
import { inspectModel } from '../common/hf-model.ts';
import { DTYPE_OF, fromWireManifest, PROTOCOL_VERSION, SESSION_KEY_HEADER, WORKER_ID_HEADER } from '../common/wire.ts';
import { logger } from '../common/log.ts';
import type { TensorMap } from '../common/tensor.ts';
import {
  CoordinatorClient,
  UpdateKind,
  WorkerStatus,
  type CoordinatorMessage,
  type DownloadMessage,
  type RegisterResponse,
  type RunInfo,
  type StepTask,
  type Task,
  type TrainingSpec,
  type UploadAck,
  type UploadHeader,
  type UploadMessage,
  type UpdateEncodingSpec,
  type WorkerMessage,
} from '../proto/gen/fedtune/v1/coordinator.ts';
import { createTrainer } from './trainers/index.ts';
import { isSecAggTask, SecAggSiteRunner } from './secagg-site.ts';
import { StepRunner } from './trainers/step.ts';
import { diagnoseTlsFailure } from './tls-errors.ts';
import { BulkClient, BulkTransportError } from './bulk.ts';
import { parseHostPort } from '../common/config.ts';
import { seqLenMismatch } from '../common/limits.ts';
import type { LocalTrainingSpec, Trainer, TrainerFactoryOptions } from './trainers/trainer.ts';
import { loraConfigFromSpec } from '../common/lora-spec.ts';
import { encodeUpdate, encodingFromWire, encodingToWire, ErrorFeedback, MAX_INT8_BLOCK_SIZE, type EncodedUpdate, type EncodingChoice } from '../common/update-encoding.ts';

const log = logger('worker');

export { PROTOCOL_VERSION } from '../common/wire.ts';
export const CLIENT_NAME = 'fedtune-ts/0.1.0';

/** A gRPC failure that retrying will not fix (bad token, wrong base model, bad arguments). */
export class FatalWorkerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FatalWorkerError';
  }
}

const FATAL_CODES = new Set<number>([grpc.status.UNAUTHENTICATED, grpc.status.FAILED_PRECONDITION, grpc.status.INVALID_ARGUMENT, grpc.status.PERMISSION_DENIED]);

export function isServiceError(err: unknown): err is grpc.ServiceError {
  return typeof err === 'object' && err !== null && 'code' in err && typeof (err as { code: unknown }).code === 'number' && 'details' in err;
}

export interface TlsClientOptions {
  /** PEM file of the CA that signed the coordinator's certificate (default: system roots). */
  caFile?: string;
  /** Client certificate and key for coordinators that require them (server.tls.client_ca). */
  certFile?: string;
  keyFile?: string;
  /** Name to check the certificate against when it differs from the address's host. */
  serverName?: string;
}

/** Thin typed wrapper over the generated client: every call of the wire contract. */
export class CoordinatorConnection {
  readonly client: CoordinatorClient;
  readonly address: string;
  private auth: grpc.Metadata | null = null;
  private readonly tls: TlsClientOptions | null;
  /** The coordinator's bulk tensor channel (RegisterResponse.bulk_port), while it is usable. */
  private bulk: BulkClient | null = null;
  /** false: transfers stay on the gRPC streams even when the coordinator offers its bulk channel. */
  private readonly useBulk: boolean;

  constructor(address: string, tls: TlsClientOptions | null = null, opts: { bulk?: boolean } = {}) {
    this.address = address;
    this.tls = tls;
    this.useBulk = opts.bulk ?? true;
    const creds = tls
      ? grpc.credentials.createSsl(
          tls.caFile ? readFileSync(tls.caFile) : null,
          tls.keyFile ? readFileSync(tls.keyFile) : null,
          tls.certFile ? readFileSync(tls.certFile) : null,
        )
      : grpc.credentials.createInsecure();
    const options: Partial<grpc.ClientOptions> = { 'grpc.keepalive_time_ms': 10_000, 'grpc.keepalive_timeout_ms': 5_000 };
    if (tls?.serverName) options['grpc.ssl_target_name_override'] = tls.serverName;
    this.client = new CoordinatorClient(address, creds, options);
  }

  getRunInfo(joinToken: string): Promise<RunInfo> {
    return new Promise((resolve, reject) => this.client.getRunInfo({ joinToken }, (err, r) => (err ? reject(err) : resolve(r!))));
  }

  async register(req: Parameters<CoordinatorClient['register']>[0]): Promise<RegisterResponse> {
    const r = await new Promise<RegisterResponse>((resolve, reject) => this.client.register(req, (err, res) => (err ? reject(err) : resolve(res!))));
    this.auth = new grpc.Metadata();
    this.auth.set(WORKER_ID_HEADER, r.workerId);
    this.auth.set(SESSION_KEY_HEADER, r.sessionKey);
    this.bulk = null;
    if (this.useBulk && r.bulkPort > 0) {
      let host: string | null = null;
      try {
        host = parseHostPort(this.address).host.replace(/^\[(.*)\]$/, '$1');
      } catch {
        log.warn({ address: this.address }, 'bulk tensor channel not used: the coordinator address is not HOST:PORT; transfers use the gRPC streams');
      }
      if (host !== null) this.bulk = new BulkClient(host, r.bulkPort, this.tls, { workerId: r.workerId, sessionKey: r.sessionKey });
    }
    return r;
  }

  /** Where transfers go: 'bulk HOST:PORT' or 'grpc'. */
  get transport(): string {
    return this.bulk ? `bulk ${this.bulk.endpoint}` : 'grpc';
  }

  /**
   * A transfer over the bulk channel when there is one; when it cannot be reached at all (a firewall,
   * a proxy that passes only gRPC), one warning and the gRPC streams from then on.
   */
  private async viaBulk<R>(bulkOp: (b: BulkClient) => Promise<R>, grpcOp: () => Promise<R>): Promise<R> {
    const b = this.bulk;
    if (!b) return grpcOp();
    try {
      return await bulkOp(b);
    } catch (err) {
      if (!(err instanceof BulkTransportError) || !err.beforeConnect) throw err;
      log.warn({ endpoint: b.endpoint, reason: err.message }, 'bulk tensor channel unreachable; transfers use the gRPC streams');
      if (this.bulk === b) this.bulk = null;
      return grpcOp();
    }
  }

  private metadata(): grpc.Metadata {
    if (!this.auth) throw new Error('not registered: call register() first');
    return this.auth.clone();
  }

  session(): grpc.ClientDuplexStream<WorkerMessage, CoordinatorMessage> {
    return this.client.session(this.metadata());
  }

  /** Download a global adapter version; the digest is checked before it is returned. */
  async downloadAdapter(
    version: number,
    maxChunkBytes: number,
    rank = 0,
    /** Memory the adapter may be read into (bulk channel; used when the size matches). Its old contents are lost. */
    reuse: Uint8Array | null = null,
    /** The size the task announced (AdapterRef.total_bytes): a stream announcing more is refused before anything is allocated. */
    expectBytes?: number,
  ): Promise<{ adapter: TensorMap; bytes: number; sha256: Uint8Array; buffer: Uint8Array | null }> {
    return this.viaBulk(
      async (b) => {
        const what = `global adapter v${version}`;
        const got = await b.download({ target: { $case: 'adapterVersion', value: version }, adapterRank: rank }, what, expectBytes ?? Number.MAX_SAFE_INTEGER, reuse);
        const h = got.header;
        if (h.content?.$case !== 'tensors') throw new Error('download: header does not describe tensors');
        const manifest = fromWireManifest(h.content.value, (m) => new Error(`download: ${m}`));
        return { adapter: unpackTensorMap(manifest, got.bytes), bytes: got.bytes.byteLength, sha256: got.sha256, buffer: got.bytes as Uint8Array | null };
      },
      async () => ({ ...(await this.downloadAdapterGrpc(version, maxChunkBytes, rank, expectBytes)), buffer: null as Uint8Array | null }),
    );
  }

  private async downloadAdapterGrpc(version: number, maxChunkBytes: number, rank: number, expectBytes?: number): Promise<{ adapter: TensorMap; bytes: number; sha256: Uint8Array }> {
    const stream = this.client.download({ target: { $case: 'adapterVersion', value: version }, adapterRank: rank }, this.metadata());
    let asm: ChunkAssembler | null = null;
    let manifest: TensorSpecEntry[] = [];
    for await (const msg of stream as AsyncIterable<DownloadMessage>) {
      const b = msg.body;
      if (!b) continue;
      if (b.$case === 'header') {
        const h = b.value;
        if (h.content?.$case !== 'tensors') throw new Error('download: header does not describe tensors');
        manifest = fromWireManifest(h.content.value, (m) => new Error(`download: ${m}`));
        asm = new ChunkAssembler({ totalBytes: h.totalBytes, maxChunkBytes, what: `global adapter v${version}`, ...(expectBytes !== undefined ? { maxTotalBytes: expectBytes } : {}) });
      } else if (b.$case === 'chunk') {
        if (!asm) throw new Error('download: chunk before header');
        asm.push(b.value.offset, b.value.data);
      } else {
        if (!asm) throw new Error('download: trailer before header');
        const bytes = asm.finish(b.value);
        return { adapter: unpackTensorMap(manifest, bytes), bytes: bytes.byteLength, sha256: b.value.sha256 };
      }
    }
    throw new Error(`download of global adapter v${version} ended before its trailer`);
  }

  /** Download a data shard (distributed mode); the digest is checked before it is returned. */
  async downloadShard(shardId: string, maxChunkBytes: number): Promise<{ bytes: Uint8Array; mediaType: string; sha256: Uint8Array }> {
    return this.viaBulk(
      async (b) => {
        const got = await b.download({ target: { $case: 'dataShardId', value: shardId }, adapterRank: 0 }, `data shard ${shardId}`);
        if (got.header.content?.$case !== 'blob') throw new Error(`download of data shard ${shardId}: header does not describe a blob`);
        return { bytes: got.bytes, mediaType: got.header.content.value.mediaType, sha256: got.sha256 };
      },
      () => this.downloadShardGrpc(shardId, maxChunkBytes),
    );
  }

  private async downloadShardGrpc(shardId: string, maxChunkBytes: number): Promise<{ bytes: Uint8Array; mediaType: string; sha256: Uint8Array }> {
    const stream = this.client.download({ target: { $case: 'dataShardId', value: shardId }, adapterRank: 0 }, this.metadata());
    let asm: ChunkAssembler | null = null;
    let mediaType = '';
    for await (const msg of stream as AsyncIterable<DownloadMessage>) {
      const b = msg.body;
      if (!b) continue;
      if (b.$case === 'header') {
        if (b.value.content?.$case !== 'blob') throw new Error(`download of data shard ${shardId}: header does not describe a blob`);
        mediaType = b.value.content.value.mediaType;
        asm = new ChunkAssembler({ totalBytes: b.value.totalBytes, maxChunkBytes, what: `data shard ${shardId}` });
      } else if (b.$case === 'chunk') {
        if (!asm) throw new Error('download: chunk before header');
        asm.push(b.value.offset, b.value.data);
      } else {
        if (!asm) throw new Error('download: trailer before header');
        return { bytes: asm.finish(b.value), mediaType, sha256: b.value.sha256 };
      }
    }
    throw new Error(`download of data shard ${shardId} ended before its trailer`);
  }

  /**
   * Upload one update: header, chunks (respecting flow control), trailer.
   * `onChunk` runs after each chunk is handed to gRPC (used for fault injection in tests).
   */
  upload(
    header: { taskId: string; round: number; kind: UpdateKind; baseVersion: number; numExamples: number; metrics: Record<string, number> },
    tensors: TensorMap | EncodedUpdate,
    opts: { chunkBytes?: number; onChunk?: (index: number, total: number) => void; corrupt?: boolean } = {},
  ): Promise<UploadAck> {
    const chunkBytes = opts.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    // A tensor map goes as float32 (no encoding field: what every coordinator accepts); an encoded update with its encoding.
    // gRPC chunks have one fixed size (only the last is shorter); the bulk channel frames nothing, so it sends the
    // tensors' own memory as it is.
    const grpcStream = (): OutgoingStream => (tensors instanceof Map ? streamTensorMap(tensors, chunkBytes) : encodedStream(tensors, chunkBytes));
    const bulkStream = (): OutgoingStream => (tensors instanceof Map ? tensorViews(tensors, chunkBytes) : encodedStream(tensors, chunkBytes));
    const encodingFields = tensors instanceof Map ? {} : { encoding: encodingToWire(tensors.encoding), ...(tensors.encoding === 'int8_delta' ? { blockSize: tensors.blockSize } : {}) };
    const manifest = tensors instanceof Map ? manifestOf(tensors) : tensors.manifest;
    const totalBytes = tensors instanceof Map ? manifestBytes(manifest) : tensors.bytes.byteLength;
    const fullHeader: UploadHeader = {
      ...header,
      ...encodingFields,
      stream: {
        totalBytes,
        chunkBytes,
        content: { $case: 'tensors', value: { tensors: manifest.map((e) => ({ name: e.name, dtype: DTYPE_OF[e.dtype], shape: e.shape })) } },
      },
    };
    // Fault injection (tests): one flipped byte in the first chunk, as a bad link would; the digest then differs.
    function* sent(stream: OutgoingStream): Generator<{ offset: number; data: Uint8Array }> {
      let i = 0;
      for (const c of stream.chunks()) {
        const data = opts.corrupt && i === 0 ? Uint8Array.from(c.data, (b, k) => (k === 0 ? b ^ 0xff : b)) : c.data;
        yield { offset: c.offset, data };
        opts.onChunk?.(i++, stream.count);
      }
    }
    return this.viaBulk(
      (b) => {
        const stream = bulkStream();
        return b.upload(fullHeader, sent(stream), () => stream.sha256(), `task ${header.taskId}`);
      },
      () => {
        const stream = grpcStream();
        return this.uploadGrpc(fullHeader, () => sent(stream), () => stream.sha256());
      },
    );
  }

  private uploadGrpc(fullHeader: UploadHeader, sent: () => Generator<{ offset: number; data: Uint8Array }>, digest: () => Uint8Array): Promise<UploadAck> {
    const totalBytes = fullHeader.stream!.totalBytes;
    return new Promise<UploadAck>((resolve, reject) => {
      const call = this.client.upload(this.metadata(), (err, ack) => (err ? reject(err) : resolve(ack!)));
      const write = (m: UploadMessage): Promise<void> =>
        new Promise((res) => {
          if (call.write(m)) res();
          else call.once('drain', res);
        });
      void (async () => {
        await write({ body: { $case: 'header', value: fullHeader } });
        for (const c of sent()) await write({ body: { $case: 'chunk', value: c } });
        await write({ body: { $case: 'trailer', value: { totalBytes, sha256: digest() } } });
        call.end();
      })().catch((err: unknown) => {
        call.cancel();
        reject(err instanceof Error ? err : new Error(String(err)));
      });
    });
  }

  close(): void {
    this.client.close();
  }
}

/** The chunks and digest of an encoded update's bytes, shaped like streamTensorMap's. */
function encodedStream(u: EncodedUpdate, chunkBytes: number): OutgoingStream {
  return {
    manifest: u.manifest,
    totalBytes: u.bytes.byteLength,
    count: Math.ceil(u.bytes.byteLength / chunkBytes),
    *chunks() {
      yield* chunkSlices(u.bytes, chunkBytes);
    },
    sha256: () => sha256(u.bytes),
  };
}

/**
 * The encoding a worker uploads a train task's update in: the one the task asks for when this
 * worker implements it and the task accepts it, else float32 (a coordinator that predates
 * encodings sends no UpdateEncodingSpec).
 */
export function uploadEncodingFor(spec: UpdateEncodingSpec | undefined): EncodingChoice {
  const plain: EncodingChoice = { encoding: 'float32', blockSize: 0, errorFeedback: false };
  if (!spec) return plain;
  const e = encodingFromWire(spec.encoding);
  if (!e || e === 'float32' || !spec.accepted.includes(spec.encoding)) return plain;
  if (e === 'int8_delta' && !(Number.isInteger(spec.blockSize) && spec.blockSize >= 1 && spec.blockSize <= MAX_INT8_BLOCK_SIZE)) return plain;
  return { encoding: e, blockSize: e === 'int8_delta' ? spec.blockSize : 0, errorFeedback: e === 'int8_delta' && spec.errorFeedback };
}

export function localSpecOf(s: TrainingSpec): LocalTrainingSpec {
  const schedule = s.schedule === 'linear' || s.schedule === 'cosine' ? s.schedule : 'constant';
  return {
    lora: loraConfigFromSpec(s.lora),
    steps: s.steps ?? null,
    epochs: s.epochs ?? null,
    batchSize: s.batchSize,
    gradAccumulation: Math.max(1, s.gradAccumulation),
    lr: s.lr,
    schedule,
    warmupSteps: s.warmupSteps,
    scheduleRound: s.scheduleRound ?? 0,
    scheduleRounds: s.scheduleRounds ?? 0,
    keepOptimizerState: s.keepOptimizerState ?? false,
    weightDecay: s.weightDecay,
    maxGradNorm: s.maxGradNorm,
    maxSeqLen: s.maxSeqLen,
    template: s.template,
    seed: s.seed,
    proxMu: s.proxMu ?? 0,
    freezeLoraA: s.freezeLoraA ?? false,
    loraPlusRatio: s.loraPlusRatio > 0 ? s.loraPlusRatio : 1, // unset (0) on the wire: plain LoRA
    dpSgd: s.dpSgd ? { maxGradNorm: s.dpSgd.maxGradNorm, noiseMultiplier: s.dpSgd.noiseMultiplier, sampleRate: s.dpSgd.sampleRate } : null,
  };
}

export interface WorkerAgentOptions {
  /** HOST:PORT of the coordinator. */
  coordinator: string;
  token: string;
  /** Site name shown on the dashboard. */
  site: string;
  /** Trainer backend: onnx (default) or noop. */
  trainer: string;
  /** Where the trainer finds the model and the local data. template/maxSeqLen default to the run's. */
  trainerOptions: Omit<TrainerFactoryOptions, 'template' | 'maxSeqLen'> & { template?: string; maxSeqLen?: number };
  tls?: TlsClientOptions | null;
  /** false: transfers stay on the gRPC streams even when the coordinator offers its bulk tensor channel (default true). */
  bulk?: boolean;
  /** Reconnect backoff: first delay, cap, and how long to keep trying before giving up. */
  reconnect?: { initialMs?: number; maxMs?: number; giveUpAfterMs?: number };
  /** Progress display: a bar on a terminal, log lines otherwise. */
  progress?: 'bar' | 'log' | 'none';
  /** Test hook: kill this process (SIGKILL) after sending half of an upload's chunks. */
  faultKillMidUpload?: boolean;
  /** Test hook: corrupt one byte of the first upload attempt of every task (the retry is clean). */
  faultCorruptUpload?: boolean;
  /** Use an existing trainer instead of creating one (in-process benchmarks). */
  trainerInstance?: Trainer;
  /** Called when the worker starts or stops working on a task of run `runId` (presence announcements). */
  onActivity?: (activity: 'idle' | 'training', runId: string) => void;
}

export interface WorkerRunResult {
  state: string;
  message: string;
  tasksDone: number;
}

type SessionEnd = { kind: 'finished'; state: string; message: string } | { kind: 'lost'; error: Error };

/** Runs one site until the run finishes, a fatal error occurs, or `signal` aborts. */
export class WorkerAgent {
  private readonly opts: WorkerAgentOptions;
  private trainer: Trainer | null = null;
  private cache: { version: number; adapter: TensorMap; sha256: Uint8Array; bytes: Uint8Array | null } | null = null;
  /** int8_delta error feedback: this process's quantisation residuals of the current run (in memory only). */
  private readonly feedback = new ErrorFeedback();
  private tasksDone = 0;
  /** Distributed mode: shard cache and local SGD state, created with the trainer. */
  private steps: StepRunner | null = null;
  /** Secure aggregation: the site's state of the current round attempts. */
  private secagg: SecAggSiteRunner | null = null;

  constructor(opts: WorkerAgentOptions) {
    this.opts = opts;
  }

  async run(signal?: AbortSignal): Promise<WorkerRunResult> {
    const initial = this.opts.reconnect?.initialMs ?? 500;
    const cap = this.opts.reconnect?.maxMs ?? 10_000;
    const giveUp = this.opts.reconnect?.giveUpAfterMs ?? 10 * 60_000;
    let delay = initial;
    let downSince: number | null = null;
    let previousId = '';
    try {
      for (;;) {
        signal?.throwIfAborted();
        const conn = new CoordinatorConnection(this.opts.coordinator, this.opts.tls ?? null, { bulk: this.opts.bulk ?? true });
        try {
          const info = await conn.getRunInfo(this.opts.token);
          if (info.protocolVersion !== PROTOCOL_VERSION) {
            throw new FatalWorkerError(
              `coordinator ${this.opts.coordinator} speaks fedtune protocol version ${info.protocolVersion || '0 (unset)'}, this worker (${CLIENT_NAME}) speaks version ${PROTOCOL_VERSION}: use a worker built for the coordinator's version (docs/protocol.md)`,
            );
          }
          await this.ensureTrainer(info);
          const reg = await this.register(conn, info, previousId);
          previousId = reg.workerId;
          delay = initial;
          downSince = null;
          const end = await this.session(conn, reg, signal);
          if (end.kind === 'finished' && end.state === 'stopped' && !signal?.aborted) {
            // A planned stop or restart of the coordinator: the run is not over. Reconnect with backoff.
            throw new Error(`coordinator stopped the run for now${end.message ? ` (${end.message})` : ''}`);
          }
          if (end.kind === 'finished') {
            log.info({ state: end.state }, `run ${end.state}${end.message ? `: ${end.message}` : ''}; worker exiting`);
            return { state: end.state, message: end.message, tasksDone: this.tasksDone };
          }
          throw end.error;
        } catch (err) {
          if (signal?.aborted) throw signal.reason;
          if (err instanceof FatalWorkerError) throw err;
          if (isServiceError(err) && FATAL_CODES.has(err.code)) throw new FatalWorkerError(err.details || err.message);
          // Never connected yet: a TLS or certificate failure is fatal (worker/tls-errors.ts); after one, a restart may be under way.
          if (previousId === '' && isServiceError(err) && err.code === grpc.status.UNAVAILABLE) {
            const tlsFailure = await diagnoseTlsFailure(this.opts.coordinator, this.opts.tls ?? null, err);
            if (tlsFailure) throw new FatalWorkerError(tlsFailure.message);
          }
          downSince ??= Date.now();
          if (Date.now() - downSince > giveUp) {
            throw new Error(`coordinator ${this.opts.coordinator} unreachable for ${Math.round(giveUp / 1000)} s, giving up (last error: ${(err as Error).message})`);
          }
          const wait = Math.round(delay * (0.75 + Math.random() * 0.5));
          log.warn({ coordinator: this.opts.coordinator, retryInMs: wait }, `connection to the coordinator lost or refused: ${(err as Error).message}`);
          await new Promise<void>((r) => {
            const done = (): void => {
              clearTimeout(t);
              signal?.removeEventListener('abort', done);
              r();
            };
            const t = setTimeout(done, wait);
            signal?.addEventListener('abort', done, { once: true });
          });
          delay = Math.min(cap, delay * 2);
        } finally {
          conn.close();
        }
      }
    } finally {
      if (this.trainer && !this.opts.trainerInstance) await this.trainer.close();
    }
  }

  private async ensureTrainer(info: RunInfo): Promise<void> {
    if (info.mode !== 'distributed' && !this.opts.trainerOptions.dataPath && !this.opts.trainerInstance) {
      throw new FatalWorkerError(`run ${info.runName} is federated: pass --data with this site's training data (only distributed runs send workers their data)`);
    }
    if (this.trainer) return;
    if (this.opts.trainerInstance) {
      this.trainer = this.opts.trainerInstance;
      return;
    }
    const t = info.training;
    const o = this.opts.trainerOptions;
    const mismatch = seqLenMismatch(o.maxSeqLen, t?.maxSeqLen);
    if (mismatch) throw new FatalWorkerError(`run ${info.runName}: ${mismatch}`);
    const factory: TrainerFactoryOptions = {
      ...o,
      template: o.template ?? t?.template ?? 'alpaca',
      maxSeqLen: o.maxSeqLen ?? t?.maxSeqLen ?? 256,
      site: this.opts.site,
    };
    log.info({ backend: this.opts.trainer, model: factory.modelDir, data: factory.dataPath }, 'loading model and local data');
    try {
      this.trainer = await createTrainer(this.opts.trainer, factory);
    } catch (err) {
      throw new FatalWorkerError(`cannot start the ${this.opts.trainer} trainer: ${(err as Error).message}`);
    }
    log.info(
      {
        backend: this.trainer.backend,
        device: this.trainer.device,
        ...(factory.computeDtype ? { computeDtype: factory.computeDtype } : {}),
        train: this.trainer.numTrainExamples,
        eval: this.trainer.numEvalExamples,
      },
      'trainer ready',
    );
  }

  private async register(conn: CoordinatorConnection, info: RunInfo, previousWorkerId: string): Promise<RegisterResponse> {
    const tr = this.trainer!;
    let fingerprint = tr.modelFingerprint;
    if (fingerprint === undefined && this.opts.trainerOptions.modelDir) {
      fingerprint = (await inspectModel(this.opts.trainerOptions.modelDir)).fingerprint;
    }
    if (info.modelFingerprint && fingerprint && info.modelFingerprint !== fingerprint) {
      log.error({ local: fingerprint, run: info.modelFingerprint }, 'base model fingerprint differs from the run; the coordinator will refuse this worker');
    }
    const reg = await conn.register({
      joinToken: this.opts.token,
      site: this.opts.site,
      previousWorkerId,
      capabilities: {
        device: tr.device,
        memoryBytes: totalmem(),
        backends: [tr.backend],
        modelFingerprint: fingerprint ?? '',
        numTrainExamples: tr.numTrainExamples,
        numEvalExamples: tr.numEvalExamples,
        client: CLIENT_NAME,
        protocolVersion: PROTOCOL_VERSION,
      },
    });
    log.info({ workerId: reg.workerId, run: info.runName, coordinator: conn.address }, 'registered');
    return reg;
  }

  /** One session: heartbeats, tasks one at a time, until the run finishes or the connection breaks. */
  private session(conn: CoordinatorConnection, reg: RegisterResponse, signal?: AbortSignal): Promise<SessionEnd> {
    return new Promise<SessionEnd>((resolve) => {
      const call = conn.session();
      let status = WorkerStatus.WORKER_STATUS_IDLE;
      let currentTask = '';
      let ended = false;
      const queue: Task[] = [];
      const controllers = new Map<string, AbortController>();
      const send = (m: WorkerMessage): void => {
        if (!ended && !call.writableEnded) call.write(m);
      };
      const heartbeat = (): void =>
        send({ body: { $case: 'heartbeat', value: { status, taskId: currentTask, memoryUsedBytes: process.memoryUsage().rss } } });
      const setStatus = (s: WorkerStatus, taskId = currentTask): void => {
        const wasIdle = status === WorkerStatus.WORKER_STATUS_IDLE;
        status = s;
        currentTask = taskId;
        heartbeat();
        const idle = s === WorkerStatus.WORKER_STATUS_IDLE;
        if (idle !== wasIdle) this.opts.onActivity?.(idle ? 'idle' : 'training', reg.runId);
      };
      const timer = setInterval(heartbeat, Math.max(50, reg.heartbeatIntervalMs));
      const finish = (e: SessionEnd): void => {
        if (ended) return;
        ended = true;
        clearInterval(timer);
        signal?.removeEventListener('abort', onAbort);
        for (const c of controllers.values()) c.abort(new Error('session ended'));
        try {
          call.end();
        } catch {
          /* already closed */
        }
        call.cancel();
        resolve(e);
      };
      const onAbort = (): void => finish({ kind: 'finished', state: 'stopped', message: 'worker stopped' });
      signal?.addEventListener('abort', onAbort, { once: true });

      let busy = false;
      const pump = async (): Promise<void> => {
        if (busy) return;
        busy = true;
        try {
          while (!ended && queue.length > 0) {
            const task = queue.shift()!;
            const ctl = new AbortController();
            controllers.set(task.taskId, ctl);
            try {
              await this.handleTask(conn, reg, task, ctl.signal, setStatus, send);
              this.tasksDone++;
            } catch (err) {
              const reason = (ctl.signal.reason as Error)?.message ?? 'by the coordinator';
              // A trainer that says more than the reason (e.g. the exec trainer's stderr) keeps its words.
              const detail = err !== ctl.signal.reason && (err as Error)?.message && !(err as Error).message.startsWith(reason) ? `; ${(err as Error).message}` : '';
              const message = ctl.signal.aborted ? `cancelled: ${reason}${detail}` : (err as Error).message;
              if (!ended) {
                log.warn({ task: task.taskId }, `task failed: ${message}`);
                send({ body: { $case: 'taskFailed', value: { taskId: task.taskId, message, unsupported: false } } });
              }
            } finally {
              controllers.delete(task.taskId);
              setStatus(WorkerStatus.WORKER_STATUS_IDLE, '');
            }
          }
        } finally {
          busy = false;
        }
      };

      call.on('data', (msg: CoordinatorMessage) => {
        const b = msg.body;
        if (!b) return;
        switch (b.$case) {
          case 'accepted':
            log.info({ workerId: b.value.workerId }, 'session open; waiting for tasks');
            heartbeat();
            break;
          case 'task':
            queue.push(b.value);
            void pump();
            break;
          case 'cancel': {
            const i = queue.findIndex((t) => t.taskId === b.value.taskId);
            if (i >= 0) queue.splice(i, 1);
            controllers.get(b.value.taskId)?.abort(new Error(b.value.reason || 'cancelled by the coordinator'));
            log.warn({ task: b.value.taskId }, `task cancelled: ${b.value.reason}`);
            break;
          }
          case 'finished':
            finish({ kind: 'finished', state: b.value.state, message: b.value.message });
            break;
        }
      });
      call.on('error', (err: Error) => finish({ kind: 'lost', error: err }));
      call.on('end', () => finish({ kind: 'lost', error: new Error('session closed by the coordinator') }));
    });
  }

  private async fetchGlobal(conn: CoordinatorConnection, reg: RegisterResponse, task: Task): Promise<TensorMap> {
    const g = task.global;
    if (!g) throw new Error(`task ${task.taskId} names no global adapter`);
    if (this.cache && this.cache.version === g.version && bytesEqual(this.cache.sha256, g.sha256)) return this.cache.adapter;
    // Tasks run one at a time and none keeps the adapter it started from, so the new version may be read into the
    // old one's memory (no fresh pages to fault in); the cache is cleared first, as the download overwrites it.
    const reuse = this.cache?.bytes ?? null;
    this.cache = null;
    const got = await conn.downloadAdapter(g.version, reg.maxChunkBytes, g.rank, reuse, g.totalBytes || undefined);
    if (!bytesEqual(got.sha256, g.sha256)) {
      throw new Error(`global adapter v${g.version}: digest ${hex(got.sha256)} differs from the task's ${hex(g.sha256)}`);
    }
    this.cache = { version: g.version, adapter: got.adapter, sha256: got.sha256, bytes: got.buffer };
    log.info({ version: g.version, bytes: got.bytes, transport: conn.transport }, 'global adapter downloaded');
    return got.adapter;
  }

  private async handleTask(
    conn: CoordinatorConnection,
    reg: RegisterResponse,
    task: Task,
    signal: AbortSignal,
    setStatus: (s: WorkerStatus, taskId?: string) => void,
    send: (m: WorkerMessage) => void,
  ): Promise<void> {
    const tr = this.trainer!;
    const kind = task.kind;
    if (isSecAggTask(task)) {
      this.secagg ??= new SecAggSiteRunner();
      const chunkBytes = reg.chunkBytes || DEFAULT_CHUNK_BYTES;
      await this.secagg.handle(task, {
        signal,
        send,
        fetchGlobal: async (t) => {
          setStatus(WorkerStatus.WORKER_STATUS_FETCHING, t.taskId);
          return this.fetchGlobal(conn, reg, t);
        },
        train: (t, s, global) => {
          setStatus(WorkerStatus.WORKER_STATUS_TRAINING, t.taskId);
          return tr.train({ taskId: t.taskId, runId: reg.runId, round: t.round, globalAdapter: global, spec: localSpecOf(s), signal, onProgress: (p) => send({ body: { $case: 'progress', value: { taskId: t.taskId, ...p } } }) });
        },
        upload: async (h, tensors) => {
          setStatus(WorkerStatus.WORKER_STATUS_UPLOADING, h.taskId);
          try {
            return await conn.upload(h, tensors, { chunkBytes });
          } catch (err) {
            if (isServiceError(err) && err.code === grpc.status.DATA_LOSS) return conn.upload(h, tensors, { chunkBytes });
            throw new Error(`upload refused: ${isServiceError(err) ? err.details : (err as Error).message}`);
          }
        },
      });
      return;
    }
    if (kind?.$case === 'step') {
      if (!tr.computeGradients && !tr.localSteps) {
        const message = `the ${tr.backend} trainer supports federated rounds only: it can neither compute gradients nor take local steps, which distributed runs need (use --trainer onnx)`;
        send({ body: { $case: 'taskFailed', value: { taskId: task.taskId, message, unsupported: true } } });
        return;
      }
      await this.handleStep(conn, reg, task, kind.value, signal, setStatus);
      return;
    }
    if (!kind || (kind.$case !== 'train' && kind.$case !== 'eval')) {
      send({ body: { $case: 'taskFailed', value: { taskId: task.taskId, message: `task kind ${task.kind?.$case ?? '(none)'} is not supported by ${CLIENT_NAME}`, unsupported: true } } });
      return;
    }
    setStatus(WorkerStatus.WORKER_STATUS_FETCHING, task.taskId);
    const global = await this.fetchGlobal(conn, reg, task);
    signal.throwIfAborted();
    const spec = localSpecOf(kind.value.spec ?? ({} as TrainingSpec));

    if (kind.$case === 'eval') {
      setStatus(WorkerStatus.WORKER_STATUS_EVALUATING, task.taskId);
      const ev = await tr.evaluate({ globalAdapter: global, spec, signal });
      send({
        body: {
          $case: 'evalResult',
          value: {
            taskId: task.taskId,
            hasEvalData: ev !== null,
            evalLoss: ev?.evalLoss ?? 0,
            evalTokens: ev?.evalTokens ?? 0,
            evalExamples: ev?.evalExamples ?? 0,
            ...(ev?.evalAccuracy != null ? { evalAccuracy: ev.evalAccuracy } : {}),
          },
        },
      });
      if (ev) log.info({ round: task.round, evalLoss: ev.evalLoss, evalAccuracy: ev.evalAccuracy }, 'evaluation done');
      return;
    }

    setStatus(WorkerStatus.WORKER_STATUS_TRAINING, task.taskId);
    const bar = this.progressBar(task.round);
    let lastSent = 0;
    const outcome = await tr.train({
      taskId: task.taskId,
      runId: reg.runId,
      round: task.round,
      globalAdapter: global,
      spec,
      signal,
      onProgress: (p) => {
        bar.update(p.step, p.totalSteps, p.loss);
        const now = Date.now();
        if (now - lastSent >= 250 || p.step === p.totalSteps) {
          lastSent = now;
          send({ body: { $case: 'progress', value: { taskId: task.taskId, ...p } } });
        }
      },
    }).finally(() => bar.stop());
    signal.throwIfAborted();

    setStatus(WorkerStatus.WORKER_STATUS_UPLOADING, task.taskId);
    const header = {
      taskId: task.taskId,
      round: task.round,
      kind: UpdateKind.UPDATE_KIND_ADAPTER_WEIGHTS,
      baseVersion: task.global!.version,
      numExamples: outcome.numExamples,
      metrics: outcome.metrics,
    };
    const chunkBytes = reg.chunkBytes || DEFAULT_CHUNK_BYTES;
    const onChunk = this.opts.faultKillMidUpload
      ? (i: number, total: number) => {
          if (i + 1 >= Math.max(1, Math.floor(total / 2))) process.kill(process.pid, 'SIGKILL');
        }
      : undefined;
    // round.update_encoding: compress the update as the task asks (int8_delta against the adapter
    // the task started from, with this run's error-feedback residual when asked).
    const choice = uploadEncodingFor(kind.value.encoding);
    const body: TensorMap | EncodedUpdate =
      choice.encoding === 'float32'
        ? outcome.adapter
        : encodeUpdate(outcome.adapter, {
            encoding: choice.encoding,
            blockSize: choice.blockSize,
            start: global,
            residual: choice.errorFeedback ? this.feedback.take(reg.runId) : null,
            errorFeedback: choice.errorFeedback,
          });
    let ack: UploadAck;
    try {
      ack = await conn.upload(header, body, { chunkBytes, ...(onChunk ? { onChunk } : {}), corrupt: this.opts.faultCorruptUpload === true });
    } catch (err) {
      // One retry for corruption in transit; anything else is reported as a task failure.
      if (isServiceError(err) && err.code === grpc.status.DATA_LOSS) ack = await conn.upload(header, body, { chunkBytes });
      else throw new Error(`upload refused: ${isServiceError(err) ? err.details : (err as Error).message}`);
    }
    // The residual counts only once the coordinator has accepted the update it belongs to.
    if (!(body instanceof Map) && body.residual) this.feedback.commit(reg.runId, body.residual);
    log.info({ round: task.round, bytes: ack.bytes, transport: conn.transport, encoding: choice.encoding, examples: outcome.numExamples, trainLoss: outcome.metrics.train_loss }, 'update uploaded');
  }

  /** Distributed mode: gradients (or local SGD delta) of the task's micro-batches, uploaded in checked chunks. */
  private async handleStep(
    conn: CoordinatorConnection,
    reg: RegisterResponse,
    task: Task,
    step: StepTask,
    signal: AbortSignal,
    setStatus: (s: WorkerStatus, taskId?: string) => void,
  ): Promise<void> {
    this.steps ??= new StepRunner(this.trainer!, { modelDir: this.opts.trainerOptions.modelDir, runId: reg.runId, localSpec: localSpecOf });
    const chunkBytes = reg.chunkBytes || DEFAULT_CHUNK_BYTES;
    const onChunk = this.opts.faultKillMidUpload
      ? (i: number, total: number) => {
          if (i + 1 >= Math.max(1, Math.floor(total / 2))) process.kill(process.pid, 'SIGKILL');
        }
      : undefined;
    const phase = { fetching: WorkerStatus.WORKER_STATUS_FETCHING, training: WorkerStatus.WORKER_STATUS_TRAINING, uploading: WorkerStatus.WORKER_STATUS_UPLOADING };
    const r = await this.steps.run(
      step,
      {
        fetchGlobal: () => this.fetchGlobal(conn, reg, task),
        downloadShard: async (shardId, sha) => {
          const got = await conn.downloadShard(shardId, reg.maxChunkBytes);
          if (!bytesEqual(got.sha256, sha)) throw new Error(`data shard ${shardId}: digest ${hex(got.sha256)} differs from the task's ${hex(sha)}`);
          return got.bytes;
        },
        upload: async (h, tensors) => {
          const header = { taskId: task.taskId, round: task.round, kind: h.kind, baseVersion: task.global!.version, numExamples: h.numExamples, metrics: h.metrics };
          try {
            return await conn.upload(header, tensors, { chunkBytes, ...(onChunk ? { onChunk } : {}) });
          } catch (err) {
            if (isServiceError(err) && err.code === grpc.status.DATA_LOSS) return conn.upload(header, tensors, { chunkBytes });
            throw new Error(`upload refused: ${isServiceError(err) ? err.details : (err as Error).message}`);
          }
        },
      },
      signal,
      (p) => setStatus(phase[p], task.taskId),
    );
    log.debug({ step: Number(step.step) + 1, kind: UpdateKind[r.kind], bytes: r.bytes, tokens: r.metrics.tokens }, 'step uploaded');
  }

  private progressBar(round: number): { update(step: number, total: number, loss: number): void; stop(): void } {
    const mode = this.opts.progress ?? (process.stdout.isTTY ? 'bar' : 'log');
    if (mode === 'none') return { update() {}, stop() {} };
    if (mode === 'bar') {
      const bar = new SingleBar(
        { format: `round ${round} |{bar}| {value}/{total} steps | loss {loss} | {eta_formatted} left`, hideCursor: true, clearOnComplete: false },
        Presets.shades_classic,
      );
      let started = false;
      return {
        update(step, total, loss) {
          if (!started) {
            bar.start(total, 0, { loss: '-' });
            started = true;
          }
          bar.update(step, { loss: loss.toFixed(4) });
        },
        stop() {
          if (started) bar.stop();
        },
      };
    }
    let lastPct = -1;
    return {
      update(step, total, loss) {
        const pct = Math.floor((step / total) * 10) * 10;
        if (pct !== lastPct) {
          lastPct = pct;
          log.info({ round, step, total, loss: Number(loss.toFixed(4)) }, `training ${pct}%`);
        }
      },
      stop() {},
    };
  }
}
