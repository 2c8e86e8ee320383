/**
 * A transaction pool's hand-off in C (native/txclient.h, lp_desk). Server connections the pool
 * lends to fast-path clients join the pool's desk, and stay on it between transactions: C hands
 * a connection released cleanly to the next client waiting with the same settings, or keeps it
 * idle for the next client's transaction, with no call into JavaScript. The pool (pool.ts) keeps
 * everything else: logins, checks, resets, waits for its own connections, the janitor; it tells
 * the desk when it has room (then clients ask it, not the desk) and when its own clients wait
 * (then a released connection comes back to it). What the desk served is counted in arrays C adds
 * to and this module reads (`drain`): no call per transaction either way.
 */
import { native, NativeUpstream, type Detached, type Handle, type SessionRelay } from '../proxy/native-relay.js';
import type { RelayEnd, RelayStats } from '../proxy/relay.js';
import type { ServerConnection } from './server-connection.js';

/** Waits recorded between two reads: C calls `onFull` when they fill up. */
const WAITS = 4096;

export type DeskOut = 'ended' | 'spoke' | 'stale' | 'reclaimed' | 'released';
/** native/txclient.h, enum lp_desk_out, from 1. */
const OUT: readonly DeskOut[] = ['ended', 'spoke', 'stale', 'reclaimed', 'released'];
/** How a session on the desk ended (native/txclient.h, enum lp_session, from 1): see DeskSession.how. */
const SESSION_ENDS = ['reset', 'back', 'ended'] as const;
export type SessionEnd = (typeof SESSION_ENDS)[number];

/** What the desk tells its pool. */
export interface DeskOwner {
  /** An idle connection left the desk by itself (see DeskOut): the pool's again, reclaimed. */
  out(server: ServerConnection, why: DeskOut): void;
  /** Transactions the desk served since the last call, and the seconds each of its clients waited. */
  served(transactions: number, waits: Float64Array, count: number): void;
}

/** What a desk that serves sessions (session mode) tells its pool besides. */
export interface SessionOwner {
  /** A session ended with its connection reset in C (`how` 'reset', the connection stays), back to the pool, or ended with it. */
  sessionEnded(server: ServerConnection, how: SessionEnd): void;
  /** A connection's reset after its session did not answer plainly: the pool's again, with the answer (null: none came). */
  resetAnswered(server: ServerConnection, answer: Buffer | null): void;
  /** The ErrorResponse for a session's client whose upstream went away (`reason` null: it closed). */
  farewell(reason: string | null): Buffer;
}

/**
 * Settings ids: one per set of reported settings (0 matches nothing), by content, so that clients
 * greeted at the same time (each with its own map) share one; cached per map, which never
 * changes once shared (client-settings.ts). Compared entry by entry with one map of each set seen
 * (no key is built: 10,000 idle clients would each leave a string behind).
 */
const idsByMap = new WeakMap<ReadonlyMap<string, string>, number>();
/** One map of each set seen, most recent last; past SETS_KEPT a new set gets a new id (a missed match, never a false one). */
const sets: Array<{ readonly map: ReadonlyMap<string, string>; readonly id: number }> = [];
const SETS_KEPT = 64;
let nextSettingsId = 1;

function sameSettings(a: ReadonlyMap<string, string>, b: ReadonlyMap<string, string>): boolean {
  if (a.size !== b.size) return false;
  for (const [name, value] of a) if (b.get(name) !== value) return false;
  return true;
}

export function settingsId(reported: ReadonlyMap<string, string> | undefined): number {
  if (!reported) return 0;
  let id = idsByMap.get(reported);
  if (id !== undefined) return id;
  id = sets.find((set) => sameSettings(set.map, reported))?.id;
  if (id === undefined) {
    id = nextSettingsId++;
    if (sets.length >= SETS_KEPT) sets.shift();
    sets.push({ map: reported, id });
  }
  idsByMap.set(reported, id);
  return id;
}

/** The settings id of what `server` is in: those of the last client that landed with nothing to set, while nothing changed since. */
export function serverSettingsId(server: ServerConnection): number {
  const landed = server.landed;
  if (!landed || landed.version !== server.parametersVersion || server.applied.size > 0) return 0;
  return settingsId(landed.reported);
}

/** A connection joining the desk: [its id on the desk, its settings id, ms until it may serve no new transaction]. */
export type Join = readonly [id: number, sid: number, expiresInMs: number];

