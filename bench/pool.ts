/**
 * `node dist/bench/pool.js` (or `npm run bench:pool`): what pooled upstream logins save, side by
 * side in one run. Paths: the proxy pooled (PoolMode=session, PoolSize 20), the proxy with
 * PoolMode=none, PgBouncer in session mode (when installed; once at its default of a log line per
 * client connect and disconnect, once with no log) and direct TLS, each measured with the
 * upstream on loopback and again behind a delaying TCP relay of this script's own (the same
 * delay each way for every path alike, so a round trip costs 2 x --delay-ms). The proxies log at
 * their default level (a line per session) to a file, as PgBouncer does, not to a pipe that this
 * process would have to drain while it measures.
 *
 * - connect latency: N sequential connect + SELECT 1 + close per path, interleaved, warm pools
 *   (and --warmup connects through each pooled path first); median and p99 (node-postgres);
 * - connects per second: pgbench -C with SELECT 1 (a new connection per transaction), 4 clients,
 *   and the pooled proxy's and PgBouncer's CPU time (user + system, from /proc) per connect meanwhile:
 *   on two cores pgbench, Postgres and the pooler share the CPUs, so the rate follows the sum;
 * - upstream connections while 1,000 short-lived clients (50 at a time) go through the pooled
 *   proxy: the most seen in pg_stat_activity.
 */
import { createServer, connect as netConnect, type Server, type Socket } from 'node:net';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { startTokenPostgres } from '../test/harness/postgres.js';
import { findPgBouncer, startPgBouncer, type PgBouncer } from './pgbouncer.js';
import { startBenchProxy, type BenchProxy } from './proxy-process.js';
import { connectSelectClose } from './measure/connect.js';
import { findPgbench, libpqEnvironment } from './measure/pgbench.js';
import { median, percentile } from './stats.js';
import { spawn } from 'node:child_process';

interface Options {
  connects: number;
  delayMs: number;
  seconds: number;
  clients: number;
  /** A folder for V8 CPU profiles of the pooled proxy (node --cpu-prof), one per upstream; see profile-summary.ts. */
  cpuProf: string | undefined;
  /** Connects through each pooled path (the proxy's, PgBouncer's) before the measured ones. */
  warmup: number;
}

function parse(argv: readonly string[]): Options {
  const options: Options = { connects: 200, delayMs: 10, seconds: 5, clients: 1000, cpuProf: undefined, warmup: 1000 };
  for (let i = 0; i < argv.length; i++) {
    const value = Number(argv[i + 1]);
    switch (argv[i]) {
      case '--cpu-prof':
        options.cpuProf = argv[i + 1];
        break;
      case '--connects':
        options.connects = value;
        break;
      case '--delay-ms':
        options.delayMs = value;
        break;
      case '--seconds':
        options.seconds = value;
        break;
      case '--clients':
        options.clients = value;
        break;
      case '--warmup':
        options.warmup = value;
        break;
      case '--quick':
        Object.assign(options, { connects: 20, seconds: 1, clients: 100, warmup: 20 });
        continue;
      default:
        throw new Error(`unknown option ${argv[i]}`);
    }
    i++;
  }
  return options;
}

