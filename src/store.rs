//! The sharded in-memory store of per-(key, window) counters.
//!
//! # Layout
//! Each shard is a `parking_lot::Mutex` around a [`Table`] of 24-byte slots keyed by the
//! 64-bit key hash: the key's newest window (low 32 bits of its index), the local
//! replica's counts for that window and the one before, and an index into the shard's
//! side table of remote slots (only for keys other replicas have counted). Shards are
//! padded to their own cache lines and chosen by bits 40.. of the hash, disjoint from
//! the low bits the table probes with.
//!
//! # What peers can make a store hold
//! A remote slot (88 bytes) keeps the other replicas' counts of its key as 12-byte cells
//! (replica, count in the newest window, count in the one before), sorted by replica in
//! one exactly sized allocation that doubles as replicas arrive: a lookup is a binary
//! search, and an insertion moves at most [`MAX_KEY_REPLICAS`] cells, in whatever order
//! replicas arrive. Three budgets of the [`KeyCap`] bound what peers can add:
//! * keys a peer's count creates are charged to a budget of their own (as large as the
//!   key cap), so no peer input can take a local client's room; past it such counts are
//!   refused (`Error::KeyCapacity`). A count for a key that exists needs no room.
//! * a key keeps cells for at most [`MAX_KEY_REPLICAS`] replicas, and all keys together
//!   at most [`CELLS_PER_KEY`] × the key cap. A count from a replica that finds no cell is
//!   added to its window's total without one: the view can only get stricter (a count
//!   sent again is counted again), never looser.
//!
//! `docs/design.md` ("Memory model") gives the bound these make, in bytes.
//!
//! # Windows
//! A key keeps two windows: its newest and the one before, which is all the window
//! strategies read. Under [`Strategy::SlidingLog`] the store's windows are the log's
//! buckets (`⌈W/k⌉` ms, see `algorithm::log_tick`) and a key keeps the `n ≤ k` buckets
//! before its newest: the two newest in its slot as for any strategy, the older ones
//! (local and remote counts) in the shard's side map [`Older`], which holds an entry only
//! while one of them is not empty. A request (or a merged remote count) for a newer
//! window rolls the key forward; a request for an older window is charged to the key's
//! newest window, at its start (conservative: it can only make the current window
//! stricter). So a clock that steps back finds its keys' newest windows ahead of it and
//! charges requests to them, with their counts, until it reaches them again: a window
//! is never decided twice (a key more than a day ahead is taken for wrap-around, below).
//! Window indices are
//! stored as their low 32 bits and compared with wrapping arithmetic; keys idle for more
//! than one window are reclaimed long before that could alias.
//!
//! # Reclamation
//! A key is dead once no acceptable timestamp (the clock minus the replay tolerance)
//! falls in its newest window or the one after it. Dead keys are dropped (1) from a shard
//! when it is about to grow, in the same pass that grows it, which amortizes to O(1) per
//! new key and touches one shard only, (2) when the key cap is reached, and (3) by
//! [`Store::sweep`], which locks one shard at a time.
//!
//! # Gossip hooks
//! Once a gossip core is attached ([`Store::track_changes`]), every key whose local count
//! changes is appended once to its shard's dirty list and flagged (two bits borrowed from
//! the side-table index: current window changed, previous window changed). The core
//! collects the list with [`Store::collect_changes`], holding each shard's lock only
//! while it copies the changed counts. Remote counts arrive through [`Store::merge`].
//!
//! # Bounded admission
//! With a [`Budget`], a key's first decision in each gossip round fixes its local budget
//! for the round: this node's share of what the view says remains, in proportion to its
//! own recent count against everyone's. See `docs/design.md`.
//!
//! # One hot key on many threads: leases
//! A key whose requests meet its shard's lock held by another thread is promoted to its
//! shard's *hot cell* (one per shard, allocated on first contention, 2,176 bytes). The cell
//! holds one lease word per stripe (16 stripes, each on its own cache line; a thread
//! always uses the same stripe): a lease is a number of admissions the lock path has
//! already decided are within the limit, and `allow` spends them with one
//! compare-and-swap on the caller's own line, without the lock. A thread whose lease is
//! spent takes the lock, which folds what it spent into the key's count, decides the
//! request exactly (counting every other stripe's unspent lease as used) and grants a
//! new lease of half of what remains (at most [`LEASE_MAX`]). Before refusing, the lock
//! path takes every lease back and decides again on the exact count, so a single node
//! admits exactly what one lock would have admitted; the refusal is then published in
//! the cell (until the time the strategy says a request could pass), so a client far over
//! its limit is refused without the lock too. Leases are taken back, and the cell
//! re-armed under a new epoch, whenever the key changes window, is merged, collected for
//! gossip, exported, swept or re-quoted: gossip sees every spent lease at the next
//! collection, as it sees any other count.
//!
//! Why leases: a compare-and-swap on one packed count per key (measured as the same cell
//! with one stripe, `docs/benchmarks.md`) removes the lock but keeps one cache line
//! bouncing between cores, and two threads then deliver less than one. Striped leases
//! touch a shared line only once per lease. Under bounded admission a lease is also
//! drawn from the round's budget (at most half of what is left of it), belongs to its
//! round, and counts against that budget when folded in, so the round's budget is spent
//! exactly as under the lock. Per-client quotas take the lock path, which first takes
//! the key's leases back.
//!
//! `check` with the store's quota (what the tower middleware calls per request) spends
//! leases like `allow`, and reports figures the lock path would: the limit, and a reset
//! time that with the request counted no longer depends on the count (fixed and sliding
//! window, sliding log); the token bucket's depends on it, and is reported for the count
//! with every lease out spent (published in the cell before each grant), so never earlier
//! than the exact one and exact once the leases are spent. As remaining it reports what the last lock-path decision left
//! counting every lease out as spent (published in the cell before each grant) plus what
//! is unspent of the caller's own lease: never more than what was truly left at some
//! moment between its admission and its return, as the lock path counts other threads'
//! unspent leases as used too. A standing refusal is served with its retry and reset
//! times, kept as instants: the count it was decided on cannot change within the cell's
//! epoch (a refusal is published, and lifted when a merge or a request under another
//! quota changes the count, under a new epoch); the sliding log's refusal is published
//! with the exact retry time its buckets give. No `check` of the hot key with the store's
//! quota needs the lock while its thread holds a lease or a refusal stands.
//!
//! The tally sees lease admissions as they are spent (and lock-free refusals at once);
//! its `near_limit` count covers lock-path decisions only, as a lease decision does not
//! know the count it was made at.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::admission::{Budget, RoundShare, RoundView};
use crate::algorithm::{self, Counts, Verdict};
use crate::counter::GCounter;
use crate::key::splitmix64;
use crate::table::{Entry, Table};
use crate::{Error, Quota, Strategy};

/// The low 30 bits of [`Entry::remote`] index the side table; this value means none.
const NO_REMOTE: u32 = 0x3FFF_FFFF;
/// The local count of the key's newest window changed since it was last collected.
const DIRTY_CUR: u32 = 1 << 31;
/// The local count of the window before changed since it was last collected.
const DIRTY_PREV: u32 = 1 << 30;
const DIRTY: u32 = DIRTY_CUR | DIRTY_PREV;
/// How far back the clock may step with keys keeping the counts of windows it left
/// (one day); a key further ahead than that is stale state (32-bit wrap-around).
const MAX_STEP_BACK_MS: i64 = 86_400_000;
/// The replica index [`Store::export`] gives the local replica's counts.
pub(crate) const LOCAL_REPLICA: u32 = u32::MAX;

#[inline]
fn remote_of(e: &Entry) -> Option<usize> {
    let i = e.remote_and_dirty & NO_REMOTE;
    (i != NO_REMOTE).then_some(i as usize)
}

/// The most other replicas one key keeps counts of: a count from one more replica is
/// added to its window's total without a cell of its own (so the view can only get
/// stricter), and inserting a replica moves at most this many cells.
pub(crate) const MAX_KEY_REPLICAS: usize = 1024;
/// Replica cells the remote side tables of a limiter may hold, per key of the key cap
/// (see [`KeyCap`]). Past it, counts from replicas without a cell go to their window's
/// total as past [`MAX_KEY_REPLICAS`].
pub(crate) const CELLS_PER_KEY: usize = 8;

/// One other replica's counts of a key: in the key's newest window and the one before.
#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    replica: u32,
    cur: u32,
    prev: u32,
}

/// What a key knows beyond its local counts: other replicas' counts per window, and its
/// bounded-admission budget for the current round.
#[derive(Debug, Default)]
struct Remote {
    /// Other replicas' counts, sorted by replica; the first `len` cells are in use. Sized
    /// exactly (1, 2, 4, … cells, at most [`MAX_KEY_REPLICAS`]) and charged to the key
    /// cap's budget of cells until the key is dropped.
    cells: Box<[Cell]>,
    len: u32,
    /// The key was first counted by a peer: it is charged to the budget of keys known
    /// only from peers, not to the local clients' cap.
    from_peer: bool,
    /// The totals per window: the cells' counts plus any counted without a cell.
    cur_sum: u64,
    prev_sum: u64,
    /// The other replicas' total per window as an aggregator reported it (aggregated
    /// dissemination, `docs/design.md`): a lower bound of the truth, like `cur_sum`, so
    /// the view takes the larger of the two. Saturates at 2³² − 1, past every limit
    /// ([`Quota::MAX_LIMIT`]), so a saturated total still refuses as the true one would.
    cur_heard: u32,
    prev_heard: u32,
    /// This node's share of the key's quota in the current round (bounded admission).
    share: RoundShare,
}

impl Remote {
    fn roll(&mut self, by: i64) {
        // The current counts become the previous ones; a replica that counted in neither
        // window leaves its cell (the allocation stays, for the next replicas).
        let mut kept = 0;
        if by == 1 {
            for i in 0..self.len as usize {
                let c = self.cells[i];
                if c.cur > 0 {
                    self.cells[kept] = Cell { replica: c.replica, cur: 0, prev: c.cur };
                    kept += 1;
                }
            }
            self.prev_sum = self.cur_sum;
            self.prev_heard = self.cur_heard;
        } else {
            self.prev_sum = 0;
            self.prev_heard = 0;
        }
        self.len = kept as u32;
        self.cur_sum = 0;
        self.cur_heard = 0;
        self.share.roll(by);
    }

    /// What the view counts of the other replicas in the key's newest window (or, with
    /// `prev`, the one before): the larger of the two lower bounds it has.
    #[inline]
    fn seen(&self, prev: bool) -> u64 {
        if prev {
            self.prev_sum.max(u64::from(self.prev_heard))
        } else {
            self.cur_sum.max(u64::from(self.cur_heard))
        }
    }

    /// Raises the others' total an aggregator reported for the newest window (or, with
    /// `prev`, the one before) to `total`. Returns whether the view changed.
    fn hear(&mut self, prev: bool, total: u64) -> bool {
        let seen = self.seen(prev);
        let heard = if prev { &mut self.prev_heard } else { &mut self.cur_heard };
        *heard = saturate(total).max(*heard);
        u64::from(*heard) > seen
    }

    /// The cells in use.
    fn cells(&self) -> &[Cell] {
        &self.cells[..self.len as usize]
    }

    /// The replicas' counts of the newest window (or, with `prev`, the one before) as a
    /// G-Counter, for a sliding-log bucket that leaves the slot.
    fn counter(&self, prev: bool) -> GCounter<u32> {
        let mut g = GCounter::new();
        for c in self.cells() {
            let count = if prev { c.prev } else { c.cur };
            if count > 0 {
                g.merge_slot(c.replica, u64::from(count));
            }
        }
        g
    }

    /// Raises `replica`'s count in the key's newest window (or, with `prev`, the one
    /// before) to `count`. A replica without a cell gets one; when the allocation is full
    /// it grows if `room` grants the cells it grows by, and otherwise the count is added
    /// to the window's total. Returns whether the view changed.
    fn merge(&mut self, replica: u32, prev: bool, count: u32, room: impl FnOnce(usize) -> bool) -> bool {
        let len = self.len as usize;
        let added = match self.cells[..len].binary_search_by_key(&replica, |c| c.replica) {
            Ok(i) => {
                let c = &mut self.cells[i];
                let held = if prev { &mut c.prev } else { &mut c.cur };
                if *held >= count {
                    return false;
                }
                let added = count - *held;
                *held = count;
                added
            }
            Err(i) => {
                let capacity = self.cells.len();
                let grown = (capacity * 2).clamp(1, MAX_KEY_REPLICAS);
                if len < capacity || (grown > capacity && room(grown - capacity)) {
                    if len == capacity {
                        let mut cells = vec![Cell::default(); grown].into_boxed_slice();
                        cells[..len].copy_from_slice(&self.cells[..len]);
                        self.cells = cells;
                    }
                    self.cells.copy_within(i..len, i + 1);
                    self.cells[i] = if prev { Cell { replica, cur: 0, prev: count } } else { Cell { replica, cur: count, prev: 0 } };
                    self.len += 1;
                }
                count
            }
        };
        let sum = if prev { &mut self.prev_sum } else { &mut self.cur_sum };
        *sum = sum.saturating_add(u64::from(added));
        true
    }

    /// Bytes this entry holds outside the side table: its cells' allocation as the
    /// allocator rounds it (glibc: 8 bytes of header, 16-byte steps, 32 at least).
    fn heap_bytes(&self) -> usize {
        match self.cells.len() * std::mem::size_of::<Cell>() {
            0 => 0,
            n => (n + 8).next_multiple_of(16).max(32),
        }
    }
}

/// A count as a `u32`, saturated: past [`Quota::MAX_LIMIT`] it refuses all the same.
pub(crate) fn saturate(total: u64) -> u32 {
    u32::try_from(total).unwrap_or(u32::MAX)
}

