//! A read-only tap on the simulated network: which (key, window) counts a message carries.
//!
//! The truth the simulator checks against is kept outside the system under test, so it
//! must know in which window each admission was counted. With synchronized clocks that is
//! the window of the request's timestamp. With skewed clocks it may be later: a count for
//! a newer window, from a node whose clock runs ahead, rolls the key forward on the node
//! that merges it, and a request there whose timestamp still falls in the older window
//! is charged to the newer one (`docs/design.md`, "Timestamps and clock skew"). So, only
//! when clocks are skewed, the simulator reads the newest window of every count a node
//! accepts, with this mirror of the library's wire format (`src/codec.rs`).
//!
//! Like the store, it ignores counts for windows no acceptable timestamp falls in (older
//! than the replay tolerance allows, or further ahead than the clock-skew tolerance).
//! If the wire format changes, decoding here fails and the run reports a violation that
//! names this file.

use bincode::config::{self, Configuration};
use crdt_rate_limiter::codec::MAX_DECODE_BYTES;
use crdt_rate_limiter::counter::ReplicaId;
use serde::Deserialize;

const CONFIG: Configuration<config::LittleEndian, config::Varint, config::Limit<MAX_DECODE_BYTES>> =
    config::standard().with_limit::<MAX_DECODE_BYTES>();

/// The body variant carrying counts (`Body::Counts`, the first variant).
const COUNTS_VARIANT: u32 = 0;
/// The body variant carrying others' totals (`Body::Totals`, the seventh): batches of
/// the same shape, whose windows roll keys forward alike.
const TOTALS_VARIANT: u32 = 6;

/// Counts of one replica for one window length (`codec::Batch`).
#[derive(Deserialize)]
struct Batch {
    replica: ReplicaId,
    window_ms: u32,
    base_window: i64,
    entries: Vec<WireEntry>,
}

#[derive(Deserialize)]
struct WireEntry {
    key: [u8; 8],
    window_offset: u32,
    count: u64,
}

/// Calls `f(key, window)` for every non-zero count in `bytes` of a replica other than
/// `receiver`, for windows of length `window_ms` within `acceptable`: the counts a node
/// merges when it accepts the message.
///
/// Only the envelope's header (version, sender, body variant) and the `Counts` and
/// `Totals` bodies are read, so other kinds of messages need no mirror here.
///
/// # Errors
/// The message does not decode with this mirror of the wire format.
pub(crate) fn for_each_count(
    bytes: &[u8],
    receiver: ReplicaId,
    window_ms: u64,
    acceptable: std::ops::RangeInclusive<i64>,
    mut f: impl FnMut(u64, i64),
) -> Result<(), String> {
    let ((_version, _from, variant), used): ((u8, ReplicaId, u32), usize) =
        bincode::serde::decode_from_slice(bytes, CONFIG).map_err(|e| e.to_string())?;
    if variant != COUNTS_VARIANT && variant != TOTALS_VARIANT {
        return Ok(());
    }
    let (batches, body): (Vec<Batch>, usize) = bincode::serde::decode_from_slice(&bytes[used..], CONFIG).map_err(|e| e.to_string())?;
    if used + body != bytes.len() {
        return Err(format!("{} trailing bytes", bytes.len() - used - body));
    }
    for b in batches.iter().filter(|b| b.replica != receiver && u64::from(b.window_ms) == window_ms) {
        for e in b.entries.iter().filter(|e| e.count > 0) {
            let window = b.base_window - i64::from(e.window_offset);
            if acceptable.contains(&window) {
                f(u64::from_le_bytes(e.key).max(1), window);
            }
        }
    }
    Ok(())
}
