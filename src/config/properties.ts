/**
 * Every setting of one target, in one table: its name (as the seed connector spells it, matched
 * case-insensitively), its flag, how its value is checked, and whether it is a secret. Every
 * source (connection string, flags, and later files and environment) feeds the same table, so a
 * value is checked once, and an error names the key, where the value came from and what is allowed.
 */

import { DURATION_FORMS, formatDuration, parseDuration } from './duration.js';

export { DURATION_FORMS, formatDuration, parseDuration } from './duration.js';

export class ConfigError extends Error {
  override readonly name = 'ConfigError';
}

export type Kind =
  | { readonly type: 'string' }
  | { readonly type: 'int'; readonly min: number; readonly max: number }
  /** A length of time with a unit (parseDuration); a bare number is milliseconds. Read with Settings.duration. */
  | { readonly type: 'duration'; readonly maxMs: number }
  | { readonly type: 'enum'; readonly values: readonly string[] }
  | { readonly type: 'bool' };

export interface Property {
  readonly name: string;
  readonly kind: Kind;
  readonly secret?: boolean;
  /** The command-line flag that sets it, if any. */
  readonly flag?: string;
  readonly help: string;
  /** Shown in --help; the value used when nothing sets it. */
  readonly default?: string;
  /** A setting of the process, not of one target (logs, HTTP endpoint, shutdown). */
  readonly process?: boolean;
  /** The environment variable, where the rule in envName() would clash with another's. */
  readonly env?: string;
}

const string = { type: 'string' } as const;
const port = { type: 'int', min: 1, max: 65535 } as const;
const duration = { type: 'duration', maxMs: 86_400_000 } as const;
const bool = { type: 'bool' } as const;

