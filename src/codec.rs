//! The wire format: bincode 2 (standard configuration: little-endian, variable-length
//! integers) behind this one module.
//!
//! Every message is an envelope: a version byte, the sender's replica id and a body.
//! Decoding refuses anything longer than [`MAX_DECODE_BYTES`], anything with trailing
//! bytes, an unknown version, and any count of items past the limits below, before a
//! single count is merged: a message is applied whole or not at all.
//!
//! # Size of a count on the wire
//! A count travels as `(key, window offset, count)`: the key's 8-byte keyed hash (fixed
//! width: hashes are uniformly distributed, so a varint would take 9), the window as an
//! offset below its batch's base window (1 byte: almost always 0 or 1) and the count as
//! a varint (1 byte below 251, 3 bytes below 65,536). So a changed count costs 10–12
//! bytes, plus its share of a batch header (the replica id, the window length and the
//! base window, ≈ 15–30 bytes per batch).

use bincode::config::{self, Configuration};
use serde::{Deserialize, Serialize};

use crate::counter::ReplicaId;
use crate::limits::{LimitsConfig, LimitsVersion};

/// The wire version this build speaks.
pub const WIRE_VERSION: u8 = 1;
/// The largest message accepted.
pub const MAX_DECODE_BYTES: usize = 1 << 20;
/// An upper bound on the encoded size of a `Limits` message holding the largest legal
/// configuration: every name byte ([`MAX_NAME_BYTES`](crate::limits::MAX_NAME_BYTES)), and per
/// tier and per override the most its length prefix, option tags and three quota values
/// (each below 2³², 5 bytes) can take, plus the envelope. Below [`MAX_DECODE_BYTES`], so a
/// limits register always travels as one message (checked at compile time, and by a test
/// that builds the largest configuration).
pub(crate) const MAX_LIMITS_MESSAGE_BYTES: usize =
    64 + crate::limits::MAX_NAME_BYTES + crate::limits::MAX_TIERS * (3 + 16) + crate::limits::MAX_OVERRIDES * (5 + 1 + 18);
const _: () = assert!(MAX_LIMITS_MESSAGE_BYTES <= MAX_DECODE_BYTES);

/// The most batches in one message.
pub(crate) const MAX_BATCHES: usize = 4096;
/// The most digest rows in one message.
pub(crate) const MAX_DIGEST_ROWS: usize = 4096;

const CONFIG: Configuration<config::LittleEndian, config::Varint, config::Limit<MAX_DECODE_BYTES>> =
    config::standard().with_limit::<MAX_DECODE_BYTES>();

/// Window indices, times and versions on the wire are within ±2⁵⁰ (Unix ms up to year
/// 37,000; any window index): larger values are refused before any arithmetic.
pub(crate) const MAX_ABS_TIME: i64 = 1 << 50;

fn in_range(v: i64) -> bool {
    (-MAX_ABS_TIME..=MAX_ABS_TIME).contains(&v)
}

/// Anti-entropy fingerprints are kept per bucket of the key space (the top 3 bits).
pub(crate) const DIGEST_BUCKETS: usize = 8;

/// One message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Envelope {
    pub version: u8,
    pub from: ReplicaId,
    pub body: Body,
}

impl Envelope {
    /// A message of this wire version from `from`.
    pub(crate) fn new(from: ReplicaId, body: Body) -> Self {
        Self { version: WIRE_VERSION, from, body }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Body {
    /// Absolute counts, grouped by the replica that made them. Empty: a heartbeat.
    Counts(Vec<Batch>),
    /// Anti-entropy: fingerprints of what the sender holds per replica and key bucket,
    /// over the windows `window - 1` and `window` of length `window_ms`, and the version
    /// of the limits it has in force.
    /// It covers the windows `window - span + 1 ..= window` (`span` at least 1).
    /// `complete` is false when the rows of one digest were split over several messages:
    /// a replica missing from an incomplete digest may be in another part.
    Digest { window_ms: u32, window: i64, span: u8, rows: Vec<DigestRow>, limits: LimitsVersion, complete: bool },
    /// Asks for the counts of these (replica, bucket mask) pairs.
    Repair { window_ms: u32, wanted: Vec<(ReplicaId, u8)> },
    /// Asks for everything the receiver holds (sent on start).
    SyncRequest,
    /// The limits register: a configuration and its version (the latest wins).
    Limits { version: LimitsVersion, config: LimitsConfig },
    /// A clock sample: the sender's Unix ms, and, in a reply, the sample it answers
    /// (its send time) and how long the replier held it. Gives round-trip time and
    /// clock offset, as NTP does.
    Ping { sent_at_ms: i64, echo: Option<(i64, u32)> },
    /// Aggregated dissemination: per key and window, the total count of every replica
    /// but the receiver's, as the sender (one of the key's aggregators) holds it. Batches
    /// as in `Counts`, their replica being the sender; a total may exceed 2³² − 1.
    Totals(Vec<Batch>),
    /// A SWIM packet (`src/swim.rs`): membership and failure detection beyond
    /// `swim_above_peers` peers, encoded by [`SwimCodec`]; at most `max_message_bytes`
    /// with its envelope.
    Swim(Vec<u8>),
}

/// Counts of one replica for one window length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Batch {
    pub replica: ReplicaId,
    pub window_ms: u32,
    /// The newest window in the batch; entries give their window as an offset below it.
    pub base_window: i64,
    pub entries: Vec<WireEntry>,
}

/// A batch's header: whose counts, for which window length, and its newest window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchHead {
    pub replica: ReplicaId,
    pub window_ms: u32,
    pub base_window: i64,
}

