/**
 * A fuzz run against the real listener: mutated startup sequences (SSLRequest, GSSENCRequest,
 * CancelRequest, StartupMessage of protocol 3.0 and 3.2, messages after the startup), with
 * lengths, magic numbers and bytes changed, cut into random chunks, half-closed, left open or
 * dropped. Every case is derived from (seed, index), so a failure replays with `--only INDEX`.
 *
 *   npm run fuzz -- [--seed N] [--count N] [--concurrency N] [--only INDEX]   (or FUZZ_SEED, FUZZ_COUNT)
 *
 * It starts a test Postgres and the real program (--startup-timeout 1000), runs the cases, then
 * checks that the process is alive, holds no connection and still serves a normal pg client.
 * Checked per case: the proxy answers only well-framed messages; an ErrorResponse before the
 * startup completes carries severity FATAL and a SQLSTATE, and is followed by the close; no
 * connection stays open past the startup timeout without becoming a session. Exit code 0 or 1.
 */
import { readdirSync, readlinkSync } from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { pathToFileURL } from 'node:url';
import { parseFields } from '../src/wire/backend-messages.js';

export interface FuzzOptions {
  readonly host: string;
  readonly port: number;
  readonly seed: number;
  readonly count: number;
  /** Cases in flight at once. */
  readonly concurrency?: number;
  /** The proxy's --startup-timeout: a connection still open this long after the last byte, and not a session, hangs. */
  readonly startupTimeoutMs: number;
  /** Run only this case (to replay a failure). */
  readonly only?: number;
  /** Called between batches: false stops the run (the process died). */
  readonly alive?: () => boolean;
}

export type Outcome = 'error_response' | 'closed_silently' | 'session' | 'dropped_by_client';

export interface FuzzSummary {
  readonly seed: number;
  readonly cases: number;
  readonly outcomes: Record<Outcome, number>;
  /** SQLSTATEs of the ErrorResponses the proxy (or the upstream, in sessions) sent. */
  readonly sqlstates: Record<string, number>;
  /** The first message seen for each SQLSTATE. */
  readonly examples: Record<string, string>;
  readonly violations: string[];
  readonly elapsedMs: number;
}

// ---------------------------------------------------------------------------------------------
// A small seeded PRNG (sfc32): the same seed gives the same cases on every machine.

export class Random {
  #a: number;
  #b: number;
  #c: number;
  #d: number;

  constructor(seed: number, stream = 0) {
    this.#a = 0x9e3779b9;
    this.#b = seed | 0;
    this.#c = stream | 0;
    this.#d = 1;
    for (let i = 0; i < 15; i++) this.next();
  }

  /** A 32-bit unsigned integer. */
  next(): number {
    const t = (((this.#a + this.#b) | 0) + this.#d) | 0;
    this.#d = (this.#d + 1) | 0;
    this.#a = this.#b ^ (this.#b >>> 9);
    this.#b = (this.#c + (this.#c << 3)) | 0;
    this.#c = (this.#c << 21) | (this.#c >>> 11);
    this.#c = (this.#c + t) | 0;
    return t >>> 0;
  }

  /** An integer in [0, n). */
  below(n: number): number {
    return n <= 0 ? 0 : this.next() % n;
  }

  chance(p: number): boolean {
    return this.next() / 0x100000000 < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)] as T;
  }

  bytes(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) out[i] = this.below(256);
    return out;
  }
}

// ---------------------------------------------------------------------------------------------
// Cases

const SSL = 80877103;
const GSS = 80877104;
const CANCEL = 80877102;
const V30 = 0x00030000;
const V32 = 0x00030002;

/** Length fields and codes that sit on the edges of what the decoder accepts. */
const INTERESTING_INT32 = [
  -0x80000000, -1, 0, 1, 3, 4, 5, 7, 8, 9, 12, 16, 255, 256, 9999, 10000, 10001, 65535, 65536, 0x7fffffff,
  SSL, GSS, CANCEL, CANCEL + 3, V30, V32, 0x00020000, 0x00040000, 0x0003ffff, 0x04d20000, 0x04d2ffff,
];

