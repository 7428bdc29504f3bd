//! A member with a valid certificate that sends what it likes, sans-IO: the gossip core
//! alone, on virtual time. Each test holds one bound of `docs/security.md`.
#![cfg(all(feature = "testing", feature = "quic"))]

use std::time::Duration;

use crdt_rate_limiter::counter::ReplicaId;
use crdt_rate_limiter::gossip::{
    Event, Refusal, MAX_ANSWERS_PER_PERIOD, MAX_INCARNATIONS_PER_PEER, MAX_OUTBOX, MAX_PUBLISHED_PER_PEER_ROUND, MAX_RELAYED_PER_PEER,
    MAX_REPAIR_ENTRIES_PER_ROUND, MAX_RESEND_ENTRIES,
};
use crdt_rate_limiter::swim::MAX_UNKNOWN_MEMBERS;
use crdt_rate_limiter::testing::{self, CountsBatch};
use crdt_rate_limiter::{GossipConfig, GossipNode, ManualClock, Quota, RateLimiter, Strategy};

const T0: i64 = 1_700_000_000_000;
const W0: i64 = T0 / 1000;

fn node(id: u64, peers: &[u64], limit: u64) -> GossipNode {
    node_with_clock(id, peers, limit, ManualClock::new(T0))
}

fn node_with_clock(id: u64, peers: &[u64], limit: u64, clock: ManualClock) -> GossipNode {
    let limiter = RateLimiter::builder()
        .quota(Quota::new(limit, Duration::from_secs(1)).unwrap())
        .strategy(Strategy::FixedWindow)
        .clock(clock)
        .shards(64)
        .hash_secret([7; 16])
        .build()
        .unwrap();
    GossipNode::new(limiter, GossipConfig::new(ReplicaId { node: id, incarnation: 1 }), peers.iter().copied(), id, T0).unwrap()
}

fn replica(node: u64, incarnation: u64) -> ReplicaId {
    ReplicaId { node, incarnation }
}

/// Everything queued: (messages, bytes).
fn drain(n: &mut GossipNode) -> (usize, usize) {
    let mut out = (0, 0);
    while let Some(t) = n.poll_transmit() {
        out.0 += 1;
        out.1 += t.bytes.len();
    }
    out
}

#[test]
fn a_member_cannot_fill_the_replica_table_and_an_honest_restart_still_counts() {
    let mut n = node(1, &[2, 3], 100);
    let key = n.limiter().key_hash("c");
    // Member 2 relays counts for 65,536 made-up replicas, 16 messages of 4,096 batches,
    // and makes up 100 incarnations of its own.
    for m in 0..16u64 {
        let batches: Vec<CountsBatch> = (0..4096u64)
            .map(|i| CountsBatch { replica: replica(1_000 + m * 4096 + i, 1), window_ms: 1000, window: W0, entries: vec![(key, 1)] })
            .collect();
        n.handle_message(2, &testing::counts(replica(2, 1), &batches).unwrap(), T0).unwrap();
    }
    for inc in 1..=100 {
        let b = CountsBatch { replica: replica(2, inc), window_ms: 1000, window: W0, entries: vec![(key, 0)] };
        n.handle_message(2, &testing::counts(replica(2, inc), &[b]).unwrap(), T0).unwrap();
    }
    assert!(n.replica_count() <= MAX_RELAYED_PER_PEER + MAX_INCARNATIONS_PER_PEER, "{}", n.replica_count());
    assert!(n.stats().replicas_refused >= 65_536 - MAX_RELAYED_PER_PEER as u64);
    // Node 3 restarts as a new incarnation and counts 60 for client c: never refused for
    // member 2's traffic, so node 1 admits at most the 40 that remain.
    let b = CountsBatch { replica: replica(3, 7), window_ms: 1000, window: W0, entries: vec![(key, 60)] };
    n.handle_message(3, &testing::counts(replica(3, 7), &[b]).unwrap(), T0).unwrap();
    // (Member 2's accepted replicas also filled client c's replica cells, so node 3's
    // count may be held in c's total rather than in a cell of its own: either way it
    // counts, which is what the admissions below check.)
    let admitted = (0..100).filter(|_| n.limiter().allow("c", T0)).count();
    // Member 2's accepted relayed replicas counted 1 each for c as well.
    assert!(admitted <= 40, "admitted {admitted} on top of node 3's 60");
}

#[test]
fn replicas_whose_counts_expired_are_reclaimed_and_the_budget_frees_up() {
    let clock = ManualClock::new(T0);
    let mut n = node_with_clock(1, &[2], 100, clock.clone());
    let key = n.limiter().key_hash("c");
    let send = |n: &mut GossipNode, inc: u64, now: i64| {
        let b = CountsBatch { replica: replica(2, inc), window_ms: 1000, window: now / 1000, entries: vec![(key, 1)] };
        n.handle_message(2, &testing::counts(replica(2, inc), &[b]).unwrap(), now).unwrap();
    };
    for inc in 1..=MAX_INCARNATIONS_PER_PEER as u64 + 1 {
        send(&mut n, inc, T0);
    }
    assert_eq!(n.replica_count(), MAX_INCARNATIONS_PER_PEER);
    assert_eq!(n.stats().replicas_refused, 1, "the ninth live incarnation of one member is refused");
    // Ten seconds later every count has expired: one anti-entropy period reclaims them.
    let later = T0 + 10_000;
    for r in 0..10 {
        n.handle_timeout(later + 20 * r);
    }
    assert_eq!(n.replica_count(), 0);
    assert_eq!(n.stats().replicas_reclaimed, MAX_INCARNATIONS_PER_PEER as u64);
    clock.set_ms(later + 200);
    send(&mut n, 50, later + 200);
    assert_eq!(n.replica_count(), 1);
    // The reused slot carries no stale count: node 2's only count is the new one.
    let of_2: Vec<_> = n.state(later + 200).into_iter().filter(|e| e.replica.node == 2).map(|e| (e.replica, e.count)).collect();
    assert_eq!(of_2, vec![(replica(2, 50), 1)]);
    assert_eq!(n.limiter().check("c", later + 200).unwrap().remaining, 98, "its count and this request");
}

