/**
 * The upstream failing under running sessions, through the real program: a backend killed
 * mid-query, the whole server stopping, a connection that ends or resets between two messages or
 * inside one, the upstream refusing connections and coming back, a reset during the TLS handshake.
 * Each time the affected client gets an ErrorResponse with a SQLSTATE (the upstream's own, or
 * 08006/08001 naming the upstream), the other sessions go on, and the process keeps serving.
 * (Login-time failures, a wrong certificate and pg_terminate_backend on an idle session are in
 * upstream.test.ts.)
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { Socket } from 'node:net';
import pg from 'pg';
import { startPostgres, startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { connectionFor, startProxyProcess, type ProxyProcess } from './harness/proxy.js';
import {
  backendsNamed,
  cleanEnvironment,
  firstChunk,
  loginError,
  pgClient,
  sleep,
  startScripted,
  startUpstreamStandin,
  type UpstreamStandin,
  waitUntil,
  whoAmI,
} from './reliability-support.js';

cleanEnvironment();

let db: TestPostgres;
let standin: UpstreamStandin;
/** The real program in front of the test Postgres. */
let direct: ProxyProcess;
/** The real program in front of the stand-in (which relays to the same Postgres). */
let relayed: ProxyProcess;
const token = 'tok-' + randomBytes(48).toString('base64url');

/** Upstream settings for a server on `port` that presents the test CA's localhost certificate. */
function upstreamAt(port: number, extra = ''): string {
  return connectionFor(db, token).replace(`Port=${db.port}`, `Port=${port}`) + (extra ? `;${extra}` : '');
}

const start = (connection: string, flags: string[] = []): Promise<ProxyProcess> =>
  startProxyProcess(['--connection', connection, '--no-http', '--connect-timeout', '3000', '--pool-mode', 'none', ...flags]);

before(async () => {
  db = await startTokenPostgres(token);
  standin = await startUpstreamStandin(db);
  [direct, relayed] = await Promise.all([start(connectionFor(db, token)), start(upstreamAt(standin.port))]);
});

after(async () => {
  await Promise.all([direct?.stop('SIGINT'), relayed?.stop('SIGINT')]);
  await standin?.close();
  await db?.stop();
});

function alive(p: ProxyProcess): boolean {
  return p.child.exitCode === null && p.child.signalCode === null;
}

/** Runs `sql` on `c` and resolves with the error it fails with (or the rows). */
function outcome(c: pg.Client, sql: string): Promise<{ error?: pg.DatabaseError & Error; rows?: unknown[] }> {
  return c.query(sql).then(
    (r) => ({ rows: r.rows }),
    (error: pg.DatabaseError & Error) => ({ error }),
  );
}

test('pg_terminate_backend mid-query: that client gets the upstream FATAL 57P01, queries in other sessions finish, new clients get in', async () => {
  const victim = pgClient(direct.port, db, { application_name: 'victim' });
  const bystanders = Array.from({ length: 3 }, () => pgClient(direct.port, db, { application_name: 'bystander' }));
  await Promise.all([victim, ...bystanders].map((c) => c.connect()));
  try {
    const killed = outcome(victim, 'select pg_sleep(20)');
    const running = bystanders.map((c, i) => c.query('select pg_sleep(0.8), $1::int as i', [i]));
    await waitUntil(async () => (await db.query("select 1 from pg_stat_activity where application_name = 'victim' and state = 'active'")).length === 1, 5000, 'the victim query running');
    const [row] = await db.query<{ done: boolean }>("select pg_terminate_backend(pid) as done from pg_stat_activity where application_name = 'victim'");
    assert.equal(row?.done, true);
    const { error } = await killed;
    assert.ok(error, 'the query failed');
    assert.equal(error.code, '57P01', error.message);
    assert.match(error.message, /terminating connection due to administrator command/);
    assert.deepEqual((await Promise.all(running)).map((r) => r.rows[0].i), [0, 1, 2], 'the other sessions finished their queries');
    assert.ok(alive(direct));
    assert.equal(await whoAmI(direct.port, db), db.tokenRole);
  } finally {
    await Promise.all([victim, ...bystanders].map((c) => c.end().catch(() => {})));
  }
});

test('the upstream ends a session between two messages without a word: that client gets 08006 naming it, the others go on', async () => {
  for (const [how, pattern] of [
    ['FIN', new RegExp(`^upstream (localhost|127\\.0\\.0\\.1):${standin.port} closed the connection unexpectedly$`)],
    ['RST', new RegExp(`^lost the connection to upstream (localhost|127\\.0\\.0\\.1):${standin.port}: .*ECONNRESET`)],
  ] as const) {
    const before = standin.pairs.length;
    const victim = pgClient(relayed.port, db, { application_name: `victim-${how}` });
    await victim.connect();
    const bystander = pgClient(relayed.port, db);
    await bystander.connect();
    try {
      const pair = standin.pairs[before];
      assert.ok(pair, 'the victim is the first new session through the stand-in');
      const killed = outcome(victim, 'select pg_sleep(20)');
      const running = bystander.query('select pg_sleep(0.5), 7 as seven');
      await waitUntil(async () => (await backendsNamed(db, `victim-${how}`)) === 1, 5000, 'the victim backend');
      await sleep(100);
      pair.back.destroy(); // the stand-in's session with the server goes away
      if (how === 'FIN') pair.frontTls.end();
      else pair.front.resetAndDestroy();
      const { error } = await killed;
      assert.ok(error, 'the query failed');
      assert.equal(error.code, '08006', `${how}: ${error.message}`);
      assert.equal(error.severity, 'FATAL');
      assert.match(error.message, pattern);
      assert.equal((await running).rows[0].seven, 7);
      assert.equal((await bystander.query('select 1 as one')).rows[0].one, 1, 'the other session goes on');
      // The server's side of the broken connection waits in pg_sleep until it next writes.
      await db.query('select pg_terminate_backend(pid) from pg_stat_activity where application_name = $1', [`victim-${how}`]);
    } finally {
      await Promise.all([victim.end().catch(() => {}), bystander.end().catch(() => {})]);
    }
  }
  assert.ok(alive(relayed));
  assert.equal(await whoAmI(relayed.port, db), db.tokenRole);
  assert.doesNotMatch(relayed.output(), /"level":(50|60)/, 'nothing logged as error or fatal');
});

