/**
 * The federated round loop. Round k:
 *
 *   wait for cohort.min_workers -> strategy.configureFit picks the cohort and
 *   each worker's spec -> a TrainTask goes down each chosen worker's session,
 *   naming the adapter it starts from (strategy.startAdapter) -> updates arrive
 *   (service.ts checks the stream; beginUpdate/acceptUpdate check the task,
 *   shapes, values, norm and weight and hand the update to the strategy's
 *   aggregator) -> all in, or the deadline passes (stragglers are cancelled) ->
 *   at least round.min_results? strategy.aggregateFit : retry the round (never
 *   skipped silently) -> checkpoint atomically -> evaluation on the workers
 *   strategy.configureEvaluate picks -> round.completed.
 *
 * The loop owns timing, quorum, retries, the defences every strategy gets and
 * checkpoints; the strategy owns every decision about who and how. The loop
 * never touches sockets: service.ts calls in with what arrived and the
 * registry sends what goes out.
 */
import { randomBytes } from 'node:crypto';
import { unpackTensorMap, type TensorSpecEntry } from '../common/chunks.ts';
import type { PhaseTimes } from '../common/events.ts';
import { faultPoint } from '../common/faults.ts';
import { logger } from '../common/log.ts';
import type { TensorMap } from '../common/tensor.ts';
import { UpdateKind, type EvalResult, type TaskFailed, type TaskProgress, type UploadHeader } from '../proto/gen/fedtune/v1/coordinator.ts';
import { RunBase, manifestMismatch, type RunBaseOptions, type RunResult } from './run-base.ts';
import { weightedMean, type Candidate, type EvalReport, type FitFailure, type FitResult, type FitSpec, type GlobalAdapter, type Strategy } from './strategies/strategy.ts';
import type { Aggregator } from './strategies/strategy.ts';
import { absMax, squaredDistance } from './strategies/math/sum.ts';
import type { CheckpointStore, RoundRecord, RunStateFile, WorkerStats } from './store.ts';
import { checkClientDp, ClientDp, ClientDpAggregator } from './privacy/client-dp.ts';
import { exceeds, PrivacyLedger } from './privacy/ledger.ts';
import { roundSpecOf, TaskBoard, trainingSpecOf, UpdateRejected, type TaskBase } from './tasks.ts';
import { SecAggBelowThreshold, SecAggRound, updateFromSum } from './secagg-round.ts';
import type { SecAggObserver } from '../common/secagg/server.ts';
import { firstNonFinite, numel } from '../common/tensor.ts';
import type { WorkerMessage } from '../proto/gen/fedtune/v1/coordinator.ts';
import type { RegistryListener, WorkerRecord } from './workers.ts';
import { loraConfigOf } from '../common/lora-spec.ts';
import { decodeUpdate, encodingFromWire, EncodingError, encodingOfConfig, encodingToWire } from '../common/update-encoding.ts';
import type { UpdateEncodingSpec } from '../proto/gen/fedtune/v1/coordinator.ts';

export { UpdateRejected } from './tasks.ts';

const log = logger('coordinator.run');

interface TaskState extends TaskBase {
  kind: 'train' | 'eval';
  round: number;
  spec: FitSpec;
  /** Manifest and flat values of the adapter the task starts from (an upload must match the manifest). */
  manifest: readonly TensorSpecEntry[];
  start: TensorMap;
  startFlat: Float32Array;
  downloadedAt: number | null;
  numExamples: number;
  weight: number;
  metrics: Record<string, number>;
  evalResult: EvalResult | null;
}

export type { RunResult } from './run-base.ts';

export interface FederatedRunOptions extends RunBaseOptions {
  store: CheckpointStore<RunStateFile>;
  strategy: Strategy;
  /** LoRA rank of `global` (mixed-rank strategies change it from round to round). */
  globalRank: number;
  state: RunStateFile;
  /** privacy.secure_aggregation: sees every buffer the aggregation server holds (tests). */
  secaggObserver?: SecAggObserver;
}

function median(xs: readonly number[]): number | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** The open round attempt: its aggregator and what the defences learned so far. */
interface OpenAttempt {
  round: number;
  attempt: number;
  aggregator: Aggregator;
  norms: number[];
  refused: number;
  /** Refusals by defence.norm_factor (the learned bound). */
  refusedByNorm: number;
  /** Client DP: the cohort's sampling rate (sites asked / sites eligible) and the sites asked (the fixed denominator). */
  q: number;
  expected: number;
}


export class FederatedRun extends RunBase implements RegistryListener {
  private readonly store: CheckpointStore<RunStateFile>;
  private readonly strategy: Strategy;
  private readonly state: RunStateFile;
  private readonly board: TaskBoard<TaskState>;
  private globalRank: number;
  private open: OpenAttempt | null = null;
  private roundBytesDown = 0;
  private roundRefused = 0;
  /** Client-level DP (privacy.client_dp) and the run's privacy ledger. */
  private readonly clientDp: ClientDp | null;
  private readonly ledger: PrivacyLedger;
  /** The secure-aggregation attempt now running (privacy.secure_aggregation). */
  private secagg: SecAggRound | null = null;
  private readonly secaggObserver: SecAggObserver | undefined;
  /** defence.norm_factor's reference: the median of state.updateNorms (replaced, never changed in place, each round). */
  private normMedian: { of: readonly number[]; median: number | null } | null = null;

  constructor(o: FederatedRunOptions) {
    super(o);
    this.secaggObserver = o.secaggObserver;
    this.store = o.store;
    this.strategy = o.strategy;
    this.state = o.state;
    this.globalRank = o.globalRank;
    checkClientDp(o.cfg);
    this.ledger = new PrivacyLedger(o.cfg, o.state.privacy, o.state.round);
    this.clientDp = o.cfg.privacy.client_dp ? new ClientDp(o.cfg.privacy.client_dp, undefined, { clipNorm: this.ledger.savedClipNorm }) : null;
    this.board = new TaskBoard<TaskState>(o.registry, (t) => `of round ${t.round}`);
  }

  private get current(): GlobalAdapter {
    return { tensors: this.globalAdapter, rank: this.globalRank };
  }

  // ------------------------------------------------------------------ registry and session events

  onWorkerGone(w: WorkerRecord, reason: string): void {
    this.workerLeft(w, reason);
    this.secagg?.onWorkerGone(w.workerId, reason);
    for (const t of this.board.failWorker(w.workerId, `worker left (${reason})`)) this.stats(t.site).failed++;
    this.conditions.notify();
  }