/// Aggregated dissemination sends totals to every live member: what one member's counts
/// can make a node publish is bounded per round, and the periodic resend per period.
#[test]
fn a_member_cannot_make_an_aggregator_publish_without_bound() {
    let peers: Vec<u64> = (2..=21).collect();
    let mut n = node(1, &peers, 1_000_000);
    let mut t = T0;
    for round in 1..=4 {
        for &p in &peers {
            n.handle_message(p, &heartbeat_from(p), t).unwrap();
        }
        t = T0 + round * 20;
        n.handle_timeout(t);
        drain(&mut n);
    }
    assert!(n.aggregating());
    // Member 2 counts 800,000 keys at once: about 1 in 21 has this node as its first
    // aggregator, 37 times the per-round budget, and the store now holds 12 times what a
    // resend passes over.
    for part in 0..16u64 {
        let entries = (0..50_000u64).map(|i| (splitmix(part * 50_000 + i), 1)).collect();
        let batch = CountsBatch { replica: replica(2, 1), window_ms: 1000, window: W0, entries };
        n.handle_message(2, &testing::counts(replica(2, 1), &[batch]).unwrap(), t).unwrap();
    }
    n.handle_message(3, &heartbeat_from(3), t).unwrap();
    let before = n.stats().totals_sent;
    n.handle_timeout(t + 20);
    let sent = n.stats().totals_sent - before;
    drain(&mut n);
    assert!(sent > 0, "the budget's worth is published");
    assert!(sent <= (MAX_PUBLISHED_PER_PEER_ROUND * peers.len()) as u64, "{sent} totals in one round");
    // The periodic resend (every 10 rounds) passes over at most MAX_RESEND_ENTRIES counts.
    let mut t = t + 20;
    let mut most = 0;
    for _ in 0..12 {
        for &p in &peers {
            n.handle_message(p, &heartbeat_from(p), t).unwrap();
        }
        let before = n.stats().totals_sent;
        t += 20;
        n.handle_timeout(t);
        most = most.max(n.stats().totals_sent - before);
        drain(&mut n);
    }
    assert!(most > 0);
    assert!(most <= ((MAX_RESEND_ENTRIES + 1) * peers.len()) as u64, "{most} totals in one round");
}

fn heartbeat_from(p: u64) -> Vec<u8> {
    testing::counts(replica(p, 1), &[]).unwrap()
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).max(1)
}

/// A node holding 20,000 keys, and a peer (node 2) that is up: its full sync, made
/// before the keys were counted, is complete, so what follows exercises repairs alone.
fn busy_node() -> GossipNode {
    let mut n = node(1, &[2], 10);
    let hb = testing::counts(replica(2, 1), &[]).unwrap();
    n.handle_message(2, &hb, T0).unwrap();
    drain(&mut n);
    assert_eq!(std::iter::from_fn(|| n.poll_event()).filter(|e| *e == Event::FullSyncSent { peer: 2 }).count(), 1);
    for i in 0..20_000 {
        assert!(n.limiter().allow(&format!("client-{i}"), T0));
    }
    n
}

#[test]
fn repeated_11_byte_repairs_cause_bounded_work_and_the_repair_still_completes() {
    let mut n = busy_node();
    let repair = testing::repair(replica(2, 1), 1000, &[(replica(1, 1), 0xFF)]).unwrap();
    assert_eq!(repair.len(), 11);
    for _ in 0..100 {
        n.handle_message(2, &repair, T0 + 1).unwrap();
    }
    let (messages, bytes) = drain(&mut n);
    eprintln!("100 repairs of 11 bytes: {messages} messages, {bytes} bytes queued");
    // One round's chunk: the budget plus one shard of 64 (about 313 keys), at ~12 bytes.
    assert!(bytes <= (MAX_REPAIR_ENTRIES_PER_ROUND + 1_000) * 13, "{messages} messages, {bytes} bytes queued");
    assert_eq!(n.stats().answers_dropped, 100 - u64::from(MAX_ANSWERS_PER_PERIOD));
    // The rest follows in later rounds, and the peer gets every count.
    let mut peer = node(2, &[1], 10);
    let mut now = T0 + 20;
    let mut delivered = 0;
    for _ in 0..20 {
        n.handle_timeout(now);
        while let Some(t) = n.poll_transmit() {
            if t.reliable {
                peer.handle_message(1, &t.bytes, now).unwrap();
                delivered += t.bytes.len();
            }
        }
        now += 20;
    }
    let from_1 = peer.state(now).iter().filter(|e| e.replica == replica(1, 1)).count();
    assert_eq!(from_1, 20_000, "the chunked export is complete ({delivered} bytes)");
}

#[test]
fn a_full_sync_of_a_big_store_is_sent_in_bounded_chunks_and_completes() {
    let mut n = node(1, &[2], 10);
    for i in 0..20_000 {
        assert!(n.limiter().allow(&format!("client-{i}"), T0));
    }
    // Node 2 comes up (and asks for everything): one round's chunk is queued, not the store.
    n.handle_message(2, &testing::counts(replica(2, 1), &[]).unwrap(), T0).unwrap();
    for _ in 0..100 {
        n.handle_message(2, &testing::sync_request(replica(2, 1)).unwrap(), T0 + 1).unwrap();
    }
    let mut peer = node(2, &[1], 10);
    let mut first = (0, 0);
    while let Some(t) = n.poll_transmit() {
        first.0 += 1;
        first.1 += t.bytes.len();
        peer.handle_message(1, &t.bytes, T0 + 1).unwrap();
    }
    eprintln!("a full sync of 20,000 keys, first round: {} messages, {} bytes queued", first.0, first.1);
    assert!(first.1 <= (MAX_REPAIR_ENTRIES_PER_ROUND + 1_000) * 13, "{first:?} queued at once");
    assert_eq!(n.stats().full_syncs_sent, 1, "once per suspicion period, however often asked");
    let events: Vec<Event> = std::iter::from_fn(|| n.poll_event()).collect();
    assert!(!events.contains(&Event::FullSyncSent { peer: 2 }), "not complete yet: {events:?}");
    // The rest follows round by round; the event comes once, after the last of it.
    let mut now = T0 + 20;
    let mut rounds_to_complete = None;
    for round in 1..=20 {
        n.handle_timeout(now);
        while let Some(t) = n.poll_transmit() {
            assert!(!t.reliable || rounds_to_complete.is_none(), "nothing of the sync after its end was announced");
            peer.handle_message(1, &t.bytes, now).unwrap();
        }
        while let Some(e) = n.poll_event() {
            if e == (Event::FullSyncSent { peer: 2 }) {
                assert!(rounds_to_complete.replace(round).is_none(), "announced once");
            }
        }
        // Heartbeats keep node 2 up (it would be sent everything again on coming back).
        n.handle_message(2, &testing::counts(replica(2, 1), &[]).unwrap(), now).unwrap();
        now += 20;
    }
    let rounds = rounds_to_complete.expect("the full sync completes");
    assert!(rounds >= 4, "spread over rounds ({rounds})");
    let from_1 = peer.state(now).iter().filter(|e| e.replica == replica(1, 1)).count();
    assert_eq!(from_1, 20_000, "the peer has every count");
}

