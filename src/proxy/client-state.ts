/** A client as the admin console shows it (SHOW CLIENTS, SHOW SERVERS, KILL CLIENT). */
import type { Socket } from 'node:net';
import { TLSSocket } from 'node:tls';
import type { Duplex } from 'node:stream';
import type { ServerConnection } from '../pool/server-connection.js';

/** A client as the console shows it (SHOW CLIENTS, SHOW SERVERS), updated as its session goes. */
export interface ClientState {
  /** Unique in the process: KILL CLIENT takes it. */
  readonly id: number;
  readonly connectedAt: number;
  /** The peer's address and port; undefined over the unix socket. */
  readonly remote: { readonly address: string; readonly port: number } | undefined;
  readonly local: { readonly address: string; readonly port: number };
  /** The target (or shared port) serving it now. */
  target: string;
  user: string;
  database: string;
  applicationName: string;
  /** The TLS version and cipher toward the client; empty when plain. */
  tls: string;
  /** login: in its startup; waiting: for PAUSE to end, a pooled connection or its upstream login; active: relayed. */
  state: 'login' | 'waiting' | 'active';
  /** When the state began. */
  since: number;
  /** Held at the gate by PAUSE. */
  paused: boolean;
  relay: 'native' | 'js' | undefined;
  /** The upstream connection of an active session. */
  upstream: { readonly processId: number; readonly tls: string; readonly connectedAt: number; readonly server: ServerConnection | undefined } | undefined;
}

let nextClientId = 1;

/** A new client's state, from its socket. */
export function clientState(socket: Socket, target: string): ClientState {
  const remote = socket.remoteAddress === undefined ? undefined : { address: socket.remoteAddress, port: socket.remotePort ?? 0 };
  return peerState(remote, { address: socket.localAddress ?? '', port: socket.localPort ?? 0 }, target);
}

/** A new client's state, from its addresses (a client C accepted: src/proxy/native-listener.ts). */
export function peerState(remote: ClientState['remote'], local: ClientState['local'], target: string): ClientState {
  const now = Date.now();
  return {
    id: nextClientId++,
    connectedAt: now,
    remote,
    local,
    target,
    user: '',
    database: '',
    applicationName: '',
    tls: '',
    state: 'login',
    since: now,
    paused: false,
    relay: undefined,
    upstream: undefined,
  };
}

/** What SHOW CLIENTS shows of an authenticated client: its user, database, application and TLS. */
export function describeClient(state: ClientState, handshake: { readonly parameters: ReadonlyMap<string, string>; readonly socket?: Duplex }): void {
  const { parameters, socket } = handshake;
  state.user = parameters.get('user') ?? '';
  state.database = parameters.get('database') || state.user;
  state.applicationName = parameters.get('application_name') ?? '';
  if (socket instanceof TLSSocket) state.tls = `${socket.getProtocol() ?? ''}/${socket.getCipher()?.standardName ?? ''}`;
  state.since = Date.now();
}
