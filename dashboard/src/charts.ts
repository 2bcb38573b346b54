/**
 * The dashboard's charts, drawn with uPlot. Each chart is a function from the
 * run view to uPlot series + aligned data; the Chart wrapper creates the plot
 * when it first has data, resizes it with its card, and recreates it only
 * when the set of series changes (a new worker, say).
 */
import uPlot from 'uplot';
import 'uplot/dist/uPlot.min.css';
import { formatBytes, formatDuration, formatMetric } from './format.ts';
import type { RunView } from './model.ts';

const PALETTE = ['#2f6fde', '#e8772e', '#1f9d55', '#9b51e0', '#d2372d', '#0f9bb5', '#b8860b', '#e0529c', '#5d6b82', '#6ab04c'];
export const color = (i: number): string => PALETTE[i % PALETTE.length]!;

interface Built {
  /** Identity of the series set; the plot is recreated when it changes. */
  key: string;
  series: uPlot.Series[];
  data: uPlot.AlignedData;
  axes?: uPlot.Axis[];
  scales?: uPlot.Scales;
}

export interface ChartSpec {
  id: string;
  title: string;
  /** Which runs show it. */
  modes: Array<'federated' | 'distributed'>;
  build(v: RunView): Built | undefined;
}

const bytesAxis = (): uPlot.Axis => ({ values: (_u, vals) => vals.map((v) => formatBytes(v)), size: 70 });
const secondsAxis = (): uPlot.Axis => ({ values: (_u, vals) => vals.map((v) => formatDuration(v * 1000)), size: 60 });
const roundAxis = (label = 'round'): uPlot.Axis => ({ label, labelSize: 18, values: (_u, vals) => vals.map((v) => (Number.isInteger(v) ? String(v) : '')) });
const line = (label: string, i: number, extra: Partial<uPlot.Series> = {}): uPlot.Series => ({
  label, stroke: color(i), width: 2, points: { show: true, size: 5 }, spanGaps: true, value: (_u, v) => formatMetric(v), ...extra,
});

function bars(label: string, i: number, size: number, align: -1 | 0 | 1, value: uPlot.Series['value']): uPlot.Series {
  const builder = uPlot.paths.bars!({ size: [size, 60], align });
  return { label, stroke: color(i), fill: `${color(i)}cc`, width: 1, paths: builder, points: { show: false }, value };
}

export const CHARTS: ChartSpec[] = [
  {
    id: 'loss',
    title: 'Global loss per round',
    modes: ['federated'],
    build(v) {
      if (v.rounds.length === 0) return undefined;
      return {
        key: 'loss',
        series: [{ label: 'round' }, line('train loss', 0), line('eval loss', 1, { dash: [6, 4] })],
        data: [v.rounds.map((r) => r.round), v.rounds.map((r) => r.trainLoss), v.rounds.map((r) => r.evalLoss)],
        axes: [roundAxis(), {}],
      };
    },
  },
  {
    id: 'accuracy',
    title: 'Eval accuracy per round',
    modes: ['federated'],
    build(v) {
      if (!v.rounds.some((r) => r.evalAccuracy !== null)) return undefined;
      return {
        key: 'acc',
        series: [{ label: 'round' }, line('eval accuracy', 2, { value: (_u, x) => (x === null ? '–' : `${(x * 100).toFixed(1)}%`) })],
        data: [v.rounds.map((r) => r.round), v.rounds.map((r) => r.evalAccuracy)],
        axes: [roundAxis(), { values: (_u, vals) => vals.map((x) => `${Math.round(x * 100)}%`) }],
        // Accuracy lives in [0, 1]: a fixed scale keeps a flat series (all 0 or all 1) readable.
        scales: { y: { range: () => [0, 1] } },
      };
    },
  },
  {
    id: 'epsilon',
    title: 'Privacy spent (epsilon) per round',
    modes: ['federated'],
    build(v) {
      const rs = v.rounds.filter((r) => r.privacy !== null);
      if (rs.length === 0) return undefined;
      const client = rs.some((r) => r.privacy!.client);
      const sample = rs.some((r) => r.privacy!.sample);
      const series: uPlot.Series[] = [{ label: 'round' }];
      const data: Array<Array<number | null>> = [rs.map((r) => r.round)];
      if (client) {
        series.push(line('client-level (DP-FedAvg)', 3));
        data.push(rs.map((r) => r.privacy!.client?.epsilon ?? null));
      }
      if (sample) {
        series.push(line('sample-level (DP-SGD, worst site)', 4, { dash: [6, 4] }));
        data.push(rs.map((r) => r.privacy!.sample?.epsilon ?? null));
      }
      return {
        key: `eps-${client}-${sample}`,
        series,
        data: data as uPlot.AlignedData,
        axes: [roundAxis(), {}],
        scales: { y: { range: (_u, _lo, hi) => [0, hi * 1.1 || 1] } },
      };
    },
  },
  {
    id: 'worker-loss',
    title: 'Step loss per worker',
    modes: ['federated'],
    build(v) {
      const curves = [...v.curves.values()].filter((c) => c.x.length > 0);
      if (curves.length === 0) return undefined;
      const data = uPlot.join(curves.map((c) => [c.x, c.y] as uPlot.AlignedData));
      return {
        key: curves.map((c) => c.workerId).join('|'),
        series: [{ label: 'round' }, ...curves.map((c, i) => line(c.site, i, { width: 1.5, points: { show: false } }))],
        data,
        axes: [roundAxis(), {}],
      };
    },
  },
  {
    id: 'round-time',
    title: 'Round time: dispatch / train / upload / aggregate',
    modes: ['federated'],
    build(v) {
      if (v.rounds.length === 0) return undefined;
      return stackedTimes(
        'round',
        v.rounds.map((r) => r.round),
        ['dispatch', 'train', 'upload', 'aggregate'],
        [v.rounds.map((r) => r.phases.dispatchMs), v.rounds.map((r) => r.phases.trainMs), v.rounds.map((r) => r.phases.uploadMs), v.rounds.map((r) => r.phases.aggregateMs)],
      );
    },
  },
  {
    id: 'step-time',
    title: 'Step time: compute / communicate / aggregate',
    modes: ['distributed'],
    build(v) {
      if (v.steps.length === 0) return undefined;
      return stackedTimes(
        'step',
        v.steps.map((s) => s.step),
        ['compute', 'communicate', 'aggregate'],
        [v.steps.map((s) => s.computeMs), v.steps.map((s) => s.communicateMs), v.steps.map((s) => s.aggregateMs)],
      );
    },
  },
  {
    id: 'bytes',
    title: 'Bytes moved per round',
    modes: ['federated'],
    build(v) {
      if (v.rounds.length === 0) return undefined;
      const fmt = (_u: uPlot, x: number | null): string => (x === null ? '–' : formatBytes(x));
      return {
        key: 'bytes',
        series: [{ label: 'round' }, bars('up (to coordinator)', 0, 0.35, -1, fmt), bars('down (to workers)', 1, 0.35, 1, fmt)],
        data: [v.rounds.map((r) => r.round), v.rounds.map((r) => r.bytesUp), v.rounds.map((r) => r.bytesDown)],
        axes: [roundAxis(), bytesAxis()],
        scales: { x: { time: false, range: (_u, lo, hi) => [lo - 0.5, hi + 0.5] }, y: { range: (_u, _lo, hi) => [0, hi * 1.1 || 1] } },
      };
    },
  },
  {
    id: 'step-loss',
    title: 'Loss per step',
    modes: ['distributed'],
    build(v) {
      if (v.steps.length === 0) return undefined;
      return {
        key: 'sloss',
        series: [{ label: 'step' }, line('loss', 0, { points: { show: false } })],
        data: [v.steps.map((s) => s.step), v.steps.map((s) => s.loss)],
        axes: [roundAxis('step'), {}],
      };
    },
  },
  {
    id: 'tokens',
    title: 'Tokens per second',
    modes: ['distributed'],
    build(v) {
      if (v.steps.length === 0) return undefined;
      return {
        key: 'tps',
        series: [{ label: 'step' }, line('tokens/s', 2, { points: { show: false }, value: (_u, x) => (x === null ? '–' : Math.round(x).toLocaleString()) })],
        data: [v.steps.map((s) => s.step), v.steps.map((s) => s.tokensPerSec)],
        axes: [roundAxis('step'), { size: 60 }],
      };
    },
  },
];

