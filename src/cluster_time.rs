//! Cluster time: this node's offset from the cluster's clock, estimated from the clock
//! samples of the gossip pings. Pure and deterministic: it reads no clock; the gossip core
//! feeds it samples and asks for an update once per round.
//!
//! # The estimate
//! * **Samples.** Each answered ping gives a peer's clock minus ours (NTP's offset
//!   `θ = ((t2 − t1) + (t3 − t4)) / 2`) and the round trip `δ`. Whatever the path's
//!   asymmetry, the true offset lies within `θ ± δ/2`.
//! * **Per peer: the tightest recent sample.** The last [`SAMPLES_PER_PEER`] samples are
//!   kept and the one with the smallest round trip is used (NTP's clock filter): queueing
//!   only ever adds delay. A sample with a round trip over `max_rtt_ms` is not used. A
//!   sample that disagrees with the kept ones by more than their error bounds allow
//!   means a clock stepped: the older samples are dropped.
//! * **The cluster: a median.** The target offset is the median of `{0} ∪ {θ_p}` over
//!   live peers with a usable sample (for an even count, the mean of the middle two).
//!   With exact samples every node computes the median of *all* clocks minus its own, so
//!   all nodes land on one time; one peer with a wildly wrong clock moves the median by
//!   one rank at most, never by its error. The gossip core may leave this node's own
//!   clock out ([`Estimator::update`]'s `own`): with a partial view every member takes
//!   the median of the aggregator pool's clocks, its own only if it is in the pool.
//! * **Smoothed and bounded.** The applied offset moves only when the target differs from
//!   it by more than the estimate's error (half the largest round trip among the samples
//!   used): jitter inside the error moves nothing, so an unskewed cluster keeps offset 0.
//!   When it moves, it moves to the target but by at most `max_step_ms` per round,
//!   except while it settles: a round in which more clocks make the median than ever
//!   before (the node just started, or peers just came up) applies the target whole, so
//!   a node starting far off joins cluster time at its first estimate. A median of more
//!   clocks is better information, not drift; a step back it causes is handled like any
//!   other (`src/store.rs`: counts are kept and requests charged to the newest window).
//!
//! The error of the applied offset is at most half the largest round trip used plus the
//! spread of the middle clocks; the step bound caps how far a round can move it.

use std::collections::BTreeMap;

/// Samples kept per peer (the clock filter's memory).
pub(crate) const SAMPLES_PER_PEER: usize = 8;

/// Settings of the estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    /// A sample with a longer round trip is not used.
    pub max_rtt_ms: i64,
    /// The most the applied offset moves per round.
    pub max_step_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sample {
    offset_ms: i64,
    rtt_ms: i64,
}

/// The outcome of one update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Update {
    /// The offset to apply now (cluster time minus our clock).
    pub offset_ms: i64,
    /// The median the offset heads for, if any peer had a usable sample.
    pub target_ms: Option<i64>,
    /// The estimate's error bound (half the largest round trip used).
    pub error_ms: i64,
}

/// The estimator. See the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct Estimator {
    settings: Settings,
    samples: BTreeMap<u64, Vec<Sample>>,
    applied_ms: i64,
    last: Update,
    /// The most clocks (peers' and this node's own) that ever made one update's median:
    /// a median of as many clocks is no news, whether or not this node's own is one of
    /// them (a node leaving the aggregator pool keeps the same clocks).
    most_clocks: usize,
    /// Bumped by every change to the samples: an update over the same clocks in the same
    /// generation finds the same median.
    generation: u64,
    /// The last update's clocks (its peers, and whether this node's own was one), their
    /// generation and their median: a round whose samples and peers are those of the
    /// round before (most rounds: samples come once per anti-entropy period) reuses it.
    memo: Memo,
    /// The peers of the update under way (a buffer kept from round to round).
    peers: Vec<u64>,
}

/// See [`Estimator::memo`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Memo {
    generation: Option<u64>,
    own: bool,
    peers: Vec<u64>,
    median: Median,
}

/// The median of some clocks: the target offset and its error bound (`None` without a
/// usable peer sample), and how many clocks made it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Median {
    target: Option<(i64, i64)>,
    clocks: usize,
}

impl Estimator {
    pub(crate) fn new(settings: Settings) -> Self {
        Self {
            settings,
            samples: BTreeMap::new(),
            applied_ms: 0,
            last: Update::default(),
            most_clocks: 0,
            generation: 0,
            memo: Memo::default(),
            peers: Vec::new(),
        }
    }

