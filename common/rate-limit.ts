/**
 * At most one event per key per interval, counting what was held back: for
 * log lines that a remote peer can trigger at will (refused handshakes,
 * refused WebSocket origins), so that no peer can flood the log.
 *
 *   const limit = new PerKeyLimit(60_000);
 *   const r = limit.take(peerAddress);
 *   if (r.ok) log.warn({ peer, suppressed: r.suppressed }, '...');
 */
export class PerKeyLimit {
  private readonly last = new Map<string, { at: number; suppressed: number }>();

  /** intervalMs: the shortest time between two events of one key; maxKeys bounds the memory kept. */
  constructor(
    readonly intervalMs: number,
    private readonly maxKeys = 10_000,
  ) {
    if (!Number.isFinite(intervalMs) || intervalMs <= 0) throw new Error(`PerKeyLimit: intervalMs must be > 0, got ${intervalMs}`);
  }

  /** ok: this key may log now; suppressed: how many were held back since its last one. */
  take(key: string, now = Date.now()): { ok: boolean; suppressed: number } {
    const e = this.last.get(key);
    if (e && now - e.at < this.intervalMs) {
      e.suppressed++;
      return { ok: false, suppressed: e.suppressed };
    }
    const suppressed = e?.suppressed ?? 0;
    this.last.delete(key);
    if (this.last.size >= this.maxKeys) this.prune(now);
    this.last.set(key, { at: now, suppressed: 0 });
    return { ok: true, suppressed };
  }

  private prune(now: number): void {
    for (const [k, e] of this.last) if (now - e.at >= this.intervalMs) this.last.delete(k);
    // Still full: forget the oldest (Map keeps insertion order, and take() re-inserts on every logged event).
    while (this.last.size >= this.maxKeys) this.last.delete(this.last.keys().next().value!);
  }
}
