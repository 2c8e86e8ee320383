/**
 * A local stand-in for a Databricks workspace, over HTTPS with the test CA, on the real paths:
 *
 *   GET  /oidc/.well-known/oauth-authorization-server   RFC 8414 metadata
 *   GET  /oidc/v1/authorize                             redirects at once to redirect_uri with code and state
 *   POST /oidc/v1/token                                 client_credentials (HTTP Basic), authorization_code
 *                                                       (PKCE S256 checked), refresh_token (rotated: single use);
 *                                                       a failed client authentication is 401 with
 *                                                       WWW-Authenticate and {error, error_description}
 *   POST /api/2.0/database/credentials                  {request_id, instance_names} -> {token, expiration_time}
 *   POST /api/2.0/postgres/credentials                  {endpoint} -> {token, expire_time}
 *   GET  /api/2.0/database/instances/<name>             a DatabaseInstance (Provisioned), set by setInstance()
 *   GET  /api/2.0/postgres/projects/<p>/branches/<b>/endpoints/<e>
 *                                                       an Endpoint (Autoscaling), set by setEndpoint()
 *
 * The two GETs answer with the fields of Databricks' API reference (docs.databricks.com/api,
 * "Get a Database Instance" of the database API and "Get" of postgres/v1 endpoints):
 *
 *   DatabaseInstance: { name, uid, creator, creation_time, state, capacity, pg_version,
 *     read_write_dns, read_only_dns (only with readable secondaries), effective_stopped,
 *     effective_capacity, effective_enable_readable_secondaries, effective_node_count }
 *     state: STATE_UNSPECIFIED | STARTING | AVAILABLE | DELETING | STOPPED | UPDATING | FAILING_OVER
 *   Endpoint: { name: "projects/<p>/branches/<b>/endpoints/<e>", uid, parent, create_time,
 *     update_time, endpoint_id, spec: { endpoint_type, autoscaling_limit_min_cu,
 *     autoscaling_limit_max_cu, suspend_timeout_duration, disabled }, status: { endpoint_type,
 *     hosts: { host, read_only_host (read-only endpoints, or groups with readable secondaries) },
 *     current_state, pending_state, last_active_time, autoscaling_limit_min_cu,
 *     autoscaling_limit_max_cu, suspend_timeout_duration, disabled } }
 *     endpoint_type: ENDPOINT_TYPE_READ_WRITE | ENDPOINT_TYPE_READ_ONLY
 *     current_state: ACTIVE | IDLE (suspended by scale-to-zero) | INIT | DEGRADED
 *   A name that does not exist: 404 { error_code: "RESOURCE_DOES_NOT_EXIST", message }.
 *
 * A personal access token (`personalAccessToken`, `dapi...`) is accepted wherever a workspace
 * access token is: by the credential APIs and the GETs above, never by the Postgres server.
 *
 * A small server of our own rather than oauth2-mock-server or oidc-provider: neither serves
 * Databricks' paths and credential APIs, counts grants, rotates refresh tokens strictly, or
 * injects the faults the tests need (500s, slowness, bad JSON, a missing expires_in, going down),
 * and oidc-provider's interactive login would need a scripted browser.
 *
 * `onIssue` sees every token issued, so a test ties it to the real Postgres: the test harness's
 * `setTokenPassword(token, expiresAt)` makes the server accept a token exactly while it is valid.
 */
import { createHash, randomBytes, randomUUID, timingSafeEqual } from 'node:crypto';
import { createServer, type Server } from 'node:https';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { Writable } from 'node:stream';
import pg from 'pg';
import { createLogger, type Logger } from '../../src/ops/log.js';
import type { OAuthOptions } from '../../src/oauth/options.js';
import { testCA } from './certs.js';
import type { TestPostgres } from './postgres.js';

export type TokenKind = 'workspace' | 'database';

export interface StandinOptions {
  /** The service principal's application id (OAuthClientId); random by default. */
  readonly clientId?: string;
  /** The service principal's secret (OAuthClientSecret); random by default. */
  readonly clientSecret?: string;
  /** Public clients for the authorization-code flow (no secret). Default: databricks-cli. */
  readonly publicClients?: readonly string[];
  /** Lifetime of workspace access tokens. Default 3600. */
  readonly tokenLifetimeSeconds?: number;
  /** Lifetime of database credentials. Default 3600. */
  readonly databaseTokenLifetimeSeconds?: number;
  /** Lifetime of refresh tokens. Default 30 days. */
  readonly refreshTokenLifetimeSeconds?: number;
  /** The person who "logs in" at /oidc/v1/authorize. */
  readonly userName?: string;
  /** Provisioned instances that exist; any name when undefined. */
  readonly instances?: readonly string[];
  /** Called for every token issued, before the answer is sent (so a password can be set first). */
  readonly onIssue?: (token: string, expiresAt: Date, kind: TokenKind) => void | Promise<void>;
  /** Address to listen on; default 127.0.0.1 (0.0.0.0 in the compose demo). */
  readonly host?: string;
  /** The public base URL, when clients reach it by another name (https://oauth:8443 in compose). */
  readonly publicUrl?: string;
  /** Port to listen on; 0 (default) picks a free one. */
  readonly port?: number;
}

