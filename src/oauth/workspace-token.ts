/**
 * Where a workspace token comes from, in the seed connector's order: a fresh token in
 * OAuthSettingsLocation (another process may have just stored one); client credentials for
 * OAuthClient; for a person, the OAuthVerifier code of a login begun by `auth url`, then the stored
 * (or given) refresh token, then, with InitiateOAuth=GETANDREFRESH and a client waiting, a browser
 * login. Everything but the browser login runs under the settings lock, so a refresh token is
 * spent by one process only.
 */
import type { Logger } from '../ops/log.js';
import { TokenError } from '../token/token-source.js';
import { browserLogin } from './browser-login.js';
import { tokenState, type FetchContext, type TokenFetcher } from './cached-token-source.js';
import { fingerprint, type SettingsEntry, type SettingsStore, type SettingsUpdate } from './settings-store.js';
import { issuedTokens, type IssuedTokens, type WorkspaceClient } from './workspace-client.js';

export const LOGIN_NOTICE_PREFIX = 'Open this URL to log in to Databricks: ';

/** Values given in the connection string; they hold secrets and are kept in private fields. */
export interface GivenCredentials {
  readonly accessToken: string | undefined;
  readonly refreshToken: string | undefined;
  /** OAuthVerifier: the `code` from a callback URL. */
  readonly verifier: string | undefined;
}

export interface WorkspaceTokenFetcherOptions {
  readonly client: WorkspaceClient;
  readonly store: SettingsStore;
  readonly key: string;
  /** `client_credentials` for OAuthClient, `user` for OAuthPKCE. */
  readonly grant: 'client_credentials' | 'user';
  readonly initiate: 'GETANDREFRESH' | 'REFRESH';
  /** false for commands such as `auth token`, which must not wait for a person. */
  readonly allowBrowserLogin: boolean;
  readonly callbackUrl: string;
  readonly loginTimeoutMs: number;
  readonly logger: Logger;
}

/** A token, or why none: a failure that a browser login may cure. */
type Outcome = { readonly tokens: IssuedTokens } | { readonly failure: TokenError };

const SEEN_LIMIT = 20;

export class WorkspaceTokenFetcher implements TokenFetcher {
  readonly #options: WorkspaceTokenFetcherOptions;
  readonly #given: GivenCredentials;
  #warnedStore = false;

  constructor(options: WorkspaceTokenFetcherOptions, given: GivenCredentials) {
    this.#options = options;
    this.#given = given;
  }

  describe(): string {
    const { client, grant, initiate, store } = this.#options;
    const how = grant === 'client_credentials' ? 'OAuthClient (client credentials)' : `OAuthPKCE (InitiateOAuth=${initiate})`;
    return `${how}, client ${client.clientId} at ${client.workspace.origin}, settings ${store.location}`;
  }

  async fetch(context: FetchContext, held: IssuedTokens | undefined): Promise<IssuedTokens> {
    const outcome = await this.#underLock(held);
    if ('tokens' in outcome) return outcome.tokens;
    const { client, initiate, allowBrowserLogin, callbackUrl, loginTimeoutMs, logger } = this.#options;
    if (!context.interactive || !allowBrowserLogin || initiate !== 'GETANDREFRESH') throw outcome.failure;
    const tokens = await browserLogin(client, {
      callbackUrl,
      timeoutMs: loginTimeoutMs,
      onUrl: (url) => context.notice(`${LOGIN_NOTICE_PREFIX}${url}`),
      logger,
      signal: context.signal,
    });
    await this.#save(tokens);
    return tokens;
  }

  async #underLock(held: IssuedTokens | undefined): Promise<Outcome> {
    const { store, key, grant, client, logger } = this.#options;
    try {
      return await store.update(key, (entry) => this.#decide(entry, held));
    } catch (err) {
      if (!(err instanceof TokenError) || err.code !== 'settings_error' || grant !== 'client_credentials') throw err;
      // Client credentials need nothing stored: go on without the file, and say why once.
      if (!this.#warnedStore) logger.warn({ err: { message: err.message } }, 'OAuth settings unusable; tokens are kept in memory only');
      this.#warnedStore = true;
      return { tokens: await client.clientCredentials() };
    }
  }

  async #decide(entry: SettingsEntry | undefined, held: IssuedTokens | undefined): Promise<SettingsUpdate<Outcome>> {
    const { client, grant, initiate, store } = this.#options;
    const seeded = this.#seed(entry ?? {});
    let next = seeded.entry;
    let changed = seeded.changed;
    const unchanged = () => (changed ? next : undefined);

    const stored = storedTokens(next);
    if (stored && stored.accessToken !== held?.accessToken) {
      const state = tokenState(stored, Date.now());
      // Another process refreshed (fresh), or this process starts with a token still valid.
      if (state === 'fresh' || (state === 'usable' && held === undefined)) {
        return { result: { tokens: stored }, next: unchanged() };
      }
    }

    if (grant === 'client_credentials') {
      const tokens = await client.clientCredentials();
      return { result: { tokens }, next: withTokens(next, tokens) };
    }

    const verifier = this.#given.verifier;
    if (verifier !== undefined && !(next.seen ?? []).includes(fingerprint(verifier))) {
      const pending = next.pending;
      if (!pending) {
        throw new TokenError(
          'login_required',
          `OAuthVerifier is set, but OAuthSettingsLocation ${store.location} holds no login begun by \`lakebase-proxy auth url\`: run it with the same OAuthSettingsLocation, sign in, and pass the new code`,
        );
      }
      const spent = { ...next, pending: undefined, seen: remember(next.seen, fingerprint(verifier)) };
      try {
        const tokens = await client.exchangeCode(verifier, pending.codeVerifier, pending.redirectUri);
        return { result: { tokens }, next: withTokens(spent, tokens) };
      } catch (err) {
        if (!(err instanceof TokenError) || err.code !== 'invalid_grant') throw err;
        return { result: { failure: err }, next: spent };
      }
    }

    let refusal: TokenError | undefined;
    if (next.refreshToken !== undefined) {
      try {
        const tokens = await client.refresh(next.refreshToken);
        return { result: { tokens }, next: withTokens(next, tokens) };
      } catch (err) {
        if (!(err instanceof TokenError) || err.code !== 'invalid_grant') throw err;
        // Dead for good: forget it, so the next try does not spend a request on it.
        refusal = err;
        next = { ...next, refreshToken: undefined };
        changed = true;
      }
    }
    const failure =
      refusal ??
      (initiate === 'REFRESH'
        ? new TokenError(
            'login_required',
            `InitiateOAuth=REFRESH found no refresh token in OAuthSettingsLocation ${store.location} nor in OAuthRefreshToken: sign in once with \`lakebase-proxy auth login\` (or InitiateOAuth=GETANDREFRESH), or copy the settings file of a machine that has`,
          )
        : new TokenError('login_required', 'no Databricks login is stored yet: a browser login is needed (`lakebase-proxy auth login`)'));
    return { result: { failure }, next: unchanged() };
  }

