/**
 * `createTokenSource` (re-exported by index.ts) turns the seed connector's properties
 * (OAuthOptions) into the TokenSource the relay asks for a password at each client login.
 *
 * - InitiateOAuth=OFF: OAuthAccessToken as given (StaticTokenSource).
 * - AuthScheme=OAuthClient: client credentials (HTTP Basic, scope all-apis).
 * - AuthScheme=OAuthPKCE: a fresh stored token, the OAuthVerifier code of a login begun by
 *   `auth url`, the stored or given refresh token, and with GETANDREFRESH a browser login whose URL
 *   every waiting client gets as a NoticeResponse.
 * - AuthScheme=DatabricksCli: the token `databricks auth token` prints (see databricks-cli.ts).
 * - AuthScheme=PersonalAccessToken: a personal access token, which only calls the workspace API:
 *   it needs LakebaseInstance or LakebaseEndpoint to mint the database credential.
 * - LakebaseInstance / LakebaseEndpoint: the workspace token is exchanged for a database credential.
 *
 * Configuration that can never give a token (a missing key) throws a TokenError at once.
 */
import type { OAuthOptions } from './options.js';
import type { Logger } from '../ops/log.js';
import { StaticTokenSource } from '../token/static-token.js';
import { TokenError, type TokenSource } from '../token/token-source.js';
import { CachedTokenSource } from './cached-token-source.js';
import { DatabaseCredentialFetcher, type WorkspaceTokenProvider } from './database-credential.js';
import { ComputeLocator } from '../lakebase/locator.js';
import { DEFAULT_RETRY } from './http.js';
import { checkSettingsFile, openSettingsStore, settingsKey, type SettingsStore } from './settings-store.js';
import { DATABRICKS_CLI_CLIENT_ID, WorkspaceClient, workspaceUrl, type LakebaseTarget } from './workspace-client.js';
import { WorkspaceTokenFetcher } from './workspace-token.js';
import { DatabricksCliFetcher } from './databricks-cli.js';

export interface TokenSourceDeps {
  readonly logger: Logger;
  /** Called once per token obtained (`success`) or not (`failure`) for the password the relay uses. */
  readonly onRefresh?: (result: 'success' | 'failure') => void;
}

export function createTokenSource(options: OAuthOptions, deps: TokenSourceDeps): TokenSource {
  return createLakebaseAccess(options, deps).tokenSource;
}

/** The token source of a target, and the locator of its database when it is named (LakebaseInstance, LakebaseEndpoint). */
export interface LakebaseAccess {
  readonly tokenSource: TokenSource;
  readonly locator: ComputeLocator | undefined;
}

/** createTokenSource, with the locator; `readOnly` picks the read-only host (ReadOnly=true). */
export function createLakebaseAccess(options: OAuthOptions, deps: TokenSourceDeps, readOnly = false): LakebaseAccess {
  return buildAccess(options, deps, { allowBrowserLogin: true }, readOnly);
}

/** createTokenSource, with the browser login turned off for commands such as `auth token`. */
export function buildTokenSource(options: OAuthOptions, deps: TokenSourceDeps, mode: { allowBrowserLogin: boolean }): TokenSource {
  return buildAccess(options, deps, mode, false).tokenSource;
}

function buildAccess(options: OAuthOptions, deps: TokenSourceDeps, mode: { allowBrowserLogin: boolean }, readOnly: boolean): LakebaseAccess {
  const lakebase = lakebaseTarget(options);
  if (options.authScheme === 'PersonalAccessToken') {
    if (!options.personalAccessToken) {
      throw new TokenError('token_missing', 'AuthScheme=PersonalAccessToken needs PersonalAccessToken (a dapi... token; or DATABRICKS_TOKEN, or a profile with auth_type = pat)');
    }
    // Lakebase takes OAuth tokens as passwords; a personal access token is good for the workspace API only.
    if (lakebase === undefined) {
      throw new TokenError(
        'token_missing',
        'a personal access token is not a Postgres password for Lakebase: set LakebaseInstance or LakebaseEndpoint, and the proxy exchanges it for a database credential',
      );
    }
    const fixed = new StaticTokenSource(options.personalAccessToken, undefined, 'personal access token (PersonalAccessToken)');
    const client = workspaceClient(options, deps.logger, 'scheme');
    return databaseAccess(deps, { client, target: lakebase, readOnly }, fixed, { token: () => fixed.getToken() });
  }
  if (options.authScheme === 'DatabricksCli') {
    const client = workspaceClient(options, deps.logger, 'scheme');
    const cli = new DatabricksCliFetcher({ workspace: client.workspace, profile: options.profile, timeoutMs: options.requestTimeoutMs, logger: deps.logger });
    if (lakebase === undefined) return { tokenSource: new CachedTokenSource(cli, deps), locator: undefined };
    return cachedWorkspaceAccess(deps, { client, target: lakebase, readOnly }, new CachedTokenSource(cli, { logger: deps.logger }));
  }
  if (options.initiateOAuth === 'OFF') {
    if (!options.accessToken) {
      throw new TokenError(
        'token_missing',
        'InitiateOAuth=OFF uses OAuthAccessToken, which is not set: give a token, or set InitiateOAuth=GETANDREFRESH to obtain one',
      );
    }
    const fixed = new StaticTokenSource(options.accessToken);
    if (lakebase === undefined) return { tokenSource: fixed, locator: undefined };
    const client = workspaceClient(options, deps.logger, 'scheme');
    return databaseAccess(deps, { client, target: lakebase, readOnly }, fixed, { token: () => fixed.getToken() });
  }

  const client = workspaceClient(options, deps.logger, 'scheme');
  const fetcher = new WorkspaceTokenFetcher(
    {
      client,
      store: settingsStore(options),
      key: settingsKey(client.workspace, client.clientId),
      grant: options.authScheme === 'OAuthClient' ? 'client_credentials' : 'user',
      initiate: options.initiateOAuth,
      allowBrowserLogin: mode.allowBrowserLogin,
      callbackUrl: options.callbackUrl,
      loginTimeoutMs: options.loginTimeoutMs,
      logger: deps.logger,
    },
    { accessToken: options.accessToken, refreshToken: options.refreshToken, verifier: options.verifier },
  );
  if (lakebase === undefined) return { tokenSource: new CachedTokenSource(fetcher, deps), locator: undefined };
  return cachedWorkspaceAccess(deps, { client, target: lakebase, readOnly }, new CachedTokenSource(fetcher, { logger: deps.logger }));
}

