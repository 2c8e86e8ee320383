/** Configuration sources, their precedence and their errors, through loadConfig and the real program. */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { parseArgs } from '../src/cli/args.js';
import { loadConfig } from '../src/config/load.js';
import { refuseSharedPorts, resolveProxy } from '../src/config/target.js';
import { envName, findProperty, parseDuration, PROPERTIES } from '../src/config/properties.js';
import { startPostgres, type TestPostgres } from './harness/postgres.js';
import { testCA } from './harness/certs.js';
import { BIN, startProxyProcess } from './harness/proxy.js';

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), 'lbp-config-'));
});
after(() => rmSync(dir, { recursive: true, force: true }));

function file(name: string, text: string): string {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
}

const load = (argv: string[], env: NodeJS.ProcessEnv = {}) => loadConfig(parseArgs(argv), env, dir);

test('later sources win: defaults < file < environment < --connection < flags', async () => {
  const config = file('p.yaml', 'Server: from-file\nDatabase: file_db\nlisten-port: 6001\nSSLMode: require\nConnectTimeout: 1111\n');
  const env = { LAKEBASE_PROXY_PORT: '6002', LAKEBASE_PROXY_DATABASE: 'env_db', LAKEBASE_PROXY_CONNECT_TIMEOUT: '2222' };
  const only = (await load(['--config', config])).targets[0]!.settings;
  assert.equal(only.string('Database'), 'file_db');
  assert.equal(only.int('ListenPort'), 6001);
  assert.equal(only.string('KeepAlive'), '60s', 'a default');
  const withEnv = (await load(['--config', config], env)).targets[0]!.settings;
  assert.equal(withEnv.string('Database'), 'env_db');
  assert.equal(withEnv.int('ListenPort'), 6002);
  const withConnection = (await load(['--config', config, '--connection', 'Database=conn_db;ConnectTimeout=3333'], env)).targets[0]!.settings;
  assert.equal(withConnection.string('Database'), 'conn_db');
  assert.equal(withConnection.int('ConnectTimeout'), 3333);
  assert.equal(withConnection.source('ConnectTimeout'), '--connection');
  const withFlags = (await load(['--connection', 'ConnectTimeout=3333', '--connect-timeout', '4444', '--config', config, '--port', '6003'], env)).targets[0]!.settings;
  assert.equal(withFlags.int('ConnectTimeout'), 4444);
  assert.equal(withFlags.int('ListenPort'), 6003);
  assert.equal(withFlags.string('SSLMode'), 'require', 'untouched by later sources');
});

test('each source names itself in an error, with the key and what is allowed', async () => {
  const bad = file('bad.yaml', 'Port: 99999\n');
  await assert.rejects(load(['--config', bad]), /Port \(from .*bad\.yaml\): "99999" is not valid; expected a whole number from 1 to 65535/);
  await assert.rejects(load([], { LAKEBASE_PROXY_PORT: 'abc' }), /ListenPort \(from environment \(LAKEBASE_PROXY_\*\)\): "abc" is not valid/);
  await assert.rejects(load(['--connection', 'SSLMode=maybe']), /SSLMode \(from --connection\): "maybe" is not valid; expected one of verify-full, verify-ca, require/);
  await assert.rejects(load(['--max-connections', '-1']), /MaxConnections \(from the command line\)/);
  await assert.rejects(load(['--connection', 'Sever=x']), /unknown setting "Sever" in --connection/);
  await assert.rejects(load(['--config', file('unknown.yaml', 'colour: blue\n')]), /unknown setting "colour" in .*unknown\.yaml/);
  await assert.rejects(load(['--config', file('list.yaml', 'Server: [a, b]\n')]), /Server \(from .*list\.yaml\): expected a single value, not a list/);
  await assert.rejects(load(['--config', join(dir, 'missing.yaml')]), /--config: cannot read .*missing\.yaml: ENOENT/);
  await assert.rejects(load(['--config', file('broken.yaml', 'a: [\n')]), /broken\.yaml: not valid YAML/);
  const settings = (await load(['--connection', 'User=x'])).targets[0]!.settings;
  await assert.rejects(resolveProxy(settings, 't'), /Server: missing/);
});

