#!/usr/bin/env bash
# Fault suite, gateway loss: CONNECTIONS app clients over 3 gateways (each client follows
# docs/protocol.md 13.1: on a lost connection it reconnects to the next gateway with
# exponential backoff and 0.3 jitter); KILL_AT seconds after the start, `kill -9` of
# gateway 2. Measures: connections lost, time until every client is back, each client's
# loss -> welcome time (p50/p99/max), and the reconnects per second (a storm shows as one
# second far above the mean).
#
#   loadtest/scenarios/faults/gateway-loss.sh                        # 30,000 clients
#   CONNECTIONS=3000 KILL_AT=6 loadtest/scenarios/faults/gateway-loss.sh
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
CONNECTIONS="${CONNECTIONS:-30000}"
RATE="${RATE:-3000}"
WORKERS="${WORKERS:-2}"
KILL_AT="${KILL_AT:-$((CONNECTIONS / RATE + 8))}"
HOLD="${HOLD:-15}"
OUT="${OUT:-$ROOT/target/loadtest/faults/gateway-loss}"

machine
start_nats
for i in 1 2 3; do start_gateway "$i"; done
sleep 1
echo "== gateway loss: $CONNECTIONS clients over 3 gateways; kill -9 gateway 2 at ${KILL_AT}s"
loadtest --urls "$(urls)" --connections "$CONNECTIONS" --sources 16 --concurrency 512 \
  run --scenario storm --name gateway-loss --workers "$WORKERS" --rate "$RATE" --hold-secs "$HOLD" \
  --reconnect --recover-secs 60 --max-secs 240 --gateway-pids "$(gw_pids)" --watch "nats=$NATS_PID" \
  --out "$OUT" --thresholds "$DIR/gateway-loss.toml" --note "pinning=$PINNING" &
LT=$!
sleep "$KILL_AT"
echo "== kill -9 gateway 2 (pid ${GW_PIDS[1]})"
kill -9 "${GW_PIDS[1]}"
wait "$LT"
