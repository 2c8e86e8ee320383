/**
 * Builders for the backend messages the proxy itself sends to a client.
 * @see https://www.postgresql.org/docs/current/protocol-message-formats.html
 */

export const enum BackendCode {
  Authentication = 0x52, // 'R'
  BackendKeyData = 0x4b, // 'K'
  ErrorResponse = 0x45, // 'E'
  NoticeResponse = 0x4e, // 'N'
  NegotiateProtocolVersion = 0x76, // 'v'
  ParameterStatus = 0x53, // 'S'
  ReadyForQuery = 0x5a, // 'Z'
}

export const enum AuthRequest {
  Ok = 0,
  CleartextPassword = 3,
  MD5Password = 5,
  SASL = 10,
  SASLContinue = 11,
  SASLFinal = 12,
}

/** The one-byte answers to SSLRequest and GSSENCRequest. */
export const SSL_ACCEPT = Buffer.from('S');
export const SSL_REFUSE = Buffer.from('N');

/** A typed message: the code, the length, the body (copied). */
export function message(code: number, body: Buffer): Buffer {
  const out = Buffer.allocUnsafe(5 + body.length);
  out[0] = code;
  out.writeInt32BE(4 + body.length, 1);
  body.copy(out, 5);
  return out;
}

export function int32(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeInt32BE(n, 0);
  return b;
}

function cstring(s: string): Buffer {
  return Buffer.from(s + '\0', 'utf8');
}

/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-AUTHENTICATIONOK */
export const AUTHENTICATION_OK = message(BackendCode.Authentication, int32(AuthRequest.Ok));
/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-AUTHENTICATIONCLEARTEXTPASSWORD */
export const AUTHENTICATION_CLEARTEXT = message(BackendCode.Authentication, int32(AuthRequest.CleartextPassword));
/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-READYFORQUERY */
export const READY_FOR_QUERY_IDLE = message(BackendCode.ReadyForQuery, Buffer.from('I'));

/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-PARAMETERSTATUS */
export function parameterStatus(name: string, value: string): Buffer {
  return message(BackendCode.ParameterStatus, Buffer.concat([cstring(name), cstring(value)]));
}

/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-AUTHENTICATIONSASL */
export function authenticationSASL(mechanisms: readonly string[]): Buffer {
  return message(BackendCode.Authentication, Buffer.concat([int32(AuthRequest.SASL), ...mechanisms.map(cstring), Buffer.from([0])]));
}

/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-AUTHENTICATIONSASLCONTINUE */
export function authenticationSASLContinue(data: string): Buffer {
  return message(BackendCode.Authentication, Buffer.concat([int32(AuthRequest.SASLContinue), Buffer.from(data, 'utf8')]));
}

/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-AUTHENTICATIONSASLFINAL */
export function authenticationSASLFinal(data: string): Buffer {
  return message(BackendCode.Authentication, Buffer.concat([int32(AuthRequest.SASLFinal), Buffer.from(data, 'utf8')]));
}

/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-BACKENDKEYDATA */
export function backendKeyData(processId: number, secretKey: number): Buffer {
  const body = Buffer.allocUnsafe(8);
  body.writeInt32BE(processId, 0);
  body.writeInt32BE(secretKey, 4);
  return message(BackendCode.BackendKeyData, body);
}

/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-NEGOTIATEPROTOCOLVERSION */
export function negotiateProtocolVersion(newestMinor: number, unrecognized: readonly string[]): Buffer {
  return message(
    BackendCode.NegotiateProtocolVersion,
    Buffer.concat([int32(newestMinor), int32(unrecognized.length), ...unrecognized.map(cstring)]),
  );
}

/** Error and notice fields, by their one-letter codes. */
export interface NoticeFields {
  readonly severity: 'ERROR' | 'FATAL' | 'NOTICE' | 'WARNING' | 'INFO' | 'LOG';
  readonly code: string;
  readonly message: string;
  readonly detail?: string;
  readonly hint?: string;
}

export function noticeFieldList(fields: NoticeFields): Array<[string, string]> {
  const list: Array<[string, string]> = [
    ['S', fields.severity],
    ['V', fields.severity],
    ['C', fields.code],
    ['M', fields.message],
  ];
  if (fields.detail !== undefined) list.push(['D', fields.detail]);
  if (fields.hint !== undefined) list.push(['H', fields.hint]);
  return list;
}

/** An ErrorResponse or NoticeResponse from raw (code letter, value) fields, in order. */
export function fieldsMessage(code: BackendCode.ErrorResponse | BackendCode.NoticeResponse, fields: ReadonlyArray<readonly [string, string]>): Buffer {
  const parts: Buffer[] = [];
  for (const [letter, value] of fields) parts.push(Buffer.from(letter, 'latin1'), cstring(value));
  parts.push(Buffer.from([0]));
  return message(code, Buffer.concat(parts));
}

/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-ERRORRESPONSE */
export function errorResponse(fields: Omit<NoticeFields, 'severity'> & { severity?: 'ERROR' | 'FATAL' }): Buffer {
  return fieldsMessage(BackendCode.ErrorResponse, noticeFieldList({ severity: 'FATAL', ...fields }));
}

/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-NOTICERESPONSE */
export function noticeResponse(messageText: string, detail?: string): Buffer {
  return fieldsMessage(
    BackendCode.NoticeResponse,
    noticeFieldList({ severity: 'NOTICE', code: '00000', message: messageText, ...(detail !== undefined ? { detail } : {}) }),
  );
}

/** Reads the (code letter, value) fields of an ErrorResponse or NoticeResponse body. */
export function parseFields(body: Buffer): Array<[string, string]> {
  const fields: Array<[string, string]> = [];
  let i = 0;
  while (i < body.length && body[i] !== 0) {
    const letter = String.fromCharCode(body[i] as number);
    const end = body.indexOf(0, i + 1);
    if (end < 0) break;
    fields.push([letter, body.toString('utf8', i + 1, end)]);
    i = end + 1;
  }
  return fields;
}
