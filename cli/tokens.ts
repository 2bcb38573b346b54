/**
 * `fedtune tokens issue|list|revoke`: per-site join tokens with expiry in the
 * file server.join_tokens names. The file holds SHA-256 hashes only; a new
 * token is printed once, on stdout, and kept nowhere else.
 */
import { Command } from 'commander';
import { newToken, parseExpiry, readTokenFile, writeTokenFile } from '../coordinator/identity.ts';

export function register(program: Command): void {
  const tokens = program.command('tokens').description('per-site join tokens with expiry (server.join_tokens)');

  tokens
    .command('issue')
    .description('add a join token for a site and print it once')
    .argument('<site>', "site name (the worker's --name)")
    .requiredOption('--file <file>', 'token file (server.join_tokens); created if missing, mode 0600')
    .option('--expires <when>', 'expiry: a duration (30m, 12h, 7d) or an ISO 8601 date', '7d')
    .action(async (site: string, o: { file: string; expires: string }) => {
      const f = await readTokenFile(o.file);
      const { token, record } = newToken(site, parseExpiry(o.expires));
      f.tokens.push(record);
      await writeTokenFile(o.file, f);
      // stderr for the explanation, stdout for the token alone (so that it can be piped into a secret store).
      console.error(`join token ${record.id} for site ${site}, expires ${record.expires_at}; it is shown once: give it to the site (worker --token, or FEDTUNE_JOIN_TOKEN)`);
      console.log(token);
    });

  tokens
    .command('list')
    .description('tokens in the file (ids, sites, expiry; never the tokens)')
    .requiredOption('--file <file>', 'token file (server.join_tokens)')
    .action(async (o: { file: string }) => {
      const f = await readTokenFile(o.file);
      const now = Date.now();
      for (const t of f.tokens) console.log(`${t.id}  ${t.site.padEnd(24)} expires ${t.expires_at}${Date.parse(t.expires_at) <= now ? ' (expired)' : ''}`);
      if (f.tokens.length === 0) console.log(`no tokens in ${o.file}`);
    });

  tokens
    .command('revoke')
    .description('remove a token (by id) or every token of a site; the coordinator re-reads the file at the next registration')
    .argument('<site-or-id>', 'site name, or a token id')
    .requiredOption('--file <file>', 'token file (server.join_tokens)')
    .action(async (which: string, o: { file: string }) => {
      const f = await readTokenFile(o.file);
      const keep = f.tokens.filter((t) => t.id !== which && t.site !== which);
      const removed = f.tokens.length - keep.length;
      if (removed === 0) throw new Error(`no token with id or site "${which}" in ${o.file} (fedtune tokens list --file ${o.file})`);
      await writeTokenFile(o.file, { version: 1, tokens: keep });
      console.log(`removed ${removed} token(s) of ${which}`);
    });
}
