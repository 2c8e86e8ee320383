/**
 * A Postgres client at the message level, for tests that need what drivers hide: pipelined
 * extended-protocol sequences, Close, Flush, and the exact answers in order. Messages are framed
 * and parsed by pg-protocol.
 */
import { connect, type Socket } from 'node:net';
import { parse, serialize } from 'pg-protocol';
import type { BackendMessage } from 'pg-protocol/dist/messages.js';

export { serialize };

/** An answer, reduced to what two sessions doing the same work must agree on. */
export function summary(message: BackendMessage): string {
  const m = message as BackendMessage & { code?: string; text?: string; fields?: unknown[]; status?: string; parameterName?: string };
  switch (m.name) {
    case 'error':
      return `error ${m.code}`;
    case 'dataRow':
      return `row ${JSON.stringify(m.fields)}`;
    case 'commandComplete':
      return `complete ${m.text}`;
    case 'readyForQuery':
      return `ready ${m.status}`;
    default:
      return m.name;
  }
}

export class WireClient {
  readonly socket: Socket;
  readonly #inbox: BackendMessage[] = [];
  #wake: (() => void) | undefined;
  #closed = false;
  processId = 0;
  secretKey = 0;
  /** What the server greeted with (ParameterStatus, BackendKeyData, ReadyForQuery). */
  greeting: BackendMessage[] = [];

  private constructor(socket: Socket) {
    this.socket = socket;
    void parse(socket, (message) => {
      this.#inbox.push(message);
      this.#wake?.();
    });
    socket.on('close', () => {
      this.#closed = true;
      this.#wake?.();
    });
    socket.on('error', () => {});
  }

  /** Messages from a socket already connected (and past any SSLRequest), whatever was sent on it. */
  static over(socket: Socket): WireClient {
    return new WireClient(socket);
  }

  /** Connected and logged in (the proxy's client authentication is trust in the tests). */
  static async open(port: number, startup: Record<string, string>): Promise<WireClient> {
    const socket = connect({ host: '127.0.0.1', port });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const client = new WireClient(socket);
    socket.write(serialize.startup(startup));
    const greeting = await client.untilReady();
    const key = greeting.find((m) => m.name === 'backendKeyData') as (BackendMessage & { processID: number; secretKey: number }) | undefined;
    const failed = greeting.find((m) => m.name === 'error');
    if (failed) throw failed;
    client.greeting = greeting;
    client.processId = key?.processID ?? 0;
    client.secretKey = key?.secretKey ?? 0;
    return client;
  }

  send(...messages: Buffer[]): void {
    this.socket.write(Buffer.concat(messages));
  }

  /** The messages up to and including the `count`th ReadyForQuery from now. */
  async untilReady(count = 1, timeoutMs = 20_000): Promise<BackendMessage[]> {
    const out: BackendMessage[] = [];
    let seen = 0;
    while (seen < count) {
      const message = await this.next(timeoutMs);
      out.push(message);
      if (message.name === 'readyForQuery') seen++;
    }
    return out;
  }

  /** The next message, or an error when the connection closed or nothing came in time. */
  async next(timeoutMs = 20_000): Promise<BackendMessage> {
    const deadline = Date.now() + timeoutMs;
    while (this.#inbox.length === 0) {
      if (this.#closed) throw new Error('the connection closed');
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no message within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.#wake = undefined;
    }
    return this.#inbox.shift() as BackendMessage;
  }

  /** Messages already received and not yet read. */
  get pending(): number {
    return this.#inbox.length;
  }

  get closed(): boolean {
    return this.#closed;
  }

  end(): void {
    if (!this.#closed) this.socket.end(serialize.end());
  }
}
