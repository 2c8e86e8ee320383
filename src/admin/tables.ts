/**
 * The console's SHOW tables, read from the live targets, servers and pools. Where PgBouncer has
 * the same table, the columns are PgBouncer's (1.18), in its order and with its meanings, so that
 * its dashboards and exporters read the proxy unchanged; the proxy's own columns come after them.
 *
 * PgBouncer's "database" is the name a client connects with. Here: on a shared port the target's
 * name, on a port of its own the database the client asked for (the target's Database when it
 * named none). Counts the relay cannot know (it passes bytes without reading queries:
 * transactions and queries, their times) are 0.
 */
import { findProperty, PROPERTIES, type Settings } from '../config/properties.js';
import { resolveOAuth } from '../config/target.js';
import { RELOADABLE } from '../config/reloadable.js';
import { settingsStore } from '../oauth/sources.js';
import type { ServerConnection } from '../pool/server-connection.js';
import type { ClientState } from '../proxy/client-state.js';
import { native } from '../proxy/native-relay.js';
import type { ProxyServer } from '../proxy/server.js';
import type { ConsoleHost, TargetView, Traffic } from './host.js';
import type { Column, ColumnType, Value } from './messages.js';

export interface Table {
  readonly columns: readonly Column[];
  readonly rows: ReadonlyArray<readonly Value[]>;
}

/** What the tables read: the process, and the console's own clients. */
export interface ConsoleView {
  readonly host: ConsoleHost;
  readonly consoleClients: readonly ClientState[];
  /** Per-second rates over the last stats period (60 s), by target. */
  averages(target: string): Averages;
}

export interface Averages {
  readonly recv: number;
  readonly sent: number;
  /** Microseconds per wait. */
  readonly waitUs: number;
}

/** The tables by SHOW item, lower case. */
export const TABLES: Readonly<Record<string, (view: ConsoleView) => Table>> = {
  pools,
  clients,
  servers,
  stats,
  databases,
  config,
  version: (view) => table([['version', 'text']], [[view.host.version]]),
  lists,
  tokens,
  targets,
};

function table(columns: ReadonlyArray<readonly [string, ColumnType]>, rows: ReadonlyArray<readonly Value[]>): Table {
  return { columns: columns.map(([name, type]) => ({ name, type })), rows };
}

/** PgBouncer's time format: `2026-12-06 17:28:23 UTC`. */
export function timestamp(ms: number | undefined): string | null {
  if (ms === undefined || !Number.isFinite(ms)) return null;
  return `${new Date(ms).toISOString().slice(0, 19).replace('T', ' ')} UTC`;
}

/** Seconds and the microseconds past them, as PgBouncer splits a wait. */
function split(ms: number): [number, number] {
  const us = Math.max(0, Math.round(ms * 1000));
  return [Math.floor(us / 1_000_000), us % 1_000_000];
}

const ptr = (id: number): string => `0x${id.toString(16)}`;

/** The name clients use for a target's database (see the module comment). */
function facing(target: TargetView, database: string): string {
  return target.shared ? target.name : database;
}

interface ServerRow {
  readonly target: TargetView;
  readonly database: string;
  readonly state: 'active' | 'idle' | 'used' | 'tested' | 'login';
  readonly processId: number;
  readonly tls: string;
  readonly connectedAt: number;
  readonly requestAt: number;
  readonly client: ClientState | undefined;
  readonly pooled: boolean;
  readonly expiresAt: number | undefined;
  readonly applicationName: string;
}

const SERVER_STATES: Record<ServerConnection['state'], ServerRow['state']> = { active: 'active', idle: 'idle', resetting: 'used', checking: 'tested' };

