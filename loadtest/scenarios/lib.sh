# Shared set-up for the scenario folders (sourced by each <scenario>/run.sh): builds the
# release binaries once, starts nats-server, gateways, ws-api and the scheduler on
# loopback with env config, pins them with taskset, and tears everything down on exit.
#
# Pinning on a 2+ core machine: services (gateways, ws-api, scheduler) on core 0;
# nats-server and the load generator (parent and workers) on core 1, so the generator
# does not steal the gateways' CPU. On a 1-core machine nothing is pinned.
#
# Environment knobs common to every scenario:
#   LOADTEST_NO_BUILD=1   skip `cargo build --release`
#   OUT=dir               where results go (default target/loadtest/<scenario>)
#   BASE_PORT=n           first port (default 19000; NATS on BASE_PORT+222)
#   BIN=dir               where the service binaries are (default target/release)
#   LOADTEST_BIN=path     the load generator (default target/release/loadtest)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

ulimit -n "$(ulimit -Hn)"
BASE_PORT="${BASE_PORT:-19000}"
NATS_PORT="$((BASE_PORT + 222))"
SECRET="bench-secret-bench-secret-bench-secret-0123"
KEY="bench-api-key-0123456789"
BIN="${BIN:-$ROOT/target/release}"
LOADTEST_BIN="${LOADTEST_BIN:-$ROOT/target/release/loadtest}"
NATS_BIN="$("$ROOT/scripts/install-nats" | tail -n 1)"
if [ -z "${LOADTEST_NO_BUILD:-}" ]; then
  cargo build --release -q -p ws-gateway -p ws-api -p scheduler -p loadtest
fi
if [ "$(nproc)" -ge 2 ]; then SVC_CORE=(taskset -c 0); GEN_CORE=(taskset -c 1); PINNING="services on core 0; nats-server and loadtest on core 1"
else SVC_CORE=(); GEN_CORE=(); PINNING="none (1 core)"; fi

TMP="$(mktemp -d)"
# Fleet keys (docs/security.md): the scheduler signs commands and agent tokens, gateways
# verify agent tokens, simulated agents sign their own tokens with the agent-token key.
KEYS="$TMP/keys"
"$BIN/scheduler" --keygen "$KEYS" >/dev/null
export LOADTEST_AGENT_TOKEN_KEY_FILE="$KEYS/agent-token.key"
PIDS=()
GW_PIDS=()
GW_URLS=()
# Alive and not a zombie (an exited child stays one until `wait`, and `kill -0` says yes).
running() { local st; st="$(ps -o stat= -p "$1" 2>/dev/null)" && [[ "$st" != Z* ]]; }
cleanup() {
  local p i
  # Last started, first stopped, each given up to 3 s: the services flush to NATS and
  # drain while it is still up (stopped all at once, their last events were lost).
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    kill -TERM "${PIDS[i]}" 2>/dev/null || continue
    for _ in $(seq 1 30); do running "${PIDS[i]}" || break; sleep 0.1; done
  done
  for _ in $(seq 1 100); do
    local alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Keep the services' logs next to the results (the evidence for what went wrong).
  if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/logs" && cp "$TMP"/*.log "$OUT/logs/" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
# A signal ends the script (and so runs the EXIT trap once); trapped without `exit`, the
# script carried on after its clean-up, still injecting its fault and writing its log.
trap 'exit 130' INT
trap 'exit 143' TERM

wait_ready() { # PORT NAME LOG
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "$2 did not become ready; log:" >&2; tail -20 "$3" >&2; exit 1
}

start_nats() {
  "${GEN_CORE[@]}" "$NATS_BIN" -c nats/single.conf -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$TMP/js" -l "$TMP/nats.log" &
  NATS_PID=$!
  PIDS+=("$NATS_PID")
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && return 0; sleep 0.05; done
  echo "nats-server did not start" >&2; exit 1
}

# A 3-node JetStream cluster (nats/cluster.conf) on NATS_PORT, +2, +4 (routes on +10..+12);
# NATS_URL is every node, NATS_PIDS each node's pid, NATS_PID the first's.
start_nats_cluster() {
  local routes="" i
  for i in 0 1 2; do routes+="${routes:+,}nats://127.0.0.1:$((NATS_PORT + 10 + i))"; done
  NATS_PIDS=(); NATS_URL=""
  for i in 0 1 2; do
    local port=$((NATS_PORT + 2 * i))
    "${GEN_CORE[@]}" "$NATS_BIN" -c nats/cluster.conf -a 127.0.0.1 -p "$port" --server_name "n$((i + 1))" \
      --cluster_name rt --cluster "nats://127.0.0.1:$((NATS_PORT + 10 + i))" --routes "$routes" \
      -js -sd "$TMP/js$i" -l "$TMP/nats$((i + 1)).log" &
    NATS_PIDS+=("$!"); PIDS+=("$!")
    NATS_URL+="${NATS_URL:+,}nats://127.0.0.1:$port"
  done
  NATS_PID="${NATS_PIDS[0]}"
  for i in 0 1 2; do
    local port=$((NATS_PORT + 2 * i))
    for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
  done
  # JetStream needs its meta leader before buckets can be made.
  sleep 3
}

start_gateway() { # INDEX [NATS_URL]
  local i="$1" port="$((BASE_PORT + 80 + $1))" nats_url="${2:-nats://127.0.0.1:$NATS_PORT}"
  env WS_GATEWAY_LISTEN="127.0.0.1:$port" WS_GATEWAY_NATS_URL="$nats_url" \
    WS_GATEWAY_INSTANCE="bench-gw-$i" WS_GATEWAY_WORKERS=1 WS_GATEWAY_JWT_HS256_SECRET="$SECRET" \
    WS_GATEWAY_AGENT_TOKEN_PUBLIC_KEY_FILE="$KEYS/agent-token.pub" WS_GATEWAY_MAX_CONNECTIONS=20000 WS_GATEWAY_MAX_CONNECTIONS_PER_IP=0 WS_GATEWAY_HEARTBEAT_BASE_MS="${HEARTBEAT_MS:-30000}" WS_GATEWAY_DRAIN_WINDOW_MS=1000 \
    RUST_LOG=warn "${SVC_CORE[@]}" "$BIN/ws-gateway" >"$TMP/gw$i.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid"); GW_PIDS+=("$pid"); GW_URLS+=("ws://127.0.0.1:$port/ws")
  wait_ready "$port" "gateway $i" "$TMP/gw$i.log"
}

