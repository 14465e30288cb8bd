#!/usr/bin/env bash
# Config push at fleet scale (seed 001: "config push latency 50 ms"): AGENTS simulated edge
# agents (as in the fleet scenario; they ack every config document as applied at once)
# connect through the gateway and register; then SINGLE documents go to one agent each
# (create -> applied as the operator sees it, polled every 2 ms: p50/p99/max), and one
# document goes to all of them (create -> all applied), with the scheduler's CPU and RSS.
#
#   loadtest/scenarios/config-push/run.sh                 # 10,000 agents, 100 single pushes
#   AGENTS=1000 SINGLE=20 loadtest/scenarios/config-push/run.sh
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
AGENTS="${AGENTS:-10000}"
RATE="${RATE:-2000}"
WORKERS="${WORKERS:-2}"
SINGLE="${SINGLE:-100}"
OUT="${OUT:-$ROOT/target/loadtest/config-push}"

machine
start_nats
start_gateway 1
start_scheduler
sleep 1
echo "== config push: $AGENTS agents, $SINGLE single-agent pushes, then one to all"
loadtest --urls "$(urls)" --connections "$AGENTS" --sources 16 --concurrency 512 --user-prefix sim \
  run --scenario fleet --config-push --config-single "$SINGLE" --name config-push --workers "$WORKERS" \
  --rate "$RATE" --hold-secs 1 --scheduler "127.0.0.1:$SCHED_PORT" --max-secs "${MAX_SECS:-600}" \
  --gateway-pids "$(gw_pids)" --watch "scheduler=$SCHED_PID,nats=$NATS_PID" --out "$OUT" \
  --note "pinning=$PINNING" ${EXTRA:-}
