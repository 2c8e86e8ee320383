/**
 * The backend messages of a query's answer, which only the console sends (the relay passes the
 * upstream's through): row descriptions, rows, command tags. Values go in text format.
 * @see https://www.postgresql.org/docs/current/protocol-message-formats.html
 */
import { errorResponse, int32, message, noticeResponse, READY_FOR_QUERY_IDLE } from '../wire/backend-messages.js';

export const enum ConsoleCode {
  RowDescription = 0x54, // 'T'
  DataRow = 0x44, // 'D'
  CommandComplete = 0x43, // 'C'
  EmptyQueryResponse = 0x49, // 'I'
}

/** The column types the console uses, with their pg_type OIDs and sizes. */
const TYPES = {
  text: { oid: 25, size: -1 },
  int4: { oid: 23, size: 4 },
  int8: { oid: 20, size: 8 },
  numeric: { oid: 1700, size: -1 },
} as const;

export type ColumnType = keyof typeof TYPES;

export interface Column {
  readonly name: string;
  readonly type: ColumnType;
}

/** A cell: text, a number, or NULL. */
export type Value = string | number | bigint | null;

/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-ROWDESCRIPTION */
export function rowDescription(columns: readonly Column[]): Buffer {
  const parts: Buffer[] = [int16(columns.length)];
  for (const column of columns) {
    const type = TYPES[column.type];
    const fixed = Buffer.alloc(18);
    fixed.writeInt32BE(0, 0); // table OID
    fixed.writeInt16BE(0, 4); // column number
    fixed.writeInt32BE(type.oid, 6);
    fixed.writeInt16BE(type.size, 10);
    fixed.writeInt32BE(-1, 12); // type modifier
    fixed.writeInt16BE(0, 16); // text format
    parts.push(Buffer.from(`${column.name}\0`, 'utf8'), fixed);
  }
  return message(ConsoleCode.RowDescription, Buffer.concat(parts));
}

/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-DATAROW */
export function dataRow(values: readonly Value[]): Buffer {
  const parts: Buffer[] = [int16(values.length)];
  for (const value of values) {
    if (value === null) {
      parts.push(int32(-1));
      continue;
    }
    const text = Buffer.from(String(value), 'utf8');
    parts.push(int32(text.length), text);
  }
  return message(ConsoleCode.DataRow, Buffer.concat(parts));
}

/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-COMMANDCOMPLETE */
export function commandComplete(tag: string): Buffer {
  return message(ConsoleCode.CommandComplete, Buffer.from(`${tag}\0`, 'utf8'));
}

/** @see https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-EMPTYQUERYRESPONSE */
export const EMPTY_QUERY_RESPONSE = message(ConsoleCode.EmptyQueryResponse, Buffer.alloc(0));

export { errorResponse, noticeResponse, READY_FOR_QUERY_IDLE };

function int16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeInt16BE(n, 0);
  return b;
}
