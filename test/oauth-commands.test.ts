/** `lakebase-proxy auth login|url|exchange|refresh|token`, run in-process against the stand-in. */
import { after, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { AUTH_HELP, LOGIN_NOTICE_PREFIX, runAuthCommand } from '../src/oauth/index.js';
import type { OAuthOptions } from '../src/oauth/options.js';
import { postgresLogin, standinOptions, waitFor, captureLogger, type DatabricksStandin } from './harness/databricks-standin.js';
import { startStandinWithPostgres } from './harness/oauth-fixture.js';
import type { TestPostgres } from './harness/postgres.js';

let db: TestPostgres;
let standin: DatabricksStandin;
let close: () => Promise<void>;
let dir: string;

before(async () => {
  process.env['LAKEBASE_PROXY_NO_BROWSER'] = '1';
  ({ db, standin, dir, close } = await startStandinWithPostgres({ instances: ['my-instance'], databaseCredentialsOnly: true, dirPrefix: 'lbp-oauth-commands-' }));
});

after(() => close?.());

beforeEach(() => standin.reset());

let count = 0;
function pkce(overrides: Partial<OAuthOptions> = {}): OAuthOptions {
  return standinOptions(standin, {
    authScheme: 'OAuthPKCE',
    clientId: undefined,
    clientSecret: undefined,
    settingsLocation: join(dir, `case-${++count}`, 'OAuthSettings.txt'),
    ...overrides,
  });
}

interface Run {
  code: Promise<number>;
  stdout(): string;
  stderr(): string;
  log(): string;
}

function run(args: string[], options: OAuthOptions): Run {
  const out: string[] = [];
  const err: string[] = [];
  const stdout = new PassThrough();
  const stderr = new PassThrough();
  stdout.on('data', (c: Buffer) => out.push(c.toString()));
  stderr.on('data', (c: Buffer) => err.push(c.toString()));
  const capture = captureLogger();
  return {
    code: runAuthCommand(args, options, { stdout, stderr, logger: capture.logger }),
    stdout: () => out.join(''),
    stderr: () => err.join(''),
    log: capture.text,
  };
}

async function done(args: string[], options: OAuthOptions): Promise<{ code: number; stdout: string; stderr: string; log: string }> {
  const r = run(args, options);
  const code = await r.code;
  return { code, stdout: r.stdout(), stderr: r.stderr(), log: r.log() };
}

function settings(options: OAuthOptions): Record<string, { accessToken?: string; refreshToken?: string; pending?: { state: string } }> {
  return (JSON.parse(readFileSync(options.settingsLocation!, 'utf8')) as { targets: Record<string, { accessToken?: string; refreshToken?: string; pending?: { state: string } }> }).targets;
}

test('help, and usage errors exit 2', async () => {
  const help = await done(['--help'], pkce());
  assert.equal(help.code, 0);
  assert.equal(help.stdout, AUTH_HELP);
  for (const command of ['login', 'url', 'exchange', 'refresh', 'token']) assert.match(AUTH_HELP, new RegExp(`^  ${command}`, 'm'));
  assert.equal((await done([], pkce())).code, 2);
  const unknown = await done(['bogus'], pkce());
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /unknown command "auth bogus"/);
  assert.equal((await done(['token', '--verifier', 'x'], pkce())).code, 2);
  assert.equal((await done(['exchange'], pkce())).code, 2);
});

test('auth login prints the URL, receives the callback, stores the tokens; auth token then prints a valid one', async () => {
  const options = pkce();
  const login = run(['login'], options);
  await waitFor(() => login.stderr().includes('http'), 5_000, 'the printed URL');
  assert.ok(login.stderr().startsWith(`${LOGIN_NOTICE_PREFIX.trimEnd()}\n  https://`));
  const url = login.stderr().split('\n')[1]?.trim() ?? '';
  assert.equal((await standin.completeLogin(url)).status, 200);
  assert.equal(await login.code, 0);
  const printed = JSON.parse(login.stdout()) as Record<string, unknown>;
  assert.equal(printed['stored'], true);
  assert.equal(printed['hasRefreshToken'], true);
  assert.equal(printed['accessToken'], undefined, 'tokens are stored, not printed');
  const [entry] = Object.values(settings(options));
  assert.ok(entry?.accessToken && entry.refreshToken);

  const token = await done(['token'], options);
  assert.equal(token.code, 0);
  assert.equal(token.stdout, `${entry.accessToken}\n`);
  assert.equal(standin.counts.refresh_token, 0, 'the stored token was still fresh');
});

