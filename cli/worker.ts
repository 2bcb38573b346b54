/**
 * `fedtune worker --coordinator HOST:PORT --data FILE --name SITE --token T --model DIR`:
 * one site of a federated run.
 */
import { Command, Option } from 'commander';
import { intArg, numArg } from './args.ts';
import { parseHostPort } from '../common/config.ts';
import { FatalWorkerError, WorkerAgent } from '../worker/agent.ts';
import { startPresence } from '../worker/presence.ts';
import { totalmem } from 'node:os';
import { TRAINER_BACKENDS } from '../worker/trainers/index.ts';



interface WorkerCliOpts {
  coordinator: string;
  presenceNats?: string;
  data?: string;
  name: string;
  token?: string;
  model: string;
  evalData?: string;
  evalFraction: number;
  trainer: string;
  device: 'cpu' | 'cuda';
  threads?: number;
  template?: string;
  maxSeqLen?: number;
  seed: number;
  tls?: boolean;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsServerName?: string;
  giveUpAfter: number;
  progress?: 'bar' | 'log' | 'none';
  noopStepMs?: number;
  fault?: string;
}

export function register(program: Command): void {
  program
    .command('worker')
    .description('join a federated run: train on local data, send back only the adapter')
    .requiredOption('--coordinator <host:port>', 'coordinator gRPC address')
    .option('--data <file>', 'local training data: JSON array or JSONL of Alpaca or chat records (required in federated runs; distributed runs send each worker its shard)')
    .requiredOption('--name <site>', 'site name shown on the dashboard')
    .requiredOption('--model <dir>', 'local copy of the base model (Hugging Face directory)')
    .option('--token <token>', 'join token of the run (or set FEDTUNE_JOIN_TOKEN)')
    .option('--eval-data <file>', 'local eval data (default: hold out --eval-fraction of --data)')
    .option('--eval-fraction <f>', 'fraction of --data held out for evaluation when --eval-data is not given', numArg('--eval-fraction', 0, 1), 0.1)
    .addOption(new Option('--trainer <backend>', 'training backend').choices([...TRAINER_BACKENDS]).default('onnx'))
    .addOption(new Option('--device <device>', 'where to train').choices(['cpu', 'cuda']).default('cpu'))
    .option('--threads <n>', 'CPU threads for training', intArg('--threads', 1))
    .option('--template <name>', "prompt template (default: the run's training.template)")
    .option('--max-seq-len <n>', "maximum sequence length (default: the run's training.max_seq_len)", intArg('--max-seq-len', 8))
    .option('--seed <n>', 'seed of the local eval split and data order', intArg('--seed', 0), 0)
    .option('--tls', 'connect with TLS (system CA roots unless --tls-ca)')
    .option('--tls-ca <file>', 'PEM CA certificate that signed the coordinator certificate (implies --tls)')
    .option('--tls-cert <file>', 'PEM client certificate, for coordinators requiring one (implies --tls)')
    .option('--tls-key <file>', 'PEM client key (with --tls-cert)')
    .option('--tls-server-name <name>', 'name to verify the coordinator certificate against')
    .option('--give-up-after <sec>', 'stop reconnecting after this many seconds without the coordinator', intArg('--give-up-after', 1), 600)
    .option('--presence-nats <url>', 'announce this worker (idle/training) on NATS subject fedtune.workers.<site>; list them with `fedtune workers --nats URL`')
    .addOption(new Option('--progress <mode>', 'progress display (default: bar on a terminal, log lines otherwise)').choices(['bar', 'log', 'none']))
    .addOption(new Option('--noop-step-ms <ms>', 'noop trainer: duration of a simulated step').argParser(intArg('--noop-step-ms', 0)).hideHelp())
    .addOption(new Option('--fault <kind>', 'fault injection for tests').choices(['kill-mid-upload']).hideHelp())
    .action(async (o: WorkerCliOpts) => {
      parseHostPort(o.coordinator, '--coordinator');
      const token = o.token ?? process.env.FEDTUNE_JOIN_TOKEN;
      if (!token) throw new Error('--token is required (or set FEDTUNE_JOIN_TOKEN)');
      const useTls = o.tls || o.tlsCa || o.tlsCert || o.tlsServerName;
      if ((o.tlsCert === undefined) !== (o.tlsKey === undefined)) throw new Error('--tls-cert and --tls-key go together');
      const presence = o.presenceNats
        ? startPresence({
            nats: { servers: o.presenceNats },
            workerId: `${o.name}-${process.pid}`,
            site: o.name,
            device: o.device === 'cuda' ? 'cuda' : 'cpu',
            memoryBytes: totalmem(),
          })
        : null;
      const agent = new WorkerAgent({
        ...(presence ? { onActivity: (a: 'idle' | 'training', runId: string) => presence.update(a, runId) } : {}),
        coordinator: o.coordinator,
        token,
        site: o.name,
        trainer: o.trainer,
        trainerOptions: {
          modelDir: o.model,
          dataPath: o.data ?? '',
          ...(o.evalData ? { evalPath: o.evalData } : {}),
          evalFraction: o.evalFraction,
          ...(o.template ? { template: o.template } : {}),
          ...(o.maxSeqLen ? { maxSeqLen: o.maxSeqLen } : {}),
          ...(o.threads ? { threads: o.threads } : {}),
          device: o.device,
          seed: o.seed,
          ...(o.noopStepMs !== undefined ? { noopStepMs: o.noopStepMs } : {}),
        },
        tls: useTls
          ? {
              ...(o.tlsCa ? { caFile: o.tlsCa } : {}),
              ...(o.tlsCert ? { certFile: o.tlsCert, keyFile: o.tlsKey! } : {}),
              ...(o.tlsServerName ? { serverName: o.tlsServerName } : {}),
            }
          : null,
        reconnect: { giveUpAfterMs: o.giveUpAfter * 1000 },
        ...(o.progress ? { progress: o.progress } : {}),
        faultKillMidUpload: o.fault === 'kill-mid-upload',
      });
      const ac = new AbortController();
      const stop = (): void => ac.abort(new Error('interrupted'));
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
      try {
        const r = await agent.run(ac.signal);
        console.log(`fedtune worker ${o.name}: run ${r.state}${r.message ? ` (${r.message})` : ''}; ${r.tasksDone} task(s) done`);
        if (r.state === 'failed') process.exitCode = 1;
      } catch (err) {
        if (err instanceof FatalWorkerError) {
          console.error(`fedtune worker ${o.name}: ${err.message}`);
          process.exitCode = 2;
          return;
        }
        throw err;
      } finally {
        process.off('SIGINT', stop);
        process.off('SIGTERM', stop);
        await presence?.close();
      }
    });
}
