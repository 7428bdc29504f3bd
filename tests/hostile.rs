//! What a member with a valid certificate, or an operator's large configuration, can make
//! a node do, on real QUIC sockets (127.0.0.1, port 0). The sans-IO hostile-member tests
//! are in `tests/gossip.rs`; each bound is listed in `docs/security.md`.
#![cfg(feature = "quic")]

mod common;
use common::Ca;

use std::time::Duration;

use crdt_rate_limiter::limits::ClientOverride;
use crdt_rate_limiter::transport::{Cluster, ClusterConfig, TlsIdentity};
use crdt_rate_limiter::{LimitsConfig, Quota, RateLimiter, Strategy};

const SECRET: [u8; 16] = *b"hostile-test-key";

fn limiter() -> RateLimiter {
    RateLimiter::builder()
        .quota(Quota::new(100, Duration::from_secs(1)).unwrap())
        .strategy(Strategy::FixedWindow)
        .hash_secret(SECRET)
        .build()
        .unwrap()
}

fn config(id: TlsIdentity, seeds: &[&Cluster]) -> ClusterConfig {
    ClusterConfig {
        seeds: seeds.iter().map(|c| c.local_addr()).collect(),
        handshake_timeout: Duration::from_secs(2),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(400),
        join_timeout: Duration::from_secs(2),
        ..ClusterConfig::new(id, "127.0.0.1:0".parse().unwrap())
    }
}

async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A limits file far larger than one datagram (4,000 overrides, about 150 KB encoded)
/// applied on one node is in force on all three, and no connection is reset for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limits_file_of_4000_overrides_reaches_every_member() {
    tokio::time::timeout(Duration::from_secs(40), async {
        let ca = Ca::new();
        let a = Cluster::start(limiter(), config(ca.identity("node-a"), &[])).await.unwrap();
        let b = Cluster::start(limiter(), config(ca.identity("node-b"), &[&a])).await.unwrap();
        let c = Cluster::start(limiter(), config(ca.identity("node-c"), &[&a, &b])).await.unwrap();
        eventually("a full mesh", Duration::from_secs(10), || [&a, &b, &c].iter().all(|n| n.live_peers().len() == 2)).await;
        let mut cfg = LimitsConfig::new(Quota::new(100, Duration::from_secs(1)).unwrap());
        for i in 0..4_000u64 {
            let o = ClientOverride { tier: None, limit: Some(5 + i % 7), window_ms: Some(60_000), burst: None };
            cfg.clients.insert(format!("tenant-{i:08}.example.org"), o);
        }
        let version = a.limiter().apply_limits(cfg.clone()).unwrap();
        eventually("every node to put the 4,000 overrides in force", Duration::from_secs(10), || {
            [&a, &b, &c].iter().all(|n| n.limiter().limits().0 == version)
        })
        .await;
        for n in [&a, &b, &c] {
            assert_eq!(n.limiter().limits().1.as_ref(), Some(&cfg));
            let q = n.limiter().check("tenant-00000003.example.org", n.limiter().now_ms()).unwrap();
            assert_eq!(q.limit, 8, "the override is in force");
            assert_eq!(n.stats().protocol_errors, 0, "no frame was refused");
        }
        for n in [a, b, c] {
            n.shutdown().await;
        }
    })
    .await
    .expect("test timed out");
}

/// The largest legal limits configuration (1,024 tiers with 64-byte names, 10,000
/// overrides with quotas of their own, every name byte used) replicates too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limits_file_of_the_largest_legal_size_reaches_the_other_member() {
    use crdt_rate_limiter::limits::{QuotaSpec, MAX_NAME_BYTES, MAX_OVERRIDES, MAX_TIERS};
    tokio::time::timeout(Duration::from_secs(40), async {
        let ca = Ca::new();
        let a = Cluster::start(limiter(), config(ca.identity("node-a"), &[])).await.unwrap();
        let b = Cluster::start(limiter(), config(ca.identity("node-b"), &[&a])).await.unwrap();
        eventually("a and b connect", Duration::from_secs(10), || a.live_peers().len() == 1 && b.live_peers().len() == 1).await;
        let max = u64::from(u32::MAX);
        let spec = QuotaSpec { limit: max, window_ms: 60_000, burst: Some(max) };
        let mut cfg = LimitsConfig::new(Quota::new(100, Duration::from_secs(1)).unwrap());
        for t in 0..MAX_TIERS {
            cfg.tiers.insert(format!("{t:064}"), spec.clone());
        }
        let name_len = (MAX_NAME_BYTES - MAX_TIERS * 64) / MAX_OVERRIDES;
        for c in 0..MAX_OVERRIDES {
            let o = ClientOverride { tier: None, limit: Some(max), window_ms: Some(60_000), burst: Some(max) };
            cfg.clients.insert(format!("{c:0name_len$}"), o);
        }
        let version = a.limiter().apply_limits(cfg.clone()).expect("the largest legal configuration is valid");
        eventually("b to put the largest configuration in force", Duration::from_secs(15), || b.limiter().limits().0 == version).await;
        assert_eq!(b.limiter().limits().1.as_ref(), Some(&cfg));
        assert_eq!((a.stats().protocol_errors, b.stats().protocol_errors), (0, 0));
        a.shutdown().await;
        b.shutdown().await;
    })
    .await
    .expect("test timed out");
}
