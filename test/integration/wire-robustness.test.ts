/**
 * The wire holds against clients that misbehave at the stream level: upload
 * streams that send nothing cannot take the upload slots, and a late upload
 * for a task of a finished round is answered as stale.
 */
import { join } from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { beforeAll, describe, expect, it } from 'vitest';
import { startCoordinator } from '../../coordinator/main.ts';
import { packTensorMap } from '../../common/chunks.ts';
import { loadModel } from '../../worker/engine/model.ts';
import type { UploadMessage } from '../../proto/gen/fedtune/v1/coordinator.ts';
import { Probe, rawUpload, runConfig, tempDir, tinyModel, updateMessages, waitForEvent } from './federated-helpers.ts';

let dir: string;
let modelDir: string;
let fingerprint: string;

beforeAll(async () => {
  dir = tempDir('wire');
  modelDir = await tinyModel(join(dir, 'model'));
  fingerprint = (await loadModel(modelDir)).fingerprint;
});

/** An upload stream that sends only what it is given and then nothing more; resolves with its final status. */
function stalledUpload(p: Probe, first: UploadMessage[] = []): Promise<{ code: number; details: string }> {
  return new Promise((resolve) => {
    const md = (p.conn as unknown as { metadata(): grpc.Metadata }).metadata();
    const call = p.conn.client.upload(md, (err) => resolve(err ? { code: err.code, details: err.details } : { code: grpc.status.OK, details: '' }));
    for (const m of first) call.write(m);
  });
}

/**
 * An upload stream that writes messages[0] at once, then one more every `everyMs`; it ends the
 * stream after the last one when `end` is set. Resolves with its final status.
 */
function trickledUpload(p: Probe, messages: UploadMessage[], everyMs: number, end: boolean): Promise<{ code: number; details: string }> {
  return new Promise((resolve) => {
    const md = (p.conn as unknown as { metadata(): grpc.Metadata }).metadata();
    const call = p.conn.client.upload(md, (err) => resolve(err ? { code: err.code, details: err.details } : { code: grpc.status.OK, details: '' }));
    call.write(messages[0]!);
    let i = 1;
    const t = setInterval(() => {
      if (i >= messages.length) {
        clearInterval(t);
        if (end) call.end();
        return;
      }
      call.write(messages[i++]!);
    }, everyMs);
    call.on('error', () => clearInterval(t));
    call.on('status', () => clearInterval(t));
  });
}

describe('upload slots', () => {
  it('streams that send nothing hold no slot and are closed when idle; a real upload goes through meanwhile', async () => {
    const cfg = runConfig(dir, modelDir, {
      name: 'stalled',
      rounds: 1,
      cohort: { min_workers: 1 },
      round: { min_results: 1, deadline_sec: 60 },
      eval: { every: 0 },
      server: { max_concurrent_uploads: 2, upload_idle_timeout_sec: 1.5 },
    } as Record<string, unknown>);
    const coord = await startCoordinator(cfg);
    const p = new Probe(coord.address, fingerprint);
    try {
      await p.join('probe-a');
      const task = await p.nextTask();
      // Eight silent streams, four times the slots there are.
      const silent = Array.from({ length: 8 }, () => stalledUpload(p));
      await new Promise((r) => setTimeout(r, 200));
      const g = await p.conn.downloadAdapter(task.global!.version, 1 << 20);
      const ok = await rawUpload(p.conn, updateMessages(task, g.adapter));
      expect(grpc.status[ok.code]).toBe('OK');
      const done = await Promise.all(silent);
      for (const d of done) {
        expect(grpc.status[d.code]).toBe('DEADLINE_EXCEEDED');
        expect(d.details).toMatch(/upload sent nothing for 1\.5 s \(server\.upload_idle_timeout_sec\)/);
      }
      await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1);
    } finally {
      p.close();
      await coord.close();
    }
  });
});

