/**
 * The proxy as `serve` runs it (a Runtime: targets, listeners, the admin console), in this
 * process, and clients of its console: node-postgres for the answers' structure, psql where it
 * is installed for what a person types.
 */
import { Writable } from 'node:stream';
import pg from 'pg';
import { parseArgs } from '../../src/cli/args.js';
import { Runtime } from '../../src/cli/runtime.js';
import { loadConfig } from '../../src/config/load.js';
import { createLogger } from '../../src/ops/log.js';
import { Metrics } from '../../src/ops/metrics.js';
import type { TestPostgres } from './postgres.js';
import { findTool, run, type Ran } from './tools.js';

export interface RunningRuntime {
  readonly runtime: Runtime;
  /** The TCP port the listener of `target` (default: the first) is bound to. */
  port(target?: string): number;
  /** Who asked for a shutdown through the console. */
  readonly shutdowns: string[];
  readonly logs: Array<Record<string, unknown>>;
  logText(): string;
  close(): Promise<void>;
}

/** Starts the proxy with `argv` (flags, --connection, --config), reading only `env` from the environment. */
export async function startRuntime(argv: string[], env: NodeJS.ProcessEnv = {}): Promise<RunningRuntime> {
  const args = parseArgs(argv);
  const config = await loadConfig(args, env);
  const lines: string[] = [];
  const destination = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      lines.push(...chunk.toString('utf8').split('\n').filter(Boolean));
      callback();
    },
  });
  const logger = createLogger({ level: 'debug', format: 'json', destination });
  const shutdowns: string[] = [];
  const runtime = new Runtime({ args, env, logger, metrics: new Metrics(), version: 'lakebase-proxy 0.0.0-test', shutdown: (by) => shutdowns.push(by) }, config);
  const prepared = await runtime.prepare();
  try {
    await runtime.listen();
  } catch (error) {
    await runtime.abandon(prepared);
    throw error;
  }
  return {
    runtime,
    port: (target) => {
      const found = runtime.targets().find((t) => target === undefined || t.name === target);
      if (!found) throw new Error(`no target ${target ?? ''}`);
      return found.listener.port;
    },
    shutdowns,
    get logs() {
      return lines.map((line) => JSON.parse(line) as Record<string, unknown>);
    },
    logText: () => lines.join('\n'),
    async close() {
      for (const server of runtime.servers) await server.close();
      await runtime.close();
    },
  };
}

/** The top of a config file whose targets log in to `db` as its token role with `token`, their unix sockets in `socketDir`. */
export function configTop(db: TestPostgres, token: string, socketDir: string): string[] {
  return [
    'Server: localhost',
    `Port: ${db.port}`,
    `SSLRootCert: ${db.ca.caFile}`,
    `User: "${db.tokenRole}"`,
    `OAuthAccessToken: ${token}`,
    `Database: ${db.database}`,
    `UnixSocket: ${socketDir}`,
  ];
}

/** Where a console client connects: TCP (127.0.0.1) or the unix socket folder. */
export interface ConsoleAddress {
  readonly host: string;
  readonly port: number;
  readonly user?: string;
  readonly password?: string;
  readonly database?: string;
}

/** A node-postgres client of the console (not yet connected; errors left to the caller). */
export function consoleClient(address: ConsoleAddress): pg.Client {
  const client = new pg.Client({
    host: address.host,
    port: address.port,
    user: address.user ?? 'admin',
    database: address.database ?? 'lakebase_proxy',
    ...(address.password !== undefined ? { password: address.password } : {}),
    connectionTimeoutMillis: 10_000,
  });
  client.on('error', () => {});
  return client;
}

/** One console query on a fresh connection: its rows and column names, or the error it got. */
export async function consoleQuery(address: ConsoleAddress, sql: string): Promise<{ columns: string[]; rows: Array<Record<string, unknown>> }> {
  const client = consoleClient(address);
  await client.connect();
  try {
    const result = await client.query(sql);
    return { columns: result.fields.map((f) => f.name), rows: result.rows as Array<Record<string, unknown>> };
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** The SQLSTATE a console query fails with ('ok' when it does not). */
export async function consoleState(address: ConsoleAddress, sql: string): Promise<string> {
  try {
    await consoleQuery(address, sql);
    return 'ok';
  } catch (error) {
    return (error as { code?: string }).code ?? (error as Error).message;
  }
}

export const psql = findTool('psql');

/** psql -c `sql` against the console (unaligned, tuples with headers), or undefined when psql is not installed. */
export function psqlConsole(address: ConsoleAddress, sql: string): Promise<Ran> {
  if (!psql) throw new Error('psql is not installed');
  const conninfo = [`host=${address.host}`, `port=${address.port}`, `user=${address.user ?? 'admin'}`, `dbname=${address.database ?? 'lakebase_proxy'}`, 'connect_timeout=10'].join(' ');
  return run(psql, ['-X', '-A', '-v', 'ON_ERROR_STOP=1', '-v', 'VERBOSITY=verbose', '-c', sql, conninfo], {
    env: address.password !== undefined ? { PGPASSWORD: address.password } : { PGPASSWORD: '' },
    timeoutMs: 30_000,
  });
}