  onProgress(w: WorkerRecord, p: TaskProgress): void {
    const t = this.board.get(p.taskId);
    if (!t || t.workerId !== w.workerId) return;
    if (t.downloadedAt === null) t.downloadedAt = Date.now();
    this.publish({
      type: 'worker.progress',
      workerId: w.workerId,
      site: w.site,
      round: t.round,
      taskId: t.taskId,
      step: p.step,
      totalSteps: p.totalSteps,
      loss: p.loss,
      tokensPerSec: p.tokensPerSec,
      examples: p.examples,
    });
  }

  onTaskFailed(w: WorkerRecord, f: TaskFailed): void {
    const t = this.board.get(f.taskId);
    this.taskFailedEvent(w, f);
    if (this.secagg?.owns(f.taskId)) {
      this.secagg.onTaskFailed(w.workerId, f);
      this.conditions.notify();
      return;
    }
    if (t && t.workerId === w.workerId && this.board.fail(t, f.message)) {
      this.stats(t.site).failed++;
      this.conditions.notify();
    }
  }

  onEvalResult(w: WorkerRecord, r: EvalResult): void {
    const t = this.board.get(r.taskId);
    if (!t || t.workerId !== w.workerId || t.kind !== 'eval' || t.status !== 'running') {
      log.warn({ worker: w.workerId, task: r.taskId }, 'eval result for a task that is not open; ignored');
      return;
    }
    t.evalResult = r;
    this.board.done(t, 0);
    this.conditions.notify();
  }

  /** A secure-aggregation answer on a worker's session (service.ts routes SecAgg* messages here). */
  onSecAgg(w: WorkerRecord, body: NonNullable<WorkerMessage['body']>): void {
    this.secagg?.onMessage(w.workerId, body);
    this.conditions.notify();
  }

  onDownloaded(w: WorkerRecord, bytes: number): void {
    this.roundBytesDown += bytes;
    this.stats(w.site).bytesDown += bytes;
    for (const t of this.board.values()) {
      if (t.workerId === w.workerId && t.status === 'running' && t.downloadedAt === null) t.downloadedAt = Date.now();
    }
  }

  // ------------------------------------------------------------------ updates

  /**
   * Check an upload's header before any chunk is read: the task must be open,
   * this worker's, of the current attempt, and the manifest must be that of
   * the adapter the task started from (its rank's shapes).
   */
  beginUpdate(w: WorkerRecord, h: UploadHeader, manifest: TensorSpecEntry[]): TaskState {
    const probe = this.board.get(h.taskId);
    if (probe && probe.workerId === w.workerId) {
      if (probe.kind !== 'train') throw new UpdateRejected('INVALID_ARGUMENT', `task ${h.taskId} is an evaluation task and takes no upload`);
      if (h.round !== probe.round) throw new UpdateRejected('INVALID_ARGUMENT', `round ${h.round} in the header, but task ${h.taskId} belongs to round ${probe.round}`);
    }
    const open = this.open;
    const t = this.board.beginUpload(
      w,
      h.taskId,
      (t) => open !== null && open.round === t.round && open.attempt === t.attempt,
      (t) =>
        `task ${t.taskId} of round ${t.round} is closed (${t.status === 'cancelled' ? 'deadline passed or cancelled' : t.status}); the run is at round ${open?.round ?? this.state.round}`,
    );
    // Under secure aggregation only masked inputs cross the Upload path, never a plaintext update.
    const kind = this.cfg.privacy.secure_aggregation ? UpdateKind.UPDATE_KIND_SECAGG_MASKED : UpdateKind.UPDATE_KIND_ADAPTER_WEIGHTS;
    if (h.kind !== kind) {
      throw new UpdateRejected(
        'INVALID_ARGUMENT',
        `update kind ${UpdateKind[h.kind] ?? h.kind} is not accepted here (allowed: ${UpdateKind[kind]}${this.cfg.privacy.secure_aggregation ? ': the run uses privacy.secure_aggregation, so updates are uploaded masked' : ''})`,
      );
    }
    if (h.baseVersion !== t.baseVersion) {
      throw new UpdateRejected('FAILED_PRECONDITION', `update computed from global version ${h.baseVersion}, task ${h.taskId} is on version ${t.baseVersion}`);
    }
    if (!Number.isSafeInteger(h.numExamples) || h.numExamples < 1) {
      throw new UpdateRejected('INVALID_ARGUMENT', `num_examples must be a positive integer (got ${h.numExamples})`);
    }
    if (h.numExamples > w.numTrainExamples) {
      throw new UpdateRejected(
        'INVALID_ARGUMENT',
        `num_examples ${h.numExamples} is more than the ${w.numTrainExamples} training examples site ${w.site} registered; an update counts at most the examples it was trained on`,
      );
    }
    for (const [k, v] of Object.entries(h.metrics)) {
      if (!Number.isFinite(v)) throw new UpdateRejected('INVALID_ARGUMENT', `metric ${k} is not finite (${v})`);
    }
    // The encoding must be one the task accepts (service.ts checked it is known and fits the manifest's dtypes).
    const enc = encodingFromWire(h.encoding ?? 0) ?? 'float32';
    const choice = encodingOfConfig(this.cfg.round);
    if (enc !== 'float32' && enc !== choice.encoding) {
      throw new UpdateRejected('INVALID_ARGUMENT', `encoding ${enc} is not accepted for task ${t.taskId} (accepted: float32${choice.encoding !== 'float32' ? `, ${choice.encoding}` : ''}; round.update_encoding of the run is ${choice.encoding})`);
    }
    if (enc === 'int8_delta' && h.blockSize !== choice.blockSize) {
      throw new UpdateRejected('INVALID_ARGUMENT', `block_size ${h.blockSize} in the header, but task ${t.taskId} asks for int8_delta blocks of ${choice.blockSize} (round.int8_block_size)`);
    }
    const masked = kind === UpdateKind.UPDATE_KIND_SECAGG_MASKED ? this.secagg?.maskedNames() : undefined;
    if (kind === UpdateKind.UPDATE_KIND_SECAGG_MASKED && !masked) throw new UpdateRejected('FAILED_PRECONDITION', `task ${t.taskId}: no secure aggregation attempt is collecting masked inputs`);
    const asF32 = enc === 'float32' ? manifest : manifest.map((e) => ({ ...e, dtype: 'F32' as const }));
    const bad = manifestMismatch(asF32, masked ? t.manifest.filter((e) => masked.includes(e.name)) : t.manifest);
    if (bad) {
      throw new UpdateRejected('INVALID_ARGUMENT', `update does not match the adapter task ${t.taskId} started from (site ${w.site} was assigned LoRA rank ${t.spec.rank}): ${bad}`);
    }
    this.board.markUploading(t);
    return t;
  }

