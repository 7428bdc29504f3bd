//! A deterministic simulator for crdt-rate-limiter: a whole cluster of limiters, each
//! wrapped in the real sans-IO [`GossipNode`](crdt_rate_limiter::GossipNode), on virtual
//! time, with a seeded network, seeded faults, an exact global limiter beside them (the
//! oracle) and checkers outside the system under test. From 8 nodes, the nodes of each
//! step run side by side on every core (`RAYON_NUM_THREADS` sets how many); the output
//! does not depend on how many.
//!
//! ```
//! let cfg = sim::Config { nodes: 3, clients: 5, duration_ms: 2_000, ..sim::Config::default() };
//! let report = sim::run(&cfg);
//! assert!(report.ok() && report.converged);
//! assert_eq!(sim::run(&cfg).to_json(), report.to_json()); // same options, same bytes
//! ```
//!
//! # The model
//! * **Time.** Virtual time in µs, starting at Unix ms [`START_UNIX_MS`] rounded down to
//!   the window. Node `i`'s clock is virtual time plus a fixed skew drawn in
//!   `±clock_skew_ms`; its limiter reads a `ManualClock` set to it before every call, and
//!   `handle_timeout` runs at the deadline `poll_timeout` gives, in the node's time.
//! * **Steps.** The run advances in steps of 1 ms. In a step, each node runs its own
//!   events (messages to it, its timer, requests routed to it) in order of time, on its
//!   own; what it sends is delivered from the next step on, so no message arrives in the
//!   millisecond it was sent (with a latency of 0 ms, at that millisecond's end). The
//!   events outside the nodes (traffic routed to them, faults, checks, all of these at
//!   whole milliseconds but the traffic) run between steps, and what the nodes saw in a
//!   step is folded in after it, in an order no thread decides: the peers they took
//!   down, node by node, as the step ends; then, before the next event that could read
//!   them (any but a request), the nodes' violations by time, then node, and the
//!   requests they decided by time, then arrival (with the policy bound's violations). A node's
//!   events at the same microsecond run in an order fixed by the run, not by threads:
//!   by how many events their sender (the node itself, for its timer) had scheduled
//!   before, then by sender; requests after messages and timers.
//! * **Randomness.** One seed; traffic, clock skews, favourite nodes, each node's
//!   network (what befalls the messages it sends) and each node incarnation's gossip
//!   seed come from their own derived streams ([`rng`]).
//!   Every limiter uses the same fixed hash secret ([`HASH_SECRET`]) and 16 shards.
//! * **Traffic.** Each client offers `rate × limit` requests per window as a Poisson
//!   process (the simulator draws the merged process of all clients). A request goes to
//!   the client's favourite node (drawn per client) with probability `skew_traffic`,
//!   else to a uniformly chosen node. A request for a node that is down goes to a
//!   uniformly chosen live node instead (a load balancer that has noticed the crash); with
//!   no live node it is offered but not admitted.
//! * **Bursts.** On top of the steady clients, `burst_clients` clients each send
//!   `burst_size` requests spread uniformly over `burst_spread_ms`, at moments that are a
//!   Poisson process of mean gap `burst_every_ms` (a seeded stream of their own, so the
//!   steady traffic is the same with or without them), either round-robin over the nodes
//!   from a node drawn per burst or all to one drawn node. With `burst_fresh`, every
//!   burst has a client id nobody has seen. Burst requests go through the same oracle
//!   and checks, and count in every figure.
//! * **Network.** Each datagram (`Transmit::reliable == false`: deltas, heartbeats,
//!   digests) is lost with probability `loss`, delivered twice with probability
//!   `duplicate`, and held back by up to three maximum latencies with probability
//!   `reorder`, on top of a latency uniform in `latency_ms`. Reliable messages (full
//!   syncs, repairs: a QUIC stream in production) are never lost or duplicated, but each
//!   loss of the underlying packet costs a retransmission timeout of three maximum
//!   latencies, and after 8 losses in a row the message is given up. A partition cuts
//!   the first ⌈N/2⌉ nodes from the rest: a message is dropped if it is sent or would
//!   arrive while a partition is on. A message to a node that is down is dropped.
//! * **Faults.** A crash stops a node: no timers, no messages, its store is gone. A
//!   restart boots a fresh limiter and gossip node as the next incarnation, empty, with
//!   the same peers (a restart of a node that is up crashes it first). A node crashed
//!   and never restarted stays down through the tail.
//! * **Oracle.** One more limiter with the same strategy and quota, on its own (so
//!   exact), at true virtual time, sees every request in time order: `ideal`.
//! * **Truth.** Per (client, window, replica), the admissions each node incarnation
//!   really made, counted in the window the node's store charged them to (the window of
//!   the node's timestamp; with skewed clocks possibly a newer one, which a read-only
//!   tap on the simulated network follows: `sim/src/wire.rs`).
//!
//! # Checks
//! Every violation is reported with the time it was seen; the CLI prints a one-line
//! reproduction and exits 1.
//! * **Policy bound**, on every admission: a replica admits at most `limit` requests of a
//!   client per window (each node's own count is exact), so a (client, window) gets at
//!   most `limit` × the incarnations that served it, under any fault, in both modes.
//! * **Views never exceed the truth**, every `check_ms` on one node in turn (a node's
//!   whole state is O(keys), so not all of them every time): no count a node holds for
//!   a (key, window, replica) is above what that replica admitted, and its own counts
//!   are exactly what it admitted.
//! * **Convergence.** After traffic and faults end, a quiet tail (no traffic, no faults)
//!   runs until, at a check once per gossip interval, all live nodes hold identical
//!   states for the windows still retained at the end of traffic (the newest window any
//!   request was counted in, and the one before). Then that state must equal the truth
//!   for every live replica and stay at or below it for replicas that are gone (a
//!   crashed node's last counts may never have left it). Not agreeing within
//!   `tail_cap_ms` is a violation.
//!
//! Figures that are not invariants: over-admission against the limit per (client,
//! aligned window of true time), under-admission against the oracle, and the
//! optimistic policy's predicted worst overshoot ([`predicted_max_overshoot`]).
#![warn(missing_docs, unreachable_pub)]

