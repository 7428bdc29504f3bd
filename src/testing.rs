//! Internals for the fuzz targets (`fuzz/`) and the hostile-member tests, behind the
//! `testing` feature. Not a stable API: it exists so that tests can build any message a
//! misbehaving member could send, and so that the fuzzers run the production decoders.

use crate::codec::{self, Batch, Body, DigestRow, Envelope, WireEntry, DIGEST_BUCKETS};
use crate::codec::{DecodeError, EncodeError};
use crate::counter::ReplicaId;
use crate::limits::{LimitsConfig, LimitsVersion};

/// Decodes one gossip message with the production decoder; the message itself stays
/// internal.
///
/// # Errors
/// The decoder's [`DecodeError`].
pub fn decode(bytes: &[u8]) -> Result<(), DecodeError> {
    codec::decode(bytes).map(|_| ())
}

/// Whether the hand-written reader of counts and totals reads `bytes` exactly as bincode
/// does (`src/codec.rs`): the same message, or none.
pub fn readers_agree(bytes: &[u8]) -> bool {
    codec::readers_agree(bytes)
}

/// Re-encodes a message that decodes: decoding then encoding is the identity.
pub fn reencode(bytes: &[u8]) -> Option<Vec<u8>> {
    codec::decode(bytes).ok().and_then(|m| codec::encode(&m).ok())
}

/// Every message builder below fails with [`EncodeError::TooLarge`] past
/// [`MAX_DECODE_BYTES`](crate::codec::MAX_DECODE_BYTES), which no member accepts.
fn env(from: ReplicaId, body: Body) -> Result<Vec<u8>, EncodeError> {
    codec::encode(&Envelope::new(from, body))
}

/// One batch of counts: the replica that made them, the window length, the window, and
/// `(key hash, count)` pairs.
#[derive(Debug, Clone)]
pub struct CountsBatch {
    /// The replica the counts belong to.
    pub replica: ReplicaId,
    /// Window length in ms.
    pub window_ms: u32,
    /// Window index.
    pub window: i64,
    /// Key hashes and counts.
    pub entries: Vec<(u64, u64)>,
}

/// A `Counts` message from `from`.
pub fn counts(from: ReplicaId, batches: &[CountsBatch]) -> Result<Vec<u8>, EncodeError> {
    env(from, Body::Counts(wire_batches(batches)))
}

fn wire_batches(batches: &[CountsBatch]) -> Vec<Batch> {
    batches
        .iter()
        .map(|b| Batch {
            replica: b.replica,
            window_ms: b.window_ms,
            base_window: b.window,
            entries: b.entries.iter().map(|&(k, count)| WireEntry { key: k.to_le_bytes(), window_offset: 0, count }).collect(),
        })
        .collect()
}

/// A `Totals` message from `from` (aggregated dissemination): per batch, the others'
/// totals of its keys in its window, as an aggregator publishes them. The batches'
/// replica should be `from`, as an aggregator sends them; any other is what a
/// misbehaving member could send.
pub fn totals(from: ReplicaId, batches: &[CountsBatch]) -> Result<Vec<u8>, EncodeError> {
    env(from, Body::Totals(wire_batches(batches)))
}

/// A `Repair` request: the counts of these (replica, bucket mask) pairs.
pub fn repair(from: ReplicaId, window_ms: u32, wanted: &[(ReplicaId, u8)]) -> Result<Vec<u8>, EncodeError> {
    env(from, Body::Repair { window_ms, wanted: wanted.to_vec() })
}

/// A `Digest` with these rows (replica, per-bucket fingerprints).
pub fn digest(
    from: ReplicaId,
    window_ms: u32,
    window: i64,
    span: u8,
    rows: &[(ReplicaId, [u64; 8])],
    complete: bool,
) -> Result<Vec<u8>, EncodeError> {
    let rows = rows.iter().map(|&(replica, buckets)| DigestRow { replica, buckets }).collect();
    const _: () = assert!(DIGEST_BUCKETS == 8);
    env(from, Body::Digest { window_ms, window, span, rows, limits: LimitsVersion::default(), complete })
}

/// A `SyncRequest`.
pub fn sync_request(from: ReplicaId) -> Result<Vec<u8>, EncodeError> {
    env(from, Body::SyncRequest)
}

/// A `Limits` message.
pub fn limits(from: ReplicaId, version: LimitsVersion, config: LimitsConfig) -> Result<Vec<u8>, EncodeError> {
    env(from, Body::Limits { version, config })
}

/// A clock sample.
pub fn ping(from: ReplicaId, sent_at_ms: i64, echo: Option<(i64, u32)>) -> Result<Vec<u8>, EncodeError> {
    env(from, Body::Ping { sent_at_ms, echo })
}

/// The transport's frame reader ([`FrameDecoder`](crate::transport) internally), as the
/// QUIC driver runs it on every stream.
#[cfg(feature = "quic")]
#[derive(Debug, Default)]
pub struct FrameReader(crate::transport::wire::FrameDecoder);

