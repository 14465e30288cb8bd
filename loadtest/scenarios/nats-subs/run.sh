#!/usr/bin/env bash
# What one NATS subscription per connected user costs the NATS tier (docs/capacity.md):
# a 3-node nats-server cluster on loopback, SUBS subscriptions added in steps over CONNS
# connections (gateway replicas), memory per subscription on every node, propagation of a
# new interest across the cluster, CPU per publish with the whole interest graph present,
# and subscribe/unsubscribe churn. Bounded: stops by itself and tears the cluster down.
#
#   loadtest/scenarios/nats-subs/run.sh                  # SUBS=200000 STEP=50000 CONNS=4
#   SUBS=500000 STEP=100000 loadtest/scenarios/nats-subs/run.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$ROOT"
SUBS="${SUBS:-200000}"
STEP="${STEP:-50000}"
CONNS="${CONNS:-4}"
SECS="${SECS:-10}"
BASE="${BASE_PORT:-24000}"
NATS_BIN="$("$ROOT/scripts/install-nats" | tail -n 1)"
[ -n "${LOADTEST_NO_BUILD:-}" ] || cargo build --release -q -p loadtest --bin nats-subs
TMP="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
# nats-server on core 1, the client on core 0 (2+ cores).
if [ "$(nproc)" -ge 2 ]; then SRV=(taskset -c 1); CLI=(taskset -c 0); else SRV=(); CLI=(); fi
ROUTES="nats-route://127.0.0.1:$((BASE + 11)),nats-route://127.0.0.1:$((BASE + 12)),nats-route://127.0.0.1:$((BASE + 13))"
URLS=(); MON=()
for n in 1 2 3; do
  "${SRV[@]}" "$NATS_BIN" -c nats/cluster.conf --server_name "subs-$n" -a 127.0.0.1 -p "$((BASE + n))" \
    -m "$((BASE + 20 + n))" --cluster_name subs --cluster "nats://127.0.0.1:$((BASE + 10 + n))" \
    --routes "$ROUTES" -js -sd "$TMP/js$n" -l "$TMP/nats$n.log" &
  PIDS+=($!)
  URLS+=("nats://127.0.0.1:$((BASE + n))"); MON+=("http://127.0.0.1:$((BASE + 20 + n))")
done
for m in "${MON[@]}"; do
  for _ in $(seq 1 100); do curl -sf "$m/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
done
sleep 2
echo "== nats-server $("$NATS_BIN" --version) x3 (routes on loopback); $(nproc) cores"
"${CLI[@]}" "$ROOT/target/release/nats-subs" --urls "$(IFS=,; echo "${URLS[*]}")" \
  --monitor "$(IFS=,; echo "${MON[*]}")" --subs "$SUBS" --step "$STEP" --conns "$CONNS" \
  --pids "$(IFS=,; echo "${PIDS[*]}")" --publish-secs "$SECS" --churn-secs "$SECS"
