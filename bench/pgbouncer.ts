/**
 * PgBouncer as the reference pooler: session mode, TLS to the server with the token role's
 * password (what the proxy does), plain toward the client, any client user name accepted (the
 * proxy's trust on loopback). Runs as the PostgreSQL OS user when we are root: it refuses root.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { postgresOsUser } from '../test/harness/certs.js';
import { cpuSeconds, rssKiB } from './proxy-process.js';

export interface PgBouncer {
  readonly port: number;
  readonly pid: number;
  readonly version: string;
  rssKiB(): number;
  cpuSeconds(): number;
  logTail(): string;
  stop(): Promise<void>;
}

export interface PgBouncerOptions {
  readonly serverHost: string;
  readonly serverPort: number;
  readonly database: string;
  readonly user: string;
  readonly password: string;
  /** PEM file of the CA that signed the server certificate (readable by the OS user). */
  readonly caFile: string;
  /** Room for this many client sessions, each with its own server connection. */
  readonly maxSessions: number;
  /** Transaction pooling on this many server connections, instead of a session per client. */
  readonly transactionPool?: number;
  /** A log line per client connect and disconnect (PgBouncer's default, and the proxy's one line per session); default off. */
  readonly logSessions?: boolean;
}

const CANDIDATES = ['/usr/sbin/pgbouncer', '/usr/bin/pgbouncer', '/usr/local/bin/pgbouncer'];

/** The pgbouncer executable, or undefined when it is not installed. */
export function findPgBouncer(): string | undefined {
  for (const path of CANDIDATES) if (existsSync(path)) return path;
  const which = spawnSync('/bin/sh', ['-c', 'command -v pgbouncer'], { encoding: 'utf8' });
  const found = which.stdout.trim();
  return which.status === 0 && found ? found : undefined;
}

/** A value in a pgbouncer connection string: single quotes, a quote doubled. */
function quoted(value: string): string {
  return `'${value.replace(/'/g, "''")}'`;
}

export async function startPgBouncer(exe: string, options: PgBouncerOptions): Promise<PgBouncer> {
  const user = postgresOsUser();
  const dir = mkdtempSync(join(existsSync('/tmp') ? '/tmp' : tmpdir(), 'lbp-bench-pgbouncer-'));
  chmodSync(dir, 0o700);
  if (user) chownSync(dir, user.uid, user.gid);
  const port = await freePort();
  const logFile = join(dir, 'pgbouncer.log');
  const server = [
    `host=${options.serverHost}`,
    `port=${options.serverPort}`,
    `dbname=${quoted(options.database)}`,
    `user=${quoted(options.user)}`,
    `password=${quoted(options.password)}`,
  ].join(' ');
  const pool = options.maxSessions + 100;
  const ini = [
    '[databases]',
    `${options.database} = ${server}`,
    '',
    '[pgbouncer]',
    'listen_addr = 127.0.0.1',
    `listen_port = ${port}`,
    'unix_socket_dir =',
    'auth_type = any',
    `pool_mode = ${options.transactionPool ? 'transaction' : 'session'}`,
    `max_client_conn = ${pool}`,
    `default_pool_size = ${options.transactionPool ?? pool}`,
    'server_tls_sslmode = verify-full',
    `server_tls_ca_file = ${options.caFile}`,
    'server_reset_query = DISCARD ALL',
    'ignore_startup_parameters = extra_float_digits,options,search_path',
    `logfile = ${logFile}`,
    `pidfile = ${join(dir, 'pgbouncer.pid')}`,
    `log_connections = ${options.logSessions ? 1 : 0}`,
    `log_disconnections = ${options.logSessions ? 1 : 0}`,
    'log_pooler_errors = 1',
    'stats_period = 3600',
    '',
  ].join('\n');
  const iniFile = join(dir, 'pgbouncer.ini');
  writeFileSync(iniFile, ini, { mode: 0o600 });
  if (user) chownSync(iniFile, user.uid, user.gid);

  const version = (spawnSync(exe, ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0] ?? '').trim();
  const child: ChildProcess = spawn(exe, [iniFile], {
    ...(user ? { uid: user.uid, gid: user.gid } : {}),
    cwd: dir,
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => (stderr = (stderr + chunk.toString('utf8')).slice(-8192)));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const logTail = (): string => {
    let log = '';
    try {
      log = readFileSync(logFile, 'utf8').slice(-8192);
    } catch {
      // not written yet
    }
    return `${stderr}${log}`;
  };
  const stop = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGINT');
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
    rmSync(dir, { recursive: true, force: true });
  };
  process.once('exit', () => {
    if (child.exitCode === null) child.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  });

  const deadline = Date.now() + 10_000;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) {
      await stop();
      throw new Error(`pgbouncer exited during startup:\n${logTail()}`);
    }
    if (await canConnect(port)) break;
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`pgbouncer did not listen within 10 s:\n${logTail()}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const pid = child.pid ?? -1;
  return { port, pid, version, rssKiB: () => rssKiB(pid), cpuSeconds: () => cpuSeconds(pid), logTail, stop };
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/** A free TCP port on the loopback. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => (address && typeof address === 'object' ? resolve(address.port) : reject(new Error('no port'))));
    });
  });
}
