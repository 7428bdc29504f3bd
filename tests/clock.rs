//! A clock that steps back and forward again must not hand out a second quota.

use std::time::Duration;

use crdt_rate_limiter::{ManualClock, Quota, RateLimiter, Strategy};

const T: i64 = 1_700_000_020_000; // inside a 60 s window, 40 s from its start

fn limiter(strategy: Strategy) -> (RateLimiter, ManualClock) {
    let clock = ManualClock::new(T);
    let rl = RateLimiter::builder()
        .quota(Quota::new(10, Duration::from_secs(60)).unwrap())
        .strategy(strategy)
        .clock(clock.clone())
        .build()
        .unwrap();
    (rl, clock)
}

fn admitted(rl: &RateLimiter, ts: i64, offered: usize) -> usize {
    (0..offered).filter(|_| rl.allow("c", ts)).count()
}

#[test]
fn a_clock_stepped_back_and_forward_again_gives_no_second_quota() {
    for strategy in [Strategy::FixedWindow, Strategy::SlidingWindow, Strategy::TokenBucket] {
        let (rl, clock) = limiter(strategy);
        assert_eq!(admitted(&rl, T, 15), 10, "{strategy:?}: the quota at T");
        assert_eq!(rl.clock_steps_back(), 0);
        // The clock steps back 120 s: two windows earlier.
        clock.set_ms(T - 120_000);
        let back = admitted(&rl, T - 120_000, 15);
        assert!(back <= 10, "{strategy:?}: at most one quota while the clock is behind, got {back}");
        assert_eq!(rl.clock_steps_back(), 1, "{strategy:?}: the step back is detected once");
        // Back at T: the window's ten admissions still count.
        clock.set_ms(T);
        assert_eq!(admitted(&rl, T, 15), 0, "{strategy:?}: no second quota at T");
        assert_eq!(rl.clock_steps_back(), 1, "{strategy:?}: moving forward again is no step back");
        // The next window is a fresh one.
        clock.set_ms(T + 60_000);
        assert!(rl.allow("c", T + 60_000), "{strategy:?}: the next window admits again");
    }
}

#[test]
fn a_step_back_within_the_tolerance_is_no_event() {
    let (rl, clock) = limiter(Strategy::FixedWindow);
    assert_eq!(admitted(&rl, T, 10), 10);
    clock.set_ms(T - 1_500); // under the 2 s clock-skew tolerance
    assert_eq!(admitted(&rl, T - 1_500, 5), 0, "the window's counts still hold");
    assert_eq!(rl.clock_steps_back(), 0);
}

mod cluster {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use crdt_rate_limiter::counter::ReplicaId;
    use crdt_rate_limiter::{GossipConfig, GossipNode, ManualClock, Quota, RateLimiter, Strategy};

    const T0: i64 = 1_700_000_000_000;
    const LATENCY_MS: i64 = 3;

    /// Nodes on virtual time with clocks `skew` ms off true time, a fixed latency each way.
    struct Net {
        nodes: BTreeMap<u64, (GossipNode, ManualClock)>,
        skew: BTreeMap<u64, i64>,
        wire: BTreeMap<(i64, u64), (u64, u64, Vec<u8>)>,
        /// (from, to): every message between them is lost.
        lost: BTreeSet<(u64, u64)>,
        seq: u64,
        now: i64,
    }

    impl Net {
        fn new(skews: &[i64]) -> Self {
            Self::with(skews, |_| {})
        }

        /// [`Net::new`] with each node's settings changed by `set`.
        fn with(skews: &[i64], set: impl Fn(&mut GossipConfig)) -> Self {
            let ids: Vec<u64> = (1..=skews.len() as u64).collect();
            let mut net =
                Net { nodes: BTreeMap::new(), skew: BTreeMap::new(), wire: BTreeMap::new(), lost: BTreeSet::new(), seq: 0, now: T0 };
            for (&id, &skew) in ids.iter().zip(skews) {
                let clock = ManualClock::new(T0 + skew);
                let limiter = RateLimiter::builder()
                    .quota(Quota::new(10, Duration::from_secs(1)).unwrap())
                    .strategy(Strategy::FixedWindow)
                    .clock(clock.clone())
                    .hash_secret(*b"clock-test-sec!!")
                    .build()
                    .unwrap();
                let mut cfg = GossipConfig::new(ReplicaId { node: id, incarnation: 1 });
                cfg.interval_ms = 20;
                set(&mut cfg);
                let peers = ids.iter().copied().filter(|&p| p != id);
                let gossip = GossipNode::new(limiter, cfg, peers, id, T0 + skew).unwrap();
                net.nodes.insert(id, (gossip, clock));
                net.skew.insert(id, skew);
            }
            net
        }

