/**
 * `npm run bench:cpu`: CPU per transaction of the proxy in PoolMode=transaction against PgBouncer
 * in transaction mode, side by side on one Postgres: pgbench -S with --clients over PoolSize
 * --pool-size, each path's CPU time (user + system, from /proc) around each run divided by the
 * transactions it served. Throughput depends on what else the machine runs; CPU per unit of work
 * much less, which makes this the figure to compare builds with. Also prints how many of the
 * proxy's transactions its native fast path carried (pool_fast_path_transactions_total), and of
 * those, how many C handed on itself (pool_desk_transactions_total). `--protocol prepared` compares
 * the proxy with itself on `-M extended` instead (PgBouncer 1.18 cannot serve prepared statements
 * in transaction mode).
 *
 *   node dist/bench/cpu.js [--clients N] [--pool-size N] [--seconds N] [--rounds N] [--protocol simple|extended|prepared] [--cpu-prof DIR]
 */
import { startTokenPostgres } from '../test/harness/postgres.js';
import { findPgBouncer, freePort, startPgBouncer } from './pgbouncer.js';
import { startBenchProxy } from './proxy-process.js';
import { findPgbench, pgbenchInit, pgbenchSelect } from './measure/pgbench.js';

interface Options {
  clients: number;
  poolSize: number;
  seconds: number;
  rounds: number;
  protocol: 'simple' | 'extended' | 'prepared';
  /** A folder for a V8 CPU profile of the proxy (node --cpu-prof; node dist/bench/profile-summary.js DIR). */
  cpuProf?: string;
}

function parse(argv: readonly string[]): Options {
  const options: Options = { clients: 1000, poolSize: 20, seconds: 8, rounds: 3, protocol: 'simple' };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i];
    const value = argv[i + 1] ?? '';
    if (key === '--protocol' && (value === 'simple' || value === 'extended' || value === 'prepared')) {
      options.protocol = value;
      continue;
    }
    if (key === '--cpu-prof' && value !== '') {
      options.cpuProf = value;
      continue;
    }
    const name = { '--clients': 'clients', '--pool-size': 'poolSize', '--seconds': 'seconds', '--rounds': 'rounds' }[key ?? ''] as 'clients' | 'poolSize' | 'seconds' | 'rounds' | undefined;
    const number = Number(value);
    if (!name || !Number.isInteger(number) || number <= 0) throw new Error(`unknown option or bad value: ${key} ${value}`);
    options[name] = number;
  }
  return options;
}

