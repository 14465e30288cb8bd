#!/usr/bin/env bash
# Gateway figures for docs/benchmarks.md: memory per idle connection, accept rate, and
# broadcast fan-out, on loopback, bounded in count and time; each measured on ws-gateway
# AND on two in-repo reference servers (loadtest/src/bin/ref-tokio.rs: bare
# tokio-tungstenite; loadtest/src/bin/ref-actix.rs: bare actix-web + actix-ws, one actor
# per connection), with the same client and the same pinning, then printed side by side
# with ratios to ref-tokio.
#
#   loadtest/scenarios/gateway-bench.sh            # defaults below
#   IDLE=15000 FANOUT=10000 MESSAGES=100 loadtest/scenarios/gateway-bench.sh
#   SERVERS="ref-tokio ref-actix" loadtest/scenarios/gateway-bench.sh   # only the references
#   (gateway-tls: the gateway terminating wss:// itself, a full TLS handshake per connection)
#
# Knobs: IDLE, CONNECT, FANOUT (connections per scenario), MESSAGES and SIZE (the fan-out
# burst), HOLD (seconds the idle connections are held), SERVERS (which servers, in order),
# PORT, NATS_PORT, GW_BIN (a prebuilt gateway), LOADTEST_NO_BUILD=1 (skip cargo build).
#
# Every server is started fresh for each scenario and pinned to core 0; the load generator
# and nats-server run on core 1 (when the machine has 2+ cores), so they do not compete
# with the server. Server CPU is read from /proc/<pid>/stat by the load generator
# (LOADTEST_GATEWAY_PID), memory from /proc/<pid>/status.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

IDLE="${IDLE:-15000}"
CONNECT="${CONNECT:-15000}"
FANOUT="${FANOUT:-10000}"
MESSAGES="${MESSAGES:-100}"
SIZE="${SIZE:-1024}"
HOLD="${HOLD:-10}"
LIGHT_RATE="${LIGHT_RATE:-2}"          # pushes/s to FANOUT sockets: 2 x 10,000 = 20k deliveries/s
LIGHT_MESSAGES="${LIGHT_MESSAGES:-60}" # 30 s at the default rate
SERVERS="${SERVERS:-gateway gateway-tls ref-tokio ref-actix}"
PORT="${PORT:-18080}"
NATS_PORT="${NATS_PORT:-14222}"
HEARTBEAT_MS=30000
SECRET="bench-secret-bench-secret-bench-secret-0123"
read -r -a SERVER_LIST <<<"$SERVERS"
for s in "${SERVER_LIST[@]}"; do
  case "$s" in gateway | gateway-tls | ref-tokio | ref-actix) ;; *) echo "unknown server in SERVERS: $s" >&2; exit 2 ;; esac
done

ulimit -n "$(ulimit -Hn)"
NATS_BIN="$("$ROOT/scripts/install-nats" | tail -n 1)"
if [ -z "${LOADTEST_NO_BUILD:-}" ]; then
  if [[ " $SERVERS " == *" gateway"* ]]; then
    cargo build --release -q -p ws-gateway -p loadtest
  else
    cargo build --release -q -p loadtest
  fi
fi
GW="${GW_BIN:-$ROOT/target/release/ws-gateway}"
LT="$ROOT/target/release/loadtest"
REF_DIR="$ROOT/target/release"

# Core pinning prefix (empty on a 1-core machine). Used without a function wrapper so that
# `$!` is the process itself, not a subshell.
if [ "$(nproc)" -ge 2 ]; then CORE0=(taskset -c 0); CORE1=(taskset -c 1); else CORE0=(); CORE1=(); fi

TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

"${CORE1[@]}" "$NATS_BIN" -c nats/single.conf -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$TMP/js" -l "$TMP/nats.log" &
PIDS+=($!)
sleep 0.5

