//! The decision as a pure function of the window counts and the time.
//!
//! Nothing here reads a clock or touches shared state; the store calls [`evaluate`]
//! under a shard lock with the counts of one key. Arithmetic is exact integer math in
//! milliseconds: limits and counts are below 2³² and windows below 2³² ms, so products
//! fit in `u64` and sums of two products in `u128`.

use crate::{Quota, Strategy};

/// What a strategy concludes for one request of cost 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub allowed: bool,
    /// The limit the decision was made against.
    pub limit: u64,
    /// Requests still admissible right after this decision, with no other traffic.
    pub remaining: u64,
    /// Time until the full quota is available again, with no further traffic.
    pub reset_after_ms: u64,
    /// When denied: the earliest time from now at which a request would be admitted,
    /// with no other traffic.
    pub retry_after_ms: Option<u64>,
}

/// Counts of one key as seen by this node: the current window and the one before.
///
/// For [`Strategy::SlidingLog`] the windows are the log's buckets (see [`log_tick`]) and
/// `prev` sums every bucket before the current one that the decision reads. (Two fields,
/// so that the request path passes them in registers.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Counts {
    pub cur: u64,
    pub prev: u64,
}

/// The sliding log's bucket length `b = ⌈W/k⌉` and how many buckets before the current
/// one overlap a span of `W` ending in it, `n = ⌈(W − 1)/b⌉ ≤ k`.
#[inline]
pub(crate) fn log_tick(window_ms: u64) -> (u64, u64) {
    let b = window_ms.div_ceil(Strategy::LOG_BUCKETS).max(1);
    (b, window_ms.saturating_sub(1).div_ceil(b))
}

/// The length of the windows the store keeps for `strategy` under a quota of `window_ms`,
/// and how many windows before the current one it must keep.
#[inline]
pub(crate) fn tick(strategy: Strategy, window_ms: u64) -> (u64, u64) {
    match strategy {
        Strategy::SlidingLog => log_tick(window_ms),
        _ => (window_ms, 1),
    }
}

/// Decides one request at `elapsed_ms` (`0..W`) into the current window.
#[inline]
pub(crate) fn evaluate(strategy: Strategy, quota: &Quota, counts: Counts, elapsed_ms: u64) -> Verdict {
    let w = quota.window_ms();
    let e = elapsed_ms.min(w - 1);
    match strategy {
        Strategy::FixedWindow => fixed(quota.limit(), w, counts, e),
        Strategy::SlidingWindow => sliding(quota.limit(), w, counts, e),
        Strategy::TokenBucket => token(quota.limit(), quota.burst(), w, counts, e),
        Strategy::SlidingLog => {
            // Without the detail of the buckets before the current one, take them all as
            // the oldest: it leaves first, so the waits below are never later than the
            // exact ones.
            let (b, n) = log_tick(w);
            let e = elapsed_ms.min(b - 1);
            log(quota.limit(), b, n, |age| lumped(counts, n, age), e)
        }
    }
}

/// The bucket at `age` (0: the current one) when only `counts` are known.
#[inline]
fn lumped(c: Counts, n: u64, age: u64) -> u64 {
    match age {
        0 => c.cur,
        a if a == n => c.prev,
        _ => 0,
    }
}

/// The sliding log's verdict with every bucket known: `buckets[a]` is the count of the
/// bucket `a` buckets before the current one (missing ones are 0), `elapsed_ms` is the
/// time into the current bucket.
pub(crate) fn log_verdict(quota: &Quota, buckets: &[u64], elapsed_ms: u64) -> Verdict {
    let (b, n) = log_tick(quota.window_ms());
    let at = |age: u64| usize::try_from(age).ok().and_then(|a| buckets.get(a)).copied().unwrap_or(0);
    log(quota.limit(), b, n, at, elapsed_ms.min(b - 1))
}

