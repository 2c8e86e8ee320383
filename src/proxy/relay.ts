/**
 * The byte pipe between a client and its upstream once both are logged in: unparsed, with
 * backpressure both ways (a slow reader pauses the other side's socket, so memory stays bounded
 * by the sockets' own buffers), and one teardown whoever ends first.
 */
import type { Duplex } from 'node:stream';

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

  /**
   * @param clientFirst bytes the client sent before the relay started, for the upstream
   * @param upstreamFirst bytes the upstream sent after ReadyForQuery, for the client
   */
  constructor(client: Duplex, upstream: Duplex, clientFirst: Buffer, upstreamFirst: Buffer, onBytes?: (toUpstream: number, toClient: number) => void) {
    this.#client = client;
    this.#upstream = upstream;
    this.done = new Promise((resolve) => (this.#resolve = resolve));
    if (clientFirst.length > 0) this.#forward(clientFirst, upstream, client, true, onBytes);
    if (upstreamFirst.length > 0) this.#forward(upstreamFirst, client, upstream, false, onBytes);
    this.#wire(client, upstream, true, onBytes);
    this.#wire(upstream, client, false, onBytes);
    client.resume();
    upstream.resume();
  }

  /** Ends the session from outside (shutdown): both sockets are destroyed. */
  close(end: RelayEnd = 'shutdown'): void {
    this.#finish(end);
    this.#client.destroy();
    this.#upstream.destroy();
  }

  #forward(chunk: Buffer, to: Duplex, from: Duplex, toUpstream: boolean, onBytes?: (toUpstream: number, toClient: number) => void): void {
    if (toUpstream) this.stats.bytesToUpstream += chunk.length;
    else this.stats.bytesToClient += chunk.length;
    onBytes?.(toUpstream ? chunk.length : 0, toUpstream ? 0 : chunk.length);
    if (!to.write(chunk)) from.pause();
  }

  #wire(from: Duplex, to: Duplex, fromClient: boolean, onBytes?: (toUpstream: number, toClient: number) => void): void {
    from.on('data', (chunk: Buffer) => this.#forward(chunk, to, from, fromClient, onBytes));
    to.on('drain', () => from.resume());
    from.on('end', () => {
      // Half-close: pass the FIN on once what is queued has been written.
      this.#finish(fromClient ? 'client_closed' : 'upstream_closed');
      to.end();
      setTimeout(() => to.destroy(), LINGER_MS).unref();
    });
    from.on('error', () => {
      this.#finish(fromClient ? 'client_error' : 'upstream_error');
      to.destroy();
    });
    from.on('close', () => {
      this.#finish(fromClient ? 'client_closed' : 'upstream_closed');
      if (!to.writableEnded) to.end();
      setTimeout(() => to.destroy(), LINGER_MS).unref();
      if (++this.#closed === 2) this.#resolve(this.#end as RelayEnd);
    });
  }

  /** The first end decides how the session ended. */
  #finish(end: RelayEnd): void {
    this.#end ??= end;
  }
}
