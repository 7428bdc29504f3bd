//! Scripted scenarios for the gossip core, in quinn's `Pair` style: nodes exchange
//! messages through an in-memory network whose packets carry delivery times, and
//! `step` jumps virtual time to the next event.

use std::collections::BTreeMap;
use std::time::Duration;

use crdt_rate_limiter::counter::ReplicaId;
use crdt_rate_limiter::gossip::{Event, MessageError, StateEntry};
use crdt_rate_limiter::{Admission, GossipConfig, GossipNode, ManualClock, Quota, RateLimiter, Strategy};

const T0: i64 = 1_700_000_000_000;
const SECRET: [u8; 16] = *b"scripted-secret!";
const LATENCY_MS: i64 = 2;

struct Node {
    gossip: GossipNode,
    clock: ManualClock,
}

/// A cluster on virtual time. Messages to or from a node in `cut`, and from one node to
/// another in `cut_links`, are dropped.
struct Cluster {
    nodes: BTreeMap<u64, Node>,
    /// (delivery time, sequence) -> (from, to, bytes)
    wire: BTreeMap<(i64, u64), (u64, u64, Vec<u8>)>,
    seq: u64,
    now: i64,
    cut: Vec<u64>,
    cut_links: Vec<(u64, u64)>,
    /// Per node: how far its clock runs ahead of true time.
    skew: BTreeMap<u64, i64>,
    limit: u64,
    admission: Admission,
    strategy: Strategy,
    /// Per node, the events its core reported, in order.
    events: BTreeMap<u64, Vec<Event>>,
    /// Aggregated dissemination beyond two peers (instead of full mesh up to 16).
    aggregated: bool,
    /// The quota's window, in ms (default 1 s).
    window_ms: u64,
    /// The limiters' key cap (default: the library's).
    max_keys: Option<usize>,
    /// SWIM beyond this many peers (default: the library's).
    swim_above: Option<usize>,
    /// The most members that aggregate (default: the library's).
    pool: Option<usize>,
    /// `GossipConfig::suspect_after_ms` (default: the library's).
    suspect_after_ms: Option<u64>,
    /// Messages put on the wire, by sender and receiver.
    sent: BTreeMap<(u64, u64), u64>,
    /// SWIM identities carry addresses (`GossipConfig::swim_address`, [`addr_of`]).
    addresses: bool,
}

/// The address node `id` is reached at, when the cluster spreads addresses.
fn addr_of(id: u64) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([10, 0, 0, id as u8], 7000))
}

impl Cluster {
    fn new(ids: &[u64], limit: u64, admission: Admission) -> Self {
        Self::with_strategy(ids, limit, admission, Strategy::FixedWindow)
    }

    fn with_strategy(ids: &[u64], limit: u64, admission: Admission, strategy: Strategy) -> Self {
        let mut c = Cluster {
            nodes: BTreeMap::new(),
            wire: BTreeMap::new(),
            seq: 0,
            now: T0,
            cut: Vec::new(),
            cut_links: Vec::new(),
            skew: BTreeMap::new(),
            limit,
            admission,
            strategy,
            events: BTreeMap::new(),
            aggregated: false,
            window_ms: 1000,
            max_keys: None,
            swim_above: None,
            pool: None,
            suspect_after_ms: None,
            sent: BTreeMap::new(),
            addresses: false,
        };
        for &id in ids {
            c.start(id, 1, ids);
        }
        c
    }

    /// A cluster in aggregated dissemination (more than two peers each).
    fn aggregated(ids: &[u64], limit: u64) -> Self {
        Self::aggregated_with_window(ids, limit, 1000)
    }

    fn aggregated_with_window(ids: &[u64], limit: u64, window_ms: u64) -> Self {
        Self::aggregated_with_pool(ids, limit, window_ms, None)
    }

    fn aggregated_with_pool(ids: &[u64], limit: u64, window_ms: u64, pool: Option<usize>) -> Self {
        let mut c = Self::new(&[], limit, Admission::Optimistic);
        (c.aggregated, c.window_ms, c.pool) = (true, window_ms, pool);
        for &id in ids {
            c.start(id, 1, ids);
        }
        c
    }

    /// Nodes `ids` with SWIM beyond 16 peers and a pool of 4, a limit of 100, bounded
    /// admission: beyond 18 peers, a partial view for the members outside the pool.
    fn swim_pooled(ids: &[u64]) -> Self {
        let mut c = Cluster::new(&[], 100, Admission::Bounded);
        (c.swim_above, c.pool) = (Some(16), Some(4));
        for &id in ids {
            c.start(id, 1, ids);
        }
        c
    }

    /// Aggregated nodes `ids` with at most `pool` aggregators, a one-minute window and a
    /// large limit, 200 ms after they started.
    fn pooled(ids: &[u64], pool: usize) -> Self {
        let mut c = Self::aggregated_with_pool(ids, 1_000_000, 60_000, Some(pool));
        c.run_until(T0 + 200);
        c
    }

    fn start(&mut self, id: u64, incarnation: u64, ids: &[u64]) {
        let clock = ManualClock::new(self.now);
        let limiter = RateLimiter::builder()
            .quota(Quota::new(self.limit, Duration::from_millis(self.window_ms)).unwrap())
            .strategy(self.strategy)
            .admission(self.admission)
            .clock(clock.clone())
            .hash_secret(SECRET);
        let limiter = match self.max_keys {
            Some(keys) => limiter.max_keys(keys),
            None => limiter,
        }
        .build()
        .unwrap();
        let mut cfg = GossipConfig::new(ReplicaId { node: id, incarnation });
        if let Some(above) = self.swim_above {
            cfg.swim_above_peers = above;
        }
        if let Some(pool) = self.pool {
            cfg.aggregator_pool = pool;
        }
        if let Some(ms) = self.suspect_after_ms {
            cfg.suspect_after_ms = ms;
        }
        if self.aggregated {
            (cfg.full_mesh_max_peers, cfg.aggregate_above_peers, cfg.fanout) = (2, 2, 2);
        }
        cfg.swim_address = self.addresses.then(|| addr_of(id));
        let peers = ids.iter().copied().filter(|&p| p != id);
        let mut gossip = GossipNode::new(limiter, cfg, peers.clone(), id, self.now).unwrap();
        if self.addresses {
            // As a driver does on each peer's hello.
            for p in peers {
                gossip.set_peer_address(p, addr_of(p));
            }
        }
        self.nodes.insert(id, Node { gossip, clock });
        self.flush();
    }

    fn flush(&mut self) {
        for (&id, node) in self.nodes.iter_mut() {
            while let Some(t) = node.gossip.poll_transmit() {
                self.seq += 1;
                *self.sent.entry((id, t.to)).or_default() += 1;
                if !self.cut.contains(&id) && !self.cut.contains(&t.to) && !self.cut_links.contains(&(id, t.to)) {
                    self.wire.insert((self.now + LATENCY_MS, self.seq), (id, t.to, t.bytes));
                }
            }
            while let Some(e) = node.gossip.poll_event() {
                self.events.entry(id).or_default().push(e);
            }
        }
    }

