#!/usr/bin/env bash
# Live output latency and bounds: one real agent behind one gateway, the scheduler, and
# `schedctl run --follow --json`, all real processes on loopback.
#
# 1. Latency: RUNS times, a command prints its own clock (ns) and then sleeps; the time
#    from that clock to the moment schedctl prints the `output` event carrying it is the
#    first-chunk latency (agent cut + gateway + NATS + scheduler + SSE + schedctl). Same
#    machine, same clock. Prints p50/p99/max.
# 2. Bounds: a command printing BIG_MB MB; reports the bytes streamed, gaps, the agent's and
#    the scheduler's peak RSS growth (VmHWM before/after), and that the result's tail is the
#    true end.
#
#   loadtest/scenarios/follow/run.sh            # RUNS=100 BIG_MB=50
#   RUNS=20 BIG_MB=10 loadtest/scenarios/follow/run.sh
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$DIR/../lib.sh"
RUNS="${RUNS:-100}"
BIG_MB="${BIG_MB:-50}"
if [ -z "${LOADTEST_NO_BUILD:-}" ]; then cargo build --release -q -p agent -p scheduler; fi

machine
start_nats
start_gateway 1
start_scheduler
TOKEN="$(SCHEDULER_AGENT_TOKEN_KEY_FILE="$KEYS/agent-token.key" "$BIN/scheduler" --mint-agent-token edge-bench)"
env AGENT_NODE_ID=edge-bench AGENT_TOKEN="$TOKEN" AGENT_GATEWAYS="${GW_URLS[0]}" \
  AGENT_OUTBOX_PATH="$TMP/agent.redb" AGENT_COMMAND_KEYS_FILE="$KEYS/command.pub" \
  AGENT_ALLOWED_COMMANDS=sh AGENT_CREDENTIAL_PATH="$TMP/credential.jwt" RUST_LOG=warn \
  "${SVC_CORE[@]}" "$BIN/agent" >"$TMP/agent.log" 2>&1 &
AGENT_PID=$!
PIDS+=("$AGENT_PID")
export SCHEDULER_URL="http://127.0.0.1:$SCHED_PORT" SCHEDULER_API_KEY="$KEY"
for _ in $(seq 1 200); do
  "$BIN/schedctl" agents 2>/dev/null | grep -q 'edge-bench *online' && break
  sleep 0.05
done

hwm() { awk '/VmHWM/{print $2}' "/proc/$1/status"; }
echo "== follow: first-chunk latency over $RUNS runs (schedctl --follow --json, one agent)"
python3 - "$BIN/schedctl" "$RUNS" <<'PY'
import json, subprocess, sys, time
schedctl, runs = sys.argv[1], int(sys.argv[2])
lat = []
for _ in range(runs):
    p = subprocess.Popen([schedctl, "--json", "run", "--nodes", "edge-bench", "--follow", "--",
                          "sh", "-c", "date +%s%N; sleep 0.2"], stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        now = time.time_ns()
        e = json.loads(line)
        if e["event"] == "output" and e["data"]["data"].strip().isdigit():
            lat.append((now - int(e["data"]["data"].strip())) / 1e6)
    p.wait()
lat.sort()
q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))]
print(f"first chunk visible: n={len(lat)} p50={q(0.5):.1f} ms p99={q(0.99):.1f} ms max={lat[-1]:.1f} ms")
PY

echo "== follow: a command printing ${BIG_MB} MB"
A0=$(hwm "$AGENT_PID"); S0=$(hwm "$SCHED_PID")
"$BIN/schedctl" --json run --nodes edge-bench --follow -- sh -c \
  "head -c $((BIG_MB * 1024 * 1024)) /dev/zero | tr '\\0' x; echo; echo the-end" >"$TMP/big.jsonl"
A1=$(hwm "$AGENT_PID"); S1=$(hwm "$SCHED_PID")
python3 - "$TMP/big.jsonl" "$BIG_MB" <<'PY'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1])]
out = [e for e in events if e["event"] == "output"]
gaps = [e for e in events if e["event"] == "gap"]
res = [e for e in events if e["event"] == "result"][0]["data"]
streamed = sum(len(e["data"]["data"]) for e in out)
true_end = res["stdout_tail"].endswith("the-end" + chr(10))
print(f"printed {sys.argv[2]} MB; streamed {streamed/1048576:.2f} MiB in {len(out)} chunks; "
      f"{len(gaps)} gap events; result tail ends with the-end: {true_end}")
PY
echo "peak RSS growth: agent $((A1 - A0)) KiB (VmHWM $A0 -> $A1), scheduler $((S1 - S0)) KiB (VmHWM $S0 -> $S1)"