start_api() {
  API_PORT="$((BASE_PORT + 90))"
  env WS_API_LISTEN="127.0.0.1:$API_PORT" WS_API_NATS_URL="nats://127.0.0.1:$NATS_PORT" WS_API_KEYS="$KEY" \
    RUST_LOG=warn "${SVC_CORE[@]}" "$BIN/ws-api" >"$TMP/api.log" 2>&1 &
  API_PID=$!
  PIDS+=("$API_PID")
  wait_ready "$API_PORT" ws-api "$TMP/api.log"
}

start_scheduler() {
  SCHED_PORT="$((BASE_PORT + 100))"
  env SCHEDULER_LISTEN="127.0.0.1:$SCHED_PORT" SCHEDULER_NATS_URL="nats://127.0.0.1:$NATS_PORT" \
    SCHEDULER_API_KEYS="$KEY" SCHEDULER_DB="$TMP/scheduler.redb" RUST_LOG=warn \
    SCHEDULER_COMMAND_KEY_FILE="$KEYS/command.key" SCHEDULER_AGENT_TOKEN_KEY_FILE="$KEYS/agent-token.key" \
    "${SVC_CORE[@]}" "$BIN/scheduler" >"$TMP/scheduler.log" 2>&1 &
  SCHED_PID=$!
  PIDS+=("$SCHED_PID")
  wait_ready "$SCHED_PORT" scheduler "$TMP/scheduler.log"
}

urls() { local IFS=,; echo "${GW_URLS[*]}"; }
gw_pids() { local IFS=,; echo "${GW_PIDS[*]}"; }

machine() {
  echo "== binaries: services from $BIN, generator $LOADTEST_BIN"
  echo "== machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/{print $2}') GiB, Linux $(uname -r); pinning: $PINNING"
}

# loadtest ARGS...: the generator on its core, with the secret and key.
loadtest() {
  LOADTEST_SECRET="$SECRET" LOADTEST_API_KEY="$KEY" "${GEN_CORE[@]}" "$LOADTEST_BIN" "$@"
}