/**
 * A fault injected into answers on `path` (default the token endpoint, or the authorize endpoint
 * for deny-login), for `times` requests
 * (default: until cleared with `fault(undefined)`).
 */
export type Fault = (
  | { readonly kind: 'status'; readonly status: number }
  | { readonly kind: 'slow'; readonly delayMs: number }
  | { readonly kind: 'malformed-json' }
  /** A token answer without expires_in; `opaque` tokens carry no exp claim either. */
  | { readonly kind: 'no-expires-in'; readonly opaque?: boolean }
  /** The authorize endpoint answers `error=access_denied` instead of a code. */
  | { readonly kind: 'deny-login' }
  /** A 200 token answer that holds an access token but no token_type (not a valid answer). */
  | { readonly kind: 'no-token-type' }
) & { readonly times?: number; readonly path?: string };

/** A Provisioned instance as the stand-in serves it; the rest of DatabaseInstance is filled in. */
export interface StandinInstance {
  state: 'STARTING' | 'AVAILABLE' | 'DELETING' | 'STOPPED' | 'UPDATING' | 'FAILING_OVER';
  read_write_dns: string;
  read_only_dns?: string;
}

/** An Autoscaling endpoint as the stand-in serves it (status.*); the rest of Endpoint is filled in. */
export interface StandinEndpoint {
  current_state: 'ACTIVE' | 'IDLE' | 'INIT' | 'DEGRADED';
  host: string;
  read_only_host?: string;
  endpoint_type?: 'ENDPOINT_TYPE_READ_WRITE' | 'ENDPOINT_TYPE_READ_ONLY';
  disabled?: boolean;
}

export interface StandinCounts {
  discovery: number;
  authorize: number;
  /** Every POST to the token endpoint, whatever its outcome. */
  tokenRequests: number;
  client_credentials: number;
  authorization_code: number;
  refresh_token: number;
  /** Token requests refused with invalid_client / invalid_grant. */
  invalid_client: number;
  invalid_grant: number;
  /** A refresh token presented again after it was spent: must stay 0. */
  refreshTokenReuse: number;
  database_credentials: number;
  postgres_credentials: number;
  /** GETs of /api/2.0/database/instances/<name> and /api/2.0/postgres/<endpoint>. */
  instance_lookups: number;
  endpoint_lookups: number;
}

export interface DatabricksStandin {
  /** `https://localhost:<port>`: the DatabricksInstance. */
  readonly url: string;
  readonly port: number;
  readonly clientId: string;
  readonly clientSecret: string;
  readonly userName: string;
  /** A personal access token of userName (`dapi` and 32 hex digits), good for the REST API. */
  readonly personalAccessToken: string;
  tokenLifetimeSeconds: number;
  databaseTokenLifetimeSeconds: number;
  readonly counts: StandinCounts;
  /** Sets (or clears) the fault mode. */
  fault(fault: Fault | undefined): void;
  /** Every refresh token issued so far answers invalid_grant from now on. */
  expireRefreshTokens(): void;
  /** Every workspace access token issued so far is refused (401) by the credential APIs from now on. */
  revokeAccessTokens(): void;
  /** Every secret seen or issued: the client secret, tokens, refresh tokens, codes, PKCE verifiers. */
  secrets(): string[];
  /** The body of the last credential request, per path. */
  readonly lastCredentialRequest: Map<string, unknown>;
  /** Resets every counter to 0. */
  resetCounts(): void;
  /** Creates or changes the Provisioned instance `name`; undefined removes it. */
  setInstance(name: string, instance: StandinInstance | undefined): void;
  /** Creates or changes the Autoscaling endpoint `projects/<p>/branches/<b>/endpoints/<e>`; undefined removes it. */
  setEndpoint(name: string, endpoint: StandinEndpoint | undefined): void;
  /**
   * A clean slate for the next test: listening again, no fault, both token lifetimes as started,
   * every counter at 0. (Refresh and access tokens already expired or revoked stay so.)
   */
  reset(): Promise<void>;
  /**
   * Does what the browser does: follows `authorizeUrl` (the stand-in answers 302 at once), then
   * GETs the callback it points to. Resolves with the callback's answer.
   */
  completeLogin(authorizeUrl: string): Promise<{ status: number; callbackUrl: string; body: string }>;
  /** Follows `authorizeUrl` only: resolves with the callback URL (with code and state), not visited. */
  authorize(authorizeUrl: string): Promise<URL>;
  /** Closes the listener and every connection: clients get ECONNREFUSED until up(). */
  down(): Promise<void>;
  /** Listens again on the same port. */
  up(): Promise<void>;
  close(): Promise<void>;
}