/// What holds the window a peer's count is merged into (see [`Store::merge_into`]).
enum Target<'a> {
    /// A sliding-log bucket older than the key's previous window.
    Older(&'a mut Bucket),
    /// The key's slot: its newest window, or (`true`) the one before.
    Slot(&'a mut Remote, bool),
}

/// One sliding-log bucket older than a key's previous window: the local count and the
/// other replicas' counts.
#[derive(Debug, Default, Clone)]
struct Bucket {
    local: u32,
    /// The local count changed since it was last collected for gossip.
    dirty: bool,
    remote: GCounter<u32>,
    remote_sum: u64,
    /// The other replicas' total an aggregator reported (see [`Remote::seen`]).
    heard: u32,
}

impl Bucket {
    /// What the view counts of the other replicas: the larger of the two lower bounds (as
    /// [`Remote::seen`]).
    fn others(&self) -> u64 {
        self.remote_sum.max(u64::from(self.heard))
    }

    fn total(&self) -> u64 {
        u64::from(self.local) + self.others()
    }

    /// No count at all: neither local, nor per replica, nor in the totals alone.
    fn is_empty(&self) -> bool {
        self.local == 0 && self.remote.is_empty() && self.remote_sum == 0 && self.heard == 0
    }
}

/// A sliding-log key's buckets before its previous window, by key: index 0 is two
/// buckets before the newest, and there are `n − 1` of them (`n` as in
/// `algorithm::log_tick`). A `BTreeMap`, so that iteration is deterministic.
type Older = BTreeMap<u64, Vec<Bucket>>;

/// Replica entries held by `buckets`' remote counts: each is a cell of the key cap's
/// budget ([`KeyCap::take_cells`]).
fn bucket_cells(buckets: &[Bucket]) -> usize {
    buckets.iter().map(|b| b.remote.len()).sum()
}

/// The sum of `key`'s older buckets, and of their local counts.
#[inline]
fn older_sum(older: &Older, key: u64) -> (u64, u64) {
    older.get(&key).map_or((0, 0), |bs| bs.iter().fold((0, 0), |(t, l), b| (t + b.total(), l + u64::from(b.local))))
}

/// Before `e` rolls `by` (> 0) windows forward: moves its older buckets `by` older,
/// keeping those the decision still reads (`back`: buckets before the newest), and its
/// current and previous counts (with their unsent marks) into the buckets they become.
///
/// The buckets' replica entries are cells of `cap`'s budget: those dropped go back to it,
/// and a bucket made from the slot takes its entries from it, or (past the budget, or
/// past [`MAX_KEY_REPLICAS`]) keeps only the sum of the remote counts: stricter, as a
/// count merged there later joins the sum again.
fn shift_older(older: &mut Older, e: &Entry, remote: &[Remote], by: i64, back: u64, cap: &KeyCap) {
    let len = back.saturating_sub(1) as usize;
    let by = by.clamp(0, len as i64 + 2) as usize;
    let r = remote_of(e).map(|i| &remote[i]);
    // Remote counts held in the totals alone (no cell was left for them) count too.
    let cur = (e.cur > 0 || r.is_some_and(|r| r.seen(false) > 0)) && by >= 2 && by - 2 < len;
    let prev = (e.prev > 0 || r.is_some_and(|r| r.seen(true) > 0)) && by >= 1 && by - 1 < len;
    let Some(list) = (match older.get_mut(&e.key) {
        Some(l) => Some(l),
        None if cur || prev => Some(older.entry(e.key).or_default()),
        None => None,
    }) else {
        return;
    };
    let before = bucket_cells(list);
    list.resize_with(len, Bucket::default);
    for i in (0..len).rev() {
        list[i] = if i >= by { std::mem::take(&mut list[i - by]) } else { Bucket::default() };
    }
    cap.put_cells(before - bucket_cells(list));
    // The slot's window (`prev`: the one before the newest) as the bucket it becomes.
    let leaving = |prev: bool| {
        let counter = r.map(|r| r.counter(prev)).unwrap_or_default();
        let n = counter.len();
        Bucket {
            local: if prev { e.prev } else { e.cur },
            dirty: e.remote_and_dirty & if prev { DIRTY_PREV } else { DIRTY_CUR } != 0,
            remote: if n <= MAX_KEY_REPLICAS && cap.take_cells(n) { counter } else { GCounter::new() },
            remote_sum: r.map_or(0, |r| if prev { r.prev_sum } else { r.cur_sum }),
            heard: r.map_or(0, |r| if prev { r.prev_heard } else { r.cur_heard }),
        }
    };
    if prev {
        list[by - 1] = leaving(true);
    }
    if cur {
        list[by - 2] = leaving(false);
    }
    if list.iter().all(Bucket::is_empty) {
        older.remove(&e.key);
    }
}

/// Stripes of a hot cell: threads are spread over them round-robin.
const STRIPES: usize = 16;
/// The largest lease one grant hands a stripe.
pub(crate) const LEASE_MAX: u64 = 1024;
const FIELD_BITS: u32 = 20;
const FIELD_MASK: u64 = (1 << FIELD_BITS) - 1;
const EPOCH_MASK: u64 = (1 << 24) - 1;

/// A lease word: epoch (24 bits) | budget (20) | spent (20).
#[inline]
fn lease_word(epoch: u32, budget: u64, spent: u64) -> u64 {
    ((u64::from(epoch) & EPOCH_MASK) << (2 * FIELD_BITS)) | (budget << FIELD_BITS) | spent
}
#[inline]
fn lease_epoch(w: u64) -> u64 {
    w >> (2 * FIELD_BITS)
}
#[inline]
fn lease_budget(w: u64) -> u64 {
    (w >> FIELD_BITS) & FIELD_MASK
}
#[inline]
fn lease_spent(w: u64) -> u64 {
    w & FIELD_MASK
}

/// This thread's stripe.
#[inline]
fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES);
    STRIPE.with(|s| *s)
}

/// What the lock-free path reads of a hot cell (see the module doc). Written only under
/// the shard's lock, as a seqlock: `state` holds the window (high 32 bits) and the epoch
/// (low 32), odd while the cell changes.
#[derive(Default)]
struct HotHead {
    state: AtomicU64,
    key: AtomicU64,
    window_ms: AtomicU64,
    /// The bounded policy's round the leases belong to, or [`NO_ROUND`].
    round: AtomicU64,
    /// Requests of this epoch's key and window timestamped before this are refused.
    deny_until: AtomicI64,
    /// When the full quota is back for such a refusal (the time, not a wait).
    deny_reset_at: AtomicI64,
    /// The store's quota at the last re-arm, as [`Quota::parts`] packed: limit (high
    /// 32 bits) and window in ms (low 32): what a lock-free `check` reports.
    quota: AtomicU64,
    /// What remains, counting every lease out as spent, as the last lock-path decision
    /// of this epoch left it (0 when unknown): a lease holder's `check` reports this plus
    /// what is unspent of its own lease.
    pool: AtomicU64,
    /// The token bucket's [`algorithm::token_refill_ms`] after every lease out is spent,
    /// as the last grant of this epoch left it (`u64::MAX`: none): an admitted `check`'s
    /// reset time is the rest of its window plus this, never earlier than the exact one.
    refill_ms: AtomicU64,
}

/// The head's round when leases are not drawn from a round budget.
const NO_ROUND: u64 = u64::MAX;

#[inline]
fn round_word(round: Option<u32>) -> u64 {
    round.map_or(NO_ROUND, u64::from)
}

/// The head's [`HotHead::quota`] word for `q`.
fn quota_word(q: &Quota) -> u64 {
    let (limit, _, window_ms) = q.parts();
    (u64::from(limit) << 32) | u64::from(window_ms)
}

#[derive(Default)]
struct Stripe {
    lease: AtomicU64,
    /// Elapsed ms into the window at which the lease was granted: an earlier request
    /// (which the strategies may judge more strictly) takes the lock path.
    from: AtomicU64,
    /// Refusals made without the lock (added to the store's tally).
    denied: AtomicU64,
}

/// One shard's hot cell. See the module documentation.
#[derive(Default)]
struct HotCell {
    head: Padded<HotHead>,
    stripes: [Padded<Stripe>; STRIPES],
}

impl HotCell {
    /// The head's state, the window's length and the time into it, if the cell serves
    /// `key` at `ts_ms` in `round`'s leases.
    #[inline]
    fn serves(&self, key: u64, ts_ms: i64, round: Option<u32>) -> Option<(u64, u64, u64)> {
        let h = &self.head.0;
        let s1 = h.state.load(Ordering::Acquire);
        if s1 & 1 != 0 || h.key.load(Ordering::Acquire) != key || h.round.load(Ordering::Acquire) != round_word(round) {
            return None;
        }
        let w = h.window_ms.load(Ordering::Acquire) as i64;
        if w == 0 || ts_ms.div_euclid(w) as u32 != (s1 >> 32) as u32 {
            return None;
        }
        Some((s1, w as u64, ts_ms.rem_euclid(w) as u64))
    }

    /// Spends one unit of `st`'s lease of `epoch` at `elapsed`; returns the lease word
    /// after the spend.
    #[inline]
    fn spend(st: &Stripe, epoch: u64, elapsed: u64) -> Option<u64> {
        let mut cur = st.lease.load(Ordering::Acquire);
        // A lease of this epoch belongs to this key and window (grants carry the epoch
        // the head had when they were made; every older lease was taken back first).
        while lease_epoch(cur) == epoch && lease_spent(cur) < lease_budget(cur) && elapsed >= st.from.load(Ordering::Relaxed) {
            match st.lease.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(cur + 1),
                Err(now) => cur = now,
            }
        }
        None
    }

    /// Spends one unit of the calling thread's lease, or reports a standing refusal.
    /// `None`: the lock path decides.
    #[inline]
    fn try_admit(&self, key: u64, ts_ms: i64, round: Option<u32>) -> Option<bool> {
        let (s1, _, elapsed) = self.serves(key, ts_ms, round)?;
        let st = &self.stripes[stripe_index()].0;
        if Self::spend(st, s1 & EPOCH_MASK, elapsed).is_some() {
            return Some(true);
        }
        let h = &self.head.0;
        let deny = h.deny_until.load(Ordering::Acquire);
        if ts_ms < deny && h.state.load(Ordering::Acquire) == s1 {
            st.denied.fetch_add(1, Ordering::Relaxed);
            return Some(false);
        }
        None
    }

    /// [`try_admit`](Self::try_admit) with the decision's figures, for `check`. An
    /// admission under the token bucket reports the reset time of the count with every
    /// lease out spent: never earlier than the exact one.
    ///
    /// An admission reports as remaining what the last lock-path decision left counting
    /// every lease out as spent, plus what is unspent of this thread's lease: never more
    /// than what was truly left at some moment between this admission and the return.
    #[inline]
    fn try_decide(&self, key: u64, ts_ms: i64, round: Option<u32>, strategy: Strategy) -> Option<Verdict> {
        let (s1, w, elapsed) = self.serves(key, ts_ms, round)?;
        let h = &self.head.0;
        let q = h.quota.load(Ordering::Acquire);
        let (limit, span) = (q >> 32, q & u64::from(u32::MAX));
        let st = &self.stripes[stripe_index()].0;
        if let Some(after) = Self::spend(st, s1 & EPOCH_MASK, elapsed) {
            // Once admitted, the full quota is back at a time that does not depend on the
            // counts (`algorithm`'s verdicts with the request counted), except for the
            // bucket, whose refill is read now that the lease is spent (the grant published
            // it first); a bucket is always full again within the rest of this window and
            // the next.
            let reset_after_ms = match strategy {
                Strategy::FixedWindow => w - elapsed,
                Strategy::SlidingWindow => 2 * w - elapsed,
                Strategy::SlidingLog => (w - elapsed) + algorithm::log_tick(span).1 * w,
                Strategy::TokenBucket => (w - elapsed) + h.refill_ms.load(Ordering::Acquire).min(w),
            };
            let own = lease_budget(after) - lease_spent(after);
            // The pool counts this lease as spent; read after the spend, it is the one of a
            // lock-path decision made after this lease was granted. Any lock-path decision
            // since the spend that touched this stripe (a take-back) moved the unspent part
            // into the pool: then only that part is reported.
            let pool = h.pool.load(Ordering::Acquire);
            let remaining = if st.lease.load(Ordering::Acquire) == after { pool.saturating_add(own) } else { own };
            return Some(Verdict { allowed: true, limit, remaining, reset_after_ms, retry_after_ms: None });
        }
        // A standing refusal was decided on the exact count, which has not changed in this
        // epoch: its retry and reset times are absolute.
        let deny = h.deny_until.load(Ordering::Acquire);
        let reset_at = h.deny_reset_at.load(Ordering::Acquire);
        if ts_ms < deny && h.state.load(Ordering::Acquire) == s1 {
            st.denied.fetch_add(1, Ordering::Relaxed);
            let retry = deny.saturating_sub(ts_ms) as u64;
            let reset = reset_at.saturating_sub(ts_ms).max(0) as u64;
            return Some(Verdict { allowed: false, limit, remaining: 0, reset_after_ms: reset, retry_after_ms: Some(retry) });
        }
        None
    }
}

/// The lock-protected side of a shard's hot cell.
#[derive(Debug, Default)]
struct HotState {
    /// The key the cell serves (0: none).
    key: u64,
    /// Even; the head's epoch while stable.
    epoch: u32,
    window: u32,
    /// The bounded policy's round the leases are drawn from (their admissions count
    /// against that round's budget when folded in).
    round: Option<u32>,
    /// Stripes holding a lease (one bit each).
    granted: u32,
    /// The last contended key that was not promoted: a second contention in a row
    /// promotes it.
    candidate: u64,
    /// The stripes' refusals counted so far (the bounded policy's tally of the hot key's
    /// refusals takes what is new).
    denied_seen: u64,
}

impl HotState {
    /// Takes stripe `i`'s lease back; returns what was spent of it.
    fn reclaim(&mut self, cell: &HotCell, i: usize) -> u64 {
        if self.granted & (1 << i) == 0 {
            return 0;
        }
        self.granted &= !(1 << i);
        lease_spent(cell.stripes[i].0.lease.swap(lease_word(self.epoch, 0, 0), Ordering::AcqRel))
    }

    /// Refusals the lock-free path served since the last call, or since the cell was
    /// pointed at its key.
    fn new_denials(&mut self, cell: &HotCell) -> u64 {
        let total: u64 = cell.stripes.iter().map(|st| st.0.denied.load(Ordering::Relaxed)).sum();
        let new = total.wrapping_sub(self.denied_seen);
        self.denied_seen = total;
        new
    }

    fn reclaim_all(&mut self, cell: &HotCell) -> u64 {
        let mut spent = 0;
        while self.granted != 0 {
            spent += self.reclaim(cell, self.granted.trailing_zeros() as usize);
        }
        spent
    }