        fn run_until(&mut self, end: i64) {
            while self.now < end {
                self.now += 1;
                let due: Vec<_> = self.wire.range(..(self.now + 1, 0)).map(|(k, _)| *k).collect();
                for k in due {
                    let (from, to, bytes) = self.wire.remove(&k).unwrap();
                    let t = self.now + self.skew[&to];
                    let (node, clock) = self.nodes.get_mut(&to).unwrap();
                    clock.set_ms(t);
                    node.handle_message(from, &bytes, t).unwrap();
                }
                for (&id, (node, clock)) in self.nodes.iter_mut() {
                    let t = self.now + self.skew[&id];
                    clock.set_ms(t);
                    node.handle_timeout(t);
                    while let Some(tx) = node.poll_transmit() {
                        if self.lost.contains(&(id, tx.to)) {
                            continue;
                        }
                        self.seq += 1;
                        self.wire.insert((self.now + LATENCY_MS, self.seq), (id, tx.to, tx.bytes));
                    }
                }
            }
        }

        /// Each node's cluster time minus true time.
        fn errors(&self) -> Vec<i64> {
            self.nodes.iter().map(|(id, (n, _))| self.skew[id] + n.cluster_offset_ms()).collect()
        }
    }

    #[test]
    fn skewed_nodes_agree_on_the_median_clock_within_a_few_rounds() {
        let skews = [0, 700, -300, 150, -800, 420, 60];
        let mut net = Net::new(&skews);
        net.run_until(T0 + 200); // ten rounds
                                 // The median skew is 60: every node's cluster time is that clock's, within the
                                 // estimate's error (half a round trip: 3 ms here, the latency being symmetric).
        for e in net.errors() {
            assert!((e - 60).abs() <= 3, "{:?}", net.errors());
        }
        let (node, _) = &net.nodes[&5];
        assert_eq!(node.limiter().stats().cluster_offset_ms, node.cluster_offset_ms());
        let peer = node.peer_stats().into_iter().find(|p| p.peer == 2).unwrap();
        assert!(peer.offset_from_cluster_ms.is_some_and(|o| (o - 640).abs() <= 3), "{peer:?}");
        assert!(!peer.beyond_tolerance && !node.own_clock_beyond_tolerance());
        // Windows and `reset_after` are on cluster time: node 5's clock reads 800 ms
        // behind true time (T0 − 600 ms, 600 ms before its own next boundary), cluster
        // time reads T0 + 260 ms: 740 ms before the cluster's next boundary.
        let local = T0 + 200 - 800;
        let d = node.limiter().check("c", local).unwrap();
        let left = d.reset_after.as_millis() as i64;
        assert!((left - 740).abs() <= 3, "reset_after {left} ms");
    }

    #[test]
    fn a_wildly_wrong_clock_is_named_and_does_not_drag_the_others() {
        let skews = [0, 10, -10, 5, 3_600_000];
        let mut net = Net::new(&skews);
        net.run_until(T0 + 200);
        let errors = net.errors();
        assert!(errors[..4].iter().all(|e| e.abs() <= 10), "a median, not a mean: {errors:?}");
        // The wrong node itself joins cluster time, in bounded steps of 250 ms per round
        // once it has settled (here at once: its first estimate).
        assert!(errors[4].abs() <= 10, "{errors:?}");
        let (node, _) = &net.nodes[&1];
        let peer = node.peer_stats().into_iter().find(|p| p.peer == 5).unwrap();
        assert!(peer.beyond_tolerance, "named: {peer:?}");
        let (wrong, _) = &net.nodes[&5];
        assert!(wrong.own_clock_beyond_tolerance());
        assert!(wrong.limiter().stats().clock_beyond_tolerance);
    }

    #[test]
    fn a_node_whose_clock_steps_rejoins_cluster_time_in_bounded_steps() {
        let mut net = Net::new(&[0, 0, 0, 0, 0]);
        net.run_until(T0 + 200);
        assert_eq!(net.errors(), vec![0; 5]);
        net.skew.insert(3, 3_000); // node 3's clock jumps 3 s ahead
                                   // Samples come with the next anti-entropy round's pings (every 10 rounds); from
                                   // then on the offset moves back by at most 250 ms per round.
        let mut path = Vec::new();
        for t in (220..=800).step_by(20) {
            net.run_until(T0 + t);
            path.push(net.errors()[2]);
        }
        assert!(path.windows(2).all(|w| w[1] <= w[0] && w[0] - w[1] <= 250), "{path:?}");
        assert!(path.iter().any(|&e| e > 0 && e < 3_000), "{path:?}");
        assert!(net.errors().iter().all(|e| e.abs() <= 3), "{:?}", net.errors());
    }