function int32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n | 0);
  return b;
}

function packet(body: Buffer): Buffer {
  return Buffer.concat([int32(4 + body.length), body]);
}

function typed(type: string, body: Buffer): Buffer {
  return Buffer.concat([Buffer.from(type, 'latin1'), int32(4 + body.length), body]);
}

function startup(random: Random, version = V30): Buffer {
  const pairs: string[] = [];
  if (!random.chance(0.05)) pairs.push('user', random.pick(['anyone', 'fuzz', '', 'ü'.repeat(random.below(20))]));
  if (random.chance(0.7)) pairs.push('database', random.pick(['databricks_postgres', 'fuzz_no_such_db', '']));
  if (random.chance(0.3)) pairs.push('application_name', `fuzz-${random.below(1000)}`);
  if (random.chance(0.2)) pairs.push('options', '-c statement_timeout=1000');
  if (version !== V30 || random.chance(0.1)) pairs.push('_pq_.fuzz', 'on');
  const body = Buffer.concat([int32(version), Buffer.from(pairs.map((p) => `${p}\0`).join(''), 'utf8'), Buffer.from([0])]);
  return packet(body);
}

/** The valid sequences that the mutations start from. */
const TEMPLATES: ReadonlyArray<(random: Random) => Buffer[]> = [
  (r) => [startup(r)],
  (r) => [packet(int32(SSL)), startup(r)],
  (r) => [packet(int32(GSS)), packet(int32(SSL)), startup(r)],
  (r) => [startup(r, V32)],
  (r) => [packet(Buffer.concat([int32(CANCEL), r.bytes(8)]))],
  (r) => [startup(r), typed('Q', Buffer.from('select 1\0')), typed('X', Buffer.alloc(0))],
  (r) => [startup(r), typed('p', Buffer.from('not-a-password\0'))],
  () => [packet(int32(SSL)), packet(int32(SSL))],
  (r) => [r.bytes(1 + r.below(40))],
];

export interface FuzzCase {
  readonly index: number;
  readonly chunks: Buffer[];
  /** After the last chunk: half-close, keep the connection open, or drop it at once. */
  readonly ending: 'end' | 'keep' | 'destroy';
  /** Milliseconds between chunks (0: all in one go). */
  readonly gapMs: number;
}

function mutate(random: Random, input: Buffer): Buffer {
  let b = Buffer.from(input);
  const edits = random.below(4);
  for (let e = 0; e < edits; e++) {
    switch (random.below(8)) {
      case 0: // flip a bit
        if (b.length > 0) {
          const at = random.below(b.length);
          b[at] = (b[at] as number) ^ (1 << random.below(8));
        }
        break;
      case 1: // an interesting length or code at a packet-ish offset
        if (b.length >= 4) b.writeInt32BE(random.pick(INTERESTING_INT32) | 0, random.pick([0, 4, 4 * random.below(Math.floor(b.length / 4))].filter((o) => o + 4 <= b.length)));
        break;
      case 2: // insert bytes
        {
          const at = random.below(b.length + 1);
          b = Buffer.concat([b.subarray(0, at), random.bytes(1 + random.below(16)), b.subarray(at)]);
        }
        break;
      case 3: // delete a range
        if (b.length > 1) {
          const at = random.below(b.length);
          b = Buffer.concat([b.subarray(0, at), b.subarray(at + 1 + random.below(8))]);
        }
        break;
      case 4: // truncate
        b = b.subarray(0, random.below(b.length + 1));
        break;
      case 5: // duplicate a slice
        {
          const at = random.below(b.length + 1);
          b = Buffer.concat([b, b.subarray(at, at + 1 + random.below(32))]);
        }
        break;
      case 6: // a NUL or a high byte somewhere
        if (b.length > 0) b[random.below(b.length)] = random.pick([0, 0xff, 0x80]);
        break;
      default: // garbage after
        b = Buffer.concat([b, random.bytes(1 + random.below(64))]);
    }
  }
  return b;
}

