//! The QUIC transport: runs a [`GossipNode`](crate::GossipNode) between service instances over quinn, with
//! mutual TLS from a cluster CA. Behind the `quic` feature (on by default).
//!
//! ```no_run
//! use crdt_rate_limiter::transport::{ClusterConfig, TlsSource};
//! use crdt_rate_limiter::{Quota, RateLimiter};
//! use std::time::Duration;
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let tls = TlsSource::files("certs/ca.pem", "certs/node-a.pem", "certs/node-a.key");
//! let config = ClusterConfig { seeds: vec!["10.0.0.2:7000".parse()?], ..ClusterConfig::new(tls, "0.0.0.0:7000".parse()?) };
//! let (limiter, cluster) = RateLimiter::builder()
//!     .quota(Quota::new(100, Duration::from_secs(1))?)
//!     .hash_secret(*b"same on all node") // every member must use the same secret
//!     .cluster(config)
//!     .start()
//!     .await?;
//! if limiter.allow_now("client-42") { /* serve */ }
//! println!("{:?}", cluster.stats());
//! cluster.shutdown().await; // announces the leave
//! # Ok(()) }
//! ```
//!
//! # How it runs
//! One quinn endpoint per instance is both server and client. One tokio task owns the
//! [`GossipNode`](crate::GossipNode) (behind a mutex the [`Cluster`] handle also reads): it takes received
//! messages and timer ticks in, and sends what the node polls out. Per connection, tasks
//! read datagrams, read the peer's stream, write ours, and watch for the close.
//!
//! * Deltas and heartbeats go as QUIC datagrams (at most `max_datagram_size()`; a larger
//!   message falls back to the stream). Full syncs and repairs
//!   ([`Transmit::reliable`](crate::gossip::Transmit::reliable)) go on one long-lived unidirectional stream
//!   per connection and direction, framed (kind, length, payload); its first frame says
//!   who is speaking (incarnation, address, a fingerprint of the hash secret).
//! * **Identity.** Both sides present a certificate the cluster CA signed (mutual TLS 1.3,
//!   rustls with the ring provider passed explicitly, 0-RTT off). A node's id is
//!   [`node_id`] of the name in its verified certificate; nothing from a connection is
//!   merged before both the handshake and the first frame checked out, and the core
//!   refuses any message signed as another node.
//! * **Bounded.** Handshakes and the first frame have a deadline; incoming connections are
//!   capped; each peer's stream queue is bounded (a full queue drops the newest frame,
//!   counted; anti-entropy repairs); quinn's datagram buffer is bounded (it drops the
//!   oldest).
//! * **Membership.** Static seeds, plus every authenticated member a peer reports; the
//!   core's heartbeats decide who is live. See `docs/cluster.md`.
//! * **Reconnection.** A lost connection is redialed with exponential backoff and jitter.
//!   When both sides dial at once, both keep the connection the lower node id dialed.
//!
//! The [`certs`] module generates the cluster CA and node certificates. The `tls` and
//! `faults` modules are hidden and not a stable API: the quinn configurations the driver
//! builds (public for the TLS tests) and the fault hooks that tests and the demo use to
//! partition and crash members.

pub mod certs;
mod driver;
#[doc(hidden)]
pub mod faults;
mod socket;
#[doc(hidden)]
pub mod tls;
pub(crate) mod wire;

use std::fmt;
use std::hash::Hasher;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use siphasher::sip::SipHasher13;

use crate::counter::ReplicaId;
use crate::gossip::{GossipConfig, GossipStats, PeerId, PeerStats, StateEntry, ViewEntry};
use crate::{Builder, RateLimiter};
use driver::Shared;
pub use tls::{TlsError, TlsIdentity};

/// The largest gossip message [`ClusterConfig::new`] sets: what a QUIC datagram holds
/// at the minimum path MTU (1200 bytes) with quinn's 8-byte connection ids.
pub const DATAGRAM_MESSAGE_BYTES: usize = 1162;

