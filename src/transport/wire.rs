//! The driver's own framing, around the gossip core's opaque messages.
//!
//! * A QUIC **datagram** carries exactly one gossip core message, unframed.
//! * Each side of a connection opens **one unidirectional stream** and writes frames on
//!   it for the connection's lifetime: `kind: u8, len: u32 LE, payload`. The first frame
//!   is always [`Frame::Hello`]. Frames on one stream arrive in order, so a full sync
//!   followed by [`Frame::SyncDone`] arrives complete before the marker.
//!
//! Decoding never panics: a malformed frame is an error and the connection is closed.
//!
//! # One maximum for every message
//! A frame's payload may be as long as the largest message the codec accepts
//! ([`MAX_DECODE_BYTES`](crate::MAX_DECODE_BYTES), 1 MiB): whatever the gossip core may
//! legally send — a limits register of the largest legal size included — passes the
//! frame reader. A [`Frame::Members`] frame is at most 256 × 283 bytes, far below it.
//! [`FrameDecoder`] is the reader: it buffers at most one frame plus one read chunk.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Largest frame payload accepted: exactly the codec's maximum message, so every message
/// the codec accepts fits one frame, and the frame reader never buffers more.
pub(crate) const MAX_FRAME: usize = crate::codec::MAX_DECODE_BYTES;
/// The most members one [`Frame::Members`] may list.
pub(crate) const MAX_MEMBERS_PER_FRAME: usize = 256;
/// Frame header: kind and length.
pub(crate) const HEADER: usize = 5;

const HELLO: u8 = 1;
const GOSSIP: u8 = 2;
const MEMBERS: u8 = 3;
const SYNC_DONE: u8 = 4;
const HELLO_VERSION: u8 = 1;

/// What a node says first on every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    /// Where the sender can be dialed.
    pub(crate) addr: SocketAddr,
    /// The sender's incarnation.
    pub(crate) incarnation: u64,
    /// For the dialing side: its dial sequence number (later dials are higher); 0 from
    /// the accepting side.
    pub(crate) dial_seq: u64,
    /// `key_hash` of a fixed probe string: equal on both sides iff they share the hash
    /// secret, without revealing it.
    pub(crate) key_probe: u64,
}

/// One member as [`Frame::Members`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MemberEntry {
    pub(crate) name: String,
    pub(crate) incarnation: u64,
    pub(crate) addr: SocketAddr,
}

/// A frame on a connection's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    Hello(Hello),
    /// One gossip core message.
    Gossip(Vec<u8>),
    /// Members the sender is connected to.
    Members(Vec<MemberEntry>),
    /// Everything of a full sync has been written before this frame.
    SyncDone,
    /// A kind this version does not know: ignored, for forward compatibility.
    Unknown(u8),
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("frame of {0} bytes exceeds the maximum")]
    TooLong(usize),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("stream ended inside a frame ({0} bytes buffered)")]
    Truncated(usize),
}

/// The frame reader: bytes of one stream go in as they arrive, whole frames come out.
/// A header announcing more than [`MAX_FRAME`] is refused as soon as it arrives, before
/// its payload is read. Sans-IO, so the QUIC driver and the fuzz target run the same code.
#[derive(Debug, Default)]
pub(crate) struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as frames.
    pos: usize,
}

impl FrameDecoder {
    /// Appends bytes read from the stream. Call [`next_frame`](Self::next_frame) until it
    /// returns `Ok(None)` before pushing more: the buffer then holds less than one frame.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed, or the first error
    /// (after which the stream is to be abandoned).
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let rest = &self.buf[self.pos..];
        let Some(header) = rest.get(..HEADER) else { return Ok(None) };
        let (kind, len) = Frame::header(header.try_into().map_err(|_| FrameError::Malformed("header"))?)?;
        let Some(payload) = rest.get(HEADER..HEADER + len) else { return Ok(None) };
        let frame = Frame::decode(kind, payload.to_vec())?;
        self.pos += HEADER + len;
        Ok(Some(frame))
    }

    /// The stream ended: an error if it ended inside a frame.
    pub(crate) fn finish(&self) -> Result<(), FrameError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(FrameError::Truncated(n)),
        }
    }

    /// Bytes held (at most one frame plus the last push).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }
}

