/**
 * `lakebase-proxy service install|uninstall|status`, for Linux (systemd user unit) and macOS
 * (launchd agent) on this machine: a home folder of the test's own and a recording stand-in for
 * systemctl and launchctl, so the real user's services are never touched. The unit is checked by
 * `systemd-analyze verify` where it is installed, the plist read back by Python's plistlib, and
 * the command line both run is run for real: a session through it, its token from the env file.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from '../src/cli/args.js';
import { serviceCommand, type ServiceHost } from '../src/cli/service.js';
import { ConfigError } from '../src/config/properties.js';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { BIN, proxyClient, startProxyProcess } from './harness/proxy.js';
import { freePort } from './harness/postgres.js';

let work: string;
before(() => {
  work = mkdtempSync(join(tmpdir(), 'lbp-service-'));
});
after(() => rmSync(work, { recursive: true, force: true }));

type Answer = { code: number; stdout: string; stderr: string };

/** A host with its own home folder; `answer` plays systemctl / launchctl (default: success, no output). */
function fakeHost(platform: NodeJS.Platform, options: { env?: NodeJS.ProcessEnv; answer?: (line: string) => Partial<Answer> | undefined } = {}) {
  const home = mkdtempSync(join(work, `${platform}-home-`));
  const calls: string[] = [];
  const said: string[] = [];
  const host: ServiceHost = {
    platform,
    home,
    env: options.env ?? {},
    uid: 501,
    node: process.execPath,
    program: BIN,
    run: async (command, args) => {
      const line = [command, ...args].join(' ');
      calls.push(line);
      return { code: 0, stdout: '', stderr: '', ...options.answer?.(line) };
    },
    say: (line) => said.push(line),
  };
  return { host, home, calls, said };
}

const service = (host: ServiceHost, ...args: string[]): Promise<number> => serviceCommand(parseArgs(['service', ...args]), host);

function writeConfig(path: string, text = 'Server: lakebase.example.com\nListenPort: 15432\n'): string {
  mkdirSync(join(path, '..'), { recursive: true });
  writeFileSync(path, text);
  return path;
}

/** Reads a plist with Python's plistlib: a parser of its own, not ours. */
function readPlist(file: string): Record<string, unknown> | undefined {
  const python = spawnSync('/usr/bin/python3', ['-c', 'import json, plistlib, sys; print(json.dumps(plistlib.load(open(sys.argv[1], "rb"))))', file], { encoding: 'utf8' });
  if (python.error) return undefined;
  assert.equal(python.status, 0, python.stderr);
  return JSON.parse(python.stdout) as Record<string, unknown>;
}

/** `systemd-analyze verify --user` of a unit: undefined where systemd-analyze is not installed. */
function verifyUnit(file: string): { status: number | null; output: string } | undefined {
  const runtime = mkdtempSync(join(work, 'runtime-'));
  const result = spawnSync('systemd-analyze', ['verify', '--user', file], { encoding: 'utf8', env: { ...process.env, XDG_RUNTIME_DIR: runtime } });
  if (result.error) return undefined;
  return { status: result.status, output: result.stdout + result.stderr };
}

test('Linux: install writes a systemd user unit that runs this program with the config and env files, enables and starts it', async (t) => {
  const { host, home, calls, said } = fakeHost('linux');
  const config = writeConfig(join(home, '.config', 'lakebase-proxy', 'lakebase-proxy.yaml'));
  assert.equal(await service(host, 'install'), 0);

  const unitFile = join(home, '.config', 'systemd', 'user', 'lakebase-proxy.service');
  const unit = readFileSync(unitFile, 'utf8');
  const envFile = join(home, '.config', 'lakebase-proxy', 'lakebase-proxy.env');
  assert.ok(unit.split('\n').includes(`ExecStart="${process.execPath}" "--env-file=${envFile}" "${BIN}" "--config" "${config}"`), unit);
  for (const line of ['[Service]', 'Restart=on-failure', '[Install]', 'WantedBy=default.target']) assert.ok(unit.split('\n').includes(line), line);
  assert.deepEqual(calls, ['systemctl --user daemon-reload', 'systemctl --user enable lakebase-proxy.service', 'systemctl --user restart lakebase-proxy.service']);
  // The secrets file: private, and only comments until the person fills it in.
  assert.equal(statSync(envFile).mode & 0o777, 0o600);
  assert.deepEqual(readFileSync(envFile, 'utf8').split('\n').filter((l) => l !== '' && !l.startsWith('#')), []);
  assert.ok(said.some((line) => line.includes('journalctl --user -u lakebase-proxy')), said.join('\n'));

  const verified = verifyUnit(unitFile);
  if (!verified) {
    t.diagnostic('systemd-analyze is not installed here: the unit was not verified by systemd');
    return;
  }
  assert.equal(verified.status, 0, verified.output);
  assert.equal(verified.output.trim(), '', 'no warning about the unit');
});

