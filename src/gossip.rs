//! The gossip protocol core: a state machine with no sockets, no OS clock and no OS
//! randomness.
//!
//! A [`GossipNode`] shares its [`RateLimiter`]'s store: the request path counts, the node
//! collects what changed and exchanges absolute per-replica counts with its peers. It is
//! driven in quinn-proto's vocabulary; a driver (the QUIC transport, or the simulator)
//! calls, in any order and as often as it likes:
//!
//! 1. [`handle_message`](GossipNode::handle_message) with each message received,
//! 2. [`handle_timeout`](GossipNode::handle_timeout) once the deadline from
//!    [`poll_timeout`](GossipNode::poll_timeout) has passed,
//! 3. [`poll_transmit`](GossipNode::poll_transmit) until it returns `None`, sending each
//!    [`Transmit`] to its peer.
//!
//! Time is Unix milliseconds from the caller (the same clock the limiter's windows use);
//! randomness comes from the seed given to [`GossipNode::new`]. The same inputs give the
//! same outputs, byte for byte.
//!
//! # Protocol
//! * **Deltas.** Every round (`interval_ms`) the node sends the counts that changed since
//!   the last round — its own, and in fan-out mode the ones it learned — as absolute
//!   values, so delivery is idempotent and order-insensitive. Messages are packed up to
//!   `max_message_bytes`. A round with nothing to say sends a heartbeat.
//! * **Targets.** Up to `full_mesh_max_peers` peers, every peer every round (full mesh:
//!   each node hears every change first hand, one round after it happens). Beyond that,
//!   `fanout` live peers per round, taken in turn from a shuffled cycle of them (each
//!   live peer once per cycle of `⌈live / fanout⌉` rounds), and every node forwards what
//!   it learns once: a change reaches all `N` nodes in about `log(N)/log(fanout + 1)`
//!   rounds.
//! * **Aggregated dissemination.** Beyond `aggregate_above_peers` peers (default 16, so
//!   it takes over from fan-out), a node sends its changed counts of a key only to the
//!   key's `aggregators` (default 2): the first distinct members after the key's hash on a
//!   ring of the live members. Each round, for every key and window whose counts changed
//!   on it, the key's first aggregator sends every live member the **others' total**:
//!   the sum of every replica's count but the receiver's own (all of them, for a member
//!   that has none). The member keeps it beside any per-replica counts it holds and
//!   decides on the larger of the two, both lower bounds of the truth (a max-register
//!   per key and window: merges commute, are idempotent, and never lower a view). So the
//!   entries a node sends and receives per round follow the keys that change, not the
//!   fleet's size (the messages do not: up to one per aggregator). Every
//!   [`FULL_RESEND_PERIODS`] anti-entropy periods (and when the view goes quiet, and two
//!   rounds after the ring changes) each node sends every replica's counts it holds (its
//!   own, and as an aggregator or a former one, others', including replicas that are
//!   gone) to their keys' aggregators, and every aggregator its totals: loss is repaired
//!   by repetition, and a key's new aggregator learns what the old ones held. In the
//!   periods between, a node sends once more its own counts and the totals it published
//!   that have gone quiet since the last period (a busy key's next count or total
//!   supersedes a lost one), and the counts it holds of replicas that do not resend their
//!   own (gone ones); a peer heard from again after a silence longer than a period gets,
//!   at the next round (at most one such resend a period), what a full resend would send
//!   it (what went to it meanwhile may have been lost). A resend passes over at most
//!   [`MAX_RESEND_ENTRIES`] counts of a store and resumes there next time (full resends
//!   and the others each where they stopped). An aggregator that dies is replaced once
//!   it is suspected; counts are lost only if no live member holds them. Digests are
//!   not used in this mode (nodes hold different sets of counts by design); a full sync
//!   to a peer is every count this node holds of the keys the peer aggregates.
//! * **Liveness.** A peer not heard from for `suspect_after_ms` is down: it gets no deltas
//!   (heartbeats keep probing it) and no longer counts among the replicas that share the
//!   quota. Its counts stay until their windows expire. Beyond `swim_above_peers` peers
//!   (default 128) SWIM decides instead ([`crate::swim`], foca): each peer heard from
//!   first hand is handed to SWIM, which probes one member per probe period, probes
//!   indirectly through others when an ack is late, and spreads suspicions that a live
//!   member refutes. A peer SWIM declares down is asked first and taken down two probe
//!   periods after an unanswered ask; an answer (any message, first hand) clears the
//!   verdict, and the peer rejoins SWIM as a new identity. Silence still takes a peer
//!   down (heartbeats in turn go on): SWIM only makes detection faster, `O(log N)`
//!   probe periods where silence takes `O(N)` rounds.
//! * **Full sync.** A node asks its peers (in fan-out mode, `fanout` of them) for
//!   everything on start; a peer that comes up, or comes back with a new incarnation, is
//!   sent everything this node holds (with aggregated dissemination: the counts of the
//!   keys it aggregates, and from a member of the ring, first the totals of the other
//!   keys this node publishes), in steps within the per-round export budget;
//!   [`Event::FullSyncSent`] says when the last of it is queued.
//! * **Anti-entropy.** Every `anti_entropy_rounds` rounds a node sends one random live
//!   peer a digest: per replica and key bucket, a fingerprint of the counts it holds for
//!   the current and previous windows. The receiver pushes its counts for every bucket
//!   that differs and asks for the sender's, which repairs what loss dropped.
//! * **Cluster time.** Every anti-entropy period a node pings its live peers; each answer
//!   is a sample of the peer's clock offset. Every round, the node's offset from the
//!   cluster (the median clock, see `cluster_time`) is updated and set on its limiter,
//!   which cuts windows and reports `reset_after`/`retry_after` on cluster time: the
//!   request's timestamp plus the offset (timestamps are still validated against the
//!   node's own clock, which is what callers stamp them with). Counts on the wire carry
//!   cluster-time windows.
//!
//! # What one peer can make a node spend
//! Digests and repairs are answered from a per-peer budget ([`MAX_ANSWERS_PER_PERIOD`]
//! per anti-entropy period), from fingerprints computed at most once per store per
//! period for peers; repairs and full syncs are exported in steps of at most
//! [`MAX_REPAIR_ENTRIES_PER_ROUND`] counts per peer per round (plus one key's), wherever
//! the keys fall in the store's shards. A peer introduces at most
//! [`MAX_INCARNATIONS_PER_PEER`] incarnations of its own and [`MAX_RELAYED_PER_PEER`]
//! other replicas; entries whose counts all expired are reclaimed. `docs/security.md`
//! lists every bound.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::cluster_time::{self, Estimator};
use crate::codec::{self, Batch, BatchHead, Body, DecodeError, DigestRow, Envelope, WireEntry, DIGEST_BUCKETS};
use crate::counter::ReplicaId;
use crate::key::splitmix64;
use crate::limits::LimitsVersion;
use crate::replica::{ExportCursor, Exported, OthersCount, Replica, LOCAL_REPLICA};
use crate::swim::{self, Swim, SwimId};
use crate::{ConfigError, RateLimiter};

/// How a driver names a peer: the node id it authenticated (for QUIC, from the peer's
/// verified certificate).
pub type PeerId = u64;

/// The most replicas relayed by peers (incarnations of nodes other than the peer that
/// sent them) a node keeps counts for at once. Each peer's own incarnations come on top,
/// at most [`MAX_INCARNATIONS_PER_PEER`] each. Replicas whose counts have all expired are
/// reclaimed every anti-entropy period.
pub const MAX_REPLICAS: usize = 65_536;
/// The most live incarnations of its own one peer can introduce (a restart without its
/// counts is a new incarnation). Only that peer's traffic counts against it.
pub const MAX_INCARNATIONS_PER_PEER: usize = 8;
/// The most live replicas of other nodes one peer can introduce by relaying; a batch for a
/// new replica past it is dropped and counted in [`GossipStats::replicas_refused`]. As
/// many as the members a node keeps, so that one full sync can introduce all of them;
/// 16 members at their budgets fill [`MAX_REPLICAS`].
pub const MAX_RELAYED_PER_PEER: usize = 4_096;
/// `Digest` and `Repair` messages answered per peer per anti-entropy period
/// (`anti_entropy_rounds` rounds); more are dropped and counted in
/// [`GossipStats::answers_dropped`]. A `SyncRequest` is answered once per suspicion period.
pub const MAX_ANSWERS_PER_PERIOD: u32 = 64;
/// Counts repairs and full syncs export to one peer per round (about 50 KB; a step stops
/// after the key that reaches it); the rest follows in later rounds. What a step sends is
/// charged (a full sync's totals as sent, about one per key and window), and a step that
/// stops before the store's end at least [`MAX_EXPORT_PASSES_PER_ROUND`]th of this: at
/// most that many such steps per peer and round, each looking at most at 16 table slots
/// per count left of this budget.
pub const MAX_REPAIR_ENTRIES_PER_ROUND: usize = 4_096;
/// Export steps per peer and round that stop before a store's end (see
/// [`MAX_REPAIR_ENTRIES_PER_ROUND`]). A step selects what the peer wants and can find
/// little of it: the keys a member outside the pool aggregates (none), one bucket of a
/// repair, a pool member's totals (one per window for as many counts as the key has
/// writers). Charged only what it sent, steps that found nothing would pass over a whole
/// store of any size in one round.
pub const MAX_EXPORT_PASSES_PER_ROUND: usize = 16;
/// Repair exports waiting per peer; a repair for a window length already waiting joins it.
const MAX_REPAIR_JOBS: usize = 4;
/// The most aggregators per key ([`GossipConfig::aggregators`]).
pub const MAX_AGGREGATORS: usize = 8;

/// Aggregated dissemination: the most (key, window) pairs one peer's counts mark in one
/// round for this node to publish totals of, among the keys it aggregates: as the first
/// aggregator (their totals go to every live member) or as a standby (published two
/// rounds on if the first aggregator's totals lag). Past it the counts are merged; the
/// totals of first-aggregator keys go out at the next anti-entropy period (with what went
/// quiet), and standby keys are not watched for that round.
pub const MAX_PUBLISHED_PER_PEER_ROUND: usize = 1_024;

/// Aggregated dissemination: the most counts one periodic resend exports from a store;
/// a larger store is resent over several periods, resuming where the last one stopped.
/// A pool member ([`GossipConfig::aggregator_pool`]) holds every writer's counts of
/// `aggregators / aggregator_pool` of the keys: at 300 members and 3,000 busy keys, a
/// limit of 16,384 spread its resends over several periods, and the views took 600 ms
/// instead of 140 ms to agree once traffic stopped (`docs/benchmarks.md`).
pub const MAX_RESEND_ENTRIES: usize = 65_536;

/// Aggregated dissemination: every this many anti-entropy periods the periodic resend
/// passes over every count held, and sends every total. In the periods between, a node
/// sends once more what went quiet since the last period of its own counts and of the
/// totals it published, and the counts it holds of replicas that do not resend their own
/// (gone ones); what a full resend would send a peer goes to one heard from again after a
/// silence longer than a period (`docs/design.md`, "Repair by repetition"). A store
/// larger than one resend takes a full pass of one period per part.
pub const FULL_RESEND_PERIODS: u64 = 5;

/// Aggregated dissemination: the shortest silence (in rounds) after which a peer heard
/// again gets a resend of what a full resend would send it, and the fewest rounds between
/// two such resends, whatever the anti-entropy period (with a period of one round, the
/// jitter of a round would count as a silence).
const MIN_HEAL_ROUNDS: u64 = 3;

/// What a SWIM packet's envelope may add to it (version, sender, variant, length): its
/// packets are kept this much below `max_message_bytes`.
const SWIM_ENVELOPE_BYTES: usize = 32;

/// Points each member has on aggregated dissemination's hash ring.
const RING_POINTS: u64 = 16;

/// The most messages waiting for [`GossipNode::poll_transmit`]; past it new ones are
/// dropped and counted (a driver that stops polling cannot grow memory without bound).
pub const MAX_OUTBOX: usize = 65_536;

/// In fan-out mode, the most peers with no usable clock sample yet that a node pings for
/// one per anti-entropy period, beside its `fanout` random ones: a hundred members sample
/// each other's clocks within seven periods.
pub const MAX_CLOCK_PROBES: usize = 16;

/// Settings of a [`GossipNode`]. Every field has a documented default and range.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GossipConfig {
    /// This node's replica: its node id and incarnation. A node that restarts without
    /// its counts must use a new, higher incarnation.
    pub replica: ReplicaId,
    /// Time between rounds. Default 20 ms; range `1..=60_000`.
    pub interval_ms: u64,
    /// Largest message. Default 1200 bytes (fits a QUIC datagram on any path);
    /// range `256..=65_000`.
    pub max_message_bytes: usize,
    /// Rounds between anti-entropy digests. Default 10; at least 1.
    pub anti_entropy_rounds: u64,
    /// Up to this many peers, full mesh; beyond, random fan-out. Default 16.
    pub full_mesh_max_peers: usize,
    /// Peers per round in fan-out mode. Default 4; at least 1.
    pub fanout: usize,
    /// Beyond this many peers, aggregated dissemination: a node sends its counts of a key
    /// only to the key's `aggregators`, and the first of them sends every live member the
    /// total of the others' counts (see the module documentation). Default 16: it replaces
    /// fan-out, which it beats at every size measured (`docs/benchmarks.md`); a larger
    /// value keeps fan-out up to it; up to `full_mesh_max_peers` peers, full mesh whatever
    /// this says. Every member must run a version that speaks it (this one).
    pub aggregate_above_peers: usize,
    /// Aggregators per key in aggregated dissemination. Default 2; range `1..=8`.
    pub aggregators: usize,
    /// The most members that aggregate: in a larger cluster, the aggregators are the
    /// `aggregator_pool` members (this node and its up peers) that rank first by a hash
    /// of their ids, which every member computes alike. A member outside the pool sends
    /// its counts to the pool and hears the totals from it: it receives one batch of
    /// totals per pool member and round (usually one message), however large the fleet.
    /// Pool members carry most of the bytes and need cells for every writer of more keys
    /// (`docs/design.md`, "The pool"). Default 32; at least `aggregators`; the same on
    /// every member.
    pub aggregator_pool: usize,
    /// Beyond this many peers (and `full_mesh_max_peers`), liveness comes from SWIM
    /// (foca, [`crate::swim`]): probes of one member per probe period (ten rounds, at
    /// least 200 ms) with indirect probes, and suspicion that a member refutes, instead of
    /// a silence whose length grows with `N` (heartbeats to `fanout` peers per round go on:
    /// they keep members that judge by silence informed, and silence still takes a peer
    /// down: with `partial_view` off after `suspect_after_ms`, so SWIM only makes
    /// detection faster; with it on, after four SWIM cycles). Default 128: SWIM notices a
    /// crash in `O(log N)` probe periods, silence in `O(N)` rounds; in the simulator silence
    /// noticed it in 0.6 s at 30 members and 2.0 s at 100, where SWIM only added bytes,
    /// and SWIM in 3.2 s at 300, where silence took 6.0 (`docs/benchmarks.md`). Every
    /// member must run a version that speaks it (this one).
    pub swim_above_peers: usize,
    /// A partial view beyond `swim_above_peers` plus an eighth of it (144 peers at the
    /// default), with aggregated dissemination: a member outside the aggregator pool
    /// sends its heartbeats in turn, clock samples and new limits to the pool's members
    /// only (every member then takes cluster time from the pool's clocks:
    /// `docs/design.md`, "Cluster time") and hears from the other members through SWIM
    /// alone; in SWIM mode every peer's silence then takes it down only after four SWIM
    /// probe cycles over the members (a peer heartbeats by its own view of the pool,
    /// which may differ from this node's), so SWIM is what notices a failure; and the
    /// transport keeps connections open to the pool only (`docs/cluster.md`, "A partial
    /// view of connections").
    /// Default true. A member of a version without it judges every member by silence and
    /// would take down the members that no longer heartbeat it: to upgrade a cluster of
    /// more than 129 members from such a version, start the new version with this false,
    /// and set it true once every member runs the new version.
    pub partial_view: bool,
    /// The address other members reach this node at, which its SWIM identity carries:
    /// a member that learns of this node by SWIM's infection (never having heard of it
    /// from a driver's member list) gets [`Event::MemberLearned`] with it. The QUIC
    /// driver sets it to the advertised address (`ClusterConfig::membership_by_swim`).
    /// Default `None`: identities go without an address, in the form versions before
    /// this one read (a version from before it cannot read an identity with one).
    pub swim_address: Option<std::net::SocketAddr>,
    /// A peer silent this long is down. Default 0: automatic, five rounds in full mesh,
    /// and in fan-out mode four times the rounds a peer takes to pick this node. With
    /// SWIM, also how long a suspected member has to refute the suspicion (0: foca's
    /// rule, `4 · max(1, log10 N)` probe periods); silence stays the backstop there, so
    /// a value set for a small cluster takes silent peers down as quickly in a large one.
    pub suspect_after_ms: u64,
    /// Cut windows on cluster time (this node's clock plus its estimated offset from the
    /// cluster's median clock). Default true; false: on this node's own clock.
    pub cluster_time: bool,
    /// A clock sample with a longer round trip is not used. Default 1000 ms; range
    /// `1..=60_000`.
    pub clock_max_rtt_ms: u64,
    /// The most this node's cluster offset moves per round. Default 250 ms; range
    /// `1..=86_400_000`.
    pub clock_max_step_ms: u64,
}

impl GossipConfig {
    /// Defaults for `replica`.
    pub fn new(replica: ReplicaId) -> Self {
        Self {
            replica,
            interval_ms: 20,
            max_message_bytes: 1200,
            anti_entropy_rounds: 10,
            full_mesh_max_peers: 16,
            fanout: 4,
            aggregate_above_peers: 16,
            aggregators: 2,
            aggregator_pool: 32,
            swim_above_peers: 128,
            partial_view: true,
            swim_address: None,
            suspect_after_ms: 0,
            cluster_time: true,
            clock_max_rtt_ms: 1_000,
            clock_max_step_ms: 250,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason| Err(ConfigError::Invalid { field, reason });
        if !(1..=60_000).contains(&self.interval_ms) {
            return bad("interval_ms", "must be between 1 and 60000");
        }
        if !(256..=65_000).contains(&self.max_message_bytes) {
            return bad("max_message_bytes", "must be between 256 and 65000");
        }
        if self.anti_entropy_rounds == 0 {
            return bad("anti_entropy_rounds", "must be at least 1");
        }
        if self.fanout == 0 {
            return bad("fanout", "must be at least 1");
        }
        if !(1..=MAX_AGGREGATORS).contains(&self.aggregators) {
            return bad("aggregators", "must be between 1 and 8");
        }
        if self.aggregator_pool < self.aggregators {
            return bad("aggregator_pool", "must be at least `aggregators`");
        }
        if !(1..=60_000).contains(&self.clock_max_rtt_ms) {
            return bad("clock_max_rtt_ms", "must be between 1 and 60000");
        }
        if !(1..=86_400_000).contains(&self.clock_max_step_ms) {
            return bad("clock_max_step_ms", "must be between 1 and 86400000");
        }
        Ok(())
    }
}

/// One message for a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Transmit {
    /// The peer.
    pub to: PeerId,
    /// The encoded message (at most `max_message_bytes`).
    pub bytes: Vec<u8>,
    /// Part of a full sync or a repair: worth sending reliably (the QUIC driver uses a
    /// stream); deltas and heartbeats are fine to lose (datagrams).
    pub reliable: bool,
}

/// What happened inside a [`GossipNode`] that a driver may act on, from
/// [`GossipNode::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A peer was heard from after being down (or never heard), or with a new incarnation.
    PeerUp {
        /// The peer.
        peer: PeerId,
        /// Its incarnation.
        incarnation: u64,
        /// It came back as a new incarnation (it restarted without its counts).
        restarted: bool,
    },
    /// A peer was silent for the suspicion period: it no longer shares the quota.
    PeerDown {
        /// The peer.
        peer: PeerId,
        /// How long it had been silent, if it was ever heard.
        silent_ms: Option<i64>,
    },
    /// The number of live replicas sharing the quota, or this node's place among them,
    /// changed (what the bounded policy's shares follow).
    LiveChanged {
        /// Live replicas, this one included.
        live_replicas: u64,
        /// This node's place among them, ordered by node id.
        index: u64,
    },
    /// The last message of a full sync for `peer` was queued (every earlier one is
    /// already in [`GossipNode::poll_transmit`]'s queue, ahead of anything queued later).
    FullSyncSent {
        /// The peer.
        peer: PeerId,
    },
    /// In SWIM mode, SWIM told of a member this node has no peer for, or of a later
    /// incarnation of a peer than it has heard from (a restart, perhaps elsewhere), and of
    /// the address that member is reached at ([`GossipConfig::swim_address`]): a join or
    /// a restart spreading by infection. A driver adds it to the members it knows of, at
    /// that address (or takes the address, for a peer it is not connected to); the core
    /// counts it among its peers once the driver adds it ([`GossipNode::add_peer`]), and
    /// up once it is heard from. Reported each time SWIM takes such an identity for an
    /// active member (a renewed identity may be reported twice).
    MemberLearned {
        /// The member.
        peer: PeerId,
        /// Its incarnation, as SWIM knows it.
        incarnation: u64,
        /// Where it said it is reached.
        addr: std::net::SocketAddr,
    },
    /// Input from `peer` that decoded but was refused, with the reason (at most one event
    /// per message; each refusal is also counted in [`GossipStats`]). Messages that do
    /// not decode are reported by [`GossipNode::handle_message`]'s error instead.
    Refused {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: Refusal,
    },
}

/// Why the core refused a peer's input. See [`Event::Refused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// A limits register dated more than a day ahead of this node's clock, or one that
    /// does not resolve ([`GossipStats::refused`]).
    Limits,
    /// Counts for replicas past the sender's budget of replicas it may introduce
    /// ([`GossipStats::replicas_refused`]); the first such replica of the message.
    Replica(ReplicaId),
    /// A digest or repair past the sender's answer budget for the anti-entropy period
    /// ([`GossipStats::answers_dropped`]).
    AnswerBudget,
    /// A repair while the most repairs were already waiting for the sender
    /// ([`GossipStats::repairs_dropped`]).
    RepairQueue,
    /// A SWIM packet foca refused, or whose header named another sender
    /// ([`GossipStats::swim_refused`]).
    Swim,
}

/// The most events waiting for [`GossipNode::poll_event`]; past it new ones are dropped
/// and counted in [`GossipStats::events_dropped`].
pub const MAX_EVENTS: usize = 4_096;

/// Why a message was dropped. Every drop is also counted in [`GossipStats`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The sender is not a configured peer.
    #[error("message from unknown peer {0}")]
    UnknownPeer(PeerId),
    /// The message names another node as its sender.
    #[error("peer {peer} sent a message signed as node {claimed}")]
    Spoofed {
        /// Who sent it.
        peer: PeerId,
        /// Whom it claims to come from.
        claimed: u64,
    },
    /// Not a valid message.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Valid, but it would exceed a limit (replicas, window lengths); nothing was merged.
    #[error("message refused: {0}")]
    Refused(crate::Error),
}

