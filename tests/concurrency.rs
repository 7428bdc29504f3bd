//! Many threads on one key admit exactly what one thread would, for every strategy, and
//! what they admit reaches gossip.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::Duration;

mod common;

use crdt_rate_limiter::counter::ReplicaId;
use crdt_rate_limiter::{Admission, Decision, GossipConfig, GossipNode, ManualClock, Quota, RateLimiter, Strategy};

const START: i64 = 1_700_000_000_000;

#[test]
fn sixteen_threads_on_one_key_admit_exactly_the_limit_per_fixed_window() {
    let clock = ManualClock::new(START);
    let rl = RateLimiter::builder()
        .quota(Quota::new(1_000, Duration::from_secs(1)).unwrap())
        .strategy(Strategy::FixedWindow)
        .clock(clock.clone())
        .build()
        .unwrap();
    for window in 0..3i64 {
        let ts = START + window * 1_000 + 500;
        clock.set_ms(ts);
        let admitted = common::hammer(&rl, "hot", ts, 16, 500);
        assert_eq!(admitted, 1_000, "window {window}: 16 × 500 offered");
    }
}

#[test]
fn threads_on_many_keys_each_get_their_own_quota() {
    let clock = ManualClock::new(START);
    let rl = RateLimiter::builder()
        .quota(Quota::new(10, Duration::from_secs(1)).unwrap())
        .strategy(Strategy::FixedWindow)
        .clock(clock)
        .build()
        .unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let rl = rl.clone();
            std::thread::spawn(move || {
                let mut admitted = 0;
                for i in 0..2_000 {
                    // Every thread hits every key: keys are shared across threads.
                    if rl.allow(&format!("client-{}", (i + t) % 100), START) {
                        admitted += 1;
                    }
                }
                admitted
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 100 * 10);
    assert_eq!(rl.active_keys(), 100);
}

fn limiter(strategy: Strategy, limit: u64, clock: &ManualClock) -> RateLimiter {
    RateLimiter::builder()
        .quota(Quota::new(limit, Duration::from_secs(1)).unwrap())
        .strategy(strategy)
        .clock(clock.clone())
        .build()
        .unwrap()
}

/// `threads` threads each offer `per_thread` requests for `key` at `ts`; returns how many
/// were admitted.
fn hammer(rl: &RateLimiter, key: &str, ts: i64, threads: usize, per_thread: usize) -> u64 {
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    (0..per_thread).filter(|_| rl.allow(key, ts)).count() as u64
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

/// Runs `f` at four steps of the same timeline on two limiters of `strategy` (limit
/// 1,000 per s), one for many threads and one for one thread, their clocks at `ts`: a
/// full window, one at its middle, an idle gap, a full window again. Returns the
/// many-thread limiter.
fn each_step(strategy: Strategy, mut f: impl FnMut(usize, i64, &RateLimiter, &RateLimiter)) -> RateLimiter {
    let (c8, c1) = (ManualClock::new(START), ManualClock::new(START));
    let (many, one) = (limiter(strategy, 1_000, &c8), limiter(strategy, 1_000, &c1));
    for (i, at) in [100, 1_500, 2_999, 5_250].into_iter().enumerate() {
        let ts = START - START % 1_000 + 1_000 + at;
        c8.set_ms(ts);
        c1.set_ms(ts);
        f(i, ts, &many, &one);
    }
    many
}

/// Eight threads offering 4 × the limit admit exactly what one thread offering the same
/// admits, window after window, for each strategy: a full window, then one at its middle
/// weighed down by the previous (sliding window) or starting from an empty bucket (token
/// bucket), then an idle gap and a full window again.
#[test]
fn eight_threads_on_one_key_admit_exactly_what_one_thread_does_for_every_strategy() {
    for strategy in [Strategy::FixedWindow, Strategy::SlidingWindow, Strategy::TokenBucket] {
        let many = each_step(strategy, |i, ts, many, one| {
            let expected = hammer(one, "hot", ts, 1, 4_000);
            let admitted = hammer(many, "hot", ts, 8, 500);
            assert_eq!(admitted, expected, "{strategy:?}, step {i}: 8 threads admitted {admitted}, one thread {expected}");
            if i == 0 {
                assert_eq!(expected, 1_000, "{strategy:?}: a fresh key gets its whole limit");
            }
            // The standing refusal ends with the window: one more is refused now.
            assert!(!many.allow("hot", ts), "{strategy:?}, step {i}");
        });
        let stats = many.stats();
        assert_eq!(stats.allowed + stats.denied, 4 * 8 * 500 + 4, "{strategy:?}: every decision is counted once: {stats:?}");
    }
}

/// Other clients keep their own quota while a hot key is decided on the same shard.
#[test]
fn a_hot_key_does_not_change_what_its_shard_neighbours_are_admitted() {
    let clock = ManualClock::new(START);
    let rl = RateLimiter::builder().quota(Quota::new(50, Duration::from_secs(1)).unwrap()).shards(1).clock(clock.clone()).build().unwrap();
    let ts = START + 10;
    std::thread::scope(|s| {
        for _ in 0..4 {
            let rl = &rl;
            s.spawn(move || (0..20_000).filter(|_| rl.allow("hot", ts)).count());
        }
        let neighbours: u64 = (0..200).map(|i| (0..60).filter(|_| rl.allow(&format!("n-{}", i % 20), ts)).count() as u64).sum();
        assert_eq!(neighbours, 20 * 50);
    });
    assert!(!rl.allow("hot", ts));
}

/// What many threads admit on one key is what gossip sends: the peer's view of this
/// node's count equals the admissions, including those spent from leases, under both
/// admission policies.
#[test]
fn counts_admitted_by_many_threads_reach_a_peer() {
    for admission in [Admission::Optimistic, Admission::Bounded] {
        replicate(admission);
    }
}

fn replicate(admission: Admission) {
    let clock = ManualClock::new(START);
    let rl = RateLimiter::builder()
        .quota(Quota::new(100_000, Duration::from_secs(1)).unwrap())
        .admission(admission)
        .clock(clock.clone())
        .build()
        .unwrap();
    let build = |id: u64, rl: RateLimiter| {
        let mut cfg = GossipConfig::new(ReplicaId { node: id, incarnation: 1 });
        cfg.interval_ms = 10;
        GossipNode::new(rl, cfg, [3 - id], id, START).unwrap()
    };
    let mut a = build(1, rl.clone());
    let peer_clock = ManualClock::new(START);
    let mut b = build(2, limiter(Strategy::FixedWindow, 100_000, &peer_clock));
    let mut now = START;
    let mut admitted = 0;
    for round in 0..5 {
        admitted += hammer(&rl, "hot", now, 4, 5_000);
        now += 10;
        clock.set_ms(now);
        peer_clock.set_ms(now);
        a.handle_timeout(now);
        b.handle_timeout(now);
        for _ in 0..4 {
            while let Some(t) = a.poll_transmit() {
                b.handle_message(1, &t.bytes, now).unwrap();
            }
            while let Some(t) = b.poll_transmit() {
                a.handle_message(2, &t.bytes, now).unwrap();
            }
        }
        let key = rl.key_hash("hot");
        let seen: u64 = b.state(now).iter().filter(|e| e.key == key && e.replica.node == 1).map(|e| e.count).sum();
        assert_eq!(seen, admitted, "{admission:?}, round {round}");
    }
    if admission == Admission::Optimistic {
        // (Bounded admission may hold back a share's rounding remainder.)
        assert_eq!(admitted, 100_000, "20,000 offered per round against a limit of 100,000 per window");
    } else {
        assert!(admitted > 90_000, "{admitted}");
    }
}

/// What [`offer`] saw: the admissions, and every decision `check` returned with the
/// admissions completed (by any thread) before it was asked.
struct Seen {
    admitted: u64,
    checks: Vec<(u64, Decision)>,
}

/// `threads` threads released together each offer `per_thread` requests for `key` at
/// `ts`: the first `checking` threads through `check`, the others through `allow`.
fn offer(rl: &RateLimiter, key: &str, ts: i64, threads: usize, checking: usize, per_thread: usize) -> Seen {
    let barrier = Barrier::new(threads);
    let done = AtomicU64::new(0);
    let checks = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..threads {
            let (barrier, done, checks) = (&barrier, &done, &checks);
            s.spawn(move || {
                let mut mine = Vec::with_capacity(if t < checking { per_thread } else { 0 });
                barrier.wait();
                for _ in 0..per_thread {
                    let before = done.load(Ordering::SeqCst);
                    let allowed = if t < checking {
                        let d = rl.check(key, ts).unwrap();
                        mine.push((before, d));
                        d.allowed
                    } else {
                        rl.allow(key, ts)
                    };
                    if allowed {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                }
                checks.lock().unwrap().extend(mine);
            });
        }
    });
    Seen { admitted: done.into_inner(), checks: checks.into_inner().unwrap() }
}

/// Eight threads calling `check` (what the tower middleware calls per request) on one
/// key of a fixed window of 1,000 admit exactly 1,000, window after window; each
/// admission reports the exact limit and reset time and a remaining count no larger
/// than what is left once the admissions completed before it and itself are counted;
/// each refusal reports the exact retry time.
#[test]
fn eight_threads_checking_one_key_admit_exactly_the_limit_and_never_overstate_what_remains() {
    let clock = ManualClock::new(START);
    let rl = limiter(Strategy::FixedWindow, 1_000, &clock);
    for window in 1..4i64 {
        let ts = START - START % 1_000 + window * 1_000 + 400;
        clock.set_ms(ts);
        let seen = offer(&rl, "hot", ts, 8, 8, 500);
        assert_eq!(seen.admitted, 1_000, "window {window}: 8 × 500 offered");
        assert_eq!(seen.checks.len(), 4_000);
        let to_end = Duration::from_millis(600);
        for &(before, d) in &seen.checks {
            assert_eq!((d.limit, d.reset_after), (1_000, to_end), "window {window}: {d:?}");
            if d.allowed {
                assert!(d.remaining < 1_000 - before, "window {window}: {} remaining with {before} admitted before", d.remaining);
                assert_eq!(d.retry_after, None);
            } else {
                assert_eq!((d.remaining, d.retry_after), (0, Some(to_end)), "window {window}");
            }
        }
    }
}

/// Threads calling `allow` and threads calling `check` on one key together admit exactly
/// what one thread does, for every strategy, at the points of
/// [`eight_threads_on_one_key_admit_exactly_what_one_thread_does_for_every_strategy`]
/// (the sliding log at a window's middle too); every refusal `check` reports carries the
/// figures one thread's refusal does, and every admission a reset time one thread's
/// admissions report and a remaining count within what is left.
#[test]
fn allow_and_check_threads_together_admit_exactly_what_one_thread_does_for_every_strategy() {
    for strategy in [Strategy::FixedWindow, Strategy::SlidingWindow, Strategy::TokenBucket, Strategy::SlidingLog] {
        each_step(strategy, |i, ts, many, one| {
            let alone = offer(one, "hot", ts, 1, 1, 4_000);
            let expected = alone.admitted;
            let resets: BTreeSet<_> = alone.checks.iter().filter(|(_, d)| d.allowed).map(|(_, d)| d.reset_after).collect();
            let refusal = alone.checks.iter().rev().map(|&(_, d)| d).find(|d| !d.allowed).expect("4,000 offered exceed the limit");
            let seen = offer(many, "hot", ts, 8, 4, 500);
            assert_eq!(seen.admitted, expected, "{strategy:?}, step {i}: 8 threads admitted {}, one thread {expected}", seen.admitted);
            for &(before, d) in &seen.checks {
                if d.allowed {
                    assert!(resets.contains(&d.reset_after), "{strategy:?}, step {i}: {d:?}, one thread's {resets:?}");
                    assert!(
                        d.remaining < expected - before,
                        "{strategy:?}, step {i}: {} remaining with {before} admitted before",
                        d.remaining
                    );
                } else {
                    assert_eq!(d, refusal, "{strategy:?}, step {i}");
                }
            }
            assert!(seen.checks.iter().any(|(_, d)| !d.allowed), "{strategy:?}, step {i}: 2,000 checks offered");
        });
    }
}
