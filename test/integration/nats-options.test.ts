/**
 * NATS options and subjects without a server: subject tokens round-trip any
 * run id, and every bad option is refused with an error naming it.
 */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { natsOptionsFrom } from '../../cli/dashboard.ts';
import { createEventBus } from '../../coordinator/events/index.ts';
import { decodeToken, encodeToken, Subjects, toConnectionOptions } from '../../coordinator/events/nats-common.ts';

describe('subjects', () => {
  it('turns any run id into one subject token and back', () => {
    for (const id of ['demo-1_a', 'run.1', 'a b*c>d', '100%', 'été/東京', 'x\ny']) {
      const t = encodeToken(id);
      expect(t).toMatch(/^[A-Za-z0-9_%-]+$/);
      expect(decodeToken(t)).toBe(id);
    }
    expect(encodeToken('demo-1_a')).toBe('demo-1_a');
    expect(encodeToken('run.1')).toBe('run%2E1');
    expect(() => encodeToken('')).toThrow(/empty/);
  });

  it('lays out run and worker subjects under a root, and reads the run id back', () => {
    const s = new Subjects('staging.fedtune');
    const subject = s.event({ runId: 'r.1', type: 'round.completed' });
    expect(subject).toBe('staging.fedtune.runs.r%2E1.round.completed');
    expect(s.runIdOf(subject)).toBe('r.1');
    expect(s.runIdOf('fedtune.runs.r1.log')).toBeUndefined();
    expect(s.run('r.1')).toBe('staging.fedtune.runs.r%2E1.>');
    expect(s.workers('lab 3')).toBe('staging.fedtune.workers.lab%203');
    expect(new Subjects().event({ runId: 'r', type: 'log' })).toBe('fedtune.runs.r.log');
    expect(() => new Subjects('bad root')).toThrow(/subject root "bad root" is not allowed/);
    expect(() => new Subjects('a..b')).toThrow(/not allowed/);
  });
});

describe('connection options', () => {
  const dir = mkdtempSync(join(tmpdir(), 'fedtune-natsopt-'));
  const notCreds = join(dir, 'not.creds');
  writeFileSync(notCreds, 'hello');

  it('accepts a server list and TLS files', () => {
    const ca = join(dir, 'ca.pem');
    writeFileSync(ca, '-----BEGIN CERTIFICATE-----\n');
    const o = toConnectionOptions('t', { servers: 'nats://a:4222, tls://b:4223,c:4224', tls: { ca } });
    expect(o.servers).toEqual(['nats://a:4222', 'tls://b:4223', 'c:4224']);
    expect(o.tls).toEqual({ caFile: ca });
  });

  it.each([
    [{ servers: '' }, /servers is empty/],
    [{ servers: 'http://h:1' }, /has scheme http; allowed: nats, tls/],
    [{ servers: 'nats://h:1', user: 'u' }, /user and pass go together \(got only user\)/],
    [{ servers: 'nats://h:1', user: 'u', pass: 'p', token: 't' }, /one way to authenticate/],
    [{ servers: 'nats://h:1', credsFile: '/nonexistent/x.creds' }, /credsFile file \/nonexistent\/x.creds does not exist/],
    [{ servers: 'nats://h:1', credsFile: notCreds }, /is not a NATS credentials file/],
    [{ servers: 'nats://h:1', tls: { cert: '/x.pem' } }, /tls cert and key go together \(got only cert\)/],
    [{ servers: 'nats://h:1', tls: { ca: '/nonexistent/ca.pem' } }, /tls.ca file \/nonexistent\/ca.pem does not exist/],
  ])('refuses %j', (o, msg) => {
    expect(() => toConnectionOptions('NatsBus', o)).toThrow(msg);
  });

  it('refuses bad stream options before connecting', async () => {
    const memory = {};
    await expect(createEventBus({ nats: { servers: 'nats://127.0.0.1:1', stream: 'a.b' }, memory })).rejects.toThrow(/stream name "a.b" is not allowed/);
    await expect(createEventBus({ nats: { servers: 'nats://127.0.0.1:1', maxAgeSec: -5 }, memory })).rejects.toThrow(/maxAgeSec must be a positive integer, got -5/);
    await expect(createEventBus({ nats: { servers: 'nats://127.0.0.1:1', queueLimit: 0 }, memory })).rejects.toThrow(/queueLimit must be a positive integer, got 0/);
  });

  it('maps CLI flags to connection options', () => {
    expect(natsOptionsFrom({})).toBeUndefined();
    expect(() => natsOptionsFrom({ natsCreds: '/x.creds' })).toThrow('--nats-creds needs --nats URL');
    expect(natsOptionsFrom({ nats: 'nats://h:1', natsUser: 'u', natsPass: 'p', natsTlsCa: '/ca' })).toEqual({
      servers: 'nats://h:1',
      user: 'u',
      pass: 'p',
      token: undefined,
      credsFile: undefined,
      tls: { ca: '/ca', cert: undefined, key: undefined },
    });
  });
});
