//! The table's slot array: a zeroed `[Entry]` that large tables keep on huge pages.
//!
//! The only module with `unsafe` besides the coarse clock read (`clock.rs`). On Linux an
//! array of 2 MiB or more is an anonymous mapping aligned to 2 MiB and advised for
//! transparent huge pages: a table of a million keys spans tens of MiB, and with base
//! pages nearly every lookup would also miss the TLB. Measured against a plain
//! `Box<[Entry]>` at a million keys it decides in 0.54 to 0.76 of the time
//! (`docs/benchmarks.md`, "Huge pages for the table"). Pages are only resident once
//! touched, as with any allocation. Elsewhere, or when the mapping fails, the array is
//! a `Box<[Entry]>`.
//!
//! It also holds [`prefetch`], the hint a batch of merges gives the CPU for the slots and
//! records it is about to touch (`docs/benchmarks.md`, "Speed").

use crate::table::Entry;

/// Arrays at least this large are mapped on a boundary of this size (the x86-64 and
/// 4 KiB-page arm64 transparent huge page).
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// A zeroed array of slots, owned.
pub(crate) struct Slots {
    ptr: std::ptr::NonNull<Entry>,
    len: usize,
    /// The mapped length in bytes (a whole number of pages) when mapped, else `None`
    /// (a leaked `Box<[Entry]>`).
    mapped: Option<usize>,
}

// SAFETY: `Slots` owns its memory exclusively, like a `Box<[Entry]>`, and `Entry` is
// `Send`. (No `Sync`: the table lives behind its shard's mutex.)
unsafe impl Send for Slots {}

impl Slots {
    /// `len` zeroed slots.
    pub(crate) fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<Entry>();
        #[cfg(target_os = "linux")]
        if bytes >= HUGE_PAGE {
            if let Some((ptr, mapped)) = map_huge(bytes) {
                return Self { ptr: ptr.cast(), len, mapped: Some(mapped) };
            }
        }
        let boxed: Box<[Entry]> = vec![Entry::default(); len].into_boxed_slice();
        let ptr = std::ptr::NonNull::from(Box::leak(boxed)).cast();
        Self { ptr, len, mapped: None }
    }
}

/// The system's page size, if it divides [`HUGE_PAGE`] (true of 4, 16 and 64 KiB pages).
#[cfg(target_os = "linux")]
fn page_size() -> Option<usize> {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).ok().filter(|&p| p > 0 && HUGE_PAGE % p == 0)
}

/// Maps `bytes` of zeroed memory starting on a [`HUGE_PAGE`] boundary and advises huge
/// pages. Returns the start and the mapped length (`bytes` rounded up to whole pages).
#[cfg(target_os = "linux")]
fn map_huge(bytes: usize) -> Option<(std::ptr::NonNull<u8>, usize)> {
    let bytes = bytes.checked_next_multiple_of(page_size()?)?;
    let span = bytes.checked_add(HUGE_PAGE)?;
    // SAFETY: an anonymous private mapping with no address hint has no preconditions.
    let base = unsafe {
        libc::mmap(std::ptr::null_mut(), span, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let base = base as usize;
    // `base` is page-aligned and HUGE_PAGE a multiple of the page size, so both trimmed
    // ranges below are whole pages.
    let start = base.next_multiple_of(HUGE_PAGE);
    let end = start + bytes;
    // SAFETY: both ranges lie inside the mapping just made, are page-aligned, and are not
    // used again; the range kept, `start..end`, is untouched.
    unsafe {
        if start > base {
            libc::munmap(base as *mut libc::c_void, start - base);
        }
        if base + span > end {
            libc::munmap(end as *mut libc::c_void, base + span - end);
        }
        // Advice only: failure leaves ordinary pages, which is still correct.
        libc::madvise(start as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE);
    }
    std::ptr::NonNull::new(start as *mut u8).map(|p| (p, bytes))
}

impl Drop for Slots {
    fn drop(&mut self) {
        match self.mapped {
            #[cfg(target_os = "linux")]
            // SAFETY: the mapping was made by `map_huge`, which returned this length.
            Some(bytes) => unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), bytes);
            },
            #[cfg(not(target_os = "linux"))]
            Some(_) => {}
            // SAFETY: made from a leaked `Box<[Entry]>` of this length.
            None => drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len)) }),
        }
    }
}

impl Default for Slots {
    fn default() -> Self {
        Self { ptr: std::ptr::NonNull::dangling(), len: 0, mapped: None }
    }
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slots({})", self.len)
    }
}

/// Asks the CPU to start loading the cache line at `p` into its caches (`prefetcht0` on
/// x86-64; nothing elsewhere). A hint: nothing is read, and an address that is no
/// longer valid is harmless. Batches of merges issue these for the slots and records
/// they are about to touch, so that their cache misses overlap instead of coming one
/// after another.
#[inline]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` is an SSE instruction, which every x86-64 CPU has; it never
    // dereferences its operand in the language's sense and never faults, whatever the
    // address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl std::ops::Deref for Slots {
    type Target = [Entry];
    // Inline: every probe goes through it, and it lives in another module than the table.
    #[inline]
    fn deref(&self) -> &[Entry] {
        // SAFETY: `ptr` points to `len` initialized (zeroed or written) slots we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Slots {
    #[inline]
    fn deref_mut(&mut self) -> &mut [Entry] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_arrays_are_zeroed_writable_and_freed() {
        for len in [0, 1, 1000, HUGE_PAGE / std::mem::size_of::<Entry>() + 7] {
            let mut s = Slots::zeroed(len);
            assert_eq!(s.len(), len);
            assert!(s.iter().all(|x| *x == Entry::default()));
            if let Some(last) = s.last_mut() {
                last.key = 9;
            }
            assert_eq!(s.last().map(|x| x.key), (len > 0).then_some(9));
            #[cfg(target_os = "linux")]
            if len * std::mem::size_of::<Entry>() >= HUGE_PAGE {
                let bytes = s.mapped.expect("a large array is mapped");
                assert_eq!(s.as_ptr() as usize % HUGE_PAGE, 0);
                assert_eq!(bytes % page_size().unwrap(), 0);
                assert!(bytes >= len * std::mem::size_of::<Entry>());
            }
        }
    }
}
