/**
 * The one place where failures from openid-client, fetch and the workspace's HTTP answers become
 * TokenErrors. Each HTTP operation is translated exactly once, right where it leaves the retry
 * loop (see `http.ts`); past that point only TokenError travels.
 *
 * A message names the endpoint and the cause in plain words and never holds a secret: server
 * text that is quoted is passed through `redact` with every secret the operation knew.
 */
import { ClientError, ResponseBodyError, WWWAuthenticateChallengeError } from 'openid-client';
import { TokenError } from '../token/token-source.js';

/** What an HTTP operation was doing, for the message. */
export interface OperationInfo {
  /** e.g. `client_credentials`, `refresh_token`, `authorization_code`, `discovery`, `database credential`. */
  readonly what: 'discovery' | 'client_credentials' | 'refresh_token' | 'authorization_code' | 'database credential' | 'database instance' | 'postgres endpoint';
  readonly url: string;
  readonly attempts: number;
  readonly timeoutMs: number;
  /** Whether the client authenticates with OAuthClientSecret (changes the invalid_client advice). */
  readonly confidential: boolean;
  /** Where a setting's value came from (a flag, a variable, a file, a profile), for the advice. */
  readonly sourceOf?: ((setting: string) => string | undefined) | undefined;
}

/** An OAuth error answer's `error` and `error_description` (RFC 6749 5.2). */
export interface OAuthErrorBody {
  readonly error: string;
  readonly description: string | undefined;
}

/**
 * The OAuth error of an answer that came with a WWW-Authenticate challenge. Databricks answers a
 * wrong client secret with 401, a challenge and the error in the JSON body; openid-client throws
 * at the header ("server responded with a challenge in the WWW-Authenticate HTTP Header") and
 * leaves the body unread, so it is read here. The challenge's own `error` parameter (RFC 6750)
 * serves when the body has none.
 */
export async function challengeError(err: unknown): Promise<OAuthErrorBody | undefined> {
  if (!(err instanceof WWWAuthenticateChallengeError)) return undefined;
  try {
    const body = JSON.parse(await err.response.text()) as { error?: unknown; error_description?: unknown };
    if (typeof body.error === 'string' && body.error !== '') {
      return { error: body.error, description: typeof body.error_description === 'string' ? body.error_description : undefined };
    }
  } catch {
    // Not JSON, or the body could not be read: the header may still say.
  }
  for (const challenge of err.cause) {
    const { error, error_description: description } = challenge.parameters;
    if (error) return { error, description };
  }
  return undefined;
}

/** A non-2xx answer from a workspace API that is not an OAuth token endpoint. */
export class HttpStatusError extends Error {
  override readonly name = 'HttpStatusError';
  constructor(
    readonly status: number,
    /** Databricks' `error_code` and `message`, when the body had them. */
    readonly detail: string | undefined,
  ) {
    super(`HTTP ${status}${detail ? ` ${detail}` : ''}`);
  }
}

/** An answer that is not what the API promises (not JSON, a field missing). */
export class BadResponseError extends Error {
  override readonly name = 'BadResponseError';
}

/** Whether another attempt may succeed: network failures, timeouts and 5xx (and 429). */
export function isRetryable(err: unknown): boolean {
  if (err instanceof ResponseBodyError) return err.status === 429 || err.status >= 500;
  if (err instanceof HttpStatusError) return err.status === 429 || err.status >= 500;
  if (err instanceof ClientError) {
    if (err.code === 'OAUTH_TIMEOUT') return true;
    if (err.code === 'OAUTH_RESPONSE_IS_NOT_CONFORM') {
      const status = responseStatus(err.cause);
      return status === 429 || (status !== undefined && status >= 500);
    }
    return false;
  }
  return isNetworkError(err) || isTimeout(err);
}

/** Replaces every occurrence of a secret in server-provided text. */
export function redact(text: string, secrets: ReadonlyArray<string | undefined>): string {
  let out = text;
  for (const secret of secrets) {
    if (secret !== undefined && secret.length >= 4) out = out.split(secret).join('[redacted]');
  }
  return out.length > 300 ? `${out.slice(0, 300)}...` : out;
}

