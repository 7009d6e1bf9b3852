# shellcheck shell=bash
# Shared by scripts/test and scripts/bench: make sure PostgreSQL answers on
# 127.0.0.1:5432, installing and starting Debian's `postgresql` if nothing
# listens there (local server: loopback connections are trusted).
#
#   ensure_postgres NAME      NAME prefixes the messages (e.g. scripts/test)
#   ensure_database URL       creates URL's database if it is missing (psql)
#   ensure_postgres_tools     installs Debian's server package if `initdb` is
#                             not at `pg_config --bindir` (the fault tests run
#                             a private cluster of their own)

pg_answers() {
  timeout 5 bash -c '</dev/tcp/127.0.0.1/5432' 2>/dev/null
}

ensure_postgres() {
  local who=${1:-scripts}
  if pg_answers; then
    return
  fi
  echo "$who: nothing listens on 127.0.0.1:5432; installing and starting PostgreSQL" >&2
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  # Local test server: trust connections from loopback, as on our machines.
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  if ! grep -q 'order-saga tests' "$hba"; then
    sed -i '1i host all all 127.0.0.1/32 trust # order-saga tests\nhost all all ::1/128 trust # order-saga tests' "$hba"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster "$version" main restart
  for _ in $(seq 1 30); do pg_answers && break; sleep 1; done
  pg_answers || { echo "$who: PostgreSQL did not start" >&2; exit 1; }
}

ensure_postgres_tools() {
  local bindir
  bindir=$(pg_config --bindir 2>/dev/null || true)
  if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
}

ensure_database() {
  local url=$1
  local db=${url##*/}
  db=${db%%\?*}
  if command -v psql >/dev/null 2>&1 &&
     ! psql "${url%/*}/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
    psql "${url%/*}/postgres" -qc "CREATE DATABASE \"$db\""
  fi
}