/** databaseAccess with a workspace token that is cached, refreshed and dropped when the workspace refuses it. */
function cachedWorkspaceAccess(deps: TokenSourceDeps, database: Parameters<typeof databaseAccess>[1], workspace: CachedTokenSource): LakebaseAccess {
  return databaseAccess(deps, database, workspace, {
    token: (context) => workspace.acquire({ notice: (m) => context.notice(m), signal: context.signal }, context.interactive),
    invalidate: () => workspace.invalidate(),
  });
}

/** The database credential minted with the workspace token, and the locator that uses the same token. */
function databaseAccess(
  deps: TokenSourceDeps,
  database: { client: WorkspaceClient; target: LakebaseTarget; readOnly: boolean },
  workspace: TokenSource,
  provider: WorkspaceTokenProvider,
): LakebaseAccess {
  const fetcher = new DatabaseCredentialFetcher(provider, database.client, database.target, () => workspace.describe());
  return {
    tokenSource: new CachedTokenSource(fetcher, { ...deps, inner: workspace }),
    locator: new ComputeLocator({ client: database.client, workspaceToken: provider, target: database.target, readOnly: database.readOnly }),
  };
}

/**
 * The client for the options. `scheme` follows AuthScheme; `browser` is the authorization-code
 * flow of the `auth login|url|exchange` commands, whatever AuthScheme says.
 */
export function workspaceClient(options: OAuthOptions, logger: Logger, flow: 'scheme' | 'browser'): WorkspaceClient {
  const workspace = workspaceUrl(options.databricksInstance);
  const browser = flow === 'browser' || options.authScheme === 'OAuthPKCE';
  // Only the client-credentials grant authenticates the client; the other schemes bring their own token.
  if (flow === 'scheme' && options.authScheme === 'OAuthClient' && options.initiateOAuth !== 'OFF') {
    if (!options.clientId) {
      throw new TokenError('token_missing', "AuthScheme=OAuthClient needs OAuthClientId (the service principal's application id)");
    }
    if (!options.clientSecret) {
      throw new TokenError('token_missing', "AuthScheme=OAuthClient needs OAuthClientSecret (the service principal's OAuth secret)");
    }
  }
  return new WorkspaceClient({
    workspace,
    clientId: options.clientId ?? DATABRICKS_CLI_CLIENT_ID,
    clientSecret: options.clientSecret || undefined,
    scope: options.scope ?? (browser ? 'all-apis offline_access' : 'all-apis'),
    requestTimeoutMs: options.requestTimeoutMs,
    retry: DEFAULT_RETRY,
    logger,
    sourceOf: options.sourceOf,
  });
}

/** Refuses at start a settings file the token source would refuse later (see checkSettingsFile). */
export async function checkOAuthSettings(options: OAuthOptions): Promise<void> {
  if (options.initiateOAuth !== 'OFF') await checkSettingsFile(options.settingsLocation);
}

export function settingsStore(options: OAuthOptions): SettingsStore {
  // A lock is held for at most a discovery and a token request, each with its retries.
  const lockStaleMs = 2 * DEFAULT_RETRY.attempts * options.requestTimeoutMs + 2 * DEFAULT_RETRY.maxDelayMs + 5_000;
  return openSettingsStore(options.settingsLocation, { lockStaleMs });
}

function lakebaseTarget(options: OAuthOptions): LakebaseTarget | undefined {
  if (options.lakebaseInstance && options.lakebaseEndpoint) {
    throw new TokenError('token_missing', 'set LakebaseInstance (Provisioned) or LakebaseEndpoint (Autoscaling), not both');
  }
  if (options.lakebaseInstance) return { instance: options.lakebaseInstance };
  if (options.lakebaseEndpoint) return { endpoint: options.lakebaseEndpoint };
  return undefined;
}