interface CodeGrant {
  readonly clientId: string;
  readonly redirectUri: string;
  readonly challenge: string;
  readonly scope: string;
  readonly expiresAt: number;
  used: boolean;
}

interface RefreshGrant {
  readonly clientId: string;
  readonly scope: string;
  readonly expiresAt: number;
  used: boolean;
  revoked: boolean;
}

const TOKEN_PATH = '/oidc/v1/token';
const AUTHORIZE_PATH = '/oidc/v1/authorize';

export async function startDatabricksStandin(options: StandinOptions = {}): Promise<DatabricksStandin> {
  const ca = await testCA();
  const clientId = options.clientId ?? randomUUID();
  const clientSecret = options.clientSecret ?? `dose${randomBytes(24).toString('hex')}`;
  const publicClients = new Set(options.publicClients ?? ['databricks-cli']);
  const userName = options.userName ?? 'token.user@example.com';
  const codes = new Map<string, CodeGrant>();
  const refreshTokens = new Map<string, RefreshGrant>();
  const accessTokens = new Map<string, number>(); // workspace token -> expiry (ms)
  const counts = zeroCounts();
  const lastCredentialRequest = new Map<string, unknown>();
  const instances = new Map<string, StandinInstance>();
  const endpoints = new Map<string, StandinEndpoint>();
  const personalAccessToken = `dapi${randomBytes(16).toString('hex')}`;
  const sockets = new Set<Socket>();
  const secrets = new Set<string>([personalAccessToken]);
  const timers = new Set<NodeJS.Timeout>();
  let current: (Fault & { remaining: number }) | undefined;
  let origin = '';

  const standin = {
    tokenLifetimeSeconds: options.tokenLifetimeSeconds ?? 3600,
    databaseTokenLifetimeSeconds: options.databaseTokenLifetimeSeconds ?? 3600,
  };

  /** The fault for this request, if any, counting it down. */
  function takeFault(path: string): Fault | undefined {
    if (!current || (current.path ?? (current.kind === 'deny-login' ? AUTHORIZE_PATH : TOKEN_PATH)) !== path) return undefined;
    const fault = current;
    if (Number.isFinite(fault.remaining)) {
      fault.remaining--;
      if (fault.remaining <= 0) current = undefined;
    }
    return fault;
  }

  async function issue(kind: TokenKind, subject: string, scope: string, lifetimeSeconds: number, opaque = false): Promise<{ token: string; expiresAt: Date }> {
    const now = Date.now();
    const expiresAt = new Date(now + lifetimeSeconds * 1000);
    const token = opaque ? `dapi-opaque-${randomBytes(420).toString('hex')}` : fakeJwt(origin, subject, scope, kind, now, expiresAt);
    if (kind === 'workspace') accessTokens.set(token, expiresAt.getTime());
    secrets.add(token);
    await options.onIssue?.(token, expiresAt, kind);
    return { token, expiresAt };
  }

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', origin);
    const body = await readBody(req);
    const fault = takeFault(url.pathname);
    if (fault?.kind === 'slow') {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          timers.delete(timer);
          resolve();
        }, fault.delayMs);
        timers.add(timer);
      });
      if (res.destroyed) return;
    } else if (fault?.kind === 'status') {
      if (url.pathname === TOKEN_PATH) counts.tokenRequests++;
      send(res, fault.status, { error: 'temporarily_unavailable', error_description: `stand-in fault: HTTP ${fault.status}` });
      return;
    } else if (fault?.kind === 'malformed-json') {
      if (url.pathname === TOKEN_PATH) counts.tokenRequests++;
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"access_token": "abc", "token_type": "Bearer", ');
      return;
    }

    if (req.method === 'GET' && url.pathname === '/oidc/.well-known/oauth-authorization-server') {
      counts.discovery++;
      send(res, 200, {
        issuer: `${origin}/oidc`,
        authorization_endpoint: `${origin}${AUTHORIZE_PATH}`,
        token_endpoint: `${origin}${TOKEN_PATH}`,
        jwks_uri: `${origin}/oidc/jwks.json`,
        response_types_supported: ['code', 'id_token'],
        response_modes_supported: ['query', 'fragment', 'form_post'],
        grant_types_supported: ['client_credentials', 'authorization_code', 'refresh_token'],
        code_challenge_methods_supported: ['S256'],
        token_endpoint_auth_methods_supported: ['client_secret_basic', 'client_secret_post', 'none'],
        subject_types_supported: ['public'],
        scopes_supported: ['all-apis', 'offline_access', 'openid', 'email', 'profile', 'sql'],
      });
      return;
    }
    if (req.method === 'GET' && url.pathname === AUTHORIZE_PATH) {
      counts.authorize++;
      authorizeEndpoint(url, res, fault);
      return;
    }
    if (req.method === 'POST' && url.pathname === TOKEN_PATH) {
      counts.tokenRequests++;
      await tokenEndpoint(req, new URLSearchParams(body), res, fault);
      return;
    }
    if (req.method === 'POST' && (url.pathname === '/api/2.0/database/credentials' || url.pathname === '/api/2.0/postgres/credentials')) {
      await credentialEndpoint(req, url.pathname, body, res, fault);
      return;
    }
    if (req.method === 'GET' && url.pathname.startsWith('/api/2.0/database/instances/')) {
      counts.instance_lookups++;
      if (bearerSubject(req) === undefined) return void send(res, 401, { error_code: 'UNAUTHENTICATED', message: 'Invalid access token.' });
      const name = decodeURIComponent(url.pathname.slice('/api/2.0/database/instances/'.length));
      const instance = instances.get(name);
      if (!instance) return void send(res, 404, { error_code: 'RESOURCE_DOES_NOT_EXIST', message: `Database instance '${name}' does not exist.` });
      send(res, 200, instanceResource(name, instance));
      return;
    }
    const endpointPath = /^\/api\/2\.0\/postgres\/(projects\/[^/]+\/branches\/[^/]+\/endpoints\/[^/]+)$/.exec(url.pathname);
    if (req.method === 'GET' && endpointPath) {
      counts.endpoint_lookups++;
      if (bearerSubject(req) === undefined) return void send(res, 401, { error_code: 'UNAUTHENTICATED', message: 'Invalid access token.' });
      const name = (endpointPath[1] as string).split('/').map(decodeURIComponent).join('/');
      const endpoint = endpoints.get(name);
      if (!endpoint) return void send(res, 404, { error_code: 'NOT_FOUND', message: `Endpoint '${name}' not found` });
      send(res, 200, endpointResource(name, endpoint));
      return;
    }
    send(res, 404, { error_code: 'ENDPOINT_NOT_FOUND', message: `No API found for '${req.method} ${url.pathname}'` });
  }

  function authorizeEndpoint(url: URL, res: ServerResponse, fault: Fault | undefined): void {
    const p = url.searchParams;
    const redirectUri = p.get('redirect_uri') ?? '';
    const client = p.get('client_id') ?? '';
    let redirect: URL;
    try {
      redirect = new URL(redirectUri);
    } catch {
      send(res, 400, { error: 'invalid_request', error_description: 'redirect_uri is not a URL' });
      return;
    }
    if (!['localhost', '127.0.0.1', '[::1]'].includes(redirect.hostname) || (client !== clientId && !publicClients.has(client))) {
      send(res, 400, { error: 'invalid_request', error_description: 'unknown client or redirect_uri not allowed' });
      return;
    }
    const state = p.get('state');
    if (state) redirect.searchParams.set('state', state);
    const challenge = p.get('code_challenge');
    if (fault?.kind === 'deny-login') {
      redirect.searchParams.set('error', 'access_denied');
      redirect.searchParams.set('error_description', 'The user denied the request');
    } else if (p.get('response_type') !== 'code' || !challenge || p.get('code_challenge_method') !== 'S256') {
      redirect.searchParams.set('error', 'invalid_request');
      redirect.searchParams.set('error_description', 'PKCE with S256 is required');
    } else {
      const code = `dcode${randomBytes(24).toString('base64url')}`;
      secrets.add(code);
      codes.set(code, { clientId: client, redirectUri, challenge, scope: p.get('scope') ?? '', expiresAt: Date.now() + 120_000, used: false });
      redirect.searchParams.set('code', code);
    }
    // Location keeps the redirect_uri exactly as sent, then the parameters.
    const query = redirect.search;
    res.writeHead(302, { location: `${redirectUri}${redirectUri.includes('?') ? '&' + query.slice(1) : query}` });
    res.end();
  }

  async function tokenEndpoint(req: IncomingMessage, body: URLSearchParams, res: ServerResponse, fault: Fault | undefined): Promise<void> {
    const client = authenticate(req.headers.authorization, body);
    if (client === undefined) {
      refuseClient(res);
      return;
    }
    const grant = body.get('grant_type');
    const noExpiresIn = fault?.kind === 'no-expires-in';
    const opaque = fault?.kind === 'no-expires-in' && fault.opaque === true;
    const answer = async (subject: string, scope: string, withRefresh: boolean) => {
      // Read once: a test may change the lifetime while issue() awaits onIssue, and expires_in must
      // be the lifetime Postgres was told, or the client keeps a token Postgres has expired.
      const lifetimeSeconds = standin.tokenLifetimeSeconds;
      const { token } = await issue('workspace', subject, scope, lifetimeSeconds, opaque);
      const json: Record<string, unknown> = { access_token: token, token_type: 'Bearer', scope };
      if (fault?.kind === 'no-token-type') delete json['token_type'];
      if (!noExpiresIn) json['expires_in'] = lifetimeSeconds;
      if (withRefresh) {
        const refresh = `doau${randomBytes(32).toString('base64url')}`;
        secrets.add(refresh);
        refreshTokens.set(refresh, {
          clientId: client.id,
          scope,
          expiresAt: Date.now() + (options.refreshTokenLifetimeSeconds ?? 30 * 86400) * 1000,
          used: false,
          revoked: false,
        });
        json['refresh_token'] = refresh;
      }
      send(res, 200, json);
    };
    const invalidGrant = (description: string) => {
      counts.invalid_grant++;
      send(res, 400, { error: 'invalid_grant', error_description: description });
    };

    switch (grant) {
      case 'client_credentials': {
        counts.client_credentials++;
        if (!client.confidential) {
          refuseClient(res);
          return;
        }
        const scope = body.get('scope') ?? '';
        if (!scope.split(' ').includes('all-apis')) {
          send(res, 400, { error: 'invalid_scope', error_description: 'scope all-apis is required' });
          return;
        }
        await answer(client.id, scope, false);
        return;
      }
      case 'authorization_code': {
        counts.authorization_code++;
        const code = codes.get(body.get('code') ?? '');
        const verifier = body.get('code_verifier') ?? '';
        if (verifier) secrets.add(verifier);
        if (!code || code.used || code.expiresAt < Date.now() || code.clientId !== client.id) {
          invalidGrant('Authorization code is invalid');
          return;
        }
        code.used = true;
        if (code.redirectUri !== body.get('redirect_uri')) {
          invalidGrant('redirect_uri does not match the authorization request');
          return;
        }
        if (createHash('sha256').update(verifier).digest('base64url') !== code.challenge) {
          invalidGrant('PKCE verification failed');
          return;
        }
        await answer(userName, code.scope, code.scope.split(' ').includes('offline_access'));
        return;
      }
      case 'refresh_token': {
        counts.refresh_token++;
        const presented = body.get('refresh_token') ?? '';
        const record = refreshTokens.get(presented);
        if (!record || record.clientId !== client.id) {
          invalidGrant('Refresh token is invalid');
          return;
        }
        if (record.used) {
          counts.refreshTokenReuse++;
          invalidGrant('Refresh token is invalid');
          return;
        }
        if (record.revoked || record.expiresAt < Date.now()) {
          invalidGrant('Refresh token is invalid');
          return;
        }
        record.used = true;
        await answer(userName, record.scope, true);
        return;
      }
      default:
        send(res, 400, { error: 'unsupported_grant_type', error_description: `grant_type ${grant ?? '(none)'} is not supported` });
    }
  }

  /**
   * A failed client authentication, as Databricks answers it: 401 with a WWW-Authenticate
   * challenge (RFC 6749 5.2: the scheme the client used) and the OAuth error in a JSON body.
   * openid-client stops at the header ("server responded with a challenge in the WWW-Authenticate
   * HTTP Header"); the body says what went wrong.
   */
  function refuseClient(res: ServerResponse): void {
    counts.invalid_client++;
    send(res, 401, { error: 'invalid_client', error_description: 'Client authentication failed' }, { 'www-authenticate': 'Basic realm="oidc"' });
  }

  /** The authenticated client, or undefined for a failed authentication. */
  function authenticate(header: string | undefined, body: URLSearchParams): { id: string; confidential: boolean } | undefined {
    if (header?.startsWith('Basic ')) {
      const decoded = Buffer.from(header.slice(6), 'base64').toString('utf8');
      const colon = decoded.indexOf(':');
      if (colon < 0) return undefined;
      // RFC 6749 2.3.1: both parts are form-urlencoded before Base64.
      const id = formDecode(decoded.slice(0, colon));
      const secret = formDecode(decoded.slice(colon + 1));
      return id === clientId && safeEqual(secret, clientSecret) ? { id, confidential: true } : undefined;
    }
    const id = body.get('client_id') ?? '';
    const secret = body.get('client_secret');
    if (secret !== null) return id === clientId && safeEqual(secret, clientSecret) ? { id, confidential: true } : undefined;
    return publicClients.has(id) ? { id, confidential: false } : undefined;
  }

  /** Whose valid workspace token (or personal access token) the request carries; undefined when none. */
  function bearerSubject(req: IncomingMessage): string | undefined {
    const bearer = req.headers.authorization?.startsWith('Bearer ') ? req.headers.authorization.slice(7) : '';
    if (bearer === personalAccessToken) return userName;
    const expiry = accessTokens.get(bearer);
    return expiry === undefined || expiry <= Date.now() ? undefined : subjectOf(bearer);
  }

  async function credentialEndpoint(req: IncomingMessage, path: string, text: string, res: ServerResponse, fault: Fault | undefined): Promise<void> {
    const database = path === '/api/2.0/database/credentials';
    if (database) counts.database_credentials++;
    else counts.postgres_credentials++;
    const subject = bearerSubject(req);
    if (subject === undefined) {
      send(res, 401, { error_code: 'UNAUTHENTICATED', message: 'Invalid access token.' });
      return;
    }
    let body: Record<string, unknown>;
    try {
      body = JSON.parse(text) as Record<string, unknown>;
    } catch {
      send(res, 400, { error_code: 'MALFORMED_REQUEST', message: 'Invalid JSON' });
      return;
    }
    lastCredentialRequest.set(path, body);
    if (database) {
      const names = body['instance_names'];
      if (typeof body['request_id'] !== 'string' || !Array.isArray(names) || names.length === 0 || !names.every((n) => typeof n === 'string')) {
        send(res, 400, { error_code: 'INVALID_PARAMETER_VALUE', message: 'request_id and instance_names are required' });
        return;
      }
      const unknown = names.find((n) => options.instances !== undefined && !options.instances.includes(n as string));
      if (unknown !== undefined) {
        send(res, 404, { error_code: 'RESOURCE_DOES_NOT_EXIST', message: `Database instance '${String(unknown)}' does not exist.` });
        return;
      }
      const { token, expiresAt } = await issue('database', subject, 'database', standin.databaseTokenLifetimeSeconds, fault?.kind === 'no-expires-in');
      send(res, 200, fault?.kind === 'no-expires-in' ? { token } : { token, expiration_time: expiresAt.toISOString() });
      return;
    }
    const endpoint = body['endpoint'];
    if (typeof endpoint !== 'string' || !/^projects\/[^/]+\/branches\/[^/]+\/endpoints\/[^/]+$/.test(endpoint)) {
      send(res, 400, { error_code: 'INVALID_PARAMETER_VALUE', message: 'endpoint must be projects/<p>/branches/<b>/endpoints/<e>' });
      return;
    }
    const { token, expiresAt } = await issue('database', subject, 'database', standin.databaseTokenLifetimeSeconds, fault?.kind === 'no-expires-in');
    send(res, 200, fault?.kind === 'no-expires-in' ? { token } : { token, expire_time: expiresAt.toISOString() });
  }

  const server: Server = createServer({ cert: ca.serverCertPem, key: ca.serverKeyPem }, (req, res) => {
    handle(req, res).catch((err: unknown) => {
      if (!res.headersSent) send(res, 500, { error: 'server_error', error_description: String(err) });
      else res.destroy();
    });
  });
  server.on('connection', (socket: Socket) => {
    sockets.add(socket);
    socket.once('close', () => sockets.delete(socket));
  });
  server.on('tlsClientError', () => undefined);

  const listen = (port: number) =>
    new Promise<number>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, options.host ?? '127.0.0.1', () => {
        server.off('error', reject);
        resolve((server.address() as AddressInfo).port);
      });
    });
  const stopListening = () =>
    new Promise<void>((resolve) => {
      for (const timer of timers) clearTimeout(timer);
      timers.clear();
      server.close(() => resolve());
      for (const socket of sockets) socket.destroy();
    });

  const port = await listen(options.port ?? 0);
  origin = options.publicUrl?.replace(/\/$/, '') ?? `https://localhost:${port}`;
  let isUp = true;

  const result: DatabricksStandin = {
    url: origin,
    port,
    clientId,
    clientSecret,
    userName,
    personalAccessToken,
    get tokenLifetimeSeconds() {
      return standin.tokenLifetimeSeconds;
    },
    set tokenLifetimeSeconds(value: number) {
      standin.tokenLifetimeSeconds = value;
    },
    get databaseTokenLifetimeSeconds() {
      return standin.databaseTokenLifetimeSeconds;
    },
    set databaseTokenLifetimeSeconds(value: number) {
      standin.databaseTokenLifetimeSeconds = value;
    },
    counts,
    lastCredentialRequest,
    secrets: () => [clientSecret, ...secrets],
    fault(fault) {
      current = fault === undefined ? undefined : { ...fault, remaining: fault.times ?? Infinity };
    },
    expireRefreshTokens() {
      for (const record of refreshTokens.values()) record.revoked = true;
    },
    revokeAccessTokens() {
      accessTokens.clear();
    },
    resetCounts() {
      Object.assign(counts, zeroCounts());
    },
    setInstance(name, instance) {
      if (instance) instances.set(name, { ...instance });
      else instances.delete(name);
    },
    setEndpoint(name, endpoint) {
      if (endpoint) endpoints.set(name, { ...endpoint });
      else endpoints.delete(name);
    },
    async reset() {
      await result.up();
      result.fault(undefined);
      standin.tokenLifetimeSeconds = options.tokenLifetimeSeconds ?? 3600;
      standin.databaseTokenLifetimeSeconds = options.databaseTokenLifetimeSeconds ?? 3600;
      result.resetCounts();
    },
    async authorize(authorizeUrl) {
      const response = await fetch(authorizeUrl, { redirect: 'manual' });
      const location = response.headers.get('location');
      await response.body?.cancel();
      if (response.status !== 302 || !location) throw new Error(`authorize answered ${response.status} without a redirect`);
      return new URL(location);
    },
    async completeLogin(authorizeUrl) {
      const callback = await result.authorize(authorizeUrl);
      const response = await fetch(callback, { redirect: 'manual' });
      return { status: response.status, callbackUrl: callback.href, body: await response.text() };
    },
    async down() {
      if (!isUp) return;
      isUp = false;
      await stopListening();
    },
    async up() {
      if (isUp) return;
      await listen(port);
      isUp = true;
    },
    async close() {
      if (isUp) await stopListening();
      isUp = false;
    },
  };
  return result;
}

