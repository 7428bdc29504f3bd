//! Measures resident memory per key, and how close `stats().memory_bytes` comes to it.
//!
//! Run: `cargo run --release --example memory [-- KEYS [REPLICAS]]` (Linux: reads
//! /proc/self/statm).
//!
//! * `REPLICAS` 0 (the default): KEYS clients are counted locally, once each.
//! * `REPLICAS` R ≥ 1: KEYS clients are counted by R other members, and this node learns
//!   them only from their gossip (a full sync through the real gossip core): every key
//!   then holds remote counts from R replicas. The members' messages are built before the
//!   first reading and kept until after the last, so the delta is the receiving limiter's
//!   own (and its gossip core's).
//!
//! Key strings are generated on the fly and dropped.

mod common;

use std::time::Duration;

use crdt_rate_limiter::counter::ReplicaId;
use crdt_rate_limiter::gossip::{Event, PeerId};
use crdt_rate_limiter::{GossipConfig, GossipNode, ManualClock, Quota, RateLimiter};
use tracing_subscriber::filter::LevelFilter;

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(0) as u64)
}

const NOW_MS: i64 = 1_700_000_000_000;
const SECRET: [u8; 16] = *b"memory-example!!";
/// The node id of the measured limiter in the remote mode.
const RECEIVER: PeerId = 1_000_000;

fn limiter(clock: &ManualClock) -> RateLimiter {
    RateLimiter::builder()
        .quota(Quota::new(100, Duration::from_secs(60)).expect("valid quota"))
        .clock(clock.clone())
        .hash_secret(SECRET)
        .build()
        .expect("valid config")
}

fn count_keys(rl: &RateLimiter, keys: usize) {
    let mut id = String::with_capacity(32);
    for i in 0..keys {
        use std::fmt::Write;
        id.clear();
        let _ = write!(id, "client-{i}");
        assert!(rl.allow(&id, NOW_MS), "a fresh key is admitted");
    }
}

fn config(node: u64) -> GossipConfig {
    let mut cfg = GossipConfig::new(ReplicaId { node, incarnation: 1 });
    cfg.max_message_bytes = 65_000;
    cfg
}

fn usage() -> ! {
    eprintln!("usage: memory [KEYS [REPLICAS]]   (KEYS ≥ 1, default 1000000; REPLICAS 0..=64, default 0)");
    std::process::exit(2);
}

fn main() {
    common::init_logs(LevelFilter::WARN);
    let mut args = std::env::args().skip(1);
    let keys: usize = match args.next().map(|a| a.parse()) {
        None => 1_000_000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => usage(),
    };
    let replicas: u64 = match args.next().map(|a| a.parse()) {
        None => 0,
        Some(Ok(n)) if n <= 64 => n,
        Some(_) => usage(),
    };
    let clock = ManualClock::new(NOW_MS);
    let rl = limiter(&clock);
    // The remote mode: R members count every key; their full syncs to this node are
    // built now and delivered after the first reading.
    let mut members = Vec::new();
    let mut inbox: Vec<(PeerId, Vec<u8>)> = Vec::new();
    let mut node = None;
    if replicas > 0 {
        let peers: Vec<PeerId> = (1..=replicas).collect();
        let mut receiver = GossipNode::new(rl.clone(), config(RECEIVER), peers.iter().copied(), 1, NOW_MS).expect("valid gossip config");
        for &p in &peers {
            let member = limiter(&clock);
            count_keys(&member, keys);
            let mut g = GossipNode::new(member, config(p), [RECEIVER], p, NOW_MS).expect("valid gossip config");
            // The member's sync request: the receiver sees it come up (and answers with
            // its empty store) before the reading, so nothing but merging follows it.
            while let Some(t) = g.poll_transmit() {
                receiver.handle_message(p, &t.bytes, NOW_MS).expect("a sync request is accepted");
            }
            members.push(g);
        }
        while let Some(t) = receiver.poll_transmit() {
            let g = &mut members[(t.to - 1) as usize];
            g.handle_message(RECEIVER, &t.bytes, NOW_MS).expect("the receiver's messages are accepted");
        }
        // A full sync goes out in bounded steps, one per round: run each member's rounds
        // until it says the last step is queued.
        for (i, g) in members.iter_mut().enumerate() {
            let mut now = NOW_MS;
            loop {
                while let Some(t) = g.poll_transmit() {
                    inbox.push((i as PeerId + 1, t.bytes));
                }
                if std::iter::from_fn(|| g.poll_event()).any(|e| matches!(e, Event::FullSyncSent { .. })) {
                    break;
                }
                now += 20;
                g.handle_timeout(now);
            }
        }
        node = Some(receiver);
    }
    // Give memory freed so far back to the system, so that what the measured limiter
    // allocates next shows in the resident delta even where it reuses freed blocks.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
    let Some(before) = rss_bytes() else {
        eprintln!("memory: /proc/self/statm is not readable on this system");
        std::process::exit(1);
    };
    let reported_before = rl.stats().memory_bytes;
    match node.as_mut() {
        None => count_keys(&rl, keys),
        Some(receiver) => {
            for (from, bytes) in &inbox {
                receiver.handle_message(*from, bytes, NOW_MS).expect("a member's counts are accepted");
                while receiver.poll_transmit().is_some() {}
            }
        }
    }
    let after = rss_bytes().unwrap_or(before);
    let reported = rl.stats().memory_bytes.saturating_sub(reported_before);
    assert_eq!(rl.active_keys(), keys);
    let delta = after.saturating_sub(before);
    println!("keys: {keys}");
    if replicas == 0 {
        println!("counted: locally");
    } else {
        println!("counted: by {replicas} other replicas, learned from gossip ({} messages)", inbox.len());
    }
    println!("resident memory delta: {} bytes ({:.1} MiB)", delta, delta as f64 / (1 << 20) as f64);
    println!("bytes per key: {:.1}", delta as f64 / keys as f64);
    println!(
        "stats().memory_bytes delta: {} bytes ({:.1} per key, {:+.1} % of the resident delta)",
        reported,
        reported as f64 / keys as f64,
        (reported as f64 / delta.max(1) as f64 - 1.0) * 100.0
    );
    if let Some(line) = std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("AnonHugePages")).map(str::to_owned))
    {
        println!("of which in transparent huge pages: {}", line.trim_start_matches("AnonHugePages:").trim());
    }
    drop(members);
}