export const PROPERTIES: readonly Property[] = [
  // The upstream (Lakebase) connection
  { name: 'Server', kind: string, help: 'host name of the Lakebase instance (instance-<uuid>.database.cloud.databricks.com); without it, the host of LakebaseInstance or LakebaseEndpoint is looked up in the workspace' },
  { name: 'Port', kind: port, default: '5432', env: 'LAKEBASE_PROXY_SERVER_PORT', help: 'port of the Lakebase instance' },
  { name: 'Database', kind: string, default: 'databricks_postgres', help: 'database used when a client names none' },
  { name: 'User', kind: string, help: 'the Databricks identity to log in as: an e-mail, or a service principal\'s application id (default: OAuthClientId)' },
  { name: 'Password', kind: string, secret: true, help: 'a fixed password, for native Postgres roles (instead of OAuth)' },
  { name: 'SSLMode', kind: { type: 'enum', values: ['verify-full', 'verify-ca', 'require'] }, default: 'verify-full', help: 'upstream TLS verification; require encrypts without verifying' },
  { name: 'SSLRootCert', kind: string, help: 'PEM file of the CA to trust for the upstream (default: the system CAs)' },
  { name: 'ConnectTimeout', kind: duration, flag: '--connect-timeout', default: '10s', help: 'time for TCP, TLS and login to the upstream, and the most a client waits for a Lakebase compute that is starting' },
  { name: 'KeepAlive', kind: duration, flag: '--keepalive', default: '60s', help: 'TCP keepalive delay toward the upstream; 0 turns it off' },
  // OAuth (the seed connector's properties)
  { name: 'DatabricksInstance', kind: string, help: 'the workspace host or URL, e.g. dbc-1234.cloud.databricks.com' },
  {
    name: 'AuthScheme',
    kind: { type: 'enum', values: ['OAuthClient', 'OAuthPKCE', 'DatabricksCli', 'PersonalAccessToken'] },
    default: 'OAuthClient',
    help: 'OAuthClient (service principal), OAuthPKCE (a person\'s browser login), DatabricksCli (the token `databricks auth token` prints) or PersonalAccessToken (the default when only PersonalAccessToken is given)',
  },
  { name: 'InitiateOAuth', kind: { type: 'enum', values: ['GETANDREFRESH', 'REFRESH', 'OFF'] }, help: 'GETANDREFRESH obtains and refreshes tokens; REFRESH only refreshes; OFF uses OAuthAccessToken as given (default: OFF when only OAuthAccessToken is given, else GETANDREFRESH)' },
  { name: 'OAuthClientId', kind: string, help: 'the OAuth client id (service principal application id; databricks-cli for OAuthPKCE)' },
  { name: 'OAuthClientSecret', kind: string, secret: true, help: 'the service principal\'s OAuth secret' },
  { name: 'OAuthAccessToken', kind: string, secret: true, help: 'an access token to use as given' },
  { name: 'PersonalAccessToken', kind: string, secret: true, help: 'a Databricks personal access token (dapi...) for the workspace API: it mints the database credential of LakebaseInstance or LakebaseEndpoint (or DATABRICKS_TOKEN, or a profile\'s token)' },
  { name: 'OAuthRefreshToken', kind: string, secret: true, help: 'a refresh token to start from' },
  { name: 'OAuthVerifier', kind: string, secret: true, help: 'the code from a login callback, for headless machines' },
  { name: 'OAuthSettingsLocation', kind: string, help: 'file where tokens persist, or memory:// (default: OAuthSettings.txt in the user config folder)' },
  { name: 'CallbackURL', kind: string, default: 'http://localhost:8020', help: 'redirect URL of the browser login' },
  { name: 'Scope', kind: string, help: 'OAuth scopes (default: all-apis, plus offline_access for OAuthPKCE)' },
  { name: 'LakebaseInstance', kind: string, help: 'Provisioned instance name: exchange the workspace token for a database credential, and look up the host when Server is not set' },
  { name: 'LakebaseEndpoint', kind: string, help: 'Autoscaling endpoint projects/<p>/branches/<b>/endpoints/<e>: exchange for a database credential, and look up the host when Server is not set' },
  { name: 'ReadOnly', kind: bool, default: 'false', help: 'with LakebaseInstance or LakebaseEndpoint and no Server: connect to the read-only host (an instance\'s read_only_dns, an endpoint\'s read_only_host)' },
  { name: 'OAuthTimeout', kind: duration, flag: '--oauth-timeout', default: '30s', help: 'time for each request to the workspace' },
  { name: 'LoginTimeout', kind: duration, flag: '--login-timeout', default: '5m', help: 'how long a client waits for a browser login to complete' },
  // The local listener
  { name: 'ListenAddress', kind: string, flag: '--address', default: '127.0.0.1', help: 'address to listen on' },
  { name: 'ListenPort', kind: { type: 'int', min: 0, max: 65535 }, flag: '--port', default: '5432', help: 'port to listen on' },
  { name: 'UnixSocket', kind: string, flag: '--unix-socket', help: 'also listen on DIR/.s.PGSQL.<port>, so that psql -h DIR works' },
  { name: 'UnixSocketMode', kind: { type: 'enum', values: ['0600', '0660', '0666'] }, flag: '--unix-socket-mode', default: '0600', help: 'permissions of the unix socket file' },
  { name: 'TLSCert', kind: string, flag: '--tls-cert', help: 'certificate file: offer TLS to clients' },
  { name: 'TLSKey', kind: string, flag: '--tls-key', help: 'private key file for --tls-cert' },
  { name: 'ClientAuth', kind: { type: 'enum', values: ['trust', 'scram-sha-256', 'password'] }, flag: '--client-auth', help: 'how clients authenticate to the proxy (default: trust on loopback and unix sockets, scram-sha-256 otherwise)' },
  { name: 'ClientUsers', kind: string, flag: '--client-users', help: 'file of local users, one "name:password" or "name:SCRAM-SHA-256$..." per line' },
  { name: 'StartupTimeout', kind: duration, flag: '--startup-timeout', default: '30s', help: 'time a client has to finish its startup and authentication' },
  { name: 'MaxConnections', kind: { type: 'int', min: 0, max: 1_000_000 }, flag: '--max-connections', default: '0', help: 'most client sessions at once, counted once a client has finished its startup and authentication; 0 means no limit' },
  { name: 'MaxStartups', kind: { type: 'int', min: 0, max: 1_000_000 }, flag: '--max-startups', default: '0', help: 'most clients in their startup and authentication at once (not counted by MaxConnections); 0 means no limit' },
  { name: 'IdleTimeout', kind: duration, flag: '--idle-timeout', default: '0', help: 'close a session after this long with no query running and no byte either way; 0 means never' },
  { name: 'Relay', kind: { type: 'enum', values: ['native', 'js'] }, flag: '--relay', default: 'native', help: 'native: the upstream TLS connection and the relay in C on OpenSSL (built by npm install) for plain clients, Node.js streams for clients on TLS; js: Node.js TLS and streams always' },
  // Pooled upstream logins
  { name: 'PoolMode', kind: { type: 'enum', values: ['session', 'transaction', 'none'] }, flag: '--pool-mode', default: 'session', help: 'session: a client gets a logged-in upstream connection from a pool for its session, and gives it back clean (needs the native relay and a plain client; others log in per client); transaction: a client holds one only while a transaction runs (named prepared statements and settings follow it; see the README for what does not); none: one upstream login per client' },
  { name: 'PoolSize', kind: { type: 'int', min: 1, max: 100_000 }, flag: '--pool-size', default: '20', help: 'most upstream connections of a pool (one pool per target and database)' },
  { name: 'MinPoolSize', kind: { type: 'int', min: 0, max: 100_000 }, default: '0', help: 'upstream connections of a pool kept open past ServerIdleTimeout once made' },
  { name: 'QueryWaitTimeout', kind: duration, flag: '--query-wait-timeout', default: '120s', help: 'how long a client waits for a connection of a full pool before it gets an error' },
  { name: 'ServerResetQuery', kind: string, default: 'DISCARD ALL', help: 'the query that cleans a pooled connection before its next client (after ROLLBACK of an open transaction); empty: none' },
  { name: 'ServerLifetime', kind: duration, flag: '--server-lifetime', default: '0', help: 'how long after its login a pooled connection stops serving new clients (less up to 10 % at random); 0: until the token it logged in with expires' },
  { name: 'ServerIdleTimeout', kind: duration, flag: '--server-idle-timeout', default: '60s', help: 'close a pooled connection idle this long (so a compute can scale to zero); 0: never' },
  { name: 'MaxPreparedStatements', kind: { type: 'int', min: 1, max: 100_000 }, flag: '--max-prepared-statements', default: '200', help: "PoolMode=transaction: most clients' prepared statements kept on one upstream connection (the least recently used is closed first)" },
  { name: 'ServerCheckDelay', kind: duration, flag: '--server-check-delay', default: '30s', help: 'a pooled connection idle longer than this answers an empty query before it is used' },
  { name: 'AllowInsecureListen', kind: bool, flag: '--allow-insecure-listen', default: 'false', help: 'allow a non-loopback address without client TLS, or with trust authentication (only inside a private network)' },
  {
    name: 'Profile',
    kind: string,
    help: 'a profile of ~/.databrickscfg (or DATABRICKS_CONFIG_PROFILE): its host, and by its auth_type oauth-m2m (client_id, client_secret), databricks-cli (databricks auth token --profile) or pat (token)',
  },
  // The process
  { name: 'LogLevel', kind: { type: 'enum', values: ['trace', 'debug', 'info', 'warn', 'error', 'silent'] }, flag: '--log-level', default: 'info', process: true, help: 'log level' },
  { name: 'LogFormat', kind: { type: 'enum', values: ['json', 'pretty'] }, flag: '--log-format', process: true, help: 'log format (default: pretty on a terminal, else json)' },
  { name: 'HttpAddress', kind: string, flag: '--http-address', default: '127.0.0.1', process: true, help: 'address of the /metrics and health endpoints' },
  { name: 'HttpPort', kind: { type: 'int', min: 0, max: 65535 }, flag: '--http-port', default: '9090', process: true, help: 'port of the /metrics and health endpoints' },
  { name: 'NoHttp', kind: bool, flag: '--no-http', default: 'false', process: true, help: 'serve no /metrics and health endpoints' },
  { name: 'AdminAddress', kind: string, flag: '--admin-address', default: '127.0.0.0/8,::1', process: true, help: 'peers that may POST /quitquitquit on the HTTP port (what SIGTERM does): comma-separated addresses or CIDR ranges, or none' },
  { name: 'MinSigtermDelay', kind: duration, flag: '--min-sigterm-delay', default: '0', process: true, help: 'after SIGTERM, how long to keep accepting new clients' },
  { name: 'MaxSigtermDelay', kind: duration, flag: '--max-sigterm-delay', default: '0', process: true, help: 'after that, how long to wait for open sessions before closing them' },
  { name: 'ExitZeroOnSigterm', kind: bool, flag: '--exit-zero-on-sigterm', default: 'false', process: true, help: 'exit 0 after SIGTERM even when sessions had to be closed (for Kubernetes Jobs)' },
  { name: 'RunConnectionTest', kind: bool, flag: '--run-connection-test', default: 'false', process: true, help: 'at start-up, log in to each target and run SELECT 1; exit 1 if it fails' },
  // The admin console (database lakebase_proxy)
  {
    name: 'AdminUsers',
    kind: string,
    flag: '--admin-users',
    process: true,
    help: 'comma-separated users of --client-users who may run the console\'s PAUSE, RESUME, RELOAD, SHUTDOWN, KILL and CALLs once authenticated by password or SCRAM (over the unix socket of mode 0600 anyone who connects may)',
  },
  { name: 'NoPgBouncerAlias', kind: bool, flag: '--no-pgbouncer-alias', default: 'false', process: true, help: 'the database name pgbouncer no longer reaches the console (for a Lakebase database really called so); lakebase_proxy still does' },
];

