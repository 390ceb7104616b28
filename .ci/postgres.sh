#!/usr/bin/env bash
# Install Debian's PostgreSQL server if missing, create a cluster in a temporary folder, start it on a
# loopback port. Writes the folder, bin dir and URL to .ci/.pg_dir, .ci/.pg_bin and .ci/.pg_url.
# Exits non-zero, saying why, if any step fails.
set -euo pipefail
cd "$(dirname "$0")"
fail() { echo "postgres.sh: $*" >&2; exit 1; }
# The newest /usr/lib/postgresql/<version>/bin that holds the server tools: a client-only package
# (postgresql-client-NN) creates such a folder too, without initdb or pg_ctl.
find_bin() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}
if ! PG_BIN=$(find_bin); then
  echo "postgres.sh: no PostgreSQL server found; installing Debian's postgresql" >&2
  apt-get update -qq || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null || fail "apt-get install postgresql failed"
  PG_BIN=$(find_bin) || fail "postgresql installed, but no /usr/lib/postgresql/*/bin has initdb and pg_ctl"
fi
id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
DIR=$(mktemp -d /tmp/rlhf-pg.XXXXXX)
chown postgres "$DIR"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
su postgres -s /bin/sh -c "$PG_BIN/initdb -D '$DIR/data' -U postgres --auth=trust >/dev/null" \
  || { rm -rf "$DIR"; fail "initdb ($PG_BIN/initdb) failed"; }
if ! su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$DIR/data' -o '-p $PORT -k $DIR -c listen_addresses=127.0.0.1' -l '$DIR/log' -w start >/dev/null"; then
  cat "$DIR/log" >&2 || true
  su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$DIR/data' -m immediate stop" >/dev/null 2>&1 || true
  rm -rf "$DIR"
  fail "the server did not start (its log is above)"
fi
echo "$DIR" > .pg_dir
echo "$PG_BIN" > .pg_bin
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres" > .pg_url
