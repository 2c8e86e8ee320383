/**
 * `npm run bench:transaction`: PoolMode=transaction side by side with PgBouncer in transaction
 * mode (same pool size), in one run, on one Postgres.
 *
 * - pgbench -S with --clients (1,000) over PoolSize --pool-size (20), -M simple and -M extended,
 *   both paths alternated round by round; and -M prepared through the proxy (PgBouncer before
 *   1.21 cannot serve it in this mode). tps, failed transactions, and the most upstream
 *   connections seen in pg_stat_activity (sampled every 20 ms) during each run.
 * - What a message-level transaction pool costs: pgbench -S at --pool-size clients through the
 *   proxy in session mode (the native relay's byte pipe) and in transaction mode (every message
 *   read, a connection taken and given back per transaction).
 * - Each path gets 3 s of pgbench first, not recorded (a fresh process runs slowly until its JIT
 *   settles: 300 tps in the first 2 s, 3,000 after, measured here).
 * - --idle clients (10,000) held open in transaction mode: the proxy's RSS before and after, per
 *   client, and its upstream connections meanwhile.
 */
import { connect, type Socket } from 'node:net';
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { serialize } from 'pg-protocol';
import { startTokenPostgres, type TestPostgres } from '../test/harness/postgres.js';
import { findPgBouncer, startPgBouncer, type PgBouncer } from './pgbouncer.js';
import { startBenchProxy, type BenchProxy } from './proxy-process.js';
import { findPgbench, pgbenchInit, pgbenchSelect, type PgbenchResult } from './measure/pgbench.js';

interface Options {
  clients: number;
  poolSize: number;
  seconds: number;
  rounds: number;
  idle: number;
}

function parse(argv: readonly string[]): Options {
  const options: Options = { clients: 1000, poolSize: 20, seconds: 10, rounds: 2, idle: 10_000 };
  for (let i = 0; i < argv.length; i++) {
    const value = Number(argv[i + 1]);
    const key = argv[i];
    if (key === '--quick') {
      Object.assign(options, { clients: 100, seconds: 2, rounds: 1, idle: 500 });
      continue;
    }
    const name = { '--clients': 'clients', '--pool-size': 'poolSize', '--seconds': 'seconds', '--rounds': 'rounds', '--idle': 'idle' }[key ?? ''] as keyof Options | undefined;
    if (!name || !Number.isInteger(value) || value <= 0) throw new Error(`unknown option or bad value: ${key} ${argv[i + 1] ?? ''}`);
    options[name] = value;
    i++;
  }
  return options;
}

/** PgBouncer logs in as its own role, so that each path's upstream connections can be counted apart. */
const BOUNCER_ROLE = 'lbp_bouncer';

