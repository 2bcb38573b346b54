/**
 * The coordinator process, composed: base model and initial (or resumed) global
 * adapter, event bus, checkpoint store, strategy, round loop, gRPC server.
 *
 *   const c = await startCoordinator(cfg, { resume: true });
 *   console.log(c.address);          // 127.0.0.1:7070
 *   const result = await c.run;      // the run's outcome
 *   await c.close();
 */
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadOuterState } from '../common/outer.ts';
import * as grpc from '@grpc/grpc-js';
import { parseHostPort, type RunConfig } from '../common/config.ts';
import { inspectModel, type ModelInfo } from '../common/hf-model.ts';
import { logger } from '../common/log.ts';
import type { TensorMap } from '../common/tensor.ts';
import { CoordinatorService } from '../proto/gen/fedtune/v1/coordinator.ts';
import { initLoraAdapter, loraTargets, validateAdapter, type LoraTarget } from '../common/lora.ts';
import { readDoraMagnitudes } from '../common/dora-norms.ts';
import type { LoraConfig } from '../common/model-config.ts';
import { DistributedRun } from './distributed/run.ts';
import { setupDistributed } from './distributed/setup.ts';
import type { EventBus } from './events/bus.ts';
import { MemoryBus } from './events/memory.ts';
import { FederatedRun, type RunResult } from './run.ts';
import { createCoordinatorService, createTransfers, type RunController } from './service.ts';
import { startBulkServer, type BulkServer } from './bulk.ts';
import { createStrategy } from './strategies/index.ts';
import type { StrategyState } from './strategies/strategy.ts';
import { RunDirLock } from './lock.ts';
import { ensureRunDir } from './checkpoint-errors.ts';
import { rankIssue, seqLenIssue } from '../common/limits.ts';
import { AUTO_TEMPLATE, loadChatTemplate, modelChatTemplate } from '../common/data/template.ts';
import { checkServerTls } from '../common/pem.ts';
import { federatedStore, LEGACY_SERVER_OPTIMIZER_FILE, newRunState, RunAlreadyComplete, type RunStateFile } from './store.ts';

export { RunAlreadyComplete } from './store.ts';
import { WorkerRegistry, type RegistryListener } from './workers.ts';
import { logRefusedHandshakes } from './handshake-log.ts';
import { AuditLog, RoundAuditor } from './audit.ts';
import { Admission, Revocations, TokenStore } from './identity.ts';
import { loraConfigOf } from '../common/lora-spec.ts';

const log = logger('coordinator');

export interface CoordinatorOptions {
  /** Continue after the last complete round in CHECKPOINT_DIR/<name>. */
  resume?: boolean;
  /** The run directory's lock, when the caller took it already (before opening the event log there). */
  lock?: RunDirLock;
  /** Event bus to publish to (default: a MemoryBus logging to the run directory). */
  bus?: EventBus;
  /** false: the bulk channel copies plain-TCP uploads into place instead of reading them there (BulkServerOptions.readInPlace; tests). */
  bulkReadInPlace?: boolean;
}

export interface CoordinatorHandle {
  /** HOST:PORT the gRPC server listens on (the real port when the config says 0). */
  address: string;
  port: number;
  /** The bulk tensor channel (server.bulk_port), null when off: its port, and the upload bytes read straight into place (plain TCP). */
  readonly bulk: { port: number; bytesReadInPlace: number } | null;
  runId: string;
  /** CHECKPOINT_DIR/<name> */
  runDir: string;
  bus: EventBus;
  /** Settles when the run completes, fails or is stopped (never rejects). */
  run: Promise<RunResult>;
  /** Stop the run (if still going), tell workers, shut the server down, close an owned bus. */
  close(): Promise<void>;
  /** Re-read server.tls.crl (ending sessions of newly revoked certificates) and server.join_tokens (SIGHUP). */
  reloadIdentities(): Promise<void>;
}

