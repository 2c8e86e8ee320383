/** pgbench -S (select-only) throughput, with the libpq settings of one path. */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

export interface PgbenchResult {
  readonly tps: number;
  readonly latencyMs: number;
  readonly transactions: number;
  readonly failed: number;
}

/** pgbench on the PATH, else the newest /usr/lib/postgresql/<n>/bin/pgbench; undefined if none. */
export function findPgbench(): string | undefined {
  const which = spawnSync('/bin/sh', ['-c', 'command -v pgbench'], { encoding: 'utf8' });
  const onPath = which.stdout.trim();
  if (which.status === 0 && onPath) return onPath;
  const base = '/usr/lib/postgresql';
  if (!existsSync(base)) return undefined;
  const versions = readdirSync(base).filter((v) => /^\d+$/.test(v)).sort((a, b) => Number(b) - Number(a));
  for (const version of versions) {
    const exe = join(base, version, 'bin', 'pgbench');
    if (existsSync(exe)) return exe;
  }
  return undefined;
}

export function pgbenchVersion(exe: string): string {
  return spawnSync(exe, ['--version'], { encoding: 'utf8' }).stdout.trim();
}

/** The environment for a libpq tool: ours without PG* variables, plus `libpq`. */
export function libpqEnvironment(libpq: Readonly<Record<string, string>>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) if (!key.startsWith('PG')) env[key] = value;
  return { ...env, ...libpq };
}

function run(exe: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(exe, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString('utf8')));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString('utf8')));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve(output);
      else reject(new Error(`pgbench ${args.join(' ')} exited with ${code ?? signal}:\n${output.slice(-4000)}`));
    });
  });
}

/** Creates the pgbench tables at `scale` (100,000 accounts per unit). */
export async function pgbenchInit(exe: string, libpq: Readonly<Record<string, string>>, scale: number): Promise<void> {
  await run(exe, ['-i', '-q', '-s', String(scale)], libpqEnvironment(libpq), 600_000);
}

/** One select-only run of `seconds` with `clients` connections; connections are made before the clock starts. */
export async function pgbenchSelect(
  exe: string,
  libpq: Readonly<Record<string, string>>,
  clients: number,
  seconds: number,
  protocol: 'simple' | 'extended' | 'prepared' = 'simple',
): Promise<PgbenchResult> {
  const threads = Math.min(clients, 2);
  const args = ['-n', '-S', '-M', protocol, '-c', String(clients), '-j', String(threads), '-T', String(seconds)];
  const output = await run(exe, args, libpqEnvironment(libpq), (seconds + 120) * 1000);
  const number = (pattern: RegExp): number => {
    const match = pattern.exec(output);
    return match ? Number(match[1]) : Number.NaN;
  };
  const tps = number(/^tps = ([\d.]+) \(without initial connection time\)/m);
  if (!Number.isFinite(tps)) throw new Error(`pgbench printed no tps:\n${output.slice(-4000)}`);
  return {
    tps,
    latencyMs: number(/^latency average = ([\d.]+) ms/m),
    transactions: number(/^number of transactions actually processed: (\d+)/m),
    failed: number(/^number of failed transactions: (\d+)/m) || 0,
  };
}
