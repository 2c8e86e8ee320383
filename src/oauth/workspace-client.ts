import { randomUUID } from 'node:crypto';
import * as oidc from 'openid-client';
import type { Logger } from '../ops/log.js';
import { jwtExpiry } from '../token/static-token.js';
import { TokenError } from '../token/token-source.js';
import { BadResponseError, type OperationInfo } from './errors.js';
import { getJson, postJson, withRetries, type RetryPolicy } from './http.js';

/**
 * How long a token is taken to live when the server says nothing (no `expires_in`) and the token
 * is no JWT with an `exp` claim. Databricks documents one hour; a shorter guess only costs an
 * earlier refresh, a longer one would hand Postgres an expired password.
 */
export const ASSUMED_LIFETIME_MS = 10 * 60 * 1000;

/** The public client id of the Databricks CLI, the default for OAuthPKCE. */
export const DATABRICKS_CLI_CLIENT_ID = 'databricks-cli';

/** Tokens from a token endpoint or a database-credential API. Secret fields are non-enumerable. */
export interface IssuedTokens {
  readonly accessToken: string;
  readonly refreshToken: string | undefined;
  readonly expiresAt: Date;
  readonly obtainedAt: Date;
  /** The lifetime is ASSUMED_LIFETIME_MS, not known. */
  readonly expiryAssumed: boolean;
}

export function issuedTokens(fields: IssuedTokens): IssuedTokens {
  const tokens = { expiresAt: fields.expiresAt, obtainedAt: fields.obtainedAt, expiryAssumed: fields.expiryAssumed } as IssuedTokens;
  Object.defineProperty(tokens, 'accessToken', { value: fields.accessToken, enumerable: false });
  Object.defineProperty(tokens, 'refreshToken', { value: fields.refreshToken, enumerable: false });
  return Object.freeze(tokens);
}

/** The Lakebase database a credential is minted for. */
export type LakebaseTarget = { readonly instance: string } | { readonly endpoint: string };

export interface WorkspaceClientOptions {
  readonly workspace: URL;
  readonly clientId: string;
  /** HTTP Basic client authentication when set; a public client (`None`) otherwise. */
  readonly clientSecret: string | undefined;
  readonly scope: string;
  readonly requestTimeoutMs: number;
  readonly retry: RetryPolicy;
  readonly logger: Logger;
  /** Where a setting came from, named in the advice of an error (OAuthClientSecret from ...). */
  readonly sourceOf?: ((setting: string) => string | undefined) | undefined;
}

/**
 * The workspace's OAuth endpoints and credential APIs, through openid-client. Every call is
 * bounded by requestTimeoutMs, retried on network errors and 5xx, and fails with a TokenError.
 */
export class WorkspaceClient {
  readonly workspace: URL;
  readonly clientId: string;
  readonly scope: string;
  readonly confidential: boolean;
  readonly #secret: string | undefined;
  readonly #options: WorkspaceClientOptions;
  #configuration: Promise<oidc.Configuration> | undefined;

  constructor(options: WorkspaceClientOptions) {
    this.workspace = options.workspace;
    this.clientId = options.clientId;
    this.scope = options.scope;
    this.#secret = options.clientSecret;
    this.confidential = options.clientSecret !== undefined;
    this.#options = options;
  }

  /** `https://<workspace>/oidc/.well-known/oauth-authorization-server` (RFC 8414 metadata, not OIDC). */
  get discoveryUrl(): string {
    return new URL('/oidc/.well-known/oauth-authorization-server', this.workspace).href;
  }

