/** A password for the upstream login, and until when the server will take it. */
export interface Token {
  readonly value: string;
  /** undefined when the lifetime is unknown (a static token without an `exp` claim). */
  readonly expiresAt: Date | undefined;
}

/** A Token whose `value` is not enumerable: spreading, serializing or logging it shows no secret. */
export function createToken(value: string, expiresAt: Date | undefined): Token {
  return Object.freeze(Object.defineProperty({ expiresAt } as Token, 'value', { value, enumerable: false }));
}

/** What a token source may do toward the client that is waiting for the token. */
export interface TokenRequestContext {
  /** Sends the waiting client a NoticeResponse (psql prints it): used for a browser login URL. */
  notice(message: string): void;
  /** Aborted when the waiting client goes away. */
  readonly signal?: AbortSignal;
}

/**
 * Where the upstream password comes from. The relay asks for a token once per client login and
 * never again for that session: Lakebase checks tokens only at login.
 */
export interface TokenSource {
  /** A token valid now. Rejects with a TokenError whose message is safe to show a client. */
  getToken(context: TokenRequestContext): Promise<Token>;
  /** Human-readable description without secrets, e.g. "static token (OAuthAccessToken)". */
  describe(): string;
  /** The expiry of the token held now, without fetching (for metrics); undefined if none. */
  currentExpiry(): Date | undefined;
  /** Stops timers and pending work. */
  close(): Promise<void>;
}

export type TokenErrorCode =
  | 'token_expired'
  | 'token_missing'
  | 'invalid_client'
  | 'invalid_grant'
  | 'login_required'
  | 'login_timeout'
  | 'server_error'
  | 'unreachable'
  | 'timeout'
  | 'bad_response'
  | 'settings_error';

/**
 * A failure to obtain a token. The message names the cause in plain words and never holds a
 * secret; `sqlstate` is what the waiting client sees (28000, or 08006 when the authorization
 * server cannot be reached).
 */
export class TokenError extends Error {
  override readonly name = 'TokenError';
  readonly code: TokenErrorCode;
  readonly sqlstate: '28000' | '08006';

  constructor(code: TokenErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.sqlstate = code === 'unreachable' || code === 'timeout' ? '08006' : '28000';
  }
}
