//! Every option of a run, its default, its range, and the command line that sets it.

use std::fmt;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use crdt_rate_limiter::counter::ReplicaId;
use crdt_rate_limiter::GossipConfig;
use serde::Serialize;

/// The admission policy the nodes use (the library's [`crdt_rate_limiter::Admission`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each node spends only its share of the remainder per gossip round.
    #[default]
    Bounded,
    /// Each node admits while its view of the global count is under the limit.
    Optimistic,
    /// Bounded without the forecast: each node spends only its share.
    Shares,
}

/// The strategy every limiter (and the oracle) uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StrategyArg {
    /// [`crdt_rate_limiter::Strategy::FixedWindow`].
    #[value(help = "fixed windows")]
    Fixed,
    /// [`crdt_rate_limiter::Strategy::SlidingWindow`] (the default).
    #[default]
    #[value(help = "sliding windows (the previous window weighted)")]
    Sliding,
    /// [`crdt_rate_limiter::Strategy::TokenBucket`].
    #[value(help = "token bucket")]
    Token,
    /// [`crdt_rate_limiter::Strategy::SlidingLog`].
    #[value(help = "sliding log (at most the limit in any span of a window, in buckets of a tenth)")]
    Log,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Bounded => "bounded",
            Mode::Optimistic => "optimistic",
            Mode::Shares => "shares",
        })
    }
}

/// Where the requests of one burst go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BurstTarget {
    /// Round-robin over the nodes, from a node drawn per burst.
    #[default]
    Spread,
    /// All to one node, drawn per burst.
    One,
}

impl fmt::Display for BurstTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BurstTarget::Spread => "spread",
            BurstTarget::One => "one",
        })
    }
}

impl fmt::Display for StrategyArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StrategyArg::Fixed => "fixed",
            StrategyArg::Sliding => "sliding",
            StrategyArg::Token => "token",
            StrategyArg::Log => "log",
        })
    }
}

/// Upper bounds on the options, so that a typo cannot ask for a run that never ends.
pub mod limits {
    /// Most nodes.
    pub const NODES_MAX: usize = 1_000;
    /// Most clients (steady ones, plus burst clients, plus one per burst with `--burst-fresh`).
    pub const CLIENTS_MAX: usize = 1_000_000;
    /// Longest window, gossip interval, latency, clock skew and tail cap, in ms.
    pub const SPAN_MS_MAX: u64 = 3_600_000;
    /// Longest run of traffic, in ms (one day).
    pub const DURATION_MS_MAX: u64 = 86_400_000;
    /// Highest offered load, as a multiple of the limit.
    pub const RATE_MAX: f64 = 1_000.0;
    /// Most requests a run may expect to offer.
    pub const REQUESTS_MAX: f64 = 1e9;
    /// Most scheduled faults (crashes, restarts, partitions) of each kind.
    pub const FAULTS_MAX: usize = 1_000;
    /// Most requests in one burst.
    pub const BURST_SIZE_MAX: u64 = 100_000;
    /// Longest gossip interval, in ms.
    pub const GOSSIP_MS_MAX: u64 = 60_000;
    /// Highest one-way latency, in ms.
    pub const LATENCY_MS_MAX: u64 = 60_000;
    /// Highest limit per window.
    pub const LIMIT_MAX: u64 = u32::MAX as u64;
}

use limits::*;

