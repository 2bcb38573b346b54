/** Numbers for people: 1.2 GB, 3m 20s, 12.3k tok/s. */

const BYTE_UNITS = ['B', 'KB', 'MB', 'GB', 'TB', 'PB'];

/** Decimal units (1 KB = 1000 B), as disks and networks count. */
export function formatBytes(n: number): string {
  if (!Number.isFinite(n)) return '–';
  const sign = n < 0 ? '-' : '';
  let v = Math.abs(n);
  let i = 0;
  while (v >= 1000 && i < BYTE_UNITS.length - 1) {
    v /= 1000;
    i++;
  }
  const digits = i === 0 || v >= 100 ? 0 : 1;
  return `${sign}${v.toFixed(digits)} ${BYTE_UNITS[i]}`;
}

/** 950ms, 4.2s, 3m 20s, 2h 05m, 3d 4h. */
export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms)) return '–';
  if (ms < 0) ms = 0;
  if (ms < 1000) return `${Math.round(ms)}ms`;
  const s = ms / 1000;
  if (s < 10) return `${s.toFixed(1)}s`;
  if (s < 60) return `${Math.round(s)}s`;
  const total = Math.round(s);
  const d = Math.floor(total / 86400);
  const h = Math.floor((total % 86400) / 3600);
  const m = Math.floor((total % 3600) / 60);
  const sec = total % 60;
  if (d > 0) return `${d}d ${h}h`;
  if (h > 0) return `${h}h ${String(m).padStart(2, '0')}m`;
  return `${m}m ${String(sec).padStart(2, '0')}s`;
}

/** 999, 1.2k, 34.5k, 1.2M. */
export function formatCount(n: number): string {
  if (!Number.isFinite(n)) return '–';
  const a = Math.abs(n);
  if (a < 1000) return Number.isInteger(n) ? String(n) : n.toFixed(1);
  if (a < 1e6) return `${(n / 1e3).toFixed(a < 1e4 ? 2 : 1)}k`;
  if (a < 1e9) return `${(n / 1e6).toFixed(a < 1e7 ? 2 : 1)}M`;
  return `${(n / 1e9).toFixed(2)}G`;
}

/** A loss or accuracy: 4 significant digits, '–' when missing. */
export function formatMetric(v: number | null | undefined): string {
  if (v === null || v === undefined || !Number.isFinite(v)) return '–';
  return v.toPrecision(4);
}

/** Privacy spent as the header shows it: "ε 1.234 (δ 0.00001)"; unbounded when a noise multiplier is 0. */
export function formatEpsilon(p: { epsilon: number | null; delta: number }): string {
  return `ε ${p.epsilon === null ? 'unbounded' : p.epsilon.toPrecision(4)} (δ ${p.delta})`;
}

/** Age of a timestamp: "just now", "12s ago", "3m 20s ago". */
export function formatAge(then: number, now: number): string {
  const ms = now - then;
  if (ms < 1500) return 'just now';
  return `${formatDuration(ms)} ago`;
}

/** Wall-clock time of day, local: 14:03:27. */
export function formatClock(t: number): string {
  const d = new Date(t);
  return [d.getHours(), d.getMinutes(), d.getSeconds()].map((x) => String(x).padStart(2, '0')).join(':');
}
