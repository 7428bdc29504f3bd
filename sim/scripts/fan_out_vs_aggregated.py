#!/usr/bin/env python3
"""Runs random cluster configurations twice, with aggregated dissemination (the default
beyond 16 peers) and with fan-out (--aggregate-above 1000), and prints over- and
under-admission side by side.

    cargo build --release -p sim
    python3 sim/scripts/fan_out_vs_aggregated.py target/release/sim 1 24

Seed S draws, in this order: nodes from 20, 24, 33, 40; clients from 10, 20, 50; limit
from 10, 100; rate from 1, 3; mode; strategy; gossip interval from 5, 20, 50 ms; loss
from 0, 1 %. Each run is 3 s of traffic. The figures in docs/benchmarks.md
("Aggregated dissemination against fan-out") came from seeds 1 to 24.
"""
import json
import random
import subprocess
import sys

sim, start, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for seed in range(start, start + count):
    r = random.Random(seed)
    n = r.choice([20, 24, 33, 40])
    args = ["--seed", str(seed), "--nodes", str(n), "--clients", str(r.choice([10, 20, 50])),
            "--limit", str(r.choice([10, 100])), "--rate", str(r.choice([1.0, 3.0])), "--duration-ms", "3000",
            "--mode", r.choice(["bounded", "optimistic"]), "--strategy", r.choice(["fixed", "sliding", "token", "log"]),
            "--gossip-ms", str(r.choice([5, 20, 50])), "--loss", str(r.choice([0, 0.01]))]
    fan, agg = (json.loads(subprocess.run([sim, *args, *extra, "--json"], capture_output=True, text=True).stdout)
                for extra in (["--aggregate-above", "1000"], []))
    pct = lambda d, k: f"{100 * d[k]:6.2f}%"
    print(f"seed {seed:3} {' '.join(args[2:])}\n"
          f"    over {pct(fan, 'over_admission_ratio')} -> {pct(agg, 'over_admission_ratio')}"
          f"  under {pct(fan, 'under_admission_ratio')} -> {pct(agg, 'under_admission_ratio')}"
          f"  violations {fan['violation_count']}/{agg['violation_count']}", flush=True)