/// All options of one simulated run. `Default` gives the command line's defaults.
///
/// Times are virtual milliseconds from the start of traffic. Nodes are numbered from 0
/// (`--crash 2@1000` crashes the third node); node `i` is replica `{node: i + 1}`.
#[derive(Debug, Clone, PartialEq, Serialize, Args)]
pub struct Config {
    /// Drives every random choice of the run. Default 1.
    #[arg(long, help = "drives every random choice", value_name = "N", default_value_t = 1, help_heading = "Run")]
    pub seed: u64,
    /// Cluster size. Default 5; `1..=1000`. Above 16 the core disseminates through
    /// aggregators (or in fan-out mode, with `--aggregate-above`).
    #[arg(long, help = "cluster size (above 16 counts go through aggregators)", value_name = "N", default_value_t = 5, value_parser = int_in::<usize, 1, { NODES_MAX as u64 }>, help_heading = "Cluster and load")]
    pub nodes: usize,
    /// Distinct clients. Default 100; `1..=1_000_000`.
    #[arg(long, help = "distinct steady clients", value_name = "N", default_value_t = 100, value_parser = int_in::<usize, 1, { CLIENTS_MAX as u64 }>, help_heading = "Cluster and load")]
    pub clients: usize,
    /// Requests per client per window. Default 100; `1..=2³²−1`.
    #[arg(long, help = "requests per client per window", value_name = "N", default_value_t = 100, value_parser = int_in::<u64, 1, LIMIT_MAX>, help_heading = "Cluster and load")]
    pub limit: u64,
    /// Window length. Default 1000 ms; `1..=3_600_000`.
    #[arg(long, help = "window length", value_name = "MS", default_value_t = 1000, value_parser = int_in::<u64, 1, SPAN_MS_MAX>, help_heading = "Cluster and load")]
    pub window_ms: u64,
    /// Each client's offered load as a multiple of its limit. Default 3.0; `0..=1000`.
    #[arg(long, help = "each steady client's offered load, as a multiple of its limit (Poisson arrivals)", value_name = "X", default_value_t = 3.0, value_parser = rate, help_heading = "Cluster and load")]
    pub rate: f64,
    /// Fraction of each client's requests sent to its favourite node (drawn per client
    /// from the seed); the rest are spread uniformly. Default 0; `0..=1`.
    #[arg(long, help = "fraction of each client's requests sent to its favourite node", value_name = "F", default_value_t = 0.0, value_parser = probability, help_heading = "Cluster and load")]
    pub skew_traffic: f64,
    /// Gossip interval. Default 20 ms; `1..=60_000`.
    #[arg(long, help = "gossip interval", value_name = "MS", default_value_t = 20, value_parser = int_in::<u64, 1, GOSSIP_MS_MAX>, help_heading = "Gossip and network")]
    pub gossip_ms: u64,
    /// Beyond this many peers, nodes use aggregated dissemination (the library's
    /// `GossipConfig::aggregate_above_peers`; at least 16). Default: the library's.
    #[arg(long, help = "beyond this many peers, aggregated dissemination (default: the library's)", value_name = "PEERS", value_parser = int_in::<usize, 16, { NODES_MAX as u64 }>, help_heading = "Gossip and network")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregate_above: Option<usize>,
    /// Beyond this many peers, liveness comes from SWIM (the library's
    /// `GossipConfig::swim_above_peers`; at least 16). Default: the library's.
    #[arg(long, help = "beyond this many peers, SWIM decides liveness (default: the library's)", value_name = "PEERS", value_parser = int_in::<usize, 16, { NODES_MAX as u64 }>, help_heading = "Gossip and network")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swim_above: Option<usize>,
    /// Turns the partial view off (the library's `GossipConfig::partial_view` false):
    /// in SWIM mode, members outside the aggregator pool heartbeat every member in turn,
    /// as before it. Default off (the partial view on).
    #[arg(
        long,
        help = "in SWIM mode, members outside the pool heartbeat every member (no partial view)",
        help_heading = "Gossip and network"
    )]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub full_view: bool,
    /// Aggregators per key in aggregated dissemination. Default: the library's (2).
    #[arg(long, help = "aggregators per key in aggregated dissemination (default: the library's)", value_name = "K", value_parser = int_in::<usize, 1, 8>, help_heading = "Gossip and network")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregators: Option<usize>,
    /// The most members that aggregate. Default: the library's (32).
    #[arg(long, help = "the most members that aggregate (default: the library's)", value_name = "N", value_parser = int_in::<usize, 1, { NODES_MAX as u64 }>, help_heading = "Gossip and network")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregator_pool: Option<usize>,
    /// One-way latency range `[min, max]`, uniform. Default `[1, 5]` ms.
    #[arg(long, help = "one-way latency, uniform in A..=B", value_name = "A..B", default_value = "1..5", value_parser = latency, help_heading = "Gossip and network")]
    pub latency_ms: (u64, u64),
    /// Probability that a message is lost. Default 0; `0..=1`.
    #[arg(long, help = "probability a message is lost", value_name = "P", default_value_t = 0.0, value_parser = probability, help_heading = "Gossip and network")]
    pub loss: f64,
    /// Probability that a datagram is delivered twice. Default 0; `0..=1`.
    #[arg(long, help = "probability a datagram is delivered twice", value_name = "P", default_value_t = 0.0, value_parser = probability, help_heading = "Gossip and network")]
    pub duplicate: f64,
    /// Probability that a message is held back by up to three maximum latencies.
    /// Default 0; `0..=1`.
    #[arg(long, help = "probability a message is held back by up to 3x the maximum latency", value_name = "P", default_value_t = 0.0, value_parser = probability, help_heading = "Gossip and network")]
    pub reorder: f64,
    /// Each node's clock is off by a fixed amount drawn uniformly in `±clock_skew_ms`.
    /// Default 0. Beyond 1000, clocks are further apart than the limiter's 2 s tolerance.
    #[arg(long, help = "each node's clock is off by a fixed amount in +-MS (beyond 1000: past the limiter's 2 s tolerance, slow convergence)", value_name = "MS", default_value_t = 0, value_parser = int_in::<u64, 0, SPAN_MS_MAX>, help_heading = "Gossip and network")]
    pub clock_skew_ms: u64,
    /// Intervals `[start, end)` during which the first ⌈N/2⌉ nodes and the rest cannot
    /// talk. Default none. Repeatable.
    #[arg(long, help = "the first half of the nodes cannot talk to the rest during [A, B)", value_name = "A..B", value_parser = interval, help_heading = "Faults (repeatable)")]
    pub partition: Vec<(u64, u64)>,
    /// `(node, at_ms)`: the node stops and loses its state. Default none. Repeatable.
    #[arg(long, help = "the node stops and loses its state", value_name = "NODE@MS", value_parser = node_at, help_heading = "Faults (repeatable)")]
    pub crash: Vec<(usize, u64)>,
    /// `(node, at_ms)`: the node starts again, empty, as a new incarnation (a node that
    /// is up is crashed first). Default none. Repeatable.
    #[arg(long, help = "the node starts again, empty, as a new incarnation", value_name = "NODE@MS", value_parser = node_at, help_heading = "Faults (repeatable)")]
    pub restart: Vec<(usize, u64)>,
    /// `(node, at_ms)`: the node leaves gracefully (`GossipNode::leave`: beyond the SWIM
    /// threshold, SWIM tells the others it is down), then stops and loses its state.
    /// Default none. Repeatable.
    #[arg(long, help = "the node leaves gracefully (SWIM gossips its leave), then stops", value_name = "NODE@MS", value_parser = node_at, help_heading = "Faults (repeatable)")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leave: Vec<(usize, u64)>,
    /// `(node, at_ms, delta_ms)`: the node's clock jumps by `delta_ms` (negative: back) at
    /// `at_ms`, and stays off by that much more. Default none. Repeatable.
    #[arg(long, help = "the node's clock jumps by DELTA ms (negative: back) and stays there", value_name = "NODE@MS:DELTA", value_parser = clock_step, help_heading = "Faults (repeatable)")]
    pub clock_step: Vec<(usize, u64, i64)>,
    /// Admission policy. Default bounded.
    #[arg(long, help = "admission policy", value_name = "M", default_value_t = Mode::Bounded, value_enum, help_heading = "Cluster and load")]
    pub mode: Mode,
    /// Strategy of every limiter and of the oracle. Default sliding.
    #[arg(long, help = "strategy of every limiter and of the oracle", value_name = "S", default_value_t = StrategyArg::Sliding, value_enum, help_heading = "Cluster and load")]
    pub strategy: StrategyArg,
    /// Burst clients, on top of the steady ones: each sends `burst_size` requests within
    /// `burst_spread_ms` at random moments. Default 0; `0..=1_000_000`.
    #[arg(long, help = "burst clients, on top of the steady ones", value_name = "N", default_value_t = 0, value_parser = int_in::<usize, 0, { CLIENTS_MAX as u64 }>, help_heading = "Bursts")]
    pub burst_clients: usize,
    /// Requests in one burst. Default 40; `1..=100_000`.
    #[arg(long, help = "requests in one burst", value_name = "N", default_value_t = 40, value_parser = int_in::<u64, 1, BURST_SIZE_MAX>, help_heading = "Bursts")]
    pub burst_size: u64,
    /// A burst's requests arrive uniformly within this span (0: all at once). Default 10 ms;
    /// `0..=3_600_000`.
    #[arg(long, help = "a burst's requests arrive uniformly within this span (0: all at once)", value_name = "MS", default_value_t = 10, value_parser = int_in::<u64, 0, SPAN_MS_MAX>, help_heading = "Bursts")]
    pub burst_spread_ms: u64,
    /// Mean time between two bursts of one burst client (exponential gaps, so bursts come
    /// at random moments). Default 10_000 ms; `1..=86_400_000`.
    #[arg(long, help = "mean time between two bursts of one burst client (exponential gaps)", value_name = "MS", default_value_t = 10_000, value_parser = int_in::<u64, 1, DURATION_MS_MAX>, help_heading = "Bursts")]
    pub burst_every_ms: u64,
    /// Where a burst's requests go: `spread` round-robin over the nodes (from a node drawn
    /// per burst), or `one` node drawn per burst. Default spread.
    #[arg(long, help = "where a burst's requests go: round-robin over the nodes from a drawn one, or all to one drawn node", value_name = "T", default_value_t = BurstTarget::Spread, value_enum, help_heading = "Bursts")]
    pub burst_target: BurstTarget,
    /// Each burst comes from a client nobody has seen before (a fresh client id per burst)
    /// instead of from one of `burst_clients` recurring ones. Default off.
    #[arg(long, help = "each burst comes from a client id nobody has seen before", help_heading = "Bursts")]
    pub burst_fresh: bool,
    /// Span of traffic; faults happen within it. Default 10_000 ms.
    #[arg(long, help = "span of traffic; a quiet tail follows until replicas agree", value_name = "MS", default_value_t = 10_000, value_parser = int_in::<u64, 1, DURATION_MS_MAX>, help_heading = "Run")]
    pub duration_ms: u64,
    /// Interval of the safety check (one node's whole view against the truth, nodes in
    /// turn); 0 turns it off. Default 50 ms.
    #[arg(long, help = "safety-check interval, 0 = off", value_name = "MS", default_value_t = 50, value_parser = int_in::<u64, 0, SPAN_MS_MAX>, help_heading = "Run")]
    pub check_ms: u64,
    /// How long the quiet tail after traffic may run before the run is declared not
    /// converged. Default 30_000 ms.
    #[arg(long, help = "longest quiet tail before 'not converged'", value_name = "MS", default_value_t = 30_000, value_parser = int_in::<u64, 1, SPAN_MS_MAX>, help_heading = "Run")]
    pub tail_cap_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            seed: 1,
            nodes: 5,
            clients: 100,
            limit: 100,
            window_ms: 1000,
            rate: 3.0,
            skew_traffic: 0.0,
            gossip_ms: 20,
            aggregate_above: None,
            swim_above: None,
            full_view: false,
            aggregators: None,
            aggregator_pool: None,
            latency_ms: (1, 5),
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            clock_skew_ms: 0,
            partition: Vec::new(),
            crash: Vec::new(),
            restart: Vec::new(),
            leave: Vec::new(),
            clock_step: Vec::new(),
            mode: Mode::Bounded,
            strategy: StrategyArg::Sliding,
            burst_clients: 0,
            burst_size: 40,
            burst_spread_ms: 10,
            burst_every_ms: 10_000,
            burst_target: BurstTarget::Spread,
            burst_fresh: false,
            duration_ms: 10_000,
            check_ms: 50,
            tail_cap_ms: 30_000,
        }
    }
}

