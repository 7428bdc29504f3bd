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
//! # Windows
//! A key keeps two windows: its newest and the one before, which is all any strategy
//! reads. A request (or a merged remote count) for a newer window rolls the key forward;
//! a request for an older window is charged to the key's newest window, at its start
//! (conservative: it can only make the current window stricter). Window indices are
//! stored as their low 32 bits and compared with wrapping arithmetic; keys idle for more
//! than one window are reclaimed long before that could alias.
//!
//! # Reclamation
//! A key is dead once no acceptable timestamp (the clock minus the replay tolerance)
//! falls in its newest window or the one after it. Dead keys are dropped (1) from a shard
//! when it is about to grow, in the same pass that grows it, which amortizes to O(1) per
//! new key and touches one shard only, (2) when the key cap is reached, and (3) by
//! [`Store::sweep`], which locks one shard at a time.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::algorithm::{self, Counts, Verdict};
use crate::counter::GCounter;
use crate::table::{Slot as Entry, Table};
use crate::{Error, Quota, Strategy};

const NO_REMOTE: u32 = u32::MAX;

/// Counts other replicas contributed to one key, per window. Slots are replica indices
/// interned by the caller of [`Store::merge`].
#[derive(Debug, Default)]
struct Remote {
    cur: GCounter<u32>,
    prev: GCounter<u32>,
    cur_sum: u64,
    prev_sum: u64,
}

impl Remote {
    fn roll(&mut self, by: i64) {
        if by == 1 {
            self.prev = std::mem::take(&mut self.cur);
            self.prev_sum = self.cur_sum;
        } else {
            self.prev = GCounter::new();
            self.prev_sum = 0;
        }
        self.cur = GCounter::new();
        self.cur_sum = 0;
    }
}

struct Shard {
    table: Table,
    remote: Vec<Remote>,
    free_remote: Vec<u32>,
    quota: Quota,
    strategy: Strategy,
}

/// Distance in windows from `entry` to `now`, both as low 32 bits of window indices.
#[inline]
fn windows_since(entry: u32, now: u32) -> i64 {
    i64::from(now.wrapping_sub(entry) as i32)
}

impl Shard {
    fn free(remote: &mut [Remote], free_remote: &mut Vec<u32>, idx: u32) {
        if idx != NO_REMOTE {
            remote[idx as usize] = Remote::default();
            free_remote.push(idx);
        }
    }

    /// Drops keys whose newest window is older than `horizon - 1`, in a table sized for
    /// the survivors.
    fn sweep(&mut self, horizon: u32) -> usize {
        let (remote, free) = (&mut self.remote, &mut self.free_remote);
        self.table.rebuild(|e| {
            let keep = windows_since(e.window, horizon) < 2;
            if !keep {
                Self::free(remote, free, e.remote);
            }
            keep
        })
    }

    /// Rolls `e` forward to `window` if that is newer; returns how far (0 if not newer).
    #[inline]
    fn roll(e: &mut Entry, remote: &mut [Remote], window: u32) -> i64 {
        let by = windows_since(e.window, window);
        if by > 0 {
            e.prev = if by == 1 { e.cur } else { 0 };
            e.cur = 0;
            e.window = window;
            if e.remote != NO_REMOTE {
                remote[e.remote as usize].roll(by);
            }
        }
        by
    }
}

/// Rolls `e` to `window`, decides with `f` and counts the request if admitted.
#[inline]
fn apply<V: AllowedOf>(
    e: &mut Entry,
    remote: &mut [Remote],
    strategy: Strategy,
    quota: &Quota,
    window: u32,
    mut elapsed: u64,
    f: fn(Strategy, &Quota, Counts, u64) -> V,
) -> V {
    if Shard::roll(e, remote, window) < 0 {
        // A late request: charged to the key's newest window, at its start.
        elapsed = 0;
    }
    let (mut cur, mut prev) = (u64::from(e.cur), u64::from(e.prev));
    if e.remote != NO_REMOTE {
        let r = &remote[e.remote as usize];
        cur += r.cur_sum;
        prev += r.prev_sum;
    }
    let v = f(strategy, quota, Counts { cur, prev }, elapsed);
    if v.allowed() {
        e.cur = e.cur.saturating_add(1);
    }
    v
}

/// What [`Store::snapshot`] reports for one key.
#[cfg_attr(not(test), allow(dead_code))] // read by the gossip core and tests
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyState {
    /// The key's newest window index.
    pub window: i64,
    pub local_cur: u64,
    pub local_prev: u64,
    pub remote_cur: GCounter<u32>,
    pub remote_prev: GCounter<u32>,
}

