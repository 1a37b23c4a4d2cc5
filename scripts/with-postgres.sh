#!/usr/bin/env bash
# Runs a command beside a throwaway PostgreSQL cluster: installs Debian's PostgreSQL server when it
# is missing, starts a fresh cluster on a free loopback port (as the `postgres` user when run as
# root, since PostgreSQL refuses root), exports TIMPORT_TEST_DATABASE_URL (the tests make one
# database per test in it) and TIMPORT_REQUIRE_POSTGRES=1 (so no PostgreSQL test may skip), runs
# the command, and removes the cluster whatever happens. The cluster also takes TLS (a self-signed
# certificate for "localhost", in TIMPORT_TEST_PG_CA) and has a hot standby streaming from it
# (TIMPORT_TEST_STANDBY_URL), for the tests of TLS and of a read-only database.
#
#   bash scripts/with-postgres.sh cargo test
set -euo pipefail

pg_bin() { find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1; }

bin=$(pg_bin)
if [ -z "$bin" ]; then
  echo "with-postgres: installing Debian's postgresql package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
  bin=$(pg_bin)
fi
[ -n "$bin" ] || { echo "with-postgres: no PostgreSQL server binaries found" >&2; exit 1; }

dir=$(mktemp -d /tmp/timport-pg.XXXXXX)
as_pg=()
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  chown postgres "$dir"
  as_pg=(runuser -u postgres --)
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
standby_port=$(free_port)

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/standby" -m immediate stop >/dev/null 2>&1 || true
  "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

"${as_pg[@]}" "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
# A test CA, and a certificate for "localhost" it signs (rustls refuses a CA as the server's own).
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=timport-test-ca \
  -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=localhost \
  -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 2 -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
chmod 0600 "$dir/server.key"
[ ${#as_pg[@]} -eq 0 ] || chown postgres "$dir/server.key" "$dir/server.crt"
# Throwaway: durability off (fsync, full pages) for speed; enough connections for parallel tests
# and their child daemons.
"${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -o \
  "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=400 -c fsync=off -c full_page_writes=off -c synchronous_commit=off -c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key" \
  start >/dev/null
# A hot standby streaming from it: a read-only database, as after a failover left a URL on one.
"${as_pg[@]}" "$bin/pg_basebackup" -h 127.0.0.1 -p "$port" -U postgres -D "$dir/standby" -R -X stream -c fast >/dev/null
"${as_pg[@]}" "$bin/pg_ctl" -D "$dir/standby" -l "$dir/standby.log" -w -o \
  "-p $standby_port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=400 -c ssl=off -c fsync=off" start >/dev/null
echo "with-postgres: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" >&2

export TIMPORT_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
export TIMPORT_REQUIRE_POSTGRES=1
export TIMPORT_TEST_PG_CA="$dir/ca.crt"
export TIMPORT_TEST_STANDBY_URL="postgres://postgres@127.0.0.1:$standby_port/postgres"
set +e
"$@"
status=$?
set -e
if [ $status -ne 0 ] && [ -f "$dir/log" ]; then
  echo "with-postgres: the command failed; the last lines of the server log:" >&2
  tail -n 20 "$dir/log" >&2
fi
exit $status
