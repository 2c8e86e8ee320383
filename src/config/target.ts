/** Turns checked settings into the typed options of the proxy and of the OAuth token source. */
import { readFile } from 'node:fs/promises';
import { createSecureContext } from 'node:tls';
import { isIPv4, isIPv6 } from 'node:net';
import type { OAuthOptions } from '../oauth/options.js';
import type { ProxyOptions } from '../proxy/server.js';
import type { ClientAuthMethod } from '../proxy/client-handshake.js';
import { makeVerifier, parseVerifier, type ScramVerifier } from '../auth/scram.js';
import { canonicalEnum, type Settings } from './properties.js';

export function resolveOAuth(settings: Settings): OAuthOptions {
  const accessToken = settings.string('OAuthAccessToken');
  const databricksInstance = settings.string('DatabricksInstance');
  const personalAccessToken = settings.string('PersonalAccessToken');
  // A personal access token given alone (DATABRICKS_TOKEN) picks its scheme, as the Databricks SDKs do.
  const scheme = settings.has('AuthScheme') || personalAccessToken === undefined ? (settings.string('AuthScheme') as string) : 'PersonalAccessToken';
  const authScheme = canonicalEnum('AuthScheme', scheme) as OAuthOptions['authScheme'];
  const initiate = settings.string('InitiateOAuth');
  const clientId = settings.string('OAuthClientId');
  return {
    databricksInstance,
    authScheme,
    initiateOAuth: (initiate !== undefined
      ? canonicalEnum('InitiateOAuth', initiate)
      : accessToken !== undefined && databricksInstance === undefined
        ? 'OFF'
        : 'GETANDREFRESH') as OAuthOptions['initiateOAuth'],
    clientId,
    clientSecret: settings.string('OAuthClientSecret'),
    accessToken,
    personalAccessToken,
    profile: settings.string('Profile'),
    refreshToken: settings.string('OAuthRefreshToken'),
    verifier: settings.string('OAuthVerifier'),
    callbackUrl: settings.string('CallbackURL') as string,
    scope: settings.string('Scope'),
    settingsLocation: settings.string('OAuthSettingsLocation'),
    lakebaseInstance: settings.string('LakebaseInstance'),
    lakebaseEndpoint: settings.string('LakebaseEndpoint'),
    user: settings.string('User') ?? (authScheme === 'OAuthClient' ? clientId : undefined),
    requestTimeoutMs: settings.duration('OAuthTimeout'),
    loginTimeoutMs: settings.duration('LoginTimeout'),
    sourceOf: (name) => settings.source(name),
  };
}

export function isLoopback(address: string): boolean {
  return address === 'localhost' || address === '::1' || (isIPv4(address) && address.startsWith('127.')) || (isIPv6(address) && address === '0:0:0:0:0:0:0:1');
}

/** ClientAuth, or its default: trust on loopback (and the unix socket), scram-sha-256 otherwise. */
export function clientAuthMethod(settings: Settings): ClientAuthMethod {
  const given = settings.string('ClientAuth');
  return (given !== undefined ? canonicalEnum('ClientAuth', given) : isLoopback(settings.string('ListenAddress') as string) ? 'trust' : 'scram-sha-256') as ClientAuthMethod;
}

