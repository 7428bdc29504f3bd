//! The simulator's pending events, in time order: a calendar of one-millisecond buckets.
//!
//! A run of hundreds of nodes keeps tens of thousands of messages in flight, each due
//! within a few milliseconds. A binary heap of them outgrows the L2 cache, and every pop
//! then walks a dozen cold levels. Here the next [`BUCKETS`] milliseconds are buckets
//! filled in any order and sorted once each, when the clock reaches them; what is due
//! later waits in a heap and moves into its bucket as that comes within reach. An event
//! due in the bucket being served (a message with no latency, a timer due now) goes to
//! a small heap beside it. Pops come in exactly the order of one heap over everything,
//! by time and then by scheduling order: the simulation's output does not change.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// Buckets ahead of the one being served, one millisecond each: more than messages'
/// latencies (reordering included) and a gossip round, so that the heap for later
/// events holds few.
const BUCKETS: usize = 64;
const BUCKET_US: i64 = 1_000;

/// An event and when it is due; `seq` orders events due at the same microsecond.
pub(crate) struct Scheduled<E> {
    pub at_us: i64,
    pub seq: u64,
    pub event: E,
}

impl<E> Scheduled<E> {
    fn key(&self) -> (i64, u64) {
        (self.at_us, self.seq)
    }
}

impl<E> PartialEq for Scheduled<E> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl<E> Eq for Scheduled<E> {}
impl<E> PartialOrd for Scheduled<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Scheduled<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

/// Events by (time, sequence), earliest first. Times never go below the bucket being
/// served: the engine schedules nothing in the past.
pub(crate) struct Calendar<E> {
    /// The bucket being served (time / [`BUCKET_US`]).
    now: i64,
    /// Its events, sorted latest first (popped from the end).
    current: Vec<Scheduled<E>>,
    /// Events scheduled into it after it was sorted.
    spill: BinaryHeap<Reverse<Scheduled<E>>>,
    /// Bucket `b` for `now < b <= now + BUCKETS`, at `b % BUCKETS`, unsorted.
    ahead: Vec<Vec<Scheduled<E>>>,
    /// Events in `ahead`.
    ahead_len: usize,
    /// Events due after `now + BUCKETS`.
    later: BinaryHeap<Reverse<Scheduled<E>>>,
}

/// The bucket holding `at_us`.
fn bucket_of(at_us: i64) -> i64 {
    at_us.div_euclid(BUCKET_US)
}

impl<E> Calendar<E> {
    /// An empty calendar whose first bucket holds `start_us`.
    pub(crate) fn new(start_us: i64) -> Self {
        Calendar {
            now: bucket_of(start_us),
            current: Vec::new(),
            spill: BinaryHeap::new(),
            ahead: (0..BUCKETS).map(|_| Vec::new()).collect(),
            ahead_len: 0,
            later: BinaryHeap::new(),
        }
    }

    /// Schedules `s`, due at or after the bucket being served.
    pub(crate) fn push(&mut self, s: Scheduled<E>) {
        let b = bucket_of(s.at_us);
        debug_assert!(b >= self.now, "an event scheduled in a bucket already served");
        if b <= self.now {
            self.spill.push(Reverse(s));
        } else if b <= self.now + BUCKETS as i64 {
            self.put_ahead(b, s);
        } else {
            self.later.push(Reverse(s));
        }
    }

    /// Puts `s` in bucket `b`, one of the `BUCKETS` after the one being served.
    fn put_ahead(&mut self, b: i64, s: Scheduled<E>) {
        self.ahead[Self::place(b)].push(s);
        self.ahead_len += 1;
    }

    /// Where bucket `b` is in `ahead`.
    fn place(b: i64) -> usize {
        b.rem_euclid(BUCKETS as i64) as usize
    }

    /// The earliest event, by time then sequence, if it is due before `until_us`. The
    /// calendar moves on no further than the bucket before `until_us`, so that events
    /// can still be scheduled from there.
    pub(crate) fn pop_before(&mut self, until_us: i64) -> Option<Scheduled<E>> {
        loop {
            let from_spill = match (self.current.last(), self.spill.peek()) {
                (Some(c), Some(Reverse(s))) => s < c,
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (None, None) => {
                    if !self.advance(bucket_of(until_us - 1)) {
                        return None;
                    }
                    continue;
                }
            };
            let first = if from_spill { self.spill.peek().map(|Reverse(s)| s) } else { self.current.last() };
            if first.is_none_or(|s| s.at_us >= until_us) {
                return None;
            }
            return if from_spill { self.spill.pop().map(|Reverse(s)| s) } else { self.current.pop() };
        }
    }

    /// Whether no event is scheduled.
    pub(crate) fn is_empty(&self) -> bool {
        self.current.is_empty() && self.spill.is_empty() && self.ahead_len == 0 && self.later.is_empty()
    }

    /// Moves on to the next bucket that holds events, if any does up to bucket `last`.
    fn advance(&mut self, last: i64) -> bool {
        let next = if self.ahead_len > 0 {
            self.now + 1
        } else if let Some(Reverse(s)) = self.later.peek() {
            bucket_of(s.at_us)
        } else {
            return false;
        };
        if next > last {
            return false;
        }
        self.now = next;
        // The bucket is taken before the heap's events move in: the one `BUCKETS` ahead
        // shares its place. It keeps its capacity for its next turn.
        let slot = &mut self.ahead[Self::place(self.now)];
        self.ahead_len -= slot.len();
        self.current.append(slot);
        while let Some(Reverse(s)) = self.later.peek() {
            let b = bucket_of(s.at_us);
            if b > self.now + BUCKETS as i64 {
                break;
            }
            let Some(Reverse(s)) = self.later.pop() else { break };
            if b == self.now {
                self.current.push(s);
            } else {
                self.put_ahead(b, s);
            }
        }
        self.current.sort_unstable_by(|a, b| b.cmp(a));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Random pushes and pops, the pushes due from now to far ahead (now included, and
    /// beyond the buckets), pop in the order of one heap over everything.
    #[test]
    fn pops_in_the_order_of_one_heap() {
        for seed in 0..50 {
            let mut rng = Rng::new(seed);
            let start_us = 1_000_000_007 + seed as i64 * 337;
            let mut cal = Calendar::new(start_us);
            let mut heap = BinaryHeap::new();
            let (mut now_us, mut seq) = (start_us, 0u64);
            for step in 0..4_000 {
                let pushes = if step < 10 { 5 } else { rng.below(3) };
                for _ in 0..pushes {
                    seq += 1;
                    let delay = match rng.below(10) {
                        0 => 0,
                        1 => rng.below(200_000) as i64,
                        2 => 64_000 + rng.below(2_000) as i64,
                        _ => rng.below(6_000) as i64,
                    };
                    let at_us = now_us + delay;
                    cal.push(Scheduled { at_us, seq, event: seq });
                    heap.push(Reverse((at_us, seq)));
                }
                for _ in 0..rng.below(3) {
                    let (got, want) = (cal.pop_before(i64::MAX), heap.pop());
                    assert_eq!(got.map(|s| (s.at_us, s.event)), want.map(|Reverse(k)| k), "seed {seed}, step {step}");
                    if let Some(Reverse((at, _))) = want {
                        now_us = at;
                    }
                }
            }
            while let Some(Reverse(want)) = heap.pop() {
                let got = cal.pop_before(i64::MAX).map(|s| (s.at_us, s.seq));
                assert_eq!(got, Some(want), "seed {seed}, draining");
            }
            assert!(cal.pop_before(i64::MAX).is_none() && cal.is_empty());
        }
    }
}
