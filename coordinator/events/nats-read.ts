/**
 * Reading run history back from the JetStream stream: find where a run's
 * events after a given run sequence number start (binary search over stream
 * positions with direct gets, so a late consumer does not scan the whole
 * stream), and read a bounded range with an ordered consumer.
 */
import { DeliverPolicy, type JetStreamManager, type NatsConnection } from 'nats';
import { isRunEvent, type RunEvent } from '../../common/events.ts';
import { directGet, isNotFound, retrying, type Subjects } from './nats-common.ts';

const decoder = new TextDecoder();

/** Run sequence numbers are stored in order except around an outage retry; start this many stream positions early. */
const START_MARGIN = 10_000;

export function parseEvent(data: Uint8Array): RunEvent | undefined {
  try {
    const e: unknown = JSON.parse(decoder.decode(data));
    return isRunEvent(e) ? e : undefined;
  } catch {
    return undefined;
  }
}

/** The first stored message at or after stream position `seq` whose subject matches `filter`. */
async function nextMatching(
  jsm: JetStreamManager,
  stream: string,
  filter: string,
  seq: number,
): Promise<{ streamSeq: number; event: RunEvent | undefined } | undefined> {
  try {
    const m = await retrying(() => directGet(jsm).getMessage(stream, { seq, next_by_subj: filter }));
    return { streamSeq: m.seq, event: parseEvent(m.data) };
  } catch (err) {
    if (isNotFound(err)) return undefined;
    throw err;
  }
}

/**
 * Stream position to start reading run `runId` from so that every event with
 * run seq > afterSeq is read (a little earlier is fine: readers skip what
 * they do not need). Undefined when the stream holds no such event.
 */
export async function findStartSeq(
  jsm: JetStreamManager,
  stream: string,
  subjects: Subjects,
  runId: string,
  afterSeq: number,
): Promise<number | undefined> {
  const filter = subjects.run(runId);
  const { state } = await retrying(() => jsm.streams.info(stream));
  if (state.messages === 0) return undefined;
  let lo = state.first_seq;
  let hi = state.last_seq + 1;
  if (afterSeq > 0) {
    while (lo < hi) {
      const mid = lo + Math.floor((hi - lo) / 2);
      const m = await nextMatching(jsm, stream, filter, mid);
      if (m === undefined) hi = mid;
      else if (m.event !== undefined && m.event.seq <= afterSeq) lo = m.streamSeq + 1;
      else hi = mid;
    }
    lo = Math.max(state.first_seq, lo - START_MARGIN);
  }
  const first = await nextMatching(jsm, stream, filter, lo);
  return first?.streamSeq;
}

/**
 * Stored events of one run with afterSeq < seq < beforeSeq, sorted by seq,
 * without duplicates. Reads up to the run's last event at the time of the call.
 */
export async function readRunHistory(
  nc: NatsConnection,
  jsm: JetStreamManager,
  stream: string,
  subjects: Subjects,
  runId: string,
  afterSeq = 0,
  beforeSeq = Number.POSITIVE_INFINITY,
  idleTimeoutMs = 5000,
): Promise<RunEvent[]> {
  const filter = subjects.run(runId);
  let endSeq: number;
  try {
    endSeq = (await retrying(() => directGet(jsm).getMessage(stream, { last_by_subj: filter }))).seq;
  } catch (err) {
    if (isNotFound(err)) return [];
    throw err;
  }
  const start = await findStartSeq(jsm, stream, subjects, runId, afterSeq);
  if (start === undefined || start > endSeq) return [];
  const consumer = await retrying(() =>
    nc.jetstream().consumers.get(stream, {
      filterSubjects: filter,
      deliver_policy: DeliverPolicy.StartSequence,
      opt_start_seq: start,
    }),
  );
  const messages = await consumer.consume({ max_messages: 1000 });
  const bySeq = new Map<number, RunEvent>();
  const wanted = Number.isFinite(beforeSeq) ? beforeSeq - afterSeq - 1 : Number.POSITIVE_INFINITY;
  // Guard against messages removed by stream limits while we read (endSeq would never come).
  let idle = setTimeout(() => messages.stop(), idleTimeoutMs);
  try {
    for await (const m of messages) {
      clearTimeout(idle);
      idle = setTimeout(() => messages.stop(), idleTimeoutMs);
      const e = parseEvent(m.data);
      if (e !== undefined && e.runId === runId && e.seq > afterSeq && e.seq < beforeSeq) bySeq.set(e.seq, e);
      if (m.seq >= endSeq || m.info.pending === 0 || bySeq.size >= wanted) break;
    }
  } finally {
    clearTimeout(idle);
    messages.stop();
  }
  return [...bySeq.values()].sort((a, b) => a.seq - b.seq);
}
