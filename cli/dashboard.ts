/**
 * `fedtune dashboard --nats URL`: a standalone dashboard for every run on a
 * NATS server, fed from JetStream with no link to any coordinator (several
 * can run at once), and `fedtune workers --nats URL`: the workers announcing
 * their presence there.
 *
 * addNatsOptions / natsOptionsFrom give any command the same NATS connection
 * options (--nats, --nats-user, --nats-pass, --nats-token, --nats-creds,
 * --nats-tls-ca, --nats-tls-cert, --nats-tls-key).
 */
import { Command, Option } from 'commander';
import { intArg } from './args.ts';
import { createConsumerBus } from '../coordinator/events/index.ts';
import { withUrlCredentials, type NatsConnectOptions } from '../coordinator/events/nats-common.ts';
import { redactUrl } from '../common/redact.ts';
import { startDashboardServer } from '../coordinator/http/server.ts';
import { listWorkers, type PresenceAnnouncement } from '../worker/presence.ts';

export interface NatsCliOptions {
  nats?: string;
  natsUser?: string;
  natsPass?: string;
  natsToken?: string;
  natsCreds?: string;
  natsTlsCa?: string;
  natsTlsCert?: string;
  natsTlsKey?: string;
}

/** Add the NATS connection options to a command; `required` makes --nats mandatory. */
export function addNatsOptions(cmd: Command, required: boolean): Command {
  const url = new Option('--nats <url>', 'NATS server URL(s), comma-separated: nats://HOST:PORT or tls://HOST:PORT');
  if (required) url.makeOptionMandatory();
  return cmd
    .addOption(url)
    .addOption(new Option('--nats-user <user>', 'NATS user name (with --nats-pass)').env('FEDTUNE_NATS_USER'))
    .addOption(new Option('--nats-pass <pass>', 'NATS password (prefer the environment variable)').env('FEDTUNE_NATS_PASS'))
    .addOption(new Option('--nats-token <token>', 'NATS auth token (prefer the environment variable)').env('FEDTUNE_NATS_TOKEN'))
    .addOption(new Option('--nats-creds <file>', 'NATS credentials file (JWT + NKey seed)'))
    .addOption(new Option('--nats-tls-ca <file>', 'CA certificate (PEM) that signed the NATS server certificate'))
    .addOption(new Option('--nats-tls-cert <file>', 'client certificate (PEM) for mutual TLS (with --nats-tls-key)'))
    .addOption(new Option('--nats-tls-key <file>', 'client private key (PEM) for mutual TLS'));
}

/**
 * Connection options from parsed CLI options (undefined when --nats was not
 * given). Credentials written into the URL (nats://USER:PASS@HOST:PORT) move
 * to user/pass (or token), so that `servers` is safe to print.
 */
export function natsOptionsFrom(o: NatsCliOptions): NatsConnectOptions | undefined {
  if (o.nats === undefined) {
    // User, password and token may come from the environment; files only make sense with a server.
    const flags = { natsCreds: '--nats-creds', natsTlsCa: '--nats-tls-ca', natsTlsCert: '--nats-tls-cert', natsTlsKey: '--nats-tls-key' } as const;
    for (const [k, flag] of Object.entries(flags)) {
      if (o[k as keyof typeof flags] !== undefined) throw new Error(`${flag} needs --nats URL`);
    }
    return undefined;
  }
  const tls =
    o.natsTlsCa !== undefined || o.natsTlsCert !== undefined || o.natsTlsKey !== undefined
      ? { ca: o.natsTlsCa, cert: o.natsTlsCert, key: o.natsTlsKey }
      : undefined;
  return withUrlCredentials('--nats', {
    servers: o.nats,
    user: o.natsUser,
    pass: o.natsPass,
    token: o.natsToken,
    credsFile: o.natsCreds,
    tls,
  });
}



interface DashboardOpts extends NatsCliOptions {
  host: string;
  port: number;
  token?: string;
  stream: string;
  subjectRoot: string;
  staticDir?: string;
  tlsCert?: string;
  tlsKey?: string;
  behindTlsProxy?: boolean;
  allowOrigin?: string[];
}

