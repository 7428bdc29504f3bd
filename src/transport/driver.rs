//! The tasks that move bytes between quinn and the gossip core.
//!
//! One task (`run`) owns the decisions: it holds the [`State`] lock while it handles
//! one event — a connection up, a frame or datagram in, a connection closed, a dial
//! result, a timer — and routes what the core polls out. Per connection, two tasks: a
//! reader (datagrams and the peer's stream, then the close, in that order) and the
//! stream writer (it owns the connection's one outgoing stream and drains a bounded
//! queue). The accept task caps and times incoming handshakes. No lock is held across an `.await`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, VarInt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

use super::socket::{Faults, FaultySocket};
use super::wire::{Frame, FrameDecoder, Hello, MemberEntry, MAX_MEMBERS_PER_FRAME};
use super::{
    certs, next_incarnation, node_id, tls, ClusterConfig, ClusterError, ClusterStats, Member, Refusal, RefusalReason,
    MAX_ADDRS_PER_SEED_NAME,
};
use crate::clock::{Clock, SystemClock};
use crate::counter::ReplicaId;
use crate::gossip::{Event as CoreEvent, GossipNode, PeerId, Transmit};
use crate::RateLimiter;

/// Close codes (QUIC application error codes) the driver uses.
mod close {
    use quinn::VarInt;
    /// The node leaves the cluster: remove it now.
    pub(super) const LEAVE: VarInt = VarInt::from_u32(1);
    /// Both sides dialed at once; this connection lost the tie-break.
    pub(super) const DUPLICATE: VarInt = VarInt::from_u32(2);
    /// A newer connection to the same peer replaced this one.
    pub(super) const REPLACED: VarInt = VarInt::from_u32(3);
    /// A malformed frame, or no first frame in time.
    pub(super) const PROTOCOL: VarInt = VarInt::from_u32(4);
    /// Not a member we can work with: another hash secret, the wrong name, ourselves.
    pub(super) const REFUSED: VarInt = VarInt::from_u32(5);
    /// From the incarnation that announced its leave.
    pub(super) const STALE: VarInt = VarInt::from_u32(6);
    /// Unused for `close_unused_after`, to a member outside the view: not a failure, and
    /// no reason to dial again until there is something to send.
    pub(super) const UNUSED: VarInt = VarInt::from_u32(7);
}

/// The string whose keyed hash two members compare to check they share a hash secret.
const KEY_PROBE: &str = "crdt-rate-limiter/hash-secret-probe";
/// The server name used to dial an address whose node is not known yet (the member
/// verifier checks the certificate against its own name).
const ANY_MEMBER: &str = "cluster-member";
/// Maintenance period: dials due, first-frame deadlines, the join check.
const TICK: Duration = Duration::from_millis(50);
/// Events queued from connection tasks to the node task.
const EVENT_QUEUE: usize = 4096;
/// The most members a node keeps.
const MAX_PEERS: usize = 4096;
/// The most bytes taken from a stream per read.
const READ_CHUNK: usize = 64 * 1024;
/// How long a retired connection's writer waits for its stream to be acknowledged.
const LINGER: Duration = Duration::from_secs(1);
/// The longest a retired connection stays open (its writer's stream normally ends within
/// [`LINGER`] of being finished).
const RETIRED_FOR: Duration = Duration::from_secs(3);
/// Frames held for a member outside the view while it is dialled (each a message of the
/// core's): beyond this many the newest are dropped and counted as sent to no connection.
const MAX_HELD_FRAMES: usize = 64;
/// How long frames are held for a member outside the view that does not connect: then
/// they are dropped (SWIM treats them as lost).
const HELD_FOR: Duration = Duration::from_secs(2);

/// Unix ms for the gossip core.
pub(super) fn now_ms() -> i64 {
    SystemClock.now_ms()
}

/// Who this node is.
#[derive(Debug)]
pub(super) struct Me {
    pub(super) id: PeerId,
    pub(super) name: String,
    pub(super) incarnation: u64,
    pub(super) local_addr: SocketAddr,
    advertise: SocketAddr,
    key_probe: u64,
}

#[derive(Debug)]
struct Settings {
    handshake_timeout: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    max_incoming: usize,
    stream_queue: usize,
    forget_after: Duration,
    max_dials_per_sec: u32,
    member_exchange: Duration,
    close_unused_after: Duration,
}

/// Transport counters; see [`ClusterStats`] for each.
#[derive(Debug, Default)]
struct Counters {
    datagrams_sent: AtomicU64,
    datagram_bytes_sent: AtomicU64,
    datagrams_dropped: AtomicU64,
    frames_queued: AtomicU64,
    frame_bytes_queued: AtomicU64,
    frames_dropped_queue_full: AtomicU64,
    dropped_no_connection: AtomicU64,
    oversized_to_stream: AtomicU64,
    datagrams_received: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
    dropped_before_hello: AtomicU64,
    dials: AtomicU64,
    dial_failures: AtomicU64,
    handshake_failures: AtomicU64,
    refused_over_cap: AtomicU64,
    protocol_errors: AtomicU64,
    refused_hash_secret: AtomicU64,
    refused_certificate: AtomicU64,
    refused_identity: AtomicU64,
    frames_held: AtomicU64,
    closed_unused: AtomicU64,
    members_learned_by_swim: AtomicU64,
}

impl Counters {
    fn refused(&self, reason: RefusalReason) {
        inc(
            match reason {
                RefusalReason::HashSecret => &self.refused_hash_secret,
                RefusalReason::Certificate => &self.refused_certificate,
                RefusalReason::Identity => &self.refused_identity,
            },
            1,
        );
    }
}

/// Whether a failed handshake failed on TLS (a certificate refused by either side), as
/// opposed to no answer or a connection refused for load.
fn tls_failure(e: &ConnectionError) -> bool {
    let code = match e {
        ConnectionError::TransportError(t) => t.code,
        ConnectionError::ConnectionClosed(c) => c.error_code,
        _ => return false,
    };
    (0x100..0x200).contains(&u64::from(code))
}

fn inc(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// What the node task hears about.
pub(super) enum Event {
    Accepted(Connection),
    Dialed { target: Target, seq: u64, addr: SocketAddr, result: Result<Connection, (String, bool)> },
    Datagram { conn: u64, bytes: Bytes },
    Frame { conn: u64, frame: Frame },
    ProtocolError { conn: u64, error: String },
    Closed { conn: u64, reason: ConnectionError },
    AddSeed(SocketAddr),
    Shutdown(oneshot::Sender<()>),
}

/// What a dial was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    Seed(usize),
    Peer(PeerId),
}

#[derive(Debug)]
struct Backoff {
    in_flight: bool,
    failures: u32,
    next_at: Instant,
}

impl Backoff {
    fn now() -> Self {
        Self { in_flight: false, failures: 0, next_at: Instant::now() }
    }

    fn due(&self, now: Instant) -> bool {
        !self.in_flight && now >= self.next_at
    }
}

#[derive(Debug)]
struct PeerEntry {
    name: String,
    addr: Option<SocketAddr>,
    /// From its latest accepted first frame.
    incarnation: Option<u64>,
    /// The incarnation that announced its leave, until a newer one shows up.
    left: Option<u64>,
    active: Option<u64>,
    seed: bool,
    /// It sent us a full sync (its `SyncDone` marker arrived).
    synced: bool,
    /// Its marker came while a retired connection of its could still bring frames of the
    /// sync: `synced` once those connections have closed, each after the peer's stream on
    /// it ended (else `retired_lossy`, and the sync is not taken as complete).
    synced_after_retired: bool,
    retired_lossy: bool,
    /// Refused (either way) since its last accepted first frame.
    refused: Option<Refusal>,
    dial: Backoff,
    /// Since when it has had no connection that said hello (`None` while it has one).
    unreachable_since: Option<Instant>,
    /// Frames to it dropped on full queues of connections now closed, and all such drops
    /// counted when the last full sync to it ended: a full sync after which the count
    /// grew is not announced complete.
    queue_full_closed: u64,
    queue_full_at_sync_end: u64,
    /// Frames for it while it has no connection, if it is outside the view: held while
    /// it is dialled (at most [`MAX_HELD_FRAMES`], for [`HELD_FOR`] from `held_since`).
    held: Vec<Frame>,
    held_since: Option<Instant>,
    /// When its connection last carried a message of the core's, either way.
    used_at: Instant,
}

impl PeerEntry {
    /// A member not connected yet, at `addr` if known, to be dialled by `dial`.
    fn new(name: String, addr: Option<SocketAddr>, dial: Backoff) -> Self {
        Self {
            name,
            addr,
            incarnation: None,
            left: None,
            active: None,
            seed: false,
            synced: false,
            synced_after_retired: false,
            retired_lossy: false,
            refused: None,
            dial,
            unreachable_since: Some(Instant::now()),
            queue_full_closed: 0,
            queue_full_at_sync_end: 0,
            held: Vec::new(),
            held_since: None,
            used_at: Instant::now(),
        }
    }

    /// How a member list names it, once it has said who it is and where.
    fn member(&self) -> Option<MemberEntry> {
        self.incarnation.zip(self.addr).map(|(incarnation, addr)| MemberEntry { name: self.name.clone(), incarnation, addr })
    }
}

#[derive(Debug)]
struct SeedEntry {
    addr: SocketAddr,
    /// Who answered there.
    peer: Option<PeerId>,
    /// It answered and turned out to be this node.
    is_self: bool,
    failed_once: bool,
    /// Its handshake failed on a certificate (before any node answered there).
    refused: Option<Refusal>,
    dial: Backoff,
    /// A seed given at start, not dialled yet: that first dial is not charged to the dial
    /// budget, so a node given more seeds than `max_dials_per_sec` (a headless service
    /// resolves to every pod) dials them all at once and can join within `join_timeout`.
    /// At most [`MAX_SEEDS`] such dials, once per start; retries and seeds added later pay.
    first_dial_free: bool,
}

