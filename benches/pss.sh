#!/bin/bash
# Memory per stored 1 KiB object, issue 18's method: swr-proxy with its
# defaults (except the listeners) in front of nginx serving 100,000 static
# 1 KiB files (nginx sends ETag and Last-Modified), PSS of the process read
# from /proc/<pid>/smaps_rollup when started, after wrk has fetched 50,000
# distinct objects, and after 100,000. Prints the figures per object.
#
#   apt-get install -y wrk nginx-light
#   cargo build --release
#   benches/pss.sh [target/release/swr-proxy] [extra swr-proxy flags]
#
# Uses 127.0.0.1 ports 18081 (nginx), 18090 and 18091 (swr-proxy), and a
# scratch directory that it removes; stops only the processes it started.
set -euo pipefail
BIN=${1:-target/release/swr-proxy}
shift || true
DIR=$(mktemp -d /tmp/swr-pss.XXXXXX)
trap 'kill "${PROXY:-}" 2>/dev/null || true; kill "$(cat "$DIR/nginx.pid" 2>/dev/null)" 2>/dev/null || true; sleep 0.5; rm -rf "$DIR"' EXIT
chmod 755 "$DIR" # nginx's workers read the files as another user
mkdir -p "$DIR/www/k" "$DIR/logs"
python3 - "$DIR/www/k" <<'PY'
import sys
root = sys.argv[1]
for i in range(100000):
    body = f"key {i} ".encode()
    with open(f"{root}/{i}", "wb") as f:
        f.write(body + b"x" * (1024 - len(body)))
PY
cat > "$DIR/nginx.conf" <<CONF
worker_processes 1;
pid $DIR/nginx.pid;
error_log $DIR/logs/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $DIR/logs;
  proxy_temp_path $DIR/logs;
  fastcgi_temp_path $DIR/logs;
  uwsgi_temp_path $DIR/logs;
  scgi_temp_path $DIR/logs;
  server { listen 127.0.0.1:18081; root $DIR/www; location / { default_type application/octet-stream; } }
}
CONF
nginx -c "$DIR/nginx.conf"
cat > "$DIR/range.lua" <<'LUA'
local from = tonumber(os.getenv("FROM") or "0")
local count = tonumber(os.getenv("COUNT") or "100000")
local i = -1
function request()
  i = i + 1
  return wrk.format("GET", "/k/" .. (from + i % count))
end
LUA
"$BIN" --upstream http://127.0.0.1:18081 --listen 127.0.0.1:18090 \
  --admin-listen 127.0.0.1:18091 "$@" >"$DIR/proxy.log" 2>&1 &
PROXY=$!
sleep 1.5
pss() { awk '/^Pss:/{print $2 * 1024}' "/proc/$PROXY/smaps_rollup"; }
FRESH=$(pss)
FROM=0 COUNT=50000 wrk -t1 -c32 -d12s -s "$DIR/range.lua" http://127.0.0.1:18090 >/dev/null
sleep 1
HALF=$(pss)
FROM=50000 COUNT=50000 wrk -t1 -c32 -d12s -s "$DIR/range.lua" http://127.0.0.1:18090 >/dev/null
sleep 1
FULL=$(pss)
ENTRIES=$(curl -s http://127.0.0.1:18091/metrics | awk '/^swr_cache_entries /{print $2}')
echo "entries=$ENTRIES pss_fresh=$FRESH pss_50k=$HALF pss_100k=$FULL"
if [ "${ENTRIES:-0}" != 100000 ]; then
  echo "expected 100000 entries stored; the proxy said:" >&2
  tail -5 "$DIR/proxy.log" >&2
  exit 1
fi
echo "per object: all $(( (FULL - FRESH) / 100000 )) B, first 50,000 $(( (HALF - FRESH) / 50000 )) B, second 50,000 $(( (FULL - HALF) / 50000 )) B"
