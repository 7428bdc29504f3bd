//! Helpers shared by the integration tests (`mod common;`); each test file uses some.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

#[cfg(feature = "quic")]
use crdt_rate_limiter::transport::{certs, TlsIdentity};
use crdt_rate_limiter::{ManualClock, Quota, RateLimiter, Strategy};

/// A manual clock's start: a multiple of 1000, so a window boundary.
pub const T0: i64 = 1_700_000_000_000;

/// A limiter of `limit` per 1 s with `strategy`, on a manual clock at [`T0`].
pub fn limiter(strategy: Strategy, limit: u64) -> (RateLimiter, ManualClock) {
    let clock = ManualClock::new(T0);
    let rl = RateLimiter::builder()
        .quota(Quota::new(limit, Duration::from_secs(1)).unwrap())
        .strategy(strategy)
        .clock(clock.clone())
        .build()
        .unwrap();
    (rl, clock)
}

/// `threads` threads released together, each offering `per_thread` requests for `key` at
/// `ts`; returns how many were admitted.
pub fn hammer(rl: &RateLimiter, key: &str, ts: i64, threads: usize, per_thread: usize) -> u64 {
    let admitted = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (rl, admitted, barrier, key) = (rl.clone(), admitted.clone(), barrier.clone(), key.to_owned());
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..per_thread {
                    if rl.allow(&key, ts) {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    admitted.load(Ordering::Relaxed)
}

/// A cluster CA made for one test, and the identities it issues.
#[cfg(feature = "quic")]
pub struct Ca {
    pub pem: String,
    pub key: String,
}

#[cfg(feature = "quic")]
impl Ca {
    pub fn new() -> Self {
        let (pem, key) = certs::generate_ca().unwrap();
        Ca { pem, key }
    }

    pub fn identity(&self, name: &str) -> TlsIdentity {
        let (cert, key) = certs::issue(&self.pem, &self.key, name).unwrap();
        TlsIdentity::from_pem(self.pem.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
    }
}