/// A bad command line or an option out of range (the CLI exits with status 2). The text
/// names the flag and says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

fn check_probability(flag: &str, p: f64) -> Result<(), ConfigError> {
    if !(0.0..=1.0).contains(&p) {
        return err(format!("{flag}: {p} is not a probability between 0 and 1"));
    }
    Ok(())
}

// ----- value parsers: clap prefixes their messages with the flag and the value -----

/// A whole number in `LO..=HI`.
fn int_in<T: TryFrom<u64>, const LO: u64, const HI: u64>(v: &str) -> Result<T, String> {
    let n: i128 = v.trim().parse().map_err(|_| format!("not a whole number (expected {LO}..={HI})"))?;
    if n < i128::from(LO) || n > i128::from(HI) {
        let why = if n == 0 {
            " (zero is meaningless here)"
        } else if n < 0 {
            " (it cannot be negative)"
        } else {
            ""
        };
        return Err(format!("{n} is outside {LO}..={HI}{why}"));
    }
    T::try_from(n as u64).map_err(|_| format!("{n} does not fit"))
}

fn finite(v: &str) -> Result<f64, String> {
    let x: f64 = v.trim().parse().map_err(|_| "not a number".to_string())?;
    if !x.is_finite() {
        return Err(format!("{x} is not a finite number"));
    }
    Ok(x)
}

