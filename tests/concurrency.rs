//! Many threads on one key admit exactly the limit per fixed window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use crdt_rate_limiter::{ManualClock, Quota, RateLimiter, Strategy};

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
        let admitted = Arc::new(AtomicU64::new(0));
        let barrier = Arc::new(Barrier::new(16));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (rl, admitted, barrier) = (rl.clone(), admitted.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    for _ in 0..500 {
                        if rl.allow("hot", ts) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(admitted.load(Ordering::Relaxed), 1_000, "window {window}: 16 × 500 offered");
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
