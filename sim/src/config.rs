//! Every option of a run, its default, its range, and the command line that sets it.

use std::fmt;

use serde::Serialize;

/// The admission policy the nodes use (the library's [`crdt_rate_limiter::Admission`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each node spends only its share of the remainder per gossip round.
    #[default]
    Bounded,
    /// Each node admits while its view of the global count is under the limit.
    Optimistic,
}

/// The strategy every limiter (and the oracle) uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyArg {
    /// [`crdt_rate_limiter::Strategy::FixedWindow`].
    Fixed,
    /// [`crdt_rate_limiter::Strategy::SlidingWindow`] (the default).
    #[default]
    Sliding,
    /// [`crdt_rate_limiter::Strategy::TokenBucket`].
    Token,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Bounded => "bounded",
            Mode::Optimistic => "optimistic",
        })
    }
}

impl fmt::Display for StrategyArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StrategyArg::Fixed => "fixed",
            StrategyArg::Sliding => "sliding",
            StrategyArg::Token => "token",
        })
    }
}

/// Upper bounds on the options, so that a typo cannot ask for a run that never ends.
pub mod limits {
    /// Most nodes.
    pub const NODES_MAX: usize = 1_000;
    /// Most clients.
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
}

/// All options of one simulated run. `Default` gives the command line's defaults.
///
/// Times are virtual milliseconds from the start of traffic. Nodes are numbered from 0
/// (`--crash 2@1000` crashes the third node); node `i` is replica `{node: i + 1}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Drives every random choice of the run. Default 1.
    pub seed: u64,
    /// Cluster size. Default 5; `1..=1000`. Above 16 the core gossips in fan-out mode.
    pub nodes: usize,
    /// Distinct clients. Default 100; `1..=1_000_000`.
    pub clients: usize,
    /// Requests per client per window. Default 100; `1..=2³²−1`.
    pub limit: u64,
    /// Window length. Default 1000 ms; `1..=3_600_000`.
    pub window_ms: u64,
    /// Each client's offered load as a multiple of its limit. Default 3.0; `0..=1000`.
    pub rate: f64,
    /// Fraction of each client's requests sent to its favourite node (drawn per client
    /// from the seed); the rest are spread uniformly. Default 0; `0..=1`.
    pub skew_traffic: f64,
    /// Gossip interval. Default 20 ms; `1..=60_000`.
    pub gossip_ms: u64,
    /// One-way latency range `[min, max]`, uniform. Default `[1, 5]` ms.
    pub latency_ms: (u64, u64),
    /// Probability that a message is lost. Default 0; `0..=1`.
    pub loss: f64,
    /// Probability that a datagram is delivered twice. Default 0; `0..=1`.
    pub duplicate: f64,
    /// Probability that a message is held back by up to three maximum latencies.
    /// Default 0; `0..=1`.
    pub reorder: f64,
    /// Each node's clock is off by a fixed amount drawn uniformly in `±clock_skew_ms`.
    /// Default 0.
    pub clock_skew_ms: u64,
    /// Intervals `[start, end)` during which the first ⌈N/2⌉ nodes and the rest cannot
    /// talk. Default none.
    pub partition: Vec<(u64, u64)>,
    /// `(node, at_ms)`: the node stops and loses its state. Default none.
    pub crash: Vec<(usize, u64)>,
    /// `(node, at_ms)`: the node starts again, empty, as a new incarnation (a node that
    /// is up is crashed first). Default none.
    pub restart: Vec<(usize, u64)>,
    /// Admission policy. Default bounded.
    pub mode: Mode,
    /// Strategy of every limiter and of the oracle. Default sliding.
    pub strategy: StrategyArg,
    /// Span of traffic; faults happen within it. Default 10_000 ms.
    pub duration_ms: u64,
    /// Interval of the safety check (one node's whole view against the truth, nodes in
    /// turn); 0 turns it off. Default 50 ms.
    pub check_ms: u64,
    /// How long the quiet tail after traffic may run before the run is declared not
    /// converged. Default 30_000 ms.
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
            latency_ms: (1, 5),
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            clock_skew_ms: 0,
            partition: Vec::new(),
            crash: Vec::new(),
            restart: Vec::new(),
            mode: Mode::Bounded,
            strategy: StrategyArg::Sliding,
            duration_ms: 10_000,
            check_ms: 50,
            tail_cap_ms: 30_000,
        }
    }
}

/// A bad command line or an option out of range (the CLI exits with status 2).
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

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Run and print a readable report, or one JSON object with `json`.
    Run {
        /// The run's options.
        config: Box<Config>,
        /// Print JSON.
        json: bool,
    },
    /// Print the usage.
    Help,
}

/// The usage text.
pub const USAGE: &str = "\
usage: sim [options]            (cargo run --release -p sim -- [options])

