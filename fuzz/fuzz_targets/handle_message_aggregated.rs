//! `GossipNode::handle_message` beyond 16 peers, where the core aggregates and runs SWIM:
//! arbitrary messages from 20 peers, with rounds run in between and everything it sends
//! drained: never a panic, and the outbox never holds more than `MAX_OUTBOX` messages.
//! The first byte picks the aggregator pool: 4 members (most members send their counts
//! to others and hear totals) or 32 (every member aggregates).
#![no_main]

use std::time::Duration;

use crdt_rate_limiter::counter::ReplicaId;
use crdt_rate_limiter::gossip::MAX_OUTBOX;
use crdt_rate_limiter::{GossipConfig, GossipNode, ManualClock, Quota, RateLimiter, Strategy};
use libfuzzer_sys::fuzz_target;

const T0: i64 = 1_700_000_000_000;
const PEERS: u64 = 20;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let limiter = RateLimiter::builder()
        .quota(Quota::new(10, Duration::from_secs(1)).unwrap())
        .strategy(Strategy::SlidingWindow)
        .clock(ManualClock::new(T0))
        .shards(4)
        .hash_secret([7; 16])
        .build()
        .unwrap();
    let mut cfg = GossipConfig::new(ReplicaId { node: 1, incarnation: 1 });
    cfg.swim_above_peers = 16;
    cfg.aggregator_pool = if mode & 1 == 0 { 4 } else { 32 };
    let mut node = GossipNode::new(limiter, cfg, 2..2 + PEERS, 1, T0).unwrap();
    for i in 0..8 {
        let _ = node.limiter().allow(&format!("client-{i}"), T0);
    }
    // Messages: a peer byte, a time step byte, a u16 length, the bytes.
    let mut now = T0;
    while rest.len() >= 4 {
        let peer = 2 + u64::from(rest[0]) % PEERS;
        now += i64::from(rest[1]) * 3;
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]])).min(rest.len() - 4);
        let (msg, tail) = rest[4..].split_at(len);
        rest = tail;
        let _ = node.handle_message(peer, msg, now);
        node.handle_timeout(now);
        let mut n = 0;
        while let Some(t) = node.poll_transmit() {
            n += 1;
            assert!((2..2 + PEERS).contains(&t.to), "a message to {}", t.to);
        }
        assert!(n <= MAX_OUTBOX);
        while node.poll_event().is_some() {}
    }
});
