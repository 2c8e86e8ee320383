/** What the desk review's tests share (native/txclient.c, lp_desk; src/pool/desk.ts). */
import { createServer, connect as netConnect, type Server, type Socket } from 'node:net';
import pg from 'pg';
import type { TestPostgres } from './harness/postgres.js';
import type { InProcessProxy } from './harness/proxy.js';
import { native } from '../src/proxy/native-relay.js';
import { serialize, WireClient, type summary } from './harness/wire.js';

type Message = Parameters<typeof summary>[0];

export const wireOpen = (port: number, db: TestPostgres, extra: Record<string, string> = {}): Promise<WireClient> =>
  WireClient.open(port, { user: 'anyone', database: db.database, ...extra });

/** One simple Query and its answers up to ReadyForQuery. */
export async function ask(w: WireClient, sql: string, timeoutMs = 20_000): Promise<Message[]> {
  w.send(serialize.query(sql));
  return await w.untilReady(1, timeoutMs);
}

/** The first field of the first DataRow, or the error's code. */
export function firstValue(messages: Message[]): string | undefined {
  const error = messages.find((m) => m.name === 'error') as unknown as { code?: string; message?: string } | undefined;
  if (error) return `error ${error.code ?? ''} ${error.message ?? ''}`;
  const row = messages.find((m) => m.name === 'dataRow') as unknown as { fields: Array<string | null> } | undefined;
  return row?.fields[0] ?? undefined;
}

/** The pool's desk stats (undefined: no desk). */
export function deskStats(proxy: InProcessProxy, db: TestPostgres): { idle: number; count: number; waiting: number; maxWaitMs: number } | undefined {
  return proxy.server.pools.get(db.database)?.desk?.stats;
}

/**
 * A TCP forwarder to the test Postgres (TLS stays end to end). Once `hold()` was called, every
 * new connection is held (nothing forwarded) until `release()`: with the pool's connections all
 * open already, that is the proxy's CancelRequest connection (sendCancel opens a new one).
 *
 * Half-closes go through as they are: the proxy's end reaches the server, and the proxy sees its
 * connection end only once the server ended it. (A forwarder that ends the proxy's side as soon as
 * the proxy ends its own tells the proxy a CancelRequest arrived before the server even read it.)
 * Once `mute()` was called, a new connection that the proxy ends gets nothing more of the server's,
 * nor its close: a server that never says it took the proxy's CancelRequest.
 */
export async function startHoldingForwarder(db: TestPostgres): Promise<{
  port: number;
  hold(): void;
  mute(): void;
  readonly held: number;
  release(): void;
  close(): Promise<void>;
}> {
  const sockets = new Set<Socket>();
  let holding = false;
  let muting = false;
  const waiting: Array<() => void> = [];
  let held = 0;
  const pipeTo = (front: Socket, muted: boolean): void => {
    const back = netConnect({ host: '127.0.0.1', port: db.port, allowHalfOpen: true });
    sockets.add(back);
    let silent = false; // muted, and the proxy ended its side
    front.pipe(back, { end: false });
    front.on('end', () => {
      if (muted) {
        silent = true;
        back.unpipe(front);
        back.resume();
      }
      back.end();
    });
    back.pipe(front);
    back.on('error', () => {
      if (!silent) front.destroy();
    });
    back.once('close', () => {
      sockets.delete(back);
      if (!silent) front.end();
    });
    front.once('close', () => back.destroy());
    front.resume();
  };
  const server: Server = createServer({ allowHalfOpen: true }, (front) => {
    sockets.add(front);
    front.on('error', () => {});
    front.once('close', () => sockets.delete(front));
    if (!holding) {
      pipeTo(front, muting);
      return;
    }
    front.pause();
    held++;
    waiting.push(() => pipeTo(front, muting));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  return {
    port: (server.address() as { port: number }).port,
    hold() {
      holding = true;
    },
    mute() {
      muting = true;
    },
    get held() {
      return held;
    },
    release() {
      holding = false;
      for (const go of waiting.splice(0)) go();
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** A superuser session holding ACCESS EXCLUSIVE on `table` until `open()`: a query reading it waits until then. */
export async function lockGate(db: TestPostgres, table: string): Promise<{ open(): Promise<void>; close(): Promise<void> }> {
  const locker = new pg.Client({ host: db.socketDir, port: db.port, user: db.superuser.user, database: db.database });
  locker.on('error', () => {});
  await locker.connect();
  await locker.query(`begin; lock table ${table} in access exclusive mode`);
  return {
    open: async () => void (await locker.query('commit')),
    close: () => locker.end().catch(() => {}),
  };
}

/** Whether a query whose text contains `marker` waits on a lock (and so runs). */
export async function waitsOnLock(db: TestPostgres, marker: string): Promise<boolean> {
  const rows = await db.query(`select 1 from pg_stat_activity where wait_event_type = 'Lock' and query like $1 and pid <> pg_backend_pid()`, [`%${marker}%`]);
  return rows.length > 0;
}

/** These tests watch the desk itself: without the native fast path (no build, or LAKEBASE_PROXY_TEST_RELAY=js) there is none. */
export const deskSkip = native.addon === undefined || process.env['LAKEBASE_PROXY_TEST_RELAY'] === 'js' ? 'no desk without the native fast path' : false;

/** The promise's value, or undefined when it fails (chaos: failures are expected). */
export async function quietly<T>(p: Promise<T>): Promise<T | undefined> {
  try {
    return await p;
  } catch {
    return undefined;
  }
}

/**
 * The chaos both chaos tests put the pool through until `running()` says stop, a step every 100
 * to 200 ms: backends terminated (idle, then busy), PAUSE and RESUME, reloads of PoolSize to 1, 4
 * and 3. CHAOS_ONLY=0,3 (step numbers) narrows it down when one fails.
 */
export async function poolChaos(proxy: InProcessProxy, db: TestPostgres, random: (n: number) => number, running: () => boolean): Promise<void> {
  for (let step = 1; running(); step++) {
    await new Promise((resolve) => setTimeout(resolve, 100 + random(100)));
    const p = proxy.server.pools.get(db.database);
    if (!p) continue;
    const only = process.env['CHAOS_ONLY'];
    if (only !== undefined && !only.split(',').includes(String(step % 6))) continue;
    switch (step % 6) {
      case 0:
        await quietly(db.query(`select pg_terminate_backend(pid) from pg_stat_activity where usename = $1 and state = 'idle' and random() < 0.5`, [db.tokenRole]));
        break;
      case 1:
        await quietly(db.query(`select pg_terminate_backend(pid) from pg_stat_activity where usename = $1 and state = 'active' and random() < 0.3`, [db.tokenRole]));
        break;
      case 2:
        p.pause();
        await new Promise((resolve) => setTimeout(resolve, random(50)));
        p.resume();
        break;
      case 3:
        p.update({ ...p.settings, size: 1 });
        break;
      case 4:
        p.update({ ...p.settings, size: 4 });
        break;
      case 5:
        p.update({ ...p.settings, size: 3 });
        break;
    }
  }
}