async function runDashboard(o: DashboardOpts): Promise<void> {
  const nats = natsOptionsFrom(o)!;
  const bus = await createConsumerBus({ nats: { ...nats, stream: o.stream, subjectRoot: o.subjectRoot } });
  let server;
  try {
    if ((o.tlsCert === undefined) !== (o.tlsKey === undefined)) throw new Error('--tls-cert and --tls-key go together (PEM certificate and key of the dashboard)');
    server = await startDashboardServer({
      bus,
      host: o.host,
      port: o.port,
      token: o.token,
      staticDir: o.staticDir,
      ...(o.tlsCert && o.tlsKey ? { tls: { certFile: o.tlsCert, keyFile: o.tlsKey } } : {}),
      ...(o.behindTlsProxy ? { behindTlsProxy: true } : {}),
      ...(o.allowOrigin ? { allowedOrigins: o.allowOrigin } : {}),
    });
  } catch (err) {
    await bus.close();
    throw err;
  }
  const runs = bus.runs().length;
  // The token is never printed: the page asks for it (or open URL?token=TOKEN yourself).
  console.log(
    `fedtune dashboard: ${runs} run${runs === 1 ? '' : 's'} on NATS ${redactUrl(nats.servers)} (stream ${o.stream}); open ${server.url}` +
      (o.token ? ' and give the dashboard token (--token / FEDTUNE_DASHBOARD_TOKEN)' : ''),
  );
  await new Promise<void>((resolve) => {
    const stop = (): void => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      resolve();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  await server.close();
  await bus.close();
}

function formatBytes(n: number): string {
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(1)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(0)} MiB`;
  return `${n} B`;
}

/** Plain aligned text table (hand-written: a dozen lines, not worth a dependency). */
export function formatWorkers(ws: PresenceAnnouncement[], now = Date.now()): string {
  const rows = [
    ['SITE', 'WORKER', 'STATUS', 'RUN', 'DEVICE', 'MEMORY', 'HOST', 'HOST FREE', 'SEEN'],
    ...ws.map((w) => [
      w.site,
      w.workerId,
      w.status,
      w.runId ?? '-',
      w.device,
      formatBytes(w.memoryBytes),
      w.host,
      formatBytes(w.hostFreeMemoryBytes),
      `${Math.max(0, Math.round((now - w.time) / 1000))}s ago`,
    ]),
  ];
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd()).join('\n');
}

export function register(program: Command): void {
  const dashboard = program
    .command('dashboard')
    .description('Serve the dashboard for every run on a NATS server (read-only; any number can run at once)')
    .option('--host <host>', 'address to bind', '127.0.0.1')
    .option('--port <port>', 'port to listen on (0 picks a free one)', intArg('--port', 0, 65535), 8080)
    .addOption(new Option('--token <token>', 'access token the browser must present').env('FEDTUNE_DASHBOARD_TOKEN'))
    .option('--stream <name>', 'JetStream stream holding the run events', 'FEDTUNE_EVENTS')
    .option('--subject-root <root>', 'subject root the coordinators publish under (<root>.runs.<run>.<type>)', 'fedtune')
    .option('--static-dir <dir>', 'directory of the built dashboard app (default dashboard/dist)')
    .option('--tls-cert <file>', 'serve HTTPS with this PEM certificate (with --tls-key)')
    .option('--tls-key <file>', 'PEM private key of --tls-cert')
    .option('--behind-tls-proxy', 'a TLS-terminating proxy serves this dashboard as https:// (Secure cookie, https WebSocket origins)')
    .option('--allow-origin <origin...>', 'further page origins (scheme://host[:port]) that may open the WebSocket, e.g. behind a proxy that rewrites Host');
  addNatsOptions(dashboard, true).action((o: DashboardOpts) => runDashboard(o));

  const workers = program
    .command('workers')
    .description('List the workers that announce their presence on a NATS server (site, device, idle/training)')
    .option('--wait <ms>', 'how long to collect announcements', intArg('--wait', 1), 1500)
    .option('--subject-root <root>', 'subject root the workers announce under (<root>.workers.<site>)', 'fedtune')
    .option('--json', 'print JSON instead of a table');
  addNatsOptions(workers, true).action(async (o: NatsCliOptions & { wait: number; json?: boolean; subjectRoot: string }) => {
    const list = await listWorkers({ nats: natsOptionsFrom(o)!, waitMs: o.wait, subjectRoot: o.subjectRoot });
    if (o.json) console.log(JSON.stringify(list, null, 2));
    else if (list.length === 0) console.log(`no workers announced themselves on NATS ${redactUrl(o.nats ?? '')} within ${o.wait} ms`);
    else console.log(formatWorkers(list));
  });
}
