/**
 * The console's tables against PgBouncer's own console: for every SHOW that PgBouncer also has,
 * PgBouncer's columns come first, with the same names in the same order (the proxy's own come
 * after them), so that PgBouncer's dashboards and exporters read the proxy unchanged. PgBouncer
 * runs for real (Debian's package; `.ci/clients.sh` installs it on CI). Neither console needs
 * its upstream to answer, so both name a server that is not there.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import pg from 'pg';
import { findPgBouncer, startPgBouncer, type PgBouncer } from '../bench/pgbouncer.js';
import { testCA } from './harness/certs.js';
import { consoleClient, startRuntime, type RunningRuntime } from './harness/console.js';
import { cleanEnvironment } from './reliability-support.js';

const exe = findPgBouncer();
const skip = exe ? false : 'pgbouncer is not installed (apt-get install -y pgbouncer; .ci/clients.sh does it on CI)';
let bouncer: PgBouncer;
let proxy: RunningRuntime;

before(async () => {
  if (!exe) return;
  cleanEnvironment();
  const nowhere = { host: 'localhost', port: 1 };
  bouncer = await startPgBouncer(exe, { serverHost: nowhere.host, serverPort: nowhere.port, database: 'lakebase', user: 'someone', password: 'unused', caFile: (await testCA()).caFile, maxSessions: 4 });
  proxy = await startRuntime(['--connection', `Server=${nowhere.host};Port=${nowhere.port};User=someone;OAuthAccessToken=unused`, '--port', '0']);
});

after(async () => {
  await proxy?.close();
  await bouncer?.stop();
});

interface Console {
  readonly parameters: Map<string, string>;
  show(item: string): Promise<pg.QueryResult>;
  end(): Promise<void>;
}

/** A session on a console (PgBouncer's `pgbouncer` database, or the proxy's alias for it). */
async function open(port: number): Promise<Console> {
  const client = consoleClient({ host: '127.0.0.1', port, user: 'pgbouncer', database: 'pgbouncer' });
  const parameters = new Map<string, string>();
  client.connection.on('parameterStatus', (m: { parameterName: string; parameterValue: string }) => parameters.set(m.parameterName, m.parameterValue));
  await client.connect();
  return { parameters, show: (item) => client.query(`SHOW ${item}`), end: () => client.end() };
}

test('every SHOW that PgBouncer has starts with PgBouncer\'s columns, in its order', { skip }, async () => {
  const theirs = await open(bouncer.port);
  const ours = await open(proxy.port());
  try {
    for (const item of ['POOLS', 'CLIENTS', 'SERVERS', 'STATS', 'DATABASES', 'CONFIG', 'VERSION', 'LISTS']) {
      const expected = (await theirs.show(item)).fields.map((f) => f.name);
      const actual = (await ours.show(item)).fields.map((f) => f.name);
      assert.ok(expected.length > 0, `${bouncer.version} has SHOW ${item}`);
      assert.deepEqual(actual.slice(0, expected.length), expected, `SHOW ${item}: PgBouncer's columns first (${bouncer.version})`);
    }
    const lists = (result: pg.QueryResult): string[] => result.rows.map((r: { list: string }) => r.list);
    assert.deepEqual(lists(await ours.show('LISTS')), lists(await theirs.show('LISTS')), 'SHOW LISTS has the same lists');
    for (const name of theirs.parameters.keys()) assert.ok(ours.parameters.has(name), `the greeting has ${name}, as PgBouncer's console's does`);
  } finally {
    await theirs.end();
    await ours.end();
  }
});
