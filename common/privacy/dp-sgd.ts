/**
 * Sample-level DP-SGD (Abadi et al. 2016) as the workers run it: Poisson
 * sampling of each step's batch, per-example clipping (in the training graph,
 * worker/engine), Gaussian noise on the sum of clipped gradients and Opacus'
 * normalisation by the expected batch size q * N.
 *
 * The coordinator's privacy ledger counts the steps of a task with
 * dpSgdSteps; the worker takes exactly that many.
 */
import { createHash, randomFillSync } from 'node:crypto';
import { createRng, type Rng } from '../random.ts';
import { addGaussianNoise, cryptoNormals, type NormalSource } from './noise.ts';

export interface DpSgdParams {
  /** C: per-example L2 clip norm. */
  maxGradNorm: number;
  /** sigma: the noise std is sigma * C. */
  noiseMultiplier: number;
  /** q: Poisson sampling probability. */
  sampleRate: number;
}

/** Validates the three numbers; the error names the privacy.dp_sgd field. */
export function checkDpSgd(p: DpSgdParams): void {
  if (!(p.maxGradNorm > 0) || !Number.isFinite(p.maxGradNorm)) {
    throw new Error(`privacy.dp_sgd.max_grad_norm is ${p.maxGradNorm}, expected a finite number > 0`);
  }
  if (!(p.noiseMultiplier >= 0) || !Number.isFinite(p.noiseMultiplier)) {
    throw new Error(`privacy.dp_sgd.noise_multiplier is ${p.noiseMultiplier}, expected a finite number >= 0`);
  }
  if (!(p.sampleRate > 0 && p.sampleRate <= 1)) {
    throw new Error(`privacy.dp_sgd.sample_rate is ${p.sampleRate}, expected a number in (0, 1]`);
  }
}

/**
 * DP-SGD steps of one local training task: training.steps when set, else
 * epochs * round(1/q) (one epoch is 1/q Poisson batches in expectation).
 */
export function dpSgdSteps(training: { steps: number | null; epochs: number | null }, sampleRate: number): number {
  if (!(sampleRate > 0 && sampleRate <= 1)) throw new Error(`privacy.dp_sgd.sample_rate is ${sampleRate}, expected a number in (0, 1]`);
  if (training.steps !== null) return training.steps;
  const epochs = training.epochs ?? 1;
  return Math.max(1, Math.round(epochs * Math.round(1 / sampleRate)));
}

/**
 * Seed of the Poisson sampler for one task: a hash of (training.seed, round, site),
 * so the same task samples the same batches and different sites or rounds differ.
 */
export function dpSgdSamplingSeed(seed: number, round: number, site: string): number {
  const h = createHash('sha256').update(`dp-sgd-sampling\0${seed}\0${round}\0${site}`).digest();
  return h.readUInt32LE(0) + 4294967296 * (h.readUInt32LE(4) & 0x1fffff);
}

/** Poisson sampling: each of the n indices joins the batch independently with probability q. */
export function poissonSample(n: number, q: number, rng: Rng): number[] {
  const out: number[] = [];
  for (let i = 0; i < n; i++) if (rng.next() < q) out.push(i);
  return out;
}

/**
 * A Poisson sampler whose draws come from the OS CSPRNG: what a site uses, because
 * privacy amplification by sampling holds only if nobody else can predict the batches
 * (a seed the coordinator knows, or a 32-bit generator state, would let it).
 */
export function secretPoissonSampler(n: number, q: number): () => number[] {
  const words = new Uint32Array(Math.max(1, n));
  const rng: Rng = {
    next: () => 0,
    normal: () => {
      throw new Error('secretPoissonSampler draws uniforms only');
    },
    int: () => {
      throw new Error('secretPoissonSampler draws uniforms only');
    },
  };
  return () => {
    randomFillSync(words);
    let i = 0;
    rng.next = () => words[i++]! / 4294967296;
    return poissonSample(n, q, rng);
  };
}

/** A seeded (reproducible, predictable) Poisson sampler over n records that draws one batch per call: for tests and benches, never for a site's privacy. */
export function poissonSampler(n: number, q: number, seed: number): () => number[] {
  const rng = createRng(seed);
  return () => poissonSample(n, q, rng);
}

/**
 * The step's gradient from the sum of clipped per-example gradients, in place:
 * (sum + N(0, (sigma C)^2 I)) / (q N), N the number of training records.
 */
export function noisyClippedMean(
  sums: ReadonlyArray<Float32Array | Float64Array>,
  p: DpSgdParams,
  numRecords: number,
  normals: NormalSource = cryptoNormals,
): void {
  checkDpSgd(p);
  if (!(numRecords > 0)) throw new Error(`DP-SGD needs at least one training record (got ${numRecords})`);
  const std = p.noiseMultiplier * p.maxGradNorm;
  const scale = 1 / (p.sampleRate * numRecords);
  for (const s of sums) {
    addGaussianNoise(s, std, normals);
    for (let i = 0; i < s.length; i++) s[i] = s[i]! * scale;
  }
}
