/**
 * The listeners and the life of one client session: handshake, token, upstream login, relay.
 */
import { createServer, connect as netConnect, type Server, type Socket } from 'node:net';
import { statSync, unlinkSync } from 'node:fs';
import { chmod, mkdtemp, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import type { Duplex } from 'node:stream';
import type { Logger } from '../ops/log.js';
import { AUTHENTICATION_OK, backendKeyData, errorResponse, fieldsMessage, BackendCode, noticeResponse, READY_FOR_QUERY_IDLE } from '../wire/backend-messages.js';
import type { SocketFrames } from '../wire/socket-frames.js';
import { TokenError, type TokenSource } from '../token/token-source.js';
import { authenticated, clientHandshake, HandshakeError, type ClientHandshakeOptions, type HandshakeResult } from './client-handshake.js';
import { CancelKeys } from './cancel.js';
import { Relay, type RelayEnd } from './relay.js';
import { fdOf, native, NativeRelay, readAll, upstreamLost, type NativeUpstream, type SessionRelay } from './native-relay.js';
import type { DeskSession } from '../pool/desk.js';
import { NativeClient, type ClientStream } from './native-client.js';
import { connectUpstream, sendCancel, UpstreamError, type UpstreamSession, type UpstreamTarget } from './upstream.js';
import { nullObserver, type FailureReason, type ProxyObserver } from './observer.js';
import { Pool, PoolClosedError, PoolTimeoutError, type PoolSettings } from '../pool/pool.js';
import { loginKeyOf, ServerConnection } from '../pool/server-connection.js';
import { greet, StartupRefused, TransactionSession, type TransactionContext } from '../pool/transaction-session.js';
import { startupSettings, UnsupportedStartup } from '../pool/client-settings.js';
import { WakeUp, withWakeUp } from './wake-up.js';
import type { ComputeLocator } from '../lakebase/locator.js';
import type { Router } from './shared-port.js';
import type { ConsoleGate } from '../admin/gate.js';
import { clientState, describeClient, peerState, type ClientState } from './client-state.js';
import { closeFd, NativeListener, toSocket, type Arrival } from './native-listener.js';
import { decodeStartupPacket } from '../wire/startup-packets.js';

export interface ListenOptions {
  readonly address: string;
  readonly port: number;
  /** A folder: the socket is `<dir>/.s.PGSQL.<port>`, so that `psql -h <dir>` works. */
  readonly unixSocketDir: string | undefined;
  /** Permission bits of the socket file; default 0o600 (owner only). */
  readonly unixSocketMode: number;
}

export interface ProxyOptions {
  readonly name: string;
  readonly listen: ListenOptions;
  readonly upstream: UpstreamTarget;
  /** The upstream identity: the `user` of every upstream login. */
  readonly identity: string;
  readonly defaultDatabase: string;
  readonly clientAuth: ClientHandshakeOptions;
  /** A client must finish its startup and authentication within this time. */
  readonly startupTimeoutMs: number;
  /** Most sessions at once (clients past their startup and authentication); 0 means no limit. */
  readonly maxConnections: number;
  /**
   * Most clients in their startup at once (TLS, StartupMessage, authentication); 0 means no limit.
   * Apart from maxConnections, so that clients that never finish their startup cannot keep
   * logged-in users out until the startup timeout.
   */
  readonly maxStartups: number;
  /** Close a session with no query running and no byte either way for this long; 0 means never. */
  readonly idleTimeoutMs: number;
  /** native: OpenSSL's TLS and the relay in C when built, for plain clients; js: Node's TLS and streams always. */
  readonly relay: 'native' | 'js';
  /**
   * session: pooled upstream logins (native relay sessions); transaction: a connection per
   * transaction (relayed here, message by message); none: one login per client.
   */
  readonly pool: PoolSettings & { readonly mode: 'session' | 'transaction' | 'none'; readonly maxPrepared: number };
}

export interface ProxyDeps {
  readonly tokenSource: TokenSource;
  /** The database's locator when it is named (LakebaseInstance, LakebaseEndpoint): host and compute state. */
  readonly locator?: ComputeLocator | undefined;
  readonly logger: Logger;
  readonly observer?: ProxyObserver;
  /**
   * Set for the front of a port that several targets share: after the client's startup and
   * authentication, the session goes to the target its database names (see shared-port.ts).
   */
  readonly router?: Router;
  /** Cancel keys shared by the targets of one port, so that a cancel request finds its session's. */
  readonly cancelKeys?: CancelKeys;
  /** The admin console (src/admin): a client whose database names it is served there, never upstream. */
  readonly console?: ConsoleGate;
}

/** An error the proxy turns into an ErrorResponse for the client. */
interface ClientFacing {
  readonly sqlstate: string;
  readonly message: string;
}

interface Session {
  relay: SessionRelay | undefined;
  /** The client's Node.js socket; dropped once C has taken the client over (an idle client holds less). */
  socket: Socket | undefined;
  /** Past its startup and authentication: counted against maxConnections. */
  established: boolean;
  /** Accepted while refusing new clients: turned away with 57P03, never waited for by drained(). */
  readonly late: boolean;
  readonly state: ClientState;
}

/** PAUSE looks every so often whether the running sessions have ended (as drained() does). */
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** What a client that starts up during the shutdown's drain gets, as Postgres answers then. */
const SHUTTING_DOWN: ClientFacing = { sqlstate: '57P03', message: 'the proxy is shutting down' };

type SessionHandshake = Extract<HandshakeResult, { kind: 'session' }>;

/** A session handed over by a shared port's front, its client already authenticated. */
interface Adopted {
  readonly handshake: SessionHandshake;
  readonly started: number;
}

export class ProxyServer {
  #options: ProxyOptions;
  readonly #deps: ProxyDeps;
  readonly #observer: ProxyObserver;
  readonly #log: Logger;
  readonly #servers: Server[] = [];
  readonly #sessions = new Set<Session>();
  readonly #cancelKeys: CancelKeys;
  readonly #cancelsInFlight = new Set<Promise<void>>();
  /** Bytes the native relay moved, added to by C as it goes, read by the metrics at scrape. */
  readonly #nativeBytes: Float64Array;
  #socketPath: string | undefined;
  /** Pooled upstream logins, by database. */
  readonly #pools = new Map<string, Pool>();
  /** Transaction-mode sessions by database: they use its pool between transactions, with or without a connection in it. */
  readonly #transactionClients = new Map<string, number>();
  /** The unix socket file while it is ours to remove (see listenOnUnixSocket). */
  #socketFile: SocketFile | undefined;
  /** false from refuseNewClients() on: new clients are answered 57P03 while the listeners stay open. */
  #accepting = false;
  /** Whether upstream connections are OpenSSL's in C, for the native relay. */
  readonly #nativeUpstream: boolean;
  /** Session mode on the native relay: C serves sessions from idle connections on each pool's desk (#runOnDesk). */
  readonly #sessionsOnDesk: boolean;
  /** Retries of the upstream connect while the compute starts. */
  readonly #wakeUp: WakeUp;
  /** Set by PAUSE: new sessions wait at the gate until resume() settles it. */
  #paused: { readonly resumed: Promise<void>; readonly resume: () => void } | undefined;
  /** Refusing new clients or stopped: a client held by PAUSE is turned away. */
  #ending = false;
  /** The TCP listener in C, when it took over Node.js' (#listenInC). */
  #listener: NativeListener | undefined;
  /** The TCP port bound, kept once Node.js' listener has given its socket to C. */
  #tcpPort: number | undefined;

  constructor(options: ProxyOptions, deps: ProxyDeps) {
    this.#options = options;
    this.#deps = deps;
    this.#observer = deps.observer ?? nullObserver;
    this.#log = deps.logger.child({ target: options.name });
    this.#cancelKeys = deps.cancelKeys ?? new CancelKeys();
    this.#wakeUp = new WakeUp({ target: options.upstream, locator: deps.locator, logger: this.#log, waited: (outcome) => this.#observer.computeWaited(outcome) });
    this.#nativeBytes = this.#observer.byteCounters();
    this.#nativeUpstream = options.relay === 'native' && native.addon !== undefined;
    this.#sessionsOnDesk = this.#nativeUpstream && options.pool.mode === 'session';
    this.#observer.watchPools(() => {
      const total = { idle: 0, active: 0, loggingIn: 0, checking: 0, resetting: 0, waiting: 0 };
      for (const pool of this.#pools.values()) {
        const stats = pool.stats;
        for (const key of Object.keys(total) as Array<keyof typeof total>) total[key] += stats[key];
      }
      return total;
    });
    if (options.relay === 'native' && !native.addon && !nativeProblemLogged) {
      nativeProblemLogged = true;
      this.#log.warn({ reason: native.problem }, 'the native relay did not load; every session uses the JavaScript relay');
    }
  }

  get options(): ProxyOptions {
    return this.#options;
  }

  /**
   * New settings from a reload, for the sessions that start from now on; the pools take their
   * new sizes and timeouts at once. The listener (address, port, unix socket) stays as it is.
   */
  update(options: ProxyOptions): void {
    this.#options = { ...options, listen: this.#options.listen };
    for (const pool of this.#pools.values()) pool.update(options.pool);
    this.#listener?.configure(this.#startupsInC(), options.maxStartups, options.startupTimeoutMs);
    this.#startupsChanged();
  }

  /** The clients of this server now, from their startup to their end. */
  clients(): ClientState[] {
    return [...this.#sessions].map((session) => session.state);
  }

  /** The pools of upstream connections, by database. */
  get pools(): ReadonlyMap<string, Pool> {
    return this.#pools;
  }

  get paused(): boolean {
    return this.#paused !== undefined;
  }

  /**
   * PAUSE, as PgBouncer does it in session mode: clients that finish their startup from now on
   * wait at the gate (up to QueryWaitTimeout) until resume(); idle pooled connections close, and
   * the others as their clients leave. Resolves once no session is past the gate, that is when
   * every client that was running has left; rejects when `signal` aborts (the pause stays).
   */
  async pause(signal?: AbortSignal): Promise<void> {
    if (!this.#paused) {
      let resume!: () => void;
      const resumed = new Promise<void>((resolve) => (resume = resolve));
      this.#paused = { resumed, resume };
      for (const pool of this.#pools.values()) pool.pause();
    }
    const running = (): boolean => [...this.#sessions].some((session) => session.established && !session.state.paused);
    while (running()) {
      if (signal?.aborted) throw signal.reason;
      await sleep(50);
    }
  }

  /** At shutdown (or the target's removal), clients held by PAUSE are turned away: no one would resume them. */
  #turnAwayHeld(): void {
    this.#ending = true;
    const paused = this.#paused;
    if (!paused) return;
    let resume!: () => void;
    const resumed = new Promise<void>((resolve) => (resume = resolve));
    this.#paused = { resumed, resume };
    paused.resume();
  }

  /** Ends a pause: held clients go on. Whether the server was paused. */
  resume(): boolean {
    const paused = this.#paused;
    if (!paused) return false;
    this.#paused = undefined;
    for (const pool of this.#pools.values()) pool.resume();
    paused.resume();
    return true;
  }

  /** KILL CLIENT: ends the session of client `id` at once. Whether this server had it. */
  kill(id: number): boolean {
    for (const session of this.#sessions) {
      if (session.state.id !== id) continue;
      if (session.relay) session.relay.close('shutdown');
      else session.socket?.destroy();
      return true;
    }
    return false;
  }

  /** Open client connections, authenticated or not. */
  get connections(): number {
    return this.#sessions.size;
  }

  /** Whether a client that finishes its startup now is turned away (maxConnections sessions are open). */
  get atCapacity(): boolean {
    return this.options.maxConnections > 0 && this.#count(true) >= this.options.maxConnections;
  }

  /** Sessions past their startup (established) or still in it; counted only where a limit is set. */
  #count(established: boolean): number {
    let n = 0;
    for (const session of this.#sessions) if (session.established === established) n++;
    return n;
  }

  /**
   * Tells the listener in C how many clients are in their startup here in Node.js (the unix
   * socket's, those C passed on), which it counts with its own against MaxStartups as #accept
   * counts its. Called where a session enters or leaves its startup; a walk of the sessions, as
   * #accept's, only while a limit is set.
   */
  #startupsChanged(): void {
    if (this.#listener && this.options.maxStartups > 0) this.#listener.outside = this.#count(false);
  }

  /** The TCP port actually bound (differs from options when 0 was asked for). */
  get port(): number {
    if (this.#tcpPort !== undefined) return this.#tcpPort;
    const address = this.#servers[0]?.address();
    return typeof address === 'object' && address ? address.port : this.options.listen.port;
  }

  get socketPath(): string | undefined {
    return this.#socketPath;
  }

  async listen(): Promise<void> {
    const { address, port, unixSocketDir } = this.options.listen;
    this.#accepting = true; // from the first listener's first client
    const tcp = this.#newServer();
    await listenOn(tcp, { host: address, port }, `port ${port} on ${address} is already in use; choose another with --port`, this.#log);
    this.#servers.push(tcp);
    this.#listenInC(tcp);
    if (unixSocketDir !== undefined) {
      const path = join(unixSocketDir, `.s.PGSQL.${this.options.listen.port === 0 ? this.port : port}`);
      try {
        if (Buffer.byteLength(path) > 107) {
          throw new Error(`unix socket path ${path} is longer than the 107 bytes the system allows; choose a shorter --unix-socket folder`);
        }
        const unix = this.#newServer();
        this.#socketFile = await listenOnUnixSocket(unix, path, this.options.listen.unixSocketMode, this.#log);
        this.#servers.push(unix);
      } catch (error) {
        this.stopAccepting(); // the TCP listener too: a failed listen() leaves nothing open
        throw error;
      }
      this.#socketPath = path;
    }
  }

  /**
   * The listeners stay open, and a client that starts up from now on is answered SQLSTATE 57P03
   * "the proxy is shutting down" (as Postgres does while it shuts down) instead of finding the
   * port closed; cancel requests are still forwarded. Open sessions go on.
   */
  refuseNewClients(): void {
    this.#listener?.handOver(); // clients in their startup in C: this server's, accepted before the refusal, as Node.js' would be
    this.#accepting = false;
    this.#turnAwayHeld();
    this.#endTransactionClients();
    for (const pool of this.#pools.values()) pool.close(); // idle connections now, the others as their clients leave
  }

  /**
   * Stops listening at once; open sessions go on. The pools close their idle connections now and
   * the others as their clients leave (an open upstream connection would keep the process alive).
   */
  stopAccepting(): void {
    this.#listener?.handOver(); // as Node.js' listener leaves its accepted clients: they go on (late ones get 57P03)
    this.#accepting = false;
    this.#turnAwayHeld();
    this.#endTransactionClients();
    for (const server of this.#servers) server.close();
    this.#listener?.close();
    this.#listener = undefined;
    for (const pool of this.#pools.values()) pool.close();
    if (this.#socketFile) removeSocketFile(this.#socketFile);
    this.#socketFile = undefined;
  }

  /** Transaction mode: a client between transactions has nothing to finish, and goes now. */
  #endTransactionClients(): void {
    for (const session of this.#sessions) if (session.relay instanceof TransactionSession) session.relay.endAfterTransaction();
  }

  /**
   * Resolves when every session accepted before refuseNewClients() has ended and every cancel it
   * caused was sent (clients turned away meanwhile are not waited for).
   */
  async drained(): Promise<void> {
    const waiting = (): boolean => this.#cancelsInFlight.size > 0 || [...this.#sessions].some((session) => !session.late);
    while (waiting()) await new Promise((resolve) => setTimeout(resolve, 50));
  }

  /** Closes every session at once. */
  closeAll(): void {
    for (const session of this.#sessions) {
      if (session.relay) session.relay.close('shutdown');
      else session.socket?.destroy();
    }
  }

  async close(): Promise<void> {
    this.stopAccepting();
    this.closeAll();
    await this.drained();
    this.#pools.clear();
  }

  /** The pool of `database`'s upstream connections (made at its first client). */
  #poolFor(database: string): Pool {
    let pool = this.#pools.get(database);
    if (!pool) {
      pool = new Pool(`${this.options.name}/${database}`, this.options.pool, this.#observer.pool);
      // Session mode on the native relay: idle connections wait in C, which relays and resets whole sessions on them.
      if (this.#sessionsOnDesk) pool.sessions(this.#nativeBytes, (reason) => upstreamLost(`${this.options.upstream.host}:${this.options.upstream.port}`, reason));
      if (this.#paused) pool.pause();
      this.#pools.set(database, pool);
    }
    return pool;
  }

  /** A connection given to a client that left before its session began goes back, once clean. */
  async #giveBackUnused(database: string, server: ServerConnection, ready: Promise<boolean> | undefined): Promise<void> {
    if (ready && !(await ready)) return; // closed by the pool already
    this.#pools.get(database)?.release(server, { reusable: true, status: 'I' }, false);
  }

  /** A pool with no connection, no client waiting and no transaction-mode client goes (a client may name any database). */
  #dropIfEmpty(database: string): void {
    const pool = this.#pools.get(database);
    if (pool && pool.size === 0 && pool.stats.waiting === 0 && !this.#transactionClients.get(database)) {
      pool.close();
      this.#pools.delete(database);
    }
  }

  #newServer(): Server {
    return createServer({ noDelay: true, pauseOnConnect: false }, (socket) => this.#accept(socket));
  }

  #accept(socket: Socket): void {
    socket.on('error', () => {}); // every failure is handled where the socket is used; none may crash the process
    if (this.options.maxStartups > 0 && this.#count(false) + (this.#listener?.pending ?? 0) >= this.options.maxStartups) {
      this.#tooManyStartups(socket);
      return;
    }
    this.#start({ relay: undefined, socket, established: false, late: !this.#accepting, state: clientState(socket, this.options.name) });
  }

  #tooManyStartups(socket: Socket): void {
    this.#observer.clientRejected();
    this.#observer.failure('too_many_startups');
    refuse(socket, { sqlstate: '53300', message: `sorry, too many clients starting up already (lakebase-proxy --max-startups ${this.options.maxStartups})` });
  }

  /**
   * Whether C reads plain clients' startups (native/listener.h): only where a pooled session may
   * start from there, that is session mode on the native relay, trust, no client TLS (C answers
   * every SSLRequest 'N') and not a shared port's front (whose targets serve the sessions).
   */
  #startupsInC(): boolean {
    const { clientAuth } = this.options;
    return this.#sessionsOnDesk && !this.#deps.router && clientAuth.authMethod === 'trust' && clientAuth.tls === undefined;
  }

  /**
   * Hands the TCP listener's socket to C, which accepts and reads startups from then on (#arrived).
   * Kept in Node.js where C would only pass every client on.
   */
  #listenInC(tcp: Server): void {
    if (!this.#startupsInC()) return;
    const port = this.port;
    const listener = NativeListener.open(tcp, (arrival) => this.#arrived(arrival));
    if (typeof listener === 'string') {
      this.#log.warn({ reason: listener }, 'clients are accepted by Node.js: the listener in C could not start');
      return;
    }
    listener.configure(true, this.options.maxStartups, this.options.startupTimeoutMs);
    this.#listener = listener;
    this.#tcpPort = port;
    this.#servers.splice(this.#servers.indexOf(tcp), 1);
    tcp.close(); // its socket only: C listens on its own copy
  }

  /** A client the listener in C accepted: served here at once (#onDesk), else made a Node.js socket for the usual way. */
  #arrived(arrival: Arrival): void {
    let owned = arrival.fd >= 0; // until a Node.js socket or C has it: then never closed here
    const disown = (): void => {
      owned = false;
    };
    try {
      if (arrival.kind === 'timeout' || arrival.kind === 'gone') {
        // Counted as a client that came and went, as one that Node.js accepted is.
        this.#observer.clientOpened();
        this.#observer.clientClosed();
        if (arrival.kind === 'gone') return;
        this.#observer.failure('startup_timeout');
        this.#log.info({ peer: peerOf(arrival.remote) }, 'client did not complete its startup in time; dropped');
        return;
      }
      if (arrival.kind === 'startup' && this.#onDesk(arrival, disown)) return;
      const socket = toSocket(arrival);
      disown();
      if (arrival.kind === 'busy') {
        socket.on('error', () => {});
        this.#tooManyStartups(socket);
      } else {
        this.#accept(socket);
      }
    } catch (error) {
      this.#log.error({ err: (error as Error).message }, 'a client from the listener could not be served');
      if (owned) closeFd(arrival.fd);
    }
  }

  /**
   * A client whose startup C read: its session on an idle connection of its pool's desk, started
   * in this call, when it may have one (as #run would give it one); false for the usual way.
   * `disown`: the client's socket is C's or a Node.js socket's now.
   */
  #onDesk(arrival: Arrival, disown: () => void): boolean {
    const data = arrival.data;
    if (!data || data.length < 8 || !this.#accepting || this.#paused || !this.#startupsInC() || this.atCapacity) return false;
    const length = data.readInt32BE(0);
    if (length < 8 || length > data.length) return false;
    let parameters: ReadonlyMap<string, string>;
    try {
      const packet = decodeStartupPacket(data.subarray(4, length));
      if (packet.kind !== 'startup' || packet.minor !== 0) return false;
      parameters = packet.parameters;
    } catch {
      return false; // the usual way says what is wrong
    }
    for (const name of parameters.keys()) if (name.startsWith('_pq_.')) return false;
    if (this.#deps.console?.claims(parameters)) return false;
    const database = this.#database(parameters);
    const taken = this.#pools.get(database)?.takeSession(loginKeyOf(forwardedParameters(parameters, database)));
    if (!taken) return false;
    const state = peerState(arrival.remote, arrival.local ?? { address: this.options.listen.address, port: this.port }, this.options.name);
    describeClient(state, { parameters });
    const session: Session = { relay: undefined, socket: undefined, established: true, late: false, state };
    this.#sessions.add(session);
    this.#observer.clientOpened();
    Object.assign(state, { database, state: 'waiting', since: Date.now() });
    const { fd } = arrival;
    const client: DeskClient = {
      fd,
      first: data.subarray(length),
      own: true,
      refuse: (facing) => {
        const socket = toSocket({ ...arrival, data: undefined });
        disown();
        socket.on('error', () => {});
        socket.once('close', () => {
          if (this.#sessions.delete(session)) this.#observer.clientClosed();
        });
        authenticated(socket);
        refuse(socket, facing);
      },
      taken: disown,
    };
    this.#runOnDesk(session, taken, { client, database, peer: peerOf(arrival.remote), user: parameters.get('user') as string, started: Date.now() });
    return true;
  }

  /** A session from a shared port's front, its client authenticated there: the rest of it runs here. */
  #adopt(session: Session, adopted: Adopted): void {
    this.#start(session, adopted);
  }

  #start(session: Session, adopted?: Adopted): void {
    const socket = session.socket as Socket; // set until C takes the client over, later
    session.state.target = this.options.name;
    this.#sessions.add(session);
    this.#observer.clientOpened();
    this.#startupsChanged();
    socket.once('close', () => {
      // A session with a relay ends with it (the native relay closes Node's socket at its start);
      // one that a shared port's front handed to its target is that target's.
      if (session.relay || !this.#sessions.delete(session)) return;
      this.#observer.clientClosed();
      this.#startupsChanged();
    });
    this.#run(session, adopted).catch((error: unknown) => {
      this.#log.error({ err: error instanceof Error ? error.message : String(error) }, 'session failed unexpectedly');
      socket.destroy();
    });
  }

  async #run(session: Session, adopted?: Adopted): Promise<void> {
    const started = adopted?.started ?? Date.now();
    const raw = session.socket as Socket;
    const peer = peerOf(session.state.remote);
    const handshake = adopted?.handshake ?? (await this.#handshake(raw, peer));
    if (handshake === undefined) return;

    if (handshake.kind === 'cancel') {
      raw.destroy();
      await this.#cancel(handshake.processId, handshake.secretKey);
      return;
    }
    if (!adopted) describeClient(session.state, handshake);
    const claimed = this.#deps.console?.claims(handshake.parameters) === true;
    // AuthenticationOk now (a shared port's front sent it already), unless C may greet this client
    // from an idle connection of its pool's desk: then in one write with the greeting (#runOnDesk).
    let authOkDue = !adopted;
    const sendAuthOk = (): void => {
      if (!authOkDue) return;
      authOkDue = false;
      authenticated(handshake.socket);
    };
    const onDesk = !claimed && !this.#deps.router && !this.#paused && this.#sessionsOnDesk && handshake.socket === raw && raw.writableLength === 0;
    if (!onDesk) sendAuthOk();
    if (claimed && this.#deps.console) {
      this.#sessions.delete(session); // the console's from here on, not waited for by drained()
      this.#observer.clientClosed();
      this.#startupsChanged();
      const viaUnixSocket = raw.remoteAddress === undefined;
      this.#deps.console.serve({
        socket: handshake.socket,
        frames: handshake.frames,
        parameters: handshake.parameters,
        state: session.state,
        authMethod: this.options.clientAuth.authMethod,
        unixSocketMode: viaUnixSocket ? this.options.listen.unixSocketMode : undefined,
        cancelKeys: this.#cancelKeys,
      });
      return;
    }
    if (this.#deps.router) {
      this.#dispatch(session, handshake, started, peer);
      return;
    }
    // Counted from here, after the startup: a client that never finishes it holds no session slot.
    if (this.atCapacity) {
      sendAuthOk();
      this.#observer.clientRejected();
      this.#observer.failure('too_many_connections');
      this.#log.info({ peer, maxConnections: this.options.maxConnections }, 'client turned away at --max-connections');
      handshake.frames.detach();
      refuse(handshake.socket, { sqlstate: '53300', message: `sorry, too many clients already (lakebase-proxy --max-connections ${this.options.maxConnections})` });
      return;
    }
    session.established = true;
    this.#startupsChanged();

    const { socket: client, parameters, frames } = handshake;
    const clientUser = parameters.get('user') as string;
    const database = this.#database(parameters);
    // A shared port's client keeps the name it asked for (the target's); others show the database used.
    Object.assign(session.state, { ...(adopted ? {} : { database }), state: 'waiting', since: Date.now() });
    // Not paused (no gate to wait at): an idle connection of the pool's desk, when there is one, serves the session in C.
    if (onDesk && !raw.destroyed) {
      const taken = this.#pools.get(database)?.takeSession(loginKeyOf(forwardedParameters(parameters, database)));
      if (taken) {
        raw.pause();
        const detached = frames.detach();
        const fromNode = readAll(raw);
        const client: DeskClient = {
          fd: raw.destroyed ? undefined : fdOf(raw),
          first: fromNode.length > 0 ? Buffer.concat([detached, fromNode]) : detached,
          own: false,
          refuse: (facing) => {
            authenticated(raw);
            refuse(raw, facing);
          },
          taken: () => raw.destroy(), // Node's descriptor only: C has its own copy
        };
        this.#runOnDesk(session, taken, { client, database, peer, user: clientUser, started });
        return;
      }
    }
    sendAuthOk();
    const abort = new AbortController();
    const onClientGone = (): void => abort.abort();
    raw.once('close', onClientGone);
    const held = await this.#gate(session, abort.signal);
    if (held) {
      raw.off('close', onClientGone);
      frames.detach();
      if (!abort.signal.aborted) {
        this.#log.info({ peer, user: clientUser, database, sqlstate: held.sqlstate, reason: held.message }, 'client held by PAUSE turned away');
        refuse(client, held);
      }
      return;
    }

    if (this.options.pool.mode === 'transaction') {
      raw.off('close', onClientGone);
      await this.#runTransactions(session, { client, raw, frames, parameters, database, abort, peer, user: clientUser, started });
      return;
    }
    const forwarded = forwardedParameters(parameters, database);
    // The native relay takes a plain client; a client on TLS stays with Node's streams. Only
    // native connections outlive their client, so only they are pooled.
    const inC = this.#nativeUpstream && client === raw;
    const pooled = inC && this.options.pool.mode === 'session';
    const login = (): Promise<UpstreamSession & { tokenExpiresAt: Date | undefined }> =>
      this.#login(forwarded, inC, abort.signal, (message) => void client.write(noticeResponse(message)));

    let upstream: UpstreamSession;
    let server: ServerConnection | undefined;
    let reused = false;
    /** Pending while the pooled connection's reset for its last client runs. */
    let ready: Promise<boolean> | undefined;
    try {
      if (pooled) {
        let fresh: UpstreamSession | undefined;
        const loginKey = loginKeyOf(forwarded);
        const lease = await this.#poolFor(database)
          .acquire(
            loginKey,
            async () => {
              const session = await login();
              fresh = session;
              // Node's TLS after all (the native side refused this target's trust settings): not poolable.
              if (!session.native) throw new NotPoolable();
              return ServerConnection.fromLogin(session, loginKey, session.tokenExpiresAt, this.options.pool.lifetimeMs);
            },
            abort.signal,
          )
          .catch((error: unknown) => {
            if (error instanceof NotPoolable && fresh) return undefined;
            throw error;
          });
        server = lease?.server;
        reused = lease?.reused ?? false;
        ready = lease?.ready;
        upstream = fresh ?? pooledSession(server as ServerConnection);
      } else {
        upstream = await login();
      }
    } catch (error) {
      raw.off('close', onClientGone);
      frames.detach();
      if (pooled) this.#dropIfEmpty(database);
      const facing = this.#clientFacing(error);
      this.#log.warn({ peer, user: clientUser, database, sqlstate: facing.sqlstate, reason: facing.message }, 'upstream login failed');
      if (!abort.signal.aborted) refuse(client, facing, error instanceof UpstreamError ? error.fields : undefined, this.#context(database));
      return;
    }
    raw.off('close', onClientGone);
    if (abort.signal.aborted) {
      // The client left before its session began: its connection, clean, goes back to the pool.
      if (server) void this.#giveBackUnused(database, server, ready);
      else upstream.socket.destroy();
      frames.detach();
      return;
    }

    session.state.upstream = {
      processId: upstream.processId,
      tls: `${upstream.tls.version}/${upstream.tls.cipher}`,
      connectedAt: server?.connectedAt ?? Date.now(),
      server,
    };
    const target = this.options.upstream;
    const upstreamKey = { processId: upstream.processId, secretKey: upstream.secretKey };
    const cancelUpstream = async (): Promise<void> => {
      const sent = sendCancel(target, upstreamKey.processId, upstreamKey.secretKey);
      await (server ? server.cancelling(sent) : sent);
    };
    const clientKey = this.#cancelKeys.register({ ...upstreamKey, cancel: cancelUpstream });
    const hello = withKey(upstream.greeting, clientKey);
    const onAbandoned = (): void => this.#cancelAbandoned(peer, cancelUpstream);
    const upstreamName = `${target.host}:${target.port}`;
    // A pooled client is greeted at once, with its AuthenticationOk (corked by the handshake) in
    // the same write, and reads it while the relay starts. A connection still being cleaned for
    // its last client is a round trip from ready: what its reset brings back is known, and the
    // client's first query waits for it.
    const greeted = server !== undefined;
    if (greeted) {
      client.write(hello);
      client.uncork();
    }
    if (ready && !(await ready)) {
      clientKey.release();
      frames.detach();
      this.#log.warn({ peer, database }, 'a pooled upstream connection failed its reset');
      refuse(client, { sqlstate: '08006', message: `the pooled connection to upstream ${upstreamName} failed while it was being cleaned; connect again` });
      return;
    }
    const clientFirst = frames.detach();
    let relay: SessionRelay | undefined;
    if (upstream.native) {
      const started = await NativeRelay.start({
        client: raw,
        upstream: upstream.native,
        clientFirst,
        toClientFirst: greeted ? upstream.leftover : upstream.leftover.length > 0 ? Buffer.concat([hello, upstream.leftover]) : hello,
        upstreamName,
        counters: this.#nativeBytes,
        onAbandoned,
        pooled: server !== undefined,
      });
      if (started instanceof NativeRelay) relay = started;
      else this.#log.info({ peer, reason: started.reason }, 'session stays on the JavaScript relay');
    }
    if (!relay) {
      if (raw.destroyed || upstream.socket.destroyed) {
        // A side went away before the relay started: nothing to relay.
        clientKey.release();
        if (server && !upstream.socket.destroyed && upstream.leftover.length === 0) {
          // The client left after its greeting (a Terminate and FIN at once, as a connection
          // check does): nothing it sent reached the server, whose connection goes back clean.
          void this.#giveBackUnused(database, server, undefined);
          return;
        }
        if (server) this.#pools.get(database)?.release(server, undefined, false);
        upstream.socket.destroy();
        if (!raw.destroyed) refuse(client, { sqlstate: '08006', message: `upstream ${upstreamName} closed the connection during login` });
        return;
      }
      if (!greeted) client.write(hello);
      relay = new Relay(client, upstream.socket, clientFirst, upstream.leftover, upstreamName, this.#observer.bytes, onAbandoned);
    }
    if (this.options.idleTimeoutMs > 0) {
      if (relay instanceof NativeRelay) relay.idleTimeout(this.options.idleTimeoutMs);
      else idleTimeout(raw, relay, this.options.idleTimeoutMs);
    }
    session.relay = relay;
    const relayKind = relay instanceof NativeRelay ? 'native' : 'js';
    Object.assign(session.state, { state: 'active', since: Date.now(), relay: relayKind });
    this.#observer.sessionStarted(relayKind);
    this.#log.debug({ peer, user: clientUser, database, relay: relayKind }, 'session started');
    // #run returns now, so that nothing of the handshake and login stays alive for the session.
    const pool = server ? this.#pools.get(database) : undefined;
    const giveBack = (end: RelayEnd): void => {
      clientKey.release();
      if (!server || !pool) return;
      pool.release(server, relay instanceof NativeRelay ? relay.detached : undefined, end === 'upstream_closed' || end === 'upstream_error');
      this.#dropIfEmpty(database);
    };
    this.#whenEnded(session, relay, giveBack, { peer, user: clientUser, database, started, relay: relayKind, pooled: server !== undefined, reused });
  }

  /**
   * Session mode's quick path: the client's session on an idle connection of its pool's desk,
   * greeted (AuthenticationOk included), relayed and (after it) reset by C, with no await between
   * the startup and the relay.
   */
  #runOnDesk(session: Session, relay: DeskSession, c: { client: DeskClient; database: string; peer: string; user: string; started: number }): void {
    const { client, database, peer } = c;
    const pool = this.#pools.get(database) as Pool;
    const server = relay.server;
    const target = this.options.upstream;
    // The connection stays this client's until the cancel settled: it goes back to the pool, which waits for it, not to C's reset.
    const cancelUpstream = async (): Promise<void> => {
      relay.hold();
      await server.cancelling(sendCancel(target, server.processId, server.secretKey));
    };
    const clientKey = this.#cancelKeys.register({ processId: server.processId, secretKey: server.secretKey, cancel: cancelUpstream });
    const hello = Buffer.concat([AUTHENTICATION_OK, withKey(server.greeting(), clientKey)]);
    relay.onAbandoned = () => this.#cancelAbandoned(peer, cancelUpstream);
    session.relay = relay;
    let refused: string | undefined;
    try {
      refused = client.fd !== undefined ? relay.start(client.fd, hello, client.first, client.own) : 'the client socket cannot be taken over';
    } catch (error) {
      // The addon throws before it takes the descriptor (N-API failed): a refusal like the others,
      // or the session would stay listed and counted, drained() would wait for it, the connection taken.
      refused = (error as Error).message;
    }
    if (refused !== undefined) {
      session.relay = undefined;
      clientKey.release();
      pool.untakeSession(relay);
      this.#log.warn({ peer, reason: refused }, 'a pooled session could not start');
      client.refuse({ sqlstate: '08006', message: `the session could not start: ${refused}; connect again` });
      return;
    }
    client.taken();
    if (this.options.idleTimeoutMs > 0) relay.idleTimeout(this.options.idleTimeoutMs);
    session.state.upstream = { processId: server.processId, tls: `${server.tls.version}/${server.tls.cipher}`, connectedAt: server.connectedAt, server };
    Object.assign(session.state, { state: 'active', since: Date.now(), relay: 'native' });
    this.#observer.sessionStarted('native');
    // startupInC: the listener in C read its startup (Node.js never had its socket).
    this.#log.debug({ peer, user: c.user, database, relay: 'native', onDesk: true, ...(client.own ? { startupInC: true } : {}) }, 'session started');
    const giveBack = (end: RelayEnd): void => {
      clientKey.release();
      // Back to the pool (to roll back, to close): as a pooled relay's detach. Ended: closed, for the
      // reason a pooled relay's end gives (the pool forgets it now). Kept on the desk (reset in C): nothing to do.
      if (relay.how === 'back') pool.release(server, relay.detached, false);
      else if (relay.how === 'ended') pool.release(server, undefined, end === 'upstream_closed' || end === 'upstream_error');
      this.#dropIfEmpty(database);
    };
    this.#whenEnded(session, relay, giveBack, { peer, user: c.user, database, started: c.started, relay: 'native', pooled: true, reused: true });
  }

  /** A session ended while its query ran upstream: the query is cancelled (shutdown waits for the cancel). */
  #cancelAbandoned(peer: string, cancelUpstream: () => Promise<void>): void {
    this.#log.info({ peer }, 'session ended during a query; cancelling it upstream');
    const sent = cancelUpstream().catch(() => {});
    this.#cancelsInFlight.add(sent);
    void sent.then(() => this.#cancelsInFlight.delete(sent));
  }

  /**
   * One upstream login with `parameters`: a token, then TCP, TLS (native when asked and possible)
   * and the startup, waking a suspended compute on the way. `notice` tells the waiting client.
   */
  async #login(
    parameters: ReadonlyMap<string, string>,
    native: boolean,
    signal: AbortSignal,
    notice: (text: string) => void,
  ): Promise<UpstreamSession & { tokenExpiresAt: Date | undefined }> {
    const token = await this.#deps.tokenSource.getToken({ notice, signal });
    const connectStarted = process.hrtime.bigint();
    const session = await withWakeUp(() => connectUpstream(this.options.upstream, this.options.identity, token.value, parameters, signal, { native }), this.#wakeUp, { signal, notice });
    this.#observer.upstreamConnected(Number(process.hrtime.bigint() - connectStarted) / 1e9);
    return { ...session, tokenExpiresAt: token.expiresAt };
  }

  /**
   * PoolMode=transaction: the client is greeted with what a connection of the pool reports once
   * it took the client's startup settings, and holds a connection only while a transaction runs.
   * Logins (with the database alone) are made for whichever client needs one when the pool has room.
   */
  async #runTransactions(
    session: Session,
    c: { client: Duplex; raw: Socket; frames: SocketFrames; parameters: ReadonlyMap<string, string>; database: string; abort: AbortController; peer: string; user: string; started: number },
  ): Promise<void> {
    const { client, raw, frames, database, abort, peer } = c;
    const onClientGone = (): void => abort.abort();
    raw.once('close', onClientGone);
    const target = this.options.upstream;
    const upstreamName = `${target.host}:${target.port}`;
    const loginParameters = new Map([['database', database]]);
    const loginKey = loginKeyOf(loginParameters);
    // To the client's stream of the moment: C's once the socket is adopted (a login may come at any transaction).
    let current: ClientStream = client;
    const notice = (text: string): void => void current.write(noticeResponse(text));
    const context: TransactionContext = {
      pool: this.#poolFor(database),
      loginKey,
      maxPrepared: this.options.pool.maxPrepared,
      upstreamName,
      observer: this.#observer.pool,
      onBytes: this.#observer.bytes,
      cancel: (server) => sendCancel(target, server.processId, server.secretKey),
      login: async () => {
        const upstream = await this.#login(loginParameters, this.#nativeUpstream, abort.signal, notice);
        return ServerConnection.fromLogin(upstream, loginKey, upstream.tokenExpiresAt, this.options.pool.lifetimeMs, true);
      },
    };
    let greeted: Awaited<ReturnType<typeof greet>>;
    try {
      greeted = await greet(context, startupSettings(c.parameters), abort.signal);
    } catch (error) {
      raw.off('close', onClientGone);
      frames.detach();
      this.#dropIfEmpty(database);
      const facing = error instanceof UnsupportedStartup ? error : error instanceof StartupRefused ? { sqlstate: '', message: error.message } : this.#clientFacing(error);
      this.#log.warn({ peer, user: c.user, database, sqlstate: facing.sqlstate || undefined, reason: facing.message }, 'client refused at its startup');
      if (!abort.signal.aborted) {
        if (error instanceof StartupRefused) refuse(client, { sqlstate: '08006', message: error.message }, error.fields);
        else refuse(client, facing, error instanceof UpstreamError ? error.fields : undefined, error instanceof UpstreamError ? this.#context(database) : undefined);
      }
      return;
    }
    raw.off('close', onClientGone);
    if (abort.signal.aborted) {
      frames.detach();
      return;
    }
    let relay: TransactionSession | undefined;
    const clientKey = this.#cancelKeys.register({ processId: 0, secretKey: Buffer.alloc(4), cancel: () => relay?.cancel() ?? Promise.resolve() });
    client.write(Buffer.concat([...greeted.greeting, backendKeyData(clientKey.processId, clientKey.secretKey), READY_FOR_QUERY_IDLE]));
    client.uncork(); // with the AuthenticationOk the handshake held back: one write
    let first = frames.detach();
    // A plain client's socket goes to C, whose fast path carries the commonest transactions (native/txclient.h).
    let stream: ClientStream = client;
    const adopted = this.#nativeUpstream && client === raw ? await NativeClient.adopt(raw, this.#nativeBytes) : undefined;
    if (adopted) {
      stream = adopted.client;
      current = stream;
      session.socket = undefined;
      if (adopted.unread.length > 0) first = Buffer.concat([first, adopted.unread]);
    }
    if (!adopted && raw.destroyed) {
      // Gone while its greeting was written: nothing of the session began.
      clientKey.release();
      this.#dropIfEmpty(database);
      return;
    }
    const relayName = adopted ? 'native' : 'js';
    relay = new TransactionSession(stream, first, greeted.settings, context);
    this.#transactionClients.set(database, (this.#transactionClients.get(database) ?? 0) + 1);
    const session$ = relay;
    if (this.options.idleTimeoutMs > 0) {
      if (adopted) adopted.client.idleTimeout(this.options.idleTimeoutMs, () => session$.queryRunning, () => session$.close('idle_timeout'));
      else idleTimeout(raw, relay, this.options.idleTimeoutMs);
    }
    session.relay = relay;
    Object.assign(session.state, { state: 'active', since: Date.now(), relay: relayName });
    this.#observer.sessionStarted(relayName);
    const release = (): void => {
      clientKey.release();
      const left = (this.#transactionClients.get(database) ?? 1) - 1;
      if (left > 0) this.#transactionClients.set(database, left);
      else this.#transactionClients.delete(database);
      this.#dropIfEmpty(database);
    };
    this.#whenEnded(session, relay, release, { peer, user: c.user, database, started: c.started, relay: relayName, pooled: true, reused: true });
  }

  /**
   * While the server is paused, the session waits here; undefined once it may go on, or the
   * refusal for its client when QueryWaitTimeout passed first or the client left.
   */
  async #gate(session: Session, signal: AbortSignal): Promise<ClientFacing | undefined> {
    const started = Date.now();
    try {
      while (this.#paused && !signal.aborted) {
        if (this.#ending) return SHUTTING_DOWN;
        session.state.paused = true;
        const left = this.options.pool.queryWaitTimeoutMs - (Date.now() - started);
        if (left <= 0) {
          return { sqlstate: '57P03', message: `target ${this.options.name} is paused (PAUSE from the console) and was not resumed within QueryWaitTimeout (${this.options.pool.queryWaitTimeoutMs / 1000} s)` };
        }
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([
          this.#paused.resumed,
          new Promise<void>((resolve) => {
            timer = setTimeout(resolve, left);
            signal.addEventListener('abort', () => resolve(), { once: true });
          }),
        ]);
        clearTimeout(timer);
      }
    } finally {
      session.state.paused = false;
    }
    return signal.aborted ? { sqlstate: '08006', message: 'the client went away' } : undefined;
  }

  /** The client's startup and authentication within StartupTimeout; undefined when it was refused or dropped. */
  async #handshake(raw: Socket, peer: string): Promise<HandshakeResult | undefined> {
    const startupTimer = setTimeout(() => {
      this.#observer.failure('startup_timeout');
      this.#log.info({ peer }, 'client did not complete its startup in time; dropped');
      raw.destroy();
    }, this.options.startupTimeoutMs);
    try {
      return await clientHandshake(raw, this.options.clientAuth, () => (this.#accepting ? undefined : SHUTTING_DOWN));
    } catch (error) {
      if (error instanceof HandshakeError) {
        this.#observer.failure(error.sqlstate === '28P01' ? 'client_password' : error.sqlstate === SHUTTING_DOWN.sqlstate ? 'shutting_down' : 'protocol');
        this.#log.info({ peer, sqlstate: error.sqlstate, reason: error.message }, 'client handshake refused');
        refuse(error.socket ?? raw, error);
      } else {
        raw.destroy();
      }
      return undefined;
    } finally {
      clearTimeout(startupTimer);
    }
  }

  /**
   * A shared port's front: hands the authenticated client to the target named by its database
   * (as PgBouncer's [databases] does), which logs in to that target's upstream database.
   */
  #dispatch(session: Session, handshake: SessionHandshake, started: number, peer: string): void {
    const router = this.#deps.router as Router;
    // Postgres' own default: no database named means the one named like the user.
    const asked = handshake.parameters.get('database') || (handshake.parameters.get('user') as string);
    const target = router.route(asked);
    this.#sessions.delete(session);
    this.#observer.clientClosed();
    if (!target) {
      this.#observer.failure('unknown_database');
      this.#log.info({ peer, database: asked }, 'client asked for a database this port does not serve');
      handshake.frames.detach();
      refuse(handshake.socket, { sqlstate: '3D000', message: `database "${asked}" does not exist; this port serves: ${router.names.join(', ')}` });
      return;
    }
    const parameters = new Map(handshake.parameters).set('database', target.options.defaultDatabase);
    target.#adopt(session, { started, handshake: { ...handshake, parameters } });
  }

  #whenEnded(
    session: Session,
    relay: SessionRelay,
    release: (end: RelayEnd) => void,
    about: { peer: string; user: string; database: string; started: number; relay: string; pooled: boolean; reused: boolean },
  ): void {
    void relay.done.then((end: RelayEnd) => {
      release(end);
      this.#sessions.delete(session);
      this.#observer.clientClosed();
      this.#log.info(
        {
          peer: about.peer,
          user: about.user,
          database: about.database,
          durationMs: Date.now() - about.started,
          bytesToUpstream: relay.stats.bytesToUpstream,
          bytesToClient: relay.stats.bytesToClient,
          relay: about.relay,
          ...(about.pooled ? { pooled: true, reused: about.reused } : {}),
          end,
        },
        'session ended',
      );
    });
  }

  async #cancel(processId: number, secretKey: Buffer): Promise<void> {
    const upstream = this.#cancelKeys.lookup(processId, secretKey);
    if (!upstream) {
      this.#observer.cancel('unknown_key');
      this.#log.info('cancel request with an unknown key ignored');
      return;
    }
    try {
      await upstream.cancel();
      this.#observer.cancel('forwarded');
      this.#log.info('cancel request forwarded to upstream');
    } catch (error) {
      this.#observer.cancel('error');
      this.#log.warn({ err: (error as Error).message }, 'could not forward cancel request');
    }
  }

  /**
   * The client's database, or the configured default when the client named none or only echoed
   * its own user name (what libpq sends when no database is given).
   */
  #database(parameters: ReadonlyMap<string, string>): string {
    const asked = parameters.get('database');
    if (asked === undefined || asked === '' || asked === parameters.get('user')) return this.options.defaultDatabase;
    return asked;
  }

  #context(database: string): string {
    const { host, port } = this.options.upstream;
    return `lakebase-proxy: login to ${host}:${port} database "${database}" as "${this.options.identity}" with ${this.#deps.tokenSource.describe()}`;
  }

  #clientFacing(error: unknown): ClientFacing {
    let reason: FailureReason;
    let facing: ClientFacing;
    if (error instanceof TokenError) {
      reason = 'token';
      facing = { sqlstate: error.sqlstate, message: `could not obtain a token for ${this.options.identity}: ${error.message}` };
    } else if (error instanceof UpstreamError) {
      reason = error.fields ? 'upstream_auth' : 'upstream_connect';
      facing = error;
    } else if (error instanceof PoolClosedError) {
      reason = 'shutting_down';
      facing = error;
    } else if (error instanceof PoolTimeoutError) {
      reason = 'pool_timeout';
      facing = error;
    } else {
      reason = 'upstream_connect';
      facing = { sqlstate: '08006', message: `login to upstream failed: ${(error as Error).message}` };
    }
    this.#observer.failure(reason);
    return facing;
  }
}

