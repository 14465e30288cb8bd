#!/usr/bin/env bash
# Fault suite, gateway loss with agents among the clients: 3 gateways hold AGENTS simulated
# agents and CONNECTIONS app clients (two load-generator processes: the fleet scenario for
# the agents, the storm scenario for the clients, both with `--reconnect`). One command
# task goes to every agent through the scheduler; once KILL_AFTER results are stored, the
# agents' generator sends `kill -9` to gateway 2 (`--kill-scheduler` takes any pid). Every
# lost connection, agent or client, reconnects as services/agent does (crate::redial:
# another gateway drawn at random, backoff from 100 ms doubling with 0.3 jitter); agents
# register again and send their outbox (results not yet acknowledged) on the new
# connection.
# Checks, agents (gateway-loss-agents.toml): every agent back, no reconnect second above 2x
# the mean, every result stored exactly once (stored = targets, the scheduler ingests by
# message id), no agent received its task twice, the task finished. Clients
# (gateway-loss.toml): every client back, no second above 2x the mean.
# Each generator writes its own report: gateway-loss-agents.{json,html} (agents) and
# gateway-loss-clients.{json,html} (app clients) under OUT.
#
#   loadtest/scenarios/faults/gateway-loss-agents.sh                  # 15,000 + 15,000
#   AGENTS=2000 CONNECTIONS=2000 KILL_AFTER=500 HOLD=40 loadtest/scenarios/faults/gateway-loss-agents.sh
#
# HOLD is how long the clients are held before their recovery is read: it must outlast the
# agents' connect, registration and the first KILL_AFTER results (the script says so when
# it did not).
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
AGENTS="${AGENTS:-15000}"
CONNECTIONS="${CONNECTIONS:-15000}"
RATE="${RATE:-2000}"
WORKERS="${WORKERS:-2}"
KILL_AFTER="${KILL_AFTER:-$((AGENTS / 3))}"
HOLD="${HOLD:-90}"
AGENT_RESEND_MS="${AGENT_RESEND_MS:-15000}"
MAX_SECS="${MAX_SECS:-400}"
OUT="${OUT:-$ROOT/target/loadtest/faults/gateway-loss-agents}"

machine
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
start_nats
for i in 1 2 3; do start_gateway "$i"; done
start_scheduler
sleep 1
echo "== gateway loss with agents: $AGENTS agents + $CONNECTIONS app clients over 3 gateways; kill -9 gateway 2 (pid ${GW_PIDS[1]}) after $KILL_AFTER results"
# The app clients first: open, then held through the kill, then their recovery is read.
loadtest --urls "$(urls)" --connections "$CONNECTIONS" --sources 16 --concurrency 512 --user-prefix app \
  run --scenario storm --name gateway-loss-clients --workers "$WORKERS" --rate "$RATE" --hold-secs "$HOLD" \
  --reconnect --recover-secs 60 --max-secs "$MAX_SECS" \
  --out "$OUT" --thresholds "$DIR/gateway-loss.toml" --note "pinning=$PINNING" &
CLIENTS=$!
sleep "$((CONNECTIONS / RATE + 3))"
set +e
loadtest --urls "$(urls)" --connections "$AGENTS" --sources 16 --concurrency 512 --user-prefix sim \
  run --scenario fleet --name gateway-loss-agents --workers "$WORKERS" --rate "$RATE" --hold-secs 1 \
  --scheduler "127.0.0.1:$SCHED_PORT" --kill-scheduler "${GW_PIDS[1]}" --kill-label "gateway 2" \
  --kill-after-results "$KILL_AFTER" --agent-resend-after-ms "$AGENT_RESEND_MS" \
  --reconnect --recover-secs 60 --max-secs "$MAX_SECS" \
  --gateway-pids "$(gw_pids)" --watch "scheduler=$SCHED_PID,nats=$NATS_PID" \
  --out "$OUT" --thresholds "$DIR/gateway-loss-agents.toml" --note "pinning=$PINNING" ${EXTRA:-}
AGENTS_RC=$?
wait "$CLIENTS"
CLIENTS_RC=$?
set -e
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$OUT/gateway-loss-clients.json" <<'PY' || true
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
if not s.get("lost_connections"):
    print("== the app clients lost nothing: their hold (HOLD) ended before the kill; raise HOLD")
PY
echo "== agents run exit $AGENTS_RC, app clients run exit $CLIENTS_RC"
[ "$AGENTS_RC" = 0 ] && [ "$CLIENTS_RC" = 0 ]