/** `challenge` is the OAuth error of an answer with a WWW-Authenticate challenge (see challengeError). */
export function translate(err: unknown, op: OperationInfo, secrets: ReadonlyArray<string | undefined>, challenge?: OAuthErrorBody): TokenError {
  if (err instanceof TokenError) return err;
  const cause = sanitizedCause(err, secrets);
  const tries = op.attempts > 1 ? ` (${op.attempts} attempts)` : '';
  const make = (code: ConstructorParameters<typeof TokenError>[0], message: string) =>
    new TokenError(code, redact(message, secrets), { cause });

  if (err instanceof ResponseBodyError) {
    const description = err.error_description ? ` (${err.error_description})` : '';
    return oauthError(err.error, description, err.status, op, make);
  }
  if (err instanceof WWWAuthenticateChallengeError) {
    if (challenge) return oauthError(challenge.error, challenge.description ? ` (${challenge.description})` : '', err.status, op, make);
    if (err.status === 401 && op.what !== 'discovery' && op.what !== 'database credential') return oauthError('invalid_client', '', err.status, op, make);
    return make('bad_response', `${op.url} answered HTTP ${err.status} with an authentication challenge${adviceFor(op, err.status)}`);
  }
  if (err instanceof HttpStatusError) {
    if (err.status >= 500) {
      return make('server_error', `${op.url} answered HTTP ${err.status}${tries}: the workspace is having trouble, try again later`);
    }
    return make(err.status === 401 ? 'invalid_grant' : 'invalid_client', `${op.url} answered ${err.message.replace(/\.$/, '')}${adviceFor(op, err.status)}`);
  }
  if (err instanceof BadResponseError) {
    return make('bad_response', `unexpected answer from ${op.url}: ${err.message}`);
  }
  if (err instanceof ClientError) {
    switch (err.code) {
      case 'OAUTH_TIMEOUT':
        return make('timeout', `no answer from ${op.url} within ${seconds(op.timeoutMs)}${tries}`);
      case 'OAUTH_RESPONSE_IS_NOT_CONFORM': {
        const status = responseStatus(err.cause);
        if (status !== undefined && status >= 500) {
          return make('server_error', `${op.url} answered HTTP ${status}${tries}: the workspace is having trouble, try again later`);
        }
        if (status === 401 && op.what !== 'discovery') {
          return oauthError('invalid_client', '', status, op, make);
        }
        return make('bad_response', `${op.url} answered HTTP ${status ?? '?'}${adviceFor(op, status)}`);
      }
      case 'OAUTH_RESPONSE_IS_NOT_JSON':
        return make('bad_response', `unexpected answer from ${op.url}: not JSON${adviceFor(op, undefined)}`);
      case 'OAUTH_PARSE_ERROR':
        return make('bad_response', `unexpected answer from ${op.url}: malformed JSON`);
      case 'OAUTH_INVALID_RESPONSE':
        // The cause says which field was wrong; its own cause (the body) is never quoted.
        return make('bad_response', `unexpected answer from ${op.url}: ${err.cause instanceof Error ? err.cause.message : err.message}`);
      default:
        return make('bad_response', `${op.what} with ${op.url} failed: ${err.message}`);
    }
  }
  if (isTimeout(err)) {
    return make('timeout', `no answer from ${op.url} within ${seconds(op.timeoutMs)}${tries}`);
  }
  if (isNetworkError(err)) {
    return make('unreachable', `cannot reach ${op.url}${tries}: ${networkReason(err)}`);
  }
  return make('bad_response', `${op.what} with ${op.url} failed: ${err instanceof Error ? err.message : String(err)}`);
}

