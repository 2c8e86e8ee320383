/**
 * A transaction-mode client socket owned by C (native/txclient.c): to the engine
 * (transaction-session.ts) it is the client stream it reads and writes, and it carries the
 * commonest transactions itself, on a server connection the engine lends it (`fast()`, `onNeed`,
 * `attach()`, `onBack`). See native/txclient.h for what the fast path carries.
 */
import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import { fdOf, LENT_BACK, native, type Handle, type LentBack, type NativeUpstream } from './native-relay.js';
import type { Desk, Join } from '../pool/desk.js';

/** What the engine needs of a client stream: net.Socket and NativeClient both are one. */
export interface ClientStream {
  on(event: 'data', listener: (chunk: Buffer) => void): this;
  on(event: 'end' | 'close' | 'drain', listener: () => void): this;
  on(event: 'error', listener: (error: Error) => void): this;
  write(data: Buffer): boolean;
  end(data?: Buffer): unknown;
  pause(): unknown;
  resume(): unknown;
  destroy(): unknown;
}

/** What came back with a lent connection. */
export interface Back {
  readonly how: LentBack;
  /** Its last ReadyForQuery's transaction status. */
  readonly status: string;
  /** The lending made the unnamed statement, and the unnamed portal. */
  readonly parsed: boolean;
  readonly bound: boolean;
  /** ParameterStatus messages the server sent meanwhile (relayed to the client already). */
  readonly reports: Buffer | null;
  /** Some did not fit: the client's settings are not known (`reports` is then null). */
  readonly reportsLost: boolean;
  /** A command tag of session state went by: the connection needs its reset. */
  readonly leaked: boolean;
  /** The settings query sent ahead failed: the connection needs its reset. */
  readonly settingsFailed: boolean;
  /** client_gone: answers were still to come. */
  readonly running: boolean;
  /** handover: the client's bytes the engine reads next. */
  readonly rest: Buffer | null;
  /** upstream_gone: why (null: it closed). */
  readonly reason: string | null;
  /** The connection's id on the pool's desk (it has left the desk now), 0 when the engine lent it. */
  readonly deskId: number;
}

const EMPTY = Buffer.alloc(0);
/** ReadyForQuery's transaction status letters by char code, made once. */
const STATUS: Record<number, string> = { 0x49: 'I', 0x54: 'T', 0x45: 'E' };
const LENT_PARSED = 1;
const LENT_BOUND = 2;
const LENT_REPORTS_LOST = 4;
const LENT_LEAKED = 8;
const LENT_SETTINGS_FAILED = 16;

export class NativeClient extends EventEmitter implements ClientStream {
  /** [to upstream, to client]: bytes the fast path moved, added to by C. */
  readonly counters: Float64Array;
  /**
   * Set by the engine: a unit waits for a connection; `unit` when it names the client's
   * statements (attach() takes it rewritten); `waitedMs`: how long it waited on the desk first.
   */
  onNeed: (unit: Buffer | null, waitedMs: number) => void = () => {};
  /** Set by the engine: the lent connection is back. */
  onBack: (back: Back) => void = () => {};
  /**
   * Set by the engine: a lending of the desk (connection `deskId`) begins with a unit that names
   * the client's statements; the unit with the connection's names for them, or null when it lacks
   * one (the connection and the unit then come back to onBack as a handover).
   */
  onRewrite: (unit: Buffer, deskId: number) => Buffer | null = () => null;
  readonly #addon: NonNullable<typeof native.addon>;
  /** Set by adopt() as soon as C made it (before anything can call back). */
  #client!: Handle;
  #closed = false;
  #ended = false;
  #desk: Desk | undefined;
  #deskSid = 0;
  /** Inside write() (see there). */
  #writing = false;

  private constructor(addon: NonNullable<typeof native.addon>, counters: Float64Array) {
    super();
    this.#addon = addon;
    this.counters = counters;
  }

  // C calls every client through these, with the client's object first (native/addon.c): no
  // closures and references per client, which would cost more than the rest of an idle one.
  static {
    native.addon?.clientCallbacks(
      (client: NativeClient, data: Buffer | null, error: string | null) => client.#data(data, error),
      (client: NativeClient, unit: Buffer | null, waitedMs: number) => client.onNeed(unit, waitedMs),
      (client: NativeClient, how: number, status: number, flags: number, running: boolean, reports: Buffer | null, rest: Buffer | null, reason: string | null, deskId: number) =>
        client.onBack({
          how: LENT_BACK[how - 1] ?? 'upstream_gone',
          status: STATUS[status] ?? String.fromCharCode(status),
          parsed: (flags & LENT_PARSED) !== 0,
          bound: (flags & LENT_BOUND) !== 0,
          reportsLost: (flags & LENT_REPORTS_LOST) !== 0,
          leaked: (flags & LENT_LEAKED) !== 0,
          settingsFailed: (flags & LENT_SETTINGS_FAILED) !== 0,
          reports: (flags & LENT_REPORTS_LOST) !== 0 ? null : reports,
          running,
          rest,
          reason,
          deskId,
        }),
      (client: NativeClient) => client.#closedByC(),
      (client: NativeClient, unit: Buffer, deskId: number) => client.onRewrite(unit, deskId),
    );
  }