test('parseDuration: units ms, s, m, h, parts together, a bare number in milliseconds', () => {
  const cases: Array<[string, number | undefined]> = [
    ['0', 0], ['250', 250], ['500ms', 500], ['30s', 30_000], ['5m', 300_000], ['1h', 3_600_000], ['1m30s', 90_000],
    ['1h2m3s4ms', 3_723_004], ['1.5s', 1_500], [' 30S ', 30_000], ['2m0s', 120_000],
    ['', undefined], ['s', undefined], ['10x', undefined], ['-5s', undefined], ['5 s', undefined], ['1.5', undefined], ['30sec', undefined], ['1d', undefined],
  ];
  for (const [text, ms] of cases) assert.equal(parseDuration(text), ms, JSON.stringify(text));
});

test('every duration setting takes units from every source, and a bad one is refused naming the key and the source', async () => {
  const durations = PROPERTIES.filter((p) => p.kind.type === 'duration');
  assert.deepEqual(
    durations.map((p) => p.name).sort(),
    ['ConnectTimeout', 'IdleTimeout', 'KeepAlive', 'LoginTimeout', 'MaxSigtermDelay', 'MinSigtermDelay', 'OAuthTimeout', 'QueryWaitTimeout', 'ServerCheckDelay', 'ServerIdleTimeout', 'ServerLifetime', 'StartupTimeout'],
  );
  for (const p of durations) {
    const where = p.process ? (c: Awaited<ReturnType<typeof load>>) => c.process : (c: Awaited<ReturnType<typeof load>>) => c.targets[0]!.settings;
    assert.equal(where(await load([p.flag as string, '1m30s'])).duration(p.name), 90_000, `${p.name} from its flag`);
    assert.equal(where(await load([], { [envName(p)]: '500ms' })).duration(p.name), 500, `${p.name} from ${envName(p)}`);
    assert.equal(where(await load(['--config', file(`${p.name}.yaml`, `${p.name}: 2h\n`)])).duration(p.name), 7_200_000, `${p.name} from a file`);
    assert.equal(where(await load([p.flag as string, '4000'])).duration(p.name), 4_000, `${p.name}: a bare number is milliseconds`);
    assert.equal(where(await load([p.flag as string, '4000'])).int(p.name), 4_000, `${p.name}: int() reads a duration too`);
    await assert.rejects(load([p.flag as string, '10x']), new RegExp(`^ConfigError: ${p.name} \\(from the command line\\): "10x" is not valid; expected a duration such as 500ms, 30s, 5m, 1h or 1m30s \\(a bare number is milliseconds\\), at most 24h$`));
    await assert.rejects(load([], { [envName(p)]: '25h' }), new RegExp(`${p.name} \\(from environment \\(LAKEBASE_PROXY_\\*\\)\\): "25h" is not valid`));
  }
  const options = await resolveProxy((await load(['--connection', 'Server=h;User=u;ConnectTimeout=2s;KeepAlive=1m', '--startup-timeout', '45s', '--idle-timeout', '1h'])).targets[0]!.settings, 't');
  assert.deepEqual(
    [options.upstream.connectTimeoutMs, options.upstream.keepAliveMs, options.startupTimeoutMs, options.idleTimeoutMs],
    [2_000, 60_000, 45_000, 3_600_000],
  );
  const defaults = await resolveProxy((await load(['--connection', 'Server=h;User=u'])).targets[0]!.settings, 't');
  assert.deepEqual([defaults.upstream.connectTimeoutMs, defaults.upstream.keepAliveMs, defaults.startupTimeoutMs], [10_000, 60_000, 30_000]);
});

test('the real program takes --max-sigterm-delay 30s and refuses --connect-timeout 10x naming the key', async () => {
  const refused = spawnSync(process.execPath, [BIN, '--connection', 'Server=h;User=u', '--connect-timeout', '10x'], { encoding: 'utf8' });
  assert.equal(refused.status, 1);
  assert.match(refused.stderr, /^lakebase-proxy: ConnectTimeout \(from the command line\): "10x" is not valid; expected a duration such as 500ms, 30s/);
  const proxy = await startProxyProcess(['--connection', 'Server=h;User=u;OAuthAccessToken=t', '--no-http', '--max-sigterm-delay', '30s', '--min-sigterm-delay', '0s']);
  assert.equal(await proxy.stop(), 0, proxy.output());
});

