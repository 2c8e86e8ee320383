#!/usr/bin/env node
/**
 * `npm install` step: builds the native relay (native/relay.c) with node-gyp. Without a C
 * compiler or Node.js headers the build fails; the install goes on, and the proxy relays in
 * JavaScript (it says so in its debug log, and `--relay js` is then what every session uses).
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
const result = spawnSync(command[0], command[1], { stdio: 'inherit', shell: process.platform === 'win32' });
if (result.status !== 0) {
  process.stderr.write(
    '\nlakebase-proxy: the native relay was not built (node-gyp ' +
      (result.error ? result.error.message : `exited with ${result.status}`) +
      '); the proxy works without it, relaying in JavaScript. Install a C compiler (build-essential) and python3, then run npm rebuild, to get it.\n',
  );
}
