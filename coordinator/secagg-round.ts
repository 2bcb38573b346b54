/**
 * One round attempt under secure aggregation (privacy.secure_aggregation),
 * on top of the round loop (run.ts): the loop picks the cohort, makes one
 * train task per site and owns quorum, retries and checkpoints; this file runs
 * the four phases of Bonawitz et al. 2017 (SecAgg+ with `neighbours`) over the
 * session and Upload calls and hands the loop the decoded sum.
 *
 *   advertise     SecAggAdvertiseTask  -> SecAggAdvertiseKeys     U1
 *   share keys    SecAggShareKeysTask  -> SecAggShareKeys         U2
 *   masked input  SecAggMaskedInputTask (the train task's id)     U3
 *                 -> Upload UPDATE_KIND_SECAGG_MASKED, folded into SecAggServer's one running sum
 *   unmask        SecAggUnmaskTask     -> SecAggUnmask            finish(): sum_k w_k delta_k over U3
 *
 * Sites are indexed 1..n in the cohort order. Phase tasks are named after the
 * train task: `<id>.keys`, `<id>.shares`, `<id>.unmask`; the masked input is
 * uploaded under `<id>` itself, so the task board's upload prologue (owner,
 * duplicate, stale) applies to it unchanged. A phase waits until every site
 * still in it has answered or dropped, or phase_timeout_sec passes (the masked
 * input phase, which includes local training, waits until the round deadline);
 * fewer than `threshold` sites left fails the attempt with SecAggBelowThreshold
 * naming the phase, and the loop retries the round with fresh keys. A site that
 * leaves (or sends a malformed message) is dropped for the rest of the attempt;
 * a site that reconnects comes back with a new worker id and is not re-admitted.
 *
 * The coordinator holds public keys, sealed shares, the running masked sum and
 * the revealed shares: never a site's update. Weights: each site masks
 * w_k * delta_k with w_k its registered weight divided by the cohort's largest
 * (so w_k is in (0, 1]); the loop divides the decoded sum by sum_{k in U3} w_k.
 */
import { randomBytes } from 'node:crypto';
import { logger } from '../common/log.ts';
import type { SecureAggregationConfig } from '../common/privacy/config.ts';
import { quantisationBound } from '../common/secagg/quantise.ts';
import { SecAggBelowThreshold, SecAggSiteError } from '../common/secagg/protocol.ts';
import { SecAggServer, type SecAggObserver } from '../common/secagg/server.ts';
import type { PublicKeys } from '../common/secagg/protocol.ts';
import type { TensorMap } from '../common/tensor.ts';
import { UpdateKind, type AdapterRef, type Task, type TaskFailed, type TrainingSpec, type WorkerMessage } from '../proto/gen/fedtune/v1/coordinator.ts';

const log = logger('coordinator.secagg');

export { SecAggBelowThreshold } from '../common/secagg/protocol.ts';

/** One site of the attempt: its index, its train task and what it starts from. */
export interface SecAggMember {
  index: number;
  workerId: string;
  site: string;
  /** The train task (the masked input is uploaded under its id). */
  taskId: string;
  weight: number;
  spec: TrainingSpec;
  ref: AdapterRef;
}

/** What the round needs from the loop; the loop never hands it a socket. */
export interface SecAggHost {
  /** Send one task down a worker's session; false when its session is gone. */
  send(workerId: string, task: Task): boolean;
  waitFor(pred: () => boolean, deadline: number): Promise<boolean>;
  /** The train task's state as the task board sees it. */
  status(taskId: string): 'running' | 'uploading' | 'done' | 'failed' | 'cancelled' | undefined;
  /** Drop a site from the attempt: fail its train task (and tell its worker) with `reason`. */
  drop(taskId: string, reason: string): void;
  publish(level: 'info' | 'warn', message: string): void;
}

export interface SecAggRoundOptions {
  round: number;
  attempt: number;
  cfg: SecureAggregationConfig;
  members: SecAggMember[];
  /** Adapter tensors in the masked vector, in manifest order (FFA-LoRA: lora_B only), with their element counts. */
  masked: ReadonlyArray<{ name: string; size: number }>;
  /** L2 clip of each site's delta before weighting (0: none) and the std of the noise each site adds (0: none). */
  clipNorm: number;
  noiseStd: number;
  /** Deadline of the masked-input phase (the round's deadline: it includes local training). */
  deadline: number;
  host: SecAggHost;
  observer?: SecAggObserver;
}

export interface SecAggOutcome {
  /** sum_{k in U3} w_k delta_k over the masked vector. */
  sum: Float64Array;
  /** Train task ids of U3 and their summed weight. */
  u3: string[];
  weight: number;
  /** Per-coordinate bound of the sum's quantisation error. */
  bound: number;
}