Deterministic simulation of a crdt-rate-limiter cluster on virtual time. Every option is
optional; defaults in brackets. Times are virtual milliseconds from the start of traffic;
nodes are numbered from 0.

cluster and load
  --nodes N               cluster size [5]
  --clients N             distinct clients [100]
  --limit N               requests per client per window [100]
  --window-ms MS          window length [1000]
  --rate X                each client's offered load, as a multiple of its limit [3.0]
  --skew-traffic F        fraction of each client's traffic sent to its favourite node [0.0]
  --strategy S            fixed | sliding | token [sliding]
  --mode M                bounded | optimistic [bounded]
gossip and network
  --gossip-ms MS          gossip interval [20]
  --latency-ms A..B       one-way latency, uniform in A..=B [1..5]
  --loss P                probability a message is lost [0.0]
  --duplicate P           probability a datagram is delivered twice [0.0]
  --reorder P             probability a message is held back up to 3x max latency [0.0]
  --clock-skew-ms MS      each node's clock off by up to +-MS [0] (beyond 1000, clocks are
                          further apart than the limiter's 2 s tolerance: slow convergence)
faults (repeatable)
  --partition A..B        first half of the nodes cut from the rest during [A, B)
  --crash NODE@MS         node stops and loses its state
  --restart NODE@MS       node starts again, empty, as a new incarnation
run
  --duration-ms MS        span of traffic; a quiet tail follows until replicas agree [10000]
  --seed N                drives every random choice [1]
  --check-ms MS           safety-check interval, 0 = off [50]
  --tail-cap-ms MS        longest quiet tail before 'not converged' [30000]
  --json                  print one JSON object instead of the report
  --help                  this text

Exit status: 0 ok, 1 an invariant was violated (a reproduction line is printed on
stderr), 2 bad options.
";

fn parse_num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, ConfigError> {
    v.trim().parse().or_else(|_| err(format!("{flag}: '{v}' is not a valid number")))
}

fn parse_f64(flag: &str, v: &str) -> Result<f64, ConfigError> {
    let x: f64 = parse_num(flag, v)?;
    if !x.is_finite() {
        return err(format!("{flag}: '{v}' is not a finite number"));
    }
    Ok(x)
}

/// `A..B` (or a single `A`, meaning `A..A`).
fn parse_range(flag: &str, v: &str) -> Result<(u64, u64), ConfigError> {
    let (a, b) = match v.split_once("..") {
        Some((a, b)) => (parse_num::<u64>(flag, a)?, parse_num::<u64>(flag, b.trim_start_matches('='))?),
        None => {
            let a = parse_num::<u64>(flag, v)?;
            (a, a)
        }
    };
    Ok((a, b))
}

/// `NODE@MS`.
fn parse_at(flag: &str, v: &str) -> Result<(usize, u64), ConfigError> {
    let Some((node, at)) = v.split_once('@') else { return err(format!("{flag}: expected NODE@MS, got '{v}'")) };
    Ok((parse_num(flag, node)?, parse_num(flag, at)?))
}

fn check_probability(flag: &str, p: f64) -> Result<(), ConfigError> {
    if !(0.0..=1.0).contains(&p) {
        return err(format!("{flag}: {p} is not a probability between 0 and 1"));
    }
    Ok(())
}

