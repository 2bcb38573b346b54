/**
 * Run configuration: one YAML or JSON file describes a run (model, LoRA, local
 * training, rounds, cohort, strategy, checkpoints, server, dashboard, events).
 * Validated with zod; every error names the field path (and the line in YAML
 * files), what is allowed and what was given. Keys are snake_case in files and
 * in code alike, so what you read in a config is what the code uses.
 */
import { readFile } from 'node:fs/promises';
import { dirname, extname, isAbsolute, resolve } from 'node:path';
import { LineCounter, parseDocument, isNode } from 'yaml';
import { z } from 'zod';
import { natsUrlIssue, templateIssue } from './limits.ts';
import { privacyIssues, privacySchema } from './privacy/config.ts';
import { MAX_INT8_BLOCK_SIZE, UPDATE_ENCODINGS, updateEncodingIssues } from './update-encoding.ts';

export const SCHEDULES = ['constant', 'linear', 'cosine'] as const;
export const RUN_MODES = ['federated', 'distributed'] as const;
/** Outer optimizers of local SGD in distributed mode (sync_every > 1). */
export const OUTER_OPTIMIZERS = ['average', 'nesterov'] as const;
export const WEIGHTING_MODES = ['examples', 'equal'] as const;

const nameRe = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;
const listenRe = /^(\[[0-9a-fA-F:]+\]|[^\s:[\]]+):\d{1,5}$/;

const positive = () => z.number().positive();
/** A zod refinement from a check that returns null (fine) or the message (common/limits.ts). */
const refuse = (issue: (v: string) => string | null) => (v: string, ctx: z.RefinementCtx) => {
  const message = issue(v);
  if (message !== null) ctx.addIssue({ code: 'custom', message });
};
const int = () => z.number().int();

const trainingSchema = z
  .strictObject({
    steps: int().min(1).nullable().default(null),
    epochs: positive().nullable().default(null),
    batch_size: int().min(1).default(8),
    grad_accumulation: int().min(1).default(1),
    lr: positive().default(1e-3),
    schedule: z.enum(SCHEDULES).default('constant'),
    warmup_steps: int().min(0).default(0),
    /**
     * What the schedule (warmup and decay) spans in federated mode: 'run', all rounds x each task's
     * local steps (warmup once, the decay ends at the last round; the schedule a centralised run of
     * the same steps follows), or 'round', each task's local steps alone (warmup and decay in every round).
     * Distributed mode always runs its schedule once over all its steps.
     */
    schedule_scope: z.enum(['run', 'round']).default('run'),
    /**
     * What a site's AdamW state (moments, step count) spans in federated mode: 'round', each train
     * task starts a fresh optimizer (FedAvg as usually run), or 'run', a site's next train task of
     * the run continues from the state its last one ended with (the state never leaves the site).
     */
    optimizer_scope: z.enum(['round', 'run']).default('round'),
    weight_decay: z.number().min(0).default(0),
    max_grad_norm: z.number().min(0).default(1),
    max_seq_len: int().min(8).max(1 << 20).default(256),
    template: z.string().min(1).superRefine(refuse(templateIssue)).default('alpaca'),
    /** LoRA+ (Hayou et al. 2024): lora_B trains at lr * lora_plus_ratio (1: plain LoRA; the paper suggests 16). */
    lora_plus_ratio: positive().default(1),
    seed: int().min(0).default(0),
  })
  .superRefine((t, ctx) => {
    if ((t.steps === null) === (t.epochs === null)) {
      ctx.addIssue({
        code: 'custom',
        path: t.steps === null ? ['steps'] : ['epochs'],
        message: `set exactly one of steps or epochs (got ${t.steps === null ? 'neither' : 'both'})`,
      });
    }
  });

