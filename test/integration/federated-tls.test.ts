/**
 * TLS on the coordinator's gRPC port: a worker that trusts the CA gets in, a
 * plaintext client does not.
 */
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { CoordinatorConnection } from '../../worker/agent.ts';
import { runConfig, tempDir, tinyModel } from './federated-helpers.ts';

let coord: CoordinatorHandle | null = null;
afterAll(async () => {
  await coord?.close();
});

function hasOpenssl(): boolean {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

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
