import type { Duplex } from 'node:stream';
import { FrameReader, type Frame } from './frame-reader.js';

/** Most bytes held from a peer while the handshake code is not asking for frames. */
const HIGH_WATER = 64 * 1024;

export class PeerClosedError extends Error {
  override readonly name = 'PeerClosedError';
}

/**
 * Frames read from a socket during a handshake, one `await next()` at a time. Reading pauses
 * while the frames buffered are enough, so a peer cannot make the proxy buffer without bound.
 * `detach()` stops listening and returns the bytes not yet framed: the first bytes of the relay.
 */
export class SocketFrames {
  readonly reader: FrameReader;
  readonly #socket: Duplex;
  #waiter: { resolve: (frame: Frame) => void; reject: (error: Error) => void } | undefined;
  #failure: Error | undefined;
  readonly #onData = (chunk: Buffer): void => {
    this.reader.push(chunk);
    if (this.reader.buffered > HIGH_WATER) this.#socket.pause();
    this.#deliver();
  };
  readonly #onEnd = (): void => this.#fail(new PeerClosedError('connection closed by peer'));
  readonly #onError = (error: Error): void => this.#fail(error);

  constructor(socket: Duplex, reader: FrameReader) {
    this.#socket = socket;
    this.reader = reader;
    socket.on('data', this.#onData);
    socket.on('end', this.#onEnd);
    socket.on('close', this.#onEnd);
    socket.on('error', this.#onError);
  }

  next(): Promise<Frame> {
    if (this.#waiter) return Promise.reject(new Error('SocketFrames.next() called twice'));
    return new Promise<Frame>((resolve, reject) => {
      this.#waiter = { resolve, reject };
      this.#deliver();
      if (this.#waiter) this.#socket.resume();
    });
  }

  /** Stops reading; returns the bytes received and not framed. The socket is left paused. */
  detach(): Buffer {
    this.#socket.pause();
    this.#socket.off('data', this.#onData);
    this.#socket.off('end', this.#onEnd);
    this.#socket.off('close', this.#onEnd);
    this.#socket.off('error', this.#onError);
    return this.reader.takeRemaining();
  }

  #deliver(): void {
    const waiter = this.#waiter;
    if (!waiter) return;
    let frame: Frame | undefined;
    try {
      frame = this.reader.next();
    } catch (error) {
      this.#waiter = undefined;
      waiter.reject(error as Error);
      return;
    }
    if (frame) {
      this.#waiter = undefined;
      waiter.resolve(frame);
    } else if (this.#failure) {
      this.#waiter = undefined;
      waiter.reject(this.#failure);
    }
  }

  #fail(error: Error): void {
    this.#failure ??= error;
    this.#deliver();
  }
}
