#!/usr/bin/env bash
# crdt-rate-limiter beside three Redis Lua limiters: one table on stdout.
#
#   bash benches/redis/run.sh
#
# Needs redis-server (Debian: `apt-get install -y redis-server`; installed here when
# missing and apt-get can run as root). Starts its own Redis on 127.0.0.1 on a free port
# with persistence off, runs the comparison (which ends by killing that Redis, for the
# fault run), and stops it on any exit. Not part of .ci/run: it takes about a minute and
# needs Redis.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! command -v redis-server >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "redis-server not found: installing it (apt-get install -y redis-server)" >&2
        apt-get install -y redis-server >/dev/null || { apt-get update >/dev/null && apt-get install -y redis-server >/dev/null; }
    else
        echo "redis-server not found. Install it (Debian/Ubuntu: sudo apt-get install -y redis-server; macOS: brew install redis) and rerun." >&2
        exit 1
    fi
fi

# A free port: bind to port 0 and read what the kernel chose.
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
dir="$(mktemp -d)"
redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$dir" --daemonize no \
    --logfile "$dir/redis.log" &
pid=$!
cleanup() {
    kill -CONT "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.05
done

cargo run --quiet --release --manifest-path "$here/Cargo.toml" -- --port "$port" --pid "$pid"