test('auth url, then auth exchange with the code (or the whole callback URL), as on a headless machine', async () => {
  const options = pkce({ callbackUrl: 'http://localhost:8020' });
  const url = await done(['url'], options);
  assert.equal(url.code, 0);
  const printed = JSON.parse(url.stdout) as { url: string; state: string; callbackUrl: string; settingsLocation: string };
  assert.equal(printed.settingsLocation, options.settingsLocation);
  assert.equal(Object.values(settings(options))[0]?.pending?.state, printed.state);
  assert.doesNotMatch(url.stdout, /codeVerifier|code_verifier/, 'the PKCE verifier stays in the settings file');

  const callback = await standin.authorize(printed.url);
  const exchanged = await done(['exchange', '--verifier', callback.href, '--print-tokens'], options);
  assert.equal(exchanged.code, 0, exchanged.stderr);
  const tokens = JSON.parse(exchanged.stdout) as { accessToken: string; refreshToken: string; expiresAt: string };
  assert.ok(tokens.accessToken.length > 800 && tokens.refreshToken);
  assert.equal(Object.values(settings(options))[0]?.pending, undefined);

  const again = await done(['exchange', `--verifier=${callback.searchParams.get('code') ?? ''}`], options);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /holds no login begun by `lakebase-proxy auth url`/);
});

test('auth exchange refuses a callback URL of another login', async () => {
  const options = pkce();
  const printed = JSON.parse((await done(['url', '--callback-url', 'http://127.0.0.1:8021/cb'], options)).stdout) as { url: string; callbackUrl: string };
  assert.equal(printed.callbackUrl, 'http://127.0.0.1:8021/cb');
  const callback = await standin.authorize(printed.url);
  assert.equal(callback.origin + callback.pathname, 'http://127.0.0.1:8021/cb');
  callback.searchParams.set('state', 'another');
  const result = await done(['exchange', '--verifier', callback.href], options);
  assert.equal(result.code, 1);
  assert.match(result.stderr, /state differs/);
  assert.equal(standin.counts.authorization_code, 0);
});

test('auth refresh rotates the stored refresh token; --refresh-token uses the given one', async () => {
  const options = pkce();
  const printed = JSON.parse((await done(['url'], options)).stdout) as { url: string };
  const callback = await standin.authorize(printed.url);
  assert.equal((await done(['exchange', '--code', callback.searchParams.get('code') ?? ''], options)).code, 0);
  const before = Object.values(settings(options))[0]?.refreshToken;

  const refreshed = await done(['refresh', '--print-tokens'], options);
  assert.equal(refreshed.code, 0, refreshed.stderr);
  const out = JSON.parse(refreshed.stdout) as { refreshToken: string; accessToken: string };
  assert.notEqual(out.refreshToken, before);
  assert.equal(Object.values(settings(options))[0]?.refreshToken, out.refreshToken);

  const elsewhere = pkce();
  const given = await done(['refresh', '--refresh-token', out.refreshToken], elsewhere);
  assert.equal(given.code, 0, given.stderr);
  assert.ok(Object.values(settings(elsewhere))[0]?.accessToken);
  assert.equal(standin.counts.refreshTokenReuse, 0);
  for (const text of [refreshed.log, given.log, given.stdout]) assert.ok(!text.includes(out.refreshToken));
});

test('auth token prints the database credential for a service principal with LakebaseInstance', async () => {
  const options = standinOptions(standin, { lakebaseInstance: 'my-instance' });
  const result = await done(['token'], options);
  assert.equal(result.code, 0, result.stderr);
  assert.equal(await postgresLogin(db, result.stdout.trim()), 'ok');
  assert.equal(standin.counts.database_credentials, 1);
});

test('auth token never opens a browser: without a login it fails at once and says what to do', async () => {
  const started = Date.now();
  const result = await done(['token'], pkce());
  assert.equal(result.code, 1);
  assert.match(result.stderr, /auth login/);
  assert.equal(standin.counts.authorize, 0);
  assert.ok(Date.now() - started < 5_000);
  const memory = await done(['url'], pkce({ settingsLocation: 'memory://x' }));
  assert.equal(memory.code, 1);
  assert.match(memory.stderr, /keeps nothing/);
});
