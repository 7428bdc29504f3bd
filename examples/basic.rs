//! Drives one embedded limiter with a few clients and prints its decisions and figures.
//!
//! Run: `cargo run --release --example basic`

mod common;

use std::time::{Duration, Instant};

use crdt_rate_limiter::{ManualClock, Quota, RateLimiter, Strategy};
use tracing_subscriber::filter::LevelFilter;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    common::init_logs(LevelFilter::WARN);
    let start = 1_700_000_000_000;
    let clock = ManualClock::new(start);
    for strategy in [Strategy::FixedWindow, Strategy::SlidingWindow, Strategy::TokenBucket] {
        let rl = RateLimiter::builder().quota(Quota::new(5, Duration::from_secs(1))?).strategy(strategy).clock(clock.clone()).build()?;
        println!("{strategy:?}: 5 requests per second, client-a sends 8 every 250 ms");
        for step in 0..6 {
            let now = start + step * 250;
            clock.set_ms(now);
            let mut line = String::new();
            for _ in 0..8 {
                let d = rl.check("client-a", now)?;
                line.push(if d.allowed { '+' } else { '.' });
            }
            let d = rl.check("client-b", now)?;
            println!("  t={:>4} ms  client-a {line}  client-b remaining {}", now - start, d.remaining);
        }
    }

    println!("\nInvalid input is refused with a reason:");
    let rl = RateLimiter::builder().quota(Quota::new(5, Duration::from_secs(1))?).clock(clock.clone()).build()?;
    let now = crdt_rate_limiter::Clock::now_ms(&clock);
    for (id, ts) in [("", now), ("client-a", now - 60_000), ("client-a", now + 60_000)] {
        println!("  check({id:?}, now{:+} ms) -> {}", ts - now, rl.check(id, ts).unwrap_err());
    }

    let rl = RateLimiter::new(1_000, Duration::from_secs(60))?;
    let n = 2_000_000u64;
    let t = Instant::now();
    let now = rl.now_ms();
    let admitted = (0..n).filter(|i| rl.allow(if i % 2 == 0 { "hot" } else { "warm" }, now)).count();
    let elapsed = t.elapsed();
    println!(
        "\n{n} decisions on 2 keys: {admitted} admitted in {elapsed:?} ({:.0} ns per decision, wall clock)",
        elapsed.as_nanos() as f64 / n as f64
    );
    Ok(())
}
