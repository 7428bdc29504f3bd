#!/usr/bin/env python3
"""Runs random fault scenarios and flags any run that violated an invariant, did not
converge, or (under the scale issue's accuracy conditions: limit 100, rate 1.0 or 3.0,
1 % loss) went beyond 1 % over or 3 % under the ideal. One line per run.

    cargo build --release -p sim
    python3 sim/scripts/fault_matrix.py target/release/sim RUNS SEED [--swim] [--leave]

Draws, per run: nodes (3 to 300), clients, 2 or 3 s of traffic, a simulator seed; then
either the accuracy conditions (about a third of the runs) or a random mix of mode,
strategy, loss, duplication, reordering, clock skew, a partition, crashes and restarts,
a clock step, bursts, a smaller aggregator pool, SWIM from 16 or 40 peers, and another
gossip interval. With --swim, nodes are drawn from 30, 40, 50, 150 and 300, and the
fault runs (not the accuracy ones) below 100 nodes have SWIM from 16 peers and most a
pool of 4, 8 or 16: most members are then outside the pool, in a partial view. With
--leave, half the fault runs also have one member leave gracefully (`--leave`), and half
of those a second one later (without it, the draws are those of earlier versions, so a
seed gives the same runs). Exits 1 if any run was flagged. The figures in docs/benchmarks.md ("A partial view beyond 128
peers") came from `40 778 --swim`.
"""
import json
import random
import subprocess
import sys

sim, runs, rng = sys.argv[1], int(sys.argv[2]), random.Random(int(sys.argv[3]))
swim = "--swim" in sys.argv[4:]
leaves = "--leave" in sys.argv[4:]
flagged = 0
for _ in range(runs):
    nodes = rng.choice([30, 40, 50, 150, 300] if swim else [3, 10, 17, 30, 33, 50, 100, 150, 300])
    clients = {300: 300, 150: 300}.get(nodes, rng.choice([50, 200, 1000]))
    dur = rng.choice([2000, 3000])
    a = ["--nodes", str(nodes), "--clients", str(clients), "--duration-ms", str(dur), "--seed", str(rng.randrange(1000, 10**6))]
    accuracy = rng.random() < 0.35
    if accuracy:
        a += ["--limit", "100", "--rate", rng.choice(["1.0", "3.0"]), "--loss", "0.01"]
    else:
        a += ["--rate", rng.choice(["0.5", "1.0", "3.0"]), "--mode", rng.choice(["bounded", "bounded", "optimistic", "shares"])]
        a += ["--strategy", rng.choice(["sliding", "fixed", "token", "log"])]
        if rng.random() < 0.5:
            a += ["--loss", str(rng.choice([0.01, 0.05, 0.1]))]
        if rng.random() < 0.3:
            a += ["--duplicate", str(rng.choice([0.02, 0.1]))]
        if rng.random() < 0.3:
            a += ["--reorder", str(rng.choice([0.05, 0.2]))]
        if rng.random() < 0.3:
            a += ["--clock-skew-ms", str(rng.choice([100, 500, 900]))]
        if rng.random() < 0.4:
            s = rng.randrange(200, dur - 600)
            a += ["--partition", f"{s}..{min(dur - 1, s + rng.randrange(200, 1200))}"]
        if rng.random() < 0.5:
            for _ in range(rng.choice([1, 2, 3])):
                n, c = rng.randrange(nodes), rng.randrange(100, dur - 300)
                a += ["--crash", f"{n}@{c}"]
                if rng.random() < 0.8:
                    a += ["--restart", f"{n}@{min(dur - 50, c + rng.randrange(50, 1500))}"]
        if leaves and rng.random() < 0.5:
            for _ in range(rng.choice([1, 2])):
                a += ["--leave", f"{rng.randrange(nodes)}@{rng.randrange(100, dur - 300)}"]
        if rng.random() < 0.2:
            a += ["--clock-step", f"{rng.randrange(nodes)}@{rng.randrange(100, dur)}:{rng.choice([-1500, -700, 400, 3000])}"]
        if rng.random() < 0.25:
            a += ["--burst-clients", str(rng.choice([10, 50])), "--burst-every-ms", "500", "--burst-target", rng.choice(["spread", "one"])]
            if rng.random() < 0.5:
                a += ["--burst-fresh"]
        if nodes > 16 and rng.random() < (0.7 if swim else 0.3):
            a += ["--aggregator-pool", str(rng.choice([4, 8, 16]))]
        if swim and nodes < 100:
            a += ["--swim-above", "16"]
        elif nodes > 16 and rng.random() < 0.2:
            a += ["--swim-above", str(rng.choice([16, 40]))]
        if rng.random() < 0.2:
            a += ["--gossip-ms", str(rng.choice([10, 50, 100]))]
    p = subprocess.run([sim] + a + ["--json"], capture_output=True, text=True)
    flags = [] if p.returncode == 0 else [f"rc={p.returncode}"]
    try:
        d = json.loads(p.stdout)
        if not d["converged"]:
            flags.append("NOT-CONVERGED")
        if d["violation_count"]:
            flags.append(f"violations={d['violation_count']}")
        if accuracy and d["over_admission_ratio"] > 0.01:
            flags.append(f"OVER={d['over_admission_ratio']:.4f}")
        if accuracy and d["under_admission_ratio"] > 0.03:
            flags.append(f"UNDER={d['under_admission_ratio']:.4f}")
        summary = f"over={d['over_admission_ratio']:.4f} under={d['under_admission_ratio']:.4f} converged_ms={d['convergence_ms']}"
    except (ValueError, KeyError):
        flags.append("NO-JSON")
        summary = p.stderr[-300:].replace("\n", " ")
    flagged += bool(flags)
    print(f"{'FLAG ' + ','.join(flags) if flags else 'ok'} {summary} :: {' '.join(a)}", flush=True)
sys.exit(1 if flagged else 0)