/** The case at `index` of the run with `seed`. */
export function makeCase(seed: number, index: number): FuzzCase {
  const random = new Random(seed, index);
  const packets = random.pick(TEMPLATES)(random);
  const mutated = random.chance(0.85) ? packets.map((p) => (random.chance(0.6) ? mutate(random, p) : p)) : packets;
  const bytes = Buffer.concat(mutated);
  // Cut the bytes into up to 6 chunks at random points.
  const cuts = Array.from({ length: random.below(6) }, () => random.below(bytes.length + 1)).sort((x, y) => x - y);
  const chunks: Buffer[] = [];
  let from = 0;
  for (const cut of [...cuts, bytes.length]) {
    if (cut > from) chunks.push(bytes.subarray(from, cut));
    from = Math.max(from, cut);
  }
  const ending = random.pick(['end', 'end', 'keep', 'keep', 'keep', 'destroy'] as const);
  return { index, chunks, ending, gapMs: random.chance(0.3) ? random.below(30) : 0 };
}

// ---------------------------------------------------------------------------------------------
// Running one case

interface CaseResult {
  readonly outcome: Outcome;
  readonly sqlstates: string[];
  readonly messages?: string[];
  readonly violation?: string;
}

/** Message types a client may see from the proxy before its AuthenticationOk. */
const BEFORE_AUTH_OK = new Set(['E', 'R', 'v', 'N']);
/** Outside the startup, messages are at most this long in these runs (no large results). */
const MAX_REPLY_MESSAGE = 1 << 20;

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

export async function runCase(options: FuzzOptions, fuzzCase: FuzzCase): Promise<CaseResult> {
  const socket: Socket = netConnect({ host: options.host, port: options.port });
  socket.setNoDelay(true);
  let reply = Buffer.alloc(0);
  let closedAt: number | undefined;
  const closed = new Promise<void>((resolve) =>
    socket.once('close', () => {
      closedAt = Date.now();
      resolve();
    }),
  );
  socket.on('error', () => {});
  socket.on('data', (chunk: Buffer) => {
    reply = Buffer.concat([reply, chunk]);
  });
  try {
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
  } catch (error) {
    return { outcome: 'closed_silently', sqlstates: [], violation: `case ${fuzzCase.index}: cannot connect: ${(error as Error).message}` };
  }
  for (const chunk of fuzzCase.chunks) {
    if (closedAt !== undefined) break;
    socket.write(chunk);
    if (fuzzCase.gapMs > 0) await sleep(fuzzCase.gapMs);
  }
  const lastByteAt = Date.now();
  if (fuzzCase.ending === 'destroy') {
    socket.destroy();
    return { outcome: 'dropped_by_client', sqlstates: [] };
  }
  if (fuzzCase.ending === 'end') socket.end();

  // Follow the reply: answers, the startup, and, when it became a session, its first messages.
  const deadline = lastByteAt + options.startupTimeoutMs + 3000;
  const sqlstates: string[] = [];
  const messages: string[] = [];
  let offset = 0;
  let authenticated = false;
  let errorBeforeAuth = false;
  let sentTerminate = false;
  const fail = (why: string): CaseResult => {
    socket.destroy();
    const input = Buffer.concat(fuzzCase.chunks).toString('hex');
    return { outcome: 'closed_silently', sqlstates, violation: `case ${fuzzCase.index} (${fuzzCase.ending}, input ${input.slice(0, 200)}): ${why}` };
  };
  for (;;) {
    // Parse what has arrived.
    for (;;) {
      if (offset >= reply.length) break;
      const type = String.fromCharCode(reply[offset] as number);
      if (!authenticated && (type === 'N' || type === 'S') && (reply.length - offset < 5 || reply.readInt32BE(offset + 1) > MAX_REPLY_MESSAGE)) {
        offset += 1; // a one-byte answer to SSLRequest / GSSENCRequest
        continue;
      }
      if (!authenticated && type === 'S') return fail('the proxy accepted TLS (S) though it has no certificate');
      if (reply.length - offset < 5) break;
      const length = reply.readInt32BE(offset + 1);
      if (length < 4 || length > MAX_REPLY_MESSAGE) return fail(`a message ${type} with length ${length}`);
      if (reply.length - offset < 1 + length) break;
      const body = reply.subarray(offset + 5, offset + 1 + length);
      offset += 1 + length;
      if (!authenticated && !BEFORE_AUTH_OK.has(type)) return fail(`message ${type} before AuthenticationOk`);
      if (type === 'E') {
        const fields = Object.fromEntries(parseFields(body));
        const code = fields['C'] ?? '';
        sqlstates.push(code);
        messages.push(fields['M'] ?? '');
        if (!/^[0-9A-Z]{5}$/.test(code)) return fail(`an ErrorResponse without a SQLSTATE: ${JSON.stringify(fields)}`);
        if (!fields['M']) return fail(`an ErrorResponse without a message: ${JSON.stringify(fields)}`);
        if (!authenticated) {
          if (fields['S'] !== 'FATAL') return fail(`an ErrorResponse before the startup completed that is not FATAL: ${JSON.stringify(fields)}`);
          errorBeforeAuth = true;
        }
      } else if (type === 'R' && !authenticated) {
        if (body.length >= 4 && body.readInt32BE(0) === 0) authenticated = true;
        else return fail(`an authentication request ${body.length >= 4 ? body.readInt32BE(0) : '?'} from a trust listener`);
      } else if (type === 'Z' && authenticated && !sentTerminate && fuzzCase.ending === 'keep') {
        sentTerminate = true;
        socket.end(Buffer.from([0x58, 0, 0, 0, 4]));
      }
      if (errorBeforeAuth && offset < reply.length && !authenticated) return fail('bytes after a FATAL ErrorResponse');
    }
    if (closedAt !== undefined) break;
    if (Date.now() > deadline) {
      if (authenticated) break; // a session: it may stay open, it is ours to close
      return fail(`still open ${Date.now() - lastByteAt} ms after the last byte, with no session (${reply.length} bytes answered)`);
    }
    await Promise.race([closed, sleep(20)]);
  }
  if (offset !== reply.length && !authenticated) return fail(`the reply ends inside a message (${reply.length - offset} bytes left)`);
  socket.destroy();
  await closed;
  if (authenticated) return { outcome: 'session', sqlstates, messages };
  return { outcome: sqlstates.length > 0 ? 'error_response' : 'closed_silently', sqlstates, messages };
}