  /** The open attempt's aggregator streams: it folds each update and gives its buffer back (FitUpdate.release). */
  foldsUploads(): boolean {
    return this.open?.aggregator.kind === 'streaming';
  }

  /** The upload of `t` broke off before it was complete: drop it, the task stays open for a retry. */
  abandonUpdate(t: TaskState): void {
    this.board.reopen(t);
    this.conditions.notify();
  }

  /**
   * Why an update's values are refused by the run's defences (null: accepted), and its distance from
   * its start: measured when a defence uses it (defence.max_norm, defence.norm_factor), else null.
   */
  private screen(t: TaskState, flat: Float32Array, open: OpenAttempt): { reason: string | null; norm: number | null } {
    const d = this.cfg.defence;
    const maxAbs = d.max_abs ?? Infinity;
    // One branch-free pass: a NaN or infinity anywhere makes the sum of squares non-finite (float32
    // values square to at most ~1.2e77, far inside float64), and the largest |value| is kept only when
    // defence.max_abs is set. Without a norm defence the pass reads the update alone (not its start as
    // well): its largest |value|, non-finite where a value is. Only a failing update is walked again to
    // name the element.
    const measure = d.max_norm !== null || d.norm_factor !== null;
    const { sq, maxSeen } = measure ? squaredDistance(flat, t.startFlat, maxAbs !== Infinity) : { sq: 0, maxSeen: absMax(flat) };
    if (!Number.isFinite(sq) || !Number.isFinite(maxSeen) || maxSeen > maxAbs) {
      let off = 0;
      for (const e of t.manifest) {
        const n = e.shape.reduce((a, b) => a * b, 1);
        for (let i = off; i < off + n; i++) {
          const v = flat[i]!;
          if (!Number.isFinite(v)) return { reason: `tensor ${e.name} has a non-finite value (${v}) at element ${i - off}`, norm: null };
          if (Math.abs(v) > maxAbs) return { reason: `tensor ${e.name} has a value of ${v} at element ${i - off}, beyond defence.max_abs = ${maxAbs}`, norm: null };
        }
        off += n;
      }
    }
    if (!measure) return { reason: null, norm: null };
    const norm = Math.sqrt(sq);
    if (d.max_norm !== null && norm > d.max_norm) {
      return { reason: `its distance from the adapter it started from is ${norm.toPrecision(4)}, beyond defence.max_norm = ${d.max_norm}`, norm };
    }
    const ref = d.norm_factor !== null ? this.normReference() : null;
    if (d.norm_factor !== null && ref !== null && ref > 0 && norm > d.norm_factor * ref) {
      open.refusedByNorm++;
      return {
        reason: `its distance from the adapter it started from is ${norm.toPrecision(4)}, more than defence.norm_factor = ${d.norm_factor} x the median ${ref.toPrecision(4)} of the last round's accepted updates`,
        norm,
      };
    }
    return { reason: null, norm };
  }

  /** The median of the last round's accepted distances, sorted once per round (not once per update). */
  private normReference(): number | null {
    const norms = this.state.updateNorms ?? [];
    if (this.normMedian?.of !== norms) this.normMedian = { of: norms, median: median(norms) };
    return this.normMedian.median;
  }

  /** Aggregation weight of an accepted update: examples (capped) or 1. */
  private weightOf(numExamples: number): number {
    if (this.cfg.weighting.mode === 'equal') return 1;
    return Math.min(numExamples, this.cfg.weighting.max_examples ?? Infinity);
  }

  /** Complete bytes of a checked stream: screen the values and hand the update to the aggregator. */
  acceptUpdate(w: WorkerRecord, t: TaskState, h: UploadHeader, bytes: Uint8Array, release?: () => void): void {
    // `bytes` come from the upload buffer pool: given back once nothing reads them (an aggregator that
    // folded the update in calls FitUpdate.release; a refused or decoded-then-dropped upload at once).
    const own = { handedOn: false };
    try {
      this.acceptChecked(w, t, h, bytes, release, own);
    } finally {
      if (!own.handedOn) release?.();
    }
  }

  /** acceptUpdate's work; sets own.handedOn once the update's bytes went on to the aggregator (which then owns `release`). */
  private acceptChecked(w: WorkerRecord, t: TaskState, h: UploadHeader, bytes: Uint8Array, release: (() => void) | undefined, own: { handedOn: boolean }): void {
    const open = this.open;
    if (t.status !== 'uploading' || !open || open.round !== t.round || open.attempt !== t.attempt) {
      throw new UpdateRejected('FAILED_PRECONDITION', `stale update: round ${t.round} closed while task ${t.taskId} was uploading`);
    }
    if (h.kind === UpdateKind.UPDATE_KIND_SECAGG_MASKED) {
      this.acceptMasked(w, t, h, bytes); // folded into the masked sum at once: the bytes are free again
      return;
    }
    const refuse = (reason: string): never => {
      this.board.reopen(t);
      open.refused++;
      this.roundRefused++;
      throw new UpdateRejected('INVALID_ARGUMENT', reason);
    };
    // A compressed update is decoded into float32 here (common/update-encoding.ts); everything
    // after this point sees only the decoded values. `bytes` (as sent) is what the digest covered.
    const enc = encodingFromWire(h.encoding ?? 0) ?? 'float32';
    let aligned: Uint8Array;
    if (enc === 'float32') {
      aligned = bytes.byteOffset % 4 === 0 ? bytes : bytes.slice();
    } else {
      let decoded: Float32Array | null = null;
      try {
        decoded = decodeUpdate(t.manifest, bytes, enc, h.blockSize ?? 0, t.startFlat);
      } catch (err) {
        if (!(err instanceof EncodingError)) throw err;
        refuse(err.message);
      }
      aligned = new Uint8Array(decoded!.buffer);
    }
    const flat = new Float32Array(aligned.buffer, aligned.byteOffset, aligned.byteLength / 4);
    const { reason, norm } = this.screen(t, flat, open);
    if (reason) refuse(reason);
    // The assembled upload is ours alone: the aggregator may keep views into it.
    const tensors = unpackTensorMap(t.manifest, aligned);
    const weight = this.weightOf(h.numExamples);
    // Decoded updates were copied out of `bytes`: only float32 ones still read the pooled buffer.
    const pooled = enc === 'float32' && aligned === bytes;
    const update = { workerId: w.workerId, site: w.site, spec: t.spec, weight, tensors, start: t.start, ...(pooled && release ? { release } : {}) };
    const unfit = this.strategy.checkUpdate(update);
    if (unfit) refuse(unfit);
    open.aggregator.add(update);
    own.handedOn = pooled;
    if (norm !== null) open.norms.push(norm);
    this.board.done(t, bytes.byteLength);
    t.numExamples = h.numExamples;
    t.weight = weight;
    t.metrics = { ...h.metrics };
    const s = this.stats(w.site);
    s.bytesUp += bytes.byteLength;
    s.examples += h.numExamples;
    s.rounds++;
    this.publish({
      type: 'update.received',
      round: t.round,
      taskId: t.taskId,
      workerId: w.workerId,
      site: w.site,
      examples: h.numExamples,
      bytes: bytes.byteLength,
      metrics: t.metrics,
    });
    log.info({ round: t.round, site: w.site, examples: h.numExamples, weight, ...(norm !== null ? { norm } : {}), bytes: bytes.byteLength }, 'update received');
    this.conditions.notify();
  }