#[test]
fn repeated_empty_complete_digests_cause_bounded_work() {
    let mut n = busy_node();
    let digest = testing::digest(replica(2, 1), 1000, W0, 2, &[], true).unwrap();
    for _ in 0..1_000 {
        n.handle_message(2, &digest, T0 + 1).unwrap();
    }
    let (messages, bytes) = drain(&mut n);
    eprintln!("1,000 empty complete digests of {} bytes: {messages} messages, {bytes} bytes queued", digest.len());
    // Each answered digest asks for a repair (one message); the export is one chunk.
    assert!(bytes <= (MAX_REPAIR_ENTRIES_PER_ROUND + 1_000) * 13 + 64 * 20, "{messages} messages, {bytes} bytes queued");
    assert_eq!(n.stats().answers_dropped, 1_000 - u64::from(MAX_ANSWERS_PER_PERIOD));
    let refused = std::iter::from_fn(|| n.poll_event()).filter(|e| *e == Event::Refused { peer: 2, reason: Refusal::AnswerBudget }).count();
    assert_eq!(refused as u64, n.stats().answers_dropped, "each refusal is reported with its reason");
}

/// Peers' digests cost a pass over the store at most once per anti-entropy period,
/// whatever windows they name and however many rounds they arrive in; this node's own
/// digests (once a period, or when it goes quiet) pass over it fresh.
#[test]
fn digests_cost_at_most_one_pass_over_the_store_per_anti_entropy_period() {
    let mut n = busy_node();
    let before = n.stats().store_passes;
    for i in 0..32 {
        let digest = testing::digest(replica(2, 1), 1000, W0 - (i % 8) as i64, 1 + (i / 8) as u8, &[], false).unwrap();
        n.handle_message(2, &digest, T0 + 1).unwrap();
    }
    drain(&mut n);
    assert_eq!(n.stats().store_passes - before, 1, "32 digests, 32 different window ranges, one pass");
    // Twenty rounds, beside an identical node that hears no digests: the digests, one a
    // round from the peer, add no pass to the ones this node makes for its own digests.
    let mut quiet = busy_node();
    let (passes, quiet_passes) = (n.stats().store_passes, quiet.stats().store_passes);
    let mut now = T0;
    for _ in 0..20 {
        now += 20;
        for (node, digests) in [(&mut n, true), (&mut quiet, false)] {
            node.handle_timeout(now);
            node.handle_message(2, &testing::counts(replica(2, 1), &[]).unwrap(), now).unwrap();
            if digests {
                let digest = testing::digest(replica(2, 1), 1000, W0, 2, &[], false).unwrap();
                node.handle_message(2, &digest, now + 1).unwrap();
            }
            drain(node);
        }
    }
    let own = quiet.stats().store_passes - quiet_passes;
    assert!(own >= 2, "the node's own digests pass over the store: {own}");
    assert!(
        n.stats().store_passes - passes <= own + 2,
        "at most one more pass per period: {} against {own}",
        n.stats().store_passes - passes
    );
}

/// Keys a member chooses all fall in one shard (the shard is picked by key bits a peer
/// controls): a repair's step still stops at the per-round budget, inside that shard, and
/// the rest follows in later rounds.
#[test]
fn a_repair_of_keys_packed_into_one_shard_is_exported_in_bounded_steps() {
    let mut n = node(1, &[2], 10);
    n.handle_message(2, &testing::counts(replica(2, 1), &[]).unwrap(), T0).unwrap();
    drain(&mut n);
    // 100,000 keys whose shard bits (40 to 45) are all zero: one shard of the 64.
    for m in 0..25u64 {
        let entries = (0..4_000u64).map(|i| (((m * 4_000 + i + 1) << 46) | 1, 1)).collect();
        let batch = CountsBatch { replica: replica(2, 1), window_ms: 1000, window: W0, entries };
        n.handle_message(2, &testing::counts(replica(2, 1), &[batch]).unwrap(), T0).unwrap();
    }
    drain(&mut n);
    let repair = testing::repair(replica(2, 1), 1000, &[(replica(2, 1), 0xFF)]).unwrap();
    let sent = n.stats().entries_sent;
    n.handle_message(2, &repair, T0 + 1).unwrap();
    let (messages, bytes) = drain(&mut n);
    eprintln!("a repair of 100,000 keys in one shard, first step: {messages} messages, {bytes} bytes queued");
    assert!(bytes <= (MAX_REPAIR_ENTRIES_PER_ROUND + 16) * 13, "{messages} messages, {bytes} bytes queued at once");
    // The rest follows, each round's step within the budget, until every count is sent.
    let mut now = T0 + 20;
    for _ in 0..40 {
        n.handle_timeout(now);
        n.handle_message(2, &testing::counts(replica(2, 1), &[]).unwrap(), now).unwrap();
        let round: usize = std::iter::from_fn(|| n.poll_transmit()).filter(|t| t.reliable).map(|t| t.bytes.len()).sum();
        assert!(round <= (MAX_REPAIR_ENTRIES_PER_ROUND + 16) * 13, "{round} bytes in one round");
        now += 20;
    }
    assert_eq!(n.stats().entries_sent - sent, 100_000, "every count went out once, step by step");
}

