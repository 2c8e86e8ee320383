/** What a listener hands the admin console: the hook in src/proxy/server.ts. */
import type { Duplex } from 'node:stream';
import type { CancelKeys } from '../proxy/cancel.js';
import type { ClientAuthMethod } from '../proxy/client-handshake.js';
import type { ClientState } from '../proxy/client-state.js';
import type { SocketFrames } from '../wire/socket-frames.js';

/** What the server asks of the admin console. */
export interface ConsoleGate {
  /** Whether a client that asked for these startup parameters is the console's. */
  claims(parameters: ReadonlyMap<string, string>): boolean;
  /** Takes over an authenticated client: from here on the socket is the console's. */
  serve(client: ConsoleClient): void;
}

/** An authenticated client handed to the console, and how it came in. */
export interface ConsoleClient {
  readonly socket: Duplex;
  readonly frames: SocketFrames;
  readonly parameters: ReadonlyMap<string, string>;
  readonly state: ClientState;
  /** The listener's client authentication: trust, or a password checked against ClientUsers. */
  readonly authMethod: ClientAuthMethod;
  /** The unix socket's permission bits when the client came over it. */
  readonly unixSocketMode: number | undefined;
  /** Where the console registers its own cancel keys (a cancel request reaches this port). */
  readonly cancelKeys: CancelKeys;
}
