/**
 * The seed's three procedures as CALLs on the console, against the Databricks stand-in: a person
 * on a headless host with only psql begins a PKCE login (GetOAuthAuthorizationUrl), signs in on
 * another device, hands over the callback (GetOAuthAccessToken), and clients then log in with
 * the stored token; RefreshOAuthAccessToken rotates it. Tokens are stored as `auth exchange`
 * stores them, shown only with print_tokens => true, and never logged; SHOW TOKENS tells where
 * they came from without showing one.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import pg from 'pg';
import { postgresLogin, type DatabricksStandin } from './harness/databricks-standin.js';
import { startStandinWithPostgres } from './harness/oauth-fixture.js';
import type { TestPostgres } from './harness/postgres.js';
import { proxyClient } from './harness/proxy.js';
import { consoleClient, consoleQuery, psql, psqlConsole, startRuntime, type ConsoleAddress, type RunningRuntime } from './harness/console.js';
import { cleanEnvironment } from './reliability-support.js';

let db: TestPostgres;
let standin: DatabricksStandin;
let dir: string;
let close: () => Promise<void>;
let proxy: RunningRuntime;
let admin: ConsoleAddress;
let settingsFile: string;

before(async () => {
  cleanEnvironment();
  ({ db, standin, dir, close } = await startStandinWithPostgres({ dirPrefix: 'lbp-console-oauth-' }));
  settingsFile = join(dir, 'settings', 'OAuthSettings.txt');
  const config = join(dir, 'proxy.yaml');
  writeFileSync(
    config,
    [
      'Server: localhost',
      `Port: ${db.port}`,
      `SSLRootCert: ${db.ca.caFile}`,
      `Database: ${db.database}`,
      `User: "${db.tokenRole}"`,
      `UnixSocket: ${dir}`,
      'ListenPort: 0',
      'targets:',
      '  - name: person',
      `    DatabricksInstance: ${standin.url}`,
      '    AuthScheme: OAuthPKCE',
      `    OAuthSettingsLocation: ${settingsFile}`,
      '    CallbackURL: http://localhost:8020',
      '  - name: fixed',
      '    Password: not-used-here',
    ].join('\n'),
  );
  proxy = await startRuntime(['--config', config]);
  admin = { host: dir, port: proxy.port('person') };
});

after(async () => {
  await proxy?.close();
  await close?.();
});

/** One CALL on the console: psql where installed (what a person types), else node-postgres. Its row, or its error. */
async function call(sql: string): Promise<{ row?: Record<string, string | null>; error?: { code: string; message: string } }> {
  if (psql) {
    const ran = await psqlConsole(admin, sql);
    if (ran.code !== 0) {
      const match = /ERROR: {2}([0-9A-Z]{5}): (.*)/.exec(ran.stderr);
      return { error: { code: match?.[1] ?? '?', message: match?.[2] ?? ran.stderr } };
    }
    const [header = '', values = ''] = ran.stdout.split('\n');
    const names = header.split('|');
    const cells = values.split('|');
    return { row: Object.fromEntries(names.map((name, i) => [name, cells[i] === '' ? null : (cells[i] ?? null)])) };
  }
  const client = consoleClient(admin);
  await client.connect();
  try {
    const result = await client.query(sql);
    const row = result.rows[0] as Record<string, unknown>;
    return { row: Object.fromEntries(Object.entries(row).map(([k, v]) => [k, v === null ? null : String(v)])) };
  } catch (error) {
    return { error: { code: (error as pg.DatabaseError).code ?? '?', message: (error as Error).message } };
  } finally {
    await client.end();
  }
}

interface Stored {
  accessToken?: string;
  refreshToken?: string;
  pending?: { state: string };
}

function stored(): Stored {
  const entries = Object.values((JSON.parse(readFileSync(settingsFile, 'utf8')) as { targets: Record<string, Stored> }).targets);
  assert.equal(entries.length, 1);
  return entries[0] ?? {};
}

