/**
 * Several targets on one port, selected by the client's database name as PgBouncer's [databases]
 * section maps names: a client connecting with dbname=analytics reaches the target named
 * analytics, which logs in with its own identity, token source and upstream database.
 *
 * The port is served by a front: a ProxyServer with the listener settings the targets share
 * (address, port, unix socket, client TLS and authentication, startup timeout). It takes each
 * client through its startup and authentication, then hands the session to the target its
 * database names; the targets themselves listen on nothing. The front's metrics count what
 * happens before that choice (clients in their startup, refused handshakes, unknown names), the
 * targets' what happens after.
 */
import type { Logger } from '../ops/log.js';
import { TokenError, type TokenSource } from '../token/token-source.js';
import { CancelKeys } from './cancel.js';
import type { ProxyObserver } from './observer.js';
import type { ConsoleGate } from '../admin/gate.js';
import { ProxyServer, type ProxyDeps, type ProxyOptions } from './server.js';

/** Picks the target of a port by the database a client asked for. */
export interface Router {
  /** The target named `database`, or undefined. */
  route(database: string): ProxyServer | undefined;
  /** Every name the port serves, for the error an unknown one gets. */
  readonly names: readonly string[];
}

/** The front never logs in upstream: its targets do. */
const NO_TOKEN: TokenSource = {
  getToken: () => Promise.reject(new TokenError('token_missing', 'the front of a shared port logs in nowhere')),
  describe: () => 'none (the front of a shared port)',
  currentExpiry: () => undefined,
  close: () => Promise.resolve(),
};

export interface SharedPort {
  /** Listens for every target; its name is the address (127.0.0.1:5432). */
  readonly front: ProxyServer;
  /** The targets; they do not listen. */
  readonly targets: readonly ProxyServer[];
  /** A target added by a reload: clients may name it from now on. */
  add(target: { readonly options: ProxyOptions; readonly deps: ProxyDeps }): ProxyServer;
  /** A target removed by a reload: clients that name it from now on get 3D000; its sessions go on. */
  remove(name: string): void;
}

/**
 * The front and targets of one shared port. The targets share one set of cancel keys: a cancel
 * request reaches the front, which must find any target's session by its key.
 */
export function sharedPort(
  targets: ReadonlyArray<{ readonly options: ProxyOptions; readonly deps: ProxyDeps }>,
  front: { readonly logger: Logger; readonly observer?: ProxyObserver | undefined; readonly name: string; readonly console?: ConsoleGate | undefined },
): SharedPort {
  const first = targets[0];
  if (first === undefined) throw new Error('a shared port needs targets');
  const cancelKeys = new CancelKeys();
  const servers = targets.map((t) => new ProxyServer(t.options, { ...t.deps, cancelKeys }));
  const byName = new Map(servers.map((server) => [server.options.name, server]));
  const router: Router = {
    route: (database) => byName.get(database),
    get names() {
      return [...byName.keys()];
    },
  };
  const frontServer = new ProxyServer(
    // The listener settings are the targets' (the same for all of them); the front itself never relays.
    { ...first.options, name: front.name, maxConnections: 0, idleTimeoutMs: 0 },
    { tokenSource: NO_TOKEN, logger: front.logger, router, cancelKeys, ...(front.observer ? { observer: front.observer } : {}), ...(front.console ? { console: front.console } : {}) },
  );
  return {
    front: frontServer,
    get targets() {
      return [...byName.values()];
    },
    add(target) {
      const server = new ProxyServer(target.options, { ...target.deps, cancelKeys });
      byName.set(target.options.name, server);
      return server;
    },
    remove(name) {
      byName.delete(name);
    },
  };
}
