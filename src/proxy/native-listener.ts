/**
 * A listener in C for plain clients (native/listener.h): C accepts, answers an SSLRequest with
 * 'N' and reads the client's startup packet, then hands the client over in one call. The server
 * serves a pooled session from there without Node.js' accept, socket object or asynchronous
 * handshake (ProxyServer #arrived); any other client becomes a Node.js socket with the bytes
 * read put back (toSocket) and takes the usual way.
 */
import { Socket, type Server } from 'node:net';
import { closeSync } from 'node:fs';
import { fdOf, native, type Handle } from './native-relay.js';

/** How a client came (native/listener.h, enum lp_arrival, from 1). */
const ARRIVALS = ['startup', 'busy', 'raw', 'timeout', 'gone'] as const;

export interface Arrival {
  /**
   * startup: `data` holds its first packet other than an encryption request (refused with 'N'
   * already), and what followed it; busy: too many clients in their startup; raw: nothing read,
   * or (handOver) what was read so far; timeout: its startup took too long (C closed it; for the log);
   * gone: it left or failed in its startup (C closed it; for the counts).
   */
  readonly kind: (typeof ARRIVALS)[number];
  /** The client's socket, the receiver's to close or to pass on; -1 for timeout and gone. */
  readonly fd: number;
  readonly data: Buffer | undefined;
  /** The peer; undefined over a unix socket. */
  readonly remote: { readonly address: string; readonly port: number } | undefined;
  /** The address the client reached (for startup only: other clients become Node.js sockets, which know it). */
  readonly local: { readonly address: string; readonly port: number } | undefined;
}

export class NativeListener {
  readonly #handle: Handle;
  #closed = false;

  private constructor(handle: Handle) {
    this.#handle = handle;
  }

  /**
   * Takes over the listening socket of `server` (bound and listening): C accepts on a copy of it,
   * and `server` should close its own. A string says why not (then nothing changed).
   */
  static open(server: Server, onArrival: (arrival: Arrival) => void): NativeListener | string {
    const addon = native.addon;
    if (!addon) return native.problem ?? 'the native relay did not load';
    const fd = fdOf(server as unknown as Socket);
    if (fd === undefined) return 'the listening socket has no file descriptor';
    const handle = addon.listen(fd, (kind, clientFd, data, address, port, localAddress, localPort) => {
      onArrival({
        kind: ARRIVALS[kind - 1] ?? 'raw',
        fd: clientFd,
        data: data ?? undefined,
        remote: address === null ? undefined : { address, port },
        local: localAddress === null ? undefined : { address: localAddress, port: localPort },
      });
    });
    return typeof handle === 'string' ? handle : new NativeListener(handle);
  }

  /** negotiate: read startups in C (else every client goes over as accepted); for clients from now on. */
  configure(negotiate: boolean, maxPending: number, startupTimeoutMs: number): void {
    if (!this.#closed) native.addon?.listenConfig(this.#handle, negotiate, maxPending, startupTimeoutMs);
  }

  /** Clients in their startup in C now. */
  get pending(): number {
    return this.#closed ? 0 : (native.addon?.listenPending(this.#handle) ?? 0);
  }

  /** Clients in their startup in Node.js (the unix socket's, those C passed on): C counts them with its own against maxPending. */
  set outside(n: number) {
    if (!this.#closed) native.addon?.listenOutside(this.#handle, n);
  }

  /** Every client in its startup in C goes to onArrival now (raw, with what C read of it), in this call. */
  handOver(): void {
    if (!this.#closed) native.addon?.listenHandOver(this.#handle);
  }

  /** Stops accepting; clients still in their startup in C are closed. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    native.addon?.listenClose(this.#handle);
  }
}

/** A client C accepted, as a Node.js socket, with the bytes C read of it to be read again first. */
export function toSocket(arrival: Arrival): Socket {
  const socket = new Socket({ fd: arrival.fd, readable: true, writable: true });
  if (arrival.data) socket.unshift(arrival.data);
  return socket;
}

/** Closes a client's socket that nobody took. */
export function closeFd(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // already closed
  }
}
