/**
 * `fedtune privacy epsilon`: plan a privacy budget with the run's accountant
 * (common/privacy/rdp.ts), as Opacus' compute_dp_sgd_privacy does: epsilon for a
 * sampling rate, noise multiplier and number of steps, or the noise multiplier
 * a target epsilon needs.
 */
import { Command } from 'commander';
import { DEFAULT_ORDERS, epsilonOf, noiseForEpsilon, type Conversion } from '../common/privacy/rdp.ts';

function num(flag: string, s: string | undefined, ok: (v: number) => boolean, what: string): number {
  const v = s === undefined ? NaN : Number(s);
  if (s === undefined || s.trim() === '' || !Number.isFinite(v) || !ok(v)) throw new Error(`${flag}: must be ${what} (got ${s === undefined ? 'nothing' : JSON.stringify(s)})`);
  return v;
}

interface EpsilonOptions {
  sampleRate?: string;
  noiseMultiplier?: string;
  targetEpsilon?: string;
  steps?: string;
  delta: string;
  orders?: string;
  conversion: string;
  json?: boolean;
}

export function register(program: Command): void {
  const privacy = program.command('privacy').description('differential privacy: plan a budget (docs/privacy.md)');
  privacy
    .command('epsilon')
    .description('epsilon of the sampled Gaussian mechanism over T steps (Renyi DP accountant), or the noise multiplier for a target epsilon')
    .option('--sample-rate <q>', 'probability that a record (DP-SGD) or a site (client DP) is in a step, in (0, 1]')
    .option('--noise-multiplier <sigma>', 'noise std / clip norm')
    .option('--target-epsilon <eps>', 'instead of --noise-multiplier: print the smallest noise multiplier that reaches this epsilon')
    .option('--steps <T>', 'number of steps (DP-SGD: local steps x rounds; client DP: rounds)')
    .option('--delta <delta>', 'delta of (epsilon, delta)', '1e-5')
    .option('--orders <list>', 'comma-separated Renyi orders > 1 (default: a grid from 1.01 to 1024)')
    .option('--conversion <kind>', 'RDP to (epsilon, delta): improved (Balle et al. 2020, as Opacus) or classic (Mironov 2017)', 'improved')
    .option('--json', 'print one JSON object')
    .action((o: EpsilonOptions) => {
      const q = num('--sample-rate', o.sampleRate, (v) => v > 0 && v <= 1, 'a number in (0, 1]');
      const steps = num('--steps', o.steps, (v) => Number.isInteger(v) && v >= 1, 'an integer >= 1');
      const delta = num('--delta', o.delta, (v) => v > 0 && v < 1, 'a number in (0, 1)');
      if (o.conversion !== 'improved' && o.conversion !== 'classic') throw new Error(`--conversion: must be improved or classic (got ${JSON.stringify(o.conversion)})`);
      const conversion = o.conversion as Conversion;
      const orders =
        o.orders === undefined
          ? DEFAULT_ORDERS
          : o.orders.split(',').map((s) => num('--orders', s, (v) => v > 1, 'a comma-separated list of numbers > 1'));
      if ((o.noiseMultiplier === undefined) === (o.targetEpsilon === undefined)) {
        throw new Error('give exactly one of --noise-multiplier (to get epsilon) or --target-epsilon (to get the noise multiplier)');
      }
      if (o.targetEpsilon !== undefined) {
        const target = num('--target-epsilon', o.targetEpsilon, (v) => v > 0, 'a number > 0');
        const sigma = noiseForEpsilon({ targetEpsilon: target, sampleRate: q, steps, delta, orders, conversion });
        const got = epsilonOf({ sampleRate: q, noiseMultiplier: sigma, steps, delta, orders, conversion });
        if (o.json) console.log(JSON.stringify({ noise_multiplier: sigma, epsilon: got.epsilon, order: got.order, sample_rate: q, steps, delta }));
        else console.log(`noise multiplier ${sigma.toPrecision(5)} gives epsilon ${got.epsilon.toPrecision(5)} (order ${got.order}) for sample rate ${q}, ${steps} steps, delta ${delta}`);
        return;
      }
      const sigma = num('--noise-multiplier', o.noiseMultiplier, (v) => v >= 0, 'a number >= 0');
      const r = epsilonOf({ sampleRate: q, noiseMultiplier: sigma, steps, delta, orders, conversion });
      if (o.json) console.log(JSON.stringify({ epsilon: Number.isFinite(r.epsilon) ? r.epsilon : null, order: r.order, sample_rate: q, noise_multiplier: sigma, steps, delta }));
      else console.log(`epsilon ${Number.isFinite(r.epsilon) ? r.epsilon.toPrecision(5) : 'infinite (no noise)'} (order ${r.order}) for sample rate ${q}, noise multiplier ${sigma}, ${steps} steps, delta ${delta}`);
    });
}