impl SeedEntry {
    /// A seed not dialled yet.
    fn new(addr: SocketAddr) -> Self {
        Self { addr, peer: None, is_self: false, failed_once: false, refused: None, dial: Backoff::now(), first_dial_free: false }
    }
}

struct ConnEntry {
    conn: Connection,
    peer: PeerId,
    outgoing: bool,
    /// The dialer's sequence number (ours if outgoing, from its first frame otherwise).
    dial_seq: u64,
    hello: Option<Hello>,
    since: Instant,
    /// `None` once retired: the writer finishes the stream, then closes with `close_code`.
    stream_tx: Option<mpsc::Sender<Vec<u8>>>,
    close_code: Arc<AtomicU32>,
    writer: Option<JoinHandle<()>>,
    /// The reader task (`read_until_closed`).
    reader: AbortHandle,
    incoming: bool,
    /// A refusal of this connection was counted.
    refused: bool,
    /// Frames dropped on this connection's full queue (see [`State::queue_full_drops`]).
    queue_full: AtomicU64,
    /// The peer's stream on it: whether it ended (finished, every frame read).
    peer_stream: Arc<PeerStream>,
}

/// What the reader of a connection tells its writer and the node task of the peer's
/// stream: that it ended cleanly (finished, every frame handed on), or was cut off.
#[derive(Default)]
struct PeerStream {
    ended: std::sync::atomic::AtomicBool,
    /// Told each time a stream ended, cleanly or not (the writer of a retired connection
    /// waits for it before closing).
    done: tokio::sync::Notify,
}

impl ConnEntry {
    fn push(&self, c: &Counters, frame: &Frame) -> bool {
        let Some(tx) = &self.stream_tx else {
            inc(&c.dropped_no_connection, 1);
            return false;
        };
        let bytes = frame.encode();
        let n = bytes.len() as u64;
        match tx.try_send(bytes) {
            Ok(()) => {
                inc(&c.frames_queued, 1);
                inc(&c.frame_bytes_queued, n);
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                inc(&c.frames_dropped_queue_full, 1);
                inc(&self.queue_full, 1);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                inc(&c.dropped_no_connection, 1);
                false
            }
        }
    }

    /// Stops routing to this connection and notes `code` as the one it closes with: its
    /// writer finishes the stream (what is queued still goes out).
    fn stop(&mut self, code: VarInt) {
        self.close_code.store(code.into_inner() as u32, Ordering::Relaxed);
        self.stream_tx = None;
    }

    /// [`stop`](Self::stop)s it; the writer, once the stream is finished, waits for the
    /// acknowledgement, then closes with `code`. Whatever
    /// the writer is waiting on, the connection is closed [`RETIRED_FOR`] later: a peer
    /// that never lets the stream open or drain (no stream or flow-control credit) must
    /// not keep a retired connection, and with it an incoming slot, forever.
    fn retire(&mut self, code: VarInt) {
        self.stop(code);
        let conn = self.conn.clone();
        tokio::spawn(async move {
            tokio::time::sleep(RETIRED_FOR).await;
            conn.close(code, b"retired");
        });
    }

    fn abort(&mut self) {
        self.reader.abort();
        if let Some(w) = &self.writer {
            w.abort();
        }
    }
}

/// Everything the node task decides on, behind one lock.
pub(super) struct State {
    pub(super) node: GossipNode,
    peers: BTreeMap<PeerId, PeerEntry>,
    conns: HashMap<u64, ConnEntry>,
    seeds: Vec<SeedEntry>,
    next_conn: u64,
    dial_seq: u64,
    rng: u64,
    leaving: bool,
    /// Dials that may start now (refilled to `max_dials_per_sec` every second).
    dial_tokens: u32,
    dial_refill_at: Instant,
    /// When this node next sends its member list to a random member.
    next_member_exchange: Instant,
    /// `start()` has not returned yet: the join also waits for the aggregator pool.
    joining: bool,
    /// Pool members dialled during the join outside the dial budget (once each).
    pool_dialled: BTreeSet<PeerId>,
}

/// What the handle and every task share.
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) me: Me,
    pub(super) faults: Arc<Faults>,
    endpoint: Endpoint,
    settings: Settings,
    counters: Counters,
    events: mpsc::Sender<Event>,
    tasks: Mutex<Vec<AbortHandle>>,
    incoming: AtomicUsize,
    joined: watch::Sender<bool>,
}

fn transport_config(cfg: &ClusterConfig) -> Result<quinn::TransportConfig, ClusterError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(cfg.idle_timeout)
        .map_err(|_| ClusterError::Config { field: "idle_timeout", reason: "too long for QUIC" })?;
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(cfg.keep_alive))
        .datagram_receive_buffer_size(Some(cfg.datagram_buffer_bytes))
        .datagram_send_buffer_size(cfg.datagram_buffer_bytes)
        // One stream each way per connection; a little room for a reconnecting peer.
        .max_concurrent_uni_streams(VarInt::from_u32(4))
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .send_window(4 * 1024 * 1024);
    Ok(t)
}

pub(super) async fn start(limiter: RateLimiter, cfg: ClusterConfig) -> Result<Arc<Shared>, ClusterError> {
    let identity = cfg.tls.load()?;
    let name = identity.node_name().ok_or(ClusterError::NoNodeName)?;
    if certs::validate_node_name(&name).is_err() {
        return Err(ClusterError::NoNodeName);
    }
    let id = node_id(&name);
    let now = now_ms();
    let incarnation = next_incarnation(now);
    let transport = Arc::new(transport_config(&cfg)?);
    let mut server = tls::server_config(&identity, transport.clone())?;
    server.max_incoming(cfg.max_incoming);
    let client = tls::member_client_config(&identity, transport)?;

    let faults = Arc::new(Faults::default());
    let std_socket = std::net::UdpSocket::bind(cfg.listen)?;
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let inner = runtime.wrap_udp_socket(std_socket)?;
    let socket = Arc::new(FaultySocket { inner, faults: faults.clone() });
    let mut endpoint = Endpoint::new_with_abstract_socket(quinn::EndpointConfig::default(), Some(server), socket, runtime)?;
    endpoint.set_default_client_config(client);
    let local_addr = endpoint.local_addr()?;

    let mut gossip = cfg.gossip.clone();
    gossip.replica = ReplicaId { node: id, incarnation };
    let advertise = cfg.advertise.unwrap_or(local_addr);
    // Members that learn of this node by SWIM dial this address as it is: an unspecified
    // one is told by the hello alone (the peer fills in the address it was reached from).
    gossip.swim_address = (cfg.membership_by_swim && !advertise.ip().is_unspecified()).then_some(advertise);
    let seed = cfg.rng_seed.unwrap_or_else(|| id ^ incarnation.rotate_left(32));
    let node = GossipNode::new(limiter.clone(), gossip, [], seed, now)?;

    let (events, rx) = mpsc::channel(EVENT_QUEUE);
    let (joined, mut joined_rx) = watch::channel(false);
    // Each address once (each is dialled once at start outside the budget), in order.
    let mut seen = std::collections::HashSet::new();
    let mut seed_addrs = cfg.seeds.clone();
    seed_addrs.retain(|a| seen.insert(*a));
    for addr in resolve_seed_names(&cfg.seed_names, cfg.handshake_timeout).await {
        if seen.insert(addr) {
            seed_addrs.push(addr);
        }
    }
    if seed_addrs.len() > MAX_SEEDS {
        tracing::warn!(seeds = seed_addrs.len(), max = MAX_SEEDS, "seeds beyond the most a node keeps are left out");
        seed_addrs.truncate(MAX_SEEDS);
    }
    let seeds = seed_addrs.iter().map(|&addr| SeedEntry { first_dial_free: true, ..SeedEntry::new(addr) }).collect();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            node,
            peers: BTreeMap::new(),
            conns: HashMap::new(),
            seeds,
            next_conn: 0,
            dial_seq: 0,
            rng: seed ^ 0x5EED,
            leaving: false,
            dial_tokens: cfg.max_dials_per_sec,
            dial_refill_at: Instant::now() + Duration::from_secs(1),
            next_member_exchange: Instant::now() + cfg.member_exchange,
            joining: true,
            pool_dialled: BTreeSet::new(),
        }),
        me: Me { id, name: name.clone(), incarnation, local_addr, advertise, key_probe: limiter.key_hash(KEY_PROBE) },
        faults,
        endpoint,
        settings: Settings {
            handshake_timeout: cfg.handshake_timeout,
            reconnect_min: cfg.reconnect_min,
            reconnect_max: cfg.reconnect_max,
            max_incoming: cfg.max_incoming,
            stream_queue: cfg.stream_queue,
            forget_after: cfg.forget_after,
            max_dials_per_sec: cfg.max_dials_per_sec,
            member_exchange: cfg.member_exchange,
            close_unused_after: cfg.close_unused_after,
        },
        counters: Counters::default(),
        events,
        tasks: Mutex::new(Vec::new()),
        incoming: AtomicUsize::new(0),
        joined,
    });
    tracing::info!(node = %name, id, incarnation, addr = %local_addr, seeds = seed_addrs.len(), "cluster member starting");
    let node_task = tokio::spawn(run(shared.clone(), rx));
    let accept_task = tokio::spawn(accept(shared.clone()));
    shared.tasks.lock().extend([node_task.abort_handle(), accept_task.abort_handle()]);
    if !cfg.seed_names.is_empty() && !cfg.seed_refresh.is_zero() {
        let (names, every, timeout) = (cfg.seed_names.clone(), cfg.seed_refresh, cfg.handshake_timeout);
        let sh = Arc::downgrade(&shared);
        shared.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let found = resolve_seed_names(&names, timeout).await;
                let Some(sh) = sh.upgrade() else { return };
                for addr in found {
                    // The node task adds only addresses it does not know as seeds yet.
                    sh.add_seed(addr);
                }
            }
        });
    }
    {
        let mut st = shared.state.lock();
        st.maintain(&shared);
    }
    if !cfg.join_timeout.is_zero() {
        let joined = tokio::time::timeout(cfg.join_timeout, joined_rx.wait_for(|j| *j)).await;
        let (refused, silent_pool) = {
            let st = shared.state.lock();
            (st.all_seeds_refused(), st.unanswered_pool())
        };
        if let Some(refusals) = refused {
            let error = ClusterError::SeedsRefused(refusals);
            tracing::error!(node = %name, %error, "cannot join");
            shared.endpoint.close(close::REFUSED, b"refused");
            shared.abort_tasks();
            return Err(error);
        }
        if joined.is_err() {
            let unanswered = shared.state.lock().unanswered_seeds();
            // Named one by one up to a few, so a headless service's hundreds of pods make
            // one line, not hundreds.
            if unanswered.len() > LOGGED_SEEDS {
                tracing::warn!(node = %name, seeds = unanswered.len(), named = LOGGED_SEEDS, "join: seeds without a full sync");
            }
            for (addr, refused) in unanswered.into_iter().take(LOGGED_SEEDS) {
                match refused {
                    Some(r) => tracing::warn!(node = %name, seed = %addr, refusal = %r, "join: seed refused"),
                    None => {
                        tracing::warn!(node = %name, seed = %addr, waited = ?cfg.join_timeout, "join: no full sync from seed (unreachable, or still connecting)")
                    }
                }
            }
            if !silent_pool.is_empty() {
                let named: Vec<&str> = silent_pool.iter().take(LOGGED_SEEDS).map(String::as_str).collect();
                tracing::warn!(node = %name, members = silent_pool.len(), ?named, "join: aggregator pool members without a full sync (their keys' totals follow when they connect)");
            }
            tracing::warn!(node = %name, "join timeout: not every seed and aggregator pool member answered with a full sync; deciding on what arrived");
        }
    }
    {
        let mut st = shared.state.lock();
        st.joining = false;
        st.pool_dialled.clear();
    }
    Ok(shared)
}

