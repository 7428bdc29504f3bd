//! `GossipNode::handle_message` on arbitrary messages from two peers, with rounds run in
//! between and everything it sends drained: never a panic, and the outbox never holds
//! more than `MAX_OUTBOX` messages.
#![no_main]

use std::time::Duration;

use crdt_rate_limiter::counter::ReplicaId;
use crdt_rate_limiter::gossip::MAX_OUTBOX;
use crdt_rate_limiter::{GossipConfig, GossipNode, ManualClock, Quota, RateLimiter, Strategy};
use libfuzzer_sys::fuzz_target;

const T0: i64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let limiter = RateLimiter::builder()
        .quota(Quota::new(10, Duration::from_secs(1)).unwrap())
        .strategy(Strategy::SlidingWindow)
        .clock(ManualClock::new(T0))
        .shards(1)
        .hash_secret([7; 16])
        .build()
        .unwrap();
    let cfg = GossipConfig::new(ReplicaId { node: 1, incarnation: 1 });
    let mut node = GossipNode::new(limiter, cfg, [2, 3], 1, T0).unwrap();
    let _ = node.limiter().allow("local", T0);
    // Messages: a header byte (peer, time step), a u16 length, the bytes.
    let mut rest = data;
    let mut now = T0;
    while rest.len() >= 3 {
        let head = rest[0];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let (msg, tail) = rest[3..].split_at(len);
        rest = tail;
        let peer = 2 + u64::from(head & 1);
        now += i64::from(head >> 1) * 7;
        let _ = node.handle_message(peer, msg, now);
        node.handle_timeout(now);
        let mut n = 0;
        while let Some(t) = node.poll_transmit() {
            n += 1;
            assert!(t.to == 2 || t.to == 3);
        }
        assert!(n <= MAX_OUTBOX);
    }
});
