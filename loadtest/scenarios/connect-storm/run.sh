#!/usr/bin/env bash
# Scenario 1, connect storm (seed 002 scenario 1: "users come online"): CONNECTIONS users
# connect at RATE/s spread over GATEWAYS replicas and WORKERS load-generator processes,
# are held HOLD seconds, then closed. Prints connects/s, handshake p50/p99, errors, and
# each gateway's RSS per connection (VmRSS delta / its connections) and CPU per accept.
#
#   loadtest/scenarios/connect-storm/run.sh          # 30,000 over 2 gateways, 2 workers
#   CONNECTIONS=2000 RATE=1000 loadtest/scenarios/connect-storm/run.sh
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
CONNECTIONS="${CONNECTIONS:-30000}"
RATE="${RATE:-10000}"
GATEWAYS="${GATEWAYS:-2}"
WORKERS="${WORKERS:-2}"
HOLD="${HOLD:-10}"
OUT="${OUT:-$ROOT/target/loadtest/connect-storm}"

machine
start_nats
for i in $(seq 1 "$GATEWAYS"); do start_gateway "$i"; done
sleep 1
echo "== connect storm: $CONNECTIONS connections at $RATE/s over $GATEWAYS gateways, $WORKERS workers, hold ${HOLD}s"
loadtest --urls "$(urls)" --connections "$CONNECTIONS" --sources 16 --concurrency 512 \
  run --scenario storm --name connect-storm --workers "$WORKERS" --rate "$RATE" --hold-secs "$HOLD" \
  --max-secs 240 --gateway-pids "$(gw_pids)" --watch "nats=$NATS_PID" \
  --out "$OUT" --thresholds "$DIR/thresholds.toml" --note "pinning=$PINNING"