impl Batch {
    pub(crate) fn head(&self) -> BatchHead {
        BatchHead { replica: self.replica, window_ms: self.window_ms, base_window: self.base_window }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WireEntry {
    pub key: [u8; 8],
    pub window_offset: u32,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DigestRow {
    pub replica: ReplicaId,
    pub buckets: [u64; DIGEST_BUCKETS],
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Longer than [`MAX_DECODE_BYTES`].
    #[error("message of {0} bytes exceeds the {MAX_DECODE_BYTES}-byte limit")]
    TooLarge(usize),
    /// Not a valid message.
    #[error("malformed message: {0}")]
    Malformed(Malformed),
    /// Valid bincode, but bytes were left over.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// A version this build does not speak.
    #[error("unsupported wire version {0} (this build speaks {WIRE_VERSION})")]
    Version(u8),
    /// More items than the limits allow, or a value out of range.
    #[error("message out of bounds: {0}")]
    OutOfBounds(OutOfBounds),
}

/// How a message failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Malformed {
    /// The bytes ended before the message did.
    #[error("truncated")]
    Truncated,
    /// An option or boolean tag has no meaning.
    #[error("invalid tag")]
    InvalidTag,
    /// An integer is out of its type's range, or a string is not UTF-8.
    #[error("invalid value")]
    InvalidValue,
    /// A length prefix asks for more than the message may hold.
    #[error("length past the limit")]
    Length,
    /// Any other way the bytes do not form a message (an unknown message kind among them).
    #[error("not a message")]
    Other,
}

impl From<bincode::error::DecodeError> for Malformed {
    fn from(e: bincode::error::DecodeError) -> Self {
        use bincode::error::DecodeError as E;
        match e {
            E::UnexpectedEnd { .. } => Self::Truncated,
            E::UnexpectedVariant { .. } | E::InvalidBooleanValue(_) | E::EmptyEnum { .. } => Self::InvalidTag,
            E::InvalidIntegerType { .. }
            | E::NonZeroTypeIsZero { .. }
            | E::Utf8 { .. }
            | E::InvalidCharEncoding(_)
            | E::OutsideUsizeRange(_) => Self::InvalidValue,
            E::LimitExceeded | E::ArrayLengthMismatch { .. } => Self::Length,
            _ => Self::Other,
        }
    }
}

/// Which bound a message broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OutOfBounds {
    /// More batches than one message may carry.
    #[error("too many batches")]
    Batches,
    /// A batch's window length is zero or its window out of range.
    #[error("batch window")]
    BatchWindow,
    /// An entry's window offset or count is out of range.
    #[error("entry window or count out of range")]
    Entry,
    /// A limits configuration that does not validate, or a version out of range.
    #[error("invalid limits")]
    Limits,
    /// A digest with a zero window length or span, too many rows, or a time out of range.
    #[error("digest")]
    Digest,
    /// A repair request with a zero window length or too many rows.
    #[error("repair")]
    Repair,
    /// A clock sample out of range.
    #[error("ping time")]
    PingTime,
}

/// Why one of our messages could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// It would be longer than [`MAX_DECODE_BYTES`], which no peer accepts.
    #[error("message longer than the {MAX_DECODE_BYTES}-byte limit")]
    TooLarge,
    /// The serializer refused it.
    #[error("message cannot be encoded")]
    Other,
}

/// Encodes one message.
///
/// # Errors
/// [`EncodeError::TooLarge`] for a message past [`MAX_DECODE_BYTES`] (the core packs its
/// messages below it, and the largest limits message fits by a compile-time check).
pub(crate) fn encode(msg: &Envelope) -> Result<Vec<u8>, EncodeError> {
    let bytes = match &msg.body {
        Body::Counts(batches) => counts::encode(msg.version, &msg.from, COUNTS_VARIANT, batches),
        Body::Totals(batches) => counts::encode(msg.version, &msg.from, TOTALS_VARIANT, batches),
        _ => bincode::serde::encode_to_vec(msg, CONFIG).map_err(|_| EncodeError::Other)?,
    };
    if bytes.len() > MAX_DECODE_BYTES {
        return Err(EncodeError::TooLarge);
    }
    Ok(bytes)
}

