//! Admission policies: how much of a key's remaining quota this node may spend on a view
//! of the global counts that lags the truth.
//!
//! The store keeps the counts and runs the strategy's arithmetic; it asks this module,
//! once per key per gossip round, for this node's share ([`RoundShare::open`]), and
//! charges each admission to it. Optimistic admission has no share: a request is
//! admitted while the view says the quota is not spent. The bounds each policy gives are
//! derived in `docs/design.md` ("Admission") and checked by the simulator.

use crate::algorithm::{self, Counts};
use crate::key::splitmix64;
use crate::store::saturate;
use crate::{Quota, Strategy};

/// How a cluster member decides on a view of the global counts that lags the truth.
///
/// The over-admission bound of each policy is derived in `docs/design.md` and checked by
/// the simulator. A limiter that is not a cluster member decides exactly either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Admission {
    /// Admit while the local view of the global count is under the limit. Over-admits by
    /// what the other nodes admit during one view lag; fails open in a partition (each
    /// side admits up to the full limit).
    Optimistic,
    /// Between gossip rounds, spend only this node's share of what the view says
    /// remains, shares following each node's observed demand, and one request more when
    /// the view shows room beyond what the key's rate says the others may take meanwhile
    /// (so that a client whose requests reach each node less than once a round, as on a
    /// large cluster, still gets its quota). Over-admission is set by the view's lag, not
    /// by the offered rate. The default.
    #[default]
    Bounded,
    /// [`Bounded`](Self::Bounded) without the forecast: a node spends only its share, its
    /// fraction rounded up with twice its probability. A burst from a known client that
    /// reaches many nodes within one round then gets about the shares, not up to one
    /// request per node; the price is quota left unused when a client's requests reach
    /// each node less than once a round (`docs/design.md`, "Bounded").
    Shares,
}

/// The bounded policy's view of one request: which gossip round it falls in and how many
/// replicas share the quota.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub round: u32,
    /// Time left in the round (the wait a budget refusal reports).
    pub round_left_ms: u64,
    /// The round's length.
    pub round_ms: u64,
    /// How long the others' admissions take to show in this node's view.
    pub lag_ms: u64,
    /// Whether one request more may be taken on the key's rate ([`Admission::Bounded`]),
    /// or only the share ([`Admission::Shares`]).
    pub forecast: bool,
    /// Live replicas, this one included (at least 1).
    pub live_replicas: u64,
    /// This replica's place among the live ones ordered by node id (`0..live_replicas`):
    /// with the key and its window it decides who gets the rounding remainder.
    pub live_index: u64,
}

/// What one node sees of a key when its round share is set.
pub(crate) struct RoundView<I> {
    pub strategy: Strategy,
    pub quota: Quota,
    /// Every count of the view (local and remote), both windows.
    pub counts: Counts,
    /// This node's own count over both windows.
    pub own: u64,
    /// The other replicas' counts, each over both windows.
    pub others: I,
    /// This node's own count over the key's two newest windows, and the requests it
    /// refused in them: what it has seen of the key's demand.
    pub taken: u64,
    pub refused: u64,
    /// The key and its window (low 32 bits of its index): they pick who gets a remainder.
    pub key: u64,
    pub window: u32,
    /// Milliseconds into the window.
    pub elapsed: u64,
}

/// One key's share under bounded admission: what this node may admit in the current
/// round, and what it has.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RoundShare {
    /// Round (low 32 bits) the share belongs to, if any.
    round: Option<u32>,
    /// Budget, spent and allotted are at most the limit ([`Quota::MAX_LIMIT`] fits).
    budget: u32,
    spent: u32,
    /// What this node's view allotted the other replicas in that round.
    allotted_others: u32,
    /// Requests this node refused for the key in its newest window and the one before.
    refused: [u32; 2],
    /// The others' counts (both windows) this node could see at that round's start.
    others_seen: u64,
}