    /// Runs every event up to `until`.
    fn run_until(&mut self, until: i64) {
        loop {
            let next_msg = self.wire.keys().next().map(|k| k.0);
            let next_timer = self.nodes.values().filter_map(|n| n.gossip.poll_timeout()).min();
            let next = [next_msg, next_timer].into_iter().flatten().min().unwrap_or(until);
            if next > until {
                break;
            }
            self.now = next;
            for (id, n) in self.nodes.iter() {
                n.clock.set_ms(self.now + self.skew.get(id).copied().unwrap_or(0));
            }
            while let Some(entry) = self.wire.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let (from, to, bytes) = entry.remove();
                let at = self.now + self.skew.get(&to).copied().unwrap_or(0);
                if let Some(n) = self.nodes.get_mut(&to) {
                    n.gossip.handle_message(from, &bytes, at).unwrap();
                }
            }
            for (id, n) in self.nodes.iter_mut() {
                n.gossip.handle_timeout(self.now + self.skew.get(id).copied().unwrap_or(0));
            }
            self.flush();
        }
        self.now = until;
        for n in self.nodes.values() {
            n.clock.set_ms(until);
        }
    }

    fn allow(&mut self, node: u64, client: &str) -> bool {
        let now = self.now;
        self.nodes[&node].gossip.limiter().allow(client, now)
    }

    fn state(&self, node: u64) -> Vec<StateEntry> {
        self.nodes[&node].gossip.state(self.now)
    }

    /// The nodes of `ids` that hold another node's count: in aggregated dissemination
    /// with one key counted, that key's aggregators.
    fn aggregators(&self, ids: &[u64]) -> Vec<u64> {
        ids.iter().copied().filter(|&n| self.state(n).iter().any(|e| e.replica.node != n)).collect()
    }

    /// What `node` decides `client` on in the current window (its own count and the
    /// others'), or 0.
    fn view(&self, node: u64, client: &str) -> u64 {
        let key = self.nodes[&node].gossip.limiter().key_hash(client);
        let window = self.now.div_euclid(self.window_ms as i64);
        self.nodes[&node].gossip.views(self.now).iter().find(|v| v.key == key && v.window == window).map_or(0, |v| v.total)
    }

    fn converged(&self) -> bool {
        let mut states = self.nodes.keys().map(|&id| self.state(id));
        let first = states.next().unwrap();
        states.all(|s| s == first)
    }
}

#[test]
fn two_nodes_share_one_limit_when_requests_are_spaced_by_more_than_a_round() {
    let mut c = Cluster::new(&[1, 2], 10, Admission::Optimistic);
    let mut admitted = 0;
    for i in 0..40 {
        let node = 1 + (i % 2);
        admitted += u64::from(c.allow(node, "client"));
        let t = c.now + 25;
        c.run_until(t);
    }
    assert_eq!(admitted, 10, "one window, 40 requests alternating between the two nodes");
    assert!(c.converged());
}

#[test]
fn a_node_that_joins_late_receives_a_full_sync() {
    let mut c = Cluster::new(&[1, 2], 100, Admission::Optimistic);
    for i in 0..30 {
        c.allow(1 + i % 2, &format!("client-{}", i % 7));
    }
    c.run_until(T0 + 100);
    // Node 3 joins; the others learn of it as a configured peer.
    for n in c.nodes.values_mut() {
        n.gossip.add_peer(3);
    }
    c.start(3, 1, &[1, 2, 3]);
    c.run_until(T0 + 200);
    assert_eq!(c.state(3).iter().map(|e| e.count).sum::<u64>(), 30);
    assert!(c.converged());
}

#[test]
fn the_core_reports_peers_coming_and_going_and_full_syncs_as_events() {
    let mut c = Cluster::new(&[1, 2, 3], 100, Admission::Bounded);
    c.run_until(T0 + 100);
    let seen = std::mem::take(c.events.get_mut(&2).unwrap());
    for peer in [1, 3] {
        assert!(seen.contains(&Event::PeerUp { peer, incarnation: 1, restarted: false }), "{seen:?}");
        assert!(seen.contains(&Event::FullSyncSent { peer }), "{seen:?}");
    }
    assert_eq!(
        seen.iter().rfind(|e| matches!(e, Event::LiveChanged { .. })),
        Some(&Event::LiveChanged { live_replicas: 3, index: 1 }),
        "node 2 is second of three: {seen:?}"
    );
    c.events.clear();
    // Node 3 goes silent past the suspicion period, then comes back as a new incarnation.
    c.cut = vec![3];
    c.run_until(T0 + 300);
    let seen = std::mem::take(c.events.get_mut(&2).unwrap());
    assert!(seen.iter().any(|e| matches!(e, Event::PeerDown { peer: 3, silent_ms: Some(ms) } if *ms > 0)), "{seen:?}");
    assert_eq!(seen.iter().rfind(|e| matches!(e, Event::LiveChanged { .. })), Some(&Event::LiveChanged { live_replicas: 2, index: 1 }));
    c.cut.clear();
    c.nodes.remove(&3);
    c.start(3, 2, &[1, 2, 3]);
    c.run_until(T0 + 400);
    let seen = &c.events[&2];
    assert!(seen.contains(&Event::PeerUp { peer: 3, incarnation: 2, restarted: true }), "{seen:?}");
    assert!(seen.contains(&Event::LiveChanged { live_replicas: 3, index: 1 }), "{seen:?}");
    assert!(seen.contains(&Event::FullSyncSent { peer: 3 }), "{seen:?}");
}

#[test]
fn a_restarted_node_takes_a_new_incarnation_and_does_not_hand_out_a_second_quota() {
    let mut c = Cluster::new(&[1, 2, 3], 10, Admission::Optimistic);
    for _ in 0..6 {
        assert!(c.allow(1, "client"));
    }
    c.run_until(T0 + 100);
    // Node 1 crashes and comes back empty, as incarnation 2.
    c.nodes.remove(&1);
    c.start(1, 2, &[1, 2, 3]);
    c.run_until(T0 + 200);
    let state = c.state(1);
    assert!(
        state.iter().any(|e| e.replica == ReplicaId { node: 1, incarnation: 1 } && e.count == 6),
        "the old incarnation's counts came back: {state:?}"
    );
    let admitted = (0..10).filter(|_| c.allow(1, "client")).count();
    assert_eq!(admitted, 4, "only what the first incarnation left");
    c.run_until(T0 + 300);
    assert!(c.converged());
}

/// Node 1 counts 5 for one client while every message from it is lost (for less than the
/// suspicion timeout, so the link stays "up" and no full sync is triggered); anti-entropy,
/// every 10 rounds (200 ms), repairs it. Returns the converged cluster.
fn lose_a_delta_then_repair(strategy: Strategy) -> Cluster {
    let mut c = Cluster::with_strategy(&[1, 2], 100, Admission::Optimistic, strategy);
    c.run_until(T0 + 50);
    c.cut = vec![1];
    for _ in 0..5 {
        c.allow(1, "client");
    }
    c.run_until(T0 + 70);
    c.cut.clear();
    c.run_until(T0 + 90);
    assert!(!c.converged(), "the delta was lost and nothing has changed since");
    c.run_until(T0 + 500);
    assert!(c.converged());
    c
}

#[test]
fn anti_entropy_repairs_what_a_dropped_delta_lost() {
    let c = lose_a_delta_then_repair(Strategy::FixedWindow);
    assert_eq!(c.state(2).iter().map(|e| e.count).sum::<u64>(), 5);
}

#[test]
fn a_healed_partition_converges_within_a_few_rounds() {
    let mut c = Cluster::new(&[1, 2, 3, 4], 1_000, Admission::Bounded);
    c.run_until(T0 + 50);
    c.cut = vec![1, 2];
    for i in 0..200 {
        c.allow(1 + (i % 4), &format!("client-{}", i % 13));
        let t = c.now + 1;
        c.run_until(t);
    }
    c.run_until(T0 + 600);
    assert!(!c.converged());
    c.cut.clear();
    let healed = c.now;
    let mut at = None;
    for step in 1..=50 {
        c.run_until(healed + step * 5);
        if c.converged() {
            at = Some(step * 5);
            break;
        }
    }
    let at = at.expect("converged within 250 ms of healing");
    // Three gossip intervals plus the latency of the answer.
    assert!(at <= 3 * 20 + 2 * LATENCY_MS, "took {at} ms");
}