/// Encodes a `Counts` (or, with `totals`, a `Totals`) message from `from` whose batches
/// are `heads`, each with the entries in its range of `entries`: what
/// `encode(&Envelope::new(from, Body::Counts(batches)))` gives, without building the
/// batches.
///
/// # Errors
/// [`EncodeError::TooLarge`] for a message past [`MAX_DECODE_BYTES`].
pub(crate) fn encode_batches(
    from: &ReplicaId,
    totals: bool,
    heads: &[(BatchHead, std::ops::Range<usize>)],
    entries: &[WireEntry],
) -> Result<Vec<u8>, EncodeError> {
    let variant = if totals { TOTALS_VARIANT } else { COUNTS_VARIANT };
    let bytes = counts::write(WIRE_VERSION, from, variant, heads.iter().map(|(h, r)| (*h, &entries[r.clone()])));
    if bytes.len() > MAX_DECODE_BYTES {
        return Err(EncodeError::TooLarge);
    }
    Ok(bytes)
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    if bytes.len() > MAX_DECODE_BYTES {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    // Counts and totals by hand; anything else, and whatever the hand-written reader
    // does not take whole, through bincode, which also says why a message is refused.
    let msg = match counts::decode(bytes) {
        Some(msg) => msg,
        None => {
            let (msg, used): (Envelope, usize) =
                bincode::serde::decode_from_slice(bytes, CONFIG).map_err(|e| DecodeError::Malformed(e.into()))?;
            if used != bytes.len() {
                return Err(DecodeError::Trailing(bytes.len() - used));
            }
            msg
        }
    };
    if msg.version != WIRE_VERSION {
        return Err(DecodeError::Version(msg.version));
    }
    match &msg.body {
        Body::Counts(batches) | Body::Totals(batches) => {
            if batches.len() > MAX_BATCHES {
                return Err(DecodeError::OutOfBounds(OutOfBounds::Batches));
            }
            let max_count = if matches!(msg.body, Body::Counts(_)) { u64::from(u32::MAX) } else { u64::MAX };
            for b in batches {
                if b.window_ms == 0 || !in_range(b.base_window) {
                    return Err(DecodeError::OutOfBounds(OutOfBounds::BatchWindow));
                }
                if b.entries.iter().any(|e| e.window_offset > 1 || e.count > max_count) {
                    return Err(DecodeError::OutOfBounds(OutOfBounds::Entry));
                }
            }
        }
        Body::Limits { config, version } => {
            if version.at_ms > MAX_ABS_TIME as u64 || config.resolve().is_err() {
                return Err(DecodeError::OutOfBounds(OutOfBounds::Limits));
            }
        }
        Body::Digest { window_ms, rows, window, span, limits, .. } => {
            if *window_ms == 0 || rows.len() > MAX_DIGEST_ROWS || !in_range(*window) || *span == 0 || limits.at_ms > MAX_ABS_TIME as u64 {
                return Err(DecodeError::OutOfBounds(OutOfBounds::Digest));
            }
        }
        Body::Repair { window_ms, wanted } => {
            if *window_ms == 0 || wanted.len() > MAX_DIGEST_ROWS {
                return Err(DecodeError::OutOfBounds(OutOfBounds::Repair));
            }
        }
        Body::Ping { sent_at_ms, echo } => {
            if !in_range(*sent_at_ms) || echo.is_some_and(|(t, _)| !in_range(t)) {
                return Err(DecodeError::OutOfBounds(OutOfBounds::PingTime));
            }
        }
        Body::SyncRequest | Body::Swim(_) => {}
    }
    Ok(msg)
}

/// foca's codec: headers and member updates in bincode 2's standard configuration, with
/// the same decoding limit as the envelopes they travel in. A member update naming a node
/// outside the gate's known set is refused once SWIM would know of more than
/// [`MAX_UNKNOWN_MEMBERS`](crate::swim::MAX_UNKNOWN_MEMBERS) such members.
pub(crate) struct SwimCodec {
    gate: std::sync::Arc<parking_lot::Mutex<crate::swim::Gate>>,
}

impl SwimCodec {
    pub(crate) fn new(gate: std::sync::Arc<parking_lot::Mutex<crate::swim::Gate>>) -> Self {
        Self { gate }
    }
}

/// Why foca's codec refused a SWIM packet.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SwimCodecError {
    #[error("SWIM packet does not decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("SWIM packet cannot be encoded: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("SWIM update names node {0}, unknown, past the bound on unknown members")]
    Unknown(u64),
}

impl foca::Codec<crate::swim::SwimId> for SwimCodec {
    type Error = SwimCodecError;

    fn encode_header(&mut self, header: &foca::Header<crate::swim::SwimId>, buf: impl bytes::BufMut) -> Result<(), Self::Error> {
        bincode::serde::encode_into_std_write(header, &mut bytes::BufMut::writer(buf), CONFIG)?;
        Ok(())
    }

    fn decode_header(&mut self, buf: impl bytes::Buf) -> Result<foca::Header<crate::swim::SwimId>, Self::Error> {
        Ok(bincode::serde::decode_from_std_read(&mut bytes::Buf::reader(buf), CONFIG)?)
    }

    fn encode_member(&mut self, member: &foca::Member<crate::swim::SwimId>, buf: impl bytes::BufMut) -> Result<(), Self::Error> {
        bincode::serde::encode_into_std_write(member, &mut bytes::BufMut::writer(buf), CONFIG)?;
        Ok(())
    }

    fn decode_member(&mut self, buf: impl bytes::Buf) -> Result<foca::Member<crate::swim::SwimId>, Self::Error> {
        let m: foca::Member<crate::swim::SwimId> = bincode::serde::decode_from_std_read(&mut bytes::Buf::reader(buf), CONFIG)?;
        let mut g = self.gate.lock();
        if !g.known.contains(&m.id().node) {
            if g.unknown_room == 0 {
                return Err(SwimCodecError::Unknown(m.id().node));
            }
            g.unknown_room -= 1;
        }
        Ok(m)
    }
}

/// The node a SWIM packet's header names as its sender, and whether the packet would
/// make node `me` renew its identity: a `TurnUndead`, or an update declaring `me` down
/// (or suspect at the last incarnation, which it cannot refute). Reads the packet as
/// foca does (header, then a big-endian count and the updates); a packet that does not
/// read is refused by foca too.
pub(crate) fn swim_scan(packet: &[u8], me: u64) -> Result<(u64, bool), DecodeError> {
    let malformed = |e: bincode::error::DecodeError| DecodeError::Malformed(e.into());
    let (h, mut at): (foca::Header<crate::swim::SwimId>, usize) = bincode::serde::decode_from_slice(packet, CONFIG).map_err(malformed)?;
    let mut threatens = h.message == foca::Message::TurnUndead;
    if packet.len() >= at + 2 {
        let n = u16::from_be_bytes([packet[at], packet[at + 1]]);
        at += 2;
        for _ in 0..n {
            let (m, used): (foca::Member<crate::swim::SwimId>, usize) =
                bincode::serde::decode_from_slice(&packet[at..], CONFIG).map_err(malformed)?;
            at += used;
            let about_me = m.id().node == me;
            threatens |= about_me && (m.state() == foca::State::Down || (m.state() == foca::State::Suspect && m.incarnation() == u16::MAX));
        }
    }
    Ok((h.src.node, threatens))
}

