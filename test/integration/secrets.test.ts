/**
 * Secrets stay secret: a real federated run through the CLI (a coordinator
 * and two worker processes, noop trainer) is given a join token (--token), a
 * dashboard token and a NATS password inside events.nats.url; none of them
 * may appear in any process output, any file of the run's checkpoint
 * directory, any dashboard API answer, or the events stored on NATS.
 *
 * Once against the real NATS on 127.0.0.1:4222 (it has no authorization, so
 * it accepts any user; skipped with one line outside CI when it is not
 * running), once against a port where nothing listens, so that the event
 * bus degrades and its error paths are searched as well.
 */
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import type { RunEvent } from '../../common/events.ts';
import { createConsumerBus } from '../../coordinator/events/index.ts';
import { fedtune, runConfig, tempDir, tinyModel, worker, writeData, type Proc } from './federated-helpers.ts';
import { freePort, natsTestsEnabled, uniq } from './nats-helpers.ts';

const natsUp = await natsTestsEnabled('the secrets test against the real NATS');

const procs: Proc[] = [];
afterEach(() => {
  for (const p of procs.splice(0)) p.kill();
});

const secret = (tag: string): string => `${tag}${randomBytes(12).toString('hex')}`;

/** Every file under dir, recursively. */
function filesUnder(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...filesUnder(p));
    else out.push(p);
  }
  return out;
}

interface Finding {
  where: string;
  secret: string;
}

/** Where each secret occurs among the named texts (raw bytes, also percent-encoded). */
function leaks(sources: Array<{ where: string; bytes: Buffer | string }>, secrets: Record<string, string>): Finding[] {
  const found: Finding[] = [];
  for (const { where, bytes } of sources) {
    const buf = typeof bytes === 'string' ? Buffer.from(bytes) : bytes;
    for (const [name, value] of Object.entries(secrets)) {
      if (buf.includes(value) || buf.includes(encodeURIComponent(value))) found.push({ where, secret: name });
    }
  }
  return found;
}

async function get(url: string, token?: string): Promise<{ status: number; text: string }> {
  const res = await fetch(url, token ? { headers: { Authorization: `Bearer ${token}` } } : {});
  return { status: res.status, text: await res.text() };
}

/**
 * Run it: returns everything that must be searched, with a few positive
 * checks that the run, the dashboard and the redaction really happened.
 */
