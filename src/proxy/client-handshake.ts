/**
 * The client side of the startup, as one state machine: SSLRequest / GSSENCRequest negotiation,
 * CancelRequest, StartupMessage, protocol-version negotiation and the local authentication.
 * It ends with the client authenticated (AuthenticationOk is the caller's to send: authenticated())
 * or with an ErrorResponse sent.
 * @see https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP
 */
import { TLSSocket, type SecureContext } from 'node:tls';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import {
  AUTHENTICATION_CLEARTEXT,
  AUTHENTICATION_OK,
  authenticationSASL,
  authenticationSASLContinue,
  authenticationSASLFinal,
  negotiateProtocolVersion,
  SSL_ACCEPT,
  SSL_REFUSE,
} from '../wire/backend-messages.js';
import { FrameReader, FramingError } from '../wire/frame-reader.js';
import { SocketFrames } from '../wire/socket-frames.js';
import { decodeStartupPacket, MAX_STARTUP_PACKET_LENGTH, StartupPacketError } from '../wire/startup-packets.js';
import { PasswordMismatch, SCRAM, ScramError, ScramServer, verifyPassword, type ScramVerifier } from '../auth/scram.js';

export type ClientAuthMethod = 'trust' | 'password' | 'scram-sha-256';

export interface ClientHandshakeOptions {
  /** Set when client-side TLS is configured (certificate and key files). */
  readonly tls: SecureContext | undefined;
  readonly authMethod: ClientAuthMethod;
  /** Local users for `password` and `scram-sha-256`. */
  readonly users: ReadonlyMap<string, ScramVerifier>;
}

export type HandshakeResult =
  | {
      readonly kind: 'session';
      readonly socket: Duplex;
      readonly parameters: ReadonlyMap<string, string>;
      /** Bytes the client sent after its authentication, before the relay started. */
      readonly frames: SocketFrames;
    }
  | { readonly kind: 'cancel'; readonly processId: number; readonly secretKey: Buffer };

/** A refusal for the client: sent as ErrorResponse, then the connection is closed. */
export class HandshakeError extends Error {
  override readonly name = 'HandshakeError';
  constructor(
    readonly sqlstate: string,
    message: string,
    /** The socket to write the ErrorResponse on (the TLS one once upgraded). */
    readonly socket?: Duplex,
  ) {
    super(message);
  }
}

const PASSWORD_MESSAGE = 0x70; // 'p'
/** SASL and password messages are small; Postgres allows auth tokens up to 65,535 bytes. */
const MAX_AUTH_MESSAGE = 65535;

/**
 * `refusal`, asked when the StartupMessage arrives (before authentication, where Postgres checks
 * whether it accepts connections at all), may turn the client away with an error of its own.
 * A CancelRequest is never refused: it may be for a session still running.
 */
export async function clientHandshake(
  raw: Socket,
  options: ClientHandshakeOptions,
  refusal?: () => { readonly sqlstate: string; readonly message: string } | undefined,
): Promise<HandshakeResult> {
  let socket: Duplex = raw;
  let frames = startupFrames(raw);
  let encrypted = false;
  try {
    for (;;) {
      const packet = decodeStartupPacket((await frames.next()).body);
      switch (packet.kind) {
        case 'ssl':
        case 'gssenc':
          if (encrypted) throw new HandshakeError('08P01', 'encryption already negotiated', socket);
          if (frames.reader.buffered > 0) {
            throw new HandshakeError('08P01', 'received unencrypted data after SSL request', socket);
          }
          if (packet.kind === 'ssl' && options.tls) {
            frames.detach();
            raw.write(SSL_ACCEPT);
            socket = await upgrade(raw, options.tls);
            frames = startupFrames(socket);
            encrypted = true;
          } else {
            socket.write(SSL_REFUSE);
            // libpq may try GSS first, then SSL: only a successful upgrade ends the negotiation.
          }
          break;
        case 'cancel':
          frames.detach();
          return { kind: 'cancel', processId: packet.processId, secretKey: packet.secretKey };
        case 'startup': {
          const refused = refusal?.();
          if (refused) throw new HandshakeError(refused.sqlstate, refused.message, socket);
          const unrecognized = [...packet.parameters.keys()].filter((name) => name.startsWith('_pq_.'));
          if (packet.minor > 0 || unrecognized.length > 0) socket.write(negotiateProtocolVersion(0, unrecognized));
          const parameters = new Map([...packet.parameters].filter(([name]) => !name.startsWith('_pq_.')));
          frames.reader.typed = true;
          frames.reader.maxLength = MAX_AUTH_MESSAGE;
          await authenticate(socket, frames, parameters.get('user') as string, options);
          return { kind: 'session', socket, parameters, frames };
        }
        default:
          throw new Error(`unhandled startup packet ${(packet as { kind: string }).kind}`);
      }
    }
  } catch (error) {
    frames.detach();
    if (error instanceof HandshakeError) throw error.socket ? error : new HandshakeError(error.sqlstate, error.message, socket);
    if (error instanceof StartupPacketError) throw new HandshakeError(error.sqlstate, error.message, socket);
    if (error instanceof FramingError) throw new HandshakeError('08P01', error.message, socket);
    throw error;
  }
}

