/**
 * The frontend messages a transaction pool reads and rewrites: Parse, Bind, Describe and Close
 * name prepared statements; the rest pass unchanged. Pure functions over message bodies.
 * @see https://www.postgresql.org/docs/current/protocol-message-formats.html
 */

export const enum FrontendCode {
  Bind = 0x42, // 'B'
  Close = 0x43, // 'C'
  Describe = 0x44, // 'D'
  Execute = 0x45, // 'E'
  FunctionCall = 0x46, // 'F'
  Flush = 0x48, // 'H'
  Parse = 0x50, // 'P'
  Query = 0x51, // 'Q'
  Sync = 0x53, // 'S'
  Terminate = 0x58, // 'X'
  CopyData = 0x64, // 'd'
  CopyDone = 0x63, // 'c'
  CopyFail = 0x66, // 'f'
}

/** A body that does not parse as its message type says: the client gets 08P01. */
export class MalformedMessage extends Error {
  override readonly name = 'MalformedMessage';
  readonly sqlstate = '08P01';
}

/**
 * The NUL-terminated string at `at`, and where the next field starts. Names and query texts are in
 * the client's encoding, which need not be UTF-8 (LATIN1, SJIS...): they are read as latin1, one
 * character per byte, and written back the same way (`clientString`), so that they reach the
 * server byte for byte.
 */
function cstringAt(body: Buffer, at: number, what: string): [string, number] {
  const end = body.indexOf(0, at);
  if (end < 0) throw new MalformedMessage(`${what}: a string without its terminating zero byte`);
  return [body.toString('latin1', at, end), end + 1];
}

/** A string read by cstringAt, as the bytes it was read from, NUL-terminated. */
const clientString = (s: string): Buffer => Buffer.from(`${s}\0`, 'latin1');

export interface ParseMessage {
  readonly name: string;
  readonly query: string;
  /** The parameter type OIDs as sent (the bytes after the query), part of the statement's identity. */
  readonly types: Buffer;
}

export function readParse(body: Buffer): ParseMessage {
  const [name, afterName] = cstringAt(body, 0, 'Parse');
  const [query, afterQuery] = cstringAt(body, afterName, 'Parse');
  if (body.length < afterQuery + 2) throw new MalformedMessage('Parse: no parameter count');
  const count = body.readInt16BE(afterQuery);
  if (count < 0 || body.length !== afterQuery + 2 + 4 * count) throw new MalformedMessage('Parse: the parameter types do not match their count');
  return { name, query, types: body.subarray(afterQuery) };
}

/** A Bind's portal and statement names, and where the rest of its body starts. */
export function readBind(body: Buffer): { portal: string; statement: string; rest: Buffer } {
  const [portal, afterPortal] = cstringAt(body, 0, 'Bind');
  const [statement, afterStatement] = cstringAt(body, afterPortal, 'Bind');
  return { portal, statement, rest: body.subarray(afterStatement) };
}

/** Describe and Close: 'S' (a statement) or 'P' (a portal), and the name. */
export function readTarget(body: Buffer, what: string): { kind: 'S' | 'P'; name: string } {
  const kind = String.fromCharCode(body[0] ?? 0);
  if (kind !== 'S' && kind !== 'P') throw new MalformedMessage(`${what}: neither a statement ('S') nor a portal ('P')`);
  const [name, end] = cstringAt(body, 1, what);
  if (end !== body.length) throw new MalformedMessage(`${what}: bytes after the name`);
  return { kind, name };
}

function frame(code: number, parts: readonly Buffer[]): Buffer {
  let length = 4;
  for (const part of parts) length += part.length;
  const out = Buffer.allocUnsafe(1 + length);
  out[0] = code;
  out.writeInt32BE(length, 1);
  let at = 5;
  for (const part of parts) at += part.copy(out, at);
  return out;
}

const zeroTerminated = (s: string): Buffer => Buffer.from(`${s}\0`, 'utf8');

/** A Parse of `name` and `query` as read from a client's message (see cstringAt), or ASCII. */
export function parseMessage(name: string, query: string, types: Buffer): Buffer {
  return frame(FrontendCode.Parse, [clientString(name), clientString(query), types]);
}

/** A Bind to `portal` as read from a client's message (see cstringAt), or ASCII. */
export function bindMessage(portal: string, statement: string, rest: Buffer): Buffer {
  return frame(FrontendCode.Bind, [clientString(portal), clientString(statement), rest]);
}

export function describeMessage(kind: 'S' | 'P', name: string): Buffer {
  return frame(FrontendCode.Describe, [Buffer.from(kind), zeroTerminated(name)]);
}

export function closeMessage(kind: 'S' | 'P', name: string): Buffer {
  return frame(FrontendCode.Close, [Buffer.from(kind), zeroTerminated(name)]);
}

export function queryMessage(text: string): Buffer {
  return frame(FrontendCode.Query, [zeroTerminated(text)]);
}

export const SYNC = frame(FrontendCode.Sync, []);

export const FLUSH = frame(FrontendCode.Flush, []);