test('one ListenPort for several targets is refused at start, naming ListenPort and its source', async () => {
  const two = ['--connection', 'Server=a;User=u;OAuthAccessToken=t', '--connection', 'Server=b;User=u;OAuthAccessToken=t'];
  const fromFlag = spawnSync(process.execPath, [BIN, ...two, '--port', '5499', '--no-http'], { encoding: 'utf8', timeout: 15_000 });
  assert.equal(fromFlag.status, 1, fromFlag.stderr);
  assert.match(fromFlag.stderr, /^lakebase-proxy: ListenPort \(from the command line\): the targets target1, target2 would all listen on port 5499; each target needs its own port: set ListenPort in each --connection string/);
  assert.doesNotMatch(fromFlag.stderr, /already in use/);
  const fromEnv = spawnSync(process.execPath, [BIN, ...two, '--no-http'], { encoding: 'utf8', timeout: 15_000, env: { ...process.env, LAKEBASE_PROXY_PORT: '5499' } });
  assert.match(fromEnv.stderr, /ListenPort \(from environment \(LAKEBASE_PROXY_\*\)\): the targets target1, target2 would all listen on port 5499/);
  // The check itself: each target on its own port, or a free port each, passes; so do named targets
  // of a config file, which share a port and are chosen by database name (shared-port.test.ts).
  refuseSharedPorts((await load(['--connection', 'Server=a;ListenPort=6101', '--connection', 'Server=b;ListenPort=6102'])).targets);
  refuseSharedPorts((await load([...two, '--port', '0'])).targets);
  const sameDefault = (await load(['--config', file('same-port.yaml', 'Server: h\ntargets:\n  - name: one\n  - name: two\n')])).targets;
  refuseSharedPorts(sameDefault);
});

test('a secret never appears in an error about it', async () => {
  const secret = 'very-secret-value-123';
  await assert.rejects(load(['--connection', `OAuthClientSecret=${secret};Port=x`]), (e: Error) => !e.message.includes(secret) && /Port/.test(e.message));
  const result = spawnSync(process.execPath, [BIN, '--connection', `Server=h;OAuthClientSecret=${secret};OAuthAccessToken=${secret};AuthScheme=nope`], { encoding: 'utf8' });
  assert.equal(result.status, 1);
  assert.match(result.stderr, /AuthScheme \(from --connection\): "nope" is not valid/);
  assert.ok(!result.stderr.includes(secret) && !result.stdout.includes(secret));
});

test('environment variable names follow the flags and the property names', () => {
  assert.equal(envName(findProperty('ListenPort')!), 'LAKEBASE_PROXY_PORT');
  assert.equal(envName(findProperty('OAuthClientSecret')!), 'LAKEBASE_PROXY_OAUTH_CLIENT_SECRET');
  assert.equal(envName(findProperty('SSLRootCert')!), 'LAKEBASE_PROXY_SSL_ROOT_CERT');
  assert.equal(envName(findProperty('CallbackURL')!), 'LAKEBASE_PROXY_CALLBACK_URL');
  assert.equal(envName(findProperty('MaxSigtermDelay')!), 'LAKEBASE_PROXY_MAX_SIGTERM_DELAY');
  assert.equal(envName(findProperty('Port')!), 'LAKEBASE_PROXY_SERVER_PORT');
  const names = PROPERTIES.map(envName);
  assert.equal(new Set(names).size, names.length, 'every property has its own variable');
});

