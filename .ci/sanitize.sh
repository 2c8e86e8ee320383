#!/usr/bin/env bash
# CI gate: the native relay built with AddressSanitizer and UndefinedBehaviorSanitizer
# (native/relay.c + native/txclient.c + native/listener.c + native/addon.c, gcc, into build-sanitize/), loaded by the proxy through
# LAKEBASE_PROXY_NATIVE_ADDON, under the relay suites. Fails when a suite fails, when the
# sanitized build did not load or carried no session, or when any process reported anything.
#
#   .ci/sanitize.sh            (after npm ci; SANITIZE_SUITES overrides the suites' filters)
#
# ASan writes each report to a file under build-sanitize/reports/ (from the test processes and
# the proxies and servers they start); a file there fails the run and is printed. UBSan, in gcc's
# runtime beside ASan, does not honour log_path and writes to stderr only: a test process's stderr
# is in build-sanitize/tests.log, which is searched for reports too. (A proxy's stderr goes to the
# test that started it; every report is fatal, so that proxy dies and its test fails.)
set -euo pipefail
ulimit -c 0
cd "$(dirname "$0")/.."
started=$(date +%s)
out=build-sanitize
# (Not pool.test: the psql, Java and Python clients it runs inherit LD_PRELOAD=libasan and hang;
# pool-desk runs the session pool's C path with node-postgres and a wire client.)
read -ra suites <<<"${SANITIZE_SUITES:-relay native upstream reliability-client reliability-integrity reliability-upstream-faults metrics pool-transaction.test pool-transaction-fast pool-transaction-desk pool-desk listener startup.test}"

# The compiler and its sanitizer runtimes; Node.js's own headers (node_api.h, and the OpenSSL and
# libuv headers of the OpenSSL and libuv inside this node), as scripts/build-native.js finds them.
if ! command -v gcc >/dev/null || [ ! -e "$(gcc -print-file-name=libasan.so)" ] || [ ! -e "$(gcc -print-file-name=libubsan.so)" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev libasan8 libubsan1 >/dev/null
fi
nodedir="$(dirname "$(dirname "$(node -p process.execPath)")")/include/node"
[ -e "$nodedir/node_api.h" ] || nodedir="$HOME/.cache/node-gyp/$(node -p process.versions.node)/include/node"
if [ ! -e "$nodedir/node_api.h" ]; then
  echo "sanitize: no Node.js headers (node_api.h) beside $(node -p process.execPath) or in ~/.cache/node-gyp" >&2
  exit 1
fi

rm -rf "$out"
mkdir -p "$out/reports"
addon="$PWD/$out/lakebase_relay.node"
# binding.gyp's flags and defines, plus the sanitizers; every report is fatal.
gcc -shared -fPIC -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
  -Wall -Wextra -Werror=implicit-function-declaration -Werror=incompatible-pointer-types -Wl,-z,now \
  -DNAPI_VERSION=8 -DOPENSSL_API_COMPAT=30000 -DOPENSSL_NO_DEPRECATED -DNODE_GYP_MODULE_NAME=lakebase_relay \
  -I"$nodedir" native/relay.c native/txclient.c native/listener.c native/addon.c -o "$addon"
nm -D "$addon" | grep ' U __asan_report_load' >/dev/null || { echo "sanitize: $addon is not instrumented" >&2; exit 1; }

npx tsc -p tsconfig.json

export LAKEBASE_PROXY_NATIVE_ADDON="$addon"
export LAKEBASE_PROXY_TEST_RELAY=native
LD_PRELOAD="$(gcc -print-file-name=libasan.so)"
export LD_PRELOAD
# Node.js itself does not free everything at exit: no leak checking here (the fuzz gate does it for relay.c).
# The Postgres servers the tests start get the preload too: short allocation stacks and a smaller
# quarantine keep their backends from running several times slower than without.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:malloc_context_size=8:quarantine_size_mb=64:log_path=$PWD/$out/reports/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$PWD/$out/reports/ubsan"

# The sanitized addon is what loads: its path and the ASan runtime are in the process.
node -e '
  const addon = require(process.env.LAKEBASE_PROXY_NATIVE_ADDON);
  if (typeof addon.relay !== "function") throw new Error("not the relay addon");
  const maps = require("fs").readFileSync("/proc/self/maps", "utf8");
  if (!maps.includes(process.env.LAKEBASE_PROXY_NATIVE_ADDON) || !/libasan\.so/.test(maps)) throw new Error("the sanitized addon or the ASan runtime is not mapped");
'

status=0
node test/run.js "${suites[@]}" 2>&1 | tee "$out/tests.log" || status=$?

# The native suites assert that their sessions went native; none of them may have been skipped
# for want of the addon, and the test that it loaded must have passed.
if grep -q 'no native relay' "$out/tests.log"; then
  echo "sanitize: native tests were skipped: the addon did not load" >&2
  status=1
fi
case " ${suites[*]} " in
  *" native "*) grep -q '✔ npm install built the native relay' "$out/tests.log" || { echo "sanitize: the test that the addon loaded did not pass" >&2; status=1; } ;;
esac

mapfile -t reports < <(find "$out/reports" -type f | sort)
for file in "${reports[@]}"; do
  echo "sanitize: sanitizer report $file:" >&2
  cat "$file" >&2
  status=1
done
# UBSan's reports ("FILE:LINE:COL: runtime error: ..."), and any other that reached stderr, with the stack after each.
report='runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer'
if grep -qE "$report" "$out/tests.log"; then
  echo "sanitize: sanitizer reports in $out/tests.log:" >&2
  grep -nE -A 16 "$report" "$out/tests.log" >&2
  status=1
fi
echo "sanitize: $(( $(date +%s) - started )) s, exit $status"
exit "$status"
