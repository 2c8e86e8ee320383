/**
 * Pooled upstream logins (session mode): a pool per target and database keeps logged-in server
 * connections (native ones: OpenSSL's in C, which outlive the client that opened them) and gives
 * one to each client for the length of its session.
 *
 * A client reuses a connection that logged in with the same startup parameters as its own: after
 * `ServerResetQuery` (DISCARD ALL) a connection is back to exactly what that login gave (its
 * startup values are what RESET restores), so the next client sees what a fresh login with those
 * parameters shows, greeting included. A full pool closes an idle connection of other parameters
 * to log in for the new client.
 *
 * A connection goes back to the pool only when its client left between two of its messages with
 * the server at ReadyForQuery; an open transaction is rolled back first. Anything else (a query
 * running, a message half sent, a failed reset) closes it. A connection is never handed out after
 * the token it logged in with expired, nor after `ServerLifetime`; one idle for `ServerIdleTimeout`
 * closes (so a compute can scale to zero); one that the server closed while idle is dropped at
 * once; one idle longer than `ServerCheckDelay` answers an empty query before it is used.
 */
import { serialize } from 'pg-protocol';
import { BackendCode, parseFields } from '../wire/backend-messages.js';
import { FrameReader } from '../wire/frame-reader.js';
import { SocketFrames } from '../wire/socket-frames.js';
import type { Duplex } from 'node:stream';
import type { Detached } from '../proxy/native-relay.js';
import { Desk, serverSettingsId, type DeskOut, type DeskSession, type SessionEnd } from './desk.js';
import { ServerConnection, type ServerCloseReason, type ServerState } from './server-connection.js';

export interface PoolSettings {
  /** Most server connections of the pool, logging in included. */
  readonly size: number;
  /** Idle connections kept open past ServerIdleTimeout. */
  readonly minSize: number;
  readonly queryWaitTimeoutMs: number;
  /** Run before a connection serves another client; empty: none. */
  readonly resetQuery: string;
  /** 0: as long as the token it logged in with. */
  readonly lifetimeMs: number;
  readonly idleTimeoutMs: number;
  readonly checkDelayMs: number;
}

/** What a pool reports; the metrics module implements it. */
export interface PoolObserver {
  login(): void;
  reuse(): void;
  reset(): void;
  closed(reason: ServerCloseReason): void;
  waited(seconds: number): void;
  /**
   * Transaction mode: a transaction ended and its client gave the connection back; `fast`: the
   * native fast path carried it; `desk`: and C kept the connection for the next client (desk.ts).
   */
  transaction(fast?: boolean, desk?: boolean): void;
  /** Transaction mode: a client's prepared statement was prepared on a server, or found there already. */
  prepared(reused: boolean): void;
  /** Transaction mode: a connection was reset because a client left session state on it. */
  leaked(): void;
}

/** A client that waited longer than QueryWaitTimeout for a server connection. */
export class PoolTimeoutError extends Error {
  override readonly name = 'PoolTimeoutError';
  readonly sqlstate = '53300';
}

/** A client that waited in a pool the proxy's shutdown closed: 57P01, as Postgres says it then. */
export class PoolClosedError extends Error {
  override readonly name = 'PoolClosedError';
  readonly sqlstate = '57P01';
}

interface Waiter {
  readonly loginKey: string;
  /** With a connection handed straight to this client (first come, first served), or to look again. */
  readonly wake: (server?: ServerConnection) => void;
  /** Its wait ends without a connection: QueryWaitTimeout passed, or the client left. */
  readonly fail: (error: Error) => void;
  /** When the client began to wait (SHOW POOLS' maxwait). */
  readonly since: number;
  /** When QueryWaitTimeout ends the wait. */
  readonly deadline: number;
  readonly signal: AbortSignal;
}

export interface Lease {
  readonly server: ServerConnection;
  readonly reused: boolean;
  /**
   * Set when the connection was taken while its reset for the previous client still runs: it
   * resolves true once the connection is clean, false when the reset failed (then it is closed).
   * The client may be greeted meanwhile: a reset brings back exactly what its login gave.
   */
  readonly ready?: Promise<boolean>;
}

/** One login for `loginKey`'s parameters: what the pool calls when it needs a new connection. */
export type Login = () => Promise<ServerConnection>;

const JANITOR_MS = 1000;
/** A reset (ROLLBACK, ServerResetQuery) that takes longer fails: the connection closes. */
const RESET_TIMEOUT_MS = 30_000;

