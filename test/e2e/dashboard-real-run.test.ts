/**
 * The dashboard during a real federated run: an in-process coordinator with its
 * dashboard server, two `fedtune worker` processes training with the ONNX
 * trainer over loopback gRPC, and Debian's Chromium watching the page.
 */
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium, type Browser, type Page } from 'playwright-core';
import { afterAll, describe, expect, it } from 'vitest';
import { MemoryBus } from '../../coordinator/events/memory.ts';
import { startDashboardServer } from '../../coordinator/http/server.ts';
import { startCoordinator, type CoordinatorHandle } from '../../coordinator/main.ts';
import { runConfig, tempDir, tinyModel, worker, writeData, type Proc } from '../integration/federated-helpers.ts';

const CHROMIUM = '/usr/bin/chromium';
const haveChromium = existsSync(CHROMIUM);
if (!haveChromium && process.env.CI) throw new Error(`${CHROMIUM} is missing: CI must install it (apt-get install -y chromium)`);
if (!haveChromium) console.log(`skipping the real-run dashboard test: ${CHROMIUM} not installed (apt-get install -y chromium)`);

const procs: Proc[] = [];
let coord: CoordinatorHandle | null = null;
let browser: Browser | null = null;
afterAll(async () => {
  for (const p of procs) p.kill();
  await coord?.close();
  await browser?.close();
});

const lossPoints = async (page: Page): Promise<number> => Number((await page.locator('[data-chart="loss"]').getAttribute('data-points')) ?? '0');

describe.skipIf(!haveChromium)('dashboard during a real run', () => {
  it('shows the worker processes and gains loss points as rounds complete', async () => {
    const dir = tempDir('e2e-real');
    const model = await tinyModel(join(dir, 'model'));
    const rounds = 4;
    const cfg = runConfig(dir, model, {
      name: 'e2e-real',
      rounds,
      lora: { r: 4, alpha: 8, target_modules: ['q_proj', 'v_proj'] },
      training: { steps: 20, batch_size: 4, lr: 0.02, max_seq_len: 128, template: 'plain' },
      cohort: { min_workers: 2 },
      round: { min_results: 2, deadline_sec: 120 },
      eval: { every: 1, initial: true },
    });
    const bus = new MemoryBus({ logDir: join(dir, 'events') });
    const dash = await startDashboardServer({ bus, port: 0 });
    browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'] });
    const page = await browser.newPage({ viewport: { width: 1366, height: 900 } });
    const pageErrors: string[] = [];
    page.on('pageerror', (e) => pageErrors.push(e.message));
    try {
      coord = await startCoordinator(cfg, { bus });
      await page.goto(dash.openUrl);
      for (const site of ['clinic-north', 'clinic-south']) {
        procs.push(worker({ address: coord.address, site, data: writeData(join(dir, `${site}.jsonl`), 24, site), model, trainer: 'onnx', extra: ['--threads', '1'] }));
      }
      // The workers table fills with the two sites as they register.
      await page.locator('#workers tbody tr[data-worker]').nth(1).waitFor({ timeout: 60_000 });
      const sites = await page.locator('#workers tbody tr[data-worker] td:first-child').allTextContents();
      expect(sites.sort()).toEqual(['clinic-north', 'clinic-south']);
      await expect.poll(() => page.locator('#run-name').textContent(), { timeout: 20_000 }).toBe('e2e-real');

      // The loss chart gains points while the run goes on, one per completed round.
      await expect.poll(() => lossPoints(page), { timeout: 90_000 }).toBeGreaterThanOrEqual(1);
      const early = await lossPoints(page);
      expect(early).toBeLessThan(rounds);
      await expect.poll(() => lossPoints(page), { timeout: 90_000 }).toBeGreaterThan(early);
      const result = await coord.run;
      expect(result.state).toBe('completed');
      await expect.poll(() => lossPoints(page), { timeout: 20_000 }).toBe(rounds);
      await expect.poll(() => page.locator('#run-state').textContent(), { timeout: 20_000 }).toBe('completed');
      expect(await page.locator('#run-round').textContent()).toBe(`${rounds} of ${rounds}`);
      mkdirSync(join(process.cwd(), 'test-output'), { recursive: true });
      await page.screenshot({ path: join(process.cwd(), 'test-output', 'dashboard-real-run.png'), fullPage: true });
      expect(pageErrors).toEqual([]);
      expect(await Promise.all(procs.map((p) => p.exited))).toEqual([0, 0]);
    } finally {
      await page.close();
      await dash.close();
      await bus.close();
    }
  });
});
