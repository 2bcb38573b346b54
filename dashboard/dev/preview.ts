/**
 * Look at the dashboard without a real run: a MemoryBus, the dashboard server
 * and synthetic runs publishing realistic events, one after another.
 *
 *   node bin/run-ts.js dashboard/dev/preview.ts [--port 8080] [--mode federated|distributed]
 */
import { parseArgs } from 'node:util';
import { MemoryBus } from '../../coordinator/events/memory.ts';
import { startDashboardServer } from '../../coordinator/http/server.ts';
import { runSynthetic } from './synthetic-run.ts';

const { values } = parseArgs({
  options: { port: { type: 'string', default: '8080' }, mode: { type: 'string', default: 'federated' }, token: { type: 'string' } },
});
const mode = values.mode === 'distributed' ? 'distributed' : 'federated';
const bus = new MemoryBus();
const srv = await startDashboardServer({ bus, port: Number(values.port), token: values.token });
console.log(`fedtune dashboard preview: ${srv.openUrl}`);
const stop = new AbortController();
process.on('SIGINT', () => stop.abort());
for (let i = 1; !stop.signal.aborted; i++) {
  await runSynthetic(bus, { runId: `preview-${i}`, name: `preview run ${i}`, mode, rounds: 20, workers: 4, stepsPerRound: 10, stepMs: 300, signal: stop.signal, seed: i });
}
await srv.close();
await bus.close();