fn probability(v: &str) -> Result<f64, String> {
    let p = finite(v)?;
    if !(0.0..=1.0).contains(&p) {
        return Err(format!("{p} is not a probability between 0 and 1"));
    }
    Ok(p)
}

fn rate(v: &str) -> Result<f64, String> {
    let x = finite(v)?;
    if !(0.0..=RATE_MAX).contains(&x) {
        return Err(format!("{x} is outside 0..={RATE_MAX}"));
    }
    Ok(x)
}

/// `A..B` (or `A..=B`, or a single `A`, meaning `A..A`).
fn range(v: &str) -> Result<(u64, u64), String> {
    let num = |s: &str| s.trim().parse::<u64>().map_err(|_| format!("'{s}' is not a whole number of ms (expected A..B)"));
    match v.split_once("..") {
        Some((a, b)) => Ok((num(a)?, num(b.trim_start_matches('='))?)),
        None => {
            let a = num(v)?;
            Ok((a, a))
        }
    }
}

fn latency(v: &str) -> Result<(u64, u64), String> {
    let (a, b) = range(v)?;
    if a > b {
        return Err(format!("{a}..{b} is empty (the minimum is above the maximum)"));
    }
    if b > LATENCY_MS_MAX {
        return Err(format!("{b} ms is above {LATENCY_MS_MAX} ms"));
    }
    Ok((a, b))
}

fn interval(v: &str) -> Result<(u64, u64), String> {
    let (a, b) = range(v)?;
    if a >= b {
        return Err(format!("{a}..{b} is empty (the start must be before the end)"));
    }
    Ok((a, b))
}

/// `NODE@MS`.
fn node_at(v: &str) -> Result<(usize, u64), String> {
    let (node, at) = v.split_once('@').ok_or_else(|| "expected NODE@MS, for example 2@1500".to_string())?;
    let node = node.trim().parse().map_err(|_| format!("'{node}' is not a node number (expected NODE@MS)"))?;
    let at = at.trim().parse().map_err(|_| format!("'{at}' is not a whole number of ms (expected NODE@MS)"))?;
    Ok((node, at))
}

