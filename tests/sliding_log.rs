//! `Strategy::SlidingLog`: at most `L` admissions in any span of length `W`, counted in
//! buckets of `W/k`; and the leaky bucket under its name.

use std::time::Duration;

use crdt_rate_limiter::{ManualClock, Quota, RateLimiter, Strategy};

mod common;
use common::{limiter, T0};

/// Ten requests at 900 ms, then a probe every 7 ms from 901 to 1,899 ms: how many
/// probes each strategy admits.
fn admitted_after_a_burst_at_900_ms(strategy: Strategy) -> (RateLimiter, ManualClock, usize) {
    let (rl, clock) = limiter(strategy, 10);
    clock.set_ms(T0 + 900);
    assert_eq!((0..10).filter(|_| rl.allow("c", T0 + 900)).count(), 10, "{strategy:?}");
    let mut admitted = 0;
    for t in (T0 + 901..T0 + 1_900).step_by(7) {
        clock.set_ms(t);
        admitted += usize::from(rl.allow("c", t));
    }
    (rl, clock, admitted)
}

/// The acceptance scenario: limit 10 per 1 s on a manual clock, 10 admitted at 900 ms,
/// none between 901 and 1,899 ms, admissions again no later than one bucket (100 ms)
/// after 1,900 ms.
#[test]
fn no_span_of_one_window_holds_more_than_the_limit() {
    let (rl, clock, admitted) = admitted_after_a_burst_at_900_ms(Strategy::SlidingLog);
    assert_eq!(admitted, 0, "probes admitted between 901 and 1,899 ms");
    // From 1,900 ms on, one probe per ms until the first admission.
    let again = (T0 + 1_900..T0 + 3_000)
        .find(|&t| {
            clock.set_ms(t);
            rl.allow("c", t)
        })
        .expect("admitted again");
    assert!(again <= T0 + 1_900 + 100, "admitted again at {} ms", again - T0);
    // Bucket 9 (900..999 ms) is counted whole while any part of it is in the span.
    assert_eq!(again, T0 + 2_000);
}

/// The same scenario under the other strategies: an aligned window holds at most `L`,
/// a span straddling a boundary more (the figures `docs/design.md` quotes).
#[test]
fn the_window_strategies_admit_more_in_a_span_straddling_a_boundary() {
    assert_eq!(admitted_after_a_burst_at_900_ms(Strategy::SlidingWindow).2, 8);
    assert_eq!(admitted_after_a_burst_at_900_ms(Strategy::FixedWindow).2, 10);
    assert_eq!(admitted_after_a_burst_at_900_ms(Strategy::TokenBucket).2, 8);
}

#[test]
fn retry_after_and_reset_after_name_the_bucket_that_frees_the_quota() {
    let (rl, clock) = limiter(Strategy::SlidingLog, 10);
    clock.set_ms(T0 + 950);
    for i in 0..10 {
        let d = rl.check("c", T0 + 950).unwrap();
        assert!(d.allowed);
        assert_eq!(d.remaining, 9 - i);
        // Full again once bucket 9 has left every span: at 2,000 ms.
        assert_eq!(d.reset_after, Duration::from_millis(1_050));
    }
    clock.set_ms(T0 + 1_899);
    let d = rl.check("c", T0 + 1_899).unwrap();
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Some(Duration::from_millis(101)));
    clock.set_ms(T0 + 1_999);
    assert!(!rl.allow("c", T0 + 1_999));
    clock.set_ms(T0 + 2_000);
    assert!(rl.allow("c", T0 + 2_000));
}

/// Requests spread over the window leave one bucket at a time: the quota comes back as
/// they age out, not all at once at a window boundary.
#[test]
fn admissions_come_back_one_bucket_at_a_time() {
    let (rl, clock) = limiter(Strategy::SlidingLog, 10);
    for i in 0..10 {
        let t = T0 + i * 100 + 50;
        clock.set_ms(t);
        assert!(rl.allow("c", t));
    }
    clock.set_ms(T0 + 1_060);
    assert!(!rl.allow("c", T0 + 1_060), "the bucket of 50 ms is still read until 1,100 ms");
    clock.set_ms(T0 + 1_100);
    assert!(rl.allow("c", T0 + 1_100));
    assert!(!rl.allow("c", T0 + 1_100));
    clock.set_ms(T0 + 1_200);
    assert!(rl.allow("c", T0 + 1_200));
    assert!(!rl.allow("c", T0 + 1_200));
}

/// A late request is charged to the newest bucket, like a late request of the window
/// strategies to the newest window: it can only make the decision stricter.
#[test]
fn a_late_request_is_charged_to_the_newest_bucket() {
    let (rl, clock) = limiter(Strategy::SlidingLog, 2);
    clock.set_ms(T0 + 1_500);
    assert!(rl.allow("c", T0 + 1_500));
    assert!(rl.allow("c", T0 + 100), "a late request, charged to bucket 15");
    clock.set_ms(T0 + 2_450);
    assert!(!rl.allow("c", T0 + 2_450), "both are in bucket 15, still read");
    clock.set_ms(T0 + 2_600);
    assert!(rl.allow("c", T0 + 2_600));
}

/// One hot key on many threads: leases keep the count exact under the sliding log too.
#[test]
fn sixteen_threads_on_one_key_admit_exactly_the_limit_per_span() {
    let (rl, clock) = limiter(Strategy::SlidingLog, 1_000);
    // 500 ms: the full limit, in bucket 5. 1,500 ms: bucket 5 is still read, nothing.
    // 1,600 ms: it has left, the full limit again, in bucket 16; and so on.
    for (ts, expected) in [(T0 + 500, 1_000), (T0 + 1_500, 0), (T0 + 1_600, 1_000), (T0 + 2_599, 0), (T0 + 2_700, 1_000)] {
        clock.set_ms(ts);
        let admitted = common::hammer(&rl, "hot", ts, 16, 500);
        assert_eq!(admitted, expected, "at {} ms: 16 × 500 offered", ts - T0);
    }
}

#[test]
fn the_leaky_bucket_is_the_token_bucket_by_name() {
    assert_eq!(Strategy::LeakyBucket, Strategy::TokenBucket);
    let (leaky, _) = limiter(Strategy::LeakyBucket, 5);
    let (token, _) = limiter(Strategy::TokenBucket, 5);
    for t in (0..3_000).step_by(37) {
        assert_eq!(leaky.allow("c", T0 + t), token.allow("c", T0 + t), "at {t} ms");
    }
}

#[test]
fn a_window_change_keeps_the_buckets_in_force() {
    let (rl, clock) = limiter(Strategy::SlidingLog, 4);
    clock.set_ms(T0 + 950);
    for _ in 0..4 {
        assert!(rl.allow("c", T0 + 950));
    }
    // To 2 s windows (buckets of 200 ms): the four are carried over, not forgotten.
    rl.set_quota(Quota::new(4, Duration::from_secs(2)).unwrap());
    clock.set_ms(T0 + 1_200);
    assert!(!rl.allow("c", T0 + 1_200));
}
