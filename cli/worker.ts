/**
 * `fedtune worker --coordinator HOST:PORT --data FILE --name SITE --token T --model DIR`:
 * one site of a federated run.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { intArg, numArg } from './args.ts';
import { parseHostPort } from '../common/config.ts';
import { FatalWorkerError, WorkerAgent } from '../worker/agent.ts';
import { startPresence } from '../worker/presence.ts';
import { totalmem } from 'node:os';
import { TRAINER_BACKENDS, type TrainerBackendOptions, type TrainerFaults } from '../worker/trainers/index.ts';
import { DEFAULT_EXEC_GRACE_SEC, splitCommand } from '../worker/trainers/exec.ts';
import { parseByzantine, type ByzantineOptions } from '../worker/trainers/byzantine.ts';
import type { TrainerFactoryOptions } from '../worker/trainers/trainer.ts';
import { parseQuantizeBase } from '../worker/engine/quantize.ts';
import { checkHalfCombination, parseComputeDtype } from '../worker/engine/half.ts';
import { planRun } from '../worker/engine/memory-plan.ts';
import { readModelDir } from '../common/hf-model.ts';
import { validTargetModules } from '../common/lora.ts';



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
  /** onnx trainer: 4-bit base weights, nf4 or int4. */
  quantizeBase?: string;
  /** onnx trainer: recompute each decoder layer in the backward pass. */
  recompute?: boolean;
  /** onnx trainer: float32 or float16 (base weights, and products on CUDA). */
  computeDtype?: string;
  /** Print the memory plan for --batch-size x --max-seq-len and exit. */
  plan?: boolean;
  batchSize?: number;
  loraR?: number;
  template?: string;
  maxSeqLen?: number;
  seed: number;
  tls?: boolean;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsServerName?: string;
  /** commander's --no-bulk */
  bulk: boolean;
  giveUpAfter: number;
  progress?: 'bar' | 'log' | 'none';
  noopStepMs?: number;
  noopPerturb?: boolean;
  fault?: string;
  faultByzantine?: ByzantineOptions;
  exec?: string;
  execWorkdir?: string;
  execKeep?: boolean;
  execGraceSec?: number;
  execNoEval?: boolean;
}

/** --exec and its companions go with --trainer exec, and --trainer exec needs --exec. */
function checkExecOptions(o: WorkerCliOpts): void {
  if (o.trainer === 'exec') {
    if (o.exec === undefined) throw new Error('--trainer exec needs --exec CMD, the command that trains one task (e.g. --exec "python3 train.py")');
    splitCommand(o.exec, '--exec');
    return;
  }
  const given: Array<[string, boolean]> = [
    ['--exec', o.exec !== undefined],
    ['--exec-workdir', o.execWorkdir !== undefined],
    ['--exec-keep', o.execKeep === true],
    ['--exec-grace-sec', o.execGraceSec !== undefined],
    ['--exec-no-eval', o.execNoEval === true],
  ];
  const stray = given.find(([, on]) => on);
  if (stray) throw new Error(`${stray[0]} is an option of the exec trainer: add --trainer exec (the trainer is ${o.trainer})`);
}

