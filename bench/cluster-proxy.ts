/**
 * The proxy as several processes on one port, for measuring a multi-process mode: the primary
 * forks LBP_BENCH_WORKERS workers (default: the number of CPUs), each runs the program's main()
 * with the same arguments. Node.js 20 has no reusePort on net.Server, so the cluster module
 * shares the listening socket: with NODE_CLUSTER_SCHED_POLICY=rr (the default on Linux) the
 * primary accepts and hands each connection to a worker in turn; with =none the workers accept
 * from the shared socket themselves.
 *
 * A measurement aid, not a product mode: a CancelRequest reaches whichever worker accepts it,
 * and only the worker that holds the session knows its cancel key.
 */
import cluster from 'node:cluster';
import { availableParallelism } from 'node:os';

if (cluster.isPrimary) {
  const workers = Number(process.env['LBP_BENCH_WORKERS'] ?? availableParallelism());
  for (let i = 0; i < workers; i++) cluster.fork();
  let stopping = false;
  const stop = (signal: NodeJS.Signals): void => {
    stopping = true;
    for (const worker of Object.values(cluster.workers ?? {})) worker?.process.kill(signal);
  };
  process.once('SIGINT', () => stop('SIGINT'));
  process.once('SIGTERM', () => stop('SIGTERM'));
  cluster.on('exit', (worker, code) => {
    if (!stopping) {
      process.stderr.write(`cluster-proxy: worker ${worker.process.pid} exited with ${code}; stopping\n`);
      stop('SIGTERM');
      process.exitCode = 1;
    }
  });
} else {
  const { main } = await import('../src/cli/main.js');
  const code = await main(process.argv.slice(2));
  process.exit(code);
}
