//! The store's per-shard hash table: open addressing, linear probing, keys inline.
//!
//! Keys are 64-bit keyed hashes already, so a slot holds the key itself (no tag bytes,
//! no separate control array): a lookup for a key costs one cache miss, not two. Slots
//! are 24 bytes; the table grows at 80 % load to twice its size, so in steady growth it
//! holds between 30 and 60 bytes per key. Keys are never removed one by one: expired
//! keys are dropped by [`Table::rebuild`], which re-inserts the survivors into a table
//! sized for them — so memory shrinks when clients go idle.

/// One key's state. Key 0 marks an empty slot; callers map hash 0 to 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    pub key: u64,
    /// Low 32 bits of the newest window index the key has seen.
    pub window: u32,
    /// The local replica's count in that window.
    pub cur: u32,
    /// The local replica's count in the window before.
    pub prev: u32,
    /// Low 30 bits: index into the shard's side table of remote counts, or `NO_REMOTE`.
    /// Top two bits: the local counts of the current and the previous window changed
    /// since gossip last collected them (`DIRTY_CUR`, `DIRTY_PREV`).
    pub remote_and_dirty: u32,
}

use crate::slots::Slots;

const EMPTY: u64 = 0;
const MIN_CAPACITY: usize = 16;

#[derive(Debug, Default)]
pub(crate) struct Table {
    slots: Slots,
    len: usize,
    /// Scrambles where a key's probe starts. Keys from the request path are uniform
    /// hashes already, but keys from peers arrive as sent: without it, a peer sending
    /// keys that share their low bits would turn probes into long linear scans.
    seed: u64,
    /// Bumped by every rebuild: slot indices of an older generation mean nothing now.
    generation: u64,
    /// The farthest any key of this generation sits from its home slot.
    max_probe: usize,
}

