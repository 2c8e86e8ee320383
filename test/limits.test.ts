/** --idle-timeout, TCP keepalive toward the upstream, and `npm run demo`, through the real program. */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { startTokenPostgres, type TestPostgres } from './harness/postgres.js';
import { connectionFor, proxyClient, startProxyProcess } from './harness/proxy.js';

let db: TestPostgres;
const token = 'limits-token';
before(async () => (db = await startTokenPostgres(token)));
after(async () => db?.stop());

test('--idle-timeout closes a session idle that long, upstream included (PoolMode=none); a busy one and a long query stay', async () => {
  const proxy = await startProxyProcess(['--connection', connectionFor(db, token), '--no-http', '--idle-timeout', '700', '--pool-mode', 'none']);
  try {
    const idle = proxyClient(proxy.port, db, { application_name: 'idle' });
    const busy = proxyClient(proxy.port, db, { application_name: 'busy' });
    await idle.connect();
    await busy.connect();
    const closed = new Promise<void>((resolve) => idle.once('end', () => resolve()));
    for (let i = 0; i < 8; i++) {
      await busy.query('select 1');
      await new Promise((r) => setTimeout(r, 200));
    }
    await closed;
    assert.equal((await busy.query('select 2 as two')).rows[0].two, 2, 'a session in use is not idle');
    assert.equal((await busy.query('select pg_sleep(1.5), 3 as three')).rows[0].three, 3, 'a query running longer than the timeout is not idle');
    const busyClosed = new Promise<void>((resolve) => busy.once('end', () => resolve()));
    await busyClosed; // and once it is idle after that query, it is closed too
    const left = await db.query<{ n: string }>("select count(*) as n from pg_stat_activity where application_name = 'idle'");
    assert.equal(Number(left[0]?.n), 0, 'the idle session upstream is gone too');
    assert.match(proxy.output(), /"end":"idle_timeout"/);
  } finally {
    await proxy.stop();
  }
});

test('--idle-timeout on a pooled session lets the client go and keeps its upstream connection for the next client', async () => {
  const proxy = await startProxyProcess(['--connection', connectionFor(db, token), '--no-http', '--idle-timeout', '500', '--relay', 'native']);
  try {
    const idle = proxyClient(proxy.port, db, { application_name: 'pooled-idle' });
    await idle.connect();
    const pid = (await idle.query('select pg_backend_pid() as pid')).rows[0].pid as number;
    await new Promise<void>((resolve) => idle.once('end', () => resolve()));
    assert.match(proxy.output(), /"end":"idle_timeout"/);
    const next = proxyClient(proxy.port, db, { application_name: 'pooled-idle' });
    await next.connect();
    const again = (await next.query('select pg_backend_pid() as pid')).rows[0].pid as number;
    await next.end();
    if (/"relay":"native"/.test(proxy.output())) assert.equal(again, pid, 'the same upstream connection served the next client');
  } finally {
    await proxy.stop();
  }
});

test('the upstream connection has TCP keepalive on (and off with --keepalive 0)', { skip: spawnSync('ss', ['-V']).status !== 0 && 'ss (iproute2) is not installed' }, async () => {
  for (const [flag, expected] of [['60000', true], ['0', false]] as const) {
    const proxy = await startProxyProcess(['--connection', connectionFor(db, token), '--no-http', '--keepalive', flag]);
    const c = proxyClient(proxy.port, db);
    try {
      await c.connect();
      await c.query('select 1');
      const out = spawnSync('ss', ['-tnoH', 'state', 'established', `( dport = :${db.port} )`], { encoding: 'utf8' }).stdout;
      const lines = out.split('\n').filter((l) => l.includes(`:${db.port}`));
      assert.ok(lines.length > 0, out);
      assert.equal(lines.some((l) => l.includes('keepalive')), expected, `--keepalive ${flag}: ${out}`);
    } finally {
      await c.end();
      await proxy.stop();
    }
  }
});

test('npm run demo: one command gives a working psql session with no account', async () => {
  const demo = spawn(process.execPath, [fileURLToPath(new URL('./harness/demo.js', import.meta.url)), '0'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  demo.stdout.on('data', (d: Buffer) => (out += d.toString()));
  demo.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((resolve) => demo.once('exit', resolve));
  try {
    for (let i = 0; i < 300 && !/psql "host=127\.0\.0\.1 port=\d+/.test(out); i++) await new Promise((r) => setTimeout(r, 100));
    const match = /psql "host=127\.0\.0\.1 port=(\d+) dbname=(\S+) user=demo"/.exec(out);
    assert.ok(match, out);
    const c = new pg.Client({ host: '127.0.0.1', port: Number(match[1]), database: match[2], user: 'demo' });
    await c.connect();
    const who: string = (await c.query('select current_user as u')).rows[0].u;
    await c.end();
    assert.equal(who, 'token.user@example.com', 'logged in as the identity with an OAuth token from the stand-in');
  } finally {
    demo.kill('SIGINT');
  }
  assert.equal(await exited, 0, out);
});
