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

/// The metric names and types `docs/metrics.md` lists: the first two cells of each table
/// row whose name starts with `crl_`.
fn documented() -> Vec<(String, String)> {
    let doc = include_str!("../docs/metrics.md");
    let rows: Vec<(String, String)> = doc
        .lines()
        .filter_map(|l| {
            let mut cells = l.strip_prefix('|')?.split('|').map(str::trim);
            let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            let kind = cells.next()?;
            name.starts_with("crl_").then(|| (name.to_owned(), kind.to_owned()))
        })
        .collect();
    assert!(rows.len() >= 14, "the table of docs/metrics.md was not found: {rows:?}");
    rows
}

/// Every series `docs/metrics.md` lists is exported by a cluster member, with its type,
/// after traffic through a real two-node cluster on loopback.
#[cfg(feature = "quic")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_member_exports_every_documented_series() {
    use crdt_rate_limiter::metrics::{record_cluster, DECISION_LATENCY, DECISION_LATENCY_BUCKETS};
    use crdt_rate_limiter::transport::{certs, Cluster, ClusterConfig, TlsIdentity};
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(DECISION_LATENCY.into()), DECISION_LATENCY_BUCKETS)
        .unwrap()
        .build_recorder();
    let handle = recorder.handle();
    let (ca, ca_key) = certs::generate_ca().unwrap();
    let identity = |name: &str| {
        let (cert, key) = certs::issue(&ca, &ca_key, name).unwrap();
        TlsIdentity::from_pem(ca.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
    };
    let config = |name: &str, seeds: Vec<std::net::SocketAddr>| {
        let mut c = ClusterConfig { seeds, ..ClusterConfig::new(identity(name), "127.0.0.1:0".parse().unwrap()) };
        c.gossip.anti_entropy_rounds = 2; // pings, hence clock offsets and round trips, come soon
        c
    };
    let limiter = || {
        RateLimiter::builder().quota(Quota::new(100, Duration::from_secs(60)).unwrap()).hash_secret(*b"metrics-test-key").build().unwrap()
    };
    let a = Cluster::start(limiter(), config("node-a", vec![])).await.unwrap();
    let b = Cluster::start(limiter(), config("node-b", vec![a.local_addr()])).await.unwrap();

    // Traffic on both (more than 1024 decisions on this thread, so latency is sampled).
    metrics::with_local_recorder(&recorder, || {
        for i in 0..3_000 {
            a.limiter().allow_now(&format!("client-{}", i % 40));
            b.limiter().allow_now(&format!("client-{}", i % 40));
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !a.peer_stats().iter().any(|p| p.rtt_ms.is_some() && p.clock_offset_ms.is_some()) || a.stats().gossip.entries_merged == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no ping answered: {:?}", a.peer_stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    metrics::with_local_recorder(&recorder, || record_cluster(&a));
    let text = handle.render();

    let mut types = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
        }
    }
    for (name, kind) in documented() {
        assert_eq!(types.get(&name), Some(&kind), "{name} is documented as a {kind}; exported:\n{text}");
        assert!(text.lines().any(|l| !l.starts_with('#') && l.starts_with(name.as_str())), "no sample of {name}:\n{text}");
    }
    // The drop reasons the doc names are each a series.
    for reason in ["decode", "unknown_peer", "spoofed", "limit"] {
        sample(&text, &format!(r#"crl_gossip_dropped_total{{reason="{reason}"}}"#));
    }
    // Two members: no SWIM (it starts beyond 128 peers), but its series are there.
    for direction in ["in", "out", "refused"] {
        assert_eq!(sample(&text, &format!(r#"crl_swim_packets_total{{direction="{direction}"}}"#)), 0.0);
    }
    for reason in ["hash_secret", "certificate", "identity"] {
        assert_eq!(sample(&text, &format!(r#"crl_peers_refused_total{{reason="{reason}"}}"#)), 0.0);
    }
    assert_eq!(sample(&text, "crl_peers_refused"), 0.0);
    assert_eq!(sample(&text, r#"crl_peers{state="up"}"#), 1.0);
    assert!(sample(&text, r#"crl_gossip_messages_total{direction="in"}"#) > 0.0);
    let decided = sample(&text, r#"crl_decisions_total{outcome="allowed"}"#) + sample(&text, r#"crl_decisions_total{outcome="denied"}"#);
    assert_eq!(decided, 3_000.0, "every decision of node a is counted");
    assert!(sample(&text, "crl_decision_latency_seconds_count") >= 2.0);
    b.shutdown().await;
    a.shutdown().await;
    a.shutdown().await; // idempotent
}
