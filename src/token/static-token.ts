import { createToken, TokenError, type Token, type TokenSource } from './token-source.js';

/**
 * The token given in OAuthAccessToken (the seed's InitiateOAuth=OFF). Its expiry is read from the
 * JWT `exp` claim when the token is a JWT; once past, new clients are refused with a message
 * that says so, while open sessions go on (Lakebase checks tokens only at login).
 */
export class StaticTokenSource implements TokenSource {
  readonly #token: Token;
  readonly #description: string;

  constructor(value: string, expiresAt: Date | undefined = jwtExpiry(value), description = 'static token (OAuthAccessToken, InitiateOAuth=OFF)') {
    this.#description = description;
    this.#token = createToken(value, expiresAt);
  }

  getToken(): Promise<Token> {
    const { expiresAt } = this.#token;
    if (expiresAt !== undefined && expiresAt.getTime() <= Date.now()) {
      return Promise.reject(
        new TokenError(
          'token_expired',
          `the OAuthAccessToken expired at ${expiresAt.toISOString()} and InitiateOAuth=OFF does not renew it: give a fresh token`,
        ),
      );
    }
    return Promise.resolve(this.#token);
  }

  describe(): string {
    return this.#description;
  }

  currentExpiry(): Date | undefined {
    return this.#token.expiresAt;
  }

  close(): Promise<void> {
    return Promise.resolve();
  }
}

/** The `exp` claim of a JWT, or undefined when the token is not a JWT or has none. */
export function jwtExpiry(token: string): Date | undefined {
  const parts = token.split('.');
  if (parts.length !== 3 || parts[1] === undefined) return undefined;
  try {
    const claims: unknown = JSON.parse(Buffer.from(parts[1], 'base64url').toString('utf8'));
    if (typeof claims === 'object' && claims !== null && 'exp' in claims && typeof claims.exp === 'number') {
      return new Date(claims.exp * 1000);
    }
  } catch {
    // not a JWT: the lifetime is unknown
  }
  return undefined;
}