describe('upload total timeout', () => {
  it('an upload stream that trickles chunks is closed at server.upload_timeout_sec, its slot freed for the next', async () => {
    const cfg = runConfig(dir, modelDir, {
      name: 'trickle',
      rounds: 1,
      cohort: { min_workers: 1 },
      round: { min_results: 1, deadline_sec: 60 },
      eval: { every: 0 },
      server: { max_concurrent_uploads: 1, upload_idle_timeout_sec: 30, upload_timeout_sec: 1.5 },
    } as Record<string, unknown>);
    const coord = await startCoordinator(cfg);
    const p = new Probe(coord.address, fingerprint);
    try {
      await p.join('probe-a');
      const task = await p.nextTask();
      const g = await p.conn.downloadAdapter(task.global!.version, 1 << 20);
      const msgs = updateMessages(task, g.adapter, {}, 64);
      // Header, then one small chunk every 300 ms (no trailer): never idle for 30 s, never done within 1.5 s.
      const slow = trickledUpload(p, msgs.slice(0, -1), 300, false);
      const res = await slow;
      expect(grpc.status[res.code]).toBe('DEADLINE_EXCEEDED');
      expect(res.details).toMatch(/not complete 1\.5 s after it got its slot \(server\.upload_timeout_sec/);
      // The only slot is free again: a whole upload goes through.
      const ok = await rawUpload(p.conn, updateMessages(task, g.adapter));
      expect(grpc.status[ok.code]).toBe('OK');
      await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1);
    } finally {
      p.close();
      await coord.close();
    }
  });
});

describe('waiting for a slot', () => {
  it('an upload queued behind a slow one is not closed as idle while it waits, and goes through', async () => {
    const cfg = runConfig(dir, modelDir, {
      name: 'queued',
      rounds: 1,
      cohort: { min_workers: 2 },
      round: { min_results: 2, deadline_sec: 60 },
      eval: { every: 0 },
      server: { max_concurrent_uploads: 1, upload_idle_timeout_sec: 1, upload_timeout_sec: 30 },
    } as Record<string, unknown>);
    const coord = await startCoordinator(cfg);
    const a = new Probe(coord.address, fingerprint);
    const b = new Probe(coord.address, fingerprint);
    try {
      await a.join('probe-a');
      await b.join('probe-b');
      const [ta, tb] = [await a.nextTask(), await b.nextTask()];
      const g = await a.conn.downloadAdapter(ta.global!.version, 1 << 20);
      // A takes the only slot and trickles its chunks for about 2.5 s (never 1 s quiet) before its trailer.
      const msgsA = updateMessages(ta, g.adapter, {}, Math.ceil(packTensorMap(g.adapter).bytes.byteLength / 6));
      const slowA = trickledUpload(a, msgsA, 300, true);
      await new Promise((r) => setTimeout(r, 200));
      // B's header arrives while A holds the slot; B then waits well past the 1 s idle timeout.
      const okB = await rawUpload(b.conn, updateMessages(tb, g.adapter));
      expect(grpc.status[okB.code], okB.details).toBe('OK');
      expect(grpc.status[(await slowA).code]).toBe('OK');
      await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === 1);
    } finally {
      a.close();
      b.close();
      await coord.close();
    }
  });
});

describe('late uploads', () => {
  it('an upload for a task of a finished round is stale (FAILED_PRECONDITION), not unknown', async () => {
    const cfg = runConfig(dir, modelDir, {
      name: 'late',
      rounds: 3,
      cohort: { min_workers: 1 },
      round: { min_results: 1, deadline_sec: 60 },
      eval: { every: 0 },
    } as Record<string, unknown>);
    const coord = await startCoordinator(cfg);
    const p = new Probe(coord.address, fingerprint);
    try {
      await p.join('probe-a');
      const first = await p.nextTask();
      let task = first;
      for (let round = 1; round <= 2; round++) {
        const g = await p.conn.downloadAdapter(task.global!.version, 1 << 20);
        expect(grpc.status[(await rawUpload(p.conn, updateMessages(task, g.adapter))).code]).toBe('OK');
        await waitForEvent(coord.bus, coord.runId, 'round.completed', (e) => e.round === round);
        task = await p.nextTask();
      }
      // Round 1's task has been forgotten by now (round 2 completed); its late upload is stale.
      const g = await p.conn.downloadAdapter(task.global!.version, 1 << 20);
      const late = await rawUpload(p.conn, updateMessages(first, g.adapter));
      expect(grpc.status[late.code]).toBe('FAILED_PRECONDITION');
      expect(late.details).toMatch(new RegExp(`stale update: task ${first.taskId} of round 1 is closed`));
      const unknown = await rawUpload(p.conn, updateMessages({ ...first, taskId: 'r1-train-0-00000000' }, g.adapter));
      expect(grpc.status[unknown.code]).toBe('NOT_FOUND');
    } finally {
      p.close();
      await coord.close();
    }
  });
});
