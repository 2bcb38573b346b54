/**
 * Bench (b)'s downloading side, in its own process as a worker is: registers with the
 * coordinator at argv[2], downloads global adapter version 0 argv[4] times over the
 * transport argv[3] ('bulk' or 'grpc'), and prints the milliseconds of each download
 * (request to checked bytes) as one JSON line.
 */
import { CoordinatorConnection } from '../worker/agent.ts';

const [address, mode, n] = process.argv.slice(2);
const conn = new CoordinatorConnection(address!, null, { bulk: mode === 'bulk' });
await conn.register({
  joinToken: 'bench',
  site: `reader-${mode}`,
  previousWorkerId: '',
  capabilities: { device: 'cpu', memoryBytes: 0, backends: [], modelFingerprint: '', numTrainExamples: 0, numEvalExamples: 0, client: 'bench', protocolVersion: 1 },
});
if ((mode === 'bulk') !== conn.transport.startsWith('bulk ')) throw new Error(`transfer-client: asked for ${mode}, got ${conn.transport}`);
const ms: number[] = [];
let reuse: Uint8Array | null = null;
for (let i = 0; i < Number(n); i++) {
  const t0 = performance.now();
  // As a worker does from its second round on: the new version is read into the last one's memory.
  const got = await conn.downloadAdapter(0, 4 << 20, 0, reuse);
  ms.push(performance.now() - t0);
  reuse = got.buffer;
}
conn.close();
console.log(JSON.stringify({ ms }));
