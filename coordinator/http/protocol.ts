/**
 * Dashboard WebSocket protocol (JSON text frames on /ws).
 *
 * Client -> server:
 *   {type:'subscribe', runId, afterSeq}   events of runId with seq > afterSeq: history first, then live
 *   {type:'unsubscribe', runId}
 * Server -> client:
 *   {type:'runs', runs}                    run headers; on connect and whenever a new run appears
 *   {type:'event', event}                  one run event, in seq order per run, no gaps, no duplicates
 *   {type:'resync', runId, fromSeq}        the client fell behind and its subscription was dropped;
 *                                          subscribe again with afterSeq = fromSeq - 1
 *   {type:'error', message}                malformed message or unknown run; the connection stays open
 */
import { z } from 'zod';
import type { RunEvent } from '../../common/events.ts';
import type { RunHeader } from '../../dashboard/src/model.ts';

export const ClientMessage = z.discriminatedUnion('type', [
  z.object({
    type: z.literal('subscribe'),
    runId: z.string().min(1),
    afterSeq: z.number().int().min(0).default(0),
  }),
  z.object({ type: z.literal('unsubscribe'), runId: z.string().min(1) }),
]);
export type ClientMessage = z.infer<typeof ClientMessage>;

export type ServerMessage =
  | { type: 'runs'; runs: RunHeader[] }
  | { type: 'event'; event: RunEvent }
  | { type: 'resync'; runId: string; fromSeq: number }
  | { type: 'error'; message: string; runId?: string };
