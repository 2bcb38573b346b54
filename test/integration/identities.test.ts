/**
 * Site identities over real gRPC on loopback: a `fedtune coordinator` process
 * with mutual TLS, a revocation list and per-site join tokens, made by
 * `fedtune certs` / `fedtune tokens` code. Each wrong identity is refused with
 * a message naming what is wrong; a valid worker process joins and trains; the
 * audit log holds the join, the refusals and the round; no token or key
 * appears in the audit log, the event log or the coordinator's output. Then a
 * coordinator in this process: a live session ends when its certificate is
 * revoked.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { initCa, issueCertificate, revokeSite, type Issued } from '../../common/certs.ts';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { newToken, writeTokenFile } from '../../coordinator/identity.ts';
import { inspectModel } from '../../common/hf-model.ts';
import { CoordinatorConnection, PROTOCOL_VERSION, type TlsClientOptions } from '../../worker/agent.ts';
import { diagnoseTlsFailure } from '../../worker/tls-errors.ts';
import { WorkerStatus, type CoordinatorMessage } from '../../proto/gen/fedtune/v1/coordinator.ts';
import { fedtune, runConfig, tempDir, tinyModel, worker, writeData, type Proc } from './federated-helpers.ts';

const procs: Proc[] = [];
const handles: CoordinatorHandle[] = [];
afterEach(() => {
  for (const p of procs.splice(0)) p.kill();
});
afterAll(async () => {
  for (const h of handles) await h.close();
});

interface Pki {
  dir: string;
  ca: string;
  crl: string;
  server: Issued;
  sites: Record<'a' | 'b' | 'c' | 'e', Issued>;
  foreign: Issued;
}

async function makePki(root: string): Promise<Pki> {
  const dir = join(root, 'pki');
  await initCa(dir);
  const server = await issueCertificate(dir, { kind: 'server', name: 'localhost', hosts: ['localhost', '127.0.0.1'] });
  const sites = {
    a: await issueCertificate(dir, { kind: 'site', name: 'site-a' }),
    b: await issueCertificate(dir, { kind: 'site', name: 'site-b' }),
    c: await issueCertificate(dir, { kind: 'site', name: 'site-c' }),
    e: await issueCertificate(dir, { kind: 'site', name: 'site-e' }),
  };
  // Another CA, with a certificate that claims site-a.
  const other = join(root, 'other-ca');
  await initCa(other, { name: 'Other CA' });
  const foreign = await issueCertificate(other, { kind: 'site', name: 'site-a' });
  return { dir, ca: join(dir, 'ca.pem'), crl: join(dir, 'crl.pem'), server, sites, foreign };
}

const tlsOf = (p: Pki, c: Issued | null): TlsClientOptions => ({ caFile: p.ca, ...(c ? { certFile: c.cert, keyFile: c.key } : {}) });

function caps(fingerprint: string) {
  return { device: 'cpu', memoryBytes: 1, backends: ['probe'], modelFingerprint: fingerprint, numTrainExamples: 4, numEvalExamples: 0, client: 'probe', protocolVersion: PROTOCOL_VERSION };
}

/** Register by hand; resolves with the refusal (code and message) or 'registered'. */
async function tryRegister(address: string, tls: TlsClientOptions, token: string, site: string, fingerprint: string): Promise<{ code: number; details: string } | 'registered'> {
  const conn = new CoordinatorConnection(address, tls);
  try {
    await conn.register({ joinToken: token, site, previousWorkerId: '', capabilities: caps(fingerprint) });
    return 'registered';
  } catch (err) {
    const e = err as grpc.ServiceError;
    return { code: e.code, details: e.details };
  } finally {
    conn.close();
  }
}

/** What the worker says when its first connection fails at TLS (the same code path as worker/agent.ts). */
async function handshakeRefusal(address: string, tls: TlsClientOptions): Promise<string> {
  const conn = new CoordinatorConnection(address, tls);
  const err = await conn.getRunInfo('irrelevant').then(
    () => null,
    (e: unknown) => e,
  );
  conn.close();
  expect(err, 'the handshake should have been refused').not.toBeNull();
  expect((err as grpc.ServiceError).code).toBe(grpc.status.UNAVAILABLE);
  const f = await diagnoseTlsFailure(address, tls, err);
  expect(f, `not named as a TLS failure: ${(err as Error).message}`).not.toBeNull();
  return f!.message;
}

const readJsonl = (path: string): Array<Record<string, unknown>> =>
  readFileSync(path, 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l) as Record<string, unknown>);

