/**
 * The fast path's write to a lent connection that fails at once (the server reset the TCP
 * connection while the client did not read a large result): a NULL dereference in
 * native/txclient.c found by review. The proxy runs as its own process, so that a crash shows as its exit.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { connectionFor, startProxyProcess } from './harness/proxy.js';
import { sleep, waitUntil } from './reliability-support.js';
import { serialize, WireClient } from './harness/wire.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');

before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

test('a unit sent after the lent server connection was reset does not crash the proxy', async () => {
  const proxy = await startProxyProcess(['--connection', connectionFor(db, token, 'PoolMode=transaction;PoolSize=1')]);
  try {
    const w = await WireClient.open(proxy.port, { user: 'anyone', database: db.database });
    w.send(serialize.query('select 1')); 
    await w.untilReady();
    w.socket.pause(); // the client reads nothing more: its queue in C fills, the lent connection is paused
    w.send(serialize.query("select repeat('x', 1000) from generate_series(1, 500000) /* big */"));
    let pid: number | undefined;
    await waitUntil(
      async () => {
        const rows = await db.query<{ pid: number; wait_event: string | null }>("select pid, wait_event from pg_stat_activity where query like '%/* big */%' and pid <> pg_backend_pid()");
        pid = rows[0]?.pid;
        return rows[0]?.wait_event === 'ClientWrite';
      },
      10_000,
      'the backend blocked writing to the proxy',
    );
    w.send(serialize.query('select 2')); // lies unread in the backend's socket: its close sends RST
    await sleep(300);
    await db.query('select pg_terminate_backend($1)', [pid]);
    await sleep(500);
    w.send(serialize.query('select 3')); // SSL_write fails at once: ECONNRESET
    await sleep(300);
    w.send(serialize.query('select 4'));
    await sleep(1000);
    assert.equal(proxy.child.exitCode, null, `the proxy exited (${proxy.child.signalCode ?? proxy.child.exitCode}):\n${proxy.output().slice(-2000)}`);
    assert.equal(proxy.child.signalCode, null, `the proxy died of ${proxy.child.signalCode}:\n${proxy.output().slice(-4000)}`);
    w.socket.destroy();
  } finally {
    if (proxy.child.exitCode === null && proxy.child.signalCode === null) await proxy.stop('SIGKILL');
  }
});
