/**
 * The running proxy: its targets, the listeners that serve them, and the console that shows and
 * drives them. `start()` does what `serve` did at start; `reload()` (RELOAD on the console, and
 * SIGHUP) reads the configuration again and applies it without touching an open session:
 *
 * - everything is read and checked first, with the errors a start gives; any error refuses the
 *   reload and the running configuration stays as it is;
 * - a new target starts listening (or, named on a port shared by targets already running, is
 *   selected by its name from then on);
 * - a removed target stops accepting and drains: its open sessions go on to their end;
 * - a running target takes the settings in RELOADABLE (pool sizes and timeouts via Pool.update,
 *   limits, client authentication and its files); a change to any other of its settings needs a
 *   restart, and the reload says so and keeps the running value.
 */
import type { Logger } from '../ops/log.js';
import { Console, CONSOLE_DATABASE, PGBOUNCER_ALIAS } from '../admin/console.js';
import type { ConsoleHost, ReloadReport, TargetView, TokenHistory, Traffic } from '../admin/host.js';
import type { ParsedArgs } from './args.js';
import { loadConfig, type LoadedConfig, type Target } from '../config/load.js';
import { ConfigError, PROPERTIES, Settings } from '../config/properties.js';
import { RELOADABLE } from '../config/reloadable.js';
import { listenerGroups } from '../config/shared-ports.js';
import { refuseSharedPorts, resolveOAuth, resolveProxy } from '../config/target.js';
import { checkOAuthSettings } from '../oauth/index.js';
import type { Metrics } from '../ops/metrics.js';
import { ProxyServer, type ProxyDeps, type ProxyOptions } from '../proxy/server.js';
import { sharedPort, type SharedPort } from '../proxy/shared-port.js';
import { prepareTarget, type PreparedTarget } from './prepare.js';

export interface RuntimeOptions {
  /** The command line, read again at each reload (with the environment). */
  readonly args: ParsedArgs;
  readonly env?: NodeJS.ProcessEnv;
  readonly logger: Logger;
  readonly metrics: Metrics;
  /** `lakebase-proxy 0.1.0`. */
  readonly version: string;
  /** What SIGTERM does (the console's SHUTDOWN). */
  readonly shutdown: (by: string) => void;
}

/** A listener: one server for a target alone, or the front of a port several share. */
interface Listener {
  readonly key: string;
  readonly server: ProxyServer;
  readonly shared: SharedPort | undefined;
  /** Closed by a reload: its targets were removed. */
  stopped: boolean;
}

interface Running {
  readonly name: string;
  settings: Settings;
  readonly prepared: PreparedTarget;
  readonly server: ProxyServer;
  readonly listener: Listener;
  readonly tokens: { -readonly [K in keyof TokenHistory]: TokenHistory[K] };
  draining: boolean;
}

/** A target made ready to listen: its options, token source, and the history of its tokens. */
interface Prepared {
  readonly target: Target;
  readonly prepared: PreparedTarget;
  readonly tokens: Running['tokens'];
}

/** Where a target listens: address and port, or a port of its own (0: a free one each). */
function listenerKey(target: Target): string {
  const port = target.settings.int('ListenPort');
  return port === 0 ? `#${target.name}` : `${target.settings.string('ListenAddress')}:${port}`;
}

/** What start and reload refuse in any configuration: the checks a start makes. */
function check(config: LoadedConfig, logger: Logger): number[][] {
  refuseSharedPorts(config.targets);
  const groups = listenerGroups(config.targets);
  const alias = !config.process.bool('NoPgBouncerAlias');
  for (const target of config.targets) {
    const shared = groups.some((group) => group.length > 1 && group.some((i) => config.targets[i] === target));
    if (shared && target.name === CONSOLE_DATABASE) {
      throw new ConfigError(`targets: the name ${CONSOLE_DATABASE} is the admin console's database; give the target another name`);
    }
    if (shared && alias && target.name === PGBOUNCER_ALIAS) {
      throw new ConfigError(`targets: the name ${PGBOUNCER_ALIAS} reaches the admin console (PgBouncer's name for it); give the target another name, or set NoPgBouncerAlias`);
    }
    const database = target.settings.string('Database');
    if (database === CONSOLE_DATABASE || (alias && database === PGBOUNCER_ALIAS)) {
      logger.warn({ target: target.name, database }, `clients that name the database ${database} reach the admin console, not Lakebase${database === PGBOUNCER_ALIAS ? '; set NoPgBouncerAlias to reach the database' : ''}`);
    }
  }
  return groups;
}

