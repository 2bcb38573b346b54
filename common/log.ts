/**
 * Structured logging for every fedtune process (pino). Logs go to stderr so that
 * stdout stays free for progress output and command results.
 *   FEDTUNE_LOG_LEVEL  trace | debug | info (default) | warn | error | silent (default under vitest)
 *   FEDTUNE_LOG_FORMAT pretty (default: one readable line per record) | json (one JSON object per line)
 */
import { pino, type Logger } from 'pino';
import pretty from 'pino-pretty';

export type { Logger };

const level = process.env.FEDTUNE_LOG_LEVEL ?? (process.env.VITEST ? 'silent' : 'info');
const json = process.env.FEDTUNE_LOG_FORMAT === 'json';

export const rootLogger: Logger = pino(
  { level, base: undefined, timestamp: pino.stdTimeFunctions.isoTime },
  json
    ? pino.destination({ fd: 2, sync: true })
    : pretty({ destination: 2, sync: true, colorize: process.stderr.isTTY === true, translateTime: 'HH:MM:ss', ignore: 'pid,hostname', singleLine: true }),
);

export function logger(component: string): Logger {
  return rootLogger.child({ component });
}
