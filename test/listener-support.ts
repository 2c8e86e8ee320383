/** What the listener tests share (native/listener.c; src/proxy/native-listener.ts): raw sockets and what they received. */
import { connect, type Socket } from 'node:net';
import { native } from '../src/proxy/native-relay.js';

export function requireNative(t: { skip: (message: string) => void }): boolean {
  if (native.addon) return true;
  t.skip(`the listener in C needs the native relay: ${native.problem}`);
  return false;
}


export async function tcp(port: number, host = '127.0.0.1'): Promise<Socket> {
  const socket = connect({ host, port });
  socket.on('error', () => {});
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  return socket;
}

/** Until `socket` closes; what it received. */
export function received(socket: Socket): Promise<Buffer> {
  const chunks: Buffer[] = [];
  socket.on('data', (chunk: Buffer) => chunks.push(chunk));
  return new Promise((resolve) => socket.once('close', () => resolve(Buffer.concat(chunks))));
}

/** The SQLSTATE of the first ErrorResponse in `bytes` (after any other messages). */
export function sqlstateIn(bytes: Buffer): string | undefined {
  for (let i = 0; i + 5 <= bytes.length; ) {
    const type = String.fromCharCode(bytes[i] as number);
    const length = bytes.readInt32BE(i + 1);
    if (type === 'E') {
      const body = bytes.subarray(i + 5, i + 1 + length);
      for (let j = 0; j < body.length && body[j] !== 0; ) {
        const end = body.indexOf(0, j + 1);
        if (body[j] === 0x43 /* C */) return body.toString('utf8', j + 1, end);
        j = end + 1;
      }
    }
    i += 1 + length;
  }
  return undefined;
}
