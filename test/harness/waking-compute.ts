/**
 * A Lakebase compute that is waking up, in front of the test Postgres on a port of its own. What
 * it does with a connection depends on its mode, the ways a starting compute turns clients away:
 *
 *   refuse     not listening: ECONNREFUSED
 *   reset      accepts, then resets the connection at once (ECONNRESET before any answer)
 *   no-tls     answers the SSLRequest with N (a server not ready for TLS yet)
 *   starting   TLS with the test CA's localhost certificate, then ErrorResponse 57P03 "the database
 *              system is starting up" to the startup message, as Postgres does while it starts
 *   up         passes the bytes through to the test Postgres (TLS is end to end)
 *
 * `after(n, mode)` switches to `mode` after n more connections in the current mode (steps queue
 * up: each counts from the one before), so a test steps through the modes by count, not by time.
 */
import { connect as netConnect, createServer, type Server, type Socket } from 'node:net';
import { createSecureContext, TLSSocket } from 'node:tls';
import type { TestPostgres } from './postgres.js';

export type ComputeMode = 'refuse' | 'reset' | 'no-tls' | 'starting' | 'up';

export interface WakingCompute {
  readonly port: number;
  readonly mode: ComputeMode;
  /** Connections taken in each mode so far (refuse counts none: nothing listens). */
  readonly seen: Record<ComputeMode, number>;
  set(mode: ComputeMode): Promise<void>;
  /** Switches to `next` once `count` more connections arrived, after the steps queued before it. */
  after(count: number, next: ComputeMode): void;
  close(): Promise<void>;
}

export async function startWakingCompute(db: TestPostgres, initial: ComputeMode): Promise<WakingCompute> {
  const context = createSecureContext({ cert: db.ca.serverCertPem, key: db.ca.serverKeyPem });
  const sockets = new Set<Socket>();
  const seen: Record<ComputeMode, number> = { refuse: 0, reset: 0, 'no-tls': 0, starting: 0, up: 0 };
  let mode: ComputeMode = initial;
  let server: Server | undefined;
  const steps: Array<{ left: number; next: ComputeMode }> = [];

  const track = (socket: Socket): Socket => {
    sockets.add(socket);
    socket.on('error', () => {});
    socket.once('close', () => sockets.delete(socket));
    return socket;
  };
  const onConnection = (socket: Socket): void => {
    track(socket);
    const current = mode;
    seen[current]++;
    const step = steps[0];
    if (step && --step.left <= 0) {
      steps.shift();
      void set(step.next);
    }
    switch (current) {
      case 'refuse':
      case 'reset':
        socket.resetAndDestroy();
        return;
      case 'no-tls':
        socket.once('data', () => socket.end('N'));
        return;
      case 'starting':
        socket.once('data', () => {
          socket.pause();
          socket.write('S');
          const tls = new TLSSocket(socket, { isServer: true, secureContext: context });
          tls.on('error', () => {});
          tls.once('data', () => tls.end(startingUp()));
        });
        return;
      case 'up': {
        const back = track(netConnect({ host: '127.0.0.1', port: db.port }));
        socket.pipe(back);
        back.pipe(socket);
        socket.once('close', () => back.destroy());
        back.once('close', () => socket.destroy());
        return;
      }
    }
  };

  const reserve = (): Promise<number> =>
    new Promise((resolve, reject) => {
      const probe = createServer();
      probe.once('error', reject);
      probe.listen(0, '127.0.0.1', () => {
        const { port } = probe.address() as { port: number };
        probe.close(() => resolve(port));
      });
    });
  const port = await reserve();

  async function set(next: ComputeMode): Promise<void> {
    mode = next;
    if (next === 'refuse') {
      const old = server;
      server = undefined;
      await new Promise<void>((resolve) => (old ? old.close(() => resolve()) : resolve()));
      return;
    }
    if (server) return;
    const s = createServer(onConnection);
    server = s;
    await new Promise<void>((resolve, reject) => {
      s.once('error', reject);
      s.listen(port, '127.0.0.1', () => resolve());
    });
  }

  await set(initial);
  return {
    port,
    get mode() {
      return mode;
    },
    seen,
    set,
    after(count, next) {
      steps.push({ left: count, next });
    },
    async close() {
      for (const socket of sockets) socket.destroy();
      await set('refuse');
    },
  };
}

/** ErrorResponse 57P03 as Postgres sends it while it starts. */
function startingUp(): Buffer {
  const fields = ['SFATAL', 'VFATAL', 'C57P03', 'Mthe database system is starting up'].map((f) => Buffer.from(`${f}\0`, 'utf8'));
  const body = Buffer.concat([...fields, Buffer.from([0])]);
  const head = Buffer.alloc(5);
  head.write('E', 0, 'latin1');
  head.writeInt32BE(4 + body.length, 1);
  return Buffer.concat([head, body]);
}
