//! What a member with a valid certificate can make a node's store hold, through the real
//! gossip core (sans-IO): keys it fabricates live in a budget of their own, so local
//! clients keep their key cap, and memory stays within the documented bound.

use std::time::Duration;

use crdt_rate_limiter::counter::ReplicaId;
use crdt_rate_limiter::{Admission, Clock, Error, GossipConfig, GossipNode, ManualClock, Quota, RateLimiter, Strategy};

const T0: i64 = 1_700_000_000_000;
const SECRET: [u8; 16] = *b"peer-input-test!";

fn limiter(clock: &ManualClock, max_keys: usize) -> RateLimiter {
    RateLimiter::builder()
        .quota(Quota::new(100, Duration::from_secs(60)).unwrap())
        .strategy(Strategy::FixedWindow)
        .admission(Admission::Optimistic)
        .clock(clock.clone())
        .hash_secret(SECRET)
        .max_keys(max_keys)
        .build()
        .unwrap()
}

fn node(limiter: RateLimiter, id: u64, peer: u64) -> GossipNode {
    let mut cfg = GossipConfig::new(ReplicaId { node: id, incarnation: 1 });
    cfg.max_message_bytes = 65_000;
    GossipNode::new(limiter, cfg, [peer], id, T0).unwrap()
}

/// Runs a round on both nodes and carries messages both ways until none are left.
fn exchange(a: &mut GossipNode, b: &mut GossipNode, clock: &ManualClock) {
    clock.advance_ms(20);
    let now = clock.now_ms();
    a.handle_timeout(now);
    b.handle_timeout(now);
    loop {
        let mut moved = false;
        while let Some(t) = a.poll_transmit() {
            let _ = b.handle_message(a.replica().node, &t.bytes, now);
            moved = true;
        }
        while let Some(t) = b.poll_transmit() {
            let _ = a.handle_message(b.replica().node, &t.bytes, now);
            moved = true;
        }
        if !moved {
            break;
        }
    }
}

fn admitted(rl: &RateLimiter, id: &str, offered: usize) -> usize {
    (0..offered).filter(|_| rl.allow(id, rl.now_ms())).count()
}

/// A member counts 5,000 fabricated clients against a node whose key cap is 1,000. The
/// node keeps at most 1,000 of them (in the budget of keys known only from peers) and
/// still admits 1,000 new local clients; the 1,001st local client meets the cap.
#[test]
fn a_member_flooding_fabricated_keys_leaves_every_local_client_room() {
    let clock = ManualClock::new(T0);
    let mut victim = node(limiter(&clock, 1_000), 1, 2);
    let flooder = limiter(&clock, 10_000);
    for i in 0..5_000 {
        assert!(flooder.allow(&format!("fabricated-{i}"), T0));
    }
    let mut member = node(flooder, 2, 1);
    // The member's full sync of 5,000 counts takes two rounds (4,096 counts a round).
    for _ in 0..3 {
        exchange(&mut victim, &mut member, &clock);
    }
    let rl = victim.limiter().clone();
    assert_eq!(rl.active_keys(), 1_000, "the peer-only budget is full");
    // Each count past the budget is dropped (a full sync may carry it more than once).
    assert!(victim.stats().dropped_at_capacity >= 4_000);

    let local = (0..1_000).filter(|i| rl.allow(&format!("local-{i}"), rl.now_ms())).count();
    assert_eq!(local, 1_000, "every new local client is admitted");
    assert_eq!(rl.active_keys(), 2_000);
    assert!(matches!(rl.check_now("local-1000"), Err(Error::KeyCapacity { max: 1_000 })), "local clients keep their own cap");
    // The flood goes on: keys it already placed merge, new ones are refused, and the
    // local clients keep their room.
    for i in 5_000..6_000 {
        assert!(member.limiter().allow(&format!("fabricated-{i}"), clock.now_ms()));
    }
    exchange(&mut victim, &mut member, &clock);
    assert_eq!(rl.active_keys(), 2_000);
    assert_eq!(admitted(&rl, "local-7", 200), 99, "a local client keeps its own count");
}

/// Counts for a key this node already tracks need no room: with the peer-only budget
/// full, a member's counts for a local client still reach the local view.
#[test]
fn counts_for_local_clients_merge_while_the_peer_only_budget_is_full() {
    let clock = ManualClock::new(T0);
    let mut victim = node(limiter(&clock, 100), 1, 2);
    let other = limiter(&clock, 10_000);
    for i in 0..500 {
        assert!(other.allow(&format!("fabricated-{i}"), T0));
    }
    let mut member = node(other, 2, 1);
    exchange(&mut victim, &mut member, &clock);
    let rl = victim.limiter().clone();
    assert_eq!(admitted(&rl, "shared", 1), 1);
    assert_eq!(admitted(member.limiter(), "shared", 90), 90);
    exchange(&mut victim, &mut member, &clock);
    assert_eq!(admitted(&rl, "shared", 100), 100 - 90 - 1);
}