  /** A masked input: folded into the secure-aggregation server's running sum at once, never kept per site. */
  private acceptMasked(w: WorkerRecord, t: TaskState, h: UploadHeader, bytes: Uint8Array): void {
    const sa = this.secagg;
    if (!sa) throw new UpdateRejected('FAILED_PRECONDITION', `stale update: no secure aggregation attempt is collecting masked inputs for task ${t.taskId}`);
    try {
      sa.addMaskedInput(t.taskId, bytes);
    } catch (err) {
      this.board.reopen(t);
      throw new UpdateRejected('INVALID_ARGUMENT', (err as Error).message);
    }
    this.board.done(t, bytes.byteLength);
    t.numExamples = h.numExamples;
    t.metrics = { ...h.metrics };
    const s = this.stats(w.site);
    s.bytesUp += bytes.byteLength;
    s.examples += h.numExamples;
    s.rounds++;
    this.publish({ type: 'update.received', round: t.round, taskId: t.taskId, workerId: w.workerId, site: w.site, examples: h.numExamples, bytes: bytes.byteLength, metrics: t.metrics });
    log.info({ round: t.round, site: w.site, examples: h.numExamples, bytes: bytes.byteLength }, 'masked input received');
    this.conditions.notify();
  }

  /**
   * One attempt under privacy.secure_aggregation (coordinator/secagg-round.ts): the
   * phases, then ONE synthetic update start + sum / sum_w (client DP: start + finishSum(sum))
   * into the strategy's aggregator. Returns how many sites' inputs the sum holds (0 and why: failed).
   */
  private async secureAttempt(round: number, attempt: number, made: Array<{ t: TaskState; ref: { rank: number; totalBytes: number; sha256: Uint8Array } }>, chosen: ReadonlyArray<{ c: Candidate }>, deadline: number, frozenA: boolean): Promise<{ received: number; failure: string | null }> {
    const cfg = this.cfg;
    const sa = cfg.privacy.secure_aggregation!;
    const open = this.open!;
    const strat = cfg.strategy as { name: string; bound?: unknown; weighted?: unknown };
    const equal = this.clientDp !== null || (strat.name === 'norm_bounding' && strat.weighted !== true);
    const raw = chosen.map((x) => (equal ? 1 : this.weightOf(x.c.numTrainExamples)));
    const maxW = Math.max(...raw);
    const start = made[0]!.t;
    const masked = start.manifest.filter((e) => !(frozenA && e.name.includes('.lora_A.'))).map((e) => ({ name: e.name, size: numel(e.shape) }));
    const bounds = [cfg.defence.max_norm, strat.name === 'norm_bounding' && typeof strat.bound === 'number' ? strat.bound : null, this.clientDp?.clipNorm() ?? null].filter((x): x is number => x !== null);
    const r = new SecAggRound({
      round,
      attempt,
      cfg: sa,
      members: made.map((m, i) => ({ index: i + 1, workerId: m.t.workerId, site: m.t.site, taskId: m.t.taskId, weight: raw[i]! / maxW, spec: roundSpecOf(cfg, round, m.t.spec), ref: { version: this.globalVersion, ...m.ref } })),
      masked,
      clipNorm: bounds.length > 0 ? Math.min(...bounds) : 0,
      noiseStd: this.clientDp?.siteNoiseStd(sa.threshold) ?? 0,
      deadline,
      host: {
        send: (workerId, task) => {
          const w = this.registry.get(workerId);
          return w !== undefined && this.registry.send(w, { body: { $case: 'task', value: task } });
        },
        waitFor: (pred, until) => this.conditions.waitFor(pred, until),
        status: (taskId) => this.board.get(taskId)?.status,
        drop: (taskId, reason) => {
          const t = this.board.get(taskId);
          if (t) this.board.cancel([t], reason, 'failed');
          this.conditions.notify();
        },
        publish: (level, message) => this.publish({ type: 'log', level, message }),
      },
      ...(this.secaggObserver ? { observer: this.secaggObserver } : {}),
    });
    this.secagg = r;
    for (const m of made) this.ledger.taskDispatched(m.t.site);
    try {
      const out = await r.run();
      const members = out.u3.map((id) => this.board.get(id)!).filter((t) => t !== undefined);
      for (const t of members) t.weight = raw[made.findIndex((m) => m.t === t)]! / maxW;
      let tensors;
      if (this.clientDp) {
        this.clientDp.finishSum(out.sum, open.expected);
        tensors = updateFromSum(start.start, masked, out.sum, 1);
      } else {
        tensors = updateFromSum(start.start, masked, out.sum, out.weight);
      }
      const update = { workerId: 'secure-aggregation', site: 'secure aggregation', spec: start.spec, weight: this.clientDp ? 1 : out.weight, tensors, start: start.start };
      const unfit = this.strategy.checkUpdate(update);
      if (unfit) throw new Error(`secure aggregation: the strategy refused the aggregate of round ${round}: ${unfit}`);
      open.aggregator.add(update);
      this.publish({ type: 'log', level: 'info', message: `round ${round}: secure aggregation of ${out.u3.length} of ${made.length} site(s) (threshold ${sa.threshold}); quantisation bound ${out.bound.toPrecision(3)} per coordinate of the sum` });
      return { received: out.u3.length, failure: null };
    } catch (err) {
      if (!(err instanceof SecAggBelowThreshold)) throw err;
      this.publish({ type: 'log', level: 'warn', message: `round ${round}, attempt ${attempt + 1}: ${err.message}` });
      log.warn({ round, attempt, phase: err.phase, have: err.have, need: err.need }, err.message);
      this.board.cancel(made.map((m) => m.t), err.message, 'failed');
      const gone = made.filter((m) => m.t.status === 'failed' && m.t.failReason !== err.message).map((m) => `${m.t.site}: ${m.t.failReason}`);
      return { received: 0, failure: `attempt ${attempt + 1}: ${err.message}${gone.length > 0 ? ` (${gone.slice(0, 3).join('; ')})` : ''}` };
    } finally {
      this.secagg = null;
      this.board.cancel(made.map((m) => m.t), `round ${round}: secure aggregation attempt ${attempt + 1} is over`);
    }
  }

