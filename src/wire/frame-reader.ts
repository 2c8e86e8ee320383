/**
 * Incremental framing of Postgres packets. Pure: bytes in, frames out; no sockets, no timers.
 *
 * Two framings exist: before the startup completes, packets have no type byte (a 4-byte length,
 * then the payload); afterwards each message is a type byte, a 4-byte length, then the body.
 * One reader serves both: `typed` says which framing the next frame uses, and can change between
 * frames without losing a byte.
 *
 * The buffer grows only to hold one incomplete frame; a chunk that arrives when nothing is left
 * over is adopted without a copy, and frames are `subarray` views into it.
 */

/** Raised for a length field that no valid packet has; the caller answers 08P01 and closes. */
export class FramingError extends Error {
  override readonly name = 'FramingError';
}

export interface Frame {
  /** The type byte, or -1 for an untyped (startup-phase) packet. */
  readonly type: number;
  /** The body after the length field (a view: copy it to keep it past the next push). */
  readonly body: Buffer;
}

export class FrameReader {
  #buffer: Buffer = Buffer.alloc(0);
  #start = 0;
  #end = 0;

  /**
   * @param maxLength the largest length field accepted (the length counts itself, not the type byte)
   * @param typed whether frames carry a type byte
   */
  constructor(
    public maxLength: number,
    public typed: boolean,
  ) {}

  /** Bytes received and not yet returned as frames. */
  get buffered(): number {
    return this.#end - this.#start;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    if (this.#start === this.#end) {
      this.#buffer = chunk;
      this.#start = 0;
      this.#end = chunk.length;
      return;
    }
    const needed = this.#end - this.#start + chunk.length;
    if (this.#buffer.length - this.#end < chunk.length) {
      // Compact into a new buffer with room to spare; only unframed bytes are held.
      const next = Buffer.allocUnsafe(Math.max(2 * needed, 4096));
      this.#buffer.copy(next, 0, this.#start, this.#end);
      this.#buffer = next;
      this.#end -= this.#start;
      this.#start = 0;
    }
    chunk.copy(this.#buffer, this.#end);
    this.#end += chunk.length;
  }

  /** The next complete frame, or undefined if more bytes are needed. Throws FramingError. */
  next(): Frame | undefined {
    const header = this.typed ? 5 : 4;
    const available = this.#end - this.#start;
    if (available < header) return undefined;
    const lengthAt = this.#start + (this.typed ? 1 : 0);
    const length = this.#buffer.readInt32BE(lengthAt);
    const minimum = this.typed ? 4 : 8;
    if (length < minimum || length > this.maxLength) {
      throw new FramingError(`invalid ${this.typed ? 'message' : 'startup packet'} length ${length}`);
    }
    const total = length + (this.typed ? 1 : 0);
    if (available < total) return undefined;
    const type = this.typed ? (this.#buffer[this.#start] as number) : -1;
    const body = this.#buffer.subarray(lengthAt + 4, this.#start + total);
    this.#start += total;
    return { type, body };
  }

  /** Everything buffered and not yet framed, handed over at the switch to the relay. */
  takeRemaining(): Buffer {
    const rest = this.#buffer.subarray(this.#start, this.#end);
    this.#buffer = Buffer.alloc(0);
    this.#start = this.#end = 0;
    return rest;
  }
}