// ---------------------------------------------------------------------------------------------
// A run

export async function fuzzListener(options: FuzzOptions): Promise<FuzzSummary> {
  const started = Date.now();
  const outcomes: Record<Outcome, number> = { error_response: 0, closed_silently: 0, session: 0, dropped_by_client: 0 };
  const sqlstates: Record<string, number> = {};
  const examples: Record<string, string> = {};
  const violations: string[] = [];
  const indexes = options.only !== undefined ? [options.only] : Array.from({ length: options.count }, (_, i) => i);
  const concurrency = options.concurrency ?? 16;
  let next = 0;
  let stopped = false;
  const worker = async (): Promise<void> => {
    while (!stopped && next < indexes.length) {
      const index = indexes[next++] as number;
      const result = await runCase(options, makeCase(options.seed, index));
      outcomes[result.outcome]++;
      result.sqlstates.forEach((code, i) => {
        sqlstates[code] = (sqlstates[code] ?? 0) + 1;
        examples[code] ??= result.messages?.[i] ?? '';
      });
      if (result.violation) violations.push(result.violation);
      if (options.alive && !options.alive()) {
        violations.push(`the proxy process died during case ${index}`);
        stopped = true;
      }
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  return { seed: options.seed, cases: indexes.length, outcomes, sqlstates, examples, violations, elapsedMs: Date.now() - started };
}

// ---------------------------------------------------------------------------------------------
// `npm run fuzz`

/** Sockets a process holds (Linux /proc). */
function socketsOf(pid: number): number {
  let n = 0;
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('socket:')) n++;
    } catch {
      // closed meanwhile
    }
  }
  return n;
}

