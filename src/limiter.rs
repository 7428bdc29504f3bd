//! The public limiter: validation, hashing and the front door to the store.

use std::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use crate::admission::{Admission, Budget};
use crate::algorithm::Verdict;
use crate::clock::{Clock, SystemClock};
use crate::key::KeyHasher;
use crate::limits::{
    LimitsConfig, LimitsError, LimitsVersion, DEFAULT_MAX_CLOCK_SKEW, DEFAULT_MAX_KEYS, DEFAULT_MAX_KEY_LEN, DEFAULT_MAX_TIMESTAMP_AGE,
    MAX_AD_HOC_WINDOWS, MAX_KEY_LEN_LIMIT,
};
use crate::store::{KeyCap, Store, Tolerances};
use crate::{ConfigError, Error, Quota, Strategy};

/// What a limiter has decided so far and what it holds. See [`RateLimiter::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimiterStats {
    /// Requests admitted.
    pub allowed: u64,
    /// Requests refused by a quota (invalid input is not counted here).
    pub denied: u64,
    /// Requests admitted with the client at 90 % of its limit or more.
    pub near_limit: u64,
    /// Keys tracked.
    pub active_keys: u64,
    /// Estimated bytes held by the counters.
    pub memory_bytes: u64,
    /// Times the limiter's time stepped back by more than the clock-skew tolerance
    /// (see [`RateLimiter::clock_steps_back`]).
    pub clock_steps_back: u64,
    /// This node's offset from cluster time in ms, as the request path applies it (0 on
    /// its own; see [`RateLimiter::cluster_offset_ms`]).
    pub cluster_offset_ms: i64,
    /// This node's clock is further from cluster time than the clock-skew tolerance (set
    /// by the gossip core; always false on its own).
    pub clock_beyond_tolerance: bool,
}

/// The outcome of one request, with what a client needs to back off politely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision {
    /// Whether the request is admitted (and counted).
    pub allowed: bool,
    /// The quota's limit per window.
    pub limit: u64,
    /// Requests still admissible right after this one, if no other traffic arrives.
    ///
    /// While many threads decide for one client at once it may be lower than that, never
    /// higher: admissions this node has handed to other threads (see `src/store.rs`,
    /// "One hot key on many threads") count as used until they are, so it is at most
    /// what was truly left on this node at some moment between the decision and its
    /// return.
    pub remaining: u64,
    /// Time until the full quota is available again, if no other traffic arrives.
    ///
    /// Under the token bucket, while many threads decide for one client at once, it may
    /// be later than that, never earlier: it counts the admissions this node has handed
    /// to other threads as used, like [`remaining`](Self::remaining).
    pub reset_after: Duration,
    /// Set when denied: the earliest time from now at which a retry can succeed (if no
    /// other traffic arrives; other replicas' traffic can only push it later).
    pub retry_after: Option<Duration>,
    /// The quota that decided: the client's override if the limits in force give it one,
    /// the quota passed to [`RateLimiter::check_with`], else the default quota. Its
    /// [`limit`](Quota::limit) is [`limit`](Self::limit).
    pub quota: Quota,
}

impl Decision {
    fn from_verdict(v: Verdict, quota: Quota) -> Self {
        Self {
            quota,
            allowed: v.allowed,
            limit: v.limit,
            remaining: v.remaining,
            reset_after: Duration::from_millis(v.reset_after_ms),
            retry_after: v.retry_after_ms.map(Duration::from_millis),
        }
    }
}

/// What the request path needs to know about the cluster; written by the gossip core.
#[derive(Debug)]
pub(crate) struct ClusterState {
    pub(crate) attached: AtomicBool,
    pub(crate) bounded: AtomicBool,
    pub(crate) round_ms: AtomicU64,
    /// How long the others' admissions take to show in this node's view, in ms (the
    /// dissemination's lag: one round in full mesh, two through aggregators).
    pub(crate) lag_ms: AtomicU64,
    pub(crate) live_replicas: AtomicU64,
    /// This node's place among the live replicas ordered by node id (`0..live_replicas`).
    pub(crate) live_index: AtomicU64,
    /// This node's id, for the versions of the limits it sets (0 on its own).
    pub(crate) node: AtomicU64,
    /// Cluster time minus this node's clock, in ms: added to every request's timestamp
    /// and to the clock before windows are cut (0 on its own).
    pub(crate) offset_ms: AtomicI64,
    /// This node's clock is further from cluster time than the clock-skew tolerance.
    pub(crate) clock_beyond: AtomicBool,
}

/// The default quota, readable without a lock: a sequence lock over three atomics. One
/// writer at a time (under the limits' write lock); readers retry while a write is in
/// progress, which only happens when the quota changes.
#[derive(Debug)]
struct QuotaCell {
    seq: AtomicU64,
    limit: AtomicU32,
    burst: AtomicU32,
    window_ms: AtomicU32,
}

impl QuotaCell {
    fn new(q: Quota) -> Self {
        let (limit, burst, window_ms) = q.parts();
        Self { seq: AtomicU64::new(0), limit: AtomicU32::new(limit), burst: AtomicU32::new(burst), window_ms: AtomicU32::new(window_ms) }
    }

