#!/usr/bin/env bash
# Fault suite, slow and hostile clients: one gateway, CONNECTIONS normal clients receiving
# a SIZE-byte broadcast every INTERVAL seconds (published on the bus); each client records
# the delivery latency (publisher's stamp -> received).
#   run A: the normal clients alone;
#   run B: the same, with STALLED clients that stop reading (but keep heartbeating; each is
#          also sent STALLED_FEED bytes every 100 ms on its own user subject, 0 for none:
#          at the broadcast's 2 KB/s alone their backlog stays in the kernel's socket
#          buffers for many minutes before the gateway's write blocks) and
#          HOSTILE clients that, round-robin, send garbage bytes, oversized messages,
#          undecodable frames, text messages, ping floods (PING_RATE/s) or a slowloris
#          upgrade, each cut, pausing ~PAUSE_MS and coming back for the whole run
#          (`loadtest hostile`, loadtest/src/hostile/).
# Then `loadtest hostile-report` compares: every hostile attempt cut with a close code of
# docs/protocol.md 9.1 (or, for slowloris, the HTTP layer's 408), every stalled client
# cut, normal clients' delivery p99 B/A <= 1.2, nothing lost, gateway RSS bounded
# (thresholds in hostile.toml). Results: $OUT/hostile.{json,html} (and hostile-a, -b,
# hostile-clients).
#
#   loadtest/scenarios/faults/hostile.sh                                  # 10,000 + 100 + 1,000
#   CONNECTIONS=2000 STALLED=20 HOSTILE=200 PUSHES=60 loadtest/scenarios/faults/hostile.sh
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
CONNECTIONS="${CONNECTIONS:-10000}"
STALLED="${STALLED:-100}"
HOSTILE="${HOSTILE:-1000}"
PUSHES="${PUSHES:-240}"
INTERVAL="${INTERVAL:-0.5}"
SIZE="${SIZE:-1024}"
PAUSE_MS="${PAUSE_MS:-2000}"
PING_RATE="${PING_RATE:-300}"
STALLED_FEED="${STALLED_FEED:-16384}"
RATE="${RATE:-5000}"
WORKERS="${WORKERS:-2}"
OUT="${OUT:-$ROOT/target/loadtest/faults/hostile}"
BROADCAST_SECS="$(echo "$PUSHES * $INTERVAL / 1" | bc)"

normal_run() { # NAME
  loadtest --urls "$(urls)" --connections "$CONNECTIONS" --sources 16 --concurrency 512 \
    run --scenario broadcast --name "$1" --workers "$WORKERS" --rate "$RATE" \
    --pushes "$PUSHES" --interval-secs "$INTERVAL" --size "$SIZE" \
    --via nats --nats-url "nats://127.0.0.1:$NATS_PORT" --max-secs "$(( BROADCAST_SECS + 90 ))" \
    --rss-warmup-secs 5 --gateway-pids "$(gw_pids)" --watch "nats=$NATS_PID" --out "$OUT" \
    --note "pinning=$PINNING"
}

machine
start_nats
start_gateway 1
sleep 1
mkdir -p "$OUT"
echo "== run A: $CONNECTIONS normal clients, $PUSHES broadcasts of $SIZE B every ${INTERVAL}s"
normal_run hostile-a
echo "== run B: the same with $STALLED stalled and $HOSTILE hostile clients"
# Hostile clients first, for the whole of B: its opening (a few seconds), 2 s of settling,
# the broadcasts, the last deliveries.
loadtest --urls "$(urls)" hostile --stalled "$STALLED" --hostile "$HOSTILE" \
  --secs "$(( BROADCAST_SECS + 10 ))" --pause-ms "$PAUSE_MS" --ping-rate "$PING_RATE" \
  --nats-url "nats://127.0.0.1:$NATS_PORT" --stalled-feed-bytes "$STALLED_FEED" --stalled-feed-ms 100 \
  --out "$OUT" --name hostile-clients &
HOSTILE_PID=$!
sleep 2
normal_run hostile-b
wait "$HOSTILE_PID"
echo "== gateway log lines at warn and above during the runs: $(wc -l <"$TMP/gw1.log")"
grep -m5 -i 'panic' "$TMP/gw1.log" && echo "== the gateway panicked" >&2
loadtest hostile-report --baseline "$OUT/hostile-a.json" --run "$OUT/hostile-b.json" \
  --clients "$OUT/hostile-clients.json" --thresholds "$DIR/hostile.toml" --out "$OUT" --name hostile
