#!/usr/bin/env bash
# Gateway figures for docs/benchmarks.md: memory per idle connection, accept rate, and
# broadcast fan-out, on loopback, bounded in count and time.
#
#   loadtest/scenarios/gateway-bench.sh            # defaults below
#   IDLE=15000 FANOUT=10000 MESSAGES=100 loadtest/scenarios/gateway-bench.sh
#
# The gateway is pinned to core 0 and the load generator (and nats-server) to core 1 when
# the machine has 2+ cores, so the two do not compete for the same core.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

IDLE="${IDLE:-15000}"
CONNECT="${CONNECT:-15000}"
FANOUT="${FANOUT:-10000}"
MESSAGES="${MESSAGES:-100}"
SIZE="${SIZE:-1024}"
HOLD="${HOLD:-10}"
PORT="${PORT:-18080}"
NATS_PORT="${NATS_PORT:-14222}"
SECRET="bench-secret-bench-secret-bench-secret-0123"

ulimit -n "$(ulimit -Hn)"
NATS_BIN="$("$ROOT/scripts/install-nats" | tail -n 1)"
cargo build --release -q -p ws-gateway -p loadtest
GW="${GW_BIN:-$ROOT/target/release/ws-gateway}"
LT="$ROOT/target/release/loadtest"

# Core pinning prefix (empty on a 1-core machine). Used without a function wrapper so that
# `$!` is the process itself, not a subshell.
if [ "$(nproc)" -ge 2 ]; then CORE0=(taskset -c 0); CORE1=(taskset -c 1); else CORE0=(); CORE1=(); fi

TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

"${CORE1[@]}" "$NATS_BIN" -c nats/single.conf -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$TMP/js" -l "$TMP/nats.log" &
PIDS+=($!)
sleep 0.5

start_gateway() {
  env ${GW_ENV:-} WS_GATEWAY_LISTEN="127.0.0.1:$PORT" WS_GATEWAY_NATS_URL="nats://127.0.0.1:$NATS_PORT" \
  WS_GATEWAY_INSTANCE="bench-gw" WS_GATEWAY_WORKERS=1 WS_GATEWAY_JWT_HS256_SECRET="$SECRET" \
  WS_GATEWAY_MAX_CONNECTIONS=20000 WS_GATEWAY_MAX_CONNECTIONS_PER_IP=0 WS_GATEWAY_HEARTBEAT_BASE_MS=30000 RUST_LOG=warn \
    "${CORE0[@]}" "$GW" >"$TMP/gw.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
  for _ in $(seq 1 200); do
    if curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then return 0; fi
    sleep 0.05
  done
  echo "gateway did not become ready" >&2; cat "$TMP/gw.log" >&2; exit 1
}

lt() { LOADTEST_GATEWAY_PID="$GW_PID" LOADTEST_SECRET="$SECRET" "${CORE1[@]}" "$LT" --urls "ws://127.0.0.1:$PORT/ws" "$@"; }

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $(uname -r)"
echo "== idle: $IDLE connections held ${HOLD}s (fresh gateway)"
start_gateway
sleep 1
BASE="$(awk '/VmRSS/{print $2}' /proc/$GW_PID/status)"
echo "gateway baseline RSS: ${BASE} KiB"
LOADTEST_BASELINE_RSS_KIB="$BASE" lt --connections "$IDLE" --sources 16 idle --hold-secs "$HOLD" --pid "$GW_PID"
kill "$GW_PID" 2>/dev/null || true; wait "$GW_PID" 2>/dev/null || true

echo "== connect: $CONNECT connections as fast as the client can open them (fresh gateway)"
start_gateway
lt --connections "$CONNECT" --sources 16 --concurrency 512 connect
kill "$GW_PID" 2>/dev/null || true; wait "$GW_PID" 2>/dev/null || true

echo "== fanout: $MESSAGES broadcast pushes of $SIZE bytes to $FANOUT sockets (fresh gateway)"
start_gateway
lt --connections "$FANOUT" --sources 16 fanout --nats-url "nats://127.0.0.1:$NATS_PORT" --messages "$MESSAGES" --size "$SIZE"
echo "== gateway metrics after fanout"
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^ws_gateway_(pushes_delivered|closes|frames_out|nats_publish_errors)' || true
