#!/usr/bin/env bash
# The whole suite again on each supported Node.js line, after .ci/run's `npm ci` and `npm test`
# (which ran it on the machine's own Node). Each line's binary is the npm registry's `node`
# package, run through `npx -p node@N`; it has no C headers, so the native relay is the one
# `npm ci` built with the machine's Node: an N-API addon, loaded unchanged by every line.
#
# test/node-line.test.ts reads LAKEBASE_PROXY_EXPECT_NODE and fails unless the suite really runs
# on that line (and, when the addon was built, unless it loads there).
#
#   .ci/node-lines.sh [filter ...]           filters as test/run.js takes them (default: every file)
#   NODE_LINES="24 26" .ci/node-lines.sh     the lines to run (default below); the machine's own
#                                           line is skipped, npm test has just run on it
set -euo pipefail
cd "$(dirname "$0")/.."

lines="${NODE_LINES:-22 24 26}"
own="$(node -p 'process.versions.node.split(".")[0]')"
native=0
[ -f build/Release/lakebase_relay.node ] && native=1

summary=()
failed=0
for line in $lines; do
  if [ "$line" = "$own" ]; then
    summary+=("node $line: the machine's own line, run by npm test")
    continue
  fi
  echo "=== the whole suite on Node.js $line ==="
  start=$SECONDS
  # The inner command runs in npx's shell, with the package's node first on the PATH.
  # Every line runs even when one fails, so that one CI run shows them all.
  if LAKEBASE_PROXY_EXPECT_NODE="$line" LAKEBASE_PROXY_EXPECT_NATIVE="$native" TEST_FILTERS="$*" \
    npx -y -p "node@$line" -c 'echo "running on node $(node --version)" && node test/run.js $TEST_FILTERS'; then
    summary+=("node $line: passed in $((SECONDS - start)) s")
  else
    summary+=("node $line: FAILED after $((SECONDS - start)) s")
    failed=1
  fi
done

printf '%s\n' "${summary[@]}"
exit "$failed"
