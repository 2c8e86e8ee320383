#!/usr/bin/env bash
# PgBouncer for test/console-pgbouncer.test.ts, which compares the console's SHOW columns with
# PgBouncer's own console (Debian 12 ships 1.18). Run before `npm test`. Without root, apt or the
# network the test is skipped with its reason, so a failure here never fails CI.
set -u
if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo ".ci/pgbouncer.sh: cannot install pgbouncer here (needs root and apt-get); its test will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends pgbouncer >/dev/null 2>&1; then
  (apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends pgbouncer >/dev/null 2>&1) ||
    echo ".ci/pgbouncer.sh: apt-get could not install pgbouncer (no network?); its test will be skipped" >&2
fi
# The package starts a pgbouncer service on port 6432 where systemd runs; the test starts its own.
exit 0
