/**
 * Commands that talk to a proxy already running on this host, through its HTTP endpoint
 * (HttpAddress, HttpPort): `wait` until it reports /startup ready, and `shutdown` it with
 * POST /quitquitquit (what SIGTERM does). And who may ask for that: AdminAddress.
 */
import { parseDuration as parseSetting } from '../config/duration.js';
import { request } from 'node:http';
import { BlockList, isIP } from 'node:net';
import { ConfigError, type Settings } from '../config/properties.js';

/**
 * Whether a peer may POST /quitquitquit, from AdminAddress: comma-separated addresses and CIDR
 * ranges (IPv4 or IPv6), or `none`. An IPv4 peer on a dual-stack socket (::ffff:a.b.c.d) is
 * matched as IPv4.
 */
export function adminPeers(text: string): (address: string | undefined) => boolean {
  const allowed = new BlockList();
  const entries = text.split(',').map((entry) => entry.trim());
  if (entries.length === 1 && entries[0] === 'none') return () => false;
  for (const entry of entries) {
    const [address = '', prefix, extra] = entry.split('/');
    const family = isIP(address);
    const bits = family === 4 ? 32 : 128;
    const length = prefix === undefined ? bits : /^\d{1,3}$/.test(prefix) ? Number(prefix) : NaN;
    if (family === 0 || extra !== undefined || !(length >= 0 && length <= bits)) {
      throw new ConfigError(`AdminAddress: "${entry}" is not an address or a CIDR range (such as 127.0.0.0/8 or ::1); give a comma-separated list, or none`);
    }
    allowed.addSubnet(address, length, family === 4 ? 'ipv4' : 'ipv6');
  }
  return (address) => {
    if (address === undefined) return false;
    const plain = address.startsWith('::ffff:') && isIP(address.slice(7)) === 4 ? address.slice(7) : address;
    const family = isIP(plain);
    return family !== 0 && allowed.check(plain, family === 4 ? 'ipv4' : 'ipv6');
  };
}

/** Where this host's proxy serves HTTP: HttpAddress (a wildcard means loopback) and HttpPort. */
function endpoint(settings: Settings, command: string): { host: string; port: number; url: string } {
  if (settings.bool('NoHttp')) throw new ConfigError(`${command} talks to the proxy's HTTP endpoint, which NoHttp (--no-http) turns off`);
  const address = settings.string('HttpAddress') as string;
  const host = address === '0.0.0.0' || address === '' ? '127.0.0.1' : address === '::' ? '::1' : address;
  const port = settings.int('HttpPort');
  if (port === 0) throw new ConfigError(`${command} needs the proxy's HttpPort; 0 (a free port) cannot be found from outside`);
  return { host, port, url: `http://${isIP(host) === 6 ? `[${host}]` : host}:${port}` };
}

/** One request: resolves with the status and body, or rejects (refused, timed out). */
function call(host: string, port: number, method: string, path: string, timeoutMs: number): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host, port, method, path, agent: false, timeout: timeoutMs }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (body += chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: body.trim() }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`no answer in ${timeoutMs} ms`)));
    req.on('error', reject);
    req.end();
  });
}

/** `30s`, `500ms`, `2m`, `1h`, `1m30s`; a bare number is milliseconds, as in every time setting (the same parser). */
export function parseDuration(text: string, what: string): number {
  const ms = parseSetting(text);
  if (ms === undefined) throw new ConfigError(`${what}: "${text}" is not a duration; give a number with a unit, such as 30s, 500ms or 2m`);
  return ms;
}

/** The options a command takes itself: `--name value` or `--name=value`, each known name once. */
function commandOptions(command: string, rest: readonly string[], known: readonly string[]): Map<string, string> {
  const options = new Map<string, string>();
  for (let i = 0; i < rest.length; i++) {
    const arg = rest[i] as string;
    const eq = arg.indexOf('=');
    const name = eq > 0 ? arg.slice(0, eq) : arg;
    if (!known.includes(name)) throw new ConfigError(`${command}: unknown option ${arg}; see --help`);
    const value = eq > 0 ? arg.slice(eq + 1) : rest[++i];
    if (value === undefined) throw new ConfigError(`${command}: ${name} needs a value`);
    options.set(name, value);
  }
  return options;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** `lakebase-proxy wait [--max 30s]`: 0 once the proxy reports /startup ready, 1 after the limit. */
export async function waitCommand(settings: Settings, rest: readonly string[]): Promise<number> {
  const options = commandOptions('wait', rest, ['--max']);
  const maxMs = parseDuration(options.get('--max') ?? '30s', 'wait --max');
  const { host, port, url } = endpoint(settings, 'wait');
  const deadline = Date.now() + maxMs;
  let last = 'no answer yet';
  for (;;) {
    const left = deadline - Date.now();
    if (left <= 0) break;
    const timeoutMs = Math.max(1, Math.min(left, 2000));
    try {
      const { status, body } = await call(host, port, 'GET', '/startup', timeoutMs);
      if (status === 200) return 0;
      last = `${status} ${body}`;
    } catch (error) {
      // A request that --max itself cut short saw nothing: the answer before it stays the last.
      const cutShort = timeoutMs < 2000 && (error as Error).message.startsWith('no answer in');
      if (!cutShort || last === 'no answer yet') last = (error as Error).message;
    }
    await sleep(Math.min(250, Math.max(0, deadline - Date.now())));
  }
  throw new Error(`the proxy at ${url} did not report /startup ready within ${maxMs} ms (last: ${last})`);
}

/** `lakebase-proxy shutdown`: POST /quitquitquit, which the proxy takes as SIGTERM. */
export async function shutdownCommand(settings: Settings, rest: readonly string[]): Promise<number> {
  commandOptions('shutdown', rest, []);
  const { host, port, url } = endpoint(settings, 'shutdown');
  let answer: { status: number; body: string };
  try {
    answer = await call(host, port, 'POST', '/quitquitquit', 10_000);
  } catch (error) {
    throw new Error(`no proxy answered at ${url}: ${(error as Error).message}`);
  }
  if (answer.status !== 200) throw new Error(`the proxy at ${url} refused the shutdown: ${answer.status} ${answer.body}`);
  return 0;
}