/// A full sync whose messages met a full outbox (a driver that stopped polling, or a
/// member flooding pings) is sent again, not announced complete.
#[test]
fn a_full_sync_that_lost_messages_to_a_full_outbox_is_sent_again_before_it_is_announced() {
    let mut n = node(1, &[2], 10);
    for i in 0..20_000 {
        assert!(n.limiter().allow(&format!("client-{i}"), T0));
    }
    n.handle_message(2, &testing::counts(replica(2, 1), &[]).unwrap(), T0).unwrap();
    // Node 2 floods pings: each answer takes a place in the outbox, until it is full.
    let ping = testing::ping(replica(2, 1), T0, None).unwrap();
    for _ in 0..MAX_OUTBOX {
        n.handle_message(2, &ping, T0 + 1).unwrap();
    }
    let mut now = T0 + 20;
    let mut announced = false;
    for _ in 0..10 {
        n.handle_timeout(now);
        n.handle_message(2, &testing::counts(replica(2, 1), &[]).unwrap(), now).unwrap();
        announced |= std::iter::from_fn(|| n.poll_event()).any(|e| e == Event::FullSyncSent { peer: 2 });
        now += 20;
    }
    assert!(n.stats().outbox_dropped > 0, "the sync's messages met a full outbox");
    assert!(!announced, "not announced while part of it was dropped");
    // Once the outbox drains, the sync is sent whole and announced.
    let sent = n.stats().entries_sent;
    for _ in 0..20 {
        drain(&mut n);
        n.handle_timeout(now);
        n.handle_message(2, &testing::counts(replica(2, 1), &[]).unwrap(), now).unwrap();
        announced |= std::iter::from_fn(|| n.poll_event()).any(|e| e == Event::FullSyncSent { peer: 2 });
        now += 20;
    }
    assert!(announced, "announced after a whole pass");
    assert!(n.stats().entries_sent - sent >= 20_000, "the whole store went out again");
}

/// `m` with each edit (position, byte, 0: flip, 1: insert, else remove) applied, then
/// cut at `cut` when that is within it and a multiple of 3.
fn mutated(mut m: Vec<u8>, edits: Vec<(usize, u8, u8)>, cut: usize) -> Vec<u8> {
    for (at, byte, op) in edits {
        let at = at % (m.len() + 1);
        match op {
            0 if at < m.len() => m[at] ^= byte.max(1),
            1 => m.insert(at, byte),
            _ if at < m.len() => {
                m.remove(at);
            }
            _ => {}
        }
    }
    if cut < m.len() && cut % 3 == 0 {
        m.truncate(cut);
    }
    m
}

/// Valid messages of every kind from member 2, to mutate.
fn valid_messages(key: u64) -> Vec<Vec<u8>> {
    let from = replica(2, 1);
    let batch = CountsBatch { replica: from, window_ms: 1000, window: W0, entries: vec![(key, 3), (key ^ 1, 250), (key ^ 2, 70_000)] };
    let relayed = CountsBatch { replica: replica(9, 4), window_ms: 1000, window: W0 - 1, entries: vec![(key, 1)] };
    let mut limits = crdt_rate_limiter::LimitsConfig::new(Quota::new(5, Duration::from_secs(1)).unwrap());
    limits
        .clients
        .insert("c".into(), crdt_rate_limiter::limits::ClientOverride { tier: None, limit: Some(2), window_ms: Some(2000), burst: None });
    vec![
        testing::counts(from, &[batch, relayed]).unwrap(),
        testing::counts(from, &[]).unwrap(),
        testing::digest(from, 1000, W0, 2, &[(from, [1, 2, 3, 4, 5, 6, 7, 8]), (replica(1, 1), [0; 8])], true).unwrap(),
        testing::repair(from, 1000, &[(replica(1, 1), 0xFF), (from, 0x0F)]).unwrap(),
        testing::sync_request(from).unwrap(),
        testing::ping(from, T0, Some((T0 - 3, 1))).unwrap(),
        testing::limits(from, crdt_rate_limiter::limits::LimitsVersion { at_ms: T0 as u64, node: 2 }, limits).unwrap(),
    ]
}

/// Valid messages of every kind from member `from` of `swim_node_with_pool`'s cluster:
/// counts (its own, and relayed for another), totals (as an aggregator, and naming
/// another replica), a SWIM gossip naming members known and unknown, a "you are down",
/// a digest, a repair request, a sync request, a ping; and member 2's counts and
/// heartbeat (spoofed when `from` is another member).
fn aggregated_messages(from: u64, key: u64) -> Vec<Vec<u8>> {
    let me = replica(from, 1);
    let batch =
        |replica, window| CountsBatch { replica, window_ms: 1000, window, entries: vec![(key, 3), (key ^ 1, 250), (key ^ 2, 70_000)] };
    // Totals above those counts (a view takes the larger of the two).
    let totals = |replica, window| CountsBatch { replica, window_ms: 1000, window, entries: vec![(key, 5), (key ^ 1, 400), (key ^ 3, 9)] };
    let undead = testing::swim_packet(me, from, (replica(1, 1), 0), testing::SwimKind::TurnUndead, &[]).unwrap();
    let updates =
        [testing::SwimUpdate::new(1, 1, 0, true), testing::SwimUpdate::new(3, 2, 1, false), testing::SwimUpdate::new(77, 1, 0, false)];
    let gossip = testing::swim_packet(me, from, (replica(1, 1), 0), testing::SwimKind::Gossip, &updates).unwrap();
    let mut v = valid_messages(key);
    // `valid_messages` is from member 2: its counts and sync request stand for any member.
    v.truncate(2);
    v.extend([
        testing::counts(me, &[batch(me, W0), batch(replica(9, 4), W0 - 1)]).unwrap(),
        testing::totals(me, &[totals(me, W0), totals(me, W0 - 1)]).unwrap(),
        testing::totals(me, &[totals(replica(5, 1), W0)]).unwrap(),
        testing::swim_raw(me, &gossip).unwrap(),
        testing::swim_raw(me, &undead).unwrap(),
        testing::digest(me, 1000, W0, 2, &[(me, [1, 2, 3, 4, 5, 6, 7, 8])], true).unwrap(),
        testing::repair(me, 1000, &[(replica(1, 1), 0xFF)]).unwrap(),
        testing::sync_request(me).unwrap(),
        testing::ping(me, T0, None).unwrap(),
    ]);
    v
}