async function serverCredentials(cfg: RunConfig): Promise<grpc.ServerCredentials> {
  const tls = cfg.server.tls;
  if (!tls) return grpc.ServerCredentials.createInsecure();
  const read = async (what: string, path: string): Promise<Buffer> => {
    try {
      return await readFile(path);
    } catch (err) {
      throw new Error(`server.tls.${what}: cannot read ${path} (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
    }
  };
  const cert = await read('cert', tls.cert);
  const key = await read('key', tls.key);
  const ca = tls.client_ca ? await read('client_ca', tls.client_ca) : null;
  // Not PEM, or a key of another certificate: refused here naming the field, not at bind time as server.listen.
  checkServerTls({ field: 'server.tls.cert', path: tls.cert, bytes: cert }, { field: 'server.tls.key', path: tls.key, bytes: key }, ca && { field: 'server.tls.client_ca', path: tls.client_ca!, bytes: ca });
  try {
    return grpc.ServerCredentials.createSsl(ca, [{ cert_chain: cert, private_key: key }], ca !== null);
  } catch (err) {
    throw new Error(`server.tls: gRPC refused the TLS files (${(err as Error).message}); check server.tls.cert ${tls.cert}, server.tls.key ${tls.key}${tls.client_ca ? ` and server.tls.client_ca ${tls.client_ca}` : ''}`);
  }
}

export async function startCoordinator(cfg: RunConfig, opts: CoordinatorOptions = {}): Promise<CoordinatorHandle> {
  // One owner per run directory, before anything in it is touched.
  if (!opts.lock) await ensureRunDir(join(cfg.checkpoint.dir, cfg.name));
  const lock = opts.lock ?? (await RunDirLock.acquire(join(cfg.checkpoint.dir, cfg.name)));
  try {
    return await start(cfg, opts, lock);
  } catch (err) {
    await lock.release();
    throw err;
  }
}

async function start(cfg: RunConfig, opts: CoordinatorOptions, lock: RunDirLock): Promise<CoordinatorHandle> {
  // Base model: the architecture for the adapter's shapes, and the fingerprint workers must match.
  const model = await inspectModel(cfg.model.path);
  if (cfg.model.fingerprint && cfg.model.fingerprint !== model.fingerprint) {
    throw new Error(
      `model.fingerprint: ${cfg.model.path} has fingerprint ${model.fingerprint}, the config expects ${cfg.model.fingerprint}`,
    );
  }
  const lora: LoraConfig = loraConfigOf(cfg.lora);
  let targets;
  try {
    targets = loraTargets(model.config, lora);
  } catch (err) {
    const m = (err as Error).message;
    throw new Error(m.startsWith('lora.') ? m : `lora: ${m}`);
  }
  if (cfg.training.template === AUTO_TEMPLATE) {
    // Each site renders its own copy; the coordinator's copy is checked now so that a model without one fails here, not at every site.
    try {
      modelChatTemplate(await loadChatTemplate(cfg.model.path));
    } catch (err) {
      throw new Error(`training.template: auto renders the model's chat_template, but ${(err as Error).message.replace(/--template/g, 'training.template:')}`);
    }
  }
  const tooLong = seqLenIssue(cfg.training.max_seq_len, model.config.maxPositions, cfg.model.path);
  if (tooLong) throw new Error(`training.max_seq_len: ${tooLong}`);
  // lora.r applies to the modules rank_pattern leaves alone (loraTargets checks the pattern ranks).
  const tooHigh = rankIssue(cfg.lora.r, targets.filter((t) => t.pattern?.rankKey === undefined));
  if (tooHigh) throw new Error(`lora.r: ${tooHigh}`);
  // TLS files before anything is written: a bad PEM must not leave a round-0 checkpoint behind.
  const creds = await serverCredentials(cfg);
  // Revocation list and per-site tokens are checked before anything is written, like the TLS files.
  const revocations = cfg.server.tls?.crl ? await Revocations.load(cfg.server.tls.crl, cfg.server.tls.client_ca!, creds) : null;
  const tokens = cfg.server.join_tokens !== null ? new TokenStore(cfg.server.join_tokens) : null;
  const setup =
    cfg.mode === 'distributed'
      ? await setupDistributedRun(cfg, { model, lora, targets, resume: opts.resume ?? false })
      : await setupFederatedRun(cfg, { model, lora, targets, resume: opts.resume ?? false });

  const ownBus = opts.bus === undefined;
  const bus = opts.bus ?? new MemoryBus({ ringSize: cfg.events.ring_size, ...(cfg.events.log ? { logDir: setup.runDir } : {}) });
  if (setup.complete !== null) {
    // Every round (or step) is checkpointed. With run.completed in the log too, the run is finished and
    // consistent: change nothing. Without it, a crash came between the last checkpoint and its events:
    // run on, so that the missing events are published (once) and the run completes.
    if ((await bus.history(cfg.name, 0)).some((e) => e.type === 'run.completed')) {
      if (ownBus) await bus.close();
      throw new RunAlreadyComplete(setup.complete);
    }
  }
  const registry = new WorkerRegistry(cfg.server.heartbeat_timeout_ms);
  const run = setup.create(bus, registry);
  registry.listener = run;
  const audit = AuditLog.open(setup.runDir);
  const admission = new Admission({
    ...(tokens ? { tokens } : { sharedToken: cfg.server.join_token! }),
    mutual: cfg.server.tls?.client_ca != null,
    revocations,
    audit,
  });
  const reloadCrl = async (): Promise<void> => {
    if (!revocations) return;
    const added = await revocations.reload();
    if (added === null) return;
    audit.write({ type: 'reload', what: 'crl', detail: { revoked: revocations.revokedCount, newly_revoked: added } });
    admission.endRevoked(registry);
  };
  revocations?.watch(() => void reloadCrl());
  // Round records of the audit log, from the run's own events.
  const p = cfg.privacy;
  const rounds = new RoundAuditor(audit, p.secure_aggregation || p.client_dp || p.dp_sgd ? { secure_aggregation: p.secure_aggregation, client_dp: p.client_dp, dp_sgd: p.dp_sgd, delta: p.delta, max_epsilon: p.max_epsilon } : null);
  const auditSub = bus.subscribe({ runId: run.runId, afterSeq: (await bus.history(run.runId)).at(-1)?.seq ?? 0 });
  const auditing = (async () => {
    try {
      for await (const e of auditSub) rounds.onEvent(e as unknown as { type: string } & Record<string, unknown>);
    } catch (err) {
      log.warn({ err: (err as Error).message }, 'audit log: round records stopped (event subscription ended)');
    }
  })();

  const server = new grpc.Server({ 'grpc.keepalive_permit_without_calls': 1, 'grpc.http2.min_ping_interval_without_data_ms': 5000 });
  let bulk: BulkServer | null = null;
  const serviceCtx = { cfg, run, registry, modelFingerprint: model.fingerprint, admission, bulkPort: () => bulk?.port ?? 0 };
  const transfers = createTransfers(serviceCtx);
  server.addService(CoordinatorService, createCoordinatorService(serviceCtx, transfers));
  const { host } = parseHostPort(cfg.server.listen, 'server.listen');
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync(cfg.server.listen, revocations?.serverCredentials ?? creds, (err, p) =>
      err ? reject(new Error(`server.listen: cannot listen on ${cfg.server.listen}: ${err.message}`)) : resolve(p),
    ),
  ).catch(async (err: unknown) => {
    revocations?.close();
    auditSub.close();
    await auditing;
    audit.close();
    throw err;
  });
  if (cfg.server.bulk_port !== null) {
    // The bulk tensor channel: same host, same TLS identity (and CRL) as the gRPC server (bulk.ts).
    const serverCreds = revocations?.serverCredentials ?? creds;
    const tlsOptions = cfg.server.tls ? serverCreds._getSecureContextOptions() : null;
    try {
      bulk = await startBulkServer({ transfers, host: host.replace(/^\[(.*)\]$/, '$1'), port: cfg.server.bulk_port, tls: tlsOptions, mutual: cfg.server.tls?.client_ca != null, readInPlace: opts.bulkReadInPlace ?? true });
    } catch (err) {
      server.forceShutdown();
      revocations?.close();
      auditSub.close();
      await auditing;
      audit.close();
      throw err;
    }
    if (tlsOptions) serverCreds._addWatcher((o) => o && bulk?.setSecureContext(o));
  }
  if (cfg.server.tls) {
    logRefusedHandshakes(server, {
      mutual: cfg.server.tls.client_ca !== null,
      onRefused: (peer, reason) => audit.write({ type: 'refusal', stage: 'handshake', reason, site: null, address: peer }),
    });
  }
  registry.startSweeper(Math.min(1000, cfg.server.heartbeat_interval_ms));
  const address = `${host.includes(':') ? `[${host}]` : host}:${port}`;
  log.info({ address, bulkPort: bulk?.port ?? null, run: cfg.name, mode: cfg.mode, tls: cfg.server.tls !== null, fingerprint: model.fingerprint }, 'coordinator listening');

  let closed = false;
  const runPromise = run.run().then((result) => {
    // stopped: a planned stop (SIGTERM / SIGINT) or restart; the run is not over, so workers keep reconnecting.
    const message = result.state === 'stopped' ? 'the coordinator stopped (planned stop or restart); the run is not over: reconnect until it is back' : (result.error ?? '');
    registry.close({ body: { $case: 'finished', value: { state: result.state, message } } }, `run ${result.state}`);
    return result;
  });

  return {
    address,
    port,
    get bulk() {
      return bulk ? { port: bulk.port, bytesReadInPlace: bulk.bytesReadInPlace } : null;
    },
    runId: run.runId,
    runDir: setup.runDir,
    bus,
    run: runPromise,
    async close() {
      if (closed) return;
      closed = true;
      run.stop();
      await runPromise;
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => {
          server.forceShutdown();
          resolve();
        }, 2000);
        server.tryShutdown(() => {
          clearTimeout(t);
          resolve();
        });
      });
      await bulk?.close();
      revocations?.close();
      auditSub.close();
      await auditing;
      audit.close();
      if (ownBus) await bus.close();
      await lock.release();
    },
    async reloadIdentities() {
      if (closed) return;
      tokens?.reload();
      await reloadCrl();
    },
  };
}