  rejectUpdate(w: WorkerRecord, h: Pick<UploadHeader, 'taskId' | 'round'> | null, reason: string): void {
    const t = h ? this.board.get(h.taskId) : undefined;
    this.stats(w.site).rejected++;
    this.publish({ type: 'update.rejected', round: t?.round ?? h?.round ?? 0, taskId: h?.taskId ?? '', workerId: w.workerId, site: w.site, reason });
    log.warn({ worker: w.workerId, site: w.site, task: h?.taskId }, `update rejected: ${reason}`);
  }

  // ------------------------------------------------------------------ the loop

  async run(): Promise<RunResult> {
    const cfg = this.cfg;
    try {
      return await this.lifecycle(
        { strategy: this.strategy.description, totalRounds: cfg.rounds, totalSteps: 0, resumedFrom: this.state.round },
        async () => {
          await this.reconcileEvents();
          if (this.state.round === 0 && cfg.eval.every > 0 && cfg.eval.initial && this.state.baseline === null) await this.baseline();
          for (let round = this.state.round + 1; round <= cfg.rounds; round++) if (!(await this.runRound(round))) break;
          const last = this.state.history.at(-1);
          return { trainLoss: last?.trainLoss, evalLoss: last?.evalLoss, evalAccuracy: last?.evalAccuracy, epsilon: this.ledger.enabled ? this.ledger.report().epsilon : undefined };
        },
        () => ({ n: this.state.round, path: this.store.dir(this.state.round), history: this.state.history }),
      );
    } finally {
      // A run stopped or failed mid-round: the open attempt's sum and queued upload buffers go back.
      this.open?.aggregator.dispose?.();
      this.open = null;
    }
  }

  /**
   * A resumed run publishes checkpoint.written and round.completed for every
   * checkpointed round whose events a crash lost (the checkpoint is durable
   * before its events are published), once: after this, checkpoints and events
   * agree.
   */
  private async reconcileEvents(): Promise<void> {
    if (!this.resumed) return;
    const logged = new Set<number>();
    for (const e of await this.bus.history(this.runId, 0)) if (e.type === 'round.completed') logged.add(e.round);
    for (const r of this.state.history) {
      if (logged.has(r.round)) continue;
      const path = this.store.dir(r.round);
      // A checkpoint checkpoint.keep_last removed since is not announced again; its round is.
      if (await this.store.has(r.round)) this.publish({ type: 'checkpoint.written', round: r.round, step: 0, path, bytes: await this.store.sizeOf(r.round) });
      this.publish({
        type: 'round.completed',
        round: r.round,
        globalVersion: r.globalVersion,
        participants: r.participants,
        examples: r.examples,
        trainLoss: r.trainLoss,
        evalLoss: r.evalLoss,
        evalAccuracy: r.evalAccuracy,
        durationMs: r.durationMs,
        phases: r.phases ?? { dispatchMs: 0, trainMs: 0, uploadMs: 0, aggregateMs: 0 },
        bytesUp: r.bytesUp,
        bytesDown: r.bytesDown,
        ...(r.privacy ? { privacy: r.privacy } : {}),
      });
      log.info({ round: r.round }, 'round.completed republished: the checkpoint was on disk, its events were not');
    }
  }

  /** Evaluate the initial adapter before round 1. */
  private async baseline(): Promise<void> {
    this.publish({ type: 'run.state', state: 'waiting', message: `waiting for ${this.cfg.cohort.min_workers} worker(s)` });
    await this.waitForWorkers();
    this.publish({ type: 'run.state', state: 'running', message: 'evaluating the initial adapter' });
    const ev = await this.evaluate(0);
    this.state.baseline = { evalLoss: ev.evalLoss, evalAccuracy: ev.evalAccuracy };
    this.publish({
      type: 'log',
      level: 'info',
      message: `baseline (round 0): eval loss ${ev.evalLoss?.toFixed(4) ?? 'n/a'}, eval accuracy ${ev.evalAccuracy === null ? 'n/a' : `${(ev.evalAccuracy * 100).toFixed(1)}%`}`,
    });
  }

  private candidates(kind: 'train' | 'eval'): Candidate[] {
    const busy = this.board.busyWorkers();
    return this.registry
      .connected()
      .filter((w) => !busy.has(w.workerId) && (kind === 'train' ? w.numTrainExamples > 0 : w.numEvalExamples > 0))
      .map((w) => ({ workerId: w.workerId, site: w.site, numTrainExamples: w.numTrainExamples, numEvalExamples: w.numEvalExamples }));
  }

  private async waitForWorkers(): Promise<void> {
    const need = this.cfg.cohort.min_workers;
    if (this.candidates('train').length >= need) return;
    log.info({ need, have: this.candidates('train').length }, 'waiting for workers');
    const ok = await this.conditions.waitFor(() => this.candidates('train').length >= need, Date.now() + this.cfg.cohort.wait_timeout_sec * 1000);
    if (!ok) {
      throw new Error(
        `only ${this.candidates('train').length} worker(s) with training data connected after ${this.cfg.cohort.wait_timeout_sec} s; cohort.min_workers is ${need}`,
      );
    }
  }

