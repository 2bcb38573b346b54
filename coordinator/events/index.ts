/**
 * Event bus factories. The coordinator calls createEventBus with its run
 * config; without `nats` it gets the in-process MemoryBus, with it a NatsBus
 * that wraps one (local dashboard) and copies every event to JetStream.
 * Dashboards that are not the coordinator call createConsumerBus.
 */
import type { EventBus } from './bus.ts';
import { MemoryBus, type MemoryBusOptions } from './memory.ts';
import { NatsBus } from './nats.ts';
import { NatsConsumerBus } from './nats-consumer.ts';
import type { NatsConnectOptions, NatsStreamOptions } from './nats-common.ts';

export type { EventBus, EventSubscription } from './bus.ts';
export type { NatsConnectOptions, NatsStreamOptions } from './nats-common.ts';
export { NatsBus, type NatsBusOptions, type NatsBusStatus } from './nats.ts';
export { NatsConsumerBus, type NatsConsumerBusOptions } from './nats-consumer.ts';

/** NATS settings of the coordinator: connection, stream limits and the outage queue bound. */
export interface NatsBusConfig extends NatsConnectOptions, NatsStreamOptions {
  /** Events kept for NATS while it is down (default 50000). */
  queueLimit?: number;
}

export interface CreateEventBusOptions {
  nats?: NatsBusConfig;
  memory: MemoryBusOptions;
}

/**
 * The coordinator's event bus. Never waits long for NATS: when it is down the
 * bus starts degraded (and says so) and connects in the background. Throws
 * for invalid options, rejected credentials, or a stream that cannot hold
 * fedtune events.
 */
export async function createEventBus(opts: CreateEventBusOptions): Promise<EventBus> {
  const local = new MemoryBus(opts.memory);
  if (!opts.nats) return local;
  const { servers, user, pass, token, credsFile, tls, ...rest } = opts.nats;
  try {
    return await NatsBus.create(local, { connection: { servers, user, pass, token, credsFile, tls }, ...rest });
  } catch (err) {
    await local.close();
    throw err;
  }
}

/** A read-only bus over every run on a NATS stream (standalone dashboards, archivers). */
export function createConsumerBus(opts: {
  nats: NatsConnectOptions & { stream?: string; subjectRoot?: string };
}): Promise<NatsConsumerBus> {
  const { stream, subjectRoot, ...connection } = opts.nats;
  return NatsConsumerBus.create({ connection, stream, subjectRoot });
}
