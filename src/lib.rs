//! A global rate limiter with zero network hops per request.
//!
//! Every instance of a service embeds a [`RateLimiter`] and decides locally, in O(1),
//! from a grow-only per-node counter (a [`GCounter`]) kept per client per time window.
//! On its own it is a fast in-memory limiter; as a cluster member its counters are
//! replicated by gossip, at the price of a small, bounded over-admission.
//!
//! ```
//! use crdt_rate_limiter::RateLimiter;
//! use std::time::Duration;
//! let rl = RateLimiter::new(100, Duration::from_secs(60))?;
//! let now_ms = rl.now_ms();
//! assert!(rl.allow("client-42", now_ms));
//! let d = rl.check("client-42", now_ms)?;
//! assert_eq!((d.allowed, d.limit, d.remaining), (true, 100, 98));
//! # Ok::<(), crdt_rate_limiter::Error>(())
//! ```
//!
//! See `docs/design.md` for the design, the strategies' guarantees and the limits.
//!
//! With the cargo feature `tower`, the `middleware` module provides `RateLimitLayer`, a tower/axum
//! middleware that answers 429 with `Retry-After` and adds the IETF `RateLimit-Policy`
//! and `RateLimit` headers (`docs/middleware.md`).
//!
//! With the cargo feature `quic` (on by default), the [`transport`] module makes a limiter
//! a cluster member: gossip over QUIC with mutual TLS from a cluster CA,
//! `RateLimiter::builder().….cluster(config).start().await` (`docs/cluster.md`).
#![warn(missing_docs, unreachable_pub)]

mod algorithm;
mod clock;
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
mod store;
mod table;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
#[cfg(feature = "quic")]
pub mod transport;

pub use clock::{Clock, ManualClock, SystemClock};
pub use codec::{DecodeError, MAX_DECODE_BYTES, WIRE_VERSION};
pub use counter::{GCounter, ReplicaId};
pub use error::Error;
pub use gossip::{
    GossipConfig, GossipNode, GossipStats, MessageError, PeerId, PeerStats, StateEntry, Transmit, MAX_ANSWERS_PER_PERIOD,
    MAX_INCARNATIONS_PER_PEER, MAX_OUTBOX, MAX_RELAYED_PER_PEER, MAX_REPAIR_ENTRIES_PER_ROUND, MAX_REPLICAS,
};
pub use limiter::{
    Admission, Builder, Decision, LimiterStats, RateLimiter, DEFAULT_MAX_CLOCK_SKEW, DEFAULT_MAX_KEYS, DEFAULT_MAX_KEY_LEN,
    DEFAULT_MAX_TIMESTAMP_AGE, MAX_AD_HOC_WINDOWS, MAX_KEY_LEN_LIMIT,
};
pub use limits::{
    ClientOverride, LimitsConfig, LimitsError, LimitsVersion, QuotaSpec, Resolved, MAX_NAME_BYTES, MAX_OVERRIDES, MAX_TIERS, MAX_TIER_NAME,
};
#[cfg(feature = "tower")]
pub use middleware::{KeyExtractor, MissingKey, OnError, RateLimitLayer, RateLimitOutcome, RateLimitService};
pub use quota::{Quota, Strategy};
#[cfg(feature = "quic")]
pub use transport::{Cluster, ClusterBuilder, ClusterConfig, ClusterError, ClusterStats, Member, TlsIdentity, TlsSource};
