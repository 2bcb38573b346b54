import { describe, expect, it } from 'vitest';
import { hasUrlCredentials, redactText, redactUrl } from '../../common/redact.ts';
import { PerKeyLimit } from '../../common/rate-limit.ts';
import { toConnectionOptions, withUrlCredentials } from '../../coordinator/events/nats-common.ts';
import { classifyTlsError, splitAddress } from '../../worker/tls-errors.ts';

describe('redactUrl', () => {
  it.each([
    ['nats://alice:s3cret@10.0.0.5:4222', 'nats://alice:***@10.0.0.5:4222'],
    ['nats://TOKEN123@10.0.0.5:4222', 'nats://***@10.0.0.5:4222'],
    ['alice:s3cret@10.0.0.5:4222', 'alice:***@10.0.0.5:4222'],
    ['nats://a:p@h1:4222, nats://h2:4222,tls://b:q@h3:4223', 'nats://a:***@h1:4222, nats://h2:4222,tls://b:***@h3:4223'],
    ['https://u:p@ss@host/path?x=1', 'https://u:***@host/path?x=1'],
    ['http://127.0.0.1:8080/?token=abc&after=3', 'http://127.0.0.1:8080/?token=***&after=3'],
    ['http://h/x?after=3&password=p%20w#frag', 'http://h/x?after=3&password=***#frag'],
    ['nats://127.0.0.1:4222', 'nats://127.0.0.1:4222'],
    ['http://h/mail@example.com', 'http://h/mail@example.com'],
  ])('%s -> %s', (given, want) => {
    expect(redactUrl(given)).toBe(want);
    expect(hasUrlCredentials(given)).toBe(given !== want);
  });
});

describe('redactText', () => {
  it('hides credentials of every URL in a message and keeps the rest', () => {
    expect(redactText('cannot connect to NATS at nats://u:pw1@h:4222: refused; retry https://x/?token=t0k')).toBe(
      'cannot connect to NATS at nats://u:***@h:4222: refused; retry https://x/?token=***',
    );
    expect(redactText('"nats://tok@h:1" and mail a@b.c')).toBe('"nats://***@h:1" and mail a@b.c');
    expect(redactText('no secrets here: nats://h:4222')).toBe('no secrets here: nats://h:4222');
  });
});

describe('NATS credentials in the server URL', () => {
  it('move to user/pass or token, and the servers keep no secret', () => {
    expect(withUrlCredentials('t', { servers: 'nats://alice:p%40ss@h1:4222,nats://alice:p%40ss@h2:4222' })).toEqual({
      servers: 'nats://h1:4222,nats://h2:4222',
      user: 'alice',
      pass: 'p@ss',
    });
    expect(withUrlCredentials('t', { servers: 'tok123@h:4222' })).toEqual({ servers: 'h:4222', token: 'tok123' });
    const o = toConnectionOptions('t', { servers: 'nats://alice:pw@h:4222' });
    expect(o.servers).toEqual(['nats://h:4222']);
    expect([o.user, o.pass]).toEqual(['alice', 'pw']);
    // Without credentials the options come back as they were.
    const plain = { servers: 'nats://h:4222', user: 'u', pass: 'p' };
    expect(withUrlCredentials('t', plain)).toBe(plain);
  });

  it('refuses mixed credentials without showing them', () => {
    const err = (f: () => unknown): string => {
      try {
        f();
      } catch (e) {
        return (e as Error).message;
      }
      return 'no error';
    };
    const both = err(() => withUrlCredentials('--nats', { servers: 'nats://a:secretpw@h:1', user: 'b', pass: 'c' }));
    expect(both).toMatch(/--nats: the server URL carries credentials \(nats:\/\/a:\*\*\*@h:1\) and user\/pass, token or a credentials file are given too/);
    const two = err(() => withUrlCredentials('--nats', { servers: 'nats://a:secretpw@h:1,nats://a:other@h2:1' }));
    expect(two).toMatch(/carry different credentials/);
    const bad = err(() => toConnectionOptions('NatsBus', { servers: 'http://a:secretpw@h:1' }));
    expect(bad).toMatch(/has scheme http/);
    for (const m of [both, two, bad]) expect(m).not.toContain('secretpw');
  });
});