/// The messages the aggregated-cluster property test mutates are, unmutated, taken as
/// what they are (so that mutations start from messages the core acts on).
#[test]
fn the_aggregated_clusters_messages_are_each_taken_when_unmutated() {
    for pool in [4, 32] {
        let mut n = swim_node_with_pool(pool);
        n.limiter().allow("client-1", T0);
        let key = n.limiter().key_hash("client-1");
        let before = n.stats().clone();
        for (i, m) in aggregated_messages(3, key).iter().enumerate().skip(2) {
            n.handle_message(3, m, T0 + 1).unwrap_or_else(|e| panic!("message {i}: {e}"));
            drain(&mut n);
        }
        let after = n.stats();
        assert!(after.totals_merged > before.totals_merged, "totals merged");
        // The gossip declares this node down, so it rejoins; the "you are down" right
        // after is then refused (a rejoin's guard, above).
        assert_eq!(after.swim_received, before.swim_received + 1, "the SWIM gossip read");
        assert_eq!(after.swim_refused, before.swim_refused + 1, "the \"you are down\" after the rejoin refused");
        assert_eq!(after.decode_errors, before.decode_errors);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

    /// Mutated messages (flipped, inserted, removed bytes, truncation) never panic the
    /// core, and never make it queue more than one round's repair chunk plus a full sync.
    #[test]
    fn mutated_messages_from_a_member_are_handled_or_refused_never_a_panic(
        picks in proptest::collection::vec((0usize..7, proptest::collection::vec((0usize..4096, 0u8..=255, 0u8..3), 0..6), 0usize..4096), 1..12),
    ) {
        let mut n = node(1, &[2], 10);
        for i in 0..300 {
            n.limiter().allow(&format!("client-{i}"), T0);
        }
        let key = n.limiter().key_hash("client-1");
        let messages = valid_messages(key);
        for (k, (which, edits, cut)) in picks.into_iter().enumerate() {
            let m = mutated(messages[which].clone(), edits, cut);
            let now = T0 + 7 * k as i64;
            let _ = n.handle_message(2, &m, now);
            n.handle_timeout(now);
            let (messages, _) = drain(&mut n);
            proptest::prop_assert!(messages <= 2_000, "{messages} messages queued for one input");
        }
    }

    /// The same beyond 16 peers, where the core aggregates and runs SWIM (and, with a
    /// pool of 4, most members do not aggregate): messages of every kind, totals and
    /// SWIM packets included, from several members, mutated, with rounds run between
    /// them and the clock moving on, never panic the core, and what one input makes it
    /// queue stays within its outbox.
    #[test]
    fn mutated_messages_from_members_of_an_aggregating_swim_cluster_never_panic_the_core(
        pool in proptest::sample::select(vec![4usize, 32]),
        picks in proptest::collection::vec(
            (0usize..11, 2u64..=21, proptest::collection::vec((0usize..4096, 0u8..=255, 0u8..3), 0..6), 0usize..4096, 0i64..400),
            1..16,
        ),
    ) {
        let mut n = swim_node_with_pool(pool);
        for i in 0..300 {
            n.limiter().allow(&format!("client-{i}"), T0);
        }
        let key = n.limiter().key_hash("client-1");
        let mut now = T0;
        for (which, from, edits, cut, step) in picks {
            let m = mutated(aggregated_messages(from, key).swap_remove(which), edits, cut);
            now += step;
            let _ = n.handle_message(from, &m, now);
            let (queued, _) = drain(&mut n);
            n.handle_timeout(now);
            let (sent, _) = drain(&mut n);
            proptest::prop_assert!(queued.max(sent) <= MAX_OUTBOX, "{queued} then {sent} messages queued");
            while n.poll_event().is_some() {}
        }
        // Still a working member: a peer's honest count is merged.
        let honest = CountsBatch { replica: replica(2, 1), window_ms: 1000, window: now / 1000, entries: vec![(key ^ 0xABC, 4)] };
        n.handle_message(2, &testing::counts(replica(2, 1), &[honest]).unwrap(), now).unwrap();
    }

    /// The frame reader gives the same frames however the stream is cut into reads.
    #[test]
    fn the_frame_reader_does_not_depend_on_where_reads_end(
        frames in proptest::collection::vec((1u8..6, proptest::collection::vec(0u8..=255, 0..300)), 0..20),
        cuts in proptest::collection::vec(1usize..700, 1..20),
    ) {
        let stream: Vec<u8> = frames.iter().flat_map(|(k, p)| testing::frame(*k, p)).collect();
        let read = |cuts: &[usize]| {
            let mut r = testing::FrameReader::default();
            let (mut out, mut rest, mut i) = (Vec::new(), &stream[..], 0);
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                i += 1;
                r.push(&rest[..n]);
                rest = &rest[n..];
                loop {
                    match r.next_frame() {
                        Ok(Some(k)) => out.push(Ok(k)),
                        Ok(None) => break,
                        Err(e) => {
                            out.push(Err(e));
                            return out;
                        }
                    }
                }
            }
            if let Err(e) = r.finish() {
                out.push(Err(e));
            }
            out
        };
        let whole = read(&[stream.len().max(1)]);
        proptest::prop_assert_eq!(read(&cuts), whole);
    }
}

/// A node in SWIM mode (`swim_above_peers` at 16, and peers 2..=21) with its SWIM
/// started and every peer known to SWIM as alive.
fn swim_node() -> GossipNode {
    swim_node_with_pool(GossipConfig::new(replica(1, 1)).aggregator_pool)
}

/// Node 1 with peers 2 to 21, every one up and known to SWIM (beyond 16 peers: aggregated
/// dissemination and SWIM), at most `pool` members aggregating.
fn swim_node_with_pool(pool: usize) -> GossipNode {
    swim_node_with(|cfg| cfg.aggregator_pool = pool)
}

/// `swim_node()` with its configuration changed by `f`.
fn swim_node_with(f: impl FnOnce(&mut GossipConfig)) -> GossipNode {
    let peers: Vec<u64> = (2..=21).collect();
    let limiter = RateLimiter::builder()
        .quota(Quota::new(10, Duration::from_secs(1)).unwrap())
        .clock(ManualClock::new(T0))
        .hash_secret([7; 16])
        .build()
        .unwrap();
    let mut cfg = GossipConfig::new(replica(1, 1));
    cfg.swim_above_peers = 16;
    f(&mut cfg);
    let mut n = GossipNode::new(limiter, cfg, peers.iter().copied(), 1, T0).unwrap();
    n.handle_timeout(T0);
    drain(&mut n);
    for &p in &peers {
        let gossip = testing::swim_gossip(replica(p, 1), p, replica(1, 1), &[]).unwrap();
        n.handle_message(p, &gossip, T0).unwrap();
    }
    drain(&mut n);
    assert_eq!(n.swim_members(), Some(peers.len()));
    n
}

fn swim_refusals(n: &mut GossipNode) -> usize {
    std::iter::from_fn(|| n.poll_event()).filter(|e| matches!(e, Event::Refused { reason: Refusal::Swim, .. })).count()
}

