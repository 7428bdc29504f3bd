//! The errors a caller matches on, by when they happen:
//!
//! * [`ConfigError`]: building a quota, a limiter, a gossip core or a layer was refused;
//! * [`Error`]: one request could not be decided (the request path);
//! * wire errors: a peer's message was refused ([`DecodeError`](crate::codec::DecodeError),
//!   [`MessageError`](crate::gossip::MessageError)) or one of ours could not be encoded
//!   ([`EncodeError`](crate::codec::EncodeError)).
//!
//! The limits file ([`LimitsError`](crate::limits::LimitsError)) and the cluster
//! (`transport::ClusterError`, with the `quic` feature) have configuration errors of
//! their own, which carry a [`ConfigError`] where a quota or a setting is the cause.

use std::time::Duration;

/// Why a request could not be decided.
///
/// Every invalid input maps to one of these variants; the library never panics on
/// bad input. [`RateLimiter::allow`](crate::RateLimiter::allow) turns every error into
/// `false` (fail closed); [`RateLimiter::check`](crate::RateLimiter::check) returns it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client id was empty.
    #[error("client id is empty")]
    EmptyKey,
    /// The client id was longer than the configured maximum.
    #[error("client id is {len} bytes long; the maximum is {max} bytes")]
    KeyTooLong {
        /// Length of the rejected id in bytes.
        len: usize,
        /// The configured maximum ([`Builder::max_key_len`](crate::Builder::max_key_len)).
        max: usize,
    },
    /// The request's timestamp is older than the replay tolerance allows.
    #[error("timestamp {timestamp_ms} ms is {} ms older than now ({now_ms} ms); at most {max_age_ms} ms is accepted", now_ms.saturating_sub(*timestamp_ms))]
    TimestampTooOld {
        /// The rejected timestamp (Unix ms).
        timestamp_ms: i64,
        /// The limiter clock's reading when it was rejected (Unix ms).
        now_ms: i64,
        /// The configured tolerance ([`Builder::max_timestamp_age`](crate::Builder::max_timestamp_age)).
        max_age_ms: u64,
    },
    /// The request's timestamp is further in the future than the clock-skew tolerance allows.
    #[error("timestamp {timestamp_ms} ms is {} ms ahead of now ({now_ms} ms); at most {max_skew_ms} ms is accepted", timestamp_ms.saturating_sub(*now_ms))]
    TimestampInFuture {
        /// The rejected timestamp (Unix ms).
        timestamp_ms: i64,
        /// The limiter clock's reading when it was rejected (Unix ms).
        now_ms: i64,
        /// The configured tolerance ([`Builder::max_clock_skew`](crate::Builder::max_clock_skew)).
        max_skew_ms: u64,
    },
    /// The limiter tracks as many keys as it may; a new key cannot be admitted.
    ///
    /// Keys already tracked keep being limited normally; expired keys are reclaimed
    /// to make room.
    #[error("the limiter already tracks its maximum of {max} keys")]
    KeyCapacity {
        /// The configured maximum ([`Builder::max_keys`](crate::Builder::max_keys)).
        max: usize,
    },
    /// [`RateLimiter::allow_with`](crate::RateLimiter::allow_with) was called with more
    /// distinct window lengths than the limiter keeps counters for.
    #[error("at most {max} distinct window lengths can be used with allow_with")]
    TooManyWindows {
        /// [`MAX_AD_HOC_WINDOWS`](crate::limits::MAX_AD_HOC_WINDOWS).
        max: usize,
    },
    /// [`RateLimiter::check_with`](crate::RateLimiter::check_with) was given a limit or a
    /// window out of range.
    #[error("invalid quota: {0}")]
    InvalidQuota(#[source] ConfigError),
}

/// Why a configuration was refused: a quota, a [`Builder`](crate::Builder) setting, a
/// [`GossipConfig`](crate::GossipConfig), a layer setting. Nothing was built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A quota's limit was zero.
    #[error("the limit must be at least 1")]
    ZeroLimit,
    /// A quota's window was shorter than one millisecond.
    #[error("the window must be at least 1 ms")]
    ZeroWindow,
    /// A quota's limit was larger than the counters hold.
    #[error("the limit {limit} is larger than the maximum {max}")]
    LimitTooLarge {
        /// The rejected limit.
        limit: u64,
        /// [`Quota::MAX_LIMIT`](crate::Quota::MAX_LIMIT).
        max: u64,
    },
    /// A quota's window was longer than the maximum, or not a whole number of milliseconds.
    #[error("the window {window:?} is not a whole number of milliseconds between 1 ms and {max:?}")]
    InvalidWindow {
        /// The rejected window.
        window: Duration,
        /// [`Quota::MAX_WINDOW`](crate::Quota::MAX_WINDOW).
        max: Duration,
    },
    /// The builder was given no quota.
    #[error("the builder needs a quota")]
    MissingQuota,
    /// A setting was out of its documented range, or refused in this state.
    #[error("invalid configuration for {field}: {reason}")]
    Invalid {
        /// The configuration field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}