/// Admit while the `n + 1` buckets overlapping `(t − W, t]` hold fewer than `L`.
fn log(l: u64, b: u64, n: u64, at: impl Fn(u64) -> u64, e: u64) -> Verdict {
    let total: u64 = (0..=n).map(&at).fold(0, u64::saturating_add);
    let allowed = total < l;
    let remaining = l.saturating_sub(total + u64::from(allowed));
    // Without traffic, the bucket at age `a` leaves the span at the boundary
    // `(b − e) + (n − a)·b` from now.
    let leaves = |a: u64| (b - e) + (n - a) * b;
    let retry_after_ms = (!allowed).then(|| {
        let mut left = total;
        (0..=n)
            .rev()
            .find(|&a| {
                left = left.saturating_sub(at(a));
                left < l
            })
            .map_or(leaves(0), leaves)
    });
    let newest = if allowed { Some(0) } else { (0..=n).find(|&a| at(a) > 0) };
    let reset_after_ms = newest.map_or(0, leaves);
    Verdict { allowed, limit: l, remaining, reset_after_ms, retry_after_ms }
}

/// Whether `strategy` would admit one request (the allow-only fast path of [`evaluate`]).
#[inline]
pub(crate) fn admits(strategy: Strategy, quota: &Quota, counts: Counts, elapsed_ms: u64) -> bool {
    let (l, w) = (quota.limit(), quota.window_ms());
    let e = elapsed_ms.min(w - 1);
    match strategy {
        Strategy::FixedWindow => counts.cur < l,
        Strategy::SlidingWindow => sliding_admits(l, w, counts.cur, counts.prev, e),
        Strategy::TokenBucket => token_capacity_x_w(l, quota.burst(), w, counts.prev, e) >= u128::from(counts.cur + 1) * u128::from(w),
        // A window of 1 ms has no bucket before the current one in its span.
        Strategy::SlidingLog => counts.cur + if w > 1 { counts.prev } else { 0 } < l,
    }
}

fn fixed(l: u64, w: u64, c: Counts, e: u64) -> Verdict {
    let allowed = c.cur < l;
    let used = c.cur + u64::from(allowed);
    Verdict {
        allowed,
        limit: l,
        remaining: l.saturating_sub(used),
        reset_after_ms: if used == 0 { 0 } else { w - e },
        retry_after_ms: (!allowed).then_some(w - e),
    }
}

/// `p·(W − e) + (c + 1)·W ≤ L·W`, i.e. the weighted estimate after admitting stays ≤ L.
#[inline]
fn sliding_admits(l: u64, w: u64, cur: u64, prev: u64, e: u64) -> bool {
    u128::from(prev) * u128::from(w - e) + u128::from(cur + 1) * u128::from(w) <= u128::from(l) * u128::from(w)
}

fn sliding(l: u64, w: u64, c: Counts, e: u64) -> Verdict {
    let allowed = sliding_admits(l, w, c.cur, c.prev, e);
    let cur = c.cur + u64::from(allowed);
    // remaining = floor(L − cur − p·(W−e)/W) = L − cur − ceil(p·(W−e)/W)
    let weighted_prev = (u128::from(c.prev) * u128::from(w - e)).div_ceil(u128::from(w)) as u64;
    let remaining = l.saturating_sub(cur).saturating_sub(weighted_prev);
    let reset_after_ms = if cur > 0 {
        2 * w - e
    } else if c.prev > 0 {
        w - e
    } else {
        0
    };
    let retry_after_ms = (!allowed).then(|| {
        if c.cur < l {
            // Wait until p·(W − e') ≤ (L − c − 1)·W within this window.
            let budget = u128::from(l - c.cur - 1) * u128::from(w);
            let e_ok = w - (budget / u128::from(c.prev.max(1))).min(u128::from(w)) as u64;
            e_ok.max(e + 1) - e
        } else {
            // Next window: c·(W − e'') + W ≤ L·W.
            let budget = u128::from(l - 1) * u128::from(w);
            let e_ok = w - (budget / u128::from(c.cur)).min(u128::from(w)) as u64;
            (w - e) + e_ok
        }
    });
    Verdict { allowed, limit: l, remaining, reset_after_ms, retry_after_ms }
}

/// The bucket's level at the start of the window: the lowest level consistent with `p`
/// admissions in the previous window, capped at the capacity.
#[inline]
fn token_start_level(l: u64, b: u64, prev: u64) -> u64 {
    b.min(l.saturating_sub(prev))
}

