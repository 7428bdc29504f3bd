//! A cluster of rate limiters on loopback, under load.
//!
//! ```text
//! cargo run --release -p demo                        # 3 nodes, 10 s, a table every second
//! cargo run --release -p demo -- --json              # only a JSON summary at the end
//! cargo run --release -p demo -- --nodes 5 --seconds 20 --partition 5
//! ```
//!
//! Starts N instances in this process, each a `RateLimiter` made a cluster member over
//! QUIC with mutual TLS (certificates generated fresh, in memory). Drives load for a set
//! of clients at all of them — a few hot clients asking for three times the limit, the
//! rest for half of it, each request sent to the nodes in turn — and measures, per
//! client and window, what the cluster admitted against the limit.
//!
//! Over-admission is what the cluster admitted beyond the limit, summed over every
//! (client, window); `ideal` is what an exact global limiter would have admitted
//! (`min(offered, limit)` per client and window). Only complete windows count.
//! `RUST_LOG` (for example `RUST_LOG=crdt_rate_limiter=debug`) shows the library's logs.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::builder::RangedU64ValueParser;
use clap::{CommandFactory, Parser};
use crdt_rate_limiter::transport::faults::FaultHooks as _;
use crdt_rate_limiter::transport::{certs, Cluster, ClusterConfig, TlsIdentity};
use crdt_rate_limiter::{Quota, RateLimiter, Strategy};

const LIMIT: u64 = 100;
const WINDOW_MS: u64 = 1000;
const CLIENTS: usize = 50;
const HOT_CLIENTS: usize = 10;
const SECRET: [u8; 16] = *b"demo-hash-secret";

/// Runs N rate limiter instances on 127.0.0.1 in one process, gossiping over QUIC with
/// mutual TLS, drives load at them, prints a table every second and a summary at the end.
///
/// Limit: 100 requests per client per 1 s window (fixed window, bounded admission);
/// 50 clients, 10 of them asking for 3x the limit, the rest for half of it.
/// "ideal" is what an exact global limiter would admit: min(offered, limit) per
/// client and window.
#[derive(Parser, Debug)]
#[command(name = "demo", version)]
struct Args {
    /// Instances to run (1 to 64). Every one runs in this process: beyond 16 counts go
    /// through aggregators, and on a small machine the CPU, not the protocol, sets the figures
    /// (on 2 cores 32 nodes work; 48 and more leave views about 0.5 s or more behind).
    #[arg(long, allow_negative_numbers = true, default_value_t = 3, value_parser = RangedU64ValueParser::<usize>::new().range(1..=64))]
    nodes: usize,
    /// Seconds of load (3 to 3600).
    #[arg(long, allow_negative_numbers = true, default_value_t = 10, value_parser = RangedU64ValueParser::<u64>::new().range(3..=3600))]
    seconds: u64,
    /// Cut node-0 off from the others for the last P seconds of load; when the load
    /// stops the partition heals and the demo reports how long the nodes took to hold
    /// identical counts. Shorter than --seconds, with at least 2 nodes.
    #[arg(long, allow_negative_numbers = true, value_name = "P", default_value_t = 0)]
    partition: u64,
    /// Beyond this many peers, counts go through aggregators (the library's default: 16);
    /// between 16 and it, fan-out gossip. For comparing the two.
    #[arg(long, value_name = "PEERS")]
    aggregate_above: Option<usize>,
    /// At most this many members aggregate (2 to 64; the library's default: 32); the
    /// others send their counts to them and hear totals from them. Matters only where
    /// counts go through aggregators (more than 17 nodes, unless --aggregate-above says
    /// otherwise).
    #[arg(long, value_name = "MEMBERS", allow_negative_numbers = true, value_parser = RangedU64ValueParser::<usize>::new().range(2..=64))]
    aggregator_pool: Option<usize>,
    /// Beyond this many peers, SWIM decides liveness (the library's default: 128).
    #[arg(long, value_name = "PEERS")]
    swim_above: Option<usize>,
    /// Print only a JSON summary object at the end.
    #[arg(long)]
    json: bool,
}

fn parse_args() -> Args {
    let args = Args::parse();
    if args.partition > 0 && (args.partition >= args.seconds || args.nodes < 2) {
        Args::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                format!("--partition {} must be shorter than --seconds ({}), with at least 2 --nodes", args.partition, args.seconds),
            )
            .exit();
    }
    args
}

