#!/usr/bin/env bash
# The real clients and peers some tests use when installed (they skip, saying why, when not):
# pgjdbc and psycopg2 for the pool's parameter tests, PgBouncer for the console's column check and
# the benchmark's smoke run.
# A machine without Debian's package mirror goes on without them.
set -uo pipefail
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq libpostgresql-jdbc-java python3-psycopg2 pgbouncer) >/tmp/lbp-ci-clients.log 2>&1 \
    && echo "ci: installed pgjdbc, psycopg2 and pgbouncer" \
    || echo "ci: could not install pgjdbc/psycopg2/pgbouncer (see /tmp/lbp-ci-clients.log); their tests skip"
fi
exit 0