    /// Changes with every change to the samples (so a caller can tell that no peer's
    /// offset moved since it last looked).
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Records a ping's sample from `peer`. A negative round trip (our clock stepped back
    /// while the ping was out) says nothing and is ignored.
    pub(crate) fn record(&mut self, peer: u64, offset_ms: i64, rtt_ms: i64) {
        if rtt_ms < 0 {
            return;
        }
        self.generation += 1;
        let ring = self.samples.entry(peer).or_default();
        let new = Sample { offset_ms, rtt_ms };
        // Two samples of the same two clocks overlap within their bounds; if they do not,
        // one of the clocks stepped and the older samples describe a clock that is gone.
        if ring.iter().any(|s| (s.offset_ms - offset_ms).abs() > (s.rtt_ms + rtt_ms) / 2 + 1) {
            ring.clear();
        }
        if ring.len() == SAMPLES_PER_PEER {
            ring.remove(0);
        }
        ring.push(new);
    }

    /// Forgets `peer`'s samples (it restarted, or left).
    pub(crate) fn forget(&mut self, peer: u64) {
        self.generation += 1;
        self.samples.remove(&peer);
    }

    /// The offset estimate of `peer`'s clock from ours: its tightest usable sample.
    pub(crate) fn peer_offset(&self, peer: u64) -> Option<(i64, i64)> {
        let best = self.samples.get(&peer)?.iter().min_by_key(|s| s.rtt_ms)?;
        (best.rtt_ms <= self.settings.max_rtt_ms).then_some((best.offset_ms, best.rtt_ms))
    }

    /// The offset currently applied.
    pub(crate) fn offset_ms(&self) -> i64 {
        self.applied_ms
    }

    /// The latest update.
    pub(crate) fn last(&self) -> Update {
        self.last
    }

    /// Recomputes the target over the clocks of `peers`, and this node's own with `own`,
    /// and moves the applied offset toward it. Members that take the median of the same
    /// clocks agree on it, whether or not their own is among them.
    pub(crate) fn update(&mut self, peers: impl IntoIterator<Item = u64>, own: bool) -> Update {
        self.peers.clear();
        self.peers.extend(peers);
        let m = &self.memo;
        let same = m.generation == Some(self.generation) && m.own == own && m.peers == self.peers;
        let median = if same {
            debug_assert_eq!(self.median(&self.peers, own), m.median, "a stale median");
            m.median
        } else {
            let median = self.median(&self.peers, own);
            std::mem::swap(&mut self.memo.peers, &mut self.peers);
            self.memo.generation = Some(self.generation);
            self.memo.own = own;
            self.memo.median = median;
            median
        };
        let Some((target, error_ms)) = median.target else {
            self.last = Update { offset_ms: self.applied_ms, target_ms: None, error_ms: 0 };
            return self.last;
        };
        let diff = target - self.applied_ms;
        let settling = median.clocks > self.most_clocks;
        self.most_clocks = self.most_clocks.max(median.clocks);
        if diff.abs() > error_ms {
            let step = if settling { diff } else { diff.clamp(-self.settings.max_step_ms, self.settings.max_step_ms) };
            self.applied_ms += step;
        }
        self.last = Update { offset_ms: self.applied_ms, target_ms: Some(target), error_ms };
        self.last
    }