/// `min(B, level₀ + L·e/W) · W`, the tokens generated so far (scaled by W to stay exact).
#[inline]
fn token_capacity_x_w(l: u64, b: u64, w: u64, prev: u64, e: u64) -> u128 {
    let level = token_start_level(l, b, prev);
    (u128::from(level) * u128::from(w) + u128::from(l) * u128::from(e)).min(u128::from(b) * u128::from(w))
}

/// The token bucket's wait, from the start of the next window, until the bucket is full
/// again after `cur` admissions in this window: what an admitted request's reset time
/// adds to the rest of its window. Grows with `cur`; never more than the window.
pub(crate) fn token_refill_ms(quota: &Quota, cur: u64) -> u64 {
    let (l, b, w) = quota.parts();
    let (l, b, w) = (u64::from(l), u64::from(b), u64::from(w));
    let level = token_start_level(l, b, cur);
    if level >= b {
        0
    } else {
        let wait = (u128::from(b - level) * u128::from(w)).div_ceil(u128::from(l)) as u64;
        wait.min(w)
    }
}

fn token(l: u64, b: u64, w: u64, c: Counts, e: u64) -> Verdict {
    let w128 = u128::from(w);
    let cap = token_capacity_x_w(l, b, w, c.prev, e);
    let allowed = cap >= u128::from(c.cur + 1) * w128;
    let cur = c.cur + u64::from(allowed);
    let remaining = ((cap / w128) as u64).saturating_sub(cur);
    // Time (from the start of the next window) until the bucket holds `need` tokens.
    let next_window_wait = |need: u64| -> Option<u64> {
        let level = token_start_level(l, b, cur);
        if need > b {
            None
        } else if level >= need {
            Some(0)
        } else {
            let wait = (u128::from(need - level) * w128).div_ceil(u128::from(l)) as u64;
            (wait < w).then_some(wait)
        }
    };
    let retry_after_ms = (!allowed).then(|| {
        let in_this_window = (c.cur < b)
            .then(|| {
                let level = token_start_level(l, b, c.prev);
                let need = u128::from(c.cur + 1 - level.min(c.cur + 1)) * w128;
                (need.div_ceil(u128::from(l)) as u64).max(e + 1)
            })
            .filter(|&e_ok| e_ok < w);
        match in_this_window {
            Some(e_ok) => e_ok - e,
            None => (w - e) + next_window_wait(1).unwrap_or(w),
        }
    });
    let reset_after_ms = if cur == 0 && cap >= u128::from(b) * w128 {
        0
    } else {
        // Full again in the next window, or else at the start of the one after it
        // (its previous window is empty and B ≤ L).
        (w - e) + next_window_wait(b).unwrap_or(w)
    };
    Verdict { allowed, limit: l, remaining, reset_after_ms, retry_after_ms }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn q(l: u64, w_ms: u64) -> Quota {
        Quota::new(l, Duration::from_millis(w_ms)).unwrap()
    }

    /// An admitted request's reset time under the token bucket is the rest of its window
    /// plus `token_refill_ms` of the count with it, which only grows with the count: the
    /// lock-free `check` relies on both.
    #[test]
    fn the_token_buckets_reset_is_the_window_rest_plus_a_refill_that_grows_with_the_count() {
        for (l, b) in [(1, 1), (3, 3), (5, 2), (4, 4), (9, 1), (100, 100), (100, 7)] {
            let quota = q(l, 10).with_burst(b).unwrap();
            for prev in 0..=l {
                for cur in 0..l {
                    for e in 0..10 {
                        let v = evaluate(Strategy::TokenBucket, &quota, Counts { cur, prev }, e);
                        if v.allowed {
                            assert_eq!(v.reset_after_ms, (10 - e) + token_refill_ms(&quota, cur + 1), "l {l} b {b} {cur}/{prev} at {e}");
                        }
                    }
                    assert!(token_refill_ms(&quota, cur) <= token_refill_ms(&quota, cur + 1));
                    assert!(token_refill_ms(&quota, cur) <= 10);
                }
            }
        }
    }

    /// Checks the promise of `retry_after`: denied before it, admitted at it, for every
    /// strategy and a grid of small states. Also checks `admits` agrees with `evaluate`.
    #[test]
    fn retry_after_is_the_earliest_admission_time() {
        for strategy in [Strategy::FixedWindow, Strategy::SlidingWindow, Strategy::TokenBucket] {
            for (l, b) in [(1, 1), (3, 3), (5, 2), (4, 4), (9, 1)] {
                let quota = q(l, 10).with_burst(b).unwrap();
                for prev in 0..12 {
                    for cur in 0..12 {
                        for e in 0..10 {
                            let counts = Counts { cur, prev };
                            let v = evaluate(strategy, &quota, counts, e);
                            assert_eq!(v.allowed, admits(strategy, &quota, counts, e));
                            let Some(retry) = v.retry_after_ms else { continue };
                            assert!(retry >= 1);
                            // Walk time forward with no traffic: same counts in this
                            // window, then (cur -> prev, 0) in the next.
                            let at = |t: u64| {
                                let abs = e + t;
                                if abs < 10 {
                                    admits(strategy, &quota, counts, abs)
                                } else if abs < 20 {
                                    admits(strategy, &quota, Counts { cur: 0, prev: cur }, abs - 10)
                                } else {
                                    admits(strategy, &quota, Counts::default(), (abs - 20).min(9))
                                }
                            };
                            for t in 0..retry {
                                assert!(!at(t), "{strategy:?} l={l} b={b} prev={prev} cur={cur} e={e}: admitted at {t} < retry {retry}");
                            }
                            assert!(at(retry), "{strategy:?} l={l} b={b} prev={prev} cur={cur} e={e}: not admitted at retry {retry}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn remaining_counts_down_to_zero_exactly_when_the_next_request_is_denied() {
        for strategy in [Strategy::FixedWindow, Strategy::SlidingWindow, Strategy::TokenBucket] {
            let quota = q(7, 100);
            for prev in 0..10 {
                for e in [0, 13, 50, 99] {
                    let mut cur = 0;
                    loop {
                        let v = evaluate(strategy, &quota, Counts { cur, prev }, e);
                        if !v.allowed {
                            assert_eq!(v.remaining, 0);
                            break;
                        }
                        cur += 1;
                        let next = admits(strategy, &quota, Counts { cur, prev }, e);
                        assert_eq!(v.remaining > 0, next, "{strategy:?} prev={prev} e={e} cur={cur}");
                    }
                }
            }
        }
    }

    #[test]
    fn sliding_window_weights_the_previous_window_by_its_overlap() {
        let quota = q(10, 1000);
        // Halfway through: 10 previous requests weigh 5, so 5 more fit.
        let c = |cur| Counts { cur, prev: 10 };
        assert!(admits(Strategy::SlidingWindow, &quota, c(4), 500));
        assert!(!admits(Strategy::SlidingWindow, &quota, c(5), 500));
        assert_eq!(evaluate(Strategy::SlidingWindow, &quota, c(4), 500).remaining, 0);
    }

    #[test]
    fn token_bucket_refills_at_the_limit_rate_under_sustained_load() {
        // A window after a saturated one starts empty and refills L/W per ms.
        let quota = q(100, 1000);
        let after_full = |cur, e| admits(Strategy::TokenBucket, &quota, Counts { cur, prev: 100 }, e);
        assert!(!after_full(0, 9));
        assert!(after_full(0, 10));
        assert!(after_full(49, 500));
        assert!(!after_full(50, 500));
        // After an idle window the full burst is there at once.
        assert!(admits(Strategy::TokenBucket, &quota, Counts { cur: 99, ..Counts::default() }, 0));
        assert!(!admits(Strategy::TokenBucket, &quota, Counts { cur: 100, ..Counts::default() }, 999));
    }

    /// `n + 1` bucket counts (newest first) from a small deterministic generator.
    fn buckets(seed: &mut u64, n: u64, max: u64) -> Vec<u64> {
        (0..=n)
            .map(|_| {
                *seed = crate::key::splitmix64(*seed);
                *seed % (max + 1)
            })
            .collect()
    }

    /// The sliding log's `retry_after` promise, and `admits`/`evaluate` agreeing with the
    /// detailed verdict on the sums. Time walks forward with no traffic: each bucket
    /// boundary shifts every count one bucket older, and the oldest leaves.
    #[test]
    fn sliding_log_retry_after_is_the_earliest_admission_time() {
        let mut seed = 7;
        for w in [1, 2, 5, 10, 25, 99, 1000] {
            let (b, n) = log_tick(w);
            for l in [1, 2, 5, 10] {
                let quota = q(l, w);
                for round in 0..300 {
                    let max = if round % 3 == 0 { l } else { l.div_ceil(2) };
                    let bs = buckets(&mut seed, n, max);
                    for e in [0, b / 2, b - 1] {
                        let v = log_verdict(&quota, &bs, e);
                        let counts = Counts { cur: bs[0], prev: bs.iter().skip(1).sum() };
                        assert_eq!(v.allowed, admits(Strategy::SlidingLog, &quota, counts, e), "w={w} {bs:?}");
                        let lumped = evaluate(Strategy::SlidingLog, &quota, counts, e);
                        assert_eq!((lumped.allowed, lumped.remaining), (v.allowed, v.remaining));
                        assert!(lumped.retry_after_ms <= v.retry_after_ms, "a refusal published from the sums ends no later");
                        let shifted = |t: u64| -> Vec<u64> {
                            let shift = ((e + t) / b) as usize;
                            std::iter::repeat_n(0, shift).chain(bs.iter().copied()).take(bs.len()).collect()
                        };
                        let at = |t: u64| log_verdict(&quota, &shifted(t), (e + t) % b).allowed;
                        let Some(retry) = v.retry_after_ms else {
                            assert!(v.allowed);
                            continue;
                        };
                        assert!(retry >= 1);
                        for t in (0..retry).step_by((b as usize / 3).max(1)).chain([retry - 1]) {
                            assert!(!at(t), "w={w} l={l} {bs:?} e={e}: admitted at {t} < retry {retry}");
                        }
                        assert!(at(retry), "w={w} l={l} {bs:?} e={e}: not admitted at retry {retry}");
                        // Full again exactly when the newest count has left.
                        let reset = v.reset_after_ms;
                        assert!(reset >= 1 && shifted(reset).iter().all(|&c| c == 0), "w={w} {bs:?} e={e} reset={reset}");
                        assert!(shifted(reset - 1).iter().any(|&c| c > 0), "w={w} {bs:?} e={e} reset={reset}");
                    }
                }
            }
        }
    }

    #[test]
    fn sliding_log_counts_every_bucket_overlapping_the_span() {
        // 10 per 1 s in buckets of 100 ms: 10 admitted in bucket 9 (t = 900) keep every
        // request out until bucket 20 starts (t = 2000): the span (t − W, t] of any t
        // before it overlaps bucket 9.
        assert_eq!(log_tick(1000), (100, 10));
        assert_eq!(log_tick(1), (1, 0));
        assert_eq!(log_tick(1001), (101, 10));
        let quota = q(10, 1000);
        let mut bs = vec![10];
        let v = log_verdict(&quota, &bs, 0);
        assert_eq!((v.allowed, v.retry_after_ms, v.reset_after_ms), (false, Some(1100), 1100));
        bs.insert(0, 0);
        assert_eq!(log_verdict(&quota, &bs, 50).retry_after_ms, Some(950));
        // A refusal at 1,950 ms (bucket 19, the 10 at age 10) ends at 2,000 ms.
        let mut old = vec![0; 10];
        old.push(10);
        assert_eq!(log_verdict(&quota, &old, 50).retry_after_ms, Some(50));
        // Counts spread over the span leave one bucket at a time.
        let spread = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0];
        assert!(!log_verdict(&quota, &spread, 0).allowed);
        assert_eq!(log_verdict(&quota, &spread, 0).retry_after_ms, Some(200));
    }
}