#[test]
fn a_swim_packet_whose_header_names_another_member_is_refused() {
    let mut n = swim_node();
    swim_refusals(&mut n);
    // Peer 2 speaks for peer 3 in the SWIM header (its envelope is its own, as the
    // transport authenticates): the packet is refused before foca reads it.
    let forged = testing::swim_gossip(replica(2, 1), 3, replica(1, 1), &[1000]).unwrap();
    n.handle_message(2, &forged, T0 + 1).unwrap();
    assert_eq!(n.stats().swim_refused, 1);
    assert_eq!(swim_refusals(&mut n), 1);
    assert_eq!(n.swim_members(), Some(20), "the member it named was not learned");
}

#[test]
fn garbage_swim_packets_are_refused_without_panicking_or_changing_membership() {
    let mut n = swim_node();
    let mut refused = 0;
    let valid = testing::swim_gossip_packet(replica(2, 1), 2, replica(1, 1), &[5, 6, 7]).unwrap();
    for i in 0..2_000u64 {
        let packet: Vec<u8> = if i % 2 == 0 {
            // Noise of any length up to a datagram's.
            let len = (splitmix(i) % 1_100) as usize;
            (0..len as u64).map(|j| splitmix(i << 20 | j) as u8).collect()
        } else {
            // A valid packet with one to four bytes changed, or cut short.
            let mut p = valid.clone();
            for j in 0..=splitmix(i) % 4 {
                let r = splitmix(i << 8 | j);
                let at = (r % p.len() as u64) as usize;
                p[at] = (r >> 32) as u8;
            }
            if i % 3 == 0 {
                p.truncate((splitmix(i + 7) % p.len() as u64) as usize);
            }
            p
        };
        let msg = testing::swim_raw(replica(2, 1), &packet).unwrap();
        n.handle_message(2, &msg, T0 + 1).unwrap();
        refused = n.stats().swim_refused;
    }
    // Noise never decodes; a changed valid packet may (a changed probe number or member
    // incarnation is still a packet), and its members are known peers, or unknown ones
    // within the bound.
    assert!(refused >= 1_000, "{refused} of 2000 refused");
    let members = n.swim_members().unwrap();
    assert!((20..=20 + MAX_UNKNOWN_MEMBERS).contains(&members), "{members} members");
}

/// A member SWIM holds down restarts with a lower incarnation (its clock stepped back
/// further than the restart took); the driver tells the core the incarnation it runs as.
/// It then stays up while it talks: SWIM's verdict was on the process that is gone.
/// Before, the core kept the higher incarnation as the current one, never cleared the
/// verdict on the new process's messages, and took the member down after each of them.
#[test]
fn a_member_that_restarts_with_a_lower_incarnation_is_not_taken_down_by_the_old_ones_verdict() {
    let mut n = swim_node();
    let mut t = T0 + 1;
    let heartbeat = |p: u64, inc: u64| testing::counts(replica(p, inc), &[]).unwrap();
    // Member 3 restarts normally as incarnation 5; member 2 declares 5 down.
    n.handle_message(3, &heartbeat(3, 5), t).unwrap();
    let down = testing::SwimUpdate::new(3, 5, 0, true);
    let packet = testing::swim_packet(replica(2, 1), 2, (replica(1, 1), 0), testing::SwimKind::Gossip, &[down]).unwrap();
    n.handle_message(2, &testing::swim_raw(replica(2, 1), &packet).unwrap(), t).unwrap();
    drain(&mut n);
    // It dies and restarts as incarnation 4, as its transport says.
    n.set_peer_incarnation(3, 4);
    let mut downs = 0;
    while t < T0 + 3_000 {
        t += 10;
        for p in 2..=21u64 {
            n.handle_message(p, &heartbeat(p, if p == 3 { 4 } else { 1 }), t).unwrap();
        }
        n.handle_timeout(t);
        drain(&mut n);
        downs += std::iter::from_fn(|| n.poll_event()).filter(|e| matches!(e, Event::PeerDown { peer: 3, .. })).count();
    }
    assert_eq!(downs, 0, "member 3 taken down {downs} times while it talked");
    assert!(n.live_peers().any(|p| p == 3));
}

/// A "down" verdict that comes while the outbox is full: the ask that would confirm it
/// cannot be queued, so it is not counted as made, and the member is not taken down for
/// failing to answer it; once there is room again, it is asked.
#[test]
fn an_ask_that_met_a_full_outbox_does_not_take_the_member_down() {
    let mut n = swim_node_with(|cfg| cfg.suspect_after_ms = 5_000);
    // Member 2 floods pings: each answer takes a place in the outbox, until it is full.
    let ping = testing::ping(replica(2, 1), T0, None).unwrap();
    for _ in 0..MAX_OUTBOX {
        n.handle_message(2, &ping, T0 + 1).unwrap();
    }
    let down = testing::SwimUpdate::new(3, 1, 0, true);
    let packet = testing::swim_packet(replica(2, 1), 2, (replica(1, 1), 0), testing::SwimKind::Gossip, &[down]).unwrap();
    n.handle_message(2, &testing::swim_raw(replica(2, 1), &packet).unwrap(), T0 + 2).unwrap();
    // A second, with the outbox still full; every member but 3 goes on talking.
    let mut t = T0 + 2;
    let mut downs = 0;
    while t < T0 + 1_500 {
        t += 20;
        for p in (2..=21u64).filter(|&p| p != 3) {
            n.handle_message(p, &testing::counts(replica(p, 1), &[]).unwrap(), t).unwrap();
        }
        n.handle_timeout(t);
        downs += std::iter::from_fn(|| n.poll_event()).filter(|e| matches!(e, Event::PeerDown { peer: 3, .. })).count();
    }
    assert_eq!(downs, 0, "member 3 taken down after an ask that never left");
    // Room again: it is asked within a probe period or two.
    drain(&mut n);
    let mut asked = false;
    while t < T0 + 2_000 && !asked {
        t += 20;
        n.handle_timeout(t);
        asked = std::iter::from_fn(|| n.poll_transmit()).any(|tr| tr.to == 3);
    }
    assert!(asked, "member 3 asked once there was room");
}