type Phase = 'advertise' | 'share-keys' | 'masked-input' | 'unmask';

let processObserver: SecAggObserver | undefined;

/**
 * Observe every buffer the aggregation servers of this process hold (tests that
 * run the coordinator in-process assert that none is an individual update);
 * undefined switches it off. A round's own `observer` option takes precedence.
 */
export function setSecAggObserver(observer: SecAggObserver | undefined): void {
  processObserver = observer;
}

export class SecAggRound {
  private readonly o: SecAggRoundOptions;
  private readonly server: SecAggServer;
  private readonly byIndex = new Map<number, SecAggMember>();
  private readonly byPhaseTask = new Map<string, { m: SecAggMember; phase: Phase }>();
  private readonly dropped = new Map<number, string>();
  private readonly answered = new Set<string>();
  private readonly graphSeed = randomBytes(32);
  private phase: Phase = 'advertise';
  /** Messages of the current phase, applied in arrival order (a site's answer may need an await). */
  private work: Promise<void> = Promise.resolve();

  constructor(o: SecAggRoundOptions) {
    this.o = o;
    const cohort = o.members.map((m) => m.index);
    const vectorLength = o.masked.reduce((s, e) => s + e.size, 0);
    this.server = new SecAggServer(
      {
        round: o.round,
        attempt: o.attempt,
        cohort,
        threshold: o.cfg.threshold,
        neighbours: o.cfg.neighbours,
        graphSeed: this.graphSeed,
        range: o.cfg.range,
        maxSummands: cohort.length,
        vectorLength,
      },
      o.observer ?? processObserver,
    );
    for (const m of o.members) {
      this.byIndex.set(m.index, m);
      for (const p of ['keys', 'shares', 'unmask'] as const) this.byPhaseTask.set(`${m.taskId}.${p}`, { m, phase: p === 'keys' ? 'advertise' : p === 'shares' ? 'share-keys' : 'unmask' });
    }
  }

  get vectorLength(): number {
    return this.o.masked.reduce((s, e) => s + e.size, 0);
  }

  /** True when `taskId` names one of this attempt's phase tasks. */
  owns(taskId: string): boolean {
    return this.byPhaseTask.has(taskId);
  }

  private alive(m: SecAggMember): boolean {
    if (this.dropped.has(m.index)) return false;
    const s = this.o.host.status(m.taskId);
    return s === 'running' || s === 'uploading' || s === 'done';
  }

  private drop(m: SecAggMember, reason: string): void {
    if (this.dropped.has(m.index)) return;
    this.dropped.set(m.index, reason);
    log.warn({ round: this.o.round, attempt: this.o.attempt, site: m.site, index: m.index, phase: this.phase }, `secure aggregation: site dropped: ${reason}`);
    this.o.host.publish('warn', `round ${this.o.round}, attempt ${this.o.attempt + 1}: secure aggregation, ${this.phase} phase: site ${m.site} dropped: ${reason}`);
    if (this.o.host.status(m.taskId) !== 'done') this.o.host.drop(m.taskId, `secure aggregation, ${this.phase} phase: ${reason}`);
  }

  private params(m: SecAggMember): Task {
    const cfg = this.o.cfg;
    return {
      taskId: `${m.taskId}.keys`,
      round: this.o.round,
      deadlineUnixMs: Date.now() + cfg.phase_timeout_sec * 1000,
      global: m.ref,
      kind: {
        $case: 'secaggAdvertise',
        value: {
          params: {
            attempt: this.o.attempt,
            self: m.index,
            cohort: this.o.members.map((x) => x.index),
            threshold: cfg.threshold,
            neighbours: cfg.neighbours ?? 0,
            graphSeed: this.graphSeed,
            range: cfg.range,
            maxSummands: this.o.members.length,
            vectorLength: this.vectorLength,
            weight: m.weight,
            maskedTensors: this.o.masked.map((e) => e.name),
            clipNorm: this.o.clipNorm,
            noiseStd: this.o.noiseStd,
          },
        },
      },
    };
  }

  /** Send one phase's task to each of `to`; a worker whose session is gone is dropped. */
  private sendAll(to: readonly SecAggMember[], make: (m: SecAggMember) => Task): void {
    for (const m of to) {
      if (!this.alive(m)) continue;
      if (!this.o.host.send(m.workerId, make(m))) this.drop(m, 'could not send the phase task (session closed)');
    }
  }

  /** Wait until every live site of `to` is `done` (or the deadline), then drop the silent ones. */
  private async settle(to: readonly SecAggMember[], done: (m: SecAggMember) => boolean, deadline: number): Promise<void> {
    await this.o.host.waitFor(() => to.every((m) => !this.alive(m) || done(m)), deadline);
    await this.work;
    for (const m of to) if (this.alive(m) && !done(m)) this.drop(m, `no answer within the phase's time limit`);
  }