    #[inline]
    fn load(&self) -> Quota {
        loop {
            let before = self.seq.load(Ordering::Acquire);
            let parts = (self.limit.load(Ordering::Relaxed), self.burst.load(Ordering::Relaxed), self.window_ms.load(Ordering::Relaxed));
            fence(Ordering::Acquire);
            if before & 1 == 0 && self.seq.load(Ordering::Relaxed) == before {
                return Quota::from_parts(parts);
            }
            std::hint::spin_loop();
        }
    }

    /// Callers serialize writes (the limits' write lock).
    fn store(&self, q: Quota) {
        let (limit, burst, window_ms) = q.parts();
        self.seq.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.limit.store(limit, Ordering::Relaxed);
        self.burst.store(burst, Ordering::Relaxed);
        self.window_ms.store(window_ms, Ordering::Relaxed);
        self.seq.fetch_add(1, Ordering::Release);
    }
}

/// Per-client quotas by key hash.
type Overrides = std::collections::HashMap<u64, Quota>;
/// The stores of window lengths other than the main one's, by window in ms.
type AdHocStores = Vec<(u64, Arc<Store>)>;

thread_local! {
    /// This thread's copy of one limiter's overrides: (limiter id, version, map). The
    /// request path reads the map through it without touching shared memory other than
    /// the version; it takes the read lock only when the version moved (or another
    /// limiter was used last on this thread).
    /// At most one map per thread is kept alive this way (up to `MAX_OVERRIDES` entries).
    static OVERRIDES: std::cell::RefCell<Option<(u64, u64, Arc<Overrides>)>> = const { std::cell::RefCell::new(None) };
    /// The same for one limiter's list of per-window stores (read by clients with an
    /// override of their own window).
    static AD_HOC: std::cell::RefCell<Option<(u64, u64, Arc<AdHocStores>)>> = const { std::cell::RefCell::new(None) };
}

/// The limits register: the configuration in force and its version.
#[derive(Debug, Default)]
struct LimitsState {
    version: LimitsVersion,
    config: Option<LimitsConfig>,
}

struct Inner {
    store: Arc<Store>,
    /// The main store's quota, kept beside it so that reading it takes no lock.
    quota: QuotaCell,
    /// Whether the builder was given a hash secret (a cluster refuses to start without).
    #[cfg_attr(not(feature = "quic"), allow(dead_code))]
    secret_chosen: bool,
    /// The main store's window in ms, kept beside it so that finding a store by window
    /// length takes no lock.
    main_window_ms: AtomicU64,
    cap: Arc<KeyCap>,
    tolerances: Tolerances,
    probe_seed: u64,
    cluster: ClusterState,
    limits: RwLock<LimitsState>,
    /// Per-client quotas by key hash; read only while `has_overrides` is set, through
    /// each thread's copy of the `Arc` ([`OVERRIDES`]), refreshed when the version moves.
    overrides: RwLock<Arc<Overrides>>,
    has_overrides: AtomicBool,
    /// Bumped (after the map is replaced) on every change of `overrides`.
    overrides_version: AtomicU64,
    /// Unique per limiter, to tell whose map a thread holds.
    id: u64,
    hasher: KeyHasher,
    clock: Arc<dyn Clock>,
    /// The latest time (cluster time) a request was validated at: a reading more than
    /// the clock-skew tolerance behind it is a step back.
    newest_ms: AtomicI64,
    /// Steps back detected.
    steps_back: AtomicU64,
    strategy: Strategy,
    max_key_len: usize,

    shards: usize,
    admission: Admission,
    /// Stores for [`RateLimiter::allow_with`], one per window length.
    ad_hoc: RwLock<Arc<AdHocStores>>,
    /// Bumped (after the list is replaced) whenever a store is added to `ad_hoc`.
    ad_hoc_version: AtomicU64,
}

