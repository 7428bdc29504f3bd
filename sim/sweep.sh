#!/usr/bin/env bash
# Over- and under-admission by gossip interval and cluster size, as a markdown table.
# Usage: sim/sweep.sh [MODE] [extra sim flags...]    (MODE: bounded (default) or optimistic)
# Each cell: 20 clients at 3x their limit (100 per 1 s), latency 1..5 ms, loss 1%,
# 5 s of traffic, seed 1. Runs the release build of the simulator.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-bounded}
shift || true
cargo build --quiet --release -p sim
echo "| gossip \\ nodes | 3 | 10 | 50 | 200 |"
echo "|---|---|---|---|---|"
for g in 5 20 100 500; do
  row="| ${g} ms |"
  for n in 3 10 50 200; do
    cell=$(target/release/sim --nodes "$n" --clients 20 --limit 100 --window-ms 1000 --rate 3 \
      --gossip-ms "$g" --latency-ms 1..5 --loss 0.01 --duration-ms 5000 --mode "$mode" --seed 1 --json "$@" |
      python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.2f%% / %.2f%% (%.1f B)" % (100*r["over_admission_ratio"], 100*r["under_admission_ratio"], r["bytes_per_count"]))')
    row="$row $cell |"
  done
  echo "$row"
done
