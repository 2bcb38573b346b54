/**
 * Crash points for fault-injection tests: with FEDTUNE_FAULT_POINT=name@n in
 * the environment, the process kills itself (SIGKILL: no cleanup, as a power
 * cut or the OOM killer would) the moment it reaches point `name` for round or
 * step n. Unset, a fault point costs one property read.
 *
 * Secure aggregation's points (worker/secagg-site.ts), n = the round:
 * `secagg.after-share-keys` (the site's shares were delivered; it dies before
 * its masked input) and `secagg.after-masked-input` (its masked input was
 * acknowledged; it dies before unmasking).
 */
export function faultPoint(name: string, n: number): void {
  const want = process.env.FEDTUNE_FAULT_POINT;
  if (want === undefined || want !== `${name}@${n}`) return;
  process.kill(process.pid, 'SIGKILL');
}