/** A client about to be served from a pool's desk (#runOnDesk), from Node.js' socket or from the listener in C. */
interface DeskClient {
  /** Its socket; undefined when it has none any more. */
  readonly fd: number | undefined;
  /** What it sent after its startup, read already. */
  readonly first: Buffer;
  /** C takes `fd` itself (the listener's), not a copy (Node.js' socket's). */
  readonly own: boolean;
  /** AuthenticationOk and the error, then the end: the session did not start. */
  refuse(facing: ClientFacing): void;
  /** C has the client now. */
  taken(): void;
}

function peerOf(remote: ClientState['remote']): string {
  return remote ? `${remote.address}:${remote.port}` : 'unix socket';
}

/** A login that Node's TLS made: it cannot be pooled, and serves its client alone. */
class NotPoolable extends Error {}

/** A reused connection as the session sees it: the greeting a fresh login with its parameters would give. */
function pooledSession(server: ServerConnection): UpstreamSession {
  return {
    socket: server.upstream as NativeUpstream,
    native: server.upstream as NativeUpstream,
    greeting: server.greeting(),
    processId: server.processId,
    secretKey: server.secretKey,
    leftover: Buffer.alloc(0),
    tls: server.tls,
  };
}

/** What the upstream login gets of a client's startup: its parameters but the user (ours is the token's), with the database it maps to. */
function forwardedParameters(parameters: ReadonlyMap<string, string>, database: string): Map<string, string> {
  const forwarded = new Map(parameters);
  forwarded.delete('user');
  forwarded.set('database', database);
  return forwarded;
}