test('Linux: systemd-analyze verify accepts a unit whose paths hold spaces, %, $, quotes and backslashes', async (t) => {
  const { host, home } = fakeHost('linux');
  const config = writeConfig(join(home, 'odd folder %i $HOME "q" back\\slash', 'my config.yaml'));
  assert.equal(await service(host, 'install', '--config', config), 0);
  const unitFile = join(home, '.config', 'systemd', 'user', 'lakebase-proxy.service');
  assert.ok(readFileSync(unitFile, 'utf8').includes('"--config" "' + config.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/%/g, '%%').replace(/\$/g, '$$$$') + '"'));
  const verified = verifyUnit(unitFile);
  if (!verified) {
    t.skip('systemd-analyze is not installed here');
    return;
  }
  assert.equal(verified.status, 0, verified.output);
  assert.equal(verified.output.trim(), '');
  // And it does refuse a broken unit: the check can fail.
  writeFileSync(unitFile, readFileSync(unitFile, 'utf8').replace(/^ExecStart="/m, 'ExecStart='));
  const broken = verifyUnit(unitFile);
  assert.notEqual(broken?.status, 0, broken?.output);
});

test('Linux: installing again keeps the secrets in the env file (making it private) and puts no secret in the unit or the output', async () => {
  const { host, home, said } = fakeHost('linux');
  writeConfig(join(home, '.config', 'lakebase-proxy', 'lakebase-proxy.yaml'));
  assert.equal(await service(host, 'install'), 0);
  const envFile = join(home, '.config', 'lakebase-proxy', 'lakebase-proxy.env');
  const secret = 'service-secret-' + Date.now();
  writeFileSync(envFile, `LAKEBASE_PROXY_OAUTH_CLIENT_SECRET=${secret}\n`);
  chmodSync(envFile, 0o644);
  assert.equal(await service(host, 'install'), 0);
  assert.equal(readFileSync(envFile, 'utf8'), `LAKEBASE_PROXY_OAUTH_CLIENT_SECRET=${secret}\n`);
  assert.equal(statSync(envFile).mode & 0o777, 0o600);
  assert.ok(said.some((line) => line.includes('now mode 0600')));
  assert.ok(!readFileSync(join(home, '.config', 'systemd', 'user', 'lakebase-proxy.service'), 'utf8').includes(secret));
  assert.ok(!said.join('\n').includes(secret));
});

test('Linux: XDG_CONFIG_HOME decides where the unit and the files go, and the service gets it too', async () => {
  const xdg = mkdtempSync(join(work, 'xdg-'));
  const { host } = fakeHost('linux', { env: { XDG_CONFIG_HOME: xdg } });
  writeConfig(join(xdg, 'lakebase-proxy', 'lakebase-proxy.yaml'));
  assert.equal(await service(host, 'install'), 0);
  const unit = readFileSync(join(xdg, 'systemd', 'user', 'lakebase-proxy.service'), 'utf8');
  assert.ok(unit.includes(`"--env-file=${join(xdg, 'lakebase-proxy', 'lakebase-proxy.env')}"`));
  assert.ok(unit.split('\n').includes(`Environment="XDG_CONFIG_HOME=${xdg}"`));
});

test('install refuses, writing nothing: no config file, a wrong setting in it, other options, an unknown action, another platform', async () => {
  const { host, home, calls } = fakeHost('linux');
  const unitFile = join(home, '.config', 'systemd', 'user', 'lakebase-proxy.service');
  await assert.rejects(service(host, 'install'), (e: Error) => e instanceof ConfigError && e.message.includes(join(home, '.config', 'lakebase-proxy', 'lakebase-proxy.yaml')));
  const bad = writeConfig(join(home, 'bad.yaml'), 'ListenPort: not-a-port\n');
  await assert.rejects(service(host, 'install', '--config', bad), /ListenPort/);
  const good = writeConfig(join(home, 'good.yaml'));
  await assert.rejects(service(host, 'install', '--config', good, '--port', '5433'), /--config FILE only/);
  await assert.rejects(service(host, 'reinstall'), /unknown action "reinstall"/);
  assert.ok(!existsSync(unitFile));
  assert.deepEqual(calls, []);
  await assert.rejects(service(fakeHost('win32').host, 'install'), /Linux .* and macOS .* only/);
});

test('Linux: a failed systemctl is reported with its command and output', async () => {
  const { host, home } = fakeHost('linux', {
    answer: (line) => (line.includes(' enable ') ? { code: 1, stderr: 'Failed to connect to bus: No medium found' } : undefined),
  });
  writeConfig(join(home, '.config', 'lakebase-proxy', 'lakebase-proxy.yaml'));
  await assert.rejects(service(host, 'install'), /systemctl --user enable lakebase-proxy\.service failed \(exit 1\): Failed to connect to bus/);
});

test('Linux: status says whether it is installed and running; uninstall stops it and removes the unit only', async () => {
  let state = { code: 0, stdout: 'active\n' };
  const { host, home, calls, said } = fakeHost('linux', { answer: (line) => (line.includes('is-active') ? state : undefined) });
  assert.equal(await service(host, 'status'), 1);
  assert.match(said.at(-1) as string, /not installed/);
  const config = writeConfig(join(home, '.config', 'lakebase-proxy', 'lakebase-proxy.yaml'));
  await service(host, 'install');
  said.length = 0;
  assert.equal(await service(host, 'status'), 0);
  assert.ok(said.includes('state: active') && said.includes(`config: ${config}`), said.join('\n'));
  state = { code: 3, stdout: 'inactive\n' };
  assert.equal(await service(host, 'status'), 1);
  assert.ok(said.includes('state: inactive'));

  calls.length = 0;
  assert.equal(await service(host, 'uninstall'), 0);
  assert.deepEqual(calls, ['systemctl --user disable --now lakebase-proxy.service', 'systemctl --user daemon-reload']);
  assert.ok(!existsSync(join(home, '.config', 'systemd', 'user', 'lakebase-proxy.service')));
  assert.ok(existsSync(config) && existsSync(join(home, '.config', 'lakebase-proxy', 'lakebase-proxy.env')));
  assert.equal(await service(host, 'uninstall'), 0);
  assert.match(said.at(-1) as string, /not installed/);
});

test('macOS: install writes a launchd agent (read back by plistlib) with the same command line, logs in ~/Library/Logs, and bootstraps it', async (t) => {
  const { host, home, calls, said } = fakeHost('darwin', { answer: (line) => (line.startsWith('launchctl print') ? { stdout: 'gui/501/lakebase-proxy = {\n\tstate = running\n}' } : undefined) });
  const config = writeConfig(join(home, 'Settings & <such>', 'lakebase-proxy.yaml'));
  assert.equal(await service(host, 'install', '--config', config), 0);
  const plistFile = join(home, 'Library', 'LaunchAgents', 'lakebase-proxy.plist');
  const envFile = join(home, 'Library', 'Application Support', 'lakebase-proxy', 'lakebase-proxy.env');
  const log = join(home, 'Library', 'Logs', 'lakebase-proxy', 'lakebase-proxy.log');
  assert.deepEqual(calls, ['launchctl bootout gui/501/lakebase-proxy', 'launchctl enable gui/501/lakebase-proxy', `launchctl bootstrap gui/501 ${plistFile}`]);
  assert.equal(statSync(envFile).mode & 0o777, 0o600);
  assert.ok(existsSync(join(log, '..')));
  assert.ok(said.some((line) => line.includes(log)));
  const plist = readPlist(plistFile);
  if (!plist) {
    t.skip('no /usr/bin/python3 to read the plist with');
    return;
  }
  assert.deepEqual(plist, {
    Label: 'lakebase-proxy',
    ProgramArguments: [process.execPath, `--env-file=${envFile}`, BIN, '--config', config],
    EnvironmentVariables: { LAKEBASE_PROXY_LOG_FORMAT: 'json' },
    RunAtLoad: true,
    KeepAlive: { SuccessfulExit: false },
    ThrottleInterval: 5,
    StandardOutPath: log,
    StandardErrorPath: log,
  });
  assert.equal(await service(host, 'status', '--config', config), 0);
  calls.length = 0;
  assert.equal(await service(host, 'uninstall', '--config', config), 0);
  assert.deepEqual(calls, ['launchctl bootout gui/501/lakebase-proxy']);
  assert.ok(!existsSync(plistFile));
});

let db: TestPostgres;
const token = 'service-token-' + Date.now();
before(async () => {
  db = await startTokenPostgres(token);
});
after(async () => db?.stop());

test("the service's command line, run as the service manager runs it: a session, its token read from the env file and never logged", async (t) => {
  const { host, home } = fakeHost('darwin');
  const config = writeConfig(
    join(home, 'proxy.yaml'),
    `Server: localhost\nPort: ${db.port}\nUser: ${JSON.stringify(db.tokenRole)}\nSSLRootCert: ${JSON.stringify(db.ca.caFile)}\nDatabase: ${db.database}\nNoHttp: true\n`,
  );
  await service(host, 'install', '--config', config);
  const envFile = join(home, 'Library', 'Application Support', 'lakebase-proxy', 'lakebase-proxy.env');
  writeFileSync(envFile, `LAKEBASE_PROXY_OAUTH_ACCESS_TOKEN=${token}\n`);
  const plist = readPlist(join(home, 'Library', 'LaunchAgents', 'lakebase-proxy.plist'));
  if (!plist) {
    t.skip('no /usr/bin/python3 to read the plist with');
    return;
  }
  const [program, ...args] = plist['ProgramArguments'] as string[];
  // A service manager's environment: no LAKEBASE_PROXY_* from a shell, the home folder, a PATH.
  const env = { HOME: home, PATH: '/usr/bin:/bin', ...(plist['EnvironmentVariables'] as Record<string, string>) };
  const proxy = await startProxyProcess([...args, '--port', String(await freePort())], env, 20_000, true, program);
  try {
    const client = proxyClient(proxy.port, db);
    await client.connect();
    assert.equal((await client.query('select current_user as who')).rows[0].who, db.tokenRole);
    await client.end();
  } finally {
    assert.equal(await proxy.stop('SIGTERM'), 0);
  }
  assert.ok(!proxy.output().includes(token));
});
