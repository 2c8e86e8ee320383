/**
 * The upstream connection in C (native/relay.c, built by `npm install` when a C compiler is
 * there): an OpenSSL `SSL` object of its own on the upstream socket, from the TLS handshake on,
 * and the relay between it and a plain client socket, run by libuv on Node's event loop with no
 * JavaScript per read or write.
 *
 * OpenSSL does all of TLS; no key or secret ever leaves it. Node.js does the TCP connect and the
 * SSLRequest (plaintext), then hands the socket to C before any TLS byte. The Postgres login
 * stays in TypeScript (upstream.ts): `NativeUpstream` is a Duplex of the connection's plaintext
 * during the login. At ReadyForQuery, `NativeRelay.start()` attaches the client socket; when C
 * refuses it, the same logged-in connection is relayed by relay.ts over that Duplex instead.
 */
import { createRequire } from 'node:module';
import type { Socket } from 'node:net';
import { Duplex } from 'node:stream';
import * as tls from 'node:tls';
import { readFileSync } from 'node:fs';
import { errorResponse } from '../wire/backend-messages.js';
import type { RelayEnd, RelayStats } from './relay.js';

export type Handle = object;

interface Addon {
  context(verify: boolean, systemStore: boolean, caPem: Buffer | null): Handle | string;
  connect(
    context: Handle,
    fd: number,
    serverName: string | null,
    host: string | null,
    onHandshake: (error: string | null, verifyCode: number) => void,
    onData: (data: Buffer | null, error: string | null) => void,
    onEnd: (end: RelayEnd, toUpstream: number, toClient: number) => void,
  ): Handle | string;
  /** Bytes still queued in C (-1: closed); onData gets an empty Buffer once they are written. */
  write(conn: Handle, data: Buffer): number;
  /** close_notify and FIN once what is queued is written. */
  end(conn: Handle): void;
  pause(conn: Handle, paused: boolean): void;
  certificate(conn: Handle): Buffer | undefined;
  info(conn: Handle): [string, string, boolean];
  relay(
    conn: Handle,
    clientFd: number,
    toClientFirst: Buffer,
    toUpstreamFirst: Buffer,
    counters: Float64Array,
    onAbandoned: () => void,
    farewell: (reason: string | null) => Buffer | undefined,
    onDetached: ((end: RelayEnd, toUpstream: number, toClient: number, reusable: boolean, status: string) => void) | null,
  ): string | undefined;
  detach(conn: Handle, end: RelayEnd): void;
  close(conn: Handle, end: RelayEnd): void;
  state(conn: Handle): [number, number];
  /** A transaction-mode client (native/txclient.h; src/proxy/native-client.ts): C calls `self` through clientCallbacks' functions. */
  client(fd: number, counters: Float64Array, totals: Float64Array, self: object): Handle | string;
  /** Once, before any client: what C calls with each client's `self` first. */
  clientCallbacks(
    onData: (self: never, data: Buffer | null, error: string | null) => void,
    onNeed: (self: never, unit: Buffer | null, waitedMs: number) => void,
    onBack: (self: never, how: number, status: number, flags: number, running: boolean, reports: Buffer | null, rest: Buffer | null, reason: string | null, deskId: number) => void,
    onEnd: (self: never) => void,
    onRewrite: (self: never, unit: Buffer, deskId: number) => Buffer | null,
  ): void;
  clientWrite(client: Handle, data: Buffer): number;
  clientEnd(client: Handle): void;
  clientClose(client: Handle): void;
  clientPause(client: Handle, paused: boolean): void;
  clientFast(client: Handle, first: Buffer): boolean;
  /** true: the connection joined the client's desk; a string: refused. */
  clientAttach(client: Handle, conn: Handle, unread: Buffer, settings: Buffer, unit: Buffer, joinId: number, sid: number, expiresInMs: number): boolean | string;
  clientDesk(client: Handle, desk: Handle | null, sid: number): void;
  clientHold(client: Handle): void;
  /** Whether the fast path carries a statement of this text (native/txclient.c, lp_text_plain). */
  textPlain(text: Buffer): boolean;
  clientJs(client: Handle): Buffer;
  clientState(client: Handle): [number, number, number, number];
  /** A transaction pool's hand-off in C (native/txclient.h, lp_desk; src/pool/desk.ts). */
  desk(counts: Float64Array, waits: Float64Array, onOut: (id: number, why: number) => void, onFull: () => void): Handle | string;
  deskSet(desk: Handle, room: boolean, jsWaiting: boolean): void;
  deskConfig(desk: Handle, waitTimeoutMs: number, checkDelayMs: number): void;
  deskStop(desk: Handle, stopped: boolean): void;
  deskClose(desk: Handle): void;
  deskOffer(desk: Handle, conn: Handle, id: number, sid: number, expiresInMs: number): boolean;
  deskWake(desk: Handle): boolean;
  deskReclaim(desk: Handle, id: number): boolean;
  deskIdleMs(desk: Handle, id: number): number;
  deskReclaimAny(desk: Handle): [number, number];
  deskStats(desk: Handle): [number, number, number, number, number];
  /** Session mode on a desk (native/txclient.h): once, before the calls below. */
  deskSessions(
    desk: Handle,
    counters: Float64Array,
    resetQuery: Buffer,
    onSession: (id: number, how: number, end: RelayEnd, toUpstream: number, toClient: number, reusable: boolean, status: string, abandoned: boolean) => void,
    onFarewell: (id: number, reason: string | null) => Buffer,
    onReset: (id: number, answer: Buffer | null) => void,
  ): string | undefined;
  deskResetQuery(desk: Handle, message: Buffer): string | undefined;
  deskPark(desk: Handle, conn: Handle, id: number, sid: number, expiresInMs: number): boolean;
  /** The id of a connection taken for a session, 0: none. */
  deskTake(desk: Handle, sid: number): number;
  deskUntake(desk: Handle, id: number): void;
  /** own: C takes `clientFd` itself (no copy) when the relay starts; else the caller's copy stays the caller's. */
  deskRelay(desk: Handle, id: number, clientFd: number, hello: Buffer, first: Buffer, own: boolean): string | undefined;
  deskSweep(desk: Handle, resetTimeoutMs: number): void;
  deskHold(desk: Handle, id: number): void;
  /** A listener in C for plain clients (native/listener.h; src/proxy/native-listener.ts). */
  listen(fd: number, onArrival: (kind: number, fd: number, data: Buffer | null, address: string | null, port: number, localAddress: string | null, localPort: number) => void): Handle | string;
  listenConfig(listener: Handle, negotiate: boolean, maxPending: number, timeoutMs: number): void;
  listenPending(listener: Handle): number;
  /** Clients in their startup in Node.js, counted by C with its own against maxPending. */
  listenOutside(listener: Handle, n: number): void;
  /** Every client in its startup in C to onArrival now, as raw with the bytes read so far. */
  listenHandOver(listener: Handle): void;
  listenClose(listener: Handle): void;
}

