/**
 * The login to the upstream server: TCP, SSLRequest, TLS (always: Lakebase refuses plaintext),
 * StartupMessage, then whichever password method the server asks for, with the token as the
 * password. The result is a TLS socket at ReadyForQuery and the messages the client must see.
 */
import { isIP, connect as netConnect, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { connect as tlsConnect, createSecureContext, type SecureContext, type TLSSocket } from 'node:tls';
import { serialize } from 'pg-protocol';
import { AuthRequest, BackendCode, message, parseFields, SSL_ACCEPT } from '../wire/backend-messages.js';
import { FrameReader } from '../wire/frame-reader.js';
import { PeerClosedError, SocketFrames } from '../wire/socket-frames.js';
import { CANCEL_REQUEST_CODE, encodeStartupMessage } from '../wire/startup-packets.js';
import { md5PasswordResponse, SCRAM, SCRAM_PLUS, ScramClient, tlsServerEndPoint } from '../auth/scram.js';
import { NativeHandshakeError, NativeUpstream } from './native-relay.js';

export interface UpstreamTarget {
  readonly host: string;
  readonly port: number;
  /** verify-full: CA and host name; verify-ca: CA only; require: encryption without verification. */
  readonly sslMode: 'verify-full' | 'verify-ca' | 'require';
  /** PEM of the CA(s) to trust; undefined means the system's CAs. */
  readonly rootCert: Buffer | undefined;
  readonly connectTimeoutMs: number;
  /** TCP keepalive initial delay toward the upstream; 0 turns it off. */
  readonly keepAliveMs: number;
}

export interface UpstreamSession {
  /** The plaintext of the connection: Node's TLS socket, or the native connection's Duplex. */
  readonly socket: TLSSocket | NativeUpstream;
  /** ParameterStatus, NoticeResponse and the final ReadyForQuery, raw, in the order received. */
  readonly greeting: Buffer[];
  readonly processId: number;
  readonly secretKey: Buffer;
  /** Bytes that followed ReadyForQuery in the same read: the first bytes of the relay. */
  readonly leftover: Buffer;
  /** The TLS version and cipher suite (OpenSSL's standard name). */
  readonly tls: { readonly version: string; readonly cipher: string };
  /** Set when the connection is OpenSSL's in C (asked for with `native`): the native relay can take it. */
  readonly native: NativeUpstream | undefined;
}

/** Fields of an ErrorResponse, in order: [letter, value]. */
export type ErrorFields = ReadonlyArray<readonly [string, string]>;

/** A login that failed: `sqlstate` and a message naming the upstream; `fields` when the server sent them. */
export class UpstreamError extends Error {
  override readonly name = 'UpstreamError';
  constructor(
    readonly sqlstate: string,
    message: string,
    readonly fields?: ErrorFields,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

const SSL_REQUEST = serialize.requestSsl();
/** Handshake messages are small; a server sending more than this before ReadyForQuery is broken. */
const MAX_HANDSHAKE_MESSAGE = 1 << 20;

/**
 * TLS sessions to resume, with the server certificate of the full handshake each came from: a
 * resumed session does not carry the certificate again (getPeerCertificate() is empty), and
 * SCRAM-SHA-256-PLUS needs it for its channel binding.
 */
const tlsSessions = new Map<string, { readonly session: Buffer; readonly certificate: Buffer | undefined }>();
/**
 * The server certificate (DER) behind an upstream TLS socket that offered a session to resume;
 * a full handshake's socket is asked for its own when SCRAM needs it. Emptied when the login ends.
 */
const resumedCertificates = new WeakMap<TLSSocket, Buffer>();

/**
 * One TLS context per target, made at the first connection: creating one per connection parses
 * the CA file each time (CPU on every connect) and holds a context per session (memory).
 */
const secureContexts = new WeakMap<UpstreamTarget, SecureContext>();

function secureContextFor(target: UpstreamTarget): SecureContext {
  let context = secureContexts.get(target);
  if (!context) {
    context = createSecureContext(target.rootCert ? { ca: target.rootCert } : {});
    secureContexts.set(target, context);
  }
  return context;
}

/**
 * The server certificate (DER) of `socket`'s TLS session, resumed or not. Asked for only when
 * needed (SCRAM, a new session to keep): getPeerCertificate() builds a large object.
 */
function serverCertificate(socket: TLSSocket): Buffer | undefined {
  return socket.isSessionReused() ? resumedCertificates.get(socket) : socket.getPeerCertificate()?.raw;
}

/** For the errors that the awaits report; one function for every socket, not a closure each. */
function ignore(): void {}
/** What a login that found nothing after ReadyForQuery hands to the relay. */
const NOTHING = Buffer.alloc(0);

function where(target: UpstreamTarget): string {
  return `${target.host}:${target.port}`;
}

/** Node reports a connect that failed on every address of a host (IPv4 and IPv6) as an AggregateError without a message. */
function reason(error: Error): string {
  if (error.message !== '') return error.message;
  if (error instanceof AggregateError) return error.errors.map((e: unknown) => (e instanceof Error ? e.message : String(e))).join('; ');
  return (error as NodeJS.ErrnoException).code ?? error.name;
}

/** TCP + SSLRequest + TLS, bounded by the target's connect timeout and `signal`. */
export async function openTls(target: UpstreamTarget, signal?: AbortSignal): Promise<TLSSocket> {
  const opened = await openUpstreamTls(target, signal, false);
  return opened.stream as TLSSocket;
}

/** A TLS connection to the upstream: Node's TLSSocket, or the native one (OpenSSL in C). */
interface OpenedTls {
  readonly stream: TLSSocket | NativeUpstream;
  /** The server certificate (DER), for SCRAM channel binding; also on a resumed session. */
  certificate(): Buffer | undefined;
  readonly native: NativeUpstream | undefined;
}

/**
 * TCP and the SSLRequest in Node.js, then TLS: in C when `native` (the socket goes to C before
 * any TLS byte), else Node's TLS.
 */
async function openUpstreamTls(target: UpstreamTarget, signal: AbortSignal | undefined, native: boolean): Promise<OpenedTls> {
  const raw = netConnect({ host: target.host, port: target.port, noDelay: true });
  raw.on('error', ignore); // reported through the awaits below
  if (target.keepAliveMs > 0) raw.setKeepAlive(true, target.keepAliveMs);
  let current: Duplex = raw; // what the timeout or the client's going away destroys
  const cleanup = bound(() => current, target, signal);
  try {
    await once(raw, 'connect', target);
    raw.write(SSL_REQUEST);
    const answer = await readSslAnswer(raw, target);
    if (answer !== SSL_ACCEPT[0]) {
      throw new UpstreamError('08001', `upstream ${where(target)} refused TLS (it answered the SSLRequest with "${String.fromCharCode(answer)}"); Lakebase requires TLS`);
    }
    // The native side may refuse before it takes the socket (no TLS context for this target's
    // trust settings, no descriptor): the session then goes on Node's TLS.
    const upstream = native ? nativeOrNothing(raw, target) : undefined;
    if (upstream) {
      current = upstream;
      upstream.on('error', ignore);
      await upstream.handshake.catch((error: unknown) => {
        upstream.destroy();
        if (error instanceof UpstreamError) throw error;
        const message = (error as Error).message;
        if (error instanceof NativeHandshakeError) {
          const hint = target.sslMode === 'require' || error.verifyCode === 0 ? '' : error.verifyCode === 62 || error.verifyCode === 64 ? NAME_HINT : CA_HINT;
          throw new UpstreamError('08001', `TLS handshake with upstream ${where(target)} failed: ${message}${hint}`, undefined, { cause: error });
        }
        throw new UpstreamError('08006', `upstream ${where(target)} closed the connection during the TLS handshake`, undefined, { cause: error });
      });
      return { stream: upstream, certificate: () => upstream.certificate(), native: upstream };
    }
    const sessionKey = `${where(target)}/${target.sslMode}`;
    const offered = tlsSessions.get(sessionKey);
    const tls = tlsConnect({
      socket: raw,
      secureContext: secureContextFor(target),
      ...(isIP(target.host) === 0 ? { servername: target.host } : {}),
      rejectUnauthorized: target.sslMode !== 'require',
      ...(target.sslMode === 'verify-ca' ? { checkServerIdentity: () => undefined } : {}),
      session: offered?.session,
    });
    // Before any event: a resumed session's new ticket may come in the read that ends the handshake.
    if (offered?.certificate) resumedCertificates.set(tls, offered.certificate);
    tls.on('error', ignore);
    tls.on('session', (session: Buffer) => tlsSessions.set(sessionKey, { session, certificate: serverCertificate(tls) }));
    await once(tls, 'secureConnect', target).catch((error: unknown) => {
      tls.destroy();
      if (error instanceof UpstreamError && error.cause instanceof Error && 'code' in error.cause) {
        const hint = target.sslMode === 'require' ? '' : verificationHint(String(error.cause.code));
        throw new UpstreamError('08001', `TLS handshake with upstream ${where(target)} failed: ${error.cause.message}${hint}`, undefined, { cause: error.cause });
      }
      throw error;
    });
    return { stream: tls, certificate: () => serverCertificate(tls), native: undefined };
  } catch (error) {
    raw.destroy();
    throw error;
  } finally {
    cleanup();
  }
}

function nativeOrNothing(raw: Socket, target: UpstreamTarget): NativeUpstream | undefined {
  try {
    return NativeUpstream.connect(raw, target);
  } catch {
    return undefined;
  }
}

const NAME_HINT = ' (the certificate does not name this host: connect by a name it lists, or set SSLMode=verify-ca to check the CA only)';
const CA_HINT = ' (set SSLRootCert to the CA file that signed it, or SSLMode=require to skip verification)';

/**
 * Advice for a certificate that did not verify; none for other failures (a reset, a closed
 * connection, a peer that does not speak TLS), where changing the trust settings would not help.
 */
function verificationHint(code: string): string {
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID') return NAME_HINT;
  if (!code.startsWith('ERR_') && /CERT|UNABLE_TO_|SELF_SIGNED|INVALID_CA/.test(code)) return CA_HINT;
  return '';
}

/** Destroys the socket when the timeout passes or the signal aborts; returns the cancel function. */
function bound(socket: () => Duplex, target: UpstreamTarget, signal: AbortSignal | undefined): () => void {
  const timer = setTimeout(() => {
    socket().destroy(new UpstreamError('08001', `timed out after ${target.connectTimeoutMs} ms connecting to upstream ${where(target)}`));
  }, target.connectTimeoutMs);
  const onAbort = (): void => {
    socket().destroy(new UpstreamError('08006', `client went away while connecting to upstream ${where(target)}`));
  };
  signal?.addEventListener('abort', onAbort, { once: true });
  if (signal?.aborted) onAbort();
  return () => {
    clearTimeout(timer);
    signal?.removeEventListener('abort', onAbort);
  };
}

function once(socket: Socket, event: 'connect' | 'secureConnect', target: UpstreamTarget): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const onError = (error: Error): void => {
      socket.off(event, onEvent);
      socket.off('close', onClose);
      reject(error instanceof UpstreamError ? error : new UpstreamError('08001', `could not connect to upstream ${where(target)}: ${reason(error)}`, undefined, { cause: error }));
    };
    const onClose = (): void => onError(new UpstreamError('08006', `upstream ${where(target)} closed the connection during ${event === 'connect' ? 'connect' : 'the TLS handshake'}`));
    const onEvent = (): void => {
      socket.off('error', onError);
      socket.off('close', onClose);
      resolve();
    };
    socket.once(event, onEvent);
    socket.once('error', onError);
    socket.once('close', onClose);
  });
}

