#!/bin/sh
# The compose demo's certificates: a throw-away CA and one server certificate for the hosts
# postgres, oauth and localhost, made once into $CERTS_DIR (a restart keeps them, so a client
# that trusts the CA goes on working). Runs as root in the postgres image, which has openssl.
#
# The file names are those of the test harness (test/harness/certs.ts, CA_FILES), so the OAuth
# stand-in loads them with TEST_CA_DIR=$CERTS_DIR:
#   ca.crt         the CA to trust (SSLRootCert, NODE_EXTRA_CA_CERTS)          0644
#   ca.key         its key, kept only because the harness expects the file      0600 root
#   server.crt     the server certificate                                       0644
#   server.key     its key, for the OAuth stand-in (the image's user $APP_OWNER) 0600
#   postgres.key   the same key for PostgreSQL, which insists on owning it      0600 $PG_OWNER
#   untrusted.crt  a self-signed certificate no one trusts (harness contract)   0644
#   untrusted.key                                                                0600 $APP_OWNER
set -eu

dir="${CERTS_DIR:-/certs}"
app_owner="${APP_OWNER:-1000:1000}"
pg_owner="${PG_OWNER:-postgres:postgres}"
days=3650

done_already=yes
for f in ca.crt ca.key server.crt server.key postgres.key untrusted.crt untrusted.key; do
  [ -s "$dir/$f" ] || done_already=no
done
if [ "$done_already" = yes ]; then
  echo "demo certificates already in $dir"
  exit 0
fi

mkdir -p "$dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# EC P-256: generated at once, accepted by PostgreSQL, Node.js and libpq.
ec="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
serial() { echo "0x$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"; }

openssl req -x509 $ec -keyout ca.key -out ca.crt -days "$days" -set_serial "$(serial)" -subj "/CN=lakebase-proxy demo CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

openssl req -new $ec -keyout server.key -out server.csr -subj "/CN=postgres"
cat > server.ext <<'EXT'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:postgres,DNS:oauth,DNS:localhost,IP:127.0.0.1
EXT
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -set_serial "$(serial)" -days "$days" -extfile server.ext -out server.crt

openssl req -x509 $ec -keyout untrusted.key -out untrusted.crt -days "$days" -set_serial "$(serial)" -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1"

cp server.key postgres.key
chmod 0644 ca.crt server.crt untrusted.crt
chmod 0600 ca.key server.key postgres.key untrusted.key
chown "$app_owner" server.key untrusted.key
chown "$pg_owner" postgres.key
# ca.crt last: the check above sees a complete set or makes a new one.
for f in ca.key server.crt server.key postgres.key untrusted.crt untrusted.key ca.crt; do
  mv -f "$f" "$dir/$f"
done
chmod 0755 "$dir"
echo "demo certificates made in $dir"
