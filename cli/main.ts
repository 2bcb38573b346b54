/**
 * `fedtune` command line. Each command group lives in its own module under cli/
 * and registers itself on the program here.
 */
import { Command } from 'commander';

const program = new Command();
program
  .name('fedtune')
  .description('Distributed and federated LoRA fine-tuning: coordinator, workers, dashboard')
  .version('0.1.0')
  .showHelpAfterError();

// Command modules: each exports register(program).
const modules = [] as Array<{ register(p: Command): void }>;
for (const m of modules) m.register(program);

try {
  await program.parseAsync(process.argv);
} catch (err) {
  console.error(`fedtune: ${err instanceof Error ? err.message : String(err)}`);
  process.exitCode = 1;
}
