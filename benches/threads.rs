//! Throughput on a thread-count axis, ours beside governor in the same run, and the tail
//! latency of one decision under contention.
//!
//! Workloads (every request takes the admit path: the quota is `u32::MAX` per second):
//! - `hot key`: every thread decides for the same client, once with `allow` and once
//!   with `check` (what the tower middleware calls per request, with the decision's
//!   figures);
//! - `key per thread`: thread `t` decides for `client-t` only;
//! - `1M keys`: a million clients, warmed first, sent in a shuffled order, each thread
//!   starting at its own offset.
//!
//! Each cell runs every thread for a fixed time and counts decisions; the figure is the
//! median of [`REPS`] runs, in millions of decisions per second for all threads together.
//! Ours is passed a timestamp refreshed every 1024 calls (as a service passes the time
//! it read for the request); governor reads its own clock.
//!
//! `neighbours` measures what a hot key costs the other clients of its shard: a limiter
//! with one shard, one thread deciding for 1000 other clients beside `T - 1` threads on
//! a hot key, once in another limiter (the control: the cores are shared either way, and
//! on SMT siblings that alone costs) and once in the same shard. The slowdown is the
//! ratio of the two.
//!
//! Latency: every thread on the hot key, each call timed on its own with `Instant`
//! (whose own cost, about 20 ns, is included on both sides), for `allow` and `check`.
//!
//! Run: `cargo bench --bench threads` (about a minute on 2 cores). Pass thread counts to
//! change the axis (`cargo bench --bench threads -- 1 2 4`), and `hot` for the hot-key
//! rows and their latencies alone.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crdt_rate_limiter::{Quota, RateLimiter};
use rand::seq::SliceRandom;
use rand::SeedableRng;

type Governor = governor::DefaultKeyedRateLimiter<String>;

const KEYS: usize = 1_000_000;
const REPS: usize = 3;
const RUN: Duration = Duration::from_millis(300);
const LATENCY_CALLS: usize = 200_000;

fn ours(shards: Option<usize>) -> RateLimiter {
    let mut b = RateLimiter::builder().quota(Quota::new(u32::MAX as u64, Duration::from_secs(1)).unwrap());
    if let Some(n) = shards {
        b = b.shards(n);
    }
    b.build().unwrap()
}

fn governor() -> Governor {
    governor::RateLimiter::keyed(governor::Quota::per_second(NonZeroU32::MAX))
}

/// One side of the comparison: decides one request for `key`.
/// Keys are `String`s: governor's keyed limiter takes `&String`.
#[allow(clippy::ptr_arg)]
trait Limiter: Sync {
    fn decide(&self, key: &String, now: i64) -> bool;
    fn now(&self) -> i64 {
        0
    }
}

impl Limiter for RateLimiter {
    #[inline]
    fn decide(&self, key: &String, now: i64) -> bool {
        self.allow(key, now)
    }
    fn now(&self) -> i64 {
        self.now_ms()
    }
}

/// Ours through `check`: the decision with its figures.
struct Checking(RateLimiter);

impl Limiter for Checking {
    #[inline]
    fn decide(&self, key: &String, now: i64) -> bool {
        self.0.check(key, now).is_ok_and(|d| black_box(d).allowed)
    }
    fn now(&self) -> i64 {
        self.0.now_ms()
    }
}

impl Limiter for Governor {
    #[inline]
    fn decide(&self, key: &String, _: i64) -> bool {
        self.check_key(key).is_ok()
    }
}

/// Calls `l.decide` over `keys` from `offset` until `stop`; returns the number of calls.
fn spin(l: &dyn Limiter, keys: &[String], offset: usize, stop: &AtomicBool) -> u64 {
    let mut i = offset % keys.len();
    let mut n = 0u64;
    let mut now = l.now();
    loop {
        for _ in 0..1024 {
            black_box(l.decide(&keys[i], now));
            i += 1;
            if i == keys.len() {
                i = 0;
            }
        }
        n += 1024;
        now = l.now();
        if stop.load(Ordering::Relaxed) {
            return n;
        }
    }
}

/// Runs `threads` threads for [`RUN`]; thread `t` uses `keys_of(t)`. Returns decisions per second.
fn rate<'a>(l: &dyn Limiter, threads: usize, keys_of: impl Fn(usize) -> (&'a [String], usize) + Sync) -> f64 {
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(threads + 1);
    let (total, elapsed) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (keys, offset) = keys_of(t);
                let (stop, barrier) = (&stop, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    spin(l, keys, offset, stop)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        std::thread::sleep(RUN);
        stop.store(true, Ordering::Relaxed);
        let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        (total, start.elapsed())
    });
    total as f64 / elapsed.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_rate<'a>(l: &dyn Limiter, threads: usize, keys_of: impl Fn(usize) -> (&'a [String], usize) + Sync + Copy) -> f64 {
    median((0..REPS).map(|_| rate(l, threads, keys_of)).collect())
}

