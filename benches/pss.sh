#!/bin/bash
# Memory per stored 1 KiB object, issue 18's method: swr-proxy with its
# defaults (except the listeners) in front of nginx serving 100,000 static
# 1 KiB files (nginx sends ETag and Last-Modified), PSS of the process read
# from /proc/<pid>/smaps_rollup when started, after 50,000 distinct objects
# are stored, and after 100,000. Prints the figures per object.
#
# By default wrk asks for each object once (and stops): "after storing
# 100,000 distinct objects". wrk waits out its -d (40 s) even when its
# thread has stopped, so a run takes about two minutes. PSS_MODE=loop asks
# for them over and over for 12 s per half instead (the method of the
# earlier runs in BENCHMARKS.md): with the default ttl of 10 s the second
# half of each loop finds entries stale, so it also counts what thousands
# of queued refreshes leave behind.
#
#   apt-get install -y wrk nginx-light
#   cargo build --release
#   benches/pss.sh [target/release/swr-proxy] [extra swr-proxy flags]
#   PSS_MODE=loop benches/pss.sh target/release/swr-proxy
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
-- Keys FROM .. FROM+COUNT-1 in turn. With ONCE=1 the thread stops after
-- COUNT answers (the few requests already sent past COUNT ask again for
-- the first keys: hits, nothing stored) and prints how many were not 200.
local from = tonumber(os.getenv("FROM") or "0")
local count = tonumber(os.getenv("COUNT") or "100000")
local once = os.getenv("ONCE") == "1"
local i = -1
local answers, failed = 0, 0
function request()
  i = i + 1
  return wrk.format("GET", "/k/" .. (from + i % count))
end
if once then
  function response(status, headers, body)
    answers = answers + 1
    if status ~= 200 then failed = failed + 1 end
    if answers == count then
      io.write("answers ", answers, " not 200: ", failed, "\n")
      wrk.thread:stop()
    end
  end
end
LUA
"$BIN" --upstream http://127.0.0.1:18081 --listen 127.0.0.1:18090 \
  --admin-listen 127.0.0.1:18091 "$@" >"$DIR/proxy.log" 2>&1 &
PROXY=$!
sleep 1.5
pss() { awk '/^Pss:/{print $2 * 1024}' "/proc/$PROXY/smaps_rollup"; }
FRESH=$(pss)
# One pass: wrk's thread stops after 50,000 answers, but wrk itself waits
# out its -d, which is the bound for a slow machine.
case "${PSS_MODE:-once}" in
  once) ONCE=1 SECS=40s ;;
  loop) ONCE=0 SECS=12s ;;
  *) echo "PSS_MODE is once or loop, not '$PSS_MODE'" >&2; exit 2 ;;
esac
entries() { curl -s http://127.0.0.1:18091/metrics | awk '/^swr_cache_entries /{print $2}'; }
# Asks for keys $1 .. $1+49,999, then waits (up to 20 s) until the proxy
# holds $2 entries: the 50,000th answer can come before the last miss's.
load() {
  local out
  if ! out=$(ONCE=$ONCE FROM=$1 COUNT=50000 wrk -t1 -c32 -d$SECS -s "$DIR/range.lua" http://127.0.0.1:18090); then
    echo "wrk failed: $out" >&2
    exit 1
  fi
  if [ "$ONCE" = 1 ] && ! grep -q '^answers 50000 not 200: 0$' <<<"$out"; then
    echo "wrk did not get 50,000 answers of 200 within $SECS:" >&2
    echo "$out" >&2
    exit 1
  fi
  for _ in $(seq 200); do
    [ "$(entries)" = "$2" ] && return 0
    sleep 0.1
  done
  echo "expected $2 entries stored; the proxy holds $(entries):" >&2
  tail -5 "$DIR/proxy.log" >&2
  exit 1
}
load 0 50000
sleep 1
HALF=$(pss)
load 50000 100000
sleep 1
FULL=$(pss)
ENTRIES=$(entries)
echo "entries=$ENTRIES pss_fresh=$FRESH pss_50k=$HALF pss_100k=$FULL"
if [ "${ENTRIES:-0}" != 100000 ]; then
  echo "expected 100000 entries stored; the proxy said:" >&2
  tail -5 "$DIR/proxy.log" >&2
  exit 1
fi
echo "per object: all $(( (FULL - FRESH) / 100000 )) B, first 50,000 $(( (HALF - FRESH) / 50000 )) B, second 50,000 $(( (FULL - HALF) / 50000 )) B"