function byzantineArg(v: string): ByzantineOptions {
  try {
    return parseByzantine(v);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
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
    .addOption(new Option('--trainer <backend>', 'training backend (exec: run your own training command per task, see --exec)').choices([...TRAINER_BACKENDS]).default('onnx'))
    .option('--exec <cmd>', 'with --trainer exec: the command that trains one task, split into arguments without a shell; it gets --task-dir DIR (see docs/federated.md, "Exec trainer")')
    .option('--exec-workdir <dir>', 'with --trainer exec: where task directories are made (default: a temporary directory)')
    .option('--exec-keep', 'with --trainer exec: keep each task directory after the task (for debugging the command)')
    .option('--exec-grace-sec <sec>', `with --trainer exec: seconds between SIGTERM and SIGKILL when a task is cancelled (default ${DEFAULT_EXEC_GRACE_SEC})`, numArg('--exec-grace-sec', 0))
    .option('--exec-no-eval', 'with --trainer exec: do not run the command for evaluation (the worker registers no eval data)')
    .addOption(new Option('--device <device>', 'where to train').choices(['cpu', 'cuda']).default('cpu'))
    .option('--threads <n>', 'CPU threads for training', intArg('--threads', 1))
    .option('--quantize-base <format>', 'onnx trainer: hold the base model\'s decoder linear weights 4-bit (QLoRA): nf4 or int4; LoRA trains in float32 on top')
    .option('--recompute', 'onnx trainer: recompute each decoder layer in the backward pass instead of keeping its activations (less memory, about a third more compute)')
    .option('--compute-dtype <dtype>', 'onnx trainer: float32 (default), float16 (the base model\'s matrices held in float16, half the memory; on CUDA their products run in float16 with dynamic loss scaling) or bfloat16 (a bfloat16 checkpoint\'s matrices left in its files, mapped by ONNX Runtime, widened per product); LoRA and AdamW stay float32')
    .option('--plan', 'print the memory plan of a task at --batch-size x --max-seq-len (LoRA at --lora-r on every module) against the device\'s memory and exit without joining: 0 when it fits')
    .option('--batch-size <n>', 'with --plan: the run\'s training.batch_size (default 8)', intArg('--batch-size', 1))
    .option('--lora-r <n>', 'with --plan: the run\'s lora.r (default 8)', intArg('--lora-r', 1))
    .option('--template <name>', "prompt template (default: the run's training.template)")
    .option('--max-seq-len <n>', "maximum sequence length (default: the run's training.max_seq_len)", intArg('--max-seq-len', 8))
    .option('--seed <n>', 'seed of the local eval split and data order', intArg('--seed', 0), 0)
    .option('--tls', 'connect with TLS (system CA roots unless --tls-ca)')
    .option('--tls-ca <file>', 'PEM CA certificate that signed the coordinator certificate (implies --tls)')
    .option('--tls-cert <file>', 'PEM client certificate, for coordinators requiring one (implies --tls)')
    .option('--tls-key <file>', 'PEM client key (with --tls-cert)')
    .option('--tls-server-name <name>', 'name to verify the coordinator certificate against')
    .option('--no-bulk', "transfer over the gRPC streams even when the coordinator offers its bulk tensor channel (RegisterResponse.bulk_port)")
    .option('--give-up-after <sec>', 'stop reconnecting after this many seconds without the coordinator', intArg('--give-up-after', 1), 600)
    .option('--presence-nats <url>', 'announce this worker (idle/training) on NATS subject fedtune.workers.<site>; list them with `fedtune workers --nats URL`')
    .addOption(new Option('--progress <mode>', 'progress display (default: bar on a terminal, log lines otherwise)').choices(['bar', 'log', 'none']))
    .addOption(new Option('--noop-step-ms <ms>', 'noop trainer: duration of a simulated step').argParser(intArg('--noop-step-ms', 0)).hideHelp())
    .addOption(new Option('--no-noop-perturb', 'noop trainer: send the global adapter back untouched (transport benchmarks)').hideHelp())
    .addOption(new Option('--fault <kind>', 'fault injection for tests').choices(['kill-mid-upload', 'corrupt-upload']).hideHelp())
    .addOption(
      new Option(
        '--fault-byzantine <scale,factor>',
        'fault injection for testing robust aggregation: send global + SCALE * (local - global) as this site\'s update ' +
          'and claim FACTOR times its example counts (e.g. -10,100: sign-flipped x10, 100x the examples); never use in a real run',
      ).argParser(byzantineArg),
    )
    .action(async (o: WorkerCliOpts) => {
      // How the onnx trainer holds the base, checked alike for --plan and for joining.
      const quantizeBase = parseQuantizeBase(o.quantizeBase, '--quantize-base');
      const computeDtype = parseComputeDtype(o.computeDtype);
      checkHalfCombination({ computeDtype, quantizeBase });
      if (o.plan) {
        // Tasks are checked against the plan as they arrive (worker/trainers/onnx.ts); --plan shows it beforehand.
        const config = (await readModelDir(o.model)).config;
        planRun(config, {
          mode: 'lora',
          lora: { r: o.loraR ?? 8, alpha: 2 * (o.loraR ?? 8), dropout: 0, targetModules: [...validTargetModules(config)] },
          batchSize: o.batchSize ?? 8,
          seqLen: o.maxSeqLen ?? 256,
          recompute: o.recompute ?? false,
          ...(quantizeBase ? { quantizeBase } : {}),
          computeDtype,
          device: o.device,
        }, (line) => console.log(line));
        return;
      }
      if (o.batchSize !== undefined || o.loraR !== undefined) throw new Error('--batch-size and --lora-r go with --plan (a task\'s batch size and rank come from the run)');
      parseHostPort(o.coordinator, '--coordinator');
      const token = o.token ?? process.env.FEDTUNE_JOIN_TOKEN;
      if (!token) throw new Error('--token is required (or set FEDTUNE_JOIN_TOKEN)');
      const useTls = o.tls || o.tlsCa || o.tlsCert || o.tlsServerName;
      if ((o.tlsCert === undefined) !== (o.tlsKey === undefined)) throw new Error('--tls-cert and --tls-key go together');
      checkExecOptions(o);
      if (quantizeBase && o.trainer !== 'onnx') throw new Error(`--quantize-base applies to the onnx trainer (the 4-bit base is held by its engine), not --trainer ${o.trainer}`);
      if (o.computeDtype !== undefined && o.trainer !== 'onnx') throw new Error(`--compute-dtype applies to the onnx trainer (its engine holds the base weights), not --trainer ${o.trainer}`);
      if (o.noopPerturb === false && o.trainer !== 'noop') throw new Error(`--no-noop-perturb applies to --trainer noop, not ${o.trainer}`);
      const presence = o.presenceNats
        ? startPresence({
            nats: { servers: o.presenceNats },
            workerId: `${o.name}-${process.pid}`,
            site: o.name,
            device: o.device === 'cuda' ? 'cuda' : 'cpu',
            memoryBytes: totalmem(),
          })
        : null;
      // The agent hands these options, faults included, to createTrainer (worker/trainers/index.ts).
      const trainerOptions: Omit<TrainerFactoryOptions, 'template' | 'maxSeqLen'> & { template?: string; maxSeqLen?: number } & TrainerFaults & TrainerBackendOptions = {
        modelDir: o.model,
        dataPath: o.data ?? '',
        ...(o.evalData ? { evalPath: o.evalData } : {}),
        evalFraction: o.evalFraction,
        ...(o.template ? { template: o.template } : {}),
        ...(o.maxSeqLen ? { maxSeqLen: o.maxSeqLen } : {}),
        ...(o.threads ? { threads: o.threads } : {}),
        ...(quantizeBase ? { quantizeBase } : {}),
        ...(o.recompute ? { recompute: true } : {}),
        ...(computeDtype !== 'float32' ? { computeDtype } : {}),
        device: o.device,
        seed: o.seed,
        ...(o.noopStepMs !== undefined ? { noopStepMs: o.noopStepMs } : {}),
        ...(o.noopPerturb === false ? { noopPerturb: false } : {}),
        ...(o.faultByzantine ? { faultByzantine: o.faultByzantine } : {}),
        ...(o.trainer === 'exec' && o.exec !== undefined
          ? {
              exec: {
                command: o.exec,
                ...(o.execWorkdir !== undefined ? { workDir: o.execWorkdir } : {}),
                keep: o.execKeep === true,
                graceSec: o.execGraceSec ?? DEFAULT_EXEC_GRACE_SEC,
                noEval: o.execNoEval === true,
              },
            }
          : {}),
      };
      if (o.faultByzantine) {
        console.error(`fedtune worker ${o.name}: FAULT INJECTION: Byzantine updates (scale ${o.faultByzantine.scale}, example counts x${o.faultByzantine.factor})`);
      }
      const agent = new WorkerAgent({
        ...(presence ? { onActivity: (a: 'idle' | 'training', runId: string) => presence.update(a, runId) } : {}),
        coordinator: o.coordinator,
        token,
        site: o.name,
        trainer: o.trainer,
        trainerOptions,
        tls: useTls
          ? {
              ...(o.tlsCa ? { caFile: o.tlsCa } : {}),
              ...(o.tlsCert ? { certFile: o.tlsCert, keyFile: o.tlsKey! } : {}),
              ...(o.tlsServerName ? { serverName: o.tlsServerName } : {}),
            }
          : null,
        reconnect: { giveUpAfterMs: o.giveUpAfter * 1000 },
        bulk: o.bulk,
        ...(o.progress ? { progress: o.progress } : {}),
        faultKillMidUpload: o.fault === 'kill-mid-upload',
        faultCorruptUpload: o.fault === 'corrupt-upload',
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