pub mod config;
mod engine;
mod plot;
mod queue;
mod report;
pub mod rng;
mod steps;
mod sweep;
mod wire;

pub use config::{parse_args, usage, BurstTarget, Command, Config, ConfigError, Mode, StrategyArg, Sweep};
pub use engine::{HASH_SECRET, START_UNIX_MS};
pub use plot::{draw_sweep, draw_timeline, PlotError};
pub use report::{ClusterTimeFigures, Fault, Report, Timeline, TimelineClient};
pub use sweep::{run_sweep, SweepCell, SweepTable};

/// What the command line prints and its exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliOutput {
    /// Everything for stdout: the report, or one JSON object and a newline.
    pub stdout: String,
    /// Everything for stderr: an error, or the violations and the reproduction line.
    pub stderr: String,
    /// 0 ok, 1 an invariant was violated, 2 bad options.
    pub code: u8,
}

/// The whole command line, in process: parses `args` (without the program name), runs,
/// and returns what to print. The binary only prints it.
pub fn cli<I, S>(args: I) -> CliOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let fail = |msg: String| CliOutput { stdout: String::new(), stderr: msg, code: 2 };
    let (config, json, svg) = match parse_args(args) {
        Ok(Command::Run { config, json, svg }) => (config, json, svg),
        Ok(Command::Help(text)) => return CliOutput { stdout: text, stderr: String::new(), code: 0 },
        Ok(Command::Sweep(s)) => {
            let table = run_sweep(&s);
            if let Some(path) = &s.svg {
                if let Err(e) = plot::draw_sweep(&table, path) {
                    return CliOutput { stdout: table.to_markdown(), stderr: format!("sim: {e}\n"), code: 2 };
                }
            }
            let code = if table.cells.iter().all(|c| c.report.ok()) { 0 } else { 1 };
            let stderr = table.violations();
            return CliOutput { stdout: table.to_markdown(), stderr, code };
        }
        Err(e) => return fail(e.to_string()),
    };
    let (report, timeline) = match svg {
        Some(_) => match try_run_traced(&config) {
            Ok((r, t)) => (r, Some(t)),
            Err(e) => return fail(format!("sim: {e}\n")),
        },
        None => match try_run(&config) {
            Ok(r) => (r, None),
            Err(e) => return fail(format!("sim: {e}\n")),
        },
    };
    if let (Some(path), Some(timeline)) = (&svg, &timeline) {
        if let Err(e) = draw_timeline(&report, timeline, path) {
            return fail(format!("sim: {e}\n"));
        }
    }
    let stdout = if json { report.to_json() + "\n" } else { report.to_text() };
    if report.ok() {
        return CliOutput { stdout, stderr: String::new(), code: 0 };
    }
    let first = report.violations.first().map_or("", String::as_str);
    let json_flag = if json { " --json" } else { "" };
    let stderr = format!(
        "sim: {} invariant violation(s); first: {first}\nreproduce: {}{json_flag}\n",
        report.violation_count,
        config.reproduction()
    );
    CliOutput { stdout, stderr, code: 1 }
}

