/**
 * fedtune dashboard: one page, one selected run. Everything shown is folded
 * from run events (model.ts); the WebSocket (live.ts) streams them and resumes
 * after reconnects. Rendering is throttled to a few frames a second.
 */
import './style.css';
import type { RunEvent } from '../../common/events.ts';
import { Chart, CHARTS } from './charts.ts';
import { describeEvent, eventKind, eventLevel } from './describe.ts';
import { formatAge, formatBytes, formatClock, formatCount, formatDuration, formatEpsilon, formatMetric } from './format.ts';
import { Live } from './live.ts';
import { etaMs, elapsedMs, isTerminal, RunView, type RunHeader, type WorkerRow } from './model.ts';

const $ = <T extends HTMLElement = HTMLElement>(id: string): T => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`dashboard: element #${id} missing from index.html`);
  return el as T;
};

// ---- token and endpoints ----
const params = new URLSearchParams(location.search);
const token = params.get('token') ?? undefined;
const base = new URL('.', location.href);
const wsUrl = new URL('ws', base);
wsUrl.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
if (token) wsUrl.searchParams.set('token', token);
const authHeaders: Record<string, string> = token ? { Authorization: `Bearer ${token}` } : {};

// ---- state ----
const views = new Map<string, RunView>();
let headers: RunHeader[] = [];
let selected: string | undefined = decodeURIComponent(location.hash.match(/run=([^&]+)/)?.[1] ?? '') || undefined;
let charts: Chart[] = [];
let chartsFor = '';
let dirty = true;

const view = (runId: string): RunView => {
  let v = views.get(runId);
  if (!v) views.set(runId, (v = new RunView(runId)));
  return v;
};

const live = new Live(wsUrl.toString(), {
  lastSeq: (runId) => views.get(runId)?.header.lastSeq ?? 0,
  onEvent(e: RunEvent) {
    if (view(e.runId).apply(e)) dirty = true;
  },
  onRuns(runs) {
    mergeHeaders(runs);
  },
  onState(state, detail) {
    $('conn').dataset.state = state;
    $('conn-text').textContent = detail;
  },
  onError(message) {
    console.warn(`fedtune dashboard: ${message}`);
  },
});

function mergeHeaders(runs: RunHeader[]): void {
  headers = runs;
  if (!selected || !runs.some((r) => r.runId === selected)) {
    // Prefer a running run, then the most recently active one.
    const pick = [...runs].sort((a, b) => Number(b.state === 'running') - Number(a.state === 'running') || b.lastEventAt - a.lastEventAt)[0];
    if (pick) select(pick.runId);
  }
  dirty = true;
}

function select(runId: string): void {
  if (selected && selected !== runId) live.unsubscribe(selected);
  selected = runId;
  history.replaceState(null, '', `#run=${encodeURIComponent(runId)}`);
  view(runId);
  live.subscribe(runId);
  dirty = true;
}

window.addEventListener('hashchange', () => {
  const id = decodeURIComponent(location.hash.match(/run=([^&]+)/)?.[1] ?? '');
  if (id && id !== selected) select(id);
});

// The run list also refreshes over HTTP, for runs this page is not subscribed to.
async function refreshRuns(): Promise<void> {
  try {
    const res = await fetch(new URL('api/runs', base), { headers: authHeaders });
    if (res.ok) mergeHeaders(((await res.json()) as { runs: RunHeader[] }).runs);
  } catch {
    // offline: the WebSocket state already says so
  }
}
void refreshRuns();
setInterval(() => void refreshRuns(), 5000);

// ---- rendering ----
function renderRunList(): void {
  const nav = $('runs');
  const list = headers.map((h) => (h.runId === selected ? (views.get(h.runId)?.header ?? h) : h));
  nav.hidden = list.length < 2;
  nav.replaceChildren(
    ...list.map((h) => {
      const a = document.createElement('a');
      a.href = `#run=${encodeURIComponent(h.runId)}`;
      a.dataset.state = h.state;
      a.setAttribute('aria-current', String(h.runId === selected));
      a.title = `${h.runId}: ${h.state}`;
      const dot = document.createElement('span');
      dot.className = 'dot';
      a.append(dot, h.name || h.runId);
      return a;
    }),
  );
}

function renderHeader(v: RunView, now: number): void {
  const h = v.header;
  const distributed = h.mode === 'distributed';
  $('run-name').textContent = h.name;
  const state = $('run-state');
  state.textContent = h.state;
  state.dataset.state = h.state;
  $('run-mode').textContent = h.mode;
  $('run-strategy').textContent = h.strategy || '–';
  $('run-strategy').hidden = !h.strategy;
  const bus = $('run-bus');
  bus.hidden = h.busDegraded === null;
  bus.textContent = h.busDegraded ? `event bus degraded (${h.busDegraded.backend})` : '';
  bus.title = h.busDegraded ? `${h.busDegraded.message}; ${h.busDegraded.buffered} events buffered, republished in order when it returns` : '';
  $('run-unit').textContent = distributed ? 'Step' : 'Round';
  const done = distributed ? h.step : h.round;
  const total = distributed ? h.totalSteps : h.totalRounds;
  $('run-round').textContent = total > 0 ? `${done} of ${total}` : String(done);
  $('run-progress-bar').style.width = total > 0 ? `${Math.min(100, (100 * done) / total)}%` : '0';
  $('run-elapsed').textContent = h.startedAt ? formatDuration(elapsedMs(h, now)) : '–';
  const eta = etaMs(h, now);
  $('run-eta').textContent = isTerminal(h.state) ? 'done' : eta === undefined ? '–' : formatDuration(eta);
  $('run-workers').textContent = String(h.workers);
  $('run-train-loss').textContent = formatMetric(h.lastTrainLoss);
  $('run-eval-loss').textContent = formatMetric(h.lastEvalLoss);
  $('run-privacy').hidden = h.privacy === null;
  $('run-epsilon').textContent = h.privacy ? formatEpsilon(h.privacy) : '–';
  const msg = $('run-message');
  msg.hidden = !h.message;
  msg.textContent = h.message ?? '';
  msg.classList.toggle('bad', h.state === 'failed');
}

