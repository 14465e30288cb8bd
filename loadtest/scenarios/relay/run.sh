#!/usr/bin/env bash
# Relays (ADR 0015), side by side in one run: AGENTS simulated agents (the fleet scenario's
# agents) first connected to the gateway directly, then the same number behind RELAYS real
# relay agents (services/agent with AGENT_RELAY_LISTEN; the simulated agents' gateway URLs
# carry ?via=<relay>, spread evenly). For each phase, on a fresh scheduler:
#   - gateway sockets: established TCP connections on the gateway's port (ss);
#   - scheduler: simulated agents online (the fleet scenario waits for all of them);
#   - WINDOW seconds of steady heartbeats: payload bytes and segments on the gateway's
#     sockets (ss -ti: bytes_received + bytes_acked, segs_in + segs_out), per machine per
#     minute, and wire bytes estimated as payload + 52 bytes per segment (IPv4 + TCP with
#     timestamps); the simulated agents send heartbeats only (no status reports), the
#     relays are real agents and send their own heartbeats and reports, counted too;
#   - one command task to every simulated agent: create -> all results stored.
#
#   loadtest/scenarios/relay/run.sh                           # 5,000 agents, 50 relays
#   AGENTS=500 RELAYS=5 WINDOW=20 loadtest/scenarios/relay/run.sh
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
if [ -z "${LOADTEST_NO_BUILD:-}" ]; then cargo build --release -q -p agent; fi

AGENTS="${AGENTS:-5000}"
RELAYS="${RELAYS:-50}"
RATE="${RATE:-1000}"
WINDOW="${WINDOW:-60}"
HOLD="${HOLD:-$((WINDOW + 15))}"
HEARTBEAT_MS="${HEARTBEAT_MS:-10000}"
OUT="${OUT:-$ROOT/target/loadtest/relay}"
GW_PORT="$((BASE_PORT + 81))"
RELAY_PORT0="$((BASE_PORT + 300))"
mkdir -p "$OUT"

machine
start_nats
start_gateway 1
SCHED_PID=""

# sum of "bytes_received bytes_acked segs_in segs_out sockets" over the gateway's sockets
gw_counters() {
  ss -tinH state established "( sport = :$GW_PORT )" | awk '
    { for (i = 1; i <= NF; i++) {
        if ($i ~ /^bytes_received:/) { split($i, a, ":"); rx += a[2] }
        if ($i ~ /^bytes_acked:/)    { split($i, a, ":"); tx += a[2] }
        if ($i ~ /^segs_in:/)        { split($i, a, ":"); si += a[2] }
        if ($i ~ /^segs_out:/)       { split($i, a, ":"); so += a[2] }
      } }
    /^ESTAB|^[0-9]/ { n++ }
    END { printf "%d %d %d %d\n", rx, tx, si, so }'
}
gw_sockets() { ss -tnH state established "( sport = :$GW_PORT )" | wc -l; }

online() {
  curl -sf -H "Authorization: Bearer $KEY" \
    "http://127.0.0.1:$SCHED_PORT/v1/agents?label=fleet%3Dloadtest&state=online" |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("agents", [])))' 2>/dev/null || echo 0
}

fresh_scheduler() {
  if [ -n "$SCHED_PID" ]; then
    kill -TERM "$SCHED_PID"; wait "$SCHED_PID" 2>/dev/null || true
    rm -f "$TMP/scheduler.redb"
  fi
  start_scheduler
}

