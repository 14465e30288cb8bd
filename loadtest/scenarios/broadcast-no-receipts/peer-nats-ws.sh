#!/usr/bin/env bash
# Peer for scenario 3: the same periodic broadcast (PUSHES pushes of SIZE bytes every
# INTERVAL s to CONNECTIONS subscribers, no receipts) served by nats-server's own
# WebSocket listener instead of the gateway: every client is a NATS-over-WebSocket
# subscriber on `bench.all`, the publisher a plain NATS client. nats-server (the server
# under test here) is pinned to core 0, where the gateway runs in scenario 3; the load
# generator to core 1.
#
#   loadtest/scenarios/broadcast-no-receipts/peer-nats-ws.sh
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
CONNECTIONS="${CONNECTIONS:-10000}"
RATE="${RATE:-5000}"
WORKERS="${WORKERS:-2}"
PUSHES="${PUSHES:-24}"
INTERVAL="${INTERVAL:-5}"
SIZE="${SIZE:-1024}"
WS_PORT="$((BASE_PORT + 223))"
OUT="${OUT:-$ROOT/target/loadtest/peer-nats-ws}"

cat > "$TMP/ws.conf" <<CONF
max_payload: 1MB
max_pending: 256MB
write_deadline: "10s"
websocket { listen: "127.0.0.1:$WS_PORT", no_tls: true }
CONF
"${SVC_CORE[@]}" "$NATS_BIN" -c "$TMP/ws.conf" -a 127.0.0.1 -p "$NATS_PORT" -l "$TMP/nats-ws.log" &
NATS_PID=$!
PIDS+=("$NATS_PID")
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$WS_PORT") 2>/dev/null && break; sleep 0.05; done
sleep 0.5
machine
echo "== peer nats-ws: $CONNECTIONS subscribers on nats-server's WebSocket listener; $PUSHES pushes of $SIZE B every ${INTERVAL}s"
loadtest --urls "ws://127.0.0.1:$WS_PORT" --connections "$CONNECTIONS" --sources 16 --concurrency 512 \
  run --scenario broadcast --peer-nats-ws --name peer-nats-ws --workers "$WORKERS" --rate "$RATE" \
  --pushes "$PUSHES" --interval-secs "$INTERVAL" --size "$SIZE" --nats-url "nats://127.0.0.1:$NATS_PORT" \
  --max-secs "$(( PUSHES * INTERVAL + 120 ))" --gateway-pids "nats-ws=$NATS_PID" --out "$OUT" \
  --thresholds "$DIR/thresholds.toml" --note "pinning=nats-server (server under test) on core 0; loadtest on core 1,server=nats-server websocket"