/// Default of [`ClusterConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`ClusterConfig::idle_timeout`]: a dead peer is noticed within 2 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default of [`ClusterConfig::keep_alive`]: a quarter of [`DEFAULT_IDLE_TIMEOUT`].
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_millis(500);
/// Default of [`ClusterConfig::max_incoming`].
pub const DEFAULT_MAX_INCOMING: usize = 256;
/// Default of [`ClusterConfig::stream_queue`].
pub const DEFAULT_STREAM_QUEUE: usize = 4096;
/// Default of [`ClusterConfig::datagram_buffer_bytes`].
pub const DEFAULT_DATAGRAM_BUFFER_BYTES: usize = 256 * 1024;
/// Default of [`ClusterConfig::reconnect_min`].
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Default of [`ClusterConfig::reconnect_max`].
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(1);
/// Default of [`ClusterConfig::join_timeout`].
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Default [`ClusterConfig::seed_refresh`]: how often seed names are resolved again.
pub const DEFAULT_SEED_REFRESH: Duration = Duration::from_secs(30);
/// The most names in [`ClusterConfig::seed_names`].
pub const MAX_SEED_NAMES: usize = 64;
/// The most addresses taken from one resolution of one seed name.
pub const MAX_ADDRS_PER_SEED_NAME: usize = 256;
/// Default of [`ClusterConfig::forget_after`].
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(60);
/// Default of [`ClusterConfig::max_dials_per_sec`].
pub const DEFAULT_MAX_DIALS_PER_SEC: u32 = 20;
/// Default of [`ClusterConfig::member_exchange`].
pub const DEFAULT_MEMBER_EXCHANGE: Duration = Duration::from_secs(5);
/// Default of [`ClusterConfig::close_unused_after`].
pub const DEFAULT_CLOSE_UNUSED_AFTER: Duration = Duration::from_secs(5);
/// The longest [`ClusterConfig::member_exchange`] (longer would be off in all but name).
pub const MAX_MEMBER_EXCHANGE: Duration = Duration::from_secs(86_400);

/// The SipHash-1-3 key of [`node_id`]: the ASCII bytes `crdt-rl/` and `node-id\0`, each
/// read as a little-endian `u64`. Fixed forever: changing it renames every node.
pub const NODE_ID_KEY: (u64, u64) = (u64::from_le_bytes(*b"crdt-rl/"), u64::from_le_bytes(*b"node-id\0"));

/// The node id of a node name: SipHash-1-3 with the fixed key [`NODE_ID_KEY`] of the
/// name in ASCII lowercase (DNS names are case-insensitive), never 0 (the id of a
/// limiter on its own). Stable across restarts, versions and machines; the same on
/// every member, which computes it from the peer's verified certificate.
///
/// ```
/// use crdt_rate_limiter::transport::node_id;
/// assert_eq!(node_id("node-a"), node_id("NODE-A"));
/// assert_ne!(node_id("node-a"), node_id("node-b"));
/// ```
pub fn node_id(name: &str) -> PeerId {
    let mut h = SipHasher13::new_with_keys(NODE_ID_KEY.0, NODE_ID_KEY.1);
    h.write(name.to_ascii_lowercase().as_bytes());
    h.finish().max(1)
}

/// The next incarnation: the Unix ms now, or one more than the last one this process
/// handed out if that is later (two starts in the same millisecond, or a clock that
/// stepped back). Monotone across restarts without storing anything, as long as a
/// restart takes longer than the clock's error.
fn next_incarnation(now_ms: i64) -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = u64::try_from(now_ms).unwrap_or(0);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// Where a node's certificate comes from.
#[derive(Clone)]
pub enum TlsSource {
    /// PEM files: the cluster CA certificate, this node's certificate (chain), its key.
    Files {
        /// The cluster CA certificate.
        ca: PathBuf,
        /// This node's certificate, optionally followed by intermediates.
        cert: PathBuf,
        /// This node's private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// An identity already loaded.
    Identity(TlsIdentity),
}

impl TlsSource {
    /// PEM files: the cluster CA certificate, this node's certificate, its key.
    pub fn files(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        Self::Files { ca: ca.into(), cert: cert.into(), key: key.into() }
    }

    fn load(&self) -> Result<TlsIdentity, TlsError> {
        match self {
            Self::Files { ca, cert, key } => TlsIdentity::from_pem_files(ca, cert, key),
            Self::Identity(id) => Ok(id.clone()),
        }
    }
}

impl From<TlsIdentity> for TlsSource {
    fn from(id: TlsIdentity) -> Self {
        Self::Identity(id)
    }
}

impl fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Files { ca, cert, key } => f.debug_struct("Files").field("ca", ca).field("cert", cert).field("key", key).finish(),
            Self::Identity(id) => f.debug_tuple("Identity").field(id).finish(),
        }
    }
}