export class Pool {
  readonly name: string;
  #settings: PoolSettings;
  readonly #observer: PoolObserver;
  readonly #all = new Set<ServerConnection>();
  /** Idle connections, most recently used last. */
  readonly #idle: ServerConnection[] = [];
  /** Logins under way: they count against the size. */
  #loggingIn = 0;
  readonly #waiters: Waiter[] = [];
  /**
   * One timer for the earliest deadline among the waiting clients, and one abort listener per
   * client's signal for all its waits: a timer and a listener per wait cost more than the rest of
   * a transaction's hand-off in transaction mode.
   */
  #deadlineTimer: NodeJS.Timeout | undefined;
  #deadlineAt = Number.POSITIVE_INFINITY;
  readonly #watched = new WeakSet<AbortSignal>();
  /** Connections being cleaned after their client, and whether a new client has claimed each already. */
  readonly #resets = new Map<ServerConnection, { claimed: boolean; readonly done: Promise<boolean> }>();
  #closed = false;
  /** PAUSE: idle connections close, and those released meanwhile too, until resume(). */
  #paused = false;
  readonly #janitor: NodeJS.Timeout;
  /**
   * Transaction mode: what a client's greeting was, by its startup settings, so that the next
   * client with the same ones is greeted without a round trip (kept for the pool's life).
   */
  readonly greetings = new Map<string, unknown>();
  /** Transaction mode with the native addon: the hand-off in C (desk.ts), made at the first use. */
  #desk: Desk | undefined;
  /** Session mode with the native addon: the desk serves whole sessions (sessions()). */
  #sessionDesk: Desk | undefined;
  /** Session mode: the desk's settings id of each login key (by content: keys are interned strings). */
  readonly #sids = new Map<string, number>();
  #nextSid = 1;

  constructor(name: string, settings: PoolSettings, observer: PoolObserver) {
    this.name = name;
    this.#settings = settings;
    this.#observer = observer;
    this.#janitor = setInterval(() => this.#sweep(), JANITOR_MS).unref();
  }