  private need(phase: Phase, have: number): void {
    if (have < this.o.cfg.threshold) {
      const gone = [...this.dropped].map(([i, r]) => `${this.byIndex.get(i)!.site}: ${r}`).slice(0, 3);
      throw new SecAggBelowThreshold(phase, have, this.o.cfg.threshold, gone.length > 0 ? `dropped: ${gone.join('; ')}` : '');
    }
  }

  private members(indices: readonly number[]): SecAggMember[] {
    return indices.map((i) => this.byIndex.get(i)!).filter((m) => m !== undefined);
  }

  /** Run the attempt; throws SecAggBelowThreshold when a phase ends with fewer than `threshold` sites. */
  async run(): Promise<SecAggOutcome> {
    const o = this.o;
    const phaseMs = o.cfg.phase_timeout_sec * 1000;
    const t = o.cfg.threshold;
    const note = (phase: Phase, have: number): void => {
      log.info({ round: o.round, attempt: o.attempt, phase, sites: have, threshold: t }, 'secure aggregation phase done');
    };

    // 0. advertise keys
    this.phase = 'advertise';
    this.sendAll(o.members, (m) => this.params(m));
    await this.settle(o.members, (m) => this.answered.has(`${m.taskId}.keys`), Math.min(o.deadline, Date.now() + phaseMs));
    const u1 = this.server.u1().filter((i) => this.alive(this.byIndex.get(i)!));
    this.need('advertise', u1.length);
    note('advertise', u1.length);

    // 1. share keys
    this.phase = 'share-keys';
    const m1 = this.members(u1);
    this.sendAll(m1, (m) => ({
      taskId: `${m.taskId}.shares`,
      round: o.round,
      deadlineUnixMs: Date.now() + phaseMs,
      global: m.ref,
      kind: {
        $case: 'secaggShareKeys',
        value: { advertiseTaskId: `${m.taskId}.keys`, keys: [...this.server.keysFor(m.index)].map(([site, k]) => ({ site, encPk: k.encPk, maskPk: k.maskPk })) },
      },
    }));
    await this.settle(m1, (m) => this.answered.has(`${m.taskId}.shares`), Math.min(o.deadline, Date.now() + phaseMs));
    const u2 = this.server.u2().filter((i) => this.alive(this.byIndex.get(i)!));
    this.need('share-keys', u2.length);
    note('share-keys', u2.length);

    // 2. masked input (local training happens here)
    this.phase = 'masked-input';
    const m2 = this.members(u2);
    const u2All = this.server.u2();
    this.sendAll(m2, (m) => ({
      taskId: m.taskId,
      round: o.round,
      deadlineUnixMs: o.deadline,
      global: m.ref,
      kind: {
        $case: 'secaggMaskedInput',
        value: {
          advertiseTaskId: `${m.taskId}.keys`,
          train: { spec: m.spec, uploadKind: UpdateKind.UPDATE_KIND_SECAGG_MASKED },
          shares: [...this.server.sharesFor(m.index)].map(([site, ciphertext]) => ({ site, ciphertext })),
          u2: u2All,
        },
      },
    }));
    await this.settle(m2, (m) => o.host.status(m.taskId) === 'done', o.deadline);
    const u3 = this.server.u3();
    this.need('masked-input', u3.length);
    note('masked-input', u3.length);

    // 3. unmask
    this.phase = 'unmask';
    const m3 = this.members(u3);
    this.sendAll(m3, (m) => ({
      taskId: `${m.taskId}.unmask`,
      round: o.round,
      deadlineUnixMs: Date.now() + phaseMs,
      global: m.ref,
      kind: { $case: 'secaggUnmask', value: { advertiseTaskId: `${m.taskId}.keys`, u2: u2All, u3 } },
    }));
    await this.settle(m3, (m) => this.answered.has(`${m.taskId}.unmask`), Date.now() + phaseMs);
    let sum: Float64Array;
    try {
      sum = await this.server.finish();
    } catch (err) {
      if (!(err instanceof SecAggSiteError)) throw err;
      throw new SecAggBelowThreshold('unmask', m3.filter((m) => this.answered.has(`${m.taskId}.unmask`) && this.alive(m)).length, t, err.message);
    }
    note('unmask', m3.filter((m) => this.answered.has(`${m.taskId}.unmask`)).length);
    return { sum, u3: m3.map((m) => m.taskId), weight: m3.reduce((s, m) => s + m.weight, 0), bound: quantisationBound(o.cfg.range, o.members.length, u3.length) };
  }

