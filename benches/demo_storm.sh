#!/bin/bash
# Issue 20's stale storm with default flags, on the demo backend (300 ms an
# answer): `swr-proxy demo --ttl 1s`, every one of 1,000 keys warmed, then
# 15 s of wrk (-t1 -c64) over them. Prints the adaptive refresh limit each
# second and the refreshes done against the ideal (about one per key per
# second: 15,000).
#
#   apt-get install -y wrk
#   cargo build --release
#   benches/demo_storm.sh [target/release/swr-proxy] [extra swr-proxy flags]
#
# Uses 127.0.0.1 ports 18095 and 18096; stops only the process it started.
set -uo pipefail
BIN=${1:-target/release/swr-proxy}
shift || true
DIR=$(mktemp -d /tmp/swr-storm.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
cat > "$DIR/rank.lua" <<'LUA'
local keys = tonumber(os.getenv("KEYS") or "1000")
function request()
  return wrk.format("GET", "/ranking?user=" .. math.random(0, keys - 1))
end
LUA
$BIN demo --listen 127.0.0.1:18095 --admin-listen 127.0.0.1:18096 --ttl 1s "$@" > $DIR/proxy.log 2>&1 &
PID=$!
sleep 1.5
# warm every key once
KEYS=1000 wrk -t1 -c64 -d3s -s $DIR/rank.lua http://127.0.0.1:18095 > /dev/null
m() { curl -s http://127.0.0.1:18096/metrics | awk -v k="$1" '$1==k{print $2}'; }
S0=$(m 'swr_refresh_events_total{event="succeeded"}')
KEYS=1000 wrk -t1 -c64 -d15s -s $DIR/rank.lua http://127.0.0.1:18095 > $DIR/wrk.txt &
W=$!
for i in $(seq 1 15); do sleep 1; echo "t=$i limit=$(m swr_refresh_limit) in_flight=$(m swr_refresh_in_flight) lat=$(m swr_refresh_latency_seconds) base=$(m swr_refresh_latency_baseline_seconds) queue=$(m swr_refresh_queue_depth)"; done
wait $W
S1=$(m 'swr_refresh_events_total{event="succeeded"}')
echo "refreshed=$(( ${S1%.*} - ${S0%.*} )) in 15 s; ideal about 15000 (1000 keys, ttl 1 s)"
grep -E "Requests/sec|Latency" $DIR/wrk.txt
curl -s http://127.0.0.1:18096/metrics | grep "^swr_requests_total"
kill $PID; wait $PID 2>/dev/null