function cell(text: string, cls = ''): HTMLTableCellElement {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function statusKind(w: WorkerRow): string {
  if (w.status.startsWith('left')) return 'gone';
  if (['training', 'task sent', 'update sent', 'connected', 'idle'].includes(w.status)) return 'active';
  return 'other';
}

function renderWorkers(v: RunView, now: number): void {
  const body = $('workers').querySelector('tbody')!;
  const rows = [...v.workers.values()].sort((a, b) => a.site.localeCompare(b.site));
  if (rows.length === 0) {
    const tr = document.createElement('tr');
    const td = cell('No workers yet', 'muted');
    td.colSpan = 11;
    tr.append(td);
    body.replaceChildren(tr);
    return;
  }
  body.replaceChildren(
    ...rows.map((w) => {
      const tr = document.createElement('tr');
      tr.dataset.worker = w.workerId;
      const status = cell(w.status);
      const dot = document.createElement('span');
      dot.className = 'status';
      dot.dataset.kind = statusKind(w);
      status.prepend(dot);
      const ageMs = now - w.lastSeen;
      const site = cell(w.site);
      site.title = w.workerId;
      const errors = cell(String(w.errors), w.errors > 0 ? 'num bad' : 'num');
      if (w.lastError) errors.title = w.lastError;
      tr.append(
        site,
        cell(w.device || '–'),
        status,
        cell(formatAge(w.lastSeen, now), ageMs > 30_000 && statusKind(w) !== 'gone' && !isTerminal(v.header.state) ? 'num stale' : 'num'),
        cell(w.totalSteps > 0 ? `${w.step}/${w.totalSteps}` : String(w.step), 'num'),
        cell(formatMetric(w.loss), 'num'),
        cell(w.tokensPerSec > 0 ? formatCount(w.tokensPerSec) : '–', 'num'),
        cell(formatCount(w.examples), 'num'),
        cell(formatBytes(w.bytesUp), 'num'),
        cell(formatBytes(w.bytesDown), 'num'),
        errors,
      );
      return tr;
    }),
  );
}

function renderCharts(v: RunView): void {
  const mode = v.header.mode === 'distributed' ? 'distributed' : 'federated';
  const key = `${v.header.runId}:${mode}`;
  if (key !== chartsFor) {
    for (const c of charts) c.destroy();
    const parent = $('charts');
    charts = CHARTS.filter((s) => s.modes.includes(mode)).map((s) => new Chart(s, parent));
    chartsFor = key;
  }
  for (const c of charts) c.update(v);
}

const LOG_ROWS = 400;
function renderLog(v: RunView): void {
  const text = ($('log-filter') as HTMLInputElement).value.trim().toLowerCase();
  const kind = ($('log-kind') as HTMLSelectElement).value;
  const rows: HTMLTableRowElement[] = [];
  let matched = 0;
  for (let i = v.log.length - 1; i >= 0; i--) {
    const e = v.log[i]!;
    if (kind && eventKind(e) !== kind) continue;
    const line = describeEvent(e);
    if (text && !line.toLowerCase().includes(text) && !e.type.includes(text)) continue;
    matched++;
    if (rows.length >= LOG_ROWS) continue;
    const tr = document.createElement('tr');
    tr.dataset.level = eventLevel(e);
    const tag = document.createElement('span');
    tag.className = 'type-tag';
    tag.textContent = e.type;
    const typeCell = cell('', 'type');
    typeCell.append(tag);
    tr.append(cell(formatClock(e.time), 'time'), cell(`#${e.seq}`, 'seq'), typeCell, cell(line, 'text'));
    rows.push(tr);
  }
  $('log').querySelector('tbody')!.replaceChildren(...rows);
  $('log-count').textContent = matched > LOG_ROWS ? `newest ${LOG_ROWS} of ${matched}` : `${matched} events`;
}

function render(): void {
  const now = Date.now();
  renderRunList();
  const v = selected ? views.get(selected) : undefined;
  $('empty').hidden = v !== undefined;
  $('run').hidden = v === undefined;
  if (!v) return;
  renderHeader(v, now);
  renderWorkers(v, now);
  if (dirty) {
    renderCharts(v);
    renderLog(v);
  }
  dirty = false;
}

$('log-filter').addEventListener('input', () => ((dirty = true), render()));
$('log-kind').addEventListener('change', () => ((dirty = true), render()));

// Events can arrive by the thousand (history); draw at most 4 times a second,
// and once a second anyway so ages and elapsed time tick.
let last = 0;
function frame(t: number): void {
  if ((dirty && t - last > 250) || t - last > 1000) {
    last = t;
    render();
  }
  requestAnimationFrame(frame);
}
requestAnimationFrame(frame);
