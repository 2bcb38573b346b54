import { describe, expect, it } from 'vitest';
import { formatAge, formatBytes, formatCount, formatDuration, formatMetric } from '../../dashboard/src/format.ts';

describe('dashboard number formats', () => {
  it('formats bytes in decimal units', () => {
    expect(formatBytes(0)).toBe('0 B');
    expect(formatBytes(999)).toBe('999 B');
    expect(formatBytes(1234)).toBe('1.2 KB');
    expect(formatBytes(1_200_000_000)).toBe('1.2 GB');
    expect(formatBytes(345_600_000)).toBe('346 MB');
    expect(formatBytes(Number.NaN)).toBe('–');
  });
  it('formats durations the way people read them', () => {
    expect(formatDuration(950)).toBe('950ms');
    expect(formatDuration(4200)).toBe('4.2s');
    expect(formatDuration(42_000)).toBe('42s');
    expect(formatDuration(200_000)).toBe('3m 20s');
    expect(formatDuration(2 * 3600_000 + 5 * 60_000)).toBe('2h 05m');
    expect(formatDuration(3 * 86400_000 + 4 * 3600_000)).toBe('3d 4h');
    expect(formatDuration(-5)).toBe('0ms');
  });
  it('formats counts, metrics and ages', () => {
    expect(formatCount(999)).toBe('999');
    expect(formatCount(1234)).toBe('1.23k');
    expect(formatCount(34_500)).toBe('34.5k');
    expect(formatCount(1_200_000)).toBe('1.20M');
    expect(formatMetric(null)).toBe('–');
    expect(formatMetric(1.234567)).toBe('1.235');
    expect(formatAge(10_000, 10_500)).toBe('just now');
    expect(formatAge(0, 200_000)).toBe('3m 20s ago');
  });
});
