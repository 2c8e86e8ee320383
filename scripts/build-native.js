#!/usr/bin/env node
/**
 * `npm install` step: builds the native relay (native/relay.c) with node-gyp. Without a C
 * compiler or Node.js headers the build fails; the install goes on, and the proxy relays in
 * JavaScript (it says so in its debug log, and `--relay js` is then what every session uses).
 */
import { spawnSync } from 'node:child_process';

const result = spawnSync('node-gyp', ['rebuild'], { stdio: 'inherit', shell: process.platform === 'win32' });
if (result.status !== 0) {
  process.stderr.write(
    '\nlakebase-proxy: the native relay was not built (node-gyp ' +
      (result.error ? result.error.message : `exited with ${result.status}`) +
      '); the proxy works without it, relaying in JavaScript. Install a C compiler (build-essential) and python3, then run npm rebuild, to get it.\n',
  );
}
