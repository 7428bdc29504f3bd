//! Every invalid input is a typed error from `check` and `false` from `allow`; nothing panics.

use std::time::Duration;

use crdt_rate_limiter::{ConfigError, Error, ManualClock, Quota, RateLimiter, Strategy};

const NOW: i64 = 1_700_000_000_000;

fn limiter(clock: &ManualClock) -> RateLimiter {
    RateLimiter::builder().quota(Quota::new(3, Duration::from_secs(1)).unwrap()).clock(clock.clone()).build().unwrap()
}

#[test]
fn empty_client_id_is_refused() {
    let rl = limiter(&ManualClock::new(NOW));
    assert_eq!(rl.check("", NOW), Err(Error::EmptyKey));
    assert!(!rl.allow("", NOW));
    assert!(!rl.allow_with("", 5, Duration::from_secs(1)));
    assert_eq!(rl.active_keys(), 0);
}

#[test]
fn client_id_over_the_maximum_length_is_refused_and_the_maximum_is_configurable() {
    let clock = ManualClock::new(NOW);
    let rl = limiter(&clock);
    let at_max = "x".repeat(256);
    let over = "x".repeat(257);
    assert!(rl.allow(&at_max, NOW));
    assert_eq!(rl.check(&over, NOW), Err(Error::KeyTooLong { len: 257, max: 256 }));
    assert!(!rl.allow(&over, NOW));
    let small = RateLimiter::builder().quota(rl.quota()).clock(clock).max_key_len(4).build().unwrap();
    assert!(small.allow("abcd", NOW));
    assert_eq!(small.check("abcde", NOW), Err(Error::KeyTooLong { len: 5, max: 4 }));
}

#[test]
fn timestamps_past_the_replay_tolerance_are_refused() {
    let clock = ManualClock::new(NOW);
    let rl = limiter(&clock);
    assert!(rl.allow("c", NOW - 5_000), "exactly at the default 5 s tolerance");
    assert_eq!(rl.check("c", NOW - 5_001), Err(Error::TimestampTooOld { timestamp_ms: NOW - 5_001, now_ms: NOW, max_age_ms: 5_000 }));
    assert!(!rl.allow("c", i64::MIN));
    let strict = RateLimiter::builder().quota(rl.quota()).clock(clock).max_timestamp_age(Duration::from_millis(10)).build().unwrap();
    assert!(strict.allow("c", NOW - 10));
    assert!(matches!(strict.check("c", NOW - 11), Err(Error::TimestampTooOld { .. })));
}

#[test]
fn timestamps_past_the_clock_skew_tolerance_are_refused() {
    let clock = ManualClock::new(NOW);
    let rl = limiter(&clock);
    assert!(rl.allow("c", NOW + 2_000), "exactly at the default 2 s tolerance");
    assert_eq!(rl.check("c", NOW + 2_001), Err(Error::TimestampInFuture { timestamp_ms: NOW + 2_001, now_ms: NOW, max_skew_ms: 2_000 }));
    assert!(!rl.allow("c", i64::MAX));
    // The tolerance follows the limiter's clock, not the first timestamp seen.
    clock.advance_ms(10_000);
    assert!(rl.allow("c", NOW + 10_000));
}

#[test]
fn zero_limit_and_zero_window_are_refused() {
    assert_eq!(RateLimiter::new(0, Duration::from_secs(1)).unwrap_err(), ConfigError::ZeroLimit);
    assert_eq!(RateLimiter::new(1, Duration::ZERO).unwrap_err(), ConfigError::ZeroWindow);
    assert_eq!(RateLimiter::new(1, Duration::from_micros(999)).unwrap_err(), ConfigError::ZeroWindow);
    assert!(matches!(RateLimiter::new(1, Duration::from_micros(1500)), Err(ConfigError::InvalidWindow { .. })));
    assert!(matches!(RateLimiter::new(1, Duration::from_secs(60 * 86_400)), Err(ConfigError::InvalidWindow { .. })));
    assert!(matches!(RateLimiter::new(1 << 33, Duration::from_secs(1)), Err(ConfigError::LimitTooLarge { .. })));
    let rl = limiter(&ManualClock::new(NOW));
    assert!(!rl.allow_with("c", 0, Duration::from_secs(1)));
    assert_eq!(rl.check_with("c", 1, Duration::ZERO), Err(Error::InvalidQuota(ConfigError::ZeroWindow)));
    assert!(matches!(Quota::new(5, Duration::from_secs(1)).unwrap().with_burst(6), Err(ConfigError::Invalid { field: "burst", .. })));
}

