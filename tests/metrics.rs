//! What the `metrics` feature publishes, rendered as Prometheus text, matches the
//! decisions made.
#![cfg(feature = "metrics")]

use std::time::Duration;

use crdt_rate_limiter::{ManualClock, Quota, RateLimiter, Strategy};

/// Value of the sample `name{labels}` in Prometheus text; panics if absent or unparsable.
fn sample(text: &str, series: &str) -> f64 {
    let line = text.lines().find(|l| !l.starts_with('#') && l.rsplit_once(' ').is_some_and(|(s, _)| s == series));
    let line = line.unwrap_or_else(|| panic!("no series {series} in:\n{text}"));
    line.rsplit_once(' ').unwrap().1.parse().unwrap()
}

#[test]
fn published_counters_match_the_decisions_made_and_parse_as_prometheus_text() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let clock = ManualClock::new(1_700_000_000_000);
    let rl = RateLimiter::builder()
        .quota(Quota::new(10, Duration::from_secs(1)).unwrap())
        .strategy(Strategy::FixedWindow)
        .clock(clock.clone())
        .build()
        .unwrap();
    let now = clock_now(&clock);
    let mut allowed = 0;
    for i in 0..3_000 {
        allowed += u64::from(rl.allow(&format!("client-{}", i % 50), now));
    }
    metrics::with_local_recorder(&recorder, || crdt_rate_limiter::metrics::record_limiter(&rl));
    let text = handle.render();
    // Every non-comment line is `series value`, with a numeric value.
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        assert!(series.starts_with("crl_"), "{line}");
        value.parse::<f64>().unwrap_or_else(|_| panic!("not a number: {line}"));
    }
    assert_eq!(allowed, 500);
    assert_eq!(sample(&text, r#"crl_decisions_total{outcome="allowed"}"#), 500.0);
    assert_eq!(sample(&text, r#"crl_decisions_total{outcome="denied"}"#), 2_500.0);
    // The 9th and 10th admissions of each of the 50 clients are at 90 % of the limit.
    assert_eq!(sample(&text, "crl_decisions_near_limit_total"), 100.0);
    assert_eq!(sample(&text, "crl_active_keys"), 50.0);
    assert!(sample(&text, "crl_memory_bytes") > 0.0);
}

fn clock_now(clock: &ManualClock) -> i64 {
    crdt_rate_limiter::Clock::now_ms(clock)
}
