/**
 * The admin console: the database `lakebase_proxy` (and `pgbouncer`, unless NoPgBouncerAlias) on
 * every listener of the proxy. A client that asks for it is served here after its startup and
 * authentication, and never reaches an upstream.
 *
 * Who may do what: SHOW, for any client the listener accepts. PAUSE, RESUME, RELOAD, SHUTDOWN,
 * KILL and the CALLs change the proxy or touch tokens: only for a client over the unix socket
 * when its mode lets only the proxy's own OS user in (0600), or for a user named in AdminUsers
 * who authenticated by password or SCRAM; others get SQLSTATE 42501. Every command is logged
 * with who ran it (SHOW at debug: exporters run it every few seconds), never a secret argument.
 */
import type { Logger } from '../ops/log.js';
import { ConfigError } from '../config/properties.js';
import type { ClientState } from '../proxy/client-state.js';
import type { ConsoleClient, ConsoleGate } from './gate.js';
import type { ConsoleHost, TargetView, Traffic } from './host.js';
import { planCall, runCall, type CallPlan } from './procedures.js';
import { ConsoleSession, type Outcome } from './session.js';
import { ConsoleError, HELP_HINT, type Statement } from './statements.js';
import { TABLES, type Averages, type ConsoleView } from './tables.js';

/** The console's database name; `pgbouncer` is its alias. */
export const CONSOLE_DATABASE = 'lakebase_proxy';
export const PGBOUNCER_ALIAS = 'pgbouncer';

/** How often the averages of SHOW STATS are taken (PgBouncer's stats_period). */
const STATS_PERIOD_MS = 60_000;

const HELP = [
  'SHOW HELP|POOLS|CLIENTS|SERVERS|STATS|DATABASES|CONFIG|VERSION|LISTS|TOKENS|TARGETS',
  'PAUSE [<target>]',
  'RESUME [<target>]',
  'RELOAD',
  'SHUTDOWN',
  'KILL CLIENT <id>',
  "CALL GetOAuthAuthorizationUrl([callback_url => '...'] [, target => '...'])",
  "CALL GetOAuthAccessToken(verifier => '<code or callback URL>' [, print_tokens => true] [, target => '...'])",
  "CALL RefreshOAuthAccessToken([refresh_token => '...'] [, print_tokens => true] [, target => '...'])",
];

/** Who runs a command, for the authorization and the log. */
interface Caller {
  readonly user: string;
  readonly peer: string;
  /** Over the unix socket of mode 0600: the proxy's own OS user. */
  readonly owner: boolean;
  /** Authenticated by password or SCRAM (not trust). */
  readonly authenticated: boolean;
}

export class Console implements ConsoleGate {
  readonly #host: ConsoleHost;
  readonly #log: Logger;
  readonly #sessions = new Set<ConsoleSession>();
  readonly #statsTimer: NodeJS.Timeout;
  #mark: { at: number; traffic: Map<string, Traffic> };
  #averages = new Map<string, Averages>();

  constructor(host: ConsoleHost, logger: Logger) {
    this.#host = host;
    this.#log = logger.child({ console: CONSOLE_DATABASE });
    this.#mark = this.#snapshot();
    this.#statsTimer = setInterval(() => this.#period(), STATS_PERIOD_MS).unref();
  }

