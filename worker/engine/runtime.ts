/**
 * ONNX Runtime sessions: created from graph bytes with the configured thread
 * count and execution provider. CUDA is requested when asked for; when its
 * provider cannot be loaded the session falls back to CPU and says so once.
 */
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
}

export interface RuntimeSession {
  session: ort.InferenceSession;
  /** Where the session actually runs: 'cpu' or 'cuda'. */
  device: Device;
}

let cudaFallbackLogged = false;

export async function createSession(bytes: Uint8Array, opts: RuntimeOptions = {}): Promise<RuntimeSession> {
  const base: ort.InferenceSession.SessionOptions = {
    graphOptimizationLevel: opts.optimization ?? 'all',
    executionMode: 'sequential',
    enableCpuMemArena: true,
    enableMemPattern: true,
    ...(opts.threads && opts.threads > 0 ? { intraOpNumThreads: opts.threads, interOpNumThreads: 1 } : {}),
  };
  if (opts.device === 'cuda') {
    try {
      const session = await ort.InferenceSession.create(bytes, { ...base, executionProviders: ['cuda'] });
      return { session, device: 'cuda' };
    } catch (err) {
      if (!cudaFallbackLogged) {
        cudaFallbackLogged = true;
        log.warn(
          { reason: err instanceof Error ? err.message.split('\n')[0] : String(err) },
          'CUDA execution provider unavailable; running on CPU (install onnxruntime-node with its CUDA provider to use the GPU, see README)',
        );
      }
    }
  }
  const session = await ort.InferenceSession.create(bytes, { ...base, executionProviders: ['cpu'] });
  return { session, device: 'cpu' };
}

export { ort };
