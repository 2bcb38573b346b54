import { mkdtempSync, readFileSync, rmSync, writeFileSync, appendFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { NewRunEvent, RunEvent } from '../../common/events.ts';
import { EVENT_LOG_FILE, MemoryBus, SlowSubscriberError } from '../../coordinator/events/memory.ts';

const dirs: string[] = [];
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'fedtune-bus-'));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

const logEv = (runId: string, message: string): NewRunEvent => ({ runId, type: 'log', level: 'info', message });

/** Collect n events from an async iterable. */
async function take(it: AsyncIterable<RunEvent>, n: number): Promise<RunEvent[]> {
  const out: RunEvent[] = [];
  if (n === 0) return out;
  for await (const e of it) {
    out.push(e);
    if (out.length === n) break;
  }
  return out;
}

describe('MemoryBus', () => {
  it('numbers events per run from 1 and stamps the time', async () => {
    const bus = new MemoryBus();
    const before = Date.now();
    const a1 = bus.publish(logEv('a', 'x'));
    const b1 = bus.publish(logEv('b', 'y'));
    const a2 = bus.publish(logEv('a', 'z'));
    expect([a1.seq, b1.seq, a2.seq]).toEqual([1, 1, 2]);
    expect(a1.time).toBeGreaterThanOrEqual(before);
    expect(bus.runs()).toEqual(['a', 'b']);
    expect((await bus.history('a')).map((e) => e.seq)).toEqual([1, 2]);
    expect((await bus.history('a', 1)).map((e) => e.seq)).toEqual([2]);
    expect(await bus.history('nope')).toEqual([]);
    await bus.close();
  });

  it('rejects bad events and options with a clear message', async () => {
    expect(() => new MemoryBus({ ringSize: 0 })).toThrow(/ringSize must be a positive integer/);
    const bus = new MemoryBus();
    expect(() => bus.publish(logEv('', 'x'))).toThrow(/runId must be a non-empty string/);
    expect(() => bus.publish({ runId: 'a', type: 'nope' } as unknown as NewRunEvent)).toThrow(/unknown event type "nope"/);
    expect(() => bus.subscribe({ runId: 'a', afterSeq: -1 })).toThrow(/afterSeq must be an integer >= 0/);
    await bus.close();
    expect(() => bus.publish(logEv('a', 'x'))).toThrow(/closed/);
  });

  it('keeps only ringSize events per run in memory without a log', async () => {
    const bus = new MemoryBus({ ringSize: 3 });
    for (let i = 0; i < 10; i++) bus.publish(logEv('a', `m${i}`));
    bus.publish(logEv('b', 'other'));
    expect((await bus.history('a')).map((e) => e.seq)).toEqual([8, 9, 10]);
    expect((await bus.history('a', 8)).map((e) => e.seq)).toEqual([9, 10]);
    expect((await bus.history('b')).map((e) => e.seq)).toEqual([1]);
    await bus.close();
  });

  it('serves history older than the ring from the event log', async () => {
    const dir = tempDir();
    const bus = new MemoryBus({ ringSize: 4, logDir: dir });
    for (let i = 0; i < 20; i++) bus.publish(logEv(i % 2 ? 'a' : 'b', `m${i}`));
    expect((await bus.history('a')).map((e) => e.seq)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    expect((await bus.history('b', 5)).map((e) => e.seq)).toEqual([6, 7, 8, 9, 10]);
    await bus.close();
  });

  it('reloads the event log after a restart and continues each run sequence', async () => {
    const dir = tempDir();
    const bus1 = new MemoryBus({ logDir: dir });
    for (let i = 0; i < 5; i++) bus1.publish(logEv('a', `first${i}`));
    bus1.publish(logEv('b', 'b1'));
    await bus1.close();

    const bus2 = new MemoryBus({ logDir: dir });
    expect(bus2.runs()).toEqual(['a', 'b']);
    expect(bus2.publish(logEv('a', 'after restart')).seq).toBe(6);
    expect(bus2.publish(logEv('b', 'b2')).seq).toBe(2);
    const hist = await bus2.history('a');
    expect(hist.map((e) => e.seq)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(hist.map((e) => (e.type === 'log' ? e.message : ''))).toEqual([
      'first0', 'first1', 'first2', 'first3', 'first4', 'after restart',
    ]);
    await bus2.close();

    const lines = readFileSync(join(dir, EVENT_LOG_FILE), 'utf8').trim().split('\n');
    expect(lines).toHaveLength(8);
    expect(JSON.parse(lines[7]!)).toMatchObject({ runId: 'b', seq: 2, message: 'b2' });
  });

  it('skips a torn last line from a crash and appends cleanly after it', async () => {
    const dir = tempDir();
    const bus1 = new MemoryBus({ logDir: dir });
    bus1.publish(logEv('a', 'one'));
    bus1.publish(logEv('a', 'two'));
    await bus1.close();
    const file = join(dir, EVENT_LOG_FILE);
    appendFileSync(file, '{"runId":"a","seq":3,"time":17000000,"type":"lo'); // crash mid-write

    const bus2 = new MemoryBus({ logDir: dir });
    expect(bus2.lastSeq('a')).toBe(2);
    expect(bus2.publish(logEv('a', 'three')).seq).toBe(3);
    await bus2.close();

    const bus3 = new MemoryBus({ logDir: dir });
    const hist = await bus3.history('a');
    expect(hist.map((e) => (e.type === 'log' ? e.message : ''))).toEqual(['one', 'two', 'three']);
    await bus3.close();
  });

  it('refuses a log with a corrupt line in the middle, naming file and line', () => {
    const dir = tempDir();
    const file = join(dir, EVENT_LOG_FILE);
    writeFileSync(
      file,
      JSON.stringify({ runId: 'a', seq: 1, time: 1, type: 'log', level: 'info', message: 'x' }) + '\nnot json\n' +
        JSON.stringify({ runId: 'a', seq: 2, time: 1, type: 'log', level: 'info', message: 'y' }) + '\n',
    );
    expect(() => new MemoryBus({ logDir: dir })).toThrow(new RegExp(`${EVENT_LOG_FILE}:2: not valid JSON`));
    writeFileSync(file, JSON.stringify({ runId: 'a', seq: 2, time: 1, type: 'log', level: 'info', message: 'x' }) + '\n');
    expect(() => new MemoryBus({ logDir: dir })).toThrow(/:1: run a has seq 2 after 0 \(expected 1\)/);
  });

  it('delivers history after afterSeq, then live events, with no gaps or duplicates', async () => {
    const bus = new MemoryBus();
    for (let i = 0; i < 5; i++) bus.publish(logEv('a', `h${i}`));
    const sub = bus.subscribe({ runId: 'a', afterSeq: 2 });
    // Published after subscribe but before the consumer starts reading.
    bus.publish(logEv('a', 'live1'));
    bus.publish(logEv('b', 'other run'));
    const got = take(sub, 5);
    bus.publish(logEv('a', 'live2'));
    bus.publish(logEv('a', 'live3'));
    expect((await got).map((e) => e.seq)).toEqual([3, 4, 5, 6, 7]);
    expect((await got).every((e) => e.runId === 'a')).toBe(true);
    await bus.close();
  });

  it('resumes from the last seen seq without gaps or duplicates, across a restart', async () => {
    const dir = tempDir();
    const bus1 = new MemoryBus({ logDir: dir, ringSize: 2 });
    const sub1 = bus1.subscribe({ runId: 'r' });
    for (let i = 0; i < 6; i++) bus1.publish(logEv('r', `e${i}`));
    const first = await take(sub1, 4);
    const lastSeen = first.at(-1)!.seq;
    await bus1.close();

    const bus2 = new MemoryBus({ logDir: dir, ringSize: 2 });
    bus2.publish(logEv('r', 'e6'));
    const sub2 = bus2.subscribe({ runId: 'r', afterSeq: lastSeen });
    const pending = take(sub2, 4);
    bus2.publish(logEv('r', 'e7'));
    const rest = await pending;
    const all = [...first, ...rest].map((e) => e.seq);
    expect(all).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    await bus2.close();
  });

  it('subscribes to every run when no runId is given', async () => {
    const bus = new MemoryBus();
    bus.publish(logEv('a', 'a1'));
    const sub = bus.subscribe({});
    bus.publish(logEv('b', 'b1'));
    bus.publish(logEv('a', 'a2'));
    const got = await take(sub, 3);
    expect(got.map((e) => `${e.runId}${e.seq}`)).toEqual(['a1', 'b1', 'a2']);
    await bus.close();
  });

  it('cuts off a subscriber that falls behind without blocking publish, and says where to resume', async () => {
    const bus = new MemoryBus({ subscriberQueue: 4 });
    const slow = bus.subscribe({ runId: 'a' });
    const fast = bus.subscribe({ runId: 'a' });
    const fastGot = take(fast, 10);
    for (let i = 0; i < 10; i++) {
      bus.publish(logEv('a', `m${i}`));
      await new Promise((r) => setImmediate(r)); // let the fast consumer run
    }
    expect((await fastGot).map((e) => e.seq)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);

    const delivered: number[] = [];
    let error: unknown;
    try {
      for await (const e of slow) delivered.push(e.seq);
    } catch (err) {
      error = err;
    }
    // It keeps what it had queued, then learns where to resume.
    expect(delivered).toEqual([1, 2, 3, 4]);
    expect(error).toBeInstanceOf(SlowSubscriberError);
    expect((error as SlowSubscriberError).lastSeq.get('a')).toBe(4);

    const resumed = await take(bus.subscribe({ runId: 'a', afterSeq: 4 }), 6);
    expect(resumed.map((e) => e.seq)).toEqual([5, 6, 7, 8, 9, 10]);
    await bus.close();
  });

  it('ends iterators on close() and on subscription close()', async () => {
    const bus = new MemoryBus();
    const sub = bus.subscribe({ runId: 'a' });
    const done = (async () => {
      const seen: number[] = [];
      for await (const e of sub) seen.push(e.seq);
      return seen;
    })();
    bus.publish(logEv('a', 'x'));
    await new Promise((r) => setImmediate(r));
    sub.close();
    expect(await done).toEqual([1]);

    const sub2 = bus.subscribe({ runId: 'a' });
    let gotFirst!: () => void;
    const first = new Promise<void>((r) => (gotFirst = r));
    const done2 = (async () => {
      let n = 0;
      for await (const _ of sub2) {
        n++;
        gotFirst();
      }
      return n;
    })();
    await first; // history (seq 1) delivered; now the iterator waits for live events
    await bus.close();
    expect(await done2).toBe(1);
  });
});
