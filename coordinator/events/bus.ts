/**
 * The event bus the run loop publishes to. It never knows which implementation
 * it has: in-process (default) or NATS.
 */
import type { NewRunEvent, RunEvent } from '../../common/events.ts';

export interface EventSubscription extends AsyncIterable<RunEvent> {
  /** Stop delivering; the iterator ends. */
  close(): void;
}

export interface EventBus {
  /**
   * Assign the next sequence number of the event's run and the time, deliver it,
   * and return the complete event. Never blocks the run on a slow consumer or a
   * broker that is down.
   */
  publish(event: NewRunEvent): RunEvent;
  /** Events of one run (or every run when runId is undefined) with seq > afterSeq, then live ones. */
  subscribe(opts: { runId?: string; afterSeq?: number }): EventSubscription;
  /** Stored history of a run with seq > afterSeq (bounded by what the backend keeps). */
  history(runId: string, afterSeq?: number): Promise<RunEvent[]>;
  /** Ids of runs this bus knows of. */
  runs(): string[];
  /** Flush what is pending and release every resource. */
  close(): Promise<void>;
}