/** What the service and the registry drive: the federated round loop or the distributed step loop. */
type AnyRun = RunController & RegistryListener & { readonly runId: string; run(): Promise<RunResult>; stop(): void };

interface RunSetup {
  /** CHECKPOINT_DIR/<name> */
  runDir: string;
  /** Set when the last checkpoint is the run's last round or step: what to tell the operator. */
  complete: string | null;
  create(bus: EventBus, registry: WorkerRegistry): AnyRun;
}

interface SetupArgs {
  model: ModelInfo;
  lora: LoraConfig;
  targets: LoraTarget[];
  resume: boolean;
}

async function setupDistributedRun(cfg: RunConfig, o: SetupArgs): Promise<RunSetup> {
  const d = await setupDistributed(cfg, o);
  const complete =
    d.resumed && d.state.step >= d.state.totalSteps
      ? `run ${cfg.name} has completed all ${d.state.totalSteps} step(s) (last checkpoint ${d.store.dir(d.state.step)}); nothing to resume and nothing was changed. Raise training.steps / epochs to train further.`
      : null;
  return { runDir: d.store.runDir, complete, create: (bus, registry) => new DistributedRun({ cfg, bus, registry, ...d }) };
}

async function setupFederatedRun(cfg: RunConfig, o: SetupArgs): Promise<RunSetup> {
  const { model, targets } = o;
  const store = federatedStore(cfg, targets.some((t) => t.conv1d));
  if (await store.hasOtherMode()) {
    throw new Error(`${store.runDir} holds a distributed run's step checkpoints: choose another name or checkpoint.dir for this federated run`);
  }
  const removed = await store.cleanTemp();
  if (removed.length > 0) log.info({ removed }, 'removed temporary files a crash left behind');
  const strategy = createStrategy(cfg, targets);

  // Global adapter: resumed from the last complete round, or fresh (round 0 is checkpointed too).
  let global: TensorMap;
  let globalRank = cfg.lora.r;
  let state: RunStateFile;
  const latest = await store.latest();
  let resumed = false;
  let complete: string | null = null;
  if (latest && !o.resume) {
    throw new Error(
      `${store.runDir} already holds checkpoints up to round ${latest.n}: pass --resume to continue that run, or change name / checkpoint.dir to start a new one`,
    );
  }
  if (latest) {
    if (latest.state.modelFingerprint !== model.fingerprint) {
      throw new Error(`cannot resume ${store.runDir}: it was trained on base model ${latest.state.modelFingerprint}, ${cfg.model.path} is ${model.fingerprint}`);
    }
    if (latest.n >= cfg.rounds) {
      complete = `run ${cfg.name} has completed all ${cfg.rounds} round(s) (last checkpoint ${latest.dir}); nothing to resume and nothing was changed. Raise rounds to train further.`;
    }
    global = await store.loadAdapter(latest.dir);
    // With rank_pattern the modules have their own ranks and the adapter's rank is lora.r (strategies give it no other).
    globalRank = targets.some((t) => t.pattern) ? cfg.lora.r : (global.values().next().value?.shape[0] ?? cfg.lora.r);
    try {
      validateAdapter(global, targets, globalRank);
    } catch (err) {
      throw new Error(`cannot resume from ${latest.dir}: the adapter does not fit the config's lora section: ${(err as Error).message}`);
    }
    const saved = (await store.readStrategyState(latest.dir)) ?? (await legacyServerOptimizerState(latest.dir));
    if (saved) {
      try {
        strategy.load(saved);
      } catch (err) {
        throw new Error(`cannot resume from ${latest.dir}: the saved state of the strategy does not fit strategy ${strategy.description}: ${(err as Error).message}`);
      }
    }
    state = latest.state;
    state.updateNorms ??= [];
    resumed = true;
    log.info({ round: latest.n, dir: latest.dir, rank: globalRank }, 'resuming after the last complete round');
  } else {
    if (o.resume) log.warn({ runDir: store.runDir }, '--resume given but no checkpoint exists yet: starting the run from round 0');
    // DoRA magnitudes start at ||W||_c, read from the checkpoint one targeted weight at a time.
    global = initLoraAdapter(targets, undefined, cfg.training.seed, 'float32', await readDoraMagnitudes(model.dir, targets));
    state = newRunState(cfg, model.fingerprint);
    await store.write(state, global, { r: cfg.lora.r, alpha: cfg.lora.alpha }, { strategy: strategy.state() });
  }

  return {
    runDir: store.runDir,
    complete,
    create: (bus, registry) => new FederatedRun({ cfg, bus, registry, store, strategy, global, globalRank, state, resumed }),
  };
}

/** Checkpoints of earlier versions kept a server optimizer's moments in server_optimizer.safetensors. */
async function legacyServerOptimizerState(dir: string): Promise<StrategyState | null> {
  const path = join(dir, LEGACY_SERVER_OPTIMIZER_FILE);
  if (!existsSync(path)) return null;
  const s = await loadOuterState(path);
  const tensors: TensorMap = new Map();
  for (const [k, t] of s.m) tensors.set(`m.${k}`, t);
  for (const [k, t] of s.v) tensors.set(`v.${k}`, t);
  return { json: { kind: s.kind, step: s.step }, tensors };
}