/// Runs one simulation.
///
/// # Panics
/// If `cfg` is invalid; use [`try_run`] for options that were not checked.
pub fn run(cfg: &Config) -> Report {
    run_with(cfg, engine::helpers())
}

/// [`run`] with its steps on the calling thread and `helpers` more (none: on rayon's
/// threads, shared with other runs side by side).
pub(crate) fn run_with(cfg: &Config, helpers: usize) -> Report {
    cfg.validate().unwrap_or_else(|e| panic!("invalid simulator options: {e}"));
    engine::simulate(cfg, false, helpers).0
}

/// Checks the options, then runs one simulation.
///
/// # Errors
/// The first option out of range ([`Config::validate`]).
pub fn try_run(cfg: &Config) -> Result<Report, ConfigError> {
    cfg.validate()?;
    Ok(engine::simulate(cfg, false, engine::helpers()).0)
}

/// Like [`try_run`], and also records the run's [`Timeline`] (what `--svg` draws). The
/// report is the same as [`try_run`]'s, byte for byte: recording only reads.
///
/// # Errors
/// The first option out of range ([`Config::validate`]).
pub fn try_run_traced(cfg: &Config) -> Result<(Report, Timeline), ConfigError> {
    cfg.validate()?;
    let (report, timeline) = engine::simulate(cfg, true, engine::helpers());
    Ok((report, timeline.unwrap_or_default()))
}

/// An estimate of the optimistic policy's worst over-admission of one (client, window):
/// `min((N − 1)·L, Σⱼ ⌈ρⱼ·S⌉)` (`docs/design.md`, "Optimistic").
///
/// A node's view of another node's count lags by up to `S` = one gossip interval plus
/// the maximum latency. Once the true count reaches the limit, node `j`, offered `ρⱼ` of
/// the client's requests per ms, keeps admitting for at most `S`: `⌈ρⱼ·S⌉` more. Here
/// `ρⱼ` is the client's `rate × limit / window` spread uniformly, plus the skewed share on
/// its favourite node.
///
/// An estimate, not a bound: arrivals are Poisson, so in some windows a node is offered
/// more than `ρⱼ·S` within `S`; beyond 16 peers a count reaches the others through its key's
/// aggregator, two rounds (in fan-out mode, several rounds per hop); loss lengthens `S` for the lost count; a partition lets each side admit up to the
/// whole limit. The bounded policy is expected to stay below it.
pub fn predicted_max_overshoot(cfg: &Config) -> u64 {
    let lag_ms = (cfg.gossip_ms + cfg.latency_ms.1) as f64;
    let client_per_ms = cfg.rate * cfg.limit as f64 / cfg.window_ms as f64;
    let spread = (1.0 - cfg.skew_traffic) / cfg.nodes as f64;
    // Only a client's favourite node gets the skewed share; any node may be it.
    let unseen = |share: f64| (client_per_ms * share * lag_ms).ceil() as u64;
    let others = (cfg.nodes as u64 - 1).saturating_mul(unseen(spread));
    let favourite = unseen(spread + cfg.skew_traffic);
    others.saturating_add(favourite).min((cfg.nodes as u64 - 1).saturating_mul(cfg.limit))
}