# gateway-tls: the same gateway terminating wss:// itself with a throwaway CA's certificate
# (ECDSA P-256); the client verifies it and makes a full handshake per connection.
if [[ " $SERVERS " == *" gateway-tls "* ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj "/CN=bench CA" -keyout "$TMP/ca.key" -out "$TMP/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
    -keyout "$TMP/gw.key" -out "$TMP/gw.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$TMP/ext"
  openssl x509 -req -in "$TMP/gw.csr" -CA "$TMP/ca.pem" -CAkey "$TMP/ca.key" -CAcreateserial \
    -days 1 -extfile "$TMP/ext" -out "$TMP/gw.pem" 2>/dev/null
  export LOADTEST_CA_FILE="$TMP/ca.pem"
fi
TLS_ENV=""

start_gateway() {
  env ${GW_ENV:-} $TLS_ENV WS_GATEWAY_LISTEN="127.0.0.1:$PORT" WS_GATEWAY_NATS_URL="nats://127.0.0.1:$NATS_PORT" \
  WS_GATEWAY_INSTANCE="bench-gw" WS_GATEWAY_WORKERS=1 WS_GATEWAY_JWT_HS256_SECRET="$SECRET" \
  WS_GATEWAY_MAX_CONNECTIONS=20000 WS_GATEWAY_MAX_CONNECTIONS_PER_IP=0 WS_GATEWAY_HEARTBEAT_BASE_MS="$HEARTBEAT_MS" RUST_LOG=warn \
    "${CORE0[@]}" "$GW" >"$TMP/gw.log" 2>&1 &
  SRV_PID=$!
  PIDS+=("$SRV_PID")
  for _ in $(seq 1 200); do
    if curl -sf --cacert "$TMP/ca.pem" "$SCHEME://localhost:$PORT/readyz" >/dev/null 2>&1; then return 0; fi
    sleep 0.05
  done
  echo "gateway did not become ready" >&2; cat "$TMP/gw.log" >&2; exit 1
}

# A reference server subscribes to NATS before it listens, so an open port means ready.
start_ref() { # NAME
  REF_LISTEN="127.0.0.1:$PORT" REF_NATS_URL="nats://127.0.0.1:$NATS_PORT" REF_HEARTBEAT_MS="$HEARTBEAT_MS" \
    "${CORE0[@]}" "$REF_DIR/$1" >"$TMP/$1.log" 2>&1 &
  SRV_PID=$!
  PIDS+=("$SRV_PID")
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "$1 did not start listening" >&2; cat "$TMP/$1.log" >&2; exit 1
}

start_server() { # NAME
  SCHEME=http; WS_URL="ws://127.0.0.1:$PORT/ws"; TLS_ENV=""
  case "$1" in
    gateway) start_gateway ;;
    gateway-tls)
      SCHEME=https; WS_URL="wss://localhost:$PORT/ws"
      TLS_ENV="WS_GATEWAY_TLS_CERT=$TMP/gw.pem WS_GATEWAY_TLS_KEY=$TMP/gw.key"
      start_gateway ;;
    *) start_ref "$1" ;;
  esac
  sleep 1
}

stop_server() { kill "$SRV_PID" 2>/dev/null || true; wait "$SRV_PID" 2>/dev/null || true; }

rss_kib() { awk '/VmRSS/{print $2}' "/proc/$1/status" 2>/dev/null || true; }
rss_mib() { local k; k="$(rss_kib "$1")"; if [ -n "$k" ]; then calc "$k / 1024" 1; fi; }

lt() { LOADTEST_GATEWAY_PID="$SRV_PID" LOADTEST_SECRET="$SECRET" "${CORE1[@]}" "$LT" --urls "$WS_URL" "$@"; }

