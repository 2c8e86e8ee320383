#!/usr/bin/env node
/**
 * `npm install` step: builds the native relay (native/relay.c) with node-gyp. Without a C
 * compiler or Node.js headers the build fails; the install goes on, and the proxy relays in
 * JavaScript (it says so in its debug log, and `--relay js` is then what every session uses).
 * Prints one line either way (the reason when it failed, after node-gyp's log);
 * LAKEBASE_PROXY_BUILD_VERBOSE=1 shows node-gyp's log as it runs.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';

// npm puts its node-gyp on the PATH of install scripts; run by hand, use the one npm ships, and
// the headers installed beside this node (node-gyp would otherwise download them).
const prefix = join(dirname(process.execPath), '..');
const bundled = join(prefix, 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
const args = ['rebuild'];
if (!process.env['npm_config_nodedir'] && existsSync(join(prefix, 'include', 'node', 'node_api.h'))) args.push(`--nodedir=${prefix}`);
const command = process.env['npm_lifecycle_event'] || !existsSync(bundled) ? ['node-gyp', args] : [process.execPath, [bundled, ...args]];
// One line says what happened; node-gyp's hundreds of lines only when the build failed, or, with
// LAKEBASE_PROXY_BUILD_VERBOSE=1, as they come.
const verbose = /^(1|true|yes)$/i.test(process.env['LAKEBASE_PROXY_BUILD_VERBOSE'] ?? '');
const result = spawnSync(command[0], command[1], {
  stdio: verbose ? 'inherit' : ['ignore', 'pipe', 'pipe'],
  encoding: 'utf8',
  maxBuffer: 64 * 1024 * 1024,
  shell: process.platform === 'win32',
});
if (result.status === 0) {
  process.stdout.write('lakebase-proxy: native relay built (build/Release/lakebase_relay.node)\n');
} else {
  const log = verbose ? '' : `${result.stdout ?? ''}${result.stderr ?? ''}`;
  if (log) process.stderr.write(log.endsWith('\n') ? log : `${log}\n`);
  process.stderr.write(
    `lakebase-proxy: native relay not built (${reason(result, log)}); the proxy works without it, relaying in JavaScript. ` +
      'Install a C compiler (build-essential) and python3, then run npm rebuild, to get it.\n',
  );
}

/**
 * The line of the log that best names the failure: the compiler's, make's, the shell's or
 * Python's own words first, then node-gyp's search for Python, then node-gyp's summary.
 */
function reason(result, log) {
  if (result.error) return `node-gyp could not run: ${result.error.message}`;
  const lines = log.split('\n').map((l) => l.trim());
  const line =
    lines.find((l) => !l.startsWith('gyp ') && /(^|\s)(fatal )?error:|No such file or directory|not found/i.test(l)) ??
    lines.find((l) => l.startsWith('gyp ERR! find Python')) ??
    lines.find((l) => /^gyp ERR! stack Error:/.test(l));
  const ended = result.signal ? `node-gyp was killed by ${result.signal}` : `node-gyp exited with ${result.status}`;
  return line ? `${ended}: ${line.slice(0, 200)}` : ended;
}
