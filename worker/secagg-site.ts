/**
 * A site's side of secure aggregation (privacy.secure_aggregation) over the
 * session: the four SecAgg* task kinds of one round attempt, one SecAggSite
 * (common/secagg/site.ts) per attempt, keyed by the advertise task's id.
 *
 *   SecAggAdvertiseTask    fresh X25519 key pairs        -> SecAggAdvertiseKeys
 *   SecAggShareKeysTask    Shamir shares, sealed         -> SecAggShareKeys
 *   SecAggMaskedInputTask  open the shares addressed to this site, train from the global adapter,
 *                          delta = trained - start on the masked tensors, L2 clip to clip_norm,
 *                          add distributed noise, times the weight, encode + mask
 *                          -> Upload UPDATE_KIND_SECAGG_MASKED (uint32 words) under the task's id
 *   SecAggUnmaskTask       shares of U3's seeds / dropped sites' keys (never both for one site)
 *                          -> SecAggUnmask
 *
 * Only public keys, sealed shares, the masked vector, revealed shares, the
 * example count and aggregate metrics leave the site.
 *
 * Fault points (common/faults.ts) for tests: `secagg.after-share-keys@ROUND`
 * kills the process when the masked-input task arrives (its shares were
 * delivered: the coordinator moved on), `secagg.after-masked-input@ROUND` once
 * the masked input's upload is acknowledged.
 */
import { faultPoint } from '../common/faults.ts';
import { logger } from '../common/log.ts';
import { addGaussianNoise, clipToNorm } from '../common/privacy/noise.ts';
import { SecAggSite } from '../common/secagg/site.ts';
import type { PublicKeys } from '../common/secagg/protocol.ts';
import type { TensorMap } from '../common/tensor.ts';
import { UpdateKind, type SecAggParams, type Task, type TrainingSpec, type UploadAck, type WorkerMessage } from '../proto/gen/fedtune/v1/coordinator.ts';
import type { TrainOutcome } from './trainers/trainer.ts';

const log = logger('worker.secagg');

/** How many attempts' state a site keeps (a retry starts a new one; older ones are forgotten). */
const KEEP_ATTEMPTS = 2;

/** What the agent lends the site runner: the global adapter, local training and the Upload call. */
export interface SecAggSiteDeps {
  fetchGlobal(task: Task): Promise<TensorMap>;
  train(task: Task, spec: TrainingSpec, global: TensorMap): Promise<TrainOutcome>;
  upload(header: { taskId: string; round: number; kind: UpdateKind; baseVersion: number; numExamples: number; metrics: Record<string, number> }, tensors: TensorMap): Promise<UploadAck>;
  send(m: WorkerMessage): void;
  signal: AbortSignal;
}

interface Attempt {
  round: number;
  params: SecAggParams;
  site: SecAggSite;
}

export function isSecAggTask(task: Task): boolean {
  const c = task.kind?.$case;
  return c === 'secaggAdvertise' || c === 'secaggShareKeys' || c === 'secaggMaskedInput' || c === 'secaggUnmask';
}

/** The site's delta on the masked tensors, clipped, noised and weighted, as one vector. */
export function siteVector(params: SecAggParams, start: TensorMap, trained: TensorMap): Float64Array {
  const n = Number(params.vectorLength);
  const x = new Float64Array(n);
  let off = 0;
  for (const name of params.maskedTensors) {
    const s = start.get(name);
    const t = trained.get(name);
    if (!s || !t) throw new Error(`secure aggregation: tensor ${name} of the masked vector is not in the ${s ? 'trained' : 'global'} adapter`);
    if (s.data.length !== t.data.length) throw new Error(`secure aggregation: tensor ${name} has ${t.data.length} elements after training, ${s.data.length} before`);
    if (off + s.data.length > n) throw new Error(`secure aggregation: the masked tensors hold more than vector_length = ${n} elements`);
    for (let i = 0; i < s.data.length; i++) x[off + i] = t.data[i]! - s.data[i]!;
    off += s.data.length;
  }
  if (off !== n) throw new Error(`secure aggregation: the masked tensors hold ${off} elements, vector_length is ${n}`);
  for (let i = 0; i < n; i++) if (!Number.isFinite(x[i]!)) throw new Error(`secure aggregation: the local update has a non-finite value at element ${i}; nothing was sent`);
  if (params.clipNorm > 0) clipToNorm([x], params.clipNorm);
  if (params.noiseStd > 0) addGaussianNoise(x, params.noiseStd);
  if (!(params.weight > 0 && params.weight <= 1)) throw new Error(`secure aggregation: weight must be in (0, 1] (got ${params.weight})`);
  if (params.weight !== 1) for (let i = 0; i < n; i++) x[i] = x[i]! * params.weight;
  return x;
}