/** Stacked bars of time phases (milliseconds) per round or step: each band drawn from 0 to its cumulative top, tallest first. */
function stackedTimes(xLabel: string, xs: number[], names: string[], phasesMs: number[][]): Built {
  const raw = phasesMs.map((p) => p.map((ms) => ms / 1000));
  const cum = raw.map((_, k) => xs.map((_x, i) => raw.slice(0, k + 1).reduce((a, arr) => a + arr[i]!, 0)));
  const order = raw.map((_, k) => raw.length - 1 - k);
  return {
    key: `time-${xLabel}`,
    series: [
      { label: xLabel },
      ...order.map((k) => bars(names[k]!, k + 4, 0.7, 0, (_u, _val, _si, idx) => (idx === null ? '–' : formatDuration(raw[k]![idx]! * 1000)))),
    ],
    data: [xs, ...order.map((k) => cum[k]!)],
    axes: [roundAxis(xLabel), secondsAxis()],
    scales: { x: { time: false, range: (_u, lo, hi) => [lo - 0.5, hi + 0.5] } },
  };
}

export class Chart {
  readonly card: HTMLElement;
  private readonly box: HTMLElement;
  private plot: uPlot | undefined;
  private key = '';
  private readonly resize: ResizeObserver;

  constructor(readonly spec: ChartSpec, parent: HTMLElement) {
    this.card = document.createElement('section');
    this.card.className = 'card chart';
    this.card.dataset.chart = spec.id;
    const h = document.createElement('h2');
    h.textContent = spec.title;
    this.box = document.createElement('div');
    this.box.className = 'chart-box';
    this.box.innerHTML = '<div class="chart-empty">No data yet</div>';
    this.card.append(h, this.box);
    parent.append(this.card);
    this.resize = new ResizeObserver(() => this.plot?.setSize(this.size()));
    this.resize.observe(this.box);
  }

  private size(): { width: number; height: number } {
    return { width: Math.max(200, this.box.clientWidth), height: 200 };
  }

  /** Number of points drawn in the first data series (for tests and the empty state). */
  points(): number {
    return this.plot ? (this.plot.data[0]?.length ?? 0) : 0;
  }

  update(v: RunView): void {
    const b = this.spec.build(v);
    if (!b) return;
    if (this.plot && b.key === this.key) {
      this.plot.setData(b.data);
      this.card.dataset.points = String(this.points());
      return;
    }
    this.plot?.destroy();
    this.box.innerHTML = '';
    this.key = b.key;
    this.plot = new uPlot(
      {
        ...this.size(),
        series: b.series,
        axes: b.axes,
        scales: { x: { time: false }, ...b.scales },
        legend: { live: false },
        cursor: { drag: { x: false, y: false } },
      },
      b.data,
      this.box,
    );
    this.card.dataset.points = String(this.points());
  }

  destroy(): void {
    this.resize.disconnect();
    this.plot?.destroy();
    this.card.remove();
  }
}
