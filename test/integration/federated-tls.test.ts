/**
 * TLS on the coordinator's gRPC port: a worker that trusts the CA gets in, a
 * plaintext client does not; every TLS mistake makes a worker process exit at
 * once (status 2) with a message naming it, and the coordinator logs the
 * refused handshake with the peer's address.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { connect as tlsConnect } from 'node:tls';
import { BulkRequest, BulkResponse } from '../../proto/gen/fedtune/v1/coordinator.ts';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { CoordinatorConnection } from '../../worker/agent.ts';
import { fedtune, runConfig, tempDir, tinyModel, worker, writeData, type Proc } from './federated-helpers.ts';
import { hasOpenssl, makePki } from '../helpers/pki.ts';

let coord: CoordinatorHandle | null = null;
afterAll(async () => {
  await coord?.close();
});

describe.skipIf(!hasOpenssl())('coordinator with TLS (skipped without the openssl binary to make a test certificate)', () => {
  it('serves TLS clients that trust its certificate and refuses plaintext ones', async () => {
    const dir = tempDir('tls');
    const cert = join(dir, 'server.pem');
    const key = join(dir, 'server-key.pem');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'], { stdio: 'ignore' });
    const model = await tinyModel(join(dir, 'model'));
    coord = await startCoordinator(runConfig(dir, model, { name: 'tls', server: { tls: { cert, key, client_ca: null } } }));

    const good = new CoordinatorConnection(coord.address, { caFile: cert });
    const info = await good.getRunInfo('test-token');
    expect(info.runName).toBe('tls');
    good.close();

    const plain = new CoordinatorConnection(coord.address, null);
    const err = await plain.getRunInfo('test-token').catch((e: unknown) => e as Error);
    expect(err).toBeInstanceOf(Error);
    expect((err as { code?: number }).code).toBe(14); // UNAVAILABLE: the handshake never happens
    plain.close();

    const untrusting = new CoordinatorConnection(coord.address, {});
    await expect(untrusting.getRunInfo('test-token')).rejects.toThrow();
    untrusting.close();
  });
});

describe.skipIf(!hasOpenssl())('TLS mistakes are named at once (skipped without the openssl binary)', () => {
  const procs: Proc[] = [];
  afterEach(() => {
    for (const p of procs.splice(0)) p.kill();
  });
  let shared: { dir: string; model: string; pki: ReturnType<typeof makePki>; data: string } | null = null;
  const setup = async (): Promise<NonNullable<typeof shared>> => {
    if (shared) return shared;
    const dir = tempDir('tls-errors');
    shared = { dir, model: await tinyModel(join(dir, 'model')), pki: makePki(dir), data: writeData(join(dir, 'site.jsonl'), 8, 'site') };
    return shared;
  };

  /** A `fedtune coordinator` process (its log is what the checks read); resolves with its address. */
  async function cliCoordinator(
    name: string,
    tls: { cert: string; key: string; client_ca: string | null } | null,
    o: { minWorkers?: number; args?: string[] } = {},
  ): Promise<{ proc: Proc; address: string }> {
    const { dir, model } = await setup();
    const cfg = runConfig(dir, model, { name, rounds: 1, cohort: { min_workers: o.minWorkers ?? 1 }, server: { tls } });
    const path = join(dir, `${name}.yaml`);
    writeFileSync(path, stringify({ ...cfg, dashboard: { enabled: false } }));
    const proc = fedtune(['coordinator', '--config', path, ...(o.args ?? [])]);
    procs.push(proc);
    const [, address] = await proc.waitFor(/listening on (\S+)/);
    return { proc, address: address! };
  }

  /** Start a worker with these TLS flags; it must exit by itself with status 2 long before --give-up-after (600 s). */
  async function failingWorker(address: string, tlsArgs: string[]): Promise<string> {
    const { model, data } = await setup();
    const w = worker({ address, site: 'site-a', data, model, extra: ['--give-up-after', '600', ...tlsArgs] });
    procs.push(w);
    const code = await Promise.race([w.exited, new Promise<'still running'>((r) => setTimeout(() => r('still running'), 45_000))]);
    expect(code, `worker output:\n${w.out()}`).toBe(2);
    expect(w.out()).not.toMatch(/connection to the coordinator lost or refused/); // it did not retry
    return w.out();
  }

  it('a CA that did not sign the coordinator certificate', async () => {
    const { pki } = await setup();
    const c = await cliCoordinator('tls-wrong-ca', { cert: pki.serverCert, key: pki.serverKey, client_ca: null });
    const out = await failingWorker(c.address, ['--tls-ca', pki.otherCa]);
    expect(out).toContain(`cannot connect to the coordinator at ${c.address}: the coordinator's certificate is not signed by the CA you gave (--tls-ca ${pki.otherCa})`);
    await c.proc.waitFor(/refused a TLS handshake from 127\.0\.0\.1: the client hung up during the handshake \(it may not trust this coordinator's certificate/, 10_000);
  });

  it('a plaintext worker against a TLS coordinator', async () => {
    const { pki } = await setup();
    const c = await cliCoordinator('tls-plain-worker', { cert: pki.serverCert, key: pki.serverKey, client_ca: null });
    const out = await failingWorker(c.address, []);
    expect(out).toContain('the coordinator requires TLS (start the worker with --tls / --tls-ca FILE)');
    await c.proc.waitFor(/refused a TLS handshake from 127\.0\.0\.1: the client does not use TLS/, 10_000);
  });

  it('a TLS worker against a plaintext coordinator', async () => {
    const { pki } = await setup();
    const c = await cliCoordinator('tls-plain-coordinator', null);
    const out = await failingWorker(c.address, ['--tls-ca', pki.ca]);
    expect(out).toContain('the coordinator does not speak TLS (drop --tls');
  });

  it('mutual TLS: no client certificate, and one signed by another CA', async () => {
    const { pki } = await setup();
    const mutual = { cert: pki.serverCert, key: pki.serverKey, client_ca: pki.ca };
    const c1 = await cliCoordinator('mtls-no-cert', mutual);
    const out1 = await failingWorker(c1.address, ['--tls-ca', pki.ca]);
    expect(out1).toContain('the coordinator requires a client certificate (mutual TLS, server.tls.client_ca): start the worker with --tls-cert FILE --tls-key FILE');
    await c1.proc.waitFor(/refused a TLS handshake from 127\.0\.0\.1: the client sent no certificate/, 10_000);

    const c2 = await cliCoordinator('mtls-rogue-cert', mutual);
    const out2 = await failingWorker(c2.address, ['--tls-ca', pki.ca, '--tls-cert', pki.rogueCert, '--tls-key', pki.rogueKey]);
    expect(out2).toContain(`the coordinator refused the client certificate --tls-cert ${pki.rogueCert} (mutual TLS)`);
    await c2.proc.waitFor(/refused a TLS handshake from 127\.0\.0\.1: the client certificate is not accepted/, 10_000);
  });

  it('a server name the certificate does not hold (--tls-server-name)', async () => {
    const { pki } = await setup();
    const c = await cliCoordinator('tls-name', { cert: pki.serverCert, key: pki.serverKey, client_ca: null });
    const out = await failingWorker(c.address, ['--tls-ca', pki.ca, '--tls-server-name', 'coordinator.example']);
    expect(out).toMatch(/the coordinator's certificate \(CN=localhost, issued by CN=fedtune test ca\)|the coordinator's certificate does not name the address dialled/);
    expect(out).toContain('coordinator.example');
    expect(out).toContain('--tls-server-name NAME');
  });

  it('a worker that was connected keeps retrying through a TLS mismatch (the coordinator may be restarting)', async () => {
    const { pki, model, data } = await setup();
    const tls = { cert: pki.serverCert, key: pki.serverKey, client_ca: null };
    // min_workers 2: the run waits, so the worker stays connected until the coordinator goes.
    const c1 = await cliCoordinator('tls-restart', tls, { minWorkers: 2 });
    const w = worker({ address: c1.address, site: 'site-a', data, model, extra: ['--tls-ca', pki.ca] });
    procs.push(w);
    await c1.proc.waitFor(/\+ site-a joined/);
    c1.proc.kill('SIGKILL');
    await c1.proc.exited;
    // A plaintext coordinator on the same address: the worker sees "not TLS" but has connected before, so it retries.
    const c2 = await cliCoordinator('tls-restart-plain', null, { args: ['--listen', c1.address] });
    const before = w.out().length;
    await new Promise<void>((resolve, reject) => {
      const t = setInterval(() => {
        if (/connection to the coordinator lost or refused: .*wrong version number/.test(w.out().slice(before))) {
          clearInterval(t);
          resolve();
        } else if (w.child.exitCode !== null) {
          clearInterval(t);
          reject(new Error(`worker exited (${w.child.exitCode}):\n${w.out()}`));
        }
      }, 100);
    });
    expect(w.child.exitCode).toBeNull();
    c2.proc.kill('SIGKILL');
    await c2.proc.exited;
    // The TLS coordinator is back (resumed): the same worker joins it again.
    const c3 = await cliCoordinator('tls-restart', tls, { minWorkers: 2, args: ['--resume', '--listen', c1.address] });
    await c3.proc.waitFor(/\+ site-a joined/);
    expect(w.out()).not.toMatch(/does not speak TLS/);
  });

  it('with the right CA and client certificate the worker joins the mutual-TLS run', async () => {
    const { pki, model, data } = await setup();
    const c = await cliCoordinator('mtls-ok', { cert: pki.serverCert, key: pki.serverKey, client_ca: pki.ca });
    const w = worker({ address: c.address, site: 'site-a', data, model, extra: ['--tls-ca', pki.ca, '--tls-cert', pki.clientCert, '--tls-key', pki.clientKey] });
    procs.push(w);
    await c.proc.waitFor(/\+ site-a joined/);
    expect(await w.exited).toBe(0);
    expect(c.proc.out()).not.toMatch(/refused a TLS handshake/);
    // Adapter and update went over the bulk channel, under the same mutual TLS.
    expect(w.out()).toMatch(/global adapter downloaded.*"transport":"bulk 127\.0\.0\.1:\d+"/);
    expect(w.out()).toMatch(/update uploaded.*"transport":"bulk 127\.0\.0\.1:\d+"/);
  });

  it('the bulk channel takes only the certificate the worker registered with', async () => {
    const { pki, model, dir } = await setup();
    const cfg = runConfig(dir, model, { name: 'mtls-bulk', rounds: 1, cohort: { min_workers: 1 }, server: { tls: { cert: pki.serverCert, key: pki.serverKey, client_ca: pki.ca } } });
    const c = await startCoordinator(cfg);
    const conn = new CoordinatorConnection(c.address, { caFile: pki.ca, certFile: pki.clientCert, keyFile: pki.clientKey });
    try {
      const info = await conn.getRunInfo('test-token');
      const reg = await conn.register({
        joinToken: 'test-token',
        site: 'site-a',
        previousWorkerId: '',
        capabilities: { device: 'cpu', memoryBytes: 1, backends: ['probe'], modelFingerprint: info.modelFingerprint, numTrainExamples: 1, numEvalExamples: 0, client: 'probe', protocolVersion: 1 },
      });
      expect(reg.bulkPort).toBeGreaterThan(0);
      const req = BulkRequest.encode({ workerId: reg.workerId, sessionKey: reg.sessionKey, op: { $case: 'download', value: { target: { $case: 'adapterVersion', value: 0 }, adapterRank: 0 } } }).finish();
      const ask = (cert: string | null, key: string | null): Promise<{ code: number; message: string } | { tlsError: string }> =>
        new Promise((resolve) => {
          const sock = tlsConnect({ host: '127.0.0.1', port: reg.bulkPort, ca: readFileSync(pki.ca), ...(cert ? { cert: readFileSync(cert), key: readFileSync(key!) } : {}) });
          const got: Buffer[] = [];
          let err: string | null = null;
          sock.on('secureConnect', () => {
            const head = Buffer.alloc(8);
            head.write('FTB1', 0, 'latin1');
            head.writeUInt32LE(req.byteLength, 4);
            sock.write(Buffer.concat([head, req]));
          });
          sock.on('data', (d) => got.push(d));
          sock.on('error', (e) => (err = e.message));
          sock.on('close', () => {
            const all = Buffer.concat(got);
            if (all.byteLength < 4) return resolve({ tlsError: err ?? 'closed' });
            const r = BulkResponse.decode(all.subarray(4, 4 + all.readUInt32LE(0)));
            resolve({ code: r.code, message: r.message });
          });
        });
      const own = await ask(pki.clientCert, pki.clientKey);
      expect(own).toMatchObject({ code: 0 });
      const other = await ask(pki.clientBCert, pki.clientBKey);
      expect(other).toMatchObject({ code: 7 }); // PERMISSION_DENIED
      expect((other as { message: string }).message).toMatch(/site "site-b".*is not the one worker .* registered with/);
      expect((other as { message: string }).message).not.toContain(reg.sessionKey);
      const none = await ask(null, null);
      expect(none).toHaveProperty('tlsError');
    } finally {
      conn.close();
      await c.close();
    }
  });
});