/** A greeting (ParameterStatus messages, ReadyForQuery last) with our BackendKeyData just before its ReadyForQuery. */
function withKey(greeting: readonly Buffer[], key: { readonly processId: number; readonly secretKey: number }): Buffer {
  return Buffer.concat([...greeting.slice(0, -1), backendKeyData(key.processId, key.secretKey), ...greeting.slice(-1)]);
}

/** The native relay's load failure is said once per process, not per target. */
let nativeProblemLogged = false;

/** Idle means no byte either way and no query running: a long query is not idle. */
function idleTimeout(raw: Socket, relay: SessionRelay, ms: number): void {
  const idle = (): void => {
    if (relay.queryRunning) raw.setTimeout(ms, idle); // the callback is a once-listener
    else relay.close('idle_timeout');
  };
  raw.setTimeout(ms, idle); // reads and writes on the client socket re-arm it
}

/** Sends an ErrorResponse (the upstream's own fields, with the proxy's context, when given) and closes. */
function refuse(socket: Duplex, error: ClientFacing, upstreamFields?: ReadonlyArray<readonly [string, string]>, context?: string): void {
  let message: Buffer;
  if (upstreamFields) {
    const fields = upstreamFields.filter(([letter]) => letter !== 'W');
    const where = upstreamFields.find(([letter]) => letter === 'W')?.[1];
    if (context) fields.push(['W', where ? `${where}\n${context}` : context]);
    message = fieldsMessage(BackendCode.ErrorResponse, fields);
  } else {
    message = errorResponse({ code: error.sqlstate, message: error.message });
  }
  if (socket.writable) socket.end(message);
  setTimeout(() => socket.destroy(), 1000).unref();
}

