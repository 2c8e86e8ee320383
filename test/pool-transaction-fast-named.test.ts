/**
 * From the second review of the fast path: clients' named statements on the fast path (rewritten to the server's names),
 * against a model: Parse, Close, a name reused with another text, a failing Parse, DISCARD ALL,
 * DEALLOCATE ALL, eviction (MaxPreparedStatements), several clients on few connections.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { TestPostgres } from './harness/postgres.js';
import { startTokenPostgres } from './harness/postgres.js';
import { seeded, withPoolMode } from './pool-transaction-support.js';
import { serialize, summary, WireClient } from './harness/wire.js';

let db: TestPostgres;
const token = 'tok-' + randomBytes(600).toString('base64url');
before(async () => {
  db = await startTokenPostgres(token);
});
after(() => db?.stop());

const TAGS = ['t0', 't1', 't2', 't3', 't4'];
const text = (tag: string): string => `select '${tag}'::text as v, $1::int as p`;

async function run(w: WireClient, rnd: (n: number) => number, steps: number, who: number, log: string[]): Promise<void> {
  const model = new Map<string, string>();
  const names = ['s1', 's2', 's3'];
  for (let step = 0; step < steps; step++) {
    const op = rnd(100);
    const name = names[rnd(names.length)] as string;
    let sent: Buffer[];
    let expected: string[] | undefined;
    let desc: string;
    if (op < 20) {
      const tag = TAGS[rnd(TAGS.length)] as string;
      desc = `parse ${name}=${tag}`;
      sent = [serialize.parse({ name, text: text(tag), types: [23] }), serialize.sync()];
      if (model.has(name)) expected = ['error 42P05', 'ready I'];
      else {
        expected = ['parseComplete', 'ready I'];
        model.set(name, tag);
      }
    } else if (op < 28) {
      desc = `close ${name}`;
      sent = [serialize.close({ type: 'S', name }), serialize.sync()];
      expected = ['closeComplete', 'ready I'];
      model.delete(name);
    } else if (op < 31) {
      desc = `bad parse ${name}`;
      sent = [serialize.parse({ name, text: 'select nosuchcolumn' }), serialize.sync()];
      expected = ['error 42703', 'ready I']; // the text's error, in use or not: Postgres parses the text before it looks at the name
    } else if (op < 33) {
      desc = 'discard all';
      sent = [serialize.query(rnd(2) ? 'discard all' : 'deallocate all')];
      expected = undefined; // checked loosely
      model.clear();
    } else if (op < 40) {
      desc = `describe ${name}`;
      sent = [serialize.describe({ type: 'S', name }), serialize.sync()];
      expected = model.has(name) ? ['parameterDescription', 'rowDescription', 'ready I'] : ['error 26000', 'ready I'];
    } else if (op < 45) {
      desc = 'begin; bind in a transaction';
      const tag = model.get(name);
      sent = [serialize.query('begin'), serialize.bind({ statement: name, values: ['7'] }), serialize.execute({}), serialize.sync(), serialize.query('commit')];
      expected = tag ? ['complete BEGIN', 'ready T', 'bindComplete', `row ["${tag}","7"]`, 'complete SELECT 1', 'ready T', 'complete COMMIT', 'ready I'] : ['complete BEGIN', 'ready T', 'error 26000', 'ready E', 'complete ROLLBACK', 'ready I'];
    } else {
      desc = `bind ${name}`;
      const tag = model.get(name);
      sent = [serialize.bind({ statement: name, values: ['5'] }), serialize.describe({ type: 'P' }), serialize.execute({}), serialize.sync()];
      expected = tag ? ['bindComplete', 'rowDescription', `row ["${tag}","5"]`, 'complete SELECT 1', 'ready I'] : ['error 26000', 'ready I'];
    }
    w.send(...sent);
    const readies = sent.filter((m) => m[0] === 0x53 || m[0] === 0x51).length;
    const got = (await w.untilReady(readies, 10_000)).map(summary).filter((s) => s !== 'parameterStatus' && s !== 'notice' && s !== 'parameterStatus');
    const line = `client ${who} step ${step} ${desc}: ${got.join(',')}`;
    log.push(line);
    if (expected) assert.deepEqual(got, expected, `${line}\n${log.slice(-12).join('\n')}`);
    else assert.ok(got.includes('ready I') && !got.some((g) => g.startsWith('error')), line);
  }
}

for (const seed of [1, 2, 3, 4, 5, 6]) {
  test(`named statements against a model, seed ${seed}`, async () => {
    await withPoolMode(db, token, 'transaction', 'PoolSize=2;MaxPreparedStatements=3', async (proxy) => {
      const log: string[] = [];
      const clients = await Promise.all(Array.from({ length: 5 }, () => WireClient.open(proxy.port, { user: 'anyone', database: db.database })));
      try {
        await Promise.all(clients.map((w, i) => run(w, seeded(seed * 100 + i), 150, i, log)));
      } finally {
        for (const w of clients) w.end();
      }
    });
  });
}
