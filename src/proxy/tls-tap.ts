/**
 * The TCP side of an upstream TLS connection, seen record by record, so that the native relay
 * (native/relay.c) can take the connection over once Node.js has done the handshake and the login.
 *
 * Node's TLS runs on top of this Duplex instead of on the socket itself. It passes the bytes on
 * unchanged, but only whole TLS records toward Node's TLS (a partial record stays here, so that
 * at the hand-over nothing sits half-read inside OpenSSL), and it remembers the last record each
 * way with a count: the native side finds the record sequence numbers by opening the last record
 * with the traffic secrets that Node's 'keylog' event gives. Nothing is parsed beyond the 5-byte
 * record headers, and nothing is held once the login is over.
 */
import { Duplex } from 'node:stream';
import type { Socket } from 'node:net';

/** TLS record content type of every encrypted TLS 1.3 record. */
const APPLICATION_DATA = 23;
const HEADER = 5;
const EMPTY = Buffer.alloc(0);

/** What the native relay needs of the TCP side when it takes over. */
export interface TapHandover {
  /** The upstream socket's file descriptor (the caller closes the socket once the relay has its own copy). */
  readonly fd: number;
  /** Whole and partial records received and not given to Node's TLS: the relay opens them first. */
  readonly unread: Buffer;
  /** Encrypted records the client (we) sent, and the last of them. */
  readonly sentRecords: number;
  readonly lastSent: Buffer;
  /** Encrypted records Node's TLS read from the server, and the last of them. */
  readonly readRecords: number;
  readonly lastRead: Buffer;
}

/** The value of one hex digit (ASCII). */
function nibble(c: number): number {
  return c <= 0x39 ? c - 0x30 : (c | 0x20) - 0x57;
}

/** Splits whole records off the front of `pending`; returns them and what is left. */
function wholeRecords(pending: Buffer): { records: Buffer[]; rest: Buffer } {
  const records: Buffer[] = [];
  let at = 0;
  while (pending.length - at >= HEADER) {
    const end = at + HEADER + pending.readUInt16BE(at + 3);
    if (end > pending.length) break;
    records.push(pending.subarray(at, end));
    at = end;
  }
  return { records, rest: at === pending.length ? EMPTY : pending.subarray(at) };
}

export class TlsTap extends Duplex {
  readonly #raw: Socket;
  #inbound: Buffer = EMPTY;
  #outbound: Buffer = EMPTY;
  #sentRecords = 0;
  #lastSent: Buffer = EMPTY;
  /** Records passed to Node's TLS, in order; the unread tail is found in the readable buffer at the hand-over. */
  #readRecords = 0;
  #readLog: Buffer[] = [];
  #handedOver = false;
  /** Until the hand-over or forget(): records are framed and counted. After forget(), bytes just pass. */
  #counting = true;
  /** TLS 1.3 traffic secrets from the 'keylog' event, by label. */
  readonly secrets = new Map<string, Buffer>();