/// The leave of the sender of `packet` (a SWIM packet this node's foca wrote) for `dst`:
/// the packet's header addressed to `dst` (foca reads the updates of a packet only if it
/// is the addressee), with one update, the sender down (what foca's `leave_cluster`
/// gossips). Small whatever `packet` carried, so a longer address in the header cannot
/// take it past foca's packet size.
pub(crate) fn swim_leave_packet(packet: &[u8], dst: crate::swim::SwimId) -> Option<Vec<u8>> {
    let (mut h, _): (foca::Header<crate::swim::SwimId>, usize) = bincode::serde::decode_from_slice(packet, CONFIG).ok()?;
    h.dst = dst;
    let mut out = bincode::serde::encode_to_vec(&h, CONFIG).ok()?;
    out.extend_from_slice(&1u16.to_be_bytes());
    bincode::serde::encode_into_std_write(foca::Member::new(h.src, 0, foca::State::Down), &mut out, CONFIG).ok()?;
    Some(out)
}

/// `Body::Counts`' variant index on the wire (bincode writes a variant as its index).
const COUNTS_VARIANT: u32 = 0;
/// `Body::Totals`' variant index.
const TOTALS_VARIANT: u32 = 6;

/// `Counts` and `Totals`, every round's traffic, written and read by hand, byte for byte
/// as bincode's serde path does (the tests hold them to it: the same bytes out, and
/// nothing read that bincode would not read the same).
///
/// Why by hand: through serde each entry is a struct visit, each integer a call, and the
/// output vector grows as it goes; at 100 nodes with 1,000 busy clients the codec took
/// about a tenth of the simulator's time, most of it on these two bodies. Here a message
/// is sized first and written into one allocation, and read in one pass.
mod counts {
    use super::{zigzag, Batch, BatchHead, Body, Envelope, ReplicaId, WireEntry, COUNTS_VARIANT, TOTALS_VARIANT};

    /// bincode's varint markers: a 2-, 4- or 8-byte little-endian integer follows.
    const U16: u8 = 251;
    const U32: u8 = 252;
    const U64: u8 = 253;

    fn put(out: &mut Vec<u8>, v: u64) {
        match v {
            0..=250 => out.push(v as u8),
            251..=0xFFFF => {
                out.push(U16);
                out.extend_from_slice(&(v as u16).to_le_bytes());
            }
            0x1_0000..=0xFFFF_FFFF => {
                out.push(U32);
                out.extend_from_slice(&(v as u32).to_le_bytes());
            }
            _ => {
                out.push(U64);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }

    fn put_replica(out: &mut Vec<u8>, r: &ReplicaId) {
        put(out, r.node);
        put(out, r.incarnation);
    }

    pub(super) fn encode(version: u8, from: &ReplicaId, variant: u32, batches: &[Batch]) -> Vec<u8> {
        write(version, from, variant, batches.iter().map(|b| (b.head(), &b.entries[..])))
    }

    /// Writes an envelope whose batches are `(head, entries)` pairs, sized first.
    pub(super) fn write<'a>(
        version: u8,
        from: &ReplicaId,
        variant: u32,
        batches: impl ExactSizeIterator<Item = (BatchHead, &'a [WireEntry])> + Clone,
    ) -> Vec<u8> {
        use super::{batch_header_len, entry_len, replica_len, varint_len};
        let len = 1
            + replica_len(from)
            + varint_len(u64::from(variant))
            + varint_len(batches.len() as u64)
            + batches
                .clone()
                .map(|(h, entries)| {
                    batch_header_len(&h.replica, h.window_ms, h.base_window, entries.len()) + entries.iter().map(entry_len).sum::<usize>()
                })
                .sum::<usize>();
        let mut out = Vec::with_capacity(len);
        out.push(version);
        put_replica(&mut out, from);
        put(&mut out, u64::from(variant));
        put(&mut out, batches.len() as u64);
        for (h, entries) in batches {
            put_replica(&mut out, &h.replica);
            put(&mut out, u64::from(h.window_ms));
            put(&mut out, zigzag(h.base_window));
            put(&mut out, entries.len() as u64);
            for e in entries {
                out.extend_from_slice(&e.key);
                put(&mut out, u64::from(e.window_offset));
                put(&mut out, e.count);
            }
        }
        debug_assert_eq!(out.len(), len);
        out
    }

    struct Reader<'a> {
        bytes: &'a [u8],
        at: usize,
    }

    impl Reader<'_> {
        fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
            let b = self.bytes.get(self.at..self.at + N)?.try_into().ok()?;
            self.at += N;
            Some(b)
        }

        fn u64(&mut self) -> Option<u64> {
            let [first] = self.take::<1>()?;
            Some(match first {
                0..=250 => u64::from(first),
                U16 => u64::from(u16::from_le_bytes(self.take()?)),
                U32 => u64::from(u32::from_le_bytes(self.take()?)),
                U64 => u64::from_le_bytes(self.take()?),
                _ => return None,
            })
        }

        fn u32(&mut self) -> Option<u32> {
            // A u32 written with the 8-byte marker is refused by bincode, whatever its value.
            match self.bytes.get(self.at) {
                Some(&U64) | None => None,
                _ => self.u64().map(|v| v as u32),
            }
        }

        fn i64(&mut self) -> Option<i64> {
            let n = self.u64()?;
            Some(((n >> 1) as i64) ^ -((n & 1) as i64))
        }

