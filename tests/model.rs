//! Random sequences of requests, late requests and quota changes, against a reference
//! that keeps every admission in a log and recomputes each decision from it.

use std::collections::HashMap;
use std::time::Duration;

use crdt_rate_limiter::{ManualClock, Quota, RateLimiter, Strategy as Strat};
use proptest::prelude::*;

const START: i64 = 1_700_000_000_000;
const MAX_AGE_MS: i64 = 5_000;

/// `⌈a / b⌉` for `a ≥ 0`, `b > 0`.
fn div_ceil(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// The documented semantics, written for clarity rather than speed.
struct Reference {
    strategy: Strat,
    limit: u64,
    burst: u64,
    window_ms: i64,
    /// Per client: the newest window seen and the window every admission was charged to
    /// (for the sliding log: its buckets).
    clients: HashMap<String, (i64, Vec<i64>)>,
}

impl Reference {
    fn allow(&mut self, client: &str, ts: i64) -> bool {
        let (l, b) = (self.limit, self.burst);
        // The sliding log counts in buckets of ⌈W/k⌉ and reads the current one and the
        // ⌈(W − 1)/bucket⌉ before it; the others read the window and the one before.
        let (w, back) = match self.strategy {
            Strat::SlidingLog => {
                let bucket = div_ceil(self.window_ms, Strat::LOG_BUCKETS as i64);
                (bucket, div_ceil(self.window_ms - 1, bucket))
            }
            _ => (self.window_ms, 1),
        };
        let (newest, log) = self.clients.entry(client.to_string()).or_insert((i64::MIN, Vec::new()));
        let own = ts.div_euclid(w);
        // A late request is charged to the newest window the client has seen, at its start.
        let (window, elapsed) = if own >= *newest { (own, ts.rem_euclid(w)) } else { (*newest, 0) };
        *newest = window;
        let cur = log.iter().filter(|&&x| x == window).count() as u64;
        let prev = log.iter().filter(|&&x| x == window - 1).count() as u64;
        let (w, e) = (w as u64, elapsed as u64);
        let admit = match self.strategy {
            Strat::FixedWindow => cur < l,
            // p·(W − e)/W + c + 1 ≤ L, multiplied through by W.
            Strat::SlidingWindow => prev * (w - e) + (cur + 1) * w <= l * w,
            // Tokens: min(B, min(B, L − p) + L·e/W) − c ≥ 1, multiplied through by W.
            Strat::TokenBucket => {
                let start_level = b.min(l.saturating_sub(prev));
                (cur + 1) * w <= (b * w).min(start_level * w + l * e)
            }
            Strat::SlidingLog => log.iter().filter(|&&x| x >= window - back && x <= window).count() < l as usize,
            _ => unreachable!(),
        };
        if admit {
            log.push(window);
        }
        admit
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Advance the clock, then a request from `client` `late_ms` before now.
    Request { advance_ms: i64, client: u8, late_ms: i64 },
    /// Change the limit (and the burst with it).
    SetLimit(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (0i64..400, 0u8..4, prop_oneof![4 => Just(0i64), 1 => 0i64..=MAX_AGE_MS])
            .prop_map(|(advance_ms, client, late_ms)| Op::Request { advance_ms, client, late_ms }),
        1 => (1u64..8).prop_map(Op::SetLimit),
    ]
}

fn strategy() -> impl Strategy<Value = Strat> {
    prop_oneof![Just(Strat::FixedWindow), Just(Strat::SlidingWindow), Just(Strat::TokenBucket), Just(Strat::SlidingLog)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_strategy_decides_exactly_as_the_reference(
        strategy in strategy(),
        window_ms in prop_oneof![Just(1i64), Just(7), Just(100), Just(1_000), Just(1_001), Just(60_000)],
        limit in 1u64..8,
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let clock = ManualClock::new(START);
        let quota = |l: u64| Quota::new(l, Duration::from_millis(window_ms as u64)).unwrap();
        let rl = RateLimiter::builder()
            .quota(quota(limit))
            .strategy(strategy)
            .clock(clock.clone())
            .max_timestamp_age(Duration::from_millis(MAX_AGE_MS as u64))
            .shards(4)
            .build()
            .unwrap();
        let mut reference = Reference { strategy, limit, burst: limit, window_ms, clients: HashMap::new() };
        let mut now = START;
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Request { advance_ms, client, late_ms } => {
                    now += advance_ms;
                    clock.set_ms(now);
                    let ts = now - late_ms;
                    let id = format!("client-{client}");
                    let expected = reference.allow(&id, ts);
                    let d = rl.check(&id, ts).unwrap();
                    prop_assert_eq!(d.allowed, expected, "op {}: {} at {} (now {})", i, id, ts - START, now - START);
                    prop_assert_eq!(d.limit, reference.limit);
                }
                Op::SetLimit(l) => {
                    rl.set_quota(quota(l));
                    reference.limit = l;
                    reference.burst = l;
                }
            }
        }
    }

    /// The promise of each strategy, stated on the admissions themselves.
    #[test]
    fn admissions_per_aligned_window_never_exceed_the_limit(
        strategy in strategy(),
        limit in 1u64..20,
        gaps in prop::collection::vec(0i64..120, 1..500),
    ) {
        let clock = ManualClock::new(START);
        let rl = RateLimiter::builder()
            .quota(Quota::new(limit, Duration::from_millis(1_000)).unwrap())
            .strategy(strategy)
            .clock(clock.clone())
            .build()
            .unwrap();
        let mut per_window: HashMap<i64, u64> = HashMap::new();
        let mut now = START;
        for gap in gaps {
            now += gap;
            clock.set_ms(now);
            if rl.allow("c", now) {
                *per_window.entry(now.div_euclid(1_000)).or_default() += 1;
            }
        }
        for (w, n) in &per_window {
            prop_assert!(*n <= limit, "window {} admitted {} > {}", w, n, limit);
            if strategy == Strat::TokenBucket {
                // Sustained rate: any two consecutive windows admit at most 2·L... plus
                // nothing: the start level is L − p, so p + c ≤ p + (L − p) + L = 2L.
                let next = per_window.get(&(w + 1)).copied().unwrap_or(0);
                prop_assert!(n + next <= 2 * limit);
            }
        }
    }

    /// `retry_after` is a promise: no admission before it, admission at it.
    #[test]
    fn retry_after_is_kept(strategy in strategy(), limit in 1u64..6, gaps in prop::collection::vec(0i64..300, 1..60)) {
        let clock = ManualClock::new(START);
        let rl = RateLimiter::builder()
            .quota(Quota::new(limit, Duration::from_millis(1_000)).unwrap())
            .strategy(strategy)
            .clock(clock.clone())
            .build()
            .unwrap();
        let mut now = START;
        for gap in gaps {
            now += gap;
            clock.set_ms(now);
            let d = rl.check("c", now).unwrap();
            if let Some(retry) = d.retry_after {
                let at = now + retry.as_millis() as i64;
                // Probe on a copy of the state: a second limiter replaying the same
                // admissions would be needed to probe without counting, so probe only
                // the promised instant and the one before, each on the real limiter,
                // which is fine since a denied probe counts nothing.
                clock.set_ms(at - 1);
                prop_assert!(!rl.allow("c", at - 1), "admitted before retry_after");
                clock.set_ms(at);
                prop_assert!(rl.allow("c", at), "denied at retry_after");
                now = at;
            }
        }
    }

    /// The sliding log's promise on the admissions themselves: at most `L` in any span
    /// `(t − W, t]`, and a refusal only when the buckets it reads, within
    /// `(t − (n + 1)·b, t]`, already hold `L` (the strict side: `(n + 1)·b` is `W + b` when
    /// the bucket divides the window, less than `W + 2b` otherwise).
    #[test]
    fn the_sliding_log_admits_at_most_the_limit_in_any_span(
        limit in 1u64..20,
        window_ms in prop_oneof![Just(10i64), Just(99), Just(1_000)],
        gaps in prop::collection::vec(prop_oneof![3 => 0i64..30, 1 => 0i64..400], 1..500),
    ) {
        let clock = ManualClock::new(START);
        let rl = RateLimiter::builder()
            .quota(Quota::new(limit, Duration::from_millis(window_ms as u64)).unwrap())
            .strategy(Strat::SlidingLog)
            .clock(clock.clone())
            .build()
            .unwrap();
        let bucket = div_ceil(window_ms, Strat::LOG_BUCKETS as i64);
        let read = (div_ceil(window_ms - 1, bucket) + 1) * bucket;
        let mut admitted: Vec<i64> = Vec::new();
        let mut now = START;
        for gap in gaps {
            now += gap;
            clock.set_ms(now);
            let in_span = |from: i64| admitted.iter().filter(|&&t| t > now - from).count() as u64;
            if rl.allow("c", now) {
                prop_assert!(in_span(window_ms) < limit, "{} admitted in ({}, {}]", in_span(window_ms) + 1, now - window_ms - START, now - START);
                admitted.push(now);
            } else {
                prop_assert!(in_span(read) >= limit, "refused at {} with {} in the buckets read", now - START, in_span(read));
            }
        }
    }
}