/** Every upstream connection: the pools' (idle ones included), and the sessions that logged in alone. */
function serverRows(view: ConsoleView): ServerRow[] {
  const rows: ServerRow[] = [];
  for (const target of view.host.targets()) {
    const sessions = target.server.clients();
    const holder = new Map<ServerConnection, ClientState>();
    for (const client of sessions) if (client.upstream?.server) holder.set(client.upstream.server, client);
    for (const [database, pool] of target.server.pools) {
      for (const { server, state, lastUsedAt } of pool.servers) {
        rows.push({
          target,
          database: facing(target, database),
          state: SERVER_STATES[state],
          processId: server.processId,
          tls: `${server.tls.version}/${server.tls.cipher}`,
          connectedAt: server.connectedAt,
          requestAt: lastUsedAt,
          client: holder.get(server),
          pooled: true,
          expiresAt: Number.isFinite(server.expiresAt) ? server.expiresAt : undefined,
          applicationName: server.parameters.get('application_name') ?? '',
        });
      }
    }
    for (const client of sessions) {
      const upstream = client.upstream;
      if (!upstream || upstream.server) continue;
      rows.push({
        target,
        database: client.database,
        state: 'active',
        processId: upstream.processId,
        tls: upstream.tls,
        connectedAt: upstream.connectedAt,
        requestAt: client.since,
        client,
        pooled: false,
        expiresAt: undefined,
        applicationName: client.applicationName,
      });
    }
  }
  return rows;
}

/** Every client: in their startup at a listener, past it at their target, and the console's. */
function clientRows(view: ConsoleView): ClientState[] {
  const servers = new Set<ProxyServer>([...view.host.listeners(), ...view.host.targets().map((t) => t.server)]);
  return [...[...servers].flatMap((server) => server.clients()), ...view.consoleClients].sort((a, b) => a.id - b.id);
}

function pools(view: ConsoleView): Table {
  interface Row {
    target: TargetView;
    database: string;
    clActive: number;
    clWaiting: number;
    svActive: number;
    svIdle: number;
    svUsed: number;
    svTested: number;
    svLogin: number;
    maxWaitMs: number;
  }
  const rows = new Map<string, Row>();
  const row = (target: TargetView, database: string): Row => {
    const key = `${target.name}\0${database}`;
    let found = rows.get(key);
    if (!found) {
      found = { target, database, clActive: 0, clWaiting: 0, svActive: 0, svIdle: 0, svUsed: 0, svTested: 0, svLogin: 0, maxWaitMs: 0 };
      rows.set(key, found);
    }
    return found;
  };
  const now = Date.now();
  for (const target of view.host.targets()) {
    for (const [database, pool] of target.server.pools) {
      const r = row(target, facing(target, database));
      r.svLogin += pool.stats.loggingIn;
    }
    for (const client of target.server.clients()) {
      if (client.state === 'login') continue;
      const r = row(target, client.database);
      if (client.state === 'active') r.clActive++;
      else {
        r.clWaiting++;
        r.maxWaitMs = Math.max(r.maxWaitMs, now - client.since);
      }
    }
  }
  for (const server of serverRows(view)) {
    const r = row(server.target, server.database);
    if (server.state === 'active') r.svActive++;
    else if (server.state === 'idle') r.svIdle++;
    else if (server.state === 'used') r.svUsed++;
    else if (server.state === 'tested') r.svTested++;
  }
  return table(
    [
      ['database', 'text'],
      ['user', 'text'],
      ['cl_active', 'int4'],
      ['cl_waiting', 'int4'],
      ['cl_active_cancel_req', 'int4'],
      ['cl_waiting_cancel_req', 'int4'],
      ['sv_active', 'int4'],
      ['sv_active_cancel', 'int4'],
      ['sv_being_canceled', 'int4'],
      ['sv_idle', 'int4'],
      ['sv_used', 'int4'],
      ['sv_tested', 'int4'],
      ['sv_login', 'int4'],
      ['maxwait', 'int4'],
      ['maxwait_us', 'int4'],
      ['pool_mode', 'text'],
      ['target', 'text'],
      ['paused', 'int4'],
    ],
    [...rows.values()].map((r) => {
      const [wait, waitUs] = split(r.maxWaitMs);
      const options = r.target.server.options;
      return [r.database, options.identity, r.clActive, r.clWaiting, 0, 0, r.svActive, 0, 0, r.svIdle, r.svUsed, r.svTested, r.svLogin, wait, waitUs, options.pool.mode, r.target.name, r.target.server.paused ? 1 : 0];
    }),
  );
}

