/** Checks of numeric options given in code (constructors, factories). */

/** `v` when it is an integer >= 1, `dflt` when undefined; otherwise an error naming `where` and the option. */
export function positiveIntOption(where: string, name: string, v: number | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  if (!Number.isInteger(v) || v < 1) throw new Error(`${where}: option ${name} must be a positive integer, got ${String(v)}`);
  return v;
}
