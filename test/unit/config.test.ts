import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { strategyIssues } from '../../coordinator/strategies/index.ts';
import { describe, expect, it, onTestFinished } from 'vitest';
import { loadRunConfig, parseHostPort, parseRunConfig, RunConfigError } from '../../common/config.ts';

const base = () => ({ name: 'demo', model: { path: 'm' }, training: { steps: 3 }, rounds: 2, server: { join_token: 'tok' } });

function issues(raw: unknown): string[] {
  try {
    parseRunConfig(raw, 'run.yaml');
  } catch (err) {
    expect(err).toBeInstanceOf(RunConfigError);
    expect((err as Error).message).toMatch(/^run config run.yaml is invalid:/);
    return (err as RunConfigError).issues;
  }
  throw new Error('expected the config to be rejected');
}

describe('run config', () => {
  it('fills defaults for everything optional', () => {
    const c = parseRunConfig(base());
    expect(c.mode).toBe('federated');
    expect(c.strategy).toEqual({ name: 'fedavg' });
    expect(c.weighting).toEqual({ mode: 'examples', max_examples: null });
    expect(c.defence).toEqual({ max_abs: 1e4, max_norm: null, norm_factor: null });
    expect(c.lora).toEqual({
      r: 8, alpha: 16, dropout: 0, target_modules: ['q_proj', 'v_proj'],
      use_rslora: false, use_dora: false, rank_pattern: {}, alpha_pattern: {}, layers_to_transform: null, layers_pattern: null,
    });
    expect(c.server.listen).toBe('127.0.0.1:7070');
    expect(c.server.chunk_bytes).toBe(1 << 20);
    expect(c.dashboard).toEqual({ enabled: true, host: '127.0.0.1', port: 8080, token: null, tls: null, behind_tls_proxy: false, allowed_origins: [] });
    expect(c.events).toEqual({ ring_size: 10000, log: true, nats: null });
    expect(c.cohort.min_workers).toBe(1);
  });

  it('names the field and the allowed values for a bad enum', () => {
    expect(issues({ ...base(), training: { steps: 3, schedule: 'step' } })).toEqual([
      'training.schedule: must be one of constant, linear, cosine (got "step")',
    ]);
  });

  // The two scopes: their default (what distributed mode does), the other value kept in federated mode and refused
  // in distributed mode, anything else refused by name.
  const scopes = [
    { field: 'schedule_scope', dflt: 'run', other: 'round', values: 'run, round',
      distributed: "'round' applies to federated runs; distributed mode runs the schedule once over all its steps: remove it" },
    { field: 'optimizer_scope', dflt: 'round', other: 'run', values: 'round, run',
      distributed: "'run' applies to federated runs; in distributed mode the coordinator's optimizer (sync-sgd) or each worker's inner one (local-sgd) already runs over the whole run: remove it" },
  ] as const;
  for (const sc of scopes) {
    it(`training.${sc.field}: '${sc.dflt}' by default, '${sc.other}' kept, anything else refused by name; '${sc.other}' refused in distributed mode`, () => {
      const training = (v: string) => ({ steps: 3, [sc.field]: v });
      expect(parseRunConfig(base()).training[sc.field]).toBe(sc.dflt);
      expect(parseRunConfig({ ...base(), training: training(sc.other) }).training[sc.field]).toBe(sc.other);
      expect(issues({ ...base(), training: training('epoch') })).toEqual([`training.${sc.field}: must be one of ${sc.values} (got "epoch")`]);
      const dist = { ...base(), mode: 'distributed', distributed: { dataset: 'd.jsonl' } };
      expect(parseRunConfig(dist).training[sc.field]).toBe(sc.dflt);
      expect(issues({ ...dist, training: training(sc.other) })).toEqual([`training.${sc.field}: ${sc.distributed}`]);
    });
  }

  it('names nested fields, ranges, types, missing and unknown fields', () => {
    const got = issues({
      ...base(),
      lora: { r: 0, target_modules: [] },
      rounds: 'three',
      cohort: { fraction: 1.5 },
      server: { join_token: 'tok', listen: 'localhost', tls_cert: 'x' },
      model: {},
    });
    expect(got).toContain('lora.r: must be >=1 (got 0)');
    expect(got).toContain('lora.target_modules: must have >=1 items (got [])');
    expect(got).toContain('rounds: must be a number (got "three")');
    expect(got).toContain('cohort.fraction: must be <=1 (got 1.5)');
    expect(got).toContain('model.path: is required (string)');
    expect(got.some((i) => /^server\.listen: must be HOST:PORT/.test(i))).toBe(true);
    expect(got.find((i) => i.startsWith('server.tls_cert'))).toMatch(/unknown field \(allowed: listen, join_token, tls, /);
  });

  it('accepts the documented example config', async () => {
    const c = await loadRunConfig(join(import.meta.dirname, '..', '..', 'examples', 'federated.yaml'), {});
    expect(c.mode).toBe('federated');
    expect(c.events.nats).toBeNull();
  });

  it('checks the NATS event settings', () => {
    const ok = parseRunConfig({ ...base(), events: { nats: { url: 'nats://127.0.0.1:4222', stream: 'RUNS', max_age_sec: 3600 } } });
    expect(ok.events.nats).toEqual({ url: 'nats://127.0.0.1:4222', stream: 'RUNS', max_age_sec: 3600 });
    const got = issues({ ...base(), events: { nats: { stream: 'RUNS', max_msgs: 0, password: 'x' } } });
    expect(got).toContain('events.nats.url: is required (string)');
    expect(got).toContain('events.nats.max_msgs: must be >=1 (got 0)');
    expect(got.find((i) => i.startsWith('events.nats.password'))).toMatch(/unknown field \(allowed: url, stream, subject_root, /);
  });

  it('requires exactly one of training.steps and training.epochs', () => {
    expect(issues({ ...base(), training: {} })).toEqual(['training.steps: set exactly one of steps or epochs (got neither)']);
    expect(issues({ ...base(), training: { steps: 1, epochs: 1 } })).toEqual(['training.epochs: set exactly one of steps or epochs (got both)']);
  });

  it('checks fields against each other', () => {
    expect(issues({ ...base(), cohort: { min_workers: 2 }, round: { min_results: 3 } })[0]).toMatch(/^round\.min_results: must not exceed cohort\.min_workers \(2\)/);
  });

  it('loads YAML with line numbers in errors, JSON, and applies overrides', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fedtune-config-'));
    onTestFinished(() => rmSync(dir, { recursive: true, force: true }));
    const y = join(dir, 'run.yaml');
    writeFileSync(y, 'name: demo\nmodel:\n  path: m\ntraining:\n  steps: 3\nrounds: 2\nstrategy: fedsgd\nserver:\n  join_token: t\n');
    await expect(loadRunConfig(y, {}, strategyIssues)).rejects.toThrow(/strategy \(line 7\): must be one of fedavg, fedavgm, fedadam, fedyogi, fedprox, .* \(got "fedsgd"\)/);
    writeFileSync(y, 'name: demo\nmodel:\n  path: m\ntraining:\n  steps: 3\nrounds: 2\nstrategy:\n  name: fedprox\n  mu: -1\nserver:\n  join_token: t\n');
    await expect(loadRunConfig(y, {}, strategyIssues)).rejects.toThrow(/strategy\.mu \(line 9\): must be >0 \(got -1\)/);
    const j = join(dir, 'run.json');
    writeFileSync(j, JSON.stringify({ ...base(), server: undefined }));
    const c = await loadRunConfig(j, { joinToken: 'from-cli', listen: '0.0.0.0:0', checkpointDir: '/ck' });
    expect(c.server.join_token).toBe('from-cli');
    expect(c.server.listen).toBe('0.0.0.0:0');
    expect(c.checkpoint.dir).toBe('/ck');
    writeFileSync(j, '{"name": ');
    await expect(loadRunConfig(j)).rejects.toThrow(/run config .*run\.json: not valid JSON/);
    await expect(loadRunConfig(join(dir, 'run.toml'))).rejects.toThrow(/cannot read it \(ENOENT\)/);
    writeFileSync(join(dir, 'run.toml'), 'x');
    await expect(loadRunConfig(join(dir, 'run.toml'))).rejects.toThrow(/unknown file type ".toml" \(allowed: .yaml, .yml, .json\)/);
  });

  it('parses HOST:PORT', () => {
    expect(parseHostPort('127.0.0.1:7070')).toEqual({ host: '127.0.0.1', port: 7070 });
    expect(parseHostPort('[::1]:0')).toEqual({ host: '::1', port: 0 });
    expect(() => parseHostPort('host', '--coordinator')).toThrow(/--coordinator: must be HOST:PORT/);
    expect(() => parseHostPort('h:70000')).toThrow(/port 0-65535/);
  });

  it('resolves relative paths in a config file against its directory; absolute paths, defaults and command-line overrides are kept', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'fedtune-config-paths-'));
    onTestFinished(() => rmSync(dir, { recursive: true, force: true }));
    mkdirSync(join(dir, 'sub'));
    const y = join(dir, 'sub', 'run.yaml');
    writeFileSync(
      y,
      [
        'name: demo',
        'model:',
        '  path: models/base',
        'training:',
        '  steps: 3',
        'rounds: 2',
        'checkpoint:',
        '  dir: ../ck',
        'distributed:',
        '  dataset: ./data/train.jsonl',
        '  worker_dataset_path: data/train.jsonl',
        'server:',
        '  join_token: t',
        '  tls:',
        '    cert: tls/cert.pem',
        '    key: /etc/fedtune/key.pem',
        '',
      ].join('\n'),
    );
    // The process's working directory is the repository root, not the config's directory.
    expect(process.cwd()).not.toBe(join(dir, 'sub'));
    const c = await loadRunConfig(y);
    expect(c.model.path).toBe(join(dir, 'sub', 'models', 'base'));
    expect(c.checkpoint.dir).toBe(join(dir, 'ck'));
    expect(c.distributed.dataset).toBe(join(dir, 'sub', 'data', 'train.jsonl'));
    expect(c.distributed.worker_dataset_path).toBe('data/train.jsonl');
    expect(c.server.tls).toEqual({ cert: join(dir, 'sub', 'tls', 'cert.pem'), key: '/etc/fedtune/key.pem', client_ca: null });

    const over = await loadRunConfig(y, { checkpointDir: 'from-cli/ck' });
    expect(over.checkpoint.dir).toBe('from-cli/ck');
    const j = join(dir, 'sub', 'run.json');
    writeFileSync(j, JSON.stringify(base()));
    const d = await loadRunConfig(j);
    expect(d.model.path).toBe(join(dir, 'sub', 'm'));
    expect(d.checkpoint.dir).toBe('checkpoints');
  });
});