/// Settings of a cluster member. [`ClusterConfig::new`] gives every default; change
/// fields with struct update syntax. Durations are validated by [`Cluster::start`].
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's certificate and the cluster CA. The node's name is the first DNS
    /// SubjectAltName of its certificate; its id is [`node_id`] of that name.
    pub tls: TlsSource,
    /// The UDP address to bind (both server and client). Port 0 picks a free one.
    pub listen: SocketAddr,
    /// The address peers should dial, told to every peer. Default: the bound address
    /// (set it when binding `0.0.0.0` or behind NAT).
    pub advertise: Option<SocketAddr>,
    /// Addresses to join through. Their names come from their certificates. A node may
    /// list itself; that entry is skipped. With the addresses `seed_names` resolve to,
    /// at most 1,024 (the rest are left out, with a warning); each is dialled at once at
    /// start, outside `max_dials_per_sec`.
    pub seeds: Vec<SocketAddr>,
    /// `host:port` names to join through, resolved with the system resolver (a headless
    /// service's name resolves to every instance): at start, before the join, and again
    /// every `seed_refresh`; every address found is dialled as a seed, so instances that
    /// appear later are found too. At most [`MAX_SEED_NAMES`] names and
    /// [`MAX_ADDRS_PER_SEED_NAME`] addresses per name and resolution; a name that does not
    /// resolve is logged (warn) and tried again at the next refresh.
    pub seed_names: Vec<String>,
    /// How often `seed_names` are resolved again. Default [`DEFAULT_SEED_REFRESH`] (30 s);
    /// zero: only at start.
    pub seed_refresh: Duration,
    /// The gossip core's settings. Its `replica` is replaced: the node id from the
    /// certificate and a fresh incarnation (the Unix ms at start). Default: the core's
    /// defaults with `max_message_bytes` = [`DATAGRAM_MESSAGE_BYTES`].
    pub gossip: GossipConfig,
    /// How long a TLS handshake and the peer's first frame may take. Default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`] (5 s).
    pub handshake_timeout: Duration,
    /// A connection silent this long is closed (QUIC idle timeout). Default
    /// [`DEFAULT_IDLE_TIMEOUT`] (2 s); more than `keep_alive`.
    pub idle_timeout: Duration,
    /// QUIC keep-alive interval. Default [`DEFAULT_KEEP_ALIVE`] (500 ms).
    pub keep_alive: Duration,
    /// Cap on incoming connections, handshakes included; more are refused. Default
    /// [`DEFAULT_MAX_INCOMING`] (256).
    pub max_incoming: usize,
    /// Frames queued per peer for its stream; when full the newest is dropped and
    /// counted, and the next full sync to that peer is not announced complete (a node
    /// joining through this one waits for `join_timeout` and says so; anti-entropy
    /// repairs the counts). Default [`DEFAULT_STREAM_QUEUE`] (4096; with 1162-byte
    /// messages, about 4.5 MiB per peer at worst).
    pub stream_queue: usize,
    /// Bytes of datagrams quinn buffers per connection, each way; when full it drops the
    /// oldest. Default [`DEFAULT_DATAGRAM_BUFFER_BYTES`] (256 KiB).
    pub datagram_buffer_bytes: usize,
    /// First reconnection delay; doubles per failure up to `reconnect_max`, each drawn
    /// with jitter between half and all of it. Default [`DEFAULT_RECONNECT_MIN`] (100 ms).
    pub reconnect_min: Duration,
    /// Longest reconnection delay. Default [`DEFAULT_RECONNECT_MAX`] (1 s).
    pub reconnect_max: Duration,
    /// A member that is not a seed (learned from another member's list, or one that
    /// dialled this node) and has been unreachable this long is forgotten: no more dials to it until a member announces it again (on
    /// connecting, or in its periodic list, `member_exchange`, if some member is still
    /// connected to it: dials then resume, within `max_dials_per_sec`, backing off from
    /// `reconnect_min`). A member the core counts live is never forgotten, and one whose
    /// connection closed unused (`close_unused_after`) is unreachable from when the core
    /// takes it down. Default [`DEFAULT_FORGET_AFTER`] (60 s).
    pub forget_after: Duration,
    /// Dials started per second, every address together (a token bucket holding one
    /// second's worth; members connected before are dialed first). The first dial of each
    /// seed known at start (at most 1,024), and while [`Cluster::start`] waits, of each
    /// aggregator pool member (at most `gossip.aggregator_pool`), is outside it, so that a
    /// node given many seeds, or seeds outside the pool, joins through them all at once.
    /// Default [`DEFAULT_MAX_DIALS_PER_SEC`] (20).
    pub max_dials_per_sec: u32,
    /// Membership anti-entropy: every this long the node sends the members it is
    /// connected to, or was until the connection closed unused (`close_unused_after`),
    /// in frames of at most 256, to one member it is connected to, drawn at random, so a
    /// member missed when it connected (an announcement dropped on a full queue, two
    /// members that forgot each other across a partition longer than `forget_after`) is
    /// learned again once a member connected to it sends its list here: each period
    /// with probability about `1 / members` per such member. Zero turns it off (members
    /// are then exchanged only when a connection comes up); at most one day
    /// ([`MAX_MEMBER_EXCHANGE`]). Default [`DEFAULT_MEMBER_EXCHANGE`] (5 s).
    pub member_exchange: Duration,
    /// A partial view of connections beyond `gossip.swim_above_peers` peers plus an eighth
    /// of it (with `gossip.partial_view`): a member outside the aggregator pool keeps
    /// connections open to the pool's members only (`docs/cluster.md`, "A partial view of
    /// connections"). A connection to any other member is dialled when the core has
    /// something to send it (a SWIM probe, an answer, an ask; its messages wait for the
    /// connection, at most 64 for at most 2 s), and closed once it has carried nothing of
    /// the core's for this long. Every member the driver learns of is still dialled once
    /// (again when it restarts), so that the core hears of it from itself. A member whose
    /// connection closed unused counts as unreachable (`forget_after`) only once the core
    /// takes it down. Zero keeps every connection open (a full mesh of connections, as
    /// below the threshold). Default [`DEFAULT_CLOSE_UNUSED_AFTER`] (5 s).
    pub close_unused_after: Duration,
    /// Membership by infection beyond `gossip.swim_above_peers` peers: this node's SWIM
    /// identity carries its advertised address (`gossip.swim_address`), and its SWIM the
    /// addresses it reached its peers at, so that a member that learns of a newcomer (or
    /// a restart) through SWIM's piggybacking, from any member, adds it at that address
    /// and dials it, without waiting for a member list (`docs/cluster.md`, "Membership by
    /// infection"). With an unspecified advertised address (`0.0.0.0`, `::`: set
    /// `advertise`), or false, SWIM carries no address and this node announces newcomers
    /// with member lists. A graceful leave is gossiped by SWIM either way. Default true.
    /// A version from before it cannot read SWIM identities with addresses: to upgrade a
    /// cluster of more than 129 members from such a version, start the new version with
    /// this false, and set it true once every member runs the new version.
    pub membership_by_swim: bool,
    /// How long [`Cluster::start`] waits for every seed (and with aggregated dissemination,
    /// every aggregator pool member) to answer with a full sync, to refuse this node, or
    /// to fail to connect once, before it returns; seeds that have not answered by then
    /// are logged (warn: the first 8 by address, then their number), and pool members in
    /// one line.
    /// Default [`DEFAULT_JOIN_TIMEOUT`] (3 s); zero returns at once (and so never reports
    /// [`ClusterError::SeedsRefused`]).
    pub join_timeout: Duration,
    /// Seed of the gossip core's randomness. Default: derived from the node id and
    /// incarnation.
    pub rng_seed: Option<u64>,
}

