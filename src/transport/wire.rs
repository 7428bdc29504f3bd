//! The driver's own framing, around the gossip core's opaque messages.
//!
//! * A QUIC **datagram** carries exactly one gossip core message, unframed.
//! * Each side of a connection opens **one unidirectional stream** and writes frames on
//!   it for the connection's lifetime: `kind: u8, len: u32 LE, payload`. The first frame
//!   is always [`Frame::Hello`]. Frames on one stream arrive in order, so a full sync
//!   followed by [`Frame::SyncDone`] arrives complete before the marker.
//!
//! Decoding never panics: a malformed frame is an error and the connection is closed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Largest frame payload accepted: the largest gossip message (65,000 bytes) with room.
pub(crate) const MAX_FRAME: usize = 65_536;
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
