#!/usr/bin/env bash
# Scenario 4, broadcast with receipts under churn (seed 002 scenario 4: 40,000 of 500,000
# users, 8%, go off and on line every second): as scenario 2, and every second CHURN of
# the users (default 0.08) close their connection and reconnect at once. "lost" counts
# pushes missing inside a session (between the first and last push a connection got);
# pushes published while a user was between connections are not expected.
#
#   loadtest/scenarios/broadcast-churn/run.sh                 # 10,000 users, 8%/s churn
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME=broadcast-churn CHURN="${CHURN:-0.08}" PUSHES="${PUSHES:-12}" THRESHOLDS="$DIR/thresholds.toml" \
  exec "$DIR/../broadcast-receipts/run.sh" "$@"
