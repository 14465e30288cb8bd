#!/usr/bin/env bash
# ws-api figures for docs/benchmarks.md: push API end-to-end latency (HTTP call -> client
# receives) and accepted pushes per second through one ws-api replica. Loopback only,
# bounded in count, stops by itself.
#
#   loadtest/scenarios/api-bench.sh     # CLIENTS=1000 PUSHES=20000 HTTP=16 SIZE=256
#
# ws-gateway and ws-api share core 0; nats-server and the load generator share core 1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

CLIENTS="${CLIENTS:-1000}"
PUSHES="${PUSHES:-20000}"
HTTP="${HTTP:-16}"
SIZE="${SIZE:-256}"
GW_PORT="${GW_PORT:-18080}"
API_PORT="${API_PORT:-18090}"
NATS_PORT="${NATS_PORT:-14222}"
SECRET="bench-secret-bench-secret-bench-secret-0123"
KEY="bench-api-key-0123456789"

ulimit -n "$(ulimit -Hn)"
NATS_BIN="$("$ROOT/scripts/install-nats" | tail -n 1)"
cargo build --release -q -p ws-gateway -p ws-api -p loadtest
BIN="$ROOT/target/release"
if [ "$(nproc)" -ge 2 ]; then CORE0=(taskset -c 0); CORE1=(taskset -c 1); else CORE0=(); CORE1=(); fi

TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

ready() { for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "port $1 not ready" >&2; exit 1; }

"${CORE1[@]}" "$NATS_BIN" -c nats/single.conf -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$TMP/js" -l "$TMP/nats.log" &
PIDS+=($!)
sleep 0.5
env WS_GATEWAY_LISTEN="127.0.0.1:$GW_PORT" WS_GATEWAY_NATS_URL="nats://127.0.0.1:$NATS_PORT" \
  WS_GATEWAY_INSTANCE=bench-gw WS_GATEWAY_WORKERS=1 WS_GATEWAY_JWT_HS256_SECRET="$SECRET" WS_GATEWAY_MAX_CONNECTIONS_PER_IP=0 RUST_LOG=warn \
  "${CORE0[@]}" "$BIN/ws-gateway" >"$TMP/gw.log" 2>&1 &
PIDS+=($!)
env WS_API_LISTEN="127.0.0.1:$API_PORT" WS_API_NATS_URL="nats://127.0.0.1:$NATS_PORT" WS_API_KEYS="$KEY" \
  RUST_LOG=warn "${CORE0[@]}" "$BIN/ws-api" >"$TMP/api.log" 2>&1 &
PIDS+=($!)
ready "$GW_PORT"
ready "$API_PORT"

echo "== machine: $(nproc) cores; api-push: $PUSHES pushes of $SIZE bytes to $CLIENTS users, $HTTP HTTP connections"
LOADTEST_SECRET="$SECRET" LOADTEST_API_KEY="$KEY" "${CORE1[@]}" "$BIN/loadtest" \
  --urls "ws://127.0.0.1:$GW_PORT/ws" --connections "$CLIENTS" \
  api-push --api "127.0.0.1:$API_PORT" --pushes "$PUSHES" --http-concurrency "$HTTP" --size "$SIZE"