/// Per-call latencies (ns) of `threads` threads on one key, all threads' samples together.
fn latencies(l: &dyn Limiter, threads: usize, key: &[String]) -> Vec<u64> {
    let barrier = Barrier::new(threads);
    let mut all: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut out = Vec::with_capacity(LATENCY_CALLS);
                    barrier.wait();
                    let mut now = l.now();
                    for n in 0..LATENCY_CALLS {
                        if n & 1023 == 0 {
                            now = l.now();
                        }
                        let t = Instant::now();
                        black_box(l.decide(&key[0], now));
                        out.push(t.elapsed().as_nanos() as u64);
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    all.sort_unstable();
    all
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    // `cargo bench` passes `--bench`; anything numeric is a thread count.
    let mut axis: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    if axis.is_empty() {
        axis = vec![1, 2, 4, 8, 16];
    }
    let hot_only = std::env::args().any(|a| a == "hot");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("threads bench: {cores} cores, {REPS} runs of {} ms per cell, medians; M decisions/s, all threads together", RUN.as_millis());
    println!();
    println!("| workload | threads | ours | governor | ours ÷ governor | ours ÷ ours at 1 thread |");
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, t: usize, o: f64, g: f64, base: Option<f64>| {
        let scale = base.map_or("".to_string(), |b| format!("{:.2}", o / b));
        println!("| {name} | {t} | {:.1} | {:.1} | {:.2} | {scale} |", o / 1e6, g / 1e6, o / g);
    };

    let hot = vec!["client-42".to_string()];
    let (mut base, mut check_base) = (None, None);
    for &t in &axis {
        let (rl, cl, gl) = (ours(None), Checking(ours(None)), governor());
        let o = median_rate(&rl, t, |_| (&hot[..], 0));
        let c = median_rate(&cl, t, |_| (&hot[..], 0));
        let g = median_rate(&gl, t, |_| (&hot[..], 0));
        base = base.or(Some(o));
        check_base = check_base.or(Some(c));
        row("one key shared by all threads", t, o, g, base);
        row("one key shared by all threads, `check`", t, c, g, check_base);
    }
    if hot_only {
        hot_latencies(&axis, &hot);
        return;
    }

    let per_thread: Vec<Vec<String>> = (0..axis.iter().copied().max().unwrap_or(1)).map(|t| vec![format!("client-{t}")]).collect();
    let mut base = None;
    for &t in &axis {
        let (rl, gl) = (ours(None), governor());
        let o = median_rate(&rl, t, |t| (&per_thread[t][..], 0));
        let g = median_rate(&gl, t, |t| (&per_thread[t][..], 0));
        base = base.or(Some(o));
        row("one key per thread", t, o, g, base);
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut order: Vec<usize> = (0..KEYS).collect();
    order.shuffle(&mut rng);
    let many: Vec<String> = order.iter().map(|i| format!("client-{i}")).collect();
    let (rl, gl) = (ours(None), governor());
    let now = rl.now_ms();
    for k in &many {
        rl.allow(k, now);
        let _ = gl.check_key(k);
    }
    let mut base = None;
    for &t in &axis {
        let o = median_rate(&rl, t, |t| (&many[..], t * KEYS / 16));
        let g = median_rate(&gl, t, |t| (&many[..], t * KEYS / 16));
        base = base.or(Some(o));
        row("1M keys, random order", t, o, g, base);
    }
    drop((rl, gl, many));

    // Neighbours: one shard; one thread cycles through 1000 other clients. Only up to one
    // thread per core: beyond, the neighbour's loss is its share of the CPU.
    println!();
    println!(
        "| neighbours of a hot key (one shard) | threads on the hot key | their rate alone | hot key in another limiter | hot key in their shard | slowdown by the shard |"
    );
    println!("|---|---|---|---|---|---|");
    let others: Vec<String> = (0..1000).map(|i| format!("other-{i}")).collect();
    for &t in axis.iter().filter(|&&t| t >= 2 && t <= cores) {
        let (rl, elsewhere) = (ours(Some(1)), ours(Some(1)));
        let alone = median((0..REPS).map(|_| rate(&rl, 1, |_| (&others[..], 0))).collect());
        let beside = |hot_in: &RateLimiter| {
            median(
                (0..REPS)
                    .map(|_| {
                        let stop = AtomicBool::new(false);
                        std::thread::scope(|s| {
                            for _ in 1..t {
                                let (stop, hot) = (&stop, &hot);
                                s.spawn(move || spin(hot_in, hot, 0, stop));
                            }
                            std::thread::sleep(Duration::from_millis(20));
                            let r = rate(&rl, 1, |_| (&others[..], 0));
                            stop.store(true, Ordering::Relaxed);
                            r
                        })
                    })
                    .collect(),
            )
        };
        let (control, same) = (beside(&elsewhere), beside(&rl));
        println!(
            "| 1000 other clients, 1 thread | {} | {:.1} M/s | {:.1} M/s | {:.1} M/s | {:.2}× |",
            t - 1,
            alone / 1e6,
            control / 1e6,
            same / 1e6,
            control / same
        );
    }

    hot_latencies(&axis, &hot);
}

/// The latency table: one decision with every thread on the hot key.
fn hot_latencies(axis: &[usize], hot: &[String]) {
    println!();
    println!("| one decision, all threads on one key | threads | ours p50 | ours p99 | ours p99.9 | governor p50 | governor p99 | governor p99.9 |");
    println!("|---|---|---|---|---|---|---|---|");
    for &t in axis {
        let (rl, cl, gl) = (ours(None), Checking(ours(None)), governor());
        let g = latencies(&gl, t, hot);
        for (name, o) in [("`allow`", latencies(&rl, t, hot)), ("`check`", latencies(&cl, t, hot))] {
            println!(
                "| ns per call, {name} | {t} | {} | {} | {} | {} | {} | {} |",
                pct(&o, 0.5),
                pct(&o, 0.99),
                pct(&o, 0.999),
                pct(&g, 0.5),
                pct(&g, 0.99),
                pct(&g, 0.999)
            );
        }
    }
}