/// A rate limiter: `limit` requests per client per window.
///
/// `Send + Sync`; every method takes `&self`; clones share one state. On its own it is
/// an in-memory limiter; as a cluster member its counts are replicated G-Counters.
///
/// ```
/// use crdt_rate_limiter::{ManualClock, Quota, RateLimiter, Strategy};
/// use std::time::Duration;
/// let clock = ManualClock::new(1_700_000_000_000);
/// let rl = RateLimiter::builder()
///     .quota(Quota::new(2, Duration::from_secs(1))?)
///     .strategy(Strategy::FixedWindow)
///     .clock(clock.clone())
///     .build()?;
/// let now = 1_700_000_000_000;
/// assert!(rl.allow("client-42", now));
/// assert!(rl.allow("client-42", now));
/// let d = rl.check("client-42", now)?;
/// assert!(!d.allowed);
/// assert_eq!(d.retry_after, Some(Duration::from_secs(1)));
/// assert!(rl.allow("client-42", now + 1_000)); // the next window
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("quota", &self.quota())
            .field("strategy", &self.inner.strategy)
            .field("keys", &self.inner.store.len())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// `limit` requests per `window` per client, sliding window, all defaults.
    ///
    /// # Errors
    /// [`ConfigError::ZeroLimit`], [`ConfigError::ZeroWindow`] and the other [`Quota::new`] errors.
    pub fn new(limit: u64, window: Duration) -> Result<Self, ConfigError> {
        Self::builder().quota(Quota::new(limit, window)?).build()
    }

    /// A builder for every setting.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Decides a request from `client` at `timestamp_ms` (Unix ms) and counts it if
    /// admitted. Every invalid input yields `false` (fail closed); use
    /// [`check`](Self::check) to see why.
    #[inline]
    pub fn allow(&self, client: &str, timestamp_ms: i64) -> bool {
        self.allow_at(client, Some(timestamp_ms))
    }

    /// [`allow`](Self::allow) at `timestamp_ms`, or (`None`) at the clock's reading.
    #[inline]
    fn allow_at(&self, client: &str, timestamp_ms: Option<i64>) -> bool {
        #[cfg(feature = "metrics")]
        return crate::metrics::sampled(|| self.allow_inner(client, timestamp_ms));
        #[cfg(not(feature = "metrics"))]
        self.allow_inner(client, timestamp_ms)
    }

    #[inline]
    fn allow_inner(&self, client: &str, timestamp_ms: Option<i64>) -> bool {
        match self.validate(client.as_bytes(), timestamp_ms) {
            Ok((key, ts, now, local)) => match self.override_of(key) {
                None => self.inner.store.admit(key, ts, now, None, self.budget(local).as_ref()).unwrap_or(false),
                Some(q) => self.decide_override(key, q, ts, now, local).is_ok_and(|d| d.allowed),
            },
            Err(_) => false,
        }
    }

    /// The client's own quota, if the limits in force give it one.
    #[inline]
    fn override_of(&self, key: u64) -> Option<Quota> {
        let inner = &*self.inner;
        if !inner.has_overrides.load(Ordering::Relaxed) {
            return None;
        }
        let version = inner.overrides_version.load(Ordering::Acquire);
        OVERRIDES.with(|cell| {
            let mut cached = cell.borrow_mut();
            match &*cached {
                Some((id, v, map)) if *id == inner.id && *v == version => map.get(&key).copied(),
                _ => {
                    let map = inner.overrides.read().clone();
                    let found = map.get(&key).copied();
                    *cached = Some((inner.id, version, map));
                    found
                }
            }
        })
    }

    fn decide_override(&self, key: u64, quota: Quota, ts_ms: i64, now_ms: i64, local_ms: i64) -> Result<Decision, Error> {
        let budget = self.budget(local_ms);
        let v = self.with_store(quota, |s| s.decide(key, ts_ms, now_ms, Some(&quota), budget.as_ref()))??;
        Ok(Decision::from_verdict(v, quota))
    }

    /// Calls `f` with the store for `quota`'s window, creating it like
    /// [`store_for_window`](Self::store_for_window) if needed. The request path's way: no lock
    /// and no shared reference count once this thread has seen the current list.
    fn with_store<T>(&self, quota: Quota, f: impl FnOnce(&Store) -> T) -> Result<T, Error> {
        let w = quota.window_ms();
        if self.main_window_ms() == w {
            return Ok(f(&self.inner.store));
        }
        let inner = &*self.inner;
        let version = inner.ad_hoc_version.load(Ordering::Acquire);
        // `f` runs on the cached store, or comes back to run on one made here.
        let hit = AD_HOC.with(|cell| {
            let stale = !matches!(&*cell.borrow(), Some((id, v, _)) if *id == inner.id && *v == version);
            if stale {
                *cell.borrow_mut() = Some((inner.id, version, inner.ad_hoc.read().clone()));
            }
            let cached = cell.borrow();
            match cached.as_ref().and_then(|(_, _, list)| list.iter().find(|(win, _)| *win == w)) {
                Some((_, s)) => Ok(f(s)),
                None => Err(f),
            }
        });
        match hit {
            Ok(out) => Ok(out),
            Err(f) => Ok(f(&*self.store_for_window(quota)?)),
        }
    }

    /// The bounded policy's round at `now_ms` (the limiter's own clock, not the request's
    /// timestamp nor cluster time: rounds must only move forward, and they follow the
    /// gossip core's timer, which runs on this clock), when the policy applies.
    #[inline]
    fn budget(&self, now_ms: i64) -> Option<Budget> {
        let c = &self.inner.cluster;
        if !c.bounded.load(Ordering::Relaxed) {
            return None;
        }
        let round_ms = c.round_ms.load(Ordering::Relaxed).max(1) as i64;
        Some(Budget {
            round: now_ms.div_euclid(round_ms) as u32,
            round_left_ms: (round_ms - now_ms.rem_euclid(round_ms)) as u64,
            round_ms: round_ms as u64,
            lag_ms: c.lag_ms.load(Ordering::Relaxed),
            forecast: self.inner.admission == Admission::Bounded,
            live_replicas: c.live_replicas.load(Ordering::Relaxed),
            live_index: c.live_index.load(Ordering::Relaxed),
        })
    }

    /// Like [`allow`](Self::allow), with the details of the decision.
    ///
    /// # Errors
    /// [`Error::EmptyKey`], [`Error::KeyTooLong`], [`Error::TimestampTooOld`],
    /// [`Error::TimestampInFuture`], [`Error::KeyCapacity`].
    #[inline]
    pub fn check(&self, client: &str, timestamp_ms: i64) -> Result<Decision, Error> {
        self.check_at(client, Some(timestamp_ms))
    }

    /// [`check`](Self::check) at `timestamp_ms`, or (`None`) at the clock's reading.
    #[inline]
    fn check_at(&self, client: &str, timestamp_ms: Option<i64>) -> Result<Decision, Error> {
        #[cfg(feature = "metrics")]
        return crate::metrics::sampled(|| self.check_inner(client, timestamp_ms));
        #[cfg(not(feature = "metrics"))]
        self.check_inner(client, timestamp_ms)
    }

    #[inline]
    fn check_inner(&self, client: &str, timestamp_ms: Option<i64>) -> Result<Decision, Error> {
        let (key, ts, now, local) = self.validate(client.as_bytes(), timestamp_ms)?;
        if let Some(q) = self.override_of(key) {
            return self.decide_override(key, q, ts, now, local);
        }
        let mut quota = self.quota();
        let v = self.inner.store.decide(key, ts, now, None, self.budget(local).as_ref())?;
        if quota.limit() != v.limit {
            quota = self.quota(); // the default changed while deciding
        }
        Ok(Decision::from_verdict(v, quota))
    }

    /// [`allow`](Self::allow) at the limiter's own clock ([`now_ms`](Self::now_ms)).
    #[inline]
    pub fn allow_now(&self, client: &str) -> bool {
        self.allow_at(client, None)
    }

    /// [`check`](Self::check) at the limiter's own clock ([`now_ms`](Self::now_ms)).
    ///
    /// # Errors
    /// [`Error::EmptyKey`], [`Error::KeyTooLong`], [`Error::KeyCapacity`].
    pub fn check_now(&self, client: &str) -> Result<Decision, Error> {
        self.check_at(client, None)
    }

    /// Decides a request from `client` now, against `limit` per `window` given with the
    /// call (the seed API `Allow(client_id, limit, window)`).
    ///
    /// Each distinct window length keeps its own counters, so a client has one counter
    /// per window length it is limited by; the limit is applied at decision time. At
    /// most [`MAX_AD_HOC_WINDOWS`] distinct lengths are kept. Invalid input yields `false`.
    pub fn allow_with(&self, client: &str, limit: u64, window: Duration) -> bool {
        self.check_with(client, limit, window).is_ok_and(|d| d.allowed)
    }

    /// Like [`allow_with`](Self::allow_with), with the details or the error.
    ///
    /// # Errors
    /// [`Error::InvalidQuota`] with the [`Quota::new`] error, [`Error::TooManyWindows`] and
    /// those of [`check`](Self::check).
    pub fn check_with(&self, client: &str, limit: u64, window: Duration) -> Result<Decision, Error> {
        let quota = Quota::new(limit, window).map_err(Error::InvalidQuota)?;
        let local = self.inner.clock.now_ms();
        let now = self.observe(local.saturating_add(self.cluster_offset_ms()));
        let key = self.validate_key(client.as_bytes())?;
        self.decide_override(key, quota, now, now, local)
    }

    /// The store for `quota`'s window, whoever asks (a client's override, `allow_with`):
    /// the main store if it has that window, else another store per window length
    /// (created on first use, at most [`MAX_AD_HOC_WINDOWS`]).
    pub(crate) fn store_for_window(&self, quota: Quota) -> Result<Arc<Store>, Error> {
        let w = quota.window_ms();
        if let Some(s) = self.existing_store(w) {
            return Ok(s);
        }
        let mut guard = self.inner.ad_hoc.write();
        let stores = Arc::make_mut(&mut guard);
        if let Some((_, s)) = stores.iter().find(|(win, _)| *win == w) {
            return Ok(s.clone());
        }
        if stores.len() >= MAX_AD_HOC_WINDOWS {
            return Err(Error::TooManyWindows { max: MAX_AD_HOC_WINDOWS });
        }
        let i = &self.inner;
        let store = Arc::new(Store::new(i.shards, i.cap.clone(), i.tolerances, i.probe_seed ^ w, quota, i.strategy));
        if self.inner.cluster.attached.load(Ordering::Relaxed) {
            store.track_changes();
        }
        stores.push((w, store.clone()));
        self.inner.ad_hoc_version.fetch_add(1, Ordering::Release);
        Ok(store)
    }

    /// Checks the id; returns its key hash.
    #[inline]
    fn validate_key(&self, client: &[u8]) -> Result<u64, Error> {
        if client.is_empty() {
            return Err(Error::EmptyKey);
        }
        if client.len() > self.inner.max_key_len {
            return Err(Error::KeyTooLong { len: client.len(), max: self.inner.max_key_len });
        }
        Ok(self.inner.hasher.hash(client))
    }

    /// Checks the id and the timestamp (`None`: the clock's reading, read once); returns
    /// the key hash, the timestamp and the clock's reading on cluster time (both plus the
    /// cluster offset), and the clock's own reading. The tolerances compare the timestamp
    /// with the clock, as given.
    #[inline]
    fn validate(&self, client: &[u8], timestamp_ms: Option<i64>) -> Result<(u64, i64, i64, i64), Error> {
        let key = self.validate_key(client)?;
        let inner = &*self.inner;
        let now_ms = inner.clock.now_ms();
        let timestamp_ms = timestamp_ms.unwrap_or(now_ms);
        let delta = i128::from(timestamp_ms) - i128::from(now_ms);
        let Tolerances { max_age_ms, max_skew_ms } = inner.tolerances;
        if delta < -i128::from(max_age_ms) {
            return Err(Error::TimestampTooOld { timestamp_ms, now_ms, max_age_ms });
        }
        if delta > i128::from(max_skew_ms) {
            return Err(Error::TimestampInFuture { timestamp_ms, now_ms, max_skew_ms });
        }
        let offset = self.cluster_offset_ms();
        let now = self.observe(now_ms.saturating_add(offset));
        Ok((key, timestamp_ms.saturating_add(offset), now, now_ms))
    }

    /// Notes `now` (cluster time) as the limiter's latest time; a reading more than the
    /// clock-skew tolerance behind the latest is a step back: counted once, logged, and
    /// the latest time restarts from it. Returns `now`.
    ///
    /// A step back drops nothing: a key whose newest window is ahead of the clock keeps
    /// its counts, and requests are charged to that window until the clock reaches it
    /// again (`src/store.rs`, "Windows"), so a window that can still be decided is never
    /// decided twice.
    #[inline]
    fn observe(&self, now: i64) -> i64 {
        let inner = &*self.inner;
        let newest = inner.newest_ms.load(Ordering::Relaxed);
        if now > newest {
            inner.newest_ms.fetch_max(now, Ordering::Relaxed);
        } else if newest.saturating_sub(now) > inner.tolerances.max_skew_ms as i64 {
            self.stepped_back(newest, now);
        }
        now
    }

    #[cold]
    fn stepped_back(&self, newest: i64, now: i64) {
        let inner = &*self.inner;
        // One thread counts each step; the others see the restarted latest time.
        if inner.newest_ms.compare_exchange(newest, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            inner.steps_back.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                back_ms = newest - now,
                tolerance_ms = inner.tolerances.max_skew_ms,
                "clock stepped back beyond the tolerance: keys keep their newest window's counts and charge requests to it until the clock reaches it again"
            );
        }
    }

    /// How many times this limiter's time (its clock plus the cluster offset) stepped
    /// back by more than the clock-skew tolerance. Each step is logged at `warn`.
    pub fn clock_steps_back(&self) -> u64 {
        self.inner.steps_back.load(Ordering::Relaxed)
    }

    /// Cluster time minus this limiter's clock, in ms: what the request path adds to a
    /// request's timestamp and to the clock before it cuts windows. Set by the gossip core
    /// (`docs/design.md`, "Cluster time"); 0 for a limiter on its own.
    #[inline]
    pub fn cluster_offset_ms(&self) -> i64 {
        self.inner.cluster.offset_ms.load(Ordering::Relaxed)
    }

    /// The clock-skew tolerance in ms (see [`Builder::max_clock_skew`]).
    pub(crate) fn max_clock_skew_ms(&self) -> u64 {
        self.inner.tolerances.max_skew_ms
    }

    /// The limiter's time on cluster time: its clock plus [`cluster_offset_ms`](Self::cluster_offset_ms).
    pub fn cluster_now_ms(&self) -> i64 {
        self.now_ms().saturating_add(self.cluster_offset_ms())
    }

    /// The default quota in force (a client's override may differ: see
    /// [`Decision::quota`]). Takes no lock.
    #[inline]
    pub fn quota(&self) -> Quota {
        self.inner.quota.load()
    }

    /// Whether the builder was given a hash secret ([`Builder::hash_secret`]).
    #[cfg_attr(not(feature = "quic"), allow(dead_code))]
    pub(crate) fn hash_secret_chosen(&self) -> bool {
        self.inner.secret_chosen
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        self.inner.strategy
    }

    /// Replaces the quota, effective from the next decision, without losing counts.
    ///
    /// A new limit applies to the counts already made. A new window re-buckets live
    /// counts conservatively: the count of each key's current window becomes its count
    /// for the new current window (so a client cannot get a fresh quota by a window
    /// change), and the previous window maps to the previous one.
    ///
    /// As a cluster member the change is replicated like [`apply_limits`](Self::apply_limits)
    /// (tiers and overrides in force are kept).
    pub fn set_quota(&self, quota: Quota) {
        let mut cfg = self.limits().1.unwrap_or_else(|| LimitsConfig::new(quota));
        cfg.default = crate::limits::QuotaSpec::of(&quota);
        // The overrides in force were valid and a valid default cannot invalidate them.
        let _ = self.apply_limits(cfg);
    }

    /// Puts `config` in force: the default quota, tiers and per-client overrides, from
    /// the next decision on, without losing counts. As a cluster member it is replicated
    /// to every node, where the latest change wins. Returns its version.
    ///
    /// # Errors
    /// [`LimitsError`] if the configuration is invalid; the one in force stays.
    pub fn apply_limits(&self, config: LimitsConfig) -> Result<LimitsVersion, LimitsError> {
        let now = self.inner.clock.now_ms().max(0) as u64;
        let node = self.inner.cluster.node.load(Ordering::Relaxed);
        let current = self.inner.limits.read().version;
        let version = LimitsVersion { at_ms: now.max(current.at_ms.saturating_add(1)), node };
        if self.install_limits(config, version)? {
            Ok(version)
        } else {
            Err(LimitsError::Superseded)
        }
    }

    /// The version of the limits in force (no copy of the configuration).
    pub(crate) fn limits_version(&self) -> LimitsVersion {
        self.inner.limits.read().version
    }

    /// The version and the configuration in force (`None` until limits are applied).
    pub fn limits(&self) -> (LimitsVersion, Option<LimitsConfig>) {
        let l = self.inner.limits.read();
        (l.version, l.config.clone())
    }

    /// Installs `config` if `version` is newer than the one in force. Returns whether it
    /// was installed.
    pub(crate) fn install_limits(&self, config: LimitsConfig, version: LimitsVersion) -> Result<bool, LimitsError> {
        let (default, clients) = config.resolve()?;
        let overrides: Overrides = clients.into_iter().map(|(c, q)| (self.key_hash(c), q)).collect();
        let mut state = self.inner.limits.write();
        if version <= state.version && state.config.is_some() {
            return Ok(false);
        }
        if default != self.inner.store.quota() {
            self.inner.store.set_quota(default, self.cluster_now_ms());
            self.inner.main_window_ms.store(default.window_ms(), Ordering::Relaxed);
            self.inner.quota.store(default);
        }
        self.inner.has_overrides.store(!overrides.is_empty(), Ordering::Relaxed);
        *self.inner.overrides.write() = Arc::new(overrides);
        self.inner.overrides_version.fetch_add(1, Ordering::Release);
        state.version = version;
        state.config = Some(config);
        Ok(true)
    }

    /// Decisions so far and memory held, summed over every store (one shard lock at a
    /// time: meant for a metrics scrape, not the request path).
    pub fn stats(&self) -> LimiterStats {
        let mut out = LimiterStats::default();
        self.for_each_store(|_, s| {
            let (t, bytes) = s.tally();
            out.allowed += t.allowed;
            out.denied += t.denied;
            out.near_limit += t.near_limit;
            out.active_keys += s.len() as u64;
            out.memory_bytes += bytes as u64;
        });
        out.clock_steps_back = self.clock_steps_back();
        out.cluster_offset_ms = self.cluster_offset_ms();
        out.clock_beyond_tolerance = self.inner.cluster.clock_beyond.load(Ordering::Relaxed);
        out
    }

    /// Number of keys currently tracked (memory is proportional to it).
    pub fn active_keys(&self) -> usize {
        self.inner.store.len()
    }

    /// Reclaims every key that can no longer influence a decision, one shard lock at a
    /// time, and returns how many were dropped. Optional: the store also reclaims as it
    /// grows; a service may call this from a background task to return memory sooner.
    pub fn sweep(&self) -> usize {
        let now = self.cluster_now_ms();
        let mut n = self.inner.store.sweep(now);
        for (_, s) in self.inner.ad_hoc.read().iter() {
            n += s.sweep(now);
        }
        n
    }

    /// The limiter's clock reading (Unix ms).
    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    /// The admission policy used as a cluster member.
    pub fn admission(&self) -> Admission {
        self.inner.admission
    }

    pub(crate) fn cluster(&self) -> &ClusterState {
        &self.inner.cluster
    }

    /// The 64-bit key the store and the wire use for `client` (a keyed hash; see
    /// `docs/design.md`). Simulators and tests use it to match states to clients.
    pub fn key_hash(&self, client: &str) -> u64 {
        self.inner.hasher.hash(client.as_bytes())
    }

    /// The window length of the main store, in ms.
    fn main_window_ms(&self) -> u64 {
        self.inner.main_window_ms.load(Ordering::Relaxed)
    }

    /// Calls `f` with every store: the main one, then one per `allow_with` window length.
    pub(crate) fn for_each_store(&self, mut f: impl FnMut(u64, &Store)) {
        let main = self.main_window_ms();
        f(main, &self.inner.store);
        // A store made for a window the main store has since taken on is skipped: it no
        // longer decides anything, and its window length must name one store only.
        for (w, s) in self.inner.ad_hoc.read().iter().filter(|(w, _)| *w != main) {
            f(*w, s);
        }
    }

    /// Calls `f` with the store for `window_ms` if there is one; never creates one.
    pub(crate) fn with_existing_store<T>(&self, window_ms: u64, f: impl FnOnce(&Store) -> T) -> Option<T> {
        let store = self.existing_store(window_ms)?;
        Some(f(&store))
    }

    /// The store for `window_ms`, if there is one: the main store if it has that window.
    fn existing_store(&self, window_ms: u64) -> Option<Arc<Store>> {
        if self.main_window_ms() == window_ms {
            return Some(self.inner.store.clone());
        }
        self.inner.ad_hoc.read().iter().find(|(w, _)| *w == window_ms).map(|(_, s)| s.clone())
    }
}

