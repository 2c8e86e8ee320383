/**
 * The benchmark: a real Postgres with TLS, the proxy in front of it (the real program, a separate
 * process, a static token), PgBouncer where installed, and the same measurements through each
 * path in the same run. Paths alternate in rounds (each round starts with a different one), so a
 * burst of machine noise lands on all of them rather than on one.
 *
 * `runBenchmark()` returns the figures (`smokeProblems()` checks a quick run of it, for a test);
 * printing and the JSON files are the CLI's (bench/run.ts).
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { cpus, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import type pg from 'pg';
import { quoteIdent, startPostgres, type TestPostgres } from '../test/harness/postgres.js';
import { findPgBouncer, startPgBouncer, type PgBouncer } from './pgbouncer.js';
import { startBenchProxy, wakeUps, type BenchProxy, type ProxyLaunch } from './proxy-process.js';
import { captureCopy, copyIn, copyOut, type CopyClient } from './measure/copy.js';
import { connectSelectClose } from './measure/connect.js';
import { findPgbench, pgbenchInit, pgbenchSelect, pgbenchVersion } from './measure/pgbench.js';
import { holdSessions, type ScaleResult } from './measure/scale.js';
import { median, percentile, rotate } from './stats.js';

export type Section = 'pgbench' | 'copy' | 'connect' | 'scale';
export const SECTIONS: readonly Section[] = ['pgbench', 'copy', 'connect', 'scale'];

/** Another build of the proxy measured as one more path, e.g. a snapshot of the relay before a change. */
export interface ProxyVariant {
  readonly name: string;
  /** A script taking the program's arguments (a copy of bin/lakebase-proxy.js, bench's cluster launcher). */
  readonly script: string;
  readonly env?: Readonly<Record<string, string>>;
  /** "listening" lines that mean ready (one per cluster worker). */
  readonly listeningLines?: number;
  /** Another Node.js executable (e.g. a newer major version). */
  readonly node?: string;
}

export interface BenchOptions {
  /** A smoke run: seconds instead of minutes, small sizes. */
  readonly quick?: boolean;
  readonly sections?: readonly Section[];
  readonly rounds?: number;
  readonly pgbenchSeconds?: number;
  readonly pgbenchScale?: number;
  readonly clients?: readonly number[];
  /** Size of the COPY table, in MB (10^6 bytes). */
  readonly copyMB?: number;
  readonly connects?: number;
  readonly sessions?: number;
  /** false: leave PgBouncer out even when it is installed. */
  readonly pgbouncer?: boolean;
  readonly variants?: readonly ProxyVariant[];
  /** Options for node running the proxy, e.g. ['--cpu-prof', '--cpu-prof-dir=DIR']. */
  readonly proxyNodeArgs?: readonly string[];
  readonly copyClient?: CopyClient;
  /** Progress lines; default none. */
  readonly log?: (line: string) => void;
}

export type PathKind = 'proxy' | 'direct' | 'pgbouncer' | 'variant';

export interface Metric {
  readonly id: string;
  readonly label: string;
  readonly unit: string;
  readonly better: 'higher' | 'lower';
  /** The figure per path (median over rounds where there are rounds). */
  readonly values: Record<string, number>;
  readonly samples?: Record<string, number[]>;
}

export interface TargetCheck {
  readonly target: string;
  readonly met: boolean;
  readonly actual: string;
}

export interface BenchResult {
  readonly schema: 1;
  readonly quick: boolean;
  readonly startedAt: string;
  readonly seconds: number;
  readonly machine: Record<string, string | number>;
  readonly settings: Record<string, string | number | boolean>;
  readonly paths: string[];
  readonly metrics: Metric[];
  readonly scale: Record<string, ScaleResult>;
  readonly targets: TargetCheck[];
  readonly notes: string[];
}

interface Path {
  readonly name: string;
  readonly kind: PathKind;
  readonly client: pg.ClientConfig;
  readonly libpq: Readonly<Record<string, string>>;
  /** CPU seconds used so far by the process in the middle (proxy, PgBouncer); none for direct. */
  readonly cpuSeconds?: () => number;
  /** Times its main thread has been woken so far (see wakeUps). */
  readonly wakeUps?: () => number;
}