function readSslAnswer(socket: Socket, target: UpstreamTarget): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    const done = (): void => {
      socket.off('data', onData);
      socket.off('error', onError);
      socket.off('close', onClose);
    };
    const onData = (chunk: Buffer): void => {
      done();
      socket.pause();
      // Bytes after the one-byte answer and before TLS would be read as if encrypted (CVE-2021-23222).
      if (chunk.length !== 1) reject(new UpstreamError('08P01', `upstream ${where(target)} sent unencrypted data after its SSL answer`));
      else resolve(chunk[0] as number);
    };
    const onError = (error: Error): void => {
      done();
      reject(error instanceof UpstreamError ? error : new UpstreamError('08001', `could not connect to upstream ${where(target)}: ${reason(error)}`, undefined, { cause: error }));
    };
    const onClose = (): void => onError(new UpstreamError('08006', `upstream ${where(target)} closed the connection after the SSLRequest`));
    socket.on('data', onData);
    socket.once('error', onError);
    socket.once('close', onClose);
  });
}

/**
 * Logs in as `user` with `password`, forwarding the client's startup `parameters`.
 * Rejects with UpstreamError; the socket is destroyed on failure.
 */
export async function connectUpstream(
  target: UpstreamTarget,
  user: string,
  password: string,
  parameters: ReadonlyMap<string, string>,
  signal?: AbortSignal,
  options: { readonly native?: boolean } = {},
): Promise<UpstreamSession> {
  const opened = await openUpstreamTls(target, signal, options.native === true);
  const socket = opened.stream;
  const cleanup = bound(() => socket, target, signal);
  const frames = new SocketFrames(socket, new FrameReader(MAX_HANDSHAKE_MESSAGE, true));
  try {
    socket.write(encodeStartupMessage(new Map([...parameters, ['user', user]])));
    const greeting: Buffer[] = [];
    let processId = 0;
    let secretKey = Buffer.alloc(4);
    let scram: ScramClient | undefined;
    for (;;) {
      const { type, body } = await frames.next();
      switch (type) {
        case BackendCode.Authentication:
          scram = authenticate(socket, opened.certificate, body, user, password, scram, target);
          break;
        case BackendCode.BackendKeyData:
          if (body.length < 8) throw new UpstreamError('08P01', `upstream ${where(target)} sent a malformed BackendKeyData`);
          processId = body.readInt32BE(0);
          // Its own small copy: a slice of the shared buffer pool would keep 8 KiB alive per session.
          secretKey = Buffer.alloc(body.length - 4);
          body.copy(secretKey, 0, 4);
          break;
        case BackendCode.ParameterStatus:
        case BackendCode.NoticeResponse:
        case BackendCode.ReadyForQuery:
          greeting.push(message(type, body));
          if (type === BackendCode.ReadyForQuery) {
            const leftover = frames.detach();
            return {
              socket,
              greeting,
              processId,
              secretKey,
              // A copy, or nothing: a view would keep the whole read buffer alive for the session.
              leftover: leftover.length === 0 ? NOTHING : Buffer.from(leftover),
              native: opened.native,
              tls: opened.native ? opened.native.tlsInfo : { version: (socket as TLSSocket).getProtocol() ?? 'TLS', cipher: (socket as TLSSocket).getCipher().standardName },
            };
          }
          break;
        case BackendCode.NegotiateProtocolVersion:
          break; // we ask for 3.0 without _pq_ options; nothing to adjust
        case BackendCode.ErrorResponse: {
          const fields = parseFields(body);
          const code = fields.find(([letter]) => letter === 'C')?.[1] ?? '08006';
          const text = fields.find(([letter]) => letter === 'M')?.[1] ?? 'login failed';
          throw new UpstreamError(code, `upstream ${where(target)} refused the login: ${text}`, fields);
        }
        default:
          throw new UpstreamError('08P01', `upstream ${where(target)} sent unexpected message type ${type} during login`);
      }
    }
  } catch (error) {
    frames.detach();
    socket.destroy();
    if (error instanceof UpstreamError) throw error;
    if (error instanceof PeerClosedError) throw new UpstreamError('08006', `upstream ${where(target)} closed the connection during login`);
    throw new UpstreamError('08006', `login to upstream ${where(target)} failed: ${(error as Error).message}`, undefined, { cause: error });
  } finally {
    cleanup();
    // A server sends its session tickets right after the handshake, before it answers the
    // startup: past ReadyForQuery the listener (and the certificate) would only be held.
    socket.removeAllListeners('session');
    if (!opened.native) resumedCertificates.delete(socket as TLSSocket);
  }
}

