/**
 * Waiting on run state: the run loop waits until a predicate over its state
 * holds (all results in, enough workers) or a deadline passes; every change
 * of that state calls notify() so waiters re-check at once instead of polling.
 */
export class Conditions {
  private readonly waiters = new Set<() => void>();

  constructor(private readonly signal: AbortSignal) {}

  /** Re-check every pending wait (call after any change a predicate may depend on). */
  notify(): void {
    for (const f of [...this.waiters]) f();
  }

  /** Resolves true once pred() holds, false at the deadline; rejects with the abort reason when the run is stopped. */
  waitFor(pred: () => boolean, deadline: number): Promise<boolean> {
    return new Promise<boolean>((resolve, reject) => {
      const check = (): void => {
        if (this.signal.aborted) finish(() => reject(this.signal.reason as Error));
        else if (pred()) finish(() => resolve(true));
        else if (Date.now() >= deadline) finish(() => resolve(false));
      };
      const timer = setTimeout(check, Math.max(0, deadline - Date.now()) + 5);
      const finish = (f: () => void): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
        f();
      };
      this.waiters.add(check);
      check();
    });
  }
}