describe('PerKeyLimit', () => {
  it('lets one event per key through per interval and counts the rest', () => {
    const l = new PerKeyLimit(60_000);
    expect(l.take('a', 0)).toEqual({ ok: true, suppressed: 0 });
    expect(l.take('a', 10)).toEqual({ ok: false, suppressed: 1 });
    expect(l.take('b', 20)).toEqual({ ok: true, suppressed: 0 });
    expect(l.take('a', 59_999)).toEqual({ ok: false, suppressed: 2 });
    expect(l.take('a', 60_000)).toEqual({ ok: true, suppressed: 2 });
    expect(l.take('a', 60_001)).toEqual({ ok: false, suppressed: 1 });
  });

  it('keeps at most maxKeys keys', () => {
    const l = new PerKeyLimit(1000, 3);
    for (const k of ['a', 'b', 'c', 'd']) expect(l.take(k, 0).ok).toBe(true);
    // 'a' was forgotten to make room, so it may log again at once; 'd' may not.
    expect(l.take('a', 1).ok).toBe(true);
    expect(l.take('d', 1).ok).toBe(false);
  });
});

describe('TLS failures from grpc-js error text', () => {
  const addr = '10.0.0.5:7070';
  const grpcText = (last: string): string => `14 UNAVAILABLE: No connection established. Last error: ${last}. Resolution note: `;
  it.each([
    ['Error: unable to verify the first certificate', { caFile: 'ca.pem' }, 'untrusted-certificate', /not signed by the CA you gave \(--tls-ca ca\.pem\): unable to verify the first certificate;/],
    ['Error: self-signed certificate', {}, 'untrusted-certificate', /not signed by a CA this machine trusts \(self-signed certificate\); give the CA that signed it with --tls-ca FILE/],
    ["Error [ERR_TLS_CERT_ALTNAME_INVALID]: Hostname/IP does not match certificate's altnames: Host: x. is not in the cert's altnames: DNS:localhost", { caFile: 'ca.pem', serverName: 'x' }, 'server-name', /--tls-server-name NAME/],
    ['Error: 80CC:error:0A00010B:SSL routines:ssl3_get_record:wrong version number:../deps/openssl/ssl3_record.c:350:\n', { caFile: 'ca.pem' }, 'not-tls', /does not speak TLS \(drop --tls/],
    ['80CC:error:0A00045C:SSL routines:ssl3_read_bytes:tlsv13 alert certificate required:../deps/x.c:1601:SSL alert number 116\n (2026-01-01T00:00:00.000Z)', { caFile: 'ca.pem' }, 'client-certificate-required', /requires a client certificate \(mutual TLS, server\.tls\.client_ca\): start the worker with --tls-cert FILE --tls-key FILE \(tlsv13 alert certificate required\)/],
    ['80CC:error:0A000418:SSL routines:ssl3_read_bytes:tlsv1 alert unknown ca:../deps/x.c:1601:SSL alert number 48\n', { caFile: 'ca.pem', certFile: 'me.pem', keyFile: 'me-key.pem' }, 'client-certificate-refused', /refused the client certificate --tls-cert me\.pem \(mutual TLS\)/],
  ] as const)('%s', (last, tls, kind, message) => {
    const f = classifyTlsError(grpcText(last), addr, tls);
    expect(f?.kind).toBe(kind);
    expect(f?.message).toMatch(new RegExp(`^cannot connect to the coordinator at 10\\.0\\.0\\.5:7070: `));
    expect(f?.message).toMatch(message);
  });

  it('says nothing for errors that are not about TLS, or for a plaintext client (a probe tells those)', () => {
    expect(classifyTlsError(grpcText('Error: connect ECONNREFUSED 10.0.0.5:7070'), addr, { caFile: 'ca.pem' })).toBeNull();
    expect(classifyTlsError(grpcText('Failed to connect (2026-01-01T00:00:00.000Z)'), addr, { caFile: 'ca.pem' })).toBeNull();
    expect(classifyTlsError(grpcText('Failed to connect'), addr, null)).toBeNull();
  });

  it('splits HOST:PORT and [V6]:PORT', () => {
    expect(splitAddress('10.0.0.5:7070')).toEqual({ host: '10.0.0.5', port: 7070 });
    expect(splitAddress('[::1]:7070')).toEqual({ host: '::1', port: 7070 });
    expect(splitAddress('coord.example:443')).toEqual({ host: 'coord.example', port: 443 });
    expect(splitAddress('dns:///coord:1')).toBeNull();
    expect(splitAddress('h:0')).toBeNull();
  });
});