/// The most seed addresses a node keeps (static, added at run time, or resolved from
/// names); past it a seed that never answered makes room, or the new one is skipped.
const MAX_SEEDS: usize = 1_024;

/// The most seeds a join timeout names one by one in the log.
const LOGGED_SEEDS: usize = 8;

/// Every address `names` (`host:port`) resolve to, each name within `timeout`, at most
/// [`MAX_ADDRS_PER_SEED_NAME`] per name; a name that fails is logged and skipped.
async fn resolve_seed_names(names: &[String], timeout: Duration) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for name in names {
        match tokio::time::timeout(timeout, tokio::net::lookup_host(name.as_str())).await {
            Ok(Ok(addrs)) => {
                let before = out.len();
                out.extend(addrs.take(MAX_ADDRS_PER_SEED_NAME));
                tracing::debug!(name = %name, found = out.len() - before, "seed name resolved");
            }
            Ok(Err(error)) => tracing::warn!(name = %name, %error, "seed name does not resolve"),
            Err(_) => tracing::warn!(name = %name, ?timeout, "seed name: resolution timed out"),
        }
    }
    out.sort();
    out.dedup();
    out
}

impl Shared {
    fn spawn<F>(self: &Arc<Self>, f: F) -> AbortHandle
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let h = tokio::spawn(f).abort_handle();
        let mut tasks = self.tasks.lock();
        if tasks.len() > 64 {
            tasks.retain(|t| !t.is_finished());
        }
        tasks.push(h.clone());
        h
    }

    pub(super) fn abort_tasks(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        let mut st = self.state.lock();
        for c in st.conns.values_mut() {
            c.abort();
        }
    }

    pub(super) fn add_seed(&self, addr: SocketAddr) {
        let _ = self.events.try_send(Event::AddSeed(addr));
    }

    pub(super) fn peer_addrs(&self, peer: PeerId) -> Vec<SocketAddr> {
        let st = self.state.lock();
        let mut addrs: Vec<SocketAddr> = st.peers.get(&peer).and_then(|p| p.addr).into_iter().collect();
        addrs.extend(st.conns.values().filter(|c| c.peer == peer).map(|c| c.conn.remote_address()));
        addrs.sort();
        addrs.dedup();
        addrs
    }

    pub(super) fn refusals(&self) -> Vec<Refusal> {
        let st = self.state.lock();
        let seeds = st.seeds.iter().filter(|s| s.peer.is_none()).filter_map(|s| s.refused.clone());
        seeds.chain(st.peers.values().filter_map(|p| p.refused.clone())).collect()
    }

    pub(super) fn members(&self) -> Vec<Member> {
        let st = self.state.lock();
        let live: Vec<PeerId> = st.node.live_peers().collect();
        st.peers
            .iter()
            .map(|(&id, p)| Member {
                id,
                name: p.name.clone(),
                addr: p.addr,
                incarnation: p.incarnation,
                connected: p.active.is_some(),
                live: live.contains(&id),
                left: p.left.is_some(),
                seed: p.seed,
            })
            .collect()
    }

    pub(super) fn stats(&self) -> ClusterStats {
        let st = self.state.lock();
        let c = &self.counters;
        ClusterStats {
            gossip: st.node.stats().clone(),
            view_lag_ms: st.node.view_lag_ms(now_ms()),
            peers: st.peers.len(),
            live_peers: st.node.live_peers().count(),
            connections: st.conns.len(),
            datagrams_sent: get(&c.datagrams_sent),
            datagram_bytes_sent: get(&c.datagram_bytes_sent),
            datagrams_dropped: get(&c.datagrams_dropped),
            frames_queued: get(&c.frames_queued),
            frame_bytes_queued: get(&c.frame_bytes_queued),
            frames_dropped_queue_full: get(&c.frames_dropped_queue_full),
            dropped_no_connection: get(&c.dropped_no_connection),
            oversized_to_stream: get(&c.oversized_to_stream),
            datagrams_received: get(&c.datagrams_received),
            frames_received: get(&c.frames_received),
            bytes_received: get(&c.bytes_received),
            dropped_before_hello: get(&c.dropped_before_hello),
            dials: get(&c.dials),
            dial_failures: get(&c.dial_failures),
            handshake_failures: get(&c.handshake_failures),
            refused_over_cap: get(&c.refused_over_cap),
            protocol_errors: get(&c.protocol_errors),
            refused_hash_secret: get(&c.refused_hash_secret),
            refused_certificate: get(&c.refused_certificate),
            refused_identity: get(&c.refused_identity),
            frames_held: get(&c.frames_held),
            connections_closed_unused: get(&c.closed_unused),
            members_learned_by_swim: get(&c.members_learned_by_swim),
            packets_dropped_by_faults: self.faults.dropped.load(Ordering::Relaxed),
        }
    }

    fn hello(&self, dial_seq: u64) -> Frame {
        Frame::Hello(Hello { addr: self.me.advertise, incarnation: self.me.incarnation, dial_seq, key_probe: self.me.key_probe })
    }
}

/// Leaves: see [`super::Cluster::shutdown`].
pub(super) async fn shutdown(shared: &Arc<Shared>) {
    let (tx, rx) = oneshot::channel();
    if shared.events.send(Event::Shutdown(tx)).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(3), rx).await;
    }
    shared.endpoint.close(close::LEAVE, b"leave");
    let _ = tokio::time::timeout(Duration::from_millis(500), shared.endpoint.wait_idle()).await;
    shared.abort_tasks();
    tracing::info!(node = %shared.me.name, "left the cluster");
}

/// Accepts incoming connections: caps them and bounds their handshakes.
async fn accept(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let remote = incoming.remote_address();
        if shared.incoming.load(Ordering::Relaxed) >= shared.settings.max_incoming {
            inc(&shared.counters.refused_over_cap, 1);
            tracing::warn!(%remote, cap = shared.settings.max_incoming, "refused connection: too many incoming connections");
            incoming.refuse();
            continue;
        }
        shared.incoming.fetch_add(1, Ordering::Relaxed);
        let sh = shared.clone();
        shared.spawn(async move {
            let outcome = tokio::time::timeout(sh.settings.handshake_timeout, std::future::IntoFuture::into_future(incoming)).await;
            let error = match outcome {
                Ok(Ok(conn)) => {
                    if sh.events.send(Event::Accepted(conn)).await.is_err() {
                        sh.incoming.fetch_sub(1, Ordering::Relaxed);
                    }
                    return;
                }
                Ok(Err(e)) => {
                    if tls_failure(&e) {
                        sh.counters.refused(RefusalReason::Certificate);
                    }
                    e.to_string()
                }
                Err(_) => "handshake timed out".to_string(),
            };
            sh.incoming.fetch_sub(1, Ordering::Relaxed);
            inc(&sh.counters.handshake_failures, 1);
            tracing::warn!(%remote, %error, "refused connection: TLS handshake failed (a certificate the cluster CA did not sign, none, or a timeout)");
        });
    }
}

/// The node task: see the module documentation.
async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Event>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wake = {
            let st = shared.state.lock();
            let deadline = st.node.poll_timeout().unwrap_or(i64::MAX);
            let wait_ms = deadline.saturating_sub(now_ms()).clamp(0, 60_000) as u64;
            Instant::now() + Duration::from_millis(wait_ms)
        };
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { return };
                let mut batch = vec![ev];
                while batch.len() < 64 {
                    match rx.try_recv() {
                        Ok(ev) => batch.push(ev),
                        Err(_) => break,
                    }
                }
                for ev in batch {
                    if let Event::Shutdown(done) = ev {
                        leave(&shared).await;
                        let _ = done.send(());
                        return;
                    }
                    let mut st = shared.state.lock();
                    st.handle(&shared, ev);
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
            _ = tick.tick() => {
                let mut st = shared.state.lock();
                st.maintain(&shared);
                // The core learns of a step back of the clock when it is handed the time:
                // on every tick, not only at a deadline the step may have pushed away.
                st.node.handle_timeout(now_ms());
            }
        }
        let mut st = shared.state.lock();
        let now = now_ms();
        if st.node.poll_timeout().is_some_and(|d| now >= d) {
            st.node.handle_timeout(now);
        }
        st.flush(&shared);
    }
}