    /// Beyond 16 peers a node asks `fanout` random peers for a clock sample a period, and
    /// members agree on cluster time only once each has sampled every clock (before, each
    /// takes the median of its own draw). The peers it has no sample of are asked first,
    /// so 40 members agree within a few periods; four random ones a period would take
    /// about 40 periods to reach every clock.
    #[test]
    fn beyond_full_mesh_members_sample_every_clock_within_a_few_periods() {
        // 40 clocks 45 ms apart over -900..=855 ms, in a scrambled order.
        let skews: Vec<i64> = (0..40).map(|i: i64| (i * 17 % 40) * 45 - 900).collect();
        let mut net = Net::new(&skews);
        // Five anti-entropy periods.
        net.run_until(T0 + 1_000);
        // The median of 40 clocks is the mean of the middle two, -45 and 0 ms (rounded down).
        let errors = net.errors();
        assert!(errors.iter().all(|&e| (e + 23).abs() <= 3), "{errors:?}");
    }

    /// With a partial view, members outside the aggregator pool sample the pool's clocks
    /// only. Cluster time is then the median of the pool's clocks on every member, the
    /// pool's included (before, a pool member took the median of every clock and the
    /// others of the pool's and their own: 88 ms apart here).
    #[test]
    fn with_a_partial_view_members_in_and_outside_the_pool_agree_on_cluster_time() {
        // 30 clocks 35 ms apart over -500..=515 ms, in a scrambled order; a pool of 8, and
        // partial views beyond 18 peers.
        let skews: Vec<i64> = (0..30).map(|i: i64| (i * 7 % 30) * 35 - 500).collect();
        let mut net = Net::with(&skews, |cfg| {
            cfg.swim_above_peers = 16;
            cfg.aggregator_pool = 8;
        });
        net.run_until(T0 + 2_000);
        let mut pool: Vec<i64> = net.nodes.iter().filter(|(_, (n, _))| n.in_aggregator_pool()).map(|(id, _)| net.skew[id]).collect();
        assert_eq!(pool.len(), 8);
        pool.sort_unstable();
        // The median of the pool's 8 clocks: the mean of the middle two, rounded down.
        let median = (pool[3] + pool[4]).div_euclid(2);
        let errors = net.errors();
        assert!(errors.iter().all(|&e| (e - median).abs() <= 3), "the pool's median clock is {median} ms: {errors:?}");
    }

    /// A member's rank for the aggregator pool, as the library computes it (checked
    /// against the pool below): the lowest rank first.
    fn pool_rank(member: u64) -> u64 {
        let mut z = (member ^ 0x6167_6772_6567_6174).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A peer whose answer to a clock ask has not come is asked again only after every
    /// peer never asked: peers that do not answer (here node 1's messages to them are
    /// lost) take no place from those that would, so node 1 samples every peer that
    /// answers within a few periods. (Asked in pool order alone, the 16 silent peers
    /// first in it would take every place each period, and the others would wait for
    /// the four random peers node 1 pings a period.)
    #[test]
    fn peers_that_leave_a_clock_ask_unanswered_are_asked_after_those_never_asked() {
        let mut net = Net::new(&[0; 40]);
        let mut order: Vec<u64> = (1..=40).collect();
        order.sort_by_key(|&p| (pool_rank(p), p));
        // The rank is the library's: its pool of 32 is the 32 members ranked first.
        net.run_until(T0 + 100);
        let pool: BTreeSet<u64> = net.nodes.iter().filter(|(_, (n, _))| n.in_aggregator_pool()).map(|(&id, _)| id).collect();
        assert_eq!(pool, order[..32].iter().copied().collect::<BTreeSet<u64>>());
        // Node 1's peers in the order it asks those it has no sample of; the first 30
        // never hear from it.
        order.retain(|&p| p != 1);
        let (silent, answering) = order.split_at(30);
        net.lost.extend(silent.iter().map(|&p| (1, p)));
        // Five anti-entropy periods.
        net.run_until(T0 + 1_100);
        let (node, _) = &net.nodes[&1];
        let stats = node.peer_stats();
        let sampled: BTreeSet<u64> = stats.iter().filter(|p| p.offset_from_cluster_ms.is_some()).map(|p| p.peer).collect();
        let missing: Vec<u64> = answering.iter().copied().filter(|p| !sampled.contains(p)).collect();
        assert!(missing.is_empty(), "node 1 has no clock sample of {missing:?}");
        // The silent peers stay up at node 1 (it hears them): they were asked all along.
        assert!(silent.iter().all(|p| stats.iter().any(|s| s.peer == *p && s.up && s.offset_from_cluster_ms.is_none())));
    }
}
