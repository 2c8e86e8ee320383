/**
 * Bulk transfer: COPY of a pre-built table to the client and COPY FROM the same bytes, timed
 * from the command's start to its CommandComplete (the connection is made before the clock).
 *
 * psql is the client when it is installed: it is C and spends little CPU, so the figure shows
 * what the path costs rather than what the client costs. Without psql, node-postgres with
 * pg-copy-streams does the same (heavier on the shared CPUs; the JSON says which client ran).
 */
import { spawn } from 'node:child_process';
import { createReadStream, createWriteStream } from 'node:fs';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import pg from 'pg';
import copyStreams from 'pg-copy-streams';
import { libpqEnvironment } from './pgbench.js';

export type CopyClient = 'psql' | 'node';

export interface CopyTiming {
  readonly bytes: number;
  readonly seconds: number;
}

/** Writes `COPY <table> TO STDOUT` into `file` over `config`; returns the byte count. */
export async function captureCopy(config: pg.ClientConfig, table: string, file: string): Promise<number> {
  const client = new pg.Client(config);
  await client.connect();
  try {
    let bytes = 0;
    await pipeline(
      client.query(copyStreams.to(`COPY ${table} TO STDOUT`)),
      async function* (source: AsyncIterable<Buffer>) {
        for await (const chunk of source) {
          bytes += chunk.length;
          yield chunk;
        }
      },
      createWriteStream(file),
    );
    return bytes;
  } finally {
    await client.end();
  }
}

export interface CopyPath {
  /** For node-postgres. */
  readonly client: pg.ClientConfig;
  /** PG* variables for psql. */
  readonly libpq: Readonly<Record<string, string>>;
}

export async function copyOut(via: CopyClient, path: CopyPath, table: string, expectBytes: number): Promise<CopyTiming> {
  if (via === 'psql') {
    const seconds = await psqlTimed(path.libpq, ['-o', '/dev/null', '-c', `COPY ${table} TO STDOUT`], undefined);
    return { bytes: expectBytes, seconds };
  }
  const client = new pg.Client(path.client);
  await client.connect();
  try {
    let bytes = 0;
    const started = process.hrtime.bigint();
    await pipeline(
      client.query(copyStreams.to(`COPY ${table} TO STDOUT`)),
      new Writable({
        write(chunk: Buffer, _encoding, callback) {
          bytes += chunk.length;
          callback();
        },
      }),
    );
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    if (bytes !== expectBytes) throw new Error(`COPY out returned ${bytes} bytes, expected ${expectBytes}`);
    return { bytes, seconds };
  } finally {
    await client.end();
  }
}

/** `COPY <table> FROM STDIN` with the bytes of `file` (`data`: the same bytes in memory, for node). */
export async function copyIn(via: CopyClient, path: CopyPath, table: string, file: string, data: readonly Buffer[], bytes: number): Promise<CopyTiming> {
  if (via === 'psql') {
    const seconds = await psqlTimed(path.libpq, ['-c', `COPY ${table} FROM STDIN`], file);
    return { bytes, seconds };
  }
  const client = new pg.Client(path.client);
  await client.connect();
  try {
    const started = process.hrtime.bigint();
    const sink = client.query(copyStreams.from(`COPY ${table} FROM STDIN`));
    await pipeline(async function* () {
      yield* data;
    }, sink);
    return { bytes, seconds: Number(process.hrtime.bigint() - started) / 1e9 };
  } finally {
    await client.end();
  }
}

/** Runs psql with `\timing on` and returns the command's own time in seconds. */
function psqlTimed(libpq: Readonly<Record<string, string>>, args: string[], stdinFile: string | undefined): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn('psql', ['-X', '-q', '-v', 'ON_ERROR_STOP=1', '-c', '\\timing on', ...args], {
      env: libpqEnvironment(libpq),
      stdio: [stdinFile ? 'pipe' : 'ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout?.on('data', (chunk: Buffer) => (output += chunk.toString('utf8')));
    child.stderr?.on('data', (chunk: Buffer) => (output += chunk.toString('utf8')));
    if (stdinFile && child.stdin) {
      child.stdin.on('error', () => {});
      createReadStream(stdinFile, { highWaterMark: 1 << 20 }).pipe(child.stdin);
    }
    child.once('error', reject);
    child.once('close', (code) => {
      const match = /^Time: ([\d.]+) ms/m.exec(output);
      if (code === 0 && match) resolve(Number(match[1]) / 1000);
      else reject(new Error(`psql ${args.join(' ')} exited with ${code}:\n${output.slice(-4000)}`));
    });
  });
}
