/**
 * The upstream connect and login, retried while the compute is starting: an Autoscaling compute
 * suspended by scale-to-zero wakes on the first connection and may refuse or drop the first few,
 * and a Provisioned instance that is starting does the same. Within ConnectTimeout the proxy
 * tries again with backoff while the failure is one a starting compute gives:
 *
 * - the connection refused or reset, or closed before the login, by a Lakebase host (a database
 *   addressed by LakebaseInstance/LakebaseEndpoint, or a Server under *.database.*databricks*);
 *   for any other host that means the server is down, and the client hears it at once;
 * - SQLSTATE 57P03 (cannot_connect_now: "the database system is starting up"), from any server;
 * - any failure while the workspace API says the compute is starting (INIT, IDLE, STARTING).
 *
 * A database addressed by name is looked up at its first connect and again after a failed one:
 * a stopped instance is then an error that says so (08001), not a wait that ends in a timeout,
 * and a host that changed is tried at once.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../ops/log.js';
import { isLocated, LookupError, type ComputeLocator, type ComputeStatus } from '../lakebase/locator.js';
import { TokenError } from '../token/token-source.js';
import { UpstreamError, type UpstreamTarget } from './upstream.js';

export interface WakeUpOptions {
  readonly target: UpstreamTarget;
  /** Set when the database is addressed by LakebaseInstance or LakebaseEndpoint. */
  readonly locator: ComputeLocator | undefined;
  readonly logger: Logger;
  /** Called once per login that had to wait: whether it then connected. */
  readonly waited: (outcome: 'connected' | 'failed') => void;
}

export interface WakeUpContext {
  /** Aborted when the client goes away: no more tries. */
  readonly signal?: AbortSignal;
  /** Tells the waiting client (a NoticeResponse). */
  notice(message: string): void;
}

const FIRST_DELAY_MS = 100;
const MAX_DELAY_MS = 1_000;
const SOCKET_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'EPIPE']);

/** The waiting of one target's sessions: one log line per wake-up, however many clients wait. */
export class WakeUp {
  readonly #options: WakeUpOptions;
  readonly #lakebaseHost: boolean;
  /** The host comes from the locator (no Server given). */
  readonly #located: boolean;
  #waiting = 0;
  #since = 0;

  constructor(options: WakeUpOptions) {
    this.#options = options;
    this.#lakebaseHost = options.locator !== undefined || isLakebaseHost(options.target.host);
    this.#located = options.locator !== undefined && isLocated(options.target);
  }

  async run<T>(connect: () => Promise<T>, context: WakeUpContext): Promise<T> {
    const { target, locator } = this.#options;
    const deadline = Date.now() + target.connectTimeoutMs;
    if (locator && this.#located && locator.host === undefined) this.#check(await this.#locate(locator, -Infinity));
    let waiting = false;
    try {
      for (let attempt = 0; ; attempt++) {
        const host = target.host;
        const tried = Date.now();
        try {
          const result = await connect();
          if (waiting) this.#options.waited('connected');
          return result;
        } catch (error) {
          if (context.signal?.aborted) throw error;
          const status = locator ? await this.#relocate(locator, tried) : undefined;
          if (status) this.#check(status);
          const moved = target.host !== host;
          if (!moved && !this.#starting(error, status)) throw error;
          const delay = moved ? 0 : Math.round(Math.min(MAX_DELAY_MS, FIRST_DELAY_MS * 2 ** attempt) * (0.5 + Math.random() / 2));
          if (Date.now() + delay >= deadline) throw gaveUp(error, target.connectTimeoutMs, waiting);
          if (!moved && !waiting) {
            waiting = true;
            this.#begin(error, status, context);
          }
          await sleep(delay, undefined, context.signal ? { signal: context.signal } : undefined).catch(() => {
            throw error;
          });
        }
      }
    } catch (error) {
      if (waiting) this.#options.waited('failed');
      throw error;
    } finally {
      if (waiting) this.#end();
    }
  }

  /** Whether a failed connect looks like a compute that is starting. */
  #starting(error: unknown, status: ComputeStatus | undefined): boolean {
    if (status?.condition === 'starting') return true;
    if (!(error instanceof UpstreamError)) return false;
    if (error.sqlstate === '57P03') return true;
    if (error.fields || !this.#lakebaseHost) return false;
    // No ErrorResponse: the socket was refused, reset or closed before the server said anything.
    return hasSocketCode(error) || error.sqlstate === '08006';
  }

  /** The status; a lookup that fails is an 08001 naming the setting. */
  async #locate(locator: ComputeLocator, notBefore: number): Promise<ComputeStatus> {
    try {
      return await locator.locate(notBefore);
    } catch (error) {
      const why = error instanceof LookupError || error instanceof TokenError ? error.message : String(error);
      throw new UpstreamError('08001', `could not look up the host of ${locator.setting} ${locator.description}: ${why}`, undefined, { cause: error });
    }
  }

  /** After a failed connect (tried at `tried`): a newer status, or undefined when it cannot be had and the connect's own error says more. */
  async #relocate(locator: ComputeLocator, tried: number): Promise<ComputeStatus | undefined> {
    try {
      return await this.#locate(locator, tried);
    } catch (error) {
      this.#options.logger.warn({ compute: locator.description, err: (error as Error).message }, 'could not look up the compute after a failed connect');
      return undefined;
    }
  }