  /** The adapter a worker with `spec` starts from, packed for download once per version and rank. */
  private startFor(spec: FitSpec): { tensors: TensorMap; flat: Float32Array; manifest: readonly TensorSpecEntry[]; ref: { rank: number; totalBytes: number; sha256: Uint8Array } } {
    if (spec.rank === this.globalRank) {
      const p = this.packedGlobal;
      const tensors = this.strategy.startAdapter(this.current, spec);
      if (tensors !== this.globalAdapter) throw new Error(`strategy ${this.strategy.name}: a worker of the global adapter's rank must start from the global adapter itself`);
      return { tensors, flat: new Float32Array(p.bytes.buffer, p.bytes.byteOffset, p.bytes.byteLength / 4), manifest: p.manifest, ref: { rank: 0, totalBytes: p.bytes.byteLength, sha256: p.sha256 } };
    }
    const cached = this.adapterVersion(this.globalVersion, spec.rank);
    const tensors = cached ? unpackTensorMap(cached.manifest, cached.bytes) : this.strategy.startAdapter(this.current, spec);
    const p = cached ?? this.addVariant(spec.rank, tensors);
    return { tensors, flat: new Float32Array(p.bytes.buffer, p.bytes.byteOffset, p.bytes.byteLength / 4), manifest: p.manifest, ref: { rank: spec.rank, totalBytes: p.bytes.byteLength, sha256: p.sha256 } };
  }

  private newTask(kind: 'train' | 'eval', round: number, attempt: number, w: Candidate, spec: FitSpec): { t: TaskState; ref: { rank: number; totalBytes: number; sha256: Uint8Array } } {
    const start = this.startFor(spec);
    const t = this.board.add({
      taskId: `r${round}-${kind}-${attempt}-${randomBytes(4).toString('hex')}`,
      kind,
      round,
      attempt,
      workerId: w.workerId,
      site: w.site,
      baseVersion: this.globalVersion,
      status: 'running',
      dispatchedAt: Date.now(),
      downloadedAt: null,
      uploadStartedAt: null,
      doneAt: null,
      bytesUp: 0,
      failReason: null,
      spec,
      manifest: start.manifest,
      start: start.tensors,
      startFlat: start.flat,
      numExamples: 0,
      weight: 0,
      metrics: {},
      evalResult: null,
    });
    return { t, ref: start.ref };
  }

  private dispatch(t: TaskState, ref: { rank: number; totalBytes: number; sha256: Uint8Array }, deadline: number): boolean {
    const w = this.registry.get(t.workerId);
    const spec = t.kind === 'train' ? roundSpecOf(this.cfg, t.round, t.spec) : trainingSpecOf(this.cfg, t.spec);
    const ok =
      w !== undefined &&
      this.registry.send(w, {
        body: {
          $case: 'task',
          value: {
            taskId: t.taskId,
            round: t.round,
            deadlineUnixMs: deadline,
            global: { version: this.globalVersion, ...ref },
            kind: t.kind === 'train' ? { $case: 'train', value: { spec, uploadKind: UpdateKind.UPDATE_KIND_ADAPTER_WEIGHTS, encoding: this.encodingSpec() } } : { $case: 'eval', value: { spec } },
          },
        },
      });
    if (!ok) {
      this.board.fail(t, 'could not send the task (session closed)');
      return false;
    }
    if (t.kind === 'train') this.publish({ type: 'task.dispatched', round: t.round, taskId: t.taskId, workerId: t.workerId, site: t.site, bytes: ref.totalBytes });
    return true;
  }

  /** What a train task says about update encodings: the run's choice, and float32 always accepted. */
  private encodingSpec(): UpdateEncodingSpec {
    const c = encodingOfConfig(this.cfg.round);
    const accepted = [...new Set(['float32' as const, c.encoding])].map(encodingToWire);
    return { encoding: encodingToWire(c.encoding), blockSize: c.encoding === 'int8_delta' ? c.blockSize : 0, errorFeedback: c.errorFeedback, accepted };
  }

  /** The cohort and specs of one attempt, checked: known, idle workers, each once, sane specs. */
  private configureFit(round: number, attempt: number, candidates: Candidate[]): Array<{ c: Candidate; spec: FitSpec }> {
    const byId = new Map(candidates.map((c) => [c.workerId, c]));
    const seen = new Set<string>();
    const out: Array<{ c: Candidate; spec: FitSpec }> = [];
    for (const { workerId, spec } of this.strategy.configureFit(round, attempt, candidates)) {
      const c = byId.get(workerId);
      if (!c) throw new Error(`strategy ${this.strategy.name} chose worker ${workerId}, which is not a candidate of round ${round}`);
      if (seen.has(workerId)) throw new Error(`strategy ${this.strategy.name} chose worker ${workerId} twice in round ${round}`);
      if (!Number.isInteger(spec.rank) || spec.rank < 1) throw new Error(`strategy ${this.strategy.name} gave worker ${workerId} LoRA rank ${spec.rank} (an integer >= 1 is needed)`);
      if (!(spec.proxMu >= 0) || !Number.isFinite(spec.proxMu)) throw new Error(`strategy ${this.strategy.name} gave worker ${workerId} prox_mu ${spec.proxMu}`);
      seen.add(workerId);
      out.push({ c, spec });
    }
    if (out.length === 0) throw new Error(`strategy ${this.strategy.name} chose no worker for round ${round} out of ${candidates.length} candidate(s)`);
    return out;
  }

  /**
   * privacy.max_epsilon: the epsilon the run would have after this attempt of
   * `round`. Over the budget, the run completes cleanly instead (true).
   */
  private overBudget(round: number, q: number, chosen: ReadonlyArray<{ c: Candidate }>): boolean {
    const max = this.cfg.privacy.max_epsilon;
    if (max === null || !this.ledger.enabled) return false;
    const sigma = this.clientDp?.roundSigma(chosen.length) ?? 0;
    const after = this.ledger.preview({ client: this.clientDp ? { q, sigma } : undefined, sites: chosen.map((x) => x.c.site) });
    if (!exceeds(after, max)) return false;
    const spent = this.ledger.report().epsilon;
    this.completionReason =
      `privacy.max_epsilon = ${max} reached: ${spent === null ? 'unbounded' : spent.toPrecision(4)} spent (delta ${this.cfg.privacy.delta}) after round ${round - 1}; ` +
      `round ${round} would take it to ${after.epsilon === null ? 'unbounded' : after.epsilon.toPrecision(4)}`;
    this.publish({ type: 'log', level: 'info', message: this.completionReason });
    log.info({ round, spent, after: after.epsilon, max }, 'privacy budget reached; the run completes');
    return true;
  }