/// Counters of what a node did. Monotone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GossipStats {
    /// Rounds run.
    pub rounds: u64,
    /// Messages handed to the driver.
    pub messages_sent: u64,
    /// Bytes handed to the driver.
    pub bytes_sent: u64,
    /// Counts sent (one per key, window and replica).
    pub entries_sent: u64,
    /// Messages accepted.
    pub messages_received: u64,
    /// Bytes of accepted messages.
    pub bytes_received: u64,
    /// Counts that raised this node's view.
    pub entries_merged: u64,
    /// Malformed or oversized messages dropped.
    pub decode_errors: u64,
    /// Messages from unknown peers dropped.
    pub unknown_peers: u64,
    /// Messages whose claimed sender did not match the peer, dropped.
    pub spoofed: u64,
    /// Messages refused whole for exceeding a limit.
    pub refused: u64,
    /// Counts dropped because the key cap was reached.
    pub dropped_at_capacity: u64,
    /// Full syncs sent.
    pub full_syncs_sent: u64,
    /// Aggregated dissemination: resends of what a full resend would send, to the peers
    /// heard from again after a silence longer than an anti-entropy period (at most one
    /// per period).
    pub resends_to_peers_heard_again: u64,
    /// Digests sent.
    pub digests_sent: u64,
    /// Buckets found different by a digest and repaired.
    pub buckets_repaired: u64,
    /// Newer limits received and put in force.
    pub limits_installed: u64,
    /// Messages dropped because the outbox was full.
    pub outbox_dropped: u64,
    /// Events dropped because [`MAX_EVENTS`] were waiting.
    pub events_dropped: u64,
    /// Passes over a whole store (to fingerprint it for digests): for peers' digests at
    /// most one per store per anti-entropy period, however many ask.
    pub store_passes: u64,
    /// Counts dropped for a window no acceptable timestamp falls in.
    pub out_of_range: u64,
    /// Batches dropped because their replica would pass a replica budget.
    pub replicas_refused: u64,
    /// Replica entries reclaimed once all their counts had expired.
    pub replicas_reclaimed: u64,
    /// `Digest` and `Repair` messages dropped past a peer's answer budget.
    pub answers_dropped: u64,
    /// Repair requests dropped because the peer already had the most exports waiting.
    pub repairs_dropped: u64,
    /// Aggregated dissemination: others' totals sent (one per key, window and receiver).
    pub totals_sent: u64,
    /// Aggregated dissemination: others' totals that raised this node's view.
    pub totals_merged: u64,
    /// Aggregated dissemination: keys and windows whose totals this node published as a
    /// standby aggregator, the first aggregator's totals lagging the counts it held.
    pub standby_published: u64,
    /// SWIM packets sent (membership and failure detection beyond `swim_above_peers`).
    pub swim_sent: u64,
    /// SWIM packets received and handed to foca.
    pub swim_received: u64,
    /// SWIM packets refused (malformed, spoofed, or naming too many unknown members).
    pub swim_refused: u64,
}

impl Peer {
    /// Whether `incarnation` is one of a process that is gone: one it restarted from, or
    /// one above the one it restarted as when its clock stepped back.
    fn gone(&self, incarnation: u64) -> bool {
        self.incarnation.is_some_and(|i| incarnation < i) || self.gone_above.contains(&incarnation)
    }

    /// Whether to announce this node to it over SWIM now (at most once per probe period),
    /// noting that it was.
    fn announce_due(&mut self, now_ms: i64, probe_ms: i64) -> bool {
        let due = self.swim_announced_ms.is_none_or(|t| now_ms - t >= probe_ms);
        if due {
            self.swim_announced_ms = Some(now_ms);
        }
        due
    }
}

#[derive(Debug, Clone, Default)]
struct Peer {
    last_heard_ms: Option<i64>,
    up: bool,
    /// SWIM's verdict (None: SWIM has none yet); in SWIM mode it decides `up`.
    swim: Option<bool>,
    /// When this node last announced itself to it over SWIM because SWIM held it down
    /// (at most once per probe period).
    swim_announced_ms: Option<i64>,
    /// When SWIM's last verdict that it is down came.
    swim_down_since_ms: Option<i64>,
    incarnation: Option<u64>,
    /// Added after this node's SWIM started: it joined (or this node's driver met it)
    /// while SWIM ran here.
    joined_in_swim: bool,
    /// Where the transport reaches it ([`GossipNode::set_peer_address`]): what this node's
    /// SWIM tells members that have not heard of it.
    addr: Option<std::net::SocketAddr>,
    /// It restarted with a lower incarnation than processes this node had heard of (its
    /// clock stepped back): those processes' incarnations, which are gone although above
    /// `incarnation` (at most `MAX_INCARNATIONS_PER_PEER` plus one).
    gone_above: Vec<u64>,
    rtt_ms: Option<i64>,
    clock_offset_ms: Option<i64>,
    /// Our unanswered ping to it: its send time.
    ping_sent_ms: Option<i64>,
    /// When a SWIM verdict that it is up as an identity not heard from last made this node
    /// ping it (at most once per probe period, answered or not).
    up_pinged_ms: Option<i64>,
    /// When a full sync to it last started.
    last_sync_answered_ms: Option<i64>,
    /// Digests and repairs answered this anti-entropy period.
    answers_used: u32,
    /// Counts exported to it for repairs this round.
    exported_this_round: usize,
    /// Keys its counts made this node publish this round (aggregated dissemination).
    published_this_round: usize,
    /// Repairs and full syncs still being exported to it, in steps.
    jobs: VecDeque<RepairJob>,
    /// A message of the full sync under way was dropped (the outbox was full): it is sent
    /// again rather than announced complete.
    sync_lossy: bool,
}

/// What a periodic resend sends (aggregated dissemination).
#[derive(Clone, Copy)]
enum Resend<'a> {
    /// Every count held to its key's aggregators, every total to its receivers.
    Full,
    /// Between full resends: only the counts held of replicas that do not resend their
    /// own (gone, or not heard as their current incarnation).
    Partial,
    /// What a full resend sends these peers, to them alone.
    To(&'a [PeerId]),
}

/// The message [`GossipNode::pack_into`] is filling: its batches' heads, each with its
/// range of `flat`.
#[derive(Default)]
struct Packing {
    heads: Vec<(BatchHead, std::ops::Range<usize>)>,
    flat: Vec<WireEntry>,
}

/// A repair or a full sync being exported in steps: which store, which counts, and where
/// the export stopped.
#[derive(Debug, Clone)]
struct RepairJob {
    window_ms: u64,
    wanted: Wanted,
    /// Where the export stopped.
    cursor: ExportCursor,
}

/// The counts a [`RepairJob`] exports.
#[derive(Debug, Clone)]
enum Wanted {
    /// A repair: the (replica, bucket mask) pairs a digest found different.
    Buckets(BTreeMap<ReplicaId, u8>),
    /// A full sync: every count.
    All,
    /// Aggregated dissemination's full sync: every replica's counts this node holds of
    /// the keys the peer aggregates.
    Aggregated,
    /// Aggregated dissemination's full sync from a member of the ring: the others' totals
    /// of the keys this node is the first aggregator of and the peer does not aggregate
    /// (the [`Aggregated`](Self::Aggregated) part carries none of them).
    Totals,
}

impl Wanted {
    /// Whether the job is a full sync (of either kind), not a repair.
    fn is_sync(&self) -> bool {
        !matches!(self, Wanted::Buckets(_))
    }
}

impl RepairJob {
    /// A full sync's export of the store for `window_ms` (`aggregated`: of the keys the
    /// peer aggregates).
    fn full_sync(window_ms: u64, aggregated: bool) -> Self {
        let wanted = if aggregated { Wanted::Aggregated } else { Wanted::All };
        Self { window_ms, wanted, cursor: ExportCursor::default() }
    }
}

/// A remote replica this node keeps counts for.
#[derive(Debug, Clone)]
struct ReplicaEntry {
    id: ReplicaId,
    /// The peer whose message introduced it, and whether it was that peer's own.
    introducer: PeerId,
    own: bool,
    /// Per window length, the newest window a count of it was merged for.
    newest: Vec<(u64, i64)>,
}

/// Fingerprints per window length, replica and window, and the round each store's were
/// computed in: a store is passed over at most once per round for this node's own
/// digests and once per anti-entropy period for peers' (however many arrive, whatever
/// windows they name).
#[derive(Debug, Default)]
struct FingerprintCache {
    /// Per window length: the round the fingerprints were computed in, and they.
    stores: BTreeMap<u64, (u64, Fingerprints)>,
}

/// Per replica and window, one fingerprint per key bucket.
type Fingerprints = BTreeMap<(ReplicaId, i64), [u64; DIGEST_BUCKETS]>;

/// What a node knows of one peer. See [`GossipNode::peer_stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerStats {
    /// The peer.
    pub peer: PeerId,
    /// Heard from within the suspicion timeout.
    pub up: bool,
    /// When it was last heard from (Unix ms).
    pub last_heard_ms: Option<i64>,
    /// The latest round-trip time measured by a ping.
    pub rtt_ms: Option<i64>,
    /// Its clock minus ours, estimated from the latest ping (NTP's offset).
    pub clock_offset_ms: Option<i64>,
    /// Its clock minus cluster time (this node's clock plus its cluster offset), from its
    /// tightest recent sample; None without a usable sample.
    pub offset_from_cluster_ms: Option<i64>,
    /// Its clock is further from cluster time than the limiter's clock-skew tolerance
    /// (named in a warning when it crosses).
    pub beyond_tolerance: bool,
}

/// One count with its replica resolved, as [`GossipNode::state`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StateEntry {
    /// Window length of the store it belongs to.
    pub window_ms: u64,
    /// The key's 64-bit hash.
    pub key: u64,
    /// Window index (`unix_ms / window_ms`).
    pub window: i64,
    /// The replica that counted.
    pub replica: ReplicaId,
    /// Its count.
    pub count: u64,
}

/// One key's view of one window, as [`GossipNode::views`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ViewEntry {
    /// Window length of the store it belongs to.
    pub window_ms: u64,
    /// The key's 64-bit hash.
    pub key: u64,
    /// Window index (`unix_ms / window_ms`).
    pub window: i64,
    /// This node's own count.
    pub own: u64,
    /// The count the node decides on: its own plus what it knows of every other replica
    /// (their counts, or the total an aggregator reported, whichever is larger).
    pub total: u64,
}

/// One store's others' totals for every receiver, worked out once
/// ([`GossipNode::totals_for`]) and then packed for each receiver in turn: no list per
/// receiver is built and sorted.
struct Totals {
    window_ms: u64,
    /// Per (window, key), newest window first and then by key (the order packing puts
    /// counts in): the total of every replica's counts held here, and whether the peers
    /// in `live` that do not write the key get it.
    all: Vec<(std::cmp::Reverse<i64>, u64, u64, bool)>,
    /// Every peer, in id order.
    peers: Vec<Receiver>,
}

/// A peer [`Totals`] may go to.
struct Receiver {
    id: PeerId,
    /// Up when the totals were worked out: only a peer that is up is sent them.
    up: bool,
    /// Among `live`: it gets the totals meant for every peer.
    live: bool,
    /// The totals of the keys it writes, which leave out its own counts: per (window,
    /// key), in `all`'s order, the total sent it (0 for none).
    own: Vec<(std::cmp::Reverse<i64>, u64, u64)>,
}

impl Totals {
    /// Whether the peer at `at` is up and gets any of these totals.
    fn reaches(&self, at: usize) -> bool {
        let r = &self.peers[at];
        r.up && (r.live || !r.own.is_empty())
    }

    /// The totals for the peer at `at`, from `me`, in packing order.
    fn to(&self, at: usize, me: ReplicaId) -> impl Iterator<Item = Outgoing> + '_ {
        let Receiver { live, own, .. } = &self.peers[at];
        let mut own = own.iter().peekable();
        let window_ms = self.window_ms;
        self.all.iter().filter_map(move |&(window, key, sum, to_all)| {
            let count = match own.next_if(|o| (o.0, o.1) == (window, key)) {
                Some(&(.., total)) => Some(total).filter(|&t| t > 0),
                None => (*live && to_all).then_some(sum),
            };
            count.map(|count| Outgoing { window_ms, replica: me, key, window: window.0, count })
        })
    }
}

/// A count on its way out.
#[derive(Debug, Clone, Copy)]
struct Outgoing {
    /// The store's window length.
    window_ms: u64,
    /// The replica that counted it.
    replica: ReplicaId,
    key: u64,
    window: i64,
    count: u64,
}

/// A member's rank for [`GossipConfig::aggregator_pool`]: the pool is the members with
/// the lowest, ties (never seen in 64 bits) broken by id.
fn pool_rank(member: PeerId) -> u64 {
    splitmix64(member ^ 0x6167_6772_6567_6174)
}

/// Keeps of `members` (sorted) the `pool` that rank first, sorted.
fn keep_pool(members: &mut Vec<PeerId>, pool: usize) {
    if members.len() > pool {
        members.select_nth_unstable_by_key(pool - 1, |&m| (pool_rank(m), m));
        members.truncate(pool);
        members.sort_unstable();
    }
}

/// Aggregated dissemination's assignment of keys to members: a hash ring of the live
/// members (this node included), [`RING_POINTS`] points each. A key's aggregators are the
/// first distinct members at or after its hash: members that agree on who is live agree
/// on them, and a change of the live set moves only the keys next to the points that
/// came or went.
#[derive(Debug, Default)]
struct Ring {
    points: Vec<(u64, PeerId)>,
    /// The members, sorted.
    members: Vec<PeerId>,
    /// Where each of `2^bits` equal slices of the hash space starts in `points` (and,
    /// last, `points.len()`): a lookup searches one slice, about one point, instead of
    /// all of them (a ring of 300 members has 4,800).
    starts: Vec<u32>,
    bits: u32,
}

impl Ring {
    fn new(members: Vec<PeerId>) -> Self {
        let mut points: Vec<(u64, PeerId)> = members.iter().flat_map(|&m| Self::points_of(m)).collect();
        points.sort_unstable();
        let mut ring = Self { points, members, starts: Vec::new(), bits: 1 };
        ring.index();
        ring
    }

    /// A member's points on the ring.
    fn points_of(member: PeerId) -> impl Iterator<Item = (u64, PeerId)> {
        (0..RING_POINTS).map(move |i| (splitmix64(member ^ splitmix64(i ^ 0xA66_0000)), member))
    }

    /// Makes this the ring of `members` (sorted): the points of members gone are dropped
    /// and those of members come are merged in, in place, instead of sorting every point
    /// again; the same ring as [`Ring::new`] gives. (Members come up one by one as a node
    /// starts: at 1,000 members, sorting 16,000 points on each took nine tenths of the
    /// simulator's time. In place, because a new vector per change left the allocator
    /// holding freed ones: four times the resident memory at 1,000 nodes.)
    fn set_members(&mut self, members: Vec<PeerId>) {
        let (gone, came) = Self::difference(&self.members, &members);
        if 4 * (gone.len() + came.len()) > members.len() {
            *self = Self::new(members);
            return;
        }
        let mut added: Vec<(u64, PeerId)> = came.iter().flat_map(|&m| Self::points_of(m)).collect();
        added.sort_unstable();
        if !gone.is_empty() {
            self.points.retain(|p| gone.binary_search(&p.1).is_err());
        }
        // With no point removed, the slice index still places every point not yet moved
        // (a search of one slice, not of the whole ring).
        let indexed = gone.is_empty() && self.starts.len() == (1 << self.bits) + 1;
        // Merged from the back, each point into its place (no two points are equal), the
        // points between two places moved as one block.
        let mut end = self.points.len();
        self.points.resize(end + added.len(), (0, 0));
        for (j, &a) in added.iter().enumerate().rev() {
            let (lo, hi) = if indexed {
                let slice = (a.0 >> (64 - self.bits)) as usize;
                (self.starts[slice] as usize, self.starts[slice + 1] as usize)
            } else {
                (0, end)
            };
            // Points from `end` on have moved: the place is at or before it.
            let hi = hi.min(end);
            let at = lo + self.points[lo..hi].partition_point(|p| *p < a);
            self.points.copy_within(at..end, at + j + 1);
            self.points[at + j] = a;
            end = at;
        }
        self.members = members;
        let bits = Self::bits_for(self.points.len());
        if let Some(lowest) = added.first().filter(|_| indexed && bits == self.bits) {
            // Only points added: each slice starts later by those added before it (the
            // slices up to the lowest added point's do not move).
            let shift = 64 - bits;
            let first = (lowest.0 >> shift) as usize + 1;
            let mut before = added.iter().map(|p| p.0 >> shift).peekable();
            let mut count = 0;
            for (slice, start) in self.starts.iter_mut().enumerate().skip(first) {
                while before.next_if(|&s| s < slice as u64).is_some() {
                    count += 1;
                }
                *start += count;
            }
        } else {
            self.index();
        }
    }

    /// The members of `old` not in `new`, and those of `new` not in `old` (both sorted).
    fn difference(old: &[PeerId], new: &[PeerId]) -> (Vec<PeerId>, Vec<PeerId>) {
        let (mut gone, mut came) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        loop {
            match (old.get(i), new.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), b) if b.is_none_or(|b| a < b) => {
                    gone.push(*a);
                    i += 1;
                }
                (_, Some(b)) => {
                    came.push(*b);
                    j += 1;
                }
                (_, None) => return (gone, came),
            }
        }
    }

    /// How many bits of a hash pick a ring's slice: about one point per slice.
    fn bits_for(points: usize) -> u32 {
        points.next_power_of_two().trailing_zeros().clamp(1, 16)
    }

    /// The slice index of the (sorted) points.
    fn index(&mut self) {
        let points = &self.points;
        self.bits = Self::bits_for(points.len());
        let bits = self.bits;
        self.starts.clear();
        let mut at = 0;
        for slice in 0..1u64 << bits {
            while points.get(at).is_some_and(|p| p.0 < slice << (64 - bits)) {
                at += 1;
            }
            self.starts.push(at as u32);
        }
        self.starts.push(points.len() as u32);
    }

    /// The first `k` (at most [`MAX_AGGREGATORS`]) distinct members at or after `key`'s
    /// place.
    fn aggregators(&self, key: u64, k: usize) -> Aggregators {
        let mut out = Aggregators { ids: [0; MAX_AGGREGATORS], len: 0 };
        let k = k.min(self.members.len()).min(MAX_AGGREGATORS);
        let n = self.points.len();
        if n == 0 {
            return out;
        }
        let h = splitmix64(key ^ 0x5EED_0A66);
        let slice = (h >> (64 - self.bits)) as usize;
        let (lo, hi) = (self.starts[slice] as usize, self.starts[slice + 1] as usize);
        let start = lo + self.points[lo..hi].partition_point(|p| p.0 < h);
        for j in 0..n {
            if out.len == k {
                break;
            }
            let m = self.points[(start + j) % n].1;
            if !out.as_slice().contains(&m) {
                out.ids[out.len] = m;
                out.len += 1;
            }
        }
        out
    }

    /// Whether `member` is one of `key`'s first `k` aggregators.
    fn aggregates(&self, key: u64, k: usize, member: PeerId) -> bool {
        self.aggregators(key, k).as_slice().contains(&member)
    }

    /// Whether `member` is `key`'s first aggregator, the one that publishes its totals
    /// every round.
    fn publishes(&self, key: u64, k: usize, member: PeerId) -> bool {
        self.publishes_or_stands_in(key, k, member, &[])
    }

    /// Whether `member` publishes `key`'s totals in resends and syncs: as its first
    /// aggregator, or as a standby for a first aggregator in `silent` (sorted).
    fn publishes_or_stands_in(&self, key: u64, k: usize, member: PeerId, silent: &[PeerId]) -> bool {
        let a = self.aggregators(key, k);
        match a.as_slice() {
            [first, ..] if *first == member => true,
            [first, standby @ ..] => standby.contains(&member) && silent.binary_search(first).is_ok(),
            [] => false,
        }
    }
}

/// Those of `peers` in `set` (sorted), or all of them without one.
fn among<'a>(peers: &'a [PeerId], set: Option<&[PeerId]>) -> std::borrow::Cow<'a, [PeerId]> {
    match set {
        None => std::borrow::Cow::Borrowed(peers),
        Some(set) => peers.iter().copied().filter(|p| set.binary_search(p).is_ok()).collect(),
    }
}

/// Puts `id` in the sorted list `up`, or takes it out. Returns whether the list changed.
fn set_up(up: &mut Vec<PeerId>, id: PeerId, is_up: bool) -> bool {
    match (up.binary_search(&id), is_up) {
        (Err(i), true) => up.insert(i, id),
        (Ok(i), false) => drop(up.remove(i)),
        _ => return false,
    }
    true
}

/// `find()` for `key`, or what it found for the key before if the same key comes again
/// (a store exports a key's counts together: its windows, its writers).
fn per_key<T: Copy>(last: &mut Option<(u64, T)>, key: u64, find: impl FnOnce() -> T) -> T {
    match *last {
        Some((k, found)) if k == key => found,
        _ => last.insert((key, find())).1,
    }
}

/// Notes `sent` (window length, key, window)s as sent in `round`. A (key, window) sent
/// round after round is kept once, its latest sending, when the list fills; if that
/// leaves it more than half full (over [`MAX_RESEND_ENTRIES`] / 2 different ones in a
/// period: the list is sorted at most once per half of it filled), the list is dropped
/// and `overflow` set (a full resend covers them).
fn note_sent(list: &mut Vec<(u64, u64, i64, u64)>, overflow: &mut bool, sent: impl ExactSizeIterator<Item = (u64, u64, i64)>, round: u64) {
    let mut limit = MAX_RESEND_ENTRIES;
    if !*overflow && list.len() + sent.len() > limit {
        latest_sendings(list);
        limit /= 2;
    }
    if *overflow || list.len() + sent.len() > limit {
        *overflow = true;
        list.clear();
        return;
    }
    list.extend(sent.map(|(window_ms, key, window)| (window_ms, key, window, round)));
}

/// Sorts `list` and keeps each (window length, key, window)'s latest sending alone.
fn latest_sendings(list: &mut Vec<(u64, u64, i64, u64)>) {
    list.sort_unstable_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)).then(b.3.cmp(&a.3)));
    list.dedup_by(|later, first| (later.0, later.1, later.2) == (first.0, first.1, first.2));
}

/// Takes out of `list` the (window length, key, window)s last sent before round
/// `latest`, sorted; the others stay, once each.
fn take_quiet(list: &mut Vec<(u64, u64, i64, u64)>, latest: u64) -> Vec<(u64, u64, i64)> {
    latest_sendings(list);
    let mut quiet = Vec::new();
    list.retain(|&(window_ms, key, window, round)| {
        let gone_quiet = round < latest;
        if gone_quiet {
            quiet.push((window_ms, key, window));
        }
        !gone_quiet
    });
    quiet
}

/// What `cache` holds at `index` (a replica's index in the store), made by `make` the
/// first time: a lookup per replica rather than per count.
fn per_replica<T: Copy>(cache: &mut Vec<Option<T>>, index: usize, make: impl FnOnce() -> T) -> T {
    if index >= cache.len() {
        cache.resize(index + 1, None);
    }
    *cache[index].get_or_insert_with(make)
}

/// A key's aggregators, as [`Ring::aggregators`] finds them.
#[derive(Clone, Copy)]
struct Aggregators {
    ids: [PeerId; MAX_AGGREGATORS],
    len: usize,
}

impl Aggregators {
    fn as_slice(&self) -> &[PeerId] {
        &self.ids[..self.len]
    }
}