/** A TCP relay that holds every chunk `delayMs` before passing it on, each way, in order. */
async function startDelay(targetPort: number, delayMs: number): Promise<{ port: number; close: () => Promise<void> }> {
  const sockets = new Set<Socket>();
  const pipe = (from: Socket, to: Socket): void => {
    from.on('data', (chunk: Buffer) => {
      setTimeout(() => to.write(chunk), delayMs);
    });
    from.on('end', () => setTimeout(() => to.end(), delayMs));
    from.on('error', () => to.destroy());
    from.on('close', () => setTimeout(() => to.destroy(), delayMs + 5));
  };
  const server: Server = createServer((client) => {
    const upstream = netConnect({ host: '127.0.0.1', port: targetPort, noDelay: true });
    client.setNoDelay(true);
    sockets.add(client).add(upstream);
    pipe(client, upstream);
    pipe(upstream, client);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as { port: number }).port,
    close: async () => {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** pgbench -C with SELECT 1 as its transaction: connections per second. */
function pgbenchConnects(exe: string, libpq: Record<string, string>, seconds: number): Promise<number> {
  const script = join(tmpdir(), 'lbp-bench-select1.sql');
  writeFileSync(script, 'SELECT 1;\n');
  return new Promise((resolve, reject) => {
    const child = spawn(exe, ['-n', '-C', '-f', script, '-c', '4', '-j', '2', '-T', String(seconds)], { env: libpqEnvironment(libpq) });
    let out = '';
    child.stdout.on('data', (chunk: Buffer) => (out += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (out += chunk.toString()));
    child.on('close', (code) => {
      const tps = /tps = ([\d.]+)/.exec(out);
      if (code !== 0 || !tps) reject(new Error(`pgbench -C failed (${code}): ${out.slice(-2000)}`));
      else resolve(Number(tps[1]));
    });
  });
}

/** [ms until connect() resolved (the greeting's ReadyForQuery), ms for connect + SELECT 1 + close]. */
async function timedConnect(config: pg.ClientConfig): Promise<[number, number]> {
  const started = process.hrtime.bigint();
  const client = new pg.Client(config);
  await client.connect();
  const connected = Number(process.hrtime.bigint() - started) / 1e6;
  try {
    await client.query('SELECT 1');
  } finally {
    await client.end();
  }
  return [connected, Number(process.hrtime.bigint() - started) / 1e6];
}

interface Row {
  readonly upstream: string;
  readonly path: string;
  /** connect() alone: until the greeting's ReadyForQuery. */
  readonly connectMedianMs: number;
  readonly connectP99Ms: number;
  /** connect + SELECT 1 + close. */
  readonly medianMs: number;
  readonly p99Ms: number;
  readonly connectsPerSecond: number | undefined;
  /** The proxy's or PgBouncer's CPU time (user + system) per connect during pgbench -C, in µs. */
  readonly cpuPerConnectUs: number | undefined;
}

async function main(): Promise<void> {
  const options = parse(process.argv.slice(2));
  const token = 'tok-bench-' + Date.now();
  const db = await startTokenPostgres(token, { extraConf: { max_connections: '400', log_min_messages: 'warning' } });
  const toStop: Array<() => Promise<unknown>> = [() => db.stop()];
  const rows: Row[] = [];
  let mostUpstream = 0;
  const logs = mkdtempSync(join(tmpdir(), 'lbp-bench-pool-'));
  process.once('exit', () => rmSync(logs, { recursive: true, force: true }));
  try {
    await db.setTokenPassword(token);
    const pgbench = findPgbench();
    const bouncerExe = findPgBouncer();
    for (const delayed of [false, true]) {
      const relay = delayed ? await startDelay(db.port, options.delayMs) : undefined;
      if (relay) toStop.push(relay.close);
      const port = relay?.port ?? db.port;
      const label = delayed ? `+${2 * options.delayMs} ms round trip` : 'loopback';
      const upstream = `Server=127.0.0.1;Port=${port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};OAuthAccessToken=${token};Database=${db.database}`;
      // The proxy logs a line per session (its default) to a file, as PgBouncer logs to its own.
      const start = (env: Record<string, string>, log: string, nodeArgs?: string[]): Promise<BenchProxy> =>
        startBenchProxy({ args: ['--connection', upstream, '--no-http'], env, logFile: join(logs, `${log}.log`), ...(nodeArgs ? { nodeArgs } : {}) });
      const profile = options.cpuProf === undefined ? undefined : ['--cpu-prof', `--cpu-prof-dir=${options.cpuProf}`, `--cpu-prof-name=pooled-${delayed ? 'delayed' : 'loopback'}.cpuprofile`];
      const pooled = await start({ LAKEBASE_PROXY_POOL_SIZE: '20' }, 'pooled', profile);
      const unpooled = await start({ LAKEBASE_PROXY_POOL_MODE: 'none' }, 'unpooled');
      toStop.push(() => pooled.stop(), () => unpooled.stop());
      // PgBouncer at its default (a line per client connect and disconnect), and without a log.
      const bouncers: Array<[string, PgBouncer]> = [];
      for (const [name, logSessions] of bouncerExe ? ([['pgbouncer session', true], ['pgbouncer, no log', false]] as const) : []) {
        const bouncer = await startPgBouncer(bouncerExe as string, { serverHost: '127.0.0.1', serverPort: port, database: db.database, user: db.tokenRole, password: token, caFile: db.ca.caFile, maxSessions: 20, logSessions });
        bouncers.push([name, bouncer]);
        toStop.push(() => bouncer.stop());
      }
      const plain = (p: number): pg.ClientConfig => ({ host: '127.0.0.1', port: p, user: 'bench', database: db.database });
      const libpqPlain = (p: number): Record<string, string> => ({ PGHOST: '127.0.0.1', PGPORT: String(p), PGUSER: 'bench', PGDATABASE: db.database, PGSSLMODE: 'disable' });
      // CPU time of the process behind a path, for CPU per connect during pgbench -C.
      const cpuOf = new Map<string, () => number>([['proxy pooled', pooled.cpuSeconds], ...bouncers.map(([name, bouncer]): [string, () => number] => [name, bouncer.cpuSeconds])]);
      const paths: Array<[string, pg.ClientConfig, Record<string, string>]> = [
        ['proxy pooled', plain(pooled.port), libpqPlain(pooled.port)],
        ['proxy PoolMode=none', plain(unpooled.port), libpqPlain(unpooled.port)],
        ...bouncers.map(([name, bouncer]): [string, pg.ClientConfig, Record<string, string>] => [name, plain(bouncer.port), libpqPlain(bouncer.port)]),
        [
          'direct TLS',
          { host: '127.0.0.1', port, user: db.tokenRole, password: token, database: db.database, ssl: { ca: db.ca.caPem } },
          { PGHOST: '127.0.0.1', PGPORT: String(port), PGUSER: db.tokenRole, PGPASSWORD: token, PGDATABASE: db.database, PGSSLMODE: 'verify-ca', PGSSLROOTCERT: db.ca.caFile },
        ],
      ];
      // Warm: a pooled connection, a TLS session to resume; and the pooled paths (the proxy's and
      // PgBouncer's) --warmup connects more, as a proxy that has run a while has them: V8 runs the
      // first few hundred through its interpreter and baseline compiler before it optimizes.
      for (const [name, config] of paths) {
        const warm = name === 'proxy pooled' || name.startsWith('pgbouncer') ? Math.max(1, options.warmup) : 1;
        for (let i = 0; i < warm; i++) await connectSelectClose(config);
      }
      // Round i starts with path i % n, so that machine noise lands on every path alike.
      const connects = paths.map(() => [] as number[]);
      const totals = paths.map(() => [] as number[]);
      for (let i = 0; i < options.connects; i++) {
        for (let k = 0; k < paths.length; k++) {
          const p = (k + i) % paths.length;
          const [connected, total] = await timedConnect((paths[p] as [string, pg.ClientConfig, Record<string, string>])[1]);
          (connects[p] as number[]).push(connected);
          (totals[p] as number[]).push(total);
        }
      }
      for (let p = 0; p < paths.length; p++) {
        const [name, , libpq] = paths[p] as [string, pg.ClientConfig, Record<string, string>];
        const cpu = cpuOf.get(name);
        const cpuBefore = cpu?.() ?? 0;
        const connectsPerSecond = pgbench ? await pgbenchConnects(pgbench, libpq, options.seconds) : undefined;
        const cpuPerConnectUs = cpu && connectsPerSecond ? ((cpu() - cpuBefore) * 1e6) / (connectsPerSecond * options.seconds) : undefined;
        const ms = totals[p] as number[];
        const connectMs = connects[p] as number[];
        rows.push({ upstream: label, path: name, connectMedianMs: median(connectMs), connectP99Ms: percentile(connectMs, 99), medianMs: median(ms), p99Ms: percentile(ms, 99), connectsPerSecond, cpuPerConnectUs });
      }
      if (!delayed) {
        // Short-lived clients through the pool: the upstream connections never exceed PoolSize.
        // Their own application_name, which the pooled connections log in with, tells them apart from PgBouncer's.
        const count = async (): Promise<number> =>
          (await db.query<{ n: number }>("select count(*)::int as n from pg_stat_activity where application_name = 'pool-count'"))[0]?.n ?? 0;
        let watching = true;
        const watcher = (async () => {
          while (watching) {
            mostUpstream = Math.max(mostUpstream, await count());
            await new Promise((resolve) => setTimeout(resolve, 20));
          }
        })();
        let next = 0;
        await Promise.all(
          Array.from({ length: 50 }, async () => {
            while (next < options.clients) {
              next++;
              await connectSelectClose({ ...plain(pooled.port), application_name: 'pool-count' });
            }
          }),
        );
        watching = false;
        await watcher;
      }
      for (const stop of [() => pooled.stop(), () => unpooled.stop(), ...bouncers.map(([, bouncer]) => () => bouncer.stop()), ...(relay ? [relay.close] : [])]) await stop();
      toStop.length = 1;
    }
  } finally {
    for (const stop of toStop.reverse()) await stop().catch(() => {});
  }
  const table = rows.map((r) => `${r.upstream.padEnd(20)} ${r.path.padEnd(20)} connect ${r.connectMedianMs.toFixed(2).padStart(7)} ms (p99 ${r.connectP99Ms.toFixed(2).padStart(7)})  +SELECT 1 ${r.medianMs.toFixed(2).padStart(7)} ms (p99 ${r.p99Ms.toFixed(2).padStart(7)})  ${r.connectsPerSecond === undefined ? '' : `pgbench -C ${r.connectsPerSecond.toFixed(0)} connects/s`}${r.cpuPerConnectUs === undefined ? '' : `, ${r.cpuPerConnectUs.toFixed(0)} µs CPU each`}`);
  // The issue's targets compare the pooled proxy with PgBouncer: a ratio per upstream and PgBouncer row.
  const ratios: string[] = [];
  for (const pooled of rows.filter((r) => r.path === 'proxy pooled')) {
    for (const bouncer of rows.filter((r) => r.upstream === pooled.upstream && r.path.startsWith('pgbouncer'))) {
      const perSecond = pooled.connectsPerSecond !== undefined && bouncer.connectsPerSecond ? `, connects/s ${(pooled.connectsPerSecond / bouncer.connectsPerSecond).toFixed(2)}x` : '';
      const cpu = pooled.cpuPerConnectUs !== undefined && bouncer.cpuPerConnectUs ? `, CPU per connect ${(pooled.cpuPerConnectUs / bouncer.cpuPerConnectUs).toFixed(2)}x` : '';
      ratios.push(`${pooled.upstream.padEnd(20)} pooled against ${bouncer.path}: connect median ${(pooled.connectMedianMs / bouncer.connectMedianMs).toFixed(2)}x${perSecond}${cpu}`);
    }
  }
  process.stdout.write(`${table.join('\n')}\n${ratios.join('\n')}${ratios.length > 0 ? '\n' : ''}upstream connections during ${options.clients} short-lived clients (50 at a time, PoolSize 20): at most ${mostUpstream}\n`);
  const results = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'bench', 'results');
  mkdirSync(results, { recursive: true });
  writeFileSync(join(results, 'pool-latest.json'), JSON.stringify({ at: new Date().toISOString(), options, rows, mostUpstream }, null, 2));
}

await main();