impl ClusterConfig {
    /// Every default, for the node `tls` names, bound to `listen`.
    pub fn new(tls: impl Into<TlsSource>, listen: SocketAddr) -> Self {
        let mut gossip = GossipConfig::new(ReplicaId::LOCAL);
        gossip.max_message_bytes = DATAGRAM_MESSAGE_BYTES;
        Self {
            tls: tls.into(),
            listen,
            advertise: None,
            seeds: Vec::new(),
            seed_names: Vec::new(),
            seed_refresh: DEFAULT_SEED_REFRESH,
            gossip,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keep_alive: DEFAULT_KEEP_ALIVE,
            max_incoming: DEFAULT_MAX_INCOMING,
            stream_queue: DEFAULT_STREAM_QUEUE,
            datagram_buffer_bytes: DEFAULT_DATAGRAM_BUFFER_BYTES,
            reconnect_min: DEFAULT_RECONNECT_MIN,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            forget_after: DEFAULT_FORGET_AFTER,
            max_dials_per_sec: DEFAULT_MAX_DIALS_PER_SEC,
            member_exchange: DEFAULT_MEMBER_EXCHANGE,
            close_unused_after: DEFAULT_CLOSE_UNUSED_AFTER,
            membership_by_swim: true,
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            rng_seed: None,
        }
    }