  /**
   * Takes over a plain client socket (Node's handle is closed; C keeps a copy of the descriptor)
   * once what Node.js still queues for it is written. Returns undefined when C cannot take it
   * (then `socket` is untouched), or the client's bytes Node.js read beside it.
   */
  static async adopt(socket: Socket, totals: Float64Array): Promise<{ client: NativeClient; unread: Buffer } | undefined> {
    const addon = native.addon;
    if (!addon) return undefined;
    socket.pause(); // what the client sends meanwhile stays in Node's buffer, read below
    if (socket.writableLength > 0) await new Promise<void>((resolve) => socket.write(Buffer.alloc(0), () => resolve()));
    const fd = fdOf(socket);
    if (fd === undefined || socket.destroyed) return undefined;
    const made = new NativeClient(addon, new Float64Array(2));
    const handle = addon.client(fd, made.counters, totals, made);
    if (typeof handle === 'string') {
      socket.resume();
      return undefined;
    }
    made.#client = handle;
    const chunks: Buffer[] = [];
    for (let chunk = socket.read() as Buffer | null; chunk !== null; chunk = socket.read() as Buffer | null) chunks.push(chunk);
    socket.destroy(); // Node's descriptor only
    return { client: made, unread: Buffer.concat(chunks) };
  }

  write(data: Buffer): boolean {
    // A write that fails ends the client inside the call: its end is told after the write
    // returns (as a socket's is), not to a caller in the middle of its own bookkeeping.
    this.#writing = true;
    try {
      return this.#addon.clientWrite(this.#client, data) === 0;
    } finally {
      this.#writing = false;
    }
  }

  end(data?: Buffer): this {
    if (data && data.length > 0) this.#addon.clientWrite(this.#client, data);
    this.#addon.clientEnd(this.#client);
    return this;
  }

  pause(): this {
    this.#addon.clientPause(this.#client, true);
    return this;
  }

  resume(): this {
    this.#addon.clientPause(this.#client, false);
    return this;
  }

  destroy(): this {
    this.#addon.clientClose(this.#client);
    return this;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** To the fast path, with the bytes the engine read and left. False when C refused (the client ended). */
  fast(first: Buffer): boolean {
    return this.#addon.clientFast(this.#client, first);
  }

  /**
   * Lends `upstream` to the unit that waits (after onNeed), `settings` (messages: a Query) sent
   * ahead of it with their answers kept from the client, and `unit` sent instead of the waiting
   * one (its statement names the server's) when onNeed gave one. With `join` (Desk.join) the
   * connection joins this client's desk: 'joined' (it comes back with its desk id), else 'lent';
   * `refused` says why not (nothing changed).
   */
  attach(upstream: NativeUpstream, settings: Buffer = EMPTY, unit: Buffer = EMPTY, join?: Join): 'joined' | 'lent' | { refused: string } {
    const lent = upstream.lend();
    if (!lent) return { refused: 'the upstream connection has ended' };
    const [id, sid, expiresInMs] = join ?? [0, 0, 0];
    const attached = this.#addon.clientAttach(this.#client, lent.conn, lent.unread, settings, unit, id, sid, expiresInMs);
    if (typeof attached !== 'string') return attached ? 'joined' : 'lent';
    upstream.giveBack(lent.unread);
    return { refused: attached };
  }

  /** The desk whose connections C hands this client itself, for units in settings `sid` (undefined: none). */
  desk(desk: Desk | undefined, sid: number): void {
    if (desk === this.#desk && sid === this.#deskSid) return;
    this.#desk = desk;
    this.#deskSid = desk ? sid : 0;
    this.#addon.clientDesk(this.#client, desk?.handle ?? null, this.#deskSid);
  }

  /** The lending under way comes back to onBack at its end, not to the desk's next client (a cancel is on its way to its connection). */
  hold(): void {
    this.#addon.clientHold(this.#client);
  }

  get deskOf(): Desk | undefined {
    return this.#desk;
  }

  get deskSid(): number {
    return this.#deskSid;
  }

  /** Back to the engine, with nothing lent: the bytes it reads next. */
  takeBack(): Buffer {
    return this.#addon.clientJs(this.#client);
  }

  /** Whether a query runs on the lent connection, and ms since the last byte either way. */
  get state(): { lent: boolean; running: boolean; idleMs: number; deskId: number } {
    const [lent = 0, running = 0, idleMs = 0, deskId = 0] = this.#addon.clientState(this.#client);
    return { lent: lent === 1, running: running === 1, idleMs, deskId };
  }

  /** Closes the session after `ms` with no byte either way and no query running (as server.ts' idleTimeout does for sockets). */
  idleTimeout(ms: number, queryRunning: () => boolean, onIdle: () => void): void {
    const check = (): void => {
      if (this.#closed) return;
      const idleFor = this.state.idleMs;
      if (!queryRunning() && idleFor >= ms) onIdle();
      else setTimeout(check, queryRunning() ? ms : Math.max(1, ms - idleFor)).unref();
    };
    setTimeout(check, ms).unref();
  }

  #data(data: Buffer | null, error: string | null): void {
    if (data === null && this.#writing) {
      process.nextTick(() => this.#data(data, error));
      return;
    }
    if (data === null) {
      if (this.#ended) return;
      this.#ended = true;
      if (error !== null) this.emit('error', new Error(error));
      else this.emit('end');
      this.#addon.clientEnd(this.#client); // no half-open session: our FIN, then the socket closes
    } else if (data.length === 0) {
      this.emit('drain');
    } else {
      this.emit('data', data);
    }
  }

  #closedByC(): void {
    this.#closed = true;
    this.emit('close');
  }
}