/// The graceful leave, inside the node task.
async fn leave(shared: &Arc<Shared>) {
    let deadline = {
        let mut st = shared.state.lock();
        st.leaving = true;
        st.node.poll_timeout().unwrap_or(0)
    };
    // One last round so the counts since the previous one go out (on the streams).
    let wait_ms = deadline.saturating_sub(now_ms()).clamp(0, 60_000) as u64;
    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    let writers: Vec<JoinHandle<()>> = {
        let mut st = shared.state.lock();
        let now = now_ms().max(deadline);
        st.node.handle_timeout(now);
        // Beyond SWIM's threshold, SWIM carries the leave to the members holding no
        // connection to this node (on the streams, ahead of the leave's close).
        st.node.leave(now);
        st.flush(shared);
        st.conns
            .values_mut()
            .filter_map(|c| {
                c.retire(close::LEAVE);
                c.writer.take()
            })
            .collect()
    };
    let _ = tokio::time::timeout(LINGER + Duration::from_millis(200), async {
        for w in writers {
            let _ = w.await;
        }
    })
    .await;
    let mut st = shared.state.lock();
    for c in st.conns.values() {
        c.conn.close(close::LEAVE, b"leave");
    }
    let peers: Vec<PeerId> = st.node.peers().collect();
    for p in peers {
        st.node.remove_peer(p); // on its own again: live replicas = 1
    }
}

impl State {
    fn handle(&mut self, sh: &Arc<Shared>, ev: Event) {
        match ev {
            Event::Accepted(conn) => self.register(sh, conn, None, 0),
            Event::Dialed { target, seq, addr, result } => {
                if let Some(d) = self.dial_state(target) {
                    d.in_flight = false;
                }
                match result {
                    Ok(conn) => self.register(sh, conn, Some(target), seq),
                    Err((error, tls)) => self.dial_failed(sh, target, addr, &error, tls),
                }
            }
            Event::Datagram { conn, bytes } => {
                inc(&sh.counters.datagrams_received, 1);
                inc(&sh.counters.bytes_received, bytes.len() as u64);
                self.gossip_in(sh, conn, &bytes);
            }
            Event::Frame { conn, frame } => {
                inc(&sh.counters.frames_received, 1);
                self.frame_in(sh, conn, frame);
            }
            Event::ProtocolError { conn, error } => {
                if let Some(c) = self.conns.get(&conn) {
                    inc(&sh.counters.protocol_errors, 1);
                    tracing::warn!(peer = %self.name_of(c.peer), %error, "closing connection: protocol error");
                    c.conn.close(close::PROTOCOL, b"protocol error");
                }
            }
            Event::Closed { conn, reason } => self.closed(sh, conn, reason),
            Event::AddSeed(addr) => {
                if self.seeds.iter().any(|s| s.addr == addr) {
                    return;
                }
                if self.seeds.len() >= MAX_SEEDS {
                    // Names re-resolved as instances come and go: make room by forgetting a
                    // seed that never answered, or skip this one. The new seed takes its
                    // place, one with no dial in flight: a dial's result finds its seed by
                    // index, so no index may shift or be reused under it.
                    let Some(i) = self.seeds.iter().position(|s| s.failed_once && s.peer.is_none() && !s.is_self && !s.dial.in_flight)
                    else {
                        tracing::warn!(%addr, max = MAX_SEEDS, "seed not added: the most seeds are known");
                        return;
                    };
                    self.seeds[i] = SeedEntry::new(addr);
                } else {
                    self.seeds.push(SeedEntry::new(addr));
                }
                let _ = sh.joined.send_replace(false);
            }
            Event::Shutdown(_) => {}
        }
    }

    fn name_of(&self, peer: PeerId) -> String {
        self.peers.get(&peer).map_or_else(|| format!("{peer:016x}"), |p| p.name.clone())
    }

    fn dial_state(&mut self, target: Target) -> Option<&mut Backoff> {
        match target {
            Target::Seed(i) => self.seeds.get_mut(i).map(|s| &mut s.dial),
            Target::Peer(p) => self.peers.get_mut(&p).map(|p| &mut p.dial),
        }
    }

