#!/usr/bin/env bash
# Fault suite, NATS node loss: a 3-node NATS cluster (JetStream, buckets with 3 replicas);
# AGENTS simulated agents online through one gateway; one command task to all of them; once
# KILL_AFTER results are stored, `kill -9` of NATS node 1. Clients of that node (the
# gateway's connections, the scheduler's, whichever landed there) reconnect to the others.
# Checks: every result stored exactly once, no target run twice, every agent got its task.
# Messages in flight on the killed node are lost (core NATS is at most once); what the
# agents sent is in their outboxes and sent again after AGENT_RESEND_MS, and tasks not
# confirmed are dispatched again by the scheduler after its dispatch timeout (a second
# attempt only if the first never reached the agent).
#
#   loadtest/scenarios/faults/nats-node-loss.sh                    # 10,000 agents
#   AGENTS=1000 KILL_AFTER=300 loadtest/scenarios/faults/nats-node-loss.sh
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
AGENTS="${AGENTS:-10000}"
RATE="${RATE:-2000}"
WORKERS="${WORKERS:-2}"
KILL_AFTER="${KILL_AFTER:-2000}"
AGENT_RESEND_MS="${AGENT_RESEND_MS:-15000}"
OUT="${OUT:-$ROOT/target/loadtest/faults/nats-node-loss}"

machine
start_nats_cluster
export WS_GATEWAY_LEASE_REPLICAS=3
start_gateway 1 "$NATS_URL"
SCHED_PORT="$((BASE_PORT + 100))"
env SCHEDULER_LISTEN="127.0.0.1:$SCHED_PORT" SCHEDULER_NATS_URL="$NATS_URL" \
  SCHEDULER_API_KEYS="$KEY" SCHEDULER_DB="$TMP/scheduler.redb" RUST_LOG=warn \
  SCHEDULER_LEASE_REPLICAS=3 SCHEDULER_INSTANCE=sched-a \
  SCHEDULER_COMMAND_KEY_FILE="$KEYS/command.key" SCHEDULER_AGENT_TOKEN_KEY_FILE="$KEYS/agent-token.key" \
  "${SVC_CORE[@]}" "$BIN/scheduler" >"$TMP/scheduler.log" 2>&1 &
SCHED_PID=$!
PIDS+=("$SCHED_PID")
wait_ready "$SCHED_PORT" scheduler "$TMP/scheduler.log"
sleep 1
echo "== NATS node loss: $AGENTS agents; kill -9 NATS node 1 after $KILL_AFTER results; agents resend after ${AGENT_RESEND_MS} ms"
loadtest --urls "$(urls)" --connections "$AGENTS" --sources 16 --concurrency 512 --user-prefix sim \
  run --scenario fleet --name nats-node-loss --workers "$WORKERS" --rate "$RATE" --hold-secs 1 \
  --scheduler "127.0.0.1:$SCHED_PORT" --kill-scheduler "$NATS_PID" --kill-label "NATS node 1" \
  --kill-after-results "$KILL_AFTER" --agent-resend-after-ms "$AGENT_RESEND_MS" \
  --max-secs "${MAX_SECS:-600}" --gateway-pids "$(gw_pids)" \
  --watch "scheduler=$SCHED_PID,nats2=${NATS_PIDS[1]},nats3=${NATS_PIDS[2]}" \
  --out "$OUT" --thresholds "$DIR/nats-node-loss.toml" --note "pinning=$PINNING" ${EXTRA:-}
echo "== who was on the killed node (reconnects in the logs):"
grep -il 'reconnect\|disconnect' "$TMP"/gw1.log "$TMP"/scheduler.log 2>/dev/null || echo "(no reconnect logged)"