  /**
   * Transaction mode's desk (desk.ts), made now when there is none; undefined without the
   * native addon, or once the pool is closed.
   */
  get desk(): Desk | undefined {
    if (this.#desk || this.#closed) return this.#desk;
    this.#desk = Desk.open({ out: (server, why) => this.#fromDesk(server, why), served: (transactions, waits, count) => this.#served(transactions, waits, count) });
    this.#desk?.config(this.#settings.queryWaitTimeoutMs, this.#settings.checkDelayMs);
    if (this.#paused) this.#desk?.stop(true);
    this.#sync();
    return this.#desk;
  }

  /**
   * Session mode in C (desk.ts, DeskSession): idle connections wait on the desk, where a client
   * takes one for its session (takeSession()) and C relays it and resets it after. `farewell`:
   * the ErrorResponse for a client whose upstream went away. False without the native addon.
   */
  sessions(counters: Float64Array, farewell: (reason: string | null) => Buffer): boolean {
    if (this.#sessionDesk) return true;
    const desk = this.desk;
    if (!desk) return false;
    const enabled = desk.sessions(
      {
        sessionEnded: (server, how) => this.#sessionEnded(server, how),
        resetAnswered: (server, answer) => this.#resetAnswered(server, answer),
        farewell,
      },
      counters,
      this.#resetMessage(),
    );
    if (enabled) this.#sessionDesk = desk;
    return enabled;
  }

  /**
   * Session mode: an idle connection of `loginKey` on the desk that needs no check, taken for a
   * client's session (DeskSession.start() relays it in C), or undefined (then acquire()).
   */
  takeSession(loginKey: string): DeskSession | undefined {
    if (!this.#sessionDesk || this.#closed || this.#paused) return undefined;
    const session = this.#sessionDesk.take(this.#sid(loginKey));
    if (!session) return undefined;
    session.server.state = 'active';
    this.#observer.reuse();
    this.#observer.waited(0);
    return session;
  }

  /** Session mode: a connection takeSession() gave whose session did not start: idle on the desk again. */
  untakeSession(session: DeskSession): void {
    this.#sessionDesk?.untake(session);
  }

  #sid(loginKey: string): number {
    let sid = this.#sids.get(loginKey);
    if (sid === undefined) {
      // At most as many as loginKeyOf keeps: a connection parked under a forgotten id is found by acquire() and parked again.
      if (this.#sids.size >= 1000) this.#sids.clear();
      if (this.#nextSid >= 0x3fffffff) this.#nextSid = 1;
      sid = this.#nextSid++;
      this.#sids.set(loginKey, sid);
    }
    return sid;
  }

  #resetMessage(): Buffer {
    return this.#settings.resetQuery.trim() === '' ? Buffer.alloc(0) : serialize.query(this.#settings.resetQuery);
  }

  /** A session C relayed ended: its connection reset in C (counted), back here (the server releases it), or ended (forgotten as it closes). */
  #sessionEnded(_server: ServerConnection, how: SessionEnd): void {
    if (how === 'reset') this.#observer.reset();
  }

  /** The reset C ran after a session answered more than it expected (ParameterStatus, a notice) or failed (counted when its session ended). */
  #resetAnswered(server: ServerConnection, answer: Buffer | null): void {
    const result = answer ? readAnswer(answer) : { ok: false, parameters: [] };
    for (const [name, value] of result.parameters) server.setParameter(name, value);
    if (!result.ok || server.closed || this.#closed || this.#paused) {
      this.#close(server, this.#closed || this.#paused ? 'shutdown' : 'reset_failed');
      return;
    }
    this.#idleOrHandOff(server);
  }

  /** Connections by state, and clients waiting: for /metrics (what the desk served is counted first). */
  get stats(): { idle: number; active: number; loggingIn: number; checking: number; resetting: number; waiting: number } {
    const desk = this.#desk?.stats;
    this.#desk?.drain();
    let active = 0;
    let checking = 0;
    let resetting = 0;
    for (const server of this.#all) {
      if (server.state === 'active') active++;
      else if (server.state === 'checking') checking++;
      else if (server.state === 'resetting') resetting++;
    }
    // The desk's idle connections, and those it resets, are 'active' to the pool (lent to the desk).
    const deskIdle = desk?.idle ?? 0;
    const deskResetting = desk?.resetting ?? 0;
    return {
      idle: this.#idle.length + deskIdle,
      active: active - deskIdle - deskResetting,
      loggingIn: this.#loggingIn,
      checking,
      resetting: resetting + deskResetting,
      waiting: this.#waiters.length + (desk?.waiting ?? 0),
    };
  }

  /** Server connections open or logging in. */
  get size(): number {
    return this.#all.size + this.#loggingIn;
  }

  /**
   * The logged-in connections, for the console's SHOW SERVERS: with the state a client of the
   * console expects, a connection idle on the desk (lent to it: 'active' to the pool) as idle.
   */
  get servers(): ReadonlyArray<{ readonly server: ServerConnection; readonly state: ServerState; readonly lastUsedAt: number }> {
    const deskIdleMs = new Map<ServerConnection, number>();
    const desk = this.#desk;
    if (desk) {
      for (const [id, server] of desk.servers) {
        const idleMs = desk.idleMs(id);
        if (idleMs >= 0) deskIdleMs.set(server, idleMs);
      }
    }
    const now = Date.now();
    return [...this.#all].map((server) => {
      const idleMs = deskIdleMs.get(server);
      return idleMs === undefined ? { server, state: server.state, lastUsedAt: server.lastUsedAt } : { server, state: 'idle', lastUsedAt: now - idleMs };
    });
  }

  /** How long the client waiting longest has waited, in milliseconds; 0 when none waits. */
  get maxWaitMs(): number {
    const first = this.#waiters[0];
    return Math.max(first ? Date.now() - first.since : 0, this.#desk?.stats.maxWaitMs ?? 0);
  }

  /** Settings in force (a reload may change them). */
  get settings(): PoolSettings {
    return this.#settings;
  }

  /**
   * A logged-in connection for a client whose startup parameters make `loginKey`: an idle one
   * that logged in with the same, else a new login, else the first to come free within
   * QueryWaitTimeout. Rejects with PoolTimeoutError, PoolClosedError (shutdown), or the login's error.
   */
  async acquire(loginKey: string, login: Login, signal: AbortSignal, started = Date.now()): Promise<Lease> {
    for (;;) {
      if (this.#closed) throw new PoolClosedError(`pool ${this.name} is closed: the proxy is shutting down`);
      if (signal.aborted) throw new Error('the client went away');
      const idle = this.#takeIdle(loginKey);
      if (idle) {
        if (Date.now() - idle.lastUsedAt >= this.#settings.checkDelayMs && !(await this.#check(idle))) continue;
        idle.state = 'active';
        this.#observer.reuse();
        this.#observer.waited((Date.now() - started) / 1000);
        return { server: idle, reused: true };
      }
      // One being cleaned after its last client is a round trip from ready, a login several.
      const resetting = this.#takeResetting(loginKey);
      if (resetting) {
        this.#observer.reuse();
        this.#observer.waited((Date.now() - started) / 1000);
        return { server: resetting.server, reused: true, ready: resetting.ready };
      }
      if (this.size >= this.#settings.size) {
        // Room for this client's login: an idle connection of other parameters goes.
        const other = this.#idle.shift();
        other?.stopWatchingIdle();
        if (other) this.#close(other, 'evicted');
      }
      if (this.size < this.#settings.size) {
        this.#loggingIn++;
        this.#sync();
        let server: ServerConnection;
        try {
          server = await login();
        } catch (error) {
          this.#loggingIn--;
          this.#sync();
          this.#wakeOne(); // the room this login held is free: a client waiting may log in
          throw error;
        }
        this.#loggingIn--;
        this.#observer.waited((Date.now() - started) / 1000);
        if (this.#closed) {
          server.close();
          throw new PoolClosedError(`pool ${this.name} is closed: the proxy is shutting down`);
        }
        this.#all.add(server);
        this.#sync();
        server.state = 'active';
        server.watchClose(() => this.#forget(server, 'server_closed'));
        this.#observer.login();
        return { server, reused: false };
      }
      const handed = await this.#wait(loginKey, started, signal);
      if (handed) {
        this.#observer.reuse();
        this.#observer.waited((Date.now() - started) / 1000);
        return { server: handed, reused: true };
      }
    }
  }

  /**
   * Transaction mode's fast path (native/txclient.h): `take` gets a connection for `loginKey`, or
   * why there is none. An idle connection that needs no check, or one that comes free while this
   * client waits, is handed over synchronously (inside giveBack(): no promise and no timer per
   * hand-off); what needs a round trip first (a login, a check, a reset under way) goes through
   * acquire(). `take` is called exactly once.
   */
  lendTo(loginKey: string, login: Login, signal: AbortSignal, take: (server: ServerConnection | undefined, error?: unknown) => void, started = Date.now()): void {
    const ready = this.#closed || signal.aborted ? undefined : this.#takeIdle(loginKey, false);
    if (ready) {
      ready.state = 'active';
      this.#observer.reuse();
      this.#observer.waited((Date.now() - started) / 1000);
      take(ready);
      return;
    }
    if (this.#closed || signal.aborted || this.#idle.length > 0 || this.#resets.size > 0 || this.size < this.#settings.size) {
      const again = (): void => this.lendTo(loginKey, login, signal, take, started);
      this.acquire(loginKey, login, signal, started).then(
        (lease) => (lease.ready ? void lease.ready.then((ok) => (ok ? take(lease.server) : again())) : take(lease.server)),
        (error: unknown) => take(undefined, error),
      );
      return;
    }
    const deadline = started + this.#settings.queryWaitTimeoutMs;
    if (deadline <= Date.now()) {
      take(undefined, this.#timeout());
      return;
    }
    this.#enqueue({
      loginKey,
      since: started,
      deadline,
      signal,
      wake: (server) => {
        if (!server) {
          this.lendTo(loginKey, login, signal, take, started); // room for a login: look again
          return;
        }
        this.#observer.reuse();
        this.#observer.waited((Date.now() - started) / 1000);
        take(server);
      },
      fail: (error) => take(undefined, error),
    });
  }

  /**
   * The client of `server` is gone. With `detached` (a pooled relay let it go) and reusable,
   * the connection is cleaned and goes back to the pool; otherwise it is closed.
   */
  release(server: ServerConnection, detached: Detached | undefined, upstreamEnded: boolean): void {
    if (detached?.reusable && server.cancelPending && !server.closed) {
      // A cancel on its way would stop the next client's query: the connection waits for it, and closes if one went unconfirmed.
      server.state = 'resetting';
      void server.cancelsSettled().then((confirmed) => this.release(server, confirmed ? detached : undefined, upstreamEnded));
      return;
    }
    if (!detached?.reusable || this.#closed || this.#paused || server.closed) {
      this.#close(server, upstreamEnded ? 'server_closed' : this.#closed || this.#paused ? 'shutdown' : 'not_reusable');
      return;
    }
    void this.#reset(server, detached.status, true);
  }

  /**
   * Transaction mode: the client of `server` ended a transaction (or left) with the server at
   * ReadyForQuery `status`. An open transaction is rolled back; ServerResetQuery runs only when
   * the client left session state behind (`leaked`). A clean connection goes straight to the
   * first client waiting for one.
   */
  giveBack(server: ServerConnection, status: string, leaked: boolean): void {
    if (this.#closed || this.#paused || server.closed) {
      this.#close(server, server.closed ? 'server_closed' : 'shutdown');
      return;
    }
    if (status === 'I' && !leaked) {
      this.#idleOrHandOff(server);
      return;
    }
    if (leaked) this.#observer.leaked();
    void this.#reset(server, status, leaked);
  }

  /** New settings from a reload: a smaller size closes idle connections above it. */
  update(settings: PoolSettings): void {
    this.#settings = settings;
    this.#desk?.config(settings.queryWaitTimeoutMs, settings.checkDelayMs);
    this.#sessionDesk?.resetQuery(this.#resetMessage());
    while (this.size > settings.size && this.#idle.length > 0) this.#close(this.#idle.shift() as ServerConnection, 'evicted');
    // Above the new size, the desk's idle connections go too.
    for (const id of [...(this.#desk?.servers.keys() ?? [])]) {
      if (this.size <= settings.size) break;
      const server = this.#desk?.reclaim(id);
      if (server) this.#close(server, 'evicted');
    }
    this.#sync();
    this.#wakeAll();
    // Room for more logins: as many clients waiting on the desk ask here.
    for (let room = settings.size - this.size; room > 0 && this.#desk?.wake(); room--);
  }

  /**
   * PAUSE from the console: closes the idle connections, and each connection as its client
   * leaves, until resume(). Clients already past the server's gate still get connections.
   */
  pause(): void {
    this.#paused = true;
    for (const server of this.#idle.splice(0)) this.#close(server, 'shutdown');
    this.#desk?.stop(true); // its idle connections come out ('reclaimed') and close
  }

  resume(): void {
    this.#paused = false;
    this.#desk?.stop(false);
  }

  /** Closes every idle connection and those released from now on; waiting clients are refused. */
  close(): void {
    this.#closed = true;
    clearInterval(this.#janitor);
    clearTimeout(this.#deadlineTimer);
    this.#deadlineTimer = undefined;
    for (const server of this.#idle.splice(0)) this.#close(server, 'shutdown');
    // Resets C runs end now (their connections would close at the end anyway), not at whatever
    // time the server answers: the janitor, whose sweep would end one that takes too long, stops here.
    this.#desk?.sweep(0);
    this.#desk?.close(); // its waiting clients ask the pool, and are refused; its idle connections close
    this.#wakeAll();
  }

  /** The most recently used idle connection of `loginKey`; with `unchecked` false, not one that ServerCheckDelay says to check first. */
  #takeIdle(loginKey: string, unchecked = true): ServerConnection | undefined {
    const now = Date.now();
    for (let i = this.#idle.length - 1; i >= 0; i--) {
      const server = this.#idle[i] as ServerConnection;
      if (server.loginKey !== loginKey) continue;
      if (!unchecked && now - server.lastUsedAt >= this.#settings.checkDelayMs) return undefined;
      this.#idle.splice(i, 1);
      this.#sync();
      server.stopWatchingIdle();
      if (now >= server.expiresAt) {
        this.#close(server, server.tokenExpired(now) ? 'token_expired' : 'lifetime');
        i = this.#idle.length; // the array changed: look again from the end
        continue;
      }
      return server;
    }
    // The desk's idle connections are this pool's too: one for a client that asks here.
    for (let taken = this.#desk?.reclaimAny(); taken; taken = this.#desk?.reclaimAny()) {
      const { server, idleMs } = taken;
      server.lastUsedAt = now - idleMs;
      if (now >= server.expiresAt) {
        this.#close(server, server.tokenExpired(now) ? 'token_expired' : 'lifetime');
        continue;
      }
      if (server.loginKey === loginKey && (unchecked || idleMs < this.#settings.checkDelayMs)) return server;
      // To be checked first (or of other parameters): the pool's idle list, where acquire() finds it.
      this.#toIdle(server, 'newest');
      return undefined;
    }
    return undefined;
  }

  /** An empty query: the connection answers, or it is closed. */
  async #check(server: ServerConnection): Promise<boolean> {
    server.state = 'checking';
    const ok = await converse(server.upstream, [''], this.#settings.checkDelayMs > 0 ? Math.max(5000, this.#settings.checkDelayMs) : 5000).then(
      (result) => result.ok,
      () => false,
    );
    if (!ok || server.closed) {
      this.#close(server, 'check_failed');
      return false;
    }
    return true;
  }

  /** A connection of these parameters whose reset runs and that no client has claimed yet. */
  #takeResetting(loginKey: string): { server: ServerConnection; ready: Promise<boolean> } | undefined {
    for (const [server, reset] of this.#resets) {
      if (server.loginKey !== loginKey || reset.claimed) continue;
      reset.claimed = true;
      return { server, ready: reset.done };
    }
    return undefined;
  }

  async #reset(server: ServerConnection, status: string, resetQuery: boolean): Promise<void> {
    let settle!: (ok: boolean) => void;
    const reset = { claimed: false, done: new Promise<boolean>((resolve) => (settle = resolve)) };
    this.#resets.set(server, reset);
    const ok = await this.#cleaned(server, status, resetQuery);
    this.#resets.delete(server);
    if (!ok) {
      settle(false);
      return;
    }
    if (reset.claimed) {
      server.state = 'active';
      settle(true);
      return;
    }
    settle(true);
    this.#idleOrHandOff(server);
  }

  /** A clean connection: to the first client waiting for one of its parameters, else idle. */
  #idleOrHandOff(server: ServerConnection): void {
    server.lastUsedAt = Date.now();
    if (Date.now() >= server.expiresAt) {
      this.#close(server, server.tokenExpired(Date.now()) ? 'token_expired' : 'lifetime');
      return;
    }
    // Almost always the first: shift() is cheap where splice() moves the whole queue.
    const at = this.#waiters[0]?.loginKey === server.loginKey ? 0 : this.#waiters.findIndex((waiter) => waiter.loginKey === server.loginKey);
    // First come, first served across both queues: a client waiting on the desk since before this one goes first.
    const deskWait = at >= 0 && this.#desk ? this.#desk.stats.maxWaitMs : 0;
    if (deskWait > 0 && Date.now() - deskWait < (this.#waiters[at] as Waiter).since) {
      server.state = 'active';
      if (this.#desk?.offer(server, serverSettingsId(server))) return;
    }
    if (at >= 0) {
      const waiter = at === 0 ? this.#waiters.shift() : this.#waiters.splice(at, 1)[0];
      this.#sync();
      server.state = 'active';
      waiter?.wake(server);
      return;
    }
    // Then to a client waiting on the desk for a connection in these settings.
    server.state = 'active';
    if (this.#desk?.offer(server, serverSettingsId(server))) return;
    // Session mode: idle on the desk, where the next client of its parameters takes it in C. Not
    // while clients of other parameters wait here: woken below, the first evicts it for its login.
    if (this.#waiters.length === 0 && this.#sessionDesk?.park(server, this.#sid(server.loginKey))) return;
    this.#toIdle(server, 'newest');
    this.#wakeOne();
  }

  /** Into the idle list (most recently used last), watched for the server's end. */
  #toIdle(server: ServerConnection, end: 'newest' | 'oldest'): void {
    server.state = 'idle';
    server.watchIdle(() => this.#close(server, 'server_closed'));
    if (end === 'newest') this.#idle.push(server);
    else this.#idle.unshift(server);
    this.#sync();
  }

  /**
   * Tells the desk whether this pool can give a connection now (an idle one, room for a login:
   * then the desk's clients ask here) and whether clients wait here (then connections the desk
   * releases come back here).
   */
  #sync(): void {
    this.#desk?.set(this.#idle.length > 0 || this.size < this.#settings.size, this.#waiters.length > 0);
  }

  /** An idle connection came off the desk by itself (desk.ts, DeskOut). */
  #fromDesk(server: ServerConnection, why: DeskOut): void {
    if (why === 'released' && !this.#closed && !this.#paused && !server.closed) {
      // Clean after its session, for this pool's waiting clients (or expired: closed there).
      this.#idleOrHandOff(server);
      return;
    }
    if (why === 'ended' || why === 'spoke' || this.#closed || this.#paused || server.closed) {
      // It ended, or the server said something while nothing ran (a shutdown's notice, a terminated backend's error).
      this.#close(server, this.#closed || this.#paused ? 'shutdown' : 'server_closed');
      return;
    }
    // Stale (expired, or idle past ServerCheckDelay): the pool's idle list, where the next take checks or closes it.
    server.lastUsedAt = Math.min(server.lastUsedAt, Date.now() - this.#settings.checkDelayMs);
    this.#toIdle(server, 'oldest');
  }

  /** What the desk served: counted as the pool's own hand-offs are. */
  #served(transactions: number, waits: Float64Array, count: number): void {
    for (let i = 0; i < transactions; i++) this.#observer.transaction(true, true);
    for (let i = 0; i < count; i++) {
      this.#observer.reuse();
      this.#observer.waited(waits[i] as number);
    }
  }

  /** ROLLBACK when a transaction was left open, then ServerResetQuery; false (and closed) when that failed or the connection may serve no more. */
  async #cleaned(server: ServerConnection, status: string, resetQuery: boolean): Promise<boolean> {
    server.state = 'resetting';
    server.stopWatchingIdle();
    const queries = status === 'I' ? [] : ['ROLLBACK'];
    if (resetQuery && this.#settings.resetQuery.trim() !== '') queries.push(this.#settings.resetQuery);
    const result = queries.length === 0 ? { ok: true, parameters: [] } : await converse(server.upstream, queries, RESET_TIMEOUT_MS).catch(() => ({ ok: false, parameters: [] }));
    for (const [name, value] of result.parameters) server.setParameter(name, value);
    if (resetQuery) server.forgetSessionState(this.#settings.resetQuery);
    this.#observer.reset();
    if (!result.ok || server.closed || this.#closed || this.#paused) {
      this.#close(server, this.#closed || this.#paused ? 'shutdown' : 'reset_failed');
      return false;
    }
    const now = Date.now();
    if (now >= server.expiresAt) {
      this.#close(server, server.tokenExpired(now) ? 'token_expired' : 'lifetime');
      return false;
    }
    return true;
  }

  #close(server: ServerConnection, reason: ServerCloseReason): void {
    if (!this.#all.has(server)) {
      server.close();
      return;
    }
    this.#forget(server, reason);
    server.close();
  }

  #forget(server: ServerConnection, reason: ServerCloseReason): void {
    if (!this.#all.delete(server)) return;
    const at = this.#idle.indexOf(server);
    if (at >= 0) this.#idle.splice(at, 1);
    this.#sync();
    this.#observer.closed(reason);
    this.#wakeOne();
  }

  /** Idle connections past ServerIdleTimeout (above MinPoolSize), their lifetime or their token close. */
  #sweep(): void {
    const now = Date.now();
    for (const server of [...this.#idle]) {
      if (now >= server.expiresAt) this.#close(server, server.tokenExpired(now) ? 'token_expired' : 'lifetime');
      else if (this.#settings.idleTimeoutMs > 0 && now - server.lastUsedAt >= this.#settings.idleTimeoutMs && this.#all.size > this.#settings.minSize) this.#close(server, 'idle');
    }
    const desk = this.#desk;
    if (!desk) return;
    desk.drain();
    desk.sweep(RESET_TIMEOUT_MS);
    for (const [id, server] of [...desk.servers]) {
      const idleMs = desk.idleMs(id);
      if (idleMs < 0) continue; // lent to a client
      server.lastUsedAt = now - idleMs;
      const expired = now >= server.expiresAt;
      if (!expired && !(this.#settings.idleTimeoutMs > 0 && idleMs >= this.#settings.idleTimeoutMs && this.#all.size > this.#settings.minSize)) continue;
      if (desk.reclaim(id)) this.#close(server, expired ? (server.tokenExpired(now) ? 'token_expired' : 'lifetime') : 'idle');
    }
  }

  #wait(loginKey: string, started: number, signal: AbortSignal): Promise<ServerConnection | undefined> {
    const deadline = started + this.#settings.queryWaitTimeoutMs;
    if (deadline <= Date.now()) return Promise.reject(this.#timeout());
    return new Promise<ServerConnection | undefined>((resolve, reject) => this.#enqueue({ loginKey, since: started, deadline, signal, wake: resolve, fail: reject }));
  }

  #enqueue(waiter: Waiter): void {
    // In the order the clients came: one woken to look again, that found nothing, keeps its place.
    // Almost always the newest: appended without a look at the others (the queue may be thousands long).
    const last = this.#waiters[this.#waiters.length - 1];
    if (!last || last.since <= waiter.since) this.#waiters.push(waiter);
    else this.#waiters.splice(this.#waiters.findIndex((other) => other.since > waiter.since), 0, waiter);
    this.#sync();
    this.#watchAbort(waiter.signal);
    this.#armDeadline(waiter.deadline);
  }

  /** A client gone while it waits leaves the queue (one listener per client, for all its waits). */
  #watchAbort(signal: AbortSignal): void {
    if (this.#watched.has(signal)) return;
    this.#watched.add(signal);
    signal.addEventListener(
      'abort',
      () => {
        for (let i = this.#waiters.length - 1; i >= 0; i--) {
          const waiter = this.#waiters[i] as Waiter;
          if (waiter.signal !== signal) continue;
          this.#waiters.splice(i, 1);
          this.#sync();
          waiter.fail(new Error('the client went away'));
        }
      },
      { once: true },
    );
  }

  #armDeadline(deadline: number): void {
    if (this.#deadlineTimer && this.#deadlineAt <= deadline) return;
    clearTimeout(this.#deadlineTimer);
    this.#deadlineAt = deadline;
    // Unreferenced: a waiting client's socket keeps the process up, not this timer once none waits.
    this.#deadlineTimer = setTimeout(() => this.#expire(), Math.max(0, deadline - Date.now())).unref();
  }

  /** QueryWaitTimeout: the clients whose deadline passed are refused; the timer goes on for the others. */
  #expire(): void {
    this.#deadlineTimer = undefined;
    this.#deadlineAt = Number.POSITIVE_INFINITY;
    const now = Date.now();
    let next = Number.POSITIVE_INFINITY;
    for (let i = 0; i < this.#waiters.length; ) {
      const waiter = this.#waiters[i] as Waiter;
      if (waiter.deadline <= now) {
        this.#waiters.splice(i, 1);
        this.#sync();
        waiter.fail(this.#timeout());
      } else {
        next = Math.min(next, waiter.deadline);
        i++;
      }
    }
    if (next !== Number.POSITIVE_INFINITY) this.#armDeadline(next);
  }

  #timeout(): PoolTimeoutError {
    const seconds = this.#settings.queryWaitTimeoutMs / 1000;
    return new PoolTimeoutError(
      `no server connection of pool ${this.name} came free within QueryWaitTimeout (${seconds} s): all ${this.#settings.size} (PoolSize) are in use`,
    );
  }

  /** Room came free: the first client waiting here looks again, else the first waiting on the desk asks here. */
  #wakeOne(): void {
    const waiter = this.#waiters.shift();
    this.#sync();
    if (waiter) waiter.wake();
    else this.#desk?.wake();
  }

  #wakeAll(): void {
    const waiters = this.#waiters.splice(0);
    this.#sync();
    for (const waiter of waiters) waiter.wake();
  }
}

/**
 * What a server answered a reset that C sent (desk.ts): ok when it ends with one ReadyForQuery,
 * idle, with no error before and nothing after; the ParameterStatus values it sent.
 */
function readAnswer(answer: Buffer): { ok: boolean; parameters: Array<[string, string]> } {
  const parameters: Array<[string, string]> = [];
  let ok = true;
  let at = 0;
  while (at + 5 <= answer.length) {
    const type = answer[at] as number;
    const end = at + 1 + answer.readUInt32BE(at + 1);
    if (end > answer.length || end < at + 5) return { ok: false, parameters };
    if (type === BackendCode.ErrorResponse) ok = false;
    else if (type === BackendCode.ParameterStatus) {
      const [name = '', value = ''] = answer.toString('utf8', at + 5, end).split('\0');
      parameters.push([name, value]);
    } else if (type === BackendCode.ReadyForQuery) {
      return { ok: ok && end === answer.length && answer[at + 5] === 0x49, parameters };
    }
    at = end;
  }
  return { ok: false, parameters };
}

/**
 * Sends each query (simple protocol) and reads until as many ReadyForQuery as queries came back,
 * status I at the end. Returns the ParameterStatus values the server sent meanwhile.
 */
export async function converse(
  upstream: Duplex,
  queries: readonly string[],
  timeoutMs: number,
): Promise<{ ok: boolean; parameters: Array<[string, string]>; error?: Array<[string, string]> }> {
  const frames = new SocketFrames(upstream, new FrameReader(1 << 20, true));
  const parameters: Array<[string, string]> = [];
  const timer = setTimeout(() => upstream.destroy(new Error('no answer in time')), timeoutMs);
  try {
    for (const query of queries) upstream.write(serialize.query(query));
    let ready = 0;
    let ok = true;
    let error: Array<[string, string]> | undefined;
    let status = 'I';
    while (ready < queries.length) {
      const { type, body } = await frames.next();
      if (type === BackendCode.ReadyForQuery) {
        ready++;
        status = String.fromCharCode(body[0] ?? 0);
      } else if (type === BackendCode.ErrorResponse) {
        ok = false;
        error ??= parseFields(body);
      } else if (type === BackendCode.ParameterStatus) {
        const [name = '', value = ''] = body.toString('utf8').split('\0');
        parameters.push([name, value]);
      }
    }
    const rest = frames.detach();
    return { ok: ok && status === 'I' && rest.length === 0, parameters, ...(error ? { error } : {}) };
  } finally {
    clearTimeout(timer);
    frames.detach();
  }
}
