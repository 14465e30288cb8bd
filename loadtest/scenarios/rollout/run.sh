#!/usr/bin/env bash
# Staged rollout at fleet scale: AGENTS simulated edge agents (as in the fleet scenario)
# connect through the gateway and register; one rollout of a command goes over all of them
# (stages pilot 1%, gray 20%, full 100%, batches of 10% of each stage, auto-promoted, no
# pause, 5% of a stage tolerated) while FAIL% of the agents fail every task after the
# pilot. Expected: it halts in gray with failures <= threshold + one batch. Reports time per
# stage and the scheduler's CPU and RSS.
#
#   loadtest/scenarios/rollout/run.sh                      # 10,000 agents, 10% failing in gray
#   AGENTS=1000 FAIL=0 loadtest/scenarios/rollout/run.sh   # a clean run to the end
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
AGENTS="${AGENTS:-10000}"
RATE="${RATE:-2000}"
WORKERS="${WORKERS:-2}"
FAIL="${FAIL:-10}"
OUT="${OUT:-$ROOT/target/loadtest/rollout}"

machine
start_nats
start_gateway 1
start_scheduler
sleep 1
FAILING=()
if [ "$FAIL" -gt 0 ]; then FAILING=(--agent-fail-percent "$FAIL" --agent-fail-after-stage pilot); fi
echo "== rollout: $AGENTS agents, $FAIL% failing after the pilot"
loadtest --urls "$(urls)" --connections "$AGENTS" --sources 16 --concurrency 512 --user-prefix sim \
  run --scenario fleet --rollout --name rollout --workers "$WORKERS" --rate "$RATE" --hold-secs 1 \
  --scheduler "127.0.0.1:$SCHED_PORT" --max-secs "${MAX_SECS:-600}" --gateway-pids "$(gw_pids)" \
  --watch "scheduler=$SCHED_PID,nats=$NATS_PID" --out "$OUT" "${FAILING[@]}" \
  --note "pinning=$PINNING,fail_percent=$FAIL" ${EXTRA:-}