/// `NODE@MS:DELTA`, DELTA a signed number of ms.
fn clock_step(v: &str) -> Result<(usize, u64, i64), String> {
    let (at, delta) = v.rsplit_once(':').ok_or_else(|| "expected NODE@MS:DELTA, for example 1@2000:-1500".to_string())?;
    let (node, at) = node_at(at)?;
    let delta: i64 = delta.trim().parse().map_err(|_| format!("'{delta}' is not a whole number of ms (expected NODE@MS:DELTA)"))?;
    if delta.unsigned_abs() > SPAN_MS_MAX {
        return Err(format!("a step of {delta} ms is beyond ±{SPAN_MS_MAX} ms"));
    }
    Ok((node, at, delta))
}

// ----- the command line -----

/// `sim [OPTIONS]` runs once; `sim sweep [OPTIONS]` runs a grid.
#[derive(Debug, Parser)]
#[command(
    name = "sim",
    about = "Deterministic simulation of a crdt-rate-limiter cluster on virtual time.",
    long_about = "Deterministic simulation of a crdt-rate-limiter cluster on virtual time: real limiters and \
                  gossip cores, a seeded network, seeded faults and an exact global limiter beside them. Every \
                  option is optional. Times are virtual milliseconds from the start of traffic; nodes are \
                  numbered from 0. The same options give the same output, byte for byte.",
    after_help = "Exit status: 0 ok, 1 an invariant was violated (a reproduction line is printed on stderr), 2 bad options.\n\
                  Run it with: cargo run --release -p sim -- [OPTIONS]",
    args_conflicts_with_subcommands = true,
    allow_negative_numbers = true,
    disable_version_flag = true,
    disable_help_flag = true,
    disable_help_subcommand = true
)]
struct Cli {
    /// Print help.
    #[arg(short, long, action = clap::ArgAction::HelpShort)]
    help: Option<bool>,
    #[command(subcommand)]
    sweep: Option<Sub>,
    #[command(flatten)]
    config: Config,
    /// Print one JSON object instead of the readable report.
    #[arg(long, help_heading = "Output")]
    json: bool,
    /// Also draw, per window, what the cluster admitted for the busiest clients against
    /// the limit and the exact limiter, with faults marked and how far the slowest node's
    /// view lags, as an SVG file.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    svg: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Over- and under-admission by gossip interval and cluster size, as a markdown table.
    #[command(
        long_about = "Over- and under-admission by gossip interval (rows) and cluster size (columns), as a \
                      markdown table. Each cell is one run of the options below, with --nodes and --gossip-ms \
                      taken from the lists: over-admitted % / under-admitted % of the exact limiter (bytes per \
                      replicated count). Defaults: 20 clients at 3x a limit of 100 per 1 s, latency 1..5 ms, \
                      loss 1%, 5 s of traffic, seed 1.",
        allow_negative_numbers = true,
        disable_help_flag = true
    )]
    Sweep(SweepArgs),
}

#[derive(Debug, Args)]
struct SweepArgs {
    /// Print help.
    #[arg(short, long, action = clap::ArgAction::HelpShort)]
    help: Option<bool>,
    /// Gossip intervals, one row each.
    #[arg(long, value_name = "MS,...", value_delimiter = ',', default_values_t = [5u64, 20, 100, 500], value_parser = int_in::<u64, 1, GOSSIP_MS_MAX>, help_heading = "Sweep")]
    gossip_ms_list: Vec<u64>,
    /// Cluster sizes, one column each.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_values_t = [3usize, 10, 50, 200], value_parser = int_in::<usize, 1, { NODES_MAX as u64 }>, help_heading = "Sweep")]
    nodes_list: Vec<usize>,
    /// Also plot over-admission against cluster size, one line per gossip interval.
    #[arg(long, value_name = "FILE", help_heading = "Sweep")]
    svg: Option<PathBuf>,
    #[command(flatten)]
    config: Config,
}

/// The sweep's defaults where they differ from a single run's.
const SWEEP_DEFAULTS: [(&str, &str); 3] = [("clients", "20"), ("loss", "0.01"), ("duration_ms", "5000")];

/// Most cells of one sweep.
pub const SWEEP_CELLS_MAX: usize = 1_000;

fn command() -> clap::Command {
    Cli::command().mut_subcommand("sweep", |mut s| {
        for (id, v) in SWEEP_DEFAULTS {
            s = s.mut_arg(id, |a| a.default_value(v));
        }
        // The lists replace them (and a value given anyway is refused, not ignored).
        s.mut_arg("nodes", |a| a.hide(true)).mut_arg("gossip_ms", |a| a.hide(true))
    })
}

/// A grid of runs: every gossip interval against every cluster size.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// The options of every cell but `nodes` and `gossip_ms`.
    pub base: Config,
    /// Rows.
    pub gossip_ms: Vec<u64>,
    /// Columns.
    pub nodes: Vec<usize>,
    /// Where to draw the plot, if asked.
    pub svg: Option<PathBuf>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run and print a readable report, or one JSON object with `json`.
    Run {
        /// The run's options.
        config: Box<Config>,
        /// Print JSON.
        json: bool,
        /// Draw the run's timeline into this SVG file.
        svg: Option<PathBuf>,
    },
    /// Run a sweep and print its table.
    Sweep(Box<Sweep>),
    /// Print this text (the help of the command or subcommand asked about) on stdout.
    Help(String),
}

