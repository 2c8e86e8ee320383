/**
 * Databricks auth the way the Databricks tools do it, through the real program: profiles of
 * ~/.databrickscfg by auth_type (oauth-m2m, databricks-cli, pat), AuthScheme=DatabricksCli
 * without a profile, and DATABRICKS_TOKEN. The `databricks` on the PATH is a stand-in that prints
 * what the real CLI prints, with tokens of the Databricks stand-in.
 */
import { after, afterEach, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { installDatabricksCli, type CliStandin } from './harness/databricks-cli-standin.js';
import type { DatabricksStandin } from './harness/databricks-standin.js';
import { startStandinWithPostgres } from './harness/oauth-fixture.js';
import type { TestPostgres } from './harness/postgres.js';
import { startProxyProcess, type ProxyProcess } from './harness/proxy.js';
import { cleanEnvironment, loginError, sleep, whoAmI } from './reliability-support.js';

let db: TestPostgres;
let standin: DatabricksStandin;
let close: () => Promise<void>;
let dir: string;
let cli: CliStandin;
let emptyDir: string;
const running: ProxyProcess[] = [];

before(async () => {
  cleanEnvironment();
  ({ db, standin, dir, close } = await startStandinWithPostgres({ dirPrefix: 'lbp-databricks-auth-' }));
  mkdirSync(join(dir, 'bin'));
  mkdirSync(join(dir, 'empty'));
  emptyDir = join(dir, 'empty');
  cli = installDatabricksCli(join(dir, 'bin'), standin);
  standin.setInstance('orders', { state: 'AVAILABLE', read_write_dns: 'localhost' });
});
after(() => close?.());
beforeEach(async () => {
  await standin.reset();
  cli.fail(false);
});
afterEach(async () => {
  await Promise.all(running.splice(0).map((p) => p.stop('SIGINT')));
});

/** The test server's host, port, CA, role and database. */
const upstream = (): string => `Port=${db.port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};Database=${db.database}`;

function databricksCfg(name: string, text: string): string {
  const path = join(dir, name);
  writeFileSync(path, text, { mode: 0o600 });
  return path;
}

async function proxy(connection: string, env: NodeJS.ProcessEnv = {}): Promise<ProxyProcess> {
  const p = await startProxyProcess(['--connection', `${upstream()};${connection}`, '--no-http'], { PATH: `${cli.dir}${delimiter}${process.env['PATH'] ?? ''}`, ...env });
  running.push(p);
  return p;
}

/** The expiry of every token the proxy took, in order, as its log says (the log is after the token is held). */
function tokensTaken(p: ProxyProcess): Date[] {
  return p
    .output()
    .split('\n')
    .slice(0, -1) // the last line may be incomplete
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as { msg?: string; expiresAt?: string })
    .filter((entry) => entry.msg === 'token obtained' || entry.msg === 'token refreshed')
    .map((entry) => new Date(entry.expiresAt ?? NaN));
}

/** Nothing the CLI printed (its tokens, its refresh tokens) and no token at all in the program's output. */
function assertNoSecrets(p: ProxyProcess): void {
  const output = p.output();
  for (const refresh of cli.refreshTokens()) assert.ok(!output.includes(refresh), 'a refresh token of the CLI in the output');
  assert.ok(!output.includes(standin.personalAccessToken), 'the personal access token in the output');
  assert.doesNotMatch(output, /eyJ[\w-]{20,}\.[\w-]{20,}/, 'a token in the output');
}

test('AuthScheme=DatabricksCli without a profile: the token of `databricks auth token --host <workspace>` is the password', async () => {
  const p = await proxy(`AuthScheme=DatabricksCli;DatabricksInstance=${standin.url};Server=localhost`);
  assert.equal(await whoAmI(p.port, db), db.tokenRole);
  assert.equal(await whoAmI(p.port, db), db.tokenRole);
  assert.deepEqual(cli.runs().slice(-1), [['auth', 'token', '--host', standin.url]]);
  assert.equal(cli.runs().length, 1, 'run once: the token is cached');
  assertNoSecrets(p);
});

