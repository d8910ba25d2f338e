#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for the datastore tests (tessera-store's PostgreSQL half)
# and prints the one line for the caller to evaluate:
#
#     eval "$(bash .ci/postgres.sh)"
#
# which sets TESSERA_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:PORT/tessera_test.
# Meant for a fresh Debian 12 machine, as root, after `apt-get update` (installs `postgresql` if
# its binaries are missing); as another user it needs PostgreSQL installed and runs the cluster
# as that user. The cluster lives in a temp dir, listens on 127.0.0.1 only (first free port from
# 54329), trusts local connections, and is left running for the tests. Running the script again
# reuses a cluster it started before if one still answers. Only the export line goes to stdout.
set -euo pipefail
exec 3>&1 1>&2

say() { printf 'postgres.sh: %s\n' "$*"; }

find_bin() {
    # The newest installed major version's binaries.
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

BIN=$(find_bin)
if [ -z "$BIN" ] || [ ! -x "$BIN/initdb" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        say "PostgreSQL is not installed and this is not root: install the postgresql package"
        exit 1
    fi
    say "installing postgresql"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql
    BIN=$(find_bin)
fi
say "using $BIN"

if [ "$(id -u)" -eq 0 ]; then
    RUN_AS=postgres
    as_owner() { runuser -u postgres -- "$@"; }
else
    RUN_AS=$(id -un)
    as_owner() { "$@"; }
fi

port_in_use() { (exec 4<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
url_for() { printf 'postgres://%s@127.0.0.1:%s/tessera_test' "$RUN_AS" "$1"; }

PORT=""
for candidate in $(seq 54329 54348); do
    if port_in_use "$candidate"; then
        # Ours from an earlier run? Then reuse it.
        if "$BIN/psql" -X -q -h 127.0.0.1 -p "$candidate" -U "$RUN_AS" -d tessera_test \
            -c 'SELECT 1' >/dev/null 2>&1; then
            say "reusing the cluster already running on port $candidate"
            printf 'export TESSERA_TEST_POSTGRES_URL=%s\n' "$(url_for "$candidate")" >&3
            exit 0
        fi
        continue
    fi
    PORT=$candidate
    break
done
if [ -z "$PORT" ]; then
    say "no free port in 54329..54348"
    exit 1
fi

DIR=$(mktemp -d /tmp/tessera-postgres.XXXXXX)
chmod 0700 "$DIR"
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$DIR"
say "initdb in $DIR/data"
as_owner "$BIN/initdb" -D "$DIR/data" -U "$RUN_AS" --auth=trust --encoding=UTF8 \
    --locale=C >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log"; exit 1; }

say "starting on 127.0.0.1:$PORT (socket dir $DIR, log $DIR/postgres.log)"
# The server must not inherit fd 3 (the caller's `$(...)` pipe): a daemon holding it open would
# keep the caller's command substitution waiting for end-of-file forever.
as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c max_connections=300" start 3>&- \
    || { cat "$DIR/postgres.log"; exit 1; }

as_owner "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U "$RUN_AS" tessera_test
say "ready; stop it with: $( [ "$(id -u)" -eq 0 ] && printf 'runuser -u postgres -- ')$BIN/pg_ctl -D $DIR/data stop"
printf 'export TESSERA_TEST_POSTGRES_URL=%s\n' "$(url_for "$PORT")" >&3