#[test]
fn bounded_admission_keeps_a_simultaneous_burst_near_the_limit() {
    for admission in [Admission::Optimistic, Admission::Bounded] {
        let mut c = Cluster::new(&[1, 2, 3, 4, 5], 100, admission);
        c.run_until(T0 + 100);
        let mut admitted = 0;
        // Every node gets 20 requests per millisecond for 100 ms.
        for _ in 0..100 {
            for node in 1..=5 {
                for _ in 0..20 {
                    admitted += u64::from(c.allow(node, "hot"));
                }
            }
            let t = c.now + 1;
            c.run_until(t);
        }
        match admission {
            // Every node admits up to the limit before it hears of the others.
            Admission::Optimistic => assert_eq!(admitted, 500),
            // Each spends its share; the next round holds back what the others were
            // allotted until their counts arrive.
            _ => assert!((95..=100).contains(&admitted), "bounded keeps it at the limit: {admitted}"),
        }
    }
}

/// Bounded admission before any round has shown a client to anyone: the nodes agree on
/// who is live and on the round, so their shares of the limit add up to it exactly, and
/// the rounding remainder goes to a different node from one client to the next.
#[test]
fn a_burst_spread_over_the_nodes_before_any_round_admits_exactly_the_limit() {
    for (nodes, limit, burst) in [(3u64, 10u64, 40u64), (3, 5, 40), (3, 3, 40), (2, 5, 8)] {
        let ids: Vec<u64> = (1..=nodes).collect();
        let mut c = Cluster::new(&ids, limit, Admission::Bounded);
        c.run_until(T0 + 100);
        let mut first_admitted_by = BTreeMap::new();
        for client in 0..30 {
            let name = format!("burst-{client}");
            // Round-robin, all at one instant: no node hears of another's admissions.
            let per_node: Vec<u64> = (0..burst).map(|i| 1 + i % nodes).map(|n| u64::from(c.allow(n, &name)) * n).collect();
            let admitted = per_node.iter().filter(|&&n| n > 0).count() as u64;
            assert_eq!(admitted, limit.min(burst), "{nodes} nodes, limit {limit}, burst {burst}, client {client}");
            // The node that admitted the most took the remainder.
            let most = (1..=nodes).max_by_key(|n| (per_node.iter().filter(|&&m| m == *n).count(), *n)).unwrap();
            *first_admitted_by.entry(most).or_insert(0) += 1;
        }
        if limit % nodes != 0 && burst >= limit {
            assert!(first_admitted_by.len() > 1, "the remainder always went to one node: {first_admitted_by:?}");
        }
    }
}

#[test]
fn hostile_messages_are_counted_and_dropped_without_touching_state() {
    let mut c = Cluster::new(&[1, 2], 10, Admission::Optimistic);
    c.allow(1, "client");
    c.run_until(T0 + 100);
    let before = c.state(2);
    let node = c.nodes.get_mut(&2).unwrap();
    assert!(matches!(node.gossip.handle_message(9, b"\x01\x02", T0), Err(MessageError::UnknownPeer(9))));
    assert!(matches!(node.gossip.handle_message(1, b"", T0), Err(MessageError::Decode(_))));
    assert!(matches!(node.gossip.handle_message(1, &[0xFF; 64], T0), Err(MessageError::Decode(_))));
    assert!(matches!(node.gossip.handle_message(1, &vec![0; 2 << 20], T0), Err(MessageError::Decode(_))));
    let stats = node.gossip.stats().clone();
    assert_eq!((stats.unknown_peers, stats.decode_errors), (1, 3));
    assert_eq!(c.state(2), before);
}

#[test]
fn a_limits_change_on_one_node_is_in_force_on_all_three_within_a_round() {
    use crdt_rate_limiter::LimitsConfig;
    let mut c = Cluster::new(&[1, 2, 3], 5, Admission::Optimistic);
    c.run_until(T0 + 100);
    let cfg = LimitsConfig::from_toml(
        r#"
[default]
limit = 50
window_ms = 1000
[tiers.gold]
limit = 500
window_ms = 1000
[clients]
"acme" = { tier = "gold" }
"#,
    )
    .unwrap();
    let version = c.nodes[&2].gossip.limiter().apply_limits(cfg.clone()).unwrap();
    let changed_at = c.now;
    c.run_until(changed_at + 20 + LATENCY_MS);
    for id in [1, 2, 3] {
        let limiter = c.nodes[&id].gossip.limiter();
        assert_eq!(limiter.limits(), (version, Some(cfg.clone())), "node {id}");
        assert_eq!(limiter.quota().limit(), 50);
        assert_eq!(limiter.check("acme", c.now).unwrap().limit, 500);
        assert_eq!(limiter.check("someone", c.now).unwrap().limit, 50);
    }
    // An older version arriving late changes nothing: the latest change wins.
    let older = crdt_rate_limiter::limits::LimitsVersion { at_ms: version.at_ms - 1, node: 9 };
    assert!(older < version);
}

#[test]
fn a_node_that_was_partitioned_catches_up_on_limits_changed_meanwhile() {
    use crdt_rate_limiter::LimitsConfig;
    let mut c = Cluster::new(&[1, 2, 3], 5, Admission::Optimistic);
    c.run_until(T0 + 100);
    c.cut = vec![3];
    c.nodes[&1].gossip.limiter().apply_limits(LimitsConfig::new(Quota::new(7, Duration::from_secs(1)).unwrap())).unwrap();
    c.run_until(T0 + 400);
    assert_eq!(c.nodes[&3].gossip.limiter().quota().limit(), 5, "cut off");
    c.cut.clear();
    c.run_until(T0 + 500);
    assert_eq!(c.nodes[&3].gossip.limiter().quota().limit(), 7);
}

#[test]
fn pings_measure_round_trip_time_and_a_peers_clock_offset() {
    let mut c = Cluster::new(&[1, 2], 10, Admission::Optimistic);
    c.skew.insert(2, 50);
    c.run_until(T0 + 1_000);
    let of = |node: u64| c.nodes[&node].gossip.peer_stats()[0];
    assert_eq!(of(1).rtt_ms, Some(2 * LATENCY_MS));
    assert_eq!(of(1).clock_offset_ms, Some(50), "node 2 runs 50 ms ahead");
    assert_eq!(of(2).clock_offset_ms, Some(-50));
    let lag = c.nodes[&1].gossip.view_lag_ms(c.now);
    assert!((0..=20 + 2 * LATENCY_MS).contains(&lag), "lag {lag}");
}

/// The sliding log's buckets travel as windows of a tenth of the quota's: two nodes agree
/// on every bucket, including those older than the previous one, and both keep refusing
/// until the bucket that filled the limit has left every span.
#[test]
fn two_nodes_converge_on_the_sliding_logs_bucket_counts() {
    let mut c = Cluster::with_strategy(&[1, 2], 10, Admission::Optimistic, Strategy::SlidingLog);
    c.run_until(T0 + 900);
    let admitted = (0..6).filter(|_| c.allow(1, "client")).count();
    assert_eq!(admitted, 6);
    c.run_until(T0 + 1_000);
    let bucket = (T0 + 900) / 100;
    assert!(c.converged());
    let counts: Vec<_> = c.state(2).iter().map(|e| (e.window, e.replica.node, e.count)).collect();
    assert_eq!(counts, vec![(bucket, 1, 6)]);
    // Node 2, 600 ms later: the 6 are six buckets back, still in its span.
    c.run_until(T0 + 1_500);
    assert_eq!((0..10).filter(|_| c.allow(2, "client")).count(), 4);
    c.run_until(T0 + 1_950);
    assert!(!c.allow(1, "client") && !c.allow(2, "client"), "bucket {bucket} is still read at 1,950 ms");
    assert!(c.converged());
    let mut counts: Vec<_> = c.state(1).iter().map(|e| (e.window, e.replica.node, e.count)).collect();
    counts.sort();
    assert_eq!(counts, vec![(bucket, 1, 6), ((T0 + 1_500) / 100, 2, 4)]);
    // Bucket 9 leaves at 2,000 ms: six requests fit again, on either node.
    c.run_until(T0 + 2_000);
    assert_eq!((0..10).filter(|_| c.allow(1, "client")).count(), 6);
}