/** The columns SHOW CLIENTS and SHOW SERVERS share (PgBouncer's, then ours). */
const CONNECTION_COLUMNS: ReadonlyArray<readonly [string, ColumnType]> = [
  ['type', 'text'],
  ['user', 'text'],
  ['database', 'text'],
  ['state', 'text'],
  ['addr', 'text'],
  ['port', 'int4'],
  ['local_addr', 'text'],
  ['local_port', 'int4'],
  ['connect_time', 'text'],
  ['request_time', 'text'],
  ['wait', 'int4'],
  ['wait_us', 'int4'],
  ['close_needed', 'int4'],
  ['ptr', 'text'],
  ['link', 'text'],
  ['remote_pid', 'int4'],
  ['tls', 'text'],
  ['application_name', 'text'],
];

function clients(view: ConsoleView): Table {
  const now = Date.now();
  return table(
    [...CONNECTION_COLUMNS, ['id', 'int8'], ['target', 'text'], ['relay', 'text'], ['paused', 'int4']],
    clientRows(view).map((c) => {
      const [wait, waitUs] = c.state === 'waiting' ? split(now - c.since) : [0, 0];
      return [
        'C',
        c.user,
        c.database,
        c.state,
        c.remote?.address ?? 'unix',
        c.remote?.port ?? 0,
        c.local.address,
        c.local.port,
        timestamp(c.connectedAt),
        timestamp(c.since),
        wait,
        waitUs,
        0,
        ptr(c.id),
        c.upstream ? ptr(c.upstream.processId) : '',
        0,
        c.tls,
        c.applicationName,
        c.id,
        c.target,
        c.relay ?? '',
        c.paused ? 1 : 0,
      ];
    }),
  );
}

function servers(view: ConsoleView): Table {
  const now = Date.now();
  return table(
    [...CONNECTION_COLUMNS, ['target', 'text'], ['pooled', 'int4'], ['expires_at', 'text']],
    serverRows(view).map((s) => {
      const options = s.target.server.options;
      return [
        'S',
        options.identity,
        s.database,
        s.state,
        options.upstream.host,
        options.upstream.port,
        '',
        0,
        timestamp(s.connectedAt),
        timestamp(s.requestAt),
        0,
        0,
        s.expiresAt !== undefined && now >= s.expiresAt ? 1 : 0,
        ptr(s.processId),
        s.client ? ptr(s.client.id) : '',
        s.processId,
        s.tls,
        s.applicationName,
        s.target.name,
        s.pooled ? 1 : 0,
        timestamp(s.expiresAt),
      ];
    }),
  );
}

function stats(view: ConsoleView): Table {
  return table(
    [
      ['database', 'text'],
      ['total_xact_count', 'numeric'],
      ['total_query_count', 'numeric'],
      ['total_received', 'numeric'],
      ['total_sent', 'numeric'],
      ['total_xact_time', 'numeric'],
      ['total_query_time', 'numeric'],
      ['total_wait_time', 'numeric'],
      ['avg_xact_count', 'numeric'],
      ['avg_query_count', 'numeric'],
      ['avg_recv', 'numeric'],
      ['avg_sent', 'numeric'],
      ['avg_xact_time', 'numeric'],
      ['avg_query_time', 'numeric'],
      ['avg_wait_time', 'numeric'],
      ['target', 'text'],
      ['total_sessions', 'numeric'],
      ['total_server_logins', 'numeric'],
      ['total_server_reuses', 'numeric'],
      ['total_login_failures', 'numeric'],
    ],
    view.host.targets().map((t) => {
      const traffic: Traffic = view.host.traffic(t.name);
      const avg = view.averages(t.name);
      return [
        databaseName(t),
        0,
        0,
        Math.round(traffic.bytesToUpstream),
        Math.round(traffic.bytesToClient),
        0,
        0,
        Math.round(traffic.waitSeconds * 1e6),
        0,
        0,
        Math.round(avg.recv),
        Math.round(avg.sent),
        0,
        0,
        Math.round(avg.waitUs),
        t.name,
        traffic.sessions,
        traffic.logins,
        traffic.reuses,
        traffic.failures,
      ];
    }),
  );
}

