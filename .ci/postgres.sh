#!/usr/bin/env bash
# Install Debian's PostgreSQL if missing, create a cluster in a temporary folder, start it on a loopback
# port. Writes the folder, bin dir and URL to .ci/.pg_dir, .ci/.pg_bin and .ci/.pg_url.
set -euo pipefail
cd "$(dirname "$0")"
find_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
PG_BIN=$(find_bin || true)
if [ -z "$PG_BIN" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || exit 1
  PG_BIN=$(find_bin)
fi
id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
DIR=$(mktemp -d /tmp/rlhf-pg.XXXXXX)
chown postgres "$DIR"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
su postgres -s /bin/sh -c "$PG_BIN/initdb -D '$DIR/data' -U postgres --auth=trust >/dev/null"
su postgres -s /bin/sh -c "$PG_BIN/pg_ctl -D '$DIR/data' -o '-p $PORT -k $DIR -c listen_addresses=127.0.0.1' -l '$DIR/log' -w start >/dev/null"
echo "$DIR" > .pg_dir
echo "$PG_BIN" > .pg_bin
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres" > .pg_url
