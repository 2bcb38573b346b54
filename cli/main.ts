/**
 * `fedtune` command line. Each command group lives in its own module under cli/
 * and registers itself on the program here.
 */
import { Command } from 'commander';
import * as modelCli from './model.ts';
import * as adapterCli from './adapter.ts';
import * as trainCli from './train.ts';
import * as coordinatorCli from './coordinator.ts';
import * as workerCli from './worker.ts';
import * as demoCli from './demo.ts';
import * as dashboardCli from './dashboard.ts';
import * as certsCli from './certs.ts';
import * as tokensCli from './tokens.ts';
import * as privacyCli from './privacy.ts';
import * as generateCli from './generate.ts';

const program = new Command();
program
  .name('fedtune')
  .description('Distributed and federated LoRA fine-tuning: coordinator, workers, dashboard')
  .version('0.1.0')
  .showHelpAfterError();

// Command modules: each exports register(program).
const modules = [modelCli, adapterCli, trainCli, coordinatorCli, workerCli, demoCli, dashboardCli, certsCli, tokensCli, privacyCli, generateCli] as Array<{ register(p: Command): void }>;
for (const m of modules) m.register(program);

try {
  await program.parseAsync(process.argv);
} catch (err) {
  console.error(`fedtune: ${err instanceof Error ? err.message : String(err)}`);
  // Exit now: a command that failed half-way may still hold a timer or a socket (a progress bar,
  // a connection) that would keep the process alive after its error. The command has cleaned up
  // what it owns by the time its error gets here, and stderr is written synchronously.
  process.exit(1);
}