/** How a connection lent to a client's fast path came back (native/txclient.h, enum lp_back, from 1). */
export const LENT_BACK = ['released', 'handover', 'client_gone', 'upstream_gone', 'settings_failed'] as const;
export type LentBack = (typeof LENT_BACK)[number];

/** Where the addon is: LAKEBASE_PROXY_NATIVE_ADDON names another build (the sanitizer run, tests of a broken one). */
const ADDON_PATH = process.env['LAKEBASE_PROXY_NATIVE_ADDON'] || '../../../build/Release/lakebase_relay.node';

/** The compiled addon, or why there is none (then every session uses the JavaScript relay). */
export const native: { readonly addon: Addon | undefined; readonly problem: string | undefined } = (() => {
  const major = Number((process.versions.openssl ?? '0').split('.')[0]);
  if (!(major >= 3)) return { addon: undefined, problem: `Node.js runs OpenSSL ${process.versions.openssl ?? 'none'}; the native relay needs OpenSSL 3` };
  try {
    // Linked with immediate binding: a symbol this Node.js lacks fails here, not at the first session.
    const addon = createRequire(import.meta.url)(ADDON_PATH) as Addon;
    if (typeof addon.connect !== 'function' || typeof addon.detach !== 'function' || typeof addon.deskRelay !== 'function' || typeof addon.listenHandOver !== 'function') return { addon: undefined, problem: 'the native relay build is out of date (npm rebuild)' };
    return { addon, problem: undefined };
  } catch (error) {
    return { addon: undefined, problem: (error as Error).message.split('\n')[0] };
  }
})();