  async clientCredentials(): Promise<IssuedTokens> {
    const config = await this.#config();
    const response = await this.#tokenCall('client_credentials', config, [], () =>
      oidc.clientCredentialsGrant(config, { scope: this.scope }),
    );
    return this.#fromTokenResponse(response);
  }

  async refresh(refreshToken: string): Promise<IssuedTokens> {
    const config = await this.#config();
    const response = await this.#tokenCall('refresh_token', config, [refreshToken], () => oidc.refreshTokenGrant(config, refreshToken));
    return this.#fromTokenResponse(response, refreshToken);
  }

  /**
   * Trades an authorization code for tokens. `redirectUri` is sent exactly as it was in the
   * authorize request (openid-client's authorizationCodeGrant would normalise it to a trailing
   * slash, which an exact-match server refuses), so the grant goes through genericGrantRequest;
   * state was checked by the caller.
   */
  async exchangeCode(code: string, codeVerifier: string, redirectUri: string): Promise<IssuedTokens> {
    const config = await this.#config();
    const response = await this.#tokenCall('authorization_code', config, [code, codeVerifier], () =>
      oidc.genericGrantRequest(config, 'authorization_code', { code, code_verifier: codeVerifier, redirect_uri: redirectUri }),
    );
    return this.#fromTokenResponse(response);
  }

  /** The URL a person opens to log in (authorization code with PKCE S256). */
  async authorizationUrl(redirectUri: string, state: string, codeChallenge: string): Promise<URL> {
    const config = await this.#config();
    return oidc.buildAuthorizationUrl(config, {
      redirect_uri: redirectUri,
      scope: this.scope,
      state,
      code_challenge: codeChallenge,
      code_challenge_method: 'S256',
    });
  }

  /** Mints a Lakebase database credential with a workspace token; it is then the Postgres password. */
  async databaseCredential(workspaceToken: string, target: LakebaseTarget): Promise<IssuedTokens> {
    const { requestTimeoutMs, retry, logger } = this.#options;
    const [path, body, expiryField] =
      'instance' in target
        ? (['/api/2.0/database/credentials', { request_id: randomUUID(), instance_names: [target.instance] }, 'expiration_time'] as const)
        : (['/api/2.0/postgres/credentials', { endpoint: target.endpoint }, 'expire_time'] as const);
    const url = new URL(path, this.workspace).href;
    return withRetries(
      async () => {
        const obtainedAt = new Date();
        const json = await postJson(url, workspaceToken, body, requestTimeoutMs);
        const { token, [expiryField]: expiry } = (typeof json === 'object' && json !== null ? json : {}) as Record<string, unknown>;
        if (typeof token !== 'string' || token === '') throw new BadResponseError('no token in the answer');
        const expiresAt = typeof expiry === 'string' ? new Date(expiry) : undefined;
        if (expiresAt === undefined || Number.isNaN(expiresAt.getTime())) {
          return this.#withLifetime(token, undefined, obtainedAt);
        }
        return issuedTokens({ accessToken: token, refreshToken: undefined, expiresAt, obtainedAt, expiryAssumed: false });
      },
      this.#operation('database credential', url),
      [workspaceToken, this.#secret],
      retry,
      logger,
    );
  }

  /**
   * A Lakebase resource of the workspace REST API, as JSON: a Provisioned instance
   * (`GET /api/2.0/database/instances/<name>`) or an Autoscaling endpoint
   * (`GET /api/2.0/postgres/projects/<p>/branches/<b>/endpoints/<e>`).
   */
  async lakebaseResource(workspaceToken: string, target: LakebaseTarget): Promise<unknown> {
    const { requestTimeoutMs, retry, logger } = this.#options;
    const [path, what] =
      'instance' in target
        ? ([`/api/2.0/database/instances/${encodeURIComponent(target.instance)}`, 'database instance'] as const)
        : ([`/api/2.0/postgres/${target.endpoint.split('/').map(encodeURIComponent).join('/')}`, 'postgres endpoint'] as const);
    const url = new URL(path, this.workspace).href;
    return withRetries(
      () => getJson(url, workspaceToken, requestTimeoutMs),
      { what, url, timeoutMs: requestTimeoutMs, confidential: this.confidential },
      [workspaceToken, this.#secret],
      retry,
      logger,
    );
  }

  #config(): Promise<oidc.Configuration> {
    if (this.#configuration !== undefined) return this.#configuration;
    const { requestTimeoutMs, retry, logger } = this.#options;
    const url = this.discoveryUrl;
    const clientAuth = this.#secret !== undefined ? oidc.ClientSecretBasic(this.#secret) : oidc.None();
    const pending = withRetries(
      // A URL containing /.well-known/ is fetched as is: the Databricks document is RFC 8414
      // metadata at /oidc/.well-known/oauth-authorization-server, which neither of openid-client's
      // issuer-to-URL algorithms produces from the issuer `https://<workspace>/oidc`.
      () => oidc.discovery(new URL(url), this.clientId, undefined, clientAuth, { timeout: requestTimeoutMs / 1000 }),
      this.#operation('discovery', url),
      [this.#secret],
      retry,
      logger,
    );
    this.#configuration = pending;
    // A failed discovery is tried again by the next caller.
    pending.catch(() => {
      if (this.#configuration === pending) this.#configuration = undefined;
    });
    return pending;
  }

  #tokenCall<T>(
    what: 'client_credentials' | 'refresh_token' | 'authorization_code',
    config: oidc.Configuration,
    secrets: string[],
    run: () => Promise<T>,
  ): Promise<T> {
    const { retry, logger } = this.#options;
    const url = config.serverMetadata().token_endpoint ?? new URL('/oidc/v1/token', this.workspace).href;
    return withRetries(run, this.#operation(what, url), [...secrets, this.#secret], retry, logger);
  }

  #operation(what: OperationInfo['what'], url: string): Omit<OperationInfo, 'attempts'> {
    return { what, url, timeoutMs: this.#options.requestTimeoutMs, confidential: this.confidential, sourceOf: this.#options.sourceOf };
  }

  #fromTokenResponse(response: oidc.TokenEndpointResponse, previousRefreshToken?: string): IssuedTokens {
    const obtainedAt = new Date();
    const expiresIn = typeof response.expires_in === 'number' && response.expires_in > 0 ? response.expires_in : undefined;
    const refreshToken = response.refresh_token ?? previousRefreshToken;
    return this.#withLifetime(response.access_token, expiresIn === undefined ? undefined : expiresIn * 1000, obtainedAt, refreshToken);
  }

  #withLifetime(accessToken: string, lifetimeMs: number | undefined, obtainedAt: Date, refreshToken?: string): IssuedTokens {
    if (lifetimeMs !== undefined) {
      return issuedTokens({ accessToken, refreshToken, obtainedAt, expiresAt: new Date(obtainedAt.getTime() + lifetimeMs), expiryAssumed: false });
    }
    const exp = jwtExpiry(accessToken);
    if (exp !== undefined) return issuedTokens({ accessToken, refreshToken, obtainedAt, expiresAt: exp, expiryAssumed: false });
    this.#options.logger.warn({ assumedLifetimeSeconds: ASSUMED_LIFETIME_MS / 1000 }, 'token answer gave no lifetime; assuming one');
    return issuedTokens({ accessToken, refreshToken, obtainedAt, expiresAt: new Date(obtainedAt.getTime() + ASSUMED_LIFETIME_MS), expiryAssumed: true });
  }
}

/**
 * The workspace URL from DatabricksInstance: a host (`dbc-1.cloud.databricks.com`) or an https URL;
 * only its origin counts.
 */
export function workspaceUrl(instance: string | undefined): URL {
  const raw = instance?.trim();
  if (!raw) {
    throw new TokenError('token_missing', 'DatabricksInstance is not set: give the workspace URL, e.g. https://dbc-1234.cloud.databricks.com');
  }
  let url: URL;
  try {
    url = new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(raw) ? raw : `https://${raw}`);
  } catch {
    throw new TokenError('token_missing', `DatabricksInstance "${raw}" is not a host name or URL`);
  }
  if (url.protocol !== 'https:') {
    throw new TokenError('token_missing', `DatabricksInstance must be an https URL (got ${url.protocol}//): tokens are never sent in the clear`);
  }
  if (/^(instance-[0-9a-f-]+|ep-[a-z0-9-]+)\.database\./i.test(url.hostname)) {
    throw new TokenError(
      'token_missing',
      `DatabricksInstance ${url.hostname} is a database host: give the workspace URL (https://<workspace>.cloud.databricks.com) and put the database host in Server`,
    );
  }
  return new URL(url.origin);
}