#[test]
fn anti_entropy_repairs_a_lost_sliding_log_bucket() {
    // The lost bucket is older than the previous one before anti-entropy runs.
    let c = lose_a_delta_then_repair(Strategy::SlidingLog);
    assert_eq!(c.state(2).iter().map(|e| (e.window, e.count)).collect::<Vec<_>>(), vec![(T0 / 100, 5)]);
}

#[test]
fn aggregated_dissemination_gives_every_writer_the_global_count_and_keeps_counts_at_few_nodes() {
    let ids: Vec<u64> = (1..=8).collect();
    let mut c = Cluster::aggregated(&ids, 1_000);
    c.run_until(T0 + 100);
    assert!(c.nodes.values().all(|n| n.gossip.aggregating()));
    // Nodes 1 to 6 count "a", 2 requests each; 7 and 8 never see it.
    for round in 0..2 {
        for node in 1..=6 {
            assert!(c.allow(node, "a"));
        }
        c.run_until(T0 + 120 + round * 20);
    }
    c.run_until(T0 + 200);
    for node in 1..=6 {
        assert_eq!(c.view(node, "a"), 12, "node {node}'s view");
    }
    // Each writer's count is held by the key's aggregators alone (2 by default), not by
    // every node as in full mesh.
    for writer in 1..=6u64 {
        let holders = ids.iter().filter(|&&n| n != writer && c.state(n).iter().any(|e| e.replica.node == writer)).count();
        assert!((1..=2).contains(&holders), "node {writer}'s count is held by {holders} other nodes");
    }
    let silent: Vec<u64> = ids.iter().copied().filter(|&n| c.state(n).iter().all(|e| e.replica.node == n)).collect();
    assert!(silent.len() >= 4, "only {silent:?} hold no other node's count");
}

/// Beyond `aggregator_pool` members, only the pool aggregates: every member ranks the
/// members alike, sends its counts to the pool and hears the totals from it, and a pool
/// member that goes silent is replaced by the next in rank, after which writers learn
/// the global count again.
#[test]
fn beyond_the_aggregator_pool_only_the_pool_aggregates_and_a_silent_member_is_replaced() {
    let ids: Vec<u64> = (1..=12).collect();
    let mut c = Cluster::pooled(&ids, 4);
    let clients: Vec<String> = (0..40).map(|i| format!("client-{i}")).collect();
    for &n in &ids {
        for client in &clients {
            assert!(c.allow(n, client));
        }
    }
    c.run_until(T0 + 300);
    for &n in &ids {
        for client in &clients {
            assert_eq!(c.view(n, client), 12, "node {n}'s view of {client}");
        }
    }
    // Forty keys over a pool of four: every pool member aggregates some, and no other
    // member holds another's count or publishes a total.
    let pool = c.aggregators(&ids);
    assert_eq!(pool.len(), 4, "the members that hold others' counts: {pool:?}");
    for &n in &ids {
        let published = c.nodes[&n].gossip.stats().totals_sent;
        assert_eq!(published > 0, pool.contains(&n), "node {n} sent {published} totals; pool {pool:?}");
    }
    // A pool member goes silent: once it is suspected, the next in rank takes its place.
    let gone = pool[0];
    c.cut = vec![gone];
    c.run_until(c.now + 1_000);
    let alive: Vec<u64> = ids.iter().copied().filter(|&n| n != gone).collect();
    for &n in &alive {
        for client in &clients {
            assert!(c.allow(n, client));
        }
    }
    c.run_until(c.now + 300);
    for &n in &alive {
        for client in &clients {
            // The 12 counts from before (the silent member's own included, held by the
            // members of the old pool) and 11 new ones.
            let view = c.view(n, client);
            assert!((22..=23).contains(&view), "node {n}'s view of {client}: {view}");
        }
    }
    let holders_of_new: Vec<u64> = alive
        .iter()
        .copied()
        .filter(|&h| c.state(h).iter().any(|e| e.replica.node != h && e.count >= 2 && e.replica.node != gone))
        .collect();
    assert_eq!(holders_of_new.len(), 4, "the members that hold others' new counts: {holders_of_new:?}");
    assert!(holders_of_new.iter().all(|h| *h != gone));
    let newcomer: Vec<u64> = holders_of_new.iter().copied().filter(|h| !pool.contains(h)).collect();
    assert_eq!(newcomer.len(), 1, "the pool after {gone} went silent: {holders_of_new:?}, before: {pool:?}");
}

/// A member outside the aggregator pool that comes back from a partition learns the
/// totals of keys that went quiet meanwhile from their first aggregators at once, not
/// at the next periodic resend: its full syncs carry no counts (it aggregates nothing)
/// and its return does not change the ring.
#[test]
fn a_member_outside_the_pool_back_from_a_partition_hears_quiet_keys_totals_at_once() {
    let ids: Vec<u64> = (1..=12).collect();
    // The heal at ten phases of the anti-entropy period (ten rounds).
    for phase in 0..10 {
        let mut c = Cluster::pooled(&ids, 4);
        for &n in &ids {
            for i in 0..40 {
                assert!(c.allow(n, &format!("warm-{i}")));
            }
        }
        c.run_until(T0 + 300);
        let pool = c.aggregators(&ids);
        assert_eq!(pool.len(), 4, "{pool:?}");
        let x = ids.iter().copied().find(|n| !pool.contains(n)).unwrap();
        c.cut = vec![x];
        c.run_until(c.now + 1_000 + phase * 20);
        let others: Vec<u64> = ids.iter().copied().filter(|&n| n != x).collect();
        for &n in &others {
            assert!(c.allow(n, "quiet"));
        }
        c.run_until(c.now + 300);
        c.cut = Vec::new();
        let healed = c.now;
        c.run_until(healed + 100);
        assert_eq!(c.view(x, "quiet"), 11, "phase {phase}: node {x}'s view 100 ms after the heal; pool {pool:?}");
    }
}

/// Eight aggregated nodes `ids` that each counted "b" once, 60 ms later: the cluster, and
/// the nodes that hold another's count of "b" (its aggregators).
fn eight_that_counted_b(ids: &[u64]) -> (Cluster, Vec<u64>) {
    let mut c = Cluster::aggregated(ids, 1_000);
    c.run_until(T0 + 100);
    for &node in ids {
        assert!(c.allow(node, "b"));
    }
    c.run_until(T0 + 160);
    let aggregators = c.aggregators(ids);
    (c, aggregators)
}

#[test]
fn an_aggregator_that_dies_is_replaced_and_writers_learn_the_global_count_again() {
    let ids: Vec<u64> = (1..=8).collect();
    let (mut c, aggregators) = eight_that_counted_b(&ids);
    // Cut off every node that holds another's count of "b": its aggregators.
    assert!(!aggregators.is_empty() && aggregators.len() <= 2, "{aggregators:?}");
    c.cut = aggregators.clone();
    let writers: Vec<u64> = ids.iter().copied().filter(|n| !aggregators.contains(n)).collect();
    // They are suspected after four cycles of two targets among seven peers (16 rounds);
    // meanwhile and after, the others keep counting.
    for step in 0..30 {
        for &w in &writers {
            if step % 10 == 0 {
                assert!(c.allow(w, "b"));
            }
        }
        let t = c.now + 20;
        c.run_until(t);
    }
    c.run_until(c.now + 200);
    // Every surviving writer counted 1 + 3; the aggregators' own count of 1 each was
    // sent to the other aggregator (if any) and to no writer: it may be missing.
    let made = 4 * writers.len() as u64;
    for &w in &writers {
        let view = c.view(w, "b");
        assert!(view >= made && view <= made + aggregators.len() as u64, "node {w} decides on {view}, survivors made {made}");
    }
}

