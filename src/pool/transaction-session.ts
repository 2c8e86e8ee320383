/**
 * PoolMode=transaction: a client holds a server connection of its pool only while a transaction
 * runs. The connection goes back at ReadyForQuery with status I once every message the client
 * sent has been answered and no extended-protocol sequence waits for its Sync; the client's next
 * message takes a connection again (the first free one, FIFO, within QueryWaitTimeout).
 *
 * Both directions are read message by message here, because what a client means depends on the
 * connection it lands on:
 * - Named prepared statements: each client's Parse is kept by name; the server gets one statement
 *   per text, parameter types and search_path (`lp_` and a hash), prepared on whichever connection the client
 *   is on before the Bind or Describe that needs it, at most MaxPreparedStatements per connection
 *   (least recently used closed first). A Parse the connection has already, and every Close of a
 *   statement, is answered here. Unnamed statements and portals pass unchanged.
 * - What a client is answered must stay in order with what the server answers: every message
 *   sent that the server answers has an entry in `#queue`, and answers made here (a skipped
 *   Parse's ParseComplete, a Close's CloseComplete) are entries too, sent when they reach its head.
 *   An error makes the server skip to the next Sync; the entries up to it are dropped as the
 *   server drops their messages (a statement's Parse that never ran is forgotten again).
 * - Settings: see client-settings.ts. Session state the proxy cannot carry (a SET of a setting the
 *   server does not report, LISTEN, PREPARE, DEALLOCATE, LOAD, DECLARE ... WITH HOLD, temporary tables,
 *   session advisory locks) marks the connection: ServerResetQuery runs on it before another
 *   client uses it, and the client is told once in a NOTICE.
 */
import { createHash } from 'node:crypto';
import { BackendCode, errorResponse, message, noticeResponse, parameterStatus } from '../wire/backend-messages.js';
import type { ErrorFields } from '../proxy/upstream.js';
import { bindMessage, closeMessage, describeMessage, FrontendCode, MalformedMessage, parseMessage, queryMessage, readBind, readParse, readTarget, FLUSH, SYNC } from '../wire/client-messages.js';
import { FrameReader, FramingError } from '../wire/frame-reader.js';
import type { RelayEnd, RelayStats } from '../proxy/relay.js';
import { native, NativeUpstream, type SessionRelay } from '../proxy/native-relay.js';
import { NativeClient, type Back, type ClientStream } from '../proxy/native-client.js';
import { converse, type Login, type Pool, type PoolObserver } from './pool.js';
import type { ServerConnection } from './server-connection.js';
import { carried, ClientSettings, literal } from './client-settings.js';
import { serverSettingsId, settingsId } from './desk.js';

export interface TransactionContext {
  readonly pool: Pool;
  /** The pool's one login key: transaction mode logs in with the database alone. */
  readonly loginKey: string;
  readonly login: Login;
  readonly maxPrepared: number;
  readonly upstreamName: string;
  readonly observer: PoolObserver;
  /**
   * Sends a CancelRequest for what `server` runs now: true once the server closed the cancel's
   * connection, false when it did not in time (see sendCancel); rejects when nothing was sent.
   */
  readonly cancel: (server: ServerConnection) => Promise<boolean>;
  /** Per relayed chunk (metrics). */
  readonly onBytes: (toUpstream: number, toClient: number) => void;
}

/** A client's startup the server refused (a setting's value): its fields go to the client. */
export class StartupRefused extends Error {
  override readonly name = 'StartupRefused';
  constructor(readonly fields: ErrorFields) {
    super(fields.find(([letter]) => letter === 'M')?.[1] ?? 'the server refused the startup settings');
  }
}

/**
 * Client messages handled, across every session: statements made before a DISCARD ALL or
 * DEALLOCATE ALL (a lower number) are those it drops; one made behind it in a pipeline stays.
 */
let handled = 0;

/** The largest message either side may send (Postgres' own limit for a client message is 1 GiB). */
const MAX_MESSAGE = 1 << 30;
/** Different startups whose greetings a pool remembers (more: it forgets them all and starts again). */
const MAX_GREETINGS = 1000;
/** How long a connection whose client left may take to finish what it was doing. */
const DRAIN_MS = 10_000;

/** What the server answers a message with, in the order the messages went. */
const enum Expect {
  Parse,
  Bind,
  Describe,
  Execute,
  Close,
  Sync,
  /** A simple Query or a FunctionCall: everything up to ReadyForQuery. */
  Query,
  /** Nothing: an answer made here, sent when it reaches the head. */
  Made,
}

interface Entry {
  readonly expect: Expect;
  /** Sent by the proxy, not the client: its answers are not the client's. */
  readonly hidden?: boolean;
  /** Made: the message. */
  readonly made?: Buffer;
  /** When the server skips the message (an error before it): undo what sending it assumed. */
  readonly onSkip?: () => void;
  /** Hidden queries: called at their ReadyForQuery with whether they succeeded. */
  readonly onDone?: (ok: boolean) => void;
  failed?: boolean;
  /**
   * The kind of text it runs or names. Query: its own. Parse of the unnamed statement: the
   * statement's, once the server has it. Bind: the bound statement's (none: the unnamed
   * statement's, read at BindComplete). Execute: its portal's as sent, which only makes a Parse
   * wait (a SET LOCAL is judged by the portal the server bound).
   */
  readonly kind?: TextKind;
  /** Bind and Execute: the portal. */
  readonly portal?: string;
  /** Query and Execute: when it was sent (see `handled`). */
  readonly at?: number;
}

/** What the proxy must know of a statement's text. */
interface TextKind {
  /** One SET LOCAL alone: its SET leaves nothing behind. */
  readonly setLocal: boolean;
  /** It may drop prepared statements (DISCARD ALL, DEALLOCATE): a Parse of a known name behind it waits for its answer. */
  readonly deallocates: boolean;
}

interface Statement {
  readonly serverName: string;
  readonly query: string;
  readonly types: Buffer;
  readonly kind: TextKind;
  /** When its Parse came (see `handled`). */
  readonly at: number;
  /** The fast path may Bind and Describe it (its text is one it carries: native/txclient.c, lp_text_plain). */
  readonly plain: boolean;
}

const PARSE_COMPLETE = message(0x31, Buffer.alloc(0));
const NO_PARAMETER_TYPES = Buffer.from([0, 0]);
/** Bind of the unnamed statement to the unnamed portal: no parameters, no result formats. */
const BIND_UNNAMED = bindMessage('', '', Buffer.alloc(6));
/** Execute of the unnamed portal, all rows. */
const EXECUTE_UNNAMED = message(FrontendCode.Execute, Buffer.alloc(5));
const CLOSE_COMPLETE = message(0x33, Buffer.alloc(0));
/**
 * Messages Postgres ignores outside an extended sequence and a COPY: a Flush, and COPY messages
 * still on their way after a COPY failed (the server answered it, and went back to the pool).
 */
const IGNORED_WHEN_IDLE = new Set<number>([FrontendCode.Flush, FrontendCode.CopyData, FrontendCode.CopyDone, FrontendCode.CopyFail]);