impl RoundShare {
    /// Sets this node's share for `b.round` from `view`, unless it is already set for it.
    /// A newer round (compared with wrap-around) starts a new share; a request from an
    /// older round is charged to the current one.
    pub(crate) fn open<I: Iterator<Item = u64> + Clone>(&mut self, b: &Budget, view: &RoundView<I>) {
        if self.round.is_some_and(|old| b.round.wrapping_sub(old) as i32 <= 0) {
            return;
        }
        // What the others were allotted last round may be spent and not yet visible: keep
        // it out of this round's remainder, less what has become visible since (their
        // counts' growth), which the view already subtracts.
        let others = (view.counts.cur + view.counts.prev).saturating_sub(view.own);
        let reserve = if self.round == Some(b.round.wrapping_sub(1)) {
            u64::from(self.allotted_others).saturating_sub(others.saturating_sub(self.others_seen))
        } else {
            0
        };
        let (budget, allotted_others) = shares(view, reserve, b);
        *self = Self {
            round: Some(b.round),
            budget: saturate(budget),
            spent: 0,
            allotted_others: saturate(allotted_others),
            refused: self.refused,
            others_seen: others,
        };
    }

    /// The round the share is set for.
    pub(crate) fn round(&self) -> Option<u32> {
        self.round
    }

    /// What is left of the share with `reserved` admissions out in leases.
    pub(crate) fn left(&self, reserved: u64) -> u64 {
        u64::from(self.budget).saturating_sub(u64::from(self.spent) + reserved)
    }

    /// Charges `n` admissions to the share.
    pub(crate) fn spend(&mut self, n: u64) {
        self.spent = saturate(u64::from(self.spent) + n);
    }

    /// Counts `n` requests of the key this node refused in its newest window.
    pub(crate) fn refuse(&mut self, n: u64) {
        self.refused[0] = saturate(u64::from(self.refused[0]) + n);
    }

    /// The requests this node refused in the key's two newest windows.
    pub(crate) fn refused(&self) -> u64 {
        u64::from(self.refused[0]) + u64::from(self.refused[1])
    }

    /// The key's newest window moved `by` windows on: a share belongs to one window, so
    /// the new one starts without one, and the refusals move with their windows.
    pub(crate) fn roll(&mut self, by: i64) {
        self.round = None;
        self.refused = if by == 1 { [0, self.refused[0]] } else { [0, 0] };
    }
}

/// This node's share of the remainder for one round, and what its view allots the others.
///
/// The remainder `R` is what the view says remains, less `reserve`. It is shared out in
/// proportion to weights: each replica with counts weighs its count over the two windows
/// plus one, and every other live replica one (so an idle node can start); the total `T`
/// is the view's count plus `max(live, replicas with counts)`. This node gets `⌊R·w/T⌋`
/// of it, and maybe one more request:
///
/// * For a client the view has no count of (nobody has counted it in the two windows),
///   the `R − Σ⌊R·w/T⌋` requests the floors leave over (fewer than the entries) go one
///   each to the live replicas of rank below that number, a replica's rank being its
///   place among the live ones ordered by node id, rotated by a hash of (key, window).
///   Replicas that agree on who is live hold distinct ranks, so their shares add up to
///   exactly `R`: a burst from a new client spread over the nodes gets the limit, not
///   more (`docs/design.md`, "Bursts"). The rotation stays the same for the whole
///   window: a node that first sees the burst a round later, on a view that does not
///   show it yet, computes the share it would have had in the first round, not another.
/// * For a client with counts, the fraction is rounded up, seeded per (node, key, round):
///   under [`Admission::Bounded`] with its probability, or else with the forecast's
///   ([`within_forecast`]), whichever is larger; under [`Admission::Shares`] with twice
///   its probability (capped at 1). In a round only the nodes that get requests use their
///   shares, so rounding exactly (in expectation, or by rank) alone would under-spend the
///   remainder under steady traffic, and rounding every share up would over-admit by up to
///   one request per node per round; `docs/design.md` ("Bounded") gives the under- and
///   over-admission measured for each choice.
fn shares<I: Iterator<Item = u64> + Clone>(view: &RoundView<I>, reserve: u64, b: &Budget) -> (u64, u64) {
    let v = algorithm::evaluate(view.strategy, &view.quota, view.counts, view.elapsed);
    let unreserved = v.remaining + u64::from(v.allowed);
    let remaining = unreserved.saturating_sub(reserve);
    let live = b.live_replicas.max(1);
    let with_counts = view.others.clone().filter(|&c| c > 0).count() as u64;
    let idle_others = (live - 1).saturating_sub(with_counts);
    let counted = view.counts.cur + view.counts.prev;
    let total = u128::from(counted) + u128::from(1 + with_counts + idle_others);
    let part = |weight: u64| (u128::from(remaining) * u128::from(weight) / total) as u64;
    let mine = part(view.own + 1);
    let extra = if counted > 0 {
        let round = u64::from(b.round).rotate_left(32);
        let frac = u128::from(remaining) * u128::from(view.own + 1) % total;
        let draw = u128::from(splitmix64(view.key ^ round ^ splitmix64(b.live_index ^ 0xB0DE))) % total;
        match b.forecast.then(|| within_forecast(view, unreserved, b, total)) {
            Some(cap) => draw < frac || draw < cap,
            None => draw < 2 * frac,
        }
    } else {
        // Nobody has counted it: every live replica weighs one (the total is `live`), each
        // gets `⌊R / live⌋`, and `R mod live` requests are left over.
        debug_assert!(view.own == 0 && with_counts == 0);
        (b.live_index + splitmix64(view.key ^ u64::from(view.window).rotate_left(32))) % live < remaining % live
    };
    let budget = (mine + u64::from(extra)).min(remaining);
    (budget, remaining - budget)
}

