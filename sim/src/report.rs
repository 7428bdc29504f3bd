//! What a run found: the figures, the checks, and how they are printed.

use std::fmt::Write as _;

use serde::Serialize;

use crate::config::Config;

/// The outcome of one run. Serializes to the `--json` object (fields in this order, the
/// options first).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Every option of the run.
    #[serde(flatten)]
    pub config: Config,
    /// Requests offered by the clients.
    pub offered: u64,
    /// Requests the cluster admitted.
    pub admitted: u64,
    /// Requests an exact global limiter (same strategy and quota, one shared state
    /// updated instantly, true time) admits from the same requests.
    pub ideal: u64,
    /// Σ over (client, window) of admissions beyond the limit. Windows are aligned
    /// windows of true (unskewed) time: what the protected backend sees.
    pub over_admitted: u64,
    /// `over_admitted / ideal`.
    pub over_admission_ratio: f64,
    /// Σ over (client, window) of the shortfall against the exact limiter, `/ ideal`.
    pub under_admission_ratio: f64,
    /// Max over (client, window) of admitted / limit.
    pub max_window_overshoot_ratio: f64,
    /// Max over (client, window) of admissions beyond the limit.
    pub max_window_over_admitted: u64,
    /// An estimate of the optimistic policy's worst overshoot of one (client, window),
    /// from [`crate::predicted_max_overshoot`]; compare with `max_window_over_admitted`.
    pub predicted_max_overshoot: u64,
    /// All live replicas held identical state (the windows retained at the end of
    /// traffic) before the tail cap passed.
    pub converged: bool,
    /// Virtual time from the end of traffic and faults to the first check (one per gossip
    /// interval) at which all live replicas agreed; `null` if they never did.
    pub convergence_ms: Option<u64>,
    /// Messages the nodes handed to the network.
    pub messages: u64,
    /// Bytes of those messages.
    pub bytes: u64,
    /// Of those, messages sent reliably (full syncs and repairs).
    pub reliable_messages: u64,
    /// Bytes of the reliable messages.
    pub reliable_bytes: u64,
    /// `bytes / entries_sent`: what a replicated count costs on the wire, everything
    /// (headers, heartbeats, digests) included.
    pub bytes_per_count: f64,
    /// Messages (copies included) a node accepted.
    pub delivered: u64,
    /// Datagrams lost, and reliable messages given up after every retransmission was lost.
    pub lost: u64,
    /// Messages dropped by a partition.
    pub partitioned: u64,
    /// Messages that arrived at a node that was down.
    pub to_down_node: u64,
    /// Datagrams delivered twice.
    pub duplicated: u64,
    /// Reliable messages delayed by at least one retransmission.
    pub retransmitted: u64,
    /// Counts the nodes sent (one per key, window, replica and receiving peer; in
    /// aggregated dissemination, aggregators' totals included, one per key, window and
    /// receiving peer).
    pub entries_sent: u64,
    /// Counts (and totals) received that raised the receiver's view.
    pub entries_merged: u64,
    /// Full syncs the nodes sent (on start, on a peer coming up or back).
    pub full_syncs: u64,
    /// Anti-entropy digests sent.
    pub digests: u64,
    /// Buckets found different by a digest and repaired.
    pub buckets_repaired: u64,
    /// Times a node marked a peer down (silent past the suspicion period), from the
    /// cores' `PeerDown` events: crashes and partitions, and false suspicions under loss.
    pub peers_down: u64,
    /// Live nodes that marked a crashed node down (`--crash`, `--restart`), each counted
    /// once per crash.
    pub crash_detections: u64,
    /// The longest a live node took to mark a crashed one down, in ms of virtual time.
    pub detection_ms_max: i64,
    /// SWIM packets sent (membership and failure detection beyond `swim_above_peers`).
    pub swim_sent: u64,
    /// Safety checks run (one node's whole view against the truth each).
    pub safety_checks: u64,
    /// Bursts sent (`--burst-clients`).
    pub bursts: u64,
    /// Requests the bursts offered (included in `offered`).
    pub burst_offered: u64,
    /// Of those, requests the cluster admitted (included in `admitted`).
    pub burst_admitted: u64,
    /// Of those, requests the exact limiter admitted (included in `ideal`).
    pub burst_ideal: u64,
    /// Most admissions of one burst client in one window (with `burst_fresh`: of one
    /// burst, unless it straddles two windows), to compare with the limit.
    pub burst_max_window_admitted: u64,
    /// With `burst_fresh`, the fewest admissions of one burst (each is a client of its
    /// own); 0 otherwise. Compared with the limit it shows the under-admission of bursts.
    pub burst_fewest_admitted: u64,
    /// Invariant violations (the first 20; `violation_count` has them all).
    pub violations: Vec<String>,
    /// Number of invariant violations.
    pub violation_count: u64,
    /// With skewed or stepped clocks: the same figures on cluster time (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_time: Option<ClusterTimeFigures>,
}