/** State a transaction leaves on its connection that the proxy cannot carry to the client's next one. */
const LEAKY_TEXT =
  /\b(temp|temporary)\s+(recursive\s+)?(table|view|sequence)\b|\binto\s+(temp|temporary)\b|\bpg_temp(_\d+)?\b|\bwith\s+hold\b|\bpg_(try_)?advisory_lock(_shared)?\s*\(|\bpg_settings\b/i;
/**
 * DEALLOCATE by name may have dropped a statement the proxy prepared for clients (`lp_...`): the
 * reset before the next client puts the connection's statements and the proxy's list in step again.
 * A DO block may SET anything (no command tag of its own shows it).
 */
const LEAKY_TAGS = new Set(['LISTEN', 'PREPARE', 'LOAD', 'DEALLOCATE', 'DO']);
/**
 * A text that is one SET LOCAL and nothing else (no semicolon inside): its SET tag leaves nothing
 * behind. Any other text's SET tags count, so a SET LOCAL in a longer text still draws the notice.
 */
const SET_LOCAL_ALONE = /^\s*set\s+local\s[^;]*;?\s*$/i;
/** A text that is one DISCARD ALL or DEALLOCATE ALL and nothing else. */
const DISCARDS_ALONE = /^\s*(discard\s+all|deallocate\s+(prepare\s+)?all)\s*;?\s*$/i;
/** A text that may drop prepared statements (DISCARD ALL, DEALLOCATE). */
const DEALLOCATES = /\b(discard\s+all|deallocate)\b/i;
const PLAIN: TextKind = { setLocal: false, deallocates: false };

/** A Query or Execute still to answer that may drop prepared statements. */
function dropsAhead(entry: Entry): boolean {
  return (entry.expect === Expect.Query || entry.expect === Expect.Execute) && entry.kind?.deallocates === true;
}

function kindOf(text: string): TextKind {
  const setLocal = SET_LOCAL_ALONE.test(text);
  const deallocates = DEALLOCATES.test(text);
  return setLocal || deallocates ? { setLocal, deallocates } : PLAIN;
}
/**
 * A set_config call that is not visibly local (is_local true): a setting for the session that no
 * command tag shows (the way row-level security often takes the application's user).
 */
function setsSessionConfig(text: string): boolean {
  const calls = text.match(/\bset_config\s*\(/gi)?.length ?? 0;
  return calls > 0 && calls > (text.match(/\bset_config\s*\([^()]*,\s*true\s*\)/gi)?.length ?? 0);
}

const ABORTED = 'current transaction is aborted, commands ignored until end of transaction block';
/** What Postgres still parses in an aborted transaction. */
const TRANSACTION_EXIT = /^\s*(commit|rollback|end|abort)\b/i;

const LEAK_NOTICE =
  'lakebase-proxy runs in PoolMode=transaction: session state this transaction left (a SET or set_config of a setting the server does not report, RESET, LISTEN, PREPARE, DEALLOCATE, LOAD, a DO block, ' +
  'a WITH HOLD cursor, a temporary table or a session advisory lock) is not carried to your next transaction, which may run on another server connection';
const LEAK_DETAIL = 'Use SET LOCAL, pg_advisory_xact_lock and objects that end with the transaction, or PoolMode=session.';

/**
 * The server-side name of a statement: the same text and parameter types share one on every
 * connection, unless the clients' search_path differs (the same text may name other tables, and
 * Postgres refuses a cached plan whose result type changed).
 */
function serverNameOf(query: string, types: Buffer, searchPath: string): string {
  return `lp_${createHash('sha256').update(query).update('\0').update(types).update(searchPath).digest('hex').slice(0, 40)}`;
}

/** The whole message (type, length, body) that `body` is the body of: frames are views into one buffer. */
function rawOf(body: Buffer): Buffer {
  return Buffer.from(body.buffer, body.byteOffset - 5, body.length + 5);
}

/** A connection of the pool for a client (waiting for its reset when it was taken during one). */
async function lease(context: TransactionContext, signal: AbortSignal): Promise<ServerConnection> {
  for (;;) {
    const taken = await context.pool.acquire(context.loginKey, context.login, signal);
    if (!taken.ready || (await taken.ready)) return taken.server;
  }
}

/**
 * The greeting for a new client: a connection of the pool takes its startup settings (the server
 * checks them, and reports them in its own words), and goes back; a later client with the same
 * startup gets the same greeting without a round trip. Throws StartupRefused, or what the pool
 * throws (PoolTimeoutError, PoolClosedError, a login's error).
 */
export async function greet(context: TransactionContext, startup: ReadonlyMap<string, string>, signal: AbortSignal): Promise<{ settings: ClientSettings; greeting: Buffer[] }> {
  const key = JSON.stringify([...startup]);
  const known = context.pool.greetings.get(key) as ClientSettings | undefined;
  const settings = known?.copy() ?? (await taken(context, startup, signal));
  if (!known) {
    if (context.pool.greetings.size >= MAX_GREETINGS) context.pool.greetings.clear();
    context.pool.greetings.set(key, settings.copy());
  }
  return { settings, greeting: [...settings.reported].map(([name, value]) => parameterStatus(name, value)) };
}

/** The settings of a startup as a connection of the pool takes and reports them. */
async function taken(context: TransactionContext, startup: ReadonlyMap<string, string>, signal: AbortSignal): Promise<ClientSettings> {
  const server = await lease(context, signal);
  const settings = ClientSettings.fromStartup(startup, server);
  const query = settings.landOn(server);
  if (query !== undefined) {
    const result = await converse(server.upstream, [query], 30_000).catch(() => ({ ok: false, parameters: [], error: undefined }));
    for (const [name, value] of result.parameters) server.setParameter(name, value);
    if (!result.ok) {
      context.pool.giveBack(server, 'I', true);
      throw result.error ? new StartupRefused(result.error) : new Error('the server connection failed while it took the startup settings');
    }
  }
  for (const [name, value] of server.parameters) settings.report(name, value);
  settings.greeted();
  context.pool.giveBack(server, 'I', false);
  return settings;
}

/** A server-side statement name's bytes, made once (the desk's rewrite asks for them once a transaction). */
const serverNameCache = new Map<string, Buffer>();
function serverNameBytes(name: string): Buffer {
  let bytes = serverNameCache.get(name);
  if (!bytes) {
    if (serverNameCache.size >= 10_000) serverNameCache.clear();
    bytes = Buffer.from(name);
    serverNameCache.set(name, bytes);
  }
  return bytes;
}

export class TransactionSession implements SessionRelay {
  readonly stats: RelayStats = { bytesToUpstream: 0, bytesToClient: 0 };
  readonly done: Promise<RelayEnd>;
  #resolve!: (end: RelayEnd) => void;
  #end: RelayEnd | undefined;
  readonly #client: ClientStream;
  /**
   * The client's socket in C (native-client.ts): between transactions the fast path there
   * carries what needs no bookkeeping of this engine, on a connection lent to it (`#lent`).
   */
  readonly #native: NativeClient | undefined;
  #lent: ServerConnection | undefined;
  /** The settings query sent ahead of the lending's first unit (ClientSettings.landOn), if any. */
  #lentSettings: string | undefined;
  /** The fast path's bytes counted so far (its counters are C's). */
  readonly #fastCounted = [0, 0];
  readonly #context: TransactionContext;
  readonly #settings: ClientSettings;
  /** Made at the first wait for a connection: an idle client holds none. */
  #abort: AbortController | undefined;
  readonly #fromClient = new FrameReader(MAX_MESSAGE, true);
  /** Made at each attach: an idle client holds none. */
  #fromServer: FrameReader | undefined;
  #server: ServerConnection | undefined;
  /** A client message that waits for a server connection (the client is paused meanwhile). */
  #held: { type: number; body: Buffer } | undefined;
  #acquiring = false;
  readonly #queue: Entry[] = [];
  /** Extended-protocol messages went since the last Sync: the connection is not the client's to give back. */
  #unsynced = false;
  /** The server skips messages until the next Sync (an error in an extended sequence). */
  #serverSkipping = false;
  /** An Execute went since the last Sync. */
  #executed = false;
  /**
   * Postgres fails the next command on the connection (XX000 "StartTransactionCommand: unexpected
   * state STARTED") after Execute, Query, Sync: the connection is closed rather than given to another client.
   */
  #spoiled = false;
  /** The client's sequence failed here (an answer made here): its messages are dropped until its Sync. */
  #clientSkipping = false;
  #status = 'I';
  /** ReadyForQuery messages still to come (Sync, Query and FunctionCall entries): `#status` is known when 0. */
  #readyPending = 0;
  /** The server waits for the client's COPY data. */
  #copyIn = false;
  /** The client has not ended the COPY FROM STDIN the server waits for: Postgres ignores its Syncs meanwhile. */
  #clientCopying = false;
  readonly #statements = new Map<string, Statement>();
  /**
   * Statements a Parse, a Close or an eviction changed (see #unsettle), with the count of
   * `#boundaries` sent before the first change still unanswered (`first`) and before the last.
   */
  readonly #unsettled = new Map<string, { first: number; last: number }>();
  /** Syncs and Queries sent (the ends of sequences). */
  #boundaries = 0;
  /** This client left state on the connection it holds: reset before another client uses it. */
  #leaked = false;
  #noticeDue = false;
  #noticed = false;
  /** SET commands, texts that are a SET LOCAL alone, and ParameterStatus messages since the last ReadyForQuery. */
  #sets = 0;
  /** A SET LOCAL alone completed since the last ReadyForQuery: reports there do not account for SETs. */
  #localSet = false;
  /**
   * The kind of the server's unnamed statement and of each of its portals: taken at ParseComplete
   * and BindComplete, so that a Parse or Bind the server refused or skipped changes nothing
   * (portals end with their transaction). As sent, for what only makes a Parse wait.
   */
  #unnamed = PLAIN;
  readonly #portals = new Map<string, TextKind>();
  #unnamedSent = PLAIN;
  readonly #portalsSent = new Map<string, TextKind>();
  /** Client statements made before this are gone (see ServerConnection.droppedBefore). */
  #droppedBefore = 0;
  /** A DISCARD ALL is on its way: what the client sends behind it waits, then lands on a connection with its settings. */
  #discardAhead = false;
  /**
   * The client's DISCARD ALL ran: until its ReadyForQuery the server's reports of its login's
   * defaults are not the client's; these values (back to its greeting's) are reported instead.
   */
  #discarded: Array<[string, string]> | undefined;
  #reports = 0;
  #toServer: Buffer[] = [];
  #toClient: Buffer[] = [];
  #releaseDue = false;
  /** Set by endAfterTransaction(). */
  #ending = false;
  /**
   * CancelRequests on their way to the connection the client holds: the connection goes back only
   * once they arrived, or one could cancel the next client's query there. False: the server did
   * not say one arrived, and the connection is closed rather than given back (#giveBackAfterCancel).
   */
  #cancelling: Promise<boolean> | undefined;
  /** The client is gone: what the server still answers is dropped until its connection can go back. */
  #draining: NodeJS.Timeout | undefined;
  /** Listeners on the server connection held (made at the first attach: an idle client holds none). */
  #onServer: { data: (chunk: Buffer) => void; gone: () => void; drain: () => void } | undefined;
  readonly #onClientDrain = (): void => {
    this.#server?.upstream.resume();
  };

  constructor(client: ClientStream, clientFirst: Buffer, settings: ClientSettings, context: TransactionContext) {
    this.#client = client;
    if (client instanceof NativeClient) {
      this.#native = client;
      client.onNeed = (unit, waitedMs) => this.#lend(unit, waitedMs);
      client.onBack = (back) => this.#back(back);
      client.onRewrite = (unit, deskId) => {
        // A connection of the desk, lent by C: the statements by its names, when it has them all (else the engine takes both).
        const server = this.#end === undefined ? this.#context.pool.desk?.server(deskId) : undefined;
        return (server && this.#serverNames(server, unit)) ?? null;
      };
    }
    this.#context = context;
    this.#settings = settings;
    this.done = new Promise((resolve) => (this.#resolve = resolve));
    this.#fromClient.push(clientFirst);
    client.on('data', (chunk: Buffer) => {
      this.#fromClient.push(chunk);
      this.#pump();
    });
    client.on('end', () => this.#clientGone('client_closed'));
    client.on('close', () => this.#clientGone('client_closed'));
    client.on('error', () => this.#clientGone('client_error'));
    client.on('drain', this.#onClientDrain);
    this.#pump();
    client.resume();
  }

  /** Something sent that the server has not answered yet. */
  get queryRunning(): boolean {
    if (this.#server === undefined) return this.#native?.state.running === true; // lent to C, or nothing held
    return this.#queue.length > 0 || this.#unsynced;
  }

  /** The server connection the client holds now, if any (the console's SHOW CLIENTS): the engine's, or one lent to C. */
  get server(): ServerConnection | undefined {
    if (this.#server) return this.#server;
    if (this.#lent) return this.#lent;
    const deskId = this.#native?.state.deskId ?? 0;
    return deskId > 0 ? this.#context.pool.desk?.server(deskId) : undefined;
  }

  /** The client's CancelRequest: to the connection running its query, else dropped. */
  cancel(): Promise<void> {
    const server = this.server;
    const running = this.#server ? this.#queue.length > 0 && !this.#draining : this.#native?.state.running === true;
    if (!server || !running) return Promise.resolve();
    // A connection of the desk comes back here at the transaction's end, to wait for the cancel (#giveBackAfterCancel), not on to the next client.
    if (!this.#server && !this.#lent) this.#native?.hold();
    const sent = this.#context.cancel(server);
    const landed = sent.catch(() => true); // nothing sent: nothing to land
    const earlier = this.#cancelling;
    this.#cancelling = earlier ? Promise.all([earlier, landed]).then(([first, second]) => first && second) : landed;
    return sent.then(() => undefined);
  }

  /**
   * The proxy shuts down: a client between transactions is told so (57P01) and closed now, one in
   * a transaction when it ends.
   */
  endAfterTransaction(): void {
    this.#ending = true;
    // Off the desk: its transaction under way comes back here (not to the desk's next client), a wait on it asks the pool.
    this.#native?.desk(undefined, 0);
    if (!this.#server && !this.#acquiring && !this.#lent && this.#native?.state.lent !== true) this.#shutDown();
  }

  close(end: RelayEnd = 'shutdown'): void {
    this.#clientGone(end);
    this.#client.destroy();
  }

  // ---- client to server

  #pump(): void {
    while (this.#end === undefined) {
      let frame: { type: number; body: Buffer } | undefined;
      try {
        frame = this.#held ?? this.#fromClient.next();
      } catch (error) {
        this.#protocolViolation((error as FramingError).message);
        return;
      }
      if (!frame) break;
      const wasHeld = this.#held !== undefined;
      this.#held = undefined;
      if (!this.#server && IGNORED_WHEN_IDLE.has(frame.type)) {
        // Postgres answers none of these when it runs nothing: no connection is taken for them.
        // One held (a Flush behind a DISCARD ALL, its connection given back since) had paused the client.
        if (wasHeld) this.#client.resume();
        continue;
      }
      if (!this.#server && frame.type !== FrontendCode.Terminate) {
        this.#held = frame;
        this.#client.pause();
        void this.#attach();
        break;
      }
      try {
        if (!this.#clientMessage(frame.type, frame.body)) {
          // It waits for the transaction status that the answers still to come will tell.
          this.#held = frame;
          this.#client.pause();
          break;
        }
      } catch (error) {
        if (!(error instanceof MalformedMessage)) throw error;
        this.#protocolViolation(error.message);
        return;
      }
    }
    this.#flush();
    this.#goFast();
  }

  /** Between transactions, with nothing held or pending: the client's next units go to the fast path. */
  #goFast(): void {
    const native = this.#native;
    if (!native || this.#server || this.#lent || this.#acquiring || this.#held || this.#queue.length > 0 || this.#end !== undefined || this.#ending) return;
    if (this.#unsynced || this.#clientSkipping || this.#serverSkipping || this.#draining || this.#discardAhead || this.#toClient.length > 0) return;
    native.resume();
    this.#deskTerms(native);
    native.fast(this.#fromClient.takeRemaining());
  }

  /**
   * C hands the pool's connections to this client itself (the desk) while its settings are a
   * shared set (a connection in them needs nothing set) and its unnamed statement is plain (a
   * Parse of the fast path's leaves it so, unseen here); not once it is to end.
   */
  #deskTerms(native: NativeClient): void {
    const sid = this.#unnamed === PLAIN && this.#unnamedSent === PLAIN && !this.#ending ? settingsId(this.#settings.shared) : 0;
    native.desk(sid > 0 ? this.#context.pool.desk : undefined, sid);
  }

  /**
   * The fast path waits with a unit: a connection is lent to it, or, where it cannot be, the unit
   * comes here. The pool hands a connection over synchronously when it can (Pool.lendTo).
   */
  #lend(unit: Buffer | null, waitedMs = 0): void {
    if (this.#acquiring || this.#end !== undefined) return;
    this.#acquiring = true;
    // `waitedMs`: on the desk already (its wait counts against QueryWaitTimeout).
    const started = Date.now() - waitedMs;
    this.#context.pool.lendTo(
      this.#context.loginKey,
      this.#context.login,
      (this.#abort ??= new AbortController()).signal,
      (server, error) => {
        this.#acquiring = false;
        if (server) this.#landFast(server, unit);
        else this.#leaseFailed(error);
      },
      started,
    );
  }

  #landFast(server: ServerConnection, unit: Buffer | null): void {
    if (this.#end !== undefined) {
      this.#context.pool.giveBack(server, 'I', false);
      return;
    }
    const native = this.#native as NativeClient;
    const query = this.#settings.landOn(server);
    // A unit of the client's named statements goes with the server's names, when the connection
    // has them all (and no settings go ahead of it: C would have to hold it back).
    const rewritten = unit && query === undefined ? this.#serverNames(server, unit) : undefined;
    if (server.upstream instanceof NativeUpstream && (!unit || rewritten)) {
      // Lent before the call: the connection may come back inside it (its end read at once).
      this.#lent = server;
      this.#lentSettings = query;
      // In the client's settings already: it joins the desk (C hands it on from there).
      const desk = query === undefined ? native.deskOf : undefined;
      const sid = desk ? serverSettingsId(server) : 0;
      const join = desk && sid > 0 && sid === native.deskSid ? desk.join(server, sid) : undefined;
      // The client's settings, where they differ, go ahead of its unit (answered first, kept from it).
      const attached = native.attach(server.upstream, query === undefined ? undefined : queryMessage(query), rewritten, join);
      if (join && attached !== 'joined') desk?.left(join[0]);
      if (attached === 'joined' && this.#lent === server) this.#lent = undefined; // the desk's now (it comes back with its id)
      if (typeof attached === 'string') return;
      this.#lent = undefined;
    }
    // A connection C cannot take, or a statement it does not have yet: this transaction runs here.
    this.#fromClient.push(native.takeBack());
    this.#use(server, query, 'I');
  }

  /**
   * The fast path's unit (Bind to the unnamed portal, Describe, Execute, Sync) with the server's
   * names of the client's statements, or undefined when one is unknown, not plain, or not
   * prepared on `server` yet (the engine prepares it). Nothing is in flight: every Parse and
   * Close of the client has been answered, so its statements and the connection's are settled.
   * On bytes, once a transaction (the desk's `rewrite`, or a lending of the pool): C passed the
   * unit as lp_unit_length took it (whole messages to a Sync; a named statement only in the
   * unnamed portal's Bind and in a Describe of a statement), so only those two messages change.
   */
  #serverNames(server: ServerConnection, unit: Buffer): Buffer | undefined {
    // First the names and the length, then one buffer: this runs once a transaction.
    let length = unit.length;
    let renamed: Array<{ nameAt: number; nameEnd: number; name: Buffer; serverName: string }> | undefined;
    for (let at = 0; at + 5 <= unit.length; at += 1 + unit.readUInt32BE(at + 1)) {
      const type = unit[at] as number;
      // Bind: portal (unnamed: one NUL), then the statement's name; Describe 'S': the name.
      const nameAt = at + 6;
      if (type !== FrontendCode.Bind && !(type === FrontendCode.Describe && unit[at + 5] === 0x53)) continue;
      const nameEnd = unit.indexOf(0, nameAt);
      if (nameEnd <= nameAt) continue; // the unnamed statement
      const statement = this.#statements.get(unit.toString('utf8', nameAt, nameEnd));
      if (!statement?.plain || !server.prepared.has(statement.serverName)) return undefined;
      const name = serverNameBytes(statement.serverName);
      (renamed ??= []).push({ nameAt, nameEnd, name, serverName: statement.serverName });
      length += name.length - (nameEnd - nameAt);
    }
    if (!renamed) return unit;
    // Counted once the connection has them all (else the engine counts them as it prepares them).
    for (const { serverName } of renamed) {
      this.#touch(server, serverName);
      this.#context.observer.prepared(true);
    }
    const out = Buffer.allocUnsafe(length);
    let from = 0;
    let to = 0;
    let next = 0;
    for (let at = 0; at + 5 <= unit.length; ) {
      const end = at + 1 + unit.readUInt32BE(at + 1);
      const change = renamed[next];
      if (change && change.nameAt === at + 6) {
        const grown = change.name.length - (change.nameEnd - change.nameAt);
        to += unit.copy(out, to, from, change.nameAt);
        out.writeUInt32BE(end - at - 1 + grown, to - (change.nameAt - at) + 1);
        to += change.name.copy(out, to);
        from = change.nameEnd;
        next++;
      }
      at = end;
    }
    unit.copy(out, to, from);
    return out;
  }

  /** The lent connection is back from the fast path (see native/txclient.h). */
  #back(back: Back): void {
    const server = back.deskId > 0 ? this.#context.pool.desk?.left(back.deskId) : this.#lent;
    if (!server) return;
    if (back.deskId === 0) this.#lent = undefined;
    const settings = this.#lentSettings;
    this.#lentSettings = undefined;
    (server.upstream as NativeUpstream).reclaim();
    this.#countFast();
    // The settings sent ahead are in force (their reports were not read: the values are the client's); what the lending reported comes after.
    if (settings !== undefined && !back.settingsFailed) this.#settings.landedOn(server);
    // Session state went by after all (a function, a statement of the text filter's blind spots): reset, and said once.
    const leaked = back.leaked || back.reportsLost;
    if (back.leaked) this.#noticeOnce();
    if (back.reports) {
      for (let at = 0; at + 5 <= back.reports.length; at += 1 + back.reports.readUInt32BE(at + 1)) {
        const [name = '', value = ''] = back.reports.toString('utf8', at + 5, at + 1 + back.reports.readUInt32BE(at + 1)).split('\0');
        server.setParameter(name, value);
        this.#settings.report(name, value);
      }
      // Its settings changed: the desk's connections in the old ones are not its any more.
      this.#deskTerms(this.#native as NativeClient);
    }
    // Its texts were plain (native/txclient.c, lp_text_plain): so are the unnamed statement and portal it made.
    if (back.parsed) this.#unnamed = this.#unnamedSent = PLAIN;
    if (back.bound) {
      this.#portals.set('', PLAIN);
      this.#portalsSent.set('', PLAIN);
    }
    switch (back.how) {
      case 'released': {
        if (this.#portals.size > 0) this.#portals.clear();
        if (this.#portalsSent.size > 0) this.#portalsSent.clear();
        this.#context.observer.transaction(true);
        this.#giveBackAfterCancel(server, 'I', leaked);
        if (this.#ending) this.#shutDown();
        return;
      }
      case 'handover':
        // A unit the fast path does not carry, inside the transaction: the rest of it runs here.
        if (leaked) this.#leaked = true;
        if (back.rest) this.#fromClient.push(back.rest);
        this.#use(server, undefined, back.status);
        return;
      case 'client_gone':
        // A statement may run: cancelled, and the connection closed rather than reused (a cancel
        // may land late). Else it goes back as it is: the pool rolls back a transaction left open.
        if (back.running) {
          this.#cancelling = undefined;
          void this.#context.cancel(server).catch(() => {}).finally(() => server.close());
        } else {
          this.#giveBackAfterCancel(server, back.status, leaked);
        }
        return;
      case 'settings_failed':
        // None of the client's units went: the engine takes them, with the settings again (it reports their error).
        if (back.rest) this.#fromClient.push(back.rest);
        this.#use(server, settings, back.status);
        return;
      case 'upstream_gone':
        server.close();
        this.#refuse('08006', `the server connection to ${this.#context.upstreamName} running this transaction was lost${back.reason ? `: ${back.reason}` : ''}`, 'upstream_closed');
        return;
    }
  }

  /**
   * To the pool once a CancelRequest on its way has arrived: else it could cancel the next
   * client's query there. Closed when the server did not say it arrived.
   */
  #giveBackAfterCancel(server: ServerConnection, status: string, leaked: boolean): void {
    const cancelling = this.#cancelling;
    this.#cancelling = undefined;
    if (!cancelling) {
      this.#context.pool.giveBack(server, status, leaked);
      return;
    }
    void cancelling.then((landed) => (landed ? this.#context.pool.giveBack(server, status, leaked) : server.close()));
  }

  /** The NOTICE that session state does not survive in transaction mode, once a client (after the fast path's transaction: its ReadyForQuery went already). */
  #noticeOnce(): void {
    if (this.#noticed || this.#end !== undefined) return;
    this.#noticed = true;
    this.#client.write(noticeResponse(LEAK_NOTICE, LEAK_DETAIL));
  }

  /** What the fast path moved since the last count, into the session's stats and the metrics. */
  #countFast(): void {
    const counters = this.#native?.counters;
    if (!counters) return;
    const up = (counters[0] ?? 0) - (this.#fastCounted[0] ?? 0);
    const down = (counters[1] ?? 0) - (this.#fastCounted[1] ?? 0);
    if (up === 0 && down === 0) return;
    this.#fastCounted[0] = counters[0] ?? 0;
    this.#fastCounted[1] = counters[1] ?? 0;
    // The metrics count them as C moves them (NativeClient's totals).
    this.stats.bytesToUpstream += up;
    this.stats.bytesToClient += down;
  }

  /** Handles one client message; false when it must wait until the server's status is known. */
  #clientMessage(type: number, body: Buffer): boolean {
    if (type === FrontendCode.Terminate) {
      this.#flush();
      this.#clientGone('client_closed');
      this.#client.end();
      return true;
    }
    // Skipped to the Sync: an error made here, or the server's (it ignores these messages; sent,
    // a statement to prepare would evict one whose Close the skip undid, forever).
    if ((this.#clientSkipping || this.#serverSkipping) && type !== FrontendCode.Sync) return true;
    handled++;
    if (this.#discardAhead) {
      if (this.#readyPending > 0) return false;
      this.#discardAhead = false;
    }
    if (type === FrontendCode.Parse) {
      this.#unsynced = true;
      return this.#parse(body);
    }
    return this.#otherMessage(type, body);
  }

  /** The messages but Parse; false when one must wait until the fate of the statement it names is known. */
  #otherMessage(type: number, body: Buffer): boolean {
    switch (type) {
      case FrontendCode.Query: {
        if (this.#executed) this.#spoiled = true;
        const text = body.toString('utf8', 0, Math.max(0, body.length - 1));
        this.#watchText(text);
        // Not in a COPY: Postgres answers a Query there with an error alone, and nothing behind it would go.
        if (!this.#clientCopying && DISCARDS_ALONE.test(text)) this.#discardAhead = true;
        this.#expect({ expect: Expect.Query, kind: kindOf(text), at: handled });
        this.#send(rawOf(body));
        return true;
      }
      case FrontendCode.FunctionCall:
        this.#expect({ expect: Expect.Query });
        this.#send(rawOf(body));
        return true;
      case FrontendCode.Sync:
        if (this.#clientCopying) {
          // Ignored by Postgres in copy-in mode (libpq sends one with the COPY, and another after CopyDone).
          this.#send(rawOf(body));
          return true;
        }
        this.#clientSkipping = false;
        this.#unsynced = false;
        this.#executed = false;
        this.#expect({ expect: Expect.Sync });
        this.#send(rawOf(body));
        return true;
      case FrontendCode.Bind: {
        this.#unsynced = true;
        const bind = readBind(body);
        const statement = bind.statement === '' ? undefined : this.#statements.get(bind.statement);
        if (this.#waitsToName(bind.statement, statement)) return false;
        if (statement) this.#ensurePrepared(statement);
        this.#portalsSent.set(bind.portal, bind.statement === '' ? this.#unnamedSent : (statement?.kind ?? PLAIN));
        this.#send(statement ? bindMessage(bind.portal, statement.serverName, bind.rest) : rawOf(body));
        this.#expect({ expect: Expect.Bind, portal: bind.portal, ...(bind.statement === '' ? {} : { kind: statement?.kind ?? PLAIN }) });
        return true;
      }
      case FrontendCode.Describe: {
        this.#unsynced = true;
        const { kind, name } = readTarget(body, 'Describe');
        const statement = kind === 'S' && name !== '' ? this.#statements.get(name) : undefined;
        if (kind === 'S' && this.#waitsToName(name, statement)) return false;
        if (statement) this.#ensurePrepared(statement);
        this.#send(statement ? describeMessage('S', statement.serverName) : rawOf(body));
        this.#expect({ expect: Expect.Describe });
        return true;
      }
      case FrontendCode.Close: {
        this.#unsynced = true;
        const { kind, name } = readTarget(body, 'Close');
        if (kind === 'S' && name !== '') {
          // After the answer to an earlier change of the name: an undo of that change must not come after this one.
          if (this.#unsettledBefore(name, undefined)) return false;
          // The statement stays prepared on the server for others; this client's name goes.
          const statement = this.#statements.get(name);
          this.#statements.delete(name);
          this.#unsettle(`c:${name}`);
          const restore = (): void => {
            // Not when a DISCARD ALL or DEALLOCATE ALL ahead of the Close dropped it anyway.
            if (statement && !this.#statements.has(name) && statement.at >= this.#droppedBefore) this.#statements.set(name, statement);
          };
          this.#expect({ expect: Expect.Made, made: CLOSE_COMPLETE, onSkip: restore });
          return true;
        }
        this.#send(rawOf(body));
        this.#expect({ expect: Expect.Close });
        return true;
      }
      case FrontendCode.Execute:
        this.#unsynced = true;
        this.#executed = true;
        this.#send(rawOf(body));
        const portal = body.toString('utf8', 0, Math.max(0, body.indexOf(0)));
        this.#expect({ expect: Expect.Execute, portal, kind: this.#portalsSent.get(portal) ?? PLAIN, at: handled });
        return true;
      case FrontendCode.Flush:
        this.#send(rawOf(body));
        return true;
      case FrontendCode.CopyDone:
      case FrontendCode.CopyFail:
        this.#clientCopying = false;
        this.#send(rawOf(body));
        return true;
      default:
        // CopyData, CopyDone, CopyFail; anything else, the server judges.
        this.#send(rawOf(body));
        return true;
    }
  }

  /**
   * A Parse: an unnamed one, or one the connection does not have yet, goes to the server under
   * the statement's server-side name. One it has already, or a name the client uses already, is
   * answered here as Postgres would: which needs the transaction's status (in an aborted
   * transaction a Parse fails with 25P02 first), so it waits (false) while answers are to come.
   */
  #parse(body: Buffer): boolean {
    const parse = readParse(body);
    if (parse.name === '') {
      this.#watchText(parse.query);
      this.#unnamedSent = kindOf(parse.query);
      this.#send(rawOf(body));
      this.#expect({ expect: Expect.Parse, kind: this.#unnamedSent });
      return true;
    }
    const server = this.#server as ServerConnection;
    const serverName = serverNameOf(parse.query, parse.types, this.#settings.searchPath);
    // Answered here only where the server would answer ParseComplete: not in an aborted
    // transaction, and not for a name whose own Parse may still fail in an earlier sequence.
    if ((server.prepared.has(serverName) || this.#statements.has(parse.name)) && this.#readyPending > 0) return false;
    if (this.#unsettledBefore(parse.name, { serverName })) return false;
    if (!this.#statements.has(parse.name) && this.#evictsUnsettled(server, serverName)) return false;
    if ((server.prepared.has(serverName) || this.#statements.has(parse.name)) && this.#queue.some(dropsAhead)) {
      // A DISCARD ALL or DEALLOCATE ahead in the pipeline may drop the name or the statement first, as Postgres runs them: its answer decides, and a Flush brings it.
      this.#send(FLUSH);
      return false;
    }
    if ((server.prepared.has(serverName) || this.#statements.has(parse.name)) && this.#status === 'E' && this.#queue.some((entry) => entry.expect === Expect.Execute)) {
      // An Execute still to answer may end the aborted transaction (COMMIT, ROLLBACK): its answer decides, and a Flush brings it.
      this.#send(FLUSH);
      return false;
    }
    if (this.#statements.has(parse.name)) {
      // In an aborted transaction Postgres refuses all but COMMIT and ROLLBACK before it looks at the name.
      if (this.#status === 'E' && !TRANSACTION_EXIT.test(parse.query)) this.#fail('25P02', ABORTED);
      else this.#fail('42P05', `prepared statement "${parse.name}" already exists`, parse);
      return true;
    }
    this.#watchText(parse.query);
    const answeredHere = server.prepared.has(serverName);
    if (answeredHere && this.#status === 'E' && !TRANSACTION_EXIT.test(parse.query)) {
      this.#fail('25P02', ABORTED);
      return true;
    }
    const kind = kindOf(parse.query);
    const plain = this.#native !== undefined && kind === PLAIN && native.addon?.textPlain(Buffer.from(parse.query)) === true;
    const statement: Statement = { serverName, query: parse.query, types: Buffer.from(parse.types), kind, at: handled, plain };
    this.#statements.set(parse.name, statement);
    this.#unsettle(`c:${parse.name}`);
    const forget = (): void => {
      if (this.#statements.get(parse.name) === statement) this.#statements.delete(parse.name);
    };
    if (answeredHere) {
      this.#touch(server, serverName);
      this.#context.observer.prepared(true);
      this.#expect({ expect: Expect.Made, made: PARSE_COMPLETE, onSkip: forget });
      return true;
    }
    this.#prepare(server, statement, false, forget);
    return true;
  }

  /**
   * An error for the client's current sequence, raised by the server (a DO block) so that the
   * server's transaction fails with it as Postgres' own would (an implicit one is rolled back, a
   * transaction block is aborted; in one aborted already, it is made here). The
   * client's messages up to its Sync are dropped, as the server would skip them. The client's
   * unnamed statement is replaced by the DO block.
   */
  #fail(code: string, text: string, parse?: { readonly query: string; readonly types: Buffer }): void {
    if (this.#status === 'E') {
      // The server would refuse the DO block with 25P02; Postgres checks a Parse's name first. It
      // gets nothing more until the Sync, as it would skip it anyway, but a Flush: Postgres sends
      // an error at once, with the answers before it.
      this.#send(FLUSH);
      this.#expect({ expect: Expect.Made, made: errorResponse({ severity: 'ERROR', code, message: text }) });
      this.#clientSkipping = true;
      return;
    }
    if (parse) {
      // Postgres parses a Parse's text before it looks at the name: the text's own error comes first.
      this.#send(parseMessage('', parse.query, parse.types));
      this.#expect({ expect: Expect.Parse, hidden: true, kind: kindOf(parse.query) });
    }
    const body = `BEGIN RAISE EXCEPTION USING ERRCODE = ${literal(code)}, MESSAGE = ${literal(text)}; END`;
    this.#send(parseMessage('', `DO ${literal(body)}`, NO_PARAMETER_TYPES));
    this.#expect({ expect: Expect.Parse, hidden: true, kind: PLAIN });
    this.#send(BIND_UNNAMED);
    this.#expect({ expect: Expect.Bind, hidden: true, portal: '', kind: PLAIN });
    this.#send(EXECUTE_UNNAMED);
    this.#expect({ expect: Expect.Execute, hidden: true });
    this.#clientSkipping = true;
  }

  /** Before a Bind or Describe of `statement`: the connection has it, or gets it now (its answer hidden). */
  #ensurePrepared(statement: Statement): void {
    const server = this.#server as ServerConnection;
    if (server.prepared.has(statement.serverName)) {
      this.#touch(server, statement.serverName);
      this.#context.observer.prepared(true);
      return;
    }
    this.#prepare(server, statement, true);
  }

  #prepare(server: ServerConnection, statement: Statement, hidden: boolean, forget?: () => void): void {
    for (let excess = server.prepared.size - this.#context.maxPrepared + 1; excess > 0; excess--) {
      const [oldest, preparedAt] = server.prepared.entries().next().value as [string, number];
      server.prepared.delete(oldest);
      this.#unsettle(`s:${oldest}`);
      this.#send(closeMessage('S', oldest));
      this.#expect({ expect: Expect.Close, hidden: true, onSkip: () => void (preparedAt >= server.droppedBefore && server.prepared.set(oldest, preparedAt)) });
    }
    server.prepared.set(statement.serverName, handled);
    this.#unsettle(`s:${statement.serverName}`);
    this.#send(parseMessage(statement.serverName, statement.query, statement.types));
    this.#context.observer.prepared(false);
    this.#expect({
      expect: Expect.Parse,
      hidden,
      onSkip: () => {
        server.prepared.delete(statement.serverName);
        forget?.();
      },
    });
  }

  /**
   * A client's statement name (`c:`) or a statement on the server (`s:`) that a Parse, a Close or
   * an eviction changes: an error before it in its sequence makes the server skip that change.
   */
  #unsettle(key: string): void {
    // The first change is kept: a later one in this sequence must not hide one still unanswered in an earlier.
    const changes = this.#unsettled.get(key);
    if (changes) changes.last = this.#boundaries;
    else this.#unsettled.set(key, { first: this.#boundaries, last: this.#boundaries });
  }

  /**
   * The client's statement `name`, or the server's statement for it, was changed before a Sync (or
   * Query) whose answer is still to come: until it comes, a message naming it cannot know whether
   * the change stood.
   */
  #unsettledBefore(name: string, statement: { readonly serverName: string } | undefined): boolean {
    if (this.#readyPending === 0) return false;
    const before = (key: string): boolean => (this.#unsettled.get(key)?.first ?? Number.POSITIVE_INFINITY) < this.#boundaries;
    return (name !== '' && before(`c:${name}`)) || (statement !== undefined && before(`s:${statement.serverName}`));
  }

  /**
   * Preparing a statement `server` lacks would evict one whose Parse or eviction in an earlier
   * sequence is still unanswered: it waits for that answer. Were that sequence to fail, its undo
   * (forget the Parse, restore the evicted) would meet this eviction's and leave the proxy's
   * account of the connection's statements wrong (a 42P05 or 26000 later).
   */
  #evictsUnsettled(server: ServerConnection, serverName: string): boolean {
    if (this.#readyPending === 0 || server.prepared.has(serverName)) return false;
    let excess = server.prepared.size - this.#context.maxPrepared + 1;
    for (const name of server.prepared.keys()) {
      if (excess-- <= 0) return false;
      if (this.#unsettledBefore('', { serverName: name })) return true;
    }
    return false;
  }

  /**
   * A Bind or Describe naming the client's statement `name` waits: while a change of it is
   * unsettled (#unsettledBefore); for a DISCARD ALL or DEALLOCATE ahead in the pipeline, which may
   * drop it as Postgres runs them (their answer decides, and a Flush brings it); or while preparing
   * it would evict a statement still unsettled (#evictsUnsettled).
   */
  #waitsToName(name: string, statement: Statement | undefined): boolean {
    if (this.#unsettledBefore(name, statement)) return true;
    if (!statement) return false;
    if (this.#queue.some(dropsAhead)) {
      this.#send(FLUSH);
      return true;
    }
    return this.#evictsUnsettled(this.#server as ServerConnection, statement.serverName);
  }

  #touch(server: ServerConnection, name: string): void {
    const preparedAt = server.prepared.get(name) as number;
    server.prepared.delete(name);
    server.prepared.set(name, preparedAt);
  }

  /** Text that makes session state the proxy cannot carry marks the connection. */
  #watchText(text: string): void {
    if (LEAKY_TEXT.test(text) || setsSessionConfig(text)) this.#leak();
  }

  #leak(): void {
    this.#leaked = true;
    if (!this.#noticed) this.#noticeDue = true;
  }

  #expect(entry: Entry): void {
    if (this.#serverSkipping && entry.expect !== Expect.Sync) {
      entry.onSkip?.();
      return;
    }
    if (entry.expect === Expect.Sync) this.#serverSkipping = false;
    if (entry.expect === Expect.Sync || entry.expect === Expect.Query) {
      this.#readyPending++;
      this.#boundaries++;
    }
    this.#queue.push(entry);
    if (this.#queue.length === 1) this.#madeAnswers();
  }

  #send(raw: Buffer): void {
    this.#toServer.push(raw);
  }

  // ---- server connections

  async #attach(): Promise<void> {
    const server = await this.#take();
    if (server) this.#use(server, this.#settings.landOn(server), 'I');
  }

  /** A connection of the pool for the client's next transaction; undefined when there is none to use (the client is told why). */
  async #take(): Promise<ServerConnection | undefined> {
    if (this.#acquiring) return undefined;
    this.#acquiring = true;
    let server: ServerConnection;
    try {
      server = await lease(this.#context, (this.#abort ??= new AbortController()).signal);
    } catch (error) {
      this.#acquiring = false;
      this.#leaseFailed(error);
      return undefined;
    }
    this.#acquiring = false;
    if (this.#end !== undefined) {
      this.#context.pool.giveBack(server, 'I', false);
      return undefined;
    }
    return server;
  }

  /** No connection for the client: it is told why (unless it left, or the proxy shuts down). */
  #leaseFailed(error: unknown): void {
    if (this.#end !== undefined) return;
    if (this.#ending) {
      this.#shutDown();
      return;
    }
    const facing = error as { sqlstate?: string; message: string };
    this.#refuse(facing.sqlstate ?? '08006', facing.message, 'upstream_error');
  }

  /** The client holds `server` (at a ReadyForQuery of `status`); `query` sets its settings there first. */
  #use(server: ServerConnection, query: string | undefined, status: string): void {
    this.#server = server;
    this.#fromServer = new FrameReader(MAX_MESSAGE, true);
    this.#status = status;
    this.#onServer ??= {
      data: (chunk) => this.#serverData(chunk),
      gone: () => this.#serverLost(),
      drain: () => {
        if (!this.#held) this.#client.resume();
      },
    };
    server.upstream.on('data', this.#onServer.data);
    server.upstream.on('end', this.#onServer.gone);
    server.upstream.on('close', this.#onServer.gone);
    server.upstream.on('drain', this.#onServer.drain);
    server.upstream.resume();
    if (query !== undefined) {
      this.#send(queryMessage(query));
      this.#expect({ expect: Expect.Query, hidden: true, onDone: (ok) => void (ok || this.#leak()) });
    }
    this.#client.resume();
    this.#pump();
  }

  /** The client is done with its connection for now: it goes back to the pool. */
  #detach(): void {
    const server = this.#server;
    if (!server) return;
    this.#server = undefined;
    this.#releaseDue = false;
    this.#unlisten(server);
    server.upstream.pause();
    if (this.#draining) clearTimeout(this.#draining);
    this.#draining = undefined;
    const leaked = this.#leaked;
    this.#leaked = false;
    const spoiled = this.#spoiled;
    this.#spoiled = false;
    const unread = this.#fromServer?.buffered ?? 0;
    this.#fromServer = undefined;
    if (unread > 0 || this.#queue.length > 0 || spoiled) {
      // A message of its half read, or a session Postgres spoiled: nothing to give back. A cancel
      // on its way went to this connection: the client's next one waits for none.
      this.#cancelling = undefined;
      server.close();
      return;
    }
    this.#context.observer.transaction();
    this.#giveBackAfterCancel(server, this.#status, leaked);
  }

  #unlisten(server: ServerConnection): void {
    const on = this.#onServer;
    if (!on) return;
    server.upstream.off('data', on.data);
    server.upstream.off('end', on.gone);
    server.upstream.off('close', on.gone);
    server.upstream.off('drain', on.drain);
  }

  #serverData(chunk: Buffer): void {
    const reader = (this.#fromServer ??= new FrameReader(MAX_MESSAGE, true));
    reader.push(chunk);
    try {
      for (let frame = reader.next(); frame; frame = reader.next()) this.#serverMessage(frame.type, frame.body);
    } catch (error) {
      if (!(error instanceof FramingError)) throw error;
      (this.#server as ServerConnection).close(); // the 'close' that follows ends the client's session
      return;
    }
    this.#flush();
    if (this.#releaseDue && this.#server) {
      this.#detach();
      if (this.#ending) this.#shutDown();
      else if (this.#end === undefined) {
        // Paused for the server's backpressure, the client waits for no 'drain' of a connection it gave back.
        if (!this.#held) this.#client.resume();
        this.#pump();
      }
    } else if (this.#held && this.#server && this.#readyPending === 0) {
      this.#client.resume();
      this.#pump();
    }
  }

  #serverMessage(type: number, body: Buffer): void {
    const head = this.#queue[0];
    if (type === BackendCode.ParameterStatus) {
      const [name = '', value = ''] = body.toString('utf8').split('\0');
      (this.#server as ServerConnection).setParameter(name, value);
      if (head?.hidden) return;
      if (this.#discarded) {
        // Reports come at ReadyForQuery, with final values: the login's default is DISCARD ALL's
        // doing (the client gets its greeting's value instead); another value, a SET's behind it
        // in the same sequence. (A SET back to exactly the login's default there reads as the former.)
        if ((this.#server as ServerConnection).loginParameters.get(name) === value) return;
        this.#discarded = this.#discarded.filter(([discarded]) => discarded !== name);
      }
      this.#settings.report(name, value);
      // Only a report of a setting carried to the next connection accounts for a SET (SET SESSION AUTHORIZATION does not).
      if (carried(name) && !this.#localSet) this.#reports++;
      this.#emit(rawOf(body));
      return;
    }
    if (type === BackendCode.NoticeResponse) {
      if (!head?.hidden) this.#emit(rawOf(body));
      return;
    }
    if (type === 0x41 /* NotificationResponse */ || !head) {
      // Not an answer of the queue's: a notification, or a FATAL before the server goes.
      this.#emit(rawOf(body));
      return;
    }
    this.#releaseDue = false;
    if (head.expect === Expect.Query || head.expect === Expect.Sync) {
      if (type === BackendCode.ReadyForQuery) {
        this.#queue.shift();
        this.#ready(body, head);
        this.#madeAnswers();
        return;
      }
      if (type === 0x47 /* CopyInResponse */) this.#copyInStarted();
      else if (type === 0x43 /* CommandComplete */) {
        this.#copyEnded();
        this.#commandComplete(body);
      }
      if (type === BackendCode.ErrorResponse) {
        this.#copyEnded();
        head.failed = true;
        this.#emit(rawOf(body)); // a hidden query's error too: the client's next answers depend on it
        return;
      }
      if (!head.hidden) this.#emit(rawOf(body));
      return;
    }
    if (type === BackendCode.ErrorResponse) {
      // The server skips to the client's Sync: so do the answers expected until then.
      this.#copyEnded();
      this.#emit(rawOf(body));
      this.#skipToSync();
      return;
    }
    let complete = false;
    switch (head.expect) {
      case Expect.Parse:
        complete = type === 0x31; // ParseComplete
        if (complete && head.kind) this.#unnamed = head.kind; // only Parses of the unnamed statement carry one
        break;
      case Expect.Bind:
        complete = type === 0x32; // BindComplete
        if (complete && head.portal !== undefined) this.#portals.set(head.portal, head.kind ?? this.#unnamed);
        break;
      case Expect.Describe:
        complete = type === 0x54 /* RowDescription */ || type === 0x6e; /* NoData */
        break;
      case Expect.Execute:
        if (type === 0x47) this.#copyInStarted();
        else if (type === 0x43) {
          this.#copyEnded();
          this.#commandComplete(body);
        }
        complete = type === 0x43 /* CommandComplete */ || type === 0x49 /* EmptyQueryResponse */ || type === 0x73; /* PortalSuspended */
        break;
      case Expect.Close:
        complete = type === 0x33; // CloseComplete
        break;
    }
    if (!head.hidden) this.#emit(rawOf(body));
    if (complete) {
      this.#queue.shift();
      this.#madeAnswers();
    }
  }

  /**
   * CopyInResponse: Postgres reads nothing but COPY messages now and ignores a Sync, so the Syncs
   * sent right behind the COPY (libpq sends Parse, Bind, Execute, Sync at once) get no answer.
   */
  #copyInStarted(): void {
    this.#copyIn = true;
    this.#clientCopying = true;
    while (this.#queue[1]?.expect === Expect.Sync && !this.#queue[1].hidden) {
      this.#queue.splice(1, 1);
      this.#readyPending--;
    }
  }

  /** The server left copy-in mode (CopyDone answered, or an error): a Sync counts again. */
  #copyEnded(): void {
    this.#copyIn = false;
    this.#clientCopying = false;
  }

  /** Answers made here, sent as they reach the head of the queue. */
  #madeAnswers(): void {
    for (let head = this.#queue[0]; head?.expect === Expect.Made; head = this.#queue[0]) {
      this.#queue.shift();
      this.#emit(head.made as Buffer);
    }
  }

  /** After an error in an extended sequence: what comes before the Sync gets no answer. */
  #skipToSync(): void {
    const skipped: Entry[] = [];
    while (this.#queue.length > 0 && (this.#queue[0] as Entry).expect !== Expect.Sync) {
      const entry = this.#queue.shift() as Entry;
      if (entry.expect === Expect.Query) this.#readyPending--; // a simple Query is skipped too
      skipped.push(entry);
    }
    // Undone last first: a Close restores the statement that an earlier Parse then forgets.
    for (let i = skipped.length - 1; i >= 0; i--) skipped[i]?.onSkip?.();
    if (this.#queue.length === 0) this.#serverSkipping = true;
  }

  #commandComplete(body: Buffer): void {
    const tag = body.toString('utf8', 0, Math.max(0, body.length - 1));
    const server = this.#server as ServerConnection;
    // An aborted transaction ended before the next ReadyForQuery (COMMIT or ROLLBACK through Execute):
    // a Parse answered here is not refused with 25P02 any more.
    if (this.#status === 'E' && (tag === 'ROLLBACK' || tag === 'COMMIT')) this.#status = 'T';
    if (tag === 'SET') {
      // A SET LOCAL's report, if any, cannot be told from a SET's: in its window reports account for none.
      const head = this.#queue[0];
      const kind = head?.expect === Expect.Query ? head.kind : head?.expect === Expect.Execute ? this.#portals.get(head.portal ?? '') : undefined;
      if (kind?.setLocal) this.#localSet = true;
      else this.#sets++;
    } else if (tag === 'RESET') {
      // RESET ALL may have undone a startup's setting, and its reports cannot be matched with a SET's.
      server.applied.clear();
      this.#leak();
    } else if (LEAKY_TAGS.has(tag)) {
      this.#leak();
    } else if (tag === 'DISCARD ALL' || tag === 'DEALLOCATE ALL') {
      // What existed when the command was sent goes, on the server and among the client's names
      // (a driver that sees the tag parses its names again); what a pipeline made behind it stays.
      // An undo of a skipped Close or eviction behind it restores none of these.
      const head = this.#queue[0];
      const at = head?.at ?? handled + 1;
      for (const [name, preparedAt] of server.prepared) if (preparedAt < at) server.prepared.delete(name);
      server.droppedBefore = Math.max(server.droppedBefore, at);
      if (!head?.hidden) {
        for (const [name, statement] of this.#statements) if (statement.at < at) this.#statements.delete(name);
        this.#droppedBefore = Math.max(this.#droppedBefore, at);
      }
      if (tag === 'DISCARD ALL') {
        server.applied.clear();
        if (!this.#queue[0]?.hidden) this.#discarded = [...(this.#discarded ?? []), ...this.#settings.resetToGreeting()];
      }
    }
  }

  #ready(body: Buffer, head: Entry): void {
    this.#status = String.fromCharCode(body[0] ?? 0x49);
    this.#readyPending--;
    if (this.#status === 'I') {
      // No portal outlives its transaction.
      this.#portals.clear();
      this.#portalsSent.clear();
    }
    if (this.#readyPending === 0) {
      // Every sequence sent so far is answered: what they changed stood (those of the open one are still unsettled).
      for (const [name, changes] of this.#unsettled) {
        if (changes.last < this.#boundaries) this.#unsettled.delete(name);
        else changes.first = changes.last;
      }
    }
    if (head.hidden) {
      head.onDone?.(!head.failed);
      return;
    }
    // A SET that the server reported nothing for set what only this connection remembers.
    if (this.#sets > this.#reports) this.#leak();
    this.#sets = 0;
    this.#localSet = false;
    this.#reports = 0;
    if (this.#discarded) {
      for (const [name, value] of this.#discarded) this.#emit(parameterStatus(name, value));
      this.#discarded = undefined;
    }
    if (this.#noticeDue) {
      this.#noticeDue = false;
      this.#noticed = true;
      this.#emit(noticeResponse(LEAK_NOTICE, LEAK_DETAIL));
    }
    this.#emit(rawOf(body));
    if (this.#queue.length === 0 && !this.#unsynced && !this.#clientSkipping && this.#status === 'I') this.#releaseDue = true;
    if (this.#draining && this.#queue.length === 0) this.#releaseDue = true;
  }

  #emit(raw: Buffer): void {
    if (this.#end === undefined) this.#toClient.push(raw);
  }

  #flush(): void {
    const server = this.#server;
    if (server && this.#toServer.length > 0) {
      const out = this.#toServer.length === 1 ? (this.#toServer[0] as Buffer) : Buffer.concat(this.#toServer);
      this.#toServer = [];
      this.stats.bytesToUpstream += out.length;
      this.#context.onBytes(out.length, 0);
      if (!server.upstream.write(out)) this.#client.pause();
    }
    if (this.#toClient.length > 0) {
      const out = this.#toClient.length === 1 ? (this.#toClient[0] as Buffer) : Buffer.concat(this.#toClient);
      this.#toClient = [];
      this.stats.bytesToClient += out.length;
      this.#context.onBytes(0, out.length);
      // The write may end the client's session (its socket failed): the connection is someone else's then.
      if (!this.#client.write(out) && server && this.#server === server) server.upstream.pause();
    }
  }

  // ---- ends

  /** The client left (or was closed): a connection it holds goes back once it has answered all it was sent. */
  #clientGone(end: RelayEnd): void {
    if (this.#end !== undefined) return;
    this.#finish(end);
    this.#abort?.abort();
    this.#toClient = [];
    const server = this.#server;
    if (!server) return;
    if (this.#queue.length === 0 && !this.#unsynced && !this.#copyIn) {
      this.#detach();
      return;
    }
    if (this.#copyIn || this.#queue.some((entry) => entry.expect === Expect.Execute || entry.expect === Expect.Query)) {
      // A statement may be running: cancelled, and the connection closed rather than reused (a
      // cancel may land late, and must not find another client's query there).
      this.#server = undefined;
      this.#unlisten(server);
      void this.#context.cancel(server).catch(() => {}).finally(() => server.close());
      return;
    }
    // Parse, Bind, Describe or Close without their Sync: a Sync finishes them, and it goes back.
    this.#draining = setTimeout(() => {
      this.#draining = undefined;
      this.#server = undefined;
      this.#unlisten(server);
      server.close();
    }, DRAIN_MS);
    this.#serverSkipping = false;
    if (this.#unsynced) {
      this.#unsynced = false;
      this.#send(SYNC);
      this.#readyPending++;
      this.#queue.push({ expect: Expect.Sync });
    }
    this.#flush();
  }

  /** The server connection went away under its client: 08006, and the client's session ends. */
  #serverLost(): void {
    const server = this.#server;
    if (!server) return;
    this.#server = undefined;
    this.#unlisten(server);
    if (this.#draining) {
      clearTimeout(this.#draining);
      this.#draining = undefined;
      return;
    }
    this.#refuse('08006', `the server connection to ${this.#context.upstreamName} running this transaction was lost`, 'upstream_closed');
  }

  /** The proxy shuts down: 57P01, as Postgres says it to its own clients then. */
  #shutDown(): void {
    this.#refuse('57P01', 'terminating connection: the proxy is shutting down', 'shutdown');
  }

  #protocolViolation(reason: string): void {
    this.#refuse('08P01', `invalid message from the client: ${reason}`, 'client_error');
  }

  /** A FATAL ErrorResponse, and the session ends (a connection it holds is closed). */
  #refuse(sqlstate: string, text: string, end: RelayEnd): void {
    if (this.#end !== undefined) return;
    const server = this.#server;
    this.#toClient = [];
    this.#client.end(errorResponse({ severity: 'FATAL', code: sqlstate, message: text }));
    this.#finish(end);
    this.#abort?.abort();
    if (server) {
      this.#server = undefined;
      this.#unlisten(server);
      server.close();
    }
  }

  #finish(end: RelayEnd): void {
    if (this.#end !== undefined) return;
    this.#countFast();
    this.#end = end;
    this.#held = undefined;
    this.#resolve(end);
  }
}

