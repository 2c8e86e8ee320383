/**
 * Data integrity and backpressure through the real program: COPY out and COPY in of ~50 MB
 * (1 GiB with LAKEBASE_PROXY_LONG_TESTS=1) hash the same through the proxy as straight from the
 * server, and a client that reads a large COPY out slowly keeps the proxy's memory flat.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { connect as netConnect } from 'node:net';
import { Readable, Transform, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import pg from 'pg';
import copyStreams from 'pg-copy-streams';
import { serialize } from 'pg-protocol';
import type { TestPostgres } from './harness/postgres.js';
import { startProxiedPostgresProcess, type ProxyProcess } from './harness/proxy.js';
import { backendsNamed, cleanEnvironment, LONG, pgClient, rssBytes, sleep, waitUntil } from './reliability-support.js';

cleanEnvironment();

const BYTES = LONG ? 1024 ** 3 : 50 * 1024 ** 2;
const ROW_PAYLOAD = 1000;
let db: TestPostgres;
let proxy: ProxyProcess;
let close: () => Promise<void>;
const token = 'tok-' + randomBytes(48).toString('base64url');

before(async () => ({ db, proxy, close } = await startProxiedPostgresProcess(token, ['--no-http'])));
after(() => close?.());

/** A superuser session on the server's own socket: the reference, with no proxy in between. */
async function directClient(): Promise<pg.Client> {
  const c = new pg.Client({ host: db.socketDir, port: db.port, user: db.superuser.user, database: db.database });
  c.on('error', () => {});
  await c.connect();
  return c;
}

/** sha256 and byte count of a COPY ... TO STDOUT on `c`. */
async function copyOutHash(c: pg.Client, sql: string): Promise<{ hash: string; bytes: number }> {
  const hash = createHash('sha256');
  let bytes = 0;
  await pipeline(
    c.query(copyStreams.to(sql)),
    new Writable({
      write(chunk: Buffer, _encoding, callback) {
        hash.update(chunk);
        bytes += chunk.length;
        callback();
      },
    }),
  );
  return { hash: hash.digest('hex'), bytes };
}

/** `rows` lines of COPY text, deterministic, each about ROW_PAYLOAD bytes, in chunks of 1,000 rows. */
function* copyLines(rows: number): Generator<Buffer> {
  const alphabet = randomBytes(4096).toString('base64').replace(/[+/=]/g, 'q');
  for (let first = 1; first <= rows; first += 1000) {
    const lines: string[] = [];
    for (let id = first; id < first + 1000 && id <= rows; id++) {
      const at = (id * 7919) % (alphabet.length - ROW_PAYLOAD);
      lines.push(`${id}\t${alphabet.slice(at, at + ROW_PAYLOAD)}\t${id % 3 === 0 ? '\\N' : `é☃${id}`}\n`);
    }
    yield Buffer.from(lines.join(''), 'utf8');
  }
}

test(`COPY out of ${BYTES >> 20} MB: the bytes through the proxy hash the same as straight from the server`, async () => {
  const rows = Math.ceil(BYTES / (ROW_PAYLOAD + 12));
  const sql = `copy (select g, md5(g::text) || repeat(chr(65 + g % 26), ${ROW_PAYLOAD - 32}), case when g % 5 = 0 then null else g * 1.5 end from generate_series(1, ${rows}) g) to stdout`;
  const through = pgClient(proxy.port, db);
  await through.connect();
  const direct = await directClient();
  try {
    const [viaProxy, reference] = await Promise.all([copyOutHash(through, sql), copyOutHash(direct, sql)]);
    assert.ok(viaProxy.bytes >= BYTES, `${viaProxy.bytes} bytes copied`);
    assert.deepEqual(viaProxy, reference);
  } finally {
    await Promise.all([through.end(), direct.end()]);
  }
});

