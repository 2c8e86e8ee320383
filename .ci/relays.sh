#!/usr/bin/env bash
# The relay gates beyond `npm test` (which runs every suite on the native relay, the default):
# the relay suites again on the JavaScript relay, and the native relay loaded and relaying under
# Node.js 22 (the supported LTS line the machine's Node is not), from the npm registry's `node`
# package. The addon built by `npm ci` is N-API: the same file loads under every line.
set -euo pipefail
cd "$(dirname "$0")/.."
SUITES=(relay upstream reliability shutdown metrics native check)
LAKEBASE_PROXY_TEST_RELAY=js node test/run.js "${SUITES[@]}"
for version in 22; do
  npx -y -p "node@$version" -c "node -e \"if (!process.version.startsWith('v$version.')) process.exit(1)\" && node test/run.js native relay.test upstream"
done
