import { describe, expect, it } from 'vitest';
import { parseRunConfig, RunConfigError } from '../../common/config.ts';

const base = { name: 'd', model: { path: 'm' }, training: { steps: 3 }, server: { join_token: 't' } };

function issues(raw: unknown): string[] {
  try {
    parseRunConfig(raw);
  } catch (err) {
    if (err instanceof RunConfigError) return err.issues;
    throw err;
  }
  return [];
}

describe('run config: mode distributed', () => {
  it('fills the distributed defaults and needs no rounds', () => {
    const c = parseRunConfig({ ...base, mode: 'distributed', distributed: { dataset: 'data.jsonl' } });
    expect(c.mode).toBe('distributed');
    expect(c.distributed).toEqual({
      dataset: 'data.jsonl',
      shared_storage: false,
      worker_dataset_path: null,
      sharding: { kind: 'iid', seed: null },
      sync_every: 1,
      outer_optimizer: { kind: 'nesterov', lr: 0.7, momentum: 0.9 },
      step_deadline_sec: 120,
      max_step_retries: 5,
      checkpoint_every: 100,
    });
  });

  it('names what is wrong', () => {
    expect(issues({ ...base, mode: 'distributed' })).toEqual([
      'distributed.dataset: is required in distributed mode (the JSON / JSONL dataset file the coordinator shards across workers)',
    ]);
    expect(issues({ ...base })).toEqual(['rounds: is required in federated mode (an integer >= 1)']);
    expect(issues({ ...base, mode: 'distributed', distributed: { dataset: 'x', sync_every: 0, outer_optimizer: { kind: 'adam' } } })).toEqual([
      'distributed.sync_every: must be >=1 (got 0)',
      'distributed.outer_optimizer.kind: must be one of average, nesterov (got "adam")',
    ]);
    expect(issues({ ...base, mode: 'distributed', distributed: { dataset: 'x', worker_dataset_path: '/shared/x' } })).toEqual([
      'distributed.worker_dataset_path: only applies with distributed.shared_storage: true',
    ]);
    expect(issues({ ...base, mode: 'distributed', distributed: { dataset: 'x', shard: 'iid' } })[0]).toMatch(/^distributed.shard: unknown field \(allowed: dataset, shared_storage/);
    expect(issues({ ...base, mode: 'swarm' })[0]).toBe('mode: must be one of federated, distributed (got "swarm")');
  });
});
