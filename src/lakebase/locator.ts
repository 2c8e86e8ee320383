/**
 * A Lakebase database by name (LakebaseInstance or LakebaseEndpoint): the host to connect to and
 * the state of its compute, from the workspace REST API with the workspace token.
 *
 * The host is looked up at the first connect after the start (not at the start itself: a browser
 * login may still be needed then) and again after a connect that failed, when the instance may
 * have moved or stopped. Lookups are shared: a caller takes any answer to a lookup that started
 * after its own connect did, so that a burst of failing clients makes one request, not hundreds.
 */
import type { FetchContext } from '../oauth/cached-token-source.js';
import { withWorkspaceToken, type WorkspaceTokenProvider } from '../oauth/database-credential.js';
import type { LakebaseTarget, WorkspaceClient } from '../oauth/workspace-client.js';
import type { UpstreamTarget } from '../proxy/upstream.js';

/** What the state of a compute means to a client that wants to connect now. */
export type ComputeCondition = 'ready' | 'starting' | 'stopped' | 'unknown';

export interface ComputeStatus {
  /** The host to connect to; undefined when the API names none (for ReadOnly: no read-only host). */
  readonly host: string | undefined;
  /** The API's own word: `state` of an instance, `status.current_state` of an endpoint. */
  readonly state: string | undefined;
  readonly condition: ComputeCondition;
}

/** A lookup that gave no usable answer: the message names the setting to check. */
export class LookupError extends Error {
  override readonly name = 'LookupError';
}

/**
 * Provisioned instance states (DatabaseInstance.state): STARTING, AVAILABLE, DELETING, STOPPED,
 * UPDATING, FAILING_OVER. Autoscaling endpoint states (status.current_state): INIT, ACTIVE, IDLE
 * (suspended by scale-to-zero; the next connection wakes it), DEGRADED. UPDATING and FAILING_OVER
 * pass within seconds too, so they count as starting.
 */
const STARTING = new Set(['STARTING', 'UPDATING', 'FAILING_OVER', 'INIT', 'IDLE']);
const READY = new Set(['AVAILABLE', 'ACTIVE', 'DEGRADED']);

export interface ComputeLocatorOptions {
  readonly client: WorkspaceClient;
  readonly workspaceToken: WorkspaceTokenProvider;
  readonly target: LakebaseTarget;
  /** Connect to the read-only host (ReadOnly=true). */
  readonly readOnly: boolean;
}

export class ComputeLocator {
  readonly #options: ComputeLocatorOptions;
  #last: { status: ComputeStatus; startedAt: number } | undefined;
  #flight: { promise: Promise<ComputeStatus>; startedAt: number } | undefined;
  /** Kept apart from #last: a later answer without a host (a compute being created) does not erase it. */
  #lastHost: string | undefined;

  constructor(options: ComputeLocatorOptions) {
    this.#options = options;
  }

  /** `instance "name"` or `endpoint projects/...`, for messages. */
  get description(): string {
    const { target } = this.#options;
    return 'instance' in target ? `instance "${target.instance}"` : `endpoint ${target.endpoint}`;
  }

  /** The setting that names the database: LakebaseInstance or LakebaseEndpoint. */
  get setting(): string {
    return 'instance' in this.#options.target ? 'LakebaseInstance' : 'LakebaseEndpoint';
  }

  /** The host of the last lookup that named one. */
  get host(): string | undefined {
    return this.#lastHost;
  }

  /**
   * The compute's status from a lookup that started at `notBefore` or later (the last one, the
   * one in flight, or a new one). Rejects with a LookupError or the TokenError of the request.
   */
  locate(notBefore: number): Promise<ComputeStatus> {
    const last = this.#last;
    if (last && last.startedAt >= notBefore) return Promise.resolve(last.status);
    if (this.#flight && this.#flight.startedAt >= notBefore) return this.#flight.promise;
    const startedAt = Date.now();
    const promise = this.#lookup(startedAt).finally(() => {
      if (this.#flight?.promise === promise) this.#flight = undefined;
    });
    this.#flight = { promise, startedAt };
    return promise;
  }

  async #lookup(startedAt: number): Promise<ComputeStatus> {
    const { client, workspaceToken, target } = this.#options;
    // Never a browser login here: the client's own token request just before had its chance.
    const context: FetchContext = { interactive: false, notice: () => {}, signal: new AbortController().signal };
    const json = await withWorkspaceToken(workspaceToken, context, (token) => client.lakebaseResource(token, target));
    const status = 'instance' in target ? this.#instanceStatus(json) : this.#endpointStatus(json);
    if (!this.#last || this.#last.startedAt <= startedAt) this.#last = { status, startedAt };
    if (status.host !== undefined) this.#lastHost = status.host;
    return status;
  }

  /** A DatabaseInstance: `read_write_dns`, `read_only_dns`, `state`. */
  #instanceStatus(json: unknown): ComputeStatus {
    const instance = record(json);
    const state = text(instance['state']);
    const host = this.#options.readOnly ? text(instance['read_only_dns']) : text(instance['read_write_dns']);
    if (host === undefined && this.#options.readOnly && condition(state) === 'ready') {
      throw new LookupError(`Lakebase ${this.description} has no read-only host (read_only_dns): turn on its readable secondaries, or leave ReadOnly off`);
    }
    return { host, state, condition: condition(state) };
  }

  /** An Endpoint: `status.hosts.host`, `status.hosts.read_only_host`, `status.current_state`, `status.disabled`. */
  #endpointStatus(json: unknown): ComputeStatus {
    const status = record(record(json)['status']);
    const hosts = record(status['hosts']);
    const state = text(status['current_state']);
    const readOnlyEndpoint = text(status['endpoint_type']) === 'ENDPOINT_TYPE_READ_ONLY';
    const host = this.#options.readOnly ? text(hosts['read_only_host']) ?? (readOnlyEndpoint ? text(hosts['host']) : undefined) : text(hosts['host']);
    if (host === undefined && this.#options.readOnly) {
      throw new LookupError(`Lakebase ${this.description} has no read-only host: name a read-only endpoint in LakebaseEndpoint, or leave ReadOnly off`);
    }
    if (status['disabled'] === true) return { host, state: 'DISABLED', condition: 'stopped' };
    return { host, state, condition: condition(state) };
  }
}

function condition(state: string | undefined): ComputeCondition {
  if (state === undefined) return 'unknown';
  if (READY.has(state)) return 'ready';
  if (STARTING.has(state)) return 'starting';
  if (state === 'STOPPED' || state === 'DELETING') return 'stopped';
  return 'unknown';
}

function record(value: unknown): Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value) ? (value as Record<string, unknown>) : {};
}

function text(value: unknown): string | undefined {
  return typeof value === 'string' && value !== '' ? value : undefined;
}

/**
 * The upstream target of a database addressed by name: its `host` is the last one looked up
 * (the target object stays the same, so per-target caches such as the TLS context still apply).
 */
export function locatedUpstream(base: UpstreamTarget, locator: ComputeLocator): UpstreamTarget {
  const target = { ...base };
  Object.defineProperty(target, 'host', { enumerable: true, get: () => locator.host ?? `(${locator.setting} ${locator.description}, not looked up yet)` });
  located.add(target);
  return Object.freeze(target);
}

const located = new WeakSet<UpstreamTarget>();

/** Whether `target`'s host comes from a lookup (no Server was given). */
export function isLocated(target: UpstreamTarget): boolean {
  return located.has(target);
}