export const runConfigSchema = z
  .strictObject({
    name: z.string().regex(nameRe, 'must start with a letter or digit and contain only letters, digits, ".", "_" and "-"'),
    mode: z.enum(RUN_MODES).default('federated'),
    model: z.strictObject({
      /** Hugging Face model directory the coordinator reads the architecture from (and fingerprints). */
      path: z.string().min(1),
      /** Expected sha256 of the base model; workers with another fingerprint are refused. */
      fingerprint: z.string().regex(/^[0-9a-f]{64}$/, 'must be 64 lowercase hex digits (sha256)').nullable().default(null),
    }),
    lora: z
      .strictObject({
        r: int().min(1).default(8),
        alpha: positive().default(16),
        dropout: z.number().min(0).lt(1).default(0),
        target_modules: z.array(z.string().min(1)).min(1).default(['q_proj', 'v_proj']),
        /** rsLoRA (PEFT use_rslora): scale alpha / sqrt(r) instead of alpha / r. */
        use_rslora: z.boolean().default(false),
        /** DoRA (PEFT use_dora): weight-decomposed LoRA with a trained magnitude vector per module. */
        use_dora: z.boolean().default(false),
        /** PEFT rank_pattern: module-name pattern -> rank, overriding r where it matches. */
        rank_pattern: z.record(z.string().min(1), int().min(1)).default({}),
        /** PEFT alpha_pattern: module-name pattern -> alpha, overriding alpha where it matches. */
        alpha_pattern: z.record(z.string().min(1), positive()).default({}),
        /** PEFT layers_to_transform: the layer indices that get adapters (null: every layer). */
        layers_to_transform: z.union([int().min(0), z.array(int().min(0)).min(1)]).nullable().default(null),
        /** PEFT layers_pattern: the name(s) of the layer list layers_to_transform indexes ("layers", "h"). */
        layers_pattern: z.union([z.string().min(1), z.array(z.string().min(1)).min(1)]).nullable().default(null),
      })
      .superRefine((l, ctx) => {
        if (l.layers_pattern !== null && l.layers_to_transform === null) {
          ctx.addIssue({ code: 'custom', path: ['layers_pattern'], message: 'needs layers_to_transform (the layer indices it counts); set both or neither' });
        }
        for (const field of ['rank_pattern', 'alpha_pattern'] as const) {
          // A bare number names no module, and an object would move it to the front: pattern keys are tried in order.
          const bad = Object.keys(l[field]).find((k) => /^\d+$/.test(k));
          if (bad !== undefined) ctx.addIssue({ code: 'custom', path: [field, bad], message: 'a bare number names no module; a key is a module-name suffix or regex such as "q_proj" or "layers.0.self_attn.q_proj"' });
        }
        const dup = Array.isArray(l.layers_to_transform) ? l.layers_to_transform.find((v, i, a) => a.indexOf(v) !== i) : undefined;
        if (dup !== undefined) ctx.addIssue({ code: 'custom', path: ['layers_to_transform'], message: `lists layer ${dup} twice; list each layer once` });
      })
      .prefault({}),
    training: trainingSchema,
    /** Federated rounds (required in federated mode; distributed mode counts training.steps / epochs instead). */
    rounds: int().min(0).default(0),
    cohort: z
      .strictObject({
        fraction: z.number().gt(0).max(1).default(1),
        min_workers: int().min(1).default(1),
        /** How long a round waits for min_workers to be connected before the run fails. */
        wait_timeout_sec: positive().default(600),
      })
      .prefault({}),
    round: z
      .strictObject({
        deadline_sec: positive().default(600),
        min_results: int().min(1).default(1),
        max_retries: int().min(0).default(3),
        /** How workers send updates (common/update-encoding.ts): float32 | float16 | bfloat16 | int8_delta. */
        update_encoding: z.enum(UPDATE_ENCODINGS).default('float32'),
        /** int8_delta: elements per scale block (null: 64). */
        int8_block_size: int().min(1).max(MAX_INT8_BLOCK_SIZE).nullable().default(null),
        /** int8_delta: each worker carries its quantisation residual into its next update. */
        error_feedback: z.boolean().default(false),
      })
      .prefault({}),
    /**
     * The aggregation strategy: a name (`strategy: fedavg`) or a name with its
     * parameters (`strategy: { name: fedprox, mu: 0.01 }`). The name and every
     * parameter are checked by the strategy's own schema (coordinator/strategies/).
     */
    strategy: z
      .union([z.string().min(1), z.looseObject({ name: z.string().min(1) })])
      .default('fedavg')
      .transform((s): StrategyConfig => (typeof s === 'string' ? { name: s } : { ...s })),
    /** How much each accepted update counts in aggregation (every strategy). */
    weighting: z
      .strictObject({
        /** examples: by training examples (at most what the site registered); equal: every update counts 1. */
        mode: z.enum(WEIGHTING_MODES).default('examples'),
        /** Cap on any one site's example count (null: no cap). */
        max_examples: int().min(1).nullable().default(null),
      })
      .prefault({}),
    /** Checks every update passes before it is aggregated (every strategy); a refused update is logged with its reason. */
    defence: z
      .strictObject({
        /** Refuse an update holding a value larger than this in magnitude (null: off). */
        max_abs: positive().nullable().default(1e4),
        /** Refuse an update whose L2 distance from the adapter it started from exceeds this (null: off). */
        max_norm: positive().nullable().default(null),
        /**
         * Refuse an update whose distance exceeds norm_factor x the median distance of the last round's
         * accepted updates (null: off). Off by default: it assumes rounds alike (same local steps and
         * learning rate); when it refuses every update of an attempt, its reference is reset for the retry.
         */
        norm_factor: z.number().gt(1).nullable().default(null),
      })
      .prefault({}),
    /** Secure aggregation, differential privacy and the privacy budget (common/privacy/config.ts, docs/privacy.md). */
    privacy: privacySchema,
    eval: z
      .strictObject({
        /** Evaluate the global adapter on the workers' eval splits every N rounds (0: never). */
        every: int().min(0).default(1),
        /** Also evaluate the initial adapter before round 1 (the baseline). */
        initial: z.boolean().default(true),
        deadline_sec: positive().default(300),
      })
      .prefault({}),
    checkpoint: z
      .strictObject({
        dir: z.string().min(1).default('checkpoints'),
        /** Keep only the newest K checkpoints (the older ones are removed once a newer one is durable); null: keep every one. */
        keep_last: int().min(1).nullable().default(null),
      })
      .prefault({}),
    /** mode: distributed only (see docs/distributed.md). */
    distributed: z
      .strictObject({
        /** JSON / JSONL dataset on the coordinator (Alpaca, chat or text records). */
        dataset: z.string().min(1).nullable().default(null),
        /** Workers read the dataset themselves (same file on shared storage) and get record index ranges instead of the records. */
        shared_storage: z.boolean().default(false),
        /** Path of the dataset as the workers see it (shared_storage only; default: dataset). */
        worker_dataset_path: z.string().min(1).nullable().default(null),
        sharding: z
          .strictObject({
            kind: z.enum(['iid']).default('iid'),
            /** Seed of the data order (default: training.seed). */
            seed: int().min(0).nullable().default(null),
          })
          .prefault({}),
        /** 1: synchronous data-parallel steps. H > 1: local SGD, H local steps per worker, then an outer step. */
        sync_every: int().min(1).default(1),
        outer_optimizer: z
          .strictObject({
            kind: z.enum(OUTER_OPTIMIZERS).default('nesterov'),
            lr: positive().default(0.7),
            momentum: z.number().min(0).lt(1).default(0.9),
          })
          .prefault({}),
        /** A worker that has not uploaded by then is dropped and the step retried without it. */
        step_deadline_sec: positive().default(120),
        /** Consecutive retries of one step before the run fails. */
        max_step_retries: int().min(0).default(5),
        /** Write a checkpoint (adapter + optimizer state) every K steps, and at the end. */
        checkpoint_every: int().min(1).default(100),
      })
      .prefault({}),
    server: z
      .strictObject({
        listen: z.string().regex(listenRe, 'must be HOST:PORT, e.g. 127.0.0.1:7070 or 0.0.0.0:7070').default('127.0.0.1:7070'),
        /** One join token shared by every site (or server.join_tokens: per-site tokens). */
        join_token: z.string().min(1, 'must not be empty: set server.join_token, pass --token or set FEDTUNE_JOIN_TOKEN').optional(),
        tls: z
          .strictObject({
            cert: z.string().min(1),
            key: z.string().min(1),
            client_ca: z.string().min(1).nullable().default(null),
            /** PEM CRL signed by client_ca (fedtune certs revoke); reloaded when it changes and on SIGHUP. */
            crl: z.string().min(1).optional(),
          })
          .nullable()
          .default(null),
        /** File of hashed per-site join tokens with expiry (fedtune tokens issue); reloaded when it changes. */
        join_tokens: z.string().min(1).nullable().default(null),
        heartbeat_interval_ms: int().min(50).default(2000),
        heartbeat_timeout_ms: int().min(100).default(15000),
        /** At most 4 MiB - 64 KiB: a chunk message (data plus framing) must stay under gRPC's 4 MiB message limit. */
        chunk_bytes: int().min(1024).max((4 << 20) - (64 << 10)).default(1 << 20),
        max_chunk_bytes: int().min(1024).max((4 << 20) - (64 << 10)).default(2 << 20),
        max_concurrent_uploads: int().min(1).default(8),
        /** An upload stream that sends nothing for this long is closed (its slot freed). */
        upload_idle_timeout_sec: positive().default(60),
        /**
         * An upload not complete this long after it got its upload slot is closed (the slot freed), however
         * steadily it trickles: a slow sender cannot hold a slot forever.
         */
        upload_timeout_sec: positive().default(600),
        /**
         * The bulk tensor channel (docs/protocol.md): a TCP port on server.listen's host, with the same TLS,
         * that carries Download and Upload bytes without gRPC framing. 0: any free port (advertised at
         * registration); null: off, every transfer goes over the gRPC streams.
         */
        bulk_port: int().min(0).max(65535).nullable().default(0),
      }),
    dashboard: z
      .strictObject({
        enabled: z.boolean().default(true),
        host: z.string().min(1).default('127.0.0.1'),
        port: int().min(0).max(65535).default(8080),
        token: z.string().min(1).nullable().default(null),
        /** Serve the dashboard over HTTPS (PEM files); its cookie is then Secure. */
        tls: z.strictObject({ cert: z.string().min(1), key: z.string().min(1) }).nullable().default(null),
        /** Behind a TLS-terminating proxy: mark the cookie Secure although this server speaks HTTP. */
        behind_tls_proxy: z.boolean().default(false),
        /** Origins besides the dashboard's own whose pages may open its WebSocket (e.g. https://ops.example.org). */
        allowed_origins: z.array(z.string().url()).default([]),
      })
      .prefault({}),
    events: z
      .strictObject({
        ring_size: int().min(16).default(10000),
        /** Append every event to CHECKPOINT_DIR/<name>/events.jsonl. */
        log: z.boolean().default(true),
        /** Publish events to NATS JetStream too (credentials and TLS files come from the command line). */
        nats: z
          .strictObject({
            url: z.string().min(1).superRefine(refuse(natsUrlIssue)),
            stream: z.string().min(1).optional(),
            subject_root: z.string().min(1).optional(),
            max_age_sec: z.number().positive().optional(),
            max_bytes: int().min(1).optional(),
            max_msgs: int().min(1).optional(),
            queue_limit: int().min(1).optional(),
          })
          .nullable()
          .default(null),
      })
      .prefault({}),
  })
  .superRefine((c, ctx) => {
    if (c.mode === 'federated' && c.rounds < 1) {
      ctx.addIssue({
        code: 'custom',
        path: ['rounds'],
        message: `is required in federated mode (an integer >= 1)${c.rounds === 0 ? '' : ` (got ${c.rounds})`}`,
      });
    }
    if (c.mode === 'federated' && c.training.epochs !== null && !Number.isInteger(c.training.epochs)) {
      ctx.addIssue({
        code: 'custom',
        path: ['training', 'epochs'],
        message: `must be a whole number in federated mode (tasks carry whole local epochs); use training.steps for part of an epoch (got ${c.training.epochs})`,
      });
    }
    if (c.mode === 'distributed' && c.training.optimizer_scope === 'run') {
      ctx.addIssue({
        code: 'custom',
        path: ['training', 'optimizer_scope'],
        message: "'run' applies to federated runs; in distributed mode the coordinator's optimizer (sync-sgd) or each worker's inner one (local-sgd) already runs over the whole run: remove it",
      });
    }
    if (c.mode === 'distributed' && c.training.schedule_scope === 'round') {
      ctx.addIssue({
        code: 'custom',
        path: ['training', 'schedule_scope'],
        message: "'round' applies to federated runs; distributed mode runs the schedule once over all its steps: remove it",
      });
    }
    if (c.mode === 'distributed' && c.distributed.dataset === null) {
      ctx.addIssue({
        code: 'custom',
        path: ['distributed', 'dataset'],
        message: 'is required in distributed mode (the JSON / JSONL dataset file the coordinator shards across workers)',
      });
    }
    if (c.mode === 'distributed' && c.distributed.worker_dataset_path !== null && !c.distributed.shared_storage) {
      ctx.addIssue({
        code: 'custom',
        path: ['distributed', 'worker_dataset_path'],
        message: 'only applies with distributed.shared_storage: true',
      });
    }
    if (c.round.min_results > c.cohort.min_workers) {
      ctx.addIssue({
        code: 'custom',
        path: ['round', 'min_results'],
        message: `must not exceed cohort.min_workers (${c.cohort.min_workers}), or a round with the minimum cohort could never aggregate (got ${c.round.min_results})`,
      });
    }
    if (c.server.max_chunk_bytes < c.server.chunk_bytes) {
      ctx.addIssue({
        code: 'custom',
        path: ['server', 'max_chunk_bytes'],
        message: `must be at least server.chunk_bytes (${c.server.chunk_bytes}) (got ${c.server.max_chunk_bytes})`,
      });
    }
    for (const i of privacyIssues(c)) ctx.addIssue({ code: 'custom', path: i.path, message: i.message });
    for (const i of updateEncodingIssues(c)) ctx.addIssue({ code: 'custom', path: i.path, message: i.message });
    if (c.server.join_token !== undefined && c.server.join_tokens !== null) {
      ctx.addIssue({
        code: 'custom',
        path: ['server', 'join_tokens'],
        message: 'contradicts server.join_token (or --token / FEDTUNE_JOIN_TOKEN): give either one shared token or a file of per-site tokens, not both',
      });
    }
    if (c.server.join_token === undefined && c.server.join_tokens === null) {
      ctx.addIssue({
        code: 'custom',
        path: ['server', 'join_token'],
        message: 'is required: set server.join_token (one token for all sites), pass --token or set FEDTUNE_JOIN_TOKEN; or give per-site tokens in server.join_tokens (fedtune tokens issue)',
      });
    }
    if (c.server.tls?.crl && c.server.tls.client_ca === null) {
      ctx.addIssue({
        code: 'custom',
        path: ['server', 'tls', 'crl'],
        message: 'needs server.tls.client_ca: a revocation list applies to the client certificates of mutual TLS',
      });
    }
    if (c.server.heartbeat_timeout_ms <= c.server.heartbeat_interval_ms) {
      ctx.addIssue({
        code: 'custom',
        path: ['server', 'heartbeat_timeout_ms'],
        message: `must be larger than server.heartbeat_interval_ms (${c.server.heartbeat_interval_ms}) (got ${c.server.heartbeat_timeout_ms})`,
      });
    }
  });