    fn validate(&self) -> Result<(), ClusterError> {
        let bad = |field, reason| Err(ClusterError::Config { field, reason });
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout", "must be more than zero");
        }
        if self.seed_names.len() > MAX_SEED_NAMES {
            return bad("seed_names", "at most MAX_SEED_NAMES (64) names");
        }
        if self
            .seed_names
            .iter()
            .any(|n| n.len() > 260 || n.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()))
        {
            return bad("seed_names", "each must be host:port, at most 260 bytes");
        }
        if self.keep_alive.is_zero() || self.keep_alive >= self.idle_timeout {
            return bad("keep_alive", "must be more than zero and less than idle_timeout");
        }
        if quinn::IdleTimeout::try_from(self.idle_timeout).is_err() {
            return bad("idle_timeout", "too long for QUIC");
        }
        if self.max_incoming == 0 {
            return bad("max_incoming", "must be at least 1");
        }
        if self.stream_queue == 0 {
            return bad("stream_queue", "must be at least 1");
        }
        if self.datagram_buffer_bytes < 2 * 1500 {
            return bad("datagram_buffer_bytes", "must hold at least two datagrams (3000 bytes)");
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return bad("reconnect_min", "must be more than zero and at most reconnect_max");
        }
        if self.member_exchange > MAX_MEMBER_EXCHANGE {
            return bad("member_exchange", "at most MAX_MEMBER_EXCHANGE (one day); zero turns it off");
        }
        if self.forget_after.is_zero() {
            return bad("forget_after", "must be more than zero");
        }
        if self.max_dials_per_sec == 0 {
            return bad("max_dials_per_sec", "must be at least 1");
        }
        Ok(())
    }
}

/// Why a cluster member could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The certificate, key or CA could not be loaded or used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The certificate names no node (it has no DNS SubjectAltName).
    #[error("the node certificate has no DNS SubjectAltName to name the node")]
    NoNodeName,
    /// A setting is out of its documented range.
    #[error("invalid cluster configuration for {field}: {reason}")]
    Config {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The limiter or the gossip core refused its configuration.
    #[error(transparent)]
    Limiter(#[from] crate::ConfigError),
    /// Binding the UDP socket or creating the endpoint failed.
    #[error("cannot open the QUIC endpoint: {0}")]
    Io(#[from] std::io::Error),
    /// Not called from within a tokio runtime.
    #[error("Cluster::start must run inside a tokio runtime")]
    NoRuntime,
    /// The limiter was built without [`Builder::hash_secret`]. Its default, random per
    /// process, would make every member hash client ids its own way: members would refuse
    /// each other and each admit the full limit.
    #[error(
        "the limiter has no hash secret: build it with Builder::hash_secret, the same on every member \
         (a secret of its own per process would let each member admit the full limit)"
    )]
    MissingHashSecret,
    /// Every seed refused this node, or this node refused every seed, within
    /// [`ClusterConfig::join_timeout`]: which, and why.
    #[error("every seed refused this node: {}", list_refusals(.0))]
    SeedsRefused(Vec<Refusal>),
}

fn list_refusals(list: &[Refusal]) -> String {
    list.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Why a peer and this node could not work together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalReason {
    /// It hashes client ids with another secret: the fingerprints of the hash secret in
    /// the two first frames differ ([`Builder::hash_secret`]).
    HashSecret,
    /// The TLS handshake failed: its certificate was refused, or it refused ours (signed
    /// by another CA, expired, not for client or server use).
    Certificate,
    /// Its certificate names no node, or another node than the one dialed.
    Identity,
}

impl RefusalReason {
    /// The `reason` label of the metric [`crate::metrics`] publishes:
    /// `hash_secret`, `certificate` or `identity`.
    pub fn label(self) -> &'static str {
        match self {
            Self::HashSecret => "hash_secret",
            Self::Certificate => "certificate",
            Self::Identity => "identity",
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HashSecret => "another hash secret",
            Self::Certificate => "certificate refused",
            Self::Identity => "wrong node identity",
        })
    }
}