test('a profile with auth_type = databricks-cli: `databricks auth token --profile`, run again before the token expires', async () => {
  const cfg = databricksCfg('cli.cfg', `[DEFAULT]\nhost = https://other.example\n\n[dev]\nhost = ${standin.url}\nauth_type = databricks-cli\n`);
  standin.tokenLifetimeSeconds = 4;
  const before = cli.runs().length;
  const p = await proxy('Profile=dev;Server=localhost', { DATABRICKS_CONFIG_FILE: cfg });
  assert.equal(await whoAmI(p.port, db), db.tokenRole);
  assert.deepEqual(cli.runs()[before], ['auth', 'token', '--profile', 'dev']);
  // Refreshed at half its life by running the CLI again, with no client waiting.
  const runs = async (count: number): Promise<void> => {
    for (let i = 0; i < 400 && cli.runs().length < count; i++) await sleep(50);
    assert.ok(cli.runs().length >= count, `${cli.runs().length - before} runs`);
  };
  await runs(before + 3);
  // The test Postgres takes only the newest token. Settled: every CLI run has minted a token and
  // handed it to the proxy, and the last is long-lived (a 4 s token is never a minute away), so the
  // proxy runs the CLI no more for half an hour and holds the token Postgres takes.
  standin.tokenLifetimeSeconds = 3600;
  const settled = (): string | undefined => {
    const taken = tokensTaken(p);
    const last = taken.at(-1);
    const [started, minted] = [cli.runs().length - before, standin.counts.client_credentials];
    if (taken.length === started && taken.length === minted && last !== undefined && last.getTime() > Date.now() + 60_000) return undefined;
    return `${started} CLI runs, ${minted} tokens minted, ${taken.length} taken by the proxy, the last expiring at ${last?.toISOString()}`;
  };
  for (let i = 0; i < 400 && settled() !== undefined; i++) await sleep(50);
  assert.equal(settled(), undefined);
  const settledRuns = cli.runs().length;
  assert.equal(await whoAmI(p.port, db), db.tokenRole);
  assert.equal(cli.runs().length, settledRuns, 'the login used the token the proxy held');
  assertNoSecrets(p);
});

test('no databricks on the PATH: the client hears what to install and the login to run', async () => {
  const p = await proxy(`AuthScheme=DatabricksCli;DatabricksInstance=${standin.url};Server=localhost`, { PATH: emptyDir });
  const error = await loginError(p.port, db);
  assert.equal(error.code, '28000', error.message);
  assert.match(error.message, /AuthScheme=DatabricksCli runs the Databricks CLI, and there is no databricks on the PATH: install it .*run `databricks auth login --host https:\/\/localhost:\d+`/);
});

test('a CLI without a login for the host: its own words, and the login to run', async () => {
  cli.fail(true);
  const p = await proxy(`AuthScheme=DatabricksCli;DatabricksInstance=${standin.url};Server=localhost`);
  const error = await loginError(p.port, db);
  assert.equal(error.code, '28000', error.message);
  assert.match(error.message, /databricks auth token --host https:\/\/localhost:\d+ failed: cache: databricks OAuth is not configured for this host\..*; run `databricks auth login --host https:\/\/localhost:\d+`$/);
  cli.fail(false);
  assert.equal(await whoAmI(p.port, db), db.tokenRole, 'logged in once the CLI is');
});

test('a profile with auth_type = pat: the personal access token mints the database credential, and is never a password', async () => {
  const cfg = databricksCfg('pat.cfg', `[ci]\nhost = ${standin.url}\nauth_type = pat\ntoken = ${standin.personalAccessToken}\n`);
  const p = await proxy('LakebaseInstance=orders', { DATABRICKS_CONFIG_FILE: cfg, DATABRICKS_CONFIG_PROFILE: 'ci' });
  assert.equal(await whoAmI(p.port, db), db.tokenRole);
  assert.equal(standin.counts.tokenRequests, 0, 'no OAuth token');
  assert.equal(standin.counts.database_credentials, 1);
  assert.equal(standin.counts.instance_lookups, 1, 'the host looked up with the personal access token too');
  assertNoSecrets(p);
});

test('DATABRICKS_TOKEN alone picks the personal access token; without a Lakebase name it is refused at start', async () => {
  const env = { DATABRICKS_HOST: standin.url, DATABRICKS_TOKEN: standin.personalAccessToken };
  const p = await proxy('LakebaseInstance=orders;Server=localhost', env);
  assert.equal(await whoAmI(p.port, db), db.tokenRole);
  assert.equal(standin.counts.database_credentials, 1);
  await assert.rejects(proxy('Server=localhost', env), /a personal access token is not a Postgres password for Lakebase: set LakebaseInstance or LakebaseEndpoint/);
});

test('a profile with auth_type = oauth-m2m: its client_id and client_secret; an auth_type the proxy cannot use is refused naming it', async () => {
  const cfg = databricksCfg(
    'm2m.cfg',
    `[sp]\nhost = ${standin.url}\nauth_type = oauth-m2m\nclient_id = ${standin.clientId}\nclient_secret = ${standin.clientSecret}\n\n[azure]\nhost = ${standin.url}\nauth_type = azure-cli\n`,
  );
  const p = await proxy('Profile=sp;OAuthSettingsLocation=memory://;Server=localhost', { DATABRICKS_CONFIG_FILE: cfg });
  assert.equal(await whoAmI(p.port, db), db.tokenRole);
  assert.equal(standin.counts.client_credentials, 1);
  await assert.rejects(proxy('Profile=azure;Server=localhost', { DATABRICKS_CONFIG_FILE: cfg }), /profile \[azure\]: auth_type = azure-cli is not one the proxy can use; use oauth-m2m/);
});
