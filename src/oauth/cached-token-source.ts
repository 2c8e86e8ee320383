/**
 * The token lifetime rules, apart from where tokens come from.
 *
 * A token is fresh for the first half of its life and is refreshed in the background at that
 * point, so an outage of up to half a lifetime (30 minutes for Databricks' one-hour tokens) goes
 * unnoticed by clients. In the second half it is still served, but a caller that finds it there
 * (the timer ran late, e.g. the machine slept) refreshes before use unless a refresh just failed.
 * A failed refresh never takes away a token that is still valid. Within the last few seconds
 * (`expirySkewMs`) a token counts as expired: the Postgres login that follows must still find it
 * valid.
 *
 * One fetch is in flight at a time, whatever the number of callers; each caller waiting on it
 * gets every notice it sends (a browser-login URL), also when it joins late.
 */
import type { Logger } from '../ops/log.js';
import { createToken, TokenError, type Token, type TokenRequestContext, type TokenSource } from '../token/token-source.js';
import type { IssuedTokens } from './workspace-client.js';

export interface FetchContext {
  /** false for background refreshes: never start a browser login. */
  readonly interactive: boolean;
  /** Sends a notice to every client waiting on this fetch, and to any that join later. */
  notice(message: string): void;
  /** Aborted when the token source closes. */
  readonly signal: AbortSignal;
}

/** Where tokens come from: one grant, a login, or a database-credential exchange. */
export interface TokenFetcher {
  /** A new token; rejects with a TokenError. `held` is the token in use now (or just refused), if any. */
  fetch(context: FetchContext, held: IssuedTokens | undefined): Promise<IssuedTokens>;
  describe(): string;
}

export interface CachedTokenSourceDeps {
  readonly logger: Logger;
  readonly onRefresh?: ((result: 'success' | 'failure') => void) | undefined;
  /** A source this one draws on (the workspace token under a database credential), closed with it. */
  readonly inner?: TokenSource | undefined;
}

const MAX_TIMER_MS = 2 ** 31 - 1;

export function lifetimeMs(tokens: IssuedTokens): number {
  return Math.max(0, tokens.expiresAt.getTime() - tokens.obtainedAt.getTime());
}

/** Refresh once this little life is left: half the lifetime. */
export function refreshMarginMs(tokens: IssuedTokens): number {
  return lifetimeMs(tokens) / 2;
}

/** A token with less than this left is not handed out: the login that follows must still find it valid. */
export function expirySkewMs(tokens: IssuedTokens): number {
  return Math.min(10_000, lifetimeMs(tokens) / 20);
}

/** After a failed refresh, wait this long before the next try (callers are served the valid token meanwhile). */
export function retryDelayMs(tokens: IssuedTokens): number {
  return Math.max(50, Math.min(30_000, lifetimeMs(tokens) / 10));
}

export type TokenState = 'fresh' | 'usable' | 'expired';

export function tokenState(tokens: IssuedTokens, now: number): TokenState {
  const left = tokens.expiresAt.getTime() - now;
  if (left <= expirySkewMs(tokens)) return 'expired';
  return left > refreshMarginMs(tokens) ? 'fresh' : 'usable';
}

export class CachedTokenSource implements TokenSource {
  readonly #fetcher: TokenFetcher;
  readonly #deps: CachedTokenSourceDeps;
  readonly #closed = new AbortController();
  #held: { tokens: IssuedTokens; token: Token } | undefined;
  /** A token dropped by invalidate(): the fetcher must not hand it back. */
  #refused: IssuedTokens | undefined;
  #flight: Flight | undefined;
  #timer: NodeJS.Timeout | undefined;
  #lastFailureAt: number | undefined;

  constructor(fetcher: TokenFetcher, deps: CachedTokenSourceDeps) {
    this.#fetcher = fetcher;
    this.#deps = deps;
  }

  getToken(context: TokenRequestContext): Promise<Token> {
    return this.acquire(context, true);
  }

