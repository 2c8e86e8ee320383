/** Starts the proxy in front of the test Postgres: in this process, or as the real program. */
import { spawn, type ChildProcess } from 'node:child_process';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { parseArgs } from '../../src/cli/args.js';
import { prepareTarget } from '../../src/cli/prepare.js';
import { loadConfig } from '../../src/config/load.js';
import { resolveProxy } from '../../src/config/target.js';
import { createLogger } from '../../src/ops/log.js';
import { ProxyServer } from '../../src/proxy/server.js';
import type { ProxyObserver } from '../../src/proxy/observer.js';
import type { TokenSource } from '../../src/token/token-source.js';
import { startTokenPostgres, type StartPostgresOptions, type TestPostgres } from './postgres.js';

export const BIN = fileURLToPath(new URL('../../../bin/lakebase-proxy.js', import.meta.url));

/** The connection string that reaches the test server as the token role with `token`. */
export function connectionFor(db: TestPostgres, token: string, extra = ''): string {
  return `Server=localhost;Port=${db.port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};OAuthAccessToken=${token};Database=${db.database}${extra ? ';' + extra : ''}`;
}

/**
 * A pg client for the proxy on `port`: 127.0.0.1, user 'anyone', `db`'s database; `extra` wins.
 * Socket errors are left to connect() and the queries to report (no 'error' crash).
 */
export function proxyClient(port: number, db: TestPostgres, extra: Partial<pg.ClientConfig> = {}): pg.Client {
  const c = new pg.Client({ host: '127.0.0.1', port, user: 'anyone', database: db.database, ...extra });
  c.on('error', () => {});
  return c;
}

export interface InProcessProxy {
  readonly server: ProxyServer;
  readonly port: number;
  /** Every log line written, as parsed JSON objects. */
  readonly logs: Array<Record<string, unknown>>;
  /** The raw log text, for searching for secrets. */
  logText(): string;
  close(): Promise<void>;
}

/**
 * `--relay` from LAKEBASE_PROXY_TEST_RELAY (native or js) unless the test chose one: CI runs the
 * relay suites once per relay this way.
 */
function withTestRelay(args: string[]): string[] {
  const relay = process.env['LAKEBASE_PROXY_TEST_RELAY'];
  return relay && !args.includes('--relay') ? [...args, '--relay', relay] : args;
}

export async function startProxy(
  args: string[],
  deps: { tokenSource?: TokenSource; observer?: ProxyObserver } = {},
): Promise<InProcessProxy> {
  const config = await loadConfig(parseArgs(['--port', '0', ...withTestRelay(args)]), {});
  const settings = (config.targets[0] as { settings: import('../../src/config/properties.js').Settings }).settings;
  const lines: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      lines.push(...chunk.toString('utf8').split('\n').filter(Boolean));
      callback();
    },
  });
  const logger = createLogger({ level: 'debug', format: 'json', destination });
  // A token source handed in replaces the one the settings describe (which may not even be complete).
  const prepared = deps.tokenSource ? { options: await resolveProxy(settings, 'test'), tokenSource: deps.tokenSource, locator: undefined } : await prepareTarget(settings, 'test', logger);
  const { tokenSource, locator } = prepared;
  const server = new ProxyServer(prepared.options, { tokenSource, locator, logger, ...(deps.observer ? { observer: deps.observer } : {}) });
  await server.listen();
  return {
    server,
    port: server.port,
    get logs() {
      return lines.map((line) => JSON.parse(line) as Record<string, unknown>);
    },
    logText: () => lines.join('\n'),
    async close() {
      await server.close();
      await tokenSource.close();
    },
  };
}

export interface ProxyProcess {
  readonly child: ChildProcess;
  readonly port: number;
  readonly socketPath: string | undefined;
  /** Everything the program wrote to stdout and stderr so far. */
  output(): string;
  /** Sends a signal and resolves with the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
  exited: Promise<number | null>;
}

/**
 * Runs `bin/lakebase-proxy.js` with `args` (plus `--port 0` unless a port is given, or `addPort`
 * is false so that a config file's ListenPort counts) until it logs "listening". `program`:
 * another command to run instead (an installed copy), with `env` as its whole environment rather
 * than added to this process's.
 */
export function startProxyProcess(args: string[], env: NodeJS.ProcessEnv = {}, timeoutMs = 15000, addPort = true, program?: string): Promise<ProxyProcess> {
  const withPort = withTestRelay(args.includes('--port') || !addPort ? args : ['--port', '0', ...args]);
  const [command, commandArgs] = program ? [program, withPort] : [process.execPath, [BIN, ...withPort]];
  const child = spawn(command, [...commandArgs, '--log-format', 'json'], {
    env: program ? env : { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return new Promise<ProxyProcess>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`proxy did not start in ${timeoutMs} ms:\n${output}`));
    }, timeoutMs);
    const onData = (chunk: Buffer): void => {
      output += chunk.toString('utf8');
      for (const line of output.split('\n').slice(0, -1)) {
        if (!line.startsWith('{')) continue;
        const entry = JSON.parse(line) as { msg?: string; port?: number; socket?: string };
        if (entry.msg === 'listening') {
          clearTimeout(timer);
          resolve({
            child,
            port: entry.port as number,
            socketPath: entry.socket,
            output: () => output,
            exited,
            stop: (signal: NodeJS.Signals = 'SIGTERM') => {
              child.kill(signal);
              return exited;
            },
          });
          return;
        }
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`proxy exited with ${code} before listening:\n${output}`));
    });
  });
}

/** A test Postgres whose token role logs in with a token, and a proxy in front of it. */
export interface ProxiedPostgres<P> {
  readonly db: TestPostgres;
  readonly proxy: P;
  /** Stops the proxy, then Postgres. */
  close(): Promise<void>;
}

async function proxied<P>(
  token: string,
  postgres: StartPostgresOptions,
  start: (db: TestPostgres) => Promise<P>,
  stop: (proxy: P) => Promise<unknown>,
): Promise<ProxiedPostgres<P>> {
  const db = await startTokenPostgres(token, postgres);
  let proxy: P;
  try {
    proxy = await start(db);
  } catch (error) {
    await db.stop();
    throw error;
  }
  return {
    db,
    proxy,
    async close() {
      await stop(proxy);
      await db.stop();
    },
  };
}

/**
 * A test Postgres whose token role logs in with `token`, and an in-process proxy to it started
 * with `--connection connectionFor(db, token)` and then `args`.
 */
export function startProxiedPostgres(token: string, args: string[] = [], postgres: StartPostgresOptions = {}): Promise<ProxiedPostgres<InProcessProxy>> {
  return proxied(token, postgres, (db) => startProxy(['--connection', connectionFor(db, token), ...args]), (proxy) => proxy.close());
}

/** The same with the real program (`bin/lakebase-proxy.js`), stopped by SIGINT. */
export function startProxiedPostgresProcess(token: string, args: string[] = [], postgres: StartPostgresOptions = {}): Promise<ProxiedPostgres<ProxyProcess>> {
  return proxied(token, postgres, (db) => startProxyProcess(['--connection', connectionFor(db, token), ...args]), (proxy) => proxy.stop('SIGINT'));
}
