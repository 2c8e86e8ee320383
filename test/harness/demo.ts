/**
 * `npm run demo`: a real Postgres that behaves like Lakebase (TLS, token-only login), a local
 * stand-in for the Databricks OAuth server, and the proxy in front, logging in as a service
 * principal with the client-credentials flow. Prints the psql command; Ctrl-C stops everything.
 */
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { testCA } from './certs.js';
import { startPostgres } from './postgres.js';
import { startDatabricksStandin } from './databricks-standin.js';
import { BIN } from './proxy.js';

function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = createServer();
    probe.once('error', () => resolve(false));
    probe.listen(port, '127.0.0.1', () => probe.close(() => resolve(true)));
  });
}

async function main(): Promise<void> {
  const wanted = Number(process.argv[2] ?? 5432);
  const port = (await portFree(wanted)) ? wanted : 0;
  const ca = await testCA();
  const db = await startPostgres();
  const standin = await startDatabricksStandin({
    onIssue: (token, expiresAt) => db.setTokenPassword(token, expiresAt),
  });
  const connection = [
    'Server=localhost',
    `Port=${db.port}`,
    `SSLRootCert=${ca.caFile}`,
    `Database=${db.database}`,
    `User=${db.tokenRole}`,
    'AuthScheme=OAuthClient',
    `DatabricksInstance=${standin.url}`,
    `OAuthClientId=${standin.clientId}`,
    `OAuthClientSecret=${standin.clientSecret}`,
    'OAuthSettingsLocation=memory://',
  ].join(';');
  const proxy = spawn(process.execPath, [BIN, '--connection', connection, '--port', String(port), '--http-port', '0', '--log-format', 'pretty'], {
    env: { ...process.env, NODE_EXTRA_CA_CERTS: ca.caFile },
    stdio: ['ignore', 'inherit', 'pipe'],
  });
  let shown = false;
  proxy.stderr.on('data', (chunk: Buffer) => {
    const text = chunk.toString('utf8');
    process.stderr.write(text);
    const listening = /listening .*?port=(\d+)/.exec(text);
    if (listening && !shown) {
      shown = true;
      process.stdout.write(
        [
          '',
          'lakebase-proxy demo is running:',
          `  Postgres (Lakebase stand-in)  localhost:${db.port}, TLS only, role "${db.tokenRole}" logs in with OAuth tokens`,
          `  Databricks OAuth stand-in     ${standin.url}`,
          `  proxy                         127.0.0.1:${listening[1]}`,
          '',
          'In another terminal:',
          `  psql "host=127.0.0.1 port=${listening[1]} dbname=${db.database} user=demo" -c "select current_user, now()"`,
          '',
          'Ctrl-C stops everything.',
          '',
        ].join('\n'),
      );
    }
  });
  const stop = async (): Promise<void> => {
    proxy.kill('SIGTERM');
    await new Promise((resolve) => proxy.once('exit', resolve));
    await standin.close();
    await db.stop();
    process.exit(0);
  };
  process.once('SIGINT', () => void stop());
  process.once('SIGTERM', () => void stop());
  proxy.once('exit', (code) => {
    if (!shown) {
      process.stderr.write(`the proxy exited with code ${code} before it was ready\n`);
      void standin.close().then(() => db.stop()).then(() => process.exit(1));
    }
  });
}

main().catch((error: unknown) => {
  process.stderr.write(`demo failed: ${error instanceof Error ? error.message : String(error)}\n`);
  process.exit(1);
});
