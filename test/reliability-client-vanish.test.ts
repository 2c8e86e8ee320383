/**
 * A client that vanishes in the middle of a COPY, in either direction, with a clean close or a
 * reset: the upstream session goes too (no backend left in pg_stat_activity), the proxy holds no
 * session for it, and other clients go on. (A client vanishing mid-query is in relay.test.ts.)
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { Socket } from 'node:net';
import { Writable } from 'node:stream';
import type pg from 'pg';
import copyStreams from 'pg-copy-streams';
import type { TestPostgres } from './harness/postgres.js';
import { startProxiedPostgres, type InProcessProxy } from './harness/proxy.js';
import { backendsNamed, pgClient, sleep, waitUntil, whoAmI } from './reliability-support.js';

let db: TestPostgres;
let proxy: InProcessProxy;
let close: () => Promise<void>;
const token = 'tok-' + randomBytes(48).toString('base64url');

before(async () => {
  ({ db, proxy, close } = await startProxiedPostgres(token));
  const c = pgClient(proxy.port, db);
  await c.connect();
  await c.query('create table vanish_sink (id int, payload text)');
  await c.end();
});

after(() => close?.());

function socketOf(c: pg.Client): Socket {
  return (c as unknown as { connection: { stream: Socket } }).connection.stream;
}

/** Ends the client's TCP connection without a word to Postgres: a close, or a reset. */
function vanish(c: pg.Client, how: 'close' | 'reset'): void {
  const socket = socketOf(c);
  if (how === 'reset') socket.resetAndDestroy();
  else socket.destroy();
}

/** No backend for `name`, and the proxy holds no session beyond `open`. */
async function noLeak(name: string, open = 0): Promise<void> {
  await waitUntil(async () => (await backendsNamed(db, name)) === 0, 10_000, `the backend of ${name} gone`);
  await waitUntil(() => proxy.server.connections <= open, 10_000, 'the proxy session closed');
}

for (const how of ['close', 'reset'] as const) {
  test(`a client that vanishes (${how}) in the middle of COPY FROM STDIN leaves no backend behind`, async () => {
    const name = `copy-in-${how}`;
    const bystander = pgClient(proxy.port, db);
    await bystander.connect();
    const c = pgClient(proxy.port, db, { application_name: name });
    await c.connect();
    const stream = c.query(copyStreams.from('copy vanish_sink from stdin'));
    stream.on('error', () => {});
    const row = Buffer.from(`1\t${'x'.repeat(200)}\n`);
    for (let i = 0; i < 2000; i++) stream.write(row);
    await waitUntil(async () => (await db.query("select 1 from pg_stat_activity where application_name = $1 and query like 'copy%'", [name])).length === 1, 5000, 'the COPY running');
    await sleep(100);
    vanish(c, how);
    await noLeak(name, 1);
    assert.equal((await db.query<{ n: number }>('select count(*)::int as n from vanish_sink'))[0]?.n, 0, 'the interrupted COPY wrote nothing');
    assert.equal((await bystander.query('select 1 as one')).rows[0].one, 1, 'another session goes on');
    await bystander.end();
  });

  test(`a client that vanishes (${how}) in the middle of a large COPY TO STDOUT leaves no backend behind`, async () => {
    const name = `copy-out-${how}`;
    const c = pgClient(proxy.port, db, { application_name: name });
    await c.connect();
    const stream = c.query(copyStreams.to("copy (select generate_series(1, 20000000), repeat('y', 300)) to stdout"));
    stream.on('error', () => {});
    let received = 0;
    // Read about 2 MB, then stop reading (the server keeps producing), then vanish.
    await new Promise<void>((resolve) => {
      stream.pipe(
        new Writable({
          highWaterMark: 1024,
          write(chunk: Buffer, _encoding, callback) {
            received += chunk.length;
            if (received > 2 * 1024 * 1024) resolve();
            else callback();
          },
        }),
      );
    });
    assert.equal(await backendsNamed(db, name), 1);
    vanish(c, how);
    await noLeak(name);
    assert.equal(await whoAmI(proxy.port, db), db.tokenRole);
  });
}

test('each vanished session is logged as ended during a query, and its query cancelled upstream', async () => {
  const ended = proxy.logs.filter((l) => l.msg === 'session ended during a query; cancelling it upstream');
  assert.ok(ended.length >= 4, `${ended.length} sessions cancelled`);
  assert.ok(!proxy.logText().includes(token));
});
