#!/usr/bin/env bash
# Scenario 2, periodic broadcast with receipts (seed 002 scenario 2): CONNECTIONS users
# online; every INTERVAL seconds one SIZE-byte push to everyone through ws-api
# (`POST /v1/push`, target all, receipt: true); every client acks it. Prints delivered/s,
# acks/s, end-to-end latency p50/p99/max (ws-api call -> client, stamped in the body),
# lost deliveries, and ws-api's own receipt counts.
#
#   loadtest/scenarios/broadcast-receipts/run.sh     # 10,000 users, 24 pushes of 1 KiB every 5 s
#   VIA=nats loadtest/scenarios/broadcast-receipts/run.sh   # publish on ws.all, bypass ws-api
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME="${NAME:-broadcast-receipts}"
RECEIPTS="${RECEIPTS---receipts}"
CHURN="${CHURN:-0}"
THRESHOLDS="${THRESHOLDS:-$DIR/thresholds.toml}"
source "$DIR/../lib.sh"
CONNECTIONS="${CONNECTIONS:-10000}"
RATE="${RATE:-5000}"
GATEWAYS="${GATEWAYS:-1}"
WORKERS="${WORKERS:-2}"
PUSHES="${PUSHES:-24}"
INTERVAL="${INTERVAL:-5}"
SIZE="${SIZE:-1024}"
VIA="${VIA:-api}"
OUT="${OUT:-$ROOT/target/loadtest/$NAME}"

machine
start_nats
for i in $(seq 1 "$GATEWAYS"); do start_gateway "$i"; done
start_api
sleep 1
echo "== $NAME: $CONNECTIONS users over $GATEWAYS gateway(s); $PUSHES pushes of $SIZE B every ${INTERVAL}s via $VIA ${RECEIPTS:-(no receipts)}; churn $CHURN/s"
loadtest --urls "$(urls)" --connections "$CONNECTIONS" --sources 16 --concurrency 512 \
  run --scenario broadcast --name "$NAME" --workers "$WORKERS" --rate "$RATE" \
  --pushes "$PUSHES" --interval-secs "$INTERVAL" --size "$SIZE" $RECEIPTS --churn "$CHURN" \
  --via "$VIA" --api "127.0.0.1:$API_PORT" --nats-url "nats://127.0.0.1:$NATS_PORT" \
  --max-secs "$(( PUSHES * INTERVAL + 120 ))" --gateway-pids "$(gw_pids)" \
  --watch "ws-api=$API_PID,nats=$NATS_PID" --out "$OUT" --thresholds "$THRESHOLDS" \
  --note "pinning=$PINNING"