function argValue(argv: readonly string[], name: string): string | undefined {
  const at = argv.indexOf(name);
  if (at >= 0) return argv[at + 1];
  return argv.find((a) => a.startsWith(`${name}=`))?.slice(name.length + 1);
}

function intOption(argv: readonly string[], name: string, env: string, fallback: number): number {
  const text = argValue(argv, name) ?? process.env[env];
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${name} (or ${env}) must be a whole number, got "${text}"`);
  return n;
}

async function main(argv: readonly string[]): Promise<number> {
  const seed = intOption(argv, '--seed', 'FUZZ_SEED', 20240601);
  const count = intOption(argv, '--count', 'FUZZ_COUNT', 1000);
  const concurrency = intOption(argv, '--concurrency', 'FUZZ_CONCURRENCY', 16);
  const onlyText = argValue(argv, '--only');
  const startupTimeoutMs = 1000;
  // The harness is imported here only: the module stays usable from tests without side effects.
  const { startPostgres } = await import('./harness/postgres.js');
  const { connectionFor, startProxyProcess } = await import('./harness/proxy.js');
  const pg = (await import('pg')).default;
  const token = `fuzz-${seed}-${Date.now()}`;
  const db = await startPostgres();
  let code = 1;
  try {
    await db.setTokenPassword(token);
    const proxy = await startProxyProcess(
      ['--connection', connectionFor(db, token), '--no-http', '--startup-timeout', String(startupTimeoutMs), '--connect-timeout', '5000'],
    );
    const pid = proxy.child.pid as number;
    const alive = (): boolean => proxy.child.exitCode === null && proxy.child.signalCode === null;
    const socketsBefore = socketsOf(pid);
    try {
      process.stdout.write(`fuzz: seed ${seed}, ${onlyText ?? count} case(s), ${concurrency} at once, against pid ${pid} on port ${proxy.port}\n`);
      const summary = await fuzzListener({
        host: '127.0.0.1',
        port: proxy.port,
        seed,
        count,
        concurrency,
        startupTimeoutMs,
        alive,
        ...(onlyText !== undefined ? { only: Number(onlyText) } : {}),
      });
      const problems = [...summary.violations];
      if (!alive()) problems.push(`the proxy exited (${proxy.child.exitCode ?? proxy.child.signalCode})`);
      else {
        // Still serving a normal client, and holding no connection of the run.
        const c = new pg.Client({ host: '127.0.0.1', port: proxy.port, user: 'after-fuzz', database: db.database, connectionTimeoutMillis: 10_000 });
        c.on('error', () => {});
        try {
          await c.connect();
          const who = (await c.query<{ u: string }>('select current_user as u')).rows[0]?.u;
          if (who !== db.tokenRole) problems.push(`a normal client ran as ${who}`);
        } catch (error) {
          problems.push(`a normal client failed after the run: ${(error as Error).message}`);
        } finally {
          await c.end().catch(() => {});
        }
        // Every connection of the run closed: back to the sockets held before it.
        const deadline = Date.now() + startupTimeoutMs + 5000;
        while (socketsOf(pid) > socketsBefore && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
        if (socketsOf(pid) > socketsBefore) problems.push(`the proxy holds ${socketsOf(pid) - socketsBefore} socket(s) more than before the run`);
      }
      if (/"level":(50|60)/.test(proxy.output())) problems.push(`the proxy logged errors:\n${proxy.output().split('\n').filter((l) => /"level":(50|60)/.test(l)).slice(0, 5).join('\n')}`);
      process.stdout.write(`${JSON.stringify({ ...summary, violations: summary.violations.length }, null, 2)}\n`);
      for (const problem of problems.slice(0, 20)) process.stdout.write(`PROBLEM ${problem}\n`);
      process.stdout.write(problems.length === 0 ? 'fuzz: ok\n' : `fuzz: ${problems.length} problem(s); replay one with --seed ${seed} --only INDEX\n`);
      code = problems.length === 0 ? 0 : 1;
    } finally {
      await proxy.stop('SIGINT');
    }
  } finally {
    await db.stop();
  }
  return code;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (error: unknown) => {
      process.stderr.write(`fuzz: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
      process.exit(2);
    },
  );
}