/// Configures a [`RateLimiter`]. Every setting has a documented default and range.
#[derive(Clone)]
pub struct Builder {
    quota: Option<Quota>,
    strategy: Strategy,
    clock: Arc<dyn Clock>,
    max_key_len: usize,
    max_timestamp_age: Duration,
    max_clock_skew: Duration,
    max_keys: usize,
    shards: Option<usize>,
    hash_secret: Option<[u8; 16]>,
    table_seed: Option<u64>,
    admission: Admission,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder").field("quota", &self.quota).field("strategy", &self.strategy).finish_non_exhaustive()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            quota: None,
            strategy: Strategy::default(),
            clock: Arc::new(SystemClock),
            max_key_len: DEFAULT_MAX_KEY_LEN,
            max_timestamp_age: DEFAULT_MAX_TIMESTAMP_AGE,
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            max_keys: DEFAULT_MAX_KEYS,
            shards: None,
            hash_secret: None,
            table_seed: None,
            admission: Admission::default(),
        }
    }
}

impl Builder {
    /// The quota (required).
    pub fn quota(mut self, quota: Quota) -> Self {
        self.quota = Some(quota);
        self
    }

    /// The strategy. Default: [`Strategy::SlidingWindow`].
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// The clock used to validate timestamps and reclaim windows. Default: [`SystemClock`].
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Longest accepted client id in bytes. Default 256; range `1..=65536`.
    pub fn max_key_len(mut self, bytes: usize) -> Self {
        self.max_key_len = bytes;
        self
    }

