#!/usr/bin/env bash
# CI gate: bounded, coverage-guided fuzz runs of the native code with libFuzzer, under
# AddressSanitizer, UndefinedBehaviorSanitizer and LeakSanitizer: two targets side by side (one
# core each), then a third, shorter one.
#
#   .ci/fuzz.sh                  (FUZZ_SECONDS=60 by default for the first two, LISTENER_FUZZ_SECONDS=20 for the third)
#
# native/fuzz/harness.c drives relay.c through relay.h against a real OpenSSL server;
# native/fuzz/txclient-harness.c drives txclient.c (its pure parts, clients lent connections of
# relay.c logged in to that server, and the desk that hands them on or relays and resets whole
# sessions on them; linked with --wrap=lp_conn_sink to see the desk's hand-offs);
# native/fuzz/listener-harness.c drives listener.c on a real listening socket (its accept4, recv,
# send, close, malloc and calloc renamed by objcopy to the harness's spies, which call the real
# ones). Their headers say what they check; support.c holds what they share. Each run starts from
# its committed corpus (native/fuzz/corpus/, native/fuzz/txclient-corpus/ and
# native/fuzz/listener-corpus/: every input there must pass) and fuzzes for FUZZ_SECONDS more
# (TXCLIENT_FUZZ_SECONDS for the second, FUZZ_SECONDS unless set; LISTENER_FUZZ_SECONDS for the
# third: listener.c is small, and the machine has two cores); inputs found go to
# build-fuzz/corpus/, build-fuzz/txclient-corpus/ and build-fuzz/listener-corpus/, a failing one
# to build-fuzz/crash-*, build-fuzz/txclient-crash-* or build-fuzz/listener-crash-* (replay:
# build-fuzz/harness FILE, build-fuzz/txclient-harness FILE or build-fuzz/listener-harness FILE,
# with FUZZ_VERBOSE=1 to see each step). To keep what a run found:
#   build-fuzz/harness -merge=1 native/fuzz/corpus build-fuzz/corpus
#   build-fuzz/txclient-harness -merge=1 native/fuzz/txclient-corpus build-fuzz/txclient-corpus
#   build-fuzz/listener-harness -merge=1 native/fuzz/listener-corpus build-fuzz/listener-corpus
# An input of a defect found and not fixed yet goes in native/fuzz/txclient-crashes/ (relay-crashes/ for
# harness.c's), not replayed
# here (a failing corpus input would stop the run before any fuzzing); it moves to the corpus with its fix.
# Debian 12's clang 14 and libFuzzer, binutils' objcopy, and the libuv and OpenSSL 3.0 development packages.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
out=build-fuzz
seconds=${FUZZ_SECONDS:-60}
txclient_seconds=${TXCLIENT_FUZZ_SECONDS:-$seconds}
listener_seconds=${LISTENER_FUZZ_SECONDS:-20}

fuzzer_runtime() { [ -e "$(clang -print-resource-dir 2>/dev/null)/lib/linux/libclang_rt.fuzzer-x86_64.a" ]; }
if ! command -v clang >/dev/null || ! command -v objcopy >/dev/null || ! fuzzer_runtime || [ ! -e /usr/include/uv.h ] || [ ! -e /usr/include/openssl/ssl.h ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang libclang-rt-dev binutils libuv1-dev libssl-dev >/dev/null
fi
installed=$(date +%s)

rm -rf "$out"
mkdir -p "$out/corpus" "$out/txclient-corpus" "$out/listener-corpus"
flags=(-g -O1 -fno-omit-frame-pointer '-fsanitize=address,undefined' -fno-sanitize-recover=all -Wall -Wextra
  -DOPENSSL_API_COMPAT=30000 -DOPENSSL_NO_DEPRECATED)
# Coverage guidance for the code under test only: the harnesses' own branches would only distract libFuzzer.
clang "${flags[@]}" -fsanitize=fuzzer-no-link -c native/relay.c -o "$out/relay.o"
clang "${flags[@]}" -fsanitize=fuzzer-no-link -c native/txclient.c -o "$out/txclient.o"
clang "${flags[@]}" -fsanitize=fuzzer-no-link -c native/listener.c -o "$out/listener.o"
# listener.c's system calls and allocations go to the harness's spies (listener_accept4 and so on; in listener.o only).
spies=()
for call in accept4 recv send close malloc calloc; do spies+=("--redefine-sym=$call=listener_$call"); done
objcopy "${spies[@]}" "$out/listener.o"
clang "${flags[@]}" -c native/fuzz/support.c -o "$out/support.o"
clang "${flags[@]}" -c native/fuzz/harness.c -o "$out/harness.o"
clang "${flags[@]}" -c native/fuzz/txclient-harness.c -o "$out/txclient-harness.o"
clang "${flags[@]}" -c native/fuzz/listener-harness.c -o "$out/listener-harness.o"
link=(-fsanitize=fuzzer,address,undefined -luv -lssl -lcrypto)
clang "$out/relay.o" "$out/support.o" "$out/harness.o" -o "$out/harness" "${link[@]}"
clang "$out/relay.o" "$out/txclient.o" "$out/support.o" "$out/txclient-harness.o" -o "$out/txclient-harness" "${link[@]}" -Wl,--wrap=lp_conn_sink
clang "$out/listener.o" "$out/support.o" "$out/listener-harness.o" -o "$out/listener-harness" "${link[@]}"

export ASAN_OPTIONS=detect_leaks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# One target: its binary, seconds, name (the prefix of its corpus and artifacts), committed corpus.
fuzz() {
  "$out/$1" -seed="${FUZZ_SEED:-1}" -max_total_time="$2" -timeout=30 -max_len=2048 -len_control=0 -print_final_stats=1 \
    -artifact_prefix="$out/$3" "$out/${3}corpus" "$4" >"$out/${3}fuzz.log" 2>&1
}
status=0
fuzz harness "$seconds" "" native/fuzz/corpus & relay_run=$!
fuzz txclient-harness "$txclient_seconds" txclient- native/fuzz/txclient-corpus & txclient_run=$!
wait "$relay_run" || status=$?
wait "$txclient_run" || status=$((status ? status : $?))
fuzz listener-harness "$listener_seconds" listener- native/fuzz/listener-corpus || status=$((status ? status : $?))
# libFuzzer's progress lines are many; the rest (the corpus replay, a report, the stats) is shown.
for log in "$out/fuzz.log" "$out/txclient-fuzz.log" "$out/listener-fuzz.log"; do
  echo "=== $log"
  grep -vE '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' "$log" || true
done
failing=$(find "$out" -maxdepth 1 \( -name '*crash-*' -o -name '*leak-*' -o -name '*timeout-*' \) | sort | tr '\n' ' ')
if [ -n "$failing" ]; then
  echo "fuzz: failing input(s): $failing" >&2
  status=1
fi
echo "fuzz: install $((installed - started)) s, build and fuzz $(($(date +%s) - installed)) s; exit $status"
exit "$status"
