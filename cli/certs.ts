/**
 * `fedtune certs init|issue|revoke|crl|list`: the federation's CA, per-site
 * client certificates, the coordinator's server certificate and the
 * revocation list the coordinator reloads (common/certs.ts, docs/privacy.md).
 */
import { Command } from 'commander';
import { join } from 'node:path';
import { CA_FILES, initCa, issueCertificate, readCaIndex, refreshCrl, revokeSite } from '../common/certs.ts';

const days = (what: string) => (v: string): number => {
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`${what}: must be a positive number of days (got "${v}")`);
  return n;
};

export function register(program: Command): void {
  const certs = program.command('certs').description('a CA for the sites of a federation: site certificates, server certificate, revocation');

  certs
    .command('init')
    .description(`create a CA in --dir (${CA_FILES.cert}, ${CA_FILES.key} (0600), ${CA_FILES.crl}, ${CA_FILES.index})`)
    .requiredOption('--dir <dir>', 'CA directory (created with mode 0700)')
    .option('--name <cn>', 'subject CN of the CA', 'fedtune CA')
    .option('--days <n>', 'validity of the CA certificate', days('--days'), 3650)
    .option('--crl-days <n>', 'validity of the revocation list before it must be signed again', days('--crl-days'), 365)
    .action(async (o: { dir: string; name: string; days: number; crlDays: number }) => {
      const r = await initCa(o.dir, { name: o.name, days: o.days, crlDays: o.crlDays });
      console.log(`CA created: ${r.cert} (give it as server.tls.client_ca and to workers as --tls-ca)`);
      console.log(`  key ${r.key} (keep it here; never copy it to the coordinator)`);
      console.log(`  revocation list ${r.crl} (server.tls.crl)`);
    });

  certs
    .command('issue')
    .description('issue a key and client certificate for a site (CN=SITE), or with --server a server certificate for the coordinator')
    .argument('<name>', 'site name (the worker\'s --name), or with --server the coordinator\'s host name')
    .requiredOption('--dir <dir>', 'CA directory')
    .option('--server', 'a server certificate (serverAuth) for the coordinator')
    .option('--host <host...>', 'with --server: DNS names / IP addresses workers dial (default: NAME)')
    .option('--days <n>', 'validity in days', days('--days'), 825)
    .option('--force', 'issue again although a certificate of this name exists (the old one stays valid until revoked)')
    .action(async (name: string, o: { dir: string; server?: boolean; host?: string[]; days: number; force?: boolean }) => {
      if (o.host && !o.server) throw new Error('--host goes with --server (site certificates name the site, not a host)');
      const r = await issueCertificate(o.dir, { kind: o.server ? 'server' : 'site', name, days: o.days, force: o.force ?? false, ...(o.host ? { hosts: o.host } : {}) });
      console.log(`${o.server ? 'server' : 'site'} certificate ${r.cert}`);
      console.log(`  key ${r.key} (0600)`);
      console.log(`  serial ${r.serial}, sha256 ${r.sha256}, valid until ${r.notAfter.toISOString()}`);
      if (!o.server) console.log(`  worker: --name ${name} --tls-ca ${join(o.dir, CA_FILES.cert)} --tls-cert ${r.cert} --tls-key ${r.key}`);
      else console.log(`  coordinator: server.tls.cert ${r.cert}, server.tls.key ${r.key}`);
    });

  certs
    .command('revoke')
    .description('revoke the certificates of a site and sign a new revocation list (the coordinator reloads it within a second)')
    .argument('<site>', 'site name')
    .requiredOption('--dir <dir>', 'CA directory')
    .option('--serial <hex>', 'revoke only the certificate with this serial')
    .option('--crl-days <n>', 'validity of the new revocation list', days('--crl-days'), 365)
    .action(async (site: string, o: { dir: string; serial?: string; crlDays: number }) => {
      const r = await revokeSite(o.dir, site, { crlDays: o.crlDays, ...(o.serial ? { serial: o.serial } : {}) });
      console.log(r.revoked.length ? `revoked ${r.revoked.length} certificate(s) of site ${site}: serial ${r.revoked.join(', ')}` : `site ${site} had no unrevoked certificate${o.serial ? ` with serial ${o.serial}` : ''}`);
      console.log(`  revocation list ${r.crl}, next update ${r.nextUpdate.toISOString()}`);
    });

  certs
    .command('crl')
    .description('sign the revocation list again with a new validity (a CRL past its next update refuses every site)')
    .requiredOption('--dir <dir>', 'CA directory')
    .option('--crl-days <n>', 'validity of the revocation list', days('--crl-days'), 365)
    .action(async (o: { dir: string; crlDays: number }) => {
      const r = await refreshCrl(o.dir, o.crlDays);
      console.log(`revocation list ${r.crl}, next update ${r.nextUpdate.toISOString()}`);
    });

  certs
    .command('list')
    .description('certificates the CA issued (no key material)')
    .requiredOption('--dir <dir>', 'CA directory')
    .action(async (o: { dir: string }) => {
      const idx = await readCaIndex(o.dir);
      console.log(`CA ${idx.subject}; revocation list #${idx.crl_number}, next update ${idx.crl_next_update}`);
      for (const e of idx.issued) {
        console.log(`  ${e.kind.padEnd(6)} ${e.name.padEnd(24)} serial ${e.serial} until ${e.not_after}${e.revoked_at ? ` REVOKED ${e.revoked_at}` : ''}`);
      }
    });
}