/// Eight aggregated nodes `ids` with a one-minute window (every count of a test stays in
/// one window) that each counted `client` once, 30 ms ago.
fn eight_in_one_window_that_counted(ids: &[u64], client: &str) -> Cluster {
    let mut c = Cluster::aggregated_with_window(ids, 1_000_000, 60_000);
    c.run_until(T0 + 200);
    for &n in ids {
        assert!(c.allow(n, client));
    }
    c.run_until(T0 + 230);
    c
}

/// Between full resends (every `FULL_RESEND_PERIODS` anti-entropy periods) a period's
/// resend sends once more only what went quiet since the last: a count or total of a
/// busy key is not resent (its next change supersedes a lost one), a writer's lost last
/// count is, at the next period, and nothing of other replicas' counts.
#[test]
fn between_full_resends_only_what_went_quiet_goes_again_once_and_a_lost_last_count_is_repaired() {
    let ids: Vec<u64> = (1..=8).collect();
    let mut c = eight_in_one_window_that_counted(&ids, "busy");
    let aggregators = c.aggregators(&ids);
    assert_eq!(aggregators.len(), 2, "{aggregators:?}");
    let writers: Vec<u64> = ids.iter().copied().filter(|n| !aggregators.contains(n)).collect();
    let w = writers[0];
    let stats = |c: &Cluster| aggregators.iter().map(|a| c.nodes[a].gossip.stats().clone()).collect::<Vec<_>>();
    let mut before = Vec::new();
    // The writers count "busy" every round, rounds 12 to 42: the anti-entropy periods
    // start at rounds 20, 30 and 40, the next full resend at 50. In the first round,
    // the one count of "quiet" a writer makes is lost on the wire.
    let steps = 31;
    for step in 0..steps {
        c.cut = if step == 0 { vec![w] } else { Vec::new() };
        if step == 0 {
            assert!(c.allow(w, "quiet"));
        }
        for &n in &writers {
            assert!(c.allow(n, "busy"));
        }
        let t = c.now + 20;
        c.run_until(t);
        if step == 1 {
            before = stats(&c);
        }
        if c.now == T0 + 370 {
            assert_eq!(c.view(aggregators[0], "quiet"), 0, "lost, and not yet repaired");
        }
    }
    assert!(c.now < T0 + 50 * 20, "before the full resend");
    let after = stats(&c);
    // The lost count reached every member at the period that followed it.
    for node in ids.iter().copied().filter(|&n| n != w) {
        assert_eq!(c.view(node, "quiet"), 1, "node {node}'s view of the lost count");
    }
    // The aggregators count nothing in these rounds: their own counts of "busy" (from
    // before) went quiet and went again once each; resending them every period would
    // have made it 6, and the six writers' counts 42 more.
    let counts_sent: u64 = (0..2).map(|i| after[i].entries_sent - before[i].entries_sent).sum();
    assert!(counts_sent <= 2, "the aggregators sent {counts_sent} counts");
    // The first aggregator of "busy" sends one total of it per round to each of the 7
    // other members, and no more (each period's resend of it would add 7); "quiet" to
    // the 7 at most twice (published, then once more as gone quiet). The standby sends
    // no total while the first is heard (its resends to the 7 writers would add 21).
    let totals: Vec<u64> = (0..2).map(|i| after[i].totals_sent - before[i].totals_sent).collect();
    let (first, standby) = (totals[0].max(totals[1]), totals[0].min(totals[1]));
    let rounds = steps as u64 - 2;
    assert!(first <= rounds * 7 + 2 * 7, "{first} totals sent in {rounds} rounds");
    assert!(first >= (rounds - 1) * 7, "{first} totals sent in {rounds} rounds");
    assert!(standby <= 7, "the standby sent {standby} totals");
}

/// A member cut off for longer than an anti-entropy period (not long enough to be
/// suspected): its count made at the start of the cut reaches every member within rounds
/// of the cut's end, when the key's aggregators hear from it again and it from them, not
/// at the next full resend (nor with the key's next change, which does not come).
#[test]
fn a_count_lost_in_a_silence_longer_than_a_period_is_resent_when_the_peers_hear_each_other_again() {
    let ids: Vec<u64> = (1..=8).collect();
    let mut c = Cluster::new(&[], 1_000_000, Admission::Optimistic);
    (c.aggregated, c.window_ms, c.suspect_after_ms) = (true, 60_000, Some(1_000));
    for &id in &ids {
        c.start(id, 1, &ids);
    }
    c.run_until(T0 + 200);
    let w = 3;
    let syncs = |c: &Cluster| ids.iter().map(|n| c.nodes[n].gossip.stats().full_syncs_sent).sum::<u64>();
    let synced = syncs(&c);
    // Rounds 11 to 21 (220 ms; a period is 200 ms, suspicion here 1 s): everything to
    // and from the writer is lost. The others go on counting, so no view goes quiet.
    for step in 0..20 {
        c.cut = if step < 11 { vec![w] } else { Vec::new() };
        if step == 0 {
            assert!(c.allow(w, "quiet"));
        }
        for &n in &ids {
            assert!(c.allow(n, "busy"));
        }
        let t = c.now + 20;
        c.run_until(t);
        if step == 10 {
            assert!(ids.iter().filter(|&&n| n != w).all(|&n| c.view(n, "quiet") == 0), "lost in the cut");
        }
    }
    assert!(c.now <= T0 + 600, "long before the full resend, at round 50");
    for node in ids.iter().copied().filter(|&n| n != w) {
        assert_eq!(c.view(node, "quiet"), 1, "node {node}'s view of the count made in the cut");
    }
    // No member was held down meanwhile: one that comes up gets a full sync.
    assert_eq!(syncs(&c), synced, "no full sync");
}

/// Eight nodes that counted "k" in one window; then five more counts of a writer that is
/// not one of the key's two aggregators reach the first of them only. Returns the
/// cluster, the key's hash, the writer, and the aggregators that hold 6 and 1 of its
/// counts.
fn five_more_counts_reach_one_aggregator(ids: &[u64]) -> (Cluster, u64, u64, u64, u64) {
    let mut c = eight_in_one_window_that_counted(ids, "k");
    let key = c.nodes[&1].gossip.limiter().key_hash("k");
    let holders: Vec<u64> = ids.iter().copied().filter(|&n| c.state(n).iter().any(|e| e.key == key && e.replica.node != n)).collect();
    assert_eq!(holders.len(), 2, "{holders:?}");
    let w = ids.iter().copied().find(|n| !holders.contains(n)).unwrap();
    let (a, b) = (holders[0], holders[1]);
    c.cut_links = vec![(w, b)];
    for _ in 0..5 {
        assert!(c.allow(w, "k"));
    }
    let t = c.now + 20;
    c.run_until(t);
    c.cut_links.clear();
    (c, key, w, a, b)
}

/// A writer restarts right after a count reached only one of its key's aggregators: its
/// old incarnation is gone and resends nothing, so only that aggregator can pass the
/// count on. It does at the next anti-entropy period, as it did before full resends
/// came only every `FULL_RESEND_PERIODS` periods, not at the next full one.
#[test]
fn a_gone_incarnations_count_held_by_one_aggregator_reaches_the_other_within_a_period() {
    let ids: Vec<u64> = (1..=8).collect();
    let (mut c, key, w, a, b) = five_more_counts_reach_one_aggregator(&ids);
    // Then the writer restarts.
    c.start(w, 2, &ids);
    let gone = ReplicaId { node: w, incarnation: 1 };
    let held = |c: &Cluster, n: u64| c.state(n).iter().find(|e| e.key == key && e.replica == gone).map_or(0, |e| e.count);
    assert_eq!((held(&c, a), held(&c, b)), (6, 1));
    // The others count every round, so no view goes quiet (which resends everything);
    // the anti-entropy periods start at rounds 20 and 30, the full resend at 50.
    while c.now < T0 + 600 {
        for &n in ids.iter().filter(|&&n| n != w) {
            assert!(c.allow(n, "busy"));
        }
        let t = c.now + 20;
        c.run_until(t);
    }
    assert!(c.now < T0 + 50 * 20, "before the full resend");
    assert_eq!(held(&c, b), 6, "node {b} holds the gone incarnation's count");
}