/// One SWIM packet whose updates declare a member down and up in turn, each time as a
/// later identity, costs this node at most one ping to that member per probe period,
/// not one per pair of updates.
#[test]
fn verdicts_going_down_and_up_in_turn_cost_one_ping_per_probe_period() {
    let mut n = swim_node();
    // Each packet names later identities than the one before.
    let msg = |k: u64| {
        let updates: Vec<testing::SwimUpdate> = (0..40u64).map(|i| testing::SwimUpdate::new(3, 2 + 100 * k + i, 0, i % 2 == 0)).collect();
        let packet = testing::swim_packet(replica(2, 1), 2, (replica(1, 1), 0), testing::SwimKind::Gossip, &updates).unwrap();
        testing::swim_raw(replica(2, 1), &packet).unwrap()
    };
    assert!(msg(3).len() <= 1200, "{} bytes", msg(3).len());
    let mut to_3 = 0;
    for k in 0..4 {
        let t = T0 + 1 + k as i64;
        n.handle_message(2, &msg(k), t).unwrap();
        to_3 += std::iter::from_fn(|| n.poll_transmit()).filter(|t| t.to == 3).count();
        // Member 3 answers any ping at once (the limit is per probe period, not per ping
        // outstanding).
        n.handle_message(3, &testing::ping(replica(3, 1), t, Some((t, 0))).unwrap(), t).unwrap();
        drain(&mut n);
    }
    assert!(n.stats().swim_received >= 21, "the packets were read");
    assert!(to_3 <= 2, "{to_3} messages to member 3 for four packets within a probe period");
}

#[test]
fn a_member_cannot_make_swim_remember_more_than_the_bound_of_unknown_members() {
    let mut n = swim_node();
    // 40 members per packet fit in a datagram; 20 packets name 800 made-up members.
    for p in 0..20u64 {
        let made_up: Vec<u64> = (0..40).map(|i| 1_000_000 + p * 40 + i).collect();
        let gossip = testing::swim_gossip(replica(2, 1), 2, replica(1, 1), &made_up).unwrap();
        assert!(gossip.len() <= 1200, "{} bytes", gossip.len());
        n.handle_message(2, &gossip, T0 + 1 + p as i64).unwrap();
    }
    let members = n.swim_members().unwrap();
    assert!(members <= 20 + MAX_UNKNOWN_MEMBERS, "{members} members");
    assert!(members >= 20 + MAX_UNKNOWN_MEMBERS - 40, "honest updates below the bound are taken: {members}");
    assert!(n.stats().swim_refused >= 13, "{} refused", n.stats().swim_refused);
    // SWIM probes none of them: nothing goes to a node the driver did not name.
    for t in (T0..T0 + 3_000).step_by(10) {
        n.handle_timeout(t);
        while let Some(tx) = n.poll_transmit() {
            assert!((2..=21).contains(&tx.to), "a message to {}", tx.to);
        }
    }
}

/// Runs `n` from `from` to `to` in 10 ms steps with no input; returns the peers it took
/// down, in order.
fn run_quiet(n: &mut GossipNode, from: i64, to: i64) -> Vec<u64> {
    let mut downs = Vec::new();
    for t in (from..=to).step_by(10) {
        n.handle_timeout(t);
        drain(n);
        downs.extend(std::iter::from_fn(|| n.poll_event()).filter_map(|e| {
            if let Event::PeerDown { peer, .. } = e {
                Some(peer)
            } else {
                None
            }
        }));
    }
    downs
}

fn turn_undead(bump: u64) -> Vec<u8> {
    let p = testing::swim_packet(replica(2, 1), 2, (replica(1, 1), bump), testing::SwimKind::TurnUndead, &[]).unwrap();
    testing::swim_raw(replica(2, 1), &p).unwrap()
}

/// Silence is the backstop: without a partial view after the suspicion period (0.3 s
/// here), with one (the default) after four SWIM probe cycles over the 21 members (16.8
/// s), since there a peer may heartbeat only its pool.
#[test]
fn a_flood_of_you_are_down_neither_exhausts_swim_nor_keeps_silent_peers_up() {
    for (partial_view, quiet_ms) in [(false, 10_000), (true, 20_000)] {
        let mut n = swim_node_with(|cfg| cfg.partial_view = partial_view);
        // 65,536 "you were declared down", each to the identity the last one made it take.
        for bump in 0..65_536u64 {
            n.handle_message(2, &turn_undead(bump), T0 + 1 + (bump / 1024) as i64).unwrap();
            drain(&mut n);
        }
        // At most one renewal per probe period was taken; the rest were refused.
        assert!(n.stats().swim_refused >= 65_000, "{} refused", n.stats().swim_refused);
        assert!(n.swim_timers() <= 64, "{} timers", n.swim_timers());
        // Every peer then falls silent: every one is taken down (silence is the backstop;
        // no verdict keeps a silent peer up).
        let downs = run_quiet(&mut n, T0 + 100, T0 + quiet_ms);
        assert_eq!(n.live_peers().count(), 0, "partial view {partial_view}: {downs:?}");
        // One "you are down" every 500 ms (to the current identity) does not keep them up
        // either.
        let mut n = swim_node_with(|cfg| cfg.partial_view = partial_view);
        for (k, t) in (T0 + 10..T0 + quiet_ms).step_by(500).enumerate() {
            n.handle_message(2, &turn_undead(k as u64), t).unwrap();
            run_quiet(&mut n, t, t + 490);
        }
        assert_eq!(n.live_peers().filter(|&p| p != 2).count(), 0, "partial view {partial_view}");
    }
}

#[test]
fn forged_down_verdicts_do_not_take_down_a_member_that_answers() {
    let mut n = swim_node();
    let down = |bump| testing::SwimUpdate::new(3, 1, bump, true);
    let mut downs = Vec::new();
    let mut asked = 0;
    let mut t = T0 + 10;
    let mut bump = 1;
    while t < T0 + 5_000 {
        // Every member talks now and then (heartbeats in turn); peer 2 forges a "3 is
        // down" every 50 ms, each about a newer identity of 3.
        if (t - T0) % 100 == 0 {
            for p in 2..=21u64 {
                n.handle_message(p, &heartbeat_from(p), t).unwrap();
            }
        }
        if (t - T0) % 50 == 0 {
            let p = testing::swim_packet(replica(2, 1), 2, (replica(1, 1), 0), testing::SwimKind::Gossip, &[down(bump)]).unwrap();
            n.handle_message(2, &testing::swim_raw(replica(2, 1), &p).unwrap(), t).unwrap();
            bump += 1;
        }
        n.handle_timeout(t);
        // Member 3 answers whatever this node sends it, 5 ms later.
        let mut to_3 = false;
        while let Some(tx) = n.poll_transmit() {
            to_3 |= tx.to == 3;
        }
        if to_3 {
            asked += 1;
            let answer = testing::swim_gossip(replica(3, 1), 3, replica(1, 1), &[]).unwrap();
            n.handle_message(3, &answer, t + 5).unwrap();
            drain(&mut n);
        }
        downs.extend(std::iter::from_fn(|| n.poll_event()).filter_map(|e| {
            if let Event::PeerDown { peer, .. } = e {
                Some(peer)
            } else {
                None
            }
        }));
        t += 10;
    }
    assert!(downs.is_empty(), "{downs:?}");
    assert!(asked > 0);
    // The forged verdicts kept nothing pending: no timer per forged identity.
    assert!(n.swim_timers() <= 64, "{} timers", n.swim_timers());
}