#[test]
fn builder_settings_out_of_range_are_refused() {
    let q = Quota::new(1, Duration::from_secs(1)).unwrap();
    assert_eq!(RateLimiter::builder().build().unwrap_err(), ConfigError::MissingQuota);
    for (b, field) in [
        (RateLimiter::builder().quota(q).max_key_len(0), "max_key_len"),
        (RateLimiter::builder().quota(q).max_key_len(70_000), "max_key_len"),
        (RateLimiter::builder().quota(q).max_keys(0), "max_keys"),
        (RateLimiter::builder().quota(q).shards(3), "shards"),
        (RateLimiter::builder().quota(q).max_timestamp_age(Duration::from_secs(2 * 86_400)), "max_timestamp_age"),
        (RateLimiter::builder().quota(q).max_clock_skew(Duration::from_secs(2 * 86_400)), "max_clock_skew"),
    ] {
        match b.build() {
            Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected Invalid, got {other:?}"),
        }
    }
}

#[test]
fn key_capacity_refuses_new_keys_but_keeps_limiting_existing_ones() {
    let clock = ManualClock::new(NOW);
    let rl = RateLimiter::builder()
        .quota(Quota::new(2, Duration::from_secs(1)).unwrap())
        .strategy(Strategy::FixedWindow)
        .clock(clock.clone())
        .max_keys(4)
        .shards(2)
        .build()
        .unwrap();
    for c in ["a", "b", "c", "d"] {
        assert!(rl.allow(c, NOW));
    }
    // A flood of new keys: every one refused, memory stays at the cap.
    for i in 0..1_000 {
        assert_eq!(rl.check(&format!("new-{i}"), NOW), Err(Error::KeyCapacity { max: 4 }));
    }
    assert_eq!(rl.active_keys(), 4);
    // Existing keys are still limited exactly.
    assert!(rl.allow("a", NOW));
    assert!(!rl.allow("a", NOW));
    // Once their windows can no longer be reached (window + replay tolerance), the old
    // keys are reclaimed and new keys fit again.
    clock.advance_ms(2_000 + 5_000);
    assert!(rl.allow("fresh", NOW + 7_000));
    assert!(rl.active_keys() <= 4);
}

#[test]
fn allow_with_keeps_separate_counters_per_window_length_up_to_a_cap() {
    let rl = limiter(&ManualClock::new(NOW));
    assert!(rl.allow_with("c", 1, Duration::from_secs(1)));
    assert!(!rl.allow_with("c", 1, Duration::from_secs(1)));
    assert!(rl.allow_with("c", 2, Duration::from_secs(1)), "a higher limit applies to the same counter");
    assert!(!rl.allow_with("c", 2, Duration::from_secs(1)));
    // The limiter's own window length shares the main counters: 2 + 1 = its limit of 3.
    assert!(rl.allow("c", NOW));
    assert!(!rl.allow("c", NOW));
    assert!(rl.allow_with("c", 1, Duration::from_secs(2)), "another window length is another counter");
    for w in 3..=crdt_rate_limiter::limits::MAX_AD_HOC_WINDOWS as u64 + 1 {
        assert!(rl.allow_with("c", 1, Duration::from_secs(w)));
    }
    assert_eq!(
        rl.check_with("c", 1, Duration::from_secs(1_000)),
        Err(Error::TooManyWindows { max: crdt_rate_limiter::limits::MAX_AD_HOC_WINDOWS })
    );
}

#[test]
fn errors_read_as_sentences() {
    let msg = Error::KeyTooLong { len: 300, max: 256 }.to_string();
    assert_eq!(msg, "client id is 300 bytes long; the maximum is 256 bytes");
    let msg = Error::TimestampTooOld { timestamp_ms: 0, now_ms: 10_000, max_age_ms: 5_000 }.to_string();
    assert!(msg.contains("10000 ms older"), "{msg}");
}
