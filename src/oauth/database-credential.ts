/**
 * LakebaseInstance / LakebaseEndpoint: the workspace token is exchanged for a database credential,
 * and that is the Postgres password. The credential is cached by its own CachedTokenSource (its
 * own expiry and refresh), so a workspace token is needed only when a new credential is.
 */
import { TokenError, type Token } from '../token/token-source.js';
import type { FetchContext, TokenFetcher } from './cached-token-source.js';
import type { IssuedTokens, LakebaseTarget, WorkspaceClient } from './workspace-client.js';

/**
 * Gives a valid workspace token; `context.interactive` says whether it may start a browser login.
 * `invalidate`, when there is one, drops a token the workspace refused so the next call gets a new one.
 */
export interface WorkspaceTokenProvider {
  token(context: FetchContext): Promise<Token>;
  invalidate?(): void;
}

export class DatabaseCredentialFetcher implements TokenFetcher {
  readonly #workspaceToken: WorkspaceTokenProvider;
  readonly #client: WorkspaceClient;
  readonly #target: LakebaseTarget;
  readonly #describeWorkspace: () => string;

  constructor(workspaceToken: WorkspaceTokenProvider, client: WorkspaceClient, target: LakebaseTarget, describeWorkspace: () => string) {
    this.#workspaceToken = workspaceToken;
    this.#client = client;
    this.#target = target;
    this.#describeWorkspace = describeWorkspace;
  }

  describe(): string {
    const what = 'instance' in this.#target ? `instance ${this.#target.instance}` : `endpoint ${this.#target.endpoint}`;
    return `database credential for ${what}, from ${this.#describeWorkspace()}`;
  }

  fetch(context: FetchContext): Promise<IssuedTokens> {
    return withWorkspaceToken(this.#workspaceToken, context, (token) => this.#client.databaseCredential(token, this.#target));
  }
}

/**
 * Runs `call` with a workspace token. A 401 (the token was revoked before its expiry) drops it
 * and tries once more with a new one, when the provider can drop tokens.
 */
export async function withWorkspaceToken<T>(provider: WorkspaceTokenProvider, context: FetchContext, call: (token: string) => Promise<T>): Promise<T> {
  const workspace = await provider.token(context);
  try {
    return await call(workspace.value);
  } catch (err) {
    if (!(err instanceof TokenError) || err.code !== 'invalid_grant' || provider.invalidate === undefined) throw err;
    provider.invalidate();
    const fresh = await provider.token(context);
    return call(fresh.value);
  }
}
