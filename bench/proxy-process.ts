/**
 * The proxy under measurement, as a separate process: the real program through the test
 * harness's `startProxyProcess`, or another build of it (a variant: a snapshot of an earlier
 * relay, or the cluster launcher) started the same way, so that variants run side by side.
 *
 * The harness keeps every line the child writes and re-parses all of them at each chunk; over
 * thousands of sessions that costs the bench process (which shares the CPUs) quadratic time, so
 * once the proxy is listening its output goes to a bounded tail instead. With `logFile` its log
 * goes to a file, as PgBouncer's does: a line then costs the proxy a write to a file, and the
 * bench process (often the measuring client) nothing.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, fstatSync, openSync, readFileSync, readSync, readdirSync } from 'node:fs';
import type { Readable } from 'node:stream';
import { BIN, startProxyProcess } from '../test/harness/proxy.js';

export interface BenchProxy {
  readonly port: number;
  readonly pid: number;
  /** Resident memory of the process and its descendants (cluster workers), in KiB. */
  rssKiB(): number;
  /** CPU time (user + system) of the process and its descendants so far, in seconds. */
  cpuSeconds(): number;
  /** The last lines the program wrote. */
  tail(): string;
  /** SIGTERM, then SIGKILL after `graceMs`; resolves when the process has exited. */
  stop(graceMs?: number): Promise<void>;
}

export interface ProxyLaunch {
  readonly args: string[];
  readonly env?: NodeJS.ProcessEnv;
  /** A script to run instead of bin/lakebase-proxy.js; it takes the same arguments. */
  readonly script?: string;
  /** How many "listening" lines mean ready (a cluster prints one per worker). */
  readonly listeningLines?: number;
  /** Options for node itself, e.g. --cpu-prof (which NODE_OPTIONS does not accept). */
  readonly nodeArgs?: string[];
  /** Another Node.js executable than the one running the benchmark. */
  readonly node?: string;
  /** The program's log (its stderr) goes to this file instead of a pipe to the benchmark. */
  readonly logFile?: string;
}

const TAIL_BYTES = 16 * 1024;

export async function startBenchProxy(launch: ProxyLaunch): Promise<BenchProxy> {
  if (launch.script === undefined && launch.nodeArgs === undefined && launch.node === undefined && launch.logFile === undefined) {
    const proc = await startProxyProcess(launch.args, launch.env ?? {});
    return wrap(proc.child, proc.port, proc.output());
  }
  return spawnScript(launch.node ?? process.execPath, launch.script ?? BIN, launch.nodeArgs ?? [], launch.args, launch.env ?? {}, launch.listeningLines ?? 1, launch.logFile);
}

function wrap(child: ChildProcess, port: number, initial: string, logFile?: string): BenchProxy {
  let tail = initial.slice(-TAIL_BYTES);
  const keep = (chunk: Buffer): void => {
    tail = (tail + chunk.toString('utf8')).slice(-TAIL_BYTES);
  };
  for (const stream of [child.stdout, child.stderr] as Array<Readable | null>) {
    if (!stream) continue;
    stream.removeAllListeners('data');
    stream.on('data', keep);
  }
  const pid = child.pid ?? -1;
  const exited = new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else child.once('exit', () => resolve());
  });
  return {
    port,
    pid,
    rssKiB: () => treeRssKiB(pid),
    cpuSeconds: () => treeCpuSeconds(pid),
    tail: () => (logFile ? `${tail}${fileTail(logFile, TAIL_BYTES)}`.slice(-TAIL_BYTES) : tail),
    async stop(graceMs = 10_000) {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
      await exited;
      clearTimeout(timer);
    },
  };
}