        fn replica(&mut self) -> Option<ReplicaId> {
            Some(ReplicaId { node: self.u64()?, incarnation: self.u64()? })
        }

        /// A length, and room in what is left for that many items of at least `min` bytes.
        fn len(&mut self, min: usize) -> Option<usize> {
            let n = usize::try_from(self.u64()?).ok()?;
            (n <= (self.bytes.len() - self.at) / min).then_some(n)
        }
    }

    /// The message, if it is a `Counts` or `Totals` envelope that reads whole; `None`
    /// for anything else, left to bincode.
    pub(super) fn decode(bytes: &[u8]) -> Option<Envelope> {
        let mut r = Reader { bytes, at: 0 };
        let [version] = r.take::<1>()?;
        let from = r.replica()?;
        let variant = r.u32()?;
        if variant != COUNTS_VARIANT && variant != TOTALS_VARIANT {
            return None;
        }
        // A batch takes at least 5 bytes, an entry 10. More batches than a message may
        // carry are left to bincode (and refused after it); entries are reserved for at
        // most as many as a datagram holds, so a length prefix makes no large allocation.
        let n = r.len(5)?;
        if n > super::MAX_BATCHES {
            return None;
        }
        // bincode charges its decode limit by each value's size in memory, not on the
        // wire (`claim_bytes_read`: a u8 1 byte, a u32 4, a u64, i64 or length 8), and
        // refuses a message past it: so does this reader, with the same count. The
        // envelope's version, sender, variant and batch count take 29; a batch's replica,
        // window length, base window and entry count 36; an entry 20.
        let mut claimed = 1 + 16 + 4 + 8;
        let mut batches = Vec::with_capacity(n);
        for _ in 0..n {
            let replica = r.replica()?;
            let window_ms = r.u32()?;
            let base_window = r.i64()?;
            let n = r.len(10)?;
            claimed += 36 + 20 * n;
            if claimed > super::MAX_DECODE_BYTES {
                return None;
            }
            let mut entries = Vec::with_capacity(n.min(256));
            for _ in 0..n {
                entries.push(WireEntry { key: r.take()?, window_offset: r.u32()?, count: r.u64()? });
            }
            batches.push(Batch { replica, window_ms, base_window, entries });
        }
        if r.at != bytes.len() {
            return None;
        }
        let body = if variant == COUNTS_VARIANT { Body::Counts(batches) } else { Body::Totals(batches) };
        Some(Envelope { version, from, body })
    }
}

/// The `Counts` or `Totals` message bincode's serde path reads from `bytes`, if it reads
/// them whole and they can be a message (more than `MAX_BATCHES` batches are refused
/// after either reader): what the hand-written reader must read.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn bincode_reads_counts(bytes: &[u8]) -> Option<Envelope> {
    match bincode::serde::decode_from_slice::<Envelope, _>(bytes, CONFIG) {
        Ok((m, used)) if used == bytes.len() => match &m.body {
            Body::Counts(b) | Body::Totals(b) if b.len() <= MAX_BATCHES => Some(m),
            _ => None,
        },
        _ => None,
    }
}

/// Whether the hand-written reader reads `bytes` as bincode does: the same message, or
/// none.
#[cfg(feature = "testing")]
pub(crate) fn readers_agree(bytes: &[u8]) -> bool {
    counts::decode(bytes) == bincode_reads_counts(bytes)
}

/// Bytes bincode's standard configuration uses for an unsigned integer.
pub(crate) fn varint_len(v: u64) -> usize {
    match v {
        0..=250 => 1,
        251..=0xFFFF => 3,
        0x1_0000..=0xFFFF_FFFF => 5,
        _ => 9,
    }
}

/// Bytes for a signed integer (zig-zag encoded).
pub(crate) fn signed_len(v: i64) -> usize {
    varint_len(zigzag(v))
}

/// A signed integer as bincode writes it: zig-zag, so that small magnitudes of either
/// sign take one byte.
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn replica_len(r: &ReplicaId) -> usize {
    varint_len(r.node) + varint_len(r.incarnation)
}

/// Bytes of an envelope holding a `Counts` body with no batches yet (the batch count
/// is assumed to stay below 251).
pub(crate) fn counts_header_len(from: &ReplicaId) -> usize {
    1 + replica_len(from) + 1 + 1
}

/// Bytes of a batch header (entry count assumed below 65,536).
pub(crate) fn batch_header_len(replica: &ReplicaId, window_ms: u32, base_window: i64, entries: usize) -> usize {
    replica_len(replica) + varint_len(u64::from(window_ms)) + signed_len(base_window) + varint_len(entries as u64)
}

pub(crate) fn entry_len(e: &WireEntry) -> usize {
    8 + varint_len(u64::from(e.window_offset)) + varint_len(e.count)
}