/// The help text of the single run (`sim --help`).
pub fn usage() -> String {
    command().render_long_help().to_string()
}

fn given_on_command_line(m: &ArgMatches, id: &str) -> bool {
    m.value_source(id) == Some(ValueSource::CommandLine)
}

/// Parses the command line (without the program name).
///
/// # Errors
/// An unknown flag, a missing or malformed value, or an option out of range; the message
/// is clap's, naming the flag and saying why.
pub fn parse_args<I, S>(args: I) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let argv = std::iter::once("sim".to_string()).chain(args.into_iter().map(|s| s.as_ref().to_string()));
    let mut cmd = command();
    let matches = match cmd.try_get_matches_from_mut(argv) {
        Ok(m) => m,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp) => return Ok(Command::Help(e.render().to_string())),
        Err(e) => return err(e.render().to_string()),
    };
    let invalid =
        |cmd: &mut clap::Command, msg: String| ConfigError(cmd.error(clap::error::ErrorKind::ValueValidation, msg).render().to_string());
    let cli = Cli::from_arg_matches(&matches).map_err(|e| ConfigError(e.render().to_string()))?;
    match cli.sweep {
        None => {
            cli.config.validate().map_err(|e| invalid(&mut cmd, e.0))?;
            Ok(Command::Run { config: Box::new(cli.config), json: cli.json, svg: cli.svg })
        }
        Some(Sub::Sweep(s)) => {
            let sub = matches.subcommand_matches("sweep").expect("the sweep subcommand matched");
            let mut sweep_cmd = cmd.find_subcommand_mut("sweep").expect("sweep is a subcommand").clone();
            for (flag, id, instead) in [("--nodes", "nodes", "--nodes-list"), ("--gossip-ms", "gossip_ms", "--gossip-ms-list")] {
                if given_on_command_line(sub, id) {
                    return Err(invalid(&mut sweep_cmd, format!("{flag}: the sweep takes its values from {instead}")));
                }
            }
            let cells = s.gossip_ms_list.len() * s.nodes_list.len();
            if cells > SWEEP_CELLS_MAX {
                return Err(invalid(&mut sweep_cmd, format!("--gossip-ms-list × --nodes-list: {cells} cells, at most {SWEEP_CELLS_MAX}")));
            }
            for &nodes in &s.nodes_list {
                for &gossip_ms in &s.gossip_ms_list {
                    Config { nodes, gossip_ms, ..s.config.clone() }
                        .validate()
                        .map_err(|e| invalid(&mut sweep_cmd, format!("{e} (with --nodes {nodes}, --gossip-ms {gossip_ms})")))?;
                }
            }
            Ok(Command::Sweep(Box::new(Sweep { base: s.config, gossip_ms: s.gossip_ms_list, nodes: s.nodes_list, svg: s.svg })))
        }
    }
}

