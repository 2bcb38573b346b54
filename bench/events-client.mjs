// Bench helper (worker thread): N WebSocket clients that subscribe to one run and time
// each event from its creation stamp (taskId, epoch ms with sub-ms precision) to receipt.
// Plain JS so the worker thread needs no TypeScript loader.
import { parentPort, workerData } from 'node:worker_threads';
import WebSocket from 'ws';

const { url, clients: n, runId } = workerData;
const now = () => performance.timeOrigin + performance.now();
let expected = 0; // events per client in the current phase
let firstSeq = 0;
let latencies = [];
let done = 0;
let resyncs = 0;
const state = [];

function finishIfDone() {
  if (expected > 0 && done === n) {
    parentPort.postMessage({ type: 'done', end: now(), latencies, resyncs });
    expected = 0;
  }
}

for (let i = 0; i < n; i++) {
  const ws = new WebSocket(url);
  const s = { ws, last: 0, got: 0, ready: false };
  state.push(s);
  ws.on('open', () => ws.send(JSON.stringify({ type: 'subscribe', runId, afterSeq: 0 })));
  ws.on('message', (data) => {
    const m = JSON.parse(data.toString());
    if (m.type === 'resync') {
      resyncs++;
      ws.send(JSON.stringify({ type: 'subscribe', runId, afterSeq: s.last }));
      return;
    }
    if (m.type !== 'event') return;
    const e = m.event;
    if (e.seq <= s.last) return;
    s.last = e.seq;
    if (!s.ready) {
      s.ready = true;
      if (state.every((x) => x.ready) && state.length === n) parentPort.postMessage({ type: 'ready' });
      return;
    }
    if (expected === 0 || e.seq < firstSeq) return;
    if (e.type === 'worker.progress') latencies.push(now() - Number(e.taskId));
    if (++s.got === expected) {
      done++;
      finishIfDone();
    }
  });
}

parentPort.on('message', (m) => {
  if (m.type === 'phase') {
    expected = m.events;
    firstSeq = m.firstSeq;
    latencies = [];
    done = 0;
    resyncs = 0;
    for (const s of state) s.got = 0;
    parentPort.postMessage({ type: 'phase-ready' });
  } else if (m.type === 'close') {
    for (const s of state) s.ws.terminate();
    parentPort.close();
  }
});
