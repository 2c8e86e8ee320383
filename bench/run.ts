/**
 * `npm run bench`: runs the benchmark, prints the table, writes bench/results/latest.json (the
 * last one kept as previous.json) and prints the change since it. `--quick` is the smoke run
 * (under a minute; its files are quick-latest.json and quick-previous.json). See bench/README.md.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runBenchmark, SECTIONS, softFileLimit, type BenchOptions, type BenchResult, type ProxyVariant, type Section } from './benchmark.js';
import { formatReport } from './report.js';

const RESULTS = fileURLToPath(new URL('../../bench/results/', import.meta.url));

const USAGE = `usage: node dist/bench/run.js [options]
  --quick                 smoke run: a few seconds per figure, small sizes (< 60 s)
  --sections a,b          some of ${SECTIONS.join(',')} (default all)
  --rounds N              rounds of alternation (default 3; quick 1)
  --seconds N             seconds per pgbench run (default 10; quick 1)
  --clients a,b           pgbench client counts (default 8,64)
  --copy-mb N             size of the COPY table in MB (default 80; quick 4)
  --connects N            sequential connects per path (default 200; quick 20)
  --sessions N            idle sessions for the scale test (default 5000; quick 200)
  --copy-client psql|node COPY client (default psql when installed)
  --no-pgbouncer          leave PgBouncer out
  --variant NAME=SCRIPT[:KEY=VALUE,...]
                          one more proxy path: another build of the program (or
                          dist/bench/cluster-proxy.js with LBP_BENCH_WORKERS=N), side by side;
                          LBP_BENCH_NODE=PATH runs it on another Node.js
  --cpu-prof              profile the proxy process (node --cpu-prof); prints where the profile is
  --no-save               do not write bench/results/*.json
`;

interface CliOptions {
  bench: BenchOptions;
  save: boolean;
  profileDir: string | undefined;
}

function parse(argv: readonly string[]): CliOptions {
  const bench: { -readonly [K in keyof BenchOptions]: BenchOptions[K] } = {};
  const variants: ProxyVariant[] = [];
  let save = true;
  let profileDir: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    const value = (): string => {
      const next = argv[++i];
      if (next === undefined) throw new Error(`${arg} needs a value\n${USAGE}`);
      return next;
    };
    const count = (): number => {
      const n = Number(value());
      if (!Number.isFinite(n) || n < 0) throw new Error(`${arg} needs a number`);
      return n;
    };
    switch (arg) {
      case '--quick':
        bench.quick = true;
        break;
      case '--sections': {
        const wanted = value().split(',').filter(Boolean);
        for (const s of wanted) if (!SECTIONS.includes(s as Section)) throw new Error(`unknown section ${s}; one of ${SECTIONS.join(', ')}`);
        bench.sections = wanted as Section[];
        break;
      }
      case '--rounds':
        bench.rounds = count();
        break;
      case '--seconds':
        bench.pgbenchSeconds = count();
        break;
      case '--clients':
        bench.clients = value().split(',').map(Number);
        break;
      case '--copy-mb':
        bench.copyMB = count();
        break;
      case '--connects':
        bench.connects = count();
        break;
      case '--sessions':
        bench.sessions = count();
        break;
      case '--copy-client': {
        const client = value();
        if (client !== 'psql' && client !== 'node') throw new Error('--copy-client: psql or node');
        bench.copyClient = client;
        break;
      }
      case '--no-pgbouncer':
        bench.pgbouncer = false;
        break;
      case '--variant': {
        const spec = value();
        const match = /^([\w.-]+)=([^:]+)(?::(.*))?$/.exec(spec);
        if (!match) throw new Error(`--variant ${spec}: expected NAME=SCRIPT[:KEY=VALUE,...]`);
        const env = Object.fromEntries(
          (match[3] ?? '')
            .split(',')
            .filter(Boolean)
            .map((pair) => [pair.slice(0, pair.indexOf('=')), pair.slice(pair.indexOf('=') + 1)]),
        ) as Record<string, string>;
        const workers = Number(env['LBP_BENCH_WORKERS'] ?? 1);
        const node = env['LBP_BENCH_NODE'];
        delete env['LBP_BENCH_NODE'];
        variants.push({ name: match[1] as string, script: match[2] as string, env, listeningLines: workers, ...(node ? { node } : {}) });
        break;
      }
      case '--cpu-prof':
        profileDir = mkdtempSync(join(tmpdir(), 'lbp-bench-profile-'));
        bench.proxyNodeArgs = ['--cpu-prof', `--cpu-prof-dir=${profileDir}`];
        break;
      case '--no-save':
        save = false;
        break;
      case '--help':
      case '-h':
        process.stdout.write(USAGE);
        process.exit(0);
        break;
      default:
        throw new Error(`unknown option ${arg}\n${USAGE}`);
    }
  }
  if (variants.length > 0) bench.variants = variants;
  return { bench, save, profileDir };
}

/** Re-runs this program under a raised open-file limit when the scale test needs it. */
function reexecWithMoreFiles(options: BenchOptions): number | undefined {
  const sessions = options.sessions ?? (options.quick ? 200 : 5000);
  const wanted = 2 * sessions + 1000;
  const soft = softFileLimit();
  if (soft === undefined || soft >= wanted || process.env['LBP_BENCH_REEXEC'] === '1') return undefined;
  const script = 'ulimit -n "$(ulimit -Hn)" 2>/dev/null; exec "$@"';
  const result = spawnSync('/bin/sh', ['-c', script, 'sh', process.execPath, ...process.execArgv, ...process.argv.slice(1)], {
    stdio: 'inherit',
    env: { ...process.env, LBP_BENCH_REEXEC: '1' },
  });
  return result.status ?? 1;
}

function readResult(file: string): BenchResult | undefined {
  try {
    return JSON.parse(readFileSync(file, 'utf8')) as BenchResult;
  } catch {
    return undefined;
  }
}

async function main(): Promise<number> {
  const cli = parse(process.argv.slice(2));
  const reexec = reexecWithMoreFiles(cli.bench);
  if (reexec !== undefined) return reexec;
  const result = await runBenchmark({ ...cli.bench, log: (line) => process.stderr.write(`bench: ${line}\n`) });
  const prefix = result.quick ? 'quick-' : '';
  const latest = join(RESULTS, `${prefix}latest.json`);
  const previousFile = join(RESULTS, `${prefix}previous.json`);
  const previous = readResult(latest);
  process.stdout.write(`\n${formatReport(result, previous)}`);
  if (cli.save) {
    mkdirSync(RESULTS, { recursive: true });
    if (existsSync(latest)) renameSync(latest, previousFile);
    writeFileSync(latest, `${JSON.stringify(result, null, 2)}\n`);
    process.stdout.write(`\nwrote ${latest}${previous ? ` (the one before is ${previousFile})` : ''}\n`);
  }
  if (cli.profileDir) process.stdout.write(`proxy CPU profile(s) in ${cli.profileDir} (summarize: node dist/bench/profile-summary.js ${cli.profileDir})\n`);
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    process.stderr.write(`bench: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
    process.exitCode = 1;
  },
);
