//! Quotas and the strategies that apply them.

use std::time::Duration;

use crate::ConfigError;

/// How many requests a client may make per window.
///
/// A `Quota` is valid by construction: the limit is at least 1 and at most
/// [`Quota::MAX_LIMIT`]; the window is a whole number of milliseconds between 1 ms and
/// [`Quota::MAX_WINDOW`].
///
/// ```
/// use crdt_rate_limiter::Quota;
/// use std::time::Duration;
/// let q = Quota::new(100, Duration::from_secs(60)).unwrap();
/// assert_eq!(q.limit(), 100);
/// assert_eq!(q.burst(), 100); // the token bucket's capacity defaults to the limit
/// assert!(Quota::new(0, Duration::from_secs(1)).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    limit: u32,
    burst: u32,
    window_ms: u32,
}

impl Quota {
    /// The largest limit: counters are 32-bit per node and window.
    pub const MAX_LIMIT: u64 = u32::MAX as u64;
    /// The longest window: 2³² − 1 ms, about 49.7 days.
    pub const MAX_WINDOW: Duration = Duration::from_millis(u32::MAX as u64);

    /// `limit` requests per `window`.
    ///
    /// # Errors
    /// [`ConfigError::ZeroLimit`], [`ConfigError::LimitTooLarge`], [`ConfigError::ZeroWindow`] or
    /// [`ConfigError::InvalidWindow`] when a value is outside the documented range.
    pub fn new(limit: u64, window: Duration) -> Result<Self, ConfigError> {
        let limit = check_limit(limit)?;
        if window < Duration::from_millis(1) {
            return Err(ConfigError::ZeroWindow);
        }
        if window > Self::MAX_WINDOW || window.subsec_nanos() % 1_000_000 != 0 {
            return Err(ConfigError::InvalidWindow { window, max: Self::MAX_WINDOW });
        }
        Ok(Self { limit, burst: limit, window_ms: window.as_millis() as u32 })
    }

    /// Sets the token bucket's capacity (its largest burst), between 1 and the limit.
    /// The default is the limit. Only [`Strategy::TokenBucket`] reads it.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for a burst of 0 or above the limit.
    pub fn with_burst(mut self, burst: u64) -> Result<Self, ConfigError> {
        if burst == 0 || burst > u64::from(self.limit) {
            return Err(ConfigError::Invalid { field: "burst", reason: "must be between 1 and the limit" });
        }
        self.burst = burst as u32;
        Ok(self)
    }

    /// Requests allowed per window.
    pub fn limit(&self) -> u64 {
        u64::from(self.limit)
    }

    /// The token bucket's capacity.
    pub fn burst(&self) -> u64 {
        u64::from(self.burst)
    }

    /// The window.
    pub fn window(&self) -> Duration {
        Duration::from_millis(u64::from(self.window_ms))
    }

    /// The window in milliseconds (always at least 1).
    pub fn window_ms(&self) -> u64 {
        u64::from(self.window_ms)
    }

    /// Limit, burst and window in ms, for storage in atomics.
    pub(crate) fn parts(&self) -> (u32, u32, u32) {
        (self.limit, self.burst, self.window_ms)
    }

    /// The inverse of [`parts`](Self::parts), for values that came from a valid quota.
    pub(crate) fn from_parts((limit, burst, window_ms): (u32, u32, u32)) -> Self {
        Self { limit, burst, window_ms }
    }
}

fn check_limit(limit: u64) -> Result<u32, ConfigError> {
    match limit {
        0 => Err(ConfigError::ZeroLimit),
        l if l > Quota::MAX_LIMIT => Err(ConfigError::LimitTooLarge { limit, max: Quota::MAX_LIMIT }),
        l => Ok(l as u32),
    }
}

/// How the per-window counts become a decision.
///
/// The first three read the same state, a count per (client, window) for the current and
/// the previous window, so all three run unchanged on the replicated counters. `W` is the
/// window, `L` the limit, `c` the current window's count, `p` the previous window's
/// count and `e` the time elapsed in the current window. [`SlidingLog`](Self::SlidingLog)
/// counts in [`Strategy::LOG_BUCKETS`] sub-windows of `W` instead. `docs/design.md` has a
/// table of all four: promise, memory per key, boundaries, replication, and which one to
/// pick for a leaky bucket, a GCRA or a sliding log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// Admit while `c < L`.
    ///
    /// Guarantees exactly `L` admissions per aligned window (`floor(t / W)`), from any
    /// number of threads. Allows up to `2L` in a span of length `W` that straddles a
    /// boundary.
    FixedWindow,
    /// The two-window weighted estimate: admit while `p·(W − e)/W + c + 1 ≤ L`.
    ///
    /// Never admits more than `L` per aligned window; smooths the boundary burst of the
    /// fixed window, under the assumption that the previous window's requests were spread
    /// evenly. This is the default.
    #[default]
    SlidingWindow,
    /// A token bucket with capacity [`Quota::burst`] refilled at `L` per `W`.
    ///
    /// Estimated conservatively from the window counts: the bucket's level at the start
    /// of the window is taken as `min(B, max(0, L − p))` (the lowest level consistent
    /// with `p` admissions last window), it refills at `L/W`, and every admission of the
    /// current window is charged as if it happened now. So it admits at most `B` per
    /// window, at most one window's refill `L` per window under sustained load, and a
    /// burst of up to `B` right after an idle window. `B` is at most `L`.
    ///
    /// A leaky bucket used as a meter is this bucket (see [`Strategy::LeakyBucket`]).
    TokenBucket,
    /// At most `L` admissions in **any** span of length `W`, not only per aligned window.
    ///
    /// `W` is split into `k` = [`Strategy::LOG_BUCKETS`] buckets of `b = ⌈W/k⌉` ms (the
    /// last one of a window may be shorter); each bucket is a grow-only count per replica,
    /// and on the wire a bucket travels as a window of length `b`. A request at `t` is
    /// admitted only if the buckets overlapping `(t − W, t]` — the current one and the
    /// `n = ⌈(W − 1)/b⌉ ≤ k` before it — hold fewer than `L`. Whole buckets are counted,
    /// so the oldest one is counted in full although only part of it overlaps the span:
    /// the error is on the strict side only, at most the admissions of one bucket (about
    /// `L/k` under even load), and an admission is never later than one bucket (`b`) after
    /// the exact log's. Memory per key: `n + 1 ≤ k + 1` buckets, the two newest in the
    /// key's slot as the two windows of the other strategies, the older ones (while one of
    /// them is not empty) in a side map at 48 bytes per bucket, plus 16 bytes per (remote
    /// replica, bucket) that counted. `k` is fixed; `docs/design.md` weighs it.
    SlidingLog,
}

impl Strategy {
    /// A leaky bucket used as a meter (requests leak out at `L` per `W`, at most `B`
    /// queued) admits exactly what a token bucket of capacity `B` refilled at `L` per `W`
    /// admits: it is [`Strategy::TokenBucket`] under its other name.
    ///
    /// ```
    /// use crdt_rate_limiter::Strategy;
    /// assert_eq!(Strategy::LeakyBucket, Strategy::TokenBucket);
    /// ```
    #[allow(non_upper_case_globals)]
    pub const LeakyBucket: Self = Self::TokenBucket;
    /// Buckets per window of [`Strategy::SlidingLog`] (`k`).
    pub const LOG_BUCKETS: u64 = 10;
}