/** Answers one Authentication request; returns the SCRAM state for the next round. */
function authenticate(
  socket: Duplex,
  serverCertificate: () => Buffer | undefined,
  body: Buffer,
  user: string,
  password: string,
  scram: ScramClient | undefined,
  target: UpstreamTarget,
): ScramClient | undefined {
  const request = body.readInt32BE(0);
  switch (request) {
    case AuthRequest.Ok:
      return undefined;
    case AuthRequest.CleartextPassword:
      socket.write(serialize.password(password));
      return undefined;
    case AuthRequest.MD5Password:
      socket.write(serialize.password(md5PasswordResponse(user, password, body.subarray(4, 8))));
      return undefined;
    case AuthRequest.SASL: {
      const mechanisms = body.toString('utf8', 4).split('\0').filter(Boolean);
      const plus = mechanisms.includes(SCRAM_PLUS);
      if (!plus && !mechanisms.includes(SCRAM)) {
        throw new UpstreamError('28000', `upstream ${where(target)} offers no supported SASL mechanism (${mechanisms.join(', ')})`);
      }
      const certificate = serverCertificate();
      const binding = certificate ? tlsServerEndPoint(certificate) : undefined;
      const client = new ScramClient(password, plus && binding ? SCRAM_PLUS : SCRAM, binding, plus);
      socket.write(serialize.sendSASLInitialResponseMessage(client.mechanism, client.clientFirstMessage()));
      return client;
    }
    case AuthRequest.SASLContinue:
      if (!scram) throw new UpstreamError('08P01', `upstream ${where(target)} sent SASLContinue out of order`);
      socket.write(serialize.sendSCRAMClientFinalMessage(scram.clientFinalMessage(body.toString('utf8', 4))));
      return scram;
    case AuthRequest.SASLFinal:
      if (!scram) throw new UpstreamError('08P01', `upstream ${where(target)} sent SASLFinal out of order`);
      scram.verifyServerFinal(body.toString('utf8', 4));
      return undefined;
    default:
      throw new UpstreamError('28000', `upstream ${where(target)} asked for authentication method ${request}, which the proxy does not support`);
  }
}

/**
 * Sends a CancelRequest for the given upstream backend over TLS, and waits for the server to close
 * that connection: Postgres signals the backend first, so what is sent to the backend after the
 * close cannot be what the request cancels. True once the server closed it; false when it did not
 * within ConnectTimeout (the request may still land). Rejects when nothing could be sent.
 */
export async function sendCancel(target: UpstreamTarget, processId: number, secretKey: Buffer): Promise<boolean> {
  const socket = await openTls(target);
  const body = Buffer.allocUnsafe(16);
  body.writeInt32BE(16, 0);
  body.writeInt32BE(CANCEL_REQUEST_CODE, 4);
  body.writeInt32BE(processId, 8);
  secretKey.copy(body, 12, 0, 4);
  return await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => {
      resolve(false);
      socket.destroy();
    }, target.connectTimeoutMs).unref();
    socket.once('close', () => {
      clearTimeout(timer);
      resolve(true);
    });
    socket.end(body);
  });
}
