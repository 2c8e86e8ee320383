/**
 * The relay in C (native/relay.c, built by `npm install` when a C compiler is there): the same
 * byte pipe as relay.ts, run by libuv on Node's event loop with no JavaScript per read or write.
 *
 * Node.js keeps the TLS handshake, the certificate checks and the login (upstream.ts); once the
 * upstream is at ReadyForQuery, `handOver()` gives the two sockets and the TLS 1.3 traffic
 * secrets to the native side and closes Node's own objects for them (which also frees their
 * memory: an idle session is then a few hundred bytes of C). When the native side cannot take a
 * session (not built, TLS 1.2, a cipher it does not know, a client on TLS), the caller uses the
 * JavaScript relay with the same behaviour.
 */
import { createRequire } from 'node:module';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import { errorResponse } from '../wire/backend-messages.js';
import type { RelayEnd, RelayStats } from './relay.js';
import type { TlsTap } from './tls-tap.js';

interface Addon {
  start(
    clientFd: number,
    upstreamFd: number,
    cipher: string,
    clientSecret: Buffer,
    serverSecret: Buffer,
    lastClientRecord: Buffer,
    clientRecords: number,
    lastServerRecord: Buffer,
    serverRecords: number,
    toUpstreamFirst: Buffer,
    upstreamCipherFirst: Buffer,
    toClientFirst: Buffer,
    counters: Float64Array,
    onEnd: (end: RelayEnd, toUpstream: number, toClient: number) => void,
    onAbandoned: () => void,
    farewell: (reason: string | null) => Buffer | undefined,
  ): object | string;
  close(handle: object, end: RelayEnd): void;
  state(handle: object): [number, number];
}

/** The compiled addon, or why there is none. */
export const native: { readonly addon: Addon | undefined; readonly problem: string | undefined } = (() => {
  try {
    const addon = createRequire(import.meta.url)('../../../build/Release/lakebase_relay.node') as Addon;
    return { addon, problem: undefined };
  } catch (error) {
    return { addon: undefined, problem: (error as Error).message.split('\n')[0] };
  }
})();

/** The TLS 1.3 cipher suites native/relay.c implements (Node.js names them as OpenSSL does). */
const CIPHERS = new Set(['TLS_AES_128_GCM_SHA256', 'TLS_AES_256_GCM_SHA384', 'TLS_CHACHA20_POLY1305_SHA256']);

/**
 * Why a session stays on the JavaScript relay. `lasting`: the upstream itself is the reason (its
 * TLS version or cipher), so its next sessions would be refused too and need no tap.
 */
export interface Refusal {
  readonly reason: string;
  readonly lasting: boolean;
}

/** The relay's surface that the server uses; both relays have it. */
export interface SessionRelay {
  readonly stats: RelayStats;
  readonly done: Promise<RelayEnd>;
  readonly queryRunning: boolean;
  close(end?: RelayEnd): void;
}

export class NativeRelay implements SessionRelay {
  readonly stats: RelayStats = { bytesToUpstream: 0, bytesToClient: 0 };
  readonly done: Promise<RelayEnd>;
  #handle: object | undefined;
  readonly #addon: Addon;
  #idleTimer: NodeJS.Timeout | undefined;