export class Desk {
  readonly handle: Handle;
  readonly #addon: NonNullable<typeof native.addon>;
  readonly #owner: DeskOwner;
  /** The connections on the desk (lent or idle), by id. */
  readonly #servers = new Map<number, ServerConnection>();
  #nextId = 1;
  /** [transactions released on the desk, waits in #waits]: C adds to both. */
  readonly #counts = new Float64Array(2);
  readonly #waits = new Float64Array(WAITS);
  #transactionsRead = 0;
  #room: boolean | undefined;
  #jsWaiting: boolean | undefined;
  #closed = false;
  /** Session mode: the sessions C relays on the desk's connections, by connection id. */
  readonly #sessions = new Map<number, DeskSession>();
  #sessionOwner: SessionOwner | undefined;

  private constructor(addon: NonNullable<typeof native.addon>, owner: DeskOwner, handle: (desk: Desk) => Handle | string) {
    this.#addon = addon;
    this.#owner = owner;
    const made = handle(this);
    if (typeof made === 'string') throw new Error(made);
    this.handle = made;
  }

  /** A desk, or undefined without the native addon. */
  static open(owner: DeskOwner): Desk | undefined {
    const addon = native.addon;
    if (!addon) return undefined;
    try {
      return new Desk(addon, owner, (desk) =>
        addon.desk(
          desk.#counts,
          desk.#waits,
          (id, why) => desk.#out(id, why),
          () => desk.drain(),
        ),
      );
    } catch {
      return undefined;
    }
  }