  constructor(raw: Socket) {
    super({ allowHalfOpen: false });
    this.#raw = raw;
    raw.on('data', (chunk: Buffer) => {
      if (this.#handedOver) return;
      if (!this.#counting) {
        if (!this.push(chunk)) raw.pause();
        return;
      }
      const { records, rest } = wholeRecords(this.#inbound.length > 0 ? Buffer.concat([this.#inbound, chunk]) : chunk);
      // A copy of a partial record, so that it does not pin the read buffer.
      this.#inbound = rest.length > 0 ? Buffer.from(rest) : EMPTY;
      if (records.length === 0) return;
      for (const record of records) {
        if (record[0] !== APPLICATION_DATA) continue;
        this.#readRecords++;
        this.#readLog.push(record);
      }
      // The last record is all the hand-over needs, unless some are still unread then.
      if (this.#readLog.length > 64) this.#readLog = this.#readLog.slice(-32);
      if (!this.push(records.length === 1 ? records[0] : Buffer.concat(records))) raw.pause();
    });
    raw.on('end', () => {
      if (this.#inbound.length > 0) this.push(this.#inbound);
      this.push(null);
    });
    raw.on('error', (error) => this.destroy(error));
    raw.on('close', () => {
      if (!this.#handedOver) this.destroy();
    });
  }

  /**
   * Takes a traffic secret from a line of Node's 'keylog' event (NSS key log format: label,
   * client random, secret in hex). The secret is decoded byte by byte, never made a string, and
   * the line is wiped: nothing of it stays for the garbage collector to find later.
   */
  keylog(line: Buffer): void {
    const first = line.indexOf(0x20);
    const second = first < 0 ? -1 : line.indexOf(0x20, first + 1);
    const label = first < 0 ? '' : line.toString('latin1', 0, first);
    if (second > 0 && label.endsWith('_TRAFFIC_SECRET_0')) {
      let end = line.length;
      while (end > second + 1 && (line[end - 1] as number) <= 0x20) end--;
      const secret = Buffer.alloc((end - second - 1) >> 1);
      for (let i = 0; i < secret.length; i++) secret[i] = (nibble(line[second + 1 + 2 * i] as number) << 4) | nibble(line[second + 2 + 2 * i] as number);
      this.secrets.set(label, secret);
    }
    line.fill(0);
  }

  override _read(): void {
    if (!this.#handedOver) this.#raw.resume();
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    if (this.#handedOver) {
      callback(); // Node's TLS saying goodbye after the hand-over: the relay speaks for it now
      return;
    }
    if (!this.#counting) {
      this.#raw.write(chunk, callback);
      return;
    }
    const { records, rest } = wholeRecords(this.#outbound.length > 0 ? Buffer.concat([this.#outbound, chunk]) : chunk);
    this.#outbound = rest.length > 0 ? Buffer.from(rest) : EMPTY;
    for (const record of records) {
      if (record[0] !== APPLICATION_DATA) continue;
      this.#sentRecords++;
      this.#lastSent = Buffer.from(record);
    }
    this.#raw.write(chunk, callback);
  }

  override _final(callback: (error?: Error | null) => void): void {
    if (!this.#handedOver) this.#raw.end();
    callback();
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    if (!this.#handedOver) this.#raw.destroy();
    callback(error);
  }

  /** Bytes still queued toward the server in Node.js; the hand-over waits for none. */
  get queuedToServer(): number {
    return this.writableLength + this.#raw.writableLength;
  }

  /**
   * Stops passing bytes either way and returns what the native relay needs, or undefined when
   * there is nothing to hand over (the socket is gone, or no record went either way yet).
   */
  handOver(): TapHandover | undefined {
    const fd = (this.#raw as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (this.#handedOver || fd === undefined || fd < 0 || this.#sentRecords === 0 || this.#readRecords === 0) return undefined;
    this.#raw.pause();
    // Records pushed to Node's TLS but not yet taken by it (it pauses its reads when its reader does).
    const unreadChunks: Buffer[] = [];
    for (let chunk = this.read() as Buffer | null; chunk !== null; chunk = this.read() as Buffer | null) unreadChunks.push(chunk);
    const unreadRecords = unreadChunks.reduce((n, chunk) => n + wholeRecords(chunk).records.filter((r) => r[0] === APPLICATION_DATA).length, 0);
    const readRecords = this.#readRecords - unreadRecords;
    const lastRead = this.#readLog[this.#readLog.length - 1 - unreadRecords];
    if (readRecords <= 0 || !lastRead) {
      for (const chunk of unreadChunks.reverse()) this.unshift(chunk);
      return undefined;
    }
    this.#handedOver = true;
    const handover: TapHandover = {
      fd,
      unread: Buffer.concat([...unreadChunks, this.#inbound]),
      sentRecords: this.#sentRecords,
      lastSent: this.#lastSent,
      readRecords,
      lastRead: Buffer.from(lastRead),
    };
    this.#readLog = [];
    this.#inbound = EMPTY;
    return handover;
  }

  /** Undoes handOver() when the native side refused the session: it goes on through Node's TLS. */
  takeBack(handover: TapHandover): void {
    this.#handedOver = false;
    if (handover.unread.length > 0) this.unshift(handover.unread);
    this.forget();
    this.#raw.resume();
  }

  /** After a hand-over: closes Node's copy of the TCP socket (the native relay has its own). */
  closeTcp(): void {
    this.#raw.destroy();
  }

  /**
   * Forgets what only a hand-over needs: the session goes on in Node.js (the JavaScript relay),
   * and from now on bytes pass without being framed or counted.
   */
  forget(): void {
    this.#counting = false;
    if (this.#inbound.length > 0) this.push(this.#inbound);
    this.#inbound = EMPTY;
    this.#outbound = EMPTY;
    this.#readLog = [];
    this.#lastSent = EMPTY;
    for (const secret of this.secrets.values()) secret.fill(0);
    this.secrets.clear();
  }
}
