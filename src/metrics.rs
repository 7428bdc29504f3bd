//! Exports through the [`metrics`](https://docs.rs/metrics) facade (cargo feature
//! `metrics`); the application installs the exporter it likes (the `node` example uses
//! Prometheus).
//!
//! The request path touches no shared counter: decisions are tallied inside each store
//! shard under the lock it already holds, and [`record_limiter`] publishes the totals
//! (call it on a timer or on scrape). Decision latency is sampled, one call in 1024 per
//! thread. Names and labels are listed in `docs/metrics.md`.
//!
//! [`DECISION_LATENCY`] is a histogram: an exporter that renders histograms as summaries
//! unless told buckets (metrics-exporter-prometheus) needs [`DECISION_LATENCY_BUCKETS`]:
//!
//! ```
//! use crdt_rate_limiter::metrics::{DECISION_LATENCY, DECISION_LATENCY_BUCKETS};
//! use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
//! let recorder = PrometheusBuilder::new()
//!     .set_buckets_for_metric(Matcher::Full(DECISION_LATENCY.into()), DECISION_LATENCY_BUCKETS)?
//!     .build_recorder();
//! # Ok::<(), metrics_exporter_prometheus::BuildError>(())
//! ```

use metrics::{counter, gauge, histogram};

use crate::gossip::{GossipNode, GossipStats, PeerStats};
use crate::RateLimiter;

/// Decisions, by `outcome`: `allowed` or `denied`. Counter.
pub const DECISIONS: &str = "crl_decisions_total";
/// Admissions with the client at 90 % of its limit or more. Counter.
pub const NEAR_LIMIT: &str = "crl_decisions_near_limit_total";
/// Time to decide, sampled one call in 1024 per thread. Histogram, seconds.
pub const DECISION_LATENCY: &str = "crl_decision_latency_seconds";
/// Bucket bounds for [`DECISION_LATENCY`], in seconds: 100 ns to 1 ms (a decision takes
/// tens to hundreds of nanoseconds; the upper buckets catch contention and preemption).
pub const DECISION_LATENCY_BUCKETS: &[f64] = &[1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 1e-4, 1e-3];
/// Keys tracked. Gauge.
pub const ACTIVE_KEYS: &str = "crl_active_keys";
/// Estimated bytes held by the counters. Gauge.
pub const MEMORY: &str = "crl_memory_bytes";
/// Gossip messages, by `direction`: `in` or `out`. Counter.
pub const GOSSIP_MESSAGES: &str = "crl_gossip_messages_total";
/// Gossip bytes, by `direction`. Counter.
pub const GOSSIP_BYTES: &str = "crl_gossip_bytes_total";
/// Gossip messages dropped, by `reason`: `decode`, `unknown_peer`, `spoofed`, `limit`. Counter.
pub const GOSSIP_DROPPED: &str = "crl_gossip_dropped_total";
/// SWIM packets (membership beyond `swim_above_peers` peers), by `direction`: `in`,
/// `out`, or `refused` (received and refused). Counter.
pub const SWIM_PACKETS: &str = "crl_swim_packets_total";
/// Peers, by `state`: `up` or `down`. Gauge.
pub const PEERS: &str = "crl_peers";
/// Estimated staleness of this node's view of the cluster. Gauge, seconds.
pub const VIEW_LAG: &str = "crl_view_lag_seconds";
/// A peer's clock minus ours, by `peer`. Gauge, seconds.
pub const PEER_CLOCK_OFFSET: &str = "crl_peer_clock_offset_seconds";
/// A peer's clock minus cluster time (its offset from the cluster), by `peer`. Gauge,
/// seconds.
pub const PEER_CLOCK_FROM_CLUSTER: &str = "crl_peer_clock_from_cluster_seconds";
/// Cluster time minus this node's clock: the offset its limiter adds before cutting
/// windows. Gauge, seconds.
pub const CLUSTER_CLOCK_OFFSET: &str = "crl_cluster_clock_offset_seconds";
/// 1 for a clock further from cluster time than the clock-skew tolerance, else 0, by
/// `node`: `self` or a peer's id. Gauge.
pub const CLOCK_BEYOND_TOLERANCE: &str = "crl_clock_beyond_tolerance";
/// Steps back of the limiter's time larger than the clock-skew tolerance. Counter.
pub const CLOCK_STEPS_BACK: &str = "crl_clock_steps_back_total";
/// Round trip to a peer, by `peer`. Gauge, seconds.
pub const PEER_RTT: &str = "crl_peer_rtt_seconds";
/// Connections refused, by `reason`: `hash_secret`, `certificate`, `identity`. Counter.
pub const PEERS_REFUSED: &str = "crl_peers_refused_total";
/// Peers refused now and not working since (a health check fails while it is not 0). Gauge.
pub const PEERS_REFUSED_NOW: &str = "crl_peers_refused";