/** `strategy:` as the run config gives it: a name and that strategy's parameters. */
export type StrategyConfig = { name: string } & Record<string, unknown>;

export type RunConfig = z.output<typeof runConfigSchema>;
export type RunConfigInput = z.input<typeof runConfigSchema>;

export class RunConfigError extends Error {
  readonly issues: string[];
  constructor(source: string, issues: string[]) {
    super(`run config ${source} is invalid:\n${issues.map((i) => `  - ${i}`).join('\n')}`);
    this.name = 'RunConfigError';
    this.issues = issues;
  }
}

export type Locate = (path: PropertyKey[]) => string;

function show(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v);
  if (v === undefined) return 'nothing';
  const s = JSON.stringify(v);
  return s === undefined ? String(v) : s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

/** Field names the schema allows at a path (for "unknown field" errors). */
function keysAt(path: PropertyKey[]): string[] {
  let s: z.core.$ZodType = runConfigSchema;
  const unwrap = (t: z.core.$ZodType): z.core.$ZodType => {
    const def = t._zod.def as { innerType?: z.core.$ZodType };
    return def.innerType ? unwrap(def.innerType) : t;
  };
  for (const key of path) {
    const shape = (unwrap(s)._zod.def as { shape?: Record<string, z.core.$ZodType> }).shape;
    const next = shape?.[String(key)];
    if (!next) return [];
    s = next;
  }
  return Object.keys((unwrap(s)._zod.def as { shape?: Record<string, unknown> }).shape ?? {});
}