/**
 * AuthenticationOk, which the handshake leaves to its caller: it goes out with what the session
 * writes next in this turn of the event loop (a pooled session's greeting, when its uncork()
 * comes first), else at the next. A session C greets sends it itself, in the greeting's write.
 */
export function authenticated(socket: Duplex): void {
  socket.cork();
  socket.write(AUTHENTICATION_OK);
  setImmediate(() => socket.uncork());
}

/** Startup-phase framing; the limit counts the payload after the length word, as Postgres' does. */
function startupFrames(socket: Duplex): SocketFrames {
  return new SocketFrames(socket, new FrameReader(MAX_STARTUP_PACKET_LENGTH + 4, false));
}

function upgrade(raw: Socket, context: SecureContext): Promise<TLSSocket> {
  const tls = new TLSSocket(raw, { isServer: true, secureContext: context });
  tls.on('error', () => {}); // reported through the promise below and the session's handlers
  return new Promise<TLSSocket>((resolve, reject) => {
    tls.once('secure', () => {
      tls.off('close', onClose);
      resolve(tls);
    });
    const onClose = (): void => reject(new HandshakeError('08P01', 'TLS handshake with the client failed'));
    tls.once('close', onClose);
    tls.once('error', (error) => reject(new HandshakeError('08P01', `TLS handshake with the client failed: ${error.message}`)));
  });
}

async function authenticate(socket: Duplex, frames: SocketFrames, user: string, options: ClientHandshakeOptions): Promise<void> {
  switch (options.authMethod) {
    case 'trust':
      return;
    case 'password': {
      socket.write(AUTHENTICATION_CLEARTEXT);
      const password = cstring(await expectPasswordMessage(frames));
      const verifier = options.users.get(user);
      if (!verifier || !verifyPassword(verifier, password)) throw failed(user, socket);
      return;
    }
    case 'scram-sha-256': {
      socket.write(authenticationSASL([SCRAM]));
      const initial = await expectPasswordMessage(frames);
      const mechanismEnd = initial.indexOf(0);
      if (mechanismEnd < 0 || initial.length < mechanismEnd + 5) throw new HandshakeError('08P01', 'malformed SASLInitialResponse message', socket);
      if (initial.toString('utf8', 0, mechanismEnd) !== SCRAM) {
        throw new HandshakeError('28000', 'client selected an invalid SASL authentication mechanism', socket);
      }
      const length = initial.readInt32BE(mechanismEnd + 1);
      const clientFirst = initial.toString('utf8', mechanismEnd + 5, mechanismEnd + 5 + Math.max(length, 0));
      // An unknown user runs the exchange against a throwaway verifier, so names cannot be probed.
      const server = new ScramServer(options.users.get(user) ?? unknownUserVerifier);
      try {
        socket.write(authenticationSASLContinue(server.serverFirstMessage(clientFirst)));
        const clientFinal = (await expectPasswordMessage(frames)).toString('utf8');
        if (!options.users.has(user)) throw new PasswordMismatch();
        socket.write(authenticationSASLFinal(server.serverFinalMessage(clientFinal)));
      } catch (error) {
        if (error instanceof PasswordMismatch) throw failed(user, socket);
        if (error instanceof ScramError) throw new HandshakeError('08P01', error.message, socket);
        throw error;
      }
      return;
    }
    default:
      throw new Error(`unknown client authentication method ${options.authMethod as string}`);
  }
}

const unknownUserVerifier: ScramVerifier = {
  iterations: 4096,
  salt: Buffer.from('lakebase-proxy-unknown-user'),
  storedKey: Buffer.alloc(32),
  serverKey: Buffer.alloc(32),
};

function failed(user: string, socket: Duplex): HandshakeError {
  return new HandshakeError('28P01', `password authentication failed for user "${user}"`, socket);
}

async function expectPasswordMessage(frames: SocketFrames): Promise<Buffer> {
  const { type, body } = await frames.next();
  if (type !== PASSWORD_MESSAGE) {
    throw new HandshakeError('08P01', `expected password response, got message type ${type}`);
  }
  return body;
}

function cstring(body: Buffer): string {
  const end = body.indexOf(0);
  return body.toString('utf8', 0, end < 0 ? body.length : end);
}
