/** `lakebase-proxy check` and --run-connection-test: a token, TLS, login and SELECT 1, said step by step. */
import { serialize } from 'pg-protocol';
import type { ProxyOptions } from '../proxy/server.js';
import { connectUpstream } from '../proxy/upstream.js';
import { native } from '../proxy/native-relay.js';
import { WakeUp, withWakeUp } from '../proxy/wake-up.js';
import type { ComputeLocator } from '../lakebase/locator.js';
import { silentLogger } from './log.js';
import type { TokenSource } from '../token/token-source.js';
import { BackendCode, parseFields } from '../wire/backend-messages.js';
import { FrameReader } from '../wire/frame-reader.js';
import { SocketFrames } from '../wire/socket-frames.js';

const DATA_ROW = 0x44; // 'D'

/** Runs the test; `say` gets one line per step. Resolves true when every step passed. */
export async function connectionTest(options: ProxyOptions, tokenSource: TokenSource, say: (line: string) => void, locator?: ComputeLocator): Promise<boolean> {
  const where = `${options.name}: ${locator ? `${locator.setting} ${locator.description}` : `${options.upstream.host}:${options.upstream.port}`}`;
  let token;
  try {
    token = await tokenSource.getToken({ notice: (message) => say(`${where}: ${message}`) });
    say(`${where}: token ok from ${tokenSource.describe()}${token.expiresAt ? `, valid until ${token.expiresAt.toISOString()}` : ''}`);
  } catch (error) {
    say(`${where}: token FAILED: ${(error as Error).message}`);
    return false;
  }
  let session;
  try {
    // The same TLS as the sessions: OpenSSL in C for the native relay, Node's otherwise.
    const inC = options.relay === 'native' && native.addon !== undefined;
    const parameters = new Map([['database', options.defaultDatabase], ['application_name', 'lakebase-proxy check']]);
    const wakeUp = new WakeUp({ target: options.upstream, locator, logger: silentLogger, waited: () => {} });
    session = await withWakeUp(() => connectUpstream(options.upstream, options.identity, token.value, parameters, undefined, { native: inC }), wakeUp, { notice: (message) => say(`${where}: ${message}`) });
    if (locator) say(`${where}: host ${options.upstream.host}:${options.upstream.port}`);
    say(`${where}: TLS ok (${session.tls.version}, ${session.tls.cipher}, certificate ${options.upstream.sslMode === 'require' ? 'not verified (SSLMode=require)' : 'verified'})`);
    say(`${where}: relay ${inC ? 'native (OpenSSL in C)' : options.relay === 'native' ? `js (the native relay did not load: ${native.problem})` : 'js (--relay js)'}`);
    say(`${where}: login ok as "${options.identity}" to database "${options.defaultDatabase}"`);
  } catch (error) {
    say(`${where}: login FAILED: ${(error as Error).message}`);
    return false;
  }
  const frames = new SocketFrames(session.socket, new FrameReader(1 << 20, true));
  if (session.leftover.length > 0) frames.reader.push(session.leftover);
  try {
    session.socket.write(serialize.query('SELECT 1'));
    let value: string | undefined;
    for (;;) {
      const { type, body } = await frames.next();
      if (type === DATA_ROW && body.readInt16BE(0) === 1) value = body.toString('utf8', 6, 6 + body.readInt32BE(2));
      if (type === BackendCode.ErrorResponse) throw new Error(parseFields(body).find(([l]) => l === 'M')?.[1] ?? 'error');
      if (type === BackendCode.ReadyForQuery) break;
    }
    if (value !== '1') throw new Error(`SELECT 1 returned ${value === undefined ? 'no row' : value}`);
    say(`${where}: SELECT 1 ok`);
    return true;
  } catch (error) {
    say(`${where}: SELECT 1 FAILED: ${(error as Error).message}`);
    return false;
  } finally {
    frames.detach();
    session.socket.end(serialize.end());
    session.socket.destroy();
  }
}