impl Config {
    /// Checks every option against its range.
    ///
    /// # Errors
    /// The first option out of range, with the flag that sets it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let span = |flag: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                err(format!("{flag}: {v} is outside {lo}..={hi}"))
            }
        };
        span("--nodes", self.nodes as u64, 1, NODES_MAX as u64)?;
        span("--clients", self.clients as u64, 1, CLIENTS_MAX as u64)?;
        span("--limit", self.limit, 1, u64::from(u32::MAX))?;
        span("--window-ms", self.window_ms, 1, SPAN_MS_MAX)?;
        if !(0.0..=RATE_MAX).contains(&self.rate) {
            return err(format!("--rate: {} is outside 0..={RATE_MAX}", self.rate));
        }
        check_probability("--skew-traffic", self.skew_traffic)?;
        span("--gossip-ms", self.gossip_ms, 1, GOSSIP_MS_MAX)?;
        let (lat_min, lat_max) = self.latency_ms;
        if lat_min > lat_max {
            return err(format!("--latency-ms: {lat_min}..{lat_max} is empty (the minimum is above the maximum)"));
        }
        span("--latency-ms", lat_max, 0, LATENCY_MS_MAX)?;
        check_probability("--loss", self.loss)?;
        check_probability("--duplicate", self.duplicate)?;
        check_probability("--reorder", self.reorder)?;
        span("--clock-skew-ms", self.clock_skew_ms, 0, SPAN_MS_MAX)?;
        span("--duration-ms", self.duration_ms, 1, DURATION_MS_MAX)?;
        span("--check-ms", self.check_ms, 0, SPAN_MS_MAX)?;
        span("--tail-cap-ms", self.tail_cap_ms, 1, SPAN_MS_MAX)?;
        if let Some(pool) = self.aggregator_pool {
            let default = GossipConfig::new(ReplicaId { node: 1, incarnation: 1 }).aggregators;
            let k = self.aggregators.unwrap_or(default);
            if pool < k {
                return err(format!("--aggregator-pool: {pool} is below the {k} aggregators per key"));
            }
        }
        for (flag, n) in [
            ("--partition", self.partition.len()),
            ("--crash", self.crash.len()),
            ("--restart", self.restart.len()),
            ("--leave", self.leave.len()),
            ("--clock-step", self.clock_step.len()),
        ] {
            if n > FAULTS_MAX {
                return err(format!("{flag}: at most {FAULTS_MAX} of them"));
            }
        }
        for &(start, end) in &self.partition {
            if start >= end {
                return err(format!("--partition: {start}..{end} is empty (the start must be before the end)"));
            }
            if end > self.duration_ms {
                return err(format!(
                    "--partition: {start}..{end} ends after --duration-ms {} (faults heal by the end of traffic)",
                    self.duration_ms
                ));
            }
        }
        for (flag, list) in [("--crash", &self.crash), ("--restart", &self.restart), ("--leave", &self.leave)] {
            for &(node, at) in list {
                if node >= self.nodes {
                    return err(format!("{flag}: node {node} does not exist (nodes are numbered 0..={})", self.nodes - 1));
                }
                if at > self.duration_ms {
                    return err(format!("{flag}: {node}@{at} is after --duration-ms {}", self.duration_ms));
                }
            }
        }
        span("--burst-clients", self.burst_clients as u64, 0, CLIENTS_MAX as u64)?;
        span("--burst-size", self.burst_size, 1, BURST_SIZE_MAX)?;
        span("--burst-spread-ms", self.burst_spread_ms, 0, SPAN_MS_MAX)?;
        span("--burst-every-ms", self.burst_every_ms, 1, DURATION_MS_MAX)?;
        let clients = self.clients as f64 + if self.burst_fresh { self.expected_bursts() * 2.0 } else { self.burst_clients as f64 };
        if clients > CLIENTS_MAX as f64 {
            return err(format!(
                "--clients plus burst clients would be about {clients:.0}, more than {CLIENTS_MAX}: lower --clients, --burst-clients or raise --burst-every-ms"
            ));
        }
        for &(node, at, delta) in &self.clock_step {
            if node >= self.nodes {
                return err(format!("--clock-step: node {node} does not exist (nodes are numbered 0..={})", self.nodes - 1));
            }
            if at > self.duration_ms {
                return err(format!("--clock-step: {node}@{at} is after --duration-ms {}", self.duration_ms));
            }
            if delta.unsigned_abs() > SPAN_MS_MAX {
                return err(format!("--clock-step: a step of {delta} ms is beyond ±{SPAN_MS_MAX} ms"));
            }
        }
        let requests = self.expected_requests();
        if requests > REQUESTS_MAX {
            return err(format!("the run would offer about {requests:.0} requests, more than {REQUESTS_MAX:.0}: lower --clients, --limit, --rate, --burst-clients, --burst-size or --duration-ms"));
        }
        Ok(())
    }

    /// Requests the run is expected to offer: clients × rate × limit per window, plus
    /// the bursts' requests.
    pub fn expected_requests(&self) -> f64 {
        let steady = self.clients as f64 * self.rate * self.limit as f64 * self.duration_ms as f64 / self.window_ms as f64;
        steady + self.expected_bursts() * self.burst_size as f64
    }

    /// Bursts the run is expected to have: burst clients × duration / mean gap.
    pub fn expected_bursts(&self) -> f64 {
        self.burst_clients as f64 * self.duration_ms as f64 / self.burst_every_ms as f64
    }

    /// The command-line arguments that reproduce this configuration, every option explicit.
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |flag: &str, v: String| {
            a.push(flag.to_string());
            a.push(v);
        };
        push("--nodes", self.nodes.to_string());
        push("--clients", self.clients.to_string());
        push("--limit", self.limit.to_string());
        push("--window-ms", self.window_ms.to_string());
        push("--rate", format!("{:?}", self.rate));
        push("--skew-traffic", format!("{:?}", self.skew_traffic));
        push("--gossip-ms", self.gossip_ms.to_string());
        if let Some(above) = self.aggregate_above {
            push("--aggregate-above", above.to_string());
        }
        if let Some(above) = self.swim_above {
            push("--swim-above", above.to_string());
        }
        if let Some(k) = self.aggregators {
            push("--aggregators", k.to_string());
        }
        if let Some(n) = self.aggregator_pool {
            push("--aggregator-pool", n.to_string());
        }
        push("--latency-ms", format!("{}..{}", self.latency_ms.0, self.latency_ms.1));
        push("--loss", format!("{:?}", self.loss));
        push("--duplicate", format!("{:?}", self.duplicate));
        push("--reorder", format!("{:?}", self.reorder));
        push("--clock-skew-ms", self.clock_skew_ms.to_string());
        for (s, e) in &self.partition {
            push("--partition", format!("{s}..{e}"));
        }
        for (n, at) in &self.crash {
            push("--crash", format!("{n}@{at}"));
        }
        for (n, at) in &self.restart {
            push("--restart", format!("{n}@{at}"));
        }
        for (n, at) in &self.leave {
            push("--leave", format!("{n}@{at}"));
        }
        for (n, at, delta) in &self.clock_step {
            push("--clock-step", format!("{n}@{at}:{delta}"));
        }
        push("--mode", self.mode.to_string());
        push("--strategy", self.strategy.to_string());
        push("--burst-clients", self.burst_clients.to_string());
        push("--burst-size", self.burst_size.to_string());
        push("--burst-spread-ms", self.burst_spread_ms.to_string());
        push("--burst-every-ms", self.burst_every_ms.to_string());
        push("--burst-target", self.burst_target.to_string());
        push("--duration-ms", self.duration_ms.to_string());
        push("--check-ms", self.check_ms.to_string());
        push("--tail-cap-ms", self.tail_cap_ms.to_string());
        push("--seed", self.seed.to_string());
        if self.burst_fresh {
            a.push("--burst-fresh".to_string());
        }
        if self.full_view {
            a.push("--full-view".to_string());
        }
        a
    }

    /// The one-line command that reproduces this run.
    pub fn reproduction(&self) -> String {
        format!("cargo run --release -p sim -- {}", self.to_args().join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_config(args: &[&str]) -> Config {
        match parse_args(args).unwrap() {
            Command::Run { config, .. } => *config,
            other => panic!("not a run: {other:?}"),
        }
    }

    #[test]
    fn no_flags_give_the_documented_defaults() {
        assert_eq!(run_config(&[]), Config::default());
    }

    #[test]
    fn the_reproduction_arguments_parse_back_to_the_same_config() {
        let c = run_config(&[
            "--nodes",
            "7",
            "--rate=0.1",
            "--latency-ms",
            "2..9",
            "--partition",
            "100..200",
            "--crash",
            "3@50",
            "--restart",
            "3@150",
            "--leave",
            "4@120",
            "--clock-step",
            "2@100:-1500",
            "--mode",
            "optimistic",
            "--strategy",
            "token",
            "--loss",
            "0.3",
            "--duration-ms",
            "300",
            "--burst-clients",
            "2",
            "--burst-target",
            "one",
            "--burst-fresh",
        ]);
        assert_eq!(run_config(&c.to_args().iter().map(String::as_str).collect::<Vec<_>>()), c);
        assert_eq!(c.rate, 0.1);
        assert_eq!(c.crash, vec![(3, 50)]);
    }

    #[test]
    fn bad_input_is_refused_with_the_flag_named() {
        for (args, needle) in [
            (&["--latency-ms", "5..1"][..], "--latency-ms"),
            (&["--crash", "5@10"][..], "node 5 does not exist"),
            (&["--crash", "x"][..], "NODE@MS"),
            (&["--clock-step", "1@100"][..], "NODE@MS:DELTA"),
            (&["--clock-step", "7@100:5"][..], "node 7 does not exist"),
            (&["--nodes", "0"][..], "--nodes"),
            (&["--loss", "1.5"][..], "--loss"),
            (&["--rate", "NaN"][..], "--rate"),
            (&["--partition", "9000..20000"][..], "--duration-ms"),
            (&["--bogus", "1"][..], "unexpected argument '--bogus'"),
            (&["--nodes"][..], "a value is required for '--nodes <N>'"),
            (&["--mode", "eager"][..], "--mode"),
            (&["stray"][..], "unrecognized subcommand 'stray'"),
            (&["--window-ms", "-5"][..], "'--window-ms <MS>': -5 is outside 1..=3600000"),
            (&["--window-ms", "0"][..], "zero is meaningless"),
            (&["--burst-size", "0"][..], "--burst-size"),
            (&["--burst-target", "all"][..], "--burst-target"),
            (&["sweep", "--nodes", "3"][..], "--nodes-list"),
            (&["sweep", "--gossip-ms-list", "0"][..], "--gossip-ms-list"),
        ] {
            let e = parse_args(args).unwrap_err();
            assert!(e.0.contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn the_sweep_has_its_own_defaults_and_lists() {
        let Command::Sweep(s) = parse_args(["sweep", "--mode", "optimistic"]).unwrap() else { panic!("not a sweep") };
        assert_eq!((s.gossip_ms.as_slice(), s.nodes.as_slice()), (&[5, 20, 100, 500][..], &[3, 10, 50, 200][..]));
        let expected = Config { clients: 20, loss: 0.01, duration_ms: 5000, mode: Mode::Optimistic, ..Config::default() };
        assert_eq!(s.base, expected);
        let Command::Sweep(s) = parse_args(["sweep", "--nodes-list", "2,4", "--gossip-ms-list=10"]).unwrap() else { panic!("not a sweep") };
        assert_eq!((s.gossip_ms, s.nodes), (vec![10], vec![2, 4]));
    }

    #[test]
    fn help_is_a_command_not_an_error() {
        for args in [&["--help"][..], &["-h"], &["sweep", "--help"]] {
            let Ok(Command::Help(text)) = parse_args(args) else { panic!("{args:?} is not help") };
            assert!(text.contains("Usage: sim"), "{text}");
        }
    }
}
