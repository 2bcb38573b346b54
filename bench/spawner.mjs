/**
 * Starts processes for a benchmark that must not fork them itself. A process
 * that forks copies its page tables and leaves every page it holds
 * copy-on-write, so its next write to each page faults (16k faults per 64 MiB;
 * measured 0.18 s of system time per round in the coordinator of bench (c)).
 * A coordinator in production never starts its workers, so bench (c) starts
 * them through this small process, itself started before the coordinator holds
 * anything.
 *
 * stdin: one JSON line per process, {"args": [...], "env": {...}}, run as
 * `node ...args` with stdio ignored; stdout: one JSON line {"pid": n} each.
 * A line {"kill": true} kills every process started (SIGKILL); so does the end
 * of stdin (the benchmark exited), after which this process exits.
 */
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';

const children = new Set();
const killAll = () => {
  for (const c of children) c.kill('SIGKILL');
  children.clear();
};
const lines = createInterface({ input: process.stdin });
lines.on('line', (line) => {
  const msg = JSON.parse(line);
  if (msg.kill) {
    killAll();
    process.stdout.write(`${JSON.stringify({ killed: true })}\n`);
    return;
  }
  const child = spawn(process.execPath, msg.args, { stdio: 'ignore', env: msg.env });
  children.add(child);
  child.on('exit', () => children.delete(child));
  child.on('error', (err) => process.stdout.write(`${JSON.stringify({ error: err.message })}\n`));
  process.stdout.write(`${JSON.stringify({ pid: child.pid ?? null })}\n`);
});
lines.on('close', () => {
  killAll();
  process.exit(0);
});