/// A writer crashes right after a count reached only one of its key's aggregators. While
/// it is not yet suspected it stands for a live peer that resends its own counts, so
/// partial resends leave its count out; once the others suspect it (and their rings drop
/// it), the aggregator that holds the count passes it on within a period.
#[test]
fn a_crashed_writers_count_held_by_one_aggregator_reaches_the_other_once_it_is_suspected() {
    let ids: Vec<u64> = (1..=8).collect();
    let (mut c, key, w, a, b) = five_more_counts_reach_one_aggregator(&ids);
    // The writer crashes: nothing from it or to it from now on.
    c.cut = vec![w];
    let writer = ReplicaId { node: w, incarnation: 1 };
    let held = |c: &Cluster, n: u64| c.state(n).iter().find(|e| e.key == key && e.replica == writer).map_or(0, |e| e.count);
    assert_eq!((held(&c, a), held(&c, b)), (6, 1));
    let (mut suspected, mut reached) = (None, None);
    while c.now < T0 + 2_000 && reached.is_none() {
        // The others count every round: no view goes quiet (which resends everything).
        for &n in ids.iter().filter(|&&n| n != w) {
            assert!(c.allow(n, "busy"));
        }
        let t = c.now + 20;
        c.run_until(t);
        if suspected.is_none() && [a, b].iter().all(|&n| !c.nodes[&n].gossip.live_peers().any(|p| p == w)) {
            suspected = Some(c.now);
        }
        if held(&c, b) == 6 {
            reached = Some(c.now);
        }
    }
    let Some(suspected) = suspected else { panic!("the crashed writer was never suspected (its count reached node {b}: {reached:?})") };
    let Some(reached) = reached else { panic!("node {b} never got the crashed writer's count") };
    // The case this test is for: until the suspicion only one aggregator held the count.
    assert!(reached > suspected, "the count reached node {b} at {reached}, before the writer was suspected at {suspected}");
    assert!(reached <= suspected + 10 * 20, "within a period of the suspicion: reached at {reached}, suspected at {suspected}");
}

/// A key's first aggregator goes silent (or its standby does) while the writers count
/// every round, so no view goes quiet and no resend comes. The standby holds the same
/// counts and publishes what it sees no total for within two rounds, so the writers'
/// views lag by at most four rounds, long before the 16 rounds after which the silent
/// member is suspected and the ring moves.
#[test]
fn a_standby_aggregator_publishes_for_a_first_aggregator_gone_silent_within_rounds() {
    let ids: Vec<u64> = (1..=8).collect();
    for silent in 0..2 {
        let (mut c, aggregators) = eight_that_counted_b(&ids);
        assert_eq!(aggregators.len(), 2, "{aggregators:?}");
        c.cut = vec![aggregators[silent]];
        let writers: Vec<u64> = ids.iter().copied().filter(|n| !aggregators.contains(n)).collect();
        for round in 1..=12u64 {
            for &w in &writers {
                assert!(c.allow(w, "b"));
            }
            let t = c.now + 20;
            c.run_until(t);
            // 8 before the cut, and every writer's counts of the rounds four back.
            let seen = 8 + writers.len() as u64 * round.saturating_sub(4);
            for &w in &writers {
                let view = c.view(w, "b");
                assert!(
                    view >= seen,
                    "aggregator {} silent, round {round}: node {w}'s view {view}, made {seen} by four rounds ago",
                    aggregators[silent]
                );
            }
        }
    }
}

/// The same when only the standby counts the key (sticky routing puts its client on
/// the standby alone): what changes is its own count, which no total it hears holds, so
/// it watches the first aggregator itself; silent for two rounds since the change, the
/// standby publishes, and the others' views lag by at most four rounds.
#[test]
fn a_standby_that_alone_counts_a_key_publishes_for_a_first_aggregator_gone_silent() {
    let ids: Vec<u64> = (1..=8).collect();
    let (mut c, aggregators) = eight_that_counted_b(&ids);
    assert_eq!(aggregators.len(), 2, "{aggregators:?}");
    c.cut = vec![aggregators[0]];
    let standby = aggregators[1];
    let others: Vec<u64> = ids.iter().copied().filter(|n| !aggregators.contains(n)).collect();
    for round in 1..=12u64 {
        assert!(c.allow(standby, "b"));
        let t = c.now + 20;
        c.run_until(t);
        // 8 before the cut, and the standby's counts of the rounds four back.
        let seen = 8 + round.saturating_sub(4);
        for &w in &others {
            let view = c.view(w, "b");
            assert!(view >= seen, "round {round}: node {w}'s view {view}, made {seen} by four rounds ago");
        }
    }
}

/// A member that restarts while a key's first aggregator is dead but not yet suspected
/// (in SWIM mode SWIM's verdict can take seconds) hears the key's total from the standby:
/// a standby stands in, in its resends and syncs, for a first aggregator not heard from
/// within two heartbeat cycles. Before, a member that does not write a key (one that
/// restarted writes nothing yet) heard its total from the first aggregator only, so a
/// key that had stopped changing stayed at 0 in its view until the ring moved.
#[test]
fn a_member_restarting_while_a_first_aggregator_is_silent_hears_the_total_from_the_standby() {
    let ids: Vec<u64> = (1..=8).collect();
    for cut in 0..2 {
        let (mut c, aggregators) = eight_that_counted_b(&ids);
        assert_eq!(aggregators.len(), 2, "{aggregators:?}");
        let silent = aggregators[cut];
        c.cut = vec![silent];
        let w = ids.iter().copied().find(|n| !aggregators.contains(n)).unwrap();
        // Nine rounds of silence (two heartbeat cycles of two targets among seven peers
        // are eight), then `w` restarts with nothing.
        c.run_until(c.now + 180);
        c.start(w, 2, &ids);
        c.run_until(c.now + 60);
        let suspected = c.events.values().flatten().any(|e| matches!(e, Event::PeerDown { peer, .. } if *peer == silent));
        assert!(!suspected, "node {silent} is not suspected yet: the ring has not moved");
        // Every count of "b", its own old incarnation's included (another's, to it now).
        assert_eq!(c.view(w, "b"), 8, "node {silent} silent: node {w}'s view after it restarted");
    }
}

/// A key's aggregators are cut off long enough to be replaced; a writer's counts reach
/// the replacements; the writer dies; the old aggregators come back and are the key's
/// aggregators again. They must get the dead writer's counts from the replacements
/// (a full sync to a member that comes up carries every replica's counts of the keys it
/// aggregates, and so does the full periodic resend), or every total would leave them out for
/// good and hide the live writers' new counts behind the higher total heard before.
#[test]
fn a_dead_writers_counts_follow_its_key_to_aggregators_that_come_back() {
    let ids: Vec<u64> = (1..=8).collect();
    let mut c = Cluster::aggregated_with_window(&ids, 100_000, 10_000);
    let mut made = 0;
    c.run_until(T0 + 100);
    for node in 1..=8 {
        assert!(c.allow(node, "k"));
        made += 1;
    }
    c.run_until(T0 + 200);
    let aggregators = c.aggregators(&ids);
    assert!(!aggregators.is_empty() && aggregators.len() <= 2, "{aggregators:?}");
    let writer = *ids.iter().find(|n| !aggregators.contains(n)).unwrap();
    // Cut the aggregators off until every other member has replaced them.
    c.cut = aggregators.clone();
    c.run_until(T0 + 700);
    for _ in 0..50 {
        assert!(c.allow(writer, "k"));
        made += 1;
    }
    c.run_until(T0 + 900);
    // The writer dies; the aggregators come back.
    c.cut = vec![writer];
    c.run_until(T0 + 1_600);
    let survivors: Vec<u64> = ids.iter().copied().filter(|&n| n != writer).collect();
    for &n in &survivors {
        for _ in 0..8 {
            assert!(c.allow(n, "k"));
            made += 1;
        }
    }
    c.run_until(T0 + 2_200);
    for &n in &survivors {
        assert_eq!(c.view(n, "k"), made, "node {n}'s view (aggregators {aggregators:?}, dead writer {writer})");
    }
}

