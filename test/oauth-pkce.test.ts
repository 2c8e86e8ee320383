/**
 * AuthScheme=OAuthPKCE: the browser login started by the first client, refresh-token rotation,
 * InitiateOAuth=REFRESH, a given OAuthRefreshToken, an expired refresh token and OAuthVerifier.
 * The browser is played by following the authorize URL over HTTP.
 */
import { after, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { createTokenSource, LOGIN_NOTICE_PREFIX, runAuthCommand } from '../src/oauth/index.js';
import type { OAuthOptions } from '../src/oauth/options.js';
import { silentLogger } from '../src/ops/log.js';
import { TokenError, type TokenSource } from '../src/token/token-source.js';
import { postgresLogin, standinOptions, waitFor, type DatabricksStandin } from './harness/databricks-standin.js';
import { closedAfterEachTest, startStandinWithPostgres } from './harness/oauth-fixture.js';
import type { TestPostgres } from './harness/postgres.js';

let db: TestPostgres;
let standin: DatabricksStandin;
let close: () => Promise<void>;
let dir: string;
const track = closedAfterEachTest<TokenSource>();
const noNotice = { notice: () => undefined };

before(async () => ({ db, standin, dir, close } = await startStandinWithPostgres({ dirPrefix: 'lbp-oauth-pkce-' })));
after(() => close?.());

beforeEach(() => standin.reset());

let fileCount = 0;
function settingsFile(): string {
  return join(dir, `settings-${++fileCount}`, 'OAuthSettings.txt');
}

function pkce(overrides: Partial<OAuthOptions> = {}): OAuthOptions {
  return standinOptions(standin, { authScheme: 'OAuthPKCE', clientId: undefined, clientSecret: undefined, ...overrides });
}

function source(options: OAuthOptions): TokenSource {
  return track(createTokenSource(options, { logger: silentLogger }));
}

/** A client waiting for a token, with the notices it received. */
function waitingClient(s: TokenSource): { notices: string[]; token: Promise<Awaited<ReturnType<TokenSource['getToken']>>> } {
  const notices: string[] = [];
  const token = s.getToken({ notice: (m) => notices.push(m) });
  token.catch(() => undefined); // a test may look at the failure only later
  return { notices, token };
}

function loginUrl(notice: string | undefined): string {
  assert.ok(notice !== undefined && notice.startsWith(LOGIN_NOTICE_PREFIX), `a login notice, got ${String(notice)}`);
  return notice.slice(LOGIN_NOTICE_PREFIX.length);
}

/** A whole browser login through a token source, which is closed afterwards unless `keep`. */
async function loggedIn(options: OAuthOptions, keep = false): Promise<string> {
  const s = source(options);
  const client = waitingClient(s);
  await waitFor(() => client.notices.length > 0, 5_000, 'the login notice');
  assert.equal((await standin.completeLogin(loginUrl(client.notices[0]))).status, 200);
  const token = (await client.token).value;
  if (!keep) await s.close();
  return token;
}

interface Stored {
  accessToken?: string;
  refreshToken?: string;
  expiresAt?: string;
  pending?: unknown;
}

function stored(file: string): Stored {
  const json = JSON.parse(readFileSync(file, 'utf8')) as { targets: Record<string, Stored> };
  const entries = Object.values(json.targets);
  assert.equal(entries.length, 1);
  return entries[0] ?? {};
}

test('the first client starts a browser login: every waiting client gets the URL, one login serves all', async () => {
  const file = settingsFile();
  const s = source(pkce({ settingsLocation: file }));
  const clients = [waitingClient(s), waitingClient(s), waitingClient(s)];
  await waitFor(() => clients.every((c) => c.notices.length === 1), 5_000, 'a notice to every waiting client');
  const url = new URL(loginUrl(clients[0]?.notices[0]));
  assert.equal(url.pathname, '/oidc/v1/authorize');
  assert.equal(url.searchParams.get('code_challenge_method'), 'S256');
  assert.equal(url.searchParams.get('client_id'), 'databricks-cli');
  assert.equal(url.searchParams.get('scope'), 'all-apis offline_access');
  const late = waitingClient(s);
  assert.deepEqual(late.notices, clients[0]?.notices, 'a client joining later gets the URL too');

  const callback = await standin.completeLogin(url.href);
  assert.equal(callback.status, 200);
  assert.match(callback.body, /You can close this window/);
  const tokens = await Promise.all([...clients, late].map((c) => c.token));
  assert.equal(new Set(tokens.map((t) => t.value)).size, 1);
  assert.equal(await postgresLogin(db, tokens[0]!.value), 'ok');
  assert.equal(standin.counts.authorize, 1);
  assert.equal(standin.counts.authorization_code, 1);

  const saved = stored(file);
  assert.equal(saved.accessToken, tokens[0]?.value);
  assert.ok(saved.refreshToken);
  assert.equal(statSync(file).mode & 0o777, 0o600);
  assert.equal(statSync(join(file, '..')).mode & 0o777, 0o700);
});

test('a callback with another state is refused and the login goes on', async () => {
  const s = source(pkce());
  const client = waitingClient(s);
  await waitFor(() => client.notices.length > 0, 5_000, 'the login notice');
  const callback = await standin.authorize(loginUrl(client.notices[0]));
  const forged = new URL(callback);
  forged.searchParams.set('state', 'forged-state');
  assert.equal((await fetch(forged)).status, 400);
  assert.equal((await fetch(callback)).status, 200);
  assert.equal(await postgresLogin(db, (await client.token).value), 'ok');
});

test('a denied login and a login nobody completes fail the waiting client clearly', async () => {
  standin.fault({ kind: 'deny-login' });
  const denied = waitingClient(source(pkce()));
  await waitFor(() => denied.notices.length > 0, 5_000, 'the login notice');
  await standin.completeLogin(loginUrl(denied.notices[0]));
  await assert.rejects(denied.token, (err: unknown) => err instanceof TokenError && err.code === 'login_required' && /access_denied/.test(err.message));

  const started = Date.now();
  const abandoned = waitingClient(source(pkce({ loginTimeoutMs: 300 })));
  await assert.rejects(abandoned.token, (err: unknown) => err instanceof TokenError && err.code === 'login_timeout' && /auth login/.test(err.message));
  assert.ok(Date.now() - started < 5_000);
});

test('refresh tokens rotate: each refresh stores the new one, the old one is spent', async () => {
  const file = settingsFile();
  standin.tokenLifetimeSeconds = 2;
  const first = await loggedIn(pkce({ settingsLocation: file }), true);
  const firstRefresh = stored(file).refreshToken;
  await waitFor(() => stored(file).accessToken !== first, 5_000, 'a background refresh');
  const secondRefresh = stored(file).refreshToken;
  assert.ok(secondRefresh && firstRefresh && secondRefresh !== firstRefresh, 'a new refresh token was stored');
  standin.tokenLifetimeSeconds = 3600; // so that a slow machine still logs in before expiry
  await waitFor(() => Date.parse(stored(file).expiresAt ?? '') > Date.now() + 60_000, 5_000, 'another background refresh');
  assert.notEqual(stored(file).refreshToken, secondRefresh);
  assert.equal(await postgresLogin(db, stored(file).accessToken!), 'ok');

  // The spent one is refused by the workspace (what a second process must never do).
  const stderr = new PassThrough();
  const code = await runAuthCommand(['refresh', '--refresh-token', firstRefresh], pkce({ settingsLocation: `memory://other-${Date.now()}` }), {
    stdout: new PassThrough(),
    stderr,
    logger: silentLogger,
  });
  assert.equal(code, 1);
  assert.match(String(stderr.read()), /invalid_grant .*Refresh token is invalid.*auth login/);
  assert.equal(standin.counts.refreshTokenReuse, 1, 'only the deliberate reuse above');
});

test('InitiateOAuth=REFRESH refreshes from the stored refresh token and never starts a login', async () => {
  const file = settingsFile();
  standin.tokenLifetimeSeconds = 1;
  await loggedIn(pkce({ settingsLocation: file }));
  await new Promise((resolve) => setTimeout(resolve, 1_100)); // the stored access token has expired
  standin.tokenLifetimeSeconds = 3600;
  const token = await source(pkce({ settingsLocation: file, initiateOAuth: 'REFRESH' })).getToken(noNotice);
  assert.equal(await postgresLogin(db, token.value), 'ok');

  standin.resetCounts();
  const empty = waitingClient(source(pkce({ settingsLocation: settingsFile(), initiateOAuth: 'REFRESH' })));
  await assert.rejects(
    empty.token,
    (err: unknown) => err instanceof TokenError && err.code === 'login_required' && /InitiateOAuth=REFRESH found no refresh token in OAuthSettingsLocation .*OAuthSettings\.txt/.test(err.message),
  );
  assert.deepEqual(empty.notices, []);
  assert.equal(standin.counts.authorize, 0);
});

test('a given OAuthRefreshToken is used once, then the stored rotated one takes over', async () => {
  // A login somewhere else, whose refresh token is handed over.
  const elsewhere = settingsFile();
  await loggedIn(pkce({ settingsLocation: elsewhere }));
  const handedOver = stored(elsewhere).refreshToken;
  assert.ok(handedOver);

  const here = settingsFile();
  const options = pkce({ settingsLocation: here, initiateOAuth: 'REFRESH', refreshToken: handedOver });
  standin.tokenLifetimeSeconds = 1;
  const firstRun = source(options);
  await firstRun.getToken(noNotice);
  await firstRun.close();
  assert.notEqual(stored(here).refreshToken, handedOver);

  // The next start has the same connection string; the stored access token has expired. The spent
  // OAuthRefreshToken must not be sent again: the stored, rotated one is.
  await new Promise((resolve) => setTimeout(resolve, 1_100));
  standin.tokenLifetimeSeconds = 3600;
  const second = await source(options).getToken(noNotice);
  assert.equal(await postgresLogin(db, second.value), 'ok');
  assert.equal(standin.counts.refresh_token, 2);
  assert.equal(standin.counts.refreshTokenReuse, 0);
  assert.equal(standin.counts.invalid_grant, 0);
});

test('an expired refresh token fails REFRESH in plain words, and GETANDREFRESH logs in again', async () => {
  const file = settingsFile();
  standin.tokenLifetimeSeconds = 1;
  await loggedIn(pkce({ settingsLocation: file }));
  standin.expireRefreshTokens();
  await new Promise((resolve) => setTimeout(resolve, 1_100));
  standin.tokenLifetimeSeconds = 3600;

  const refused = await source(pkce({ settingsLocation: file, initiateOAuth: 'REFRESH' })).getToken(noNotice).then(
    () => assert.fail('expected invalid_grant'),
    (err: unknown) => err,
  );
  assert.ok(refused instanceof TokenError);
  assert.equal(refused.code, 'invalid_grant');
  assert.match(refused.message, /^invalid_grant from https:\/\/localhost:\d+\/oidc\/v1\/token \(Refresh token is invalid\): the refresh token was refused .*`lakebase-proxy auth login`$/);

  // The dead refresh token was forgotten, so GETANDREFRESH goes straight to the browser.
  const token = await loggedIn(pkce({ settingsLocation: file }));
  assert.equal(await postgresLogin(db, token), 'ok');
});

test('a refused refresh token does not interrupt clients while the token is valid; the login comes at expiry', async () => {
  standin.tokenLifetimeSeconds = 2;
  const s = source(pkce());
  const first = waitingClient(s);
  await waitFor(() => first.notices.length > 0, 5_000, 'the login notice');
  await standin.completeLogin(loginUrl(first.notices[0]));
  const token = await first.token;
  standin.expireRefreshTokens();
  await waitFor(() => standin.counts.invalid_grant >= 1, 5_000, 'the refused background refresh');
  const during = waitingClient(s);
  assert.equal((await during.token).value, token.value);
  assert.deepEqual(during.notices, [], 'no login while the token is valid');

  await new Promise((resolve) => setTimeout(resolve, Math.max(0, token.expiresAt!.getTime() - Date.now())));
  standin.tokenLifetimeSeconds = 3600;
  const after = waitingClient(s);
  await waitFor(() => after.notices.length > 0, 5_000, 'a new login notice');
  await standin.completeLogin(loginUrl(after.notices[0]));
  assert.equal(await postgresLogin(db, (await after.token).value), 'ok');
});

test('OAuthVerifier: a code from a login begun by `auth url` is exchanged once, then the stored tokens serve', async () => {
  const file = settingsFile();
  const stdout = new PassThrough();
  const options = pkce({ settingsLocation: file, callbackUrl: 'http://localhost:8020' });
  assert.equal(await runAuthCommand(['url'], options, { stdout, stderr: new PassThrough(), logger: silentLogger }), 0);
  const printed = JSON.parse(String(stdout.read())) as { url: string; state: string; callbackUrl: string };
  assert.equal(printed.callbackUrl, 'http://localhost:8020');
  // Signed in on another device: the browser lands on http://localhost:8020/?code=... (nobody listens there).
  const callback = await standin.authorize(printed.url);
  assert.equal(callback.searchParams.get('state'), printed.state);
  const code = callback.searchParams.get('code');
  assert.ok(code);

  const headless = pkce({ settingsLocation: file, initiateOAuth: 'REFRESH', verifier: code });
  const token = await source(headless).getToken(noNotice);
  assert.equal(await postgresLogin(db, token.value), 'ok');
  assert.equal(stored(file).pending, undefined);
  const again = await source(headless).getToken(noNotice);
  assert.equal(again.value, token.value);
  assert.equal(standin.counts.authorization_code, 1, 'the code is not spent twice');
});
