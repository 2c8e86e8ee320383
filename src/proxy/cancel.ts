import { randomInt, timingSafeEqual } from 'node:crypto';

/** What the proxy needs to cancel a query on the upstream backend that runs it. */
export interface UpstreamKey {
  readonly processId: number;
  readonly secretKey: Buffer;
  /** Sends the CancelRequest upstream; resolves when sent. */
  readonly cancel: () => Promise<void>;
}

export interface ClientKey {
  readonly processId: number;
  readonly secretKey: number;
  readonly release: () => void;
}

/**
 * The proxy's own cancel keys, handed to clients in BackendKeyData, mapped to the upstream's.
 * Upstream process ids and keys never reach a client.
 */
export class CancelKeys {
  readonly #byProcessId = new Map<number, { secret: Buffer; upstream: UpstreamKey }>();

  register(upstream: UpstreamKey): ClientKey {
    let processId: number;
    do processId = randomInt(1, 0x7fffffff);
    while (this.#byProcessId.has(processId));
    const secretKey = randomInt(-0x80000000, 0x7fffffff);
    // Not allocUnsafe: a pooled 4-byte slice would keep an 8 KiB block alive per session.
    const secret = Buffer.alloc(4);
    secret.writeInt32BE(secretKey, 0);
    this.#byProcessId.set(processId, { secret, upstream });
    return { processId, secretKey, release: () => this.#byProcessId.delete(processId) };
  }

  /** The upstream key for a client's CancelRequest, or undefined when unknown or the secret is wrong. */
  lookup(processId: number, secretKey: Buffer): UpstreamKey | undefined {
    const entry = this.#byProcessId.get(processId);
    if (!entry || secretKey.length !== entry.secret.length || !timingSafeEqual(secretKey, entry.secret)) return undefined;
    return entry.upstream;
  }

  get size(): number {
    return this.#byProcessId.size;
  }
}
