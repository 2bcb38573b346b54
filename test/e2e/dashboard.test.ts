import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium, type Browser, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MemoryBus } from '../../coordinator/events/memory.ts';
import { startDashboardServer, type DashboardServer } from '../../coordinator/http/server.ts';
import { runSynthetic } from '../../dashboard/dev/synthetic-run.ts';

const CHROMIUM = '/usr/bin/chromium';
const haveChromium = existsSync(CHROMIUM);
if (!haveChromium && process.env.CI) throw new Error(`${CHROMIUM} is missing: CI must install it (apt-get install -y chromium)`);
if (!haveChromium) console.log(`skipping dashboard browser tests: ${CHROMIUM} not installed (apt-get install -y chromium)`);

const OUT = join(process.cwd(), 'test-output');

describe.skipIf(!haveChromium)('dashboard in a real browser', () => {
  let browser: Browser;
  beforeAll(async () => {
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
    });
  });
  afterAll(async () => {
    await browser?.close();
  });

  const lossPoints = async (page: Page): Promise<number> =>
    Number((await page.locator('[data-chart="loss"]').getAttribute('data-points')) ?? '0');

  it('fills the workers table and grows the loss chart as rounds complete, and resumes after a server restart', async () => {
    const bus = new MemoryBus();
    const token = 'e2e-token';
    let srv: DashboardServer = await startDashboardServer({ bus, port: 0, token });
    const page = await browser.newPage({ viewport: { width: 1366, height: 900 } });
    const pageErrors: string[] = [];
    page.on('pageerror', (e) => pageErrors.push(e.message));
    try {
      const run = runSynthetic(bus, { runId: 'e2e', name: 'e2e federated run', rounds: 6, workers: 3, stepsPerRound: 6, stepMs: 120 });
      await page.goto(srv.openUrl);

      // Workers table fills from worker.joined events.
      await page.locator('#workers tbody tr[data-worker]').nth(2).waitFor({ timeout: 20_000 });
      expect(await page.locator('#workers tbody tr[data-worker]').count()).toBe(3);
      await expect.poll(() => page.locator('#run-name').textContent(), { timeout: 20_000 }).toBe('e2e federated run');

      // The loss chart gains points as rounds complete.
      await expect.poll(() => lossPoints(page), { timeout: 30_000 }).toBeGreaterThanOrEqual(1);
      const early = await lossPoints(page);
      await expect.poll(() => lossPoints(page), { timeout: 30_000 }).toBeGreaterThan(early);
      await run;
      await expect.poll(() => lossPoints(page), { timeout: 20_000 }).toBe(6);
      await expect.poll(() => page.locator('#run-state').textContent(), { timeout: 20_000 }).toBe('completed');
      expect(await page.locator('#run-round').textContent()).toBe('6 of 6');
      const site = await page.locator('#workers tbody tr[data-worker] td').first().textContent();
      expect(site).toMatch(/^(hospital-a|hospital-b|lab-zurich)$/);
      expect(await page.locator('#workers tbody tr[data-worker]').first().locator('td').nth(8).textContent()).toMatch(/^\d+(\.\d)? MB$/);
      await expect.poll(() => page.locator('#log-count').textContent()).toBe(`${bus.lastSeq('e2e')} events`);
      mkdirSync(OUT, { recursive: true });
      await page.screenshot({ path: join(OUT, 'dashboard.png'), fullPage: true });

      // Coordinator (server) restart: the page reconnects with backoff and resumes from its
      // last seq, so it ends up with every event exactly once.
      const port = srv.port;
      await srv.close();
      await expect.poll(() => page.locator('#conn').getAttribute('data-state'), { timeout: 10_000 }).toBe('offline');
      bus.publish({ runId: 'e2e', type: 'log', level: 'warn', message: 'published while the dashboard was down' });
      srv = await startDashboardServer({ bus, port, token });
      await expect.poll(() => page.locator('#conn').getAttribute('data-state'), { timeout: 30_000 }).toBe('live');
      await expect.poll(() => page.locator('#log-count').textContent(), { timeout: 10_000 }).toBe(`${bus.lastSeq('e2e')} events`);
      await page.fill('#log-filter', 'while the dashboard was down');
      await expect.poll(() => page.locator('#log tbody tr').count()).toBe(1);
      expect(pageErrors).toEqual([]);
    } finally {
      await page.close();
      await srv.close();
      await bus.close();
    }
  });

  it('shows the privacy spent: epsilon in the header and a chart of epsilon by round', async () => {
    const bus = new MemoryBus();
    const srv = await startDashboardServer({ bus, port: 0, token: 'e2e-token' });
    const page = await browser.newPage({ viewport: { width: 1366, height: 900 } });
    const pageErrors: string[] = [];
    page.on('pageerror', (e) => pageErrors.push(e.message));
    try {
      const runId = 'e2e-dp';
      bus.publish({ runId, type: 'run.started', name: 'dp run', mode: 'federated', strategy: 'fedavg', totalRounds: 3, totalSteps: 0, config: {}, resumedFromRound: 0 });
      const round = (r: number, epsilon: number) =>
        bus.publish({
          runId, type: 'round.completed', round: r, globalVersion: r, participants: 2, examples: 8, trainLoss: 1 / r, evalLoss: null, evalAccuracy: null,
          durationMs: 100, phases: { dispatchMs: 10, trainMs: 80, uploadMs: 5, aggregateMs: 5 }, bytesUp: 1000, bytesDown: 1000,
          privacy: { epsilon, delta: 1e-5, client: { epsilon, clipNorm: 0.5, noiseMultiplier: 1.1, rounds: r } },
        });
      round(1, 0.8123);
      await page.goto(srv.openUrl);
      await expect.poll(() => page.locator('#run-epsilon').textContent(), { timeout: 20_000 }).toBe('ε 0.8123 (δ 0.00001)');
      expect(await page.locator('#run-privacy').isVisible()).toBe(true);
      round(2, 1.2345);
      await expect.poll(() => page.locator('#run-epsilon').textContent(), { timeout: 20_000 }).toBe('ε 1.234 (δ 0.00001)');
      await expect.poll(async () => Number((await page.locator('[data-chart="epsilon"]').getAttribute('data-points')) ?? '0'), { timeout: 20_000 }).toBe(2);
      expect(pageErrors).toEqual([]);
    } finally {
      await page.close();
      await srv.close();
      await bus.close();
    }
  });
});