/** Tensors of the masked vector (bytes = the uint32 words, shapes of the masked tensors) for the Upload path. */
function maskedTensors(params: SecAggParams, start: TensorMap, y: Uint32Array): TensorMap {
  const out: TensorMap = new Map();
  let off = 0;
  for (const name of params.maskedTensors) {
    const s = start.get(name)!;
    out.set(name, { shape: [...s.shape], data: new Float32Array(y.buffer, y.byteOffset + off * 4, s.data.length) });
    off += s.data.length;
  }
  return out;
}

export class SecAggSiteRunner {
  private readonly attempts = new Map<string, Attempt>();

  private attempt(id: string, what: string): Attempt {
    const a = this.attempts.get(id);
    if (!a) throw new Error(`secure aggregation: ${what} for attempt ${id || '(none)'}, which this site did not advertise keys for (it may have restarted); it cannot take part`);
    return a;
  }

  /** Handle one SecAgg* task; throws (the agent answers TaskFailed) when the site cannot take part. */
  async handle(task: Task, d: SecAggSiteDeps): Promise<void> {
    const k = task.kind;
    if (!k) return;
    switch (k.$case) {
      case 'secaggAdvertise': {
        const p = k.value.params;
        if (!p) throw new Error('secure aggregation: the advertise task carries no parameters');
        const site = new SecAggSite({
          round: task.round,
          attempt: p.attempt,
          self: p.self,
          cohort: [...p.cohort],
          threshold: p.threshold,
          neighbours: p.neighbours === 0 ? null : p.neighbours,
          graphSeed: p.graphSeed,
          range: p.range,
          maxSummands: p.maxSummands,
          vectorLength: Number(p.vectorLength),
        });
        const keys = site.advertise();
        this.attempts.set(task.taskId, { round: task.round, params: p, site });
        while (this.attempts.size > KEEP_ATTEMPTS) this.attempts.delete(this.attempts.keys().next().value!);
        d.send({ body: { $case: 'secaggKeys', value: { taskId: task.taskId, encPk: keys.encPk, maskPk: keys.maskPk } } });
        log.info({ round: task.round, attempt: p.attempt, self: p.self, cohort: p.cohort.length }, 'secure aggregation: keys advertised');
        return;
      }
      case 'secaggShareKeys': {
        const a = this.attempt(k.value.advertiseTaskId, 'share-keys request');
        const keys = new Map<number, PublicKeys>();
        for (const x of k.value.keys) {
          if (keys.has(x.site)) throw new Error(`secure aggregation, share-keys phase: the coordinator sent two key sets for site ${x.site}`);
          keys.set(x.site, { encPk: x.encPk, maskPk: x.maskPk });
        }
        const ct = await a.site.shareKeys(keys);
        d.send({ body: { $case: 'secaggShares', value: { taskId: task.taskId, shares: [...ct].map(([site, ciphertext]) => ({ site, ciphertext })) } } });
        log.info({ round: task.round, neighbours: ct.size }, 'secure aggregation: shares sent');
        return;
      }
      case 'secaggMaskedInput': {
        faultPoint('secagg.after-share-keys', task.round);
        const a = this.attempt(k.value.advertiseTaskId, 'masked-input request');
        const ct = new Map<number, Uint8Array>();
        for (const s of k.value.shares) {
          if (ct.has(s.site)) throw new Error(`secure aggregation, masked-input phase: two shares from site ${s.site}`);
          ct.set(s.site, s.ciphertext);
        }
        a.site.receiveShares(ct);
        const global = await d.fetchGlobal(task);
        d.signal.throwIfAborted();
        const outcome = await d.train(task, k.value.train?.spec ?? ({} as TrainingSpec), global);
        d.signal.throwIfAborted();
        const x = siteVector(a.params, global, outcome.adapter);
        const y = a.site.maskInput(x, k.value.u2);
        x.fill(0);
        const ack = await d.upload(
          { taskId: task.taskId, round: task.round, kind: UpdateKind.UPDATE_KIND_SECAGG_MASKED, baseVersion: task.global?.version ?? 0, numExamples: outcome.numExamples, metrics: outcome.metrics },
          maskedTensors(a.params, global, y),
        );
        log.info({ round: task.round, bytes: ack.bytes, examples: outcome.numExamples }, 'secure aggregation: masked input uploaded');
        faultPoint('secagg.after-masked-input', task.round);
        return;
      }
      case 'secaggUnmask': {
        const a = this.attempt(k.value.advertiseTaskId, 'unmask request');
        const r = a.site.unmask(k.value.u2, k.value.u3);
        d.send({
          body: {
            $case: 'secaggUnmask',
            value: {
              taskId: task.taskId,
              selfShares: [...r.selfShares].map(([site, share]) => ({ site, share })),
              keyShares: [...r.keyShares].map(([site, share]) => ({ site, share })),
            },
          },
        });
        log.info({ round: task.round, self: r.selfShares.size, key: r.keyShares.size }, 'secure aggregation: unmask shares sent');
        return;
      }
      default:
        throw new Error(`task kind ${k.$case} is not a secure aggregation task`);
    }
  }
}
