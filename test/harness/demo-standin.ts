/**
 * The Databricks OAuth stand-in as a service of its own, for `docker compose --profile demo`:
 * every token it issues becomes the demo role's password in the demo Postgres until it expires,
 * the way Lakebase accepts a token exactly while it is valid. Configured by environment (see the
 * `oauth` service in docker-compose.yml); pg reads PGHOST, PGUSER, PGPASSWORD... itself.
 */
import pg from 'pg';
import { quoteIdent, quoteLiteral } from './postgres.js';
import { runStandalone } from './databricks-standin.js';

const env = (name: string, fallback?: string): string => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};

const role = env('STANDIN_ROLE');
const db = new pg.Pool({ max: 2, ssl: process.env.PGSSLMODE === 'disable' ? false : { rejectUnauthorized: true } });

await runStandalone({
  host: env('STANDIN_ADDRESS', '127.0.0.1'),
  port: Number(env('STANDIN_PORT', '8443')),
  publicUrl: env('STANDIN_URL'),
  clientId: env('STANDIN_CLIENT_ID'),
  clientSecret: env('STANDIN_CLIENT_SECRET'),
  onIssue: async (token, expiresAt) => {
    await db.query(`ALTER ROLE ${quoteIdent(role)} PASSWORD ${quoteLiteral(token)} VALID UNTIL ${quoteLiteral(expiresAt.toISOString())}`);
  },
});
await db.end();