/// Publishes the limiter's decision totals, keys, memory, cluster offset and clock steps.
pub fn record_limiter(limiter: &RateLimiter) {
    let s = limiter.stats();
    counter!(DECISIONS, "outcome" => "allowed").absolute(s.allowed);
    counter!(DECISIONS, "outcome" => "denied").absolute(s.denied);
    counter!(NEAR_LIMIT).absolute(s.near_limit);
    gauge!(ACTIVE_KEYS).set(s.active_keys as f64);
    gauge!(MEMORY).set(s.memory_bytes as f64);
    gauge!(CLUSTER_CLOCK_OFFSET).set(s.cluster_offset_ms as f64 / 1000.0);
    gauge!(CLOCK_BEYOND_TOLERANCE, "node" => "self").set(if s.clock_beyond_tolerance { 1.0 } else { 0.0 });
    counter!(CLOCK_STEPS_BACK).absolute(s.clock_steps_back);
}

/// Publishes a gossip node's traffic, drops, peers, lag and clock estimates (for a
/// node driven by hand; a [`Cluster`](crate::Cluster) member uses [`record_cluster`]).
pub fn record_gossip(node: &GossipNode, now_ms: i64) {
    record_core(node.stats(), &node.peer_stats(), node.view_lag_ms(now_ms));
}

/// Publishes everything a cluster member exports: its limiter ([`record_limiter`]), the
/// gossip series of [`record_gossip`], and the refused peers. Call it on a timer or on
/// each scrape.
#[cfg(feature = "quic")]
pub fn record_cluster(cluster: &crate::Cluster) {
    record_limiter(cluster.limiter());
    let stats = cluster.stats();
    record_core(&stats.gossip, &cluster.peer_stats(), stats.view_lag_ms);
    for (reason, n) in [
        (crate::transport::RefusalReason::HashSecret, stats.refused_hash_secret),
        (crate::transport::RefusalReason::Certificate, stats.refused_certificate),
        (crate::transport::RefusalReason::Identity, stats.refused_identity),
    ] {
        counter!(PEERS_REFUSED, "reason" => reason.label()).absolute(n);
    }
    gauge!(PEERS_REFUSED_NOW).set(cluster.refusals().len() as f64);
}

fn record_core(s: &GossipStats, peers: &[PeerStats], view_lag_ms: i64) {
    counter!(GOSSIP_MESSAGES, "direction" => "out").absolute(s.messages_sent);
    counter!(GOSSIP_MESSAGES, "direction" => "in").absolute(s.messages_received);
    counter!(GOSSIP_BYTES, "direction" => "out").absolute(s.bytes_sent);
    counter!(GOSSIP_BYTES, "direction" => "in").absolute(s.bytes_received);
    counter!(GOSSIP_DROPPED, "reason" => "decode").absolute(s.decode_errors);
    counter!(GOSSIP_DROPPED, "reason" => "unknown_peer").absolute(s.unknown_peers);
    counter!(GOSSIP_DROPPED, "reason" => "spoofed").absolute(s.spoofed);
    counter!(GOSSIP_DROPPED, "reason" => "limit").absolute(s.refused);
    counter!(SWIM_PACKETS, "direction" => "out").absolute(s.swim_sent);
    counter!(SWIM_PACKETS, "direction" => "in").absolute(s.swim_received);
    counter!(SWIM_PACKETS, "direction" => "refused").absolute(s.swim_refused);
    let up = peers.iter().filter(|p| p.up).count();
    gauge!(PEERS, "state" => "up").set(up as f64);
    gauge!(PEERS, "state" => "down").set((peers.len() - up) as f64);
    gauge!(VIEW_LAG).set(view_lag_ms as f64 / 1000.0);
    for p in peers {
        let peer = p.peer.to_string();
        if let Some(o) = p.clock_offset_ms {
            gauge!(PEER_CLOCK_OFFSET, "peer" => peer.clone()).set(o as f64 / 1000.0);
        }
        if let Some(o) = p.offset_from_cluster_ms {
            gauge!(PEER_CLOCK_FROM_CLUSTER, "peer" => peer.clone()).set(o as f64 / 1000.0);
        }
        gauge!(CLOCK_BEYOND_TOLERANCE, "node" => peer.clone()).set(if p.beyond_tolerance { 1.0 } else { 0.0 });
        if let Some(r) = p.rtt_ms {
            gauge!(PEER_RTT, "peer" => peer).set(r as f64 / 1000.0);
        }
    }
}

thread_local! {
    static CALLS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Runs `f`, timing one call in 1024 per thread into [`DECISION_LATENCY`].
#[inline]
pub(crate) fn sampled<T>(f: impl FnOnce() -> T) -> T {
    let n = CALLS.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        n
    });
    if n & 1023 != 0 {
        return f();
    }
    let start = std::time::Instant::now();
    let out = f();
    histogram!(DECISION_LATENCY).record(start.elapsed().as_secs_f64());
    out
}
