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
    /// remains, shares following each node's observed demand. Over-admission is set by
    /// the view's lag, not by the offered rate. The default.
    #[default]
    Bounded,
}

/// The bounded policy's view of one request: which gossip round it falls in and how many
/// replicas share the quota.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub round: u32,
    /// Time left in the round (the wait a budget refusal reports).
    pub round_left_ms: u64,
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
    budget: u64,
    spent: u64,
    /// What this node's view allotted the other replicas in that round.
    allotted_others: u64,
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
            self.allotted_others.saturating_sub(others.saturating_sub(self.others_seen))
        } else {
            0
        };
        let (budget, allotted_others) = shares(view, reserve, b);
        *self = Self { round: Some(b.round), budget, spent: 0, allotted_others, others_seen: others };
    }

    /// The round the share is set for.
    pub(crate) fn round(&self) -> Option<u32> {
        self.round
    }

    /// What is left of the share with `reserved` admissions out in leases.
    pub(crate) fn left(&self, reserved: u64) -> u64 {
        self.budget.saturating_sub(self.spent + reserved)
    }

    /// Charges `n` admissions to the share.
    pub(crate) fn spend(&mut self, n: u64) {
        self.spent += n;
    }

    /// A share belongs to one window: a new window starts without one.
    pub(crate) fn clear(&mut self) {
        self.round = None;
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
/// * For a client with counts, the fraction is rounded up with twice its probability
///   (capped at 1), seeded per (node, key, round). In a round only the nodes that get
///   requests use their shares, so rounding exactly (in expectation, or by rank) would
///   under-spend the remainder under steady traffic, and rounding every share up would
///   over-admit by up to one request per node per round; `docs/design.md` ("Bounded")
///   gives the under- and over-admission measured for each choice.
fn shares<I: Iterator<Item = u64> + Clone>(view: &RoundView<I>, reserve: u64, b: &Budget) -> (u64, u64) {
    let v = algorithm::evaluate(view.strategy, &view.quota, view.counts, view.elapsed);
    let remaining = (v.remaining + u64::from(v.allowed)).saturating_sub(reserve);
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
        draw < 2 * frac
    } else {
        // Nobody has counted it: every live replica weighs one (the total is `live`), each
        // gets `⌊R / live⌋`, and `R mod live` requests are left over.
        debug_assert!(view.own == 0 && with_counts == 0);
        (b.live_index + splitmix64(view.key ^ u64::from(view.window).rotate_left(32))) % live < remaining % live
    };
    let budget = (mine + u64::from(extra)).min(remaining);
    (budget, remaining - budget)
}