    fn random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        crate::key::splitmix64(self.rng)
    }

    /// The delay before the next attempt after `failures` failures: exponential, capped,
    /// drawn between half and all of it; the higher node id of a pair waits a little
    /// longer, so the two rarely dial each other at once.
    fn backoff(&mut self, sh: &Shared, failures: u32, peer: Option<PeerId>) -> Duration {
        let min = sh.settings.reconnect_min.as_millis() as u64;
        let max = sh.settings.reconnect_max.as_millis() as u64;
        let full = min.saturating_mul(1u64 << failures.min(20)).min(max).max(1);
        let jittered = full / 2 + self.random() % (full / 2 + 1);
        let defer = if peer.is_some_and(|p| p < sh.me.id) { 3 * min } else { 0 };
        Duration::from_millis(jittered + defer)
    }

    fn dial_failed(&mut self, sh: &Arc<Shared>, target: Target, addr: SocketAddr, error: &str, tls: bool) {
        inc(&sh.counters.dial_failures, 1);
        let refusal = tls.then(|| {
            sh.counters.refused(RefusalReason::Certificate);
            let first = self.dial_state(target).is_some_and(|d| d.failures == 0);
            if first {
                tracing::error!(%addr, %error, "refused peer: the TLS handshake failed (a certificate another CA signed, expired, or not for this use)");
            }
            Refusal { addr, peer: None, seed: false, reason: RefusalReason::Certificate, detail: format!("TLS handshake failed: {error}") }
        });
        let (failures, peer) = match target {
            Target::Seed(i) => match self.seeds.get_mut(i) {
                Some(s) => {
                    s.failed_once = true;
                    s.refused = refusal.map(|r| Refusal { seed: true, ..r });
                    (s.dial.failures, None)
                }
                None => return,
            },
            Target::Peer(p) => match self.peers.get_mut(&p) {
                Some(e) => {
                    // A member outside the view, dialled on demand after its connection
                    // closed unused: unreachable from now (`forget_after`), unless it
                    // dialled this node meanwhile.
                    if e.active.is_none() {
                        e.unreachable_since.get_or_insert_with(Instant::now);
                    }
                    if let Some(r) = refusal {
                        e.refused = Some(Refusal { peer: Some(e.name.clone()), seed: e.seed, ..r });
                    }
                    (e.dial.failures, Some(p))
                }
                None => return,
            },
        };
        if failures == 0 {
            tracing::warn!(%addr, %error, "cannot connect to peer; retrying with backoff");
        } else {
            tracing::debug!(%addr, %error, failures, "cannot connect to peer");
        }
        let delay = self.backoff(sh, failures + 1, peer);
        if let Some(d) = self.dial_state(target) {
            d.failures += 1;
            d.next_at = Instant::now() + delay;
        }
        self.check_joined(sh);
    }

    fn dial(&mut self, sh: &Arc<Shared>, target: Target, addr: SocketAddr, name: Option<String>) {
        self.dial_seq += 1;
        let seq = self.dial_seq;
        if let Some(d) = self.dial_state(target) {
            d.in_flight = true;
        }
        inc(&sh.counters.dials, 1);
        let sh2 = sh.clone();
        sh.spawn(async move {
            let server_name = name.as_deref().unwrap_or(ANY_MEMBER);
            let result = match sh2.endpoint.connect(addr, server_name) {
                Ok(connecting) => match tokio::time::timeout(sh2.settings.handshake_timeout, connecting).await {
                    Ok(Ok(conn)) => Ok(conn),
                    Ok(Err(e)) => Err((e.to_string(), tls_failure(&e))),
                    Err(_) => Err(("handshake timed out".to_string(), false)),
                },
                Err(e) => Err((e.to_string(), false)),
            };
            let _ = sh2.events.send(Event::Dialed { target, seq, addr, result }).await;
        });
    }

    /// Periodic work: dials that are due, first-frame deadlines, the join check.
    fn maintain(&mut self, sh: &Arc<Shared>) {
        let now = Instant::now();
        if now >= self.dial_refill_at {
            self.dial_tokens = sh.settings.max_dials_per_sec;
            self.dial_refill_at = now + Duration::from_secs(1);
        }
        self.forget_unreachable(sh, now);
        if !self.leaving {
            if !sh.settings.member_exchange.is_zero() && now >= self.next_member_exchange {
                self.next_member_exchange = now + sh.settings.member_exchange;
                self.exchange_members(sh);
            }
            for i in 0..self.seeds.len() {
                let s = &mut self.seeds[i];
                if s.peer.is_none() && !s.is_self && s.dial.due(now) && (s.first_dial_free || self.dial_tokens > 0) {
                    if !std::mem::take(&mut s.first_dial_free) {
                        self.dial_tokens -= 1;
                    }
                    let addr = s.addr;
                    self.dial(sh, Target::Seed(i), addr, None);
                }
            }
            self.dial_members(sh, now);
            self.drop_stale_held(sh, now);
            self.close_unused(sh, now);
        }
        let late: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.hello.is_none() && now.duration_since(c.since) > sh.settings.handshake_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            if let Some(c) = self.conns.get(&id) {
                inc(&sh.counters.protocol_errors, 1);
                tracing::warn!(peer = %self.name_of(c.peer), "closing connection: no first frame in time");
                c.conn.close(close::PROTOCOL, b"no hello");
            }
        }
        self.check_joined(sh);
    }

    /// Dials the members that are due: those this node keeps connected (every member but
    /// outside a partial view, `GossipNode::keeps_connected`), those never connected to
    /// (so that the core hears of them), and those it holds frames for.
    fn dial_members(&mut self, sh: &Arc<Shared>, now: Instant) {
        let mut due: Vec<(bool, Instant, PeerId, SocketAddr, String)> = self
            .peers
            .iter()
            .filter(|(id, p)| {
                p.active.is_none()
                    && p.left.is_none()
                    && p.dial.due(now)
                    && (p.incarnation.is_none() || !p.held.is_empty() || self.node.keeps_connected(**id))
                    && !self.conns.values().any(|c| c.peer == **id && c.stream_tx.is_some())
            })
            .filter_map(|(id, p)| p.addr.map(|a| (p.incarnation.is_none(), p.dial.next_at, *id, a, p.name.clone())))
            .collect();
        // Within the dial budget; members this node was connected to before go first,
        // so that a list of made-up members cannot delay their redials for long, and
        // among the others the one due the longest: a member listed after many made-up
        // ones is dialled after one pass over them at the most, never held back for
        // good by those that fail and come due again (by id, those with the lower ids
        // would always go first). While
        // joining, each member of the aggregator pool is dialled once outside the
        // budget, so that the join need not wait a second per `max_dials_per_sec` of
        // them (a few static seeds outside the pool name all of it in their lists),
        // unless a seed's dial under way (or due) at its address covers it: at most
        // `aggregator_pool` such dials per start, whatever member lists say.
        due.sort_by_key(|d| (d.0, d.1));
        let pool = self.join_pool();
        for (_, _, id, addr, name) in due {
            let free = pool.binary_search(&id).is_ok()
                && self.pool_dialled.len() < self.node.aggregator_pool()
                && !self.pool_dialled.contains(&id)
                && !self.seeds.iter().any(|s| s.addr == addr && s.peer.is_none() && !s.is_self && !s.failed_once);
            if free {
                self.pool_dialled.insert(id);
            } else if self.dial_tokens > 0 {
                self.dial_tokens -= 1;
            } else {
                continue;
            }
            self.dial(sh, Target::Peer(id), addr, Some(name));
        }
    }

    /// Drops frames held longer than [`HELD_FOR`] for a member that has not connected.
    fn drop_stale_held(&mut self, sh: &Shared, now: Instant) {
        for p in self.peers.values_mut() {
            if p.held_since.is_some_and(|t| now.duration_since(t) >= HELD_FOR) {
                inc(&sh.counters.dropped_no_connection, p.held.len() as u64);
                p.held.clear();
                p.held_since = None;
            }
        }
    }

    /// A partial view (`docs/cluster.md`): closes the connections to members outside the
    /// view that have carried nothing of the core's for `close_unused_after`. Not while
    /// joining (the join waits for seeds' full syncs) or leaving.
    fn close_unused(&mut self, sh: &Shared, now: Instant) {
        if self.joining {
            return;
        }
        let unused: Vec<(PeerId, u64)> = self
            .peers
            .iter()
            .filter(|(id, p)| p.held.is_empty() && self.unused(sh, **id, p, now))
            .filter_map(|(id, p)| p.active.map(|c| (*id, c)))
            .collect();
        for (peer, conn_id) in unused {
            // Closed at once rather than retired: it has carried nothing for a while, so
            // nothing is lost, and the peer learns of it before any connection this node
            // dials to it next (a peer still holding this one as its active connection
            // would keep it over a new one by the tie-break, and reply on it).
            if let Some(c) = self.conns.get_mut(&conn_id) {
                c.stop(close::UNUSED);
                c.conn.close(close::UNUSED, b"unused");
            }
            if let Some(p) = self.peers.get_mut(&peer) {
                p.active = None;
                p.dial = Backoff::now();
                tracing::debug!(peer = %p.name, "closing a connection unused for close_unused_after (outside the view)");
            }
            inc(&sh.counters.closed_unused, 1);
        }
    }

    /// Whether `peer`'s connection, outside the view, has carried nothing of the core's for
    /// `close_unused_after` (never with it zero).
    fn unused(&self, sh: &Shared, peer: PeerId, p: &PeerEntry, now: Instant) -> bool {
        let after = sh.settings.close_unused_after;
        !after.is_zero() && now.duration_since(p.used_at) >= after && !self.node.keeps_connected(peer)
    }

    /// Forgets members that are not seeds and have had no working connection for
    /// `forget_after`: a member list naming addresses nobody answers at costs dials for
    /// that long, not forever.
    fn forget_unreachable(&mut self, sh: &Shared, now: Instant) {
        // Outside a partial view a member's connection closes unused, which says nothing
        // of whether it is reachable: it counts as unreachable from when the core takes it
        // down (SWIM's verdict, or silence), and one the core counts live is kept.
        for (id, p) in self.peers.iter_mut() {
            if p.active.is_none() && p.unreachable_since.is_none() && !self.node.is_live(*id) {
                p.unreachable_since = Some(now);
            }
        }
        let forget: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(id, p)| {
                !p.seed
                    && p.active.is_none()
                    && !p.dial.in_flight
                    && p.unreachable_since.is_some_and(|t| now.duration_since(t) >= sh.settings.forget_after)
                    && !self.node.is_live(**id)
                    && !self.conns.values().any(|c| c.peer == **id)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in forget {
            if let Some(p) = self.peers.remove(&id) {
                tracing::info!(peer = %p.name, addr = ?p.addr, "forgot a member unreachable for forget_after");
            }
            self.node.remove_peer(id);
        }
    }

    /// The join is done once every seed and every member of the aggregator pool it knows
    /// of has sent a full sync, refused, or failed to connect once.
    fn check_joined(&self, sh: &Shared) {
        if *sh.joined.borrow() {
            return;
        }
        let answered = |p: &PeerEntry| p.synced || p.refused.is_some();
        let done = self.seeds.iter().all(|s| s.is_self || s.failed_once || s.peer.and_then(|p| self.peers.get(&p)).is_some_and(answered))
            && self.join_pool().iter().all(|id| {
                // One this node cannot dial (no address yet, not connected) is not waited for.
                self.peers.get(id).is_none_or(|p| answered(p) || p.dial.failures > 0 || (p.active.is_none() && p.addr.is_none()))
            });
        if done {
            let _ = sh.joined.send_replace(true);
        }
    }

    /// While joining, the aggregator pool among the members known now (beyond
    /// `aggregate_above_peers` of them, `aggregator_pool` members chosen by a hash of
    /// their ids, as every member's ring does): between them their full syncs carry every
    /// key's totals (`GossipNode::pool_among`). Empty once `start()` has returned.
    fn join_pool(&self) -> Vec<PeerId> {
        if !self.joining {
            return Vec::new();
        }
        self.node.pool_among(self.peers.iter().filter(|(_, p)| p.left.is_none()).map(|(id, _)| *id))
    }

    /// The pool members the join is still waiting for, by name.
    fn unanswered_pool(&self) -> Vec<String> {
        let pool = self.join_pool();
        let silent = pool.iter().filter_map(|id| self.peers.get(id)).filter(|p| !p.synced && p.refused.is_none());
        silent.map(|p| p.name.clone()).collect()
    }

    /// A seed's refusal, if it (or the node that answered there) is refused.
    fn seed_refusal(&self, s: &SeedEntry) -> Option<Refusal> {
        match s.peer {
            None => s.refused.clone(),
            Some(p) => self.peers.get(&p).and_then(|p| p.refused.clone()).map(|r| Refusal { addr: s.addr, seed: true, ..r }),
        }
    }

    /// Every seed's refusal, if there is at least one seed other than this node and every
    /// one of them is refused.
    fn all_seeds_refused(&self) -> Option<Vec<Refusal>> {
        let seeds: Vec<&SeedEntry> = self.seeds.iter().filter(|s| !s.is_self).collect();
        if seeds.is_empty() {
            return None;
        }
        seeds.into_iter().map(|s| self.seed_refusal(s)).collect()
    }

    /// Seeds that have not sent a full sync, with their refusal if any.
    fn unanswered_seeds(&self) -> Vec<(SocketAddr, Option<Refusal>)> {
        self.seeds
            .iter()
            .filter(|s| !s.is_self && !s.peer.and_then(|p| self.peers.get(&p)).is_some_and(|p| p.synced))
            .map(|s| (s.addr, self.seed_refusal(s)))
            .collect()
    }

    /// Records that the connection `conn_id` to `peer` was refused (counted once per
    /// connection) and re-checks the join.
    fn refuse_peer(&mut self, sh: &Shared, conn_id: u64, peer: PeerId, addr: SocketAddr, reason: RefusalReason, detail: String) {
        if let Some(c) = self.conns.get_mut(&conn_id) {
            if std::mem::replace(&mut c.refused, true) {
                return;
            }
        }
        sh.counters.refused(reason);
        if let Some(p) = self.peers.get_mut(&peer) {
            p.refused = Some(Refusal { addr: p.addr.unwrap_or(addr), peer: Some(p.name.clone()), seed: p.seed, reason, detail });
        }
        self.check_joined(sh);
    }

    /// A connection's handshake completed: check who it is and start its tasks.
    fn register(&mut self, sh: &Arc<Shared>, conn: Connection, target: Option<Target>, seq: u64) {
        let outgoing = target.is_some();
        let incoming_slot = !outgoing;
        let refuse = |conn: &Connection, why: &str| {
            inc(&sh.counters.protocol_errors, 1);
            conn.close(close::REFUSED, why.as_bytes());
            if incoming_slot {
                sh.incoming.fetch_sub(1, Ordering::Relaxed);
            }
        };
        let Some(name) = tls::peer_node_name(&conn) else {
            tracing::warn!(remote = %conn.remote_address(), "refused connection: the peer certificate names no node");
            sh.counters.refused(RefusalReason::Identity);
            refuse(&conn, "no node name");
            return;
        };
        let id = node_id(&name);
        if let Some(Target::Peer(expected)) = target {
            if expected != id {
                tracing::warn!(expected = %self.name_of(expected), answered = %name, remote = %conn.remote_address(), "refused connection: another node answered");
                sh.counters.refused(RefusalReason::Identity);
                if let Some(p) = self.peers.get_mut(&expected) {
                    let detail = format!("{name} answered at its address");
                    let addr = conn.remote_address();
                    p.refused = Some(Refusal { addr, peer: Some(p.name.clone()), seed: p.seed, reason: RefusalReason::Identity, detail });
                }
                refuse(&conn, "unexpected node");
                // As a failed dial: back off, so a wrong address is not redialled every tick
                // (this node's own address too: a member made up with it, or gone from it).
                let failures = self.peers.get(&expected).map_or(0, |p| p.dial.failures) + 1;
                let delay = self.backoff(sh, failures, Some(expected));
                if let Some(p) = self.peers.get_mut(&expected) {
                    p.dial.failures = failures;
                    p.dial.next_at = Instant::now() + delay;
                }
                return;
            }
        }
        if id == sh.me.id {
            if let Some(Target::Seed(i)) = target {
                if let Some(s) = self.seeds.get_mut(i) {
                    s.is_self = true;
                }
            } else if !outgoing {
                tracing::debug!(remote = %conn.remote_address(), "connection from this node's own name (a seed list that names this node)");
            }
            conn.close(close::REFUSED, b"self");
            if incoming_slot {
                sh.incoming.fetch_sub(1, Ordering::Relaxed);
            }
            return;
        }
        let conn_id = self.next_conn;
        self.next_conn += 1;
        let (tx, rx) = mpsc::channel(sh.settings.stream_queue);
        let close_code = Arc::new(AtomicU32::new(close::REPLACED.into_inner() as u32));
        let hello = sh.hello(if outgoing { seq } else { 0 });
        let peer_stream = Arc::new(PeerStream::default());
        let writer = tokio::spawn(write_stream(conn.clone(), hello, rx, close_code.clone(), peer_stream.clone()));
        let reader = sh.spawn(read_until_closed(sh.clone(), conn.clone(), conn_id, peer_stream.clone()));
        tracing::debug!(peer = %name, remote = %conn.remote_address(), outgoing, "connection established");
        self.conns.insert(
            conn_id,
            ConnEntry {
                conn,
                peer: id,
                outgoing,
                dial_seq: if outgoing { seq } else { 0 },
                hello: None,
                since: Instant::now(),
                stream_tx: Some(tx),
                close_code,
                writer: Some(writer),
                reader,
                incoming: incoming_slot,
                refused: false,
                queue_full: AtomicU64::new(0),
                peer_stream,
            },
        );
        let is_seed = matches!(target, Some(Target::Seed(_)));
        if !self.peers.contains_key(&id) && self.peers.len() >= MAX_PEERS {
            tracing::warn!(peer = %name, "member table full; ignoring a new member");
        }
        let entry = self.peers.entry(id).or_insert_with(|| PeerEntry::new(name.clone(), None, Backoff::now()));
        // A member learned through SWIM is known by its id until its certificate names it.
        entry.name.clone_from(&name);
        entry.seed |= is_seed;
        if let Some(Target::Seed(i)) = target {
            if let Some(s) = self.seeds.get_mut(i) {
                s.peer = Some(id);
                s.refused = None;
                // From now on the seed is redialled as this member, which needs an address
                // before its hello gives one: a connection closed before the hello (a
                // member shutting down, a late hello, a refused hash secret) would
                // otherwise leave it never dialled again.
                entry.addr.get_or_insert(s.addr);
            }
        }
    }

    fn frame_in(&mut self, sh: &Arc<Shared>, conn_id: u64, frame: Frame) {
        let Some(c) = self.conns.get(&conn_id) else { return };
        let peer = c.peer;
        match frame {
            Frame::Hello(h) => self.hello_in(sh, conn_id, h),
            _ if c.hello.is_none() => {
                inc(&sh.counters.protocol_errors, 1);
                c.conn.close(close::PROTOCOL, b"frame before hello");
            }
            Frame::Gossip(bytes) => {
                inc(&sh.counters.bytes_received, bytes.len() as u64);
                self.gossip_in(sh, conn_id, &bytes);
            }
            Frame::Members(list) => self.members_in(sh, peer, list),
            Frame::SyncDone => {
                // A connection of the peer's retired during the sync may still be bringing
                // frames of it (a reader of its own, not ordered with this one's).
                let retired = self.conns.iter().any(|(id, o)| *id != conn_id && o.peer == peer && o.stream_tx.is_none());
                if let Some(p) = self.peers.get_mut(&peer) {
                    if retired {
                        p.synced_after_retired = true;
                    } else {
                        p.synced = true;
                    }
                }
                self.check_joined(sh);
            }
            Frame::Unknown(kind) => tracing::debug!(kind, "ignoring a frame of unknown kind"),
        }
    }

    /// One gossip message from a connection: to the core, if the connection said hello.
    fn gossip_in(&mut self, sh: &Arc<Shared>, conn_id: u64, bytes: &[u8]) {
        let Some(c) = self.conns.get(&conn_id) else { return };
        if c.hello.is_none() {
            inc(&sh.counters.dropped_before_hello, 1);
            return;
        }
        let peer = c.peer;
        if let Some(p) = self.peers.get_mut(&peer) {
            p.used_at = Instant::now();
        }
        if let Err(e) = self.node.handle_message(peer, bytes, now_ms()) {
            tracing::debug!(peer = %self.name_of(peer), error = %e, "gossip message dropped");
        }
    }

    fn send_frame(&self, sh: &Shared, peer: PeerId, frame: &Frame) -> bool {
        match self.peers.get(&peer).and_then(|p| p.active).and_then(|id| self.conns.get(&id)) {
            Some(c) => c.push(&sh.counters, frame),
            None => {
                inc(&sh.counters.dropped_no_connection, 1);
                false
            }
        }
    }

    /// Routes everything the core has to send.
    fn flush(&mut self, sh: &Arc<Shared>) {
        let events: Vec<CoreEvent> = std::iter::from_fn(|| self.node.poll_event()).collect();
        // The addresses SWIM brought first: the messages routed below may be for those
        // members (a probe of a member that restarted elsewhere).
        for e in &events {
            if let CoreEvent::MemberLearned { peer, incarnation, addr } = *e {
                self.learned(sh, peer, incarnation, addr);
            }
        }
        let mut held = false;
        while let Some(t) = self.node.poll_transmit() {
            held |= self.route(sh, t);
        }
        if held && !self.leaving {
            // Dial at once the members outside the view just given something to send.
            self.dial_members(sh, Instant::now());
        }
        for event in events {
            match event {
                // The last of a full sync is on the peer's stream: the marker follows it
                // on the same stream, so it arrives after all of it. Unless a frame to the
                // peer was dropped on a full queue (of any of its connections) since the
                // last full sync to it ended: then the sync is not announced complete (the
                // peer's join waits for its timeout; anti-entropy repairs what was lost).
                CoreEvent::FullSyncSent { peer } => {
                    let dropped = self.queue_full_drops(peer);
                    let lost =
                        self.peers.get_mut(&peer).is_some_and(|p| std::mem::replace(&mut p.queue_full_at_sync_end, dropped) < dropped);
                    if lost {
                        tracing::warn!(peer = %self.name_of(peer), "full sync not marked complete: frames were dropped on the peer's full stream queue (stream_queue); anti-entropy repairs them");
                    } else {
                        self.send_frame(sh, peer, &Frame::SyncDone);
                    }
                }
                CoreEvent::MemberLearned { .. } => {}
                CoreEvent::PeerUp { peer, incarnation, restarted } => {
                    tracing::info!(peer = %self.name_of(peer), incarnation, restarted, "member up");
                }
                CoreEvent::PeerDown { peer, silent_ms } => {
                    tracing::warn!(peer = %self.name_of(peer), silent_ms, "member down: it no longer shares the quota");
                }
                CoreEvent::LiveChanged { live_replicas, index } => {
                    tracing::debug!(live_replicas, index, "live members changed");
                }
                CoreEvent::Refused { peer, reason } => {
                    tracing::debug!(peer = %self.name_of(peer), ?reason, "member's input refused");
                }
            }
        }
    }

    /// Frames to `peer` dropped on full queues, on every connection it has had.
    fn queue_full_drops(&self, peer: PeerId) -> u64 {
        let open = self.conns.values().filter(|c| c.peer == peer).map(|c| get(&c.queue_full)).sum::<u64>();
        self.peers.get(&peer).map_or(0, |p| p.queue_full_closed) + open
    }

    /// Sends one of the core's messages; returns whether it was held for a member outside
    /// the view that has no connection (to be dialled).
    fn route(&mut self, sh: &Shared, t: Transmit) -> bool {
        let c = &sh.counters;
        let active = self.peers.get_mut(&t.to).and_then(|p| {
            p.used_at = Instant::now();
            p.active
        });
        let Some(conn) = active.and_then(|id| self.conns.get(&id)) else {
            return self.hold(sh, t);
        };
        if !t.reliable && !self.leaving {
            match conn.conn.max_datagram_size() {
                Some(max) if t.bytes.len() <= max => {
                    let n = t.bytes.len() as u64;
                    match conn.conn.send_datagram(Bytes::from(t.bytes)) {
                        Ok(()) => {
                            inc(&c.datagrams_sent, 1);
                            inc(&c.datagram_bytes_sent, n);
                        }
                        Err(_) => inc(&c.datagrams_dropped, 1),
                    }
                    return false;
                }
                _ => inc(&c.oversized_to_stream, 1),
            }
        }
        conn.push(c, &Frame::Gossip(t.bytes));
        false
    }

    /// A message for a member with no connection: dropped, unless the member is outside
    /// the view (its connection closed once unused, or never kept), whose messages are
    /// held while it is dialled and sent on its stream once it says hello.
    fn hold(&mut self, sh: &Shared, t: Transmit) -> bool {
        let keep = !self.leaving && !self.node.keeps_connected(t.to);
        match self.peers.get_mut(&t.to) {
            Some(p) if keep && p.addr.is_some() && p.left.is_none() && p.held.len() < MAX_HELD_FRAMES => {
                p.held_since.get_or_insert_with(Instant::now);
                p.held.push(Frame::Gossip(t.bytes));
                inc(&sh.counters.frames_held, 1);
                true
            }
            _ => {
                inc(&sh.counters.dropped_no_connection, 1);
                false
            }
        }
    }

    /// The peer's first frame: check it, then decide whether this connection is the
    /// one to use for the peer.
    fn hello_in(&mut self, sh: &Arc<Shared>, conn_id: u64, h: Hello) {
        // Whether the peer's connection so far is unused (see `keep_new`), before this one
        // counts as use.
        let now = Instant::now();
        let unused = self.conns.get(&conn_id).is_some_and(|c| self.peers.get(&c.peer).is_some_and(|p| self.unused(sh, c.peer, p, now)));
        let Some(c) = self.conns.get_mut(&conn_id) else { return };
        let peer = c.peer;
        let name = self.peers.get(&peer).map_or_else(String::new, |p| p.name.clone());
        if c.hello.is_some() {
            inc(&sh.counters.protocol_errors, 1);
            c.conn.close(close::PROTOCOL, b"second hello");
            return;
        }
        if h.key_probe != sh.me.key_probe {
            inc(&sh.counters.protocol_errors, 1);
            tracing::error!(peer = %name, "refused peer: it hashes client ids with another secret; every member must build its limiter with the same hash_secret");
            c.conn.close(close::REFUSED, b"hash secret mismatch");
            let addr = c.conn.remote_address();
            let detail = "it hashes client ids with another secret (every member needs the same Builder::hash_secret)".to_string();
            self.refuse_peer(sh, conn_id, peer, addr, RefusalReason::HashSecret, detail);
            return;
        }
        c.hello = Some(h);
        if !c.outgoing {
            c.dial_seq = h.dial_seq;
        }
        let Some(p) = self.peers.get_mut(&peer) else { return };
        if p.left == Some(h.incarnation) {
            // The process that announced its leave: it has nothing more to say.
            c.conn.close(close::STALE, b"left");
            return;
        }
        if p.active.is_none() && p.incarnation.is_some_and(|i| h.incarnation < i) {
            // Incarnations are start times: its clock stepped back. Its counts go to a new
            // slot all the same (a slot is the whole replica id), so take it, and tell the
            // core it is the current one.
            tracing::warn!(peer = %name, incarnation = h.incarnation, previous = p.incarnation, "peer restarted with a lower incarnation");
            self.node.set_peer_incarnation(peer, h.incarnation);
        }
        p.left = None;
        p.refused = None;
        // Which connection to keep.
        // An old connection the peer has finished its stream on (it retired it: replaced,
        // a duplicate) carries nothing more from it, whatever the tie-break would say; nor
        // does, outside the view, one unused for `close_unused_after`, which the peer may
        // have closed unused (its close can be lost).
        let keep_new = match p.active.and_then(|a| self.conns.get(&a)) {
            None => true,
            Some(old) => {
                old.conn.close_reason().is_some()
                    || old.peer_stream.ended.load(Ordering::Relaxed)
                    || unused
                    || prefer(self.conns.get(&conn_id), old, sh.me.id)
            }
        };
        if !keep_new {
            if let Some(c) = self.conns.get_mut(&conn_id) {
                c.retire(close::DUPLICATE);
            }
            self.node.add_peer(peer);
            return;
        }
        let old = p.active.replace(conn_id);
        // A later incarnation, or (its clock stepped back) a lower one than before.
        let restarted = p.incarnation.is_some_and(|i| h.incarnation != i);
        let first = p.incarnation.is_none();
        p.incarnation = Some(h.incarnation);
        p.used_at = Instant::now();
        let Some(c) = self.conns.get(&conn_id) else { return };
        let addr = if h.addr.ip().is_unspecified() { SocketAddr::new(c.conn.remote_address().ip(), h.addr.port()) } else { h.addr };
        p.addr = Some(addr);
        p.dial = Backoff::now();
        p.unreachable_since = None;
        if let Some(old) = old.and_then(|o| self.conns.get_mut(&o)) {
            old.retire(close::REPLACED);
        }
        if restarted {
            // Frames dropped on the way to the incarnation it restarted from say nothing
            // of the full sync the new one is about to get, and whatever was pending of
            // the previous process's full sync is void.
            let dropped = self.queue_full_drops(peer);
            if let Some(p) = self.peers.get_mut(&peer) {
                (p.queue_full_at_sync_end, p.synced_after_retired, p.retired_lossy) = (dropped, false, false);
            }
        }
        self.node.add_peer(peer);
        self.node.set_peer_address(peer, addr);
        tracing::info!(peer = %name, incarnation = h.incarnation, %addr, restarted, "peer connected");
        // Tell the newcomer who else is here, and everyone else about the newcomer (unless
        // this node's SWIM gossips it: beyond SWIM's threshold, with `membership_by_swim`,
        // a member that started after this one did); not again each time a member outside
        // the view is dialled on demand (membership anti-entropy, `member_exchange`,
        // repairs what that leaves out).
        if first || restarted || self.node.keeps_connected(peer) {
            self.send_members(sh, peer);
            let announce = if self.node.gossips(peer, h.incarnation) { None } else { self.peers.get(&peer).and_then(PeerEntry::member) };
            if let Some(me) = announce {
                let frame = Frame::Members(vec![me]);
                for (other, _) in self.connected().filter(|(id, _)| *id != peer) {
                    self.send_frame(sh, other, &frame);
                }
            }
        }
        // What the core had for it meanwhile.
        let held = self.peers.get_mut(&peer).map(|p| {
            p.held_since = None;
            std::mem::take(&mut p.held)
        });
        for frame in held.unwrap_or_default() {
            self.send_frame(sh, peer, &frame);
        }
    }

    /// The members with a working connection.
    fn connected(&self) -> impl Iterator<Item = (PeerId, &PeerEntry)> {
        self.peers.iter().filter(|(_, p)| p.active.is_some()).map(|(id, p)| (*id, p))
    }

    /// Sends `to` every other member this node is connected to, or was until the
    /// connection closed unused (outside a partial view), in frames of at most
    /// [`MAX_MEMBERS_PER_FRAME`].
    fn send_members(&self, sh: &Shared, to: PeerId) {
        let reachable = self.peers.iter().filter(|(id, p)| **id != to && p.unreachable_since.is_none());
        let others: Vec<MemberEntry> = reachable.filter_map(|(_, p)| p.member()).collect();
        for frame in member_frames(others) {
            self.send_frame(sh, to, &frame);
        }
    }

    /// Membership anti-entropy: the member list goes to one connected member drawn at
    /// random. Members learn of each other on connect; this repairs what that misses (an
    /// announcement dropped on a full queue, two members that forgot each other across a
    /// long partition while a third stayed connected to both).
    fn exchange_members(&mut self, sh: &Shared) {
        let connected: Vec<PeerId> = self.connected().map(|(id, _)| id).collect();
        if connected.is_empty() {
            return;
        }
        let to = connected[(self.random() % connected.len() as u64) as usize];
        self.send_members(sh, to);
    }

    fn members_in(&mut self, sh: &Shared, from: PeerId, list: Vec<MemberEntry>) {
        for m in list {
            if certs::validate_node_name(&m.name).is_err() {
                continue;
            }
            let id = node_id(&m.name);
            if id == sh.me.id || id == from {
                continue;
            }
            let room = self.peers.len() < MAX_PEERS;
            match self.peers.get_mut(&id) {
                Some(p) => {
                    if p.left == Some(m.incarnation) {
                        continue;
                    }
                    if p.active.is_none() && (p.addr.is_none() || m.incarnation > p.incarnation.unwrap_or(0)) {
                        p.addr = Some(m.addr);
                        p.left = None;
                    }
                }
                None if room => {
                    tracing::info!(peer = %m.name, addr = %m.addr, via = %self.name_of(from), "learned of a member");
                    let mut dial = Backoff::now();
                    if id < sh.me.id {
                        // The lower id dials first; we only dial if it has not by then.
                        dial.next_at += 3 * sh.settings.reconnect_min;
                    }
                    self.peers.insert(id, PeerEntry::new(m.name, Some(m.addr), dial));
                }
                None => {}
            }
        }
    }

    /// A member the core learned of through SWIM's infection (`membership_by_swim`): known
    /// from now on at `addr`, named by its certificate once connected, and dialled like a
    /// member from a member list (retried with backoff until `forget_after` counted from
    /// its first dial), that first dial at a moment drawn within the time its own dials
    /// of every member take (`members / max_dials_per_sec`): the members learn of a
    /// newcomer within a few probe periods of each other, and all dialling it at once
    /// would pile their handshakes onto it (beyond `max_incoming`); spread so, it gets
    /// about as many as it makes. A member this node knows keeps the address it has,
    /// unless this is a later incarnation than the one it is connected to or last was
    /// (it restarted, perhaps elsewhere): then its next dial, at once, goes there.
    fn learned(&mut self, sh: &Shared, id: PeerId, incarnation: u64, addr: SocketAddr) {
        if id == sh.me.id || addr.ip().is_unspecified() || addr.port() == 0 {
            return;
        }
        let room = self.peers.len() < MAX_PEERS;
        match self.peers.get_mut(&id) {
            Some(p) => {
                if p.left == Some(incarnation) {
                    return;
                }
                if p.addr.is_none() || p.incarnation.is_some_and(|i| incarnation > i) {
                    p.addr = Some(addr);
                    p.left = None;
                    p.dial = Backoff { in_flight: p.dial.in_flight, ..Backoff::now() };
                }
            }
            None if room => {
                // A name that is a valid DNS name (the dial's server name), until its
                // certificate names it.
                let name = format!("swim-{id:016x}");
                tracing::info!(peer = %name, %addr, "learned of a member through SWIM");
                let spread_ms = (self.peers.len() as u64 + 1) * 1000 / u64::from(sh.settings.max_dials_per_sec);
                let mut dial = Backoff::now();
                dial.next_at += Duration::from_millis(self.random() % (spread_ms + 1));
                // Unreachable (`forget_after`) from its dial on, not from now: the spread
                // outlasts `forget_after` beyond about 1,200 members at 20 dials a second.
                let at = dial.next_at;
                self.peers.insert(id, PeerEntry { unreachable_since: Some(at), ..PeerEntry::new(name, Some(addr), dial) });
                inc(&sh.counters.members_learned_by_swim, 1);
            }
            None => {}
        }
    }

    fn closed(&mut self, sh: &Arc<Shared>, conn_id: u64, reason: ConnectionError) {
        if let ConnectionError::ApplicationClosed(a) = &reason {
            // The peer refused us (we saw no reason to refuse it ourselves yet).
            let why = match &a.reason[..] {
                b"hash secret mismatch" => Some(RefusalReason::HashSecret),
                b"no node name" | b"unexpected node" => Some(RefusalReason::Identity),
                _ => None,
            };
            if let (true, Some(why), Some(c)) = (a.error_code == close::REFUSED, why, self.conns.get(&conn_id)) {
                let (peer, addr) = (c.peer, c.conn.remote_address());
                let detail = format!("it refused this node: {}", String::from_utf8_lossy(&a.reason));
                tracing::error!(peer = %self.name_of(peer), %detail, "refused by peer");
                self.refuse_peer(sh, conn_id, peer, addr, why, detail);
            }
        }
        let Some(mut c) = self.conns.remove(&conn_id) else { return };
        c.abort();
        if c.incoming {
            sh.incoming.fetch_sub(1, Ordering::Relaxed);
        }
        let peer = c.peer;
        let name = self.name_of(peer);
        let retired_left = self.conns.values().any(|o| o.peer == peer && o.stream_tx.is_none());
        let Some(p) = self.peers.get_mut(&peer) else { return };
        p.queue_full_closed += get(&c.queue_full);
        if p.synced_after_retired && c.stream_tx.is_none() && !c.peer_stream.ended.load(Ordering::Relaxed) {
            p.retired_lossy = true;
        }
        if p.synced_after_retired && !retired_left {
            // Every frame the retired connections brought came before their close; unless
            // one closed before the peer's stream on it ended, the sync is whole.
            let lossy = std::mem::take(&mut p.retired_lossy);
            (p.synced, p.synced_after_retired) = (!lossy, false);
            if lossy {
                tracing::warn!(peer = %name, "full sync not taken as complete: a connection replaced during it closed before its frames were all read; anti-entropy repairs them");
            }
            self.check_joined(sh);
        }
        // Closed unused (by either side), outside a partial view: not a failure.
        let unused = c.close_code.load(Ordering::Relaxed) == close::UNUSED.into_inner() as u32
            || matches!(&reason, ConnectionError::ApplicationClosed(a) if a.error_code == close::UNUSED);
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let was_active = p.active == Some(conn_id);
        if was_active {
            p.active = None;
            // Another connection to the same peer that said hello takes over.
            let next =
                self.conns.iter().filter(|(_, o)| o.peer == peer && o.hello.is_some() && o.stream_tx.is_some()).map(|(id, _)| *id).max();
            if let Some(p) = self.peers.get_mut(&peer) {
                p.active = next;
                if next.is_none() && !unused {
                    p.unreachable_since = Some(Instant::now());
                }
            }
        }
        let left = matches!(&reason, ConnectionError::ApplicationClosed(a) if a.error_code == close::LEAVE);
        let Some(p) = self.peers.get_mut(&peer) else { return };
        if left {
            // A leaving peer closes every connection to this node. Its last frames came
            // over the active one, whose close is reported after them: act on that close
            // (or on the last connection's), so a duplicate's close cannot overtake them.
            if !was_active && p.active.is_some() {
                return;
            }
            if let Some(h) = c.hello {
                // Once per leave: a duplicate connection that took over closes too.
                if p.incarnation.is_none_or(|i| h.incarnation >= i) && p.left.is_none_or(|l| l < h.incarnation) {
                    p.left = Some(h.incarnation);
                    (p.synced, p.synced_after_retired, p.retired_lossy) = (false, false, false);
                    self.node.remove_peer(peer);
                    tracing::info!(peer = %name, incarnation = h.incarnation, "peer left the cluster");
                }
            }
            return;
        }
        if p.active.is_some() {
            return;
        }
        if unused {
            tracing::debug!(peer = %name, "connection closed unused (outside the view)");
            return;
        }
        // Lost, or refused before it was ever used (a mismatch, a timeout): redial later,
        // backing off further if it never became the peer's connection.
        if was_active {
            tracing::info!(peer = %name, %reason, "connection to peer lost; reconnecting");
        } else {
            tracing::debug!(peer = %name, %reason, "connection closed before use");
            p.dial.failures += 1;
        }
        let failures = p.dial.failures;
        let delay = self.backoff(sh, failures, Some(peer));
        if let Some(p) = self.peers.get_mut(&peer) {
            p.dial.next_at = p.dial.next_at.max(Instant::now() + delay);
        }
    }
}