  /** The pool can give a connection now (`room`: an idle one, or a login); its own clients wait (`jsWaiting`). */
  set(room: boolean, jsWaiting: boolean): void {
    if (room === this.#room && jsWaiting === this.#jsWaiting) return;
    this.#room = room;
    this.#jsWaiting = jsWaiting;
    if (!this.#closed) this.#addon.deskSet(this.handle, room, jsWaiting);
  }

  config(waitTimeoutMs: number, checkDelayMs: number): void {
    if (!this.#closed) this.#addon.deskConfig(this.handle, waitTimeoutMs, checkDelayMs);
  }

  /** `server` joins the desk when the client it is lent to takes it (NativeClient.attach): its ticket. */
  join(server: ServerConnection, sid: number): Join {
    const id = this.#take(server);
    return [id, sid, server.expiresAt - Date.now()];
  }

  /** The connection `id` left the desk (back from a client, or not joined after all): the pool's again. */
  left(id: number): ServerConnection | undefined {
    const server = this.#servers.get(id);
    this.#servers.delete(id);
    return server;
  }

  /** An idle connection C let go of: the pool's again, its reader back in JavaScript. */
  #reclaimed(id: number): ServerConnection | undefined {
    const server = this.left(id);
    if (server?.upstream instanceof NativeUpstream) server.upstream.reclaim();
    return server;
  }

  /** The connection on the desk with `id` (lent to a client now, or idle). */
  server(id: number): ServerConnection | undefined {
    return this.#servers.get(id);
  }

  /** Every connection on the desk, by id (the janitor's sweep). */
  get servers(): ReadonlyMap<number, ServerConnection> {
    return this.#servers;
  }

  /** A clean connection of the pool for the first client waiting on the desk with its settings: true when one took it. */
  offer(server: ServerConnection, sid: number): boolean {
    return this.#join(server, sid, this.#addon.deskOffer);
  }

  /** The connection joins the desk by `how` (deskOffer, deskPark): false when it did not (then it is the pool's as before). */
  #join(server: ServerConnection, sid: number, how: (desk: Handle, conn: Handle, id: number, sid: number, expiresInMs: number) => boolean): boolean {
    if (this.#closed || sid === 0 || !(server.upstream instanceof NativeUpstream)) return false;
    const lent = server.upstream.lend();
    if (!lent) return false;
    if (lent.unread.length > 0) {
      server.upstream.giveBack(lent.unread);
      return false;
    }
    const id = this.#take(server);
    if (how(this.handle, lent.conn, id, sid, server.expiresAt - Date.now())) return true;
    this.#servers.delete(id);
    server.upstream.giveBack(lent.unread);
    return false;
  }

  /** The first client waiting on the desk asks the pool instead (it has room now). */
  wake(): boolean {
    return !this.#closed && this.#addon.deskWake(this.handle);
  }

  /** An idle connection of the desk back to the pool (reclaimed), or undefined when `id` is not idle there. */
  reclaim(id: number): ServerConnection | undefined {
    if (this.#closed || !this.#addon.deskReclaim(this.handle, id)) return undefined;
    return this.#reclaimed(id);
  }

  /** The desk's most recently used idle connection back to the pool (reclaimed), with how long it was idle there. */
  reclaimAny(): { server: ServerConnection; idleMs: number } | undefined {
    if (this.#closed) return undefined;
    const [id, idleMs] = this.#addon.deskReclaimAny(this.handle);
    const server = id > 0 ? this.#reclaimed(id) : undefined;
    return server ? { server, idleMs } : undefined;
  }

  /** How long `id` has been idle on the desk; -1 when lent. */
  idleMs(id: number): number {
    return this.#closed ? -1 : this.#addon.deskIdleMs(this.handle, id);
  }

  get stats(): { idle: number; count: number; waiting: number; maxWaitMs: number; resetting: number } {
    if (this.#closed) return { idle: 0, count: 0, waiting: 0, maxWaitMs: 0, resetting: 0 };
    const [idle = 0, count = 0, waiting = 0, maxWaitMs = 0, resetting = 0] = this.#addon.deskStats(this.handle);
    return { idle, count, waiting, maxWaitMs, resetting };
  }

  /** Stops (PAUSE) or goes on: stopped, its waiting clients ask the pool, its idle connections go out ('reclaimed'). */
  stop(stopped: boolean): void {
    if (!this.#closed) this.#addon.deskStop(this.handle, stopped);
  }

  /** For good (the pool closes): as stop(), and C frees the desk once no client or connection refers to it. */
  close(): void {
    if (this.#closed) return;
    this.#addon.deskStop(this.handle, true);
    this.drain();
    this.#closed = true;
    this.#addon.deskClose(this.handle);
  }

  /**
   * Serves sessions from now on (session mode): parked connections (park()) go to clients whole
   * (take()), and C resets each with `resetQuery` after its client. `counters`: the relays' bytes.
   */
  sessions(owner: SessionOwner, counters: Float64Array, resetQuery: Buffer): boolean {
    if (this.#closed) return false;
    const refused = this.#addon.deskSessions(
      this.handle,
      counters,
      resetQuery,
      (id, how, end, toUpstream, toClient, reusable, status, abandoned) => this.#sessionEnded(id, SESSION_ENDS[how - 1] ?? 'ended', end, toUpstream, toClient, { reusable, status }, abandoned),
      (_id, reason) => owner.farewell(reason),
      (id, answer) => {
        const server = this.#reclaimed(id);
        if (server) owner.resetAnswered(server, answer);
      },
    );
    if (refused !== undefined) return false;
    this.#sessionOwner = owner;
    return true;
  }

  resetQuery(message: Buffer): void {
    if (!this.#closed && this.#sessionOwner) this.#addon.deskResetQuery(this.handle, message);
  }

  /** Session mode: a clean connection of the pool waits idle on the desk, for sessions of settings `sid`; false when it could not. */
  park(server: ServerConnection, sid: number): boolean {
    return this.#sessionOwner !== undefined && this.#join(server, sid, this.#addon.deskPark);
  }

  /**
   * Session mode: the most recently idle connection of settings `sid` that needs no check, for a
   * client's session, or undefined. start() relays the session on it, or untake() puts it back.
   */
  take(sid: number): DeskSession | undefined {
    if (this.#closed || !this.#sessionOwner) return undefined;
    const id = this.#addon.deskTake(this.handle, sid);
    const server = id > 0 ? this.#servers.get(id) : undefined;
    if (!server) return undefined;
    const conn = server.upstream instanceof NativeUpstream ? server.upstream.handle : undefined;
    if (!conn) {
      this.#addon.deskUntake(this.handle, id);
      return undefined;
    }
    const session = new DeskSession(this.#addon, this.handle, conn, id, server);
    this.#sessions.set(id, session);
    return session;
  }

  untake(session: DeskSession): void {
    this.#sessions.delete(session.id);
    if (!this.#closed) this.#addon.deskUntake(this.handle, session.id);
  }

  /** Resets that have run `timeoutMs` end (the connection closes: resetAnswered with no answer). */
  sweep(timeoutMs: number): void {
    if (!this.#closed && this.#sessionOwner) this.#addon.deskSweep(this.handle, timeoutMs);
  }

  #sessionEnded(id: number, how: SessionEnd, end: RelayEnd, toUpstream: number, toClient: number, detached: Detached, abandoned: boolean): void {
    const session = this.#sessions.get(id);
    this.#sessions.delete(id);
    // Back to the pool, or ended: off the desk (its reader back in JavaScript when it lives on).
    const server = how === 'reset' ? this.#servers.get(id) : how === 'back' ? this.#reclaimed(id) : this.left(id);
    if (server) this.#sessionOwner?.sessionEnded(server, how);
    session?.ended(how, end, toUpstream, toClient, detached, abandoned);
  }

  /** What C counted since the last call, to the pool. */
  drain(): void {
    const transactions = (this.#counts[0] as number) - this.#transactionsRead;
    const waits = this.#counts[1] as number;
    if (transactions === 0 && waits === 0) return;
    this.#transactionsRead += transactions;
    this.#counts[1] = 0;
    this.#owner.served(transactions, this.#waits, waits);
  }

  #take(server: ServerConnection): number {
    // Ids wrap long before int32 does; one still in use is skipped.
    while (this.#servers.has(this.#nextId) || this.#nextId <= 0) this.#nextId = this.#nextId >= 0x3fffffff ? 1 : this.#nextId + 1;
    const id = this.#nextId++;
    this.#servers.set(id, server);
    return id;
  }

  #out(id: number, why: number): void {
    const server = this.#reclaimed(id);
    if (server) this.#owner.out(server, OUT[why - 1] ?? 'ended');
  }
}

/**
 * A session C relays on a connection of the desk (session mode): the server's session relay
 * (SessionRelay), ended by the desk's session callback.
 */
export class DeskSession implements SessionRelay {
  readonly stats: RelayStats = { bytesToUpstream: 0, bytesToClient: 0 };
  readonly done: Promise<RelayEnd>;
  /** How it ended: its connection reset in C and kept on the desk, back to the pool (`detached` says how it left), or ended. */
  how: SessionEnd | undefined;
  detached: Detached | undefined;
  /** Set by the server: the client left while a query ran (cancel it upstream). */
  onAbandoned: () => void = () => {};
  readonly id: number;
  readonly server: ServerConnection;
  readonly #addon: NonNullable<typeof native.addon>;
  readonly #desk: Handle;
  /** The connection's handle: the session's state, detach and close go to it (they work after the desk's handle closed). */
  readonly #conn: Handle;
  #finished = false;
  #idleTimer: NodeJS.Timeout | undefined;
  #resolve!: (end: RelayEnd) => void;

  constructor(addon: NonNullable<typeof native.addon>, desk: Handle, conn: Handle, id: number, server: ServerConnection) {
    this.#addon = addon;
    this.#desk = desk;
    this.#conn = conn;
    this.id = id;
    this.server = server;
    this.done = new Promise((resolve) => (this.#resolve = resolve));
  }

  /** A cancel is on its way to this session's query: at its end the connection goes back to the pool (which waits for the cancel), not to C's reset. */
  hold(): void {
    if (!this.#finished) this.#addon.deskHold(this.#desk, this.id);
  }

  /**
   * Relays the client on `fd`: `hello` for it first, `first` its bytes read before. C takes a copy
   * of `fd`, or with `own` the descriptor itself once the relay starts. A string says why not
   * (then `fd` is still the caller's).
   */
  start(fd: number, hello: Buffer, first: Buffer, own = false): string | undefined {
    return this.#addon.deskRelay(this.#desk, this.id, fd, hello, first, own);
  }

  get queryRunning(): boolean {
    return !this.#finished && this.#addon.state(this.#conn)[0] === 1;
  }

  /** Idle timeout: the client goes and the connection stays (C resets it); any other end closes both. */
  close(end: RelayEnd = 'shutdown'): void {
    if (this.#finished) return;
    if (end === 'idle_timeout') this.#addon.detach(this.#conn, end);
    else this.#addon.close(this.#conn, end);
  }

  /** Closes the session after `ms` with no byte either way and no query running. */
  idleTimeout(ms: number): void {
    const check = (): void => {
      if (this.#finished) return;
      const [running, idleFor] = this.#addon.state(this.#conn);
      if (running === 0 && idleFor >= ms) this.close('idle_timeout');
      else this.#idleTimer = setTimeout(check, running === 1 ? ms : Math.max(1, ms - idleFor));
    };
    this.#idleTimer = setTimeout(check, ms);
  }

  /** From the desk: C ended the session. */
  ended(how: SessionEnd, end: RelayEnd, toUpstream: number, toClient: number, detached: Detached, abandoned: boolean): void {
    if (this.#finished) return;
    this.#finished = true;
    this.how = how;
    this.detached = detached;
    this.stats.bytesToUpstream = toUpstream;
    this.stats.bytesToClient = toClient;
    clearTimeout(this.#idleTimer);
    if (abandoned) this.onAbandoned();
    this.#resolve(end);
  }
}