function listenOn(server: Server, where: { host: string; port: number } | { path: string }, busyMessage: string, logger: Logger): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const onError = (error: NodeJS.ErrnoException): void => {
      reject(error.code === 'EADDRINUSE' ? new Error(busyMessage) : new Error(`cannot listen on ${'path' in where ? where.path : `${where.host}:${where.port}`}: ${error.message}`));
    };
    server.once('error', onError);
    server.listen({ ...where, backlog: 1024 }, () => {
      server.off('error', onError);
      server.on('error', (error) => logger.error({ err: error.message }, 'listener error'));
      resolve();
    });
  });
}

interface SocketFile {
  readonly path: string;
  /** Its inode: the file is removed only while it is still this one. */
  readonly ino: number;
}

/**
 * Listens on the unix socket `path` with `mode` from the moment the path exists. bind() creates
 * the file with the umask's mode, and a chmod after listen leaves a window in which anyone the
 * umask lets in may connect. Narrowing the process umask around listen() would narrow every file
 * the thread pool creates meanwhile too (a settings folder made without its x bit). So the socket
 * is bound inside a private folder (mkdtemp: mode 0700, beside `path`, so on the same file
 * system), given its mode there where no one else can reach it, and renamed into place: the bound
 * socket moves with its name, and a stale file left by a process that died is replaced at once.
 * libuv removes only the name it bound on close, so the file is removed by removeSocketFile.
 */
