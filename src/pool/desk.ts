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
import { native, NativeUpstream, type Handle } from '../proxy/native-relay.js';
import type { ServerConnection } from './server-connection.js';

/** Waits recorded between two reads: C calls `onFull` when they fill up. */
const WAITS = 4096;

export type DeskOut = 'ended' | 'spoke' | 'stale' | 'reclaimed';
/** native/txclient.h, enum lp_desk_out, from 1. */
const OUT: readonly DeskOut[] = ['ended', 'spoke', 'stale', 'reclaimed'];

/** What the desk tells its pool. */
export interface DeskOwner {
  /** An idle connection left the desk by itself (see DeskOut): the pool's again, reclaimed. */
  out(server: ServerConnection, why: DeskOut): void;
  /** Transactions the desk served since the last call, and the seconds each of its clients waited. */
  served(transactions: number, waits: Float64Array, count: number): void;
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
    if (this.#closed || sid === 0 || !(server.upstream instanceof NativeUpstream)) return false;
    const lent = server.upstream.lend();
    if (!lent) return false;
    if (lent.unread.length > 0) {
      server.upstream.giveBack(lent.unread);
      return false;
    }
    const id = this.#take(server);
    if (this.#addon.deskOffer(this.handle, lent.conn, id, sid, server.expiresAt - Date.now())) return true;
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

  get stats(): { idle: number; count: number; waiting: number; maxWaitMs: number } {
    if (this.#closed) return { idle: 0, count: 0, waiting: 0, maxWaitMs: 0 };
    const [idle = 0, count = 0, waiting = 0, maxWaitMs = 0] = this.#addon.deskStats(this.handle);
    return { idle, count, waiting, maxWaitMs };
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