function spawnScript(
  node: string,
  script: string,
  nodeArgs: string[],
  args: string[],
  env: NodeJS.ProcessEnv,
  listeningLines: number,
  logFile: string | undefined,
): Promise<BenchProxy> {
  const withPort = args.includes('--port') ? args : ['--port', '0', ...args];
  const logFd = logFile === undefined ? undefined : openSync(logFile, 'w');
  const child = spawn(node, [...nodeArgs, script, ...withPort, '--log-format', 'json'], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', logFd ?? 'pipe'],
  });
  if (logFd !== undefined) closeSync(logFd); // the child has its own
  let pending = '';
  let output = '';
  let seen = 0;
  let read = 0;
  return new Promise<BenchProxy>((resolve, reject) => {
    let poll: NodeJS.Timeout | undefined;
    const timer = setTimeout(() => {
      clearInterval(poll);
      child.kill('SIGKILL');
      reject(new Error(`${script} did not start in 20 s:\n${output}`));
    }, 20_000);
    const onExit = (code: number | null): void => {
      clearTimeout(timer);
      clearInterval(poll);
      if (logFile) output += fileTail(logFile, TAIL_BYTES);
      reject(new Error(`${script} exited with ${code} before listening:\n${output}`));
    };
    child.once('exit', onExit);
    const onData = (chunk: Buffer): void => {
      const text = chunk.toString('utf8');
      output += text;
      pending += text;
      const lines = pending.split('\n');
      pending = lines.pop() ?? '';
      for (const line of lines) {
        if (!line.startsWith('{')) continue;
        const entry = JSON.parse(line) as { msg?: string; port?: number };
        if (entry.msg !== 'listening' || ++seen < listeningLines) continue;
        clearTimeout(timer);
        clearInterval(poll);
        child.off('exit', onExit);
        resolve(wrap(child, entry.port as number, logFile ? '' : output, logFile));
        return;
      }
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onData);
    if (logFile) {
      // The log file is read as it grows until the program says it listens.
      poll = setInterval(() => {
        const chunk = readFrom(logFile, read);
        read += chunk.length;
        if (chunk.length > 0) onData(chunk);
      }, 20);
    }
  });
}

/** What `path` holds from byte `offset` on. */
function readFrom(path: string, offset: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const size = fstatSync(fd).size;
    if (size <= offset) return Buffer.alloc(0);
    const buffer = Buffer.alloc(size - offset);
    return buffer.subarray(0, readSync(fd, buffer, 0, buffer.length, offset));
  } finally {
    closeSync(fd);
  }
}

/** The last `bytes` of the file at `path` ('' when unreadable). */
function fileTail(path: string, bytes: number): string {
  try {
    const fd = openSync(path, 'r');
    let size: number;
    try {
      size = fstatSync(fd).size;
    } finally {
      closeSync(fd);
    }
    return readFrom(path, Math.max(0, size - bytes)).toString('utf8');
  } catch {
    return '';
  }
}

/** VmRSS of `pid` and every process below it, in KiB (0 for a process that is gone). */
export function treeRssKiB(pid: number): number {
  let total = rssKiB(pid);
  for (const child of childrenOf(pid)) total += treeRssKiB(child);
  return total;
}

/** utime + stime of `pid` and every process below it, in seconds. */
export function treeCpuSeconds(pid: number): number {
  let total = cpuSeconds(pid);
  for (const child of childrenOf(pid)) total += treeCpuSeconds(child);
  return total;
}

/**
 * How often the process's main thread (its event loop) has gone to sleep and been woken so far:
 * voluntary_ctxt_switches of /proc/<pid>/status; 0 when unreadable.
 */
export function wakeUps(pid: number): number {
  try {
    return Number(/^voluntary_ctxt_switches:\s*(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
  } catch {
    return 0;
  }
}

/** Clock ticks per second of /proc/<pid>/stat; 100 on every Linux that Node.js runs on. */
const TICKS = 100;

/** utime + stime from /proc/<pid>/stat, in seconds; 0 when unreadable. */
export function cpuSeconds(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    return (Number(fields[11]) + Number(fields[12])) / TICKS;
  } catch {
    return 0;
  }
}

/** VmRSS from /proc/<pid>/status, in KiB; 0 when unreadable. */
export function rssKiB(pid: number): number {
  try {
    const match = /^VmRSS:\s+(\d+)\s+kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return match ? Number(match[1]) : 0;
  } catch {
    return 0;
  }
}

function childrenOf(pid: number): number[] {
  try {
    // The kernel lists direct children per thread; the main thread's list is what fork() made.
    const text = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim();
    if (text) return text.split(/\s+/).map(Number);
  } catch {
    // fall back to a scan of /proc
  }
  const found: number[] = [];
  let entries: string[];
  try {
    entries = readdirSync('/proc');
  } catch {
    return found;
  }
  for (const entry of entries) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === pid) found.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return found;
}
