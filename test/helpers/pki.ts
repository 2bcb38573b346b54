/** Test certificates made with the openssl binary (TLS and mutual-TLS tests). */
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';

export function hasOpenssl(): boolean {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** A CA, a second (wrong) CA, a server certificate for localhost / 127.0.0.1 and client certificates signed by each CA. */
export function makePki(dir: string): Record<'ca' | 'otherCa' | 'serverCert' | 'serverKey' | 'clientCert' | 'clientKey' | 'clientBCert' | 'clientBKey' | 'rogueCert' | 'rogueKey', string> {
  const p = (name: string): string => join(dir, name);
  const ssl = (...args: string[]): void => void execFileSync('openssl', args, { stdio: 'ignore' });
  for (const ca of ['ca', 'other-ca']) ssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', p(`${ca}-key.pem`), '-out', p(`${ca}.pem`), '-days', '1', '-subj', `/CN=fedtune test ${ca}`);
  const leaf = (name: string, ca: string, cn: string, ext: string | null): void => {
    ssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', p(`${name}-key.pem`), '-out', p(`${name}.csr`), '-subj', `/CN=${cn}`);
    const extArgs: string[] = [];
    if (ext) {
      writeFileSync(p(`${name}.ext`), `${ext}\n`);
      extArgs.push('-extfile', p(`${name}.ext`));
    }
    ssl('x509', '-req', '-in', p(`${name}.csr`), '-CA', p(`${ca}.pem`), '-CAkey', p(`${ca}-key.pem`), '-CAcreateserial', '-out', p(`${name}.pem`), '-days', '1', ...extArgs);
  };
  leaf('server', 'ca', 'localhost', 'subjectAltName=DNS:localhost,IP:127.0.0.1');
  leaf('client', 'ca', 'site-a', null);
  leaf('client-b', 'ca', 'site-b', null);
  leaf('rogue', 'other-ca', 'site-rogue', null);
  return {
    ca: p('ca.pem'), otherCa: p('other-ca.pem'),
    serverCert: p('server.pem'), serverKey: p('server-key.pem'),
    clientCert: p('client.pem'), clientKey: p('client-key.pem'),
    clientBCert: p('client-b.pem'), clientBKey: p('client-b-key.pem'),
    rogueCert: p('rogue.pem'), rogueKey: p('rogue-key.pem'),
  };
}
