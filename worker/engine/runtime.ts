/**
 * ONNX Runtime sessions: created from graph bytes with the configured thread
 * count and execution provider. CUDA is requested when asked for; when its
 * provider cannot be loaded the session falls back to CPU and says so once.
 */
import { existsSync, readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import * as ort from 'onnxruntime-node';
import { logger } from '../../common/log.ts';

const log = logger('runtime');

export type Device = 'cpu' | 'cuda';

export interface RuntimeOptions {
  /** Intra-op threads (0 or undefined: ONNX Runtime's default, one per core). */
  threads?: number;
  device?: Device;
  /**
   * Graph optimization level. 'all' fuses ops into kernels some of which exist
   * only for float32, so float64 graphs (gradient checks) use 'basic'.
   */
  optimization?: 'basic' | 'all';
  /**
   * ONNX Runtime's memory pattern (default on): from the second run on, one
   * block sized for the whole run's intermediates, allocated next to the arena
   * the first run filled, so a training step's activations are held twice.
   * Off: the arena alone (measured: same speed with recompute, about 1.6x less
   * memory on a training step; bench/activation-memory.ts).
   */
  memPattern?: boolean;
  /**
   * The folder of the files the graph's external initializers name (Graph.externalInitializer):
   * ONNX Runtime maps their bytes from there (a graph loaded from bytes has no folder of its own).
   */
  externalDataDir?: string;
}

export interface RuntimeSession {
  session: ort.InferenceSession;
  /** Where the session actually runs: 'cpu' or 'cuda'. */
  device: Device;
}

let cudaFallbackLogged = false;

function fallBackToCpu(reason: string): void {
  if (cudaFallbackLogged) return;
  cudaFallbackLogged = true;
  log.warn(
    { reason },
    'CUDA execution provider unavailable; running on CPU (install onnxruntime-node with its CUDA provider to use the GPU, see README)',
  );
}

/**
 * Whether onnxruntime-node's CUDA provider library is installed next to its
 * native binding (its install script puts it there on machines with internet).
 * Checking first keeps ONNX Runtime from printing its own load error.
 */
export function cudaProviderInstalled(): boolean {
  try {
    const pkg = dirname(createRequire(import.meta.url).resolve('onnxruntime-node/package.json'));
    const base = join(pkg, 'bin');
    for (const napi of readdirSync(base)) {
      if (existsSync(join(base, napi, process.platform, process.arch, 'libonnxruntime_providers_cuda.so'))) return true;
    }
  } catch {
    // no bin directory: no provider
  }
  return false;
}

export async function createSession(bytes: Uint8Array, opts: RuntimeOptions = {}): Promise<RuntimeSession> {
  const base: ort.InferenceSession.SessionOptions = {
    graphOptimizationLevel: opts.optimization ?? 'all',
    executionMode: 'sequential',
    enableCpuMemArena: true,
    enableMemPattern: opts.memPattern ?? true,
    ...(opts.threads && opts.threads > 0 ? { intraOpNumThreads: opts.threads, interOpNumThreads: 1 } : {}),
    ...(opts.externalDataDir ? { extra: { session: { model_external_initializers_file_folder_path: opts.externalDataDir } } } : {}),
  };
  if (opts.device === 'cuda') {
    if (!cudaProviderInstalled()) {
      fallBackToCpu('libonnxruntime_providers_cuda.so is not installed in onnxruntime-node');
    } else {
      try {
        const session = await ort.InferenceSession.create(bytes, { ...base, executionProviders: ['cuda'] });
        return { session, device: 'cuda' };
      } catch (err) {
        fallBackToCpu(err instanceof Error ? err.message.split('\n')[0]! : String(err));
      }
    }
  }
  const session = await ort.InferenceSession.create(bytes, { ...base, executionProviders: ['cpu'] });
  return { session, device: 'cpu' };
}

export { ort };