#[repr(align(128))]
struct Padded<T>(T);

/// The sharded store. See the module documentation.
pub(crate) struct Store {
    shards: Box<[Padded<Mutex<Shard>>]>,
    shard_mask: u64,
    keys: AtomicUsize,
    max_keys: usize,
    /// Replay tolerance: windows a timestamp this late can reach are kept.
    max_age_ms: i64,
    /// Window index of the last full sweep triggered by the key cap.
    last_cap_sweep: AtomicI64,
}

impl Store {
    pub(crate) fn new(shards: usize, max_keys: usize, max_age_ms: u64, quota: Quota, strategy: Strategy) -> Self {
        debug_assert!(shards.is_power_of_two());
        let shards: Box<[_]> = (0..shards)
            .map(|_| Padded(Mutex::new(Shard { table: Table::default(), remote: Vec::new(), free_remote: Vec::new(), quota, strategy })))
            .collect();
        let shard_mask = (shards.len() as u64).saturating_sub(1);
        Self {
            shards,
            shard_mask,
            keys: AtomicUsize::new(0),
            max_keys,
            max_age_ms: max_age_ms as i64,
            last_cap_sweep: AtomicI64::new(i64::MIN),
        }
    }

    #[inline]
    fn shard(&self, key: u64) -> &Mutex<Shard> {
        &self.shards[((key >> 40) & self.shard_mask) as usize].0
    }

    /// Decides one request for `key` at `ts_ms` and counts it if admitted. `now_ms` is
    /// the limiter clock's reading, used only to reclaim expired keys.
    ///
    /// `quota` overrides the store's quota (it must have the store's window).
    #[inline]
    pub(crate) fn decide(&self, key: u64, ts_ms: i64, now_ms: i64, quota: Option<&Quota>) -> Result<Verdict, Error> {
        self.decide_with(key, ts_ms, now_ms, quota, algorithm::evaluate)
    }

    /// Like [`decide`](Self::decide) but computes only whether to admit.
    #[inline]
    pub(crate) fn admit(&self, key: u64, ts_ms: i64, now_ms: i64, quota: Option<&Quota>) -> Result<bool, Error> {
        self.decide_with(key, ts_ms, now_ms, quota, algorithm::admits)
    }

    /// The oldest window a request accepted at `now_ms` can fall in: keys whose newest
    /// window is older than the one before it are dead.
    fn horizon(&self, now_ms: i64, window_ms: u64) -> u32 {
        now_ms.saturating_sub(self.max_age_ms).div_euclid(window_ms as i64) as u32
    }

    #[inline]
    fn decide_with<V: AllowedOf>(
        &self,
        key: u64,
        ts_ms: i64,
        now_ms: i64,
        quota: Option<&Quota>,
        f: fn(Strategy, &Quota, Counts, u64) -> V,
    ) -> Result<V, Error> {
        let key = key.max(1);
        let mut guard = self.shard(key).lock();
        let shard = &mut *guard;
        let quota = *quota.unwrap_or(&shard.quota);
        let w = quota.window_ms() as i64;
        let window = ts_ms.div_euclid(w);
        let elapsed = ts_ms.rem_euclid(w) as u64;
        let Shard { table, remote, strategy, .. } = shard;
        if let Some(e) = table.get_mut(key) {
            return Ok(apply(e, remote, *strategy, &quota, window as u32, elapsed, f));
        }
        self.reserve_key(shard, self.horizon(now_ms, quota.window_ms()))?;
        let Shard { table, remote, strategy, .. } = shard;
        let e = table.insert_new(Entry { key, window: window as u32, cur: 0, prev: 0, remote: NO_REMOTE });
        Ok(apply(e, remote, *strategy, &quota, window as u32, elapsed, f))
    }

