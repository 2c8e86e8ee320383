/**
 * Follows the message boundaries of a typed stream (type byte, 4-byte length, body) as it passes,
 * without copying or holding it: the relay stays a byte pipe, yet knows, when the upstream stops,
 * whether it stopped between two messages and which message came last. Only there may the proxy
 * add an ErrorResponse of its own that the client can still parse.
 */
export class MessageBoundaries {
  /** Body bytes of the current message still to come. */
  #remaining = 0;
  /** The header of the next message, when a chunk ended inside it. */
  readonly #header = Buffer.alloc(5);
  #headerHave = 0;
  #currentType = -1;
  #lastType = -1;
  /** A length field below 4: the stream is not a protocol stream; no boundary is known any more. */
  #broken = false;

  observe(chunk: Buffer): void {
    let i = 0;
    while (i < chunk.length && !this.#broken) {
      if (this.#remaining > 0) {
        const take = Math.min(this.#remaining, chunk.length - i);
        this.#remaining -= take;
        i += take;
        if (this.#remaining === 0) this.#lastType = this.#currentType;
        continue;
      }
      let type: number;
      let length: number;
      if (this.#headerHave === 0 && chunk.length - i >= 5) {
        type = chunk[i] as number;
        length = chunk.readInt32BE(i + 1);
        i += 5;
      } else {
        const take = Math.min(5 - this.#headerHave, chunk.length - i);
        chunk.copy(this.#header, this.#headerHave, i, i + take);
        this.#headerHave += take;
        i += take;
        if (this.#headerHave < 5) return;
        this.#headerHave = 0;
        type = this.#header[0] as number;
        length = this.#header.readInt32BE(1);
      }
      if (length < 4) {
        this.#broken = true;
        return;
      }
      this.#currentType = type;
      this.#remaining = length - 4;
      if (this.#remaining === 0) this.#lastType = type;
    }
  }

  /** Whether everything observed so far ends with a complete message. */
  get atBoundary(): boolean {
    return !this.#broken && this.#remaining === 0 && this.#headerHave === 0;
  }

  /** The type byte of the last complete message, or -1 before the first. */
  get lastType(): number {
    return this.#lastType;
  }
}
