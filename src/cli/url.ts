/**
 * `lakebase-proxy url [TARGET]`: what a client needs to reach each target, ready to paste: the
 * psql command, the libpq URI and the JDBC URL, from the listen settings and the default database.
 * Nothing here is a secret: the proxy authenticates to Lakebase itself, and a local password (with
 * --client-auth) is asked by the client.
 */
import { isIPv6 } from 'node:net';
import type { Target } from '../config/load.js';
import { ConfigError } from '../config/properties.js';
import { clientAuthMethod } from '../config/target.js';

export interface TargetUrls {
  readonly name: string;
  /** Lines to print, each a label and a value (or a note with an empty label). */
  readonly lines: ReadonlyArray<readonly [string, string]>;
}

/** The targets named in `wanted` (all when empty), with their URLs. */
export function targetUrls(targets: readonly Target[], wanted: readonly string[]): TargetUrls[] {
  const unknown = wanted.filter((name) => !targets.some((t) => t.name === name));
  if (unknown.length > 0) {
    throw new ConfigError(`url: no target named ${unknown.map((n) => `"${n}"`).join(', ')}; the targets are ${targets.map((t) => t.name).join(', ')}`);
  }
  return targets.filter((t) => wanted.length === 0 || wanted.includes(t.name)).map(urlsOf);
}

export function formatUrls(all: readonly TargetUrls[]): string {
  const width = Math.max(...all.flatMap((t) => t.lines.map(([label]) => label.length)));
  return all
    .map((t) => [`${t.name}:`, ...t.lines.map(([label, value]) => (label ? `  ${`${label}:`.padEnd(width + 2)}${value}` : `  ${value}`))].join('\n'))
    .join('\n\n')
    .concat('\n');
}

function urlsOf(target: Target): TargetUrls {
  const { settings } = target;
  const listen = settings.string('ListenAddress') as string;
  const port = settings.int('ListenPort');
  const database = settings.string('Database') as string;
  const socketDir = settings.string('UnixSocket');
  const lines: Array<readonly [string, string]> = [];
  if (port === 0) {
    lines.push(['', 'ListenPort is 0: the port is chosen when the proxy starts (see its "listening" log line)']);
    return { name: target.name, lines };
  }
  // A wildcard address listens on loopback too: that is the address to paste on this machine.
  const host = listen === '0.0.0.0' ? '127.0.0.1' : listen === '::' ? '::1' : listen;
  const hostInUrl = isIPv6(host) ? `[${host}]` : host;
  const db = encodeURIComponent(database);
  lines.push(
    ['psql', psqlCommand({ host, port: String(port), dbname: database })],
    ['URI', `postgresql://${hostInUrl}:${port}/${db}`],
    ['JDBC', `jdbc:postgresql://${hostInUrl}:${port}/${db}`],
  );
  if (socketDir !== undefined) {
    lines.push(
      ['psql (unix socket)', psqlCommand({ host: socketDir, port: String(port), dbname: database })],
      ['URI (unix socket)', `postgresql:///${db}?host=${encodeURIComponent(socketDir)}&port=${port}`],
    );
  }
  if (listen !== host) lines.push(['', `the proxy listens on every address (${listen}): from another machine, use this machine's name instead of ${host}`]);
  const auth = clientAuthMethod(settings);
  if (auth !== 'trust') lines.push(['', `client authentication ${auth}: add a user from ClientUsers (user=NAME, or NAME@ in the URI); the client asks for its password`]);
  return { name: target.name, lines };
}

/** `psql "host=... port=... dbname=..."`, with libpq's quoting inside and the shell's outside. */
function psqlCommand(parameters: Record<string, string>): string {
  const conninfo = Object.entries(parameters)
    .map(([key, value]) => `${key}=${/^[^\s'\\]+$/.test(value) ? value : `'${value.replace(/[\\']/g, (c) => `\\${c}`)}'`}`)
    .join(' ');
  return `psql ${/^[\w ./:=@,+-]+$/.test(conninfo) ? `"${conninfo}"` : `'${conninfo.replace(/'/g, `'\\''`)}'`}`;
}