/// Over- and under-admission measured on the cluster's own time: windows of the median
/// of the nodes' clocks (the time every node's estimate converges to), against an exact
/// limiter on that clock. A cluster whose windows are exact but start `d` ms off true
/// time shows over- and under-admission on true-time windows that an exact limiter on
/// the same clock would show too; these figures leave that phase out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterTimeFigures {
    /// Requests the exact limiter on the median clock admits.
    pub ideal: u64,
    /// Σ over (client, window of the median clock) of admissions beyond the limit.
    pub over_admitted: u64,
    /// `over_admitted / ideal`.
    pub over_admission_ratio: f64,
    /// Σ over (client, window) of the shortfall against that exact limiter, `/ ideal`.
    pub under_admission_ratio: f64,
    /// Max over (client, window) of admitted / limit.
    pub max_window_overshoot_ratio: f64,
}

impl Report {
    /// Whether every invariant held.
    pub fn ok(&self) -> bool {
        self.violation_count == 0
    }

    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        // A struct of numbers, strings and lists always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The readable report: the options, then a table of results.
    pub fn to_text(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let pct = |x: f64| format!("{:.4} %", x * 100.0);
        let _ = writeln!(s, "crdt-rate-limiter simulation, seed {}", c.seed);
        let _ = writeln!(
            s,
            "  {} nodes, {} clients at {}x a limit of {} per {} ms ({} strategy, {} admission)",
            c.nodes, c.clients, c.rate, c.limit, c.window_ms, c.strategy, c.mode
        );
        let _ = writeln!(
            s,
            "  gossip every {} ms; latency {}..{} ms; loss {}, duplicate {}, reorder {}; clock skew up to {} ms",
            c.gossip_ms, c.latency_ms.0, c.latency_ms.1, c.loss, c.duplicate, c.reorder, c.clock_skew_ms
        );
        let faults: Vec<String> = c
            .partition
            .iter()
            .map(|(a, b)| format!("partition {a}..{b}"))
            .chain(c.crash.iter().map(|(n, t)| format!("crash {n}@{t}")))
            .chain(c.restart.iter().map(|(n, t)| format!("restart {n}@{t}")))
            .chain(c.leave.iter().map(|(n, t)| format!("leave {n}@{t}")))
            .chain(c.clock_step.iter().map(|(n, t, d)| format!("clock step {n}@{t}:{d}")))
            .collect();
        let _ = writeln!(s, "  faults: {}", if faults.is_empty() { "none".to_string() } else { faults.join(", ") });
        let _ = writeln!(s, "  options: {}", c.to_args().join(" "));
        let _ = writeln!(s);
        let rows: Vec<(&str, String)> = vec![
            ("offered", self.offered.to_string()),
            ("admitted", self.admitted.to_string()),
            ("ideal (exact global limiter)", self.ideal.to_string()),
            ("over-admitted", format!("{} ({} of ideal)", self.over_admitted, pct(self.over_admission_ratio))),
            ("under-admitted", pct(self.under_admission_ratio)),
            ("max window overshoot", format!("{:.3}x limit ({} over)", self.max_window_overshoot_ratio, self.max_window_over_admitted)),
            ("predicted max overshoot", format!("{} (optimistic estimate)", self.predicted_max_overshoot)),
            (
                "converged",
                match self.convergence_ms {
                    Some(ms) if self.converged => format!("yes, {ms} ms after traffic and faults ended"),
                    _ => format!("NO, not within {} ms", c.tail_cap_ms),
                },
            ),
            (
                "messages",
                format!(
                    "{} ({} bytes); {} reliable ({} bytes: full syncs and repairs)",
                    self.messages, self.bytes, self.reliable_messages, self.reliable_bytes
                ),
            ),
            (
                "network",
                format!(
                    "{} delivered, {} lost, {} partitioned, {} to down nodes, {} duplicated, {} retransmitted",
                    self.delivered, self.lost, self.partitioned, self.to_down_node, self.duplicated, self.retransmitted
                ),
            ),
            (
                "counts",
                format!(
                    "{} sent ({:.1} bytes each, all included), {} raised a view",
                    self.entries_sent, self.bytes_per_count, self.entries_merged
                ),
            ),
            (
                "repair",
                format!(
                    "{} full syncs, {} digests, {} buckets repaired; {} peers marked down",
                    self.full_syncs, self.digests, self.buckets_repaired, self.peers_down
                ),
            ),
            (
                "membership",
                format!(
                    "{} SWIM packets; {} crashes noticed, the slowest after {} ms",
                    self.swim_sent, self.crash_detections, self.detection_ms_max
                ),
            ),
            ("safety checks", format!("{}, {} violations", self.safety_checks, self.violation_count)),
        ];
        let mut rows = rows;
        if let Some(ct) = &self.cluster_time {
            rows.insert(
                6,
                (
                    "on cluster time",
                    format!(
                        "over {} of {} ideal, under {}, max window {:.3}x limit (windows of the median clock)",
                        pct(ct.over_admission_ratio),
                        ct.ideal,
                        pct(ct.under_admission_ratio),
                        ct.max_window_overshoot_ratio
                    ),
                ),
            );
        }
        if c.burst_clients > 0 {
            let fresh = if c.burst_fresh { ", a fresh client each" } else { "" };
            rows.insert(
                3,
                (
                    "bursts",
                    format!(
                        "{} of {} requests within {} ms to {} node{fresh}: {} offered, {} admitted, {} ideal; at most {} admitted per client and window{}",
                        self.bursts,
                        c.burst_size,
                        c.burst_spread_ms,
                        if c.burst_target == crate::config::BurstTarget::One { "one" } else { "every" },
                        self.burst_offered,
                        self.burst_admitted,
                        self.burst_ideal,
                        self.burst_max_window_admitted,
                        if c.burst_fresh { format!(", at least {} per burst", self.burst_fewest_admitted) } else { String::new() }
                    ),
                ),
            );
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in rows {
            let _ = writeln!(s, "  {k:<width$}  {v}");
        }
        for v in &self.violations {
            let _ = writeln!(s, "  VIOLATION: {v}");
        }
        s
    }
}

/// What one run looked like over time: recorded with [`crate::try_run_traced`] and drawn
/// by `--svg`. Times are virtual ms from the start of traffic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timeline {
    /// Window length.
    pub window_ms: u64,
    /// Requests per client per window.
    pub limit: u64,
    /// Span of traffic.
    pub duration_ms: u64,
    /// The busiest clients (most requests offered; ties to the first), per window.
    pub clients: Vec<TimelineClient>,
    /// `(at_ms, lag)`: at `at_ms`, the most admissions of one client in the current
    /// window that some live node had not seen yet. Sampled every gossip interval (or
    /// less often on long runs), until the run ends.
    pub lag: Vec<(u64, u64)>,
    /// The scheduled faults.
    pub faults: Vec<Fault>,
    /// Time from the end of traffic until all live replicas agreed, if they did.
    pub convergence_ms: Option<u64>,
}

