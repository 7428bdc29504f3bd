//! One seed drives everything: the same options give the same bytes, and the
//! reproduction line a failure prints reproduces it.

fn cli(args: &[&str]) -> sim::CliOutput {
    sim::cli(args)
}

const FAULTY: &[&str] = &[
    "--nodes",
    "4",
    "--clients",
    "6",
    "--limit",
    "20",
    "--duration-ms",
    "2500",
    "--loss",
    "0.2",
    "--duplicate",
    "0.1",
    "--reorder",
    "0.2",
    "--clock-skew-ms",
    "30",
    "--partition",
    "500..1200",
    "--crash",
    "1@700",
    "--restart",
    "1@1500",
    "--mode",
    "optimistic",
    "--burst-clients",
    "2",
    "--burst-size",
    "15",
    "--burst-every-ms",
    "800",
    "--json",
];

#[test]
fn the_same_seed_gives_byte_identical_json() {
    let a = cli(FAULTY);
    let b = cli(FAULTY);
    assert_eq!(a.code, 0, "{}", a.stderr);
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(a.stdout.lines().count(), 1, "exactly one JSON object");
    let v: serde_json::Value = serde_json::from_str(&a.stdout).unwrap();
    for field in [
        "seed",
        "nodes",
        "offered",
        "admitted",
        "ideal",
        "over_admitted",
        "over_admission_ratio",
        "under_admission_ratio",
        "max_window_overshoot_ratio",
        "converged",
        "convergence_ms",
        "messages",
        "bytes",
        "predicted_max_overshoot",
    ] {
        assert!(v.get(field).is_some(), "missing {field}");
    }
    assert!(v["offered"].as_u64().unwrap() > 0 && v["messages"].as_u64().unwrap() > 0);
    assert!(v["bursts"].as_u64().unwrap() > 0 && v["burst_offered"].as_u64().unwrap() > 0, "{v}");
}

/// A restart on a store of more counts than one export step holds: the full sync goes out
/// in steps cut in table order, which must not depend on the process.
#[test]
fn full_syncs_sent_in_steps_repeat_byte_for_byte() {
    let args = [
        "--nodes",
        "4",
        "--clients",
        "1500",
        "--limit",
        "5",
        "--rate",
        "3.0",
        "--duration-ms",
        "900",
        "--crash",
        "1@300",
        "--restart",
        "1@500",
        "--json",
    ];
    let a = cli(&args);
    assert_eq!(a.code, 0, "{}", a.stderr);
    let v: serde_json::Value = serde_json::from_str(&a.stdout).unwrap();
    assert!(v["entries_sent"].as_u64().unwrap() > 4 * 4_096, "{v}");
    for _ in 0..4 {
        assert_eq!(a.stdout, cli(&args).stdout);
    }
}

#[test]
fn the_readable_report_is_reproducible_too_and_prints_every_option() {
    let args: Vec<&str> = FAULTY.iter().copied().filter(|a| *a != "--json").collect();
    let a = cli(&args);
    assert_eq!(a.stdout, cli(&args).stdout);
    for needle in ["seed 1", "--clock-skew-ms 30", "--partition 500..1200", "--crash 1@700", "--restart 1@1500", "converged"] {
        assert!(a.stdout.contains(needle), "{needle} missing from\n{}", a.stdout);
    }
}

#[test]
fn another_seed_gives_another_run() {
    let mut args = FAULTY.to_vec();
    args.extend(["--seed", "2"]);
    assert_ne!(cli(FAULTY).stdout, cli(&args).stdout);
}

/// Clocks up to an hour apart, far past the 2 s clock-skew tolerance: counts a node
/// makes for windows the others will not accept for an hour keep the replicas apart past
/// the tail cap. Such a run stands in for any invariant violation.
const NOT_CONVERGING: &[&str] = &[
    "--nodes",
    "3",
    "--clients",
    "2",
    "--limit",
    "10",
    "--window-ms",
    "100",
    "--gossip-ms",
    "50",
    "--clock-skew-ms",
    "3600000",
    "--duration-ms",
    "500",
    "--tail-cap-ms",
    "2000",
];

#[test]
fn a_violation_exits_1_with_a_reproduction_line_that_reproduces_it() {
    let (seed, out) = (1..=64)
        .map(|seed| {
            let seed = seed.to_string();
            let out = cli(&[NOT_CONVERGING, &["--seed", &seed]].concat());
            (seed, out)
        })
        .find(|(_, out)| out.code != 0)
        .expect("clocks an hour apart never agree within the tail cap");
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stdout.contains("VIOLATION") && out.stdout.contains("still disagree"), "{}", out.stdout);
    let line = out.stderr.lines().find_map(|l| l.strip_prefix("reproduce: cargo run --release -p sim -- ")).expect("a reproduction line");
    let again = cli(&line.split(' ').collect::<Vec<_>>());
    assert_eq!((again.code, &again.stdout), (1, &out.stdout));
    assert!(line.contains(&format!("--seed {seed}")) && line.contains("--window-ms 100") && line.contains("--strategy sliding"), "{line}");
}

#[test]
fn bad_options_exit_2_with_a_message_and_no_output() {
    for args in [&["--latency-ms", "5..1"][..], &["--crash", "7@100"], &["--nodes", "x"], &["--frobnicate"], &["--loss", "2"]] {
        let out = cli(args);
        assert_eq!(out.code, 2, "{args:?}");
        assert!(out.stdout.is_empty() && out.stderr.starts_with("error: "), "{args:?}: {out:?}");
    }
    assert_eq!(cli(&["--help"]).code, 0);
}

/// Nodes run side by side on threads within each step; what each one does must not
/// depend on how many threads there are, with every fault and SWIM on.
#[test]
fn the_output_does_not_depend_on_the_threads() {
    let args = [
        "--nodes",
        "24",
        "--swim-above",
        "16",
        "--clients",
        "40",
        "--duration-ms",
        "1500",
        "--loss",
        "0.1",
        "--duplicate",
        "0.05",
        "--reorder",
        "0.1",
        "--clock-skew-ms",
        "30",
        "--partition",
        "300..700",
        "--crash",
        "2@400",
        "--restart",
        "2@1000",
        "--leave",
        "5@800",
        "--burst-clients",
        "2",
        "--burst-every-ms",
        "300",
        "--json",
    ];
    let on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| cli(&args))
    };
    let one = on(1);
    assert_eq!(one.code, 0, "{}", one.stderr);
    let v: serde_json::Value = serde_json::from_str(&one.stdout).unwrap();
    assert!(v["peers_down"].as_u64().unwrap() > 0 && v["burst_offered"].as_u64().unwrap() > 0, "{v}");
    for threads in [2, 5] {
        assert_eq!(on(threads).stdout, one.stdout, "{threads} threads");
    }
}
