/** Connect latency: one new session, `SELECT 1`, close, timed end to end from the client. */
import pg from 'pg';

/** Milliseconds for connect + SELECT 1 + close with node-postgres. */
export async function connectSelectClose(config: pg.ClientConfig): Promise<number> {
  const started = process.hrtime.bigint();
  const client = new pg.Client(config);
  await client.connect();
  try {
    await client.query('SELECT 1');
  } finally {
    await client.end();
  }
  return Number(process.hrtime.bigint() - started) / 1e6;
}
