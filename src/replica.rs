//! The seam between a limiter and its gossip core: everything the core may do with the
//! limiter's stores and cluster state, and nothing else.
//!
//! ```text
//!   RateLimiter ──owns──▶ Store (counts, strategy arithmetic) ──asks──▶ admission (shares)
//!        ▲                   ▲
//!        │ attach / detach   │ changes · export · merge · sweep
//!        │ set_view · set_offset
//!   Replica (this module) ◀──only──  GossipNode (protocol)  ──events──▶ driver, metrics, simulator
//! ```
//!
//! A [`Replica`] is the limiter seen as one replica of the cluster's counters. The core
//! reads the counts that changed ([`changes`](Replica::changes)), exports counts in whole
//! stores or in bounded steps ([`export`](Replica::export),
//! [`export_from`](Replica::export_from)), merges peers' counts
//! ([`merge`](Replica::merge)), and tells the limiter what the admission policy needs to
//! know of the cluster ([`set_view`](Replica::set_view)) and what cluster time is
//! ([`set_offset`](Replica::set_offset)). Attaching marks the limiter as a member;
//! dropping the replica detaches it, and the limiter decides on its own again.

use std::ops::RangeInclusive;
use std::sync::atomic::Ordering;

use crate::admission::Admission;
use crate::limits::{LimitsError, LimitsVersion};
use crate::{ConfigError, Error, LimitsConfig, RateLimiter};

pub(crate) use crate::store::{ExportCursor, Exported, OthersCount, ViewCount, LOCAL_REPLICA};

/// Counts are merged in chunks of this many, each prefetched first (`Store::prefetch`):
/// enough for the cache misses of a chunk to overlap, few enough that its slots are
/// still cached when they are merged. 64 against 16: 0.97 of the simulator's time at
/// 300 nodes (`docs/benchmarks.md`, "Speed"); 128 measured the same as 64.
const MERGE_CHUNK: usize = 64;

/// A limiter attached to a gossip core. See the module documentation.
#[derive(Debug)]
pub(crate) struct Replica {
    limiter: RateLimiter,
}

impl Replica {
    /// Attaches `limiter` as node `node`'s replica, with gossip rounds every `round_ms`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] if `limiter` already has a gossip node (the store's replica
    /// indices belong to one core).
    pub(crate) fn attach(limiter: RateLimiter, node: u64, round_ms: u64) -> Result<Self, ConfigError> {
        let cluster = limiter.cluster();
        if cluster.attached.swap(true, Ordering::AcqRel) {
            return Err(ConfigError::Invalid { field: "limiter", reason: "already has a gossip node" });
        }
        cluster.round_ms.store(round_ms, Ordering::Relaxed);
        cluster.lag_ms.store(round_ms, Ordering::Relaxed);
        cluster.live_replicas.store(1, Ordering::Relaxed);
        cluster.live_index.store(0, Ordering::Relaxed);
        cluster.bounded.store(limiter.admission() != Admission::Optimistic, Ordering::Relaxed);
        cluster.node.store(node, Ordering::Relaxed);
        limiter.for_each_store(|_, s| s.track_changes());
        Ok(Self { limiter })
    }

    /// The limiter (for callers of the core; the core itself goes through this seam).
    pub(crate) fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// What the admission policy knows of the cluster: `live` replicas (at least 1) share
    /// the quota, this one at place `index` among them ordered by node id, and the
    /// others' admissions take up to `lag_ms` to show in this node's view. Returns
    /// whether the live replicas or the place changed.
    pub(crate) fn set_view(&self, live: u64, index: u64, lag_ms: u64) -> bool {
        let cluster = self.limiter.cluster();
        cluster.lag_ms.store(lag_ms, Ordering::Relaxed);
        let old_index = cluster.live_index.swap(index, Ordering::Relaxed);
        cluster.live_replicas.swap(live, Ordering::Relaxed) != live || old_index != index
    }

