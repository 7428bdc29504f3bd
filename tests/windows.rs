//! Same timestamps, window boundaries, late requests and quota changes, as documented.

use std::time::Duration;

use crdt_rate_limiter::{Quota, RateLimiter, Strategy};

mod common;
use common::{limiter, T0};

#[test]
fn requests_at_the_same_timestamp_each_count() {
    let (rl, _) = limiter(Strategy::FixedWindow, 3);
    let remaining: Vec<_> = (0..4).map(|_| rl.check("c", T0 + 10).unwrap()).map(|d| (d.allowed, d.remaining)).collect();
    assert_eq!(remaining, vec![(true, 2), (true, 1), (true, 0), (false, 0)]);
}

#[test]
fn fixed_window_resets_exactly_at_the_boundary() {
    let (rl, clock) = limiter(Strategy::FixedWindow, 2);
    assert!(rl.allow("c", T0 + 998));
    assert!(rl.allow("c", T0 + 999));
    let d = rl.check("c", T0 + 999).unwrap();
    assert_eq!((d.allowed, d.retry_after, d.reset_after), (false, Some(Duration::from_millis(1)), Duration::from_millis(1)));
    clock.set_ms(T0 + 1_000);
    assert!(rl.allow("c", T0 + 1_000));
    assert!(rl.allow("c", T0 + 1_000));
    assert!(!rl.allow("c", T0 + 1_000));
}

#[test]
fn sliding_window_carries_the_previous_window_by_its_overlap() {
    let (rl, clock) = limiter(Strategy::SlidingWindow, 10);
    for _ in 0..10 {
        assert!(rl.allow("c", T0 + 900));
    }
    // At 25 % into the next window, 10 × 0.75 = 7.5 still count: 2 more fit.
    clock.set_ms(T0 + 1_250);
    assert!(rl.allow("c", T0 + 1_250));
    assert!(rl.allow("c", T0 + 1_250));
    let d = rl.check("c", T0 + 1_250).unwrap();
    assert!(!d.allowed);
    // The next admission needs the weight to drop to 7·W: at 30 % in.
    assert_eq!(d.retry_after, Some(Duration::from_millis(50)));
    clock.set_ms(T0 + 1_300);
    assert!(rl.allow("c", T0 + 1_300));
}

#[test]
fn late_requests_are_charged_to_the_newest_window() {
    let (rl, clock) = limiter(Strategy::FixedWindow, 2);
    clock.set_ms(T0 + 1_500);
    assert!(rl.allow("c", T0 + 1_500));
    // 600 ms late, from the previous window: charged to the current one.
    assert!(rl.allow("c", T0 + 900));
    assert!(!rl.allow("c", T0 + 1_500));
    assert!(!rl.allow("c", T0 + 100), "a late request cannot reopen an old window");
}

#[test]
fn out_of_order_requests_within_one_window_are_all_counted() {
    let (rl, clock) = limiter(Strategy::FixedWindow, 3);
    clock.set_ms(T0 + 600);
    for ts in [T0 + 500, T0 + 100, T0 + 300] {
        assert!(rl.allow("c", ts));
    }
    assert!(!rl.allow("c", T0 + 200));
}

#[test]
fn raising_and_lowering_the_limit_applies_to_the_next_decision() {
    let (rl, _) = limiter(Strategy::FixedWindow, 2);
    assert!(rl.allow("c", T0));
    assert!(rl.allow("c", T0));
    assert!(!rl.allow("c", T0));
    rl.set_quota(Quota::new(3, Duration::from_secs(1)).unwrap());
    assert_eq!(rl.check("c", T0).unwrap().limit, 3);
    assert!(!rl.allow("c", T0), "three admitted already");
    rl.set_quota(Quota::new(1, Duration::from_secs(1)).unwrap());
    assert_eq!(rl.quota().limit(), 1);
    assert!(rl.allow("other-window-mate", T0), "a key new to the window gets the one request the lowered limit allows");
    assert!(!rl.allow("other-window-mate", T0), "and not a second");
    assert_eq!(rl.check("c", T0).unwrap().remaining, 0);
}