/// With its cell budget spent (a key cap of 1 leaves 8 cells), an aggregator keeps the
/// counts of replicas it has no cell for only in the window's total, which every resend
/// adds to again: its own view of the key is stricter than the truth, as documented for
/// counts without a cell. Those counts must not reach the totals it publishes, or every
/// member's view would be inflated with it (a change that published them had every view
/// at 13 times the truth here).
#[test]
fn counts_an_aggregator_holds_without_a_cell_do_not_inflate_the_totals_it_publishes() {
    let ids: Vec<u64> = (1..=12).collect();
    let mut c = Cluster::new(&[], 100_000, Admission::Optimistic);
    (c.aggregated, c.window_ms, c.max_keys) = (true, 10_000, Some(1));
    for &id in &ids {
        c.start(id, 1, &ids);
    }
    let mut made = 0;
    let mut t = T0 + 100;
    for _ in 0..20 {
        c.run_until(t);
        for &n in &ids {
            assert!(c.allow(n, "k"));
            made += 1;
        }
        t += 100;
    }
    c.run_until(t + 1_500);
    let aggregators = c.aggregators(&ids);
    assert!(!aggregators.is_empty());
    for &n in ids.iter().filter(|n| !aggregators.contains(n)) {
        let view = c.view(n, "k");
        assert!(view <= made, "node {n} decides on {view}; {made} were made");
        assert!(view > 0, "node {n} heard a total");
    }
}

/// A partial view: with `swim_above_peers` at 16 and a pool of 4 in a cluster of 24, a
/// member outside the pool sends the other members outside it nothing but SWIM's packets
/// (no heartbeats in turn, no clock samples), so the transport need not keep connections
/// to them. No member is taken down for it, however long it runs, and a member cut off is
/// still taken down by every other within 3 s, by SWIM.
#[test]
fn beyond_swim_above_peers_members_outside_the_pool_hear_from_each_other_through_swim_alone() {
    let ids: Vec<u64> = (1..=24).collect();
    let mut c = Cluster::swim_pooled(&ids);
    c.run_until(T0 + 2_000);
    c.sent.clear();
    c.run_until(T0 + 6_000);
    // The pool: the members every member sends to each round.
    let to = |m: u64| ids.iter().filter(|&&n| n != m).map(|&n| c.sent.get(&(n, m)).copied().unwrap_or(0)).min().unwrap();
    let pool: Vec<u64> = ids.iter().copied().filter(|&m| to(m) >= 30).collect();
    assert_eq!(pool.len(), 4, "{:?}", ids.iter().map(|&m| to(m)).collect::<Vec<_>>());
    let outside: Vec<u64> = ids.iter().copied().filter(|m| !pool.contains(m)).collect();
    // In 4 s: SWIM probes each member once per cycle over the 23 (4.6 s) and answers
    // those it gets; indirect probes and the asks after a verdict add a few.
    let most = outside.iter().flat_map(|&a| outside.iter().map(move |&b| (a, b))).map(|k| c.sent.get(&k).copied().unwrap_or(0)).max();
    assert!(most.unwrap() <= 8, "messages from one member outside the pool to another in 4 s: {most:?}");
    for &n in &ids {
        assert_eq!(c.nodes[&n].gossip.live_peers().count(), 23, "node {n}");
        // The view's staleness is the pool's: a member outside the pool hears from the
        // others only through SWIM, every few seconds, but their counts come through it.
        let lag = c.nodes[&n].gossip.view_lag_ms(c.now);
        assert!(lag <= 300, "node {n}: view lag {lag} ms");
    }
    // Longer than four SWIM cycles (the backstop outside the view, 19.2 s): nobody down.
    c.run_until(T0 + 30_000);
    for &n in &ids {
        assert!(downs(&c, n).is_empty(), "node {n} took a live member down: {:?}", downs(&c, n));
        assert_eq!(c.nodes[&n].gossip.live_peers().count(), 23, "node {n}");
    }
    // A pool member fails: the next in rank joins every member's pool, and no member is
    // taken down for not having heartbeated it (each member judges by SWIM cycles, not
    // by its view of who heartbeats whom, which changes here).
    c.events.clear();
    let failed = pool[0];
    c.cut = vec![failed];
    c.run_until(c.now + 8_000);
    for &n in ids.iter().filter(|&&n| n != failed) {
        assert_eq!(downs(&c, n), vec![failed], "node {n}");
    }
    let cut = outside[0];
    c.cut = vec![failed, cut];
    let cut_at = c.now;
    while c.now < cut_at + 3_000 && ids.iter().any(|&n| ![cut, failed].contains(&n) && c.nodes[&n].gossip.live_peers().any(|p| p == cut)) {
        c.run_until(c.now + 10);
    }
    let late: Vec<u64> =
        ids.iter().copied().filter(|&n| ![cut, failed].contains(&n) && c.nodes[&n].gossip.live_peers().any(|p| p == cut)).collect();
    assert!(late.is_empty(), "still up 3 s after the cut at {late:?}");
}

/// A cluster with a partial view that shrinks out of SWIM mode (24 members, SWIM beyond 16
/// peers, a pool of 4; 7 leave): nobody is taken down for the silence of SWIM mode, and
/// from then on a crash is noticed by silence again, within a second (not after the
/// several SWIM cycles silence is judged over in SWIM mode).
#[test]
fn a_cluster_that_shrinks_out_of_swim_mode_notices_a_crash_by_silence_again() {
    let ids: Vec<u64> = (1..=24).collect();
    let mut c = Cluster::swim_pooled(&ids);
    c.run_until(T0 + 4_000);
    c.events.clear();
    // Seven leave (the driver removes a member that leaves from every other at once).
    for gone in 18..=24u64 {
        c.nodes.remove(&gone);
        for n in c.nodes.values_mut() {
            n.gossip.remove_peer(gone);
        }
    }
    c.wire.retain(|_, (from, to, _)| *from < 18 && *to < 18);
    c.run_until(c.now + 2_000);
    for n in 1..=17 {
        assert!(downs(&c, n).is_empty(), "node {n} took a live member down: {:?}", downs(&c, n));
        assert_eq!(c.nodes[&n].gossip.live_peers().count(), 16, "node {n}");
    }
    c.cut = vec![5];
    let cut_at = c.now;
    c.run_until(cut_at + 1_000);
    for n in (1..=17).filter(|&n| n != 5) {
        assert_eq!(downs(&c, n), vec![5], "node {n}, a second after the crash");
    }
}

/// The events `node`'s core reported (since they were last cleared).
fn events_of(c: &Cluster, node: u64) -> &[Event] {
    c.events.get(&node).map_or(&[][..], |e| &e[..])
}

/// The peers `node`'s core took down, in order.
fn downs(c: &Cluster, node: u64) -> Vec<u64> {
    events_of(c, node).iter().filter_map(|e| if let Event::PeerDown { peer, .. } = e { Some(*peer) } else { None }).collect()
}

/// What `node`'s core reported learning through SWIM: (member, incarnation, address).
fn learned(c: &Cluster, node: u64) -> Vec<(u64, u64, std::net::SocketAddr)> {
    events_of(c, node)
        .iter()
        .filter_map(|e| if let Event::MemberLearned { peer, incarnation, addr } = e { Some((*peer, *incarnation, *addr)) } else { None })
        .collect()
}

