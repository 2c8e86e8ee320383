/** What the proxy reports as it works; the metrics module implements it. Calls must be cheap. */
export interface ProxyObserver {
  clientOpened(): void;
  clientClosed(): void;
  /** A client turned away at the connection limit. */
  clientRejected(): void;
  upstreamConnected(seconds: number): void;
  /** Called per relayed chunk: no allocation. */
  bytes(toUpstream: number, toClient: number): void;
  /** [to upstream, to client]: the native relay adds its bytes here as it goes; read at scrape. */
  byteCounters(): Float64Array;
  /** `reason` is a fixed word (client_password, token, upstream_auth, upstream_connect, protocol). */
  failure(reason: FailureReason): void;
  cancel(outcome: 'forwarded' | 'unknown_key' | 'error'): void;
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
  | 'unknown_database';

export const nullObserver: ProxyObserver = {
  clientOpened() {},
  clientClosed() {},
  clientRejected() {},
  upstreamConnected() {},
  bytes() {},
  byteCounters: () => new Float64Array(2),
  failure() {},
  cancel() {},
  computeWaited() {},
};