/// The sans-IO gossip core of one cluster member. See the module documentation.
#[derive(Debug)]
pub struct GossipNode {
    replica: Replica,
    cfg: GossipConfig,
    peers: BTreeMap<PeerId, Peer>,
    /// The store's replica index → replica; `None` for a reclaimed index (in `free_indices`).
    replicas: Vec<Option<ReplicaEntry>>,
    replica_index: BTreeMap<ReplicaId, u32>,
    free_indices: Vec<u32>,
    /// Per peer, live replicas it introduced: (its own incarnations, relayed).
    introduced: BTreeMap<PeerId, (usize, usize)>,
    relayed_total: usize,
    fingerprint_cache: FingerprintCache,
    rng: u64,
    next_round_ms: i64,
    /// The latest time handed to this node: a later reading further behind it than a
    /// round is a step back of the clock (`clock_stepped_back`).
    latest_ms: i64,
    round: u64,
    outbox: VecDeque<Transmit>,
    events: VecDeque<Event>,
    /// Counts learned this round, forwarded next round in fan-out mode.
    relay: Vec<Outgoing>,
    /// Fan-out mode's targets not yet taken in this cycle: the live peers in a shuffled
    /// order, taken `fanout` at a time, drawn again once all are taken.
    cycle: VecDeque<PeerId>,
    /// The live peers (sorted) the cycle was drawn from.
    cycle_of: Vec<PeerId>,
    /// The newest limits version sent to every peer.
    limits_sent: LimitsVersion,
    /// Aggregated dissemination: the ring of the live members, and the round it last
    /// changed in (this node sends every own count to its key's aggregators once the
    /// ring has held for two rounds: a start or a healed partition changes it round after
    /// round).
    ring: Ring,
    /// The up list changed since `ring` was last made from it (or it never was).
    ring_stale: bool,
    ring_changed: Option<u64>,
    /// Aggregated dissemination: the (window length, key, window) whose counts this node
    /// merged or made this round, whose writers get the others' totals at the next round.
    to_publish: Vec<(u64, u64, i64)>,
    /// Aggregated dissemination: the (round due, window length, key, window, others'
    /// counts held then if the heard total was below them, time noted) whose counts
    /// changed here while another member is the key's first aggregator. At the round due
    /// (two later), this node publishes the totals of those for which the first
    /// aggregator's total has not reached what this node held, or whose first aggregator
    /// it has not heard from since, as if it were first: a standby takes over within
    /// three rounds of the first aggregator going silent, without waiting for it to be
    /// suspected.
    standby: Vec<(u64, u64, u64, i64, Option<u64>, i64)>,
    /// Aggregated dissemination: where the periodic resend of each store stopped.
    /// Full resends and the others keep a cursor each, so that a store larger than one
    /// resend is passed over whole by full resends too.
    resend_cursors: BTreeMap<(u64, bool), ExportCursor>,
    /// Aggregated dissemination: the (window length, key, window)s of this node's own
    /// counts it sent to their aggregators, and of the totals it published, each with
    /// the round it was last sent in; at a period those gone quiet since are sent once
    /// more ([`resend_quiet`](Self::resend_quiet)).
    sent_counts: Vec<(u64, u64, i64, u64)>,
    sent_totals: Vec<(u64, u64, i64, u64)>,
    /// More than [`MAX_RESEND_ENTRIES`] of them within a period: the next resend is full.
    sent_overflow: bool,
    /// After a full resend as the view went quiet: the next period's resend is full too
    /// if the view is still quiet then.
    full_again_at: Option<u64>,
    /// Aggregated dissemination: peers heard from again after a silence
    /// longer than an anti-entropy period, resent to at the next round (`heard`).
    heal: Vec<PeerId>,
    /// The round of the last resend to `heal`.
    healed_round: Option<u64>,
    /// The last round in which this node's view changed (its own counts or a merge).
    last_active_round: u64,
    stats: GossipStats,
    /// The cluster-time estimator.
    clock: Estimator,
    /// Peers whose clocks were beyond the tolerance at the last round.
    clocks_beyond: BTreeSet<PeerId>,
    /// What `clocks_beyond` was last brought up to date with: the estimator's generation,
    /// the applied offset, the tolerance and the live peers. The same again finds the
    /// same peers beyond it, so the check is skipped.
    clocks_checked: Option<(u64, i64, i64)>,
    clocks_checked_live: Vec<PeerId>,
    /// This node's own clock was beyond the tolerance at the last round.
    own_clock_beyond: bool,
    /// SWIM membership: answers probes always; decides liveness in SWIM mode.
    swim: Swim,
    /// SWIM mode has started (this node announced itself to its peers).
    swim_started: bool,
    /// Whether the last liveness check was in SWIM mode, and when this node last left it:
    /// the silence of peers judged over SWIM cycles until then counts from that moment.
    was_swim_mode: bool,
    left_swim_mode_ms: Option<i64>,
    /// The peers that are up, sorted: the ring's members and the live count without a
    /// walk over every peer's record (a peer coming up at 1,000 members cost one each).
    up: Vec<PeerId>,
    /// Peers added since SWIM started, to announce this node to.
    swim_to_announce: BTreeSet<PeerId>,
}

