/**
 * The byte pipe between a client and its upstream once both are logged in: unparsed, with
 * backpressure both ways (a slow reader pauses the other side's socket, so memory stays bounded
 * by the sockets' own buffers), and one teardown whoever ends first.
 */
import type { Duplex } from 'node:stream';
import { BackendCode, errorResponse } from '../wire/backend-messages.js';
import { MessageBoundaries } from '../wire/message-boundaries.js';

export type RelayEnd = 'client_closed' | 'upstream_closed' | 'client_error' | 'upstream_error' | 'shutdown' | 'idle_timeout';

export interface RelayStats {
  bytesToUpstream: number;
  bytesToClient: number;
}

/** How long a side that the other has half-closed may take to finish writing. */
const LINGER_MS = 5000;

export class Relay {
  readonly stats: RelayStats = { bytesToUpstream: 0, bytesToClient: 0 };
  readonly done: Promise<RelayEnd>;
  #end: RelayEnd | undefined;
  #resolve!: (end: RelayEnd) => void;
  readonly #client: Duplex;
  readonly #upstream: Duplex;
  #closed = 0;
  /** Whether the client's last bytes were a Terminate message: it left on purpose. */
  #clientTerminated = false;
  /** Whether the upstream's last bytes were a ReadyForQuery: no query is running. */
  #upstreamIdle = true;
  readonly #onAbandoned: (() => void) | undefined;
  /** Where the upstream's messages to the client begin and end: see #farewell. */
  readonly #toClient = new MessageBoundaries();
  readonly #upstreamName: string;

  readonly #onBytes: ((toUpstream: number, toClient: number) => void) | undefined;

  /**
   * @param clientFirst bytes the client sent before the relay started, for the upstream
   * @param upstreamFirst bytes the upstream sent after ReadyForQuery, for the client
   * @param upstreamName host:port, for the error a client gets when the upstream goes away
   * @param onBytes called per relayed chunk (metrics): must not allocate
   * @param onAbandoned called when the client goes away while a query may be running upstream,
   *   so the caller can cancel it (Postgres notices a vanished peer only at its next write)
   */
  constructor(
    client: Duplex,
    upstream: Duplex,
    clientFirst: Buffer,
    upstreamFirst: Buffer,
    upstreamName: string,
    onBytes?: (toUpstream: number, toClient: number) => void,
    onAbandoned?: () => void,
  ) {
    this.#upstreamName = upstreamName;
    this.#onBytes = onBytes;
    this.#onAbandoned = onAbandoned;
    this.#client = client;
    this.#upstream = upstream;
    this.done = new Promise((resolve) => (this.#resolve = resolve));
    if (clientFirst.length > 0) this.#forward(clientFirst, upstream, client, true);
    if (upstreamFirst.length > 0) this.#forward(upstreamFirst, client, upstream, false);
    this.#wire(client, upstream, true);
    this.#wire(upstream, client, false);
    client.resume();
    upstream.resume();
  }

  /** Whether the client sent something the upstream has not answered with ReadyForQuery yet. */
  get queryRunning(): boolean {
    return !this.#upstreamIdle;
  }

  /** Ends the session from outside (shutdown): both sockets are destroyed. */
  close(end: RelayEnd = 'shutdown'): void {
    // A query still running is cancelled once: #finish asks for it itself on a client's end.
    const running = this.#end === undefined && !this.#upstreamIdle && end !== 'client_closed' && end !== 'client_error';
    this.#finish(end);
    if (running) this.#onAbandoned?.();
    this.#client.destroy();
    this.#upstream.destroy();
  }

  #forward(chunk: Buffer, to: Duplex, from: Duplex, toUpstream: boolean): void {
    if (toUpstream) {
      this.stats.bytesToUpstream += chunk.length;
      this.#clientTerminated = endsWith(chunk, TERMINATE);
      this.#upstreamIdle = false; // until its next ReadyForQuery
    } else {
      this.stats.bytesToClient += chunk.length;
      this.#toClient.observe(chunk);
      this.#upstreamIdle = this.#toClient.atBoundary && this.#toClient.lastType === BackendCode.ReadyForQuery;
    }
    this.#onBytes?.(toUpstream ? chunk.length : 0, toUpstream ? 0 : chunk.length);
    if (!to.write(chunk)) from.pause();
  }

  #wire(from: Duplex, to: Duplex, fromClient: boolean): void {
    from.on('data', (chunk: Buffer) => this.#forward(chunk, to, from, fromClient));
    to.on('drain', () => from.resume());
    from.on('end', () => {
      const farewell = this.#farewell(fromClient);
      // Half-close: pass the FIN on once what is queued has been written.
      this.#finish(fromClient ? 'client_closed' : 'upstream_closed');
      if (!to.writableEnded) to.end(farewell);
      setTimeout(() => to.destroy(), LINGER_MS).unref();
    });
    from.on('error', (error: Error) => {
      const farewell = this.#farewell(fromClient, error);
      this.#finish(fromClient ? 'client_error' : 'upstream_error');
      if (farewell && !to.writableEnded) {
        to.end(farewell);
        setTimeout(() => to.destroy(), LINGER_MS).unref();
      } else {
        to.destroy();
      }
    });
    from.on('close', () => {
      const farewell = this.#farewell(fromClient);
      this.#finish(fromClient ? 'client_closed' : 'upstream_closed');
      if (!to.writableEnded) to.end(farewell);
      setTimeout(() => to.destroy(), LINGER_MS).unref();
      if (++this.#closed === 2) this.#resolve(this.#end as RelayEnd);
    });
  }

  /**
   * When the upstream is the first to go, and neither said goodbye (the client a Terminate, the
   * upstream an ErrorResponse such as 57P01), the client gets an ErrorResponse 08006 naming the
   * upstream, as libpq would report a lost server. Only between two messages: inside one, an
   * added message would be read as the rest of it, so the client just sees the connection close.
   */
  #farewell(fromClient: boolean, error?: Error): Buffer | undefined {
    if (fromClient || this.#end !== undefined || this.#clientTerminated) return undefined;
    if (!this.#toClient.atBoundary || this.#toClient.lastType === BackendCode.ErrorResponse) return undefined;
    const message = error
      ? `lost the connection to upstream ${this.#upstreamName}: ${error.message}`
      : `upstream ${this.#upstreamName} closed the connection unexpectedly`;
    return errorResponse({ code: '08006', message });
  }

  /** The first end decides how the session ended. */
  #finish(end: RelayEnd): void {
    if (this.#end !== undefined) return;
    // After a Terminate the server closes first, often before the client's FIN arrives: the client ended it.
    this.#end = end === 'upstream_closed' && this.#clientTerminated ? 'client_closed' : end;
    if ((end === 'client_closed' || end === 'client_error') && !this.#clientTerminated && !this.#upstreamIdle) this.#onAbandoned?.();
  }
}

/** Terminate: 'X' and length 4. */
const TERMINATE = Buffer.from([0x58, 0, 0, 0, 4]);

function endsWith(chunk: Buffer, tail: Buffer): boolean {
  return chunk.length >= tail.length && chunk.compare(tail, 0, tail.length, chunk.length - tail.length) === 0;
}

