//! Fault hooks for tests and the demo: not a stable API.
//!
//! They drop packets below QUIC (as a partition does) and stop a member as a crash would.
//! Bring them in with `use crdt_rate_limiter::transport::faults::FaultHooks as _;`.

use std::net::SocketAddr;

use super::Cluster;
use crate::gossip::PeerId;

/// Partitions and crashes, on a running [`Cluster`] member.
pub trait FaultHooks {
    /// Drops every packet to or from `peer` (at every address known for it) from now on,
    /// below QUIC. Returns whether an address was known.
    fn block_peer(&self, peer: PeerId) -> bool;
    /// Lifts [`block_peer`](Self::block_peer).
    fn unblock_peer(&self, peer: PeerId);
    /// Drops every packet to or from `addr`.
    fn block_addr(&self, addr: SocketAddr);
    /// Lifts [`block_addr`](Self::block_addr).
    fn unblock_addr(&self, addr: SocketAddr);
    /// Lifts every block.
    fn heal(&self);
    /// Addresses currently blocked.
    fn blocked(&self) -> Vec<SocketAddr>;
    /// Stops at once, as a crash would. Nothing more leaves this node (not even the
    /// connection close); peers find out from silence.
    fn abort(self)
    where
        Self: Sized;
}

impl FaultHooks for Cluster {
    fn block_peer(&self, peer: PeerId) -> bool {
        let addrs = self.shared.peer_addrs(peer);
        for a in &addrs {
            self.shared.faults.block(*a);
        }
        !addrs.is_empty()
    }

    fn unblock_peer(&self, peer: PeerId) {
        for a in self.shared.peer_addrs(peer) {
            self.shared.faults.unblock(a);
        }
    }

    fn block_addr(&self, addr: SocketAddr) {
        self.shared.faults.block(addr);
    }

    fn unblock_addr(&self, addr: SocketAddr) {
        self.shared.faults.unblock(addr);
    }

    fn heal(&self) {
        self.shared.faults.heal();
    }

    fn blocked(&self) -> Vec<SocketAddr> {
        self.shared.faults.blocked()
    }

    fn abort(self) {
        self.shared.faults.isolate();
        self.shared.abort_tasks();
    }
}