  claims(parameters: ReadonlyMap<string, string>): boolean {
    const database = parameters.get('database') || parameters.get('user');
    return database === CONSOLE_DATABASE || (database === PGBOUNCER_ALIAS && !this.#host.process().bool('NoPgBouncerAlias'));
  }

  serve(client: ConsoleClient): void {
    const { state } = client;
    state.state = 'active';
    state.target = '';
    const caller: Caller = {
      user: state.user,
      peer: state.remote ? `${state.remote.address}:${state.remote.port}` : 'unix socket',
      owner: client.unixSocketMode !== undefined && (client.unixSocketMode & 0o077) === 0,
      authenticated: client.authMethod !== 'trust',
    };
    const session: ConsoleSession = new ConsoleSession({
      socket: client.socket,
      frames: client.frames,
      state,
      execute: (statement, signal) => this.#execute(statement, caller, session, signal),
    });
    // A cancel request with this session's key ends its running PAUSE.
    const key = client.cancelKeys.register({ processId: 0, secretKey: Buffer.alloc(4), cancel: () => Promise.resolve(session.cancel()) });
    this.#sessions.add(session);
    this.#log.debug({ user: caller.user, peer: caller.peer, admin: this.#mayAdminister(caller) }, 'console session started');
    const admin = this.#mayAdminister(caller) ? 'on' : 'off';
    const greeting: Array<[string, string]> = [
      ['server_version', `16.0 (${this.#host.version} console)`],
      ['server_encoding', 'UTF8'],
      ['client_encoding', 'UTF8'],
      ['DateStyle', 'ISO, MDY'],
      ['IntervalStyle', 'postgres'],
      ['TimeZone', 'UTC'],
      ['integer_datetimes', 'on'],
      ['standard_conforming_strings', 'on'],
      ['is_superuser', admin],
      ['session_authorization', caller.user],
      ['application_name', state.applicationName],
    ];
    void session
      .run(greeting, key)
      .catch((error: unknown) => this.#log.error({ err: error instanceof Error ? error.message : String(error) }, 'console session failed unexpectedly'))
      .finally(() => {
        key.release();
        this.#sessions.delete(session);
      });
  }

  /** The console's own clients, for SHOW CLIENTS. */
  get clients(): ClientState[] {
    return [...this.#sessions].map((s) => s.state);
  }

  /** Closes every console session (at the end of a shutdown). */
  close(): void {
    clearInterval(this.#statsTimer);
    for (const session of this.#sessions) session.close();
  }

  #view(): ConsoleView {
    return { host: this.#host, consoleClients: this.clients, averages: (target) => this.#averages.get(target) ?? { recv: 0, sent: 0, waitUs: 0 } };
  }

  #mayAdminister(caller: Caller): boolean {
    if (caller.owner) return true;
    const admins = (this.#host.process().string('AdminUsers') ?? '').split(',').map((name) => name.trim());
    return caller.authenticated && caller.user !== '' && admins.includes(caller.user);
  }

  async #execute(statement: Statement, caller: Caller, session: ConsoleSession, signal: AbortSignal): Promise<Outcome> {
    const who = { user: caller.user, peer: caller.peer };
    if (statement.kind === 'show') {
      this.#log.debug({ ...who, command: `SHOW ${statement.item.toUpperCase()}` }, 'console command');
      return this.#show(statement.item);
    }
    let call: CallPlan | undefined;
    let unplanned: unknown;
    if (statement.kind === 'call') {
      try {
        call = planCall(statement.procedure, statement.args);
      } catch (error) {
        unplanned = error; // said after the authorization: a non-admin learns nothing of the procedures
      }
    }
    const command = statement.kind === 'kill' ? 'KILL CLIENT' : statement.kind === 'call' ? `CALL ${call?.procedure.name ?? statement.procedure}` : statement.kind.toUpperCase();
    const about = {
      ...who,
      command,
      ...(statement.kind === 'pause' || statement.kind === 'resume' ? { target: statement.target } : {}),
      ...(statement.kind === 'kill' ? { client: statement.client } : {}),
      ...(call ? { arguments: call.logged } : {}),
    };
    if (!this.#mayAdminister(caller)) {
      this.#log.warn(about, 'console command refused: not an admin');
      throw new ConsoleError(
        '42501',
        `permission denied: ${about.command} is for admins of the proxy`,
        'connect over the unix socket (--unix-socket, mode 0600), or as a user named in AdminUsers who authenticates by password or SCRAM (--client-auth scram-sha-256 with --client-users)',
      );
    }
    this.#log.info(about, 'console command');
    try {
      if (unplanned !== undefined) throw unplanned;
      switch (statement.kind) {
        case 'pause': {
          const targets = this.#pick(statement.target);
          try {
            await Promise.all(targets.map((t) => t.server.pause(signal)));
          } catch (error) {
            if (!signal.aborted) throw error;
            throw new ConsoleError('57014', `${(signal.reason as Error).message}: ${targets.map((t) => t.name).join(', ')} stay${targets.length === 1 ? 's' : ''} paused, holding new clients, until RESUME`);
          }
          return { tag: 'PAUSE' };
        }
        case 'resume': {
          const targets = this.#pick(statement.target).filter((t) => t.server.paused);
          if (targets.length === 0) throw new ConsoleError('55000', statement.target === undefined ? 'no target is paused' : `target ${statement.target} is not paused`);
          for (const t of targets) t.server.resume();
          return { tag: 'RESUME' };
        }
        case 'reload':
          try {
            const report = await this.#host.reload(`${caller.user}@${caller.peer}`);
            return { tag: 'RELOAD', notices: report.changes.map((message) => ({ message })) };
          } catch (error) {
            if (error instanceof ConfigError) throw new ConsoleError('F0000', `${error.message}; the running configuration is kept`);
            throw error;
          }
        case 'shutdown':
          return { tag: 'SHUTDOWN', after: () => this.#host.shutdown(`${caller.user}@${caller.peer}`) };
        case 'kill':
          return this.#kill(statement.client, session);
        case 'call': {
          const target = this.#callTarget(call?.args.get('target'));
          return { tag: 'CALL', table: await runCall(call as NonNullable<typeof call>, target, this.#log.child({ target: target.name })) };
        }
        default:
          throw new Error(`unknown statement ${(statement as { kind: string }).kind}`);
      }
    } catch (error) {
      if (error instanceof ConsoleError) {
        this.#log.info({ ...about, sqlstate: error.sqlstate, reason: error.message }, 'console command failed');
        throw error;
      }
      if (signal.aborted && signal.reason instanceof ConsoleError) throw signal.reason;
      this.#log.error({ ...about, err: error instanceof Error ? error.message : String(error) }, 'console command failed unexpectedly');
      throw error;
    }
  }

  #show(item: string): Outcome {
    if (item === 'help') return { tag: 'SHOW', notices: [{ message: 'Console usage', detail: HELP.map((line) => `\n\t${line}`).join('') }] };
    const build = TABLES[item];
    if (!build) throw new ConsoleError('42704', `unrecognized SHOW item "${item}"`, HELP_HINT);
    return { tag: 'SHOW', table: build(this.#view()) };
  }

  /** The targets a PAUSE or RESUME names (by target name, or by the database name clients use), or all. */
  #pick(name: string | undefined): TargetView[] {
    const all = this.#host.targets();
    if (name === undefined) return [...all];
    const found = all.filter((t) => t.name === name);
    const byDatabase = all.filter((t) => !t.shared && t.server.options.defaultDatabase === name);
    const picked = found.length > 0 ? found : byDatabase;
    if (picked.length === 0) throw new ConsoleError('42704', `no target named "${name}"; the targets are ${all.map((t) => t.name).join(', ')}`, 'SHOW TARGETS lists them');
    return picked;
  }

  #callTarget(given: string | boolean | null | undefined): TargetView {
    const all = this.#host.targets().filter((t) => !t.draining);
    if (typeof given === 'string') {
      const found = all.find((t) => t.name === given);
      if (!found) throw new ConsoleError('42704', `no target named "${given}"; the targets are ${all.map((t) => t.name).join(', ')}`, 'SHOW TARGETS lists them');
      return found;
    }
    if (given !== undefined && given !== null) throw new ConsoleError('22023', "target takes a target's name, e.g. target => 'analytics'");
    if (all.length !== 1) {
      throw new ConsoleError('22023', `the proxy runs ${all.length} targets (${all.map((t) => t.name).join(', ')}): name one with target => '...'`, 'SHOW TARGETS lists them');
    }
    return all[0] as TargetView;
  }

  #kill(id: number, caller: ConsoleSession): Outcome {
    for (const session of this.#sessions) {
      if (session.state.id !== id) continue;
      if (session === caller) return { tag: 'KILL', after: () => session.close() };
      session.close();
      return { tag: 'KILL' };
    }
    const servers = new Set([...this.#host.listeners(), ...this.#host.targets().map((t) => t.server)]);
    for (const server of servers) if (server.kill(id)) return { tag: 'KILL' };
    throw new ConsoleError('42704', `no client with id ${id}`, 'SHOW CLIENTS lists each client with its id');
  }

  #snapshot(): { at: number; traffic: Map<string, Traffic> } {
    return { at: Date.now(), traffic: new Map(this.#host.targets().map((t) => [t.name, this.#host.traffic(t.name)])) };
  }

  /** The averages of the period that just ended, per second (and per wait), as PgBouncer's avg_ columns. */
  #period(): void {
    const now = this.#snapshot();
    const seconds = Math.max(1, (now.at - this.#mark.at) / 1000);
    const averages = new Map<string, Averages>();
    for (const [target, traffic] of now.traffic) {
      const before = this.#mark.traffic.get(target);
      const waits = traffic.waits - (before?.waits ?? 0);
      averages.set(target, {
        recv: (traffic.bytesToUpstream - (before?.bytesToUpstream ?? 0)) / seconds,
        sent: (traffic.bytesToClient - (before?.bytesToClient ?? 0)) / seconds,
        waitUs: waits > 0 ? ((traffic.waitSeconds - (before?.waitSeconds ?? 0)) * 1e6) / waits : 0,
      });
    }
    this.#averages = averages;
    this.#mark = now;
  }
}