/** A target's row name in SHOW DATABASES and SHOW STATS: its name on a shared port, else its Database. */
function databaseName(target: TargetView): string {
  return target.shared ? target.name : target.server.options.defaultDatabase;
}

function databases(view: ConsoleView): Table {
  const connections = new Map<TargetView, number>();
  for (const s of serverRows(view)) connections.set(s.target, (connections.get(s.target) ?? 0) + 1);
  return table(
    [
      ['name', 'text'],
      ['host', 'text'],
      ['port', 'int4'],
      ['database', 'text'],
      ['force_user', 'text'],
      ['pool_size', 'int4'],
      ['min_pool_size', 'int4'],
      ['reserve_pool', 'int4'],
      ['pool_mode', 'text'],
      ['max_connections', 'int4'],
      ['current_connections', 'int4'],
      ['paused', 'int4'],
      ['disabled', 'int4'],
      ['target', 'text'],
      ['listen', 'text'],
    ],
    view.host.targets().map((t) => {
      const o = t.server.options;
      return [
        databaseName(t),
        o.upstream.host,
        o.upstream.port,
        o.defaultDatabase,
        o.identity,
        o.pool.size,
        o.pool.minSize,
        0,
        o.pool.mode,
        0,
        connections.get(t) ?? 0,
        t.server.paused ? 1 : 0,
        t.draining ? 1 : 0,
        t.name,
        listenAddress(t),
      ];
    }),
  );
}

function listenAddress(t: TargetView): string {
  const { address } = t.listener.options.listen;
  return `${address.includes(':') ? `[${address}]` : address}:${t.listener.port}`;
}

/** A setting's value as shown: a secret only says whether it is set. */
function shown(settings: Settings, name: string): string {
  const property = findProperty(name);
  const value = settings.string(name);
  if (property?.secret) return value === undefined ? '' : '(set)';
  return value ?? '';
}

function config(view: ConsoleView): Table {
  const rows: Value[][] = [];
  const processSettings = view.host.process();
  for (const p of PROPERTIES) {
    if (!p.process) continue;
    rows.push([p.name, shown(processSettings, p.name), p.default ?? '', RELOADABLE.has(p.name) ? 'yes' : 'no', '', processSettings.source(p.name) ?? 'default']);
  }
  for (const t of view.host.targets()) {
    for (const p of PROPERTIES) {
      if (p.process) continue;
      rows.push([p.name, shown(t.settings, p.name), p.secret ? '' : (p.default ?? ''), RELOADABLE.has(p.name) ? 'yes' : 'no', t.name, t.settings.source(p.name) ?? 'default']);
    }
  }
  return table(
    [
      ['key', 'text'],
      ['value', 'text'],
      ['default', 'text'],
      ['changeable', 'text'],
      ['target', 'text'],
      ['source', 'text'],
    ],
    rows,
  );
}