  /** Takes OAuthAccessToken/OAuthRefreshToken into the entry unless they were taken in before. */
  #seed(entry: SettingsEntry): { entry: SettingsEntry; changed: boolean } {
    let next = entry;
    let changed = false;
    const { accessToken, refreshToken } = this.#given;
    if (refreshToken !== undefined && !(next.seen ?? []).includes(fingerprint(refreshToken))) {
      next = { ...next, refreshToken, seen: remember(next.seen, fingerprint(refreshToken)) };
      changed = true;
    }
    if (accessToken !== undefined && !(next.seen ?? []).includes(fingerprint(accessToken))) {
      const claims = jwtTimes(accessToken);
      next = { ...next, seen: remember(next.seen, fingerprint(accessToken)) };
      if (claims.exp !== undefined) {
        next = {
          ...next,
          accessToken,
          expiresAt: claims.exp.toISOString(),
          obtainedAt: (claims.iat ?? new Date()).toISOString(),
          expiryAssumed: false,
        };
      }
      changed = true;
    }
    return { entry: next, changed };
  }

  async #save(tokens: IssuedTokens): Promise<void> {
    const { store, key, logger } = this.#options;
    try {
      await store.update(key, (entry) => Promise.resolve({ result: undefined, next: withTokens(entry ?? {}, tokens) }));
    } catch (err) {
      // The login worked and the token is good now; only the next start will have to log in again.
      logger.warn({ err: { message: err instanceof Error ? err.message : String(err) } }, 'could not store the tokens of the browser login');
    }
  }
}

export function withTokens(entry: SettingsEntry, tokens: IssuedTokens): SettingsEntry {
  return {
    ...entry,
    accessToken: tokens.accessToken,
    expiresAt: tokens.expiresAt.toISOString(),
    obtainedAt: tokens.obtainedAt.toISOString(),
    expiryAssumed: tokens.expiryAssumed,
    refreshToken: tokens.refreshToken ?? entry.refreshToken,
  };
}

/** The access token of an entry with its times, or undefined when it lacks any of them. */
export function storedTokens(entry: SettingsEntry | undefined): IssuedTokens | undefined {
  if (!entry || typeof entry.accessToken !== 'string' || typeof entry.expiresAt !== 'string') return undefined;
  const expiresAt = new Date(entry.expiresAt);
  const obtainedAt = new Date(typeof entry.obtainedAt === 'string' ? entry.obtainedAt : entry.expiresAt);
  if (Number.isNaN(expiresAt.getTime()) || Number.isNaN(obtainedAt.getTime())) return undefined;
  return issuedTokens({
    accessToken: entry.accessToken,
    refreshToken: typeof entry.refreshToken === 'string' ? entry.refreshToken : undefined,
    expiresAt,
    obtainedAt,
    expiryAssumed: entry.expiryAssumed === true,
  });
}

function remember(seen: readonly string[] | undefined, value: string): string[] {
  return [...(seen ?? []).filter((v) => v !== value), value].slice(-SEEN_LIMIT);
}

function jwtTimes(token: string): { exp: Date | undefined; iat: Date | undefined } {
  const payload = token.split('.')[1];
  if (token.split('.').length !== 3 || payload === undefined) return { exp: undefined, iat: undefined };
  try {
    const claims = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8')) as { exp?: unknown; iat?: unknown };
    return {
      exp: typeof claims.exp === 'number' ? new Date(claims.exp * 1000) : undefined,
      iat: typeof claims.iat === 'number' ? new Date(claims.iat * 1000) : undefined,
    };
  } catch {
    return { exp: undefined, iat: undefined };
  }
}