test('Databricks unified auth: a ~/.databrickscfg profile, then DATABRICKS_* variables, then ours', async () => {
  file('.databrickscfg', '[DEFAULT]\nhost = https://default.example\n\n[dev]\nhost = https://dev.example\nclient_id = dev-id\nclient_secret = dev-secret\n');
  const fromProfile = (await load([], { DATABRICKS_CONFIG_PROFILE: 'dev' })).targets[0]!.settings;
  assert.equal(fromProfile.string('DatabricksInstance'), 'https://dev.example');
  assert.equal(fromProfile.string('OAuthClientId'), 'dev-id');
  assert.equal(fromProfile.string('OAuthClientSecret'), 'dev-secret');
  assert.match(fromProfile.source('OAuthClientId') ?? '', /\.databrickscfg profile \[dev\]/);
  const envWins = (await load([], { DATABRICKS_CONFIG_PROFILE: 'dev', DATABRICKS_HOST: 'https://env.example', DATABRICKS_CLIENT_ID: 'env-id' })).targets[0]!.settings;
  assert.equal(envWins.string('DatabricksInstance'), 'https://env.example');
  assert.equal(envWins.string('OAuthClientId'), 'env-id');
  assert.equal(envWins.string('OAuthClientSecret'), 'dev-secret');
  const oursWin = (await load(['--connection', 'Profile=DEFAULT'], { DATABRICKS_CONFIG_PROFILE: 'dev', LAKEBASE_PROXY_DATABRICKS_INSTANCE: 'https://ours.example' })).targets[0]!.settings;
  assert.equal(oursWin.string('DatabricksInstance'), 'https://ours.example');
  assert.equal(oursWin.string('OAuthClientId'), undefined, 'Profile=DEFAULT from --connection chose the DEFAULT profile');
  await assert.rejects(load([], { DATABRICKS_CONFIG_PROFILE: 'prod' }), /Profile \(from DATABRICKS_CONFIG_PROFILE\): no profile \[prod\] in .*\.databrickscfg; it has \[DEFAULT\], \[dev\]/);
});

test('trust on a non-loopback address is refused; client auth makes it allowed', async () => {
  const settings = (await load(['--connection', 'Server=h;User=u', '--address', '0.0.0.0'])).targets[0]!.settings;
  await assert.rejects(resolveProxy(settings, 't'), /ClientUsers.*--client-auth scram-sha-256 needs a file of local users/);
  const trust = (await load(['--connection', 'Server=h;User=u', '--address', '0.0.0.0', '--client-auth', 'trust'])).targets[0]!.settings;
  await assert.rejects(resolveProxy(trust, 't'), /ClientAuth \(from the command line\): trust on the non-loopback address 0\.0\.0\.0/);
  const users = file('users', 'alice:pw\n');
  const noTls = (await load(['--connection', 'Server=h;User=u', '--address', '0.0.0.0', '--client-users', users])).targets[0]!.settings;
  await assert.rejects(resolveProxy(noTls, 't'), /TLSCert: missing: on the non-loopback address 0\.0\.0\.0/);
  const ca = await testCA();
  const ok = (await load(['--connection', 'Server=h;User=u', '--address', '0.0.0.0', '--client-users', users, '--tls-cert', ca.serverCertFile, '--tls-key', ca.serverKeyFile])).targets[0]!.settings;
  const options = await resolveProxy(ok, 't');
  assert.equal(options.clientAuth.authMethod, 'scram-sha-256');
  assert.ok(options.clientAuth.tls, 'client TLS offered');
});

test('two targets from one config file, each on its own port with its own identity', async () => {
  let db: TestPostgres | undefined;
  let proxy: Awaited<ReturnType<typeof startProxyProcess>> | undefined;
  try {
    db = await startPostgres();
    await db.setTokenPassword('two-targets-token');
    const config = file(
      'two.yaml',
      [
        `Server: localhost`,
        `Port: ${db.port}`,
        `SSLRootCert: ${db.ca.caFile}`,
        `Database: ${db.database}`,
        'targets:',
        '  - name: tokens',
        `    User: ${db.tokenRole}`,
        '    OAuthAccessToken: two-targets-token',
        '  - name: native',
        `    User: ${db.scramRole}`,
        `    Password: ${db.scramPassword}`,
      ].join('\n'),
    );
    // --port 0 (added by the harness) gives each target a port of its own.
    proxy = await startProxyProcess(['--config', config, '--no-http']);
    const listening = (): Array<{ target: string; port: number }> =>
      proxy!.output().split('\n').filter((l) => l.includes('"msg":"listening"')).map((l) => JSON.parse(l) as { target: string; port: number });
    for (let i = 0; i < 50 && listening().length < 2; i++) await new Promise((r) => setTimeout(r, 100));
    const all = listening();
    assert.deepEqual(all.map((l) => l.target), ['tokens', 'native']);
    assert.notEqual(all[0]!.port, all[1]!.port);
    for (const { target: name, port } of all) {
      const c = new pg.Client({ host: '127.0.0.1', port, user: 'x', database: db.database });
      await c.connect();
      const who: string = (await c.query('select current_user as u')).rows[0].u;
      await c.end();
      assert.equal(who, name === 'tokens' ? db.tokenRole : db.scramRole);
    }
  } finally {
    await proxy?.stop();
    await db?.stop();
  }
});
