/**
 * The listeners and the life of one client session: handshake, token, upstream login, relay.
 */
import { createServer, connect as netConnect, type Server, type Socket } from 'node:net';
import { chmod, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import type { Logger } from '../ops/log.js';
import { backendKeyData, errorResponse, fieldsMessage, BackendCode, noticeResponse } from '../wire/backend-messages.js';
import { TokenError, type TokenSource } from '../token/token-source.js';
import { clientHandshake, HandshakeError, type ClientHandshakeOptions, type HandshakeResult } from './client-handshake.js';
import { CancelKeys } from './cancel.js';
import { Relay, type RelayEnd } from './relay.js';
import { native, NativeRelay, type SessionRelay } from './native-relay.js';
import { connectUpstream, sendCancel, UpstreamError, type UpstreamTarget } from './upstream.js';
import { nullObserver, type FailureReason, type ProxyObserver } from './observer.js';
import { WakeUp, withWakeUp } from './wake-up.js';
import type { ComputeLocator } from '../lakebase/locator.js';
import type { Router } from './shared-port.js';

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
  /** 0 means no limit. */
  readonly maxConnections: number;
  /** Close a session with no query running and no byte either way for this long; 0 means never. */
  readonly idleTimeoutMs: number;
  /** native: the C relay when it is built and the session allows (plain client, TLS 1.3 upstream); js: Node streams always. */
  readonly relay: 'native' | 'js';
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
}

/** An error the proxy turns into an ErrorResponse for the client. */
interface ClientFacing {
  readonly sqlstate: string;
  readonly message: string;
}

interface Session {
  relay: SessionRelay | undefined;
  socket: Socket;
}

type SessionHandshake = Extract<HandshakeResult, { kind: 'session' }>;

/** A session handed over by a shared port's front, its client already authenticated. */
interface Adopted {
  readonly handshake: SessionHandshake;
  readonly started: number;
}

export class ProxyServer {
  readonly options: ProxyOptions;
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
  #accepting = false;
  /** Whether sessions go through the tap (native relay possible). */
  readonly #tapUpstream: boolean;
  /**
   * Until when sessions skip the tap because the upstream could not be relayed natively (TLS 1.2,
   * another cipher): they would be refused too, and the tap would slow them for nothing. Tried
   * again after LASTING_REFUSAL_MS, in case the upstream changed.
   */
  #untappedUntil = 0;
  /** Retries of the upstream connect while the compute starts. */
  readonly #wakeUp: WakeUp;

  constructor(options: ProxyOptions, deps: ProxyDeps) {
    this.options = options;
    this.#deps = deps;
    this.#observer = deps.observer ?? nullObserver;
    this.#log = deps.logger.child({ target: options.name });
    this.#cancelKeys = deps.cancelKeys ?? new CancelKeys();
    this.#wakeUp = new WakeUp({ target: options.upstream, locator: deps.locator, logger: this.#log, waited: (outcome) => this.#observer.computeWaited(outcome) });
    this.#nativeBytes = this.#observer.byteCounters();
    this.#tapUpstream = options.relay === 'native' && native.addon !== undefined;
    if (options.relay === 'native' && !native.addon) this.#log.debug({ reason: native.problem }, 'native relay not available; using the JavaScript relay');
  }

  /** Open client connections, authenticated or not. */
  get connections(): number {
    return this.#sessions.size;
  }

  get atCapacity(): boolean {
    return this.options.maxConnections > 0 && this.#sessions.size >= this.options.maxConnections;
  }

  /** The TCP port actually bound (differs from options when 0 was asked for). */
  get port(): number {
    const address = this.#servers[0]?.address();
    return typeof address === 'object' && address ? address.port : this.options.listen.port;
  }

  get socketPath(): string | undefined {
    return this.#socketPath;
  }

