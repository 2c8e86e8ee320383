import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import type { EventEmitter } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import pg from 'pg';
import { testCA, untrustedCert } from './harness/certs.js';
import { startDatabricksStandin, type DatabricksStandin } from './harness/databricks-standin.js';
import { startPostgres, type TestPostgres } from './harness/postgres.js';

function sqlState(err: unknown): string | undefined {
  return (err as { code?: string } | null)?.code;
}

describe('test harness: PostgreSQL upstream', () => {
  let server: TestPostgres;

  before(async () => {
    const t0 = Date.now();
    server = await startPostgres();
    console.log(`startPostgres: ${Date.now() - t0} ms (port ${server.port})`);
  });

  after(async () => {
    await server?.stop();
  });

  function connect(config: pg.ClientConfig, onSaslMechanisms?: (mechanisms: string[]) => void): Promise<pg.Client> {
    const client = new pg.Client({ host: server.host, port: server.port, database: server.database, ...config });
    client.on('error', () => undefined);
    if (onSaslMechanisms) {
      const connection = (client as unknown as { connection: EventEmitter }).connection;
      connection.on('authenticationSASL', (msg: { mechanisms: string[] }) => onSaslMechanisms(msg.mechanisms));
    }
    return client.connect().then(
      () => client,
      async (err: unknown) => {
        await client.end().catch(() => undefined);
        throw err;
      },
    );
  }

  const tls = () => ({ ca: server.ca.caPem, servername: 'localhost' });

  it('lets the token role log in over TLS with the token as cleartext password', async () => {
    const token = `eyJ.test-token.${Date.now()}`;
    await server.setTokenPassword(token);
    const client = await connect({ user: server.tokenRole, password: token, ssl: tls() });
    try {
      const { rows } = await client.query<{ user: string; ssl: boolean; db: string }>(
        'SELECT current_user AS user, ssl AS ssl, current_database() AS db FROM pg_stat_ssl WHERE pid = pg_backend_pid()',
      );
      assert.deepEqual(rows, [{ user: server.tokenRole, ssl: true, db: server.database }]);
      await client.query('CREATE TABLE harness_probe (id int)');
      await client.query('DROP TABLE harness_probe');
      assert.equal(await server.backendsOf(server.tokenRole), 1);
    } finally {
      await client.end();
    }
  });

  it('also verifies the server certificate by IP address (SAN IP:127.0.0.1)', async () => {
    const token = 'ip-token';
    await server.setTokenPassword(token);
    const client = await connect({ user: server.tokenRole, password: token, ssl: { ca: server.ca.caPem } });
    await client.end();
  });

  it('fails TLS verification against a CA that did not sign the server certificate', async () => {
    const other = await untrustedCert();
    await assert.rejects(
      connect({ user: server.tokenRole, password: 'x', ssl: { ca: other.certPem, servername: 'localhost' } }),
      (err: Error) => /self[- ]signed|unable to verify|certificate/i.test(err.message),
    );
  });

  it('rejects the token role without TLS', async () => {
    const token = 'plain-token';
    await server.setTokenPassword(token);
    await assert.rejects(connect({ user: server.tokenRole, password: token, ssl: false }), (err: unknown) => {
      assert.equal(sqlState(err), '28000'); // pg_hba "reject"
      return true;
    });
  });

  it('gives SQLSTATE 28P01 for a wrong token', async () => {
    await server.setTokenPassword('right-token');
    await assert.rejects(connect({ user: server.tokenRole, password: 'wrong-token', ssl: tls() }), (err: unknown) => {
      assert.equal(sqlState(err), '28P01');
      return true;
    });
  });

  it('rejects a token whose VALID UNTIL has passed, and accepts it again when extended', async () => {
    const token = 'expiring-token';
    await server.setTokenPassword(token, new Date(Date.now() - 60_000));
    await assert.rejects(connect({ user: server.tokenRole, password: token, ssl: tls() }), (err: unknown) => {
      assert.equal(sqlState(err), '28P01');
      return true;
    });
    await server.setTokenPassword(token, new Date(Date.now() + 3_600_000));
    const client = await connect({ user: server.tokenRole, password: token, ssl: tls() });
    await client.end();
  });

  it('lets the SCRAM role log in over TLS, with channel binding (SCRAM-SHA-256-PLUS)', async () => {
    let offered: string[] = [];
    const client = await connect(
      { user: server.scramRole, password: server.scramPassword, ssl: tls(), enableChannelBinding: true },
      (mechanisms) => (offered = mechanisms),
    );
    assert.ok(offered.includes('SCRAM-SHA-256-PLUS'), `offered: ${offered.join(', ')}`);
    try {
      const { rows } = await client.query<{ u: string }>('SELECT current_user AS u');
      assert.equal(rows[0]?.u, server.scramRole);
    } finally {
      await client.end();
    }
    const plain = await connect({ user: server.scramRole, password: server.scramPassword, ssl: false });
    await plain.end();
  });

  it('lets the MD5 role log in with an md5-hashed password', async () => {
    const [row] = await server.query<{ hash: string }>('SELECT rolpassword AS hash FROM pg_authid WHERE rolname = $1', [
      server.md5Role,
    ]);
    assert.match(row?.hash ?? '', /^md5[0-9a-f]{32}$/);
    for (const ssl of [false, tls()]) {
      const client = await connect({ user: server.md5Role, password: server.md5Password, ssl });
      await client.end();
    }
  });

  it('lets the superuser log in with its password over TCP', async () => {
    const client = await connect({ user: server.superuser.user, password: server.superuser.password, ssl: tls() });
    await client.end();
    const [row] = await server.query<{ max_connections: string }>('SHOW max_connections');
    assert.equal(row?.max_connections, '300');
  });
});

