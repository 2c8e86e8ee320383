/** Client programs of a PostgreSQL installation (psql, pgbench), running a command to its end, a free port. */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, readdirSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { delimiter, join } from 'node:path';

/** A Postgres client program from the PATH or from Debian's /usr/lib/postgresql/<version>/bin. */
export function findTool(name: string): string | undefined {
  for (const dir of (process.env['PATH'] ?? '').split(delimiter)) {
    if (dir && existsSync(join(dir, name))) return join(dir, name);
  }
  try {
    for (const version of readdirSync('/usr/lib/postgresql').sort().reverse()) {
      const path = join('/usr/lib/postgresql', version, 'bin', name);
      if (existsSync(path)) return path;
    }
  } catch {
    // no Debian PostgreSQL packages
  }
  return undefined;
}

/** Why a test needing `name` is skipped, or false when it is installed. */
export function missingTool(name: string): string | false {
  return findTool(name) ? false : `${name} is not installed (looked in PATH and /usr/lib/postgresql/*/bin)`;
}

export interface Ran {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a command to its end (killed after timeoutMs, default 15 s) with the environment plus `env`. */
export function run(command: string, args: readonly string[], options: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<Ran> {
  // The client tools are not ours to sanitize: .ci/sanitize.sh's ASan preload hangs pgbench's threads.
  const { LD_PRELOAD: _preload, ...env } = { ...process.env, ...options.env };
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 15000);
    child.once('error', reject);
    child.once('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** A TCP port on 127.0.0.1 that was free a moment ago, for a test that must know it in advance. */
export async function freePort(): Promise<number> {
  const probe = createServer().listen(0, '127.0.0.1');
  await once(probe, 'listening');
  const { port } = probe.address() as AddressInfo;
  await new Promise((resolve) => probe.close(resolve));
  return port;
}