/// Whether connection `new` should replace `old` (both to the same peer, both past
/// hello). Both sides of a pair reach the same answer: the newer incarnation wins; for
/// a simultaneous dial, the connection the lower node id dialed; else the later dial.
fn prefer(new: Option<&ConnEntry>, old: &ConnEntry, me: PeerId) -> bool {
    let Some(new) = new else { return false };
    let (Some(nh), Some(oh)) = (new.hello, old.hello) else { return old.hello.is_none() };
    if nh.incarnation != oh.incarnation {
        return nh.incarnation > oh.incarnation;
    }
    if new.outgoing != old.outgoing {
        let dialer = |c: &ConnEntry| if c.outgoing { me } else { c.peer };
        return dialer(new) < dialer(old);
    }
    new.dial_seq > old.dial_seq
}

/// A member list as frames of at most [`MAX_MEMBERS_PER_FRAME`] entries each (none for
/// an empty list): a list of any length arrives whole.
fn member_frames(list: Vec<MemberEntry>) -> Vec<Frame> {
    let mut list = list.into_iter().peekable();
    std::iter::from_fn(|| list.peek().is_some().then(|| Frame::Members(list.by_ref().take(MAX_MEMBERS_PER_FRAME).collect()))).collect()
}

async fn read_datagrams(sh: Arc<Shared>, conn: Connection, conn_id: u64) {
    while let Ok(bytes) = conn.read_datagram().await {
        if sh.events.send(Event::Datagram { conn: conn_id, bytes }).await.is_err() {
            return;
        }
    }
}

