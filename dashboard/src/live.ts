/**
 * The dashboard's WebSocket connection: reconnects with exponential backoff
 * and, on every (re)connect or resync, resubscribes each run after the last
 * sequence number it has, so the page never shows a gap or a duplicate.
 */
import type { RunEvent } from '../../common/events.ts';
import type { ServerMessage } from '../../coordinator/http/protocol.ts';
import type { RunHeader } from './model.ts';

export type ConnState = 'connecting' | 'live' | 'offline';

export interface LiveHandlers {
  /** Return the last seq applied for the run (the resume point). */
  lastSeq(runId: string): number;
  onEvent(e: RunEvent): void;
  onRuns(runs: RunHeader[]): void;
  onState(state: ConnState, detail: string): void;
  onError(message: string): void;
}

export class Live {
  private ws: WebSocket | undefined;
  private readonly wanted = new Set<string>();
  private attempt = 0;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private stopped = false;

  constructor(private readonly url: string, private readonly h: LiveHandlers) {
    this.connect();
  }

  subscribe(runId: string): void {
    this.wanted.add(runId);
    this.sendSubscribe(runId);
  }

  unsubscribe(runId: string): void {
    this.wanted.delete(runId);
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type: 'unsubscribe', runId }));
  }

  close(): void {
    this.stopped = true;
    clearTimeout(this.timer);
    this.ws?.close();
  }

  private sendSubscribe(runId: string): void {
    if (this.ws?.readyState !== WebSocket.OPEN) return; // sent on (re)connect
    this.ws.send(JSON.stringify({ type: 'subscribe', runId, afterSeq: this.h.lastSeq(runId) }));
  }

  private connect(): void {
    this.h.onState('connecting', this.attempt === 0 ? 'connecting' : `reconnecting (try ${this.attempt + 1})`);
    const ws = new WebSocket(this.url);
    this.ws = ws;
    ws.onopen = () => {
      this.attempt = 0;
      this.h.onState('live', 'live');
      for (const runId of this.wanted) this.sendSubscribe(runId);
    };
    ws.onmessage = (m: MessageEvent<string>) => {
      let msg: ServerMessage;
      try {
        msg = JSON.parse(m.data) as ServerMessage;
      } catch {
        return;
      }
      switch (msg.type) {
        case 'event':
          this.h.onEvent(msg.event);
          break;
        case 'runs':
          this.h.onRuns(msg.runs);
          break;
        case 'resync':
          // We fell behind; pick up after what we really have.
          if (this.wanted.has(msg.runId)) this.sendSubscribe(msg.runId);
          break;
        case 'error':
          this.h.onError(msg.message);
          break;
      }
    };
    ws.onclose = () => {
      if (this.ws !== ws || this.stopped) return;
      // 0.5 s, 1 s, 2 s, ... up to 15 s, with jitter so many dashboards do not reconnect in step.
      const delay = Math.min(15_000, 500 * 2 ** this.attempt) * (0.75 + Math.random() * 0.5);
      this.attempt++;
      this.h.onState('offline', `disconnected; retrying in ${Math.ceil(delay / 1000)}s`);
      this.timer = setTimeout(() => this.connect(), delay);
    };
  }
}
