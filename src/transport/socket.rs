//! The endpoint's UDP socket, with fault hooks: drop every packet to or from chosen
//! addresses (a partition), or all of them (a crash that says nothing).
//!
//! Faults act below QUIC, so they look like a real network fault to everything above:
//! datagrams and stream packets vanish, QUIC retransmits, connections time out, the
//! driver reconnects once the fault heals.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::RwLock;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// The faults in force on one endpoint's socket.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// Fast path: false while no fault is set.
    any: AtomicBool,
    /// Drop everything (set when a node is aborted, so nothing it says on the way out
    /// reaches anyone).
    isolated: AtomicBool,
    blocked: RwLock<HashSet<SocketAddr>>,
    /// Packets dropped by a fault, both directions.
    pub(crate) dropped: AtomicU64,
}

impl Faults {
    pub(crate) fn block(&self, addr: SocketAddr) {
        self.blocked.write().insert(addr);
        self.refresh();
    }

    pub(crate) fn unblock(&self, addr: SocketAddr) {
        self.blocked.write().remove(&addr);
        self.refresh();
    }

    pub(crate) fn heal(&self) {
        self.blocked.write().clear();
        self.refresh();
    }

    pub(crate) fn isolate(&self) {
        self.isolated.store(true, Ordering::SeqCst);
        self.any.store(true, Ordering::SeqCst);
    }

    pub(crate) fn blocked(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self.blocked.read().iter().copied().collect();
        v.sort();
        v
    }

    fn refresh(&self) {
        let any = self.isolated.load(Ordering::SeqCst) || !self.blocked.read().is_empty();
        self.any.store(any, Ordering::SeqCst);
    }

    #[inline]
    fn drops(&self, addr: &SocketAddr) -> bool {
        if !self.any.load(Ordering::Relaxed) {
            return false;
        }
        let drop = self.isolated.load(Ordering::Relaxed) || self.blocked.read().contains(addr);
        if drop {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        drop
    }
}

/// A socket that applies [`Faults`] around the runtime's UDP socket.
pub(crate) struct FaultySocket {
    pub(crate) inner: Arc<dyn AsyncUdpSocket>,
    pub(crate) faults: Arc<Faults>,
}

impl fmt::Debug for FaultySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultySocket").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for FaultySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if self.faults.drops(&transmit.destination) {
            return Ok(()); // lost on the way
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(&self, cx: &mut Context<'_>, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> Poll<io::Result<usize>> {
        loop {
            match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => {
                    let mut kept = 0;
                    for m in meta.iter_mut().take(n) {
                        if self.faults.drops(&m.addr) {
                            m.len = 0; // quinn skips an empty buffer
                        } else {
                            kept += 1;
                        }
                    }
                    if kept > 0 {
                        return Poll::Ready(Ok(n));
                    }
                    // Everything was dropped: read again (or register for wake-up).
                }
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
