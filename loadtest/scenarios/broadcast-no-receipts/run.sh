#!/usr/bin/env bash
# Scenario 3, periodic broadcast without receipts (seed 002 scenario 3): as scenario 2
# (broadcast-receipts/run.sh, same knobs) but the pushes ask for no receipt, so clients
# send nothing back.
#
#   loadtest/scenarios/broadcast-no-receipts/run.sh
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME=broadcast-no-receipts RECEIPTS="" THRESHOLDS="$DIR/thresholds.toml" \
  exec "$DIR/../broadcast-receipts/run.sh" "$@"