function lists(view: ConsoleView): Table {
  const targets = view.host.targets();
  const all = clientRows(view);
  return table(
    [
      ['list', 'text'],
      ['items', 'int4'],
    ],
    [
      ['databases', targets.length],
      ['users', new Set(targets.map((t) => t.server.options.identity)).size],
      ['pools', pools(view).rows.length],
      ['free_clients', 0],
      ['used_clients', all.filter((c) => c.state !== 'login').length],
      ['login_clients', all.filter((c) => c.state === 'login').length],
      ['free_servers', 0],
      ['used_servers', serverRows(view).length],
      ['dns_names', 0],
      ['dns_zones', 0],
      ['dns_queries', 0],
      ['dns_pending', 0],
    ],
  );
}

/** Where a target's token comes from, in the words of the README. */
export function tokenSourceKind(settings: Settings): string {
  if (settings.string('Password') !== undefined) return 'password';
  const o = resolveOAuth(settings);
  let kind: string;
  if (o.authScheme === 'PersonalAccessToken') kind = 'personal access token';
  else if (o.authScheme === 'DatabricksCli') kind = 'Databricks CLI';
  else if (o.initiateOAuth === 'OFF') kind = 'access token';
  else if (o.authScheme === 'OAuthClient') kind = 'client credentials';
  else if (o.initiateOAuth === 'REFRESH') kind = 'refresh token';
  else kind = 'PKCE';
  return o.lakebaseInstance || o.lakebaseEndpoint ? `database credential (workspace token: ${kind})` : kind;
}

/** The settings file of a target that keeps tokens; empty for one that keeps none. */
function settingsFile(settings: Settings): string {
  if (settings.string('Password') !== undefined) return '';
  const o = resolveOAuth(settings);
  if (o.initiateOAuth === 'OFF' || o.authScheme === 'PersonalAccessToken' || o.authScheme === 'DatabricksCli') return '';
  return settingsStore(o).location;
}

function tokens(view: ConsoleView): Table {
  const now = Date.now();
  return table(
    [
      ['target', 'text'],
      ['identity', 'text'],
      ['source', 'text'],
      ['description', 'text'],
      ['obtained_at', 'text'],
      ['expires_at', 'text'],
      ['expires_in', 'int8'],
      ['last_refresh', 'text'],
      ['last_refresh_result', 'text'],
      ['refreshes', 'int8'],
      ['refresh_failures', 'int8'],
      ['settings_location', 'text'],
    ],
    view.host.targets().map((t) => {
      const expiry = t.tokenSource.currentExpiry()?.getTime();
      return [
        t.name,
        t.server.options.identity,
        tokenSourceKind(t.settings),
        t.tokenSource.describe(),
        timestamp(t.tokens.obtainedAt),
        timestamp(expiry),
        expiry === undefined ? null : Math.floor((expiry - now) / 1000),
        timestamp(t.tokens.lastRefreshAt),
        t.tokens.lastRefreshResult ?? null,
        t.tokens.successes,
        t.tokens.failures,
        settingsFile(t.settings),
      ];
    }),
  );
}

function targets(view: ConsoleView): Table {
  return table(
    [
      ['target', 'text'],
      ['listen', 'text'],
      ['unix_socket', 'text'],
      ['database', 'text'],
      ['upstream', 'text'],
      ['upstream_database', 'text'],
      ['identity', 'text'],
      ['tls', 'text'],
      ['relay', 'text'],
      ['pool_mode', 'text'],
      ['pool_size', 'int4'],
      ['clients', 'int4'],
      ['paused', 'int4'],
      ['state', 'text'],
    ],
    view.host.targets().map((t) => {
      const o = t.server.options;
      const relay = o.relay === 'native' && !native.addon ? 'js (native relay not built)' : o.relay;
      return [
        t.name,
        listenAddress(t),
        t.listener.socketPath ?? '',
        t.shared ? t.name : '',
        `${o.upstream.host}:${o.upstream.port}`,
        o.defaultDatabase,
        o.identity,
        o.upstream.sslMode,
        relay,
        o.pool.mode,
        o.pool.size,
        t.server.clients().length,
        t.server.paused ? 1 : 0,
        t.draining ? 'draining' : 'running',
      ];
    }),
  );
}