    /// Replay tolerance: a timestamp further behind the clock is refused with
    /// [`Error::TimestampTooOld`]. Default 5 s; at most 1 day. Idle keys are kept until
    /// no timestamp this late can reach their windows.
    pub fn max_timestamp_age(mut self, age: Duration) -> Self {
        self.max_timestamp_age = age;
        self
    }

    /// Clock-skew tolerance: a timestamp further ahead of the clock is refused with
    /// [`Error::TimestampInFuture`]. Default 2 s; at most 1 day.
    pub fn max_clock_skew(mut self, skew: Duration) -> Self {
        self.max_clock_skew = skew;
        self
    }

    /// Cap on keys first counted locally; a new key past it gets [`Error::KeyCapacity`].
    /// Keys first counted by peers have a budget as large of their own, and their replicas'
    /// counts one of 8 cells per key of the cap (`docs/design.md`, "Memory model"). Default
    /// 4,194,304 (about 200 MiB of local keys; 2.87 GiB at most under any peer input); at
    /// least 1.
    pub fn max_keys(mut self, keys: usize) -> Self {
        self.max_keys = keys;
        self
    }

    /// Number of store shards: a power of two in `1..=4096`. Default: four per CPU,
    /// rounded up to a power of two, between 16 and 256.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// The 128-bit secret client ids are hashed with. Every member of a cluster must
    /// use the same one. Default: random per process, which is right for a limiter on
    /// its own; a cluster member must be given one: without it
    /// [`Cluster::start`](crate::Cluster::start) refuses to start
    /// ([`ClusterError::MissingHashSecret`](crate::ClusterError::MissingHashSecret)),
    /// because members with secrets of their own would each admit the full limit.
    /// Keep it secret: whoever knows it can choose client ids that collide in the store.
    pub fn hash_secret(mut self, secret: [u8; 16]) -> Self {
        self.hash_secret = Some(secret);
        self
    }

