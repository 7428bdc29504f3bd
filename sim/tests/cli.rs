//! The built binary: help, errors that name their flag, `--svg`, and `sim sweep`.

use std::path::PathBuf;
use std::process::{Command, Output};

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sim")).args(args).output().expect("the sim binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A file name under the temporary directory, unique to this test process.
fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sim-cli-{}-{name}", std::process::id()))
}

const SMALL: &[&str] = &["--nodes", "4", "--clients", "5", "--limit", "20", "--window-ms", "200", "--duration-ms", "2000"];

#[test]
fn help_goes_to_stdout_with_status_0() {
    for args in [&["--help"][..], &["-h"], &["sweep", "--help"]] {
        let out = sim(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let stdout = text(&out.stdout);
        assert!(stdout.contains("Usage: sim") && stdout.contains("--limit <N>"), "{stdout}");
        assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    }
    let help = text(&sim(&["--help"]).stdout);
    for flag in ["--burst-clients", "--burst-target", "--svg", "--partition <A..B>", "sweep"] {
        assert!(help.contains(flag), "{flag} missing from\n{help}");
    }
    assert!(text(&sim(&["sweep", "--help"]).stdout).contains("--nodes-list"));
}

#[test]
fn bad_command_lines_exit_2_and_name_the_flag_and_why() {
    for (args, needles) in [
        (&["--bogus"][..], &["unexpected argument '--bogus'"][..]),
        (&["--window-ms", "-5"], &["--window-ms", "-5 is outside 1..=3600000", "negative"]),
        (&["--gossip-ms", "0"], &["--gossip-ms", "zero is meaningless"]),
        (&["--loss", "2"], &["--loss", "not a probability"]),
        (&["--nodes", "x"], &["--nodes", "not a whole number"]),
        (&["--crash", "9@100"], &["--crash", "node 9 does not exist"]),
        (&["--clock-step", "1@100:x"], &["--clock-step", "NODE@MS:DELTA"]),
        (&["--burst-size", "0"], &["--burst-size", "zero is meaningless"]),
        (&["--burst-target", "all"], &["--burst-target", "spread", "one"]),
        (&["sweep", "--nodes", "3"], &["--nodes", "--nodes-list"]),
        (&["sweep", "--frobnicate"], &["unexpected argument '--frobnicate'"]),
    ] {
        let out = sim(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let err = text(&out.stderr);
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: {needle} missing from {err}");
        }
    }
}

#[test]
fn svg_draws_the_run_deterministically_and_leaves_the_report_alone() {
    let (a, b) = (temp("a.svg"), temp("b.svg"));
    let faults = ["--partition", "600..1200", "--crash", "3@1500", "--clock-step", "1@300:-400", "--json"];
    let args = |path: &PathBuf| -> Vec<String> {
        SMALL.iter().chain(&faults).map(|s| s.to_string()).chain(["--svg".to_string(), path.display().to_string()]).collect()
    };
    let run = |path: &PathBuf| sim(&args(path).iter().map(String::as_str).collect::<Vec<_>>());
    let (out_a, out_b) = (run(&a), run(&b));
    assert_eq!(out_a.status.code(), Some(0), "{}", text(&out_a.stderr));
    let plain = sim(&SMALL.iter().chain(&faults).copied().collect::<Vec<_>>());
    assert_eq!(out_a.stdout, plain.stdout, "--svg changes nothing of the run");
    assert_eq!(out_a.stdout, out_b.stdout);
    let (svg_a, svg_b) = (std::fs::read_to_string(&a).unwrap(), std::fs::read_to_string(&b).unwrap());
    let _ = (std::fs::remove_file(&a), std::fs::remove_file(&b));
    assert_eq!(svg_a, svg_b, "same seed, same picture");
    assert!(svg_a.starts_with("<svg") && svg_a.trim_end().ends_with("</svg>"));
    for label in
        ["limit 20", "partition", "heals", "crash 3", "clock 1 -400 ms", "view lag", "all replicas agreed", "4 nodes, bounded admission"]
    {
        assert!(svg_a.contains(label), "{label} missing from the picture");
    }
    let other = sim(&SMALL.iter().chain(&faults).copied().chain(["--seed", "2", "--svg", a.to_str().unwrap()]).collect::<Vec<_>>());
    assert_eq!(other.status.code(), Some(0));
    assert_ne!(std::fs::read_to_string(&a).unwrap(), svg_b, "another seed, another picture");
    let _ = std::fs::remove_file(&a);
}

#[test]
fn an_svg_that_cannot_be_written_is_an_error_not_a_panic() {
    let out = sim(&[SMALL, &["--svg", "/nonexistent-dir/x.svg"]].concat());
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("--svg /nonexistent-dir/x.svg") && !err.contains("panicked"), "{err}");
}

#[test]
fn the_sweep_prints_one_run_per_cell_as_a_markdown_table() {
    let args = ["sweep", "--nodes-list", "2,3", "--gossip-ms-list", "20,100", "--clients", "3", "--duration-ms", "1000"];
    let out = sim(&args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[..2], ["| gossip \\ nodes | 2 | 3 |", "|---|---|---|"], "{table}");
    assert_eq!(lines.len(), 4, "{table}");
    // Each cell is the run of the same options, with the defaults of the sweep.
    for (row, gossip_ms) in [(2, 20), (3, 100)] {
        let cells: Vec<&str> = lines[row].split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(cells[0], format!("{gossip_ms} ms"));
        for (col, nodes) in [(1, 2), (2, 3)] {
            let cfg = sim::Config { nodes, gossip_ms, clients: 3, duration_ms: 1000, loss: 0.01, ..sim::Config::default() };
            let r = sim::run(&cfg);
            let expected =
                format!("{:.2}% / {:.2}% ({:.1} B)", 100.0 * r.over_admission_ratio, 100.0 * r.under_admission_ratio, r.bytes_per_count);
            assert_eq!(cells[col], expected, "{table}");
        }
    }
    assert_eq!(sim(&args).stdout, out.stdout, "the table does not depend on the threads");
    let svg = temp("sweep.svg");
    let plotted = sim(&[&args[..], &["--svg", svg.to_str().unwrap()]].concat());
    assert_eq!((plotted.status.code(), &plotted.stdout), (Some(0), &out.stdout));
    let picture = std::fs::read_to_string(&svg).unwrap();
    let _ = std::fs::remove_file(&svg);
    assert!(picture.contains("gossip 100 ms") && picture.contains("over-admission by cluster size"), "{picture}");
}
