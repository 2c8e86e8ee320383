/**
 * Helpers shared by the reliability tests (test/reliability-*.test.ts): pg clients that never
 * crash the test on a socket error, polling, an upstream stand-in in front of the test Postgres
 * that a test can take down, bring back or break, and the resident memory of a process.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { connect as netConnect, createServer, type Server, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { connect as tlsConnect, createSecureContext, TLSSocket } from 'node:tls';
import pg from 'pg';
import { serialize } from 'pg-protocol';
import type { TestPostgres } from './harness/postgres.js';
import { proxyClient } from './harness/proxy.js';

/** Long variants (1 GiB, tens of thousands of connections) run only with this set to 1. */
export const LONG = process.env['LAKEBASE_PROXY_LONG_TESTS'] === '1';

/**
 * Drops the developer's LAKEBASE_PROXY_*, DATABRICKS_* and PG* variables from this process, so
 * the programs it starts read only the settings a test gives them.
 */
export function cleanEnvironment(): void {
  for (const key of Object.keys(process.env)) {
    if (/^(LAKEBASE_PROXY_(?!LONG_TESTS$)|DATABRICKS_|PG)/.test(key)) delete process.env[key];
  }
}

export const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** A pg client through a proxy on `port`; socket errors are left to the queries to report. */
export function pgClient(port: number, db: TestPostgres, extra: Partial<pg.ClientConfig> = {}): pg.Client {
  return proxyClient(port, db, { connectionTimeoutMillis: 15_000, ...extra });
}

/** current_user through the proxy on `port`: proof that it still serves a normal client. */
export async function whoAmI(port: number, db: TestPostgres, extra: Partial<pg.ClientConfig> = {}): Promise<string> {
  const c = pgClient(port, db, extra);
  await c.connect();
  try {
    return (await c.query<{ u: string }>('select current_user as u')).rows[0]?.u ?? '';
  } finally {
    await c.end().catch(() => {});
  }
}

/** The error a login through the proxy on `port` fails with. */
export async function loginError(port: number, db: TestPostgres): Promise<pg.DatabaseError> {
  const c = pgClient(port, db);
  try {
    await c.connect();
  } catch (error) {
    return error as pg.DatabaseError;
  } finally {
    await c.end().catch(() => {});
  }
  throw new Error('the login should have failed');
}