RELAY_PIDS=()
start_relays() {
  local i
  for i in $(seq 1 "$RELAYS"); do
    local port="$((RELAY_PORT0 + i))" node="relay-$i" d="$TMP/relay-$i"
    mkdir -p "$d"
    local token
    token="$("$BIN/scheduler" --mint-agent-token "$node" --token-ttl-secs 86400 \
      --agent-token-key-file "$KEYS/agent-token.key" || true)"
    [ -n "$token" ] || { echo "cannot mint a token for $node" >&2; exit 1; }
    env AGENT_NODE_ID="$node" AGENT_TOKEN="$token" AGENT_GATEWAYS="ws://127.0.0.1:$GW_PORT/ws" \
      AGENT_OUTBOX_PATH="$d/outbox.redb" AGENT_CREDENTIAL_PATH="$d/credential.jwt" \
      AGENT_COMMAND_KEYS_FILE="$KEYS/command.pub" AGENT_RELAY_LISTEN="127.0.0.1:$port" \
      AGENT_LABELS="role=relay" RUST_LOG=warn "${SVC_CORE[@]}" "$BIN/agent" >"$TMP/relay-$i.log" 2>&1 &
    RELAY_PIDS+=("$!"); PIDS+=("$!")
  done
  # Wait until every relay has its upstream connection (its own session is on it).
  for _ in $(seq 1 600); do
    [ "$(gw_sockets)" -ge "$RELAYS" ] && break
    sleep 0.1
  done
}

relay_urls() {
  local i urls=()
  for i in $(seq 1 "$RELAYS"); do urls+=("ws://127.0.0.1:$GW_PORT/ws?via=127.0.0.1:$((RELAY_PORT0 + i))"); done
  local IFS=,; echo "${urls[*]}"
}

# phase NAME URLS PREFIX: runs the fleet scenario and samples the gateway's sockets
phase() {
  local name="$1" urls="$2" prefix="$3"
  echo "== $name: $AGENTS agents; heartbeat ${HEARTBEAT_MS} ms; window ${WINDOW}s"
  loadtest --urls "$urls" --connections "$AGENTS" --sources 16 --concurrency 256 --user-prefix "$prefix" \
    run --scenario fleet --name "$name" --workers 2 --rate "$RATE" --hold-secs "$HOLD" \
    --scheduler "127.0.0.1:$SCHED_PORT" --max-secs 900 --gateway-pids "$(gw_pids)" \
    --watch "scheduler=$SCHED_PID,nats=$NATS_PID" --out "$OUT" \
    --note "pinning=$PINNING; $name" >"$OUT/$name.out" 2>&1 &
  local gen=$!
  for _ in $(seq 1 3000); do
    [ "$(online)" -ge "$AGENTS" ] && break
    kill -0 "$gen" 2>/dev/null || break
    sleep 0.2
  done
  sleep 3
  local sockets a b
  sockets="$(gw_sockets)"
  a="$(gw_counters)"
  sleep "$WINDOW"
  b="$(gw_counters)"
  wait "$gen" || true
  python3 - "$name" "$sockets" "$a" "$b" "$WINDOW" "$AGENTS" "$OUT/$name.json" <<'EOF' | tee -a "$OUT/relay-figures.txt"
import json, sys
name, sockets, a, b, window, agents, report = sys.argv[1:8]
a = list(map(int, a.split())); b = list(map(int, b.split()))
window, agents = float(window), int(agents)
d = [y - x for x, y in zip(a, b)]
per = lambda v: v / agents / (window / 60.0)
payload = per(d[0] + d[1]); segs = per(d[2] + d[3])
try:
    s = json.load(open(report))["summary"]
except Exception:
    s = {}
print(f"{name}: gateway sockets {sockets}; online at scheduler {s.get('agents_online_at_scheduler')}; "
      f"payload bytes/machine/min {payload:.0f} (in {per(d[0]):.0f}, out {per(d[1]):.0f}); "
      f"segments/machine/min {segs:.1f}; est. wire bytes/machine/min {payload + 52 * segs:.0f}; "
      f"task create -> all {s.get('results_stored')} results stored {s.get('all_results_stored_secs')} s; "
      f"connect errors {s.get('connect_errors')}")
EOF
}

fresh_scheduler
phase relay-direct "$(urls)" direct

fresh_scheduler
start_relays
phase relay-relayed "$(relay_urls)" relayed
echo "== figures in $OUT/relay-figures.txt"
