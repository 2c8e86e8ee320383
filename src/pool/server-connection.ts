/** A logged-in upstream connection of a pool, and what the pool knows of it. */
import { parameterStatus, READY_FOR_QUERY_IDLE } from '../wire/backend-messages.js';
import type { Duplex } from 'node:stream';
import type { UpstreamSession } from '../proxy/upstream.js';

export type ServerState = 'idle' | 'active' | 'checking' | 'resetting';

/** Why a server connection closed (a metric label). */
export type ServerCloseReason =
  | 'idle'
  | 'lifetime'
  | 'token_expired'
  | 'server_closed'
  | 'reset_failed'
  | 'check_failed'
  | 'evicted'
  | 'not_reusable'
  | 'shutdown';

export const SERVER_CLOSE_REASONS: readonly ServerCloseReason[] = [
  'idle',
  'lifetime',
  'token_expired',
  'server_closed',
  'reset_failed',
  'check_failed',
  'evicted',
  'not_reusable',
  'shutdown',
];

/** The startup parameters a login was made with, as one comparable key. */
export function loginKeyOf(parameters: ReadonlyMap<string, string>): string {
  const key = JSON.stringify([...parameters].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
  // One string per key: the pool compares keys at every hand-off, and the same string compares at once.
  let same = loginKeys.get(key);
  if (same === undefined) {
    if (loginKeys.size >= MAX_LOGIN_KEYS) loginKeys.clear();
    loginKeys.set(key, key);
    same = key;
  }
  return same;
}

const loginKeys = new Map<string, string>();
/** Distinct keys kept (clients may name any database): past this the map starts again. */
const MAX_LOGIN_KEYS = 1000;

/** A lifetime shortened by up to a tenth at random, so that a pool's connections do not all end at once. */
function jittered(ms: number): number {
  return ms - Math.floor(Math.random() * ms * 0.1);
}

export class ServerConnection {
  state: ServerState = 'active';
  /** When it logged in. */
  readonly connectedAt = Date.now();
  lastUsedAt = Date.now();
  /** The server's reported parameters now, in the order it first sent them (setParameter changes them). */
  readonly parameters: ReadonlyMap<string, string>;
  /** What the login reported: the values a client that asked for nothing else expects. */
  readonly loginParameters: ReadonlyMap<string, string>;
  /**
   * Transaction mode: the prepared statements this connection holds for clients, by their
   * server-side name, least recently used first, with when each was prepared (transaction-session.ts' `handled`).
   */
  readonly prepared = new Map<string, number>();
  /** Statements prepared before this (see `prepared`) are gone: a DISCARD ALL or DEALLOCATE ALL dropped them. */
  droppedBefore = 0;
  /** Transaction mode: settings the server does not report that a client's startup had set here. */
  readonly applied = new Map<string, string>();
  /** Bumped when a reported parameter changes (see landed). */
  parametersVersion = 0;
  /**
   * Transaction mode: the (shared, unchanging) reported settings of the client that last landed
   * here with nothing to set, at `parametersVersion`: the next client with the same lands at once.
   */
  landed: { readonly reported: ReadonlyMap<string, string>; readonly version: number } | undefined;
  readonly #tokenExpiresAt: number;
  #idleListener: ((chunk: Buffer) => void) | undefined;
  /** The greeting for these parameters, made at the first client that needs it after a change. */
  #greeting: Buffer[] | undefined;
  /** Session mode: CancelRequests on their way to this connection's backend, each settling to whether the server confirmed it (see cancelling()). */
  readonly #cancels = new Set<Promise<boolean>>();
  /** One was not confirmed (sendCancel false, or it failed): it may still land. */
  #cancelUnconfirmed = false;

  private constructor(
    /** The plaintext: the native connection's Duplex (session mode needs it), or Node's TLS socket. */
    readonly upstream: Duplex,
    readonly processId: number,
    readonly secretKey: Buffer,
    parameters: Map<string, string>,
    readonly loginKey: string,
    /** The TLS version and cipher suite of the login. */
    readonly tls: { readonly version: string; readonly cipher: string },
    /** Not handed to a client from then on: the token's expiry, or ServerLifetime if sooner. */
    readonly expiresAt: number,
    tokenExpiresAt: number,
  ) {
    this.parameters = parameters;
    this.loginParameters = new Map(parameters);
    this.#tokenExpiresAt = tokenExpiresAt;
  }

  /** `anyTransport`: Node's TLS will do (transaction mode relays in JavaScript); else it must be native. */
  static fromLogin(session: UpstreamSession, loginKey: string, tokenExpiresAt: Date | undefined, lifetimeMs: number, anyTransport = false): ServerConnection {
    const upstream = session.native ?? (anyTransport ? session.socket : undefined);
    if (!upstream) throw new Error('a pooled connection must be a native one');
    const parameters = new Map<string, string>();
    for (const message of session.greeting) {
      if (message[0] !== 0x53) continue; // 'S': ParameterStatus
      const [name = '', value = ''] = message.toString('utf8', 5).split('\0');
      parameters.set(name, value);
    }
    const token = tokenExpiresAt?.getTime() ?? Number.POSITIVE_INFINITY;
    const lifetime = lifetimeMs > 0 ? Date.now() + jittered(lifetimeMs) : Number.POSITIVE_INFINITY;
    const tls = { version: session.tls.version, cipher: session.tls.cipher };
    return new ServerConnection(upstream, session.processId, session.secretKey, parameters, loginKey, tls, Math.min(token, lifetime), token);
  }

  get closed(): boolean {
    return this.upstream.destroyed;
  }

  /**
   * Session mode: `cancel` (a sendCancel to this backend) is on its way. Until it settles the
   * connection serves no other client (Pool.release waits for it): a cancel that landed later
   * would stop the next client's query.
   */
  cancelling(cancel: Promise<boolean>): Promise<boolean> {
    const settled: Promise<boolean> = cancel
      .catch(() => false)
      .then((confirmed) => {
        if (!confirmed) this.#cancelUnconfirmed = true;
        this.#cancels.delete(settled);
        return confirmed;
      });
    this.#cancels.add(settled);
    return cancel;
  }

  /** A cancel sent to this backend may still land: one is on its way, or one went unconfirmed. */
  get cancelPending(): boolean {
    return this.#cancels.size > 0 || this.#cancelUnconfirmed;
  }

  /** Once every cancel on its way settled: whether the server confirmed each one sent (else one may still land). */
  async cancelsSettled(): Promise<boolean> {
    await Promise.all(this.#cancels);
    return !this.#cancelUnconfirmed;
  }

  tokenExpired(now: number): boolean {
    return now >= this.#tokenExpiresAt;
  }

  /** A ParameterStatus the server sent (a reset brings back what the login had). */
  setParameter(name: string, value: string): void {
    if (this.parameters.get(name) === value) return;
    (this.parameters as Map<string, string>).set(name, value);
    this.parametersVersion++;
    this.#greeting = undefined;
  }

  /**
   * What a fresh login with these parameters would have greeted with (BackendKeyData is the
   * caller's): its ParameterStatus messages in one buffer, then ReadyForQuery. Not to be changed.
   */
  greeting(): Buffer[] {
    this.#greeting ??= [Buffer.concat([...this.parameters].map(([name, value]) => parameterStatus(name, value))), READY_FOR_QUERY_IDLE];
    return this.#greeting;
  }

  /**
   * After `resetQuery` ran: what it removed from the session is forgotten (DISCARD ALL and
   * DEALLOCATE ALL drop prepared statements; DISCARD ALL and RESET ALL restore the settings).
   */
  forgetSessionState(resetQuery: string): void {
    if (/\b(discard\s+all|deallocate\s+(prepare\s+)?all)\b/i.test(resetQuery)) this.prepared.clear();
    if (/\b(discard|reset)\s+all\b/i.test(resetQuery)) this.applied.clear();
  }

  /** `onClose` when the connection ends, whatever ended it. */
  watchClose(onClose: () => void): void {
    this.upstream.once('close', onClose);
  }

  /** While idle: anything from the server (a FATAL before it goes, its close) is trouble. */
  watchIdle(onTrouble: () => void): void {
    this.#idleListener = () => onTrouble();
    this.upstream.on('data', this.#idleListener);
    this.upstream.on('end', this.#idleListener);
    this.upstream.resume();
  }

  stopWatchingIdle(): void {
    if (!this.#idleListener) return;
    this.upstream.off('data', this.#idleListener);
    this.upstream.off('end', this.#idleListener);
    this.#idleListener = undefined;
    this.upstream.pause();
  }

  close(): void {
    this.stopWatchingIdle();
    this.upstream.destroy();
  }
}
