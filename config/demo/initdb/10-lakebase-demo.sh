#!/bin/sh
# Run once by the postgres image when it creates the demo database: make it behave like Lakebase.
# - TCP logins only over TLS, with a password (the OAuth stand-in sets the token as the password
#   of $DEMO_ROLE each time it issues one, valid until the token expires);
# - the role of the demo's service principal, which may create tables in the default database.
set -e

cat > "$PGDATA/pg_hba.conf" <<'HBA'
# TYPE   DATABASE USER ADDRESS METHOD
local    all      all          trust
hostssl  all      all  all     scram-sha-256
HBA

psql -v ON_ERROR_STOP=1 -v role="${DEMO_ROLE:?DEMO_ROLE is not set}" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE :"role" LOGIN;
GRANT ALL ON SCHEMA public TO :"role";
SQL