export function formatIssue(issue: z.core.$ZodIssue, locate: Locate = () => ''): string {
  const path = issue.path.map(String).join('.') || '(top level)';
  const where = `${path}${locate(issue.path)}`;
  const input = (issue as { input?: unknown }).input;
  switch (issue.code) {
    case 'invalid_value':
      return `${where}: must be one of ${issue.values.map(String).join(', ')} (got ${show(input)})`;
    case 'unrecognized_keys': {
      const allowed = keysAt(issue.path);
      return issue.keys
        .map((k) => `${path === '(top level)' ? k : `${path}.${k}`}${locate([...issue.path, k])}: unknown field (allowed: ${allowed.join(', ')})`)
        .join('; ');
    }
    case 'invalid_type':
      if (input === undefined) return `${where}: is required (${issue.expected})`;
      return `${where}: must be ${issue.expected === 'int' ? 'an integer' : `a ${issue.expected}`} (got ${show(input)})`;
    case 'too_small':
    case 'too_big': {
      // zod's own wording ("Too small: expected string to have >=1 characters") or a message of ours, which says "must" itself.
      const m = issue.message.replace(/^Too (small|big): expected \w+ to /, '').replace(/^(?!must )/, 'must ');
      return `${where}: ${m} (got ${show(input)})`;
    }
    case 'custom':
      return `${where}: ${issue.message}`;
    default:
      return `${where}: ${issue.message}${input !== undefined ? ` (got ${show(input)})` : ''}`;
  }
}