/// A peer refused (by this node or by the peer), kept until a connection to it works.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Refusal {
    /// Where it was dialed, or where it connected from.
    pub addr: SocketAddr,
    /// Its name, when its certificate was read.
    pub peer: Option<String>,
    /// Whether it is one of this node's seeds.
    pub seed: bool,
    /// The kind of refusal.
    pub reason: RefusalReason,
    /// What happened, in words.
    pub detail: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if let Some(p) = &self.peer {
            write!(f, " ({p})")?;
        }
        write!(f, ": {}: {}", self.reason, self.detail)
    }
}

/// A member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Member {
    /// Its node id ([`node_id`] of its name).
    pub id: PeerId,
    /// Its name, from its certificate (or from a peer's member list, until connected; a
    /// member learned through SWIM is `swim-` and its id in 16 hex digits until then).
    pub name: String,
    /// Where it is dialed.
    pub addr: Option<SocketAddr>,
    /// Its incarnation, once connected.
    pub incarnation: Option<u64>,
    /// Whether a connection to it is up.
    pub connected: bool,
    /// Whether the gossip core counts it live (heard within `suspect_after_ms`).
    pub live: bool,
    /// Whether it announced its leave (and has not come back since).
    pub left: bool,
    /// Whether it is one of this node's seeds.
    pub seed: bool,
}

/// What a cluster member did so far: the gossip core's counters and the transport's.
/// All monotone except the gauges `peers`, `live_peers` and `connections`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStats {
    /// The gossip core's counters.
    pub gossip: GossipStats,
    /// Members known (gauge).
    pub peers: usize,
    /// Members the core counts live (gauge).
    pub live_peers: usize,
    /// How stale this node's view may be, in ms: over live peers (with a partial view,
    /// those in the view), the longest time since last heard plus half a round trip
    /// ([`GossipNode::view_lag_ms`](crate::GossipNode::view_lag_ms); gauge).
    pub view_lag_ms: i64,
    /// Connections up, all states (gauge).
    pub connections: usize,
    /// Gossip messages sent as datagrams.
    pub datagrams_sent: u64,
    /// Their bytes.
    pub datagram_bytes_sent: u64,
    /// Datagrams quinn refused (connection lost, datagrams unsupported).
    pub datagrams_dropped: u64,
    /// Frames queued for a peer's stream.
    pub frames_queued: u64,
    /// Their bytes, headers included.
    pub frame_bytes_queued: u64,
    /// Frames dropped because the peer's stream queue was full.
    pub frames_dropped_queue_full: u64,
    /// Messages dropped because no connection to the peer was up.
    pub dropped_no_connection: u64,
    /// Unreliable messages larger than a datagram, sent on the stream instead.
    pub oversized_to_stream: u64,
    /// Datagrams received.
    pub datagrams_received: u64,
    /// Frames received.
    pub frames_received: u64,
    /// Bytes received (datagrams and frames).
    pub bytes_received: u64,
    /// Datagrams dropped because they came before the connection's first frame.
    pub dropped_before_hello: u64,
    /// Connections dialed.
    pub dials: u64,
    /// Dials that failed (unreachable, refused, timed out).
    pub dial_failures: u64,
    /// Incoming handshakes that failed: bad or missing certificate, timeout.
    pub handshake_failures: u64,
    /// Incoming connections refused at the cap.
    pub refused_over_cap: u64,
    /// Connections closed for a protocol violation, a bad first frame or a mismatch
    /// (hash secret, name).
    pub protocol_errors: u64,
    /// Connections refused because the peer hashes with another secret (by either side;
    /// each connection counted once). See [`Cluster::refusals`].
    pub refused_hash_secret: u64,
    /// Handshakes that failed on a certificate, incoming or dialed (ours refused theirs,
    /// or theirs refused ours).
    pub refused_certificate: u64,
    /// Connections refused because the certificate named no node, or another node than
    /// the one dialed.
    pub refused_identity: u64,
    /// Packets dropped by the fault hooks.
    pub packets_dropped_by_faults: u64,
    /// Messages for a member outside the view, held while it was dialled (a partial view,
    /// [`ClusterConfig::close_unused_after`]); those never sent count in
    /// `dropped_no_connection` too.
    pub frames_held: u64,
    /// Connections to members outside the view closed unused.
    pub connections_closed_unused: u64,
    /// Members first learned of through SWIM's infection rather than a member list
    /// ([`ClusterConfig::membership_by_swim`]).
    pub members_learned_by_swim: u64,
}

