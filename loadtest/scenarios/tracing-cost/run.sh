#!/usr/bin/env bash
# The price of tracing: broadcast fan-out through one gateway with trace export off, and
# on at head-sampling ratios 0, 1% and 100% (spans exported over OTLP/HTTP to a counting
# receiver, `otlp-sink`, on the generator's core). Two shapes, because a span is made per
# bus message, not per socket:
#   wide:   FANOUT sockets x WIDE_MESSAGES broadcasts of 1 KiB  (span cost amortised)
#   narrow: NARROW sockets x NARROW_MESSAGES broadcasts of 64 B at NARROW_RATE per second
#           (span cost per delivery; paced, since an unpaced burst of tiny messages makes
#           the gateway a NATS slow consumer and the comparison meaningless)
# Every run is bounded and stops by itself. Set-up and pinning (gateway on core 0,
# everything else on core 1) come from ../lib.sh.
#
#   loadtest/scenarios/tracing-cost/run.sh
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"

FANOUT="${FANOUT:-10000}"
WIDE_MESSAGES="${WIDE_MESSAGES:-200}"
NARROW="${NARROW:-10}"
NARROW_MESSAGES="${NARROW_MESSAGES:-60000}"
NARROW_RATE="${NARROW_RATE:-20000}"
SHAPES="${SHAPES:-wide narrow}"
if [ -z "${LOADTEST_NO_BUILD:-}" ]; then cargo build --release -q -p testkit --bin otlp-sink; fi
SINK="${SINK_BIN:-$ROOT/target/release/otlp-sink}"

run() { # run MODE SHAPE SOCKETS MESSAGES SIZE RATE
  local mode="$1" shape="$2" sockets="$3" messages="$4" size="$5" rate="$6"
  unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_TRACES_SAMPLER_ARG
  if [ "$mode" != off ]; then
    # A fresh file per run: reading the previous run's endpoint would export nowhere.
    rm -f "$TMP/sink.out"
    "${GEN_CORE[@]}" "$SINK" >"$TMP/sink.out" &
    SINK_PID=$!
    PIDS+=("$SINK_PID")
    for _ in $(seq 1 100); do [ -s "$TMP/sink.out" ] && break; sleep 0.05; done
    export OTEL_EXPORTER_OTLP_ENDPOINT="$(head -n 1 "$TMP/sink.out")" OTEL_TRACES_SAMPLER_ARG="$mode"
  fi
  GW_PIDS=(); GW_URLS=()
  start_gateway 1
  echo "== tracing=$mode shape=$shape: $messages x ${size} B to $sockets sockets"
  LOADTEST_GATEWAY_PID="${GW_PIDS[0]}" loadtest --urls "$(urls)" --connections "$sockets" --sources 16 \
    fanout --nats-url "nats://127.0.0.1:$NATS_PORT" --messages "$messages" --size "$size" --rate "$rate" \
    2>&1 | grep -vE '^\s*$' | tail -n 6
  kill -TERM "${GW_PIDS[0]}" 2>/dev/null || true; wait "${GW_PIDS[0]}" 2>/dev/null || true
  if [ "$mode" != off ]; then
    sleep 0.3
    kill -INT "$SINK_PID" 2>/dev/null || true; wait "$SINK_PID" 2>/dev/null || true
    echo "otlp-sink: $(tail -n 1 "$TMP/sink.out")"
  fi
}

machine
start_nats
for shape in $SHAPES; do
  for mode in off 0 0.01 1; do
    case "$shape" in
      wide) run "$mode" wide "$FANOUT" "$WIDE_MESSAGES" 1024 0 ;;
      narrow) run "$mode" narrow "$NARROW" "$NARROW_MESSAGES" 64 "$NARROW_RATE" ;;
    esac
  done
done