function zeroCounts(): StandinCounts {
  return {
    discovery: 0,
    authorize: 0,
    tokenRequests: 0,
    client_credentials: 0,
    authorization_code: 0,
    refresh_token: 0,
    invalid_client: 0,
    invalid_grant: 0,
    refreshTokenReuse: 0,
    database_credentials: 0,
    postgres_credentials: 0,
    instance_lookups: 0,
    endpoint_lookups: 0,
  };
}

/** A DatabaseInstance with the fields of Databricks' API reference. */
function instanceResource(name: string, instance: StandinInstance): Record<string, unknown> {
  const stopped = instance.state === 'STOPPED';
  return {
    name,
    uid: uuidFor(name),
    creator: 'token.user@example.com',
    creation_time: '2025-06-01T10:00:00Z',
    state: instance.state,
    capacity: 'CU_1',
    pg_version: 'PG_VERSION_16',
    read_write_dns: instance.read_write_dns,
    ...(instance.read_only_dns === undefined ? {} : { read_only_dns: instance.read_only_dns }),
    effective_capacity: 'CU_1',
    effective_stopped: stopped,
    effective_enable_readable_secondaries: instance.read_only_dns !== undefined,
    effective_node_count: instance.read_only_dns === undefined ? 1 : 2,
  };
}

