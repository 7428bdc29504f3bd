// The README is the crate's documentation, and its examples are doctests. They are
// written to be pasted as they are into a program on the default features, so without
// `quic` (whose cluster example they hold) the crate is documented in one line instead.
#![cfg_attr(feature = "quic", doc = include_str!("../README.md"))]
#![cfg_attr(
    not(feature = "quic"),
    doc = "A global rate limiter with zero network hops per request (the README, the crate's documentation with the default `quic` feature)."
)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unreachable_pub)]
#![deny(clippy::undocumented_unsafe_blocks)]

// The crate root names what a user writes in a program (README, docs/*.md): the limiter,
// its quota and clock, its errors, the limits file, the gossip core and the cluster. Every
// constant and every advanced type lives in its module: `limits` (bounds and defaults),
// `gossip` (the core's bounds, peers, statistics), `codec` (the wire version and its
// errors), `counter` (the G-Counter and replica ids), `transport`, `middleware`, `metrics`.

mod admission;
mod algorithm;
mod clock;
mod cluster_time;
pub mod codec;
pub mod counter;
mod error;
pub mod gossip;
mod key;
mod limiter;
pub mod limits;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "tower")]
pub mod middleware;
mod quota;
mod replica;
mod slots;
mod store;
pub mod swim;
mod table;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod testing;
#[cfg(feature = "quic")]
pub mod transport;

pub use admission::Admission;
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{ConfigError, Error};
pub use gossip::{GossipConfig, GossipNode};
pub use limiter::{Builder, Decision, LimiterStats, RateLimiter};
pub use limits::LimitsConfig;
#[cfg(feature = "tower")]
pub use middleware::{KeyExtractor, RateLimitLayer};
pub use quota::{Quota, Strategy};
#[cfg(feature = "quic")]
pub use transport::{Cluster, ClusterConfig, ClusterError, TlsIdentity, TlsSource};
