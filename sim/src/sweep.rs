//! `sim sweep`: one run per (gossip interval, cluster size), as a markdown table.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::config::{Config, Sweep};
use crate::report::Report;

/// One cell of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepCell {
    /// Its gossip interval (the row).
    pub gossip_ms: u64,
    /// Its cluster size (the column).
    pub nodes: usize,
    /// Its run.
    pub report: Report,
}

/// A finished sweep: cells row by row (gossip intervals), then column by column (sizes).
#[derive(Debug, Clone, PartialEq)]
pub struct SweepTable {
    /// The options of every cell but `nodes` and `gossip_ms`.
    pub base: Config,
    /// Rows.
    pub gossip_ms: Vec<u64>,
    /// Columns.
    pub nodes: Vec<usize>,
    /// Every cell, row-major.
    pub cells: Vec<SweepCell>,
}

/// Runs every cell of `sweep`, several at a time (one thread per core); each cell is an
/// independent seeded run, so the table does not depend on the number of threads.
///
/// # Panics
/// If a cell's options are invalid ([`crate::parse_args`] checks every cell).
pub fn run_sweep(sweep: &Sweep) -> SweepTable {
    let cells: Vec<(u64, usize)> = sweep.gossip_ms.iter().flat_map(|&g| sweep.nodes.iter().map(move |&n| (g, n))).collect();
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Option<Report>>> = Mutex::new(vec![None; cells.len()]);
    let threads = std::thread::available_parallelism().map_or(1, usize::from).min(cells.len()).max(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(gossip_ms, nodes)) = cells.get(i) else { break };
                // The cells share the cores, so none runs helpers of its own.
                let report = crate::run_with(&Config { nodes, gossip_ms, ..sweep.base.clone() }, 0);
                done.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[i] = Some(report);
            });
        }
    });
    let reports = done.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    let cells = cells
        .into_iter()
        .zip(reports)
        .map(|((gossip_ms, nodes), report)| SweepCell { gossip_ms, nodes, report: report.expect("every cell ran") })
        .collect();
    SweepTable { base: sweep.base.clone(), gossip_ms: sweep.gossip_ms.clone(), nodes: sweep.nodes.clone(), cells }
}

impl SweepTable {
    /// The cell of one row and column.
    pub fn cell(&self, gossip_ms: u64, nodes: usize) -> Option<&SweepCell> {
        self.cells.iter().find(|c| c.gossip_ms == gossip_ms && c.nodes == nodes)
    }

    /// The table: each cell is `over % / under % (bytes per count B)`, over- and
    /// under-admission against the exact limiter.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = write!(s, "| gossip \\ nodes |");
        for n in &self.nodes {
            let _ = write!(s, " {n} |");
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "|---|{}", "---|".repeat(self.nodes.len()));
        for &g in &self.gossip_ms {
            let _ = write!(s, "| {g} ms |");
            for &n in &self.nodes {
                if let Some(c) = self.cell(g, n) {
                    let r = &c.report;
                    let _ = write!(
                        s,
                        " {:.2}% / {:.2}% ({:.1} B) |",
                        100.0 * r.over_admission_ratio,
                        100.0 * r.under_admission_ratio,
                        r.bytes_per_count
                    );
                }
            }
            let _ = writeln!(s);
        }
        s
    }

    /// For stderr: every cell whose run broke an invariant, with its reproduction line.
    pub fn violations(&self) -> String {
        let mut s = String::new();
        for c in self.cells.iter().filter(|c| !c.report.ok()) {
            let r = &c.report;
            let first = r.violations.first().map_or("", String::as_str);
            let _ = writeln!(
                s,
                "sim: gossip {} ms, {} nodes: {} invariant violation(s); first: {first}\nreproduce: {}",
                c.gossip_ms,
                c.nodes,
                r.violation_count,
                r.config.reproduction()
            );
        }
        s
    }
}
