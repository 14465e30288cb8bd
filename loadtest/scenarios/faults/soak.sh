#!/usr/bin/env bash
# Fault suite, soak: CONNECTIONS app clients on one gateway for DURATION seconds; every
# second CHURN of them (8% by default) close their connection and reconnect at once; one
# SIZE-byte broadcast to everyone every INTERVAL seconds through ws-api. Measures the
# gateway's RSS after WARMUP seconds (least-squares slope in KiB per minute, and KiB per
# reconnect: a leak per connection shows there), and pushes lost inside a session: holes
# between a session's first and last push (`lost_in_session_gaps`) and pushes stamped while
# a connection was open that it never received (`missed_while_connected`, see
# loadtest/src/presence.rs). Pushes published while a user was between two connections
# are not expected (live delivery is at most once, docs/protocol.md 7.6).
#
#   loadtest/scenarios/faults/soak.sh                          # 1 hour, 10,000 clients, 8%/s
#   DURATION=900 WARMUP=120 loadtest/scenarios/faults/soak.sh  # a 15-minute version
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
DURATION="${DURATION:-3600}"
CONNECTIONS="${CONNECTIONS:-10000}"
CHURN="${CHURN:-0.08}"
INTERVAL="${INTERVAL:-5}"
SIZE="${SIZE:-1024}"
WARMUP="${WARMUP:-300}"
RATE="${RATE:-5000}"
WORKERS="${WORKERS:-2}"
RECEIPTS="${RECEIPTS:-}"
OUT="${OUT:-$ROOT/target/loadtest/faults/soak}"
PUSHES=$(( DURATION / INTERVAL ))

machine
start_nats
start_gateway 1
start_api
sleep 1
echo "== soak: $CONNECTIONS clients, churn $CHURN/s, $PUSHES broadcasts of $SIZE B every ${INTERVAL}s (${DURATION}s), RSS trend after ${WARMUP}s"
loadtest --urls "$(urls)" --connections "$CONNECTIONS" --sources 16 --concurrency 512 \
  run --scenario broadcast --name soak --workers "$WORKERS" --rate "$RATE" \
  --pushes "$PUSHES" --interval-secs "$INTERVAL" --size "$SIZE" $RECEIPTS --churn "$CHURN" \
  --via api --api "127.0.0.1:$API_PORT" --max-secs "$(( DURATION + 120 ))" \
  --rss-warmup-secs "$WARMUP" --gateway-pids "$(gw_pids)" \
  --watch "ws-api=$API_PID,nats=$NATS_PID" --out "$OUT" --thresholds "$DIR/soak.toml" \
  --note "pinning=$PINNING,duration_secs=$DURATION"
