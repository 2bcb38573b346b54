/**
 * Builds the dashboard into dashboard/dist (committed; see docs/dashboard.md):
 *   npm run build:dashboard
 * Asset names carry no content hash so a rebuild changes only what changed;
 * the server sends Cache-Control: no-cache with ETags instead.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { defineConfig, type Plugin } from 'vite';
import { BUILD_INFO_FILE, DASHBOARD_DIR, DIST_DIR, sourceHash } from './build-info.ts';

function buildInfo(): Plugin {
  return {
    name: 'fedtune-build-info',
    apply: 'build',
    closeBundle() {
      writeFileSync(join(DIST_DIR, BUILD_INFO_FILE), JSON.stringify({ sourceHash: sourceHash() }, null, 2) + '\n');
    },
  };
}

export default defineConfig({
  root: DASHBOARD_DIR,
  base: './',
  publicDir: false,
  logLevel: 'warn',
  server: { fs: { allow: [join(DASHBOARD_DIR, '..')] } },
  build: {
    outDir: DIST_DIR,
    emptyOutDir: true,
    target: 'es2022',
    reportCompressedSize: false,
    rollupOptions: {
      output: {
        entryFileNames: 'assets/app.js',
        chunkFileNames: 'assets/[name].js',
        assetFileNames: 'assets/[name][extname]',
      },
    },
  },
  plugins: [buildInfo()],
});