/** Polls `condition` until it holds; throws after `timeoutMs` naming `what`. */
export async function waitUntil(condition: () => boolean | Promise<boolean>, timeoutMs: number, what: string, everyMs = 25): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms`);
    await sleep(everyMs);
  }
}

/** Client backends whose application_name is `name`. */
export async function backendsNamed(db: TestPostgres, name: string): Promise<number> {
  const rows = await db.query<{ n: number }>("select count(*)::int as n from pg_stat_activity where application_name = $1 and backend_type = 'client backend'", [name]);
  return rows[0]?.n ?? 0;
}

/** VmRSS of a process in bytes (Linux). */
export function rssBytes(pid: number): number {
  const match = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!match) throw new Error(`no VmRSS for process ${pid}`);
  return Number(match[1]) * 1024;
}

/** Open file descriptors of a process (Linux). */
export function openFds(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

export function listen(server: Server): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      server.off('error', reject);
      resolve((server.address() as { port: number }).port);
    });
  });
}

/** Resolves with the first chunk a socket receives (the proxy's SSLRequest), pausing it. */
export function firstChunk(socket: Socket): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    socket.once('data', (chunk: Buffer) => {
      socket.pause();
      resolve(chunk);
    });
    socket.once('error', reject);
  });
}

/** A TCP server that runs `script` on each connection; close() destroys every socket. */
export async function startScripted(script: (socket: Socket) => void | Promise<void>): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.once('close', () => sockets.delete(socket));
    void Promise.resolve(script(socket)).catch(() => socket.destroy());
  });
  const port = await listen(server);
  return {
    port,
    close: () => {
      for (const s of sockets) s.destroy();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

/** One session through the stand-in: the side facing the proxy (raw TCP) and the one facing the server. */
export interface RelayedPair {
  readonly front: Socket;
  readonly frontTls: TLSSocket;
  readonly back: TLSSocket;
  /** Bytes sent to the proxy so far. */
  toProxy: number;
}

/**
 * An upstream stand-in: terminates the proxy's TLS with the test CA's localhost certificate and
 * relays to the test Postgres over its own TLS. A test can stop it listening (the proxy then gets
 * ECONNREFUSED) and start it again on the same port, and break one session in whatever way it
 * likes through `pairs`, while the other sessions go on.
 */
export interface UpstreamStandin {
  readonly port: number;
  readonly pairs: RelayedPair[];
  /** Stops listening; sessions already relayed go on. */
  down(): Promise<void>;
  /** Listens again on the same port. */
  up(): Promise<void>;
  close(): Promise<void>;
}

export async function startUpstreamStandin(db: TestPostgres): Promise<UpstreamStandin> {
  const context = createSecureContext({ cert: db.ca.serverCertPem, key: db.ca.serverKeyPem });
  const sockets = new Set<Duplex>();
  const pairs: RelayedPair[] = [];
  const track = <T extends Duplex>(s: T): T => {
    sockets.add(s);
    s.on('error', () => {});
    s.once('close', () => sockets.delete(s));
    return s;
  };
  const onConnection = async (raw: Socket): Promise<void> => {
    track(raw);
    await firstChunk(raw);
    raw.write('S');
    const front = track(new TLSSocket(raw, { isServer: true, secureContext: context }));
    await new Promise((resolve) => front.once('secure', resolve));
    const backRaw = track(netConnect({ host: '127.0.0.1', port: db.port }));
    backRaw.write(serialize.requestSsl());
    await firstChunk(backRaw);
    const back = track(tlsConnect({ socket: backRaw, ca: db.ca.caPem, servername: 'localhost' }));
    await new Promise((resolve) => back.once('secureConnect', resolve));
    const pair: RelayedPair = { front: raw, frontTls: front, back, toProxy: 0 };
    pairs.push(pair);
    back.on('data', (chunk: Buffer) => {
      pair.toProxy += chunk.length;
      if (!front.write(chunk)) back.pause();
    });
    front.on('drain', () => back.resume());
    front.pipe(back);
    front.once('close', () => back.destroy());
    back.once('close', () => front.destroy());
  };
  let server: Server | undefined;
  let port = 0;
  const start = async (): Promise<void> => {
    if (server) return;
    const s = createServer((raw) => void onConnection(raw).catch(() => raw.destroy()));
    await new Promise<void>((resolve, reject) => {
      s.once('error', reject);
      s.listen(port, '127.0.0.1', () => resolve());
    });
    port = (s.address() as { port: number }).port;
    server = s;
  };
  const stop = async (): Promise<void> => {
    const s = server;
    server = undefined;
    // close() calls back only once every relayed session has ended: those go on, by design.
    s?.close();
    await sleep(10);
  };
  await start();
  return {
    get port() {
      return port;
    },
    pairs,
    up: start,
    down: stop,
    async close() {
      const stopped = stop();
      for (const s of sockets) s.destroy();
      await stopped;
    },
  };
}

/** A CancelRequest on a new connection to the proxy. */
export async function cancelRequest(port: number, processId: number, secretKey: number): Promise<void> {
  const packet = Buffer.alloc(16);
  packet.writeInt32BE(16, 0);
  packet.writeInt32BE(80877102, 4);
  packet.writeInt32BE(processId, 8);
  packet.writeInt32BE(secretKey, 12);
  await new Promise<void>((resolve) => {
    const socket = netConnect({ host: '127.0.0.1', port }, () => socket.end(packet));
    socket.on('error', () => resolve());
    socket.on('close', () => resolve());
  });
}