  /**
   * A round aggregated under client DP (in the clear or under secure aggregation): adaptive
   * clipping's step, and the round's sampled Gaussian mechanism into the ledger.
   */
  private chargeClientDp(round: number, q: number, expected: number): void {
    if (!this.clientDp) return;
    const spent = this.clientDp.endRound(expected);
    this.ledger.roundAggregated(q, spent.effectiveNoiseMultiplier, this.clientDp.clipNorm());
    log.info({ round, q, clipNorm: spent.clipNorm, nextClipNorm: this.clientDp.clipNorm(), unclipped: spent.unclipped, received: spent.received }, 'client DP round');
  }

  /** One round, retried until it aggregates; false when the privacy budget stopped the run before it. */
  private async runRound(round: number): Promise<boolean> {
    const cfg = this.cfg;
    const started = Date.now();
    this.roundBytesDown = 0;
    this.roundRefused = 0;
    let tasks: TaskState[] = [];
    let attempt = 0;
    let phases: PhaseTimes = { dispatchMs: 0, trainMs: 0, uploadMs: 0, aggregateMs: 0 };
    for (; ; attempt++) {
      this.publish({ type: 'run.state', state: 'waiting', message: `round ${round}: waiting for ${cfg.cohort.min_workers} worker(s)` });
      await this.waitForWorkers();
      this.publish({ type: 'run.state', state: 'running', message: `round ${round}${attempt > 0 ? ` (retry ${attempt})` : ''}` });
      const eligible = this.candidates('train');
      const chosen = this.configureFit(round, attempt, eligible);
      const q = chosen.length / eligible.length;
      if (this.overBudget(round, q, chosen)) return false;
      const frozenA = chosen.some((x) => x.spec.freezeLoraA);
      // Client DP in the clear: the loop clips and noises. Under secure aggregation the sites clip (and add distributed
      // noise) and the decoded sum goes through this.clientDp.finishSum before the strategy's aggregator sees it.
      const aggregator =
        this.clientDp && !cfg.privacy.secure_aggregation
          ? new ClientDpAggregator(this.current, this.clientDp, chosen.length, (name) => frozenA && name.includes('.lora_A.'))
          : this.strategy.aggregator(this.current);
      this.open?.aggregator.dispose?.(); // the failed attempt's
      this.open = { round, attempt, aggregator, norms: [], refused: 0, refusedByNorm: 0, q, expected: chosen.length };
      this.publish({ type: 'round.started', round, cohort: chosen.map((x) => x.c.workerId), globalVersion: this.globalVersion });
      log.info({ round, attempt, cohort: chosen.length, ranks: [...new Set(chosen.map((x) => x.spec.rank))] }, 'round started');
      const t0 = Date.now();
      const deadline = t0 + cfg.round.deadline_sec * 1000;
      const made = chosen.map((x) => this.newTask('train', round, attempt, x.c, x.spec));
      tasks = made.map((m) => m.t);
      let allIn = true;
      let received: number;
      let secaggFailure: string | null = null;
      if (cfg.privacy.secure_aggregation) {
        const r = await this.secureAttempt(round, attempt, made, chosen, deadline, frozenA);
        received = r.received;
        secaggFailure = r.failure;
      } else {
        for (const m of made) if (this.dispatch(m.t, m.ref, deadline)) this.ledger.taskDispatched(m.t.site);
        allIn = await this.conditions.waitFor(() => this.board.settled(tasks), deadline);
        if (!allIn) this.board.cancel(tasks, `round ${round} deadline of ${cfg.round.deadline_sec} s passed`);
        received = this.open.aggregator.count;
      }
      const done = tasks.filter((t) => t.status === 'done');
      const t1 = Date.now();
      // Phases overlap across workers; split the wall time at the last download and the first upload.
      const firstUp = Math.min(t1, ...done.map((t) => t.uploadStartedAt ?? t1));
      const lastUp = Math.max(firstUp, ...done.map((t) => t.doneAt ?? firstUp));
      const dl = Math.max(0, Math.min(firstUp, Math.max(t0, ...tasks.map((t) => t.downloadedAt ?? t0))) - t0);
      const ul = lastUp - firstUp;
      phases = { dispatchMs: dl, uploadMs: ul, trainMs: Math.max(0, t1 - t0 - dl - ul), aggregateMs: 0 };
      if (received >= cfg.round.min_results) break;
      const why = [...new Set(tasks.filter((t) => t.failReason).map((t) => `${t.site}: ${t.failReason}`))].slice(0, 3);
      const reason =
        secaggFailure ??
        (allIn ? `${received} of ${tasks.length} update(s) arrived` : `deadline of ${cfg.round.deadline_sec} s passed with ${received} of ${tasks.length} update(s)`) +
          (this.open.refused > 0 ? `, ${this.open.refused} refused by the defences` : '') +
          (why.length > 0 ? ` (failed: ${why.join('; ')})` : '');
      if (received === 0 && this.open.refusedByNorm > 0) {
        // The learned bound refused every update that came: the scale moved between rounds, not one site. Reset it.
        this.state.updateNorms = [];
        this.publish({ type: 'log', level: 'warn', message: `round ${round}: defence.norm_factor refused every update of attempt ${attempt + 1}; its reference (the last round's median distance) is reset for the retry` });
      }
            this.publish({ type: 'round.retried', round, reason, received, required: cfg.round.min_results });
      log.warn({ round, attempt, received, required: cfg.round.min_results }, `round retried: ${reason}`);
      if (attempt >= cfg.round.max_retries) {
        throw new Error(`round ${round} failed ${attempt + 1} time(s) (round.max_retries is ${cfg.round.max_retries}): ${reason}; need round.min_results = ${cfg.round.min_results}`);
      }
    }
    const open = this.open;
    this.open = null;
    const done = tasks.filter((t) => t.status === 'done');
    const results: FitResult[] = done.map((t) => ({ workerId: t.workerId, site: t.site, weight: t.weight, numExamples: t.numExamples, metrics: t.metrics }));
    const failures: FitFailure[] = tasks.filter((t) => t.status !== 'done').map((t) => ({ workerId: t.workerId, site: t.site, reason: t.failReason ?? t.status }));
    const ta = Date.now();
    const next = this.strategy.aggregateFit(round, this.current, open.aggregator, results, failures);
    open.aggregator.dispose?.();
    phases.aggregateMs = Date.now() - ta;
    this.checkNext(next, round);
    this.chargeClientDp(round, open.q, open.expected);
    const privacy = this.ledger.enabled ? this.ledger.report() : undefined;
    this.globalRank = next.rank;
    this.setGlobal(next.tensors, this.globalVersion + 1);

    // Checkpoint the aggregated round before evaluating it: a crash during evaluation loses no round.
    const record: RoundRecord = {
      round,
      globalVersion: this.globalVersion,
      rank: this.globalRank,
      participants: done.length,
      examples: done.reduce((s, t) => s + t.numExamples, 0),
      trainLoss: weightedMean(done.map((t) => [t.metrics.train_loss ?? NaN, t.numExamples] as const)),
      evalLoss: null,
      evalAccuracy: null,
      durationMs: Date.now() - started,
      bytesUp: done.reduce((s, t) => s + t.bytesUp, 0),
      bytesDown: this.roundBytesDown,
      retries: attempt,
      refused: this.roundRefused,
      phases,
      ...(privacy ? { privacy } : {}),
      completedAt: new Date().toISOString(),
    };
    this.state.round = round;
    this.state.globalVersion = this.globalVersion;
    this.state.history.push(record);
    this.state.updateNorms = open.norms;
    if (this.ledger.enabled) this.state.privacy = this.ledger.state();
    this.state.updatedAt = record.completedAt;
    const { path, bytes } = await this.store.write(this.state, this.globalAdapter, this.loraOf(this.globalRank), { strategy: this.strategy.state() });
    this.board.forget((t) => t.round < round);
    faultPoint('round.before-events', round);
    this.publish({ type: 'checkpoint.written', round, step: 0, path, bytes });

    if (cfg.eval.every > 0 && (round % cfg.eval.every === 0 || round === cfg.rounds)) {
      const ev = await this.evaluate(round);
      record.evalLoss = ev.evalLoss;
      record.evalAccuracy = ev.evalAccuracy;
      record.durationMs = Date.now() - started;
      await this.store.updateState(this.state);
    }
    faultPoint('round.before-completed', round);
    this.publish({
      type: 'round.completed',
      round,
      globalVersion: this.globalVersion,
      participants: record.participants,
      examples: record.examples,
      trainLoss: record.trainLoss,
      evalLoss: record.evalLoss,
      evalAccuracy: record.evalAccuracy,
      durationMs: record.durationMs,
      phases,
      bytesUp: record.bytesUp,
      bytesDown: record.bytesDown,
      ...(privacy ? { privacy } : {}),
    });
    log.info({ round, rank: this.globalRank, trainLoss: record.trainLoss, evalLoss: record.evalLoss, evalAccuracy: record.evalAccuracy, epsilon: privacy?.epsilon, path }, 'round completed');
    return true;
  }