impl GossipNode {
    /// Makes `limiter` a cluster member, starting at `now_ms` with randomness from
    /// `seed`. Asks `peers` for a full sync.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for a setting out of range, or if `limiter` already has a
    /// gossip node (the store's replica indices belong to one node).
    pub fn new(
        limiter: RateLimiter,
        cfg: GossipConfig,
        peers: impl IntoIterator<Item = PeerId>,
        seed: u64,
        now_ms: i64,
    ) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let replica = Replica::attach(limiter, cfg.replica.node, cfg.interval_ms)?;
        let clock =
            Estimator::new(cluster_time::Settings { max_rtt_ms: cfg.clock_max_rtt_ms as i64, max_step_ms: cfg.clock_max_step_ms as i64 });
        let swim = Swim::new(
            SwimId { addr: cfg.swim_address, ..SwimId::new(cfg.replica.node, cfg.replica.incarnation, 0) },
            swim::Settings::new(cfg.interval_ms, cfg.suspect_after_ms, 1, cfg.max_message_bytes - SWIM_ENVELOPE_BYTES),
            seed,
        );
        let mut node = Self {
            replica,
            cfg,
            peers: BTreeMap::new(),
            replicas: Vec::new(),
            replica_index: BTreeMap::new(),
            free_indices: Vec::new(),
            introduced: BTreeMap::new(),
            relayed_total: 0,
            fingerprint_cache: FingerprintCache::default(),
            rng: splitmix64(seed),
            next_round_ms: now_ms,
            latest_ms: now_ms,
            round: 0,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            relay: Vec::new(),
            cycle: VecDeque::new(),
            cycle_of: Vec::new(),
            limits_sent: LimitsVersion::default(),
            ring: Ring::default(),
            ring_stale: true,
            ring_changed: None,
            to_publish: Vec::new(),
            standby: Vec::new(),
            resend_cursors: BTreeMap::new(),
            sent_counts: Vec::new(),
            sent_totals: Vec::new(),
            sent_overflow: false,
            full_again_at: None,
            heal: Vec::new(),
            healed_round: None,
            last_active_round: 0,
            stats: GossipStats::default(),
            clock,
            clocks_beyond: BTreeSet::new(),
            clocks_checked: None,
            clocks_checked_live: Vec::new(),
            own_clock_beyond: false,
            swim,
            swim_started: false,
            was_swim_mode: false,
            left_swim_mode_ms: None,
            swim_to_announce: BTreeSet::new(),
            up: Vec::new(),
        };
        for p in peers {
            node.add_peer(p);
        }
        for p in node.sync_targets() {
            node.send(p, Body::SyncRequest, true);
        }
        Ok(node)
    }

    // ----- getters -----

    /// `now_ms` of this node's clock on cluster time: what windows are cut on. (Exports
    /// only need a time within 2³¹ windows of the right one to place a 32-bit window
    /// index, so they take the node's clock as given.)
    fn cluster_ms(&self, now_ms: i64) -> i64 {
        now_ms.saturating_add(self.replica.offset_ms())
    }

    /// The limiter this node replicates.
    pub fn limiter(&self) -> &RateLimiter {
        self.replica.limiter()
    }

    /// This node's replica id.
    pub fn replica(&self) -> ReplicaId {
        self.cfg.replica
    }

    /// What this node has done so far.
    pub fn stats(&self) -> &GossipStats {
        &self.stats
    }

    /// Remote replicas (node incarnations) this node keeps counts for now.
    pub fn replica_count(&self) -> usize {
        self.replica_index.len()
    }

    /// Peers heard from within the suspicion timeout.
    pub fn live_peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.up.iter().copied()
    }

    /// All configured peers.
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.keys().copied()
    }

    /// What this node knows of each peer.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        let applied = self.clock.offset_ms();
        self.peers
            .iter()
            .map(|(&peer, p)| PeerStats {
                peer,
                up: p.up,
                last_heard_ms: p.last_heard_ms,
                rtt_ms: p.rtt_ms,
                clock_offset_ms: p.clock_offset_ms,
                offset_from_cluster_ms: self.clock.peer_offset(peer).map(|(o, _)| o - applied),
                beyond_tolerance: self.clocks_beyond.contains(&peer),
            })
            .collect()
    }

    /// This node's offset from cluster time in ms (cluster time minus its clock), as its
    /// limiter applies it; 0 with `cluster_time` off.
    pub fn cluster_offset_ms(&self) -> i64 {
        self.replica.offset_ms()
    }

    /// The estimate behind the offset, as of the last round: the median the offset heads
    /// for (None before any usable sample) and the estimate's error bound in ms.
    pub fn cluster_offset_target(&self) -> (Option<i64>, i64) {
        let u = self.clock.last();
        (u.target_ms, u.error_ms)
    }

    /// This node's own clock is further from cluster time than the clock-skew tolerance.
    pub fn own_clock_beyond_tolerance(&self) -> bool {
        self.own_clock_beyond
    }

    /// An upper estimate of how stale this node's view is at `now_ms`: over live peers,
    /// the time since last heard plus half a round trip. 0 with no live peer. With a
    /// partial view ([`GossipConfig::partial_view`]), over the live peers in the view
    /// (the aggregator pool), through which every other member's counts come.
    pub fn view_lag_ms(&self, now_ms: i64) -> i64 {
        let view = self.view();
        self.peers
            .iter()
            .filter(|(id, p)| p.up && view.is_none_or(|v| v.binary_search(id).is_ok()))
            .filter_map(|(_, p)| p.last_heard_ms.map(|t| now_ms - t + p.rtt_ms.unwrap_or(0) / 2))
            .max()
            .unwrap_or(0)
            .max(0)
    }

    /// Every count this node holds (local and remote, both retained windows, every
    /// store), sorted. For convergence checks and debugging: O(keys).
    pub fn state(&self, now_ms: i64) -> Vec<StateEntry> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for window_ms in self.replica.window_lengths() {
            buf.clear();
            self.replica.export(window_ms, now_ms, |_| true, &mut buf);
            out.extend(buf.iter().filter_map(|e| {
                Some(StateEntry { window_ms, key: e.key, window: e.window, replica: self.replica_id(e.replica)?, count: e.count })
            }));
        }
        out.sort();
        out
    }

    /// Members SWIM holds active, in SWIM mode (more peers than
    /// [`GossipConfig::swim_above_peers`]); `None` otherwise.
    pub fn swim_members(&self) -> Option<usize> {
        self.swim_mode().then(|| self.swim.active_members())
    }

    /// SWIM's verdict on `peer` (None: none yet). For the hostile-member tests.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn swim_verdict(&self, peer: PeerId) -> Option<bool> {
        self.peers.get(&peer).and_then(|p| p.swim)
    }

    /// SWIM's pending timers. For the hostile-member tests.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn swim_timers(&self) -> usize {
        self.swim.timers()
    }

    /// Whether this node disseminates counts through aggregators (it has more peers than
    /// [`GossipConfig::aggregate_above_peers`] and [`GossipConfig::full_mesh_max_peers`]).
    pub fn aggregating(&self) -> bool {
        self.aggregated()
    }

    /// Every key's view of every retained window, sorted: this node's own count and the
    /// count it decides on. In aggregated dissemination a node holds no other replica's
    /// counts of the keys it does not aggregate, only the others' total: this is what
    /// two members that count the same key agree on once the cluster has converged.
    pub fn views(&self, now_ms: i64) -> Vec<ViewEntry> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for window_ms in self.replica.window_lengths() {
            buf.clear();
            self.replica.views(window_ms, now_ms, &mut buf);
            out.extend(buf.iter().map(|v| ViewEntry { window_ms, key: v.key, window: v.window, own: v.own, total: v.total }));
        }
        out.sort();
        out
    }

    // ----- membership -----

    /// The aggregator pool of `members` (this node's peers, up or not yet) without this
    /// node: the ring they have before it joins. Empty if that many peers would not make
    /// this node's dissemination aggregated. Between them, the full syncs these members
    /// send a newcomer carry the totals of every key (each publishes its own keys', on
    /// the ring it has when the newcomer comes up), so a driver that joins waits for them
    /// as well as for its seeds.
    #[cfg(feature = "quic")]
    pub(crate) fn pool_among(&self, members: impl IntoIterator<Item = PeerId>) -> Vec<PeerId> {
        let me = self.cfg.replica.node;
        let mut all: Vec<PeerId> = members.into_iter().filter(|&m| m != me).collect();
        all.sort_unstable();
        all.dedup();
        if !self.aggregated_with(all.len()) {
            return Vec::new();
        }
        keep_pool(&mut all, self.cfg.aggregator_pool);
        all
    }

    /// Whether the core counts `peer` live.
    #[cfg(feature = "quic")]
    pub(crate) fn is_live(&self, peer: PeerId) -> bool {
        self.up.binary_search(&peer).is_ok()
    }

    /// Whether this node is a member of the aggregator pool (with aggregated
    /// dissemination: the members that rank first, at most
    /// [`GossipConfig::aggregator_pool`]), as it computes the pool now.
    pub fn in_aggregator_pool(&self) -> bool {
        self.aggregated() && self.in_ring()
    }

    /// Whether this node is on the ring (a member of the aggregator pool, with
    /// aggregated dissemination).
    fn in_ring(&self) -> bool {
        self.ring.members.binary_search(&self.cfg.replica.node).is_ok()
    }

    /// The most members that aggregate ([`GossipConfig::aggregator_pool`]).
    #[cfg(feature = "quic")]
    pub(crate) fn aggregator_pool(&self) -> usize {
        self.cfg.aggregator_pool
    }

    /// Adds a peer (idempotent). It is down until heard from.
    pub fn add_peer(&mut self, peer: PeerId) {
        if peer != self.cfg.replica.node {
            let started = self.swim_started;
            self.peers.entry(peer).or_insert_with(|| Peer { joined_in_swim: started, ..Peer::default() });
            self.swim.know(peer);
            if started {
                self.swim_to_announce.insert(peer);
            }
            // One more peer may move the node to aggregated dissemination: the lag the
            // admission policy plans for moves with it.
            self.publish_live();
        }
    }

    /// Tells the core where the transport reaches `peer` (a peer it added): with
    /// [`GossipConfig::swim_address`] set, this node's SWIM spreads it with the peer's
    /// identity, so that members that have not heard of the peer learn of it, and where it
    /// is, by infection ([`Event::MemberLearned`]). Without it, nothing.
    pub fn set_peer_address(&mut self, peer: PeerId, addr: std::net::SocketAddr) {
        if self.cfg.swim_address.is_some() {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.addr = Some(addr);
            }
        }
    }

    /// Tells the core the incarnation `peer` runs as, as its transport authenticated it.
    /// Needed only when it is lower than one heard from before: the peer restarted while
    /// its clock had stepped back further than the restart took. The core then takes it
    /// for the current one (totals sent to the peer leave out its counts, SWIM's verdicts
    /// on the processes above it are ignored) rather than keep the higher incarnation of a
    /// process that is gone. A higher incarnation the core learns from the peer's own
    /// messages.
    pub fn set_peer_incarnation(&mut self, peer: PeerId, incarnation: u64) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let Some(i) = p.incarnation.filter(|&i| incarnation < i) else { return };
        // The processes above it that this node knows of, exactly: a later restart between
        // them (its clock still behind) is a new process, not a gone one.
        let known = self.replica_index.keys().filter(|r| r.node == peer && r.incarnation > incarnation).map(|r| r.incarnation);
        let mut gone: Vec<u64> = known.chain([i]).chain(p.gone_above.iter().copied().filter(|&g| g > incarnation)).collect();
        gone.sort_unstable();
        gone.dedup();
        gone.truncate(MAX_INCARNATIONS_PER_PEER + 1);
        p.gone_above = gone;
        p.incarnation = Some(incarnation);
        (p.swim, p.swim_down_since_ms, p.swim_announced_ms) = (None, None, None);
        // A restart: it comes up again with its next message, which brings it a full sync
        // (the members' totals are others' counts to the new process).
        if std::mem::take(&mut p.up) {
            self.ring_stale |= set_up(&mut self.up, peer, false);
            self.publish_live();
        }
    }

    /// This node leaves the cluster gracefully: in SWIM mode, SWIM tells a few members
    /// that it is down (foca's `leave_cluster`), and the word spreads by infection to the
    /// members that hold no connection to this node (beyond `swim_above_peers`; a driver's
    /// leave reaches those that do). With a partial view the word goes to members of the
    /// view, over the connections the transport keeps; it is sent reliably (a driver
    /// closes its connections right after). This node's SWIM then stops: it answers no
    /// more probes. Below SWIM mode it does nothing.
    pub fn leave(&mut self, now_ms: i64) {
        if !self.swim_mode() || !self.swim_started {
            return;
        }
        // foca picks among every member it holds active; with a partial view, members of
        // the view take their places, over the connections the transport keeps.
        let view: Option<Vec<PeerId>> = self.view().map(<[PeerId]>::to_vec);
        let mut seed = self.next_random();
        let pick = |n: usize| {
            seed = splitmix64(seed);
            (seed % n as u64) as usize
        };
        let mut out = swim::Output::default();
        self.swim.leave(now_ms, view.as_deref(), pick, &mut out);
        self.send_swim(out.sends, true);
    }

    /// Sends SWIM's packets, each in a `Body::Swim` envelope, to the peers among their
    /// addressees (SWIM may name members the driver has not told this node of yet).
    fn send_swim(&mut self, sends: Vec<(PeerId, Vec<u8>)>, reliable: bool) {
        for (to, packet) in sends {
            if self.peers.contains_key(&to) {
                self.stats.swim_sent += 1;
                self.send(to, Body::Swim(packet), reliable);
            }
        }
    }

    /// Removes a peer (a graceful leave). Its counts stay until their windows expire.
    pub fn remove_peer(&mut self, peer: PeerId) {
        self.peers.remove(&peer);
        self.ring_stale |= set_up(&mut self.up, peer, false);
        self.swim_to_announce.remove(&peer);
        self.clock.forget(peer);
        self.clocks_beyond.remove(&peer);
        self.publish_live();
    }

    // ----- inputs -----

    /// Handles one message from `from`. A message that cannot be decoded, comes from an
    /// unknown peer or would exceed a limit is dropped whole, counted, and reported.
    pub fn handle_message(&mut self, from: PeerId, bytes: &[u8], now_ms: i64) -> Result<(), MessageError> {
        self.observe_time(now_ms);
        if !self.peers.contains_key(&from) {
            self.stats.unknown_peers += 1;
            return Err(MessageError::UnknownPeer(from));
        }
        let msg = match codec::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.stats.decode_errors += 1;
                return Err(e.into());
            }
        };
        if msg.from.node != from {
            self.stats.spoofed += 1;
            return Err(MessageError::Spoofed { peer: from, claimed: msg.from.node });
        }
        self.stats.messages_received += 1;
        self.stats.bytes_received += bytes.len() as u64;
        self.heard(from, msg.from.incarnation, now_ms);
        match msg.body {
            Body::Counts(batches) => {
                let merged = self.stats.entries_merged;
                self.merge_batches(from, &batches, now_ms);
                if self.stats.entries_merged > merged {
                    self.last_active_round = self.round;
                }
            }
            Body::SyncRequest => {
                // At most one full sync per peer per suspicion period, on request.
                let period = self.suspect_after_ms();
                let due = self.peers.get(&from).and_then(|p| p.last_sync_answered_ms).is_none_or(|t| now_ms - t >= period);
                if due {
                    self.send_everything(from, now_ms);
                }
            }
            Body::Digest { .. } | Body::Repair { .. } if !self.take_answer(from) => {
                self.stats.answers_dropped += 1;
                self.push_event(Event::Refused { peer: from, reason: Refusal::AnswerBudget });
            }
            Body::Digest { window_ms, window, span, rows, limits, complete } => {
                if self.replica.limits_version() > limits {
                    self.send_limits(from);
                }
                self.answer_digest(from, u64::from(window_ms), (window, span), &rows, complete, now_ms)
            }
            Body::Repair { window_ms, wanted } => self.answer_repair(from, u64::from(window_ms), &wanted, now_ms),
            Body::Ping { sent_at_ms, echo } => self.answer_ping(from, sent_at_ms, echo, now_ms),
            Body::Swim(packet) => match self.swim_step(now_ms, |swim, out| swim.handle(from, &packet, now_ms, out)) {
                Ok(()) => self.stats.swim_received += 1,
                Err(e) => {
                    tracing::debug!(peer = from, error = %e, "SWIM packet refused");
                    self.stats.swim_refused += 1;
                    self.push_event(Event::Refused { peer: from, reason: Refusal::Swim });
                }
            },
            Body::Totals(batches) => {
                let merged = self.stats.totals_merged;
                self.merge_totals(&batches, now_ms);
                if self.stats.totals_merged > merged {
                    self.last_active_round = self.round;
                }
            }
            // A version from further in the future than a day is a broken clock or a
            // hostile peer: it would freeze the register.
            Body::Limits { version, .. } if version.at_ms > (now_ms.max(0) as u64).saturating_add(86_400_000) => {
                self.stats.refused += 1;
                self.push_event(Event::Refused { peer: from, reason: Refusal::Limits });
            }
            Body::Limits { version, config } => match self.replica.install_limits(config, version) {
                Ok(true) => {
                    tracing::info!(from, at_ms = version.at_ms, origin = version.node, "limits from a peer put in force");
                    self.stats.limits_installed += 1;
                    if !self.fan_out() {
                        // Every peer heard it from the origin.
                        self.limits_sent = self.limits_sent.max(version);
                    }
                }
                Ok(false) => {}
                Err(_) => {
                    self.stats.refused += 1;
                    self.push_event(Event::Refused { peer: from, reason: Refusal::Limits });
                }
            },
        }
        Ok(())
    }

    /// Notes `now_ms`, and handles a step back of the clock: a reading more than a round
    /// (at least 50 ms) behind the latest. Time cannot go back, so the schedule is moved
    /// back with it: the next round is due at once, SWIM's pending timers keep what was
    /// left of them, and what was heard from peers "after now" counts as heard now, so
    /// silence is measured from the step. Without it the node ran no round until the
    /// clock caught up again (peers took it down by silence), and a peer that died meanwhile
    /// stayed up for the step's length on top of the suspicion period. A step forward is
    /// time passing as far as the core can tell: peers not heard within the suspicion
    /// period go down, and come back up with their next message.
    fn observe_time(&mut self, now_ms: i64) {
        let tolerance = (self.cfg.interval_ms as i64).max(50);
        if now_ms >= self.latest_ms {
            self.latest_ms = now_ms;
            return;
        }
        if self.latest_ms - now_ms <= tolerance {
            return;
        }
        let back = self.latest_ms - now_ms;
        tracing::warn!(back_ms = back, "the clock stepped back; rescheduling gossip rounds and liveness from the new time");
        self.latest_ms = now_ms;
        self.next_round_ms = self.next_round_ms.min(now_ms);
        for p in self.peers.values_mut() {
            for t in [
                &mut p.last_heard_ms,
                &mut p.swim_announced_ms,
                &mut p.swim_down_since_ms,
                &mut p.last_sync_answered_ms,
                &mut p.up_pinged_ms,
            ] {
                if let Some(t) = t.as_mut() {
                    *t = (*t).min(now_ms);
                }
            }
            // A clock sample across the step would be off by it.
            p.ping_sent_ms = None;
        }
        for noted in self.standby.iter_mut().map(|s| &mut s.5) {
            *noted = (*noted).min(now_ms);
        }
        self.swim.shift(-back, now_ms);
    }

    /// Runs the round(s) due at `now_ms`.
    pub fn handle_timeout(&mut self, now_ms: i64) {
        self.observe_time(now_ms);
        if self.swim.next_deadline().is_some_and(|t| t <= now_ms) {
            self.swim_step(now_ms, |swim, out| swim.fire(now_ms, out));
        }
        if now_ms < self.next_round_ms {
            return;
        }
        self.run_round(now_ms);
        // Rounds fall on multiples of the interval in Unix time, as the bounded policy's
        // budget rounds do, so every node refreshes its view at the same instants. A late
        // call (a paused process) skips the missed rounds rather than bursting them.
        let interval = self.cfg.interval_ms as i64;
        self.next_round_ms = (now_ms.div_euclid(interval) + 1) * interval;
    }

    // ----- outputs -----

    /// The next message to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    /// The next thing that happened, if any. Poll it after
    /// [`poll_transmit`](Self::poll_transmit) returns `None`: an event may name messages
    /// queued before it.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<i64> {
        Some(self.swim.next_deadline().map_or(self.next_round_ms, |t| t.min(self.next_round_ms)))
    }

    // ----- internals -----

    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.rng)
    }

    fn fan_out(&self) -> bool {
        self.peers.len() > self.cfg.full_mesh_max_peers
    }

    /// Aggregated dissemination (which takes fan-out mode's heartbeats and suspicion
    /// period, and its place).
    fn aggregated(&self) -> bool {
        self.aggregated_with(self.peers.len())
    }

    /// Whether `peers` peers would make this node's dissemination aggregated.
    fn aggregated_with(&self, peers: usize) -> bool {
        peers > self.cfg.aggregate_above_peers.max(self.cfg.full_mesh_max_peers)
    }

    /// Rounds until a count made here shows in every live member's view (`docs/design.md`,
    /// "Fan-out and convergence time"): one in full mesh, two through aggregators (to
    /// them, then in their totals), and with fan-out the rounds an infection takes to
    /// reach `live` members, `⌈log_{fanout+1} live⌉ + 1`.
    fn lag_rounds(&self, live: u64) -> u64 {
        if self.aggregated() {
            2
        } else if self.fan_out() {
            let reach = self.cfg.fanout.max(1) as u64 + 1;
            let (mut rounds, mut covered) = (1, 1u64);
            while covered < live {
                covered = covered.saturating_mul(reach);
                rounds += 1;
            }
            rounds
        } else {
            1
        }
    }

    fn suspect_after_ms(&self) -> i64 {
        if self.cfg.suspect_after_ms > 0 {
            return self.cfg.suspect_after_ms as i64;
        }
        let rounds = if self.fan_out() { (4 * self.peers.len()).div_ceil(self.cfg.fanout).max(5) } else { 5 };
        (rounds as u64 * self.cfg.interval_ms) as i64
    }

    /// The live peers not heard from within two heartbeat cycles (`⌈peers / fanout⌉`
    /// rounds each: a member heartbeats every peer in its view at least once a cycle),
    /// sorted. A standby aggregator stands in for such a first aggregator in resends and
    /// syncs ([`Ring::publishes_or_stands_in`]) until the ring moves: members that do not
    /// write a key hear its totals from the first aggregator only, and a first aggregator
    /// that died is taken off the ring only once it is suspected, which in SWIM mode takes
    /// SWIM's verdict or several of its cycles (seconds, at 40 members).
    fn silent_peers(&self, now_ms: i64) -> Vec<PeerId> {
        let cycle = (self.peers.len().div_ceil(self.cfg.fanout.max(1)) as u64).saturating_mul(self.cfg.interval_ms);
        let silent_ms = i64::try_from(cycle.saturating_mul(2)).unwrap_or(i64::MAX);
        let silent = |p: &Peer| p.last_heard_ms.is_none_or(|t| now_ms.saturating_sub(t) > silent_ms);
        self.up.iter().copied().filter(|id| self.peers.get(id).is_some_and(silent)).collect()
    }

    /// Peers to ask for a full sync on start: all of them in full mesh, else `fanout`.
    /// In aggregated dissemination all of them too: the answer is only the peer's own
    /// counts of the keys this node aggregates, and every peer hearing from this node at
    /// once puts it on their rings at once (heartbeats would take a cycle of
    /// `⌈peers / fanout⌉` rounds, with the members' rings disagreeing meanwhile).
    fn sync_targets(&mut self) -> Vec<PeerId> {
        let all: Vec<PeerId> = self.peers.keys().copied().collect();
        if !self.fan_out() || self.aggregated() {
            return all;
        }
        self.pick(&all, self.cfg.fanout)
    }

    /// The next `k` live peers of fan-out mode's cycle: each live peer once per cycle of
    /// `⌈live / k⌉` rounds, in an order drawn again every cycle, so (without loss, while
    /// the live set holds) a node hears from each other at least once in every
    /// `2·⌈live / k⌉` rounds, half the suspicion period. Random picks would leave a pair
    /// silent for a whole period with probability about `e^-4` (a false suspicion, and a
    /// full sync when it ends). When the live set changes, the rest of the cycle is kept:
    /// departed peers leave it, newcomers join it at random places.
    fn next_in_cycle(&mut self, live: &[PeerId], k: usize) -> Vec<PeerId> {
        if self.cycle_of != live {
            self.cycle.retain(|p| live.binary_search(p).is_ok());
            for &p in live {
                if self.cycle_of.binary_search(&p).is_err() {
                    let at = (self.next_random() % (self.cycle.len() as u64 + 1)) as usize;
                    self.cycle.insert(at, p);
                }
            }
            self.cycle_of = live.to_vec();
        }
        let mut out = Vec::with_capacity(k.min(live.len()));
        while out.len() < k.min(live.len()) {
            let Some(p) = self.cycle.pop_front() else {
                self.cycle = self.pick(live, live.len()).into();
                continue;
            };
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }

    /// `k` distinct random elements of `from` (all of them if it is shorter).
    fn pick(&mut self, from: &[PeerId], k: usize) -> Vec<PeerId> {
        let mut pool = from.to_vec();
        let k = k.min(pool.len());
        for i in 0..k {
            let j = i + (self.next_random() % (pool.len() - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(k);
        pool
    }

    fn replica_id(&self, index: u32) -> Option<ReplicaId> {
        if index == LOCAL_REPLICA {
            Some(self.cfg.replica)
        } else {
            self.replicas.get(index as usize)?.as_ref().map(|s| s.id)
        }
    }

    /// The store's replica index for replica `r`'s counts, up to window `newest` of length
    /// `window_ms`, sent by peer `from`; `None` if `from` has used up its budget for new
    /// replicas (its own incarnations, or relayed ones) or the relayed table is full.
    fn admit_replica(&mut self, from: PeerId, r: ReplicaId, window_ms: u64, newest: i64) -> Option<u32> {
        if let Some(&i) = self.replica_index.get(&r) {
            if let Some(Some(s)) = self.replicas.get_mut(i as usize) {
                match s.newest.iter_mut().find(|(w, _)| *w == window_ms) {
                    Some((_, n)) => *n = (*n).max(newest),
                    None => s.newest.push((window_ms, newest)),
                }
            }
            return Some(i);
        }
        let own = r.node == from;
        let (own_used, relayed_used) = self.introduced.get(&from).copied().unwrap_or_default();
        let room = if own {
            own_used < MAX_INCARNATIONS_PER_PEER
        } else {
            relayed_used < MAX_RELAYED_PER_PEER && self.relayed_total < MAX_REPLICAS
        };
        if !room {
            return None;
        }
        let entry = ReplicaEntry { id: r, introducer: from, own, newest: vec![(window_ms, newest)] };
        let i = match self.free_indices.pop() {
            Some(i) => {
                self.replicas[i as usize] = Some(entry);
                i
            }
            None => {
                self.replicas.push(Some(entry));
                (self.replicas.len() - 1) as u32
            }
        };
        self.replica_index.insert(r, i);
        let used = self.introduced.entry(from).or_default();
        if own {
            used.0 += 1;
        } else {
            used.1 += 1;
            self.relayed_total += 1;
        }
        Some(i)
    }

    /// Frees the entries of replicas whose every count has expired: no acceptable
    /// timestamp falls in the window after the newest one merged for it, so the only keys
    /// that can still hold its counts are dead, and a sweep drops them before the index is
    /// reused. O(replicas), once per anti-entropy period; the sweep only when one expired.
    fn reclaim_replicas(&mut self, now_ms: i64) {
        // Windows are cut on cluster time (merges, the limiter, its sweep): so is expiry.
        let now_ms = self.cluster_ms(now_ms);
        let replica = &self.replica;
        let expired: Vec<u32> = self
            .replicas
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = s.as_ref()?;
                let dead = s.newest.iter().all(|&(window_ms, newest)| {
                    replica.windows(window_ms, now_ms).is_none_or(|(acceptable, _)| newest + 2 <= *acceptable.start())
                });
                dead.then_some(i as u32)
            })
            .collect();
        if expired.is_empty() {
            return;
        }
        self.replica.sweep(now_ms);
        for i in expired {
            let Some(entry) = self.replicas[i as usize].take() else { continue };
            self.replica_index.remove(&entry.id);
            self.free_indices.push(i);
            if let Some(used) = self.introduced.get_mut(&entry.introducer) {
                if entry.own {
                    used.0 = used.0.saturating_sub(1);
                } else {
                    used.1 = used.1.saturating_sub(1);
                }
                if *used == (0, 0) {
                    self.introduced.remove(&entry.introducer);
                }
            }
            if !entry.own {
                self.relayed_total = self.relayed_total.saturating_sub(1);
            }
            self.stats.replicas_reclaimed += 1;
        }
    }

    /// Takes one answer from `from`'s budget for this anti-entropy period.
    fn take_answer(&mut self, from: PeerId) -> bool {
        match self.peers.get_mut(&from) {
            Some(p) if p.answers_used < MAX_ANSWERS_PER_PERIOD => {
                p.answers_used += 1;
                true
            }
            _ => false,
        }
    }

    fn heard(&mut self, from: PeerId, incarnation: u64, now_ms: i64) {
        let swim_mode = self.swim_mode();
        let probe_ms = self.swim.settings().probe_period_ms as i64;
        let room = self.outbox.len() < MAX_OUTBOX;
        let silent_ms = i64::try_from(self.cfg.interval_ms.saturating_mul(self.heal_rounds())).unwrap_or(i64::MAX);
        let Some(p) = self.peers.get_mut(&from) else { return };
        if p.gone_above.contains(&incarnation) {
            // A late message of a process above the one it restarted as: gone.
            return;
        }
        let new_incarnation = p.incarnation.is_some_and(|i| incarnation > i);
        if new_incarnation {
            // SWIM's verdicts were on the incarnation the peer restarted from.
            p.swim = None;
        }
        // A member SWIM holds down that this node hears from is alive (see
        // `update_liveness`): this node announces itself to it, which tells it it was
        // declared down, and it rejoins as a new SWIM identity at once.
        let current = p.incarnation.is_none_or(|i| incarnation >= i);
        let announce = swim_mode && current && p.swim == Some(false) && room && p.announce_due(now_ms, probe_ms);
        if current && p.swim == Some(false) {
            // First-hand evidence: alive. Silence judges it until SWIM's next verdict
            // (its new identity's, once it has rejoined).
            (p.swim, p.swim_down_since_ms) = (None, None);
        }
        let came_up = !p.up;
        // Heard again after a silence, and up all along (one that comes up gets a full
        // sync): see below.
        let heard_again = !came_up && p.last_heard_ms.is_some_and(|t| now_ms.saturating_sub(t) > silent_ms);
        let spread = news(p, incarnation, self.swim_started, self.cfg.replica.incarnation);
        p.last_heard_ms = Some(now_ms);
        p.up = true;
        if came_up {
            self.ring_stale |= set_up(&mut self.up, from, true);
        }
        p.incarnation = Some(p.incarnation.map_or(incarnation, |i| i.max(incarnation)));
        // A peer heard from first hand that SWIM has no verdict on: SWIM judges it from
        // now on (it probes it, and its verdict comes at once).
        let introduce = (swim_mode && p.swim.is_none()).then_some((p.incarnation.unwrap_or(incarnation), p.addr));
        if announce || introduce.is_some() {
            self.swim_step(now_ms, |swim, out| {
                if announce {
                    swim.announce(from, incarnation, now_ms, out);
                }
                if let Some((i, addr)) = introduce {
                    swim.introduce(SwimId { addr, ..SwimId::new(from, i, 0) }, spread, now_ms, out);
                }
            });
        }
        // Aggregated dissemination: a peer this node sends counts or totals to (it is on
        // the ring, or this node is), heard from again after a silence longer than an
        // anti-entropy period, gets what a full resend would send it
        // (`resend_everything`): what went to it meanwhile may have been lost.
        if heard_again && self.aggregated() && (self.in_ring() || self.ring.members.binary_search(&from).is_ok()) {
            self.heal.push(from);
        }
        if came_up || new_incarnation {
            self.peer_up(from, incarnation, came_up, new_incarnation, now_ms);
        }
    }

    /// A peer came up (`came_up`), or back as a new incarnation.
    fn peer_up(&mut self, peer: PeerId, incarnation: u64, came_up: bool, restarted: bool, now_ms: i64) {
        self.push_event(Event::PeerUp { peer, incarnation, restarted });
        if came_up {
            self.publish_live();
        }
        // A peer that joins, heals from a partition or restarts gets everything. With
        // aggregated dissemination that is the counts of the keys the peer aggregates
        // (outside the aggregator pool, none) and, from each member of the ring, the
        // totals it publishes of the other keys ([`sync_jobs`](Self::sync_jobs)), or
        // the peer would wait for the keys' next changes, the full resend that follows
        // a change of the ring, or the next period.
        self.send_everything(peer, now_ms);
    }

    /// Liveness from SWIM beyond `swim_above_peers` peers (see [`GossipConfig::swim_above_peers`]).
    fn swim_mode(&self) -> bool {
        self.peers.len() > self.cfg.swim_above_peers.max(self.cfg.full_mesh_max_peers)
    }

    /// A partial view, as the members in it (sorted), or `None` for every member: with
    /// aggregated dissemination and beyond `swim_above_peers` plus an eighth of it (144
    /// peers at the default; a node that counts a few members fewer is still in SWIM
    /// mode, and judges silence over SWIM cycles), a member outside the aggregator pool
    /// exchanges heartbeats, clock samples and new limits with the pool only, and hears
    /// from the other members through SWIM alone.
    fn view(&self) -> Option<&[PeerId]> {
        (self.partial_views() && !self.in_ring()).then_some(&self.ring.members[..])
    }

    /// Whether members outside the aggregator pool have a partial view (the pool), as this
    /// node counts the peers.
    fn partial_views(&self) -> bool {
        let swim_above = self.cfg.swim_above_peers.max(self.cfg.full_mesh_max_peers);
        self.cfg.partial_view && self.peers.len() > swim_above + swim_above / 8 && self.aggregated()
    }

    /// The clocks whose median is cluster time here, among `live`, and whether this
    /// node's own is one: every live peer's and its own; but where members outside the
    /// pool have a partial view, and sample the pool's clocks only, the pool's on every
    /// member (its own only if it is in the pool), so that members in and outside the
    /// pool take the median of the same clocks and agree on it.
    fn clock_reference<'a>(&self, live: &'a [PeerId]) -> (std::borrow::Cow<'a, [PeerId]>, bool) {
        let partial = self.partial_views();
        (among(live, partial.then_some(&self.ring.members[..])), !partial || self.in_ring())
    }

    /// Those of `peers` in this node's view (all of them but with a partial view).
    fn in_view_of<'a>(&self, peers: &'a [PeerId]) -> std::borrow::Cow<'a, [PeerId]> {
        among(peers, self.view())
    }

    /// Whether the transport should keep a connection to `peer` open while it carries
    /// nothing: a peer in this node's view (`docs/cluster.md`, "A partial view of
    /// connections"). The others are dialled when there is something to send and closed
    /// once unused.
    #[cfg(feature = "quic")]
    pub(crate) fn keeps_connected(&self, peer: PeerId) -> bool {
        self.view().is_none_or(|v| v.binary_search(&peer).is_ok())
    }

    /// Whether this node's SWIM gossips `peer` when it hears from it as `incarnation`
    /// (SWIM mode, with addresses, and news: [`news`]), so that the transport need not
    /// announce it to the members it is connected to. Where it does not (a peer that
    /// started before this node by the clocks' word, one added before SWIM started here),
    /// the transport announces it.
    #[cfg(feature = "quic")]
    pub(crate) fn gossips(&self, peer: PeerId, incarnation: u64) -> bool {
        let Some(p) = self.peers.get(&peer) else { return false };
        self.swim_mode() && self.cfg.swim_address.is_some() && news(p, incarnation, self.swim_started, self.cfg.replica.incarnation)
    }

    /// With [`GossipConfig::partial_view`], the silence after which a peer is down in
    /// SWIM mode whatever SWIM says: four of this node's SWIM probe cycles over the
    /// members (foca probes them in turn, in a shuffled order, so each is probed at least
    /// once per two cycles, and each probes this node as often), and never less than the
    /// suspicion period.
    fn swim_silence_ms(&self) -> i64 {
        let members = self.peers.len().max(self.swim.active_members()) as u64 + 1;
        let cycle = members * self.swim.settings().probe_period_ms;
        (4 * cycle as i64).max(self.suspect_after_ms())
    }

    /// Sends SWIM's packets, and in SWIM mode applies its verdicts.
    fn apply_swim(&mut self, out: swim::Output, now_ms: i64) {
        self.send_swim(out.sends, false);
        let swim_mode = self.swim_mode();
        let probe_ms = self.swim.settings().probe_period_ms as i64;
        // An ask that cannot be queued is not made (nor counted as made: a member is taken
        // down only after an ask it did not answer).
        let room = self.outbox.len() < MAX_OUTBOX;
        let (mut unheard, mut declared) = (Vec::new(), Vec::new());
        let mut learned = Vec::new();
        for (id, up) in out.verdicts {
            let peer = id.node;
            // A member SWIM's infection brought, that no driver named (the gate bounds how
            // many SWIM takes in that nobody named), or a later incarnation of a peer: the
            // driver's to add, or to reach at its address.
            let learn = id.addr.filter(|_| swim_mode && up && peer != self.cfg.replica.node);
            let learn = learn.map(|addr| Event::MemberLearned { peer, incarnation: id.incarnation, addr });
            let Some(p) = self.peers.get_mut(&peer) else {
                learned.extend(learn);
                continue;
            };
            // A verdict on an incarnation the peer has restarted from says nothing of it.
            if p.gone(id.incarnation) {
                continue;
            }
            if p.incarnation.is_some_and(|i| id.incarnation > i) {
                learned.extend(learn);
            }
            p.swim = Some(up);
            p.swim_down_since_ms = (!up).then_some(now_ms);
            if !swim_mode {
                continue;
            }
            if up && p.incarnation != Some(id.incarnation) {
                // Up once heard from first hand: totals leave out a writer's own counts
                // by its incarnation, which only its own messages establish. A ping
                // asks it for one: at most one per probe period, so that a packet of
                // verdicts going down and up in turn cannot make this node ping the
                // member once per pair.
                if p.up_pinged_ms.is_none_or(|t| now_ms - t >= probe_ms) {
                    p.up_pinged_ms = Some(now_ms);
                    unheard.push(peer);
                }
                continue;
            }
            // A down verdict takes effect in `update_liveness`, after an ask: an announce
            // gets an answer from a member that is alive, and tells it it was declared
            // down. A peer comes up only on a message of its own (`heard`), never on
            // others' word.
            if !up && p.up && room && p.announce_due(now_ms, probe_ms) {
                declared.push((peer, p.incarnation.unwrap_or(0)));
            }
        }
        for event in learned {
            self.push_event(event);
        }
        for peer in unheard {
            self.send_ping(peer, now_ms);
        }
        if !declared.is_empty() {
            // Its packets (an announce makes no verdict at once).
            self.swim_step(now_ms, |swim, out| {
                for (peer, incarnation) in declared {
                    swim.announce(peer, incarnation, now_ms, out);
                }
            });
        }
    }

    /// Runs one SWIM step, then sends its packets and applies its verdicts.
    fn swim_step<R>(&mut self, now_ms: i64, f: impl FnOnce(&mut Swim, &mut swim::Output) -> R) -> R {
        let mut out = swim::Output::default();
        let r = f(&mut self.swim, &mut out);
        self.apply_swim(out, now_ms);
        r
    }

    /// In SWIM mode: on entering it, announces this node to `fanout` random peers, and
    /// later to peers added since; keeps the suspicion period on the member count.
    fn swim_round(&mut self, now_ms: i64) {
        if !self.swim_mode() {
            return;
        }
        let targets: Vec<PeerId> = if self.swim_started {
            std::mem::take(&mut self.swim_to_announce).into_iter().collect()
        } else {
            // A few: each answer is a sample of the members the peer knows, and this
            // node's join spreads from them by infection.
            self.swim_started = true;
            self.swim_to_announce.clear();
            let all: Vec<PeerId> = self.peers.keys().copied().collect();
            self.pick(&all, self.cfg.fanout)
        };
        let mut announce: Vec<(PeerId, u64)> =
            targets.into_iter().map(|to| (to, self.peers.get(&to).and_then(|p| p.incarnation).unwrap_or(0))).collect();
        // Peers up that SWIM holds down since after they were last asked: asked now, if
        // an ask is due (at most one per probe period each; see `update_liveness`).
        let probe_ms = self.swim.settings().probe_period_ms as i64;
        let room = self.outbox.len() < MAX_OUTBOX;
        for (&id, p) in self.peers.iter_mut() {
            let unasked = p.swim_announced_ms < p.swim_down_since_ms;
            if p.up && p.swim == Some(false) && unasked && room && p.announce_due(now_ms, probe_ms) {
                announce.push((id, p.incarnation.unwrap_or(0)));
            }
        }
        let settings =
            swim::Settings::new(self.cfg.interval_ms, self.cfg.suspect_after_ms, self.peers.len() + 1, self.swim.settings().max_packet);
        self.swim.set_settings(settings);
        // Every peer heard from first hand that SWIM has no verdict on (on entering SWIM
        // mode, all of them) is SWIM's to judge from now on.
        let heard: Vec<SwimId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.up && p.swim.is_none())
            .filter_map(|(&id, p)| Some(SwimId { addr: p.addr, ..SwimId::new(id, p.incarnation?, 0) }))
            .collect();
        self.swim_step(now_ms, |swim, out| {
            for id in heard {
                swim.introduce(id, false, now_ms, out);
            }
            for (to, incarnation) in announce {
                swim.announce(to, incarnation, now_ms, out);
            }
        });
    }

    /// Moves the cluster offset toward the peers' median clock and names every clock
    /// (this node's included) that is further from cluster time than the tolerance.
    fn update_cluster_time(&mut self, live: &[PeerId]) {
        let before = self.clock.offset_ms();
        let (reference, own) = self.clock_reference(live);
        let u = self.clock.update(reference.iter().copied(), own);
        if self.cfg.cluster_time {
            self.replica.set_offset(u.offset_ms);
            if u.offset_ms != before {
                tracing::debug!(offset_ms = u.offset_ms, target_ms = u.target_ms, error_ms = u.error_ms, "cluster offset moved");
            }
        }
        let tolerance = self.replica.max_clock_skew_ms() as i64;
        let me = self.cfg.replica.node;
        let own = u.target_ms.is_some_and(|t| t.abs() > tolerance);
        if own != self.own_clock_beyond {
            if own {
                tracing::warn!(
                    node = me,
                    offset_ms = u.target_ms,
                    tolerance_ms = tolerance,
                    "this node's clock is beyond the tolerance from cluster time; windows follow cluster time, fix the clock"
                );
            } else {
                tracing::info!(node = me, "this node's clock is back within the tolerance from cluster time");
            }
            self.own_clock_beyond = own;
            self.replica.set_clock_beyond(own);
        }
        let checked = Some((self.clock.generation(), u.offset_ms, tolerance));
        if checked == self.clocks_checked && self.clocks_checked_live == live {
            return;
        }
        self.clocks_checked = checked;
        self.clocks_checked_live.clear();
        self.clocks_checked_live.extend_from_slice(live);
        for &p in live {
            let off = self.clock.peer_offset(p).map(|(o, _)| o - u.offset_ms);
            let beyond = off.is_some_and(|o| o.abs() > tolerance);
            if beyond && self.clocks_beyond.insert(p) {
                tracing::warn!(
                    peer = p,
                    offset_from_cluster_ms = off,
                    tolerance_ms = tolerance,
                    "a peer's clock is beyond the tolerance from cluster time"
                );
            } else if !beyond && off.is_some() && self.clocks_beyond.remove(&p) {
                tracing::info!(peer = p, offset_from_cluster_ms = off, "a peer's clock is back within the tolerance from cluster time");
            }
        }
    }

    /// Publishes the live replicas' number and this node's place among them (ordered by
    /// node id): members that agree on who is live give the bounded policy's rounding
    /// remainders to distinct nodes.
    fn publish_live(&mut self) {
        debug_assert!(self.up.iter().copied().eq(self.peers.iter().filter(|(_, p)| p.up).map(|(id, _)| *id)), "the up list drifted");
        self.update_ring();
        let live = 1 + self.up.len() as u64;
        let me = self.cfg.replica.node;
        let index = self.up.partition_point(|&p| p < me) as u64;
        if self.replica.set_view(live, index, self.lag_rounds(live) * self.cfg.interval_ms) {
            self.push_event(Event::LiveChanged { live_replicas: live, index });
        }
    }

    /// Rebuilds aggregated dissemination's ring if the live members changed (only in
    /// that mode: a smaller cluster has no use for it).
    fn update_ring(&mut self) {
        if !self.aggregated() || !self.ring_stale {
            return;
        }
        let me = self.cfg.replica.node;
        // The ring's members are the up peers and this node, or the `aggregator_pool` of
        // them that rank first.
        let mut members = self.up.clone();
        members.insert(self.up.partition_point(|&p| p < me), me);
        keep_pool(&mut members, self.cfg.aggregator_pool);
        self.ring_stale = false;
        if members != self.ring.members {
            self.ring.set_members(members);
            self.ring_changed = Some(self.round);
        }
    }

    /// One gossip round: budgets, exports under way, liveness, cluster time, limits,
    /// deltas, then anti-entropy and clock samples once a period.
    fn run_round(&mut self, now_ms: i64) {
        let _span = tracing::debug_span!("gossip_round", node = self.cfg.replica.node, round = self.round + 1).entered();
        self.stats.rounds += 1;
        self.round += 1;
        let period_start = self.round % self.cfg.anti_entropy_rounds == 0;
        self.reset_budgets(period_start);
        let exporting: Vec<PeerId> = self.peers.iter().filter(|(_, p)| !p.jobs.is_empty()).map(|(id, _)| *id).collect();
        for p in exporting {
            self.step_repairs(p, now_ms);
        }
        if period_start {
            self.reclaim_replicas(now_ms);
        }
        self.swim_round(now_ms);
        self.update_liveness(now_ms);
        // Also when a peer added (not a live change) made this node cross into the mode.
        self.update_ring();
        let live: Vec<PeerId> = self.live_peers().collect();
        // Clock samples are taken in the view only: the others' would grow stale.
        let sampled = self.in_view_of(&live);
        self.update_cluster_time(&sampled);
        self.broadcast_limits();
        // Once the node's view has been still for two rounds (see `anti_entropy`): known
        // after this round's own counts are collected.
        let quiet_edge = |node: &Self| node.round == node.last_active_round + 2;
        if self.aggregated() {
            self.send_to_aggregators(&live, now_ms);
            // Repair by repetition: absolute values, merged idempotently.
            let ring_settled = self.ring_changed.is_some_and(|r| self.round >= r + 2);
            // A period's resend is full every `FULL_RESEND_PERIODS`, while the ring has not
            // held still since it changed (members coming or going round after round hold
            // off `ring_settled`), and while a full pass over a store too large for one
            // resend is under way (so that it ends as many periods later as before).
            let full_period = || {
                self.round % self.cfg.anti_entropy_rounds.saturating_mul(FULL_RESEND_PERIODS) == 0
                    || self.ring_changed.is_some()
                    || self.resend_cursors.iter().any(|(&(_, full), cursor)| full && *cursor != ExportCursor::default())
            };
            // The view gone quiet: everything goes out, and once more at the next period if
            // it is still quiet (what the first resend lost is not sent again otherwise
            // until the next full resend).
            let quiet_again = self.full_again_at.is_some_and(|r| self.round >= r) && self.round > self.last_active_round + 2;
            let full = quiet_edge(self) || ring_settled || (period_start && (full_period() || self.sent_overflow || quiet_again));
            // Peers heard again after a silence: at most one resend to them per period.
            let heal_due = self.healed_round.is_none_or(|r| self.round >= r.saturating_add(self.heal_rounds()));
            if full {
                self.ring_changed = None;
                self.full_again_at = (quiet_edge(self) && !quiet_again).then_some(self.round + self.cfg.anti_entropy_rounds);
                self.heal.clear();
                // This round's own counts are noted already: sent twice in one round, they
                // may be lost together, so the next period may still send them once more.
                let round = self.round;
                self.sent_counts.retain(|s| s.3 == round);
                (self.sent_overflow, self.sent_totals) = (false, Vec::new());
                self.resend_everything(&live, now_ms, Resend::Full);
            } else {
                if period_start {
                    self.resend_quiet(&live, now_ms);
                    if self.holds_counts_not_resent_by_their_replica() {
                        self.resend_everything(&live, now_ms, Resend::Partial);
                    }
                }
                if heal_due && !self.heal.is_empty() {
                    let mut heal = std::mem::take(&mut self.heal);
                    heal.sort_unstable();
                    heal.dedup();
                    heal.retain(|p| live.binary_search(p).is_ok());
                    if !heal.is_empty() {
                        self.healed_round = Some(self.round);
                        self.stats.resends_to_peers_heard_again += 1;
                        self.resend_everything(&live, now_ms, Resend::To(&heal));
                    }
                }
            }
            self.publish_totals(&live, now_ms);
            if period_start {
                self.send_pings(&live, now_ms);
            }
        } else {
            self.send_deltas(&live, now_ms);
            if period_start || quiet_edge(self) {
                self.anti_entropy(&live, now_ms);
            }
        }
    }

    /// Each peer's export budget is per round, its answer budget per anti-entropy period.
    fn reset_budgets(&mut self, period_start: bool) {
        for p in self.peers.values_mut() {
            p.exported_this_round = 0;
            p.published_this_round = 0;
            if period_start {
                p.answers_used = 0;
            }
        }
    }

    /// Marks down the peers silent past the suspicion period, and publishes the new live
    /// set if it changed.
    fn update_liveness(&mut self, now_ms: i64) {
        let suspect = self.suspect_after_ms();
        let swim_mode = self.swim_mode();
        let grace = 2 * self.swim.settings().probe_period_ms as i64;
        // With a partial view, a peer heartbeats only its own pool unless it is in it: by
        // its view, not this node's (which may differ, or change as members come and go).
        // So in SWIM mode every peer's silence is judged over several SWIM probe cycles,
        // and SWIM is what notices a failure. Peers stop heartbeating every member only
        // further out than SWIM mode (`partial_view`), so a node that counts a few members
        // fewer than they do still judges them over SWIM cycles. On leaving SWIM mode the
        // peers' silence counts from then: they heartbeat every member in turn again.
        if self.was_swim_mode && !swim_mode {
            self.left_swim_mode_ms = Some(now_ms);
        }
        self.was_swim_mode = swim_mode;
        let swim_silence = self.cfg.partial_view.then(|| self.swim_silence_ms());
        // Silence counts from when this node left SWIM mode at the earliest.
        let since = self.left_swim_mode_ms.filter(|_| swim_silence.is_some());
        let mut down = Vec::new();
        for (id, p) in self.peers.iter_mut() {
            let heard_within = |ms: i64| p.last_heard_ms.max(since).is_some_and(|t| now_ms - t <= ms);
            let suspect = match swim_silence {
                Some(silence) if swim_mode => silence,
                _ => suspect,
            };
            // Silence takes a peer down, SWIM or not (heartbeats in turn go on, so a live
            // peer is heard within the period): SWIM can only make detection faster, and
            // no verdict gossiped by others keeps a silent peer up. A peer SWIM declares
            // down is asked first (`apply_swim`, `swim_round`) and taken down only when
            // an ask made after the verdict has gone unanswered for `grace`: an answer
            // (any message, first hand) clears the verdict (`heard`), and a member
            // declared down across a healed partition, or by a hostile member's word,
            // rejoins SWIM as a new identity. Peers come up in `heard` and `apply_swim`
            // only, with their events.
            let asked_unanswered = || {
                let (since, asked) = (p.swim_down_since_ms, p.swim_announced_ms);
                since.zip(asked).is_some_and(|(since, asked)| asked >= since && now_ms - asked > grace)
            };
            let up = heard_within(suspect) && !(swim_mode && p.swim == Some(false) && asked_unanswered());
            if p.up && !up {
                let by = if p.swim.is_some() && swim_mode { "SWIM's verdict" } else { "silence" };
                tracing::debug!(peer = id, by, swim = swim_mode, suspect_ms = suspect, "peer down");
                down.push(Event::PeerDown { peer: *id, silent_ms: p.last_heard_ms.map(|t| now_ms - t) });
                p.up = false;
                self.ring_stale |= set_up(&mut self.up, *id, false);
            }
        }
        if !down.is_empty() {
            for e in down {
                self.push_event(e);
            }
            self.publish_live();
        }
    }

    /// New limits go to every peer at once: all nodes apply them within a round.
    fn broadcast_limits(&mut self) {
        if self.replica.limits_version() > self.limits_sent {
            self.limits_sent = self.replica.limits_version();
            // With a partial view, to the pool, whose members pass them on to every member
            // (each sends new limits on when it installs them).
            let all: Vec<PeerId> = self.peers.keys().copied().collect();
            let peers = self.in_view_of(&all).into_owned();
            for p in peers {
                self.send_limits(p);
            }
        }
    }

    /// Sends what changed (this node's counts, and in fan-out mode what it learned) to
    /// this round's targets; a heartbeat to a target with nothing to hear or that is down.
    fn send_deltas(&mut self, live: &[PeerId], now_ms: i64) {
        let me = self.cfg.replica;
        let mut out: Vec<Outgoing> = Vec::new();
        self.replica.changes(now_ms, |window_ms, changed| {
            out.extend(changed.iter().map(|e| Outgoing { window_ms, replica: me, key: e.key, window: e.window, count: e.count }));
        });
        let fan_out = self.fan_out();
        if !out.is_empty() || !self.relay.is_empty() {
            self.last_active_round = self.round;
        }
        if fan_out {
            out.append(&mut self.relay);
        } else {
            self.relay.clear();
        }
        let targets: Vec<PeerId> = if fan_out {
            let mut t = self.next_in_cycle(live, self.cfg.fanout);
            // Probe one peer that is down, so a healed peer is noticed.
            let down: Vec<PeerId> = self.peers.iter().filter(|(_, p)| !p.up).map(|(id, _)| *id).collect();
            t.extend(self.pick(&down, 1));
            t
        } else {
            self.peers.keys().copied().collect()
        };
        let messages = self.pack(&mut out, false);
        for to in targets {
            if messages.is_empty() || !self.peers.get(&to).is_some_and(|p| p.up) {
                // It gets everything when it comes back up.
                self.send(to, Body::Counts(Vec::new()), false);
            } else {
                for m in &messages {
                    self.queue(to, m.clone(), false);
                }
                self.stats.entries_sent += out.len() as u64;
            }
        }
    }

    /// Digests and clock samples: every anti-entropy period, and once when the node's view
    /// goes quiet.
    ///
    /// While counts are changing, the current window is mid-update everywhere and a
    /// digest of it would mostly "repair" deltas still in flight: digest the previous,
    /// closed window, to one random peer. Once this node's view has been still for two
    /// rounds, digest both windows, to every live peer (in fan-out mode, `fanout` of
    /// them): at once when it goes quiet, then every period. That is what converges a
    /// quiet cluster quickly when the last deltas of a burst were lost.
    fn anti_entropy(&mut self, live: &[PeerId], now_ms: i64) {
        let quiet = self.round >= self.last_active_round + 2;
        let fan_out = self.fan_out();
        let targets = match (quiet, fan_out) {
            (false, _) => self.pick(live, 1),
            (true, false) => live.to_vec(),
            (true, true) => self.pick(live, self.cfg.fanout),
        };
        for to in targets {
            self.send_digests(to, now_ms, quiet);
        }
        self.send_pings(live, now_ms);
    }

    /// A clock sample from every live peer; in fan-out mode from `fanout` of them, and
    /// from up to [`MAX_CLOCK_PROBES`] more that this node has no usable sample of yet.
    fn send_pings(&mut self, live: &[PeerId], now_ms: i64) {
        // A partial view is beyond fan-out mode's threshold.
        let sample = if self.fan_out() {
            let view = self.in_view_of(live);
            let mut sample = self.pick(&view, self.cfg.fanout);
            // Cluster time is the median of the clocks sampled here, and members agree
            // on it once each has sampled every clock (until then each takes the median
            // of its own draw). `fanout` random peers a period reach them all in about
            // `N·ln N / fanout` periods (25 s at 100 members); the unsampled ones asked
            // first, in about `N / MAX_CLOCK_PROBES`. Those never asked (or that answered)
            // before those whose ask is unanswered, so that peers that do not answer do not
            // take every place; then in pool order, so that members sample the same clocks
            // first.
            let asked = |p: PeerId| self.peers.get(&p).is_some_and(|p| p.ping_sent_ms.is_some());
            let mut unsampled: Vec<PeerId> =
                view.iter().copied().filter(|&p| self.clock.peer_offset(p).is_none() && !sample.contains(&p)).collect();
            unsampled.sort_unstable_by_key(|&p| (asked(p), pool_rank(p), p));
            sample.extend(unsampled.into_iter().take(MAX_CLOCK_PROBES));
            sample
        } else {
            live.to_vec()
        };
        for p in sample {
            self.send_ping(p, now_ms);
        }
    }

    /// Encodes `entries` (sorted here) as messages of at most `max_message_bytes`.
    fn pack(&self, entries: &mut [Outgoing], totals: bool) -> Vec<Vec<u8>> {
        let mut messages = Vec::new();
        self.pack_into(entries, totals, &mut Packing::default(), &mut messages);
        messages
    }

    /// [`pack`](Self::pack), appending to `messages`, with the message being filled kept
    /// in `packing`, whose buffers a caller packing for many peers reuses.
    fn pack_into(&self, entries: &mut [Outgoing], totals: bool, packing: &mut Packing, messages: &mut Vec<Vec<u8>>) {
        entries.sort_unstable_by_key(|o| (o.window_ms, o.replica, std::cmp::Reverse(o.window), o.key));
        self.pack_sorted(entries.iter().copied(), totals, packing, messages);
    }

    /// [`pack_into`](Self::pack_into) of `entries` already in its order (by store, replica,
    /// newest window first, key).
    fn pack_sorted(&self, entries: impl Iterator<Item = Outgoing>, totals: bool, packing: &mut Packing, messages: &mut Vec<Vec<u8>>) {
        let budget = self.cfg.max_message_bytes;
        let header = codec::counts_header_len(&self.cfg.replica);
        let Packing { heads, flat } = packing;
        heads.clear();
        flat.clear();
        let mut size = header;
        let finish = |heads: &mut Vec<_>, flat: &mut Vec<_>, messages: &mut Vec<Vec<u8>>| {
            match codec::encode_batches(&self.cfg.replica, totals, heads, flat) {
                Ok(bytes) => messages.push(bytes),
                Err(e) => tracing::error!(error = %e, "gossip message not sent"),
            }
            heads.clear();
            flat.clear();
        };
        for o in entries {
            // In the last batch if it has this replica and store and the window is its
            // base or the one before; else in a new batch.
            let offset = heads
                .last()
                .filter(|(h, _)| h.replica == o.replica && u64::from(h.window_ms) == o.window_ms)
                .map(|(h, _)| h.base_window - o.window)
                .filter(|d| (0..=1).contains(d));
            let entry = WireEntry { key: o.key.to_le_bytes(), window_offset: offset.unwrap_or(0) as u32, count: o.count };
            let batch_len = codec::batch_header_len(&o.replica, o.window_ms as u32, o.window, 1);
            let extra = codec::entry_len(&entry) + if offset.is_some() { 0 } else { batch_len };
            if size + extra > budget && !heads.is_empty() {
                finish(heads, flat, messages);
                size = header;
            }
            match (offset, heads.last_mut()) {
                (Some(_), Some((_, range))) => {
                    flat.push(entry);
                    range.end = flat.len();
                    size += extra;
                }
                _ => {
                    let entry = WireEntry { window_offset: 0, ..entry };
                    size += batch_len + codec::entry_len(&entry);
                    flat.push(entry);
                    let head = BatchHead { replica: o.replica, window_ms: o.window_ms as u32, base_window: o.window };
                    heads.push((head, flat.len() - 1..flat.len()));
                }
            }
        }
        if !heads.is_empty() {
            finish(heads, flat, messages);
        }
    }

    /// A message from this node. One the codec refuses (longer than `MAX_DECODE_BYTES`,
    /// which packing by `max_message_bytes` and the compile-time bound on limits messages
    /// rule out) is logged and not sent (`None`), rather than sent empty.
    fn encode(&self, body: Body) -> Option<Vec<u8>> {
        codec::encode(&Envelope::new(self.cfg.replica, body)).inspect_err(|e| tracing::error!(error = %e, "gossip message not sent")).ok()
    }

    fn send(&mut self, to: PeerId, body: Body, reliable: bool) {
        if let Some(bytes) = self.encode(body) {
            self.queue(to, bytes, reliable);
        }
    }

    fn push_event(&mut self, event: Event) {
        if self.events.len() >= MAX_EVENTS {
            self.stats.events_dropped += 1;
        } else {
            self.events.push_back(event);
        }
    }

    fn queue(&mut self, to: PeerId, bytes: Vec<u8>, reliable: bool) {
        if self.outbox.len() >= MAX_OUTBOX {
            self.stats.outbox_dropped += 1;
            return;
        }
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64;
        self.outbox.push_back(Transmit { to, bytes, reliable });
    }

    fn merge_batches(&mut self, from: PeerId, batches: &[Batch], now_ms: i64) {
        let now_ms = self.cluster_ms(now_ms);
        let aggregated = self.aggregated();
        let fan_out = self.fan_out() && !aggregated;
        let mut refused = None;
        // First-aggregator keys past the publish budget: published with the next period's
        // resend of what went quiet.
        let mut held_back = Vec::new();
        for b in batches {
            if b.replica == self.cfg.replica {
                continue; // our own counts are authoritative here
            }
            let window_ms = u64::from(b.window_ms);
            // Counts for a window length this node keeps no store for are dropped: a
            // peer must not make stores here (they are capped). A store made later by
            // a local allow_with catches up through anti-entropy.
            let Some((range, _)) = self.replica.windows(window_ms, now_ms) else {
                self.stats.out_of_range += b.entries.len() as u64;
                continue;
            };
            let window_of = |e: &WireEntry| b.base_window - i64::from(e.window_offset);
            let (newest, in_range) =
                b.entries.iter().map(window_of).filter(|w| range.contains(w)).fold((None, 0), |(m, n), w| (Some(w).max(m), n + 1));
            let Some(newest) = newest else {
                self.stats.out_of_range += b.entries.len() as u64;
                continue;
            };
            // A replica enters the table only with a count that can still matter, and
            // within the sender's budget.
            let Some(index) = self.admit_replica(from, b.replica, window_ms, newest) else {
                self.stats.replicas_refused += 1;
                refused.get_or_insert(b.replica);
                continue;
            };
            self.stats.out_of_range += (b.entries.len() - in_range) as u64;
            let entries = b
                .entries
                .iter()
                .map(|e| (u64::from_le_bytes(e.key), window_of(e), e.count))
                .filter(|(_, window, _)| range.contains(window));
            let mut publish_left = if aggregated {
                self.peers.get(&from).map_or(0, |p| MAX_PUBLISHED_PER_PEER_ROUND.saturating_sub(p.published_this_round))
            } else {
                0
            };
            let (stats, relay, to_publish) = (&mut self.stats, &mut self.relay, &mut self.to_publish);
            let (ring, k, me) = (&self.ring, self.cfg.aggregators, self.cfg.replica.node);
            self.replica.merge(window_ms, Some(index), now_ms, entries, |(key, window, count), outcome| match outcome {
                Ok(true) => {
                    stats.entries_merged += 1;
                    if fan_out {
                        relay.push(Outgoing { window_ms, replica: b.replica, key, window, count });
                    } else if publish_left > 0 && ring.aggregates(key, k, me) {
                        publish_left -= 1;
                        to_publish.push((window_ms, key, window));
                    } else if aggregated && publish_left == 0 && ring.publishes(key, k, me) {
                        held_back.push((window_ms, key, window));
                    }
                }
                Ok(false) => {}
                Err(_) => stats.dropped_at_capacity += 1,
            });
            if let Some(p) = self.peers.get_mut(&from).filter(|_| aggregated) {
                p.published_this_round = MAX_PUBLISHED_PER_PEER_ROUND - publish_left;
            }
        }
        // As if published in the round before this node's next: quiet at its next period
        // (or the one after, if its key was published in that round too).
        let round = self.round.saturating_sub(1);
        note_sent(&mut self.sent_totals, &mut self.sent_overflow, held_back.into_iter(), round);
        if let Some(replica) = refused {
            self.push_event(Event::Refused { peer: from, reason: Refusal::Replica(replica) });
        }
    }

    /// Merges the others' totals an aggregator sent: each can only raise this node's view.
    fn merge_totals(&mut self, batches: &[Batch], now_ms: i64) {
        let now_ms = self.cluster_ms(now_ms);
        for b in batches {
            let window_ms = u64::from(b.window_ms);
            let Some((range, _)) = self.replica.windows(window_ms, now_ms) else {
                self.stats.out_of_range += b.entries.len() as u64;
                continue;
            };
            let window_of = |e: &WireEntry| b.base_window - i64::from(e.window_offset);
            let stats = &mut self.stats;
            stats.out_of_range += b.entries.iter().filter(|e| !range.contains(&window_of(e))).count() as u64;
            let entries = b
                .entries
                .iter()
                .map(|e| (u64::from_le_bytes(e.key), window_of(e), e.count))
                .filter(|(_, window, _)| range.contains(window));
            self.replica.merge(window_ms, None, now_ms, entries, |_, outcome| match outcome {
                Ok(true) => stats.totals_merged += 1,
                Ok(false) => {}
                Err(_) => stats.dropped_at_capacity += 1,
            });
        }
    }

    // ----- aggregated dissemination -----

    /// Sends this node's changed counts to their keys' aggregators, and heartbeats to
    /// fan-out mode's cycle of targets that got nothing this round (and to one peer that
    /// is down, so a healed peer is noticed).
    fn send_to_aggregators(&mut self, live: &[PeerId], now_ms: i64) {
        let me = self.cfg.replica;
        let mut own: Vec<Outgoing> = Vec::new();
        self.replica.changes(now_ms, |window_ms, changed| {
            own.extend(changed.iter().map(|e| Outgoing { window_ms, replica: me, key: e.key, window: e.window, count: e.count }));
        });
        if !own.is_empty() {
            self.last_active_round = self.round;
        }
        let sent = own.iter().map(|o| (o.window_ms, o.key, o.window));
        note_sent(&mut self.sent_counts, &mut self.sent_overflow, sent, self.round);
        self.relay.clear();
        let messaged = self.route_to_aggregators(own, true, None);
        // Heartbeats in turn, SWIM or not: every member judges by silence too (below
        // `swim_above_peers`, only by it; beyond, as SWIM's backstop). One peer that is
        // down is probed each round, so a healed one is heard from (and, in SWIM mode,
        // announced to) at once.
        // With a partial view, to the pool only (SWIM hears from the others).
        let view = self.in_view_of(live);
        let mut targets = self.next_in_cycle(&view, self.cfg.fanout);
        let down: Vec<PeerId> = self.peers.iter().filter(|(_, p)| !p.up).map(|(id, _)| *id).collect();
        targets.extend(self.pick(&down, 1));
        for to in targets {
            if !messaged.contains(&to) {
                self.send(to, Body::Counts(Vec::new()), false);
            }
        }
    }

    /// Sends each of `counts` (this node's, or in a resend any replica's it holds) to its
    /// key's aggregators other than this node; with `publish`, a key this node aggregates
    /// itself is marked for publishing this round. Returns the peers sent to.
    /// With `only` (sorted), only to those peers.
    fn route_to_aggregators(&mut self, counts: Vec<Outgoing>, publish: bool, only: Option<&[PeerId]>) -> BTreeSet<PeerId> {
        let me = self.cfg.replica.node;
        let mut per: BTreeMap<PeerId, Vec<Outgoing>> = BTreeMap::new();
        let mut last = None;
        for o in counts {
            let aggregators = per_key(&mut last, o.key, || self.ring.aggregators(o.key, self.cfg.aggregators));
            for &a in aggregators.as_slice() {
                if a != me {
                    if only.is_none_or(|to| to.binary_search(&a).is_ok()) {
                        per.entry(a).or_default().push(o);
                    }
                } else if publish {
                    self.to_publish.push((o.window_ms, o.key, o.window));
                }
            }
        }
        self.send_packed(per)
    }

    /// Packs and sends each peer's counts to the peers that are up (others' totals go by
    /// [`send_totals`](Self::send_totals)). Returns the peers sent to.
    fn send_packed(&mut self, per: BTreeMap<PeerId, Vec<Outgoing>>) -> BTreeSet<PeerId> {
        let mut sent = BTreeSet::new();
        let (mut packing, mut messages) = (Packing::default(), Vec::new());
        for (to, mut entries) in per {
            if !self.peers.get(&to).is_some_and(|p| p.up) {
                continue;
            }
            self.pack_into(&mut entries, false, &mut packing, &mut messages);
            for m in messages.drain(..) {
                self.queue(to, m, false);
            }
            self.stats.entries_sent += entries.len() as u64;
            sent.insert(to);
        }
        sent
    }

    /// Puts `changed` (sorted; keys another member is first aggregator of) on standby,
    /// with the others' counts this node holds of them now, and returns the (window
    /// length, key, window) on standby since two rounds whose heard total is still below
    /// what this node held then: the first aggregator has not published them.
    fn stand_by(&mut self, changed: &[(u64, u64, i64)], now_ms: i64) -> Vec<(u64, u64, i64)> {
        let (me, k) = (self.cfg.replica.node, self.cfg.aggregators);
        let mut held = Vec::new();
        let mut keys = Vec::new();
        let due = self.round + 2;
        let take = |node: &Self, window_ms: u64, keys: &[u64], out: &mut Vec<OthersCount>| {
            out.clear();
            node.replica.others_of(window_ms, keys, now_ms, out);
            out.sort_unstable();
        };
        let find = |held: &[OthersCount], key: u64, window: i64| {
            held.binary_search_by(|h| (h.key, h.window).cmp(&(key, window))).ok().map(|i| held[i])
        };
        for group in changed.chunk_by(|a, b| a.0 == b.0) {
            let window_ms = group[0].0;
            keys.clear();
            keys.extend(group.iter().map(|c| c.1));
            keys.dedup();
            take(self, window_ms, &keys, &mut held);
            for &(_, key, window) in group {
                // Others' counts no total it heard holds yet; or (this node's own count
                // changed, which no total it hears holds) only the first aggregator's
                // silence will tell.
                let lag = find(&held, key, window).filter(|h| h.held > h.heard).map(|h| h.held);
                self.standby.push((due, window_ms, key, window, lag, now_ms));
            }
        }
        let taken = self.standby.iter().take_while(|s| s.0 <= self.round).count();
        let mut waited: Vec<(u64, u64, i64, Option<u64>, i64)> =
            self.standby.drain(..taken).map(|(_, w, key, window, held, noted)| (w, key, window, held, noted)).collect();
        waited.sort_unstable();
        let mut lagging = Vec::new();
        for group in waited.chunk_by(|a, b| a.0 == b.0) {
            let window_ms = group[0].0;
            // Still a standby for the key (the ring may have moved in two rounds): with its
            // first aggregator.
            let still: Vec<(PeerId, u64, i64, Option<u64>, i64)> = group
                .iter()
                .filter_map(|&(_, key, window, then, noted)| {
                    let a = self.ring.aggregators(key, k);
                    let first = *a.as_slice().first().filter(|&&f| f != me && a.as_slice().contains(&me))?;
                    Some((first, key, window, then, noted))
                })
                .collect();
            // The others' counts held are looked up only where they lagged the heard total.
            keys.clear();
            keys.extend(still.iter().filter(|s| s.3.is_some()).map(|s| s.1));
            keys.dedup();
            take(self, window_ms, &keys, &mut held);
            for &(first, key, window, then, noted) in &still {
                let behind = then.is_some_and(|then| find(&held, key, window).is_some_and(|h| h.heard < then));
                let silent = self.peers.get(&first).is_none_or(|p| p.last_heard_ms.is_none_or(|t| t < noted));
                if behind || silent {
                    lagging.push((window_ms, key, window));
                }
            }
        }
        lagging.sort_unstable();
        lagging.dedup();
        lagging
    }

    /// Sends every live member the others' totals of the keys this node is the first
    /// aggregator of whose counts changed here this round (merged from a writer, or
    /// counted by this node), and of the keys it stands by for whose first aggregator's
    /// totals still lag two rounds on ([`stand_by`](Self::stand_by)); the standby
    /// aggregators also publish every count they hold with each full resend.
    fn publish_totals(&mut self, live: &[PeerId], now_ms: i64) {
        if self.to_publish.is_empty() && self.standby.is_empty() {
            return;
        }
        let (me, k) = (self.cfg.replica.node, self.cfg.aggregators);
        let mut changed = std::mem::take(&mut self.to_publish);
        changed.sort_unstable();
        changed.dedup();
        // The keys another member is first aggregator of wait two rounds as a standby;
        // those due now whose totals have not caught up are published with this node's.
        let (mut changed, standby): (Vec<_>, Vec<_>) = changed.into_iter().partition(|c| self.ring.publishes(c.1, k, me));
        let mut lagging = self.stand_by(&standby, now_ms);
        self.stats.standby_published += lagging.len() as u64;
        changed.append(&mut lagging);
        changed.sort_unstable();
        changed.dedup();
        note_sent(&mut self.sent_totals, &mut self.sent_overflow, changed.iter().copied(), self.round);
        let mut totals = Vec::new();
        let mut buf = Vec::new();
        for group in changed.chunk_by(|a, b| a.0 == b.0) {
            let window_ms = group[0].0;
            let mut keys: Vec<u64> = group.iter().map(|&(_, key, _)| key).collect();
            keys.dedup();
            buf.clear();
            self.replica.export_keys(window_ms, &keys, now_ms, &mut buf);
            // Only the windows that changed (a writer of any window gets them).
            let changed_window = |key: u64, window: i64| group.binary_search(&(window_ms, key, window)).is_ok();
            totals.push(self.totals_for(window_ms, &buf, changed_window, (live, |_| true)));
        }
        self.send_totals(totals, None);
    }

    /// For every key in `exported` (each key's counts together, as the store exports
    /// them): to each of its writers that is a live peer's current incarnation, the total
    /// of every other replica's counts, per window that `send` accepts; and for the keys
    /// `to_all` accepts, to every other peer in `live`, the total of all counts.
    fn totals_for(
        &self,
        window_ms: u64,
        exported: &[Exported],
        send: impl Fn(u64, i64) -> bool,
        (live, to_all): (&[PeerId], impl Fn(u64) -> bool),
    ) -> Totals {
        // The peers in id order, and what is sent to each: indexed once here rather than
        // looked up in the maps per key and peer (the lookups were a tenth of a busy round).
        let peers: Vec<(PeerId, &Peer)> = self.peers.iter().map(|(&id, p)| (id, p)).collect();
        let place = |id: &PeerId| peers.binary_search_by_key(id, |&(id, _)| id).ok();
        let mut in_live = vec![false; peers.len()];
        for at in live.iter().filter_map(place) {
            in_live[at] = true;
        }
        let mut all = Vec::new();
        let mut own: Vec<Vec<(std::cmp::Reverse<i64>, u64, u64)>> = vec![Vec::new(); peers.len()];
        // Per replica index, its node and place among the peers (once looked up: `None`
        // for one no peer runs): no search per writer.
        type Place = Option<(PeerId, u64, usize)>;
        let mut replica_place: Vec<Option<Place>> = Vec::new();
        let mut by_replica: Vec<(u32, i64, u64)> = Vec::new();
        let mut newest: Vec<(u64, std::cmp::Reverse<u64>, usize, std::ops::Range<usize>)> = Vec::new();
        let mut sums: Vec<(i64, u64)> = Vec::new();
        // Per peer, the last key a replica of its node was found for (to tell a node with
        // two incarnations among a key's writers).
        let (mut seen, mut seen_key) = (vec![0u64; peers.len()], 0u64);
        for counts in exported.chunk_by(|a, b| a.key == b.key) {
            let key = counts[0].key;
            sums.clear();
            by_replica.clear();
            for e in counts {
                match sums.iter_mut().find(|s| s.0 == e.window) {
                    Some(s) => s.1 = s.1.saturating_add(e.count),
                    None => sums.push((e.window, e.count)),
                }
                if e.replica != LOCAL_REPLICA {
                    by_replica.push((e.replica, e.window, e.count));
                }
            }
            sums.retain(|&(window, _)| send(key, window));
            let everyone = to_all(key);
            all.extend(sums.iter().map(|&(window, sum)| (std::cmp::Reverse(window), key, sum, everyone)));
            // Each writer's counts together (a store exports them so but for the windows
            // past the previous one, which follow the rest).
            if !by_replica.is_sorted_by_key(|w| w.0) {
                by_replica.sort_unstable();
            }
            // Per node, its replicas here, newest incarnation first: a total goes to a
            // node, whichever incarnation runs there, so it must leave out the newest
            // one's counts (an older incarnation's are others' to it, as anyone's).
            newest.clear();
            seen_key += 1;
            let mut twice = false;
            let mut at = 0;
            for writer in by_replica.chunk_by(|a, b| a.0 == b.0) {
                let slot = per_replica(&mut replica_place, writer[0].0 as usize, || {
                    self.replica_id(writer[0].0).and_then(|r| Some((r.node, r.incarnation, place(&r.node)?)))
                });
                if let Some((node, incarnation, place)) = slot {
                    twice |= std::mem::replace(&mut seen[place], seen_key) == seen_key;
                    newest.push((node, std::cmp::Reverse(incarnation), place, at..at + writer.len()));
                }
                at += writer.len();
            }
            // A node with more than one incarnation here: its replicas together, newest
            // first. (Otherwise each node is a group of one, and the groups' order does
            // not matter: each fills its own node's list.)
            if twice {
                newest.sort_unstable_by_key(|(node, inc, ..)| (*node, *inc));
            }
            for group in newest.chunk_by(|a, b| a.0 == b.0) {
                let at = group[0].2;
                let p = peers[at].1;
                // Incarnations it has restarted from (or, its clock stepped back, ones
                // above the one it runs as) are others' counts to it.
                let Some((_, _, _, range)) = group.iter().find(|(_, std::cmp::Reverse(inc), ..)| !p.gone(*inc)) else { continue };
                let writer = &by_replica[range.clone()];
                // Its current incarnation's counts, or a later one's not heard from here
                // yet (it restarted): no total that holds them goes to it (0 where the
                // others have none), not even one meant for every peer.
                for &(window, sum) in &sums {
                    let mine = writer.iter().find(|w| w.1 == window).map_or(0, |w| w.2);
                    own[at].push((std::cmp::Reverse(window), key, if p.up { sum.saturating_sub(mine) } else { 0 }));
                }
            }
        }
        // In packing order (already so for keys exported in order, in one window), each
        // peer's own totals too.
        if !all.is_sorted_by_key(|&(window, key, ..)| (window, key)) {
            all.sort_unstable_by_key(|&(window, key, ..)| (window, key));
            for list in &mut own {
                list.sort_unstable_by_key(|&(window, key, _)| (window, key));
            }
        }
        let peers = peers.iter().zip(in_live).zip(own).map(|(((id, p), live), own)| Receiver { id: *id, up: p.up, live, own }).collect();
        Totals { window_ms, all, peers }
    }

    /// Packs and sends every store's `totals` to the peers they reach (with `only`, sorted,
    /// those of them alone).
    fn send_totals(&mut self, mut totals: Vec<Totals>, only: Option<&[PeerId]>) {
        totals.sort_by_key(|t| t.window_ms);
        let me = self.cfg.replica;
        let (mut packing, mut messages) = (Packing::default(), Vec::new());
        let receivers = totals.first().map_or(0, |t| t.peers.len());
        debug_assert!(totals.iter().all(|t| t.peers.iter().map(|r| r.id).eq(totals[0].peers.iter().map(|r| r.id))));
        for at in 0..receivers {
            let to = totals[0].peers[at].id;
            if only.is_some_and(|peers| peers.binary_search(&to).is_err()) || !totals.iter().any(|t| t.reaches(at)) {
                continue;
            }
            let mut n = 0;
            self.pack_sorted(totals.iter().flat_map(|t| t.to(at, me)).inspect(|_| n += 1), true, &mut packing, &mut messages);
            for m in messages.drain(..) {
                self.queue(to, m, false);
            }
            self.stats.totals_sent += n;
        }
    }

    /// Repair by repetition ([`FULL_RESEND_PERIODS`]). [`Resend::Full`]: every count this
    /// node holds to its key's aggregators, and the others' totals of every key this node
    /// aggregates to its writers (and, for the keys it is the first aggregator of, the
    /// total to every other live peer). [`Resend::Partial`]: only the counts it holds of
    /// replicas that do not resend their own. [`Resend::To`]: what a full resend sends
    /// those peers, to them alone.
    fn resend_everything(&mut self, live: &[PeerId], now_ms: i64, resend: Resend<'_>) {
        let me = self.cfg.replica;
        let full = !matches!(resend, Resend::Partial);
        let only = match resend {
            Resend::To(peers) => Some(peers),
            Resend::Full | Resend::Partial => None,
        };
        // Only the totals (not in a partial resend) ask who is silent.
        let silent = if full { self.silent_peers(now_ms) } else { Vec::new() };
        let (mut held, mut totals, mut buf) = (Vec::new(), Vec::new(), Vec::new());
        let windows = self.replica.window_lengths();
        // A store dropped (its limits removed) leaves no pass under way behind.
        self.resend_cursors.retain(|(window_ms, _), _| windows.contains(window_ms));
        for window_ms in windows {
            buf.clear();
            // At most `MAX_RESEND_ENTRIES` counts per store, resuming there next time
            // (a resend to peers heard again starts at the store's beginning).
            let mut fresh = ExportCursor::default();
            let cursor = match only {
                Some(_) => &mut fresh,
                None => self.resend_cursors.entry((window_ms, full)).or_default(),
            };
            if self.replica.export_from(window_ms, cursor, MAX_RESEND_ENTRIES, now_ms, |_| true, &mut buf) {
                *cursor = ExportCursor::default();
            }
            let k = self.cfg.aggregators;
            // Every replica's counts this node holds, its own and (as an aggregator, or one
            // that was) others', including replicas that are gone: a key's new aggregator
            // gets them from whoever held them, so no total leaves them out for good.
            // A partial resend sends only the counts of replicas that are gone (dead, or
            // restarted from): only their holders can. A live peer's current incarnation
            // resends its own counts, and this node's go with what went quiet.
            // Per replica index, its id and whether a partial resend leaves it out.
            let mut ids = Vec::new();
            held.extend(buf.iter().filter_map(|e| {
                let (replica, resent_by_itself) = if e.replica == LOCAL_REPLICA {
                    (me, true)
                } else {
                    per_replica(&mut ids, e.replica as usize, || {
                        let replica = self.replica_id(e.replica)?;
                        Some((replica, self.resends_its_own(replica)))
                    })?
                };
                (full || !resent_by_itself).then_some(Outgoing { window_ms, replica, key: e.key, window: e.window, count: e.count })
            }));
            if !full {
                // Between full resends, totals go out as their keys change.
                continue;
            }
            let mut last = None;
            buf.retain(|e| per_key(&mut last, e.key, || self.ring.aggregates(e.key, k, me.node)));
            // The first aggregator (or a standby, for one gone silent) also tells the
            // members that do not count the key: a node's first request for a client is
            // then decided on a view at most a full resend's interval old, not on none.
            let first = |key: u64| self.ring.publishes_or_stands_in(key, k, me.node, &silent);
            totals.push(self.totals_for(window_ms, &buf, |_, _| true, (only.unwrap_or(live), first)));
        }
        self.route_to_aggregators(held, false, only);
        self.send_totals(totals, only);
    }

    /// At a period between full resends: this node's own counts, and the totals it
    /// published, of the (window length, key, window)s sent since the last period that
    /// have gone quiet (not sent in the latest round they could have been), once more. A
    /// busy key's next count or total supersedes a lost one; a quiet one's would wait for
    /// the full resend. Those still busy wait for the next period.
    fn resend_quiet(&mut self, live: &[PeerId], now_ms: i64) {
        // Own counts of this round are sent before the resend, its totals after.
        let counts = take_quiet(&mut self.sent_counts, self.round);
        let totals = take_quiet(&mut self.sent_totals, self.round.saturating_sub(1));
        let me = self.cfg.replica;
        let (mut held, mut buf) = (Vec::new(), Vec::new());
        // Each store's counts of a group's keys, every replica's, in every window.
        let export = |node: &Self, group: &[(u64, u64, i64)], buf: &mut Vec<Exported>| {
            let mut keys: Vec<u64> = group.iter().map(|c| c.1).collect();
            keys.dedup();
            buf.clear();
            node.replica.export_keys(group[0].0, &keys, now_ms, buf);
        };
        let quiet = |group: &[(u64, u64, i64)], key: u64, window: i64| group.binary_search(&(group[0].0, key, window)).is_ok();
        for group in counts.chunk_by(|a, b| a.0 == b.0) {
            let window_ms = group[0].0;
            export(self, group, &mut buf);
            held.extend(buf.iter().filter(|e| e.replica == LOCAL_REPLICA && quiet(group, e.key, e.window)).map(|e| Outgoing {
                window_ms,
                replica: me,
                key: e.key,
                window: e.window,
                count: e.count,
            }));
        }
        self.route_to_aggregators(held, false, None);
        let mut sums = Vec::new();
        for group in totals.chunk_by(|a, b| a.0 == b.0) {
            export(self, group, &mut buf);
            sums.push(self.totals_for(group[0].0, &buf, |key, window| quiet(group, key, window), (live, |_| true)));
        }
        self.send_totals(sums, None);
    }

    /// Aggregated dissemination: the silence, in rounds, after which a peer heard again
    /// gets a resend, and the fewest rounds between two such resends: an anti-entropy
    /// period, and at least [`MIN_HEAL_ROUNDS`].
    fn heal_rounds(&self) -> u64 {
        self.cfg.anti_entropy_rounds.max(MIN_HEAL_ROUNDS)
    }

    /// Whether `replica` resends its own counts: a live peer's current incarnation.
    fn resends_its_own(&self, replica: ReplicaId) -> bool {
        self.peers.get(&replica.node).is_some_and(|p| p.up && p.incarnation == Some(replica.incarnation))
    }

    /// Whether this node holds counts of a replica that does not resend them itself:
    /// those only their holders resend, every period.
    fn holds_counts_not_resent_by_their_replica(&self) -> bool {
        self.replicas.iter().flatten().any(|r| !self.resends_its_own(r.id))
    }

    /// A clock sample asked of `to` (its answer also counts as hearing from it).
    fn send_ping(&mut self, to: PeerId, now_ms: i64) {
        if let Some(p) = self.peers.get_mut(&to) {
            p.ping_sent_ms = Some(now_ms);
        }
        self.send(to, Body::Ping { sent_at_ms: now_ms, echo: None }, false);
    }

    /// Answers a peer's ping, or takes its answer to ours as a clock sample.
    fn answer_ping(&mut self, from: PeerId, sent_at_ms: i64, echo: Option<(i64, u32)>, now_ms: i64) {
        match echo {
            None => {
                // Replies are sent at once: the hold time is zero in virtual time, and a
                // driver's queueing shows up as round-trip time.
                let body = Body::Ping { sent_at_ms: now_ms, echo: Some((sent_at_ms, 0)) };
                self.send(from, body, false);
            }
            Some((t1, hold)) => {
                // Only an answer to our outstanding ping counts (a peer cannot make up
                // samples). t1: our send; t2 = t3 - hold: their receipt; t3: their
                // reply; t4: now. All within ±2⁵⁰ (checked at decoding): no overflow.
                let Some(p) = self.peers.get_mut(&from) else { return };
                if p.ping_sent_ms != Some(t1) {
                    return;
                }
                p.ping_sent_ms = None;
                let (t3, t4) = (sent_at_ms, now_ms.clamp(-codec::MAX_ABS_TIME, codec::MAX_ABS_TIME));
                let t2 = t3 - i64::from(hold);
                let rtt = (t4 - t1) - i64::from(hold);
                let offset = ((t2 - t1) + (t3 - t4)) / 2;
                p.rtt_ms = Some(rtt.max(0));
                p.clock_offset_ms = Some(offset);
                self.clock.record(from, offset, rtt);
            }
        }
    }

    fn send_limits(&mut self, to: PeerId) {
        if let (version, Some(config)) = self.replica.limits() {
            self.send(to, Body::Limits { version, config }, true);
        }
    }

    /// Sends `to` everything this node holds: the limits at once, the counts in steps
    /// within the per-round export budget, now and in the rounds that follow.
    /// [`Event::FullSyncSent`] says when the last of it is queued. A full sync replaces
    /// the repairs waiting for `to` (it covers them) and restarts one under way.
    fn send_everything(&mut self, to: PeerId, now_ms: i64) {
        self.send_limits(to);
        let jobs = self.sync_jobs();
        let Some(p) = self.peers.get_mut(&to) else { return };
        p.last_sync_answered_ms = Some(now_ms);
        p.sync_lossy = false;
        p.jobs.clear();
        p.jobs.extend(jobs);
        self.stats.full_syncs_sent += 1;
        self.step_repairs(to, now_ms);
    }

    /// A full sync to a peer, per store: with aggregated dissemination, from a member of
    /// the ring, first the others' totals of the keys this node is the first aggregator
    /// of and the peer does not aggregate, then every count this node holds of the keys
    /// the peer aggregates; otherwise every count. The sync-done marker follows the totals too, so
    /// a member that joins has the ring's totals before `Cluster::start` returns, whether
    /// it ranks into the pool or not.
    fn sync_jobs(&self) -> Vec<RepairJob> {
        let aggregated = self.aggregated();
        let totals = aggregated && self.in_ring();
        let mut jobs = Vec::new();
        for window_ms in self.replica.window_lengths() {
            if totals {
                jobs.push(RepairJob { window_ms, wanted: Wanted::Totals, cursor: ExportCursor::default() });
            }
            jobs.push(RepairJob::full_sync(window_ms, aggregated));
        }
        jobs
    }

    /// Fingerprints per replica and bucket of one store's counts in the `span` windows
    /// ending with `window`.
    /// `fresh`: computed in this round (this node's own digests); else computed in this
    /// anti-entropy period (answers to peers' digests: a stale fingerprint costs at most
    /// a needless repair, which the merge makes harmless).
    fn fingerprints(
        &mut self,
        window_ms: u64,
        (window, span): (i64, u8),
        now_ms: i64,
        fresh: bool,
    ) -> BTreeMap<ReplicaId, [u64; DIGEST_BUCKETS]> {
        let max_age = if fresh { 0 } else { self.round % self.cfg.anti_entropy_rounds };
        let computed = self.fingerprint_cache.stores.get(&window_ms).map(|(round, _)| *round);
        if computed.is_none_or(|r| self.round - r > max_age) {
            self.stats.store_passes += 1;
            let mut per_window = Fingerprints::new();
            let mut buf: Vec<Exported> = Vec::new();
            // Never create a store for a window length named only by a peer's digest.
            self.replica.export(window_ms, now_ms, |_| true, &mut buf);
            for e in &buf {
                let Some(replica) = self.replica_id(e.replica) else { continue };
                let row = per_window.entry((replica, e.window)).or_default();
                row[bucket(e.key)] =
                    row[bucket(e.key)].wrapping_add(splitmix64(e.key ^ splitmix64((e.window as u64) ^ e.count.rotate_left(32))));
            }
            self.fingerprint_cache.stores.insert(window_ms, (self.round, per_window));
        }
        let mut rows: BTreeMap<ReplicaId, [u64; DIGEST_BUCKETS]> = BTreeMap::new();
        let (_, per_window) = &self.fingerprint_cache.stores[&window_ms];
        for (&(replica, w), fingerprints) in per_window {
            if w <= window && w > window - i64::from(span) {
                let row = rows.entry(replica).or_default();
                for (r, f) in row.iter_mut().zip(fingerprints) {
                    *r = r.wrapping_add(*f);
                }
            }
        }
        rows
    }

    /// Digests of every store to `to`; `both_windows`: include the current window.
    fn send_digests(&mut self, to: PeerId, now_ms: i64, both_windows: bool) {
        let now_ms = self.cluster_ms(now_ms);
        let windows = self.replica.window_lengths();
        for window_ms in windows {
            // Every window the store still keeps (a late request may reach it), up to the
            // previous one while busy or the current one once quiet; at most 255.
            // In the store's windows (the sliding log's buckets are shorter than the quota).
            let Some((acceptable, tick_ms)) = self.replica.windows(window_ms, now_ms) else { continue };
            let now_window = now_ms.div_euclid(tick_ms as i64);
            let oldest = *acceptable.start();
            let window = if both_windows { now_window } else { now_window - 1 };
            let span = (window - oldest + 1).clamp(1, 255) as u8;
            let rows: Vec<DigestRow> = self
                .fingerprints(window_ms, (window, span), now_ms, true)
                .into_iter()
                .map(|(replica, buckets)| DigestRow { replica, buckets })
                .collect();
            // Rows are ~80 bytes: keep each digest within the message budget.
            let per_message = (self.cfg.max_message_bytes / 96).max(1);
            let limits = self.replica.limits_version();
            let complete = rows.len() <= per_message;
            for chunk in rows.chunks(per_message) {
                self.stats.digests_sent += 1;
                let body = Body::Digest { window_ms: window_ms as u32, window, span, rows: chunk.to_vec(), limits, complete };
                self.send(to, body, false);
            }
        }
    }

    fn answer_digest(&mut self, from: PeerId, window_ms: u64, windows: (i64, u8), rows: &[DigestRow], complete: bool, now_ms: i64) {
        let mine = self.fingerprints(window_ms, windows, now_ms, false);
        let theirs: BTreeMap<ReplicaId, [u64; DIGEST_BUCKETS]> = rows.iter().map(|r| (r.replica, r.buckets)).collect();
        // A digest may be split over several messages: compare the replicas it names, and
        // only a complete digest says the sender lacks the replicas it does not name.
        let mut wanted: Vec<(ReplicaId, u8)> = Vec::new();
        for (replica, theirs) in &theirs {
            let ours = mine.get(replica).copied().unwrap_or_default();
            let mask = (0..DIGEST_BUCKETS).filter(|&b| ours[b] != theirs[b]).fold(0u8, |m, b| m | (1 << b));
            if mask != 0 {
                wanted.push((*replica, mask));
            }
        }
        for (replica, ours) in &mine {
            if complete && !theirs.contains_key(replica) && ours.iter().any(|&f| f != 0) {
                wanted.push((*replica, 0xFF));
            }
        }
        if wanted.is_empty() {
            return;
        }
        self.stats.buckets_repaired += wanted.iter().map(|(_, m)| u64::from(m.count_ones())).sum::<u64>();
        self.answer_repair(from, window_ms, &wanted, now_ms);
        // A replica and its mask take at most 19 bytes: split the request to fit both the
        // message budget and what a receiver decodes.
        let per_message = ((self.cfg.max_message_bytes - 32) / 19).clamp(1, codec::MAX_DIGEST_ROWS);
        for chunk in wanted.chunks(per_message) {
            let body = Body::Repair { window_ms: window_ms as u32, wanted: chunk.to_vec() };
            self.send(from, body, true);
        }
    }

    /// Queues the counts of `wanted` for `to`, exported in steps: at most
    /// [`MAX_REPAIR_ENTRIES_PER_ROUND`] per round (plus one key's), now and in the rounds
    /// that follow.
    fn answer_repair(&mut self, to: PeerId, window_ms: u64, wanted: &[(ReplicaId, u8)], now_ms: i64) {
        if !self.replica.has_store(window_ms) {
            return; // never create a store for a window length named by a peer
        }
        let Some(p) = self.peers.get_mut(&to) else { return };
        let mut masks: BTreeMap<ReplicaId, u8> = BTreeMap::new();
        for &(r, m) in wanted.iter().filter(|(_, m)| *m != 0) {
            *masks.entry(r).or_default() |= m;
        }
        if masks.is_empty() {
            return;
        }
        // A full sync under way may have passed the shards a repair names: repairs queue
        // behind it, on their own budget.
        let waiting = p.jobs.iter().filter(|j| !j.wanted.is_sync()).count();
        let joinable = p.jobs.iter_mut().filter(|j| j.window_ms == window_ms && j.cursor == ExportCursor::default()).find_map(|j| {
            match &mut j.wanted {
                Wanted::Buckets(w) => Some(w),
                _ => None,
            }
        });
        if let Some(wanted) = joinable {
            for (r, m) in masks {
                *wanted.entry(r).or_default() |= m;
            }
        } else if waiting < MAX_REPAIR_JOBS {
            p.jobs.push_back(RepairJob { window_ms, wanted: Wanted::Buckets(masks), cursor: ExportCursor::default() });
        } else {
            self.stats.repairs_dropped += 1;
            self.push_event(Event::Refused { peer: to, reason: Refusal::RepairQueue });
            return;
        }
        self.step_repairs(to, now_ms);
    }

    /// Exports the next chunk of `to`'s waiting repairs, within this round's budget.
    fn step_repairs(&mut self, to: PeerId, now_ms: i64) {
        let (mut out, mut totals): (Vec<Outgoing>, Vec<Outgoing>) = (Vec::new(), Vec::new());
        let mut buf: Vec<Exported> = Vec::new();
        let mut sync_done = false;
        let dropped_before = self.stats.outbox_dropped;
        // Only a job of totals asks who is silent (once per call).
        let mut silent = None;
        loop {
            let Some(p) = self.peers.get_mut(&to) else { return };
            let budget = MAX_REPAIR_ENTRIES_PER_ROUND.saturating_sub(p.exported_this_round);
            if budget == 0 {
                break;
            }
            let Some(mut job) = p.jobs.pop_front() else { break };
            if matches!(job.wanted, Wanted::Totals) && silent.is_none() {
                silent = Some(self.silent_peers(now_ms));
            }
            let silent = silent.as_deref().unwrap_or_default();
            let any_bucket = match &job.wanted {
                Wanted::Buckets(w) => w.values().fold(0u8, |m, b| m | b),
                Wanted::All | Wanted::Aggregated | Wanted::Totals => 0xFF,
            };
            buf.clear();
            let (ring, k, me) = (&self.ring, self.cfg.aggregators, self.cfg.replica.node);
            let wanted = &job.wanted;
            // Aggregated dissemination: the keys `to` aggregates, or the others whose
            // totals this node publishes.
            let select = |key: u64| {
                any_bucket & (1 << bucket(key)) != 0
                    && match wanted {
                        Wanted::Aggregated => ring.aggregates(key, k, to),
                        Wanted::Totals => ring.publishes_or_stands_in(key, k, me, silent) && !ring.aggregates(key, k, to),
                        Wanted::Buckets(_) | Wanted::All => true,
                    }
            };
            let done = self.replica.export_from(job.window_ms, &mut job.cursor, budget, now_ms, select, &mut buf);
            let sent = match &job.wanted {
                // Totals are charged as sent (about one per key and window, out of every
                // writer's counts looked at).
                Wanted::Totals => {
                    let all = self.totals_for(job.window_ms, &buf, |_, _| true, (&[to], |_| true));
                    // `totals_for` also gives the keys' writers theirs: only `to`'s go.
                    let at = all.peers.binary_search_by_key(&to, |p| p.id);
                    let before = totals.len();
                    totals.extend(at.into_iter().flat_map(|at| all.to(at, self.cfg.replica)));
                    totals.len() - before
                }
                wanted => {
                    out.extend(buf.iter().filter_map(|e| {
                        let replica = self.replica_id(e.replica)?;
                        let in_bucket = match wanted {
                            Wanted::Buckets(w) => w.get(&replica).is_some_and(|m| m & (1 << bucket(e.key)) != 0),
                            _ => true,
                        };
                        in_bucket.then_some(Outgoing { window_ms: job.window_ms, replica, key: e.key, window: e.window, count: e.count })
                    }));
                    buf.len()
                }
            };
            // A step that stops before the store's end may have looked at up to 16 slots
            // per count of the budget, whatever it found: at least its share.
            let share = if done { 1 } else { MAX_REPAIR_ENTRIES_PER_ROUND / MAX_EXPORT_PASSES_PER_ROUND };
            let Some(p) = self.peers.get_mut(&to) else { return };
            p.exported_this_round += sent.max(share);
            if !done {
                p.jobs.push_front(job);
            } else if job.wanted.is_sync() && !p.jobs.iter().any(|j| j.wanted.is_sync()) {
                sync_done = true;
            }
        }
        if !totals.is_empty() {
            self.stats.totals_sent += totals.len() as u64;
            for m in self.pack(&mut totals, true) {
                self.queue(to, m, true);
            }
        }
        if !out.is_empty() {
            self.stats.entries_sent += out.len() as u64;
            for m in self.pack(&mut out, false) {
                self.queue(to, m, true);
            }
        }
        let lossy = self.stats.outbox_dropped > dropped_before;
        let Some(p) = self.peers.get_mut(&to) else { return };
        if lossy && (sync_done || p.jobs.iter().any(|j| j.wanted.is_sync())) {
            p.sync_lossy = true;
        }
        if sync_done && std::mem::take(&mut p.sync_lossy) {
            // Part of it never left: send it all again rather than announce it complete.
            let jobs = self.sync_jobs();
            let Some(p) = self.peers.get_mut(&to) else { return };
            p.jobs.extend(jobs);
        } else if sync_done {
            self.push_event(Event::FullSyncSent { peer: to });
        }
    }
}