test('the upstream ends a session inside a message: the client is disconnected without a made-up message after the partial one', async () => {
  const before = standin.pairs.length;
  const victim = pgClient(relayed.port, db);
  await victim.connect();
  try {
    const pair = standin.pairs[before];
    assert.ok(pair);
    // Stop relaying from the server, then send the proxy the first 7 bytes of a 100-byte DataRow.
    pair.back.removeAllListeners('data');
    pair.back.pause();
    const killed = outcome(victim, 'select 1');
    await sleep(200);
    pair.frontTls.end(Buffer.from([0x44, 0, 0, 0, 100, 0, 1]));
    const { error } = await killed;
    assert.ok(error, 'the query failed');
    assert.equal(error.code, undefined, `no ErrorResponse glued to half a message: ${error.message}`);
    assert.match(error.message, /Connection terminated unexpectedly/);
  } finally {
    await victim.end().catch(() => {});
  }
  assert.equal(await whoAmI(relayed.port, db), db.tokenRole);
});

test('the upstream refuses connections, then comes back: open sessions go on, new clients get 08001 naming it, service resumes without a restart', async () => {
  const open = pgClient(relayed.port, db);
  await open.connect();
  try {
    await standin.down();
    for (let i = 0; i < 3; i++) {
      const error = await loginError(relayed.port, db);
      assert.equal(error.code, '08001', error.message);
      assert.match(error.message, new RegExp(`upstream localhost:${standin.port}: .*ECONNREFUSED`));
    }
    assert.equal((await open.query('select 42 as answer')).rows[0].answer, 42, 'an open session does not notice');
    await standin.up();
    assert.equal(await whoAmI(relayed.port, db), db.tokenRole);
    assert.ok(alive(relayed));
  } finally {
    await standin.up();
    await open.end();
  }
});

test('the upstream resets or closes during the TLS handshake, or answers it with garbage: 08xxx naming it, no certificate advice, the next client gets in', async () => {
  const afterS = (then: (socket: Socket) => void) => async (socket: Socket) => {
    await firstChunk(socket);
    socket.write('S');
    socket.resume();
    socket.once('data', () => then(socket)); // the ClientHello
  };
  const cases: Array<[string, (socket: Socket) => void | Promise<void>, RegExp]> = [
    ['RST', afterS((s) => s.resetAndDestroy()), /ECONNRESET|closed the connection/],
    ['FIN', afterS((s) => s.end()), /closed the connection|socket disconnected|ECONNRESET/],
    ['garbage', afterS((s) => s.end(Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n'))), /TLS handshake with upstream|wrong version number|packet length too long|ssl/i],
  ];
  for (const [name, script, pattern] of cases) {
    const broken = await startScripted(script);
    const proxy = await start(upstreamAt(broken.port));
    try {
      const error = await loginError(proxy.port, db);
      assert.match(error.code ?? '', /^08(001|006|P01)$/, `${name}: ${error.code} ${error.message}`);
      assert.match(error.message, new RegExp(`upstream localhost:${broken.port}`), name);
      assert.match(error.message, pattern, name);
      if (name !== 'garbage') assert.doesNotMatch(error.message, /SSLRootCert|SSLMode/, `${name}: a reset is not a certificate problem: ${error.message}`);
      assert.ok(alive(proxy));
    } finally {
      await proxy.stop('SIGINT');
      await broken.close();
    }
  }
  assert.equal(await whoAmI(direct.port, db), db.tokenRole);
});

test('the whole upstream server stops mid-query: clients get its 57P01, the process stays up and answers new clients 08001 naming it', async () => {
  const other = await startPostgres();
  try {
    await other.setTokenPassword(token);
    const connection = connectionFor(other, token);
    const proxy = await start(connection);
    try {
      const clients = Array.from({ length: 3 }, () => pgClient(proxy.port, other));
      await Promise.all(clients.map((c) => c.connect()));
      const results = clients.map((c) => outcome(c, 'select pg_sleep(20)'));
      await waitUntil(async () => (await other.backendsOf(other.tokenRole)) === 3, 5000, 'three sessions');
      await sleep(200);
      const stopping = other.stop(); // fast shutdown: every backend says 57P01, then the server goes away
      for (const r of await Promise.all(results)) {
        assert.ok(r.error, 'the query failed');
        assert.match(r.error.code ?? '', /^(57P01|08006)$/, r.error.message);
      }
      await stopping;
      await Promise.all(clients.map((c) => c.end().catch(() => {})));
      const error = await loginError(proxy.port, other);
      assert.equal(error.code, '08001', error.message);
      assert.match(error.message, new RegExp(`upstream localhost:${other.port}`));
      assert.ok(alive(proxy), 'the process is still running');
    } finally {
      await proxy.stop('SIGINT');
    }
  } finally {
    await other.stop();
  }
});
