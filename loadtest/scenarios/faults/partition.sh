#!/usr/bin/env bash
# Fault suite, partition: CONNECTIONS app clients over 3 gateways; gateway 2 reaches NATS
# through a proxy (cutproxy.py) that, CUT_AT seconds after the start, silently drops every
# byte both ways for CUT_SECS (no FIN, no RST: a partition, not a crash), then heals.
# Gateway 2 must notice by its own keepalives, send its clients to the other gateways
# (reconnect frames, close 4003) once the outage passes WS_GATEWAY_BUS_LOSS_SHED_MS, refuse
# new clients while cut, and be ready again once the path heals. Measures: connections
# lost, time until every client is back, each client's loss -> welcome time, reconnects
# per second, the cut -> shed time, and the heal -> ready time of gateway 2.
#
#   loadtest/scenarios/faults/partition.sh                        # 15,000 clients, 30 s cut
#   CONNECTIONS=3000 CUT_SECS=20 loadtest/scenarios/faults/partition.sh
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
CONNECTIONS="${CONNECTIONS:-15000}"
RATE="${RATE:-3000}"
WORKERS="${WORKERS:-2}"
CUT_AT="${CUT_AT:-$((CONNECTIONS / RATE + 8))}"
CUT_SECS="${CUT_SECS:-30}"
OUT="${OUT:-$ROOT/target/loadtest/faults/partition}"
PROXY_PORT="$((BASE_PORT + 223))"

machine
start_nats
python3 "$DIR/cutproxy.py" "$PROXY_PORT" "$NATS_PORT" >"$TMP/cutproxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PROXY_PORT") 2>/dev/null && break; sleep 0.05; done
start_gateway 1
start_gateway 2 "nats://127.0.0.1:$PROXY_PORT"
start_gateway 3
GW2_PORT="$((BASE_PORT + 82))"
sleep 1
echo "== partition: $CONNECTIONS clients over 3 gateways; gateway 2 cut from NATS at ${CUT_AT}s for ${CUT_SECS}s"
# Held long enough for gateway 2 to notice the cut (keepalives, 10-15 s) and shed (5 s).
HOLD="${HOLD:-$((CUT_SECS + 10))}"
loadtest --urls "$(urls)" --connections "$CONNECTIONS" --sources 16 --concurrency 512 \
  run --scenario storm --name partition --workers "$WORKERS" --rate "$RATE" --hold-secs "$HOLD" \
  --reconnect --recover-secs 90 --max-secs 300 --gateway-pids "$(gw_pids)" --watch "nats=$NATS_PID" \
  --out "$OUT" --thresholds "$DIR/partition.toml" --note "pinning=$PINNING; cut ${CUT_SECS}s" &
LT=$!
sleep "$CUT_AT"
echo "== cut gateway 2 from NATS"
kill -USR1 "$PROXY_PID"
CUT_T=$(date +%s.%N)
SHED_T=""
while :; do
  now=$(date +%s.%N)
  if [ -z "$SHED_T" ] && grep -q "sending clients to other replicas" "$TMP/gw2.log" 2>/dev/null; then
    SHED_T=$now
    echo "== gateway 2 shed its clients $(echo "$SHED_T - $CUT_T" | bc) s after the cut"
  fi
  if [ "$(echo "$now - $CUT_T >= $CUT_SECS" | bc)" = 1 ]; then break; fi
  sleep 0.2
done
echo "== heal"
kill -USR2 "$PROXY_PID"
HEAL_T=$(date +%s.%N)
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$GW2_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
READY_T=$(date +%s.%N)
echo "== gateway 2 ready $(echo "$READY_T - $HEAL_T" | bc) s after the heal"
wait "$LT"
mkdir -p "$OUT"
printf '{"cut_secs": %s, "cut_to_shed_secs": %s, "heal_to_ready_secs": %s}\n' "$CUT_SECS" \
  "$( [ -n "$SHED_T" ] && echo "$SHED_T - $CUT_T" | bc || echo null)" "$(echo "$READY_T - $HEAL_T" | bc)" \
  > "$OUT/partition-times.json"
cat "$OUT/partition-times.json"
[ -n "$SHED_T" ] || { echo "gateway 2 never shed its clients" >&2; exit 1; }
