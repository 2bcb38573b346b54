import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { BUILD_INFO_FILE, DIST_DIR, sourceHash } from '../../dashboard/build-info.ts';

// dashboard/dist is committed so that `npm ci && npm run demo` serves the app with no build step.
describe('committed dashboard build', () => {
  it('is up to date with the dashboard sources', () => {
    const infoPath = join(DIST_DIR, BUILD_INFO_FILE);
    expect(existsSync(infoPath), `${infoPath} is missing: run "npm run build:dashboard" and commit dashboard/dist`).toBe(true);
    const info = JSON.parse(readFileSync(infoPath, 'utf8')) as { sourceHash: string };
    expect(info.sourceHash, 'dashboard/dist is stale: run "npm run build:dashboard" and commit dashboard/dist').toBe(sourceHash());
    const html = readFileSync(join(DIST_DIR, 'index.html'), 'utf8');
    for (const asset of ['assets/app.js', 'assets/index.css']) {
      expect(html).toContain(asset);
      expect(existsSync(join(DIST_DIR, asset)), asset).toBe(true);
    }
    // Works offline: no reference to any other host.
    expect(html).not.toMatch(/(src|href)="(https?:)?\/\//);
  });
});