    /// Makes room for one more key in `shard` or refuses it.
    #[cold]
    fn reserve_key(&self, shard: &mut Shard, horizon: u32) -> Result<(), Error> {
        if !self.try_count_key() {
            let removed = shard.sweep(horizon);
            self.keys.fetch_sub(removed, Ordering::Relaxed);
            if !self.try_count_key() {
                self.sweep_all_for_room(shard, horizon)?;
            }
        }
        if shard.table.is_full() {
            // Grow, dropping what has expired in the same pass: memory follows active keys.
            let removed = shard.sweep(horizon);
            self.keys.fetch_sub(removed, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The key cap is reached: other shards may hold expired keys.
    #[cold]
    fn sweep_all_for_room(&self, shard: &mut Shard, horizon: u32) -> Result<(), Error> {
        // Full: other shards may hold expired keys. Sweep them all, at most once per
        // window, one shard lock at a time (this shard's lock is held, so skip it).
        let last = self.last_cap_sweep.load(Ordering::Relaxed);
        let window = i64::from(horizon);
        if last != window && self.last_cap_sweep.compare_exchange(last, window, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            let own: *const Shard = shard;
            for s in self.shards.iter() {
                if let Some(mut other) = s.0.try_lock() {
                    if !std::ptr::eq(&*other, own) {
                        let removed = other.sweep(horizon);
                        self.keys.fetch_sub(removed, Ordering::Relaxed);
                    }
                }
            }
            if self.try_count_key() {
                return Ok(());
            }
        }
        Err(Error::KeyCapacity { max: self.max_keys })
    }

    fn try_count_key(&self) -> bool {
        self.keys.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < self.max_keys).then_some(n + 1)).is_ok()
    }

    #[cfg_attr(not(test), allow(dead_code))] // called by the gossip core and tests
    /// Raises remote replica `slot`'s count of `key` in `window` to `count`.
    ///
    /// A window newer than the key's rolls the key forward; the previous window merges
    /// into the previous counts; anything older is ignored (it can no longer influence a
    /// decision). Returns whether the state changed.
    pub(crate) fn merge(&self, key: u64, window: i64, slot: u32, count: u64, now_ms: i64) -> Result<bool, Error> {
        if count == 0 {
            return Ok(false);
        }
        let key = key.max(1);
        let mut guard = self.shard(key).lock();
        let shard = &mut *guard;
        let window32 = window as u32;
        let horizon = self.horizon(now_ms, shard.quota.window_ms());
        if windows_since(window32, horizon) >= 2 {
            return Ok(false);
        }
        if shard.table.get(key).is_none() {
            self.reserve_key(shard, horizon)?;
            shard.table.insert_new(Entry { key, window: window32, cur: 0, prev: 0, remote: NO_REMOTE });
        }
        let Shard { table, remote, free_remote, .. } = shard;
        let Some(e) = table.get_mut(key) else { return Ok(false) };
        let age = -Shard::roll(e, remote, window32).min(0);
        if age > 1 {
            return Ok(false);
        }
        if e.remote == NO_REMOTE {
            e.remote = match free_remote.pop() {
                Some(i) => i,
                None => {
                    remote.push(Remote::default());
                    (remote.len() - 1) as u32
                }
            };
        }
        let r = &mut remote[e.remote as usize];
        let (counter, sum) = if age == 0 { (&mut r.cur, &mut r.cur_sum) } else { (&mut r.prev, &mut r.prev_sum) };
        let before = counter.get(slot);
        if counter.merge_slot(slot, count) {
            *sum = sum.saturating_add(count - before);
            return Ok(true);
        }
        Ok(false)
    }

    #[cfg_attr(not(test), allow(dead_code))] // called by the gossip core and tests
    /// The state of one key, with window indices resolved relative to `now_window`.
    pub(crate) fn snapshot(&self, key: u64, now_window: i64) -> Option<KeyState> {
        let key = key.max(1);
        let shard = self.shard(key).lock();
        let e = shard.table.get(key)?;
        let window = now_window - windows_since(e.window, now_window as u32);
        let (remote_cur, remote_prev) = match e.remote {
            NO_REMOTE => (GCounter::new(), GCounter::new()),
            i => (shard.remote[i as usize].cur.clone(), shard.remote[i as usize].prev.clone()),
        };
        Some(KeyState { window, local_cur: u64::from(e.cur), local_prev: u64::from(e.prev), remote_cur, remote_prev })
    }

    /// Drops every key that no request accepted at `now_ms` can reach; locks one shard
    /// at a time. Returns how many were dropped.
    pub(crate) fn sweep(&self, now_ms: i64) -> usize {
        let mut total = 0;
        for s in self.shards.iter() {
            let mut shard = s.0.lock();
            let horizon = self.horizon(now_ms, shard.quota.window_ms());
            let removed = shard.sweep(horizon);
            self.keys.fetch_sub(removed, Ordering::Relaxed);
            total += removed;
        }
        total
    }

    /// Keys currently tracked.
    pub(crate) fn len(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    pub(crate) fn quota(&self) -> Quota {
        self.shards[0].0.lock().quota
    }

    /// Replaces the quota. If the window changes, live counts carry over conservatively:
    /// each key's count for the window containing `now_ms` (or newer) becomes its count
    /// for the new window containing `now_ms`, the window before maps to the one before,
    /// and older counts are dropped.
    pub(crate) fn set_quota(&self, quota: Quota, now_ms: i64) {
        for s in self.shards.iter() {
            let mut guard = s.0.lock();
            let shard = &mut *guard;
            let old_w = shard.quota.window_ms() as i64;
            let new_w = quota.window_ms() as i64;
            shard.quota = quota;
            if old_w == new_w {
                continue;
            }
            let old_now = now_ms.div_euclid(old_w) as u32;
            let new_now = now_ms.div_euclid(new_w) as u32;
            let (remote, free) = (&mut shard.remote, &mut shard.free_remote);
            let removed = shard.table.rebuild(|e| {
                let age = windows_since(e.window, old_now).max(0);
                if age >= 2 {
                    Shard::free(remote, free, e.remote);
                    return false;
                }
                e.window = new_now.wrapping_sub(age as u32);
                true
            });
            self.keys.fetch_sub(removed, Ordering::Relaxed);
        }
    }
}

/// Lets [`Store::decide_with`] count an admission whatever the verdict type.
pub(crate) trait AllowedOf: Copy {
    fn allowed(&self) -> bool;
}

impl AllowedOf for bool {
    #[inline]
    fn allowed(&self) -> bool {
        *self
    }
}

impl AllowedOf for Verdict {
    #[inline]
    fn allowed(&self) -> bool {
        self.allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T0: i64 = 1_700_000_000_000;

    fn store(limit: u64) -> Store {
        Store::new(4, 1_000, 5_000, Quota::new(limit, Duration::from_secs(1)).unwrap(), Strategy::FixedWindow)
    }

    #[test]
    fn remote_counts_join_the_local_view() {
        let s = store(5);
        assert!(s.admit(1, T0, T0, None).unwrap());
        assert!(s.merge(1, T0 / 1000, 7, 3, T0).unwrap());
        assert!(s.admit(1, T0, T0, None).unwrap(), "1 local + 3 remote < 5");
        assert!(!s.admit(1, T0, T0, None).unwrap(), "2 local + 3 remote = 5");
        let st = s.snapshot(1, T0 / 1000).unwrap();
        assert_eq!((st.window, st.local_cur, st.remote_cur.get(7)), (T0 / 1000, 2, 3));
    }

    #[test]
    fn merging_is_idempotent_and_keeps_the_maximum() {
        let s = store(100);
        let w = T0 / 1000;
        assert!(s.merge(1, w, 2, 10, T0).unwrap());
        assert!(!s.merge(1, w, 2, 10, T0).unwrap(), "a duplicate changes nothing");
        assert!(!s.merge(1, w, 2, 4, T0).unwrap(), "an older, lower count changes nothing");
        assert!(s.merge(1, w, 2, 12, T0).unwrap());
        assert!(s.merge(1, w, 3, 1, T0).unwrap());
        let st = s.snapshot(1, w).unwrap();
        assert_eq!(st.remote_cur.value(), 13);
    }

    #[test]
    fn a_newer_remote_window_rolls_the_key_forward_and_older_ones_land_in_prev_or_nowhere() {
        let s = store(100);
        let w = T0 / 1000;
        assert!(s.admit(1, T0, T0, None).unwrap());
        assert!(s.merge(1, w + 1, 2, 4, T0 + 1000).unwrap());
        let st = s.snapshot(1, w + 1).unwrap();
        assert_eq!((st.window, st.local_prev, st.local_cur, st.remote_cur.get(2)), (w + 1, 1, 0, 4));
        assert!(s.merge(1, w, 2, 9, T0 + 1000).unwrap(), "the previous window still merges");
        assert_eq!(s.snapshot(1, w + 1).unwrap().remote_prev.get(2), 9);
        assert!(!s.merge(1, w - 1, 2, 9, T0 + 1000).unwrap(), "older windows can no longer matter");
    }

    #[test]
    fn remote_slots_are_recycled_when_their_keys_expire() {
        let s = store(100);
        for key in 0..50u64 {
            s.merge(key << 40, T0 / 1000, 1, 1, T0).unwrap();
        }
        let later = T0 + 10_000;
        assert_eq!(s.sweep(later), 50);
        for key in 0..50u64 {
            s.merge(key << 40, later / 1000, 1, 1, later).unwrap();
        }
        let remote_slots: usize = s.shards.iter().map(|sh| sh.0.lock().remote.len()).sum();
        assert_eq!(remote_slots, 50, "freed side-table slots are reused");
    }
}
