/**
 * OAuthSettingsLocation: the default place, file and folder modes, refusing a file others can
 * read, the lock, memory://, and token sources (in one process and in two) sharing one file
 * without ever spending a refresh token twice.
 */
import { after, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { createTokenSource, LOGIN_NOTICE_PREFIX } from '../src/oauth/index.js';
import type { OAuthOptions } from '../src/oauth/options.js';
import { defaultSettingsPath, openSettingsStore } from '../src/oauth/settings-store.js';
import { silentLogger } from '../src/ops/log.js';
import { TokenError, type TokenSource } from '../src/token/token-source.js';
import { captureLogger, postgresLogin, standinOptions, waitFor, type DatabricksStandin } from './harness/databricks-standin.js';
import { closedAfterEachTest, startStandinWithPostgres } from './harness/oauth-fixture.js';
import type { TestPostgres } from './harness/postgres.js';
import { BIN, startProxyProcess } from './harness/proxy.js';

let db: TestPostgres;
let standin: DatabricksStandin;
let close: () => Promise<void>;
let dir: string;
const track = closedAfterEachTest<TokenSource>();
const noNotice = { notice: () => undefined };
const storeOptions = { lockStaleMs: 5_000 };

before(async () => ({ db, standin, dir, close } = await startStandinWithPostgres({ dirPrefix: 'lbp-oauth-settings-' })));
after(() => close?.());

beforeEach(() => standin.reset());

let count = 0;
function freshPath(): string {
  return join(dir, `case-${++count}`, 'nested', 'OAuthSettings.txt');
}

function source(options: OAuthOptions, logger = silentLogger): TokenSource {
  return track(createTokenSource(options, { logger }));
}

function pkce(overrides: Partial<OAuthOptions>): OAuthOptions {
  return standinOptions(standin, { authScheme: 'OAuthPKCE', clientId: undefined, clientSecret: undefined, ...overrides });
}

/** Logs in once through a token source (closed afterwards) so the file holds a refresh token. */
async function login(file: string): Promise<void> {
  const s = source(pkce({ settingsLocation: file }));
  const notices: string[] = [];
  const token = s.getToken({ notice: (m) => notices.push(m) });
  await waitFor(() => notices.length > 0, 5_000, 'the login notice');
  await standin.completeLogin(notices[0]!.slice(LOGIN_NOTICE_PREFIX.length));
  await token;
  await s.close();
}

test('the default location is OAuthSettings.txt in the lakebase-proxy config folder of each platform', () => {
  assert.equal(defaultSettingsPath({}, 'linux', '/home/ann'), '/home/ann/.config/lakebase-proxy/OAuthSettings.txt');
  assert.equal(defaultSettingsPath({ XDG_CONFIG_HOME: '/xdg' }, 'linux', '/home/ann'), '/xdg/lakebase-proxy/OAuthSettings.txt');
  assert.equal(defaultSettingsPath({ XDG_CONFIG_HOME: 'relative' }, 'linux', '/home/ann'), '/home/ann/.config/lakebase-proxy/OAuthSettings.txt');
  assert.equal(defaultSettingsPath({}, 'darwin', '/Users/ann'), '/Users/ann/Library/Application Support/lakebase-proxy/OAuthSettings.txt');
  assert.equal(
    defaultSettingsPath({ APPDATA: 'C:\\Users\\ann\\AppData\\Roaming' }, 'win32', 'C:\\Users\\ann'),
    'C:\\Users\\ann\\AppData\\Roaming\\lakebase-proxy\\OAuthSettings.txt',
  );
});

test('the file is written atomically with mode 0600 in a folder created 0700', async () => {
  const file = freshPath();
  const store = openSettingsStore(file, storeOptions);
  await store.update('k', () => Promise.resolve({ result: undefined, next: { refreshToken: 'r1' } }));
  await store.update('k', (entry) => Promise.resolve({ result: undefined, next: { ...entry, accessToken: 'a1' } }));
  assert.equal(statSync(file).mode & 0o777, 0o600);
  assert.equal(statSync(join(file, '..')).mode & 0o777, 0o700);
  assert.equal(statSync(join(file, '..', '..')).mode & 0o777, 0o700);
  assert.deepEqual(readdirSync(join(file, '..')), ['OAuthSettings.txt'], 'no temporary or lock file left');
  assert.deepEqual(JSON.parse(readFileSync(file, 'utf8')), { version: 1, targets: { k: { refreshToken: 'r1', accessToken: 'a1' } } });
  assert.deepEqual(await store.read('k'), { refreshToken: 'r1', accessToken: 'a1' });
});

test('a file other users can read is refused, naming the path and the fix', async () => {
  const file = freshPath();
  mkdirSync(join(file, '..'), { recursive: true });
  writeFileSync(file, '{"version":1,"targets":{}}');
  chmodSync(file, 0o644);
  const expected = (err: unknown) =>
    err instanceof TokenError &&
    err.code === 'settings_error' &&
    err.message.includes(file) &&
    err.message.includes(`chmod 600 ${file}`) &&
    /mode 0644/.test(err.message);
  await assert.rejects(openSettingsStore(file, storeOptions).read('k'), expected);
  // A person's login depends on the file: refused.
  await assert.rejects(source(pkce({ settingsLocation: file, initiateOAuth: 'REFRESH' })).getToken(noNotice), expected);
  // A service principal needs nothing stored: it goes on in memory and says why.
  const capture = captureLogger();
  const token = await source(standinOptions(standin, { settingsLocation: file }), capture.logger).getToken(noNotice);
  assert.equal(await postgresLogin(db, token.value), 'ok');
  assert.match(capture.text(), /chmod 600/);
  assert.equal(statSync(file).mode & 0o777, 0o644, 'the file was left alone');
});

test('the real program refuses at start a settings file the group or others may read or write, with the path and chmod 600', async () => {
  const file = freshPath();
  mkdirSync(join(file, '..'), { recursive: true });
  writeFileSync(file, '{"version":1,"targets":{}}');
  const connection = `Server=localhost;Port=${db.port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};DatabricksInstance=${standin.url};OAuthClientId=${standin.clientId};OAuthSettingsLocation=${file}`;
  const env = { ...process.env, LAKEBASE_PROXY_OAUTH_CLIENT_SECRET: standin.clientSecret };
  for (const mode of [0o644, 0o640, 0o604, 0o620]) {
    chmodSync(file, mode);
    const ran = spawnSync(process.execPath, [BIN, '--connection', connection, '--no-http', '--port', '0'], { encoding: 'utf8', env, timeout: 15_000 });
    assert.equal(ran.status, 1, ran.stderr);
    assert.equal(
      ran.stderr,
      `lakebase-proxy: OAuthSettingsLocation ${file} can be read or written by other users (mode 0${mode.toString(8)}): it holds tokens; run \`chmod 600 ${file}\`\n`,
    );
    assert.ok(!ran.stderr.includes(standin.clientSecret));
  }
  chmodSync(file, 0o600);
  const proxy = await startProxyProcess(['--connection', connection, '--no-http'], { LAKEBASE_PROXY_OAUTH_CLIENT_SECRET: standin.clientSecret });
  assert.equal(await proxy.stop(), 0, proxy.output());
});

test('a lock left by a dead process is broken; a live one is waited for', async () => {
  const file = freshPath();
  const store = openSettingsStore(file, storeOptions);
  await store.update('k', () => Promise.resolve({ result: undefined, next: {} }));
  const deadPid = spawnSync(process.execPath, ['-e', '']).pid!;
  writeFileSync(`${file}.lock`, JSON.stringify({ pid: deadPid, host: hostname(), at: Date.now(), id: 'dead' }));
  const started = Date.now();
  await store.update('k', () => Promise.resolve({ result: undefined, next: { refreshToken: 'after-dead' } }));
  assert.ok(Date.now() - started < 3_000);

  writeFileSync(`${file}.lock`, JSON.stringify({ pid: process.pid, host: hostname(), at: Date.now(), id: 'live' }));
  const waiting = store.update('k', () => Promise.resolve({ result: Date.now(), next: { refreshToken: 'after-live' } }));
  const released = Date.now() + 300;
  setTimeout(() => rmSync(`${file}.lock`), 300);
  assert.ok((await waiting) >= released - 5, 'ran only after the lock was released');

  writeFileSync(`${file}.lock`, JSON.stringify({ pid: process.pid, host: hostname(), at: Date.now() - 10_000, id: 'old' }));
  await store.update('k', () => Promise.resolve({ result: undefined, next: { refreshToken: 'after-old' } }));
  assert.deepEqual(await store.read('k'), { refreshToken: 'after-old' });
});

test('memory:// keeps settings in this process only, shared by location', async () => {
  const a = openSettingsStore('memory://shared-a', storeOptions);
  const again = openSettingsStore('memory://shared-a', storeOptions);
  const other = openSettingsStore('memory://shared-b', storeOptions);
  assert.equal(a.persistent, false);
  await a.update('k', () => Promise.resolve({ result: undefined, next: { refreshToken: 'r' } }));
  assert.deepEqual(await again.read('k'), { refreshToken: 'r' });
  assert.equal(await other.read('k'), undefined);
});

test('token sources sharing one file in one process never spend a refresh token twice', async () => {
  const file = freshPath();
  standin.tokenLifetimeSeconds = 1;
  await login(file);
  standin.resetCounts();
  const shared = [0, 1, 2, 3].map(() => source(pkce({ settingsLocation: file, initiateOAuth: 'REFRESH' })));
  const deadline = Date.now() + 2_500;
  while (Date.now() < deadline) {
    const asked = Date.now();
    const tokens = await Promise.all(shared.map((s) => s.getToken(noNotice)));
    for (const token of tokens) assert.ok(token.expiresAt && token.expiresAt.getTime() > asked, 'never an expired token');
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.ok(standin.counts.refresh_token >= 2, `refreshed ${standin.counts.refresh_token} times`);
  assert.equal(standin.counts.refreshTokenReuse, 0);
  assert.equal(standin.counts.invalid_grant, 0);
});

test('two processes sharing one file never spend a refresh token twice', async () => {
  const file = freshPath();
  standin.tokenLifetimeSeconds = 1;
  await login(file);
  standin.resetCounts();
  const options = pkce({ settingsLocation: file, initiateOAuth: 'REFRESH' });
  const moduleUrl = new URL('../src/oauth/index.js', import.meta.url).href;
  const logUrl = new URL('../src/ops/log.js', import.meta.url).href;
  // Each process asks for a token every 30 ms for 2.5 s and reports what it got.
  const script = `
    const { createTokenSource } = await import(${JSON.stringify(moduleUrl)});
    const { silentLogger } = await import(${JSON.stringify(logUrl)});
    const source = createTokenSource(JSON.parse(process.env.OPTIONS), { logger: silentLogger });
    const seen = new Set();
    let failures = 0;
    const deadline = Date.now() + 2500;
    while (Date.now() < deadline) {
      try {
        const asked = Date.now();
        const token = await source.getToken({ notice() {} });
        if (token.expiresAt.getTime() <= asked) failures++;
        seen.add(token.value);
      } catch (err) {
        failures++;
        console.error(err.message);
      }
      await new Promise((r) => setTimeout(r, 30));
    }
    await source.close();
    console.log(JSON.stringify({ distinct: seen.size, failures }));
  `;
  const run = () =>
    new Promise<{ distinct: number; failures: number }>((resolve, reject) => {
      const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
        env: { ...process.env, OPTIONS: JSON.stringify(options) },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let out = '';
      let err = '';
      child.stdout.on('data', (c: Buffer) => (out += c.toString()));
      child.stderr.on('data', (c: Buffer) => (err += c.toString()));
      child.on('exit', (code) => (code === 0 ? resolve(JSON.parse(out) as { distinct: number; failures: number }) : reject(new Error(`exit ${code}: ${err}`))));
    });
  const results = await Promise.all([run(), run()]);
  for (const result of results) {
    assert.equal(result.failures, 0);
    assert.ok(result.distinct >= 2, `each process saw refreshed tokens: ${JSON.stringify(results)}`);
  }
  assert.ok(standin.counts.refresh_token >= 2, `refreshed ${standin.counts.refresh_token} times`);
  assert.equal(standin.counts.refreshTokenReuse, 0);
  assert.equal(standin.counts.invalid_grant, 0);
});