export async function resolveProxy(settings: Settings, name: string): Promise<ProxyOptions> {
  const server = settings.string('Server') ?? '';
  if (server === '' && !settings.string('LakebaseInstance') && !settings.string('LakebaseEndpoint')) {
    throw settings.error(
      'Server',
      'missing: set the Lakebase host, e.g. --connection "Server=instance-<uuid>.database.cloud.databricks.com;...", or name the database with LakebaseInstance or LakebaseEndpoint to look its host up',
    );
  }
  const oauth = resolveOAuth(settings);
  const identity = oauth.user;
  if (identity === undefined || identity === '') {
    throw settings.error('User', 'missing: set the Databricks identity to log in as (an e-mail, or a service principal\'s application id)');
  }
  const address = settings.string('ListenAddress') as string;
  const loopback = isLoopback(address);
  const clientAuth = clientAuthMethod(settings);
  if (clientAuth === 'trust' && !loopback && !settings.bool('AllowInsecureListen')) {
    throw settings.error(
      'ClientAuth',
      `trust on the non-loopback address ${address} would let anyone on the network use the identity ${identity}; set --client-auth scram-sha-256 with --client-users FILE, or listen on 127.0.0.1`,
    );
  }
  const usersFile = settings.string('ClientUsers');
  if (clientAuth !== 'trust' && usersFile === undefined) {
    throw settings.error('ClientUsers', `missing: --client-auth ${clientAuth} needs a file of local users (--client-users FILE)`);
  }
  const tlsCert = settings.string('TLSCert');
  const tlsKey = settings.string('TLSKey');
  if (!loopback && tlsCert === undefined && !settings.bool('AllowInsecureListen')) {
    throw settings.error(
      'TLSCert',
      `missing: on the non-loopback address ${address} clients' passwords and queries would cross the network in the clear; set --tls-cert and --tls-key, or --allow-insecure-listen inside a private network (a container's)`,
    );
  }
  if ((tlsCert === undefined) !== (tlsKey === undefined)) {
    throw settings.error(tlsCert === undefined ? 'TLSCert' : 'TLSKey', 'TLSCert and TLSKey must be given together');
  }
  const rootCertPath = settings.string('SSLRootCert');
  return {
    name,
    listen: {
      address,
      port: settings.int('ListenPort'),
      unixSocketDir: settings.string('UnixSocket'),
      unixSocketMode: parseInt(settings.string('UnixSocketMode') as string, 8),
    },
    upstream: {
      // Empty when the host is looked up by name (LakebaseInstance, LakebaseEndpoint): see prepareTarget.
      host: server,
      port: settings.int('Port'),
      sslMode: canonicalEnum('SSLMode', settings.string('SSLMode') as string) as ProxyOptions['upstream']['sslMode'],
      rootCert: rootCertPath === undefined ? undefined : await readSetting(settings, 'SSLRootCert', rootCertPath),
      connectTimeoutMs: settings.duration('ConnectTimeout'),
      keepAliveMs: settings.duration('KeepAlive'),
    },
    identity,
    defaultDatabase: settings.string('Database') as string,
    clientAuth: {
      authMethod: clientAuth,
      users: usersFile === undefined ? new Map() : parseUsers(await readSetting(settings, 'ClientUsers', usersFile), settings),
      tls:
        tlsCert === undefined || tlsKey === undefined
          ? undefined
          : createSecureContext({ cert: await readSetting(settings, 'TLSCert', tlsCert), key: await readSetting(settings, 'TLSKey', tlsKey) }),
    },
    startupTimeoutMs: settings.duration('StartupTimeout'),
    maxConnections: settings.int('MaxConnections'),
    maxStartups: settings.int('MaxStartups'),
    idleTimeoutMs: settings.duration('IdleTimeout'),
    relay: canonicalEnum('Relay', settings.string('Relay') as string) as ProxyOptions['relay'],
    pool: {
      mode: canonicalEnum('PoolMode', settings.string('PoolMode') as string) as ProxyOptions['pool']['mode'],
      size: settings.int('PoolSize'),
      minSize: settings.int('MinPoolSize'),
      queryWaitTimeoutMs: settings.int('QueryWaitTimeout'),
      resetQuery: settings.string('ServerResetQuery') ?? '',
      lifetimeMs: settings.int('ServerLifetime'),
      idleTimeoutMs: settings.int('ServerIdleTimeout'),
      checkDelayMs: settings.int('ServerCheckDelay'),
      maxPrepared: settings.int('MaxPreparedStatements'),
    },
  };
}

/**
 * Refuses targets that would listen on the same address and port: the second would fail with
 * "already in use", blaming the machine, when the cause is one ListenPort (a --port flag, a
 * variable, the config file's top level, or the default) applying to every target. Port 0 (a
 * free port each) is never shared.
 */
export function refuseSharedPorts(targets: ReadonlyArray<{ readonly name: string; readonly settings: Settings; readonly named?: boolean }>): void {
  const byAddress = new Map<string, string[]>();
  for (const { name, settings, named } of targets) {
    const port = settings.int('ListenPort');
    // Named targets of a config file may share a port: clients pick one by database name.
    if (port === 0 || named) continue;
    const key = `${settings.string('ListenAddress') ?? ''} ${port}`;
    byAddress.set(key, [...(byAddress.get(key) ?? []), name]);
  }
  for (const [key, names] of byAddress) {
    if (names.length < 2) continue;
    const settings = (targets.find((t) => t.name === names[0]) as { settings: Settings }).settings;
    const port = key.split(' ')[1];
    throw settings.error(
      'ListenPort',
      `the targets ${names.join(', ')} would all listen on port ${port}${settings.has('ListenPort') ? '' : ' (the default)'}; each target needs its own port: set ListenPort in each --connection string ("...;ListenPort=5433") or in each targets: entry of the config file, and no --port`,
    );
  }
}

async function readSetting(settings: Settings, name: string, path: string): Promise<Buffer> {
  try {
    return await readFile(path);
  } catch (error) {
    throw settings.error(name, `cannot read ${path}: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`);
  }
}

/** Lines "name:password" or "name:SCRAM-SHA-256$..."; blank lines and # comments are skipped. */
export function parseUsers(text: Buffer, settings: Settings): Map<string, ScramVerifier> {
  const users = new Map<string, ScramVerifier>();
  text
    .toString('utf8')
    .split(/\r?\n/)
    .forEach((line, index) => {
      if (line.trim() === '' || line.trimStart().startsWith('#')) return;
      const colon = line.indexOf(':');
      if (colon <= 0) throw settings.error('ClientUsers', `line ${index + 1} is not of the form name:password`);
      const secret = line.slice(colon + 1);
      users.set(line.slice(0, colon), parseVerifier(secret) ?? makeVerifier(secret));
    });
  return users;
}