/** Names match case-insensitively, and with or without dashes and underscores (listen-port). */
const normal = (name: string): string => name.toLowerCase().replace(/[-_]/g, '');
const BY_LOWER = new Map(PROPERTIES.map((p) => [normal(p.name), p]));
export const BY_FLAG = new Map(PROPERTIES.filter((p) => p.flag).map((p) => [p.flag as string, p]));

export function findProperty(name: string): Property | undefined {
  return BY_LOWER.get(normal(name));
}

/**
 * The environment variable of a property: LAKEBASE_PROXY_ and the flag's name (--port ->
 * LAKEBASE_PROXY_PORT), or the property's name in upper snake case (OAuthClientSecret ->
 * LAKEBASE_PROXY_OAUTH_CLIENT_SECRET).
 */
export function envName(property: Property): string {
  if (property.env) return property.env;
  const base = property.flag
    ? property.flag.slice(2).replace(/-/g, '_')
    : property.name
        .replace(/OAuth/g, 'Oauth')
        .replace(/SSL|TLS|URL/g, (m) => m[0] + m.slice(1).toLowerCase())
        .replace(/([a-z0-9])([A-Z])/g, '$1_$2');
  return `LAKEBASE_PROXY_${base.toUpperCase()}`;
}

/** Values by canonical name, each with the source that set it, later sources winning. */
export class Settings {
  readonly #values = new Map<string, { value: string; source: string }>();

