#!/usr/bin/env bash
# Fault suite, NATS node loss during a broadcast with receipts: a 3-node NATS cluster; 3
# gateways, ws-api and the load generator each connect to the cluster (every node's URL;
# the NATS client picks one at random and moves to another on loss); CONNECTIONS users
# online over the 3 gateways; every INTERVAL seconds one SIZE-byte push to everyone through
# ws-api (`POST /v1/push`, target all, receipt: true), which every client acks. KILL_AT
# seconds after the first push, `kill -9` of NATS node 1.
# Counts: deliveries expected / received / lost, ws-api's receipts (targeted / delivered /
# acked) and which process was on the killed node. Core NATS is at most once: a push or an
# ack in flight on the killed node, or published to it before its clients noticed, is gone
# (protocol 7.5 and 7.6: a push is live delivery; a client that must not miss one recovers
# by position, ADR 0017). What the run must show is that loss stops at the reconnect: no
# push lost after it, no client closed, no ws-api call left unanswered.
#
#   loadtest/scenarios/faults/nats-node-loss-broadcast.sh            # 10,000 users, 24 pushes
#   PUSHES=120 INTERVAL=0.5 KILL_AT=20 loadtest/scenarios/faults/nats-node-loss-broadcast.sh
#   CONNECTIONS=2000 PUSHES=8 INTERVAL=2 KILL_AT=5 loadtest/scenarios/faults/nats-node-loss-broadcast.sh
#   KILL_NODE=ws-api ...   # kill the node ws-api is connected to (default: node 1)
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
CONNECTIONS="${CONNECTIONS:-10000}"
RATE="${RATE:-5000}"
WORKERS="${WORKERS:-2}"
PUSHES="${PUSHES:-24}"
INTERVAL="${INTERVAL:-5}"
SIZE="${SIZE:-1024}"
BROADCAST_SECS="$(echo "$PUSHES * $INTERVAL / 1" | bc)"
KILL_AT="${KILL_AT:-$((BROADCAST_SECS / 3))}"
OUT="${OUT:-$ROOT/target/loadtest/faults/nats-node-loss-broadcast}"
KILL_NODE="${KILL_NODE:-1}"

machine
start_nats_cluster
export WS_GATEWAY_LEASE_REPLICAS=3
for i in 1 2 3; do start_gateway "$i" "$NATS_URL"; done
API_PORT="$((BASE_PORT + 90))"
env WS_API_LISTEN="127.0.0.1:$API_PORT" WS_API_NATS_URL="$NATS_URL" WS_API_KEYS="$KEY" WS_API_KV_REPLICAS=3 \
  RUST_LOG=info "${SVC_CORE[@]}" "$BIN/ws-api" >"$TMP/api.log" 2>&1 &
API_PID=$!
PIDS+=("$API_PID")
wait_ready "$API_PORT" ws-api "$TMP/api.log"
sleep 1
if [ "$KILL_NODE" = ws-api ]; then
  # The node whose client port ws-api's connection ends at: the worst case for presence
  # and receipts (every event in flight to ws-api is lost with it).
  port="$(ss -Htnp state established | awk -v pid="pid=$API_PID," -v lo="$NATS_PORT" '
    index($0, pid) { n = split($4, a, ":"); p = a[n] + 0
      if (p == lo || p == lo + 2 || p == lo + 4) { print p; exit } }')"
  [ -n "$port" ] || { echo "cannot tell which NATS node ws-api is on" >&2; exit 1; }
  KILL_NODE=$(( (port - NATS_PORT) / 2 + 1 ))
  echo "== ws-api is on NATS node $KILL_NODE"
fi
case "$KILL_NODE" in 1|2|3) ;; *) echo "KILL_NODE must be 1, 2, 3 or ws-api" >&2; exit 2 ;; esac
KILL_PID="${NATS_PIDS[$((KILL_NODE - 1))]}"
WATCH="ws-api=$API_PID"
for i in 1 2 3; do [ "$i" = "$KILL_NODE" ] || WATCH+=",nats$i=${NATS_PIDS[$((i - 1))]}"; done
CONNECT_SECS=$(( CONNECTIONS / RATE + 3 ))
echo "== NATS node loss during a broadcast with receipts: $CONNECTIONS users over 3 gateways;" \
  "$PUSHES pushes of $SIZE B every ${INTERVAL}s; kill -9 NATS node $KILL_NODE ${KILL_AT}s after the first push"
loadtest --urls "$(urls)" --connections "$CONNECTIONS" --sources 16 --concurrency 512 \
  run --scenario broadcast --name nats-node-loss-broadcast --workers "$WORKERS" --rate "$RATE" \
  --pushes "$PUSHES" --interval-secs "$INTERVAL" --size "$SIZE" --receipts \
  --via api --api "127.0.0.1:$API_PORT" --nats-url "$NATS_URL" \
  --max-secs "$(( BROADCAST_SECS + 180 ))" --gateway-pids "$(gw_pids)" \
  --watch "$WATCH" --out "$OUT" \
  --thresholds "$DIR/nats-node-loss-broadcast.toml" --note "pinning=$PINNING" ${EXTRA:-} &
LT=$!
sleep "$(( CONNECT_SECS + KILL_AT ))"
echo "== kill -9 NATS node $KILL_NODE (pid $KILL_PID) at $(date +%T.%N | cut -c1-12)"
kill -9 "$KILL_PID"
wait "$LT" || STATUS=$?
echo "== who was on the killed node (reconnects in the logs):"
grep -il 'reconnect\|disconnect' "$TMP"/gw*.log "$TMP"/api.log 2>/dev/null || echo "(no reconnect logged)"
exit "${STATUS:-0}"