  private constructor(addon: Addon, start: (onEnd: (end: RelayEnd, toUpstream: number, toClient: number) => void) => object | string) {
    this.#addon = addon;
    let resolve!: (end: RelayEnd) => void;
    this.done = new Promise((r) => (resolve = r));
    const handle = start((end, toUpstream, toClient) => {
      this.stats.bytesToUpstream = toUpstream;
      this.stats.bytesToClient = toClient;
      this.#handle = undefined;
      clearTimeout(this.#idleTimer);
      resolve(end);
    });
    if (typeof handle === 'string') throw new Error(handle); // refused: handOver() falls back
    this.#handle = handle; // onEnd comes later: from a libuv close callback, never inside start()
  }

  get queryRunning(): boolean {
    return this.#handle !== undefined && this.#addon.state(this.#handle)[0] === 1;
  }

  close(end: RelayEnd = 'shutdown'): void {
    if (this.#handle) this.#addon.close(this.#handle, end);
  }

  /** Closes the session after `ms` with no byte either way and no query running. */
  idleTimeout(ms: number): void {
    const check = (): void => {
      if (!this.#handle) return;
      const [running, idleFor] = this.#addon.state(this.#handle);
      if (running === 0 && idleFor >= ms) this.close('idle_timeout');
      else this.#idleTimer = setTimeout(check, running === 1 ? ms : ms - idleFor);
    };
    this.#idleTimer = setTimeout(check, ms);
  }

  /**
   * Moves a logged-in session to the native relay, or returns why it stays in JavaScript (then
   * nothing was changed). `client` must be a plain socket and `tls` run over `tap`.
   */
  static async handOver(args: {
    client: Socket;
    tls: TLSSocket;
    tap: TlsTap;
    clientFirst: Buffer;
    toClientFirst: Buffer;
    upstreamName: string;
    counters: Float64Array;
    onAbandoned: () => void;
  }): Promise<NativeRelay | Refusal> {
    const addon = native.addon;
    if (!addon) return { reason: `native relay not built (${native.problem})`, lasting: true };
    const { client, tls, tap } = args;
    const cipher = tls.getCipher();
    if (tls.getProtocol() !== 'TLSv1.3' || !CIPHERS.has(cipher.standardName)) {
      return { reason: `upstream TLS is ${tls.getProtocol()} ${cipher.standardName}`, lasting: true };
    }
    const clientSecret = tap.secrets.get('CLIENT_TRAFFIC_SECRET_0');
    const serverSecret = tap.secrets.get('SERVER_TRAFFIC_SECRET_0');
    if (!clientSecret || !serverSecret) return { reason: 'no TLS traffic secrets', lasting: false };
    // What Node.js still has queued must reach the sockets before the native side writes. The
    // TLS socket itself is not waited for: the upstream answered our last message, so every record
    // of ours went through the tap; Node's TLS over a JavaScript stream sometimes reports such a
    // write done only at the next write, which never comes.
    await drained(client);
    while (tap.queuedToServer > 0 && !tls.destroyed) await new Promise((resolve) => setImmediate(resolve));
    if (client.destroyed || tls.destroyed) return { reason: 'a socket closed during the hand-over', lasting: false };
    client.pause();
    const clientFd = (client as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (clientFd === undefined || clientFd < 0) return { reason: 'the client socket has no file descriptor', lasting: false };
    // Bytes each side sent that Node.js read but nobody consumed yet.
    const fromClient = readAll(client);
    const fromUpstream = readAll(tls);
    const handover = tap.handOver();
    if (!handover) {
      if (fromClient.length > 0) client.unshift(fromClient);
      if (fromUpstream.length > 0) tls.unshift(fromUpstream);
      return { reason: 'nothing to hand over', lasting: false };
    }
    const toClientFirst = fromUpstream.length > 0 ? Buffer.concat([args.toClientFirst, fromUpstream]) : args.toClientFirst;
    const clientFirst = fromClient.length > 0 ? Buffer.concat([args.clientFirst, fromClient]) : args.clientFirst;
    let relay: NativeRelay;
    try {
      relay = new NativeRelay(addon, (onEnd) =>
        addon.start(
          clientFd,
          handover.fd,
          cipher.standardName,
          clientSecret,
          serverSecret,
          handover.lastSent,
          handover.sentRecords,
          handover.lastRead,
          handover.readRecords,
          clientFirst,
          handover.unread,
          toClientFirst,
          args.counters,
          onEnd,
          args.onAbandoned,
          (reason) =>
            errorResponse({
              code: '08006',
              message: reason === null ? `upstream ${args.upstreamName} closed the connection unexpectedly` : `lost the connection to upstream ${args.upstreamName}: ${reason}`,
            }),
        ),
      );
    } catch (error) {
      // Refused (a string from C), or a fault in the call: either way the session goes on in Node.js.
      tap.takeBack(handover);
      if (fromClient.length > 0) client.unshift(fromClient);
      if (fromUpstream.length > 0) tls.unshift(fromUpstream);
      return { reason: (error as Error).message, lasting: false };
    } finally {
      clientSecret.fill(0);
      serverSecret.fill(0);
    }
    // The native side has its own copies of both descriptors: Node's sockets close without a word.
    tls.destroy();
    tap.closeTcp();
    client.destroy();
    return relay;
  }
}

function drained(stream: Socket): Promise<void> {
  if (stream.writableLength === 0 || stream.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    const done = (): void => {
      stream.off('drain', done);
      stream.off('close', done);
      resolve();
    };
    stream.once('drain', done);
    stream.once('close', done);
  });
}

function readAll(stream: Socket | TLSSocket): Buffer {
  const chunks: Buffer[] = [];
  for (let chunk = stream.read() as Buffer | null; chunk !== null; chunk = stream.read() as Buffer | null) chunks.push(chunk);
  return chunks.length === 0 ? Buffer.alloc(0) : Buffer.concat(chunks);
}