/** A check beyond the schema (for example a strategy's parameters): issues with the field path they are about. */
export type ConfigCheck = (cfg: RunConfig) => Array<{ path: PropertyKey[]; message: string }>;

/** Fields that moved, with where they went. */
const MOVED: Record<string, string> = {
  server_optimizer:
    'moved into strategy: give the server optimizer\'s settings with its name, e.g. strategy: { name: fedadam, lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 0.001 }',
};

/** Validate an already parsed config object. `source` names it in errors (a file path). */
export function parseRunConfig(raw: unknown, source = 'config', locate: Locate = () => '', check?: ConfigCheck): RunConfig {
  const moved =
    typeof raw === 'object' && raw !== null ? Object.keys(MOVED).filter((k) => k in (raw as Record<string, unknown>)) : [];
  const r = runConfigSchema.safeParse(raw, { reportInput: true });
  const issues = moved.map((k) => `${k}${locate([k])}: ${MOVED[k]}`);
  if (!r.success) issues.push(...r.error.issues.filter((i) => !(i.code === 'unrecognized_keys' && i.path.length === 0 && i.keys.every((k) => k in MOVED))).map((i) => formatIssue(i, locate)));
  if (issues.length > 0 || !r.success) throw new RunConfigError(source, issues);
  const extra = check?.(r.data) ?? [];
  if (extra.length > 0) throw new RunConfigError(source, extra.map((i) => `${i.path.map(String).join('.')}${locate(i.path)}: ${i.message}`));
  return r.data;
}

