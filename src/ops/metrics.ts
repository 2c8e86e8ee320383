/**
 * Every Prometheus metric of the proxy, on a private registry (never prom-client's global one, so
 * that a program embedding the proxy keeps its own metrics apart).
 *
 * The proxy reports through `ProxyObserver`, whose `bytes()` runs for every relayed chunk: the
 * observers only add to plain number fields, and the counters are published from those fields in
 * `collect()` at scrape time. The cost of an observation is an addition, not a label lookup.
 *
 * Labels: `target` (the configured target's name), and fixed words (`direction`, `reason`,
 * `result`, `outcome`). No label ever holds a user name, a token or a query.
 */
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { FailureReason, PoolStats, ProxyObserver, RelayKind } from '../proxy/observer.js';
import { SERVER_CLOSE_REASONS, type ServerCloseReason } from '../pool/server-connection.js';

export const METRIC_PREFIX = 'lakebase_proxy_';

export type TokenRefreshResult = 'success' | 'failure';
type CancelOutcome = Parameters<ProxyObserver['cancel']>[0];
type WaitOutcome = Parameters<ProxyObserver['computeWaited']>[0];

// Records rather than arrays so that the compiler insists on every member of each union.
const FAILURE_REASONS = Object.keys({
  client_password: true,
  token: true,
  upstream_auth: true,
  upstream_connect: true,
  protocol: true,
  startup_timeout: true,
  too_many_connections: true,
  pool_timeout: true,
  too_many_startups: true,
  shutting_down: true,
  unknown_database: true,
} satisfies Record<FailureReason, true>) as FailureReason[];
const CANCEL_OUTCOMES = Object.keys({ forwarded: true, unknown_key: true, error: true } satisfies Record<CancelOutcome, true>) as CancelOutcome[];
const RELAY_KINDS: readonly RelayKind[] = ['native', 'js'];
const WAIT_OUTCOMES = Object.keys({ connected: true, failed: true } satisfies Record<WaitOutcome, true>) as WaitOutcome[];
const REFRESH_RESULTS: readonly TokenRefreshResult[] = ['success', 'failure'];

/** Upstream connect (TCP, TLS, login) takes tens of milliseconds nearby and seconds when far or failing. */
const CONNECT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

/** What one target's observer has counted since the start. */
interface TargetCounts {
  opened: number;
  closed: number;
  rejected: number;
  bytesToUpstream: number;
  bytesToClient: number;
  /** What the native relay adds to, [to upstream, to client]. */
  readonly nativeBytes: Float64Array;
  failures: Record<FailureReason, number>;
  cancels: Record<CancelOutcome, number>;
  /** Sessions relayed, by relay. */
  relayed: Record<RelayKind, number>;
  logins: number;
  reuses: number;
  resets: number;
  /** Transaction mode: transactions served, prepared statements [prepared, reused], resets for leaked state. */
  transactions: number;
  /** Of those, carried from start to end by the native fast path (native/txclient.h). */
  fastTransactions: number;
  /** Of those, given back to the pool in C, on its desk (src/pool/desk.ts), no JavaScript per transaction. */
  deskTransactions: number;
  prepared: number;
  preparedReused: number;
  leaked: number;
  serverCloses: Record<ServerCloseReason, number>;
  /** The target's pools, read at scrape. */
  pools: () => PoolStats;
  computeWaits: Record<WaitOutcome, number>;
  /** Pooled clients' waits for a connection, and their sum (the console's SHOW STATS). */
  waits: number;
  waitSeconds: number;
}

const NO_POOLS: PoolStats = { idle: 0, active: 0, loggingIn: 0, checking: 0, resetting: 0, waiting: 0 };
/** A pool's wait is nothing when a connection is idle, up to QueryWaitTimeout when it is full. */
const WAIT_BUCKETS = [0.001, 0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120];

export class Metrics {
  readonly #registry = new Registry();
  readonly #targets = new Map<string, { counts: TargetCounts; observer: ProxyObserver }>();
  readonly #refreshes = new Map<string, Record<TokenRefreshResult, number>>();
  readonly #expiry = new Map<string, () => Date | undefined>();
  readonly #connectSeconds: Histogram<'target'>;
  readonly #waitSeconds: Histogram<'target'>;