# run_lt NAME SCENARIO ARGS...: runs the generator, shows its output, keeps the JSON report
# (its last line) in $TMP/NAME-SCENARIO.json (empty when the run failed).
run_lt() {
  local name="$1" scenario="$2"; shift 2
  if ! lt "$@" | tee "$TMP/$name-$scenario.out"; then echo "!! loadtest failed ($name, $scenario)" >&2; fi
  grep '^{' "$TMP/$name-$scenario.out" | tail -n 1 >"$TMP/$name-$scenario.json" || true
}

# Figures, keyed "server:figure".
declare -A VAL
jqf() { jq -r "$2 // empty" "$TMP/$1.json" 2>/dev/null || true; } # FILE FILTER
calc() { awk "BEGIN { v = $1; printf \"%.${2:-1}f\", v }"; }         # EXPR [DECIMALS]

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; $(uname -r); servers: ${SERVER_LIST[*]}"
echo "   (the generator's lines say \"gateway\" for whichever server is under test)"

for name in "${SERVER_LIST[@]}"; do
  echo
  echo "== [$name] idle: $IDLE connections held ${HOLD}s (fresh server)"
  start_server "$name"
  BASE="$(rss_kib "$SRV_PID")"
  VAL[$name:rss_start]="$(rss_mib "$SRV_PID")"
  echo "$name baseline RSS: ${BASE} KiB"
  LOADTEST_BASELINE_RSS_KIB="$BASE" run_lt "$name" idle --connections "$IDLE" --sources 16 idle --hold-secs "$HOLD" --pid "$SRV_PID"
  v="$(jqf "$name-idle" .gateway_bytes_per_connection)"; [ -n "$v" ] && VAL[$name:idle_kb]="$(calc "$v / 1000" 1)"
  VAL[$name:idle_open]="$(jqf "$name-idle" .connections)/$IDLE"
  stop_server

  echo "== [$name] connect: $CONNECT connections as fast as the client can open them (fresh server)"
  start_server "$name"
  run_lt "$name" connect --connections "$CONNECT" --sources 16 --concurrency 512 connect
  n="$(jqf "$name-connect" .connections)"
  v="$(jqf "$name-connect" .accepts_per_sec)"; [ -n "$v" ] && VAL[$name:accepts]="$(calc "$v" 0)"
  cpu="$(jqf "$name-connect" .gateway_cpu_secs)"
  [ -n "$cpu" ] && [ "${n:-0}" -gt 0 ] && VAL[$name:accept_us]="$(calc "$cpu * 1000000 / $n" 0)"
  stop_server

  echo "== [$name] fanout: $MESSAGES broadcast pushes of $SIZE bytes to $FANOUT sockets (fresh server)"
  start_server "$name"
  run_lt "$name" fanout --connections "$FANOUT" --sources 16 fanout --nats-url "nats://127.0.0.1:$NATS_PORT" --messages "$MESSAGES" --size "$SIZE"
  # The generator has exited (its clients closed): what the server still holds after the burst.
  VAL[$name:rss_end]="$(rss_mib "$SRV_PID")"
  delivered="$(jqf "$name-fanout" .delivered)"
  v="$(jqf "$name-fanout" .deliveries_per_sec)"; [ -n "$v" ] && VAL[$name:fan_rate]="$(calc "$v" 0)"
  cpu="$(jqf "$name-fanout" .gateway_cpu_secs)"
  [ -n "$cpu" ] && [ "${delivered:-0}" -gt 0 ] && VAL[$name:fan_cpu]="$(calc "$cpu * 1000000 / $delivered" 2)"
  VAL[$name:fan_done]="${delivered:-?}/$(jqf "$name-fanout" .expected)"
  p99="$(jqf "$name-fanout" .latency_p99_ms)"; [ -n "$p99" ] && VAL[$name:fan_p99]="$(calc "$p99" 0)"
  if [[ "$name" == gateway* ]]; then
    echo "== gateway metrics after fanout"
    curl -s --cacert "$TMP/ca.pem" "$SCHEME://localhost:$PORT/metrics" | grep -E '^ws_gateway_(pushes_delivered|closes|frames_out|nats_publish_errors)' || true
  fi
  sleep 10
  VAL[$name:rss_10s]="$(rss_mib "$SRV_PID")"
  echo "$name RSS 10 s after the fan-out burst: ${VAL[$name:rss_10s]} MiB"
  stop_server

  echo "== [$name] light load: $LIGHT_MESSAGES pushes at $LIGHT_RATE/s to $FANOUT sockets (fresh server)"
  start_server "$name"
  run_lt "$name" light --connections "$FANOUT" --sources 16 fanout --nats-url "nats://127.0.0.1:$NATS_PORT" --messages "$LIGHT_MESSAGES" --size "$SIZE" --rate "$LIGHT_RATE"
  delivered="$(jqf "$name-light" .delivered)"
  p99="$(jqf "$name-light" .latency_p99_ms)"; [ -n "$p99" ] && VAL[$name:light_p99]="$(calc "$p99" 1)"
  cpu="$(jqf "$name-light" .gateway_cpu_secs)"
  [ -n "$cpu" ] && [ "${delivered:-0}" -gt 0 ] && VAL[$name:light_cpu]="$(calc "$cpu * 1000000 / $delivered" 2)"
  VAL[$name:light_done]="${delivered:-?}/$(jqf "$name-light" .expected)"
  stop_server