/** Settings with each value from `fresh` where `take(name)`, else from `old`. */
function merged(old: Settings, fresh: Settings, take: (name: string) => boolean): Settings {
  const settings = new Settings();
  for (const p of PROPERTIES) {
    const from = take(p.name) ? fresh : old;
    if (from.has(p.name)) settings.set(p.name, from.string(p.name) as string, from.source(p.name) as string);
  }
  return settings;
}

/** The options of a running target with a reload's reloadable ones. */
function reloadedOptions(running: ProxyOptions, fresh: ProxyOptions): ProxyOptions {
  return {
    ...running,
    clientAuth: fresh.clientAuth,
    startupTimeoutMs: fresh.startupTimeoutMs,
    maxConnections: fresh.maxConnections,
    maxStartups: fresh.maxStartups,
    idleTimeoutMs: fresh.idleTimeoutMs,
    pool: { ...fresh.pool, mode: running.pool.mode },
  };
}

export class Runtime implements ConsoleHost {
  readonly version: string;
  /** Every server (fronts, targets, those draining): the shutdown ends them all. */
  readonly servers: ProxyServer[] = [];
  readonly console: Console;
  readonly #args: ParsedArgs;
  readonly #env: NodeJS.ProcessEnv;
  readonly #log: Logger;
  readonly #metrics: Metrics;
  readonly #shutdown: (by: string) => void;
  #process: Settings;
  /** The configuration read at start, for prepare(). */
  readonly #initial: LoadedConfig;
  /** The targets prepare() made ready, for listen(). */
  #starting: { groups: number[][]; prepared: Prepared[] } | undefined;
  readonly #targets = new Map<string, Running>();
  readonly #listeners = new Map<string, Listener>();
  /** Reloads one at a time. */
  #reloading: Promise<unknown> = Promise.resolve();

  constructor(options: RuntimeOptions, config: LoadedConfig) {
    this.version = options.version;
    this.#args = options.args;
    this.#env = options.env ?? process.env;
    this.#log = options.logger;
    this.#metrics = options.metrics;
    this.#shutdown = options.shutdown;
    this.#process = config.process;
    this.#initial = config;
    this.console = new Console(this, options.logger);
  }

