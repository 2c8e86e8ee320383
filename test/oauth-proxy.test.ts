/**
 * OAuth end to end through the real proxy with the pg client: in this process (with the token
 * source handed in) and as the real program (`bin/lakebase-proxy.js --connection ...`).
 */
import { after, afterEach, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import pg from 'pg';
import { createTokenSource, LOGIN_NOTICE_PREFIX } from '../src/oauth/index.js';
import type { OAuthOptions } from '../src/oauth/options.js';
import { silentLogger } from '../src/ops/log.js';
import type { TokenSource } from '../src/token/token-source.js';
import { standinOptions, waitFor, type DatabricksStandin } from './harness/databricks-standin.js';
import { startStandinWithPostgres } from './harness/oauth-fixture.js';
import type { TestPostgres } from './harness/postgres.js';
import { proxyClient, startProxy, startProxyProcess, type InProcessProxy, type ProxyProcess } from './harness/proxy.js';
import { findTool, run } from './harness/tools.js';

const psql = findTool('psql');

let db: TestPostgres;
let standin: DatabricksStandin;
let close: () => Promise<void>;
let dir: string;
const running: Array<InProcessProxy | ProxyProcess> = [];

before(async () => ({ db, standin, dir, close } = await startStandinWithPostgres({ dirPrefix: 'lbp-oauth-proxy-' })));
after(() => close?.());

afterEach(async () => {
  await Promise.all(running.splice(0).map((p) => ('close' in p ? p.close() : p.stop())));
});

beforeEach(() => standin.reset());

/** Upstream settings only: the token source is handed to the proxy. */
function upstream(): string {
  return `Server=localhost;Port=${db.port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};Database=${db.database}`;
}

async function proxyWith(options: OAuthOptions): Promise<InProcessProxy & { tokenSource: TokenSource }> {
  const tokenSource = createTokenSource(options, { logger: silentLogger });
  const proxy = await startProxy(['--connection', upstream(), '--no-http'], { tokenSource });
  running.push(proxy);
  return Object.assign(proxy, { tokenSource });
}

function client(port: number): pg.Client {
  return proxyClient(port, db, { connectionTimeoutMillis: 10_000 });
}

async function whoAmI(port: number): Promise<string> {
  const c = client(port);
  await c.connect();
  try {
    return (await c.query<{ who: string }>('select current_user as who')).rows[0]?.who ?? '';
  } finally {
    await c.end();
  }
}

test('OAuthClient: 50 clients connecting at once through the proxy make one token request', async () => {
  const proxy = await proxyWith(standinOptions(standin));
  const who = await Promise.all(Array.from({ length: 50 }, () => whoAmI(proxy.port)));
  assert.ok(who.every((w) => w === db.tokenRole));
  assert.equal(standin.counts.tokenRequests, 1);
});

test('an open session is not touched by a refresh; new sessions use the new token', async () => {
  standin.tokenLifetimeSeconds = 2;
  const proxy = await proxyWith(standinOptions(standin));
  const open = client(proxy.port);
  await open.connect();
  await waitFor(() => standin.counts.client_credentials >= 3, 5_000, 'two refreshes');
  standin.tokenLifetimeSeconds = 3600; // the next refresh gives a token a slow machine can still use
  await waitFor(() => (proxy.tokenSource.currentExpiry()?.getTime() ?? 0) > Date.now() + 60_000, 5_000, 'a long-lived token');
  assert.equal((await open.query('select 1 as one')).rows[0].one, 1);
  assert.equal(await whoAmI(proxy.port), db.tokenRole);
  await open.end();
});

test('OAuthPKCE: psql-like client gets the login URL as a notice and its session goes on after the login', async () => {
  const proxy = await proxyWith(standinOptions(standin, { authScheme: 'OAuthPKCE', clientId: undefined, clientSecret: undefined }));
  const c = client(proxy.port);
  const notices: string[] = [];
  c.on('notice', (msg) => notices.push(msg.message ?? ''));
  const connected = c.connect();
  await waitFor(() => notices.length > 0, 5_000, 'the notice');
  const notice = notices[0] ?? '';
  assert.ok(notice.startsWith(LOGIN_NOTICE_PREFIX), notice);
  assert.equal((await standin.completeLogin(notice.slice(LOGIN_NOTICE_PREFIX.length))).status, 200);
  await connected;
  assert.equal((await c.query<{ who: string }>('select current_user as who')).rows[0]?.who, db.tokenRole);
  await c.end();
});

test('OAuth failures reach the client as ErrorResponses (28000, 08006) and the proxy keeps running', async () => {
  const wrong = await proxyWith(standinOptions(standin, { clientSecret: 'not-the-secret' }));
  await assert.rejects(whoAmI(wrong.port), (err: { code?: string; message?: string }) => {
    assert.equal(err.code, '28000');
    assert.match(err.message ?? '', /invalid_client from https:\/\/localhost:\d+\/oidc\/v1\/token \(Client authentication failed\): check OAuthClientSecret and OAuthClientId/);
    assert.doesNotMatch(err.message ?? '', /not-the-secret/);
    return true;
  });
  const proxy = await proxyWith(standinOptions(standin, { requestTimeoutMs: 500 }));
  await standin.down();
  await assert.rejects(whoAmI(proxy.port), (err: { code?: string }) => err.code === '08006');
  await standin.up();
  assert.equal(await whoAmI(proxy.port), db.tokenRole);
});

function connection(extra: string): string {
  return `${upstream()};DatabricksInstance=${standin.url};OAuthClientId=${standin.clientId};${extra}`;
}

test('the real program: AuthScheme=OAuthClient from --connection, no secret in its output', async () => {
  const proxy = await startProxyProcess([
    '--connection',
    connection(`AuthScheme=OAuthClient;OAuthClientSecret=${standin.clientSecret};OAuthSettingsLocation=memory://`),
    '--no-http',
  ]);
  running.push(proxy);
  assert.equal(await whoAmI(proxy.port), db.tokenRole);
  assert.equal(await whoAmI(proxy.port), db.tokenRole);
  assert.equal(standin.counts.client_credentials, 1);
  assert.ok(!proxy.output().includes(standin.clientSecret));
  assert.doesNotMatch(proxy.output(), /eyJ[\w-]{20,}\.[\w-]{20,}/, 'no token in the log');
});

test('the real program, wrong client secret: psql and pg see the OAuth error, its description and where the secret came from; no secret', async () => {
  const wrong = `dose-wrong-${'y'.repeat(24)}`;
  const proxy = await startProxyProcess(
    ['--connection', connection('AuthScheme=OAuthClient;OAuthSettingsLocation=memory://'), '--no-http'],
    { LAKEBASE_PROXY_OAUTH_CLIENT_SECRET: wrong },
  );
  running.push(proxy);
  const expected = /invalid_client from https:\/\/localhost:\d+\/oidc\/v1\/token \(Client authentication failed\): check OAuthClientSecret \(from environment \(LAKEBASE_PROXY_\*\)\) and OAuthClientId \(from --connection\)/;
  await assert.rejects(whoAmI(proxy.port), (err: { code?: string; message?: string }) => {
    assert.equal(err.code, '28000');
    assert.match(err.message ?? '', expected);
    assert.doesNotMatch(err.message ?? '', /WWW-Authenticate|challenge/);
    assert.ok(!(err.message ?? '').includes(wrong));
    return true;
  });
  if (psql) {
    const ran = await run(psql, ['-X', '-c', 'select 1', `host=127.0.0.1 port=${proxy.port} user=anyone dbname=${db.database} connect_timeout=10`], {
      env: { PGPASSWORD: '', PGSSLMODE: 'disable' },
    });
    assert.equal(ran.code, 2, ran.stderr);
    assert.match(ran.stderr, expected);
    assert.ok(!ran.stderr.includes(wrong));
  }
  assert.ok(standin.counts.invalid_client >= 1);
  assert.ok(!proxy.output().includes(wrong), 'no secret in the log');
});

test('two proxy processes sharing one settings file never spend a refresh token twice', async () => {
  const file = join(dir, 'shared', 'OAuthSettings.txt');
  // Sign in once (as `auth login` would) so the file holds a refresh token.
  standin.tokenLifetimeSeconds = 2;
  const signIn = createTokenSource(standinOptions(standin, { authScheme: 'OAuthPKCE', clientId: undefined, clientSecret: undefined, settingsLocation: file }), {
    logger: silentLogger,
  });
  const notices: string[] = [];
  const first = signIn.getToken({ notice: (m) => notices.push(m) });
  await waitFor(() => notices.length > 0, 5_000, 'the login notice');
  await standin.completeLogin(notices[0]!.slice(LOGIN_NOTICE_PREFIX.length));
  await first;
  await signIn.close();
  standin.resetCounts();

  const args = ['--connection', `${upstream()};DatabricksInstance=${standin.url};AuthScheme=OAuthPKCE;InitiateOAuth=REFRESH;OAuthSettingsLocation=${file}`, '--no-http'];
  const proxies = await Promise.all([startProxyProcess(args), startProxyProcess(args)]);
  running.push(...proxies);
  // The test Postgres takes only the newest token as the role's password, while Lakebase takes
  // any valid one: in the few milliseconds between one proxy's refresh and the other's adopting
  // the new token from the file, a login through the other may be refused. One retry covers it.
  const login = async (port: number) => {
    try {
      return await whoAmI(port);
    } catch (err) {
      if ((err as { code?: string }).code !== '28P01') throw err;
      await new Promise((resolve) => setTimeout(resolve, 100));
      return whoAmI(port);
    }
  };
  const deadline = Date.now() + 3_000;
  while (Date.now() < deadline) {
    const who = await Promise.all(proxies.map((p) => login(p.port)));
    assert.deepEqual(who, [db.tokenRole, db.tokenRole]);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  assert.ok(standin.counts.refresh_token >= 2, `refreshed ${standin.counts.refresh_token} times`);
  assert.equal(standin.counts.refreshTokenReuse, 0);
  assert.equal(standin.counts.invalid_grant, 0);
});