test('a headless PKCE login done entirely with CALLs; clients then log in with the stored token', async () => {
  const several = await call("CALL GetOAuthAuthorizationUrl(callback_url => 'http://localhost:8020')");
  assert.equal(several.error?.code, '22023');
  assert.match(several.error?.message ?? '', /the proxy runs 2 targets \(person, fixed\): name one with target => '\.\.\.'/);

  const begun = await call("CALL GetOAuthAuthorizationUrl(callback_url => 'http://localhost:8020', target => 'person')");
  assert.equal(begun.error, undefined, begun.error?.message);
  const url = new URL(begun.row?.['URL'] ?? '');
  assert.equal(url.pathname, '/oidc/v1/authorize');
  assert.equal(url.searchParams.get('code_challenge_method'), 'S256');
  assert.equal(url.searchParams.get('redirect_uri'), 'http://localhost:8020');
  assert.equal(begun.row?.['settings_location'], settingsFile);
  assert.equal(stored().pending?.state, begun.row?.['state'], 'the PKCE verifier and state are kept in the settings file, as `auth url` keeps them');

  // The person signs in on another device; the browser lands on the callback URL, which nothing serves here.
  const callback = await standin.authorize(url.href);
  const obtained = await call(`CALL GetOAuthAccessToken(verifier => '${callback.href}', target => 'person')`);
  assert.equal(obtained.error, undefined, obtained.error?.message);
  assert.equal(obtained.row?.['OAuthAccessToken'], null, 'no token shown without print_tokens');
  assert.equal(obtained.row?.['OAuthRefreshToken'], null);
  assert.ok(Number(obtained.row?.['ExpiresIn']) > 3000, `ExpiresIn ${String(obtained.row?.['ExpiresIn'])}`);
  assert.equal(obtained.row?.['stored'], 'true');
  assert.equal(obtained.row?.['has_refresh_token'], 'true');
  const saved = stored();
  assert.ok(saved.accessToken && saved.refreshToken);
  assert.equal(saved.pending, undefined);

  // The same code again: what `auth exchange` says, in the console's words.
  const again = await call(`CALL GetOAuthAccessToken(verifier => '${callback.searchParams.get('code') ?? ''}', target => 'person')`);
  assert.equal(again.error?.code, '28000');
  assert.match(again.error?.message ?? '', /holds no login begun by CALL GetOAuthAuthorizationUrl\(\)/);

  // A client of the target logs in with the stored token: no browser login, no notice.
  const client = proxyClient(proxy.port('person'), db, { user: 'someone' });
  const notices: string[] = [];
  client.on('notice', (n) => notices.push(n.message ?? ''));
  await client.connect();
  assert.equal((await client.query('select current_user as u')).rows[0].u, db.tokenRole);
  await client.end();
  assert.deepEqual(notices, []);
  assert.equal(standin.counts.authorize, 1, 'only the sign-in on the other device');
  assert.equal(standin.counts.authorization_code, 1);

  const tokens = (await consoleQuery(admin, 'SHOW TOKENS')).rows.find((r) => r['target'] === 'person');
  assert.equal(tokens?.['source'], 'PKCE');
  assert.equal(tokens?.['identity'], db.tokenRole);
  assert.equal(tokens?.['settings_location'], settingsFile);
  assert.equal(tokens?.['last_refresh_result'], 'success');
  assert.ok(Number(tokens?.['expires_in']) > 3000);
  assert.equal((await consoleQuery(admin, 'SHOW TOKENS')).rows.find((r) => r['target'] === 'fixed')?.['source'], 'password');
});

test('RefreshOAuthAccessToken rotates the stored refresh token; print_tokens => true shows the new tokens', async () => {
  const before = stored().refreshToken;
  const refreshed = await call("CALL RefreshOAuthAccessToken(target => 'person', print_tokens => true)");
  assert.equal(refreshed.error, undefined, refreshed.error?.message);
  const access = refreshed.row?.['OAuthAccessToken'] ?? '';
  const refresh = refreshed.row?.['OAuthRefreshToken'] ?? '';
  assert.ok(access.length > 100 && refresh.length > 0);
  assert.notEqual(refresh, before);
  assert.equal(stored().refreshToken, refresh, 'stored as `auth refresh` stores it');
  assert.equal(stored().accessToken, access);
  assert.equal(await postgresLogin(db, access), 'ok');
  assert.equal(standin.counts.refreshTokenReuse, 0);

  const badArgument = await call("CALL RefreshOAuthAccessToken(target => 'person', refresh_token => 'not-a-token-of-the-workspace')");
  assert.equal(badArgument.error?.code, '28000');
  assert.match(badArgument.error?.message ?? '', /invalid_grant/);
  const unknown = await call("CALL RefreshOAuthAccessToken(target => 'person', token => 'x')");
  assert.equal(unknown.error?.code, '42883');
  assert.match(unknown.error?.message ?? '', /has no argument "token"; it takes refresh_token, OAuthRefreshToken, print_tokens, target/);
});

test('no token, refresh token, code or PKCE verifier reaches the log or a SHOW', async () => {
  const shown = JSON.stringify([(await consoleQuery(admin, 'SHOW TOKENS')).rows, (await consoleQuery(admin, 'SHOW CONFIG')).rows, (await consoleQuery(admin, 'SHOW TARGETS')).rows]);
  const log = proxy.logText();
  const secrets = standin.secrets();
  assert.ok(secrets.length >= 5);
  for (const secret of secrets) {
    assert.ok(!log.includes(secret), 'a secret in the log');
    assert.ok(!shown.includes(secret), 'a secret in a SHOW');
  }
  const exchange = proxy.logs.find((l) => l['command'] === 'CALL GetOAuthAccessToken' && l['msg'] === 'console command');
  assert.deepEqual(exchange?.['arguments'], { verifier: '[redacted]', target: 'person' });
  assert.equal(exchange?.['user'], 'admin');
  assert.equal(exchange?.['peer'], 'unix socket');
});