  constructor() {
    const registers = [this.#registry];
    const targets = this.#targets;
    const refreshes = this.#refreshes;
    const expiry = this.#expiry;
    /** Replaces the metric's series with what `read` sets for each target. */
    const publish = <L extends string>(metric: Counter<L> | Gauge<L>, read: (counts: TargetCounts, target: string) => void): void => {
      metric.reset();
      for (const [target, { counts }] of targets) read(counts, target);
    };

    new Gauge({
      name: `${METRIC_PREFIX}client_connections_open`,
      help: 'Client connections open now, authenticated or not.',
      labelNames: ['target'],
      registers,
      collect() {
        publish(this, (c, target) => this.set({ target }, c.opened - c.closed));
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}client_connections_total`,
      help: 'Client connections accepted (those turned away at --max-connections after their startup included).',
      labelNames: ['target'],
      registers,
      collect() {
        publish(this, (c, target) => this.inc({ target }, c.opened));
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}client_connections_rejected_total`,
      help: 'Client connections turned away at --max-connections (after their startup) or --max-startups (at once), with SQLSTATE 53300.',
      labelNames: ['target'],
      registers,
      collect() {
        publish(this, (c, target) => this.inc({ target }, c.rejected));
      },
    });
    this.#connectSeconds = new Histogram({
      name: `${METRIC_PREFIX}upstream_connect_duration_seconds`,
      help: 'Time to connect to the upstream and log in (TCP, TLS, authentication), for logins that succeeded.',
      labelNames: ['target'],
      buckets: CONNECT_BUCKETS,
      registers,
    });
    new Counter({
      name: `${METRIC_PREFIX}relayed_bytes_total`,
      help: 'Bytes relayed between clients and the upstream, by direction.',
      labelNames: ['target', 'direction'],
      registers,
      collect() {
        publish(this, (c, target) => {
          this.inc({ target, direction: 'to_upstream' }, c.bytesToUpstream + (c.nativeBytes[0] as number));
          this.inc({ target, direction: 'to_client' }, c.bytesToClient + (c.nativeBytes[1] as number));
        });
      },
    });
    new Gauge({
      name: `${METRIC_PREFIX}server_connections`,
      help: 'Pooled upstream connections by state (idle, active, logging_in, checking, resetting).',
      labelNames: ['target', 'state'],
      registers,
      collect() {
        publish(this, (c, target) => {
          const stats = c.pools();
          this.set({ target, state: 'idle' }, stats.idle);
          this.set({ target, state: 'active' }, stats.active);
          this.set({ target, state: 'logging_in' }, stats.loggingIn);
          this.set({ target, state: 'checking' }, stats.checking);
          this.set({ target, state: 'resetting' }, stats.resetting);
        });
      },
    });
    new Gauge({
      name: `${METRIC_PREFIX}clients_waiting`,
      help: 'Clients waiting for a connection of a full pool.',
      labelNames: ['target'],
      registers,
      collect() {
        publish(this, (c, target) => this.set({ target }, c.pools().waiting));
      },
    });
    this.#waitSeconds = new Histogram({
      name: `${METRIC_PREFIX}pool_wait_duration_seconds`,
      help: 'Time a pooled client waited for its upstream connection (a reuse, a new login, or a free slot).',
      labelNames: ['target'],
      buckets: WAIT_BUCKETS,
      registers,
    });
    new Counter({
      name: `${METRIC_PREFIX}server_logins_total`,
      help: 'Upstream logins made for a pool.',
      labelNames: ['target'],
      registers,
      collect() {
        publish(this, (c, target) => this.inc({ target }, c.logins));
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}server_reuses_total`,
      help: 'Clients served by a pooled upstream connection without a login.',
      labelNames: ['target'],
      registers,
      collect() {
        publish(this, (c, target) => this.inc({ target }, c.reuses));
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}server_resets_total`,
      help: 'Pooled upstream connections cleaned (ROLLBACK, ServerResetQuery) after a client.',
      labelNames: ['target'],
      registers,
      collect() {
        publish(this, (c, target) => this.inc({ target }, c.resets));
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}pool_transactions_total`,
      help: 'Transactions served in PoolMode=transaction (each gives its server connection back).',
      labelNames: ['target'],
      registers,
      collect() {
        publish(this, (c, target) => this.inc({ target }, c.transactions));
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}pool_fast_path_transactions_total`,
      help: 'Of pool_transactions_total, those the native fast path carried from start to end (the client socket and the transaction in C, no JavaScript per message).',
      labelNames: ['target'],
      registers,
      collect() {
        publish(this, (c, target) => this.inc({ target }, c.fastTransactions));
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}pool_desk_transactions_total`,
      help: "Of pool_fast_path_transactions_total, those whose server connection C kept for the pool's next client itself (the pool's desk): no JavaScript for the hand-off either.",
      labelNames: ['target'],
      registers,
      collect() {
        publish(this, (c, target) => this.inc({ target }, c.deskTransactions));
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}prepared_statements_total`,
      help: "PoolMode=transaction: uses of clients' named prepared statements (Parse, Bind, Describe), by outcome (prepared: the connection had to prepare it; reused: it had it already).",
      labelNames: ['target', 'outcome'],
      registers,
      collect() {
        publish(this, (c, target) => {
          this.inc({ target, outcome: 'prepared' }, c.prepared);
          this.inc({ target, outcome: 'reused' }, c.preparedReused);
        });
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}server_leak_resets_total`,
      help: 'PoolMode=transaction: server connections reset (ServerResetQuery) because a client left session state on them (SET, LISTEN, PREPARE, WITH HOLD cursors, temporary tables, advisory locks).',
      labelNames: ['target'],
      registers,
      collect() {
        publish(this, (c, target) => this.inc({ target }, c.leaked));
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}server_closes_total`,
      help: 'Pooled upstream connections closed, by reason (idle, lifetime, token_expired, server_closed, reset_failed, check_failed, evicted, not_reusable, shutdown).',
      labelNames: ['target', 'reason'],
      registers,
      collect() {
        publish(this, (c, target) => {
          for (const reason of SERVER_CLOSE_REASONS) this.inc({ target, reason }, c.serverCloses[reason]);
        });
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}sessions_total`,
      help: 'Logged-in sessions, by the relay that carried them (native: OpenSSL and the relay in C; js: Node.js).',
      labelNames: ['target', 'relay'],
      registers,
      collect() {
        publish(this, (c, target) => {
          for (const relay of RELAY_KINDS) this.inc({ target, relay }, c.relayed[relay]);
        });
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}login_failures_total`,
      help: 'Client logins that failed, by reason (client_password, token, upstream_auth, upstream_connect, protocol, startup_timeout, too_many_connections, too_many_startups, shutting_down, unknown_database, pool_timeout).',
      labelNames: ['target', 'reason'],
      registers,
      collect() {
        publish(this, (c, target) => {
          for (const reason of FAILURE_REASONS) this.inc({ target, reason }, c.failures[reason]);
        });
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}cancel_requests_total`,
      help: 'Cancel requests from clients, by outcome (forwarded, unknown_key, error).',
      labelNames: ['target', 'outcome'],
      registers,
      collect() {
        publish(this, (c, target) => {
          for (const outcome of CANCEL_OUTCOMES) this.inc({ target, outcome }, c.cancels[outcome]);
        });
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}compute_waits_total`,
      help: 'Logins that waited for a starting compute (connection refused or reset, SQLSTATE 57P03, or an API state such as IDLE or STARTING), by outcome (connected, failed).',
      labelNames: ['target', 'outcome'],
      registers,
      collect() {
        publish(this, (c, target) => {
          for (const outcome of WAIT_OUTCOMES) this.inc({ target, outcome }, c.computeWaits[outcome]);
        });
      },
    });
    new Counter({
      name: `${METRIC_PREFIX}token_refreshes_total`,
      help: 'Token fetches and refreshes, by result.',
      labelNames: ['target', 'result'],
      registers,
      collect() {
        this.reset();
        for (const [target, counts] of refreshes) {
          for (const result of REFRESH_RESULTS) this.inc({ target, result }, counts[result]);
        }
      },
    });
    new Gauge({
      name: `${METRIC_PREFIX}token_expiry_timestamp_seconds`,
      help: 'When the token held now expires, in seconds since the Unix epoch; absent while no token is held or its lifetime is unknown.',
      labelNames: ['target'],
      registers,
      collect() {
        this.reset();
        for (const [target, read] of expiry) {
          const at = read();
          if (at !== undefined && Number.isFinite(at.getTime())) this.set({ target }, at.getTime() / 1000);
        }
      },
    });
    // The event loop delay histogram samples once a second, not prom-client's default of every
    // 10 ms: that woke an idle proxy (a desktop service at login, a sidecar) about 90 times a second.
    collectDefaultMetrics({ register: this.#registry, prefix: METRIC_PREFIX, eventLoopMonitoringPrecision: 1000 });
  }

  /** The observer for one target's `ProxyServer`; the same one for the same name. */
  observerFor(target: string): ProxyObserver {
    const known = this.#targets.get(target);
    if (known) return known.observer;
    const counts: TargetCounts = {
      opened: 0,
      closed: 0,
      rejected: 0,
      bytesToUpstream: 0,
      bytesToClient: 0,
      nativeBytes: new Float64Array(2),
      failures: Object.fromEntries(FAILURE_REASONS.map((r) => [r, 0])) as Record<FailureReason, number>,
      cancels: Object.fromEntries(CANCEL_OUTCOMES.map((o) => [o, 0])) as Record<CancelOutcome, number>,
      relayed: { native: 0, js: 0 },
      logins: 0,
      reuses: 0,
      resets: 0,
      transactions: 0,
      fastTransactions: 0,
      deskTransactions: 0,
      prepared: 0,
      preparedReused: 0,
      leaked: 0,
      serverCloses: Object.fromEntries(SERVER_CLOSE_REASONS.map((r) => [r, 0])) as Record<ServerCloseReason, number>,
      pools: () => NO_POOLS,
      computeWaits: Object.fromEntries(WAIT_OUTCOMES.map((o) => [o, 0])) as Record<WaitOutcome, number>,
      waits: 0,
      waitSeconds: 0,
    };
    const histogram = this.#connectSeconds;
    const labels = { target };
    // The labelled child once: an observe per transaction in transaction mode.
    const waits = this.#waitSeconds.labels(labels);
    this.#waitSeconds.zero(labels);
    histogram.zero(labels);
    // Plain functions over `counts`: the relay calls `bytes` detached from this object.
    const observer: ProxyObserver = {
      clientOpened: () => void counts.opened++,
      clientClosed: () => void counts.closed++,
      clientRejected: () => void counts.rejected++,
      upstreamConnected: (seconds) => histogram.observe(labels, seconds),
      bytes: (toUpstream, toClient) => {
        counts.bytesToUpstream += toUpstream;
        counts.bytesToClient += toClient;
      },
      byteCounters: () => counts.nativeBytes,
      failure: (reason) => void counts.failures[reason]++,
      cancel: (outcome) => void counts.cancels[outcome]++,
      sessionStarted: (relay) => void counts.relayed[relay]++,
      pool: {
        login: () => void counts.logins++,
        reuse: () => void counts.reuses++,
        reset: () => void counts.resets++,
        closed: (reason) => void counts.serverCloses[reason]++,
        transaction: (fast, desk) => {
          counts.transactions++;
          if (fast) counts.fastTransactions++;
          if (desk) counts.deskTransactions++;
        },
        prepared: (reused) => void (reused ? counts.preparedReused++ : counts.prepared++),
        leaked: () => void counts.leaked++,
        waited: (seconds) => {
          counts.waits++;
          counts.waitSeconds += seconds;
          waits.observe(seconds);
        },
      },
      watchPools: (read) => void (counts.pools = read),
      computeWaited: (outcome) => void counts.computeWaits[outcome]++,
    };
    this.#targets.set(target, { counts, observer });
    this.#refreshCounts(target);
    return observer;
  }

  /** What `target` relayed, logged in and waited since the start (the console's SHOW STATS). */
  traffic(target: string): { bytesToUpstream: number; bytesToClient: number; sessions: number; logins: number; reuses: number; failures: number; waits: number; waitSeconds: number } {
    const c = this.#targets.get(target)?.counts;
    if (!c) return { bytesToUpstream: 0, bytesToClient: 0, sessions: 0, logins: 0, reuses: 0, failures: 0, waits: 0, waitSeconds: 0 };
    c.pools(); // what the desks served, counted first (see text())
    return {
      bytesToUpstream: c.bytesToUpstream + (c.nativeBytes[0] as number),
      bytesToClient: c.bytesToClient + (c.nativeBytes[1] as number),
      sessions: c.relayed.native + c.relayed.js,
      logins: c.logins,
      reuses: c.reuses,
      failures: FAILURE_REASONS.reduce((n, reason) => n + c.failures[reason], 0),
      waits: c.waits,
      waitSeconds: c.waitSeconds,
    };
  }

  /** Counts one token fetch or refresh for `target`. */
  tokenRefreshed(target: string, result: TokenRefreshResult): void {
    this.#refreshCounts(target)[result]++;
  }

  /** Publishes `read()` (e.g. `() => tokenSource.currentExpiry()`) as the target's token expiry at each scrape. */
  watchTokenExpiry(target: string, read: () => Date | undefined): void {
    this.#expiry.set(target, read);
  }

  /** The Content-Type of `text()`: Prometheus text format 0.0.4. */
  get contentType(): string {
    return this.#registry.contentType;
  }

  /** The exposition text of every metric. */
  async text(): Promise<string> {
    // Reading the pools first counts what their desks (native/txclient.h) served since the last read.
    for (const { counts } of this.#targets.values()) counts.pools();
    return await this.#registry.metrics();
  }

  #refreshCounts(target: string): Record<TokenRefreshResult, number> {
    let counts = this.#refreshes.get(target);
    if (!counts) {
      counts = { success: 0, failure: 0 };
      this.#refreshes.set(target, counts);
    }
    return counts;
  }
}