/// Requests per second a client asks for, over the whole cluster.
fn demand(client: usize) -> f64 {
    let per_second = LIMIT as f64 * 1000.0 / WINDOW_MS as f64;
    if client < HOT_CLIENTS {
        3.0 * per_second
    } else {
        0.5 * per_second
    }
}

#[derive(Default)]
struct NodeCounts {
    admitted: AtomicU64,
    denied: AtomicU64,
}

/// Offered and admitted requests per (client, window), across the cluster.
type Ledger = Mutex<HashMap<(usize, i64), (u64, u64)>>;

fn drive(
    limiter: RateLimiter,
    share: f64,
    ledger: Arc<Ledger>,
    counts: Arc<NodeCounts>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut sent = vec![0u64; CLIENTS];
        let names: Vec<String> = (0..CLIENTS).map(|c| format!("client-{c:02}")).collect();
        while !stop.load(Ordering::Relaxed) {
            let elapsed = start.elapsed().as_secs_f64();
            let mut local: Vec<(usize, i64, bool)> = Vec::new();
            for c in 0..CLIENTS {
                let due = (elapsed * demand(c) * share) as u64;
                while sent[c] < due {
                    let now = limiter.now_ms();
                    let ok = limiter.allow(&names[c], now);
                    local.push((c, now.div_euclid(WINDOW_MS as i64), ok));
                    sent[c] += 1;
                }
            }
            if !local.is_empty() {
                let mut l = ledger.lock().unwrap_or_else(|e| e.into_inner());
                for (c, w, ok) in local {
                    let e = l.entry((c, w)).or_default();
                    e.0 += 1;
                    e.1 += u64::from(ok);
                    if ok {
                        counts.admitted.fetch_add(1, Ordering::Relaxed);
                    } else {
                        counts.denied.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

/// Totals over complete windows `from..to`.
#[derive(Default)]
struct Totals {
    windows: u64,
    client_windows: u64,
    offered: u64,
    admitted: u64,
    ideal: u64,
    over: u64,
    under: u64,
    worst: u64,
}

fn totals(ledger: &Ledger, from: i64, to: i64) -> Totals {
    let l = ledger.lock().unwrap_or_else(|e| e.into_inner());
    let mut t = Totals { windows: (to - from).max(0) as u64, ..Totals::default() };
    for (&(_, w), &(offered, admitted)) in l.iter() {
        if w < from || w >= to {
            continue;
        }
        t.client_windows += 1;
        t.offered += offered;
        t.admitted += admitted;
        t.ideal += offered.min(LIMIT);
        t.over += admitted.saturating_sub(LIMIT);
        t.under += offered.min(LIMIT).saturating_sub(admitted);
        t.worst = t.worst.max(admitted);
    }
    t
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

async fn run(args: Args) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let (ca, ca_key) = certs::generate_ca().map_err(|e| err(&e))?;
    let mut nodes: Vec<Cluster> = Vec::new();
    for i in 0..args.nodes {
        let name = format!("node-{i}");
        let (cert, key) = certs::issue(&ca, &ca_key, &name).map_err(|e| err(&e))?;
        let identity = TlsIdentity::from_pem(ca.as_bytes(), cert.as_bytes(), key.as_bytes()).map_err(|e| err(&e))?;
        let listen = "127.0.0.1:0".parse().map_err(|e| err(&e))?;
        let mut config = ClusterConfig { seeds: nodes.iter().map(Cluster::local_addr).collect(), ..ClusterConfig::new(identity, listen) };
        if let Some(peers) = args.aggregate_above {
            config.gossip.aggregate_above_peers = peers;
        }
        if let Some(members) = args.aggregator_pool {
            config.gossip.aggregator_pool = members;
        }
        if let Some(peers) = args.swim_above {
            config.gossip.swim_above_peers = peers;
        }
        let quota = Quota::new(LIMIT, Duration::from_millis(WINDOW_MS)).map_err(|e| err(&e))?;
        let (_, cluster) = RateLimiter::builder()
            .quota(quota)
            .strategy(Strategy::FixedWindow)
            .hash_secret(SECRET)
            .cluster(config)
            .start()
            .await
            .map_err(|e| err(&e))?;
        if !args.json {
            println!("started {name} on {} (incarnation {})", cluster.local_addr(), cluster.replica().incarnation);
        }
        nodes.push(cluster);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while nodes.iter().any(|n| n.live_peers().len() + 1 < args.nodes) {
        if tokio::time::Instant::now() > deadline {
            return Err("the nodes did not all see each other within 10 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let offered_per_window: f64 = (0..CLIENTS).map(demand).sum::<f64>() * WINDOW_MS as f64 / 1000.0;
    if !args.json {
        println!(
            "{} nodes, {CLIENTS} clients ({HOT_CLIENTS} asking 3x the limit, the rest half), limit {LIMIT} per {WINDOW_MS} ms window (fixed window, bounded admission); {offered_per_window:.0} requests offered per window",
            args.nodes
        );
        println!("ideal = what an exact global limiter would admit: min(offered, limit) per client and window");
    }
    let ledger: Arc<Ledger> = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<NodeCounts>> = nodes.iter().map(|_| Arc::new(NodeCounts::default())).collect();
    let share = 1.0 / args.nodes as f64;
    let first_window = nodes[0].limiter().now_ms().div_euclid(WINDOW_MS as i64) + 1;
    let tasks: Vec<_> =
        nodes.iter().zip(&counts).map(|(n, c)| drive(n.limiter().clone(), share, ledger.clone(), c.clone(), stop.clone())).collect();

    // The worst view lag of the per-second samples (the rows printed below), so the
    // summary agrees with the table.
    let mut max_lag: i64 = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    for s in 1..=args.seconds {
        if args.partition > 0 && s == args.seconds - args.partition + 1 {
            // Node 0 drops every packet to or from the others, below QUIC.
            for other in &nodes[1..] {
                nodes[0].block_peer(other.node_id());
            }
            if !args.json {
                println!("\n--- node-0 cut off from the others for the last {} s ---", args.partition);
            }
        }
        tick.tick().await;
        let stats: Vec<_> = nodes.iter().map(Cluster::stats).collect();
        max_lag = stats.iter().map(|st| st.view_lag_ms).fold(max_lag, i64::max);
        if args.json {
            continue;
        }
        println!("\n[{s:>3} s]  node     admitted    denied  view lag  live peers  gossip sent");
        println!("                  (cumulative since the start)                 (cumulative)");
        for ((n, c), st) in nodes.iter().zip(&counts).zip(&stats) {
            println!(
                "         {:<8} {:>8} {:>9} {:>6} ms {:>11} {:>9.1} KiB",
                n.node_name(),
                c.admitted.load(Ordering::Relaxed),
                c.denied.load(Ordering::Relaxed),
                st.view_lag_ms,
                st.live_peers,
                st.bytes_sent() as f64 / 1024.0
            );
        }
        let now_window = nodes[0].limiter().now_ms().div_euclid(WINDOW_MS as i64);
        let t = totals(&ledger, now_window - 1, now_window);
        if now_window > first_window {
            println!(
                "         cluster, last window: admitted {} of {} offered; limit {LIMIT} x {} clients; ideal {}; over the limit {} ({:.2}% of ideal); busiest client {}",
                t.admitted,
                t.offered,
                t.client_windows,
                t.ideal,
                t.over,
                pct(t.over, t.ideal),
                t.worst
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let last_window = nodes[0].limiter().now_ms().div_euclid(WINDOW_MS as i64);
    // Load has stopped; heal any partition and time how long until every node decides
    // every client on the same counts (beyond 16 nodes, where counts go through
    // aggregators, nodes hold different per-node counts but the same totals).
    nodes[0].heal();
    let quiet = tokio::time::Instant::now();
    let mut convergence_ms = None;
    let decided = |n: &Cluster| n.views().into_iter().map(|v| (v.window_ms, v.key, v.window, v.total)).collect::<Vec<_>>();
    while quiet.elapsed() < Duration::from_secs(10) {
        let first = decided(&nodes[0]);
        if nodes[1..].iter().all(|n| decided(n) == first) {
            convergence_ms = Some(quiet.elapsed().as_millis() as u64);
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let t = totals(&ledger, first_window, last_window);
    let stats: Vec<_> = nodes.iter().map(Cluster::stats).collect();
    let bytes: u64 = stats.iter().map(|s| s.bytes_sent()).sum();
    let ratio = if t.ideal == 0 { 0.0 } else { t.over as f64 / t.ideal as f64 };
    let names: Vec<String> = nodes.iter().map(|n| n.node_name().to_string()).collect();
    for n in nodes {
        n.shutdown().await;
    }

    if args.json {
        let per_node: Vec<String> = names
            .iter()
            .zip(&counts)
            .zip(&stats)
            .map(|((name, c), s)| {
                format!(
                    "{{\"name\":\"{name}\",\"admitted\":{},\"denied\":{},\"bytes\":{},\"datagrams\":{},\"view_lag_ms\":{},\"connections\":{},\"connections_closed_unused\":{},\"dials\":{},\"frames_held\":{},\"dropped_no_connection\":{},\"full_syncs_sent\":{},\"members_learned_by_swim\":{}}}",
                    c.admitted.load(Ordering::Relaxed),
                    c.denied.load(Ordering::Relaxed),
                    s.bytes_sent(),
                    s.datagrams_sent,
                    s.view_lag_ms,
                    s.connections,
                    s.connections_closed_unused,
                    s.dials,
                    s.frames_held,
                    s.dropped_no_connection,
                    s.gossip.full_syncs_sent,
                    s.members_learned_by_swim
                )
            })
            .collect();
        println!(
            "{{\"nodes\":{},\"seconds\":{},\"clients\":{CLIENTS},\"limit\":{LIMIT},\"window_ms\":{WINDOW_MS},\"windows\":{},\"client_windows\":{},\"offered\":{},\"admitted\":{},\"ideal\":{},\"over_admission\":{},\"over_admission_ratio\":{ratio:.6},\"under_admission\":{},\"max_admitted_per_client_window\":{},\"bytes\":{bytes},\"bytes_per_admitted\":{:.3},\"max_view_lag_ms\":{max_lag},\"partition_s\":{},\"convergence_ms\":{},\"per_node\":[{}]}}",
            args.nodes,
            args.seconds,
            t.windows,
            t.client_windows,
            t.offered,
            t.admitted,
            t.ideal,
            t.over,
            t.under,
            t.worst,
                        bytes as f64 / t.admitted.max(1) as f64,
            args.partition,
            convergence_ms.map_or("null".to_string(), |c| c.to_string()),
            per_node.join(",")
        );
    } else {
        println!("\nsummary over {} complete windows ({} client-windows):", t.windows, t.client_windows);
        println!("  offered              {}", t.offered);
        println!("  ideal                {} (an exact global limiter: min(offered, limit) per client-window)", t.ideal);
        println!("  admitted             {}", t.admitted);
        println!(
            "  over the limit       {} ({:.3}% of ideal); busiest client-window {} (limit {LIMIT}, hard bound {})",
            t.over,
            100.0 * ratio,
            t.worst,
            LIMIT * names.len() as u64
        );
        println!("  under the ideal      {} ({:.3}%)", t.under, pct(t.under, t.ideal));
        println!("  gossip bytes sent    {bytes} ({:.2} per admitted request)", bytes as f64 / t.admitted.max(1) as f64);
        println!("  worst view lag       {max_lag} ms (the largest in the per-second rows above)");
        let open: Vec<usize> = stats.iter().map(|s| s.connections).collect();
        println!(
            "  connections open     {}–{} per node at the end; {} closed unused (outside a partial view)",
            open.iter().min().unwrap_or(&0),
            open.iter().max().unwrap_or(&0),
            stats.iter().map(|s| s.connections_closed_unused).sum::<u64>()
        );
        match convergence_ms {
            Some(c) => println!(
                "  converged            {c} ms after the load stopped{}",
                if args.partition > 0 { " and the partition healed" } else { "" }
            ),
            None => println!("  converged            not within 10 s after the load stopped"),
        }
    }
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` as comma-separated `target=level` or `level`
/// directives (default `warn`); an invalid `RUST_LOG` is reported and the default used.
fn init_logs() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let default = || Targets::new().with_default(tracing_subscriber::filter::LevelFilter::WARN);
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => v.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("warning: RUST_LOG={v:?} ignored: {e}");
            default()
        }),
        _ => default(),
    };
    tracing_subscriber::registry().with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).with(filter).init();
}

fn main() -> ExitCode {
    let args = parse_args();
    init_logs();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