/// Reads the peer's streams one after the other (a peer opens one per connection), and
/// tells the writer each time one has ended (every frame of it handed to the node task).
async fn read_streams(sh: Arc<Shared>, conn: Connection, conn_id: u64, stream: Arc<PeerStream>) {
    while let Ok(mut recv) = conn.accept_uni().await {
        let read = read_frames(&sh, &mut recv, conn_id).await;
        if read == Ok(true) {
            stream.ended.store(true, Ordering::Relaxed);
        }
        stream.done.notify_one();
        if let Err(error) = read {
            let _ = sh.events.send(Event::ProtocolError { conn: conn_id, error }).await;
            return;
        }
    }
    stream.done.notify_one();
}

/// Reads frames until the stream ends: `Ok(true)` when the peer finished it and every
/// frame was handed on, `Ok(false)` when it was cut off. `Err` only for a protocol
/// violation. The bytes go through [`FrameDecoder`], which holds at most one frame
/// ([`MAX_FRAME`](super::wire::MAX_FRAME)) plus one read chunk.
async fn read_frames(sh: &Shared, recv: &mut RecvStream, conn_id: u64) -> Result<bool, String> {
    let mut frames = FrameDecoder::default();
    loop {
        let chunk = match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => return frames.finish().map(|()| true).map_err(|e| e.to_string()),
            Err(_) => return Ok(false), // reset or connection lost
        };
        frames.push(&chunk);
        while let Some(frame) = frames.next_frame().map_err(|e| e.to_string())? {
            if sh.events.send(Event::Frame { conn: conn_id, frame }).await.is_err() {
                return Ok(false);
            }
        }
    }
}