/** The relay's surface that the server uses; both relays have it. */
export interface SessionRelay {
  readonly stats: RelayStats;
  readonly done: Promise<RelayEnd>;
  readonly queryRunning: boolean;
  close(end?: RelayEnd): void;
}

/** What native TLS needs of a target. */
export interface NativeTlsTarget {
  readonly host: string;
  readonly port: number;
  readonly sslMode: 'verify-full' | 'verify-ca' | 'require';
  readonly rootCert: Buffer | undefined;
}

/** A TLS handshake that failed: the words, and OpenSSL's verification result (0 when the certificate was not the problem). */
export class NativeHandshakeError extends Error {
  override readonly name = 'NativeHandshakeError';
  constructor(
    message: string,
    readonly verifyCode: number,
  ) {
    super(message);
  }
}

/** X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH. */
const NAME_MISMATCH = new Set([62, 64]);

/**
 * One OpenSSL context per target (its trust settings and the session to resume), made at its
 * first connection: the CA text is parsed once.
 */
const contexts = new WeakMap<NativeTlsTarget, Handle>();

function contextFor(addon: Addon, target: NativeTlsTarget): Handle {
  let context = contexts.get(target);
  if (!context) {
    const verify = target.sslMode !== 'require';
    const made = addon.context(verify, verify && target.rootCert === undefined && usesOpenSslStore(), verify ? (target.rootCert ?? defaultCertificates()) : null);
    if (typeof made === 'string') throw new NativeHandshakeError(`could not set up TLS: ${made}`, 0);
    context = made;
    contexts.set(target, context);
  }
  return context;
}

/**
 * The CAs Node's TLS trusts by default: its bundled root store and NODE_EXTRA_CA_CERTS (which
 * tls.rootCertificates leaves out; tls.getCACertificates('default') has both, from Node 22.15).
 */
function defaultCertificates(): Buffer {
  const getCACertificates = (tls as { getCACertificates?: (type: string) => string[] }).getCACertificates;
  if (getCACertificates) return Buffer.from(getCACertificates('default').join('\n'));
  const extraFile = process.env['NODE_EXTRA_CA_CERTS'];
  let extra = '';
  try {
    if (extraFile) extra = readFileSync(extraFile, 'utf8'); // Node warns about an unreadable one itself
  } catch {
    extra = '';
  }
  return Buffer.from([...tls.rootCertificates, extra].join('\n'));
}

/** Whether Node's TLS trusts OpenSSL's own store (--use-openssl-ca, or a Node.js built so): then C does too. */
function usesOpenSslStore(): boolean {
  const flags = [...process.execArgv, ...(process.env['NODE_OPTIONS'] ?? '').split(/\s+/)];
  if (flags.includes('--use-bundled-ca')) return false;
  const built = (process.config.variables as { openssl_use_def_ca_store?: boolean | string }).openssl_use_def_ca_store;
  return flags.includes('--use-openssl-ca') || flags.includes('--use-system-ca') || built === true || built === 'true';
}

/** The socket's descriptor, while Node.js has one. */
export function fdOf(socket: Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  return fd === undefined || fd < 0 ? undefined : fd;
}

/**
 * The plaintext of a native upstream connection during the login, as a Duplex. Destroying it
 * closes the connection, unless the relay has taken it.
 */
export class NativeUpstream extends Duplex {
  readonly #addon: Addon;
  #conn: Handle | undefined;
  #paused = false;
  #ended = false;
  /** Set when the relay took the connection: its end goes there. */
  #onRelayEnd: ((end: RelayEnd, toUpstream: number, toClient: number) => void) | undefined;
  readonly handshake: Promise<void>;

