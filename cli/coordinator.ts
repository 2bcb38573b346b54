/**
 * `fedtune coordinator --config run.yaml [--resume]`: runs a federated run and
 * prints it round by round.
 */
import { join } from 'node:path';
import { Command } from 'commander';
import { loadRunConfig, parseHostPort } from '../common/config.ts';
import { redactUrl } from '../common/redact.ts';
import { strategyIssues } from '../coordinator/strategies/index.ts';
import { RunDirLock } from '../coordinator/lock.ts';
import { ensureRunDir } from '../coordinator/checkpoint-errors.ts';
import type { RunEvent } from '../common/events.ts';
import type { EventBus } from '../coordinator/events/bus.ts';
import { createEventBus, type NatsBusConfig } from '../coordinator/events/index.ts';
import { addNatsOptions, natsOptionsFrom, type NatsCliOptions } from './dashboard.ts';
import { startDashboardServer, type DashboardServer } from '../coordinator/http/server.ts';
import { RunAlreadyComplete, startCoordinator } from '../coordinator/main.ts';

export function formatBytes(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} kB`;
  return `${n} B`;
}

const num = (x: number | null, digits = 4): string => (x === null ? 'n/a' : x.toFixed(digits));
const pct = (x: number | null): string => (x === null ? 'n/a' : `${(x * 100).toFixed(1)}%`);

/** One human line per event worth printing (null for the rest). */
export function describeEvent(e: RunEvent, totalRounds: number): string | null {
  switch (e.type) {
    case 'run.started':
      if (e.mode === 'distributed') return `run ${e.name}: distributed, ${e.strategy}, ${e.totalSteps} steps${e.resumedFromRound > 0 ? `, resumed after step ${e.resumedFromRound}` : ''}`;
      return `run ${e.name}: ${e.strategy}, ${e.totalRounds} rounds${e.resumedFromRound > 0 ? `, resumed after round ${e.resumedFromRound}` : ''}`;
    case 'worker.joined':
      return `+ ${e.worker.site} joined (${e.worker.device}, ${e.worker.workerId})`;
    case 'worker.left':
      return `- ${e.site} left: ${e.reason}`;
    case 'worker.error':
      return `! ${e.site}: ${e.message}`;
    case 'round.started':
      return `round ${e.round}/${totalRounds}: ${e.cohort.length} worker(s) training from global v${e.globalVersion}`;
    case 'update.rejected':
      return `! update from ${e.site} rejected: ${e.reason}`;
    case 'round.retried':
      return `! round ${e.round} retried: ${e.reason} (need ${e.required})`;
    case 'round.completed':
      return (
        `round ${e.round}/${totalRounds} done in ${(e.durationMs / 1000).toFixed(1)} s: train loss ${num(e.trainLoss)}, ` +
        `eval loss ${num(e.evalLoss)}, eval accuracy ${pct(e.evalAccuracy)} ` +
        `(${e.participants} worker(s), ${e.examples} examples, up ${formatBytes(e.bytesUp)}, down ${formatBytes(e.bytesDown)})`
      );
    case 'step.completed':
      return `step ${e.step}: loss ${e.loss.toFixed(4)}, ${Math.round(e.tokensPerSec)} tok/s, ${e.workers} worker(s); compute ${e.computeMs.toFixed(0)} ms, communicate ${e.communicateMs.toFixed(0)} ms, aggregate ${e.aggregateMs.toFixed(0)} ms`;
    case 'checkpoint.written':
      return `  checkpoint ${e.path}`;
    case 'run.completed':
      return `run completed after ${e.rounds} ${e.metrics.steps !== undefined ? 'step' : 'round'}(s); final adapter: ${e.finalAdapterPath}`;
    case 'run.failed':
      return `run failed: ${e.error}`;
    case 'log':
      return e.level === 'info' ? e.message : `${e.level}: ${e.message}`;
    default:
      return null;
  }
}

/** Print a run's events from `afterSeq` on until the subscription closes. */
export async function printEvents(bus: EventBus, runId: string, afterSeq: number, totalRounds: number): Promise<void> {
  const sub = bus.subscribe({ runId, afterSeq });
  try {
    for await (const e of sub) {
      const line = describeEvent(e, totalRounds);
      if (line) console.log(line);
    }
  } catch {
    /* the bus closed or we fell behind: printing is best effort */
  }
}

interface CoordinatorCliOpts extends NatsCliOptions {
  config: string;
  resume?: boolean;
  listen?: string;
  token?: string;
  checkpointDir?: string;
}

export function register(program: Command): void {
  const cmd = program
    .command('coordinator')
    .description('run a federated fine-tuning run: accept workers, run rounds, checkpoint')
    .requiredOption('-c, --config <file>', 'run config (YAML or JSON)')
    .option('--resume', 'continue after the last complete round in CHECKPOINT_DIR/<name>')
    .option('--listen <host:port>', 'override server.listen')
    .option('--token <token>', 'override server.join_token (or set FEDTUNE_JOIN_TOKEN)')
    .option('--checkpoint-dir <dir>', 'override checkpoint.dir');
  addNatsOptions(cmd, false)
    .action(async (o: CoordinatorCliOpts) => {
      if (o.listen) parseHostPort(o.listen, '--listen');
      const cfg = await loadRunConfig(o.config, {
        ...(o.token ? { joinToken: o.token } : {}),
        ...(o.listen ? { listen: o.listen } : {}),
        ...(o.checkpointDir ? { checkpointDir: o.checkpointDir } : {}),
      }, strategyIssues);
      const runDir = join(cfg.checkpoint.dir, cfg.name);
      // The run directory's lock comes first: before the event log there is opened.
      await ensureRunDir(runDir); // read-only or misplaced checkpoint.dir: refused naming it
      const lock = await RunDirLock.acquire(runDir);
      // --nats (and its credential/TLS flags) override events.nats from the config file.
      const fromCli = natsOptionsFrom(o);
      const fromFile = cfg.events.nats;
      const nats: NatsBusConfig | undefined =
        fromCli || fromFile
          ? {
              ...(fromFile
                ? {
                    servers: fromFile.url,
                    stream: fromFile.stream,
                    subjectRoot: fromFile.subject_root,
                    maxAgeSec: fromFile.max_age_sec,
                    maxBytes: fromFile.max_bytes,
                    maxMsgs: fromFile.max_msgs,
                    queueLimit: fromFile.queue_limit,
                  }
                : { servers: fromCli!.servers }),
              ...(fromCli ?? {}),
            }
          : undefined;
      const bus = await createEventBus({
        ...(nats ? { nats } : {}),
        memory: { ringSize: cfg.events.ring_size, ...(cfg.events.log ? { logDir: runDir } : {}) },
      }).catch(async (err: unknown) => {
        await lock.release();
        throw err;
      });
      if (nats) console.log(`events: publishing to NATS ${redactUrl(nats.servers)} (stream ${nats.stream ?? 'FEDTUNE_EVENTS'})`);
      const afterSeq = (await bus.history(cfg.name)).at(-1)?.seq ?? 0;
      const printing = printEvents(bus, cfg.name, afterSeq, cfg.rounds);
      let handle;
      try {
        handle = await startCoordinator(cfg, { resume: o.resume ?? false, bus, lock });
      } catch (err) {
        await bus.close();
        await printing.catch(() => {});
        if (err instanceof RunAlreadyComplete) {
          console.log(err.message);
          return;
        }
        throw err;
      }
      console.log(`fedtune coordinator: listening on ${handle.address} (run ${handle.runId}, checkpoints in ${handle.runDir})`);
      let dashboard: DashboardServer | null = null;
      if (cfg.dashboard.enabled) {
        const { host, port, token } = cfg.dashboard;
        try {
          const d = cfg.dashboard;
          dashboard = await startDashboardServer({
            bus,
            host,
            port,
            ...(token ? { token } : {}),
            ...(d.tls ? { tls: { certFile: d.tls.cert, keyFile: d.tls.key } } : {}),
            behindTlsProxy: d.behind_tls_proxy,
            allowedOrigins: d.allowed_origins,
          });
          // Never the token itself: the page asks for it.
          console.log(`dashboard: open ${dashboard.url}${token ? ' and give the dashboard token (dashboard.token of the run config)' : ''}`);
        } catch (err) {
          // The run goes on without it: a busy port must not cost a training run.
          console.log(`dashboard not started: ${(err as Error).message} (set dashboard.port, or dashboard.enabled: false)`);
        }
      }
      const stop = (): void => {
        console.log('stopping (signal received)');
        void handle.close();
      };
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
      // SIGHUP: re-read server.tls.crl and server.join_tokens now (they are also watched).
      const reload = (): void => {
        console.log('reloading the revocation list and join tokens (SIGHUP)');
        void handle.reloadIdentities();
      };
      process.on('SIGHUP', reload);
      const result = await handle.run;
      await handle.close();
      await dashboard?.close();
      await bus.close();
      await printing;
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      process.off('SIGHUP', reload);
      if (result.state === 'stopped') {
        // A planned stop: workers keep reconnecting; the run goes on after a restart.
        console.log(`stopped after ${cfg.mode === 'distributed' ? 'step' : 'round'} ${result.rounds}: the workers keep reconnecting; continue with --resume`);
      } else if (result.state !== 'completed') process.exitCode = 1;
    });
}