/// Owns the connection's outgoing stream: the hello, then every queued frame. When the
/// queue is closed (the connection retired), finishes the stream, waits for the peer to
/// acknowledge it and, for a connection replaced or a duplicate (which the peer retires
/// too), for the peer's stream to end here, then closes the connection: closing drops
/// what has arrived and is not read yet, which may be the tail of a full sync.
async fn write_stream(
    conn: Connection,
    hello: Frame,
    mut rx: mpsc::Receiver<Vec<u8>>,
    close_code: Arc<AtomicU32>,
    peer_stream: Arc<PeerStream>,
) {
    let Ok(mut send) = conn.open_uni().await else { return };
    if send.write_all(&hello.encode()).await.is_err() {
        return;
    }
    while let Some(frame) = rx.recv().await {
        if send.write_all(&frame).await.is_err() {
            return;
        }
    }
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(LINGER, send.stopped()).await;
    }
    let code = VarInt::from_u32(close_code.load(Ordering::Relaxed));
    if (code == close::REPLACED || code == close::DUPLICATE) && !peer_stream.ended.load(Ordering::Relaxed) {
        let _ = tokio::time::timeout(LINGER, peer_stream.done.notified()).await;
    }
    conn.close(code, b"retired");
}

/// Runs the connection's two readers, then reports the close. One task sends both, so
/// the node task sees every frame the peer got through before it sees the close: a
/// leaving peer's last counts are merged before the peer is removed (and its readers
/// aborted), never lost to a race between tasks.
async fn read_until_closed(sh: Arc<Shared>, conn: Connection, conn_id: u64, peer_stream: Arc<PeerStream>) {
    tokio::join!(read_datagrams(sh.clone(), conn.clone(), conn_id), read_streams(sh.clone(), conn.clone(), conn_id, peer_stream));
    let reason = conn.closed().await;
    let _ = sh.events.send(Event::Closed { conn: conn_id, reason }).await;
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
