//! The grow-only counter (G-Counter) kept per (client, window).

use serde::{Deserialize, Serialize};

/// Identity of one contributor to the counters: a node and its incarnation.
///
/// A node that restarts and has forgotten its counts must take a new incarnation: a
/// slot's count only grows, and a merge takes the maximum, so reusing a slot with a
/// forgotten (lower) count would silently swallow its new increments until they passed
/// the old value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaId {
    /// The node's stable id.
    pub node: u64,
    /// Incremented every time the node starts without its previous counts.
    pub incarnation: u64,
}

impl ReplicaId {
    /// The replica of a limiter that runs on its own.
    pub const LOCAL: Self = Self { node: 0, incarnation: 0 };
}

/// A grow-only counter: one count per contributing slot; merge takes the slot-wise
/// maximum; the value is the sum of the slots.
///
/// Slots are kept sorted in a vector: a counter has one slot per node that counted in
/// its window, a handful in practice, so a linear scan beats a tree.
///
/// ```
/// use crdt_rate_limiter::counter::GCounter;
/// let mut a = GCounter::new();
/// a.increment('a', 3);
/// let mut b = GCounter::new();
/// b.increment('b', 2);
/// b.increment('a', 1);
/// a.merge(&b);
/// assert_eq!(a.value(), 5); // max(3, 1) + 2
/// assert_eq!(a.iter().collect::<Vec<_>>(), vec![('a', 3), ('b', 2)]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GCounter<K: Ord + Copy> {
    slots: Vec<(K, u64)>,
}

impl<K: Ord + Copy> Default for GCounter<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Ord + Copy> GCounter<K> {
    /// An empty counter (value 0).
    pub const fn new() -> Self {
        Self { slots: Vec::new() }
    }

    /// Adds `by` to `slot`'s count (saturating at `u64::MAX`).
    pub fn increment(&mut self, slot: K, by: u64) {
        if by == 0 {
            return;
        }
        match self.slots.binary_search_by(|(k, _)| k.cmp(&slot)) {
            Ok(i) => self.slots[i].1 = self.slots[i].1.saturating_add(by),
            Err(i) => self.slots.insert(i, (slot, by)),
        }
    }

    /// Raises `slot` to `count` if that is higher; returns whether anything changed.
    pub fn merge_slot(&mut self, slot: K, count: u64) -> bool {
        match self.slots.binary_search_by(|(k, _)| k.cmp(&slot)) {
            Ok(i) if self.slots[i].1 < count => {
                self.slots[i].1 = count;
                true
            }
            Ok(_) => false,
            Err(_) if count == 0 => false,
            Err(i) => {
                self.slots.insert(i, (slot, count));
                true
            }
        }
    }

    /// Slot-wise maximum with `other`. Commutative, associative and idempotent.
    pub fn merge(&mut self, other: &Self) {
        for &(slot, count) in &other.slots {
            self.merge_slot(slot, count);
        }
    }

    /// The count of one slot (0 if it never counted).
    pub fn get(&self, slot: K) -> u64 {
        self.slots.binary_search_by(|(k, _)| k.cmp(&slot)).map_or(0, |i| self.slots[i].1)
    }

    /// The sum of all slots (saturating).
    pub fn value(&self) -> u64 {
        self.slots.iter().fold(0u64, |acc, &(_, c)| acc.saturating_add(c))
    }

    /// The slots with a non-zero count, in slot order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (K, u64)> + '_ {
        self.slots.iter().copied()
    }

    /// Number of slots with a non-zero count.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no slot has counted.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}