  private constructor(addon: Addon) {
    super({ allowHalfOpen: false });
    this.#addon = addon;
    let settle!: (error?: Error) => void;
    this.handshake = new Promise<void>((resolve, reject) => (settle = (error) => (error ? reject(error) : resolve())));
    this.#settle = settle;
    this.handshake.catch(() => {}); // the caller awaits it; a late failure is theirs
  }

  #settle: (error?: Error) => void;

  /**
   * Starts TLS in C on `raw` (connected, its SSLRequest answered 'S', nothing else read) and
   * closes Node's own handle of the socket: C keeps a copy of the descriptor. Throws when the
   * native side cannot take it (then `raw` is untouched).
   */
  static connect(raw: Socket, target: NativeTlsTarget): NativeUpstream {
    const addon = native.addon;
    if (!addon) throw new Error(native.problem);
    const fd = fdOf(raw);
    if (fd === undefined) throw new Error('the upstream socket has no file descriptor');
    const context = contextFor(addon, target);
    const upstream = new NativeUpstream(addon);
    const isName = !/^[\d.]+$/.test(target.host) && !target.host.includes(':');
    const conn = addon.connect(
      context,
      fd,
      isName ? target.host : null, // SNI: a host name only (RFC 6066)
      target.sslMode === 'verify-full' ? target.host : null,
      (error, verifyCode) => upstream.#handshaken(error, verifyCode),
      (data, error) => upstream.#data(data, error),
      (end, toUpstream, toClient) => upstream.#end(end, toUpstream, toClient),
    );
    if (typeof conn === 'string') throw new Error(conn);
    upstream.#conn = conn;
    raw.destroy(); // Node's descriptor only: C's copy keeps the connection open, no FIN is sent
    return upstream;
  }

  /** C's connection, while it lives (a session on a desk: its state, detach and close). */
  get handle(): Handle | undefined {
    return this.#conn;
  }

  /** The server certificate (DER), also on a resumed session. */
  certificate(): Buffer | undefined {
    return this.#conn ? this.#addon.certificate(this.#conn) : undefined;
  }

  /** [TLS version, cipher suite, resumed]. */
  get tlsInfo(): { version: string; cipher: string; resumed: boolean } {
    const [version = '', cipher = '', resumed = false] = this.#conn ? this.#addon.info(this.#conn) : [];
    return { version, cipher, resumed };
  }