describe('test harness: lifecycle', () => {
  it('applies extraConf and stop() removes the data folder (idempotently)', async () => {
    const t0 = Date.now();
    const server = await startPostgres({ extraConf: { max_connections: '20' } });
    const started = Date.now();
    const [row] = await server.query<{ max_connections: string }>('SHOW max_connections');
    assert.equal(row?.max_connections, '20');
    assert.ok(existsSync(server.dataDir));
    const t1 = Date.now();
    await server.stop();
    console.log(`start ${started - t0} ms, stop ${Date.now() - t1} ms`);
    assert.equal(existsSync(server.dataDir), false);
    await server.stop();
  });

  it('reports a failed start with the server log', async () => {
    await assert.rejects(startPostgres({ extraConf: { shared_buffers: 'lots' } }), (err: Error) => {
      assert.match(err.message, /server log/);
      assert.match(err.message, /shared_buffers/);
      return true;
    });
  });

  it('stops servers of a process that exits without stop() or is killed', async () => {
    const moduleUrl = new URL('./harness/postgres.js', import.meta.url).href;
    const script = (mode: 'exit' | 'hang') => `
      const { startPostgres } = await import(${JSON.stringify(moduleUrl)});
      const s = await startPostgres();
      console.log(JSON.stringify({ pid: s.pid, dataDir: s.dataDir }));
      ${mode === 'exit' ? 'process.exit(0);' : 'setInterval(() => {}, 1000);'}`;
    const launch = (mode: 'exit' | 'hang') =>
      new Promise<{ pid: number; dataDir: string; kill: () => void }>((resolve, reject) => {
        const child = spawn(process.execPath, ['--input-type=module', '-e', script(mode)], {
          stdio: ['ignore', 'pipe', 'inherit'],
        });
        let out = '';
        child.stdout.on('data', (d: Buffer) => {
          out += d.toString();
          const line = out.split('\n').find((l) => l.startsWith('{'));
          if (line) resolve({ ...(JSON.parse(line) as { pid: number; dataDir: string }), kill: () => child.kill('SIGKILL') });
        });
        child.on('exit', (code) => {
          if (!out.includes('{')) reject(new Error(`child exited ${code} before starting a server`));
        });
      });
    // Signalable and not a zombie (an orphaned postmaster is reaped by init, sometimes slowly).
    const alive = (pid: number) => {
      try {
        process.kill(pid, 0);
      } catch {
        return false;
      }
      try {
        return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
      } catch {
        return true;
      }
    };
    const [exiting, killed] = await Promise.all([launch('exit'), launch('hang')]);
    killed.kill();
    const deadline = Date.now() + 15_000;
    for (const s of [exiting, killed]) {
      while ((alive(s.pid) || existsSync(s.dataDir)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      assert.equal(alive(s.pid), false, 'postmaster still running');
      assert.equal(existsSync(s.dataDir), false, 'data folder left behind');
    }
  });

  it('loads the same CA in every call', async () => {
    const [a, b] = await Promise.all([testCA(), testCA()]);
    assert.equal(a.caPem, b.caPem);
    assert.match(a.serverCertPem, /BEGIN CERTIFICATE/);
  });
});

describe('test harness: Databricks stand-in', () => {
  it('expires_in is the lifetime the token was issued with, when the test changes it while the token is issued', async () => {
    let standin: DatabricksStandin | undefined;
    standin = await startDatabricksStandin({
      tokenLifetimeSeconds: 4,
      // What a test may do while onIssue sets the Postgres password.
      onIssue: () => {
        if (standin) standin.tokenLifetimeSeconds = 3600;
      },
    });
    try {
      const response = await fetch(`${standin.url}/oidc/v1/token`, {
        method: 'POST',
        headers: {
          authorization: `Basic ${Buffer.from(`${standin.clientId}:${standin.clientSecret}`).toString('base64')}`,
          'content-type': 'application/x-www-form-urlencoded',
        },
        body: 'grant_type=client_credentials&scope=all-apis',
        signal: AbortSignal.timeout(15_000),
      });
      const answer = (await response.json()) as { expires_in?: number };
      assert.equal(response.status, 200);
      assert.equal(standin.tokenLifetimeSeconds, 3600, 'changed while the token was issued');
      assert.equal(answer.expires_in, 4, 'the lifetime Postgres was told');
    } finally {
      await standin.close();
    }
  });
});