async function federatedRun(natsPort: number, expectNats: boolean) {
  const dir = tempDir('secrets');
  const model = await tinyModel(join(dir, 'model'));
  const secrets = { joinToken: secret('join'), dashboardToken: secret('dash'), natsPassword: secret('natspw') };
  const natsUrl = `nats://fedtune:${secrets.natsPassword}@127.0.0.1:${natsPort}`;
  const stream = uniq('FT_SECRETS');
  const subjectRoot = uniq('ftsecrets');
  const name = uniq('secrets');
  const cfg = runConfig(dir, model, {
    name,
    rounds: 3,
    training: { steps: 4 },
    cohort: { min_workers: 2 },
    round: { min_results: 2, deadline_sec: 60 },
    eval: { every: 1 },
  });
  // join_token comes from --token only; the dashboard is on with its own token; events also go to NATS.
  const { join_token: _dropped, ...server } = cfg.server;
  void _dropped;
  const file = {
    ...cfg,
    server,
    dashboard: { enabled: true, host: '127.0.0.1', port: 0, token: secrets.dashboardToken },
    events: { ...cfg.events, nats: { url: natsUrl, stream, subject_root: subjectRoot } },
  };
  const configPath = join(dir, 'run.yaml');
  writeFileSync(configPath, stringify(file));

  const coord = fedtune(['coordinator', '--config', configPath, '--token', secrets.joinToken]);
  procs.push(coord);
  const [, address] = await coord.waitFor(/listening on (\S+)/);
  const [, dashUrl] = await coord.waitFor(/dashboard: open (\S+)/);
  const workers = ['east', 'west'].map((site) =>
    worker({
      address: address!,
      site,
      data: writeData(join(dir, `${site}.jsonl`), 12, site),
      model,
      token: secrets.joinToken,
      extra: ['--noop-step-ms', '250', '--presence-nats', natsUrl],
    }),
  );
  procs.push(...workers);

  // The dashboard's API while the run is on: run list, event history (run.started carries the config), metrics.
  await coord.waitFor(/round 1\/3 done/);
  const runs = await get(`${dashUrl}api/runs`, secrets.dashboardToken);
  const events = await get(`${dashUrl}api/runs/${encodeURIComponent(name)}/events?after=0`, secrets.dashboardToken);
  const metrics = await get(`${dashUrl}metrics`, secrets.dashboardToken);
  const missing = await get(`${dashUrl}api/runs/nope/events`, secrets.dashboardToken);
  const refused = await get(`${dashUrl}api/runs`);
  const page = await fetch(`${dashUrl}`, { headers: { Accept: 'text/html' } });
  const pageText = await page.text();
  expect(runs.status).toBe(200);
  expect(events.status).toBe(200);
  expect(refused.status).toBe(401);
  expect(page.status).toBe(401);

  expect(await coord.exited).toBe(0);
  expect(await Promise.all(workers.map((w) => w.exited))).toEqual([0, 0]);

  let natsEvents: RunEvent[] = [];
  if (expectNats) {
    const bus = await createConsumerBus({ nats: { servers: `nats://127.0.0.1:${natsPort}`, stream, subjectRoot } });
    try {
      natsEvents = await bus.history(name, 0);
    } finally {
      await bus.close();
    }
  }

  const runDir = join(dir, 'checkpoints', name);
  const sources = [
    { where: 'coordinator stdout+stderr', bytes: coord.out() },
    ...workers.map((w, i) => ({ where: `worker ${i} stdout+stderr`, bytes: w.out() })),
    ...filesUnder(runDir).map((p) => ({ where: p, bytes: readFileSync(p) })),
    { where: 'GET /api/runs', bytes: runs.text },
    { where: 'GET /api/runs/RUN/events', bytes: events.text },
    { where: 'GET /metrics', bytes: metrics.text },
    { where: 'GET /api/runs/nope/events', bytes: missing.text },
    { where: 'GET /api/runs without token', bytes: refused.text },
    { where: 'GET / without token', bytes: pageText },
    { where: 'events on NATS', bytes: JSON.stringify(natsEvents) },
  ];
  return { secrets, sources, coord, runDir, events: JSON.parse(events.text) as { events: RunEvent[] }, natsEvents, natsPort };
}

/** The config as run.started shows it: secrets replaced, everything else kept. */
function checkStartedConfig(events: RunEvent[], natsPort: number): void {
  const started = events.find((e): e is Extract<RunEvent, { type: 'run.started' }> => e.type === 'run.started');
  expect(started).toBeDefined();
  const c = started!.config as { server: { join_token: string }; dashboard: { token: string }; events: { nats: { url: string } } };
  expect(c.server.join_token).toBe('***');
  expect(c.dashboard.token).toBe('***');
  expect(c.events.nats.url).toBe(`nats://fedtune:***@127.0.0.1:${natsPort}`);
}

describe('secrets in a federated run', () => {
  it.skipIf(!natsUp)('no token or password in outputs, checkpoints, dashboard answers or NATS (NATS reachable)', async () => {
    const r = await federatedRun(4222, true);
    expect(leaks(r.sources, r.secrets)).toEqual([]);
    // What was searched is real: the run went through, events reached NATS, the URL was shown redacted.
    checkStartedConfig(r.events.events, 4222);
    expect(r.natsEvents.some((e) => e.type === 'run.completed')).toBe(true);
    expect(r.coord.out()).toContain('events: publishing to NATS nats://fedtune:***@127.0.0.1:4222');
    expect(r.coord.out()).toMatch(/dashboard: open http:\/\/127\.0\.0\.1:\d+\/ and give the dashboard token \(dashboard\.token/);
    expect(readFileSync(join(r.runDir, 'events.jsonl'), 'utf8')).toContain('"join_token":"***"');
  }, 120_000);

  it('no token or password anywhere when NATS is unreachable and the bus degrades', async () => {
    const port = await freePort();
    const r = await federatedRun(port, false);
    expect(leaks(r.sources, r.secrets)).toEqual([]);
    checkStartedConfig(r.events.events, port);
    // The degraded paths ran: the bus said so in the log and in the run's events.
    expect(r.coord.out()).toMatch(/NATS bus degraded/);
    expect(r.events.events.some((e) => e.type === 'bus.degraded')).toBe(true);
  }, 120_000);
});
