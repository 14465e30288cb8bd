#!/usr/bin/env bash
# Fault suite, scheduler loss: AGENTS simulated agents online through one gateway; two
# scheduler instances on one store file (A active, B standby, lease TTL LEASE_MS); one
# command task to all agents through A, and `kill -9` of A once KILL_AFTER results are
# stored (0: right after the create). B takes over. Checks: every result stored exactly
# once (results stored = targets), every agent got the task once, no target needed a
# second attempt. Results that A never saw come back because agents send unacknowledged
# results again after AGENT_RESEND_MS.
#
#   loadtest/scenarios/faults/scheduler-loss.sh                   # 10,000 agents
#   AGENTS=1000 KILL_AFTER=300 loadtest/scenarios/faults/scheduler-loss.sh
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
AGENTS="${AGENTS:-10000}"
RATE="${RATE:-2000}"
WORKERS="${WORKERS:-2}"
KILL_AFTER="${KILL_AFTER:-2000}"
LEASE_MS="${LEASE_MS:-3000}"
AGENT_RESEND_MS="${AGENT_RESEND_MS:-15000}"
OUT="${OUT:-$ROOT/target/loadtest/faults/scheduler-loss}"

start_instance() { # NAME PORT -> pid in INSTANCE_PID
  env SCHEDULER_LISTEN="127.0.0.1:$2" SCHEDULER_NATS_URL="nats://127.0.0.1:$NATS_PORT" \
    SCHEDULER_API_KEYS="$KEY" SCHEDULER_DB="$TMP/scheduler.redb" RUST_LOG=warn \
    SCHEDULER_INSTANCE="$1" SCHEDULER_LEASE_TTL_MS="$LEASE_MS" \
    SCHEDULER_COMMAND_KEY_FILE="$KEYS/command.key" SCHEDULER_AGENT_TOKEN_KEY_FILE="$KEYS/agent-token.key" \
    "${SVC_CORE[@]}" "$BIN/scheduler" >"$TMP/scheduler-$1.log" 2>&1 &
  INSTANCE_PID=$!
  PIDS+=("$INSTANCE_PID")
}

machine
start_nats
start_gateway 1
A_PORT="$((BASE_PORT + 100))"; B_PORT="$((BASE_PORT + 101))"
start_instance sched-a "$A_PORT"; A_PID=$INSTANCE_PID
wait_ready "$A_PORT" scheduler-a "$TMP/scheduler-sched-a.log"
start_instance sched-b "$B_PORT"; B_PID=$INSTANCE_PID
sleep 1
echo "== scheduler loss: $AGENTS agents; kill -9 the active scheduler after $KILL_AFTER results; lease ${LEASE_MS} ms; agents resend after ${AGENT_RESEND_MS} ms"
loadtest --urls "$(urls)" --connections "$AGENTS" --sources 16 --concurrency 512 --user-prefix sim \
  run --scenario fleet --name scheduler-loss --workers "$WORKERS" --rate "$RATE" --hold-secs 1 \
  --scheduler "127.0.0.1:$A_PORT,127.0.0.1:$B_PORT" --kill-scheduler "$A_PID" \
  --kill-after-results "$KILL_AFTER" --agent-resend-after-ms "$AGENT_RESEND_MS" \
  --max-secs "${MAX_SECS:-600}" --gateway-pids "$(gw_pids)" --watch "scheduler-b=$B_PID,nats=$NATS_PID" \
  --out "$OUT" --thresholds "$DIR/scheduler-loss.toml" --note "pinning=$PINNING" ${EXTRA:-}