    /// Leases granted and not taken back, spent or not.
    fn reserved(&self, cell: &HotCell) -> u64 {
        let mut bits = self.granted;
        let mut total = 0;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            total += lease_budget(cell.stripes[i].0.lease.load(Ordering::Acquire));
        }
        total
    }

    /// What has been spent of the leases out, without taking them back.
    fn spent(&self, cell: &HotCell) -> u64 {
        (0..STRIPES).filter(|i| self.granted & (1 << i) != 0).map(|i| lease_spent(cell.stripes[i].0.lease.load(Ordering::Acquire))).sum()
    }

    /// Points the cell at `key` in `window` (of `window_ms`, under the store's `quota`)
    /// under a new epoch, with no standing refusal. Every lease must have been taken back.
    fn rearm(&mut self, cell: &HotCell, key: u64, window: u32, window_ms: u64, round: Option<u32>, quota: Option<&Quota>) {
        debug_assert_eq!(self.granted, 0);
        let h = &cell.head.0;
        h.state.store((u64::from(self.window) << 32) | u64::from(self.epoch | 1), Ordering::SeqCst);
        self.epoch = self.epoch.wrapping_add(2);
        self.key = key;
        self.window = window;
        self.round = round;
        self.new_denials(cell);
        h.key.store(key, Ordering::SeqCst);
        h.window_ms.store(window_ms, Ordering::SeqCst);
        h.round.store(round_word(round), Ordering::SeqCst);
        h.deny_until.store(i64::MIN, Ordering::SeqCst);
        h.deny_reset_at.store(i64::MIN, Ordering::SeqCst);
        h.quota.store(quota.map_or(0, quota_word), Ordering::SeqCst);
        h.pool.store(0, Ordering::SeqCst);
        h.refill_ms.store(u64::MAX, Ordering::SeqCst);
        h.state.store((u64::from(window) << 32) | u64::from(self.epoch), Ordering::SeqCst);
    }

    /// Publishes a standing refusal until `until`, the full quota being back at
    /// `reset_at` (`i64::MIN` for both lifts it), under a new epoch, so that a lock-free
    /// reader never mixes two refusals' figures. Every lease must have been taken back.
    fn refuse_until(&mut self, cell: &HotCell, until: i64, reset_at: i64) {
        debug_assert_eq!(self.granted, 0);
        let h = &cell.head.0;
        let window = u64::from(self.window) << 32;
        h.state.store(window | u64::from(self.epoch | 1), Ordering::SeqCst);
        self.epoch = self.epoch.wrapping_add(2);
        h.deny_until.store(until, Ordering::SeqCst);
        h.deny_reset_at.store(reset_at, Ordering::SeqCst);
        h.state.store(window | u64::from(self.epoch), Ordering::SeqCst);
    }

    /// Lifts the standing refusal, if any (the key's count changed in a way it did not
    /// foresee). Every lease must have been taken back.
    fn lift_refusal(&mut self, cell: &HotCell) {
        if cell.head.0.deny_until.load(Ordering::Relaxed) != i64::MIN {
            self.refuse_until(cell, i64::MIN, i64::MIN);
        }
    }

    /// Publishes what remains counting every lease out as spent (before a grant: a lease
    /// holder reads it after its spend, see [`HotCell::try_decide`]).
    fn set_pool(cell: &HotCell, pool: u64) {
        let p = &cell.head.0.pool;
        if p.load(Ordering::Relaxed) != pool {
            p.store(pool, Ordering::Release);
        }
    }

    fn grant(&mut self, cell: &HotCell, i: usize, budget: u64, from_elapsed: u64) {
        debug_assert!(self.granted & (1 << i) == 0 && budget <= LEASE_MAX);
        let st = &cell.stripes[i].0;
        st.from.store(from_elapsed, Ordering::Relaxed);
        st.lease.store(lease_word(self.epoch, budget, 0), Ordering::Release);
        self.granted |= 1 << i;
    }
}

struct Shard {
    table: Table,
    remote: Vec<Remote>,
    free_remote: Vec<u32>,
    /// Keys whose local counts changed since the last collection (see the module doc).
    dirty: Vec<u64>,
    quota: Quota,
    strategy: Strategy,
    /// Decisions made in this shard, counted under its lock (no shared atomics).
    tally: Tally,
    /// The horizon of the last sweep made because the key cap was reached: sweeping
    /// again before the horizon moves would find nothing new to drop.
    cap_swept: Option<u32>,
    /// The lock-protected side of the shard's hot cell.
    hot: HotState,
    /// Sliding-log buckets before the previous window (empty for other strategies).
    older: Older,
}

/// A shard: its lock, and the hot cell the lock-free path reads (allocated on first
/// contention, never freed before the store). The cell's pointer has a cache line of its
/// own: every hot-key decision reads it, and every other key's decision writes the lock.
struct ShardCell {
    lock: Mutex<Shard>,
    hot: Padded<OnceLock<Box<HotCell>>>,
}

/// Decisions counted by a store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub allowed: u64,
    pub denied: u64,
    /// Admitted with the view at 90 % of the limit or more.
    pub near_limit: u64,
}

/// Distance in windows from `entry` to `now`, both as low 32 bits of window indices.
#[inline]
fn windows_since(entry: u32, now: u32) -> i64 {
    i64::from(now.wrapping_sub(entry) as i32)
}

impl Shard {
    /// Appends every non-zero count of `e` (local and remote, every retained window) to
    /// `out`; `now`: the current window index.
    fn export_entry(&self, e: &Entry, now: i64, out: &mut Vec<Exported>) {
        let window = now - windows_since(e.window, now as u32);
        let (key, replica) = (e.key, LOCAL_REPLICA);
        if e.cur > 0 {
            out.push(Exported { key, window, replica, count: u64::from(e.cur) });
        }
        if e.prev > 0 {
            out.push(Exported { key, window: window - 1, replica, count: u64::from(e.prev) });
        }
        if let Some(i) = remote_of(e) {
            for c in self.remote[i].cells() {
                if c.cur > 0 {
                    out.push(Exported { key, window, replica: c.replica, count: u64::from(c.cur) });
                }
                if c.prev > 0 {
                    out.push(Exported { key, window: window - 1, replica: c.replica, count: u64::from(c.prev) });
                }
            }
        }
        for (i, b) in self.older.get(&key).into_iter().flatten().enumerate() {
            let window = window - 2 - i as i64;
            if b.local > 0 {
                out.push(Exported { key, window, replica, count: u64::from(b.local) });
            }
            out.extend(b.remote.iter().map(|(replica, count)| Exported { key, window, replica, count }));
        }
    }

    /// Calls `f` with each retained window of `e` (now at window index `now`): the window,
    /// this node's count in it, the other replicas' counts held here, and the others' total
    /// an aggregator reported.
    fn windows_of(&self, e: &Entry, now: i64, mut f: impl FnMut(i64, u32, u64, u32)) {
        let window = now - windows_since(e.window, now as u32);
        let r = remote_of(e).map(|i| &self.remote[i]);
        f(window, e.cur, r.map_or(0, |r| r.cur_sum), r.map_or(0, |r| r.cur_heard));
        f(window - 1, e.prev, r.map_or(0, |r| r.prev_sum), r.map_or(0, |r| r.prev_heard));
        for (i, b) in self.older.get(&e.key).into_iter().flatten().enumerate() {
            f(window - 2 - i as i64, b.local, b.remote_sum, b.heard);
        }
    }

    fn free(remote: &mut [Remote], free_remote: &mut Vec<u32>, older: &mut Older, e: &Entry, dropped: &mut Dropped) {
        dropped.keys += 1;
        if let Some(i) = remote_of(e) {
            let r = std::mem::take(&mut remote[i]);
            dropped.cells += r.cells.len();
            dropped.from_peers += usize::from(r.from_peer);
            free_remote.push(i as u32);
        }
        dropped.cells += older.remove(&e.key).map_or(0, |bs| bucket_cells(&bs));
    }

    fn ensure_remote(remote: &mut Vec<Remote>, free_remote: &mut Vec<u32>, e: &mut Entry) -> usize {
        if let Some(i) = remote_of(e) {
            return i;
        }
        let i = match free_remote.pop() {
            Some(i) => i as usize,
            None => {
                remote.push(Remote::default());
                remote.len() - 1
            }
        };
        e.remote_and_dirty = (e.remote_and_dirty & DIRTY) | i as u32;
        i
    }

    /// Takes every lease of the hot key back into its count.
    fn fold_hot(&mut self, cell: Option<&HotCell>, track: bool) {
        let Some(cell) = cell else { return };
        if self.hot.granted == 0 {
            return;
        }
        let spent = self.hot.reclaim_all(cell);
        self.tally.allowed += spent;
        if let Some(i) = self.table.find(self.hot.key) {
            settle(self.table.at(i), &mut self.remote, self.hot.round, spent, &mut self.dirty, track);
        }
    }

    /// Folds the hot key's leases into its count and frees the cell (before the table is
    /// rebuilt or the quota changes).
    fn release_hot(&mut self, cell: Option<&HotCell>, track: bool) {
        self.fold_hot(cell, track);
        if let Some(cell) = cell {
            if self.hot.key != 0 {
                self.hot.rearm(cell, 0, 0, 0, None, None);
            }
        }
    }

    /// Drops keys whose newest window is older than `horizon - 1`, in a table sized for
    /// the survivors.
    fn sweep(&mut self, cell: Option<&HotCell>, track: bool, horizon: u32) -> Dropped {
        self.release_hot(cell, track);
        let back = algorithm::tick(self.strategy, self.quota.window_ms()).1 as i64;
        let (remote, free, older) = (&mut self.remote, &mut self.free_remote, &mut self.older);
        let mut dropped = Dropped::default();
        self.table.rebuild(|e| {
            let age = windows_since(e.window, horizon);
            let keep = age < back + 1;
            if !keep {
                Self::free(remote, free, older, e, &mut dropped);
            } else if let Some(bs) = older.get_mut(&e.key).filter(|_| age > 0) {
                // Buckets before the oldest acceptable window (horizon - back) are read by
                // no decision: drop them, so no cell of a replica whose index is freed
                // after this sweep survives in a key that lives on.
                let before = bucket_cells(bs);
                bs.truncate((back - 1 - age).max(0) as usize);
                dropped.cells += before - bucket_cells(bs);
                if bs.iter().all(Bucket::is_empty) {
                    older.remove(&e.key);
                }
            }
            keep
        });
        dropped
    }

    /// Rolls `e` forward to `window` if that is newer; returns how far (negative if
    /// `window` is older).
    #[inline]
    fn roll(e: &mut Entry, remote: &mut [Remote], window: u32) -> i64 {
        let by = windows_since(e.window, window);
        if by > 0 {
            e.prev = if by == 1 { e.cur } else { 0 };
            e.cur = 0;
            e.window = window;
            // An unsent current count becomes an unsent previous count; anything older
            // can no longer influence a decision.
            let dirty = if by == 1 && e.remote_and_dirty & DIRTY_CUR != 0 { DIRTY_PREV } else { 0 };
            e.remote_and_dirty = (e.remote_and_dirty & NO_REMOTE) | dirty;
            if let Some(i) = remote_of(e) {
                remote[i].roll(by);
            }
        }
        by
    }
}

/// One key's view of one window, as [`Store::views`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ViewCount {
    pub key: u64,
    pub window: i64,
    /// This node's own count.
    pub own: u64,
    /// What the view decides on: every replica's count it knows of.
    pub total: u64,
}

/// What [`Store::others_of`] reports of one key and window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct OthersCount {
    pub key: u64,
    pub window: i64,
    /// The other replicas' counts this node holds.
    pub held: u64,
    /// The others' total an aggregator reported.
    pub heard: u64,
}

/// One count exported by [`Store::export`] or [`Store::collect_changes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Exported {
    pub key: u64,
    pub window: i64,
    /// A replica index, or [`LOCAL_REPLICA`].
    pub replica: u32,
    pub count: u64,
}

/// Table slots one step of [`Store::export_from`] may look at per count of its budget.
const SCAN_PER_COUNT: usize = 16;

/// Where a step-wise export ([`Store::export_from`]) stopped: the shard, the table slot
/// in it, and what that slot index means: the table's generation, size and farthest
/// probe when the cursor last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ExportCursor {
    shard: usize,
    slot: usize,
    generation: u64,
    capacity: usize,
    max_probe: usize,
    /// The shard's table was rebuilt while it was being exported: keys that wrapped
    /// around the end are exported again at its end.
    resumed: bool,
}

#[derive(Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// The key cap, shared by every store of a limiter, and the budgets peers draw on.
///
/// Keys first counted locally are capped at `max`; keys a peer's counts created are
/// capped at `max` too, in a budget of their own, so no peer input can take a local
/// client's room; and the replica cells of every key's remote counts are capped at
/// [`CELLS_PER_KEY`] × `max`.
#[derive(Debug)]
pub(crate) struct KeyCap {
    keys: AtomicUsize,
    from_peers: AtomicUsize,
    cells: AtomicUsize,
    max: usize,
}

