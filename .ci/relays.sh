#!/usr/bin/env bash
# The relay gate beyond `npm test` and .ci/node-lines.sh (which run every suite on the native
# relay, the default, on each Node.js line): the relay suites again on the JavaScript relay, and
# the transaction pool with its upstream connections on Node.js TLS.
set -euo pipefail
cd "$(dirname "$0")/.."
SUITES=(relay upstream reliability shutdown metrics native check pool-transaction)
LAKEBASE_PROXY_TEST_RELAY=js node test/run.js "${SUITES[@]}"