  async listen(): Promise<void> {
    const { address, port, unixSocketDir } = this.options.listen;
    const tcp = this.#newServer();
    await listenOn(tcp, { host: address, port }, `port ${port} on ${address} is already in use; choose another with --port`, this.#log);
    this.#servers.push(tcp);
    if (unixSocketDir !== undefined) {
      const path = join(unixSocketDir, `.s.PGSQL.${this.options.listen.port === 0 ? this.port : port}`);
      if (Buffer.byteLength(path) > 107) {
        throw new Error(`unix socket path ${path} is longer than the 107 bytes the system allows; choose a shorter --unix-socket folder`);
      }
      await removeStaleSocket(path);
      const unix = this.#newServer();
      await listenOn(unix, { path }, `unix socket ${path} is in use by another server; choose another --unix-socket folder or --port`, this.#log);
      await chmod(path, this.options.listen.unixSocketMode);
      this.#servers.push(unix);
      this.#socketPath = path;
    }
    this.#accepting = true;
  }

  /** Stops listening at once; open sessions go on. */
  stopAccepting(): void {
    this.#accepting = false;
    for (const server of this.#servers) server.close();
  }

  /** Resolves when every open session has ended and every cancel it caused was sent. */
  async drained(): Promise<void> {
    while (this.#sessions.size > 0 || this.#cancelsInFlight.size > 0) await new Promise((resolve) => setTimeout(resolve, 50));
  }

  /** Closes every session at once. */
  closeAll(): void {
    for (const session of this.#sessions) {
      if (session.relay) session.relay.close('shutdown');
      else session.socket.destroy();
    }
  }

  async close(): Promise<void> {
    this.stopAccepting();
    this.closeAll();
    await this.drained();
  }

  #newServer(): Server {
    return createServer({ noDelay: true, pauseOnConnect: false }, (socket) => this.#accept(socket));
  }

  #accept(socket: Socket): void {
    socket.on('error', () => {}); // every failure is handled where the socket is used; none may crash the process
    if (!this.#accepting) {
      socket.destroy();
      return;
    }
    if (this.atCapacity) {
      this.#turnAway(socket);
      return;
    }
    this.#start({ relay: undefined, socket });
  }

  /** A session from a shared port's front, its client authenticated there: the rest of it runs here. */
  #adopt(session: Session, adopted: Adopted): void {
    if (this.atCapacity) {
      adopted.handshake.frames.detach();
      this.#turnAway(adopted.handshake.socket);
      return;
    }
    this.#start(session, adopted);
  }

  #turnAway(socket: Duplex): void {
    this.#observer.clientRejected();
    this.#observer.failure('too_many_connections');
    refuse(socket, { sqlstate: '53300', message: `sorry, too many clients already (lakebase-proxy --max-connections ${this.options.maxConnections})` });
  }

  #start(session: Session, adopted?: Adopted): void {
    const { socket } = session;
    this.#sessions.add(session);
    this.#observer.clientOpened();
    socket.once('close', () => {
      // A session with a relay ends with it (the native relay closes Node's socket at its start);
      // one that a shared port's front handed to its target is that target's.
      if (session.relay || !this.#sessions.delete(session)) return;
      this.#observer.clientClosed();
    });
    this.#run(session, adopted).catch((error: unknown) => {
      this.#log.error({ err: error instanceof Error ? error.message : String(error) }, 'session failed unexpectedly');
      socket.destroy();
    });
  }

  async #run(session: Session, adopted?: Adopted): Promise<void> {
    const started = adopted?.started ?? Date.now();
    const raw = session.socket;
    const peer = raw.remoteAddress ? `${raw.remoteAddress}:${raw.remotePort}` : 'unix socket';
    const handshake = adopted?.handshake ?? (await this.#handshake(raw, peer));
    if (handshake === undefined) return;

    if (handshake.kind === 'cancel') {
      raw.destroy();
      await this.#cancel(handshake.processId, handshake.secretKey);
      return;
    }
    if (this.#deps.router) {
      this.#dispatch(session, handshake, started, peer);
      return;
    }

    const { socket: client, parameters, frames } = handshake;
    const clientUser = parameters.get('user') as string;
    const database = this.#database(parameters);
    const abort = new AbortController();
    const onClientGone = (): void => abort.abort();
    raw.once('close', onClientGone);

    let upstream;
    try {
      const token = await this.#deps.tokenSource.getToken({
        notice: (message) => client.write(noticeResponse(message)),
        signal: abort.signal,
      });
      const connectStarted = process.hrtime.bigint();
      const forwarded = new Map(parameters);
      forwarded.delete('user');
      forwarded.set('database', database);
      // The native relay can take a plain client over; a client on TLS stays with Node's streams.
      const tap = this.#tapUpstream && client === raw && Date.now() >= this.#untappedUntil;
      upstream = await withWakeUp(() => connectUpstream(this.options.upstream, this.options.identity, token.value, forwarded, abort.signal, { tap }), this.#wakeUp, {
        signal: abort.signal,
        notice: (message) => client.write(noticeResponse(message)),
      });
      this.#observer.upstreamConnected(Number(process.hrtime.bigint() - connectStarted) / 1e9);
    } catch (error) {
      raw.off('close', onClientGone);
      frames.detach();
      const facing = this.#clientFacing(error);
      this.#log.warn({ peer, user: clientUser, database, sqlstate: facing.sqlstate, reason: facing.message }, 'upstream login failed');
      if (!abort.signal.aborted) refuse(client, facing, error instanceof UpstreamError ? error.fields : undefined, this.#context(database));
      return;
    }
    raw.off('close', onClientGone);
    if (abort.signal.aborted) {
      upstream.socket.destroy();
      frames.detach();
      return;
    }

    const target = this.options.upstream;
    const upstreamKey = { processId: upstream.processId, secretKey: upstream.secretKey };
    const cancelUpstream = (): Promise<void> => sendCancel(target, upstreamKey.processId, upstreamKey.secretKey);
    const clientKey = this.#cancelKeys.register({ ...upstreamKey, cancel: cancelUpstream });
    // The upstream's ReadyForQuery ends the greeting; our BackendKeyData goes just before it.
    const greeting = upstream.greeting;
    const hello = Buffer.concat([...greeting.slice(0, -1), backendKeyData(clientKey.processId, clientKey.secretKey), ...greeting.slice(-1)]);
    const onAbandoned = (): void => {
      this.#log.info({ peer }, 'session ended during a query; cancelling it upstream');
      const sent = cancelUpstream().catch(() => {});
      this.#cancelsInFlight.add(sent);
      void sent.then(() => this.#cancelsInFlight.delete(sent));
    };
    const upstreamName = `${target.host}:${target.port}`;
    const clientFirst = frames.detach();
    let relay: SessionRelay | undefined;
    if (upstream.tap) {
      relay = await this.#handOver({
        client: raw,
        tls: upstream.socket,
        tap: upstream.tap,
        clientFirst,
        toClientFirst: upstream.leftover.length > 0 ? Buffer.concat([hello, upstream.leftover]) : hello,
        upstreamName,
        counters: this.#nativeBytes,
        onAbandoned,
      }, peer);
    }
    if (!relay) {
      if (raw.destroyed || upstream.socket.destroyed) {
        // A side went away while the hand-over waited for Node's queued bytes: nothing to relay.
        clientKey.release();
        upstream.socket.destroy();
        if (!raw.destroyed) refuse(client, { sqlstate: '08006', message: `upstream ${upstreamName} closed the connection during login` });
        return;
      }
      upstream.tap?.forget();
      client.write(hello);
      relay = new Relay(client, upstream.socket, clientFirst, upstream.leftover, upstreamName, this.#observer.bytes, onAbandoned);
    }
    if (this.options.idleTimeoutMs > 0) {
      if (relay instanceof NativeRelay) relay.idleTimeout(this.options.idleTimeoutMs);
      else idleTimeout(raw, relay, this.options.idleTimeoutMs);
    }
    session.relay = relay;
    const relayKind = relay instanceof NativeRelay ? 'native' : 'js';
    this.#log.debug({ peer, user: clientUser, database, relay: relayKind }, 'session started');
    // #run returns now, so that nothing of the handshake and login stays alive for the session.
    this.#whenEnded(session, relay, clientKey.release, { peer, user: clientUser, database, started, relay: relayKind });
  }

  /** The client's startup and authentication within StartupTimeout; undefined when it was refused or dropped. */
  async #handshake(raw: Socket, peer: string): Promise<HandshakeResult | undefined> {
    const startupTimer = setTimeout(() => {
      this.#observer.failure('startup_timeout');
      this.#log.info({ peer }, 'client did not complete its startup in time; dropped');
      raw.destroy();
    }, this.options.startupTimeoutMs);
    try {
      return await clientHandshake(raw, this.options.clientAuth);
    } catch (error) {
      if (error instanceof HandshakeError) {
        this.#observer.failure(error.sqlstate === '28P01' ? 'client_password' : 'protocol');
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

  /** The native relay for the session, or undefined (the reason logged) when it stays on the JavaScript relay. */
  async #handOver(args: Parameters<typeof NativeRelay.handOver>[0], peer: string): Promise<NativeRelay | undefined> {
    const relay = await NativeRelay.handOver(args);
    if (relay instanceof NativeRelay) return relay;
    this.#log.debug({ peer, reason: relay.reason }, 'session stays on the JavaScript relay');
    if (relay.lasting) {
      this.#untappedUntil = Date.now() + LASTING_REFUSAL_MS;
      this.#log.info({ reason: relay.reason }, "the native relay cannot take this upstream's sessions; they use the JavaScript relay");
    }
    return undefined;
  }

  #whenEnded(
    session: Session,
    relay: SessionRelay,
    release: () => void,
    about: { peer: string; user: string; database: string; started: number; relay: string },
  ): void {
    void relay.done.then((end: RelayEnd) => {
      release();
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
    } else {
      reason = 'upstream_connect';
      facing = { sqlstate: '08006', message: `login to upstream failed: ${(error as Error).message}` };
    }
    this.#observer.failure(reason);
    return facing;
  }
}

/** How long the upstream's sessions skip the tap after a refusal that is the upstream's own (its TLS). */
const LASTING_REFUSAL_MS = 10 * 60_000;

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

/** A socket file left by a process that died is removed; one in use is left alone. */
async function removeStaleSocket(path: string): Promise<void> {
  const inUse = await new Promise<boolean>((resolve) => {
    const probe: Socket = netConnect({ path });
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (!inUse) await unlink(path).catch(() => {});
}
