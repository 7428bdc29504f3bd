//! Where the limiter's notion of "now" comes from.
//!
//! Only the outer [`RateLimiter`](crate::RateLimiter) reads a [`Clock`], and only to
//! validate request timestamps and to reclaim expired windows; the decision itself is a
//! pure function of the counts and the request's timestamp. Tests use [`ManualClock`].

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// A source of wall-clock time in Unix milliseconds.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The operating system's real-time clock.
///
/// On Linux it reads `CLOCK_REALTIME_COARSE` (a few nanoseconds, resolution of one
/// scheduler tick, 1–4 ms), which is ample for timestamp tolerances measured in seconds;
/// elsewhere it reads [`std::time::SystemTime`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[inline]
    fn now_ms(&self) -> i64 {
        #[cfg(target_os = "linux")]
        {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: `ts` is a valid, writable timespec; CLOCK_REALTIME_COARSE exists on
            // every Linux since 2.6.32.
            let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
            #[allow(clippy::useless_conversion)] // time_t and c_long are i32 on 32-bit targets
            if rc == 0 {
                return i64::from(ts.tv_sec).saturating_mul(1000) + i64::from(ts.tv_nsec) / 1_000_000;
            }
        }
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        }
    }
}

/// A clock that moves only when told to. Clones share the same time.
///
/// ```
/// use crdt_rate_limiter::{Clock, ManualClock};
/// let clock = ManualClock::new(1_000);
/// let view = clock.clone();
/// clock.advance_ms(500);
/// assert_eq!(view.now_ms(), 1_500);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A clock reading `now_ms`.
    pub fn new(now_ms: i64) -> Self {
        Self(Arc::new(AtomicI64::new(now_ms)))
    }

    /// Sets the time.
    pub fn set_ms(&self, now_ms: i64) {
        self.0.store(now_ms, Ordering::Relaxed);
    }

    /// Moves the time forward (or back, for a negative `delta_ms`).
    pub fn advance_ms(&self, delta_ms: i64) {
        self.0.fetch_add(delta_ms, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now_ms(&self) -> i64 {
        (**self).now_ms()
    }
}