export interface ConfigOverrides {
  /** Replaces server.join_token (from --token or FEDTUNE_JOIN_TOKEN). */
  joinToken?: string;
  /** Replaces server.listen. */
  listen?: string;
  /** Replaces checkpoint.dir. */
  checkpointDir?: string;
}

/** Path fields of a run config file that are resolved against the file's directory (see resolveConfigPaths). */
export const CONFIG_FILE_PATHS: ReadonlyArray<readonly string[]> = [
  ['model', 'path'],
  ['checkpoint', 'dir'],
  ['distributed', 'dataset'],
  ['server', 'tls', 'cert'],
  ['server', 'tls', 'key'],
  ['server', 'tls', 'client_ca'],
  ['server', 'tls', 'crl'],
  ['server', 'join_tokens'],
  ['dashboard', 'tls', 'cert'],
  ['dashboard', 'tls', 'key'],
];

/**
 * Make the relative paths written in a config file absolute against `baseDir`
 * (the file's directory), in place; absolute paths, defaults and values of the
 * wrong type (left for the schema to report) are not touched.
 * distributed.worker_dataset_path is the path as the workers see it and stays as written.
 */
export function resolveConfigPaths(raw: Record<string, unknown>, baseDir: string): void {
  for (const path of CONFIG_FILE_PATHS) {
    let o: unknown = raw;
    for (const k of path.slice(0, -1)) o = typeof o === 'object' && o !== null && !Array.isArray(o) ? (o as Record<string, unknown>)[k] : undefined;
    if (typeof o !== 'object' || o === null || Array.isArray(o)) continue;
    const rec = o as Record<string, unknown>;
    const key = path[path.length - 1]!;
    const v = rec[key];
    if (typeof v === 'string' && v !== '' && !isAbsolute(v)) rec[key] = resolve(baseDir, v);
  }
}