test(`COPY in of ${BYTES >> 20} MB: what the server stored hashes the same as what the client sent`, async () => {
  const rows = Math.ceil(BYTES / (ROW_PAYLOAD + 14));
  const sent = createHash('sha256');
  let sentBytes = 0;
  const through = pgClient(proxy.port, db);
  await through.connect();
  const direct = await directClient();
  try {
    await through.query('create table copy_in (id int, payload text, note text)');
    await pipeline(
      Readable.from(copyLines(rows)),
      new Transform({
        transform(chunk: Buffer, _encoding, callback) {
          sent.update(chunk);
          sentBytes += chunk.length;
          callback(null, chunk);
        },
      }),
      through.query(copyStreams.from('copy copy_in from stdin')),
    );
    assert.ok(sentBytes >= BYTES, `${sentBytes} bytes sent`);
    // A fresh heap is read back in insertion order when no other scan runs beside it.
    await direct.query('set synchronize_seqscans = off');
    const stored = await copyOutHash(direct, 'copy copy_in to stdout');
    assert.deepEqual(stored, { hash: sent.digest('hex'), bytes: sentBytes });
  } finally {
    await direct.query('drop table if exists copy_in').catch(() => {});
    await Promise.all([through.end(), direct.end()]);
  }
});

test('a client reading a large COPY out slowly keeps the proxy memory flat (backpressure reaches the server)', async (t) => {
  const pid = proxy.child.pid as number;
  const socket = netConnect({ host: '127.0.0.1', port: proxy.port });
  socket.on('error', () => {});
  await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
  const name = 'slow-reader';
  socket.write(serialize.startup({ user: 'anyone', database: db.database, application_name: name }));
  // Read the greeting up to ReadyForQuery at full speed.
  let greeting = Buffer.alloc(0);
  await new Promise<void>((resolve) => {
    const onData = (chunk: Buffer): void => {
      greeting = Buffer.concat([greeting, chunk]);
      if (greeting.includes(Buffer.from([0x5a, 0, 0, 0, 5]))) {
        socket.off('data', onData);
        socket.pause();
        resolve();
      }
    };
    socket.on('data', onData);
  });
  await sleep(200);
  const baseline = rssBytes(pid);
  // About 3 GB if it were all produced: the server would fill the proxy in seconds without backpressure.
  socket.write(serialize.query("copy (select generate_series(1, 10000000), repeat('w', 300)) to stdout"));
  let received = 0;
  let peak = baseline;
  const readFor = LONG ? 30_000 : 4_000;
  const until = Date.now() + readFor;
  // Read about 256 KB a second: 64 KB every 250 ms.
  while (Date.now() < until) {
    let budget = 64 * 1024;
    while (budget > 0) {
      const chunk = socket.read(Math.min(budget, 16 * 1024)) as Buffer | null;
      if (!chunk) break;
      budget -= chunk.length;
      received += chunk.length;
    }
    peak = Math.max(peak, rssBytes(pid));
    await sleep(250);
  }
  const serverBlocked = (await db.query("select 1 from pg_stat_activity where application_name = $1 and wait_event = 'ClientWrite'", [name])).length === 1;
  socket.destroy();
  const growth = peak - baseline;
  t.diagnostic(`read ${received >> 10} KB in ${readFor} ms; proxy RSS ${(baseline / 1024 ** 2).toFixed(1)} MB, peak ${(peak / 1024 ** 2).toFixed(1)} MB`);
  assert.ok(received > 0 && received < 64 * 1024 ** 2, `the client read ${received >> 10} KB`);
  assert.ok(growth < 48 * 1024 ** 2, `proxy RSS grew ${(growth / 1024 ** 2).toFixed(1)} MB from ${(baseline / 1024 ** 2).toFixed(1)} MB while the server had ~3 GB to send`);
  assert.ok(serverBlocked, 'the server waits to write to the client (wait_event ClientWrite)');
  await waitUntil(async () => (await backendsNamed(db, name)) === 0, 10_000, 'the backend gone after the client');
});
