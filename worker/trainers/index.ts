/**
 * Trainer backends by name: 'onnx' (the built-in ONNX Runtime trainer, default),
 * 'exec' (runs a local training command per task: exec.ts) and 'noop' (no
 * model math: for transport tests and benchmarks).
 *
 * Fault injection for tests: `faultByzantine` wraps the backend in a
 * ByzantineTrainer (byzantine.ts), which corrupts every update it sends.
 */
import type { Trainer, TrainerFactoryOptions } from './trainer.ts';
import { ByzantineTrainer, type ByzantineOptions } from './byzantine.ts';
import type { ExecTrainerOptions } from './exec.ts';

export const TRAINER_BACKENDS = ['onnx', 'exec', 'noop'] as const;

/** Settings of the exec backend (fedtune worker --exec CMD ...). */
export interface TrainerBackendOptions {
  exec?: ExecTrainerOptions;
}

/** Faults a worker can be told to inject (fedtune worker --fault-byzantine). */
export interface TrainerFaults {
  faultByzantine?: ByzantineOptions;
}

export async function createTrainer(backend: string, opts: TrainerFactoryOptions & TrainerFaults & TrainerBackendOptions): Promise<Trainer> {
  const trainer = await createBackend(backend, opts);
  return opts.faultByzantine ? new ByzantineTrainer(trainer, opts.faultByzantine) : trainer;
}

async function createBackend(backend: string, opts: TrainerFactoryOptions & TrainerBackendOptions): Promise<Trainer> {
  switch (backend) {
    case 'exec': {
      const { createExecTrainer } = await import('./exec.ts');
      return createExecTrainer(opts);
    }
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