/**
 * Read, parse (YAML or JSON by extension; .yml/.yaml/.json) and validate a run config file.
 * Relative paths in the file resolve against the file's directory (resolveConfigPaths);
 * `overrides` come from the command line and stay relative to the working directory.
 */
export async function loadRunConfig(path: string, overrides: ConfigOverrides = {}, check?: ConfigCheck): Promise<RunConfig> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new Error(`run config ${path}: cannot read it (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
  }
  const ext = extname(path).toLowerCase();
  let raw: unknown;
  let locate: Locate = () => '';
  if (ext === '.json') {
    try {
      raw = JSON.parse(text);
    } catch (err) {
      throw new Error(`run config ${path}: not valid JSON: ${(err as Error).message}`);
    }
  } else if (ext === '.yaml' || ext === '.yml') {
    const lineCounter = new LineCounter();
    const doc = parseDocument(text, { lineCounter, prettyErrors: true });
    if (doc.errors.length > 0) {
      throw new Error(`run config ${path}: not valid YAML: ${doc.errors[0]!.message}`);
    }
    raw = doc.toJS();
    locate = (p) => {
      for (let n = p.length; n > 0; n--) {
        const node = doc.getIn(p.slice(0, n) as unknown[], true);
        if (isNode(node) && node.range) return ` (line ${lineCounter.linePos(node.range[0]).line})`;
      }
      return '';
    };
  } else {
    throw new Error(`run config ${path}: unknown file type "${ext || '(none)'}" (allowed: .yaml, .yml, .json)`);
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
    throw new RunConfigError(path, ['(top level): must be a mapping of fields (name, model, lora, training, rounds, ...)']);
  }
  const obj = raw as Record<string, unknown>;
  resolveConfigPaths(obj, dirname(resolve(path)));
  const server = (typeof obj.server === 'object' && obj.server !== null ? obj.server : (obj.server = {})) as Record<string, unknown>;
  // FEDTUNE_JOIN_TOKEN fills in a missing server.join_token, unless the file names per-site tokens (server.join_tokens).
  const token = overrides.joinToken ?? (server.join_token === undefined && server.join_tokens === undefined ? process.env.FEDTUNE_JOIN_TOKEN : undefined);
  if (token !== undefined) server.join_token = token;
  if (overrides.listen !== undefined) server.listen = overrides.listen;
  if (overrides.checkpointDir !== undefined) {
    const ck = (typeof obj.checkpoint === 'object' && obj.checkpoint !== null ? obj.checkpoint : (obj.checkpoint = {})) as Record<string, unknown>;
    ck.dir = overrides.checkpointDir;
  }
  return parseRunConfig(obj, path, locate, check);
}

/** Split "HOST:PORT" (IPv6 in brackets) into parts. */
export function parseHostPort(s: string, what = 'address'): { host: string; port: number } {
  const m = /^(\[[0-9a-fA-F:]+\]|[^\s:[\]]+):(\d{1,5})$/.exec(s);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port > 65535) throw new Error(`${what}: must be HOST:PORT with a port 0-65535 (got "${s}")`);
  return { host: m[1]!.replace(/^\[|\]$/g, ''), port };
}