/// Whether a peer heard from as `incarnation` is news for this node's SWIM to spread by
/// infection: a member that joined while SWIM ran here (`swim_started`) or restarted,
/// and started after this node did (`own`: incarnations are start times), so that a
/// newcomer does not gossip the members it meets, nor any member those known when its
/// SWIM started (every member hears from them first hand too). A healed member foca
/// knows already (as down): its refutation spreads instead. Clocks decide "after": a
/// peer whose clock is behind by more than the time between the two starts is not
/// gossiped here, and the transport announces it instead ([`GossipNode::gossips`]).
fn news(p: &Peer, incarnation: u64, swim_started: bool, own: u64) -> bool {
    let incarnation = p.incarnation.map_or(incarnation, |i| i.max(incarnation));
    swim_started && incarnation > own && (p.last_heard_ms.is_some() || p.joined_in_swim)
}

fn bucket(key: u64) -> usize {
    (key >> 61) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Admission, ManualClock, Quota, Strategy};
    use std::time::Duration;

    const T0: i64 = 1_700_000_000_000;

    fn node(id: u64, peers: &[u64]) -> GossipNode {
        node_with(id, peers, 10, Admission::Optimistic)
    }

    /// A deterministic stream of well-mixed numbers.
    fn numbers_from(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed = splitmix64(seed);
            seed
        }
    }

    /// The ring's slice index finds the same aggregators as a search of every point,
    /// from rings of 0 to 700 members (1 to 16 index bits) and keys hashing anywhere.
    #[test]
    fn the_rings_slice_index_finds_what_a_search_of_all_points_finds() {
        let mut next = numbers_from(7u64);
        for members in [0, 1, 2, 3, 17, 100, 300, 700] {
            let ids: Vec<PeerId> = (0..members).map(|_| next()).collect();
            let ring = Ring::new(ids.clone());
            for i in 0..2_000u64 {
                let key = if i < 2 { [0, u64::MAX][i as usize] } else { next() };
                let h = splitmix64(key ^ 0x5EED_0A66);
                let start = ring.points.partition_point(|p| p.0 < h);
                let mut want = Vec::new();
                for j in 0..ring.points.len() {
                    let m = ring.points[(start + j) % ring.points.len()].1;
                    if want.len() < 3.min(members) && !want.contains(&m) {
                        want.push(m);
                    }
                }
                assert_eq!(ring.aggregators(key, 3).as_slice(), &want[..], "{members} members, key {key}");
            }
        }
    }

    /// A ring changed by members coming and going, a few or many at a time, is the ring
    /// built anew from its members.
    #[test]
    fn a_ring_changed_member_by_member_is_the_ring_built_anew() {
        let mut next = numbers_from(11u64);
        let mut ring = Ring::new(Vec::new());
        let mut members: Vec<PeerId> = Vec::new();
        for step in 0..400u64 {
            // Mostly one member coming, now and then two; every fifth step one going; now
            // and then many.
            match step % 5 {
                _ if step == 200 => members.clear(),
                _ if step % 97 == 0 => members.retain(|_| next() % 3 != 0),
                _ if step % 41 == 0 && !members.is_empty() => {
                    // One going and one coming in the same change.
                    members.remove((next() % members.len() as u64) as usize);
                    members.push(next() % 1_000);
                }
                4 if !members.is_empty() => drop(members.remove((next() % members.len() as u64) as usize)),
                3 => members.extend([next() % 1_000, next() % 1_000]),
                _ => members.push(next() % 1_000),
            }
            members.sort_unstable();
            members.dedup();
            ring.set_members(members.clone());
            let anew = Ring::new(members.clone());
            assert_eq!(
                (&ring.points, &ring.members, &ring.starts, ring.bits),
                (&anew.points, &anew.members, &anew.starts, anew.bits),
                "step {step}"
            );
        }
        assert!(members.len() > 50, "{} members", members.len());
    }

    fn node_with(id: u64, peers: &[u64], limit: u64, admission: Admission) -> GossipNode {
        node_in_window(id, peers, limit, Duration::from_secs(1), admission)
    }

    fn node_in_window(id: u64, peers: &[u64], limit: u64, window: Duration, admission: Admission) -> GossipNode {
        let limiter = limiter_in_window(limit, window, admission);
        GossipNode::new(limiter, GossipConfig::new(ReplicaId { node: id, incarnation: 1 }), peers.iter().copied(), id, T0).unwrap()
    }

    fn limiter_in_window(limit: u64, window: Duration, admission: Admission) -> RateLimiter {
        RateLimiter::builder()
            .quota(Quota::new(limit, window).unwrap())
            .strategy(Strategy::FixedWindow)
            .admission(admission)
            .clock(ManualClock::new(T0))
            .hash_secret([7; 16])
            .build()
            .unwrap()
    }

    /// An empty `Counts` message from `node` (incarnation 1).
    fn heartbeat(node: u64) -> Vec<u8> {
        codec::encode(&Envelope::new(ReplicaId { node, incarnation: 1 }, Body::Counts(Vec::new()))).unwrap()
    }

    /// Hears a heartbeat from every peer, runs a round 20 ms on, and returns what it sent.
    fn round_heard_from(n: &mut GossipNode, peers: &[u64], t: &mut i64) -> Vec<Transmit> {
        for &p in peers {
            n.handle_message(p, &heartbeat(p), *t).unwrap();
        }
        *t += 20;
        n.handle_timeout(*t);
        std::iter::from_fn(|| n.poll_transmit()).collect()
    }

    /// Node 1 aggregating among `peers` (a 60 s window), after four rounds, holding
    /// member 2's counts of `keys` keys (1 each); and the time.
    fn aggregating_with_counts_of_member_2(peers: &[u64], keys: u64) -> (GossipNode, i64) {
        aggregating_in_pool_with_counts_of_member_2(peers, keys, GossipConfig::new(ReplicaId { node: 1, incarnation: 1 }).aggregator_pool)
    }

    /// The same with an `aggregator_pool` of `pool`.
    fn aggregating_in_pool_with_counts_of_member_2(peers: &[u64], keys: u64, pool: usize) -> (GossipNode, i64) {
        let limiter = limiter_in_window(1_000_000, Duration::from_secs(60), Admission::Optimistic);
        let mut cfg = GossipConfig::new(ReplicaId { node: 1, incarnation: 1 });
        cfg.aggregator_pool = pool;
        let mut n = GossipNode::new(limiter, cfg, peers.iter().copied(), 1, T0).unwrap();
        let mut t = T0;
        for _ in 0..4 {
            round_heard_from(&mut n, peers, &mut t);
        }
        assert!(n.aggregating());
        let member = ReplicaId { node: 2, incarnation: 1 };
        for part in 0..keys.div_ceil(5_000) {
            let entries = (part * 5_000..keys.min((part + 1) * 5_000))
                .map(|i| WireEntry { key: splitmix64(i + 1).to_le_bytes(), window_offset: 0, count: 1 })
                .collect();
            let batch = Batch { replica: member, window_ms: 60_000, base_window: t / 60_000, entries };
            n.handle_message(2, &codec::encode(&Envelope::new(member, Body::Counts(vec![batch]))).unwrap(), t).unwrap();
        }
        (n, t)
    }

    /// Member 2 and the first 38 peers that rank after node 1 and member 2 for the pool.
    fn member_2_and_38_ranking_after_1_and_2() -> Vec<u64> {
        let mut peers = vec![2];
        peers.extend((3..).filter(|&id| pool_rank(id) > pool_rank(1).max(pool_rank(2))).take(38));
        peers
    }

    /// A step back of the clock neither stops the rounds until the clock catches up nor
    /// keeps a silent peer up for the step's length: the schedule moves back with it.
    #[test]
    fn after_the_clock_steps_back_rounds_go_on_and_silence_is_measured_from_the_step() {
        let mut n = node(1, &[2, 3]);
        let mut t = T0;
        while t < T0 + 1_000 {
            round_heard_from(&mut n, &[2, 3], &mut t);
        }
        assert_eq!(n.live_peers().count(), 2);
        // Five seconds back; peer 2 goes on, peer 3 falls silent.
        let stepped = t - 5_000;
        let mut rounds_with_messages = 0;
        let mut t = stepped;
        while t < stepped + 400 {
            let sent = round_heard_from(&mut n, &[2], &mut t);
            rounds_with_messages += usize::from(sent.iter().any(|tr| tr.to == 2));
        }
        assert_eq!(rounds_with_messages, 20, "a round every 20 ms after the step");
        assert_eq!(n.live_peers().collect::<Vec<_>>(), vec![2], "peer 3 down within the suspicion period of the step");
    }

    /// A full sync whose selection finds nothing in a large store (the keys a member
    /// outside the pool aggregates: none) still takes its steps within the per-round
    /// budget: at most `MAX_EXPORT_PASSES_PER_ROUND` steps a round, not a pass over the
    /// whole store in one round because each step was charged only what it sent.
    #[test]
    fn a_full_sync_that_selects_nothing_of_a_large_store_is_spread_over_rounds() {
        // Two members that rank before node 1 in a pool of 2: node 1 is outside the ring
        // (no totals to send), and so is the newcomer.
        let mut peers = member_2_and_38_ranking_after_1_and_2();
        peers.extend((3..).filter(|&id| pool_rank(id) < pool_rank(1)).take(2));
        let (mut n, mut t) = aggregating_in_pool_with_counts_of_member_2(&peers, 700_000, 2);
        let newcomer = (3..).find(|&id| pool_rank(id) > pool_rank(1).max(pool_rank(2)) && !peers.contains(&id)).unwrap();
        assert!(!n.ring.members.contains(&1) && !n.ring.members.contains(&newcomer));
        n.add_peer(newcomer);
        let is_marker = |e: &Event| matches!(e, Event::FullSyncSent { peer } if *peer == newcomer);
        n.handle_message(newcomer, &heartbeat(newcomer), t).unwrap();
        std::iter::from_fn(|| n.poll_transmit()).for_each(drop);
        assert!(!std::iter::from_fn(|| n.poll_event()).any(|e| is_marker(&e)), "the whole store passed over in one round");
        // It ends in the rounds that follow (700,000 keys: about a million table slots).
        for round in 1.. {
            t += 20;
            n.handle_timeout(t);
            std::iter::from_fn(|| n.poll_transmit()).for_each(drop);
            if std::iter::from_fn(|| n.poll_event()).any(|e| is_marker(&e)) {
                break;
            }
            assert!(round < 10, "the sync never ends");
        }
    }

    /// A member outside the ring that comes up (a newcomer, or one that restarted or
    /// healed) gets from each ring member, as part of its full sync and before the
    /// sync-done marker, the totals of every key that member publishes: reliably, within
    /// the per-round export budget, however many rounds that takes. (Before, they went
    /// once as datagrams next to the sync, after the marker was queued.)
    #[test]
    fn a_member_outside_the_ring_gets_its_totals_in_its_full_sync_before_the_sync_done_marker() {
        // Member 2 and peers that rank after node 1, in a pool of 2: node 1 publishes about
        // half of the keys, more totals than one round's budget.
        let peers = member_2_and_38_ranking_after_1_and_2();
        let keys = (MAX_REPAIR_ENTRIES_PER_ROUND * 3) as u64;
        let (mut n, mut t) = aggregating_in_pool_with_counts_of_member_2(&peers, keys, 2);
        assert!(n.ring.members.contains(&1) && n.ring.members.len() == n.cfg.aggregator_pool, "node 1 is in a full pool");
        let worst = n.ring.members.iter().map(|&m| pool_rank(m)).max().unwrap();
        let newcomer = (1_000..).find(|&id| pool_rank(id) > worst).unwrap();
        let k = n.cfg.aggregators;
        let published = (0..keys).filter(|&i| n.ring.publishes(splitmix64(i + 1), k, 1)).count();
        assert!(published > 1_000, "node 1 publishes {published} of the keys");
        n.add_peer(newcomer);
        let mut everyone = peers.clone();
        everyone.push(newcomer);
        let reliable_totals = |transmits: &[Transmit]| -> usize {
            let to_it = transmits.iter().filter(|tr| tr.to == newcomer && tr.reliable);
            to_it
                .map(|tr| match codec::decode(&tr.bytes).unwrap().body {
                    Body::Totals(batches) => batches.iter().map(|b| b.entries.len()).sum(),
                    _ => 0,
                })
                .sum()
        };
        let is_marker = |e: &Event| matches!(e, Event::FullSyncSent { peer } if *peer == newcomer);
        // It comes up: the first step of its full sync goes at once, and is not all of it.
        n.handle_message(newcomer, &heartbeat(newcomer), t).unwrap();
        let mut totals = reliable_totals(&std::iter::from_fn(|| n.poll_transmit()).collect::<Vec<_>>());
        assert!(totals > 0 && totals < published, "{totals} of {published} totals in the first step");
        assert!(totals <= MAX_REPAIR_ENTRIES_PER_ROUND + 1, "{totals} totals in the first step");
        assert!(!std::iter::from_fn(|| n.poll_event()).any(|e| is_marker(&e)), "no marker before the rest");
        let mut steps = 1;
        let done = loop {
            let sent = reliable_totals(&round_heard_from(&mut n, &everyone, &mut t));
            assert!(sent <= MAX_REPAIR_ENTRIES_PER_ROUND + 1, "{sent} totals in one round");
            totals += sent;
            steps += 1;
            if std::iter::from_fn(|| n.poll_event()).any(|e| is_marker(&e)) {
                break totals;
            }
            assert!(steps < 50, "no sync-done marker after {steps} rounds ({totals} totals sent)");
        };
        assert!(!n.ring.members.contains(&newcomer), "the newcomer stays outside the pool");
        assert_eq!(done, published, "every published key's total, before the marker");
    }

    /// A member that comes up into the ring (it ranks into the pool) gets from a ring
    /// member's full sync the totals of exactly the keys that member publishes and it
    /// does not aggregate: those it aggregates come as counts in the same sync.
    #[test]
    fn a_member_in_the_ring_gets_totals_of_exactly_the_published_keys_it_does_not_aggregate() {
        // Member 2 and peers that rank after node 1 and 2, in a pool of 3: the ring is
        // node 1, member 2 and the best of the rest, until a newcomer that outranks them.
        let peers = member_2_and_38_ranking_after_1_and_2();
        let best = peers[1..].iter().map(|&id| pool_rank(id)).min().unwrap();
        let newcomer = (1_000..).find(|&id| pool_rank(id) < best).unwrap();
        let keys = 3_000u64;
        let (mut n, mut t) = aggregating_in_pool_with_counts_of_member_2(&peers, keys, 3);
        n.add_peer(newcomer);
        n.handle_message(newcomer, &heartbeat(newcomer), t).unwrap();
        assert!(n.ring.members.contains(&newcomer) && n.ring.members.contains(&1), "{:?}", n.ring.members);
        let k = n.cfg.aggregators;
        let expected: BTreeSet<u64> = (0..keys)
            .map(|i| splitmix64(i + 1))
            .filter(|&key| n.ring.publishes(key, k, 1) && !n.ring.aggregates(key, k, newcomer))
            .collect();
        let (mut got, mut counts) = (BTreeSet::new(), 0);
        let mut everyone = peers.clone();
        everyone.push(newcomer);
        let mut transmits: Vec<Transmit> = std::iter::from_fn(|| n.poll_transmit()).collect();
        for _ in 0..10 {
            for tr in transmits.iter().filter(|tr| tr.to == newcomer && tr.reliable) {
                match codec::decode(&tr.bytes).unwrap().body {
                    Body::Totals(batches) => got.extend(batches.iter().flat_map(|b| b.entries.iter().map(|e| u64::from_le_bytes(e.key)))),
                    Body::Counts(batches) => counts += batches.iter().map(|b| b.entries.len()).sum::<usize>(),
                    _ => {}
                }
            }
            if std::iter::from_fn(|| n.poll_event()).any(|e| matches!(e, Event::FullSyncSent { peer } if peer == newcomer)) {
                break;
            }
            transmits = round_heard_from(&mut n, &everyone, &mut t);
        }
        assert!(!expected.is_empty() && expected.len() < keys as usize / 2, "{} keys published and not the newcomer's", expected.len());
        let (extra, missing) = (got.difference(&expected).count(), expected.difference(&got).count());
        assert!(extra == 0 && missing == 0, "totals in the newcomer's full sync: {extra} keys too many, {missing} missing");
        assert!(counts > 0, "the counts of the keys it aggregates come too");
    }

    /// Node 1 aggregating among peers 2 to 20 (a 60 s window; every member is in the
    /// ring) after four rounds, the time, and a key it publishes the totals of.
    fn aggregating_among_20() -> (GossipNode, i64, u64) {
        let peers: Vec<u64> = (2..=20).collect();
        let limiter = limiter_in_window(1_000, Duration::from_secs(60), Admission::Optimistic);
        let mut n =
            GossipNode::new(limiter, GossipConfig::new(ReplicaId { node: 1, incarnation: 1 }), peers.iter().copied(), 1, T0).unwrap();
        let mut t = T0;
        for _ in 0..4 {
            round_heard_from(&mut n, &peers, &mut t);
        }
        assert!(n.aggregating());
        let k = n.cfg.aggregators;
        let key = (1..).map(splitmix64).find(|&key| n.ring.publishes(key, k, 1)).unwrap();
        (n, t, key)
    }

    /// A `Counts` message from replica (`node`, `incarnation`): its count of `key` in the
    /// 60 s window of time `t`.
    fn count_of(key: u64, t: i64, (node, incarnation): (u64, u64), count: u64) -> Vec<u8> {
        let from = ReplicaId { node, incarnation };
        let entries = vec![WireEntry { key: key.to_le_bytes(), window_offset: 0, count }];
        let batch = Batch { replica: from, window_ms: 60_000, base_window: t / 60_000, entries };
        codec::encode(&Envelope::new(from, Body::Counts(vec![batch]))).unwrap()
    }

    /// The totals of `key` a round sent `to` (the full sync's, reliable, are left out).
    fn round_totals(sent: &[Transmit], to: PeerId, key: u64) -> Vec<u64> {
        sent.iter()
            .filter(|tr| tr.to == to && !tr.reliable)
            .filter_map(|tr| match codec::decode(&tr.bytes).unwrap().body {
                Body::Totals(batches) => Some(batches.into_iter().flat_map(|b| b.entries).filter(|e| e.key == key.to_le_bytes())),
                _ => None,
            })
            .flatten()
            .map(|e| e.count)
            .collect()
    }

    /// A member that restarted with a lower incarnation (its clock stepped back), as the
    /// driver reports it: the totals this node publishes to it leave out the counts of
    /// the incarnation it runs as, and hold those of the higher one that is gone (others'
    /// counts to it now). Before, the gone process's incarnation was taken for the
    /// current one: the total to it held its own counts and left the gone ones out.
    #[test]
    fn totals_to_a_member_restarted_with_a_lower_incarnation_leave_out_its_current_counts() {
        let (mut n, mut t, key) = aggregating_among_20();
        // Member 3 as incarnation 5 counts 7; it restarts as 4 (lower), which counts 2 and
        // is sent a full sync, as any restart; member 2 counts 1.
        n.handle_message(3, &count_of(key, t, (3, 5), 7), t).unwrap();
        n.set_peer_incarnation(3, 4);
        let syncs = n.stats().full_syncs_sent;
        n.handle_message(3, &count_of(key, t, (3, 4), 2), t).unwrap();
        assert_eq!(n.stats().full_syncs_sent, syncs + 1, "a full sync to the restart");
        n.handle_message(2, &count_of(key, t, (2, 1), 1), t).unwrap();
        let sent = round_heard_from(&mut n, &[2], &mut t);
        assert_eq!(round_totals(&sent, 3, key), vec![8], "the others' total to member 3: 7 (gone) + 1, not its own 2");
    }

    /// After a restart with a lower incarnation (10 to 4), a second restart still below
    /// the gone one (as 7) is a new process like any other: it is heard from, and the
    /// totals to it leave out its counts only.
    #[test]
    fn a_second_restart_below_a_gone_incarnation_is_a_new_process() {
        let (mut n, mut t, key) = aggregating_among_20();
        n.handle_message(3, &count_of(key, t, (3, 10), 7), t).unwrap();
        n.set_peer_incarnation(3, 4);
        n.handle_message(3, &count_of(key, t, (3, 4), 2), t).unwrap();
        t += 20;
        n.handle_timeout(t);
        std::iter::from_fn(|| n.poll_transmit()).for_each(drop);
        // It restarts again as 7, still below 10: a higher incarnation than 4.
        n.handle_message(3, &count_of(key, t, (3, 7), 3), t).unwrap();
        n.handle_message(2, &count_of(key, t, (2, 1), 1), t).unwrap();
        assert!(n.live_peers().any(|p| p == 3), "the new process is heard from");
        let sent = round_heard_from(&mut n, &[2], &mut t);
        let to_3 = round_totals(&sent, 3, key);
        assert!(!to_3.is_empty() && to_3.iter().all(|&c| c == 10), "the others' total to member 3: 7 + 2 + 1, not its own 3: {to_3:?}");
    }

    /// A store too large for one resend is passed over whole in consecutive anti-entropy
    /// periods: once a full resend has begun a pass, the periods that follow are full
    /// until it ends (else its parts would come `FULL_RESEND_PERIODS` periods apart).
    #[test]
    fn a_full_pass_over_a_large_store_goes_on_at_every_period_until_it_ends() {
        let peers: Vec<u64> = (2..=21).collect();
        // Member 2's counts of 2.5 resends' worth of keys: three resends.
        let (mut n, mut t) = aggregating_with_counts_of_member_2(&peers, (MAX_RESEND_ENTRIES * 5 / 2) as u64);
        let round = |n: &mut GossipNode, t: &mut i64| drop(round_heard_from(n, &peers, t));
        let under_way = |n: &GossipNode| n.resend_cursors.get(&(60_000, true)).is_some_and(|c| *c != ExportCursor::default());
        let period = n.cfg.anti_entropy_rounds;
        let mut began = None;
        for r in 0..4 * period * FULL_RESEND_PERIODS {
            round(&mut n, &mut t);
            match began {
                None if under_way(&n) => began = Some(r),
                Some(b) if !under_way(&n) => {
                    assert!(r - b <= 2 * period, "a pass begun at round {b} ended at round {r}");
                    return;
                }
                _ => {}
            }
        }
        panic!("no full pass began and ended (began: {began:?})");
    }

    /// Full and partial resends pass over a large store with a place each: a full pass
    /// resends every count it holds of a live member's current incarnation (which partial
    /// resends leave out), however far a partial pass has got when it begins. (Partial
    /// resends run while the node holds counts that only it resends.)
    #[test]
    fn every_full_pass_over_a_large_store_resends_all_it_holds_wherever_partial_passes_are() {
        let peers: Vec<u64> = (2..=21).collect();
        // Member 2's counts of 1.25 resends' worth of keys: two resends, so that a
        // partial pass is half-way at every other period.
        let keys = MAX_RESEND_ENTRIES * 5 / 4;
        let (mut n, mut t) = aggregating_with_counts_of_member_2(&peers, keys as u64);
        let member = ReplicaId { node: 2, incarnation: 1 };
        // And a count of a replica no peer runs, relayed by member 2: only its holders
        // resend it, so partial resends pass over the store too.
        let relayed = ReplicaId { node: 99, incarnation: 1 };
        let entries = vec![WireEntry { key: splitmix64(u64::MAX).to_le_bytes(), window_offset: 0, count: 1 }];
        let batch = Batch { replica: relayed, window_ms: 60_000, base_window: t / 60_000, entries };
        n.handle_message(2, &codec::encode(&Envelope::new(member, Body::Counts(vec![batch]))).unwrap(), t).unwrap();
        assert!(n.holds_counts_not_resent_by_their_replica());
        // Keys of member 2's counts this node sent in the round.
        let round = |n: &mut GossipNode, t: &mut i64| {
            let mut sent = BTreeSet::new();
            for m in round_heard_from(n, &peers, t) {
                if let Ok(Envelope { body: Body::Counts(batches), .. }) = codec::decode(&m.bytes) {
                    sent.extend(batches.iter().filter(|b| b.replica == member).flat_map(|b| b.entries.iter().map(|e| e.key)));
                }
            }
            sent
        };
        let under_way = |n: &GossipNode, full| n.resend_cursors.get(&(60_000, full)).is_some_and(|c| *c != ExportCursor::default());
        let period = n.cfg.anti_entropy_rounds;
        // Each pass's keys, from the round it begins to the round it ends.
        let (mut passes, mut this_pass, mut partial_half_way_at_a_start) = (Vec::new(), None::<BTreeSet<[u8; 8]>>, false);
        for _ in 0..6 * period * FULL_RESEND_PERIODS {
            let partial_before = under_way(&n, false);
            let sent = round(&mut n, &mut t);
            match this_pass.as_mut() {
                None if under_way(&n, true) => {
                    partial_half_way_at_a_start |= partial_before;
                    this_pass = Some(sent);
                }
                Some(keys) => {
                    keys.extend(sent);
                    if !under_way(&n, true) {
                        passes.extend(this_pass.take());
                    }
                }
                None => {}
            }
        }
        assert!(passes.len() >= 3, "{} full passes ended", passes.len());
        let all: BTreeSet<[u8; 8]> = passes.iter().flatten().copied().collect();
        assert_eq!(all.len(), keys, "keys resent");
        for (i, keys) in passes.iter().enumerate() {
            assert_eq!(keys.len(), all.len(), "full pass {i} resent {} of the {} keys", keys.len(), all.len());
        }
        // The case the test is for came up.
        assert!(partial_half_way_at_a_start, "no full pass began while a partial one was half-way");
    }

    /// Peers heard again after a silence, two a round: one resend to them per period,
    /// however many there are (the others wait for the next period). Members cannot make
    /// a node resend more often than every period.
    #[test]
    fn peers_heard_again_round_after_round_get_one_resend_per_period() {
        let peers: Vec<u64> = (2..=21).collect();
        let (mut n, mut t) = aggregating_with_counts_of_member_2(&peers, 100);
        let resends = |n: &GossipNode| n.stats().resends_to_peers_heard_again;
        // It counts every round: its view never goes quiet (which resends everything).
        let round = |n: &mut GossipNode, t: &mut i64, heard: &[u64]| {
            assert!(n.limiter().allow("busy", *t));
            for &p in heard {
                n.handle_message(p, &heartbeat(p), *t).unwrap();
            }
            *t += 20;
            n.handle_timeout(*t);
            while n.poll_transmit().is_some() {}
        };
        let (talking, silent) = peers.split_at(10);
        // 11 rounds without a word from half of them (a period is 10, suspicion longer).
        for _ in 0..11 {
            round(&mut n, &mut t, talking);
        }
        assert_eq!(n.live_peers().count(), peers.len(), "none suspected");
        assert_eq!(resends(&n), 0);
        // Then they speak again, two more each round, for five rounds.
        let mut heard = talking.to_vec();
        for (i, two) in silent.chunks(2).enumerate() {
            heard.extend(two);
            round(&mut n, &mut t, &heard);
            assert_eq!(resends(&n), 1, "after {} of them spoke again", 2 * (i + 1));
        }
        // The eight that waited get theirs once the period has passed.
        let mut more = 0;
        for _ in 0..10 {
            round(&mut n, &mut t, &heard);
            more = resends(&n) - 1;
        }
        assert_eq!(more, 1, "one more resend, to the eight together");
    }

    /// A member's counts that mark more of this node's first-aggregator keys in a round
    /// than `MAX_PUBLISHED_PER_PEER_ROUND`: the rest are published at the next period,
    /// with what went quiet, not at the next full resend.
    #[test]
    fn totals_past_the_publish_budget_go_out_at_the_next_period() {
        let peers: Vec<u64> = (2..=21).collect();
        let (mut n, mut t) = aggregating_with_counts_of_member_2(&peers, 50_000);
        let k = n.cfg.aggregators;
        let mine: BTreeSet<[u8; 8]> =
            (0..50_000u64).map(|i| splitmix64(i + 1)).filter(|&key| n.ring.publishes(key, k, 1)).map(u64::to_le_bytes).collect();
        assert!(mine.len() > MAX_PUBLISHED_PER_PEER_ROUND, "{} keys", mine.len());
        let period = n.cfg.anti_entropy_rounds;
        let mut sent = BTreeSet::new();
        let mut rounds = 0;
        // Until the round before the next period's: the budget's worth at most.
        while n.round % period != period - 1 {
            assert!(n.limiter().allow("busy", t), "its view never goes quiet");
            for m in round_heard_from(&mut n, &peers, &mut t) {
                if let Ok(Envelope { body: Body::Totals(batches), .. }) = codec::decode(&m.bytes) {
                    sent.extend(batches.iter().flat_map(|b| b.entries.iter().map(|e| e.key)).filter(|key| mine.contains(key)));
                }
            }
            rounds += 1;
        }
        assert!(rounds < period);
        // (The budget covers the keys it stands by for too.)
        assert!(sent.len() <= MAX_PUBLISHED_PER_PEER_ROUND && !sent.is_empty(), "{} published in the round of the counts", sent.len());
        // The period's round: the rest, long before the next full resend.
        assert!(n.limiter().allow("busy", t));
        for m in round_heard_from(&mut n, &peers, &mut t) {
            if let Ok(Envelope { body: Body::Totals(batches), .. }) = codec::decode(&m.bytes) {
                sent.extend(batches.iter().flat_map(|b| b.entries.iter().map(|e| e.key)).filter(|key| mine.contains(key)));
            }
        }
        assert_ne!(n.round % (period * FULL_RESEND_PERIODS), 0, "not a full resend");
        assert_eq!(sent.len(), mine.len(), "every first-aggregator key's total");
    }

    /// The notes of what was sent: a (key, window) sent round after round does not fill
    /// the list (kept once when it fills); notes past `MAX_RESEND_ENTRIES` that are
    /// still more than half of it once repeats are dropped do, and then the next resend
    /// is full.
    #[test]
    fn notes_of_what_was_sent_keep_repeats_once_and_overflow_only_on_many_different_ones() {
        let (mut list, mut overflow) = (Vec::new(), false);
        let keys = |from: u64, n: u64| (from..from + n).map(|k| (1000, k, 7)).collect::<Vec<(u64, u64, i64)>>().into_iter();
        for round in 0..(3 * MAX_RESEND_ENTRIES as u64 / 1000) {
            note_sent(&mut list, &mut overflow, keys(0, 1000), round);
        }
        assert!(!overflow && list.len() <= MAX_RESEND_ENTRIES, "{} notes", list.len());
        // The latest sending of each, once: all sent in the last round.
        let last = 3 * MAX_RESEND_ENTRIES as u64 / 1000 - 1;
        assert!(take_quiet(&mut list, last).is_empty());
        assert_eq!(list.len(), 1000);
        assert!(list.iter().all(|s| s.3 == last));
        note_sent(&mut list, &mut overflow, keys(1000, MAX_RESEND_ENTRIES as u64 - 500), last + 1);
        assert!(overflow && list.is_empty(), "past the bound, all different");
        note_sent(&mut list, &mut overflow, keys(0, 1), last + 2);
        assert!(list.is_empty(), "nothing more is noted until a full resend");
    }

    /// `LiveChanged` says the live set or this node's place in it changed, and only then.
    #[test]
    fn live_changed_is_reported_only_when_the_live_set_changes() {
        let mut n = node(1, &[2, 3]);
        let heartbeat = |node: u64| codec::encode(&Envelope::new(ReplicaId { node, incarnation: 1 }, Body::Counts(Vec::new()))).unwrap();
        n.handle_message(2, &heartbeat(2), T0).unwrap();
        let live: Vec<Event> = std::iter::from_fn(|| n.poll_event()).filter(|e| matches!(e, Event::LiveChanged { .. })).collect();
        assert_eq!(live, vec![Event::LiveChanged { live_replicas: 2, index: 0 }]);
        // Node 3 was never up: removing it changes nothing.
        n.remove_peer(3);
        assert!(!std::iter::from_fn(|| n.poll_event()).any(|e| matches!(e, Event::LiveChanged { .. })));
        n.remove_peer(2);
        assert!(std::iter::from_fn(|| n.poll_event()).any(|e| e == Event::LiveChanged { live_replicas: 1, index: 0 }));
    }

    fn counts_from(node: u64, window: i64, key: u64, count: u64) -> Vec<u8> {
        let replica = ReplicaId { node, incarnation: 1 };
        let entries = vec![WireEntry { key: key.to_le_bytes(), window_offset: 0, count }];
        codec::encode(&Envelope::new(replica, Body::Counts(vec![Batch { replica, window_ms: 1000, base_window: window, entries }])))
            .unwrap()
    }

    #[test]
    fn a_count_for_a_future_window_is_dropped_instead_of_wiping_the_present() {
        let mut n = node(1, &[2]);
        let key = n.limiter().key_hash("c");
        for _ in 0..10 {
            assert!(n.limiter().allow("c", T0));
        }
        let w0 = T0 / 1000;
        for window in [w0 + 3, w0 + (1 << 32), w0 - (1 << 32), w0 + (1 << 31)] {
            n.handle_message(2, &counts_from(2, window, key, 1), T0).unwrap();
        }
        assert_eq!(n.stats().out_of_range, 4);
        assert!(!n.limiter().allow("c", T0), "the limit still holds");
        // Within the clock-skew tolerance (2 s) a window ahead is fine.
        n.handle_message(2, &counts_from(2, w0 + 2, key, 1), T0).unwrap();
        assert_eq!(n.stats().out_of_range, 4);
    }

    #[test]
    fn hostile_extreme_values_are_refused_at_decoding_without_panicking() {
        let mut n = node(1, &[2]);
        let from = ReplicaId { node: 2, incarnation: 1 };
        let bodies = [
            Body::Ping { sent_at_ms: i64::MIN, echo: Some((i64::MAX, 5)) },
            Body::Digest { window_ms: 1000, window: i64::MIN, span: 2, rows: Vec::new(), limits: LimitsVersion::default(), complete: true },
            Body::Counts(vec![Batch {
                replica: from,
                window_ms: 1000,
                base_window: i64::MIN,
                entries: vec![WireEntry { key: [1; 8], window_offset: 1, count: 1 }],
            }]),
        ];
        for body in bodies {
            let bytes = codec::encode(&Envelope::new(from, body)).unwrap();
            assert!(matches!(n.handle_message(2, &bytes, T0), Err(MessageError::Decode(_))));
        }
        // An unsolicited echo sets no clock estimate.
        let bytes = codec::encode(&Envelope::new(from, Body::Ping { sent_at_ms: T0, echo: Some((T0 - 5, 0)) })).unwrap();
        n.handle_message(2, &bytes, T0).unwrap();
        assert_eq!(n.peer_stats()[0].clock_offset_ms, None);
    }

    #[test]
    fn an_aggregator_pool_smaller_than_the_aggregators_per_key_is_refused() {
        let limiter = || RateLimiter::new(10, Duration::from_secs(1)).unwrap();
        let mut cfg = GossipConfig::new(ReplicaId { node: 1, incarnation: 1 });
        (cfg.aggregators, cfg.aggregator_pool) = (3, 2);
        let refused = GossipNode::new(limiter(), cfg.clone(), [2], 1, T0);
        assert!(matches!(refused, Err(ConfigError::Invalid { field: "aggregator_pool", .. })));
        cfg.aggregator_pool = 3;
        assert!(GossipNode::new(limiter(), cfg, [2], 1, T0).is_ok());
    }

    #[test]
    fn a_limiter_serves_one_gossip_node_at_a_time() {
        let n = node(1, &[2]);
        let limiter = n.limiter().clone();
        let second = GossipNode::new(limiter.clone(), GossipConfig::new(ReplicaId { node: 1, incarnation: 2 }), [2], 1, T0);
        assert!(matches!(second, Err(ConfigError::Invalid { field: "limiter", .. })));
        drop(n);
        assert!(GossipNode::new(limiter, GossipConfig::new(ReplicaId { node: 1, incarnation: 2 }), [2], 1, T0).is_ok());
    }

    #[test]
    fn allow_with_counts_for_the_default_window_are_replicated_into_the_default_counters() {
        let mut a = node(1, &[2]);
        let mut b = node(2, &[1]);
        for _ in 0..6 {
            assert!(a.limiter().allow_with("c", 10, Duration::from_secs(1)));
        }
        for t in [T0 + 20, T0 + 40] {
            a.handle_timeout(t);
            b.handle_timeout(t);
            while let Some(m) = a.poll_transmit() {
                let _ = b.handle_message(1, &m.bytes, t + 1);
            }
            while let Some(m) = b.poll_transmit() {
                let _ = a.handle_message(2, &m.bytes, t + 1);
            }
        }
        let admitted = (0..10).filter(|_| b.limiter().allow_with("c", 10, Duration::from_secs(1))).count();
        assert_eq!(admitted, 4);
    }

    #[test]
    fn bounded_budgets_do_not_reset_when_request_timestamps_step_back_a_round() {
        let mut n = node_with(1, &[2, 3, 4, 5], 100, Admission::Bounded);
        // Every peer is heard from: five replicas share the quota.
        for p in 2..=5 {
            let from = ReplicaId { node: p, incarnation: 1 };
            let hb = codec::encode(&Envelope::new(from, Body::Counts(Vec::new()))).unwrap();
            n.handle_message(p, &hb, T0).unwrap();
        }
        // Timestamps alternate between two rounds; the budget's round is the clock's.
        let admitted = (0..100).filter(|i| n.limiter().allow("c", T0 - 40 * (i % 2))).count();
        assert!((15..=25).contains(&admitted), "about a fifth of the quota, not all of it: {admitted}");
    }

    #[test]
    fn counts_for_a_window_length_this_node_has_no_store_for_are_dropped_not_stored() {
        let mut n = node(1, &[2]);
        let replica = ReplicaId { node: 2, incarnation: 1 };
        let entries = vec![WireEntry { key: [3; 8], window_offset: 0, count: 1 }];
        for w in 1..=100u32 {
            let batch = Batch { replica, window_ms: 1000 + w, base_window: T0 / i64::from(1000 + w), entries: entries.clone() };
            let bytes = codec::encode(&Envelope::new(replica, Body::Counts(vec![batch]))).unwrap();
            n.handle_message(2, &bytes, T0).unwrap();
        }
        assert_eq!(n.stats().out_of_range, 100);
        // The limiter's own allow_with still has every window length to itself.
        assert!(n.limiter().allow_with("c", 1, Duration::from_millis(2_000)));
    }
}