async function metric(httpPort: number, name: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${httpPort}/metrics`)).text();
  return text
    .split('\n')
    .filter((line) => line.startsWith(`lakebase_proxy_${name}{`))
    .reduce((sum, line) => sum + Number(line.split(' ').at(-1)), 0);
}

async function main(): Promise<void> {
  const options = parse(process.argv.slice(2));
  const pgbench = findPgbench();
  const bouncerExe = findPgBouncer();
  if (!pgbench || !bouncerExe) throw new Error('bench:cpu needs pgbench and pgbouncer (apt-get install postgresql-client pgbouncer)');
  const token = 'tok-bench-' + Date.now();
  const db = await startTokenPostgres(token, { extraConf: { max_connections: '200', log_min_messages: 'warning' } });
  const stops: Array<() => Promise<unknown>> = [() => db.stop()];
  try {
    await db.setTokenPassword(token);
    const owner = { PGHOST: '127.0.0.1', PGPORT: String(db.port), PGUSER: db.tokenRole, PGPASSWORD: token, PGDATABASE: db.database, PGSSLMODE: 'verify-ca', PGSSLROOTCERT: db.ca.caFile };
    await pgbenchInit(pgbench, owner, 1);
    const bouncerRole = 'lbp_bouncer';
    await db.query(`create role ${bouncerRole} login password '${token}'`);
    await db.query(`grant select on all tables in schema public to ${bouncerRole}`);
    const httpPort = await freePort();
    const upstream = `Server=127.0.0.1;Port=${db.port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};OAuthAccessToken=${token};Database=${db.database}`;
    const proxy = await startBenchProxy({
      args: ['--connection', upstream, '--http-port', String(httpPort)],
      env: { LAKEBASE_PROXY_POOL_MODE: 'transaction', LAKEBASE_PROXY_POOL_SIZE: String(options.poolSize) },
      ...(options.cpuProf === undefined ? {} : { nodeArgs: ['--cpu-prof', `--cpu-prof-dir=${options.cpuProf}`, '--cpu-prof-name=transaction.cpuprofile'] }),
    });
    stops.push(() => proxy.stop());
    const bouncer = await startPgBouncer(bouncerExe, {
      serverHost: '127.0.0.1',
      serverPort: db.port,
      database: db.database,
      user: bouncerRole,
      password: token,
      caFile: db.ca.caFile,
      maxSessions: options.clients,
      transactionPool: options.poolSize,
    });
    stops.push(() => bouncer.stop());
    const libpq = (port: number): Record<string, string> => ({ PGHOST: '127.0.0.1', PGPORT: String(port), PGUSER: 'bench', PGDATABASE: db.database, PGSSLMODE: 'disable' });
    const other =
      options.protocol === 'prepared'
        ? { name: 'proxy', port: proxy.port, protocol: 'extended' as const, cpu: () => proxy.cpuSeconds(), perTx: [] as number[], tps: [] as number[] }
        : { name: 'pgbouncer', port: bouncer.port, protocol: options.protocol, cpu: () => bouncer.cpuSeconds(), perTx: [] as number[], tps: [] as number[] };
    const paths = [{ name: 'proxy', port: proxy.port, protocol: options.protocol, cpu: () => proxy.cpuSeconds(), perTx: [] as number[], tps: [] as number[] }, other];
    for (const path of paths) await pgbenchSelect(pgbench, libpq(path.port), options.clients, 3, path.protocol); // warm-up
    const fastBefore = await metric(httpPort, 'pool_fast_path_transactions_total');
    const deskBefore = await metric(httpPort, 'pool_desk_transactions_total');
    const allBefore = await metric(httpPort, 'pool_transactions_total');
    for (let round = 0; round < options.rounds; round++) {
      for (const path of round % 2 === 0 ? paths : [...paths].reverse()) {
        const before = path.cpu();
        const result = await pgbenchSelect(pgbench, libpq(path.port), options.clients, options.seconds, path.protocol);
        const used = path.cpu() - before;
        if (result.failed > 0) throw new Error(`${path.name}: ${result.failed} failed transactions`);
        path.perTx.push((used / Math.max(1, result.transactions)) * 1e6);
        path.tps.push(result.tps);
        process.stdout.write(`round ${round + 1}  ${path.name.padEnd(10)} -M ${path.protocol.padEnd(8)}  ${result.tps.toFixed(0).padStart(6)} tps  ${path.perTx.at(-1)?.toFixed(1).padStart(6)} µs CPU per transaction\n`);
      }
    }
    const fast = (await metric(httpPort, 'pool_fast_path_transactions_total')) - fastBefore;
    const all = (await metric(httpPort, 'pool_transactions_total')) - allBefore;
    const desk = (await metric(httpPort, 'pool_desk_transactions_total')) - deskBefore;
    const median = (values: number[]): number => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)] ?? NaN;
    const [p, b] = paths as [(typeof paths)[0], (typeof paths)[0]];
    const [mine, theirs] = [`proxy -M ${p.protocol}`, b.name === 'proxy' ? `proxy -M ${b.protocol}` : 'PgBouncer'];
    const share = (n: number): string => (all > 0 ? ((100 * n) / all).toFixed(1) : '0');
    process.stdout.write(
      `median CPU per transaction: ${mine} ${median(p.perTx).toFixed(1)} µs, ${theirs} ${median(b.perTx).toFixed(1)} µs (${(median(p.perTx) / median(b.perTx)).toFixed(2)}x); ` +
        `tps ${mine}/${theirs} ${(median(p.tps) / median(b.tps)).toFixed(2)}; fast path carried ${share(fast)} %, the desk ${share(desk)} % of the proxy's ${all} transactions\n`,
    );
  } finally {
    for (const stop of stops.reverse()) await stop().catch(() => {});
  }
}

main().catch((error: unknown) => {
  process.stderr.write(`${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  process.exitCode = 1;
});