async function listenOnUnixSocket(server: Server, path: string, mode: number, logger: Logger): Promise<SocketFile> {
  if (await socketInUse(path)) throw new Error(`unix socket ${path} is in use by another server; choose another --unix-socket folder or --port`);
  let folder: string;
  try {
    folder = await mkdtemp(join(dirname(path), '.lbp-'));
  } catch (error) {
    throw new Error(`cannot listen on ${path}: ${(error as Error).message}`);
  }
  try {
    const bound = join(folder, basename(path));
    if (Buffer.byteLength(bound) > 107) {
      throw new Error(`unix socket path ${path} is too long: it is bound first at ${bound}, longer than the 107 bytes the system allows; choose a shorter --unix-socket folder`);
    }
    await listenOn(server, { path: bound }, `unix socket ${bound} is in use`, logger);
    try {
      await chmod(bound, mode);
      await rename(bound, path);
      return { path, ino: (await stat(path)).ino };
    } catch (error) {
      server.close();
      throw new Error(`cannot listen on ${path}: ${(error as Error).message}`);
    }
  } finally {
    await rm(folder, { recursive: true, force: true });
  }
}

function removeSocketFile(file: SocketFile): void {
  try {
    if (statSync(file.path).ino === file.ino) unlinkSync(file.path);
  } catch {
    // already gone
  }
}

/** Whether a server answers on the socket file `path` (a file left by a process that died does not). */
function socketInUse(path: string): Promise<boolean> {
  return new Promise<boolean>((resolve) => {
    const probe: Socket = netConnect({ path });
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
}