interface Settings {
  readonly rounds: number;
  readonly pgbenchSeconds: number;
  readonly pgbenchScale: number;
  readonly clients: readonly number[];
  readonly copyMB: number;
  readonly connects: number;
  readonly sessions: number;
}

// One client count and 2 s: a smoke run shares the CPUs with the rest of the suite.
const QUICK: Settings = { rounds: 1, pgbenchSeconds: 2, pgbenchScale: 1, clients: [8], copyMB: 4, connects: 20, sessions: 200 };
const FULL: Settings = { rounds: 3, pgbenchSeconds: 10, pgbenchScale: 10, clients: [8, 64], copyMB: 80, connects: 200, sessions: 5000 };

const COPY_TABLE = 'bench_copy';
const COPY_IN_TABLE = 'bench_copy_in';
/** Bytes per row of COPY text for the table below, roughly, to size it. */
const COPY_ROW_BYTES = 200;

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

export async function runBenchmark(options: BenchOptions = {}): Promise<BenchResult> {
  const base = options.quick ? QUICK : FULL;
  const settings: Settings = {
    rounds: options.rounds ?? base.rounds,
    pgbenchSeconds: options.pgbenchSeconds ?? base.pgbenchSeconds,
    pgbenchScale: options.pgbenchScale ?? base.pgbenchScale,
    clients: options.clients ?? base.clients,
    copyMB: options.copyMB ?? base.copyMB,
    connects: options.connects ?? base.connects,
    sessions: options.sessions ?? base.sessions,
  };
  const sections = new Set(options.sections ?? SECTIONS);
  const log = options.log ?? ((): void => {});
  const notes: string[] = [];
  const startedAt = Date.now();
  const pgbench = sections.has('pgbench') ? findPgbench() : undefined;
  if (sections.has('pgbench') && !pgbench) notes.push('pgbench not found (PATH or /usr/lib/postgresql/*/bin): pgbench section skipped');
  const pgbouncerExe = options.pgbouncer === false ? undefined : findPgBouncer();
  if (options.pgbouncer !== false && !pgbouncerExe) notes.push('pgbouncer not installed: PgBouncer path skipped (apt-get install pgbouncer)');
  const copyClient: CopyClient = options.copyClient ?? (hasPsql() ? 'psql' : 'node');

  const openFiles = softFileLimit();
  let sessions = settings.sessions;
  if (sections.has('scale') && openFiles !== undefined && openFiles < 2 * sessions + 200) {
    const fit = Math.max(0, Math.floor((openFiles - 200) / 2));
    notes.push(`open-file limit ${openFiles} allows about ${fit} sessions through the proxy (two sockets each), not ${sessions}: raise ulimit -n`);
    sessions = fit;
  }
  const maxConnections = Math.max(300, (sections.has('scale') ? sessions : 0) + Math.max(...settings.clients) + 200);

  const token = `tok-${randomBytes(600).toString('base64url')}`;
  const work = mkdtempSync(join(tmpdir(), 'lbp-bench-'));
  const toStop: Array<() => Promise<void>> = [];
  try {
    log(`starting Postgres (max_connections ${maxConnections})`);
    const db = await startPostgres({
      extraConf: {
        max_connections: String(maxConnections),
        shared_buffers: options.quick ? '64MB' : '256MB',
        max_wal_size: '4GB',
        checkpoint_timeout: '30min',
        log_min_messages: 'warning',
      },
    });
    toStop.push(() => db.stop());
    await db.setTokenPassword(token);
    const serverVersion = (await db.query<{ v: string }>("SELECT current_setting('server_version') AS v"))[0]?.v ?? '?';

    const upstream = `Server=127.0.0.1;Port=${db.port};User=${db.tokenRole};SSLRootCert=${db.ca.caFile};OAuthAccessToken=${token};Database=${db.database}`;
    // A pool as large as PgBouncer's below (sessions + 100), so that no path makes clients wait for a slot.
    const proxyLaunch: ProxyLaunch = {
      args: ['--connection', upstream, '--http-port', '0'],
      env: { LAKEBASE_PROXY_POOL_SIZE: String(sessions + 100) },
      ...(options.proxyNodeArgs ? { nodeArgs: [...options.proxyNodeArgs] } : {}),
    };
    const variantLaunch = (variant: ProxyVariant): ProxyLaunch => ({
      args: ['--connection', upstream, '--http-port', '0'],
      script: variant.script,
      env: { LAKEBASE_PROXY_POOL_SIZE: String(sessions + 100), ...variant.env },
      listeningLines: variant.listeningLines ?? 1,
      ...(variant.node ? { node: variant.node } : {}),
    });
    log('starting the proxy' + (options.variants?.length ? `, variants ${options.variants.map((v) => v.name).join(', ')}` : '') + (pgbouncerExe ? ' and PgBouncer' : ''));
    // Every process that started is stopped at the end, even when another one failed to start.
    const started = <T>(promise: Promise<T>, stop: (value: T) => Promise<void>): Promise<T> =>
      promise.then((value) => {
        toStop.push(() => stop(value));
        return value;
      });
    const launches = await Promise.allSettled([
      started(startBenchProxy(proxyLaunch), (p) => p.stop()),
      Promise.all(
        (options.variants ?? []).map((variant) => started(startBenchProxy(variantLaunch(variant)), (p) => p.stop()).then((running) => [variant, running] as const)),
      ),
      pgbouncerExe
        ? started(
            startPgBouncer(pgbouncerExe, {
              serverHost: '127.0.0.1',
              serverPort: db.port,
              database: db.database,
              user: db.tokenRole,
              password: token,
              caFile: db.ca.caFile,
              maxSessions: sessions,
            }),
            (b) => b.stop(),
          )
        : Promise.resolve(undefined),
    ] as const);
    for (const launch of launches) if (launch.status === 'rejected') throw launch.reason;
    const [proxy, variants, bouncer] = launches.map((l) => (l as PromiseFulfilledResult<unknown>).value) as [
      BenchProxy,
      ReadonlyArray<readonly [ProxyVariant, BenchProxy]>,
      PgBouncer | undefined,
    ];

    const paths: Path[] = [
      plainPath('proxy', 'proxy', proxy.port, db.database, proxy.cpuSeconds, proxy.pid),
      {
        name: 'direct',
        kind: 'direct',
        client: { host: '127.0.0.1', port: db.port, user: db.tokenRole, password: token, database: db.database, ssl: { ca: db.ca.caPem } },
        libpq: {
          PGHOST: '127.0.0.1',
          PGPORT: String(db.port),
          PGUSER: db.tokenRole,
          PGPASSWORD: token,
          PGDATABASE: db.database,
          PGSSLMODE: 'verify-full',
          PGSSLROOTCERT: db.ca.caFile,
        },
      },
      ...(bouncer ? [plainPath('pgbouncer', 'pgbouncer', bouncer.port, db.database, bouncer.cpuSeconds, bouncer.pid)] : []),
      ...variants.map(([variant, running]) => plainPath(variant.name, 'variant', running.port, db.database, running.cpuSeconds, running.pid)),
    ];
    const direct = paths[1] as Path;
    const metrics: Metric[] = [];
    const scale: Record<string, ScaleResult> = {};

    // Every path must work before anything is measured.
    for (const path of paths) {
      await connectSelectClose(path.client).catch((error: unknown) => {
        throw new Error(`path ${path.name} does not work: ${(error as Error).message}${path.kind === 'pgbouncer' && bouncer ? `\n${bouncer.logTail()}` : ''}`);
      });
    }

    // Idle: each process in the middle, one connection made and closed, nothing else to do.
    const idleSeconds = options.quick ? 2 : 10;
    const sleepers = paths.filter((p) => p.wakeUps);
    const before = sleepers.map((p) => (p.wakeUps as () => number)());
    await new Promise((resolve) => setTimeout(resolve, idleSeconds * 1000));
    const woken = Object.fromEntries(sleepers.map((p, i) => [p.name, [((p.wakeUps as () => number)() - (before[i] as number)) / idleSeconds]]));
    metrics.push(summary('idle_wakeups', `wake-ups per second while idle (${idleSeconds} s)`, '/s', 'lower', woken, median));
    log(`idle wake-ups per second: ${sleepers.map((p) => `${p.name} ${woken[p.name]?.[0]?.toFixed(1)}`).join(', ')}`);

    if (pgbench) {
      log(`pgbench -i -s ${settings.pgbenchScale}`);
      await pgbenchInit(pgbench, direct.libpq, settings.pgbenchScale);
      await db.query('VACUUM ANALYZE');
      const warm = Math.min(2, settings.pgbenchSeconds);
      for (const path of paths) await pgbenchSelect(pgbench, path.libpq, 8, warm);
      for (const clients of settings.clients) {
        const samples: Record<string, number[]> = Object.fromEntries(paths.map((p) => [p.name, []]));
        const cpu: Record<string, number[]> = Object.fromEntries(paths.filter((p) => p.cpuSeconds).map((p) => [p.name, []]));
        for (let round = 0; round < settings.rounds; round++) {
          for (const path of rotate(paths, round)) {
            const cpuBefore = path.cpuSeconds?.() ?? 0;
            const result = await pgbenchSelect(pgbench, path.libpq, clients, settings.pgbenchSeconds);
            const cpuUsed = (path.cpuSeconds?.() ?? 0) - cpuBefore;
            if (result.failed > 0) notes.push(`pgbench ${clients} clients via ${path.name}: ${result.failed} failed transactions`);
            samples[path.name]?.push(result.tps);
            // Includes the connection set-up of the run: a few ms of CPU against seconds of queries.
            cpu[path.name]?.push((cpuUsed * 1e6) / result.transactions);
            log(`pgbench -S ${clients} clients, round ${round + 1}/${settings.rounds}, ${path.name}: ${result.tps.toFixed(0)} tps` + (path.cpuSeconds ? `, ${((cpuUsed * 1e6) / result.transactions).toFixed(1)} µs CPU per transaction in the middle` : ''));
          }
        }
        metrics.push(summary(`pgbench_select_c${clients}`, `pgbench -S, ${clients} clients`, 'tps', 'higher', samples, median));
        metrics.push(summary(`pgbench_cpu_c${clients}`, `  CPU in the middle per transaction, ${clients} clients`, 'µs', 'lower', cpu, median));
      }
    }

    if (sections.has('copy')) {
      const rows = Math.max(1000, Math.round((settings.copyMB * 1e6) / COPY_ROW_BYTES));
      log(`building the COPY table (${rows} rows, about ${settings.copyMB} MB)`);
      const owner = quoteIdent(db.tokenRole);
      await db.query(`DROP TABLE IF EXISTS ${COPY_TABLE}, ${COPY_IN_TABLE}`);
      await db.query(
        `CREATE TABLE ${COPY_TABLE} AS SELECT g AS id, md5(g::text) AS key, timestamptz '2026-01-01' + g * interval '1 second' AS at, ` +
          `repeat(md5((g * 7)::text), 4) AS payload FROM generate_series(1, ${rows}) g`,
      );
      // Unlogged: COPY FROM then measures the transfer and the insert, not the server's WAL writes.
      await db.query(`CREATE UNLOGGED TABLE ${COPY_IN_TABLE} (LIKE ${COPY_TABLE})`);
      await db.query(`ALTER TABLE ${COPY_TABLE} OWNER TO ${owner}; ALTER TABLE ${COPY_IN_TABLE} OWNER TO ${owner}`);
      await db.query(`VACUUM ANALYZE ${COPY_TABLE}`);
      const file = join(work, 'copy.data');
      const bytes = await captureCopy(direct.client, COPY_TABLE, file);
      const data = copyClient === 'node' ? [readFileSync(file)] : [];
      const outs: Record<string, number[]> = Object.fromEntries(paths.map((p) => [p.name, []]));
      const ins: Record<string, number[]> = Object.fromEntries(paths.map((p) => [p.name, []]));
      const rounds = settings.rounds;
      for (let round = -1; round < rounds; round++) {
        // Round -1 warms the table into the buffers and every path's code; it is not counted.
        for (const path of rotate(paths, Math.max(0, round))) {
          const out = await copyOut(copyClient, path, COPY_TABLE, bytes);
          await db.query(`TRUNCATE ${COPY_IN_TABLE}`);
          const into = await copyIn(copyClient, path, COPY_IN_TABLE, file, data, bytes);
          if (round < 0) continue;
          outs[path.name]?.push(bytes / 1e6 / out.seconds);
          ins[path.name]?.push(bytes / 1e6 / into.seconds);
          log(`COPY ${(bytes / 1e6).toFixed(1)} MB, round ${round + 1}/${rounds}, ${path.name}: out ${(bytes / 1e6 / out.seconds).toFixed(0)} MB/s, in ${(bytes / 1e6 / into.seconds).toFixed(0)} MB/s`);
        }
      }
      const [check] = await db.query<{ n: number }>(`SELECT count(*)::int AS n FROM ${COPY_IN_TABLE}`);
      if (check?.n !== rows) throw new Error(`COPY FROM stored ${check?.n} rows, expected ${rows}`);
      metrics.push(summary('copy_out', `COPY out (${(bytes / 1e6).toFixed(0)} MB, ${copyClient === 'psql' ? 'psql' : 'node-postgres'})`, 'MB/s', 'higher', outs, median));
      metrics.push(summary('copy_in', `COPY FROM (${(bytes / 1e6).toFixed(0)} MB, ${copyClient === 'psql' ? 'psql' : 'node-postgres'})`, 'MB/s', 'higher', ins, median));
    }

    if (sections.has('connect')) {
      log(`connect + SELECT 1 + close, ${settings.connects} per path, interleaved`);
      const samples: Record<string, number[]> = Object.fromEntries(paths.map((p) => [p.name, []]));
      for (const path of paths) for (let i = 0; i < 5; i++) await connectSelectClose(path.client);
      for (let i = 0; i < settings.connects; i++) {
        for (const path of rotate(paths, i)) samples[path.name]?.push(await connectSelectClose(path.client));
      }
      metrics.push(summary('connect_median', 'connect + SELECT 1 + close, median', 'ms', 'lower', samples, median));
      const p99 = summary('connect_p99', 'connect + SELECT 1 + close, p99', 'ms', 'lower', samples, (v) => percentile(v, 99));
      metrics.push({ ...p99, samples: undefined }); // the samples are the median's
    }

    if (sections.has('scale') && sessions > 0) {
      const baseline = await db.backendsOf(db.tokenRole);
      const holders: Array<[string, () => Promise<{ rssKiB: () => number; port: number; stop?: () => Promise<void> }>]> = [
        ['proxy', async () => startBenchProxy(proxyLaunch)],
        ...variants.map(([variant]) => [variant.name, async () => startBenchProxy(variantLaunch(variant))] as [string, () => Promise<BenchProxy>]),
        ...(bouncer ? [['pgbouncer', async () => ({ rssKiB: bouncer.rssKiB, port: bouncer.port })] as [string, () => Promise<{ rssKiB: () => number; port: number }>]] : []),
      ];
      for (const [name, start] of holders) {
        // A fresh proxy process, so its memory before holds no garbage from the runs above.
        const holder = await start();
        try {
          const client = plainPath(name, 'proxy', holder.port, db.database).client;
          for (let i = 0; i < 3; i++) await connectSelectClose(client);
          log(`scale: opening ${sessions} idle sessions through ${name}`);
          const result = await holdSessions(client, {
            sessions,
            concurrency: 32,
            rssKiB: holder.rssKiB,
            settleMs: options.quick ? 300 : 5000,
            progress: (opened) => log(`  ${opened} open`),
          });
          scale[name] = result;
          log(`scale ${name}: ${result.opened}/${result.asked} open in ${result.openSeconds.toFixed(1)} s, ${result.errors} errors, ${result.kibPerSession.toFixed(1)} KiB per session (second half ${result.marginalKibPerSession.toFixed(1)})`);
          if (result.errorSamples.length > 0) notes.push(`scale ${name}: ${result.errorSamples.join(' | ')}`);
        } finally {
          await holder.stop?.();
        }
        // PgBouncer keeps its server connections after its clients leave; it comes last.
        if (name !== 'pgbouncer') await waitForBackends(db, baseline, 60_000);
      }
      const names = Object.keys(scale);
      metrics.push({
        id: 'scale_sessions',
        label: `idle sessions held (of ${sessions})`,
        unit: 'sessions',
        better: 'higher',
        values: Object.fromEntries(names.map((n) => [n, (scale[n] as ScaleResult).alive])),
      });
      metrics.push({
        id: 'scale_kib_per_session',
        label: 'resident memory per idle session',
        unit: 'KiB',
        better: 'lower',
        values: Object.fromEntries(names.map((n) => [n, (scale[n] as ScaleResult).kibPerSession])),
      });
      metrics.push({
        id: 'scale_marginal_kib_per_session',
        label: '  the same, second half of the sessions only',
        unit: 'KiB',
        better: 'lower',
        values: Object.fromEntries(names.map((n) => [n, (scale[n] as ScaleResult).marginalKibPerSession])),
      });
    }

    const result: BenchResult = {
      schema: 1,
      quick: options.quick === true,
      startedAt: new Date(startedAt).toISOString(),
      seconds: (Date.now() - startedAt) / 1000,
      machine: {
        cpus: cpus().length,
        cpuModel: cpus()[0]?.model ?? '?',
        memoryGiB: Math.round(totalmem() / 2 ** 30),
        node: process.version,
        postgres: serverVersion,
        ...(pgbench ? { pgbench: pgbenchVersion(pgbench) } : {}),
        ...(bouncer ? { pgbouncer: bouncer.version } : {}),
      },
      settings: { ...settings, clients: settings.clients.join(','), sessions, copyClient, maxConnections },
      paths: paths.map((p) => p.name),
      metrics,
      scale,
      targets: [],
      notes,
    };
    return { ...result, targets: checkTargets(result, sessions) };
  } finally {
    for (const stop of toStop.reverse()) await stop().catch(() => {});
    rmSync(work, { recursive: true, force: true });
  }
}

