//! Measures resident memory per active key: RSS before and after one million keys.
//!
//! Run: `cargo run --release --example memory [-- KEYS]` (Linux: reads /proc/self/statm).
//! Key strings are generated on the fly and dropped, so the delta is the limiter's own.

use std::time::Duration;

use crdt_rate_limiter::{Quota, RateLimiter};

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(0) as u64)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::builder()
                .with_default_directive(tracing_subscriber::filter::LevelFilter::WARN.into())
                .from_env_lossy(),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let keys: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 1_000_000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: memory [KEYS]   (KEYS: a positive integer, default 1000000)");
            std::process::exit(2);
        }
    };
    let Some(before) = rss_bytes() else {
        eprintln!("memory: /proc/self/statm is not readable on this system");
        std::process::exit(1);
    };
    let rl = RateLimiter::builder().quota(Quota::new(100, Duration::from_secs(60)).expect("valid quota")).build().expect("valid config");
    let now = rl.now_ms();
    let mut id = String::with_capacity(32);
    for i in 0..keys {
        use std::fmt::Write;
        id.clear();
        let _ = write!(id, "client-{i}");
        assert!(rl.allow(&id, now), "a fresh key is admitted");
    }
    let after = rss_bytes().unwrap_or(before);
    assert_eq!(rl.active_keys(), keys);
    let delta = after.saturating_sub(before);
    println!("keys: {keys}");
    println!("resident memory delta: {} bytes ({:.1} MiB)", delta, delta as f64 / (1 << 20) as f64);
    println!("bytes per active key: {:.1}", delta as f64 / keys as f64);
    if let Some(line) = std::fs::read_to_string("/proc/self/smaps_rollup")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("AnonHugePages")).map(str::to_owned))
    {
        println!("of which in transparent huge pages: {}", line.trim_start_matches("AnonHugePages:").trim());
    }
}