/// The largest legal message of every kind, encoded, with its kind's name: what any
/// transport must carry whole.
#[cfg(test)]
pub(crate) fn largest_legal_messages() -> Vec<(&'static str, Vec<u8>)> {
    use crate::limits::{ClientOverride, LimitsConfig, QuotaSpec};
    let from = ReplicaId { node: u64::MAX, incarnation: u64::MAX };
    let try_env = |body| encode(&Envelope::new(from, body));
    let env = |body| try_env(body).expect("a legal message encodes");
    let max = u64::from(u32::MAX);
    let spec = QuotaSpec { limit: max, window_ms: max, burst: Some(max) };
    let mut limits = LimitsConfig::new(spec.to_quota().expect("the largest quota is legal"));
    for t in 0..crate::limits::MAX_TIERS {
        limits.tiers.insert(format!("{t:064}"), spec.clone());
    }
    let name_room = (crate::limits::MAX_NAME_BYTES - crate::limits::MAX_TIERS * 64) / crate::limits::MAX_OVERRIDES;
    for c in 0..crate::limits::MAX_OVERRIDES {
        let o = ClientOverride { tier: None, limit: Some(max), window_ms: Some(max), burst: Some(max) };
        limits.clients.insert(format!("{c:0name_room$}"), o);
    }
    let version = LimitsVersion { at_ms: MAX_ABS_TIME as u64, node: u64::MAX };
    let limits = env(Body::Limits { version, config: limits });
    // Counts: as many of the widest entries as the decoder's limit (which also bounds
    // what decoding allocates) lets through.
    // Totals likewise, with the widest totals.
    let largest = |count: u64, body: fn(Vec<Batch>) -> Body| {
        let entry = WireEntry { key: [0xFF; 8], window_offset: 1, count };
        let batch = |n: usize| Batch { replica: from, window_ms: u32::MAX, base_window: MAX_ABS_TIME, entries: vec![entry; n] };
        let (mut ok, mut too_many) = (0, MAX_DECODE_BYTES / entry_len(&entry) + 1);
        while too_many - ok > 1 {
            let mid = (ok + too_many) / 2;
            if try_env(body(vec![batch(mid)])).is_ok_and(|bytes| decode(&bytes).is_ok()) {
                ok = mid;
            } else {
                too_many = mid;
            }
        }
        env(body(vec![batch(ok)]))
    };
    let counts = largest(max, Body::Counts);
    let totals = largest(u64::MAX, Body::Totals);
    let row = DigestRow { replica: from, buckets: [u64::MAX; DIGEST_BUCKETS] };
    let digest = env(Body::Digest {
        window_ms: u32::MAX,
        window: -MAX_ABS_TIME,
        span: u8::MAX,
        rows: vec![row; MAX_DIGEST_ROWS],
        limits: version,
        complete: true,
    });
    let repair = env(Body::Repair { window_ms: u32::MAX, wanted: vec![(from, 0xFF); MAX_DIGEST_ROWS] });
    let ping = env(Body::Ping { sent_at_ms: -MAX_ABS_TIME, echo: Some((-MAX_ABS_TIME, u32::MAX)) });
    vec![
        ("limits", limits),
        ("counts", counts),
        ("totals", totals),
        ("digest", digest),
        ("repair", repair),
        ("ping", ping),
        ("sync request", env(Body::SyncRequest)),
        ("heartbeat", env(Body::Counts(Vec::new()))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_legal_message_of_every_kind_decodes_and_limits_stay_under_their_bound() {
        for (kind, bytes) in largest_legal_messages() {
            assert!(bytes.len() <= MAX_DECODE_BYTES, "{kind}: {} bytes", bytes.len());
            if let Err(e) = decode(&bytes) {
                panic!("{kind} must decode: {e}");
            }
            if kind == "limits" {
                eprintln!("largest legal limits message: {} bytes (bound {MAX_LIMITS_MESSAGE_BYTES})", bytes.len());
                assert!(bytes.len() > 400_000, "the configuration is near the largest: {}", bytes.len());
                assert!(bytes.len() <= MAX_LIMITS_MESSAGE_BYTES, "{} > bound {MAX_LIMITS_MESSAGE_BYTES}", bytes.len());
            }
        }
    }

    fn sample() -> Envelope {
        let r = ReplicaId { node: 3, incarnation: 1 };
        let entries = (0..40u64)
            .map(|i| WireEntry { key: i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes(), window_offset: (i % 2) as u32, count: i * 17 })
            .collect();
        Envelope {
            version: WIRE_VERSION,
            from: r,
            body: Body::Counts(vec![Batch { replica: r, window_ms: 1000, base_window: 1_700_000_000, entries }]),
        }
    }

    #[test]
    fn messages_round_trip_and_the_size_arithmetic_is_exact() {
        let msg = sample();
        let bytes = encode(&msg).unwrap();
        assert_eq!(decode(&bytes).unwrap(), msg);
        let Body::Counts(batches) = &msg.body else { unreachable!() };
        let b = &batches[0];
        let expected = counts_header_len(&msg.from)
            + batch_header_len(&b.replica, b.window_ms, b.base_window, b.entries.len())
            + b.entries.iter().map(entry_len).sum::<usize>();
        assert_eq!(bytes.len(), expected);
    }

    #[test]
    fn every_truncation_and_every_corrupted_byte_is_refused_or_decodes_whole() {
        let bytes = encode(&sample()).unwrap();
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "truncated to {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(DecodeError::Trailing(1)));
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xFF;
            // Either refused, or a well-formed message within bounds: never a panic.
            if let Ok(m) = decode(&b) {
                assert_eq!(m.version, WIRE_VERSION);
            }
        }
    }

    #[test]
    fn other_versions_and_oversized_input_are_refused() {
        let mut msg = sample();
        msg.version = 2;
        assert_eq!(decode(&encode(&msg).unwrap()), Err(DecodeError::Version(2)));
        assert_eq!(decode(&vec![0u8; MAX_DECODE_BYTES + 1]), Err(DecodeError::TooLarge(MAX_DECODE_BYTES + 1)));
        // A length prefix claiming a huge vector does not allocate it.
        let mut hostile = vec![WIRE_VERSION, 1, 1, 0];
        hostile.extend_from_slice(&[253, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]);
        assert!(decode(&hostile).is_err());
    }

    #[test]
    fn refusals_are_typed_and_an_oversized_message_is_not_encoded() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(decode(&bytes[..bytes.len() - 1]), Err(DecodeError::Malformed(Malformed::Truncated)));
        let from = ReplicaId { node: 1, incarnation: 1 };
        let ping = |t| encode(&Envelope::new(from, Body::Ping { sent_at_ms: t, echo: None })).unwrap();
        // The last byte is the tag of `echo`'s option: 7 is neither None nor Some.
        let mut bad_tag = ping(0);
        *bad_tag.last_mut().unwrap() = 7;
        assert_eq!(decode(&bad_tag), Err(DecodeError::Malformed(Malformed::InvalidTag)));
        // Body kind 200 does not exist.
        assert_eq!(decode(&[WIRE_VERSION, 1, 1, 200]), Err(DecodeError::Malformed(Malformed::Other)));
        assert_eq!(decode(&ping(MAX_ABS_TIME + 1)), Err(DecodeError::OutOfBounds(OutOfBounds::PingTime)));
        let entry = WireEntry { key: [0xFF; 8], window_offset: 0, count: 1 };
        let entries = vec![entry; MAX_DECODE_BYTES / 8];
        let huge = Envelope {
            version: WIRE_VERSION,
            from,
            body: Body::Counts(vec![Batch { replica: from, window_ms: 1000, base_window: 1, entries }]),
        };
        assert_eq!(encode(&huge), Err(EncodeError::TooLarge));
        assert!(DecodeError::Malformed(Malformed::Truncated).to_string().contains("truncated"));
    }

    mod by_hand {
        use super::super::*;
        use proptest::prelude::*;

        /// Values at and around every varint width's edges, and any value.
        fn edgy_u64() -> impl Strategy<Value = u64> {
            prop_oneof![
                prop::sample::select(vec![0, 1, 250, 251, 252, 253, 0xFFFF, 0x1_0000, 0xFFFF_FFFF, 0x1_0000_0000, u64::MAX - 1, u64::MAX]),
                any::<u64>(),
                0u64..300,
            ]
        }

        fn edgy_i64() -> impl Strategy<Value = i64> {
            prop_oneof![edgy_u64().prop_map(|v| v as i64), edgy_u64().prop_map(|v| -(v as i64)), Just(i64::MIN), Just(i64::MAX)]
        }

        fn replica() -> impl Strategy<Value = ReplicaId> {
            (edgy_u64(), edgy_u64()).prop_map(|(node, incarnation)| ReplicaId { node, incarnation })
        }

        fn envelope() -> impl Strategy<Value = Envelope> {
            let entry =
                (any::<[u8; 8]>(), edgy_u64(), edgy_u64()).prop_map(|(key, o, count)| WireEntry { key, window_offset: o as u32, count });
            let batch = (replica(), edgy_u64(), edgy_i64(), prop::collection::vec(entry, 0..12))
                .prop_map(|(replica, w, base_window, entries)| Batch { replica, window_ms: w as u32, base_window, entries });
            (any::<u8>(), replica(), any::<bool>(), prop::collection::vec(batch, 0..4)).prop_map(|(version, from, totals, batches)| {
                Envelope { version, from, body: if totals { Body::Totals(batches) } else { Body::Counts(batches) } }
            })
        }

        use super::super::bincode_reads_counts as bincode_reads;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn counts_and_totals_are_written_as_bincode_writes_them_and_read_back(msg in envelope()) {
                let bytes = encode(&msg).unwrap();
                prop_assert_eq!(&bytes, &bincode::serde::encode_to_vec(&msg, CONFIG).unwrap());
                prop_assert_eq!(counts::decode(&bytes), Some(msg));
            }

            /// The packer's path (heads and one flat list of entries) writes the same bytes.
            #[test]
            fn batches_written_from_heads_and_a_flat_list_are_the_same_message(mut msg in envelope()) {
                msg.version = WIRE_VERSION;
                let (totals, batches) = match &msg.body {
                    Body::Counts(b) => (false, b),
                    Body::Totals(b) => (true, b),
                    _ => unreachable!(),
                };
                let (mut heads, mut flat) = (Vec::new(), Vec::new());
                for b in batches {
                    heads.push((b.head(), flat.len()..flat.len() + b.entries.len()));
                    flat.extend_from_slice(&b.entries);
                }
                prop_assert_eq!(encode_batches(&msg.from, totals, &heads, &flat).unwrap(), encode(&msg).unwrap());
            }

            /// Any change to a message (a byte set, bytes cut or added, a varint marker put
            /// in): the hand-written reader takes exactly what bincode takes whole, as the
            /// same message.
            #[test]
            fn the_reader_takes_what_bincode_takes_and_nothing_else(
                msg in envelope(),
                edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, prop_oneof![any::<u8>(), 250u8..=255]), 1..4),
            ) {
                let mut bytes = encode(&msg).unwrap();
                for (at, kind, v) in edits {
                    let i = at.index(bytes.len() + 1);
                    match kind {
                        0 if i < bytes.len() => bytes[i] = v,
                        1 => bytes.truncate(i),
                        _ => bytes.insert(i, v),
                    }
                }
                prop_assert_eq!(counts::decode(&bytes), bincode_reads(&bytes));
            }
        }

        /// `msg` written with every integer in a width `widths` picks for it: any width
        /// the value fits (bincode reads them all), 9 bytes for a `u32` (which bincode
        /// refuses), or the reserved markers 254 and 255.
        fn written_loosely(msg: &Envelope, widths: &mut impl Iterator<Item = u8>) -> Vec<u8> {
            let mut out = vec![msg.version];
            let mut put = |out: &mut Vec<u8>, v: u64| {
                let w = widths.next().unwrap_or(0);
                match w % 8 {
                    6 => out.extend_from_slice(&[254; 17]),
                    7 => out.push(255),
                    _ if v <= 250 && w % 8 == 0 => out.push(v as u8),
                    0 | 1 if v <= 0xFFFF => out.extend_from_slice(&[&[251][..], &(v as u16).to_le_bytes()].concat()),
                    0..=2 if v <= 0xFFFF_FFFF => out.extend_from_slice(&[&[252][..], &(v as u32).to_le_bytes()].concat()),
                    _ => out.extend_from_slice(&[&[253][..], &v.to_le_bytes()].concat()),
                }
            };
            let (variant, batches) = match &msg.body {
                Body::Counts(b) => (0, b),
                Body::Totals(b) => (6, b),
                _ => unreachable!(),
            };
            put(&mut out, msg.from.node);
            put(&mut out, msg.from.incarnation);
            put(&mut out, variant);
            put(&mut out, batches.len() as u64);
            for b in batches {
                put(&mut out, b.replica.node);
                put(&mut out, b.replica.incarnation);
                put(&mut out, u64::from(b.window_ms));
                put(&mut out, zigzag(b.base_window));
                put(&mut out, b.entries.len() as u64);
                for e in &b.entries {
                    out.extend_from_slice(&e.key);
                    put(&mut out, u64::from(e.window_offset));
                    put(&mut out, e.count);
                }
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            /// Integers in every width, legal or not: the reader takes what bincode takes,
            /// as the same message, and refuses the rest.
            #[test]
            fn integers_in_any_width_are_read_as_bincode_reads_them(
                msg in envelope(),
                widths in prop::collection::vec(prop_oneof![4 => Just(0u8), 1 => any::<u8>()], 0..200),
            ) {
                let bytes = written_loosely(&msg, &mut widths.into_iter());
                let expected = bincode_reads(&bytes);
                prop_assert_eq!(counts::decode(&bytes), expected);
            }
        }

        /// Past `MAX_BATCHES` batches the message is left to bincode, and refused as
        /// before; so is a length prefix claiming more entries than the bytes can hold.
        #[test]
        fn too_many_batches_and_lengths_past_the_bytes_are_refused_as_before() {
            let from = ReplicaId { node: 1, incarnation: 1 };
            let batch = Batch { replica: from, window_ms: 1000, base_window: 1, entries: Vec::new() };
            let bytes = encode(&Envelope::new(from, Body::Counts(vec![batch; MAX_BATCHES + 1]))).unwrap();
            assert_eq!(counts::decode(&bytes), None);
            assert_eq!(decode(&bytes), Err(DecodeError::OutOfBounds(OutOfBounds::Batches)));
            // One batch claiming 100,000 entries in 30 bytes.
            let mut claim = vec![WIRE_VERSION, 1, 1, 0, 1, 1, 1, 251, 0xE8, 0x03, 2, 252];
            claim.extend_from_slice(&100_000u32.to_le_bytes());
            claim.extend_from_slice(&[0; 30]);
            assert_eq!(counts::decode(&claim), None);
            assert!(decode(&claim).is_err());
        }

        /// bincode's decode limit counts values by their size in memory (20 bytes an
        /// entry, against 10 on the wire at the least): the reader takes the largest
        /// messages bincode takes, and refuses those one entry larger, as bincode does.
        #[test]
        fn the_largest_messages_bincode_takes_are_the_largest_the_reader_takes() {
            let from = ReplicaId { node: 1, incarnation: 1 };
            let entry = WireEntry { key: [0; 8], window_offset: 0, count: 0 };
            // (batches, entries in all) at bincode's edge: 29 + 36·batches + 20·entries ≤ 2²⁰.
            for (batches, entries) in [(1usize, 52_425usize), (2, 52_423), (4_096, 45_054)] {
                for entries in [entries, entries + 1] {
                    let mut list = vec![Batch { replica: from, window_ms: 1000, base_window: 1, entries: Vec::new() }; batches];
                    list[0].entries = vec![entry; entries - (batches - 1)];
                    for b in &mut list[1..] {
                        b.entries = vec![entry];
                    }
                    let bytes = encode(&Envelope::new(from, Body::Counts(list))).unwrap();
                    let (read, expected) = (counts::decode(&bytes), bincode_reads(&bytes));
                    let takes = 29 + 36 * batches + 20 * entries <= MAX_DECODE_BYTES;
                    let at = format!("{batches} batches, {entries} entries");
                    assert_eq!((read.is_some(), expected.is_some()), (takes, takes), "{at}: (reader, bincode)");
                    assert!(read == expected, "{at}: the two read different messages");
                }
            }
        }

        /// The variant indices the reader and writer use are the ones bincode writes.
        #[test]
        fn counts_and_totals_are_the_variants_bincode_numbers_them() {
            let from = ReplicaId { node: 1, incarnation: 1 };
            for (body, variant) in [(Body::Counts(Vec::new()), COUNTS_VARIANT), (Body::Totals(Vec::new()), TOTALS_VARIANT)] {
                let bytes = bincode::serde::encode_to_vec(Envelope::new(from, body), CONFIG).unwrap();
                assert_eq!(bytes, [WIRE_VERSION, 1, 1, variant as u8, 0]);
            }
        }

        #[test]
        fn other_bodies_are_left_to_bincode() {
            let from = ReplicaId { node: 1, incarnation: 1 };
            for body in [Body::SyncRequest, Body::Ping { sent_at_ms: 5, echo: None }, Body::Swim(vec![1, 2])] {
                let bytes = encode(&Envelope::new(from, body.clone())).unwrap();
                assert_eq!(counts::decode(&bytes), None);
                assert_eq!(decode(&bytes).unwrap().body, body);
            }
        }
    }
}