function plainPath(name: string, kind: PathKind, port: number, database: string, cpuSeconds?: () => number, pid?: number): Path {
  return {
    name,
    kind,
    ...(cpuSeconds ? { cpuSeconds } : {}),
    ...(pid !== undefined ? { wakeUps: () => wakeUps(pid) } : {}),
    client: { host: '127.0.0.1', port, user: 'bench', database },
    libpq: { PGHOST: '127.0.0.1', PGPORT: String(port), PGUSER: 'bench', PGDATABASE: database, PGSSLMODE: 'disable' },
  };
}

function summary(
  id: string,
  label: string,
  unit: string,
  better: 'higher' | 'lower',
  samples: Record<string, number[]>,
  reduce: (values: number[]) => number,
): Metric {
  return { id, label, unit, better, values: Object.fromEntries(Object.entries(samples).map(([path, values]) => [path, reduce(values)])), samples };
}

/** The targets of issue 5, judged on the main proxy. */
export function checkTargets(result: Pick<BenchResult, 'metrics' | 'scale'>, sessionsAsked: number): TargetCheck[] {
  const checks: TargetCheck[] = [];
  const metric = (id: string): Metric | undefined => result.metrics.find((m) => m.id === id);
  const ratio = (m: Metric, of: string): number => (m.values['proxy'] ?? Number.NaN) / (m.values[of] ?? Number.NaN);
  for (const m of result.metrics.filter((x) => x.id.startsWith('pgbench_select_c'))) {
    const direct = ratio(m, 'direct');
    checks.push({ target: `${m.label}: proxy/direct >= 0.8`, met: direct >= 0.8, actual: direct.toFixed(2) });
    if (m.values['pgbouncer'] !== undefined) {
      const bouncer = ratio(m, 'pgbouncer');
      checks.push({ target: `${m.label}: proxy/PgBouncer >= 1.0`, met: bouncer >= 1.0, actual: bouncer.toFixed(2) });
    }
  }
  for (const id of ['copy_out', 'copy_in']) {
    const m = metric(id);
    if (!m) continue;
    const direct = ratio(m, 'direct');
    checks.push({ target: `${m.label}: proxy/direct >= 0.9`, met: direct >= 0.9, actual: direct.toFixed(2) });
  }
  const connect = metric('connect_median');
  if (connect) {
    const extra = (connect.values['proxy'] ?? Number.NaN) - (connect.values['direct'] ?? Number.NaN);
    checks.push({ target: 'connect median: proxy <= direct + 1 ms', met: extra <= 1, actual: `${extra >= 0 ? '+' : ''}${extra.toFixed(2)} ms` });
  }
  const held = result.scale['proxy'];
  if (held) {
    checks.push({
      target: `${sessionsAsked >= 5000 ? '5,000' : sessionsAsked} idle sessions through the proxy, no error`,
      met: held.alive === held.asked && held.errors === 0 && sessionsAsked >= 5000,
      actual: `${held.alive} alive of ${held.asked}, ${held.errors} errors${sessionsAsked < 5000 ? ' (fewer than 5,000 asked)' : ''}`,
    });
    checks.push({ target: 'proxy memory per idle session <= 32 KiB', met: held.kibPerSession <= 32, actual: `${held.kibPerSession.toFixed(1)} KiB` });
  }
  return checks;
}