impl Table {
    pub(crate) fn new(seed: u64) -> Self {
        Self { seed: seed | 1, ..Self::default() }
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// Where `key`'s probe starts in a table of `len` slots (a power of two): the high
    /// bits of a multiplicative hash, which every bit of the key influences.
    #[inline]
    fn home(seed: u64, key: u64, len: usize) -> usize {
        let bits = len.trailing_zeros();
        if bits == 0 {
            return 0;
        }
        ((key ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Slots, occupied or not.
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Whether one more key would take the load past 80 %.
    #[inline]
    pub(crate) fn is_full(&self) -> bool {
        (self.len + 1) * 5 > self.slots.len() * 4
    }

    /// The index of `key`'s slot, if present (for [`at`](Self::at)).
    #[inline]
    pub(crate) fn find(&self, key: u64) -> Option<usize> {
        debug_assert_ne!(key, EMPTY);
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = Self::home(self.seed, key, self.slots.len());
        loop {
            let k = self.slots[i].key;
            if k == key {
                return Some(i);
            }
            if k == EMPTY {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// Starts loading the slot where `key`'s probe starts ([`crate::slots::prefetch`]).
    #[inline]
    pub(crate) fn prefetch(&self, key: u64) {
        if !self.slots.is_empty() {
            let i = Self::home(self.seed, key, self.slots.len());
            crate::slots::prefetch(self.slots.as_ptr().wrapping_add(i));
        }
    }

    /// The slot at an index [`find`](Self::find) or [`insert_new_at`](Self::insert_new_at) returned.
    #[inline]
    pub(crate) fn at(&mut self, i: usize) -> &mut Entry {
        &mut self.slots[i]
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut Entry> {
        self.find(key).map(|i| &mut self.slots[i])
    }

    pub(crate) fn get(&self, key: u64) -> Option<&Entry> {
        self.find(key).map(|i| &self.slots[i])
    }

    /// Inserts a key that is not present. The caller has made room ([`is_full`] is false).
    #[cfg(test)]
    pub(crate) fn insert_new(&mut self, slot: Entry) -> &mut Entry {
        let i = self.insert_new_at(slot);
        &mut self.slots[i]
    }

    /// Like [`insert_new`](Self::insert_new), returning the slot's index.
    pub(crate) fn insert_new_at(&mut self, slot: Entry) -> usize {
        debug_assert!(!self.is_full() && slot.key != EMPTY);
        self.len += 1;
        let (i, probe) = Self::place(&mut self.slots, self.seed, slot);
        self.max_probe = self.max_probe.max(probe);
        i
    }

    /// Puts `slot` in the first free slot from its home; returns where, and how far
    /// from home.
    fn place(slots: &mut [Entry], seed: u64, slot: Entry) -> (usize, usize) {
        let mask = slots.len() - 1;
        let home = Self::home(seed, slot.key, slots.len());
        let mut i = home;
        while slots[i].key != EMPTY {
            i = (i + 1) & mask;
        }
        slots[i] = slot;
        (i, i.wrapping_sub(home) & mask)
    }

    /// The farthest any key sits from its home slot (see [`entry`](Self::entry)): a key
    /// in slot `i` has its home in `i - max_probe ..= i` (around the end).
    pub(crate) fn max_probe(&self) -> usize {
        self.max_probe
    }

    /// Whether the key in slot `i` wrapped around the end: its home is after `i`.
    pub(crate) fn wrapped(&self, i: usize) -> bool {
        self.entry(i).is_some_and(|e| Self::home(self.seed, e.key, self.slots.len()) > i)
    }

    /// Bytes held by the slot array.
    pub(crate) fn bytes(&self) -> usize {
        self.slots.len() * std::mem::size_of::<Entry>()
    }

    /// The rebuild count, for cursors over slot indices ([`entry`](Self::entry)).
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The entry in slot `i` (`0..capacity()`), if the slot is occupied.
    pub(crate) fn entry(&self, i: usize) -> Option<&Entry> {
        self.slots.get(i).filter(|s| s.key != EMPTY)
    }

    /// The occupied slots.
    pub(crate) fn slots(&self) -> impl Iterator<Item = &Entry> {
        self.slots.iter().filter(|s| s.key != EMPTY)
    }

    /// Keeps the slots for which `keep` returns true (it may also change them) in a table
    /// sized for them: at most half full (so a full table doubles).
    /// Returns how many slots were dropped.
    pub(crate) fn rebuild(&mut self, mut keep: impl FnMut(&mut Entry) -> bool) -> usize {
        let before = self.len;
        let mut survivors = Vec::with_capacity(self.len);
        for s in self.slots.iter_mut() {
            if s.key != EMPTY && keep(s) {
                survivors.push(*s);
            }
        }
        let capacity = ((survivors.len() + 1) * 2).next_power_of_two().max(MIN_CAPACITY);
        let mut slots = Slots::zeroed(capacity);
        self.max_probe = 0;
        for s in &survivors {
            let (_, probe) = Self::place(&mut slots, self.seed, *s);
            self.max_probe = self.max_probe.max(probe);
        }
        self.len = survivors.len();
        self.slots = slots;
        self.generation += 1;
        before - self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(key: u64) -> Entry {
        Entry { key, window: key as u32, ..Entry::default() }
    }

    #[test]
    fn inserted_keys_are_found_and_absent_ones_are_not() {
        let mut t = Table::default();
        assert!(t.get_mut(5).is_none());
        for k in 1..=1_000u64 {
            if t.is_full() {
                t.rebuild(|_| true);
            }
            // Keys sharing low bits collide on purpose.
            t.insert_new(slot(k << 20 | 3));
        }
        assert_eq!(t.len(), 1_000);
        for k in 1..=1_000u64 {
            assert_eq!(t.get(k << 20 | 3).map(|s| s.window), Some((k << 20 | 3) as u32));
        }
        assert!(t.get(7).is_none());
        assert!(t.len() * 5 <= t.capacity() * 4);
    }

    #[test]
    fn tables_of_several_mib_take_the_mapped_path_and_behave_the_same() {
        let mut t = Table::default();
        for k in 1..=120_000u64 {
            if t.is_full() {
                t.rebuild(|_| true);
            }
            t.insert_new(slot(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        }
        assert!(t.capacity() * std::mem::size_of::<Entry>() >= crate::slots::HUGE_PAGE);
        assert!((1..=120_000u64).all(|k| t.get(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)).is_some()));
        let removed = t.rebuild(|s| s.key % 2 == 0);
        assert_eq!(removed + t.len(), 120_000);
        assert!(t.slots().all(|s| s.key % 2 == 0));
    }

    #[test]
    fn rebuild_drops_what_is_not_kept_and_shrinks() {
        let mut t = Table::default();
        for k in 1..=10_000u64 {
            if t.is_full() {
                t.rebuild(|_| true);
            }
            t.insert_new(slot(k));
        }
        let big = t.capacity();
        assert_eq!(t.rebuild(|s| s.key % 100 == 0), 9_900);
        assert_eq!(t.len(), 100);
        assert!(t.capacity() < big / 10);
        assert!((1..=10_000u64).all(|k| t.get(k).is_some() == (k % 100 == 0)));
    }
}