/// Twice the demand per admission assumed of a key this node has seen little of: a view
/// shows admissions, not demand, and a saturated key is asked for more than it admits.
const DEMAND_PRIOR_X2: u64 = 5;
/// How many requests' worth of belief the prior holds against this node's own tally.
const DEMAND_WEIGHT: u64 = 2;

/// `p · total`, where `p` is the chance this node takes one more admission this round:
/// `p = (R − Λ·s) / (m·Λ·g)`, clamped to `[0, 1]`. `Λ` is the key's admission rate over
/// the cluster, so `Λ·s` is what the others have admitted and this node cannot see yet
/// (`s` the mean lag: taken off the remainder `R`), and `m·Λ·g` is what the nodes are
/// asked for in a round, among which the rest is shared, `m` the demand per admission;
/// for a fixed window both are cut at the window's edges, where its count starts again.
/// `Λ` is the larger of two estimates from the view: the current window's count over its
/// elapsed time (at least one lag, so that a few early requests do not pass for a rate)
/// and the two windows' count over their span. `m` is what this node was asked for the
/// key in its two newest windows over what it admitted, with two requests' worth of a
/// prior of 2.5 (a view shows admissions, not demand). The sliding log's room comes back
/// a bucket at a time, all of it at the bucket's start: there `s` is twice the lag.
///
/// This is what keeps the bounded policy's shares from starving a key whose requests
/// reach each node less than once a round, as on a large cluster: its shares are then
/// fractions of a request, but only the nodes that get a request spend them, and they are
/// about `Λ·g` in a round, not `N`. The hard bound is unchanged (at most one request per
/// node per round beyond the shares, `docs/design.md`, "Bounded").
fn within_forecast<I>(view: &RoundView<I>, remaining: u64, b: &Budget, total: u128) -> u128 {
    let (tick, before) = match view.strategy {
        Strategy::SlidingLog => {
            let (bucket, n) = algorithm::log_tick(view.quota.window_ms());
            (bucket, bucket * n)
        }
        _ => (view.quota.window_ms(), view.quota.window_ms()),
    };
    let elapsed = view.elapsed.min(tick);
    // A count waits on average half a round before it is sent.
    let lag = b.lag_ms.saturating_sub(b.round_ms / 2);
    let (past, future) = match view.strategy {
        Strategy::FixedWindow => (lag.min(elapsed), b.round_ms.min(tick - elapsed)),
        // Room comes back a bucket at a time, to every node at once: with `s` one lag the
        // nodes over-admitted 1.9–2.8 % at 30–100 nodes and rate 3.0, with 1.5 lags
        // 1.0–1.4 % (`docs/design.md`, "Bounded").
        Strategy::SlidingLog => (2 * b.lag_ms, b.round_ms),
        _ => (lag, b.round_ms),
    };
    let estimates = [(view.counts.cur, elapsed.max(b.lag_ms).max(1)), (view.counts.cur + view.counts.prev, before + elapsed)];
    // The demand per admission, from what this node was asked for the key and admitted,
    // pulled towards DEMAND_PRIOR by DEMAND_WEIGHT requests' worth of belief: a node that
    // sees a client seldom (many nodes, a low rate) keeps near the prior.
    let (asked, taken) = (view.taken + view.refused + DEMAND_PRIOR_X2 * DEMAND_WEIGHT / 2, view.taken + DEMAND_WEIGHT);
    // For each estimate (n admissions in `span` ms): p·total = (R·span − n·past)·total / (n·future).
    let mut cap = total;
    for (n, span) in estimates {
        let n = u128::from(n);
        if n > 0 {
            let room = (u128::from(remaining) * u128::from(span)).saturating_sub(n * u128::from(past));
            // Saturating: a product past u128 (a limit near `Quota::MAX_LIMIT` over a
            // window of weeks, or counts a peer inflated) only lowers the cap.
            let num = room.saturating_mul(total).saturating_mul(u128::from(taken));
            cap = cap.min(num / (n.saturating_mul(u128::from(asked)).saturating_mul(u128::from(future.max(1)))));
        }
    }
    cap
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// 300 live replicas, gossip every 20 ms, a view two rounds behind (aggregators).
    fn budget(round: u32, forecast: bool) -> Budget {
        Budget { round, round_left_ms: 10, round_ms: 20, lag_ms: 40, forecast, live_replicas: 300, live_index: 7 }
    }

    /// In how many of 10,000 rounds this node's budget for a key it has no count of is
    /// one, on a view of `counts` (the others' counts spread over 100 replicas) and
    /// `elapsed` ms into a fixed window of 1 s with limit `limit`; the node has taken and
    /// refused nothing of the key itself.
    fn rounds_with_a_budget(limit: u64, counts: Counts, elapsed: u64) -> usize {
        rounds_with(true, (0, 0), limit, counts, elapsed)
    }

    /// [`rounds_with_a_budget`] with the node's own `(taken, refused)` tally of the key.
    fn rounds_with(forecast: bool, tally: (u64, u64), limit: u64, counts: Counts, elapsed: u64) -> usize {
        rounds_of(Strategy::FixedWindow, forecast, tally, limit, counts, elapsed)
    }

    /// [`rounds_with`] for a quota of `strategy` (for the sliding log, `counts` and
    /// `elapsed` are its buckets': the current one and those before it).
    fn rounds_of(strategy: Strategy, forecast: bool, (taken, refused): (u64, u64), limit: u64, counts: Counts, elapsed: u64) -> usize {
        let quota = Quota::new(limit, Duration::from_secs(1)).unwrap();
        let others = (counts.cur + counts.prev) / 100;
        (0..10_000)
            .filter(|&r| {
                let view = RoundView {
                    strategy,
                    quota,
                    counts,
                    own: 0,
                    others: std::iter::repeat_n(others, 100),
                    taken,
                    refused,
                    key: 42,
                    window: 3,
                    elapsed,
                };
                let (b, _) = shares(&view, 0, &budget(r, forecast));
                assert!(b <= 1, "a share of {b}");
                b == 1
            })
            .count()
    }

    /// A client's 100 requests a second spread over 300 nodes reach a node about once in
    /// 60 rounds: the node's share of what remains is a fraction of a request, but while
    /// the view shows room beyond what the others may have admitted unseen and will be
    /// asked this round, it may take the request.
    #[test]
    fn a_share_below_one_request_is_taken_while_the_view_shows_room() {
        // 50 admitted in 500 ms: 0.1/ms, so about 3 unseen and 2 admitted per round,
        // asked 2.5 times that (the prior, with no tally of its own); 50 remain.
        assert_eq!(rounds_with_a_budget(100, Counts { cur: 50, prev: 0 }, 500), 10_000);
        // The floors alone round 50/351 up in expectation: about 14 % of rounds.
        let floors_alone = 10_000 * 50 / 351;
        assert!(rounds_with_a_budget(100, Counts { cur: 50, prev: 0 }, 500) > 5 * floors_alone);
        // `Admission::Shares`: the share alone, its fraction rounded up with twice its
        // probability.
        let shares_alone = rounds_with(false, (0, 0), 100, Counts { cur: 50, prev: 0 }, 500);
        assert!(shares_alone.abs_diff(2 * floors_alone) < 300, "{shares_alone} against {}", 2 * floors_alone);
    }

    /// When what remains is no more than what the others have admitted unseen at the
    /// key's rate, only the floors' rounding is left; in between, the chance is the
    /// remainder past the unseen part over what the cluster is asked for in a round.
    #[test]
    fn the_chance_of_one_more_falls_with_the_room_past_the_unseen_admissions() {
        // 0.1/ms: 3 unseen (30 ms: the lag less half a round), 2 admitted per round and
        // 2.5 times that asked (the prior).
        let chance = |remaining: u64| rounds_with_a_budget(50 + remaining, Counts { cur: 50, prev: 0 }, 500) as f64 / 10_000.0;
        let floors = |remaining: u64| remaining as f64 / 351.0;
        assert!(chance(3) < floors(3) + 0.01, "{}", chance(3));
        // (5 − 3) / (2.5 · 2) = 0.4, plus the floors' rounding on the rest.
        let expected = 0.4 + 0.6 * floors(5);
        assert!((chance(5) - expected).abs() < 0.03, "{} against {expected}", chance(5));
        assert_eq!(chance(8), 1.0);
    }

    /// The demand per admission comes from what this node was asked for the key: a node
    /// that refused nothing of 30 takes the room past the unseen part nearly at once, one
    /// that refused two thirds of what it was asked holds back nearly three times as
    /// much.
    #[test]
    fn what_this_node_was_asked_sets_the_demand_it_shares_the_room_with() {
        let chance = |tally| rounds_with(true, tally, 55, Counts { cur: 50, prev: 0 }, 500) as f64 / 10_000.0;
        let floors = 5.0 / 351.0;
        // (5 − 3) / (2 · 35/32) ≈ 0.91 and (5 − 3) / (2 · 35/12) ≈ 0.34.
        for (tally, p) in [((30, 0), 0.914), ((10, 20), 0.343), ((0, 0), 0.4)] {
            let expected = p + (1.0 - p) * floors;
            assert!((chance(tally) - expected).abs() < 0.03, "{tally:?}: {} against {expected}", chance(tally));
        }
    }

    /// The largest quota, a node that took the whole previous window and one request of
    /// this one, counts a peer inflated: the forecast's products pass `u128` and saturate
    /// (a panic in a build with overflow checks before), and the share stays within one.
    #[test]
    fn the_forecast_saturates_on_the_largest_quotas_and_counts() {
        let quota = Quota::new(Quota::MAX_LIMIT, Quota::MAX_WINDOW).unwrap();
        for (prev, elapsed) in [(Quota::MAX_LIMIT, 1), (Quota::MAX_LIMIT, 2_000_000_000), (u64::MAX / 4, 4_000_000_000)] {
            let counts = Counts { cur: 1, prev };
            let view = RoundView {
                strategy: Strategy::FixedWindow,
                quota,
                counts,
                own: prev,
                others: std::iter::repeat_n(1u64, 3),
                taken: prev,
                refused: 0,
                key: 42,
                window: 3,
                elapsed,
            };
            let (b, _) = shares(&view, 0, &budget(1, true));
            assert!(b <= Quota::MAX_LIMIT, "{b}");
        }
    }

    /// The sliding log's room comes back at each bucket's start, and the forecast holds
    /// from there: a key whose view shows room well beyond what the others may have
    /// taken unseen keeps its requests early in a bucket too, not only on shares'
    /// rounding.
    #[test]
    fn early_in_a_sliding_log_bucket_a_view_with_room_is_taken_on_the_forecast() {
        // Buckets of 100 ms; 10 ms into one, 5 in it and 40 in the nine before: 55
        // remain, and at most 10 may be unseen (0.125/ms over twice the 40 ms lag).
        let counts = Counts { cur: 5, prev: 40 };
        assert_eq!(rounds_of(Strategy::SlidingLog, true, (0, 0), 100, counts, 10), 10_000);
        // Shares alone: 55 of 345 weights' worth, rounded up with twice its probability.
        let shares_alone = rounds_of(Strategy::SlidingLog, false, (0, 0), 100, counts, 10);
        assert!((2_500..4_000).contains(&shares_alone), "{shares_alone}");
    }

    /// For a fixed window, the requests of the round after the window ends do not
    /// compete for what remains of it.
    #[test]
    fn at_the_end_of_a_fixed_window_only_what_is_left_of_it_is_asked_for() {
        // 2 remain, 3 may be unseen; the same view 5 ms before the end is asked for less
        // than in the middle of a round, but the unseen part is the same: no room.
        assert!(rounds_with_a_budget(102, Counts { cur: 100, prev: 0 }, 995) < 100);
        // 5 remain: mid-window, (5 − 3)/(2 · 2) = 0.5; 5 ms before the end,
        // (5 − 3)/(2 · 0.5) ≥ 1.
        assert!(rounds_with_a_budget(105, Counts { cur: 100, prev: 0 }, 500) < 6_000);
        assert_eq!(rounds_with_a_budget(105, Counts { cur: 100, prev: 0 }, 995), 10_000);
    }
}