done

# Side-by-side table. A ratio is server / ref-tokio for that figure (lower is better for
# memory, CPU and latency, higher for rates); "n/a" where a figure was not measured.
FIGURES=(
  "idle_kb|RSS per idle connection, KB|r"
  "idle_open|idle connections opened|"
  "accepts|accepts/s (client-bound when equal)|r"
  "accept_us|server CPU per accepted connection, µs|r"
  "fan_rate|fan-out deliveries/s|r"
  "fan_cpu|server CPU-s per million deliveries|r"
  "fan_done|fan-out delivered/expected|"
  "fan_p99|fan-out burst latency p99, ms|r"
  "rss_start|RSS at start, MiB|r"
  "rss_end|RSS right after the fan-out (clients gone), MiB|r"
  "rss_10s|RSS 10 s after the fan-out burst, MiB|r"
  "light_p99|light load ($((LIGHT_RATE * FANOUT)) deliveries/s) latency p99, ms|r"
  "light_cpu|light load: server CPU-s per million deliveries|r"
  "light_done|light load delivered/expected|"
)
cell() { # SERVER KEY RATIO?
  local v="${VAL[$1:$2]:-}" base="${VAL[ref-tokio:$2]:-}"
  if [ -z "$v" ]; then printf 'n/a'; return; fi
  if [ -n "$3" ] && [ -n "$base" ] && awk "BEGIN { exit !($base > 0) }"; then
    printf '%s (x%s)' "$v" "$(calc "$v / $base" 2)"
  else
    printf '%s' "$v"
  fi
}
echo
echo "== summary: IDLE=$IDLE CONNECT=$CONNECT FANOUT=$FANOUT MESSAGES=$MESSAGES SIZE=$SIZE; server on core 0, client and nats-server on core 1; (xR) = server / ref-tokio"
if [ $((FANOUT * MESSAGES)) -lt 500000 ]; then
  echo "   note: fewer than 500,000 deliveries; the generator times the fan-out in 0.1 s steps and CPU is read in"
  echo "   0.01 s ticks, so fan-out rates and CPU per delivery are at their resolution limit here"
fi
header="| figure |"; rule="|---|"
for name in "${SERVER_LIST[@]}"; do header+=" $name |"; rule+="---|"; done
echo "$header"; echo "$rule"
for f in "${FIGURES[@]}"; do
  IFS='|' read -r key label ratio <<<"$f"
  row="| $label |"
  for name in "${SERVER_LIST[@]}"; do row+=" $(cell "$name" "$key" "$ratio") |"; done
  echo "$row"
done