async function waitForBackends(db: TestPostgres, baseline: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const now = await db.backendsOf(db.tokenRole);
    if (now <= baseline + 8) return;
    await sleep(250);
  }
}

function hasPsql(): boolean {
  return spawnSync('/bin/sh', ['-c', 'command -v psql'], { encoding: 'utf8' }).status === 0;
}

/** The soft RLIMIT_NOFILE of this process (children inherit it), from /proc; undefined if unknown. */
export function softFileLimit(): number | undefined {
  try {
    const match = /^Max open files\s+(\d+|unlimited)\s+(\d+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'utf8'));
    if (!match) return undefined;
    return match[1] === 'unlimited' ? Number.POSITIVE_INFINITY : Number(match[1]);
  } catch {
    return undefined;
  }
}

/**
 * What a smoke run must show, as a list of problems (empty when all is well): every path gave a
 * finite, positive figure for every measurement that ran, and every session of the scale test
 * opened and answered. Targets are not judged: a quick run's figures are too short to.
 */
export function smokeProblems(result: BenchResult): string[] {
  const problems: string[] = [];
  if (result.metrics.length === 0) problems.push('no measurement ran');
  for (const metric of result.metrics) {
    // CPU and wake-ups are measured on the processes in the middle only; an idle one may not wake at all.
    const perProcess = metric.id.startsWith('pgbench_cpu_') || metric.id === 'idle_wakeups';
    const paths = metric.id.startsWith('scale_') ? Object.keys(result.scale) : perProcess ? Object.keys(metric.values) : result.paths;
    for (const path of paths) {
      const value = metric.values[path];
      if (value === undefined || !Number.isFinite(value) || (value <= 0 && !metric.id.startsWith('scale_') && metric.id !== 'idle_wakeups') || value < 0) {
        problems.push(`${metric.label}: ${path} gave ${value}`);
      }
    }
  }
  for (const [name, s] of Object.entries(result.scale)) {
    if (s.opened !== s.asked || s.alive !== s.asked || s.errors > 0) {
      problems.push(`scale ${name}: ${s.opened} of ${s.asked} opened, ${s.alive} answered, ${s.errors} errors (${s.errorSamples.join(' | ')})`);
    }
  }
  return problems;
}