  /** Sets a value from a source; an unknown key is an error that names it and the source. */
  set(key: string, value: string, source: string): void {
    const property = findProperty(key);
    if (!property) {
      throw new ConfigError(`unknown setting "${key}" in ${source}; known settings: ${PROPERTIES.map((p) => p.name).join(', ')}`);
    }
    checkValue(property, value, source);
    this.#values.set(property.name, { value, source });
  }

  has(name: string): boolean {
    return this.#values.has(name);
  }

  source(name: string): string | undefined {
    return this.#values.get(name)?.source;
  }

  string(name: string): string | undefined {
    const entry = this.#values.get(name);
    if (entry) return entry.value;
    return findProperty(name)?.default;
  }

  /** A whole number; for a duration setting, its milliseconds (as duration()). */
  int(name: string): number {
    if (findProperty(name)?.kind.type === 'duration') return this.duration(name);
    const text = this.string(name);
    return text === undefined ? 0 : Number(text);
  }

  /** A duration setting in milliseconds (0 when unset with no default). */
  duration(name: string): number {
    const text = this.string(name);
    return text === undefined ? 0 : (parseDuration(text) ?? 0);
  }

  bool(name: string): boolean {
    return /^(true|yes|on|1)$/i.test(this.string(name) ?? '');
  }

  /** An error about a setting's value, naming the key and its source. */
  error(name: string, problem: string): ConfigError {
    return new ConfigError(`${name}${this.#values.has(name) ? ` (from ${this.source(name)})` : ''}: ${problem}`);
  }
}

function checkValue(property: Property, value: string, source: string): void {
  const shown = property.secret ? 'the value given' : `"${value}"`;
  const fail = (allowed: string): never => {
    throw new ConfigError(`${property.name} (from ${source}): ${shown} is not valid; expected ${allowed}`);
  };
  const kind = property.kind;
  switch (kind.type) {
    case 'string':
      return;
    case 'int': {
      if (!/^\d+$/.test(value.trim())) fail(`a whole number from ${kind.min} to ${kind.max}`);
      const n = Number(value);
      if (n < kind.min || n > kind.max) fail(`a whole number from ${kind.min} to ${kind.max}`);
      return;
    }
    case 'duration': {
      const ms = parseDuration(value);
      if (ms === undefined || ms > kind.maxMs) fail(`a duration such as ${DURATION_FORMS}, at most ${formatDuration(kind.maxMs)}`);
      return;
    }
    case 'enum':
      if (!kind.values.some((v) => v.toLowerCase() === value.toLowerCase())) fail(`one of ${kind.values.join(', ')}`);
      return;
    case 'bool':
      if (!/^(true|false|yes|no|on|off|1|0)$/i.test(value)) fail('true or false');
      return;
    default:
      throw new Error(`unknown kind ${(kind as Kind).type}`);
  }
}

/** The canonical spelling of an enum value given in any case. */
export function canonicalEnum(name: string, value: string): string {
  const kind = findProperty(name)?.kind;
  if (kind?.type !== 'enum') return value;
  return kind.values.find((v) => v.toLowerCase() === value.toLowerCase()) ?? value;
}
