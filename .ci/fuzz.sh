#!/usr/bin/env bash
# CI gate: a bounded, coverage-guided fuzz run of the native relay (native/relay.c) with
# libFuzzer, under AddressSanitizer, UndefinedBehaviorSanitizer and LeakSanitizer.
#
#   .ci/fuzz.sh                  (FUZZ_SECONDS=60 by default)
#
# native/fuzz/harness.c drives relay.c through relay.h against a real OpenSSL server (see its
# header for what it checks). The run starts from the committed corpus (native/fuzz/corpus/,
# every input there must pass) and fuzzes for FUZZ_SECONDS more; inputs it finds go to
# build-fuzz/corpus/, a failing one to build-fuzz/crash-* (replay: build-fuzz/harness FILE, with
# FUZZ_VERBOSE=1 to see each step). To keep what a run found:
#   build-fuzz/harness -merge=1 native/fuzz/corpus build-fuzz/corpus
# Debian 12's clang 14 and libFuzzer, and the libuv and OpenSSL 3.0 development packages.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
out=build-fuzz
seconds=${FUZZ_SECONDS:-60}

fuzzer_runtime() { [ -e "$(clang -print-resource-dir 2>/dev/null)/lib/linux/libclang_rt.fuzzer-x86_64.a" ]; }
if ! command -v clang >/dev/null || ! fuzzer_runtime || [ ! -e /usr/include/uv.h ] || [ ! -e /usr/include/openssl/ssl.h ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang libclang-rt-dev libuv1-dev libssl-dev >/dev/null
fi
installed=$(date +%s)

rm -rf "$out"
mkdir -p "$out/corpus"
flags=(-g -O1 -fno-omit-frame-pointer '-fsanitize=address,undefined' -fno-sanitize-recover=all -Wall -Wextra
  -DOPENSSL_API_COMPAT=30000 -DOPENSSL_NO_DEPRECATED)
# Coverage guidance for relay.c only: the harness's own branches would only distract libFuzzer.
clang "${flags[@]}" -fsanitize=fuzzer-no-link -c native/relay.c -o "$out/relay.o"
clang "${flags[@]}" -c native/fuzz/harness.c -o "$out/harness.o"
clang -fsanitize=fuzzer,address,undefined "$out/relay.o" "$out/harness.o" -o "$out/harness" -luv -lssl -lcrypto

export ASAN_OPTIONS=detect_leaks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
status=0
"$out/harness" -seed="${FUZZ_SEED:-1}" -max_total_time="$seconds" -timeout=30 -max_len=2048 -len_control=0 -print_final_stats=1 \
  -artifact_prefix="$out/" "$out/corpus" native/fuzz/corpus >"$out/fuzz.log" 2>&1 || status=$?
# libFuzzer's progress lines are many; the rest (the corpus replay, a report, the stats) is shown.
grep -vE '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' "$out/fuzz.log" || true
failing=$(find "$out" -maxdepth 1 \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' \) | sort | tr '\n' ' ')
if [ -n "$failing" ]; then
  echo "fuzz: failing input(s): $failing" >&2
  status=1
fi
echo "fuzz: install $((installed - started)) s, build and fuzz $(($(date +%s) - installed)) s; exit $status"
exit "$status"