    /// The median of the clocks of `peers` with a usable sample, and of this node's own
    /// with `own`; no target without a peer's.
    fn median(&self, peers: &[u64], own: bool) -> Median {
        let mut offsets = Vec::with_capacity(peers.len() + 1);
        if own {
            offsets.push(0i64);
        }
        let mut error_ms = 0;
        for &p in peers {
            if let Some((o, rtt)) = self.peer_offset(p) {
                offsets.push(o);
                error_ms = error_ms.max(rtt.div_euclid(2) + rtt.rem_euclid(2));
            }
        }
        if offsets.len() == usize::from(own) {
            return Median { target: None, clocks: offsets.len() };
        }
        offsets.sort_unstable();
        let n = offsets.len();
        let target = if n % 2 == 1 { offsets[n / 2] } else { (offsets[n / 2 - 1] + offsets[n / 2]).div_euclid(2) };
        Median { target: Some((target, error_ms)), clocks: n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Settings = Settings { max_rtt_ms: 1_000, max_step_ms: 250 };

    /// Feeds one exact sample per peer: peer `i`'s clock minus ours is `clocks[i] - mine`.
    fn feed(e: &mut Estimator, mine: i64, clocks: &[i64], rtt: i64) {
        for (i, c) in clocks.iter().enumerate() {
            e.record(i as u64 + 1, c - mine, rtt);
        }
    }

    fn converge(e: &mut Estimator, peers: u64, rounds: usize) -> Vec<i64> {
        (0..rounds).map(|_| e.update(1..=peers, true).offset_ms).collect()
    }

    #[test]
    fn without_its_own_clock_a_node_lands_on_the_median_of_the_others() {
        // Peers' clocks 100, 300 and 900 ms ahead of ours: 300 without ours, 200 with it.
        let mut e = Estimator::new(S);
        feed(&mut e, 0, &[100, 300, 900], 4);
        assert_eq!(e.update(1..=3, false).offset_ms, 300);
        let mut e = Estimator::new(S);
        feed(&mut e, 0, &[100, 300, 900], 4);
        assert_eq!(e.update(1..=3, true).offset_ms, 200);
        // No peer's sample: no target, whatever `own` says.
        assert_eq!(Estimator::new(S).update(1..=3, false), Update::default());
    }

    #[test]
    fn leaving_its_own_clock_out_of_as_many_clocks_is_no_news_and_moves_in_bounded_steps() {
        // In the pool: its own and three peers' clocks, 2,000 ms ahead; applied whole.
        let mut e = Estimator::new(S);
        feed(&mut e, 0, &[2_000, 2_000, 2_000], 4);
        assert_eq!(e.update(1..=3, true).offset_ms, 2_000);
        // Out of it: four peers' clocks, two of them 4,000 ms ahead (peer 3's clock
        // stepped). The median of four clocks, as before: 250 ms a round towards 3,000.
        e.record(3, 4_000, 4);
        e.record(4, 4_000, 4);
        assert_eq!(e.update(1..=4, false).offset_ms, 2_250);
        // A fifth clock is news: applied whole.
        e.record(5, 4_000, 4);
        assert_eq!(e.update(1..=5, false).offset_ms, 4_000);
    }

    #[test]
    fn every_node_lands_on_the_median_clock_within_a_few_rounds() {
        let clocks = [0i64, 120, -700, 350, 800, -40, 210];
        let median = 120;
        for (me, &mine) in clocks.iter().enumerate() {
            let mut e = Estimator::new(S);
            let others: Vec<i64> = clocks.iter().enumerate().filter(|&(i, _)| i != me).map(|(_, &c)| c).collect();
            feed(&mut e, mine, &others, 4);
            let path = converge(&mut e, others.len() as u64, 3);
            assert_eq!(path, vec![median - mine; 3], "node {me}: cluster time is the median clock from the first estimate");
        }
    }

    #[test]
    fn one_wildly_wrong_clock_does_not_drag_the_cluster() {
        let mut e = Estimator::new(S);
        feed(&mut e, 0, &[10, -10, 5, 3_600_000, 0, -5], 4);
        let path = converge(&mut e, 6, 3);
        assert!(path.iter().all(|o| o.abs() <= 10), "a median, not a mean: {path:?}");
    }

    #[test]
    fn jitter_within_the_error_moves_nothing() {
        let mut e = Estimator::new(S);
        // True offsets 0, samples off by up to half their round trip.
        feed(&mut e, 0, &[3, -2, 1, -3, 2, 0], 6);
        assert_eq!(converge(&mut e, 6, 4), vec![0; 4]);
    }

    #[test]
    fn the_tightest_sample_wins_and_slow_ones_are_ignored() {
        let mut e = Estimator::new(S);
        e.record(1, 40, 60);
        e.record(1, 12, 4);
        e.record(1, 30, 30);
        assert_eq!(e.peer_offset(1), Some((12, 4)));
        e.record(2, 500, 5_000);
        assert_eq!(e.peer_offset(2), None, "over max_rtt_ms");
        e.record(3, 10, -1);
        assert_eq!(e.peer_offset(3), None, "a negative round trip");
    }

    #[test]
    fn a_stepped_clock_replaces_its_old_samples_and_the_offset_follows_in_bounded_steps() {
        let mut e = Estimator::new(S);
        feed(&mut e, 0, &[0, 0, 0, 0], 4);
        assert_eq!(converge(&mut e, 4, 2), vec![0, 0]);
        // Our clock jumps 3 s ahead: every peer now reads 3 s behind us.
        feed(&mut e, 3_000, &[0, 0, 0, 0], 4);
        assert_eq!(e.peer_offset(1), Some((-3_000, 4)), "the old tight sample is gone");
        let path = converge(&mut e, 4, 14);
        assert_eq!(path[0], -250);
        assert_eq!(*path.last().unwrap(), -3_000);
        assert!(path.windows(2).all(|w| (w[1] - w[0]).abs() <= 250));
    }

    #[test]
    fn settling_applies_the_estimate_whole_then_moves_are_bounded() {
        let mut e = Estimator::new(S);
        // One peer first: the median of {0, 900} is 450, applied whole.
        e.record(1, 900, 2);
        assert_eq!(e.update([1, 2], true).offset_ms, 450);
        // A second peer contributes: more information, applied whole.
        e.record(2, 900, 2);
        assert_eq!(e.update([1, 2], true).offset_ms, 900);
        // Both peers' clocks jump 2 s ahead: bounded steps from here.
        e.record(1, 2_900, 2);
        e.record(2, 2_900, 2);
        assert_eq!(e.update([1, 2], true).offset_ms, 1_150);
        // No usable sample: the offset stays.
        e.forget(1);
        e.forget(2);
        assert_eq!(e.update([1, 2], true), Update { offset_ms: 1_150, target_ms: None, error_ms: 0 });
    }
}
