/**
 * Trainer backends by name: 'onnx' (the built-in ONNX Runtime trainer, default)
 * and 'noop' (no model math: for transport tests and benchmarks).
 */
import type { Trainer, TrainerFactoryOptions } from './trainer.ts';

export const TRAINER_BACKENDS = ['onnx', 'noop'] as const;

export async function createTrainer(backend: string, opts: TrainerFactoryOptions): Promise<Trainer> {
  switch (backend) {
    case 'noop': {
      const { createNoopTrainer } = await import('./noop.ts');
      return createNoopTrainer(opts);
    }
    case 'onnx': {
      const { createOnnxTrainer } = (await import('./onnx.ts')) as {
        createOnnxTrainer(o: TrainerFactoryOptions): Promise<Trainer>;
      };
      return createOnnxTrainer(opts);
    }
    default:
      throw new Error(`trainer backend "${backend}" is not known (allowed: ${TRAINER_BACKENDS.join(', ')})`);
  }
}
