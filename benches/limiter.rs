//! `allow` against governor's keyed limiter (`check_key`), side by side in one run.
//!
//! Both limiters get a quota large enough that every request takes the admit path, and
//! both read a clock per call (governor its quanta clock; ours its coarse clock, to
//! validate the timestamp). The request timestamp handed to `allow` is refreshed every
//! 1024 calls, as a service would pass the time it already read for the request.
//!
//! For the million keys, the request keys are allocated in the order they are sent, as
//! a handler has the id it just parsed in cache, while both limiters were warmed in a
//! different random order, so neither finds its state laid out in request order.
//!
//! `hot_key_by_strategy` runs the one-key, one-thread case under each strategy (the
//! default is the sliding window); the sliding log sums the buckets of a window on
//! every decision.
//!
//! Run: `cargo bench --bench limiter`

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use crdt_rate_limiter::{Quota, RateLimiter, Strategy};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::seq::SliceRandom;
use rand::SeedableRng;

const KEYS: usize = 1_000_000;

type Governor = governor::DefaultKeyedRateLimiter<String>;

fn ours() -> RateLimiter {
    RateLimiter::builder().quota(Quota::new(u32::MAX as u64, Duration::from_secs(1)).unwrap()).build().unwrap()
}

fn ours_with(strategy: Strategy) -> RateLimiter {
    RateLimiter::builder().quota(Quota::new(u32::MAX as u64, Duration::from_secs(1)).unwrap()).strategy(strategy).build().unwrap()
}

fn governor() -> Governor {
    governor::RateLimiter::keyed(governor::Quota::per_second(NonZeroU32::MAX))
}

/// Calls `f(key, now_ms)` `iters` times over `keys` in order, refreshing `now_ms` every 1024 calls.
fn drive(rl: &RateLimiter, keys: &[String], iters: u64, offset: usize) -> Duration {
    let start = Instant::now();
    let mut now = rl.now_ms();
    let mut i = offset;
    for n in 0..iters {
        if n & 1023 == 0 {
            now = rl.now_ms();
        }
        black_box(rl.allow(&keys[i], now));
        i += 1;
        if i == keys.len() {
            i = 0;
        }
    }
    start.elapsed()
}

fn drive_governor(gl: &Governor, keys: &[String], iters: u64, offset: usize) -> Duration {
    let start = Instant::now();
    let mut i = offset;
    for _ in 0..iters {
        black_box(gl.check_key(&keys[i]).is_ok());
        i += 1;
        if i == keys.len() {
            i = 0;
        }
    }
    start.elapsed()
}

/// Runs `f` on two threads, each doing half of `iters`; returns the wall time.
fn two_threads(iters: u64, f: impl Fn(u64, usize) -> Duration + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        let f = &f;
        let a = s.spawn(move || f(iters / 2, 0));
        let b = s.spawn(move || f(iters - iters / 2, KEYS / 2));
        a.join().unwrap();
        b.join().unwrap();
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let hot = vec!["client-42".to_string()];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut order: Vec<usize> = (0..KEYS).collect();
    order.shuffle(&mut rng);
    let warm: Vec<String> = order.iter().map(|i| format!("client-{i}")).collect();
    order.shuffle(&mut rng);
    let many: Vec<String> = order.iter().map(|i| format!("client-{i}")).collect();

    let (rl, gl) = (ours(), governor());
    let mut g = c.benchmark_group("hot_key");
    g.bench_function(BenchmarkId::new("crdt-rate-limiter", "1 thread"), |b| b.iter_custom(|n| drive(&rl, &hot, n, 0)));
    g.bench_function(BenchmarkId::new("governor", "1 thread"), |b| b.iter_custom(|n| drive_governor(&gl, &hot, n, 0)));
    g.bench_function(BenchmarkId::new("crdt-rate-limiter", "2 threads"), |b| {
        b.iter_custom(|n| two_threads(n, |k, _| drive(&rl, &hot, k, 0)))
    });
    g.bench_function(BenchmarkId::new("governor", "2 threads"), |b| {
        b.iter_custom(|n| two_threads(n, |k, _| drive_governor(&gl, &hot, k, 0)))
    });
    g.finish();

    let mut g = c.benchmark_group("hot_key_by_strategy");
    for (name, strategy) in [
        ("fixed-window", Strategy::FixedWindow),
        ("sliding-window", Strategy::SlidingWindow),
        ("token-bucket", Strategy::TokenBucket),
        ("sliding-log", Strategy::SlidingLog),
    ] {
        let rl = ours_with(strategy);
        g.bench_function(BenchmarkId::new(name, "1 thread"), |b| b.iter_custom(|n| drive(&rl, &hot, n, 0)));
    }
    g.finish();

    // Both warmed with every key first: this measures deciding for known keys.
    let (rl, gl) = (ours(), governor());
    drive(&rl, &warm, KEYS as u64, 0);
    drive_governor(&gl, &warm, KEYS as u64, 0);
    drop(warm);
    let mut g = c.benchmark_group("1M_keys_random_order");
    g.bench_function(BenchmarkId::new("crdt-rate-limiter", "1 thread"), |b| b.iter_custom(|n| drive(&rl, &many, n, 0)));
    g.bench_function(BenchmarkId::new("governor", "1 thread"), |b| b.iter_custom(|n| drive_governor(&gl, &many, n, 0)));
    g.bench_function(BenchmarkId::new("crdt-rate-limiter", "2 threads"), |b| {
        b.iter_custom(|n| two_threads(n, |k, o| drive(&rl, &many, k, o)))
    });
    g.bench_function(BenchmarkId::new("governor", "2 threads"), |b| {
        b.iter_custom(|n| two_threads(n, |k, o| drive_governor(&gl, &many, k, o)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(30);
    targets = bench
}
criterion_main!(benches);
