import type { PoolObserver } from '../pool/pool.js';
/** What the proxy reports as it works; the metrics module implements it. Calls must be cheap. */
export interface ProxyObserver {
  clientOpened(): void;
  clientClosed(): void;
  /** A client turned away at the session or startup limit. */
  clientRejected(): void;
  upstreamConnected(seconds: number): void;
  /** Called per relayed chunk: no allocation. */
  bytes(toUpstream: number, toClient: number): void;
  /** [to upstream, to client]: the native relay adds its bytes here as it goes; read at scrape. */
  byteCounters(): Float64Array;
  /** `reason` is a fixed word (client_password, token, upstream_auth, upstream_connect, protocol). */
  failure(reason: FailureReason): void;
  cancel(outcome: 'forwarded' | 'unknown_key' | 'error'): void;
  /** Pooled upstream connections, counted as they happen. */
  readonly pool: PoolObserver;
  /** The pools' connections by state and the clients waiting, read at scrape. */
  watchPools(read: () => PoolStats): void;
  /** A logged-in session began to be relayed. */
  sessionStarted(relay: RelayKind): void;
  /** A login waited for a starting compute, then connected or gave up. */
  computeWaited(outcome: 'connected' | 'failed'): void;
}

export type FailureReason =
  | 'client_password'
  | 'token'
  | 'upstream_auth'
  | 'upstream_connect'
  | 'protocol'
  | 'startup_timeout'
  | 'too_many_connections'
  | 'too_many_startups'
  | 'shutting_down'
  | 'pool_timeout'
  | 'unknown_database';

export type RelayKind = 'native' | 'js';


export interface PoolStats {
  idle: number;
  active: number;
  loggingIn: number;
  checking: number;
  resetting: number;
  waiting: number;
}

export const nullObserver: ProxyObserver = {
  clientOpened() {},
  clientClosed() {},
  clientRejected() {},
  upstreamConnected() {},
  bytes() {},
  byteCounters: () => new Float64Array(2),
  failure() {},
  cancel() {},
  sessionStarted() {},
  pool: { login() {}, reuse() {}, reset() {}, closed() {}, waited() {}, transaction() {}, prepared() {}, leaked() {} },
  watchPools() {},
  computeWaited() {},
};