  /** A SecAgg answer on a worker's session: checked, then handed to the server; a bad one drops the site. */
  onMessage(workerId: string, body: NonNullable<WorkerMessage['body']>): void {
    const taskId = body.$case === 'secaggKeys' || body.$case === 'secaggShares' || body.$case === 'secaggUnmask' ? body.value.taskId : '';
    const hit = this.byPhaseTask.get(taskId);
    if (!hit) return;
    const { m, phase } = hit;
    if (m.workerId !== workerId || !this.alive(m)) return;
    if (phase !== this.phase) {
      this.drop(m, `sent its ${phase} answer during the ${this.phase} phase`);
      return;
    }
    if (this.answered.has(taskId)) {
      this.drop(m, `answered the ${phase} phase twice`);
      return;
    }
    this.answered.add(taskId);
    this.work = this.work.then(async () => {
      try {
        let refused: SecAggSiteError | null = null;
        if (body.$case === 'secaggKeys') {
          const k: PublicKeys = { encPk: body.value.encPk, maskPk: body.value.maskPk };
          refused = this.server.addKeys(m.index, k);
        } else if (body.$case === 'secaggShares') {
          const ct = new Map<number, Uint8Array>();
          for (const s of body.value.shares) {
            if (ct.has(s.site)) throw new Error(`two shares addressed to site ${s.site}`);
            ct.set(s.site, s.ciphertext);
          }
          refused = this.server.addShares(m.index, ct);
        } else if (body.$case === 'secaggUnmask') {
          const toMap = (xs: ReadonlyArray<{ site: number; share: Uint8Array }>, what: string): Map<number, Uint8Array> => {
            const out = new Map<number, Uint8Array>();
            for (const s of xs) {
              if (out.has(s.site)) throw new Error(`two ${what} shares for site ${s.site}`);
              out.set(s.site, s.share);
            }
            return out;
          };
          refused = this.server.addUnmask(m.index, { selfShares: toMap(body.value.selfShares, 'self-mask'), keyShares: toMap(body.value.keyShares, 'key') });
        }
        if (refused) this.drop(m, refused.message);
      } catch (err) {
        this.drop(m, `malformed ${phase} message: ${(err as Error).message}`);
      }
    });
  }

  /** A TaskFailed for one of this attempt's phase tasks drops its site. */
  onTaskFailed(workerId: string, f: TaskFailed): void {
    const hit = this.byPhaseTask.get(f.taskId);
    if (!hit || hit.m.workerId !== workerId) return;
    this.drop(hit.m, `${f.unsupported ? 'the worker does not support secure aggregation' : 'failed'}: ${f.message}`);
  }

  /** A worker left: drop its site (its masked input, if it arrived, stays in the sum; the others' shares unmask it). */
  onWorkerGone(workerId: string, reason: string): void {
    for (const m of this.o.members) if (m.workerId === workerId) this.drop(m, `worker left (${reason})`);
  }

  /** The manifest an upload of the masked input must carry: the masked tensors. */
  maskedNames(): string[] {
    return this.o.masked.map((e) => e.name);
  }

  /** A checked, complete masked-input upload of train task `taskId`: folded into the running sum at once. */
  addMaskedInput(taskId: string, bytes: Uint8Array): void {
    const m = this.o.members.find((x) => x.taskId === taskId);
    if (!m) throw new Error(`task ${taskId} is not part of this secure aggregation attempt`);
    if (this.phase !== 'masked-input') throw new Error(`masked input of site ${m.site} arrived during the ${this.phase} phase`);
    if (bytes.byteLength !== this.vectorLength * 4) throw new Error(`masked input of site ${m.site} has ${bytes.byteLength} bytes, the masked vector needs ${this.vectorLength * 4}`);
    const aligned = bytes.byteOffset % 4 === 0 ? bytes : bytes.slice();
    const refused = this.server.addMaskedInput(m.index, new Uint32Array(aligned.buffer, aligned.byteOffset, this.vectorLength));
    if (refused) {
      this.drop(m, refused.message);
      throw refused;
    }
  }
}

/** start + sum / divisor over the masked tensors; the others (FFA-LoRA's lora_A) stay as they are, bit for bit. */
export function updateFromSum(start: TensorMap, masked: ReadonlyArray<{ name: string; size: number }>, sum: Float64Array, divisor: number): TensorMap {
  const out: TensorMap = new Map();
  const at = new Map<string, number>();
  let off = 0;
  for (const e of masked) {
    at.set(e.name, off);
    off += e.size;
  }
  for (const [name, t] of start) {
    const o = at.get(name);
    if (o === undefined) {
      out.set(name, { shape: [...t.shape], data: Float32Array.from(t.data) });
      continue;
    }
    const data = new Float32Array(t.data.length);
    for (let i = 0; i < data.length; i++) data[i] = t.data[i]! + sum[o + i]! / divisor;
    out.set(name, { shape: [...t.shape], data });
  }
  return out;
}