  /**
   * Gives the connection to the relay: from now on its data goes to the client socket in C, and
   * its end to `onEnd`. Returns what Node.js had read of it and not consumed.
   */
  takeOver(onEnd: (end: RelayEnd, toUpstream: number, toClient: number) => void): { conn: Handle; unread: Buffer } | undefined {
    if (!this.#conn || this.#ended) return undefined;
    this.#onRelayEnd = onEnd;
    // Nothing more from C into this Duplex while it is emptied: the relay reads what OpenSSL holds.
    this.#paused = true;
    this.#addon.pause(this.#conn, true);
    return { conn: this.#conn, unread: readAll(this) };
  }

  /**
   * Lends the connection to a transaction-mode client's fast path in C (native-client.ts): its
   * data goes there until reclaim(). Returns what Node.js had read of it and not consumed.
   */
  lend(): { conn: Handle; unread: Buffer } | undefined {
    if (!this.#conn || this.#ended || this.#onRelayEnd) return undefined;
    // Lent and given back unpaused: a pause and a resume would each cost a system call (epoll_ctl)
    // per transaction. Nothing comes in between: the lending starts in this same call.
    if (this.#paused) {
      this.#paused = false;
      this.#addon.pause(this.#conn, false);
    }
    return { conn: this.#conn, unread: readAll(this) };
  }

  /** The relay let its client go (a pooled relay), or a lending ended: the connection's plaintext comes here again. */
  reclaim(): void {
    this.#onRelayEnd = undefined;
    this._read();
  }

  /** The relay refused: the connection stays with this Duplex (what was read is put back). */
  giveBack(unread: Buffer): void {
    this.#onRelayEnd = undefined;
    if (unread.length > 0) this.unshift(unread);
    this._read();
  }

  /** The callback of a write that C queued: called once C's queue is written (backpressure). */
  #writeDone: ((error?: Error | null) => void) | undefined;

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    const queued = this.#conn ? this.#addon.write(this.#conn, chunk) : -1;
    if (queued < 0) callback(new Error('the upstream connection is closed'));
    else if (queued > 0) this.#writeDone = callback;
    else callback();
  }

  /** The writer is done (the JavaScript relay passing a client's FIN on): close_notify and FIN upstream. */
  override _final(callback: (error?: Error | null) => void): void {
    if (this.#conn && !this.#onRelayEnd) this.#addon.end(this.#conn);
    callback();
  }

  override _read(): void {
    if (this.#paused && this.#conn && !this.#ended && !this.#onRelayEnd) {
      this.#paused = false;
      this.#addon.pause(this.#conn, false);
    }
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    if (this.#conn && !this.#ended && !this.#onRelayEnd) this.#addon.close(this.#conn, 'upstream_error');
    this.#settle(error ?? new Error('closed before the TLS handshake ended'));
    callback(error);
  }

  #handshaken(error: string | null, verifyCode: number): void {
    this.#settle(error === null ? undefined : new NativeHandshakeError(NAME_MISMATCH.has(verifyCode) ? "Hostname/IP does not match certificate's altnames" : error, verifyCode));
  }

  #data(data: Buffer | null, error: string | null): void {
    if (data && data.length === 0) {
      const done = this.#writeDone;
      this.#writeDone = undefined;
      done?.();
    } else if (data) {
      if (!this.push(data) && this.#conn && !this.#paused) {
        this.#paused = true;
        this.#addon.pause(this.#conn, true);
      }
    } else if (error !== null) {
      this.destroy(new Error(error));
    } else {
      this.push(null);
    }
  }

  #end(end: RelayEnd, toUpstream: number, toClient: number): void {
    this.#ended = true;
    const relayEnd = this.#onRelayEnd;
    this.#conn = undefined;
    if (relayEnd) {
      relayEnd(end, toUpstream, toClient);
      return;
    }
    this.#settle(new Error('the upstream closed the connection during the TLS handshake'));
    this.destroy();
  }
}

/** Why a session stays on the JavaScript relay. */
export interface Refusal {
  readonly reason: string;
}

/** How a pooled relay let its client go. */
export interface Detached {
  /** The client left between two of its messages, the upstream at ReadyForQuery. */
  readonly reusable: boolean;
  /** That ReadyForQuery's transaction status: I, T or E. */
  readonly status: string;
}

export class NativeRelay implements SessionRelay {
  readonly stats: RelayStats = { bytesToUpstream: 0, bytesToClient: 0 };
  readonly done: Promise<RelayEnd>;
  /** Set when a pooled relay let its client go and kept the upstream connection. */
  detached: Detached | undefined;
  readonly #pooled: boolean;
  readonly #addon: Addon;
  #conn: Handle | undefined;
  /** The relay ended (its end callback ran). */
  #finished = false;
  #idleTimer: NodeJS.Timeout | undefined;
  #resolve!: (end: RelayEnd) => void;

  private constructor(addon: Addon, pooled: boolean) {
    this.#addon = addon;
    this.#pooled = pooled;
    this.done = new Promise((resolve) => (this.#resolve = resolve));
  }

  get queryRunning(): boolean {
    return this.#conn !== undefined && this.#addon.state(this.#conn)[0] === 1;
  }

  close(end: RelayEnd = 'shutdown'): void {
    if (!this.#conn) return;
    // A pooled session that times out idle lets its client go and keeps the upstream.
    if (this.#pooled && end === 'idle_timeout') this.#addon.detach(this.#conn, end);
    else this.#addon.close(this.#conn, end);
  }

  /** Closes the session after `ms` with no byte either way and no query running. */
  idleTimeout(ms: number): void {
    const check = (): void => {
      if (!this.#conn) return;
      const [running, idleFor] = this.#addon.state(this.#conn);
      if (running === 0 && idleFor >= ms) this.close('idle_timeout');
      else this.#idleTimer = setTimeout(check, running === 1 ? ms : Math.max(1, ms - idleFor));
    };
    this.#idleTimer = setTimeout(check, ms);
  }

  /**
   * Attaches the plain client socket to the logged-in native upstream, or returns why not (then
   * nothing was changed: `upstream` and `client` go on in Node.js).
   */
  static async start(args: {
    client: Socket;
    upstream: NativeUpstream;
    clientFirst: Buffer;
    toClientFirst: Buffer;
    upstreamName: string;
    counters: Float64Array;
    onAbandoned: () => void;
    /** The upstream outlives the client: its Terminate stays here, and `detached` says how it left. */
    pooled?: boolean;
  }): Promise<NativeRelay | Refusal> {
    const addon = native.addon;
    if (!addon) return { reason: `native relay not built (${native.problem})` };
    const { client, upstream } = args;
    // What Node.js still has queued for the client (a login notice) goes before the relay writes.
    await drained(client);
    if (client.destroyed || upstream.destroyed) return { reason: 'a socket closed before the relay started' };
    const clientFd = fdOf(client);
    if (clientFd === undefined) return { reason: 'the client socket has no file descriptor' };
    client.pause();
    const pooled = args.pooled === true;
    const relay = new NativeRelay(addon, pooled);
    const taken = upstream.takeOver((end, toUpstream, toClient) => relay.#ended(end, toUpstream, toClient));
    if (!taken) return { reason: 'the upstream connection has ended' };
    // Bytes each side sent that Node.js read and nobody consumed: they go first, in order.
    const fromClient = readAll(client);
    const toClientFirst = taken.unread.length > 0 ? Buffer.concat([args.toClientFirst, taken.unread]) : args.toClientFirst;
    const clientFirst = fromClient.length > 0 ? Buffer.concat([args.clientFirst, fromClient]) : args.clientFirst;
    let refused: string | undefined;
    try {
      refused = addon.relay(
        taken.conn,
        clientFd,
        toClientFirst,
        clientFirst,
        args.counters,
        args.onAbandoned,
        (reason) => upstreamLost(args.upstreamName, reason),
        pooled
          ? (end, toUpstream, toClient, reusable, status) => {
              relay.detached = { reusable, status };
              upstream.reclaim();
              relay.#ended(end, toUpstream, toClient);
            }
          : null,
      );
    } catch (error) {
      refused = (error as Error).message;
    }
    if (refused !== undefined) {
      upstream.giveBack(taken.unread);
      if (fromClient.length > 0) client.unshift(fromClient);
      return { reason: refused };
    }
    // A relay that ended inside the call (a pooled one that detached at once) holds nothing:
    // its upstream went back to login mode, and a later close() must not reach it.
    if (!relay.#finished) relay.#conn = taken.conn;
    client.destroy(); // Node's descriptor only: C has its own copy
    return relay;
  }

  #ended(end: RelayEnd, toUpstream: number, toClient: number): void {
    this.#finished = true;
    this.stats.bytesToUpstream = toUpstream;
    this.stats.bytesToClient = toClient;
    this.#conn = undefined;
    clearTimeout(this.#idleTimer);
    this.#resolve(end);
  }
}

/**
 * Once what the stream holds is written (or it failed). 'drain' would come only after a write
 * that was told to wait; an empty write's callback comes after everything queued before it.
 */
function drained(stream: Socket): Promise<void> {
  if (stream.writableLength === 0 || stream.destroyed) return Promise.resolve();
  return new Promise((resolve) => stream.write(EMPTY, () => resolve()));
}

const EMPTY = Buffer.alloc(0);

/** The ErrorResponse a relayed client gets when its upstream goes away between two messages (`reason` null: it closed). */
export function upstreamLost(upstreamName: string, reason: string | null): Buffer {
  return errorResponse({
    code: '08006',
    message: reason === null ? `upstream ${upstreamName} closed the connection unexpectedly` : `lost the connection to upstream ${upstreamName}: ${reason}`,
  });
}

export function readAll(stream: Duplex): Buffer {
  const chunks: Buffer[] = [];
  for (let chunk = stream.read() as Buffer | null; chunk !== null; chunk = stream.read() as Buffer | null) chunks.push(chunk);
  return chunks.length === 0 ? Buffer.alloc(0) : Buffer.concat(chunks);
}
