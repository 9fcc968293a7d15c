#!/usr/bin/env bash
# One server under a fixed fan-out load from the peers' loadgen, with what the kernel and a sampling profile
# say about it: syscall and context-switch counts (perf stat, all the server's threads) and a call-graph
# profile (perf record, cpu-clock), each over 5 s of the measured window.
#
#   bench/profile.sh TAG RATE [lamplight args...]
#   bench/profile.sh w2 3000                       # lamplight as shipped, 3,000 events/s (300k deliveries/s)
#   bench/profile.sh w1 3000 --worker-threads 1
#   MOCK=1 bench/profile.sh floor 3000             # the bare tonic server (peers' mock-lamplight)
#   perf report -i target/profile/w2/perf.data --no-children --sort sym
#
# Needs what bench/compare.sh builds (target/release/lamplight, target/peers/loadgen-target) and Debian's
# linux-perf. Env: SUBS [1000] ROOMS [10] DURATION [25] PORT [3300] OUT [target/profile/TAG].
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,12p "$0" >&2; exit 2; }
TAG=$1 RATE=$2; shift 2
REPO=$(cd "$(dirname "$0")/.." && pwd)
LG=$REPO/target/peers/loadgen-target/release/loadgen
PORT=${PORT:-3300} SUBS=${SUBS:-1000} ROOMS=${ROOMS:-10} DURATION=${DURATION:-25}
OUT=${OUT:-$REPO/target/profile/$TAG}
SECRET=lamplight-bench-secret
command -v perf >/dev/null || { echo "missing perf (apt-get install linux-perf)" >&2; exit 1; }
[ -x "$LG" ] || { echo "missing $LG: run bench/compare.sh once (it builds the loadgen)" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)"
mkdir -p "$OUT"
if [ "${MOCK:-0}" = 1 ]; then
  "$REPO/target/peers/loadgen-target/release/mock-lamplight" "127.0.0.1:$PORT" >"$OUT/server.log" 2>&1 &
else
  "$REPO/target/release/lamplight" --listen "127.0.0.1:$PORT" --jwt-secret "$SECRET" "$@" >"$OUT/server.log" 2>&1 &
fi
SPID=$!
trap 'kill $SPID 2>/dev/null || true' EXIT
sleep 1
"$LG" --target grpc --addr "127.0.0.1:$PORT" --server-pid "$SPID" --jwt-secret "$SECRET" --mode fanout \
  --subs "$SUBS" --rooms "$ROOMS" --rate "$RATE" --duration "$DURATION" --warmup 3 >"$OUT/loadgen.json" 2>"$OUT/loadgen.log" &
LPID=$!
for _ in $(seq 240); do grep -q "connected $SUBS/" "$OUT/loadgen.log" 2>/dev/null && break; sleep 0.5; done
sleep 5 # past the warm-up
perf stat -t "$(ls /proc/$SPID/task | paste -sd,)" -o "$OUT/stat.txt" \
  -e syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_futex,syscalls:sys_enter_epoll_wait,sched:sched_switch \
  -- sleep 5
perf record -e cpu-clock -F 999 -g -p "$SPID" -o "$OUT/perf.data" -- sleep 5 2>/dev/null
wait "$LPID" || true
tail -n 1 "$OUT/loadgen.log" | cut -c1-400
grep -E 'sys_enter|sched' "$OUT/stat.txt"
