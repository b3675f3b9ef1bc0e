#!/usr/bin/env bash
# Makes sure the PostgreSQL the tests use is reachable: HERALD_TEST_PG_URL, by
# default postgres://postgres@127.0.0.1:5432/test (trust auth). If nothing
# answers on 127.0.0.1:5432, installs Debian's PostgreSQL, starts it, lets
# loopback connect with trust auth and creates the `test` database.
# Idempotent; a PostgreSQL that is already running is left as it is.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! command -v pg_isready >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql postgresql-client
fi

if ! ready; then
  if ! ls /etc/postgresql/*/main/postgresql.conf >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql
  fi
  conf_dir="$(dirname "$(ls /etc/postgresql/*/main/postgresql.conf | head -n1)")"
  version="$(basename "$(dirname "$conf_dir")")"
  # Loopback only, trust auth: a throwaway test server, never a production setting.
  if ! grep -q "herald-tests" "$conf_dir/pg_hba.conf"; then
    $SUDO sh -c "printf '%s\n' '# herald-tests: loopback trust' 'host all all 127.0.0.1/32 trust' 'host all all ::1/128 trust' | cat - '$conf_dir/pg_hba.conf' > '$conf_dir/pg_hba.conf.new' && mv '$conf_dir/pg_hba.conf.new' '$conf_dir/pg_hba.conf'"
  fi
  $SUDO pg_ctlcluster "$version" main start || $SUDO service postgresql start
  for _ in $(seq 1 30); do ready && break; sleep 1; done
  ready || { echo "PostgreSQL did not start on 127.0.0.1:5432" >&2; exit 1; }
fi

if ! psql -h 127.0.0.1 -U postgres -d test -Atc 'SELECT 1' >/dev/null 2>&1; then
  psql -h 127.0.0.1 -U postgres -d postgres -c 'CREATE DATABASE test' >/dev/null
fi
psql -h 127.0.0.1 -U postgres -d test -Atc 'SELECT 1' >/dev/null \
  || { echo "cannot connect to postgres://postgres@127.0.0.1:5432/test" >&2; exit 1; }
echo "PostgreSQL ready at 127.0.0.1:5432 (database test)"