    /// Cluster time minus this node's clock, in ms: the request path cuts windows on it.
    pub(crate) fn set_offset(&self, offset_ms: i64) {
        self.limiter.cluster().offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    /// The offset in force.
    pub(crate) fn offset_ms(&self) -> i64 {
        self.limiter.cluster_offset_ms()
    }

    /// Whether this node's clock is beyond the tolerance from cluster time (reported in
    /// the limiter's stats).
    pub(crate) fn set_clock_beyond(&self, beyond: bool) {
        self.limiter.cluster().clock_beyond.store(beyond, Ordering::Relaxed);
    }

    /// The clock-skew tolerance, in ms.
    pub(crate) fn max_clock_skew_ms(&self) -> u64 {
        self.limiter.max_clock_skew_ms()
    }

    /// The window length of every store.
    pub(crate) fn window_lengths(&self) -> Vec<u64> {
        let mut out = Vec::new();
        self.limiter.for_each_store(|w, _| out.push(w));
        out
    }

    /// Whether a store for `window_ms` exists (a peer never makes one).
    pub(crate) fn has_store(&self, window_ms: u64) -> bool {
        self.limiter.with_existing_store(window_ms, |_| ()).is_some()
    }

    /// This node's counts that changed since the last call, per window length.
    pub(crate) fn changes(&self, now_ms: i64, mut f: impl FnMut(u64, &[Exported])) {
        let mut buf = Vec::new();
        self.limiter.for_each_store(|window_ms, store| {
            buf.clear();
            store.collect_changes(now_ms, &mut buf);
            f(window_ms, &buf);
        });
    }

    /// Every non-zero count of the store for `window_ms` whose key `select` accepts,
    /// appended to `out` (nothing if there is no such store).
    pub(crate) fn export(&self, window_ms: u64, now_ms: i64, select: impl Fn(u64) -> bool, out: &mut Vec<Exported>) {
        self.limiter.with_existing_store(window_ms, |s| s.export(now_ms, select, out));
    }

    /// [`export`](Self::export) from `cursor` on until `out` holds at least `budget`
    /// more counts (one key's counts are never split) or the store ends; advances
    /// `cursor`. Returns whether the export is done (also when there is no such store).
    pub(crate) fn export_from(
        &self,
        window_ms: u64,
        cursor: &mut ExportCursor,
        budget: usize,
        now_ms: i64,
        select: impl Fn(u64) -> bool,
        out: &mut Vec<Exported>,
    ) -> bool {
        self.limiter.with_existing_store(window_ms, |s| s.export_from(cursor, budget, now_ms, select, out)).unwrap_or(true)
    }

    /// Merges into the store for `window_ms` each `(key, window, count)` of `entries`: the
    /// counts of replica index `Some(replica)`, or (`None`) the others' totals an
    /// aggregator reported, kept beside the per-replica counts. `on` is told of each
    /// outcome (`Ok(true)`: the view grew); nothing is merged if there is no such store.
    pub(crate) fn merge(
        &self,
        window_ms: u64,
        replica: Option<u32>,
        now_ms: i64,
        mut entries: impl Iterator<Item = (u64, i64, u64)>,
        mut on: impl FnMut((u64, i64, u64), Result<bool, Error>),
    ) {
        self.limiter.with_existing_store(window_ms, |store| {
            let mut chunk = [(0u64, 0i64, 0u64); MERGE_CHUNK];
            loop {
                let mut n = 0;
                for e in entries.by_ref().take(MERGE_CHUNK) {
                    chunk[n] = e;
                    n += 1;
                }
                store.prefetch(chunk[..n].iter().map(|e| e.0));
                for &(key, window, count) in &chunk[..n] {
                    let outcome = match replica {
                        Some(r) => store.merge(key, window, r, count, now_ms),
                        None => store.merge_heard(key, window, count, now_ms),
                    };
                    on((key, window, count), outcome);
                }
                // A short chunk was the last (and the iterator is not asked again).
                if n < MERGE_CHUNK {
                    break;
                }
            }
        });
    }

    /// For `keys` of the store for `window_ms`, per retained window: the other replicas'
    /// counts held here and the others' total an aggregator reported.
    pub(crate) fn others_of(&self, window_ms: u64, keys: &[u64], now_ms: i64, out: &mut Vec<OthersCount>) {
        self.limiter.with_existing_store(window_ms, |s| s.others_of(keys, now_ms, out));
    }

    /// [`export`](Self::export) of `keys` alone, looked up one by one.
    pub(crate) fn export_keys(&self, window_ms: u64, keys: &[u64], now_ms: i64, out: &mut Vec<Exported>) {
        self.limiter.with_existing_store(window_ms, |s| s.export_keys(keys, now_ms, out));
    }

    /// Every key's view of every retained window of the store for `window_ms`.
    pub(crate) fn views(&self, window_ms: u64, now_ms: i64, out: &mut Vec<ViewCount>) {
        self.limiter.with_existing_store(window_ms, |s| s.views(now_ms, out));
    }

    /// The windows of the store for `window_ms` a count may still be merged for, at
    /// `now_ms`, and the length of its windows (the sliding log's buckets are shorter
    /// than its quota's window); `None` if there is no such store.
    pub(crate) fn windows(&self, window_ms: u64, now_ms: i64) -> Option<(RangeInclusive<i64>, u64)> {
        self.limiter.with_existing_store(window_ms, |s| (s.acceptable_windows(now_ms, window_ms), s.tick_ms(window_ms)))
    }

    /// Drops from every store the counts that can no longer matter (before replica
    /// indices are reused).
    pub(crate) fn sweep(&self, now_ms: i64) {
        self.limiter.for_each_store(|_, s| {
            s.sweep(now_ms);
        });
    }

    /// The version of the limits in force.
    pub(crate) fn limits_version(&self) -> LimitsVersion {
        self.limiter.limits_version()
    }

    /// The limits in force, if any were applied.
    pub(crate) fn limits(&self) -> (LimitsVersion, Option<LimitsConfig>) {
        self.limiter.limits()
    }

    /// Installs limits heard from a peer if they are newer.
    pub(crate) fn install_limits(&self, config: LimitsConfig, version: LimitsVersion) -> Result<bool, LimitsError> {
        self.limiter.install_limits(config, version)
    }
}

impl Drop for Replica {
    /// Detaches from the limiter: it decides on its own again and stops marking changes.
    fn drop(&mut self) {
        let cluster = self.limiter.cluster();
        cluster.bounded.store(false, Ordering::Relaxed);
        cluster.live_replicas.store(1, Ordering::Relaxed);
        cluster.live_index.store(0, Ordering::Relaxed);
        self.limiter.for_each_store(|_, s| s.untrack_changes());
        cluster.attached.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManualClock, Quota, Strategy};
    use std::time::Duration;

