/**
 * The packets a client may send before its startup completes, told apart by the magic number in
 * their first four bytes. Pure decoding; the state machine lives in src/proxy/client-handshake.ts.
 * @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-STARTUPMESSAGE
 */

export const SSL_REQUEST_CODE = 80877103;
export const GSSENC_REQUEST_CODE = 80877104;
export const CANCEL_REQUEST_CODE = 80877102;
/** Postgres limits the startup packet to this many bytes (MAX_STARTUP_PACKET_LENGTH). */
export const MAX_STARTUP_PACKET_LENGTH = 10000;

export type StartupPacket =
  | { readonly kind: 'ssl' }
  | { readonly kind: 'gssenc' }
  | { readonly kind: 'cancel'; readonly processId: number; readonly secretKey: Buffer }
  | {
      readonly kind: 'startup';
      readonly major: number;
      readonly minor: number;
      readonly parameters: ReadonlyMap<string, string>;
    };

/** Raised for a packet that is well framed but not a valid startup packet: 08P01 to the client. */
export class StartupPacketError extends Error {
  override readonly name = 'StartupPacketError';
  constructor(
    message: string,
    readonly sqlstate: string = '08P01',
  ) {
    super(message);
  }
}

/**
 * A protocol 3.0 StartupMessage with exactly `parameters`, in order. (pg-protocol's
 * `serialize.startup` appends `client_encoding=UTF8`, which would override the client's own.)
 * @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-STARTUPMESSAGE
 */
export function encodeStartupMessage(parameters: ReadonlyMap<string, string>): Buffer {
  const pairs: Buffer[] = [];
  for (const [name, value] of parameters) pairs.push(Buffer.from(`${name}\0${value}\0`, 'utf8'));
  const body = Buffer.concat([Buffer.from([0, 3, 0, 0]), ...pairs, Buffer.from([0])]);
  const length = Buffer.allocUnsafe(4);
  length.writeInt32BE(4 + body.length, 0);
  return Buffer.concat([length, body]);
}

/** Decodes the body (after the length field) of one startup-phase packet. */
export function decodeStartupPacket(body: Buffer): StartupPacket {
  if (body.length < 4) throw new StartupPacketError('startup packet too short');
  const code = body.readInt32BE(0);
  switch (code) {
    case SSL_REQUEST_CODE:
    case GSSENC_REQUEST_CODE:
      if (body.length !== 4) throw new StartupPacketError('invalid length of SSL or GSS encryption request');
      return code === SSL_REQUEST_CODE ? { kind: 'ssl' } : { kind: 'gssenc' };
    case CANCEL_REQUEST_CODE:
      // Protocol 3.0 keys are 4 bytes; 3.2 allows up to 256.
      if (body.length < 12 || body.length > 8 + 256) throw new StartupPacketError('invalid length of cancel request');
      return { kind: 'cancel', processId: body.readInt32BE(4), secretKey: Buffer.from(body.subarray(8)) };
    default:
      return decodeStartupMessage(code >>> 16, code & 0xffff, body);
  }
}

function decodeStartupMessage(major: number, minor: number, body: Buffer): StartupPacket {
  if (major !== 3) {
    throw new StartupPacketError(
      `unsupported frontend protocol ${major}.${minor}: server supports 3.0 to 3.0`,
      '0A000',
    );
  }
  const parameters = new Map<string, string>();
  let i = 4;
  for (;;) {
    if (i >= body.length) throw new StartupPacketError('invalid startup packet layout: expected terminator as last byte');
    if (body[i] === 0) {
      if (i !== body.length - 1) throw new StartupPacketError('invalid startup packet layout: expected terminator as last byte');
      break;
    }
    const nameEnd = body.indexOf(0, i);
    const valueEnd = nameEnd < 0 ? -1 : body.indexOf(0, nameEnd + 1);
    if (nameEnd < 0 || valueEnd < 0) {
      throw new StartupPacketError('invalid startup packet layout: expected terminator as last byte');
    }
    parameters.set(body.toString('utf8', i, nameEnd), body.toString('utf8', nameEnd + 1, valueEnd));
    i = valueEnd + 1;
  }
  if (!parameters.has('user') || parameters.get('user') === '') {
    throw new StartupPacketError('no PostgreSQL user name specified in startup packet', '28000');
  }
  return { kind: 'startup', major, minor, parameters };
}
