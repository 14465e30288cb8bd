#!/usr/bin/env bash
# Scenario 5, fleet: AGENTS simulated edge agents (the fleet contract of
# libs/messages/src/fleet.rs, as services/agent speaks it: register after the welcome,
# heartbeats at 90% of the gateway's interval, task -> started + result, acks counted)
# connect through the gateway; once the scheduler lists them online, HOLD seconds of
# heartbeats measure the scheduler's CPU and RSS; then one command task goes to all of
# them through `POST /v1/tasks` (label selector) and the scheduler's task listing is
# polled until every result is stored.
#
#   loadtest/scenarios/fleet/run.sh                  # 10,000 agents
#   AGENTS=500 HOLD=5 loadtest/scenarios/fleet/run.sh
#   EXTRA=--agent-skip-started loadtest/scenarios/fleet/run.sh   # diagnostic: no task.started
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
AGENTS="${AGENTS:-10000}"
RATE="${RATE:-2000}"
GATEWAYS="${GATEWAYS:-1}"
WORKERS="${WORKERS:-2}"
HOLD="${HOLD:-35}"
OUT="${OUT:-$ROOT/target/loadtest/fleet}"
HEARTBEAT_MS="${HEARTBEAT_MS:-10000}"

machine
start_nats
for i in $(seq 1 "$GATEWAYS"); do start_gateway "$i"; done
start_scheduler
sleep 1
echo "== fleet: $AGENTS agents over $GATEWAYS gateway(s), $WORKERS workers; heartbeat window ${HOLD}s; one command task to all"
loadtest --urls "$(urls)" --connections "$AGENTS" --sources 16 --concurrency 512 --user-prefix sim \
  run --scenario fleet --name fleet --workers "$WORKERS" --rate "$RATE" --hold-secs "$HOLD" \
  --scheduler "127.0.0.1:$SCHED_PORT" --max-secs "${MAX_SECS:-900}" --gateway-pids "$(gw_pids)" \
  --watch "scheduler=$SCHED_PID,nats=$NATS_PID" --out "$OUT" --thresholds "$DIR/thresholds.toml" \
  --note "pinning=$PINNING" ${EXTRA:-}