impl Frame {
    /// The encoded frame, header included.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        let kind = match self {
            Frame::Hello(h) => {
                p.push(HELLO_VERSION);
                p.extend_from_slice(&h.incarnation.to_le_bytes());
                p.extend_from_slice(&h.dial_seq.to_le_bytes());
                p.extend_from_slice(&h.key_probe.to_le_bytes());
                put_addr(&mut p, h.addr);
                HELLO
            }
            Frame::Gossip(bytes) => {
                p.extend_from_slice(bytes);
                GOSSIP
            }
            Frame::Members(members) => {
                // Longer lists are split by the sender (`member_frames`); a longer one here
                // would be a bug, and the receiver would refuse it whole.
                debug_assert!(members.len() <= MAX_MEMBERS_PER_FRAME, "a member list longer than one frame");
                let members = &members[..members.len().min(MAX_MEMBERS_PER_FRAME)];
                p.extend_from_slice(&(members.len() as u16).to_le_bytes());
                for m in members {
                    let name = &m.name.as_bytes()[..m.name.len().min(255)];
                    p.push(name.len() as u8);
                    p.extend_from_slice(name);
                    p.extend_from_slice(&m.incarnation.to_le_bytes());
                    put_addr(&mut p, m.addr);
                }
                MEMBERS
            }
            Frame::SyncDone => SYNC_DONE,
            Frame::Unknown(kind) => *kind,
        };
        let mut out = Vec::with_capacity(HEADER + p.len());
        out.push(kind);
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(&p);
        out
    }

    /// Parses a frame header: the kind and the payload length (checked).
    pub(crate) fn header(h: [u8; HEADER]) -> Result<(u8, usize), FrameError> {
        let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLong(len));
        }
        Ok((h[0], len))
    }

    /// Decodes a frame's payload.
    pub(crate) fn decode(kind: u8, payload: Vec<u8>) -> Result<Frame, FrameError> {
        match kind {
            HELLO => {
                let mut r = Reader(&payload);
                let bad = FrameError::Malformed("hello");
                if r.u8().ok_or(bad.clone())? != HELLO_VERSION {
                    return Err(bad);
                }
                let incarnation = r.u64().ok_or(bad.clone())?;
                let dial_seq = r.u64().ok_or(bad.clone())?;
                let key_probe = r.u64().ok_or(bad.clone())?;
                let addr = r.addr().ok_or(bad.clone())?;
                if !r.0.is_empty() {
                    return Err(bad);
                }
                Ok(Frame::Hello(Hello { addr, incarnation, dial_seq, key_probe }))
            }
            GOSSIP => Ok(Frame::Gossip(payload)),
            MEMBERS => {
                let mut r = Reader(&payload);
                let bad = FrameError::Malformed("members");
                let n = r.u16().ok_or(bad.clone())? as usize;
                if n > MAX_MEMBERS_PER_FRAME {
                    return Err(bad);
                }
                let mut members = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = r.u8().ok_or(bad.clone())? as usize;
                    let name = r.take(len).ok_or(bad.clone())?;
                    let name = String::from_utf8(name.to_vec()).map_err(|_| bad.clone())?;
                    let incarnation = r.u64().ok_or(bad.clone())?;
                    let addr = r.addr().ok_or(bad.clone())?;
                    members.push(MemberEntry { name, incarnation, addr });
                }
                if !r.0.is_empty() {
                    return Err(bad);
                }
                Ok(Frame::Members(members))
            }
            SYNC_DONE if payload.is_empty() => Ok(Frame::SyncDone),
            SYNC_DONE => Err(FrameError::Malformed("sync-done")),
            other => Ok(Frame::Unknown(other)),
        }
    }
}