impl KeyCap {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { keys: AtomicUsize::new(0), from_peers: AtomicUsize::new(0), cells: AtomicUsize::new(0), max })
    }

    /// Takes `n` units of `counter`'s budget of `max`, if that many are left.
    fn take(counter: &AtomicUsize, n: usize, max: usize) -> bool {
        counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |k| (k + n <= max).then_some(k + n)).is_ok()
    }

    /// Takes `n` replica cells from the budget, if that many are left.
    fn take_cells(&self, n: usize) -> bool {
        Self::take(&self.cells, n, self.max.saturating_mul(CELLS_PER_KEY))
    }

    /// Gives `n` replica cells back to the budget.
    fn put_cells(&self, n: usize) {
        if n > 0 {
            self.cells.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// What a sweep dropped, for the key cap's accounts.
#[derive(Debug, Default, Clone, Copy)]
struct Dropped {
    keys: usize,
    /// Of those, keys charged to the budget of keys known only from peers.
    from_peers: usize,
    /// Replica cells their remote counts held.
    cells: usize,
}

/// Time bounds every store shares: how late and how early a timestamp may be.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tolerances {
    pub max_age_ms: u64,
    pub max_skew_ms: u64,
}

/// The sharded store. See the module documentation.
pub(crate) struct Store {
    shards: Box<[Padded<ShardCell>]>,
    shard_mask: u64,
    /// Keys in this store (on its own cache line: new keys write it; every request
    /// reads the fields beside it).
    keys: Padded<AtomicUsize>,
    cap: Arc<KeyCap>,
    /// Replay tolerance: windows a timestamp this late can reach are kept.
    max_age_ms: i64,
    /// Clock-skew tolerance: no count for a window later than now plus this is taken.
    max_skew_ms: i64,
    /// Window index of the last full sweep triggered by the key cap.
    last_cap_sweep: AtomicI64,
    track_changes: AtomicBool,
    /// Every shard's strategy (it never changes): it sets the length of the windows kept.
    strategy: Strategy,
}

impl Store {
    pub(crate) fn new(shards: usize, cap: Arc<KeyCap>, tolerances: Tolerances, probe_seed: u64, quota: Quota, strategy: Strategy) -> Self {
        debug_assert!(shards.is_power_of_two());
        let shards: Box<[_]> = (0..shards)
            .map(|i| {
                Padded(ShardCell {
                    lock: Mutex::new(Shard {
                        table: Table::new(splitmix64(probe_seed ^ i as u64)),
                        remote: Vec::new(),
                        free_remote: Vec::new(),
                        dirty: Vec::new(),
                        quota,
                        strategy,
                        tally: Tally::default(),
                        cap_swept: None,
                        hot: HotState::default(),
                        older: Older::new(),
                    }),
                    hot: Padded(OnceLock::new()),
                })
            })
            .collect();
        let shard_mask = (shards.len() as u64).saturating_sub(1);
        Self {
            shards,
            shard_mask,
            keys: Padded(AtomicUsize::new(0)),
            cap,
            max_age_ms: tolerances.max_age_ms as i64,
            max_skew_ms: tolerances.max_skew_ms as i64,
            last_cap_sweep: AtomicI64::new(i64::MIN),
            track_changes: AtomicBool::new(false),
            strategy,
        }
    }

    #[inline]
    fn shard(&self, key: u64) -> &ShardCell {
        &self.shards[((key >> 40) & self.shard_mask) as usize].0
    }

    /// From now on, remember which keys' local counts change, for gossip.
    pub(crate) fn track_changes(&self) {
        self.track_changes.store(true, Ordering::Relaxed);
    }

    /// Decides one request for `key` at `ts_ms` and counts it if admitted. `now_ms` is
    /// the limiter clock's reading, used only to reclaim expired keys.
    ///
    /// `quota` overrides the store's quota (it must have the store's window).
    ///
    /// With the store's quota, a key promoted to its shard's hot cell is decided without
    /// the lock while the thread's lease lasts, and a standing refusal is served without
    /// it too, wherever the figures stay exact (see [`HotCell::try_decide`]).
    #[inline]
    pub(crate) fn decide(
        &self,
        key: u64,
        ts_ms: i64,
        now_ms: i64,
        quota: Option<&Quota>,
        budget: Option<&Budget>,
    ) -> Result<Verdict, Error> {
        if quota.is_none() {
            if let Some(cell) = self.shard(key.max(1)).hot.0.get() {
                if let Some(v) = cell.try_decide(key.max(1), ts_ms, budget.map(|b| b.round), self.strategy) {
                    return Ok(v);
                }
            }
        }
        self.decide_locked(key, ts_ms, now_ms, quota, budget)
    }

    /// [`decide`](Self::decide) under the shard lock (kept out of line: the lease path
    /// above stays small).
    #[inline(never)]
    fn decide_locked(&self, key: u64, ts_ms: i64, now_ms: i64, quota: Option<&Quota>, budget: Option<&Budget>) -> Result<Verdict, Error> {
        self.decide_with(key, ts_ms, now_ms, quota, budget, algorithm::evaluate)
    }

    /// Like [`decide`](Self::decide) but computes only whether to admit.
    ///
    /// With the store's quota, a key promoted to its shard's hot cell is
    /// decided without the lock while its thread's lease lasts (see the module doc).
    #[inline]
    pub(crate) fn admit(&self, key: u64, ts_ms: i64, now_ms: i64, quota: Option<&Quota>, budget: Option<&Budget>) -> Result<bool, Error> {
        if quota.is_none() {
            if let Some(cell) = self.shard(key.max(1)).hot.0.get() {
                if let Some(v) = cell.try_admit(key.max(1), ts_ms, budget.map(|b| b.round)) {
                    return Ok(v);
                }
            }
        }
        self.decide_with(key, ts_ms, now_ms, quota, budget, algorithm::admits)
    }

    /// The oldest window a request accepted at `now_ms` can fall in: keys whose newest
    /// window is older than the oldest one such a request reads are dead. Windows are
    /// those the store keeps for a quota of `window_ms` (the log's buckets, see the
    /// module doc).
    fn horizon(&self, now_ms: i64, window_ms: u64) -> u32 {
        let tick = algorithm::tick(self.strategy, window_ms).0;
        now_ms.saturating_sub(self.max_age_ms).div_euclid(tick as i64) as u32
    }

    /// The windows a count may be for at `now_ms`: from the oldest one a decision on the
    /// oldest request that can still arrive reads (the one before it, or the sliding
    /// log's `n` buckets before it), to the newest an early one can. Indices are in the
    /// store's windows for a quota of `window_ms` (the log's buckets).
    pub(crate) fn acceptable_windows(&self, now_ms: i64, window_ms: u64) -> std::ops::RangeInclusive<i64> {
        let (tick, back) = algorithm::tick(self.strategy, window_ms);
        let w = tick as i64;
        let oldest = now_ms.saturating_sub(self.max_age_ms).div_euclid(w) - back as i64;
        oldest..=now_ms.saturating_add(self.max_skew_ms).div_euclid(w)
    }

    /// The length of the windows this store keeps, in ms: the quota's window, or the
    /// sliding log's bucket. Gossip counts and digests name windows in this unit.
    pub(crate) fn tick_ms(&self, window_ms: u64) -> u64 {
        algorithm::tick(self.strategy, window_ms).0
    }

    #[inline]
    fn decide_with<V: Outcome>(
        &self,
        key: u64,
        ts_ms: i64,
        now_ms: i64,
        quota: Option<&Quota>,
        budget: Option<&Budget>,
        f: fn(Strategy, &Quota, Counts, u64) -> V,
    ) -> Result<V, Error> {
        // Leases serve the store's own quota only.
        let lease = quota.is_none();
        let key = key.max(1);
        let track = self.track_changes.load(Ordering::Relaxed);
        let cell = self.shard(key);
        // A lock someone else holds is what promotes a key to the hot cell.
        let (mut guard, contended) = match cell.lock.try_lock() {
            Some(g) => (g, false),
            None => (cell.lock.lock(), true),
        };
        let shard = &mut *guard;
        let quota = *quota.unwrap_or(&shard.quota);
        let (tick_ms, back) = algorithm::tick(shard.strategy, quota.window_ms());
        let w = tick_ms as i64;
        let window = ts_ms.div_euclid(w) as u32;
        let elapsed = ts_ms.rem_euclid(w) as u64;
        let slot = match shard.table.find(key) {
            Some(i) => {
                // A key ahead of this request: the clock stepped back (the key keeps its
                // counts: that window can still be decided once the clock is back), or,
                // if it is further ahead than any step back the store allows for, stale
                // state seen through 32-bit wrap-around: start it afresh. (Only a key
                // ahead of this request can be either; the common path pays nothing.)
                if windows_since(shard.table.at(i).window, window) < 0 {
                    let newest = *self.acceptable_windows(now_ms.saturating_add(MAX_STEP_BACK_MS), quota.window_ms()).end() as u32;
                    if windows_since(shard.table.at(i).window, newest) < 0 {
                        if shard.hot.key == key {
                            shard.release_hot(cell.hot.0.get().map(|c| &**c), track);
                        }
                        shard.table.at(i).window = window.wrapping_sub(back as u32 + 1);
                    }
                }
                i
            }
            None => {
                self.reserve_key(shard, cell.hot.0.get().map(|c| &**c), self.horizon(now_ms, quota.window_ms()), false)?;
                shard.table.insert_new_at(Entry { key, window, cur: 0, prev: 0, remote_and_dirty: NO_REMOTE })
            }
        };
        if lease && contended && shard.hot.key != key {
            if shard.hot.key == 0 || shard.hot.candidate == key {
                // Promote: the previous hot key's leases go back into its count first.
                let hot = cell.hot.0.get_or_init(Box::default);
                shard.fold_hot(Some(hot), track);
                let w = shard.table.at(slot).window;
                shard.hot.rearm(hot, key, w, tick_ms, None, Some(&shard.quota));
                shard.hot.candidate = 0;
            } else {
                shard.hot.candidate = key;
            }
        }
        let req = Request { quota: &quota, window, elapsed, budget, track, ts_ms, lease, tick_ms, back, cap: &self.cap };
        Ok(apply(shard, cell.hot.0.get().map(|c| &**c), slot, &req, f))
    }

    /// Makes room for one more key in `shard` or refuses it: a key a local request
    /// creates is charged to the local clients' cap, one a peer's count creates
    /// (`from_peer`) to the budget of keys known only from peers.
    #[cold]
    fn reserve_key(&self, shard: &mut Shard, hot: Option<&HotCell>, horizon: u32, from_peer: bool) -> Result<(), Error> {
        let track = self.track_changes.load(Ordering::Relaxed);
        if !self.try_count_key(from_peer) {
            // At the cap: drop this shard's expired keys, once per horizon (a flood of new
            // ids must not rebuild the shard on every refused request).
            if shard.cap_swept != Some(horizon) {
                shard.cap_swept = Some(horizon);
                let removed = shard.sweep(hot, track, horizon);
                self.forget(removed);
            }
            if !self.try_count_key(from_peer) {
                self.sweep_all_for_room(horizon, from_peer)?;
            }
        }
        if shard.table.is_full() {
            // Grow, dropping what has expired in the same pass: memory follows active keys.
            let removed = shard.sweep(hot, track, horizon);
            self.forget(removed);
        }
        Ok(())
    }

    /// The key cap is reached: other shards may hold expired keys. Sweeps them all, at
    /// most once per window, one shard lock at a time (skipping busy shards, this one
    /// included: its lock is held by the caller).
    #[cold]
    fn sweep_all_for_room(&self, horizon: u32, from_peer: bool) -> Result<(), Error> {
        let last = self.last_cap_sweep.load(Ordering::Relaxed);
        let window = i64::from(horizon);
        if last != window && self.last_cap_sweep.compare_exchange(last, window, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            for s in self.shards.iter() {
                if let Some(mut other) = s.0.lock.try_lock() {
                    let track = self.track_changes.load(Ordering::Relaxed);
                    let removed = other.sweep(s.0.hot.0.get().map(|c| &**c), track, horizon);
                    self.forget(removed);
                }
            }
            if self.try_count_key(from_peer) {
                return Ok(());
            }
        }
        Err(Error::KeyCapacity { max: self.cap.max })
    }

    fn try_count_key(&self, from_peer: bool) -> bool {
        let budget = if from_peer { &self.cap.from_peers } else { &self.cap.keys };
        let ok = KeyCap::take(budget, 1, self.cap.max);
        if ok {
            self.keys.0.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Accounts for keys dropped from this store.
    fn forget(&self, d: Dropped) {
        if d.keys > 0 {
            self.keys.0.fetch_sub(d.keys, Ordering::Relaxed);
            self.cap.keys.fetch_sub(d.keys - d.from_peers, Ordering::Relaxed);
            self.cap.from_peers.fetch_sub(d.from_peers, Ordering::Relaxed);
        }
        self.cap.put_cells(d.cells);
    }

    /// Raises remote replica index `replica`'s count of `key` in `window` to `count`.
    ///
    /// A window newer than the key's rolls the key forward; the previous window merges
    /// into the previous counts (and, for the sliding log, the older buckets it reads
    /// into those); anything older is ignored (it can no longer influence a decision).
    /// Returns whether the state changed.
    pub(crate) fn merge(&self, key: u64, window: i64, replica: u32, count: u64, now_ms: i64) -> Result<bool, Error> {
        if count == 0 || replica == LOCAL_REPLICA {
            return Ok(false);
        }
        self.merge_into(key, window, now_ms, |target| match target {
            Target::Older(b) => {
                let before = b.remote.get(replica);
                if before == 0 && (b.remote.len() >= MAX_KEY_REPLICAS || !self.cap.take_cells(1)) {
                    // No entry to hold it: the bucket's total takes it (stricter, never looser).
                    b.remote_sum = b.remote_sum.saturating_add(count);
                    return true;
                }
                if b.remote.merge_slot(replica, count) {
                    b.remote_sum = b.remote_sum.saturating_add(count - before);
                    return true;
                }
                false
            }
            Target::Slot(r, prev) => {
                // The codec refuses counts past 2^32 - 1 (where local counts saturate too).
                let count = u32::try_from(count).unwrap_or(u32::MAX);
                r.merge(replica, prev, count, |n| self.cap.take_cells(n))
            }
        })
    }

    /// Raises what the view counts of the other replicas of `key` in `window` to `total`,
    /// as an aggregator reported it (aggregated dissemination): kept beside the
    /// per-replica counts, and the view takes the larger. Returns whether the view grew;
    /// errors as [`merge`](Self::merge).
    pub(crate) fn merge_heard(&self, key: u64, window: i64, total: u64, now_ms: i64) -> Result<bool, Error> {
        if total == 0 {
            return Ok(false);
        }
        self.merge_into(key, window, now_ms, |target| match target {
            Target::Older(b) => {
                let seen = b.others();
                b.heard = b.heard.max(saturate(total));
                b.others() > seen
            }
            Target::Slot(r, prev) => r.hear(prev, total),
        })
    }

    /// Starts loading what merging counts of `keys` will touch: first every key's slot,
    /// then the remote record of every key found (every cache line of it). Merges one by
    /// one wait on two cache misses each in turn (slot, then record) when the store is
    /// larger than the cache; in a chunk prefetched this way the misses overlap. A hint
    /// only: a shard another thread holds is passed over rather than waited for.
    pub(crate) fn prefetch(&self, keys: impl Iterator<Item = u64> + Clone) {
        // Key 0 is taken as 1, as in `merge_into`.
        let locked = |key: u64| self.shard(key.max(1)).lock.try_lock().map(|shard| (key.max(1), shard));
        for (key, shard) in keys.clone().filter_map(locked) {
            shard.table.prefetch(key);
        }
        for (key, shard) in keys.filter_map(locked) {
            if let Some(r) = shard.table.get(key).and_then(remote_of) {
                let at = (&shard.remote[r] as *const Remote).cast::<u8>();
                let size = std::mem::size_of::<Remote>();
                for offset in (0..size).step_by(64).chain([size - 1]) {
                    crate::slots::prefetch(at.wrapping_add(offset));
                }
            }
        }
    }

    /// Finds (or makes, as a key first counted by a peer) `key`, rolls it to `window` if
    /// that is newer, takes the hot key's leases back, and lets `f` merge into what holds
    /// `window`: an older sliding-log bucket, or the slot's newest or previous window.
    /// Windows no request accepted at `now_ms` could fall in are ignored.
    fn merge_into(&self, key: u64, window: i64, now_ms: i64, f: impl FnOnce(Target<'_>) -> bool) -> Result<bool, Error> {
        let key = key.max(1);
        let cell = self.shard(key);
        let hot = cell.hot.0.get().map(|c| &**c);
        let mut guard = cell.lock.lock();
        let shard = &mut *guard;
        let window32 = window as u32;
        // Only windows a request accepted now could fall in: older ones can no longer
        // matter, and later ones would roll keys past the present.
        let acceptable = self.acceptable_windows(now_ms, shard.quota.window_ms());
        if !acceptable.contains(&window) {
            return Ok(false);
        }
        let at = match shard.table.find(key) {
            Some(i) => i,
            None => {
                // The horizon is the window after the oldest acceptable one.
                self.reserve_key(shard, hot, (*acceptable.start() + 1) as u32, true)?;
                let at = shard.table.insert_new_at(Entry { key, window: window32, cur: 0, prev: 0, remote_and_dirty: NO_REMOTE });
                let i = Shard::ensure_remote(&mut shard.remote, &mut shard.free_remote, shard.table.at(at));
                shard.remote[i].from_peer = true;
                at
            }
        };
        if shard.hot.key == key {
            // Leases were sized on the view before this count: take them back.
            shard.fold_hot(hot, self.track_changes.load(Ordering::Relaxed));
        }
        let (tick_ms, back) = algorithm::tick(shard.strategy, shard.quota.window_ms());
        let Shard { table, remote, free_remote, hot: hs, older, quota, .. } = shard;
        let e = table.at(at);
        if back >= 2 {
            let by = windows_since(e.window, window32);
            if by > 0 {
                shift_older(older, e, remote, by, back, &self.cap);
            }
        }
        let age = -Shard::roll(e, remote, window32).min(0);
        if let Some(cell) = hot.filter(|_| hs.key == key) {
            if hs.window != e.window {
                hs.rearm(cell, key, e.window, tick_ms, hs.round, Some(quota));
            } else {
                // A standing refusal's times were decided without this count.
                hs.lift_refusal(cell);
            }
        }
        if age > 1 {
            if age as u64 > back {
                return Ok(false);
            }
            let list = older.entry(key).or_default();
            // A key's older buckets are never more than `back - 1` (`shift_older` sizes
            // them, `set_quota` cuts them): growing a new list frees no cells.
            debug_assert!(list.len() < back as usize, "{} older buckets, back {back}", list.len());
            list.resize_with(back as usize - 1, Bucket::default);
            return Ok(f(Target::Older(&mut list[age as usize - 2])));
        }
        let i = Shard::ensure_remote(remote, free_remote, e);
        Ok(f(Target::Slot(&mut remote[i], age == 1)))
    }

    /// Appends every local count changed since the last collection to `out` and clears
    /// the marks. Window indices are resolved relative to `now_ms`.
    pub(crate) fn collect_changes(&self, now_ms: i64, out: &mut Vec<Exported>) {
        let mut keys = Vec::new();
        for s in self.shards.iter() {
            let mut guard = s.0.lock.lock();
            let shard = &mut *guard;
            shard.fold_hot(s.0.hot.0.get().map(|c| &**c), true);
            let now = now_ms.div_euclid(self.tick_ms(shard.quota.window_ms()) as i64);
            std::mem::swap(&mut keys, &mut shard.dirty);
            for &key in &keys {
                let Some(e) = shard.table.get_mut(key) else { continue };
                let window = now - windows_since(e.window, now as u32);
                // Sliding-log buckets that became older than the previous window unsent.
                for (i, b) in shard.older.get_mut(&key).into_iter().flatten().enumerate() {
                    if std::mem::take(&mut b.dirty) && b.local > 0 {
                        out.push(Exported { key, window: window - 2 - i as i64, replica: LOCAL_REPLICA, count: u64::from(b.local) });
                    }
                }
                if e.remote_and_dirty & DIRTY_CUR != 0 && e.cur > 0 {
                    out.push(Exported { key, window, replica: LOCAL_REPLICA, count: u64::from(e.cur) });
                }
                if e.remote_and_dirty & DIRTY_PREV != 0 && e.prev > 0 {
                    out.push(Exported { key, window: window - 1, replica: LOCAL_REPLICA, count: u64::from(e.prev) });
                }
                e.remote_and_dirty &= !DIRTY;
            }
            keys.clear();
            // Hand the emptied buffer back, so the request path reuses its capacity.
            std::mem::swap(&mut keys, &mut shard.dirty);
        }
    }

    /// Appends every non-zero count of the keys `select` accepts — local and remote, for
    /// every retained window — to `out`. Locks one shard at a time, while it copies.
    pub(crate) fn export(&self, now_ms: i64, select: impl Fn(u64) -> bool, out: &mut Vec<Exported>) {
        // One step without a budget: every shard, one lock at a time.
        self.export_from(&mut ExportCursor::default(), usize::MAX, now_ms, select, out);
    }

    /// [`Store::export`] of the keys from `cursor` on, in shard and table order, until
    /// `out` holds at least `budget` more counts (one key's counts are never split) or the
    /// store ends; advances `cursor`. Returns whether the store is done. Lets the gossip
    /// core export in bounded steps across rounds, however the keys fall in shards: a
    /// shard's lock is held for at most `budget` counts plus one key's, and a step looks
    /// at most at 16 × `budget` table slots (plus the run of keys that wrap around the
    /// end of a resumed shard), however few of them `select` takes. A shard whose
    /// table was rebuilt since the cursor stopped in it is resumed where the keys not yet
    /// exported now sit, so every key present throughout is exported, and the export ends
    /// however often tables are rebuilt.
    pub(crate) fn export_from(
        &self,
        cursor: &mut ExportCursor,
        budget: usize,
        now_ms: i64,
        select: impl Fn(u64) -> bool,
        out: &mut Vec<Exported>,
    ) -> bool {
        let start = out.len();
        let track = self.track_changes.load(Ordering::Relaxed);
        // Slots a step may look at, exported or not: a selection that skips most keys (a
        // repair of one bucket) must not turn a step into a pass over the whole store.
        let mut scan_left = budget.saturating_mul(SCAN_PER_COUNT).max(1);
        while let Some(s) = self.shards.get(cursor.shard) {
            let mut guard = s.0.lock.lock();
            guard.fold_hot(s.0.hot.0.get().map(|c| &**c), track);
            let shard = &*guard;
            let table = &shard.table;
            if cursor.slot > 0 && cursor.generation != table.generation() {
                // Rebuilt since the last step. Every key not exported yet sat at or after
                // the cursor, so its home was at most `max_probe` before it; homes are the
                // top bits of one hash, so they keep their place in a table of another
                // size: resume where those homes now start (keys exported twice are
                // harmless), and take the keys that wrap around the end at the end.
                let from = cursor.slot.saturating_sub(cursor.max_probe) as u128;
                cursor.slot = (from * table.capacity() as u128 / cursor.capacity.max(1) as u128) as usize;
                cursor.resumed = true;
            }
            (cursor.generation, cursor.capacity, cursor.max_probe) = (table.generation(), table.capacity(), table.max_probe());
            let now = now_ms.div_euclid(self.tick_ms(shard.quota.window_ms()) as i64);
            while cursor.slot < table.capacity() {
                if out.len() - start >= budget || scan_left == 0 {
                    return false;
                }
                scan_left -= 1;
                let e = table.entry(cursor.slot);
                cursor.slot += 1;
                if let Some(e) = e.filter(|e| select(e.key)) {
                    shard.export_entry(e, now, out);
                }
            }
            if cursor.resumed {
                // The run of keys at the start whose homes are at the end.
                for i in (0..table.capacity()).take_while(|&i| table.entry(i).is_some()) {
                    if let Some(e) = table.entry(i).filter(|e| table.wrapped(i) && select(e.key)) {
                        shard.export_entry(e, now, out);
                    }
                }
            }
            *cursor = ExportCursor { shard: cursor.shard + 1, ..ExportCursor::default() };
        }
        true
    }

    /// Runs `f` on each of `keys` this store holds, under its shard's lock (the hot cell
    /// folded in), with the index of the window `now_ms` falls in.
    fn with_keys(&self, keys: &[u64], now_ms: i64, mut f: impl FnMut(&Shard, &Entry, i64)) {
        let track = self.track_changes.load(Ordering::Relaxed);
        for &key in keys {
            let key = key.max(1);
            let s = self.shard(key);
            let mut guard = s.lock.lock();
            guard.fold_hot(s.hot.0.get().map(|c| &**c), track);
            let shard = &*guard;
            let now = now_ms.div_euclid(self.tick_ms(shard.quota.window_ms()) as i64);
            if let Some(e) = shard.table.get(key) {
                f(shard, e, now);
            }
        }
    }

    /// [`export`](Self::export) of `keys` alone (each looked up, not searched for).
    pub(crate) fn export_keys(&self, keys: &[u64], now_ms: i64, out: &mut Vec<Exported>) {
        self.with_keys(keys, now_ms, |shard, e, now| shard.export_entry(e, now, out));
    }

    /// For each of `keys` and each retained window with a count of another replica: the
    /// other replicas' counts held here and the others' total an aggregator reported, as
    /// [`OthersCount`]s appended to `out` (a standby aggregator compares the two).
    pub(crate) fn others_of(&self, keys: &[u64], now_ms: i64, out: &mut Vec<OthersCount>) {
        self.with_keys(keys, now_ms, |shard, e, now| {
            shard.windows_of(e, now, |window, _, held, heard| {
                if held > 0 || heard > 0 {
                    out.push(OthersCount { key: e.key, window, held, heard: u64::from(heard) });
                }
            });
        });
    }

    /// Every key's view per retained window: this node's count and the total the view
    /// decides on (this node's count plus the larger of the other replicas' counts and the
    /// total an aggregator reported). Locks one shard at a time.
    pub(crate) fn views(&self, now_ms: i64, out: &mut Vec<ViewCount>) {
        let track = self.track_changes.load(Ordering::Relaxed);
        for s in self.shards.iter() {
            let mut guard = s.0.lock.lock();
            guard.fold_hot(s.0.hot.0.get().map(|c| &**c), track);
            let shard = &*guard;
            let now = now_ms.div_euclid(self.tick_ms(shard.quota.window_ms()) as i64);
            for e in shard.table.slots() {
                shard.windows_of(e, now, |window, own, held, heard| {
                    let others = held.max(u64::from(heard));
                    if own > 0 || others > 0 {
                        out.push(ViewCount { key: e.key, window, own: u64::from(own), total: u64::from(own) + others });
                    }
                });
            }
        }
    }

    /// Drops every key that no request accepted at `now_ms` can reach; locks one shard
    /// at a time. Returns how many were dropped.
    pub(crate) fn sweep(&self, now_ms: i64) -> usize {
        let mut total = 0;
        let track = self.track_changes.load(Ordering::Relaxed);
        for s in self.shards.iter() {
            let mut shard = s.0.lock.lock();
            let horizon = self.horizon(now_ms, shard.quota.window_ms());
            let removed = shard.sweep(s.0.hot.0.get().map(|c| &**c), track, horizon);
            self.forget(removed);
            total += removed.keys;
        }
        total
    }

    /// Decisions so far, summed over the shards (one lock at a time), and an estimate of
    /// the memory the store holds in bytes.
    pub(crate) fn tally(&self) -> (Tally, usize) {
        let mut t = Tally::default();
        let mut bytes = std::mem::size_of::<Self>();
        for s in self.shards.iter() {
            let shard = s.0.lock.lock();
            t.allowed += shard.tally.allowed;
            t.denied += shard.tally.denied;
            if let Some(cell) = s.0.hot.0.get() {
                t.allowed += shard.hot.spent(cell);
                t.denied += cell.stripes.iter().map(|st| st.0.denied.load(Ordering::Relaxed)).sum::<u64>();
                bytes += std::mem::size_of::<HotCell>();
            }
            t.near_limit += shard.tally.near_limit;
            bytes += std::mem::size_of::<Padded<ShardCell>>()
                + shard.table.bytes()
                + shard.remote.capacity() * std::mem::size_of::<Remote>()
                + shard.remote.iter().map(Remote::heap_bytes).sum::<usize>()
                + shard.older.values().map(|bs| 48 + bs.len() * std::mem::size_of::<Bucket>() + bucket_cells(bs) * 16).sum::<usize>()
                + shard.dirty.capacity() * 8
                + shard.free_remote.capacity() * 4;
        }
        (t, bytes)
    }

    /// Keys currently tracked.
    pub(crate) fn len(&self) -> usize {
        self.keys.0.load(Ordering::Relaxed)
    }

    pub(crate) fn quota(&self) -> Quota {
        self.shards[0].0.lock.lock().quota
    }

    /// Replaces the quota. If the window changes, live counts carry over conservatively:
    /// each key's count for the window containing `now_ms` (or newer) becomes its count
    /// for the new window containing `now_ms`, the window before maps to the one before,
    /// and older counts are dropped (the sliding log's buckets keep their ages the same
    /// way, as far back as the new quota reads).
    pub(crate) fn set_quota(&self, quota: Quota, now_ms: i64) {
        for s in self.shards.iter() {
            let mut guard = s.0.lock.lock();
            let shard = &mut *guard;
            // Leases and published refusals were decided under the old quota.
            shard.release_hot(s.0.hot.0.get().map(|c| &**c), self.track_changes.load(Ordering::Relaxed));
            let (old_w, old_back) = algorithm::tick(shard.strategy, shard.quota.window_ms());
            let (new_w, back) = algorithm::tick(shard.strategy, quota.window_ms());
            let (old_w, new_w) = (old_w as i64, new_w as i64);
            shard.quota = quota;
            if old_w == new_w && old_back == back {
                continue;
            }
            let old_now = now_ms.div_euclid(old_w) as u32;
            let new_now = now_ms.div_euclid(new_w) as u32;
            let (remote, free, older) = (&mut shard.remote, &mut shard.free_remote, &mut shard.older);
            let mut dropped = Dropped::default();
            shard.table.rebuild(|e| {
                let age = windows_since(e.window, old_now).max(0);
                if age >= 2 && age as u64 > old_back.min(back) {
                    Shard::free(remote, free, older, e, &mut dropped);
                    return false;
                }
                e.window = new_now.wrapping_sub(age as u32);
                // Older buckets now `age` behind the present: keep those still read.
                if let Some(bs) = older.get_mut(&e.key) {
                    let before = bucket_cells(bs);
                    bs.truncate((back as usize).saturating_sub(1));
                    dropped.cells += before - bucket_cells(bs);
                    if bs.iter().all(Bucket::is_empty) {
                        older.remove(&e.key);
                    }
                }
                true
            });
            self.forget(dropped);
        }
    }

    /// Stops marking changed keys and forgets the marks (the gossip core detached).
    pub(crate) fn untrack_changes(&self) {
        self.track_changes.store(false, Ordering::Relaxed);
        for s in self.shards.iter() {
            s.0.lock.lock().dirty = Vec::new();
        }
    }
}

/// One request as [`apply`] sees it.
struct Request<'a> {
    quota: &'a Quota,
    window: u32,
    elapsed: u64,
    budget: Option<&'a Budget>,
    track: bool,
    ts_ms: i64,
    /// Whether the caller may take a lease (`allow` with the store's quota).
    lease: bool,
    /// The length of the store's windows for this quota (the log's bucket).
    tick_ms: u64,
    /// Windows before the current one the strategy reads (more than 1: the sliding log).
    back: u64,
    /// The key cap, whose cells the sliding log's older buckets draw on.
    cap: &'a KeyCap,
}

/// Adds `n` admissions made under leases to the local count of `e`.
#[inline]
fn add_local(e: &mut Entry, n: u64, dirty: &mut Vec<u64>, track: bool) {
    if n == 0 {
        return;
    }
    e.cur = e.cur.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
    mark_cur(e, dirty, track);
}

/// Folds `n` admissions spent from leases into `e`'s count and, when the leases were
/// drawn from the round budget in force, into what that round has spent.
#[inline]
fn settle(e: &mut Entry, remote: &mut [Remote], round: Option<u32>, n: u64, dirty: &mut Vec<u64>, track: bool) {
    add_local(e, n, dirty, track);
    if let (Some(i), Some(_)) = (remote_of(e), round) {
        let r = &mut remote[i];
        if r.share.round() == round {
            r.share.spend(n);
        }
    }
}

/// Marks the current window's local count of `e` as changed, for gossip.
#[inline]
fn mark_cur(e: &mut Entry, dirty: &mut Vec<u64>, track: bool) {
    if track && e.remote_and_dirty & DIRTY_CUR == 0 {
        if e.remote_and_dirty & DIRTY == 0 {
            dirty.push(e.key);
        }
        e.remote_and_dirty |= DIRTY_CUR;
    }
}

/// Rolls the key in table slot `slot` to the request's window, decides with `f`, applies
/// the round budget if any, and counts the request if admitted.
#[inline]
fn apply<V: Outcome>(
    shard: &mut Shard,
    hot: Option<&HotCell>,
    slot: usize,
    req: &Request<'_>,
    f: fn(Strategy, &Quota, Counts, u64) -> V,
) -> V {
    let Shard { table, remote, free_remote, dirty, strategy, tally, hot: hs, older, quota: store_quota, .. } = shard;
    let e = table.at(slot);
    let key = e.key;
    let mut elapsed = req.elapsed;
    // The hot key: fold in what the caller's stripe spent and count the other stripes'
    // leases as used, or (any other request) take every lease back.
    let hot = hot.filter(|_| hs.key == key);
    // The caller's stripe (looked up only for the hot key).
    let lease = hot.and_then(|_| req.lease.then(stripe_index));
    let round = req.budget.map(|b| b.round);
    let mut reserved = 0;
    if let Some(cell) = hot {
        let spent = match lease {
            Some(i) if e.window == req.window && hs.window == req.window && hs.round == round => hs.reclaim(cell, i),
            _ => hs.reclaim_all(cell),
        };
        tally.allowed += spent;
        settle(e, remote, hs.round, spent, dirty, req.track);
        reserved = hs.reserved(cell);
    }
    if let Some(cell) = hot.filter(|_| req.budget.is_some()) {
        // The bounded policy's tally of refusals includes those served without the lock,
        // all in the cell's window: counted there, before the key rolls on.
        let n = hs.new_denials(cell);
        if let Some(i) = remote_of(e).filter(|_| hs.window == e.window) {
            remote[i].share.refuse(n);
        }
    }
    if req.back >= 2 {
        let by = windows_since(e.window, req.window);
        if by > 0 {
            shift_older(older, e, remote, by, req.back, req.cap);
        }
    }
    let rolled = Shard::roll(e, remote, req.window);
    if rolled < 0 {
        // A late request: charged to the key's newest window, at its start.
        elapsed = 0;
    }
    // The sliding log's buckets before the previous one: all counts, and the local ones.
    let (older_sum, older_local) = if req.back >= 2 { older_sum(older, key) } else { (0, 0) };
    let counts_of = |e: &Entry, remote: &[Remote], reserved: u64| {
        let (mut cur, mut prev) = (u64::from(e.cur) + reserved, u64::from(e.prev));
        if let Some(i) = remote_of(e) {
            cur += remote[i].seen(false);
            prev += remote[i].seen(true);
        }
        Counts { cur, prev: prev + older_sum }
    };
    let mut counts = counts_of(e, remote, reserved);
    let mut v = f(*strategy, req.quota, counts, elapsed);
    if let Some(cell) = hot.filter(|_| !v.allowed() && reserved > 0) {
        // Unspent leases may be all that is missing: decide again on the exact count.
        let spent = hs.reclaim_all(cell);
        tally.allowed += spent;
        settle(e, remote, hs.round, spent, dirty, req.track);
        reserved = 0;
        counts = counts_of(e, remote, 0);
        v = f(*strategy, req.quota, counts, elapsed);
    }
    let rule_allowed = v.allowed();
    // The exact verdict on `counts`: the sliding log's sums decide, its waits need every
    // bucket.
    let exact = |counts: Counts, older: &Older| {
        if *strategy != Strategy::SlidingLog {
            return algorithm::evaluate(*strategy, req.quota, counts, elapsed);
        }
        let mut buckets = [0; Strategy::LOG_BUCKETS as usize + 1];
        buckets[0] = counts.cur;
        buckets[1] = counts.prev - older_sum;
        for (slot, b) in buckets[2..].iter_mut().zip(older.get(&key).into_iter().flatten()) {
            *slot = b.total();
        }
        algorithm::log_verdict(req.quota, &buckets, elapsed)
    };
    if *strategy == Strategy::SlidingLog {
        v = v.detail(|| exact(counts, older));
    }
    if v.allowed() {
        if let Some(b) = req.budget {
            let i = Shard::ensure_remote(remote, free_remote, e);
            let Remote { share, cells, len, .. } = &mut remote[i];
            let others = cells[..*len as usize].iter().map(|c| u64::from(c.cur) + u64::from(c.prev));
            let taken = u64::from(e.cur) + u64::from(e.prev);
            let view = RoundView {
                strategy: *strategy,
                quota: *req.quota,
                counts,
                own: taken + older_local,
                others,
                taken,
                refused: share.refused(),
                key,
                window: e.window,
                elapsed,
            };
            share.open(b, &view);
            let r = &mut remote[i];
            if let Some(cell) = hot.filter(|_| r.share.left(reserved) == 0 && reserved > 0) {
                // The round's budget may be out in unspent leases: take them back.
                let spent = hs.reclaim_all(cell);
                tally.allowed += spent;
                settle(e, remote, hs.round, spent, dirty, req.track);
                reserved = 0;
            }
            let r = &mut remote[i];
            // Leases out were drawn from this round's budget.
            if r.share.left(reserved) == 0 {
                v = v.refuse(b.round_left_ms);
            } else {
                r.share.spend(1);
            }
        }
    }
    if !v.allowed() {
        tally.denied += 1;
        if let Some(i) = remote_of(e).filter(|_| req.budget.is_some()) {
            remote[i].share.refuse(1);
        }
    } else {
        tally.allowed += 1;
        if (counts.cur + 1) * 10 >= req.quota.limit() * 9 {
            tally.near_limit += 1;
        }
        e.cur = e.cur.saturating_add(1);
        mark_cur(e, dirty, req.track);
    }
    if let Some(cell) = hot {
        if hs.window != e.window || hs.round != round {
            hs.rearm(cell, key, e.window, req.tick_ms, round, Some(store_quota));
        }
        match lease {
            Some(i) if v.allowed() => {
                // Lease half of what remains after this request, leases out counted
                // (and half of what is left of the round's budget); a late request (its
                // window behind the key's) gets none. The pool is what remains with this
                // lease counted as spent too (`counts` holds the other leases out).
                let (lease, pool) = if rolled < 0 {
                    (0, 0)
                } else {
                    let after = algorithm::evaluate(*strategy, req.quota, Counts { cur: counts.cur + 1, ..counts }, elapsed);
                    let left = after.remaining + u64::from(after.allowed);
                    let mut lease = (left / 2).min(LEASE_MAX);
                    if let Some(r) = remote_of(e).filter(|_| round.is_some()).map(|i| &remote[i]) {
                        lease = lease.min(r.share.left(reserved) / 2);
                    }
                    (lease, if lease > 0 { left - lease } else { 0 })
                };
                HotState::set_pool(cell, pool);
                if *strategy == Strategy::TokenBucket {
                    // The bucket's refill with this request and every lease out spent.
                    let most = counts.cur + 1 + lease;
                    cell.head.0.refill_ms.store(algorithm::token_refill_ms(req.quota, most), Ordering::Release);
                }
                if lease > 0 {
                    hs.grant(cell, i, lease, elapsed);
                    // Spent leases reach gossip through the next collection.
                    mark_cur(e, dirty, req.track);
                }
            }
            Some(_) if rolled >= 0 && !rule_allowed && hs.granted == 0 => {
                // Refused on the exact count: so is every request of this window until
                // the strategy's retry time (counts only grow), with the same retry and
                // reset times, as instants. A refusal of the rule is `v` itself, exact
                // already when it carries figures.
                let exact = v.verdict().unwrap_or_else(|| exact(counts, older));
                if let Some(retry) = exact.retry_after_ms {
                    let at = |ms: u64| req.ts_ms.saturating_add(ms as i64);
                    hs.refuse_until(cell, at(retry), at(exact.reset_after_ms));
                }
            }
            None if v.allowed() => {
                // Counted under another quota (every lease was taken back): a standing
                // refusal's times no longer hold.
                hs.lift_refusal(cell);
            }
            _ => HotState::set_pool(cell, 0),
        }
    }
    v
}

/// What [`apply`] needs of a decision, whatever its detail.
pub(crate) trait Outcome: Copy {
    fn allowed(&self) -> bool;
    /// This outcome turned into a refusal that can be retried after `retry_after_ms`.
    fn refuse(self, retry_after_ms: u64) -> Self;
    /// This outcome with the detail `exact` computes, if it carries detail.
    fn detail(self, exact: impl FnOnce() -> Verdict) -> Self;
    /// The decision's figures, if it carries them.
    fn verdict(&self) -> Option<Verdict>;
}

impl Outcome for bool {
    #[inline]
    fn allowed(&self) -> bool {
        *self
    }
    fn refuse(self, _: u64) -> Self {
        false
    }
    #[inline]
    fn detail(self, _: impl FnOnce() -> Verdict) -> Self {
        self
    }
    fn verdict(&self) -> Option<Verdict> {
        None
    }
}

impl Outcome for Verdict {
    #[inline]
    fn allowed(&self) -> bool {
        self.allowed
    }
    fn refuse(self, retry_after_ms: u64) -> Self {
        Verdict { allowed: false, remaining: 0, retry_after_ms: Some(retry_after_ms.max(1)), ..self }
    }
    fn detail(self, exact: impl FnOnce() -> Verdict) -> Self {
        exact()
    }
    fn verdict(&self) -> Option<Verdict> {
        Some(*self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T0: i64 = 1_700_000_000_000;
    const W0: i64 = T0 / 1000;

    fn store(limit: u64) -> Store {
        let tol = Tolerances { max_age_ms: 5_000, max_skew_ms: 2_000 };
        Store::new(4, KeyCap::new(1_000), tol, 7, Quota::new(limit, Duration::from_secs(1)).unwrap(), Strategy::FixedWindow)
    }

    /// Every count of `key`, as (window, replica index, count), sorted.
    fn counts(s: &Store, key: u64, now_ms: i64) -> Vec<(i64, u32, u64)> {
        let mut out = Vec::new();
        s.export(now_ms, |k| k == key, &mut out);
        let mut v: Vec<_> = out.into_iter().map(|e| (e.window, e.replica, e.count)).collect();
        v.sort();
        v
    }

    #[test]
    fn remote_counts_join_the_local_view() {
        let s = store(5);
        assert!(s.admit(1, T0, T0, None, None).unwrap());
        assert!(s.merge(1, W0, 7, 3, T0).unwrap());
        assert!(s.admit(1, T0, T0, None, None).unwrap(), "1 local + 3 remote < 5");
        assert!(!s.admit(1, T0, T0, None, None).unwrap(), "2 local + 3 remote = 5");
        assert_eq!(counts(&s, 1, T0), vec![(W0, 7, 3), (W0, LOCAL_REPLICA, 2)]);
    }

    #[test]
    fn an_aggregators_total_and_the_replicas_counts_are_two_lower_bounds_the_view_takes_the_larger_of() {
        let s = store(10);
        let view = |s: &Store| {
            let mut v = Vec::new();
            s.views(T0, &mut v);
            v.iter().find(|v| v.key == 1 && v.window == W0).map_or(0, |v| v.total)
        };
        assert!(s.admit(1, T0, T0, None, None).unwrap());
        assert!(s.merge_heard(1, W0, 5, T0).unwrap());
        assert_eq!(view(&s), 6);
        assert!(!s.merge_heard(1, W0, 4, T0).unwrap(), "a smaller total changes nothing");
        s.merge(1, W0, 7, 3, T0).unwrap();
        assert_eq!(view(&s), 6);
        assert_eq!(view(&s), 6, "per-replica counts below the total do not raise the view");
        assert!(s.merge(1, W0, 8, 3, T0).unwrap());
        assert_eq!(view(&s), 7, "3 + 3 from replicas beat the total of 5");
        for _ in 0..3 {
            assert!(s.admit(1, T0, T0, None, None).unwrap());
        }
        assert!(!s.admit(1, T0, T0, None, None).unwrap(), "4 local + 6 others = the limit");
        // The next window: the total moves to the previous one with the key.
        assert!(s.merge_heard(1, W0 + 1, 2, T0 + 1000).unwrap());
        let mut v = Vec::new();
        s.views(T0 + 1000, &mut v);
        assert_eq!(v.iter().map(|v| (v.window, v.own, v.total)).collect::<Vec<_>>(), vec![(W0 + 1, 0, 2), (W0, 4, 10)]);
    }

    proptest::proptest! {
        /// Replica counts and aggregators' totals, merged in any order, any number of
        /// times: the same view, and no window's view ever goes down.
        #[test]
        fn merges_of_counts_and_totals_commute_are_idempotent_and_never_lower_a_view(
            ops in proptest::collection::vec((proptest::bool::ANY, 0u32..4, 0i64..2, 1u64..60), 0..24),
            order in proptest::collection::vec(proptest::num::usize::ANY, 24),
        ) {
            let now = T0 + 1500;
            let apply = |s: &Store, op: &(bool, u32, i64, u64)| {
                let &(total, replica, w, count) = op;
                if total {
                    s.merge_heard(1, W0 + w, count, now).unwrap();
                } else {
                    s.merge(1, W0 + w, replica, count, now).unwrap();
                }
            };
            let views = |s: &Store| {
                let mut v = Vec::new();
                s.views(now, &mut v);
                v.sort();
                v
            };
            let (a, b) = (store(1_000), store(1_000));
            let mut seen: Vec<ViewCount> = Vec::new();
            for op in &ops {
                apply(&a, op);
                let now_views = views(&a);
                for old in &seen {
                    let new = now_views.iter().find(|v| v.window == old.window).map_or(0, |v| v.total);
                    proptest::prop_assert!(new >= old.total, "window {} went from {} to {new}", old.window, old.total);
                }
                seen = now_views;
            }
            // The same operations shuffled, each applied twice.
            let mut shuffled = ops.clone();
            for (i, &j) in order.iter().enumerate().take(shuffled.len()) {
                let j = j % shuffled.len();
                shuffled.swap(i, j);
            }
            for op in shuffled.iter().chain(&shuffled) {
                apply(&b, op);
            }
            proptest::prop_assert_eq!(views(&a), views(&b));
        }
    }

    #[test]
    fn merging_is_idempotent_and_keeps_the_maximum() {
        let s = store(100);
        assert!(s.merge(1, W0, 2, 10, T0).unwrap());
        assert!(!s.merge(1, W0, 2, 10, T0).unwrap(), "a duplicate changes nothing");
        assert!(!s.merge(1, W0, 2, 4, T0).unwrap(), "an older, lower count changes nothing");
        assert!(s.merge(1, W0, 2, 12, T0).unwrap());
        assert!(s.merge(1, W0, 3, 1, T0).unwrap());
        assert_eq!(counts(&s, 1, T0), vec![(W0, 2, 12), (W0, 3, 1)]);
    }

    #[test]
    fn a_newer_remote_window_rolls_the_key_forward_and_older_ones_land_in_prev_or_nowhere() {
        let s = store(100);
        let t1 = T0 + 1000;
        assert!(s.admit(1, T0, T0, None, None).unwrap());
        assert!(s.merge(1, W0 + 1, 2, 4, t1).unwrap());
        assert_eq!(counts(&s, 1, t1), vec![(W0, LOCAL_REPLICA, 1), (W0 + 1, 2, 4)]);
        assert!(s.merge(1, W0, 2, 9, t1).unwrap(), "the previous window still merges");
        assert!(!s.merge(1, W0 - 1, 2, 9, t1).unwrap(), "older windows can no longer matter");
        assert_eq!(counts(&s, 1, t1), vec![(W0, 2, 9), (W0, LOCAL_REPLICA, 1), (W0 + 1, 2, 4)]);
    }

    #[test]
    fn remote_slots_are_recycled_when_their_keys_expire() {
        let s = store(100);
        for key in 1..=50u64 {
            s.merge(key << 40, W0, 1, 1, T0).unwrap();
        }
        let later = T0 + 10_000;
        assert_eq!(s.sweep(later), 50);
        for key in 1..=50u64 {
            s.merge(key << 40, later / 1000, 1, 1, later).unwrap();
        }
        let remote_slots: usize = s.shards.iter().map(|sh| sh.0.lock.lock().remote.len()).sum();
        assert_eq!(remote_slots, 50, "freed side-table slots are reused");
    }

    /// Bytes the store reports holding.
    fn bytes(s: &Store) -> usize {
        s.tally().1
    }

    #[test]
    fn one_key_holds_a_bounded_number_of_replica_cells_and_counts_the_rest_in_its_total() {
        assert_eq!(std::mem::size_of::<Remote>(), 88, "the size the module doc states");
        assert_eq!(std::mem::size_of::<Cell>(), 12);
        let s = store(5_001);
        let empty = bytes(&s);
        // Replicas in descending order: each one is inserted in front of the others.
        for slot in (1..=5_000u32).rev() {
            assert!(s.merge(1, W0, slot, 1, T0).unwrap());
        }
        // 1,024 cells of 12 bytes, and the key's slot and side-table entry.
        let held = bytes(&s) - empty;
        assert!(held <= 16 * 1024, "{held} bytes for one key");
        // Every replica's count is in the view, with a cell or without.
        assert!(s.admit(1, T0, T0, None, None).unwrap(), "5,000 of 5,001");
        assert!(!s.admit(1, T0, T0, None, None).unwrap());
    }

    #[test]
    fn replicas_past_a_keys_cells_are_counted_in_its_total_and_stricter_on_a_resend() {
        let s = store(u32::MAX as u64);
        for slot in 1..=(MAX_KEY_REPLICAS as u32 + 10) {
            s.merge(1, W0, slot, 2, T0).unwrap();
        }
        let exported = counts(&s, 1, T0);
        assert_eq!(exported.len(), MAX_KEY_REPLICAS, "one cell per replica up to the bound");
        assert!(exported.iter().all(|&(w, slot, c)| w == W0 && slot <= MAX_KEY_REPLICAS as u32 && c == 2));
        // Replicas with a cell merge exactly; one without is counted again when resent.
        assert!(!s.merge(1, W0, 1, 2, T0).unwrap());
        let total = |s: &Store| s.decide(1, T0, T0, None, None).unwrap().remaining;
        let before = total(&s);
        assert!(s.merge(1, W0, MAX_KEY_REPLICAS as u32 + 1, 2, T0).unwrap());
        assert_eq!(total(&s), before - 2 - 1, "the resent count and the request itself");
        // The next window starts with the cells of the replicas that counted.
        let t1 = T0 + 1_000;
        assert!(s.merge(1, W0 + 1, 7, 3, t1).unwrap());
        let c = counts(&s, 1, t1);
        assert_eq!(c.iter().filter(|e| e.0 == W0 && e.1 != LOCAL_REPLICA).count(), MAX_KEY_REPLICAS);
        assert_eq!(c.iter().filter(|e| e.0 == W0 + 1).collect::<Vec<_>>(), vec![&(W0 + 1, 7, 3)]);
    }

    /// A documented run, not a check of timing: `cargo test --release --lib -- --ignored
    /// --nocapture replica_insertion_order` prints what one key's replicas cost to insert
    /// in each order (`docs/design.md`, "Memory model"); what it checks is that both
    /// orders give the key the same total.
    #[test]
    #[ignore]
    fn replica_insertion_order_costs_alike() {
        for replicas in [MAX_KEY_REPLICAS as u32, crate::gossip::MAX_REPLICAS as u32] {
            let run = |order: &mut dyn Iterator<Item = u32>| {
                let s = store(u32::MAX as u64);
                let started = std::time::Instant::now();
                for slot in order {
                    s.merge(1, W0, slot, 1, T0).unwrap();
                }
                (started.elapsed(), s.decide(1, T0, T0, None, None).unwrap().remaining)
            };
            let (up, a) = run(&mut (1..=replicas));
            let (down, d) = run(&mut (1..=replicas).rev());
            println!("{replicas} replicas into one key: ascending {up:?}, descending {down:?}");
            assert_eq!(a, d);
            assert_eq!(a, u64::from(u32::MAX) - u64::from(replicas) - 1);
        }
    }

    #[test]
    fn replica_cells_stay_within_the_caps_budget_and_return_to_it_when_keys_expire() {
        let tol = Tolerances { max_age_ms: 5_000, max_skew_ms: 2_000 };
        let cap = KeyCap::new(4);
        let s = Store::new(4, cap.clone(), tol, 7, Quota::new(1_000, Duration::from_secs(1)).unwrap(), Strategy::FixedWindow);
        let budget = 4 * CELLS_PER_KEY;
        for key in 1..=4u64 {
            for slot in 1..=20 {
                s.merge(key << 40, W0, slot, 1, T0).unwrap();
            }
        }
        assert!(cap.cells.load(Ordering::Relaxed) <= budget);
        let held: usize = s.shards.iter().map(|sh| sh.0.lock.lock().remote.iter().map(|r| r.cells.len()).sum::<usize>()).sum();
        assert_eq!(held, cap.cells.load(Ordering::Relaxed), "the budget counts every cell held");
        for key in 1..=4u64 {
            let d = s.decide(key << 40, T0, T0, None, None).unwrap();
            assert_eq!(d.remaining, 1_000 - 20 - 1, "every count is in the view");
        }
        let later = T0 + 10_000;
        assert_eq!(s.sweep(later), 4);
        assert_eq!(cap.cells.load(Ordering::Relaxed), 0);
        assert_eq!(cap.from_peers.load(Ordering::Relaxed), 0);
        assert_eq!(cap.keys.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn keys_first_counted_by_peers_have_a_budget_of_their_own() {
        let tol = Tolerances { max_age_ms: 5_000, max_skew_ms: 2_000 };
        let cap = KeyCap::new(3);
        let s = Store::new(4, cap.clone(), tol, 7, Quota::new(10, Duration::from_secs(1)).unwrap(), Strategy::FixedWindow);
        for key in 1..=3u64 {
            assert!(s.merge(key, W0, 9, 1, T0).unwrap());
        }
        assert!(matches!(s.merge(4, W0, 9, 1, T0), Err(Error::KeyCapacity { max: 3 })), "the peers' budget is spent");
        for key in 11..=13u64 {
            assert!(s.admit(key, T0, T0, None, None).unwrap(), "local clients keep their cap");
        }
        assert!(matches!(s.decide(14, T0, T0, None, None), Err(Error::KeyCapacity { max: 3 })));
        // A local client of a key a peer created is counted there, and a peer's count
        // for a local client needs no room.
        assert!(s.admit(2, T0, T0, None, None).unwrap());
        assert!(s.merge(12, W0, 9, 5, T0).unwrap());
        assert_eq!(s.decide(12, T0, T0, None, None).unwrap().remaining, 10 - 1 - 5 - 1);
        assert_eq!(s.len(), 6);
        // Expired keys return to the budget they were charged to.
        let later = T0 + 10_000;
        assert_eq!(s.sweep(later), 6);
        assert_eq!((cap.keys.load(Ordering::Relaxed), cap.from_peers.load(Ordering::Relaxed)), (0, 0));
        assert!(s.merge(4, later / 1000, 9, 1, later).unwrap());
    }

    #[test]
    fn changed_local_counts_are_collected_once_including_the_window_just_closed() {
        let s = store(100);
        s.track_changes();
        for _ in 0..3 {
            s.admit(1, T0 + 990, T0 + 990, None, None).unwrap();
        }
        s.admit(2, T0, T0, None, None).unwrap();
        let mut out = Vec::new();
        s.collect_changes(T0 + 990, &mut out);
        out.sort();
        assert_eq!(out.iter().map(|e| (e.key, e.window, e.count)).collect::<Vec<_>>(), vec![(1, W0, 3), (2, W0, 1)]);
        out.clear();
        s.collect_changes(T0 + 990, &mut out);
        assert!(out.is_empty(), "nothing changed since");
        // One more in the old window, then the key moves on before collection: both the
        // closed window's final count and the new one are sent.
        s.admit(1, T0 + 995, T0 + 995, None, None).unwrap();
        s.admit(1, T0 + 1_005, T0 + 1_005, None, None).unwrap();
        s.collect_changes(T0 + 1_005, &mut out);
        out.sort();
        assert_eq!(out.iter().map(|e| (e.key, e.window, e.count)).collect::<Vec<_>>(), vec![(1, W0, 4), (1, W0 + 1, 1)]);
    }

    /// The forecast's tally of what this node refused of a key: counted per window under
    /// a budget, moved along when the key's window rolls, and gone two windows on.
    #[test]
    fn refusals_under_a_budget_are_tallied_per_window() {
        let s = store(10);
        let b = |round| Budget { round, round_left_ms: 7, round_ms: 10, lag_ms: 10, forecast: true, live_replicas: 2, live_index: 0 };
        let refused = |s: &Store| {
            let shard = s.shard(1).lock.lock();
            let e = shard.table.get(1).unwrap();
            shard.remote[remote_of(e).unwrap()].share.refused()
        };
        // Another replica counted the limit: every request here is refused.
        s.merge(1, W0, 7, 10, T0).unwrap();
        for _ in 0..5 {
            assert!(!s.admit(1, T0, T0, None, Some(&b(0))).unwrap());
        }
        // Without a budget (not a bounded member) nothing is tallied.
        assert!(!s.admit(1, T0, T0, None, None).unwrap());
        assert_eq!(refused(&s), 5);
        // The next window: they are the previous window's, and this one's are added.
        s.merge(1, W0 + 1, 7, 10, T0 + 1_000).unwrap();
        assert!(!s.admit(1, T0 + 1_000, T0 + 1_000, None, Some(&b(100))).unwrap());
        assert_eq!(refused(&s), 6);
        // Two windows on, neither is in the tally.
        s.merge(1, W0 + 3, 7, 10, T0 + 3_000).unwrap();
        assert_eq!(refused(&s), 0);
    }

    #[test]
    fn a_round_budget_caps_local_admissions_until_the_next_round() {
        let s = store(100);
        // Four live replicas, no history: each gets about a quarter of 100 per round.
        let b = |round| Budget { round, round_left_ms: 7, round_ms: 10, lag_ms: 10, forecast: true, live_replicas: 4, live_index: 1 };
        let first = (0..100).take_while(|_| s.admit(1, T0, T0, None, Some(&b(0))).unwrap()).count();
        assert!((24..=26).contains(&first), "admitted {first} of a 25 share");
        let d = s.decide(1, T0, T0, None, Some(&b(0))).unwrap();
        assert_eq!((d.allowed, d.retry_after_ms), (false, Some(7)));
        // Next round: what the others were allotted is held back (they may have spent
        // it); nothing is visible from them, so nothing is left for this node.
        let second = (0..100).take_while(|_| s.admit(1, T0, T0, None, Some(&b(1))).unwrap()).count();
        assert_eq!(second, 0);
        // A round later, the reservation is gone: the view is trusted again.
        let third = (0..100).take_while(|_| s.admit(1, T0, T0, None, Some(&b(3))).unwrap()).count();
        assert!(third > 0 && first + third <= 100, "{first} + {third}");
    }

    /// Three nodes that agree on who is live, each deciding a new client alone: their
    /// budgets add up to the limit exactly, the left-over going to a different node from
    /// one key to the next.
    #[test]
    fn round_budgets_of_a_new_client_add_up_to_the_limit_on_nodes_that_agree() {
        for limit in [1, 2, 3, 5, 10, 100] {
            let nodes: Vec<Store> = (0..3).map(|_| store(limit)).collect();
            let mut largest_on = [0u32; 3];
            for key in 1..=60u64 {
                let per_node: Vec<u64> = nodes
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let b = Budget {
                            round: 9,
                            round_left_ms: 7,
                            round_ms: 10,
                            lag_ms: 10,
                            forecast: true,
                            live_replicas: 3,
                            live_index: i as u64,
                        };
                        (0..2 * limit).filter(|_| s.admit(key, T0, T0, None, Some(&b)).unwrap()).count() as u64
                    })
                    .collect();
                assert_eq!(per_node.iter().sum::<u64>(), limit, "limit {limit}, key {key}: {per_node:?}");
                let most = (0..3).max_by_key(|&i| (per_node[i], i)).unwrap();
                largest_on[most] += 1;
            }
            if limit % 3 != 0 {
                assert!(largest_on.iter().filter(|&&n| n > 0).count() > 1, "limit {limit}: {largest_on:?}");
            }
        }
    }

    /// Makes `key` its shard's hot key: a request from another thread meets the lock held.
    /// Returns how many requests that took (each may be admitted).
    fn promote(s: &Store, key: u64, ts: i64) -> u64 {
        promote_with(s, key, ts, None).0
    }

    /// Like [`promote`], with a round budget; also returns how many were admitted.
    fn promote_with(s: &Store, key: u64, ts: i64, budget: Option<&Budget>) -> (u64, u64) {
        let mut admitted = 0;
        for attempt in 1..=100u64 {
            let guard = s.shard(key).lock.lock();
            std::thread::scope(|sc| {
                let h = sc.spawn(|| s.admit(key, ts, ts, None, budget).unwrap());
                std::thread::sleep(Duration::from_millis(attempt * 5));
                drop(guard);
                admitted += u64::from(h.join().unwrap());
            });
            if s.shard(key).lock.lock().hot.key == key {
                return (attempt, admitted);
            }
        }
        panic!("never promoted");
    }

    /// Bounded admission keeps its per-round budgets on a hot key: leases are drawn from
    /// the round's budget, so four threads spend exactly what one thread does, round
    /// after round.
    #[test]
    fn a_hot_key_under_bounded_admission_spends_exactly_its_round_budget() {
        let b = |round| Budget { round, round_left_ms: 7, round_ms: 10, lag_ms: 10, forecast: true, live_replicas: 4, live_index: 1 };
        let (one, many) = (store(1_000), store(1_000));
        let (_, mut promoted) = promote_with(&many, 1, T0, Some(&b(0)));
        for round in [0, 1, 3, 4] {
            let expected = (0..2_000).filter(|_| one.admit(1, T0, T0, None, Some(&b(round))).unwrap()).count() as u64;
            let total: u64 = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..4)
                    .map(|_| sc.spawn(|| (0..500).filter(|_| many.admit(1, T0, T0, None, Some(&b(round))).unwrap()).count() as u64))
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum()
            });
            assert_eq!(total + promoted, expected, "round {round}");
            promoted = 0;
            let hot = &many.shard(1).lock.lock().hot;
            assert_eq!((hot.key, hot.round), (1, Some(round)), "the leases follow the round");
        }
        assert_eq!(counts(&one, 1, T0), counts(&many, 1, T0));
    }

    fn admitted(s: &Store, key: u64, ts: i64, offered: usize) -> u64 {
        (0..offered).filter(|_| s.admit(key, ts, ts, None, None).unwrap()).count() as u64
    }

    #[test]
    fn a_hot_key_admits_exactly_the_limit_and_gossip_sees_every_admission() {
        assert_eq!(std::mem::size_of::<HotCell>(), 2_176, "the size the module doc states");
        let s = store(10);
        s.track_changes();
        let tries = promote(&s, 1, T0 + 10);
        // The promoting thread holds a lease this thread cannot spend: the last
        // admissions take it back.
        assert_eq!(admitted(&s, 1, T0 + 20, 50) + tries.min(10), 10);
        let (t, _) = s.tally();
        assert_eq!(t.allowed, 10);
        assert_eq!(t.allowed + t.denied, 50 + tries);
        let mut out = Vec::new();
        s.collect_changes(T0 + 20, &mut out);
        assert_eq!(out.iter().map(|e| (e.key, e.window, e.count)).collect::<Vec<_>>(), vec![(1, W0, 10)]);
        // The next window re-arms the cell: the limit again, exactly.
        assert_eq!(admitted(&s, 1, T0 + 1_005, 50), 10);
        assert_eq!(s.shard(1).lock.lock().hot.key, 1, "still the hot key");
        assert_eq!(counts(&s, 1, T0 + 1_005), vec![(W0, LOCAL_REPLICA, 10), (W0 + 1, LOCAL_REPLICA, 10)]);
    }

    /// `check` on the hot key (a decision with the store's quota) spends the thread's
    /// lease and serves a standing refusal without the shard lock: both are decided
    /// while another thread holds it, with the lock path's figures (for the token bucket
    /// an admission's reset time counts the leases out as spent: never earlier).
    #[test]
    fn a_hot_keys_check_is_decided_without_the_lock() {
        use std::sync::mpsc;
        for strategy in [Strategy::FixedWindow, Strategy::SlidingWindow, Strategy::SlidingLog, Strategy::TokenBucket] {
            let tol = Tolerances { max_age_ms: 5_000, max_skew_ms: 2_000 };
            let quota = Quota::new(100, Duration::from_secs(1)).unwrap();
            let s = Store::new(4, KeyCap::new(1_000), tol, 7, quota, strategy);
            let ts = T0 + 10;
            let (_, promoted) = promote_with(&s, 1, ts, None);
            let (go, step) = mpsc::channel::<bool>();
            let (done, result) = mpsc::channel();
            std::thread::scope(|sc| {
                let s = &s;
                // One thread: its stripe's lease is what the decisions spend. `true`: one
                // `check`; `false`: `allow` until refused.
                sc.spawn(move || {
                    while let Ok(check) = step.recv() {
                        let out = if check {
                            (1, Some(s.decide(1, ts, ts, None, None).unwrap()))
                        } else {
                            (std::iter::from_fn(|| s.admit(1, ts, ts, None, None).unwrap().then_some(())).count() as u64, None)
                        };
                        done.send(out).unwrap();
                    }
                });
                let wait = || result.recv_timeout(Duration::from_secs(10)).expect("decided without the lock");
                // Unlocked: the lock path decides and grants this thread a lease.
                go.send(true).unwrap();
                let first = wait().1.unwrap();
                assert!(first.allowed);
                let mut admitted = promoted + 1;
                {
                    let guard = s.shard(1).lock.lock();
                    go.send(true).unwrap();
                    let v = wait().1.unwrap();
                    drop(guard);
                    admitted += 1;
                    let exact = algorithm::evaluate(strategy, &quota, Counts { cur: admitted - 1, prev: 0 }, 10);
                    assert!(v.allowed, "{strategy:?}");
                    if strategy == Strategy::TokenBucket {
                        // Never earlier than the exact reset: the bucket's refill counts
                        // the lease out as spent.
                        let most = algorithm::evaluate(strategy, &quota, Counts { cur: 99, prev: 0 }, 10);
                        assert_eq!((v.limit, v.retry_after_ms), (100, None));
                        assert!((exact.reset_after_ms..=most.reset_after_ms).contains(&v.reset_after_ms), "{v:?} {exact:?} {most:?}");
                    } else {
                        assert_eq!((v.limit, v.reset_after_ms, v.retry_after_ms), (100, exact.reset_after_ms, None), "{strategy:?}");
                    }
                    // With no other thread deciding, one less than the lock path said.
                    assert_eq!(v.remaining, first.remaining - 1, "{strategy:?}");
                    assert!(v.remaining > 0 && v.remaining <= 100 - admitted, "{strategy:?}: {} remaining after {admitted}", v.remaining);
                }
                go.send(false).unwrap();
                admitted += wait().0;
                assert_eq!(admitted, 100, "{strategy:?}: exactly the limit");
                {
                    // The standing refusal, with the exact count's retry and reset times.
                    let guard = s.shard(1).lock.lock();
                    go.send(true).unwrap();
                    let v = wait().1.unwrap();
                    drop(guard);
                    let exact = algorithm::evaluate(strategy, &quota, Counts { cur: 100, prev: 0 }, 10);
                    assert!(!exact.allowed);
                    assert_eq!(v, exact, "{strategy:?}");
                }
                drop(go);
            });
        }
    }

    #[test]
    fn a_merged_count_takes_the_hot_keys_leases_back() {
        let s = store(100);
        let tries = promote(&s, 1, T0);
        assert!(admitted(&s, 1, T0, 5) == 5);
        // This thread now holds a lease sized on a view without the peer's 90.
        assert!(s.shard(1).lock.lock().hot.granted != 0);
        assert!(s.merge(1, W0, 7, 90, T0).unwrap());
        assert_eq!(s.shard(1).lock.lock().hot.granted, 0, "leases taken back");
        assert_eq!(admitted(&s, 1, T0, 100), 100 - 90 - 5 - tries);
    }

    #[test]
    fn a_quota_change_and_a_sweep_release_the_hot_cell() {
        let s = store(100);
        promote(&s, 1, T0);
        admitted(&s, 1, T0, 5);
        s.set_quota(Quota::new(5, Duration::from_secs(1)).unwrap(), T0);
        assert_eq!(s.shard(1).lock.lock().hot.key, 0);
        assert!(!s.admit(1, T0, T0, None, None).unwrap(), "the count kept its leased admissions");
        promote(&s, 2, T0);
        assert_eq!(s.sweep(T0 + 60_000), 2);
        assert_eq!(s.shard(2).lock.lock().hot.key, 0);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn a_key_idle_for_2_pow_31_windows_starts_afresh_instead_of_looking_ahead() {
        let s = store(1);
        assert!(s.admit(1, T0, T0, None, None).unwrap());
        assert!(!s.admit(1, T0, T0, None, None).unwrap());
        // Its 32-bit window index now reads as 2^31 - 5 windows *ahead* of the present.
        let later = T0 + ((1i64 << 31) + 5) * 1000;
        assert!(s.admit(1, later, later, None, None).unwrap(), "not charged to the stale window");
        assert!(!s.admit(1, later, later, None, None).unwrap());
    }

    fn log_store(limit: u64) -> Store {
        let tol = Tolerances { max_age_ms: 5_000, max_skew_ms: 2_000 };
        Store::new(4, KeyCap::new(1_000), tol, 7, Quota::new(limit, Duration::from_secs(1)).unwrap(), Strategy::SlidingLog)
    }

    /// The sliding log's older buckets: moved as the key rolls, merged from peers, exported,
    /// dropped once no decision reads them (and their side-map entry with them).
    #[test]
    fn sliding_log_buckets_roll_merge_export_and_expire() {
        assert_eq!(std::mem::size_of::<Bucket>(), 48, "the size docs/design.md states");
        let s = log_store(10);
        let b0 = T0 / 100;
        assert!(s.admit(1, T0, T0, None, None).unwrap());
        assert!(s.merge(1, b0 + 3, 7, 2, T0 + 300).unwrap(), "a peer's count three buckets later rolls the key");
        assert!(s.merge(1, b0 + 1, 7, 4, T0 + 300).unwrap(), "an older bucket the decision reads merges");
        assert!(!s.merge(1, b0 - 8, 7, 4, T0 + 300).unwrap(), "one no decision reads does not");
        assert_eq!(counts(&s, 1, T0 + 300), vec![(b0, LOCAL_REPLICA, 1), (b0 + 1, 7, 4), (b0 + 3, 7, 2)]);
        // 1 + 4 + 2 of 10: three more at 950 ms, none after.
        assert_eq!(admitted(&s, 1, T0 + 950, 10), 3);
        // Bucket 0 is read until 1,100 ms, then one more fits.
        assert_eq!(admitted(&s, 1, T0 + 1_099, 10), 0);
        assert_eq!(admitted(&s, 1, T0 + 1_100, 10), 1);
        assert_eq!(s.shard(1).lock.lock().older.len(), 1);
        // Every bucket has left the span: the side map is empty again.
        assert_eq!(admitted(&s, 1, T0 + 2_950, 20), 10);
        assert!(s.shard(1).lock.lock().older.is_empty());
        assert_eq!(s.sweep(T0 + 60_000), 1);
    }

    /// A member counting made-up replicas into a sliding-log key's older buckets cannot
    /// grow them past the key cap's budget of cells: each entry is a cell, the rest joins
    /// the bucket's total (stricter: the key admits less, never more), and every cell goes
    /// back to the budget when the buckets roll away or the key expires.
    #[test]
    fn sliding_log_older_buckets_draw_on_the_cell_budget_and_return_it() {
        let tol = Tolerances { max_age_ms: 5_000, max_skew_ms: 2_000 };
        let cap = KeyCap::new(4);
        let budget = 4 * CELLS_PER_KEY;
        let s = Store::new(4, cap.clone(), tol, 7, Quota::new(1_000, Duration::from_secs(1)).unwrap(), Strategy::SlidingLog);
        let b0 = T0 / 100;
        let held = || -> usize {
            s.shards
                .iter()
                .map(|sh| {
                    let sh = sh.0.lock.lock();
                    sh.remote.iter().map(|r| r.cells.len()).sum::<usize>() + sh.older.values().map(|bs| bucket_cells(bs)).sum::<usize>()
                })
                .sum()
        };
        assert!(s.admit(1, T0 + 300, T0 + 300, None, None).unwrap());
        // 5,000 replicas' counts of 1 for a bucket two before the newest.
        for replica in 1..=5_000u32 {
            assert!(s.merge(1, b0 + 1, replica, 1, T0 + 300).unwrap());
        }
        assert_eq!(held(), budget, "the bucket took the whole budget, and no more");
        assert_eq!(cap.cells.load(Ordering::Relaxed), budget, "the budget counts every entry held");
        let d = s.decide(1, T0 + 350, T0 + 350, None, None).unwrap();
        assert_eq!(d.remaining, 0, "every one of the 5,000 counts is in the view: {d:?}");
        // Once the key rolls past the bucket and expires, the cells are back.
        assert_eq!(s.sweep(T0 + 60_000), 1);
        assert_eq!(held(), 0);
        assert_eq!(cap.cells.load(Ordering::Relaxed), 0);
    }

    /// Peers' counts of a sliding-log key held in a window's total alone (no cell or
    /// bucket entry was left for them) stay in the decision as the key rolls: the key gets
    /// stricter when the budget runs out, never looser.
    #[test]
    fn sliding_log_counts_without_cells_stay_in_the_decision_as_the_key_rolls() {
        let tol = Tolerances { max_age_ms: 5_000, max_skew_ms: 2_000 };
        let log = |cap| Store::new(4, cap, tol, 7, Quota::new(10, Duration::from_secs(1)).unwrap(), Strategy::SlidingLog);
        let b0 = T0 / 100;
        // Key 1's 8 counts are in cells; key 2 takes the other 8 cells of the budget, so the
        // bucket key 1's window becomes finds none for them.
        let s = log(KeyCap::new(2));
        for replica in 1..=8 {
            assert!(s.merge(1, b0, replica, 1, T0).unwrap());
            assert!(s.merge(2 << 40, b0, replica, 1, T0).unwrap());
        }
        assert_eq!(admitted(&s, 1, T0 + 200, 10), 2, "8 of 10 counted two buckets later");
        // Key 1's count of 9 finds no cell at all (key 2 holds every one): it is in the
        // window's total alone.
        let s = log(KeyCap::new(2));
        for replica in 1..=16 {
            assert!(s.merge(2 << 40, b0, replica, 1, T0).unwrap());
        }
        assert!(s.merge(1, b0, 17, 9, T0).unwrap());
        assert_eq!(admitted(&s, 1, T0 + 200, 10), 1, "9 of 10 counted two buckets later");
    }

    /// A step-wise export gets every key present throughout, and ends, however often the
    /// tables are rebuilt between its steps: shrunk (a sweep dropping expired keys), kept
    /// (a sweep dropping none) or grown (new keys).
    #[test]
    fn a_step_wise_export_gets_every_key_however_often_tables_are_rebuilt() {
        let t1 = T0 + 3_000;
        for keys_per_step in [0u64, 40, 150] {
            let tol = Tolerances { max_age_ms: 100, max_skew_ms: 2_000 };
            let s = Store::new(4, KeyCap::new(1_000_000), tol, 7, Quota::new(10, Duration::from_secs(1)).unwrap(), Strategy::FixedWindow);
            let key = |k: u64| k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            // 20,000 keys that expire before the export's first sweep, then 5,000 to export.
            for k in 10_000..30_000 {
                assert!(s.admit(key(k), T0, T0, None, None).unwrap());
            }
            let keys: Vec<u64> = (1..=5_000u64).map(key).collect();
            for &k in &keys {
                assert!(s.admit(k, t1, t1, None, None).unwrap());
            }
            let (mut cursor, mut seen, mut steps, mut fresh) = (ExportCursor::default(), std::collections::BTreeSet::new(), 0, 100_000u64);
            loop {
                let mut out = Vec::new();
                let done = s.export_from(&mut cursor, 100, t1, |_| true, &mut out);
                seen.extend(out.iter().map(|e| e.key));
                steps += 1;
                assert!(steps < 2_000, "the export ends");
                if done {
                    break;
                }
                // Every table is rebuilt between steps (the first sweep shrinks them), and
                // grows with new keys.
                s.sweep(t1);
                for _ in 0..keys_per_step {
                    fresh += 1;
                    s.admit(key(fresh), t1, t1, None, None).unwrap();
                }
            }
            let missed = keys.iter().filter(|k| !seen.contains(k)).count();
            assert_eq!(missed, 0, "{keys_per_step} new keys a step: {missed} keys never exported in {steps} steps");
        }
    }

    /// A step looks at a bounded number of table slots even when the selection takes
    /// none of them (a repair of a bucket this node has no keys in).
    #[test]
    fn a_step_wise_export_that_selects_nothing_still_stops_at_its_scan_budget() {
        let tol = Tolerances { max_age_ms: 5_000, max_skew_ms: 2_000 };
        let s = Store::new(4, KeyCap::new(1_000_000), tol, 7, Quota::new(10, Duration::from_secs(1)).unwrap(), Strategy::FixedWindow);
        for k in 1..=50_000u64 {
            assert!(s.admit(k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, T0, T0, None, None).unwrap());
        }
        let (mut cursor, mut steps) = (ExportCursor::default(), 0);
        let slots: usize = s.shards.iter().map(|sh| sh.0.lock.lock().table.capacity()).sum();
        loop {
            let mut out = Vec::new();
            let done = s.export_from(&mut cursor, 100, T0, |_| false, &mut out);
            assert!(out.is_empty());
            steps += 1;
            if done {
                break;
            }
        }
        let least = slots.div_ceil(100 * SCAN_PER_COUNT);
        assert!((least..=least + 1).contains(&steps), "{steps} steps for {slots} slots, {} a step", 100 * SCAN_PER_COUNT);
    }
}
