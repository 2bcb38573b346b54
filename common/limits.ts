/**
 * Settings that parse but cannot work, refused before anything runs, each with
 * a message naming the field, the value, the limit and what to do:
 *
 *   templateIssue('vicuna')                     training.template: the built-in templates
 *   natsUrlIssue('ht!tp://??')                  events.nats.url: nats:// or tls:// URLs, host and port
 *   seqLenIssue(4096, 512, ...)                 training.max_seq_len: the model's positions
 *   rankIssue(100000, targets)                  lora.r: min(in, out) of every targeted module
 *   seqLenMismatch(128, 256)                    a worker's --max-seq-len against the run's
 *
 * Each returns null when the value is fine, else the message (without the
 * field name, which the caller prefixes where it knows how the user spelled it).
 */
import { AUTO_TEMPLATE, TEMPLATES } from './data/template.ts';

/** Names of the built-in prompt templates (common/data/template.ts). */
export function templateNames(): string[] {
  return Object.keys(TEMPLATES);
}

export function templateIssue(name: string): string | null {
  if (Object.hasOwn(TEMPLATES, name) || name === AUTO_TEMPLATE) return null;
  return `must be one of ${templateNames().join(', ')} or ${AUTO_TEMPLATE} (the model's own chat_template) (got ${JSON.stringify(name)}); these are the prompt templates workers know`;
}

/** URL schemes the NATS client fedtune uses (TCP, optionally TLS) connects with. */
export const NATS_SCHEMES = ['nats', 'tls'] as const;

const hostRe = /^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;
const ipv6Re = /^\[[0-9A-Fa-f:.]+\]$/;

/**
 * A comma-separated list of NATS servers, each nats://HOST[:PORT] or
 * tls://HOST[:PORT] (or a bare HOST:PORT, taken as nats://), optionally with
 * user:password@. Checked by hand rather than with `new URL`, which accepts
 * almost anything for a scheme it does not know.
 */
export function natsUrlIssue(servers: string): string | null {
  const list = servers.split(',').map((s) => s.trim());
  if (list.some((s) => s === '')) return `has an empty entry (got ${JSON.stringify(servers)}); give NATS URLs such as nats://127.0.0.1:4222, separated by commas`;
  for (const s of list) {
    const m = /^([^:/?#]*):\/\/(.*)$/.exec(s);
    const scheme = m ? m[1]!.toLowerCase() : 'nats';
    if (m && !(NATS_SCHEMES as readonly string[]).includes(scheme)) {
      return `${JSON.stringify(s)} has scheme ${JSON.stringify(m[1])}; allowed: ${NATS_SCHEMES.map((x) => `${x}://`).join(', ')} (e.g. nats://127.0.0.1:4222)`;
    }
    const rest = m ? m[2]! : s;
    // user:password@ may hold any character; what follows it is HOST[:PORT][/].
    const at = rest.lastIndexOf('@');
    const hostPort = (at >= 0 ? rest.slice(at + 1) : rest).replace(/\/$/, '');
    if (/[/?#]/.test(hostPort)) return `${JSON.stringify(s)} is not a NATS URL: expected ${scheme}://HOST:PORT with nothing after the port`;
    const hp = /^(\[[^\]]*\]|[^:]*)(?::(\d+))?$/.exec(hostPort);
    if (!hp) return `${JSON.stringify(s)} is not a NATS URL: expected ${scheme}://HOST:PORT`;
    const host = hp[1]!;
    if (host === '') return `${JSON.stringify(s)} has no host; expected ${scheme}://HOST:PORT, e.g. nats://127.0.0.1:4222`;
    if (!hostRe.test(host) && !ipv6Re.test(host)) return `${JSON.stringify(s)} has host ${JSON.stringify(host)}, which is not a host name or IP address`;
    if (hp[2] !== undefined) {
      const port = Number(hp[2]);
      if (port < 1 || port > 65535) return `${JSON.stringify(s)} has port ${hp[2]}; a port is 1-65535 (NATS listens on 4222 by default)`;
    } else if (/:[^\]]*$/.test(hostPort) && !ipv6Re.test(hostPort)) {
      return `${JSON.stringify(s)} has a port that is not a number; expected ${scheme}://HOST:PORT`;
    }
  }
  return null;
}

/** training.max_seq_len against the positions of the model (max_position_embeddings / n_positions). */
export function seqLenIssue(maxSeqLen: number, maxPositions: number, modelPath: string): string | null {
  if (maxSeqLen <= maxPositions) return null;
  return (
    `${maxSeqLen} is more than the ${maxPositions} positions of the model ${modelPath} (max_position_embeddings / n_positions in its config.json); ` +
    `set it to ${maxPositions} or less`
  );
}

/** The part of a LoRA target that rankIssue needs (common/lora.ts LoraTarget). */
export interface RankTarget {
  module: string;
  kind: string;
  inFeatures: number;
  outFeatures: number;
}

/**
 * lora.r against the targeted modules: B A has rank at most min(in, out), so a
 * larger r only costs memory and bandwidth (and at 100000 exhausts them). The
 * message names the module with the smallest limit and the limit.
 */
export function rankIssue(
  r: number,
  targets: readonly RankTarget[],
  names: { r: string; modules: string } = { r: 'lora.r', modules: 'lora.target_modules' },
): string | null {
  let worst: RankTarget | null = null;
  for (const t of targets) if (!worst || Math.min(t.inFeatures, t.outFeatures) < Math.min(worst.inFeatures, worst.outFeatures)) worst = t;
  if (!worst) return null;
  const limit = Math.min(worst.inFeatures, worst.outFeatures);
  if (r <= limit) return null;
  const kinds = [...new Set(targets.filter((t) => Math.min(t.inFeatures, t.outFeatures) === limit).map((t) => t.kind))];
  return (
    `${r} is larger than the rank module ${worst.kind} can have: ${worst.module} maps ${worst.inFeatures} -> ${worst.outFeatures} features, ` +
    `so ${names.r} can be at most ${limit} (min of in and out); lower ${names.r} to ${limit} or less` +
    (targets.some((t) => Math.min(t.inFeatures, t.outFeatures) > limit) ? `, or leave ${kinds.join(', ')} out of ${names.modules}` : '')
  );
}

/** A worker's --max-seq-len against the run's training.max_seq_len (null when the worker gave none or they agree). */
export function seqLenMismatch(workerValue: number | undefined, runValue: number | undefined): string | null {
  if (workerValue === undefined || !runValue || workerValue === runValue) return null;
  return (
    `--max-seq-len ${workerValue} disagrees with the run's training.max_seq_len ${runValue}: sequences would be cut differently ` +
    `from the other sites; drop --max-seq-len (a worker takes the run's) or change training.max_seq_len in the run config`
  );
}