#[cfg(feature = "quic")]
impl FrameReader {
    /// Appends bytes read from a stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.0.push(bytes);
    }

    /// The next whole frame (`Some(kind)`), `None` if more bytes are needed.
    ///
    /// # Errors
    /// Why the frame is refused (the driver then closes the connection).
    pub fn next_frame(&mut self) -> Result<Option<u8>, String> {
        use crate::transport::wire::Frame;
        self.0.next_frame().map_err(|e| e.to_string()).map(|f| {
            f.map(|f| match f {
                Frame::Hello(_) => 1,
                Frame::Gossip(_) => 2,
                Frame::Members(_) => 3,
                Frame::SyncDone => 4,
                Frame::Unknown(k) => k,
            })
        })
    }

    /// The stream ended.
    ///
    /// # Errors
    /// If it ended inside a frame.
    pub fn finish(&self) -> Result<(), String> {
        self.0.finish().map_err(|e| e.to_string())
    }

    /// Bytes held.
    pub fn buffered(&self) -> usize {
        self.0.buffered()
    }

    /// The most bytes a frame's payload may have.
    pub const MAX_FRAME: usize = crate::transport::wire::MAX_FRAME;
}

/// A frame of the given kind around `payload`, as a peer would write it.
#[cfg(feature = "quic")]
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A `Swim` message from `from` carrying `packet` as it is.
pub fn swim_raw(from: ReplicaId, packet: &[u8]) -> Result<Vec<u8>, EncodeError> {
    env(from, Body::Swim(packet.to_vec()))
}

/// A `Swim` message from `from` whose SWIM packet's header names node `src` as its
/// sender and `to` as its addressee, gossiping `members` (node ids) as alive.
pub fn swim_gossip(from: ReplicaId, src: u64, to: ReplicaId, members: &[u64]) -> Result<Vec<u8>, EncodeError> {
    swim_raw(from, &swim_gossip_packet(from, src, to, members)?)
}

/// The SWIM packet of [`swim_gossip`] alone.
pub fn swim_gossip_packet(from: ReplicaId, src: u64, to: ReplicaId, members: &[u64]) -> Result<Vec<u8>, EncodeError> {
    let updates: Vec<SwimUpdate> = members.iter().map(|&node| SwimUpdate::new(node, 1, 0, false)).collect();
    swim_packet(from, src, (to, 0), SwimKind::Gossip, &updates)
}

/// One member update in a SWIM packet: the member's SWIM identity (node, incarnation,
/// bump, address) and whether it says the member is down (else alive).
#[derive(Debug, Clone, Copy)]
pub struct SwimUpdate {
    /// The member's node id.
    pub node: u64,
    /// Its incarnation.
    pub incarnation: u64,
    /// Its SWIM identity's bump (renewals after being declared down).
    pub bump: u64,
    /// The address its identity carries (`GossipConfig::swim_address`), if any.
    pub addr: Option<std::net::SocketAddr>,
    /// Down, else alive.
    pub down: bool,
}

impl SwimUpdate {
    /// An update about the identity (`node`, `incarnation`, `bump`), without an address:
    /// the member down, or else alive.
    pub fn new(node: u64, incarnation: u64, bump: u64, down: bool) -> Self {
        Self { node, incarnation, bump, addr: None, down }
    }
}

/// What a SWIM packet of [`swim_packet`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwimKind {
    /// Updates only.
    Gossip,
    /// "You were declared down" (the receiver renews its identity).
    TurnUndead,
}

/// A SWIM packet from `from` whose header names node `src` as its sender and `to` (a
/// replica and a bump) as its addressee, carrying `updates`.
pub fn swim_packet(
    from: ReplicaId,
    src: u64,
    to: (ReplicaId, u64),
    kind: SwimKind,
    updates: &[SwimUpdate],
) -> Result<Vec<u8>, EncodeError> {
    use crate::swim::SwimId;
    use bytes::BufMut;
    use foca::Codec;
    let message = match kind {
        SwimKind::Gossip => foca::Message::Gossip,
        SwimKind::TurnUndead => foca::Message::TurnUndead,
    };
    let header = foca::Header {
        src: SwimId::new(src, from.incarnation, 0),
        src_incarnation: 0,
        dst: SwimId::new(to.0.node, to.0.incarnation, to.1),
        message,
    };
    let gate = crate::swim::Gate { known: updates.iter().map(|u| u.node).collect(), unknown_room: 0 };
    let mut codec = codec::SwimCodec::new(std::sync::Arc::new(parking_lot::Mutex::new(gate)));
    let mut packet = bytes::BytesMut::new();
    codec.encode_header(&header, &mut packet).map_err(|_| EncodeError::Other)?;
    if !updates.is_empty() {
        packet.put_u16(u16::try_from(updates.len()).map_err(|_| EncodeError::TooLarge)?);
    }
    for u in updates {
        let state = if u.down { foca::State::Down } else { foca::State::Alive };
        let id = SwimId { addr: u.addr, ..SwimId::new(u.node, u.incarnation, u.bump) };
        codec.encode_member(&foca::Member::new(id, 0, state), &mut packet).map_err(|_| EncodeError::Other)?;
    }
    Ok(packet.to_vec())
}