impl ClusterStats {
    /// Gossip bytes put on the wire by this node: datagrams plus stream frames.
    pub fn bytes_sent(&self) -> u64 {
        self.datagram_bytes_sent + self.frame_bytes_queued
    }
}

/// A running cluster member: membership, stats and shutdown.
///
/// Dropping it stops the member at once without announcing the leave (like the `abort`
/// fault hook, except that closing connections still reach the peers).
pub struct Cluster {
    shared: Arc<Shared>,
    limiter: RateLimiter,
    shut_down: AtomicBool,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.shared.me.name)
            .field("id", &self.shared.me.id)
            .field("incarnation", &self.shared.me.incarnation)
            .field("addr", &self.shared.me.local_addr)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Makes `limiter` a cluster member: binds the endpoint, dials the seeds, and
    /// returns once every seed answered with a full sync, failed to connect once, or
    /// `join_timeout` passed — so a restarted node has the cluster's counts for the
    /// current windows before it decides. With aggregated dissemination (beyond
    /// [`GossipConfig::aggregate_above_peers`](crate::GossipConfig::aggregate_above_peers)
    /// members) it also waits, the same way, for the aggregator pool among the members
    /// the seeds name (dialled at once, outside `max_dials_per_sec`), whose full syncs
    /// carry the keys' totals. Must run inside a tokio runtime (with the `time` and `net`
    /// drivers).
    ///
    /// Every member must build its limiter with the same [`Builder::hash_secret`]; one
    /// built without is refused here ([`ClusterError::MissingHashSecret`]). A peer that
    /// hashes with another secret is refused (logged at error, counted in
    /// [`ClusterStats::refused_hash_secret`], listed by [`refusals`](Self::refusals)).
    /// Seeds that neither answer nor fail by `join_timeout` are logged (warn: the first 8
    /// by address, then their number), and so are pool members (one line, the first 8 by
    /// name). Attach a limiter to one cluster only.
    ///
    /// # Errors
    /// [`ClusterError`] when the certificate cannot be loaded, a setting is out of range,
    /// the limiter has no hash secret, the socket cannot be bound, or there is no tokio
    /// runtime; [`ClusterError::SeedsRefused`] when, by `join_timeout`, every seed (at
    /// least one, other than this node) refused this node or was refused by it.
    pub async fn start(limiter: RateLimiter, config: ClusterConfig) -> Result<Self, ClusterError> {
        config.validate()?;
        if !limiter.hash_secret_chosen() {
            return Err(ClusterError::MissingHashSecret);
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ClusterError::NoRuntime);
        }
        let shared = driver::start(limiter.clone(), config).await?;
        Ok(Self { shared, limiter, shut_down: AtomicBool::new(false) })
    }

    /// The limiter this member replicates.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// This node's name, from its certificate.
    pub fn node_name(&self) -> &str {
        &self.shared.me.name
    }

    /// This node's id ([`node_id`] of its name).
    pub fn node_id(&self) -> PeerId {
        self.shared.me.id
    }

    /// This node's replica: its id and this run's incarnation.
    pub fn replica(&self) -> ReplicaId {
        ReplicaId { node: self.shared.me.id, incarnation: self.shared.me.incarnation }
    }

    /// The address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.me.local_addr
    }

    /// Every member this node knows of, sorted by id.
    pub fn members(&self) -> Vec<Member> {
        self.shared.members()
    }

    /// The peers the gossip core counts live.
    pub fn live_peers(&self) -> Vec<PeerId> {
        self.shared.state.lock().node.live_peers().collect()
    }

    /// Counters of the core and the transport.
    pub fn stats(&self) -> ClusterStats {
        self.shared.stats()
    }

    /// What the gossip core knows of each peer: up or down, last heard, round trip and
    /// clock offset ([`GossipNode::peer_stats`](crate::GossipNode::peer_stats)).
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.shared.state.lock().node.peer_stats()
    }

    /// Peers refused and not working since: seeds that refused this node (or that it
    /// refused) and members whose connection was refused, each with the reason. Empty
    /// when the cluster is healthy; a health check reports degraded while it is not.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.shared.refusals()
    }

    /// Every count this node holds ([`GossipNode::state`](crate::GossipNode::state) at
    /// the current time): equal on every member of a full mesh once gossip has
    /// converged (beyond 16 peers, where counts go through aggregators, members hold
    /// different counts and agree on [`views`](Self::views) instead).
    pub fn state(&self) -> Vec<StateEntry> {
        let now_ms = driver::now_ms();
        self.shared.state.lock().node.state(now_ms)
    }

    /// What this node decides each key on, per window
    /// ([`GossipNode::views`](crate::GossipNode::views) at the current time): the totals
    /// are equal on every member once gossip has converged, whatever the cluster's size.
    pub fn views(&self) -> Vec<ViewEntry> {
        let now_ms = driver::now_ms();
        self.shared.state.lock().node.views(now_ms)
    }

    /// Dials one more seed (a runtime join through `addr`).
    pub fn add_seed(&self, addr: SocketAddr) {
        self.shared.add_seed(addr);
    }

    // ----- lifecycle -----

    /// Leaves the cluster gracefully: runs a last gossip round whose counts go out on
    /// the reliable streams, waits (up to about a second) for the peers to acknowledge
    /// them, then closes every connection with the leave code, so peers remove this node
    /// at once (its counts stay with them until their windows expire). Stop deciding
    /// requests first; the limiter then works on its own.
    ///
    /// Takes `&self`, so it can be called through a shared handle (`Arc<Cluster>`).
    /// Idempotent: a second call returns at once.
    pub async fn shutdown(&self) {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return;
        }
        driver::shutdown(&self.shared).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shared.abort_tasks();
    }
}