function oauthError(
  error: string,
  description: string,
  status: number,
  op: OperationInfo,
  make: (code: ConstructorParameters<typeof TokenError>[0], message: string) => TokenError,
): TokenError {
  const from = `${error} from ${op.url}`;
  const check = (setting: string): string => {
    const source = op.sourceOf?.(setting);
    return source === undefined ? setting : `${setting} (from ${source})`;
  };
  switch (error) {
    case 'invalid_client':
    case 'unauthorized_client':
      return make(
        'invalid_client',
        op.confidential
          ? `${from}${description}: check ${check('OAuthClientSecret')} and ${check('OAuthClientId')}`
          : `${from}${description}: check ${check('OAuthClientId')} (a public client such as databricks-cli needs no secret)`,
      );
    case 'invalid_grant':
      if (op.what === 'refresh_token') {
        return make(
          'invalid_grant',
          `${from}${description}: the refresh token was refused (expired, revoked or already used); sign in again with \`lakebase-proxy auth login\``,
        );
      }
      if (op.what === 'authorization_code') {
        return make(
          'invalid_grant',
          `${from}${description}: the authorization code was refused (codes are single-use and expire within minutes); run \`lakebase-proxy auth url\` and sign in again`,
        );
      }
      return make('invalid_grant', `${from}${description}`);
    case 'invalid_scope':
      return make('invalid_client', `${from}${description}: check ${check('Scope')} (default all-apis, plus offline_access for OAuthPKCE)`);
    default:
      if (status >= 500) return make('server_error', `${from}${description}: the workspace is having trouble, try again later`);
      return make('invalid_grant', `${from}${description}`);
  }
}

function adviceFor(op: OperationInfo, status: number | undefined): string {
  if (op.what === 'discovery') return ': check DatabricksInstance (the workspace URL, e.g. https://dbc-1234.cloud.databricks.com)';
  if (op.what === 'database credential') {
    if (status === 401) return ': the workspace refused the OAuth token';
    if (status === 403) return ': the identity may not log in to this database; check its Lakebase permissions';
    if (status === 404) return ': check LakebaseInstance or LakebaseEndpoint';
  }
  if (op.what === 'database instance' || op.what === 'postgres endpoint') {
    const key = op.what === 'database instance' ? 'LakebaseInstance' : 'LakebaseEndpoint';
    if (status === 401) return ': the workspace refused the token';
    if (status === 403) return `: the identity may not read this ${op.what === 'database instance' ? 'instance' : 'endpoint'}; check its permissions, or set Server to the host`;
    if (status === 404) return `: check ${key}`;
  }
  return '';
}

function seconds(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${(ms / 1000).toFixed(1)} s`;
}

function responseStatus(cause: unknown): number | undefined {
  if (typeof cause === 'object' && cause !== null && 'status' in cause && typeof cause.status === 'number') {
    return cause.status;
  }
  return undefined;
}

function isTimeout(err: unknown): boolean {
  return err instanceof Error && (err.name === 'TimeoutError' || (err.name === 'AbortError' && isTimeout(err.cause)));
}

/** fetch rejects with `TypeError: fetch failed` and the socket error as its cause. */
function isNetworkError(err: unknown): boolean {
  return err instanceof TypeError && err.message === 'fetch failed';
}

function networkReason(err: unknown): string {
  let current: unknown = err;
  for (let depth = 0; depth < 4 && current instanceof Error; depth++) {
    const code = (current as { code?: unknown }).code;
    if (typeof code === 'string') {
      if (/CERT|SELF_SIGNED|UNABLE_TO_VERIFY|ALTNAME/.test(code)) {
        return `its TLS certificate is not trusted (${code}); add the CA with NODE_EXTRA_CA_CERTS`;
      }
      return code;
    }
    current = current.cause;
  }
  return err instanceof Error && err.cause instanceof Error ? err.cause.message : 'network error';
}

/**
 * A copy of the error chain with names, codes and messages only: library errors may carry the
 * response body (which can hold a token) as their cause, and a logged TokenError must not.
 */
function sanitizedCause(err: unknown, secrets: ReadonlyArray<string | undefined>, depth = 0): Error | undefined {
  if (!(err instanceof Error) || depth > 4) return undefined;
  const copy = new Error(redact(err.message, secrets), { cause: sanitizedCause(err.cause, secrets, depth + 1) });
  copy.name = err.name;
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'string') Object.defineProperty(copy, 'code', { value: code, enumerable: true });
  return copy;
}
