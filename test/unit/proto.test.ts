/**
 * The wire contract's encoding: oneof cases survive a round trip, field numbers
 * stay put, and a message carrying a case this build does not know (a future
 * phase such as secure aggregation) still decodes, with the case left empty.
 */
import { BinaryWriter } from '@bufbuild/protobuf/wire';
import { describe, expect, it } from 'vitest';
import { CoordinatorMessage, Task, UpdateKind, UploadMessage, WorkerMessage, WorkerStatus } from '../../proto/gen/fedtune/v1/coordinator.ts';
import { DType } from '../../proto/gen/fedtune/v1/tensors.ts';

describe('wire contract encoding', () => {
  it('round-trips a train task with its spec and adapter reference', () => {
    const task: Task = {
      taskId: 'r3-train-0-abcd',
      round: 3,
      deadlineUnixMs: 1_900_000_000_000,
      global: { version: 2, totalBytes: 4096, sha256: new Uint8Array(32).fill(7), rank: 0 },
      kind: {
        $case: 'train',
        value: {
          uploadKind: UpdateKind.UPDATE_KIND_ADAPTER_WEIGHTS,
          spec: {
            lora: {
              r: 8, alpha: 16, dropout: 0.05, targetModules: ['q_proj', 'v_proj'], useRslora: true, useDora: true,
              rankPattern: [{ key: 'v_proj', value: 4 }, { key: 'q_proj', value: 16 }], alphaPattern: [{ key: 'model.layers.0.self_attn.v_proj', value: 4 }], layersToTransform: [0, 2], layersPattern: ['layers'],
            },
            steps: 20,
            batchSize: 8, gradAccumulation: 1, lr: 0.001, schedule: 'cosine', warmupSteps: 2,
            weightDecay: 0, maxGradNorm: 1, maxSeqLen: 256, template: 'alpaca', seed: 5, proxMu: 0, freezeLoraA: false, loraPlusRatio: 16, scheduleRound: 4, scheduleRounds: 10, keepOptimizerState: true,
            dpSgd: { maxGradNorm: 0.5, noiseMultiplier: 1.1, sampleRate: 0.01 },
          },
        },
      },
    };
    const back = CoordinatorMessage.decode(CoordinatorMessage.encode({ body: { $case: 'task', value: task } }).finish());
    expect(back.body?.$case).toBe('task');
    const t = back.body!.value as Task;
    expect(t.kind?.$case).toBe('train');
    expect(t.deadlineUnixMs).toBe(1_900_000_000_000);
    expect(t.global?.version).toBe(2);
    expect([...t.global!.sha256]).toEqual(new Array(32).fill(7));
    const spec = (t.kind!.value as { spec: { steps?: number; epochs?: number; lora: { targetModules: string[] } } }).spec;
    expect(spec.steps).toBe(20);
    expect(spec.epochs).toBeUndefined(); // optional: absent stays absent
    expect((t.kind!.value as { spec: { dpSgd?: { noiseMultiplier: number } } }).spec.dpSgd?.noiseMultiplier).toBe(1.1);
    expect(spec.lora.targetModules).toEqual(['q_proj', 'v_proj']);
    expect((t.kind!.value as { spec: { scheduleRound: number; scheduleRounds: number; keepOptimizerState: boolean } }).spec).toMatchObject({ scheduleRound: 4, scheduleRounds: 10, keepOptimizerState: true });
  });

  it('keeps the field numbers other implementations rely on', () => {
    // CoordinatorMessage.task is field 2, Task.kind.eval field 11, Task.task_id field 1.
    const bytes = CoordinatorMessage.encode({ body: { $case: 'task', value: { taskId: 'x', round: 0, deadlineUnixMs: 0, global: undefined, kind: { $case: 'eval', value: { spec: undefined } } } } }).finish();
    expect([...bytes]).toEqual([0x12, 0x05, 0x0a, 0x01, 0x78, 0x5a, 0x00]);
    const up = UploadMessage.encode({ body: { $case: 'chunk', value: { offset: 1, data: new Uint8Array([9]) } } }).finish();
    expect([...up]).toEqual([0x12, 0x05, 0x08, 0x01, 0x12, 0x01, 0x09]);
    expect(DType.DTYPE_F32).toBe(1);
    expect(WorkerStatus.WORKER_STATUS_TRAINING).toBe(3);
  });

  it('decodes a message with an unknown future oneof case as an empty body', () => {
    // Field 10 of CoordinatorMessage is reserved for secure aggregation.
    const w = new BinaryWriter();
    w.uint32((10 << 3) | 2).bytes(new Uint8Array([0x0a, 0x02, 0x68, 0x69]));
    const msg = CoordinatorMessage.decode(w.finish());
    expect(msg.body).toBeUndefined();
    const hb = WorkerMessage.decode(WorkerMessage.encode({ body: { $case: 'heartbeat', value: { status: WorkerStatus.WORKER_STATUS_IDLE, taskId: '', memoryUsedBytes: 123 } } }).finish());
    expect(hb.body).toEqual({ $case: 'heartbeat', value: { status: WorkerStatus.WORKER_STATUS_IDLE, taskId: '', memoryUsedBytes: 123 } });
  });
});