describe('site identities: certificates, revocation, per-site tokens, audit log', () => {
  it('refuses each wrong identity with a clear message, admits the right one, and audits it all without secrets', async () => {
    const root = tempDir('identities');
    const pki = await makePki(root);
    await revokeSite(pki.dir, 'site-c');
    const model = await tinyModel(join(root, 'model'));
    const fingerprint = (await inspectModel(model)).fingerprint;
    const tokensFile = join(root, 'tokens.json');
    const now = new Date();
    const ta = newToken('site-a', new Date(now.getTime() + 3_600_000), now);
    const tb = newToken('site-b', new Date(now.getTime() + 3_600_000), now);
    const te = newToken('site-e', new Date(now.getTime() - 1000), new Date(now.getTime() - 2000));
    await writeTokenFile(tokensFile, { version: 1, tokens: [ta.record, tb.record, te.record] });

    const base = runConfig(root, model, { name: 'ids', rounds: 1 });
    const { join_token: _shared, ...server } = base.server;
    const cfgPath = join(root, 'ids.yaml');
    writeFileSync(
      cfgPath,
      stringify({
        ...base,
        server: { ...server, join_tokens: tokensFile, tls: { cert: pki.server.cert, key: pki.server.key, client_ca: pki.ca, crl: pki.crl } },
        dashboard: { enabled: false },
      }),
    );
    const coord = fedtune(['coordinator', '--config', cfgPath], { FEDTUNE_JOIN_TOKEN: '' });
    procs.push(coord);
    const [, address] = await coord.waitFor(/listening on (\S+)/);
    const addr = address!;

    // At the TLS handshake: no certificate, a revoked one, one from another CA.
    expect(await handshakeRefusal(addr, tlsOf(pki, null))).toContain('the coordinator requires a client certificate (mutual TLS, server.tls.client_ca): start the worker with --tls-cert FILE --tls-key FILE');
    await coord.waitFor(/refused a TLS handshake from 127\.0\.0\.1: the client sent no certificate/, 10_000);
    expect(await handshakeRefusal(addr, tlsOf(pki, pki.sites.c))).toContain(`the coordinator refused the client certificate --tls-cert ${pki.sites.c.cert} (mutual TLS)`);
    await coord.waitFor(/refused a TLS handshake from 127\.0\.0\.1: the client certificate is revoked \(server\.tls\.crl\)/, 10_000);
    expect(await handshakeRefusal(addr, tlsOf(pki, pki.foreign))).toContain(`the coordinator refused the client certificate --tls-cert ${pki.foreign.cert} (mutual TLS)`);
    await coord.waitFor(/refused a TLS handshake from 127\.0\.0\.1: the client certificate is not accepted \(not signed by server\.tls\.client_ca/, 10_000);

    // At registration: a valid certificate with another site's name, an expired token, another site's token.
    expect(await tryRegister(addr, tlsOf(pki, pki.sites.b), tb.token, 'site-a', fingerprint)).toEqual({
      code: grpc.status.PERMISSION_DENIED,
      details: `site "site-a" refused: the client certificate on this connection was issued to site "site-b" (CN=site-b, serial ${pki.sites.b.serial}); a worker registers as the site its certificate names: start it with --name site-b, or with the certificate of site "site-a"`,
    });
    const expired = await tryRegister(addr, tlsOf(pki, pki.sites.e), te.token, 'site-e', fingerprint);
    expect(expired).toMatchObject({ code: grpc.status.UNAUTHENTICATED });
    expect((expired as { details: string }).details).toBe(
      `join token ${te.record.id} of site "site-e" expired at ${te.record.expires_at}: ask the coordinator's operator for a new one (fedtune tokens issue site-e)`,
    );
    expect(await tryRegister(addr, tlsOf(pki, pki.sites.b), ta.token, 'site-b', fingerprint)).toEqual({
      code: grpc.status.PERMISSION_DENIED,
      details: `join token ${ta.record.id} is for site "site-a", not for site "site-b": each site registers with its own token`,
    });

    // The right certificate, name and token: a real worker process joins and trains the round.
    const data = writeData(join(root, 'a.jsonl'), 8, 'site-a');
    const w = worker({ address: addr, site: 'site-a', data, model, token: ta.token, extra: ['--tls-ca', pki.ca, '--tls-cert', pki.sites.a.cert, '--tls-key', pki.sites.a.key] });
    procs.push(w);
    await coord.waitFor(/\+ site-a joined/);
    await coord.waitFor(/run completed after 1 round/, 120_000);
    expect(await w.exited, w.out()).toBe(0);
    expect(await coord.exited).toBe(0);

    const runDir = join(root, 'checkpoints', 'ids');
    const audit = readJsonl(join(runDir, 'audit.jsonl'));
    const joins = audit.filter((r) => r.type === 'join');
    expect(joins).toHaveLength(1);
    expect(joins[0]).toMatchObject({ site: 'site-a', cert_sha256: pki.sites.a.sha256, cert_serial: pki.sites.a.serial, token_id: ta.record.id });
    expect(String(joins[0]!.address)).toMatch(/127\.0\.0\.1/);
    const refusals = audit.filter((r) => r.type === 'refusal');
    const handshakes = refusals.filter((r) => r.stage === 'handshake').map((r) => String(r.reason));
    expect(handshakes.some((r) => r.startsWith('the client sent no certificate'))).toBe(true);
    expect(handshakes.some((r) => r.startsWith('the client certificate is revoked (server.tls.crl)'))).toBe(true);
    expect(handshakes.some((r) => r.startsWith('the client certificate is not accepted'))).toBe(true);
    const registers = refusals.filter((r) => r.stage === 'register');
    expect(registers.map((r) => r.site)).toEqual(['site-a', 'site-e', 'site-b']);
    expect(String(registers[1]!.reason)).toContain('expired at');
    const rounds = audit.filter((r) => r.type === 'round');
    expect(rounds).toEqual([expect.objectContaining({ round: 1, sites: ['site-a'] })]);

    // No token and no key material anywhere the coordinator writes or prints.
    const secrets = [ta.token, tb.token, te.token, ...[ta, tb, te].map((t) => t.token.split('_').slice(2).join('_'))];
    const keyBodies = [pki.sites.a.key, pki.sites.b.key, pki.server.key].flatMap((k) => readFileSync(k, 'utf8').split('\n').filter((l) => l.length > 20 && !l.startsWith('-----')));
    const places: Record<string, string> = {
      'audit.jsonl': readFileSync(join(runDir, 'audit.jsonl'), 'utf8'),
      'events.jsonl': readFileSync(join(runDir, 'events.jsonl'), 'utf8'),
      'coordinator output': coord.out(),
      'worker output': w.out(),
    };
    for (const [where, text] of Object.entries(places)) {
      for (const s of [...secrets, ...keyBodies]) expect(text.includes(s), `${where} holds a secret`).toBe(false);
      expect(text, where).not.toContain('PRIVATE KEY');
    }
  }, 240_000);

  it('revoking a site ends its live session; its next call on the same connection is refused naming the serial', async () => {
    const root = tempDir('identities-revoke');
    const pki = await makePki(root);
    const model = await tinyModel(join(root, 'model'));
    const fingerprint = (await inspectModel(model)).fingerprint;
    // min_workers 2: the run waits, so the session stays open until it is ended.
    const h = await startCoordinator(
      runConfig(root, model, {
        name: 'revoke',
        cohort: { min_workers: 2, wait_timeout_sec: 600 },
        round: { min_results: 1 },
        server: { tls: { cert: pki.server.cert, key: pki.server.key, client_ca: pki.ca, crl: pki.crl } },
      }),
    );
    handles.push(h);
    const conn = new CoordinatorConnection(h.address, tlsOf(pki, pki.sites.b));
    await conn.register({ joinToken: 'test-token', site: 'site-b', previousWorkerId: '', capabilities: caps(fingerprint) });
    const call = conn.session();
    const ended = new Promise<grpc.ServiceError | 'ended'>((resolve) => {
      call.on('error', (e: grpc.ServiceError) => resolve(e));
      call.on('end', () => resolve('ended'));
    });
    let accepted = false;
    const gotAccepted = new Promise<void>((resolve) =>
      call.on('data', (m: CoordinatorMessage) => {
        if (m.body?.$case === 'accepted') {
          accepted = true;
          resolve();
        }
      }),
    );
    call.write({ body: { $case: 'heartbeat', value: { status: WorkerStatus.WORKER_STATUS_IDLE, taskId: '', memoryUsedBytes: 0 } } });
    await gotAccepted;
    expect(accepted).toBe(true);

    await revokeSite(pki.dir, 'site-b'); // the coordinator polls crl.pem
    const e = await ended;
    expect(e).not.toBe('ended');
    expect((e as grpc.ServiceError).code).toBe(grpc.status.UNAUTHENTICATED);
    expect((e as grpc.ServiceError).details).toBe(`the client certificate of site "site-b" (serial ${pki.sites.b.serial}) was revoked (server.tls.crl); this worker's session is over`);

    // The same HTTP/2 connection keeps its TLS session: the registration itself is refused.
    const again = await conn
      .register({ joinToken: 'test-token', site: 'site-b', previousWorkerId: '', capabilities: caps(fingerprint) })
      .then(() => null, (x: grpc.ServiceError) => x);
    conn.close();
    expect(again?.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(again!.details).toBe(
      `the client certificate of site "site-b" (serial ${pki.sites.b.serial}) is revoked (server.tls.crl): ask the coordinator's operator for a new one (fedtune certs issue site-b)`,
    );
    // A new connection is refused at the handshake; the other sites still get in.
    expect(await handshakeRefusal(h.address, tlsOf(pki, pki.sites.b))).toContain('the coordinator refused the client certificate');
    expect(await tryRegister(h.address, tlsOf(pki, pki.sites.a), 'test-token', 'site-a', fingerprint)).toBe('registered');

    const audit = readJsonl(join(h.runDir, 'audit.jsonl'));
    expect(audit.find((r) => r.type === 'reload')).toMatchObject({ what: 'crl', detail: { revoked: 1, newly_revoked: [pki.sites.b.serial] } });
    expect(audit.find((r) => r.type === 'revoked')).toMatchObject({ site: 'site-b', cert_serial: pki.sites.b.serial });
    expect(audit.filter((r) => r.type === 'join').map((r) => r.site)).toEqual(['site-b', 'site-a']);
  }, 120_000);
});