/** The most backends of `role` seen while `fn` runs. */
async function watchingUpstream<T>(db: TestPostgres, role: string, fn: () => Promise<T>): Promise<[T, number]> {
  let most = 0;
  let watching = true;
  const count = async (): Promise<number> => (await db.query<{ n: number }>(`select count(*)::int as n from pg_stat_activity where usename = '${role}'`))[0]?.n ?? 0;
  const watcher = (async () => {
    while (watching) {
      most = Math.max(most, await count().catch(() => 0));
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  })();
  try {
    return [await fn(), most];
  } finally {
    watching = false;
    await watcher;
  }
}

/** `count` plain connections through the startup to ReadyForQuery, `batch` at a time; they stay open. */
async function openIdle(port: number, database: string, count: number, batch = 200): Promise<Socket[]> {
  const sockets: Socket[] = [];
  const one = (): Promise<Socket> =>
    new Promise((resolve, reject) => {
      const socket = connect({ host: '127.0.0.1', port });
      let seen = Buffer.alloc(0);
      socket.once('error', reject);
      socket.once('connect', () => socket.write(serialize.startup({ user: 'bench', database })));
      const onData = (chunk: Buffer): void => {
        seen = Buffer.concat([seen, chunk]);
        // The greeting ends with ReadyForQuery: 'Z', length 5, status.
        if (seen.length >= 6 && seen[seen.length - 6] === 0x5a) {
          socket.off('data', onData);
          socket.pause();
          resolve(socket);
        } else if (seen.includes(Buffer.from('SFATAL'))) {
          reject(new Error(`refused: ${seen.toString('latin1').replace(/[^\x20-\x7e]/g, ' ')}`));
        }
      };
      socket.on('data', onData);
    });
  for (let done = 0; done < count; done += batch) {
    sockets.push(...(await Promise.all(Array.from({ length: Math.min(batch, count - done) }, one))));
  }
  return sockets;
}

interface Run {
  readonly path: string;
  readonly protocol: string;
  readonly clients: number;
  readonly result: PgbenchResult;
  readonly mostUpstream: number;
}

async function main(): Promise<void> {
  const options = parse(process.argv.slice(2));
  const pgbench = findPgbench();
  if (!pgbench) throw new Error('pgbench is not installed: apt-get install postgresql-client');
  const token = 'tok-bench-' + Date.now();
  const db = await startTokenPostgres(token, { extraConf: { max_connections: '200', log_min_messages: 'warning' } });
  const stops: Array<() => Promise<unknown>> = [() => db.stop()];
  const runs: Run[] = [];
  let idle: { clients: number; rssBeforeKiB: number; rssAfterKiB: number; perClientKiB: number; secondHalfPerClientKiB: number; mostUpstream: number } | undefined;
  try {
    await db.setTokenPassword(token);
    const owner = { PGHOST: '127.0.0.1', PGPORT: String(db.port), PGUSER: db.tokenRole, PGPASSWORD: token, PGDATABASE: db.database, PGSSLMODE: 'verify-ca', PGSSLROOTCERT: db.ca.caFile };
    await pgbenchInit(pgbench, owner, 1);
    await db.query(`create role ${BOUNCER_ROLE} login password '${token}'`);
    await db.query(`grant select on all tables in schema public to ${BOUNCER_ROLE}`);
    const upstream = `Server=127.0.0.1;Port=${db.port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};OAuthAccessToken=${token};Database=${db.database}`;
    const start = (mode: string): Promise<BenchProxy> =>
      startBenchProxy({ args: ['--connection', upstream, '--no-http'], env: { LAKEBASE_PROXY_POOL_MODE: mode, LAKEBASE_PROXY_POOL_SIZE: String(options.poolSize) } });
    const transaction = await start('transaction');
    stops.push(() => transaction.stop());
    const bouncerExe = findPgBouncer();
    let bouncer: PgBouncer | undefined;
    if (bouncerExe) {
      bouncer = await startPgBouncer(bouncerExe, {
        serverHost: '127.0.0.1',
        serverPort: db.port,
        database: db.database,
        user: BOUNCER_ROLE,
        password: token,
        caFile: db.ca.caFile,
        maxSessions: options.clients,
        transactionPool: options.poolSize,
      });
      stops.push(() => (bouncer as PgBouncer).stop());
    }
    const libpq = (port: number): Record<string, string> => ({ PGHOST: '127.0.0.1', PGPORT: String(port), PGUSER: 'bench', PGDATABASE: db.database, PGSSLMODE: 'disable' });
    const measure = async (path: string, port: number, protocol: 'simple' | 'extended' | 'prepared', clients: number): Promise<void> => {
      const role = path.startsWith('pgbouncer') ? BOUNCER_ROLE : db.tokenRole;
      const [result, mostUpstream] = await watchingUpstream(db, role, () => pgbenchSelect(pgbench, libpq(port), clients, options.seconds, protocol));
      runs.push({ path, protocol, clients, result, mostUpstream });
      process.stdout.write(`${path.padEnd(26)} -M ${protocol.padEnd(8)} ${String(clients).padStart(5)} clients  ${result.tps.toFixed(0).padStart(7)} tps  failed ${result.failed}  upstream at most ${mostUpstream}\n`);
    };
    // Warm-up, not recorded: the first seconds through a fresh process run before its JIT settles.
    for (const port of [transaction.port, ...(bouncer ? [bouncer.port] : [])]) await pgbenchSelect(pgbench, libpq(port), options.clients, 3, 'simple');
    for (let round = 0; round < options.rounds; round++) {
      for (const protocol of ['simple', 'extended'] as const) {
        const paths: Array<[string, number]> = [['proxy transaction', transaction.port], ...(bouncer ? [[`pgbouncer transaction`, bouncer.port] as [string, number]] : [])];
        if (round % 2 === 1) paths.reverse();
        for (const [path, port] of paths) await measure(path, port, protocol, options.clients);
      }
      await measure('proxy transaction', transaction.port, 'prepared', options.clients);
      // What reading every message and a connection per transaction cost, against the byte pipe
      // (the session-mode proxy runs only now: its connections would count as the other's).
      const session = await start('session');
      const few: Array<[string, number]> = [
        ['proxy session (native)', session.port],
        ['proxy transaction', transaction.port],
      ];
      if (round % 2 === 1) few.reverse();
      for (const [path, port] of few) await measure(path, port, 'simple', options.poolSize);
      await session.stop();
    }
    // RSS includes the heap's own growth steps: the second half's growth is the steadier figure.
    const before = transaction.rssKiB();
    const half = Math.floor(options.idle / 2);
    const [sockets, mostUpstream] = await watchingUpstream(db, db.tokenRole, async () => {
      const first = await openIdle(transaction.port, db.database, half);
      await new Promise((resolve) => setTimeout(resolve, 1000));
      const middle = transaction.rssKiB();
      const second = await openIdle(transaction.port, db.database, options.idle - half);
      await new Promise((resolve) => setTimeout(resolve, 1000));
      return { all: [...first, ...second], middle };
    });
    const after = transaction.rssKiB();
    idle = {
      clients: sockets.all.length,
      rssBeforeKiB: before,
      rssAfterKiB: after,
      perClientKiB: (after - before) / sockets.all.length,
      secondHalfPerClientKiB: (after - sockets.middle) / (options.idle - half),
      mostUpstream,
    };
    process.stdout.write(
      `${sockets.all.length} idle clients in transaction mode: RSS ${before} KiB -> ${after} KiB, ${idle.perClientKiB.toFixed(1)} KiB per client (second half ${idle.secondHalfPerClientKiB.toFixed(1)}); upstream at most ${mostUpstream}\n`,
    );
    for (const socket of sockets.all) socket.destroy();
  } finally {
    for (const stop of stops.reverse()) await stop().catch(() => {});
  }
  const results = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'bench', 'results');
  mkdirSync(results, { recursive: true });
  writeFileSync(join(results, 'transaction-latest.json'), JSON.stringify({ at: new Date().toISOString(), options, runs, idle }, null, 2));
}

await main();