  /** getToken with a choice: `interactive: false` never starts a browser login. */
  async acquire(context: TokenRequestContext, interactive: boolean): Promise<Token> {
    if (this.#closed.signal.aborted) throw new TokenError('token_missing', 'the token source is closed');
    const held = this.#held;
    const state = held ? tokenState(held.tokens, Date.now()) : 'expired';
    if (held && state === 'fresh') return held.token;
    if (held && state === 'usable' && this.#coolingDown(held.tokens)) return held.token;
    // While a valid token is held, a refresh may fail quietly; a browser login waits until it expires.
    const mayLogin = interactive && state === 'expired';
    for (let round = 0; ; round++) {
      const flight = this.#flight ?? this.#start(round === 0 ? mayLogin : interactive);
      try {
        await flight.join(context);
        const now = this.#held;
        if (now) return now.token;
      } catch (err) {
        const current = this.#held;
        if (current && tokenState(current.tokens, Date.now()) !== 'expired') return current.token;
        // A background refresh cannot log in; a caller that may gets its own try.
        if (round === 0 && interactive && !flight.interactive && !context.signal?.aborted) continue;
        throw err;
      }
    }
  }

  describe(): string {
    return this.#fetcher.describe();
  }

  currentExpiry(): Date | undefined {
    return this.#held?.tokens.expiresAt;
  }

  /** Drops the held token (e.g. the server refused it) so the next caller fetches anew. */
  invalidate(): void {
    this.#refused = this.#held?.tokens ?? this.#refused;
    this.#held = undefined;
    clearTimeout(this.#timer);
  }

  close(): Promise<void> {
    this.#closed.abort(new TokenError('token_missing', 'the token source is closed'));
    clearTimeout(this.#timer);
    this.#timer = undefined;
    return this.#deps.inner?.close() ?? Promise.resolve();
  }

  #coolingDown(tokens: IssuedTokens): boolean {
    return this.#lastFailureAt !== undefined && Date.now() - this.#lastFailureAt < retryDelayMs(tokens);
  }

  #start(interactive: boolean): Flight {
    const flight = new Flight(interactive);
    this.#flight = flight;
    flight.settle(this.#run(flight));
    return flight;
  }

  async #run(flight: Flight): Promise<void> {
    const { logger, onRefresh } = this.#deps;
    const previous = this.#held;
    try {
      const tokens = await this.#fetcher.fetch(
        { interactive: flight.interactive, notice: (m) => flight.notice(m), signal: this.#closed.signal },
        previous?.tokens ?? this.#refused,
      );
      this.#held = { tokens, token: createToken(tokens.accessToken, tokens.expiresAt) };
      this.#refused = undefined;
      this.#lastFailureAt = undefined;
      onRefresh?.('success');
      logger.info(
        { source: this.#fetcher.describe(), expiresAt: tokens.expiresAt.toISOString(), expiryAssumed: tokens.expiryAssumed || undefined },
        previous ? 'token refreshed' : 'token obtained',
      );
    } catch (err) {
      const error =
        err instanceof TokenError ? err : new TokenError('bad_response', `obtaining a token failed unexpectedly: ${err instanceof Error ? err.name : typeof err}`);
      this.#lastFailureAt = Date.now();
      onRefresh?.('failure');
      const stillValid = this.#held !== undefined && tokenState(this.#held.tokens, Date.now()) !== 'expired';
      // `errorCode`, not `code`: the logger redacts `code` (an authorization code is a secret).
      logger.warn(
        { source: this.#fetcher.describe(), errorCode: error.code, err: { message: error.message }, servingValidToken: stillValid },
        previous ? 'token refresh failed' : 'token request failed',
      );
      throw error;
    } finally {
      if (this.#flight === flight) this.#flight = undefined;
      this.#schedule();
    }
  }

  #schedule(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    const held = this.#held;
    if (!held || this.#closed.signal.aborted) return;
    const expiresAt = held.tokens.expiresAt.getTime();
    let at = expiresAt - refreshMarginMs(held.tokens);
    if (this.#lastFailureAt !== undefined) at = Math.max(at, this.#lastFailureAt + retryDelayMs(held.tokens));
    // Past this point the token is gone anyway: the next caller fetches one.
    if (at >= expiresAt - expirySkewMs(held.tokens)) return;
    const delay = Math.min(MAX_TIMER_MS, Math.max(0, at - Date.now()));
    this.#timer = setTimeout(() => this.#background(), delay);
    this.#timer.unref();
  }

  #background(): void {
    this.#timer = undefined;
    if (this.#flight || this.#closed.signal.aborted) return;
    this.#start(false);
  }
}

/** One fetch in flight, shared by all callers that wait for it. */
class Flight {
  readonly interactive: boolean;
  readonly #notices: string[] = [];
  readonly #waiters = new Set<TokenRequestContext>();
  #done: Promise<void> = Promise.resolve();

  constructor(interactive: boolean) {
    this.interactive = interactive;
  }

  settle(done: Promise<void>): void {
    this.#done = done;
    done.catch(() => undefined); // a background flight may have no waiter to see its failure
  }

  notice(message: string): void {
    this.#notices.push(message);
    for (const waiter of this.#waiters) sendNotice(waiter, message);
  }

  async join(context: TokenRequestContext): Promise<void> {
    this.#waiters.add(context);
    for (const message of this.#notices) sendNotice(context, message);
    try {
      await untilAborted(this.#done, context.signal);
    } finally {
      this.#waiters.delete(context);
    }
  }
}

function sendNotice(context: TokenRequestContext, message: string): void {
  try {
    context.notice(message);
  } catch {
    // The client went away; the others still get theirs.
  }
}

function untilAborted(work: Promise<void>, signal: AbortSignal | undefined): Promise<void> {
  if (!signal) return work;
  if (signal.aborted) return Promise.reject(new TokenError('login_required', 'the client went away before a token was ready'));
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(new TokenError('login_required', 'the client went away before a token was ready'));
    signal.addEventListener('abort', onAbort, { once: true });
    work.then(
      () => {
        signal.removeEventListener('abort', onAbort);
        resolve();
      },
      (err: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(err);
      },
    );
  });
}