/** An Endpoint of the postgres API with the fields of Databricks' API reference. */
function endpointResource(name: string, endpoint: StandinEndpoint): Record<string, unknown> {
  const type = endpoint.endpoint_type ?? 'ENDPOINT_TYPE_READ_WRITE';
  const limits = { autoscaling_limit_min_cu: 0.5, autoscaling_limit_max_cu: 2 };
  return {
    name,
    uid: uuidFor(name),
    parent: name.split('/endpoints/')[0],
    create_time: '2025-06-01T10:00:00Z',
    update_time: '2025-06-01T10:00:00Z',
    endpoint_id: name.split('/').pop(),
    spec: { endpoint_type: type, ...limits, suspend_timeout_duration: '300s', disabled: endpoint.disabled ?? false },
    status: {
      endpoint_type: type,
      hosts: { host: endpoint.host, ...(endpoint.read_only_host === undefined ? {} : { read_only_host: endpoint.read_only_host }) },
      current_state: endpoint.current_state,
      last_active_time: new Date().toISOString(),
      ...limits,
      suspend_timeout_duration: '300s',
      disabled: endpoint.disabled ?? false,
      endpoint_id: name.split('/').pop(),
    },
  };
}

function uuidFor(name: string): string {
  const hex = createHash('sha256').update(name).digest('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20, 32)}`;
}

/** A token shaped like Databricks': a JWT of about 1,000 bytes (the signature is random, not checked). */
function fakeJwt(origin: string, subject: string, scope: string, kind: TokenKind, now: number, expiresAt: Date): string {
  const header = { alg: 'RS256', kid: 'standin-key', typ: kind === 'workspace' ? 'at+jwt' : 'JWT' };
  const claims = {
    iss: `${origin}/oidc`,
    aud: kind === 'workspace' ? origin : 'lakebase',
    sub: subject,
    scope,
    iat: Math.floor(now / 1000),
    // Rounded up: the JWT claim may not end before the expires_in the answer states.
    exp: Math.ceil(expiresAt.getTime() / 1000),
    jti: randomUUID(),
    client_id: subject,
    ctx: randomBytes(180).toString('base64url'),
  };
  const encode = (value: object) => Buffer.from(JSON.stringify(value)).toString('base64url');
  return `${encode(header)}.${encode(claims)}.${randomBytes(256).toString('base64url')}`;
}

function subjectOf(token: string): string {
  try {
    const claims = JSON.parse(Buffer.from(token.split('.')[1] ?? '', 'base64url').toString('utf8')) as { sub?: unknown };
    return typeof claims.sub === 'string' ? claims.sub : 'unknown';
  } catch {
    return 'unknown';
  }
}

function formDecode(value: string): string {
  return decodeURIComponent(value.replace(/\+/g, ' '));
}

function safeEqual(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function send(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  if (res.destroyed) return;
  const text = JSON.stringify(body);
  res.writeHead(status, { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store' });
  res.end(text);
}

/**
 * Runs a stand-in until SIGINT/SIGTERM, printing one JSON line with what a proxy needs to reach it
 * (for `npm run demo`). The process must trust the test CA (NODE_EXTRA_CA_CERTS) for clients in it.
 */
export async function runStandalone(options: StandinOptions = {}, out: NodeJS.WritableStream = process.stdout): Promise<void> {
  const standin = await startDatabricksStandin(options);
  const ca = await testCA();
  out.write(
    `${JSON.stringify({
      msg: 'databricks stand-in listening',
      url: standin.url,
      clientId: standin.clientId,
      clientSecret: standin.clientSecret,
      caFile: ca.caFile,
      connection: `DatabricksInstance=${standin.url};AuthScheme=OAuthClient;OAuthClientId=${standin.clientId};OAuthClientSecret=${standin.clientSecret}`,
    })}\n`,
  );
  await new Promise<void>((resolve) => {
    process.once('SIGINT', resolve);
    process.once('SIGTERM', resolve);
  });
  await standin.close();
}

/**
 * OAuthOptions that reach `standin` as its service principal, with settings in a private
 * `memory://` location, a callback on a free port, and short timeouts; `overrides` win.
 */
export function standinOptions(standin: DatabricksStandin, overrides: Partial<OAuthOptions> = {}): OAuthOptions {
  return {
    databricksInstance: standin.url,
    authScheme: 'OAuthClient',
    initiateOAuth: 'GETANDREFRESH',
    clientId: standin.clientId,
    clientSecret: standin.clientSecret,
    accessToken: undefined,
    personalAccessToken: undefined,
    profile: undefined,
    refreshToken: undefined,
    verifier: undefined,
    callbackUrl: 'http://localhost:0',
    scope: undefined,
    settingsLocation: `memory://test-${randomUUID()}`,
    lakebaseInstance: undefined,
    lakebaseEndpoint: undefined,
    user: undefined,
    requestTimeoutMs: 2_000,
    loginTimeoutMs: 10_000,
    ...overrides,
  };
}

/** A debug-level JSON logger whose output a test can search (e.g. for secrets). */
export function captureLogger(): { logger: Logger; text(): string } {
  const chunks: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      chunks.push(chunk.toString('utf8'));
      callback();
    },
  });
  return { logger: createLogger({ level: 'debug', format: 'json', destination }), text: () => chunks.join('') };
}

/**
 * Logs in to the test Postgres as its token role with `password`, over TLS verified against the
 * test CA: 'ok', or the SQLSTATE of the refusal. This is what proves a token valid.
 */
export async function postgresLogin(db: TestPostgres, password: string): Promise<string> {
  const client = new pg.Client({
    host: 'localhost',
    port: db.port,
    user: db.tokenRole,
    password,
    database: db.database,
    ssl: { ca: db.ca.caPem, servername: 'localhost' },
    connectionTimeoutMillis: 5_000,
  });
  client.on('error', () => undefined);
  try {
    await client.connect();
    const result = await client.query<{ who: string }>('select current_user as who');
    return result.rows[0]?.who === db.tokenRole ? 'ok' : `logged in as ${String(result.rows[0]?.who)}`;
  } catch (err) {
    return (err as { code?: string }).code ?? (err as Error).message;
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** Polls `condition` every 20 ms until it holds; rejects after `timeoutMs`. */
export async function waitFor(condition: () => boolean, timeoutMs: number, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`${what} not met within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}