/// A limiter [`Builder`] with cluster settings: [`start`](Self::start) builds the limiter
/// and makes it a member. From [`Builder::cluster`].
#[derive(Debug)]
pub struct ClusterBuilder {
    builder: Builder,
    config: ClusterConfig,
}

impl ClusterBuilder {
    /// Builds the limiter and starts the member (see [`Cluster::start`]).
    ///
    /// # Errors
    /// The builder's errors ([`ClusterError::Limiter`]) and [`Cluster::start`]'s.
    pub async fn start(self) -> Result<(RateLimiter, Cluster), ClusterError> {
        let limiter = self.builder.build()?;
        let cluster = Cluster::start(limiter.clone(), self.config).await?;
        Ok((limiter, cluster))
    }
}

impl Builder {
    /// Makes the limiter a cluster member once built: `builder.cluster(config).start().await`.
    pub fn cluster(self, config: ClusterConfig) -> ClusterBuilder {
        ClusterBuilder { builder: self, config }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_and_case_insensitive() {
        assert_eq!(node_id("node-a"), node_id("Node-A"));
        assert_ne!(node_id("node-a"), node_id("node-b"));
        assert_ne!(node_id(""), 0);
        // Pinned: a node keeps its id across versions.
        assert_eq!(node_id("node-a"), 763_387_308_395_886_136);
    }

    #[test]
    fn incarnations_increase_even_within_a_millisecond() {
        let a = next_incarnation(1_000);
        let b = next_incarnation(1_000);
        let c = next_incarnation(5);
        assert!(a < b && b < c, "{a} {b} {c}");
    }

    #[test]
    fn config_ranges_are_checked() {
        let id = {
            let (ca, key) = certs::generate_ca().unwrap();
            let (c, k) = certs::issue(&ca, &key, "node-a").unwrap();
            TlsIdentity::from_pem(ca.as_bytes(), c.as_bytes(), k.as_bytes()).unwrap()
        };
        let base = ClusterConfig::new(id, "127.0.0.1:0".parse().unwrap());
        assert!(base.validate().is_ok());
        let cases = [
            ClusterConfig { handshake_timeout: Duration::ZERO, ..base.clone() },
            ClusterConfig { keep_alive: Duration::from_secs(20), ..base.clone() },
            ClusterConfig { max_incoming: 0, ..base.clone() },
            ClusterConfig { stream_queue: 0, ..base.clone() },
            ClusterConfig { datagram_buffer_bytes: 10, ..base.clone() },
            ClusterConfig { reconnect_min: Duration::from_secs(60), ..base.clone() },
            ClusterConfig { member_exchange: Duration::MAX, ..base.clone() },
        ];
        assert!(ClusterConfig { member_exchange: Duration::ZERO, ..base.clone() }.validate().is_ok(), "zero is off");
        assert!(ClusterConfig { member_exchange: MAX_MEMBER_EXCHANGE, ..base.clone() }.validate().is_ok());
        for c in cases {
            assert!(matches!(c.validate(), Err(ClusterError::Config { .. })), "{c:?}");
        }
    }
}