    const T0: i64 = 1_700_000_000_000;

    fn replica(max_keys: usize) -> Replica {
        let limiter = RateLimiter::builder()
            .quota(Quota::new(100, Duration::from_secs(1)).unwrap())
            .strategy(Strategy::SlidingWindow)
            .clock(ManualClock::new(T0))
            .hash_secret([7; 16])
            .max_keys(max_keys)
            .build()
            .unwrap();
        Replica::attach(limiter, 1, 20).unwrap()
    }

    /// Merging in prefetched chunks is merging one by one: every entry is merged once,
    /// in order, with the same outcome, and the stores end the same. The entries span
    /// several chunks, repeat keys across a chunk's edge, and include key 0 (taken as
    /// 1), windows that are ignored, counts of zero, and keys refused at capacity.
    #[test]
    fn a_merge_in_chunks_is_the_merge_one_by_one() {
        let now = T0 + 300;
        let w = now.div_euclid(1000);
        let mut x = 7u64;
        let mut next = move || {
            x = crate::key::splitmix64(x);
            x
        };
        let mut refused = 0;
        for (source, max_keys) in [(Some(3), 1000), (Some(4), 1000), (None, 1000), (Some(3), 4), (None, 4)] {
            let entries: Vec<(u64, i64, u64)> = (0..3 * MERGE_CHUNK + 5)
                .map(|_| {
                    let key = [0, 1, 2, 3, u64::MAX, next()][(next() % 6) as usize];
                    let window = [w, w, w - 1, w - 7, w + 9][(next() % 5) as usize];
                    (key, window, next() % 40)
                })
                .collect();
            let (chunked, single) = (replica(max_keys), replica(max_keys));
            let mut got = Vec::new();
            chunked.merge(1000, source, now, entries.iter().copied(), |e, o| got.push((e, format!("{o:?}"))));
            let mut want = Vec::new();
            single.limiter.with_existing_store(1000, |s| {
                for &(key, window, count) in &entries {
                    let o = match source {
                        Some(r) => s.merge(key, window, r, count, now),
                        None => s.merge_heard(key, window, count, now),
                    };
                    want.push(((key, window, count), format!("{o:?}")));
                }
            });
            assert_eq!(got, want, "outcomes merging from {source:?}");
            assert!(got.iter().any(|(_, o)| o == "Ok(true)") && got.iter().any(|(_, o)| o == "Ok(false)"));
            refused += got.iter().filter(|(_, o)| o.starts_with("Err")).count();
            let (mut a, mut b) = (Vec::new(), Vec::new());
            chunked.export(1000, now, |_| true, &mut a);
            single.export(1000, now, |_| true, &mut b);
            // In slot order, and each limiter scrambles its probes its own way.
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "counts held after merging from {source:?}");
            let (mut a, mut b) = (Vec::new(), Vec::new());
            chunked.views(1000, now, &mut a);
            single.views(1000, now, &mut b);
            a.sort_unstable();
            b.sort_unstable();
            assert!(!a.is_empty());
            assert_eq!(a, b, "views after merging from {source:?}");
        }
        assert!(refused > 0, "no key refused at capacity");
    }
}
