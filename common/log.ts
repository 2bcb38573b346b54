/**
 * Structured logging for every fedtune process (pino). Logs go to stderr so that
 * stdout stays free for progress output and command results.
 * FEDTUNE_LOG_LEVEL sets the level (default info; "silent" in tests).
 */
import { pino, type Logger } from 'pino';

export type { Logger };

const level = process.env.FEDTUNE_LOG_LEVEL ?? (process.env.VITEST ? 'silent' : 'info');

export const rootLogger: Logger = pino(
  { level, base: undefined, timestamp: pino.stdTimeFunctions.isoTime },
  pino.destination({ fd: 2, sync: true }),
);

export function logger(component: string): Logger {
  return rootLogger.child({ component });
}
