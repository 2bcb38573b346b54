/** Parsers for numeric command-line options: each error names the option, the allowed range and what was given. */
import { InvalidArgumentError } from 'commander';

/** An integer in [min, max] written with digits only. */
export function intArg(name: string, min = 0, max = Number.MAX_SAFE_INTEGER): (v: string) => number {
  return (v: string) => {
    const n = Number(v);
    if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || n < min || n > max) {
      const range = max === Number.MAX_SAFE_INTEGER ? `>= ${min}` : `in [${min}, ${max}]`;
      throw new InvalidArgumentError(`${name} must be an integer ${range} (got "${v}")`);
    }
    return n;
  };
}

/** A finite number, optionally >= min and < below. */
export function numArg(name: string, min = -Infinity, below = Infinity): (v: string) => number {
  return (v: string) => {
    const n = Number(v);
    if (v.trim() === '' || !Number.isFinite(n) || n < min || n >= below) {
      const range = min === -Infinity && below === Infinity ? '' : ` in [${min}, ${below})`;
      throw new InvalidArgumentError(`${name} must be a number${range} (got "${v}")`);
    }
    return n;
  };
}