  /** A stopped compute, or one without a host, is an error that says so. */
  #check(status: ComputeStatus): void {
    const locator = this.#options.locator as ComputeLocator;
    if (status.condition === 'stopped') {
      const what = status.state === 'DISABLED' ? 'is disabled' : status.state === 'DELETING' ? 'is being deleted' : 'is stopped';
      throw new UpstreamError('08001', `Lakebase ${locator.description} ${what} (state ${status.state}): start it in the Databricks workspace, then connect again`);
    }
    if (this.#located && locator.host === undefined) {
      throw new UpstreamError('08001', `Lakebase ${locator.description} has no host yet (state ${status.state ?? 'unknown'}); set Server, or try again once it is available`);
    }
  }

  #begin(error: unknown, status: ComputeStatus | undefined, context: WakeUpContext): void {
    const { target, locator, logger } = this.#options;
    try {
      context.notice(`lakebase-proxy: waiting up to ${target.connectTimeoutMs / 1000} s for the compute to start`);
    } catch {
      // the client went away; its try ends with the next failure
    }
    if (this.#waiting++ > 0) return;
    this.#since = Date.now();
    logger.info(
      {
        upstream: `${target.host}:${target.port}`,
        compute: locator?.description,
        state: status?.state,
        reason: error instanceof UpstreamError ? `${error.sqlstate} ${error.message}` : String(error),
      },
      'waiting for the compute to start',
    );
  }

  #end(): void {
    if (--this.#waiting === 0) this.#options.logger.debug({ waitedMs: Date.now() - this.#since }, 'no client waits for the compute any more');
  }
}

/** Runs `connect` (the upstream connect and login) under `wakeUp`'s retries. */
export function withWakeUp<T>(connect: () => Promise<T>, wakeUp: WakeUp, context: WakeUpContext): Promise<T> {
  return wakeUp.run(connect, context);
}

/** A Lakebase host name: `instance-<uuid>.database.cloud.databricks.com`, `ep-<name>.database.<region>.cloud.databricks.com`, Azure's. */
export function isLakebaseHost(host: string): boolean {
  return /\.database\.(?:[a-z0-9-]+\.)*(?:databricks\.com|azuredatabricks\.net)\.?$/i.test(host);
}

function hasSocketCode(error: unknown, depth = 0): boolean {
  if (!(error instanceof Error) || depth > 4) return false;
  const code = (error as NodeJS.ErrnoException).code;
  if (typeof code === 'string' && SOCKET_CODES.has(code)) return true;
  if (error instanceof AggregateError && error.errors.some((e: unknown) => hasSocketCode(e, depth + 1))) return true;
  return hasSocketCode(error.cause, depth + 1);
}

function gaveUp(error: unknown, timeoutMs: number, waited: boolean): unknown {
  if (!waited || !(error instanceof UpstreamError) || error.fields) return error;
  return new UpstreamError(error.sqlstate, `${error.message} (the compute did not start within ConnectTimeout, ${timeoutMs} ms)`, undefined, { cause: error });
}