    /// Where keys start probing in the store's tables. Default: drawn per process, so
    /// that no peer can line keys up in one table's probe sequences. The layout changes
    /// no decision, but a full sync or repair is sent in steps cut in table order: give a
    /// seed (a simulator does, from its own) for runs that repeat byte for byte.
    pub fn table_seed(mut self, seed: u64) -> Self {
        self.table_seed = Some(seed);
        self
    }

    /// The admission policy as a cluster member. Default: [`Admission::Bounded`].
    pub fn admission(mut self, admission: Admission) -> Self {
        self.admission = admission;
        self
    }

    /// Builds the limiter.
    ///
    /// # Errors
    /// [`ConfigError::MissingQuota`] without a quota; [`ConfigError::Invalid`] for a
    /// setting out of range.
    pub fn build(self) -> Result<RateLimiter, ConfigError> {
        let quota = self.quota.ok_or(ConfigError::MissingQuota)?;
        if !(1..=MAX_KEY_LEN_LIMIT).contains(&self.max_key_len) {
            return Err(ConfigError::Invalid { field: "max_key_len", reason: "must be between 1 and 65536 bytes" });
        }
        let day = Duration::from_secs(86_400);
        if self.max_timestamp_age > day {
            return Err(ConfigError::Invalid { field: "max_timestamp_age", reason: "must be at most one day" });
        }
        if self.max_clock_skew > day {
            return Err(ConfigError::Invalid { field: "max_clock_skew", reason: "must be at most one day" });
        }
        if self.max_keys == 0 {
            return Err(ConfigError::Invalid { field: "max_keys", reason: "must be at least 1" });
        }
        let shards = match self.shards {
            Some(s) if !(1..=4096).contains(&s) || !s.is_power_of_two() => {
                return Err(ConfigError::Invalid { field: "shards", reason: "must be a power of two between 1 and 4096" });
            }
            Some(s) => s,
            None => {
                let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
                (cpus * 4).next_power_of_two().clamp(16, 256)
            }
        };
        let secret_chosen = self.hash_secret.is_some();
        let secret = self.hash_secret.unwrap_or_else(KeyHasher::random_secret);
        let cap = KeyCap::new(self.max_keys);
        let tolerances =
            Tolerances { max_age_ms: self.max_timestamp_age.as_millis() as u64, max_skew_ms: self.max_clock_skew.as_millis() as u64 };
        // Where keys start probing in the store's tables (see `table_seed`).
        let probe_seed =
            self.table_seed.unwrap_or_else(|| u64::from_le_bytes(KeyHasher::random_secret()[..8].try_into().unwrap_or([0; 8])));
        Ok(RateLimiter {
            inner: Arc::new(Inner {
                store: Arc::new(Store::new(shards, cap.clone(), tolerances, probe_seed, quota, self.strategy)),
                main_window_ms: AtomicU64::new(quota.window_ms()),
                quota: QuotaCell::new(quota),
                secret_chosen,
                cap,
                tolerances,
                probe_seed,
                cluster: ClusterState {
                    attached: AtomicBool::new(false),
                    bounded: AtomicBool::new(false),
                    round_ms: AtomicU64::new(1),
                    lag_ms: AtomicU64::new(0),
                    live_replicas: AtomicU64::new(1),
                    live_index: AtomicU64::new(0),
                    node: AtomicU64::new(0),
                    offset_ms: AtomicI64::new(0),
                    clock_beyond: AtomicBool::new(false),
                },
                newest_ms: AtomicI64::new(i64::MIN),
                steps_back: AtomicU64::new(0),
                limits: RwLock::new(LimitsState::default()),
                overrides: RwLock::new(Arc::new(Overrides::new())),
                has_overrides: AtomicBool::new(false),
                overrides_version: AtomicU64::new(0),
                id: {
                    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
                    NEXT_ID.fetch_add(1, Ordering::Relaxed)
                },
                admission: self.admission,
                hasher: KeyHasher::new(secret),
                clock: self.clock,
                strategy: self.strategy,
                max_key_len: self.max_key_len,

                shards,
                ad_hoc: RwLock::new(Arc::new(AdHocStores::new())),
                ad_hoc_version: AtomicU64::new(0),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_quota_follows_every_change_and_is_never_read_torn() {
        let a = Quota::new(100, Duration::from_secs(10)).unwrap();
        let b = Quota::new(5, Duration::from_secs(60)).unwrap().with_burst(2).unwrap();
        let cell = Arc::new(QuotaCell::new(a));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (cell, stop) = (cell.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Relaxed) || reads == 0 {
                        let q = cell.load();
                        assert!(q == a || q == b, "torn read: {q:?}");
                        reads += 1;
                    }
                })
            })
            .collect();
        for i in 0..20_000 {
            cell.store(if i % 2 == 0 { b } else { a });
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }

        let clock = crate::ManualClock::new(1_700_000_000_000);
        let rl = RateLimiter::builder().quota(a).clock(clock).build().unwrap();
        assert_eq!(rl.quota(), a);
        rl.set_quota(b);
        assert_eq!(rl.quota(), b);
        let d = rl.check_now("client").unwrap();
        assert_eq!((d.quota, d.limit), (b, 5));
        assert_eq!((0..10).filter(|_| rl.allow_now("client")).count(), 4, "5 per window, one spent by check_now");
    }

    #[test]
    fn overrides_read_through_the_thread_cache_follow_every_change_and_every_limiter() {
        let default = Quota::new(100, Duration::from_secs(10)).unwrap();
        let clock = crate::ManualClock::new(1_700_000_000_000);
        let build = || RateLimiter::builder().quota(default).clock(clock.clone()).build().unwrap();
        let (one, two) = (build(), build());
        let with = |rl: &RateLimiter, limit| {
            let mut cfg = LimitsConfig::new(default);
            let spec = crate::limits::ClientOverride { tier: None, limit: Some(limit), window_ms: Some(10_000), burst: None };
            cfg.clients.insert("vip".into(), spec);
            rl.apply_limits(cfg).unwrap();
        };
        let limit_of = |rl: &RateLimiter| rl.check_now("vip").unwrap().quota.limit();
        with(&one, 5);
        with(&two, 7);
        // The same thread alternates between two limiters: each sees its own map.
        for _ in 0..3 {
            assert_eq!((limit_of(&one), limit_of(&two)), (5, 7));
        }
        // A change is seen at once by a thread that cached the previous map.
        with(&one, 9);
        assert_eq!(limit_of(&one), 9);
        one.apply_limits(LimitsConfig::new(default)).unwrap();
        assert_eq!(limit_of(&one), 100, "override removed");
        assert_eq!(limit_of(&two), 7);

        // Overrides with windows of their own: each limiter's stores, through the cache.
        for (rl, window_ms) in [(&one, 60_000), (&two, 30_000), (&one, 20_000)] {
            let mut cfg = LimitsConfig::new(default);
            let spec = crate::limits::ClientOverride { tier: None, limit: Some(2), window_ms: Some(window_ms), burst: None };
            cfg.clients.insert("own-window".into(), spec);
            rl.apply_limits(cfg).unwrap();
            let decisions: Vec<Decision> = (0..3).map(|_| rl.check_now("own-window").unwrap()).collect();
            assert_eq!(decisions.iter().map(|d| d.allowed).collect::<Vec<_>>(), [true, true, false], "{window_ms}");
            assert!(decisions.iter().all(|d| d.quota.window_ms() == window_ms));
        }
        assert_eq!((one.inner.ad_hoc.read().len(), two.inner.ad_hoc.read().len()), (2, 1));
    }
}