#[test]
fn changing_the_window_carries_counts_over_instead_of_granting_a_fresh_quota() {
    let (rl, clock) = limiter(Strategy::FixedWindow, 5);
    clock.set_ms(T0 + 500);
    for _ in 0..5 {
        assert!(rl.allow("c", T0 + 500));
    }
    rl.set_quota(Quota::new(5, Duration::from_secs(10)).unwrap());
    assert!(!rl.allow("c", T0 + 500), "the five already admitted count in the new window");
    assert_eq!(rl.quota().window(), Duration::from_secs(10));
}

#[test]
fn token_bucket_allows_a_burst_then_the_refill_rate() {
    let (rl, clock) = limiter(Strategy::TokenBucket, 10);
    let burst = (0..20).filter(|_| rl.allow("c", T0)).count();
    assert_eq!(burst, 10);
    // Next window: the bucket starts empty (10 were spent) and refills 1 per 100 ms.
    clock.set_ms(T0 + 1_050);
    assert!(!rl.allow("c", T0 + 1_050));
    clock.set_ms(T0 + 1_100);
    assert!(rl.allow("c", T0 + 1_100));
    assert!(!rl.allow("c", T0 + 1_100));
}

#[test]
fn idle_keys_are_reclaimed_and_memory_follows_active_keys() {
    let (rl, clock) = limiter(Strategy::SlidingWindow, 5);
    for i in 0..1_000 {
        assert!(rl.allow(&format!("c{i}"), T0));
    }
    assert_eq!(rl.active_keys(), 1_000);
    // Within the replay tolerance (5 s) plus two windows, a late request could still
    // reach these windows: nothing is dropped.
    clock.set_ms(T0 + 6_000);
    assert_eq!(rl.sweep(), 0);
    clock.set_ms(T0 + 7_000);
    assert_eq!(rl.sweep(), 1_000);
    assert_eq!(rl.active_keys(), 0);
}

#[test]
fn a_limiter_is_send_sync_and_clones_share_state() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RateLimiter>();
    let (rl, _) = limiter(Strategy::FixedWindow, 1);
    let other = rl.clone();
    assert!(rl.allow("c", T0));
    assert!(!other.allow("c", T0));
}

#[test]
fn per_client_overrides_and_tiers_apply_and_an_invalid_config_changes_nothing() {
    use crdt_rate_limiter::limits::LimitsError;
    use crdt_rate_limiter::LimitsConfig;
    let (rl, _) = limiter(Strategy::FixedWindow, 2);
    let cfg = LimitsConfig::from_toml(
        r#"
[default]
limit = 2
window_ms = 1000
[tiers.gold]
limit = 5
window_ms = 1000
[clients]
"acme" = { tier = "gold" }
"slow" = { limit = 1, window_ms = 10000 }
"#,
    )
    .unwrap();
    rl.apply_limits(cfg.clone()).unwrap();
    assert_eq!((0..10).filter(|_| rl.allow("acme", T0)).count(), 5);
    assert_eq!((0..10).filter(|_| rl.allow("other", T0)).count(), 2);
    assert_eq!((0..10).filter(|_| rl.allow("slow", T0)).count(), 1);
    let d = rl.check("slow", T0).unwrap();
    assert_eq!((d.limit, d.retry_after), (1, Some(Duration::from_secs(10))));
    // A bad update is refused whole; the limits in force stay.
    let mut bad = cfg.clone();
    bad.default.limit = 0;
    assert!(matches!(rl.apply_limits(bad), Err(LimitsError::Quota { .. })));
    assert_eq!(rl.limits().1, Some(cfg));
    assert_eq!(rl.check("acme", T0).unwrap().limit, 5);
}