fn put_addr(p: &mut Vec<u8>, addr: SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            p.push(4);
            p.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            p.push(6);
            p.extend_from_slice(&ip.octets());
        }
    }
    p.extend_from_slice(&addr.port().to_le_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }

    fn addr(&mut self) -> Option<SocketAddr> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(self.take(4)?).ok()?)),
            6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(self.take(16)?).ok()?)),
            _ => return None,
        };
        Some(SocketAddr::new(ip, self.u16()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: Frame) {
        let bytes = f.encode();
        let (kind, len) = Frame::header(bytes[..HEADER].try_into().unwrap()).unwrap();
        assert_eq!(len, bytes.len() - HEADER);
        assert_eq!(Frame::decode(kind, bytes[HEADER..].to_vec()).unwrap(), f);
    }

    /// Runs `bytes` through the frame reader in pieces of `piece` bytes.
    fn read_all(bytes: &[u8], piece: usize) -> Result<Vec<Frame>, FrameError> {
        let mut reader = FrameDecoder::default();
        let mut out = Vec::new();
        for chunk in bytes.chunks(piece) {
            reader.push(chunk);
            while let Some(f) = reader.next_frame()? {
                out.push(f);
            }
            assert!(reader.buffered() < HEADER + MAX_FRAME + piece);
        }
        reader.finish()?;
        Ok(out)
    }

    #[test]
    fn the_largest_legal_message_of_every_kind_passes_the_frame_reader_whole() {
        let addr: SocketAddr = "[ffff::ffff]:65535".parse().unwrap();
        let name = "n".repeat(255);
        let members =
            (0..MAX_MEMBERS_PER_FRAME).map(|i| MemberEntry { name: format!("{i:0255}"), incarnation: u64::MAX, addr }).collect::<Vec<_>>();
        assert_eq!(members[0].name.len(), name.len());
        let mut stream = Vec::new();
        let mut sent = Vec::new();
        for (kind, bytes) in crate::codec::largest_legal_messages() {
            let f = Frame::Gossip(bytes);
            stream.extend_from_slice(&f.encode());
            sent.push((kind, f));
        }
        let f = Frame::Members(members);
        stream.extend_from_slice(&f.encode());
        sent.push(("members", f));
        for piece in [1 << 16, 1200, 7] {
            let got = read_all(&stream, piece).unwrap();
            assert_eq!(got.len(), sent.len());
            for ((kind, want), got) in sent.iter().zip(&got) {
                assert_eq!(want, got, "{kind}");
                if let Frame::Gossip(b) = got {
                    assert!(crate::codec::decode(b).is_ok(), "{kind}");
                }
            }
        }
    }

    #[test]
    fn the_reader_refuses_an_oversized_header_before_its_payload_and_a_cut_stream() {
        let mut r = FrameDecoder::default();
        let len = (MAX_FRAME as u32 + 1).to_le_bytes();
        r.push(&[GOSSIP, len[0], len[1], len[2], len[3]]);
        assert_eq!(r.next_frame(), Err(FrameError::TooLong(MAX_FRAME + 1)));
        let bytes = Frame::Gossip(vec![1; 10]).encode();
        assert!(matches!(read_all(&bytes[..bytes.len() - 1], 4), Err(FrameError::Truncated(_))));
    }

    #[test]
    fn frames_round_trip() {
        let addr: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        round_trip(Frame::Hello(Hello { addr, incarnation: 7, dial_seq: 3, key_probe: u64::MAX }));
        round_trip(Frame::Gossip(vec![1, 2, 3]));
        round_trip(Frame::Members(vec![
            MemberEntry { name: "node-a".into(), incarnation: 1, addr },
            MemberEntry { name: "node-b.cluster".into(), incarnation: 2, addr: v6 },
        ]));
        round_trip(Frame::SyncDone);
        round_trip(Frame::Unknown(200));
    }

    #[test]
    fn truncated_or_oversized_frames_are_errors_not_panics() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for f in [
            Frame::Hello(Hello { addr, incarnation: 1, dial_seq: 0, key_probe: 2 }),
            Frame::Members(vec![MemberEntry { name: "n".into(), incarnation: 1, addr }]),
        ] {
            let bytes = f.encode();
            for cut in HEADER..bytes.len() {
                assert!(Frame::decode(bytes[0], bytes[HEADER..cut].to_vec()).is_err());
            }
            let mut long = bytes[HEADER..].to_vec();
            long.push(0);
            assert!(Frame::decode(bytes[0], long).is_err());
        }
        assert_eq!(Frame::header([GOSSIP, 0xFF, 0xFF, 0xFF, 0xFF]), Err(FrameError::TooLong(u32::MAX as usize)));
        assert!(Frame::decode(MEMBERS, vec![0xFF, 0xFF]).is_err());
        assert!(Frame::decode(SYNC_DONE, vec![1]).is_err());
        assert!(Frame::decode(HELLO, vec![9; 50]).is_err());
    }
}