#[test]
fn forged_down_updates_do_not_pile_up_timers() {
    let mut n = swim_node();
    let mut incarnation = 1_000;
    for k in 0..1_000i64 {
        let updates: Vec<_> = (0..60u64)
            .map(|j| {
                incarnation += 1;
                testing::SwimUpdate::new(3 + j % 19, incarnation, 0, true)
            })
            .collect();
        let p = testing::swim_packet(replica(2, 1), 2, (replica(1, 1), 0), testing::SwimKind::Gossip, &updates).unwrap();
        let msg = testing::swim_raw(replica(2, 1), &p).unwrap();
        assert!(msg.len() <= 1200, "{} bytes", msg.len());
        n.handle_message(2, &msg, T0 + 1 + k).unwrap();
        drain(&mut n);
    }
    // One pending timer per kind and member at most.
    assert!(n.swim_timers() <= 6 + 2 * 21, "{} timers", n.swim_timers());
}

#[test]
fn an_update_naming_this_node_is_never_a_stranger_past_the_bound() {
    let mut n = swim_node();
    // The bound of unknown members reached.
    for p in 0..8u64 {
        let made_up: Vec<u64> = (0..32).map(|i| 1_000_000 + p * 32 + i).collect();
        n.handle_message(2, &testing::swim_gossip(replica(2, 1), 2, replica(1, 1), &made_up).unwrap(), T0 + 1).unwrap();
    }
    let refused = n.stats().swim_refused;
    // Honest updates naming this node, and a member the driver removed since.
    n.remove_peer(21);
    let honest = testing::swim_gossip(replica(3, 1), 3, replica(1, 1), &[1, 21]).unwrap();
    n.handle_message(3, &honest, T0 + 2).unwrap();
    assert_eq!(n.stats().swim_refused, refused);
}

#[test]
fn a_restarted_peer_gets_swims_verdict_on_its_new_incarnation() {
    let mut n = swim_node();
    assert_eq!(n.swim_verdict(3), Some(true));
    // Peer 3 restarts: its first message is its new incarnation's. SWIM renames the
    // member (no "member up"), and its verdict on the new identity is taken all the same.
    let g = testing::swim_gossip(replica(3, 2), 3, replica(1, 1), &[]).unwrap();
    n.handle_message(3, &g, T0 + 100).unwrap();
    drain(&mut n);
    n.handle_timeout(T0 + 120);
    drain(&mut n);
    assert_eq!(n.swim_verdict(3), Some(true));
}

#[test]
fn an_update_declaring_this_node_down_right_after_a_rejoin_is_refused() {
    let mut n = swim_node();
    let me_down = |bump| {
        let u = testing::SwimUpdate::new(1, 1, bump, true);
        let p = testing::swim_packet(replica(2, 1), 2, (replica(1, 1), bump), testing::SwimKind::Gossip, &[u]).unwrap();
        testing::swim_raw(replica(2, 1), &p).unwrap()
    };
    // The first makes this node renew its SWIM identity (bump 1).
    n.handle_message(2, &me_down(0), T0 + 10).unwrap();
    assert_eq!(n.stats().swim_refused, 0);
    // Within a suspicion period of that rejoin (4 · log10 21 probe periods of 200 ms,
    // 1.06 s) another is refused, whichever identity it names.
    n.handle_message(2, &me_down(1), T0 + 500).unwrap();
    n.handle_message(2, &turn_undead(1), T0 + 600).unwrap();
    assert_eq!(n.stats().swim_refused, 2);
    // After it, one is taken again.
    n.handle_message(2, &me_down(1), T0 + 1_200).unwrap();
    assert_eq!(n.stats().swim_refused, 2);
}

/// Membership by infection is bounded as SWIM is: a member that names 810 made-up
/// members, each with an address, makes the core report at most `MAX_UNKNOWN_MEMBERS` of
/// them to its driver as learned (which dials each once at most, within its dial budget,
/// and forgets those that do not answer as one of its certificates: `docs/security.md`).
#[test]
fn made_up_members_with_addresses_reach_the_driver_only_within_the_bound_of_unknown_members() {
    let mut n = swim_node_with(|cfg| cfg.swim_address = Some("10.0.0.1:7000".parse().unwrap()));
    let mut learned = std::collections::BTreeSet::new();
    for p in 0..27u64 {
        let updates: Vec<testing::SwimUpdate> = (0..30u64)
            .map(|i| {
                let addr = std::net::SocketAddr::from(([10, 9, p as u8, i as u8], 7000));
                testing::SwimUpdate { addr: Some(addr), ..testing::SwimUpdate::new(1_000_000 + p * 30 + i, 1, 0, false) }
            })
            .collect();
        let packet = testing::swim_packet(replica(2, 1), 2, (replica(1, 1), 0), testing::SwimKind::Gossip, &updates).unwrap();
        n.handle_message(2, &testing::swim_raw(replica(2, 1), &packet).unwrap(), T0 + 1 + p as i64).unwrap();
        for e in std::iter::from_fn(|| n.poll_event()) {
            if let Event::MemberLearned { peer, incarnation, addr } = e {
                assert_eq!(
                    (incarnation, addr),
                    (1, std::net::SocketAddr::from(([10, 9, ((peer - 1_000_000) / 30) as u8, ((peer - 1_000_000) % 30) as u8], 7000)))
                );
                assert!(learned.insert(peer), "member {peer} reported twice");
            }
        }
    }
    assert!((MAX_UNKNOWN_MEMBERS - 30..=MAX_UNKNOWN_MEMBERS).contains(&learned.len()), "{} reported", learned.len());
}