/// One client's windows in a [`Timeline`]: index `i` is the window starting at
/// `i × window_ms` (windows of true time).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TimelineClient {
    /// The client id.
    pub name: String,
    /// Requests it offered in the whole run.
    pub offered: u64,
    /// Admissions by the cluster per window.
    pub admitted: Vec<u64>,
    /// Admissions by the exact limiter per window.
    pub ideal: Vec<u64>,
}

/// A scheduled fault, as a [`Timeline`] marks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The two halves cannot talk during `[from_ms, to_ms)`.
    Partition {
        /// Start.
        from_ms: u64,
        /// End (the heal).
        to_ms: u64,
    },
    /// A node stops and loses its state.
    Crash {
        /// Node number, from 0.
        node: usize,
        /// When.
        at_ms: u64,
    },
    /// A node's clock jumps.
    ClockStep {
        /// Node number, from 0.
        node: usize,
        /// When (true time).
        at_ms: u64,
        /// By how much (negative: back).
        delta_ms: i64,
    },
    /// A node starts again, empty.
    Restart {
        /// Node number, from 0.
        node: usize,
        /// When.
        at_ms: u64,
    },
    /// A node leaves gracefully, then stops.
    Leave {
        /// Node number, from 0.
        node: usize,
        /// When.
        at_ms: u64,
    },
}