/// Parses the command line (without the program name).
///
/// # Errors
/// An unknown flag, a missing or malformed value, or an option out of range.
pub fn parse_args<I, S>(args: I) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut c = Config::default();
    let mut json = false;
    let args: Vec<String> = args.into_iter().map(|s| s.as_ref().to_string()).collect();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            "--help" | "-h" => return Ok(Command::Help),
            "--json" => {
                if inline.is_some() {
                    return err("--json takes no value");
                }
                json = true;
                continue;
            }
            _ => {}
        }
        if !flag.starts_with("--") {
            return err(format!("unexpected argument '{arg}' (see --help)"));
        }
        let value = match inline {
            Some(v) => v,
            None => {
                let Some(v) = args.get(i) else { return err(format!("{flag} needs a value (see --help)")) };
                i += 1;
                v.clone()
            }
        };
        let v = value.as_str();
        let f = flag.as_str();
        match f {
            "--nodes" => c.nodes = parse_num(f, v)?,
            "--clients" => c.clients = parse_num(f, v)?,
            "--limit" => c.limit = parse_num(f, v)?,
            "--window-ms" => c.window_ms = parse_num(f, v)?,
            "--rate" => c.rate = parse_f64(f, v)?,
            "--skew-traffic" => c.skew_traffic = parse_f64(f, v)?,
            "--gossip-ms" => c.gossip_ms = parse_num(f, v)?,
            "--latency-ms" => c.latency_ms = parse_range(f, v)?,
            "--loss" => c.loss = parse_f64(f, v)?,
            "--duplicate" => c.duplicate = parse_f64(f, v)?,
            "--reorder" => c.reorder = parse_f64(f, v)?,
            "--clock-skew-ms" => c.clock_skew_ms = parse_num(f, v)?,
            "--partition" => c.partition.push(parse_range(f, v)?),
            "--crash" => c.crash.push(parse_at(f, v)?),
            "--restart" => c.restart.push(parse_at(f, v)?),
            "--mode" => {
                c.mode = match v {
                    "bounded" => Mode::Bounded,
                    "optimistic" => Mode::Optimistic,
                    _ => return err(format!("--mode: '{v}' is not bounded or optimistic")),
                }
            }
            "--strategy" => {
                c.strategy = match v {
                    "fixed" => StrategyArg::Fixed,
                    "sliding" => StrategyArg::Sliding,
                    "token" => StrategyArg::Token,
                    _ => return err(format!("--strategy: '{v}' is not fixed, sliding or token")),
                }
            }
            "--duration-ms" => c.duration_ms = parse_num(f, v)?,
            "--seed" => c.seed = parse_num(f, v)?,
            "--check-ms" => c.check_ms = parse_num(f, v)?,
            "--tail-cap-ms" => c.tail_cap_ms = parse_num(f, v)?,
            _ => return err(format!("unknown option '{flag}' (see --help)")),
        }
    }
    c.validate()?;
    Ok(Command::Run { config: Box::new(c), json })
}

impl Config {
    /// Checks every option against its range.
    ///
    /// # Errors
    /// The first option out of range, with the flag that sets it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use limits::*;
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
        span("--gossip-ms", self.gossip_ms, 1, 60_000)?;
        let (lat_min, lat_max) = self.latency_ms;
        if lat_min > lat_max {
            return err(format!("--latency-ms: {lat_min}..{lat_max} is empty (the minimum is above the maximum)"));
        }
        span("--latency-ms", lat_max, 0, 60_000)?;
        check_probability("--loss", self.loss)?;
        check_probability("--duplicate", self.duplicate)?;
        check_probability("--reorder", self.reorder)?;
        span("--clock-skew-ms", self.clock_skew_ms, 0, SPAN_MS_MAX)?;
        span("--duration-ms", self.duration_ms, 1, DURATION_MS_MAX)?;
        span("--check-ms", self.check_ms, 0, SPAN_MS_MAX)?;
        span("--tail-cap-ms", self.tail_cap_ms, 1, SPAN_MS_MAX)?;
        for (flag, n) in [("--partition", self.partition.len()), ("--crash", self.crash.len()), ("--restart", self.restart.len())] {
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
        for (flag, list) in [("--crash", &self.crash), ("--restart", &self.restart)] {
            for &(node, at) in list {
                if node >= self.nodes {
                    return err(format!("{flag}: node {node} does not exist (nodes are numbered 0..={})", self.nodes - 1));
                }
                if at > self.duration_ms {
                    return err(format!("{flag}: {node}@{at} is after --duration-ms {}", self.duration_ms));
                }
            }
        }
        let requests = self.expected_requests();
        if requests > REQUESTS_MAX {
            return err(format!("the run would offer about {requests:.0} requests, more than {REQUESTS_MAX:.0}: lower --clients, --limit, --rate or --duration-ms"));
        }
        Ok(())
    }

    /// Requests the run is expected to offer: clients × rate × limit per window.
    pub fn expected_requests(&self) -> f64 {
        self.clients as f64 * self.rate * self.limit as f64 * self.duration_ms as f64 / self.window_ms as f64
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
        push("--mode", self.mode.to_string());
        push("--strategy", self.strategy.to_string());
        push("--duration-ms", self.duration_ms.to_string());
        push("--check-ms", self.check_ms.to_string());
        push("--tail-cap-ms", self.tail_cap_ms.to_string());
        push("--seed", self.seed.to_string());
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
            Command::Help => panic!("help"),
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
            "--mode",
            "optimistic",
            "--strategy",
            "token",
            "--loss",
            "0.3",
            "--duration-ms",
            "300",
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
            (&["--nodes", "0"][..], "--nodes"),
            (&["--loss", "1.5"][..], "--loss"),
            (&["--rate", "NaN"][..], "--rate"),
            (&["--partition", "9000..20000"][..], "--duration-ms"),
            (&["--bogus", "1"][..], "unknown option"),
            (&["--nodes"][..], "needs a value"),
            (&["--mode", "eager"][..], "--mode"),
            (&["stray"][..], "unexpected argument"),
        ] {
            let e = parse_args(args).unwrap_err();
            assert!(e.0.contains(needle), "{args:?}: {e}");
        }
    }
}