/// Membership by infection. Nineteen members in SWIM mode (beyond 16 peers); a newcomer,
/// 20, joins (a later start: a higher incarnation), and every member adds it (as its
/// driver does on the newcomer's hello) but member 1, which is never told of it, and the
/// two cannot talk. Member 1 learns of it, and of the address it is reached at, through
/// SWIM's piggybacking alone; the newcomer learns of member 1 the same way. Then member 5
/// restarts, and member 1 cannot talk to the new process: it learns of the restart, and
/// where the new process is reached, through SWIM alone too.
#[test]
fn beyond_swim_above_peers_a_member_learns_of_a_newcomer_and_its_address_through_swim_alone() {
    let ids: Vec<u64> = (1..=19).collect();
    let mut c = Cluster::new(&[], 100, Admission::Bounded);
    (c.swim_above, c.addresses) = (Some(16), true);
    for &id in &ids {
        c.start(id, 1, &ids);
    }
    c.run_until(T0 + 2_000);
    c.cut_links = vec![(1, 20), (20, 1)];
    let known: Vec<u64> = (2..=20).collect();
    c.start(20, 2, &known);
    for n in 2..=19 {
        let g = &mut c.nodes.get_mut(&n).unwrap().gossip;
        g.add_peer(20);
        g.set_peer_address(20, addr_of(20));
    }
    c.run_until(c.now + 3_000);
    for n in 2..=19 {
        assert_eq!(learned(&c, n), vec![], "node {n} knew every member");
        assert!(c.nodes[&n].gossip.live_peers().any(|p| p == 20), "node {n}");
    }
    assert_eq!(learned(&c, 1), vec![(20, 2, addr_of(20))]);
    assert_eq!(learned(&c, 20), vec![(1, 1, addr_of(1))]);
    c.events.clear();
    c.cut_links.extend([(1, 5), (5, 1)]);
    let all: Vec<u64> = (1..=20).collect();
    c.start(5, 3, &all);
    c.run_until(c.now + 3_000);
    assert!(learned(&c, 1).contains(&(5, 3, addr_of(5))), "{:?}", learned(&c, 1));
}

/// A graceful leave in SWIM mode (`GossipNode::leave`) is gossiped by SWIM: in 24
/// members with a pool of 4 (a partial view beyond 18 peers), every member takes the
/// leaver down sooner than a crash of the same member is noticed (after SWIM's suspicion
/// period), and within a second; a member of the pool, and one outside it, whose leave
/// goes to the members of its view (readdressed: foca reads the updates of a packet only
/// if it is the addressee).
#[test]
fn beyond_swim_above_peers_a_leave_is_noticed_everywhere_sooner_than_a_crash() {
    let ids: Vec<u64> = (1..=24).collect();
    let c = {
        let mut c = Cluster::swim_pooled(&ids);
        c.run_until(T0 + 4_000);
        c
    };
    let in_pool = |n: u64| c.nodes[&n].gossip.in_aggregator_pool();
    let pooled = ids.iter().copied().find(|&n| in_pool(n)).unwrap();
    let outside = ids.iter().copied().rev().find(|&n| !in_pool(n)).unwrap();
    assert_eq!(ids.iter().filter(|&&n| in_pool(n)).count(), 4);
    for leaver in [pooled, outside] {
        let mut slowest = Vec::new();
        for leave in [true, false] {
            let mut c = Cluster::swim_pooled(&ids);
            c.run_until(T0 + 4_000);
            c.events.clear();
            if leave {
                let now = c.now;
                let before = c.sent.clone();
                c.nodes.get_mut(&leaver).unwrap().gossip.leave(now);
                c.flush();
                let to: Vec<u64> = c
                    .sent
                    .iter()
                    .filter(|(&(from, to), &k)| from == leaver && before.get(&(from, to)) != Some(&k))
                    .map(|(&(_, to), _)| to)
                    .collect();
                assert!(!to.is_empty() && to.len() <= 3, "member {leaver}: its leave went to {to:?}");
                if leaver == outside {
                    assert!(to.iter().all(|&p| in_pool(p)), "member {leaver}, outside the pool: its leave went to {to:?}, not its view");
                }
            }
            c.cut = vec![leaver];
            let at = c.now;
            let mut noticed = BTreeMap::new();
            while noticed.len() < 23 && c.now < at + 10_000 {
                c.run_until(c.now + 10);
                for n in ids.iter().copied().filter(|&n| n != leaver) {
                    if downs(&c, n).contains(&leaver) {
                        noticed.entry(n).or_insert(c.now - at);
                    }
                }
            }
            assert_eq!(noticed.len(), 23, "member {leaver}, leave {leave}: {noticed:?}");
            slowest.push(*noticed.values().max().unwrap());
        }
        assert!(slowest[0] < slowest[1] && slowest[0] <= 1_000, "member {leaver}: slowest to notice, leave then crash: {slowest:?} ms");
    }
}

/// With `swim_above_peers` at 16, SWIM decides liveness in a cluster of 24: a member cut
/// off is marked down by every other within 3 s, no other member is (no loss here), and
/// once the cut heals it is back up everywhere within a second, with no member marked
/// down by the isolated one's stale verdicts.
#[test]
fn beyond_swim_above_peers_swim_marks_a_silent_member_down_everywhere_and_up_again_when_it_returns() {
    let ids: Vec<u64> = (1..=24).collect();
    let mut c = Cluster::new(&[], 100, Admission::Bounded);
    c.swim_above = Some(16);
    for &id in &ids {
        c.start(id, 1, &ids);
    }
    c.run_until(T0 + 2_000);
    for &n in &ids {
        assert_eq!(c.nodes[&n].gossip.swim_members(), Some(23), "node {n}");
        assert_eq!(c.nodes[&n].gossip.live_peers().count(), 23, "node {n}");
        assert!(c.nodes[&n].gossip.stats().swim_sent > 0, "node {n}");
    }
    for &n in &ids {
        assert!(downs(&c, n).is_empty(), "node {n} suspected a live member: {:?}", downs(&c, n));
    }
    c.events.clear();
    c.cut = vec![24];
    let cut_at = c.now;
    let mut noticed = BTreeMap::new();
    while noticed.len() < 23 && c.now < cut_at + 6_000 {
        c.run_until(c.now + 10);
        for n in 1..=23 {
            if !c.nodes[&n].gossip.live_peers().any(|p| p == 24) {
                noticed.entry(n).or_insert(c.now - cut_at);
            }
        }
    }
    // A probe period (200 ms) until someone probes it, another for the direct and
    // indirect probes, the suspicion (4 · log10 24 periods: 1.1 s), a few periods for the
    // verdict to spread by infection and two in which each member asks it first; silence
    // (23 rounds, 460 ms) is the backstop: 0.5–0.8 s
    // here.
    assert_eq!(noticed.len(), 23, "{noticed:?}");
    assert!(noticed.values().all(|&ms| ms <= 3_000), "{noticed:?}");
    for n in 1..=23 {
        assert_eq!(downs(&c, n), vec![24], "node {n}");
        assert!(!c.nodes[&n].gossip.live_peers().any(|p| p == 24), "node {n}");
    }
    c.events.clear();
    c.cut.clear();
    c.run_until(c.now + 1_000);
    for n in 1..=23 {
        assert!(c.nodes[&n].gossip.live_peers().any(|p| p == 24), "node {n} still holds 24 down");
        assert!(c.events[&n].iter().any(|e| matches!(e, Event::PeerUp { peer: 24, .. })), "node {n}");
        assert!(downs(&c, n).is_empty(), "node {n}: {:?}", c.events[&n]);
    }
    assert_eq!(c.nodes[&24].gossip.live_peers().count(), 23);
}