  /** PEFT r and alpha of an adapter of rank r (alpha keeps the run's alpha / r). */
  private loraOf(rank: number): { r: number; alpha: number } {
    const l = loraConfigOf(this.cfg.lora, rank);
    return { r: l.r, alpha: l.alpha };
  }

  /** A strategy's next global must be a finite adapter of the run's modules at the rank it claims. */
  private checkNext(next: GlobalAdapter, round: number): void {
    for (const [name, t] of next.tensors) {
      // A DoRA magnitude [out] has no rank: only its values are checked.
      const r = name.endsWith('.lora_magnitude_vector') ? next.rank : name.includes('.lora_A.') ? t.shape[0] : t.shape[1];
      // At an unchanged rank each module keeps its own rank (rank_pattern gives modules ranks other than the adapter's).
      const prev = next.rank === this.globalRank ? this.globalAdapter.get(name) : undefined;
      const want = prev && !name.endsWith('.lora_magnitude_vector') ? (name.includes('.lora_A.') ? prev.shape[0] : prev.shape[1]) : next.rank;
      if (r !== want) throw new Error(`strategy ${this.strategy.name}: round ${round} produced tensor ${name} of rank ${r}, but says the rank is ${want}`);
      if (firstNonFinite(t.data) >= 0) throw new Error(`strategy ${this.strategy.name}: round ${round} produced a non-finite value in ${name}; the global adapter was kept`);
    }
  }

  /** Evaluation-only tasks on the workers the strategy picks; its summary of what comes back. */
  private async evaluate(round: number): Promise<{ evalLoss: number | null; evalAccuracy: number | null }> {
    const candidates = this.candidates('eval');
    const ids = new Set(this.strategy.configureEvaluate(round, candidates));
    const chosen = candidates.filter((c) => ids.has(c.workerId));
    if (chosen.length === 0) return { evalLoss: null, evalAccuracy: null };
    const deadline = Date.now() + this.cfg.eval.deadline_sec * 1000;
    const spec: FitSpec = { rank: this.globalRank, proxMu: 0, freezeLoraA: false };
    const made = chosen.map((c) => this.newTask('eval', round, 0, c, spec));
    const tasks = made.map((m) => m.t);
    for (const m of made) this.dispatch(m.t, m.ref, deadline);
    const allIn = await this.conditions.waitFor(() => tasks.every((t) => t.status !== 'running'), deadline);
    if (!allIn) this.board.cancel(tasks, `evaluation deadline of ${this.cfg.eval.deadline_sec} s passed`);
    const reports: EvalReport[] = [];
    for (const t of tasks) {
      const r = t.evalResult;
      if (r && r.hasEvalData) {
        reports.push({ workerId: t.workerId, site: t.site, evalLoss: r.evalLoss, evalTokens: r.evalTokens, evalExamples: r.evalExamples, evalAccuracy: r.evalAccuracy ?? null });
      }
      this.board.delete(t);
    }
    const summary = this.strategy.aggregateEvaluate(round, reports);
    log.info({ round, ...summary, workers: reports.length }, 'evaluation done');
    return summary;
  }

  private stats(site: string): WorkerStats {
    let s = this.state.workers[site];
    if (!s) {
      s = { site, rounds: 0, examples: 0, bytesUp: 0, bytesDown: 0, rejected: 0, failed: 0 };
      this.state.workers[site] = s;
    }
    return s;
  }
}
