#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub)]

mod admission;
mod algorithm;
mod clock;
mod cluster_time;
mod codec;
mod counter;
mod error;
mod gossip;
mod key;
mod limiter;
mod limits;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "tower")]
pub mod middleware;
mod quota;
mod replica;
mod store;
mod table;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
#[cfg(feature = "quic")]
pub mod transport;

pub use admission::Admission;
pub use clock::{Clock, ManualClock, SystemClock};
pub use codec::{DecodeError, MAX_DECODE_BYTES, WIRE_VERSION};
pub use counter::{GCounter, ReplicaId};
pub use error::Error;
pub use gossip::{
    Event, GossipConfig, GossipNode, GossipStats, MessageError, PeerId, PeerStats, Refusal as GossipRefusal, StateEntry, Transmit,
    MAX_ANSWERS_PER_PERIOD, MAX_EVENTS, MAX_INCARNATIONS_PER_PEER, MAX_OUTBOX, MAX_RELAYED_PER_PEER, MAX_REPAIR_ENTRIES_PER_ROUND,
    MAX_REPLICAS,
};
pub use limiter::{
    Builder, Decision, LimiterStats, RateLimiter, DEFAULT_MAX_CLOCK_SKEW, DEFAULT_MAX_KEYS, DEFAULT_MAX_KEY_LEN, DEFAULT_MAX_TIMESTAMP_AGE,
    MAX_AD_HOC_WINDOWS, MAX_KEY_LEN_LIMIT,
};
pub use limits::{
    ClientOverride, LimitsConfig, LimitsError, LimitsVersion, QuotaSpec, Resolved, MAX_NAME_BYTES, MAX_OVERRIDES, MAX_TIERS, MAX_TIER_NAME,
};
#[cfg(feature = "tower")]
pub use middleware::{KeyExtractor, MissingKey, OnError, RateLimitLayer, RateLimitOutcome, RateLimitService};
pub use quota::{Quota, Strategy};
#[cfg(feature = "quic")]
pub use transport::{
    Cluster, ClusterBuilder, ClusterConfig, ClusterError, ClusterStats, Member, Refusal, RefusalReason, TlsIdentity, TlsSource,
};