  /** Checks the configuration read at start and prepares its targets (token sources); listen() starts them. */
  async prepare(): Promise<readonly PreparedTarget[]> {
    const config = this.#initial;
    const groups = check(config, this.#log);
    const prepared: Prepared[] = [];
    try {
      for (const target of config.targets) prepared.push({ target, ...(await this.#prepare(target)) });
    } catch (error) {
      await Promise.all(prepared.map((p) => p.prepared.tokenSource.close()));
      throw error;
    }
    this.#starting = { groups, prepared };
    return prepared.map((p) => p.prepared);
  }

  /** Listens for the prepared targets; after a failure, abandon() closes what was opened. */
  async listen(): Promise<void> {
    const starting = this.#starting;
    if (!starting) throw new Error('Runtime.listen() before prepare()');
    this.#starting = undefined;
    for (const group of starting.groups) await this.#listen(group.map((i) => starting.prepared[i] as Prepared));
  }

  /** Closes what prepare() and listen() opened, after a failure to start. */
  async abandon(prepared: readonly PreparedTarget[]): Promise<void> {
    for (const server of this.servers) await server.close();
    this.console.close();
    await Promise.all(prepared.map((p) => p.tokenSource.close()));
  }

  /** After the shutdown has ended the servers: the console's sessions, and every token source. */
  async close(): Promise<void> {
    this.console.close();
    await Promise.all([...this.#targets.values()].map((t) => t.prepared.tokenSource.close()));
  }

  process(): Settings {
    return this.#process;
  }

  targets(): readonly TargetView[] {
    return [...this.#targets.values()].map((t) => ({
      name: t.name,
      settings: t.settings,
      server: t.server,
      listener: t.listener.server,
      shared: t.listener.shared !== undefined,
      tokenSource: t.prepared.tokenSource,
      tokens: t.tokens,
      draining: t.draining,
    }));
  }

  listeners(): readonly ProxyServer[] {
    return [...this.#listeners.values()].map((l) => l.server);
  }

  traffic(target: string): Traffic {
    return this.#metrics.traffic(target);
  }

  shutdown(by: string): void {
    this.#shutdown(by);
  }

  reload(by: string): Promise<ReloadReport> {
    const run = this.#reloading.then(async () => {
      this.#log.info({ by }, 'reloading the configuration');
      try {
        const report = await this.#reload();
        this.#log.info({ by, changes: report.changes }, 'configuration reloaded');
        return report;
      } catch (error) {
        this.#log.warn({ by, err: error instanceof Error ? error.message : String(error) }, 'reload refused; the running configuration is kept');
        throw error;
      }
    });
    this.#reloading = run.catch(() => undefined);
    return run;
  }

  async #prepare(target: Target): Promise<Omit<Prepared, 'target'>> {
    const { settings, name } = target;
    if (settings.string('Password') === undefined) await checkOAuthSettings(resolveOAuth(settings));
    const tokens: Running['tokens'] = { obtainedAt: undefined, lastRefreshAt: undefined, lastRefreshResult: undefined, successes: 0, failures: 0 };
    const onRefresh = (result: 'success' | 'failure'): void => {
      this.#metrics.tokenRefreshed(name, result);
      const now = Date.now();
      tokens.lastRefreshAt = now;
      tokens.lastRefreshResult = result;
      if (result === 'success') {
        tokens.obtainedAt = now;
        tokens.successes++;
      } else {
        tokens.failures++;
      }
    };
    const prepared = await prepareTarget(settings, name, this.#log.child({ target: name }), onRefresh);
    this.#metrics.watchTokenExpiry(name, () => prepared.tokenSource.currentExpiry());
    if (prepared.options.upstream.sslMode === 'require') {
      this.#log.warn({ target: name, upstream: prepared.options.upstream.host }, 'SSLMode=require: the upstream certificate is not verified');
    }
    return { prepared, tokens };
  }

  #deps({ options, tokenSource, locator }: PreparedTarget): ProxyDeps {
    return { tokenSource, locator, logger: this.#log, observer: this.#metrics.observerFor(options.name), console: this.console };
  }

  /** Starts the listener of one group of targets (one target, or those sharing a port). */
  async #listen(members: readonly Prepared[]): Promise<void> {
    const first = members[0];
    if (!first) return;
    const key = listenerKey(first.target);
    const about = ({ options, tokenSource }: PreparedTarget) => ({
      target: options.name,
      upstream: `${options.upstream.host}:${options.upstream.port}`,
      identity: options.identity,
      tokenSource: tokenSource.describe(),
    });
    if (members.length === 1) {
      const server = new ProxyServer(first.prepared.options, this.#deps(first.prepared));
      await server.listen();
      const listener: Listener = { key, server, shared: undefined, stopped: false };
      this.#listeners.set(key, listener);
      this.servers.push(server);
      this.#targets.set(first.target.name, { name: first.target.name, settings: first.target.settings, prepared: first.prepared, server, listener, tokens: first.tokens, draining: false });
      this.#log.info({ ...about(first.prepared), address: first.prepared.options.listen.address, port: server.port, socket: server.socketPath }, 'listening');
      return;
    }
    const { address, port } = first.prepared.options.listen;
    const name = `${address}:${port}`;
    const shared = sharedPort(
      members.map((m) => ({ options: m.prepared.options, deps: this.#deps(m.prepared) })),
      { name, logger: this.#log, observer: this.#metrics.observerFor(name), console: this.console },
    );
    await shared.front.listen();
    const listener: Listener = { key, server: shared.front, shared, stopped: false };
    this.#listeners.set(key, listener);
    this.servers.push(shared.front, ...shared.targets);
    members.forEach((m, i) => {
      const server = shared.targets[i] as ProxyServer;
      this.#targets.set(m.target.name, { name: m.target.name, settings: m.target.settings, prepared: m.prepared, server, listener, tokens: m.tokens, draining: false });
    });
    this.#log.info({ target: name, address, port: shared.front.port, socket: shared.front.socketPath, databases: members.map((m) => m.target.name) }, 'listening');
    for (const m of members) this.#log.info({ ...about(m.prepared), database: m.target.name }, 'serving clients that ask for this database');
  }

  async #reload(): Promise<ReloadReport> {
    const config = await loadConfig(this.#args, this.#env);
    check(config, this.#log);
    // Every target's options, files read and values checked, before anything changes.
    const fresh = new Map<string, { target: Target; options: ProxyOptions }>();
    for (const target of config.targets) fresh.set(target.name, { target, options: await resolveProxy(target.settings, target.name) });
    const running = new Map([...this.#targets].filter(([, t]) => !t.draining));
    const added = config.targets.filter((t) => !running.has(t.name));
    const removed = [...running.values()].filter((t) => !fresh.has(t.name));
    const changes: string[] = [];

    // Where the new targets listen: a port of their own, or a shared port already running.
    const vacated = new Set([...this.#listeners.values()].filter((l) => [...running.values()].every((t) => t.listener !== l || removed.includes(t))).map((l) => l.key));
    const joining = new Map<string, Target[]>();
    const opening = new Map<string, Target[]>();
    for (const target of added) {
      const key = listenerKey(target);
      const listener = this.#listeners.get(key);
      if (listener && !vacated.has(key)) {
        if (!listener.shared) {
          const alone = [...running.values()].find((t) => t.listener === listener)?.name ?? '?';
          throw new ConfigError(`ListenPort: target ${target.name} would listen on ${key}, where target ${alone} listens alone; a port that becomes shared needs a restart`);
        }
        joining.set(key, [...(joining.get(key) ?? []), target]);
      } else {
        opening.set(key, [...(opening.get(key) ?? []), target]);
      }
    }
    for (const [key, targets] of joining) {
      const listener = this.#listeners.get(key) as Listener;
      for (const setting of ['UnixSocket', 'UnixSocketMode']) {
        const member = [...running.values()].find((t) => t.listener === listener && !removed.includes(t)) as Running;
        for (const target of targets) {
          if (target.settings.string(setting) !== member.settings.string(setting)) {
            throw new ConfigError(`${setting}: target ${target.name} joins ${key}, which runs with another ${setting}; a listener's ${setting} changes with a restart`);
          }
        }
      }
    }

    // The new targets' token sources, then their listeners; a failure closes what was opened.
    const prepared = new Map<string, Prepared>();
    const opened: Listener[] = [];
    try {
      for (const target of added) prepared.set(target.name, { target, ...(await this.#prepare(target)) });
      for (const [key, targets] of opening) {
        if (vacated.has(key)) this.#stopListener(this.#listeners.get(key) as Listener); // its targets are removed below
        await this.#listen(targets.map((t) => prepared.get(t.name) as Prepared));
        opened.push(this.#listeners.get(key) as Listener);
        for (const t of targets) changes.push(`target ${t.name} added: listening on ${this.#describeListener(this.#listeners.get(key) as Listener)}`);
      }
    } catch (error) {
      for (const listener of opened) {
        this.#stopListener(listener);
        for (const t of [...this.#targets.values()].filter((t) => t.listener === listener)) this.#targets.delete(t.name);
      }
      await Promise.all([...prepared.values()].map((p) => p.prepared.tokenSource.close()));
      throw error instanceof ConfigError ? error : new ConfigError(error instanceof Error ? error.message : String(error));
    }
    for (const [key, targets] of joining) {
      const listener = this.#listeners.get(key) as Listener;
      for (const target of targets) {
        const p = prepared.get(target.name) as Prepared;
        const server = (listener.shared as SharedPort).add({ options: p.prepared.options, deps: this.#deps(p.prepared) });
        this.servers.push(server);
        this.#targets.set(target.name, { name: target.name, settings: target.settings, prepared: p.prepared, server, listener, tokens: p.tokens, draining: false });
        changes.push(`target ${target.name} added: clients select it by that database name on ${this.#describeListener(listener)}`);
      }
    }

    for (const target of removed) {
      changes.push(`target ${target.name} removed: it accepts no new client; ${target.server.clients().length} open session(s) go on`);
      this.#drain(target);
    }

    for (const [name, t] of running) {
      const next = fresh.get(name);
      if (!next || removed.includes(t)) continue;
      const differing = PROPERTIES.filter((p) => !p.process && t.settings.string(p.name) !== next.target.settings.string(p.name)).map((p) => p.name);
      const kept = differing.filter((n) => !RELOADABLE.has(n));
      const applied = differing.filter((n) => RELOADABLE.has(n));
      t.settings = merged(t.settings, next.target.settings, (n) => RELOADABLE.has(n));
      t.server.update(reloadedOptions(t.server.options, next.options));
      if (t.listener.shared) {
        const front = t.listener.server;
        front.update({ ...front.options, clientAuth: next.options.clientAuth, startupTimeoutMs: next.options.startupTimeoutMs, maxStartups: next.options.maxStartups });
      }
      for (const setting of applied) changes.push(`target ${name}: ${setting} ${this.#shown(setting, next.target.settings)}`);
      if (kept.length > 0) changes.push(`target ${name}: ${kept.join(', ')} changed; that needs a restart, the running value${kept.length === 1 ? ' is' : 's are'} kept`);
    }

    const differing = PROPERTIES.filter((p) => p.process && this.#process.string(p.name) !== config.process.string(p.name)).map((p) => p.name);
    this.#process = merged(this.#process, config.process, (n) => RELOADABLE.has(n));
    for (const setting of differing.filter((n) => RELOADABLE.has(n))) changes.push(`${setting} ${this.#shown(setting, config.process)}`);
    const kept = differing.filter((n) => !RELOADABLE.has(n));
    if (kept.length > 0) changes.push(`${kept.join(', ')} changed; that needs a restart, the running value${kept.length === 1 ? ' is' : 's are'} kept`);
    if (changes.length === 0) changes.push('no change');
    return { changes };
  }

  /** A setting's new value for a reload's report (a secret is never shown). */
  #shown(name: string, settings: Settings): string {
    const property = PROPERTIES.find((p) => p.name === name);
    return property?.secret ? 'changed' : `now ${settings.string(name) ?? '(unset)'}`;
  }

  #describeListener(listener: Listener): string {
    const { address } = listener.server.options.listen;
    return `${address}:${listener.server.port}${listener.server.socketPath ? ` and ${listener.server.socketPath}` : ''}`;
  }

  #stopListener(listener: Listener): void {
    if (listener.stopped) return;
    listener.stopped = true;
    listener.server.stopAccepting();
    if (this.#listeners.get(listener.key) === listener) this.#listeners.delete(listener.key);
  }

  /** A removed target: no new client reaches it; once its sessions have ended its token source closes. */
  #drain(target: Running): void {
    target.draining = true;
    const { listener } = target;
    if (listener.shared) {
      listener.shared.remove(target.name);
      target.server.refuseNewClients();
      if (listener.shared.targets.length === 0) this.#stopListener(listener);
    } else {
      this.#stopListener(listener);
    }
    void target.server.drained().then(async () => {
      if (this.#targets.get(target.name) === target) this.#targets.delete(target.name);
      const at = this.servers.indexOf(target.server);
      if (at >= 0) this.servers.splice(at, 1);
      await target.prepared.tokenSource.close();
      this.#log.info({ target: target.name }, 'removed target drained');
    });
  }
}
