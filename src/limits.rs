//! Runtime limits: a default quota, named tiers and per-client overrides, loaded from
//! TOML or set through the API, and replicated as a versioned last-writer-wins register.
//!
//! ```toml
//! [default]
//! limit = 100
//! window_ms = 1000
//!
//! [tiers.gold]
//! limit = 1000
//! window_ms = 1000
//!
//! [clients]
//! "acme" = { tier = "gold" }
//! "noisy-neighbour" = { limit = 10, window_ms = 1000 }
//! ```
//!
//! A configuration is validated whole before it replaces the one in force; an invalid
//! one is refused with a [`LimitsError`] and changes nothing.
//!
//! This module also holds the limiter's documented bounds and defaults (key length,
//! keys tracked, timestamp tolerances, window lengths, configuration sizes), in one place.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{ConfigError, Quota};

// The limiter's own bounds: keys, timestamps, windows.

/// Default longest client id, in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 256;
/// Upper bound for [`Builder::max_key_len`](crate::Builder::max_key_len), in bytes.
pub const MAX_KEY_LEN_LIMIT: usize = 64 * 1024;
/// Default replay tolerance: how far behind the limiter's clock a timestamp may be.
///
/// Keys are kept until no acceptable timestamp can reach their windows, so a larger
/// tolerance keeps idle keys longer.
pub const DEFAULT_MAX_TIMESTAMP_AGE: Duration = Duration::from_secs(5);
/// Default clock-skew tolerance: how far ahead of the limiter's clock a timestamp may be.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(2);
/// Default cap on keys first counted locally (keys first counted by peers have a budget
/// as large of their own). At about 50 bytes per local key this is about 200 MiB; the
/// bound under any peer input is 2.87 GiB (`docs/design.md`, "Memory model").
pub const DEFAULT_MAX_KEYS: usize = 4 * 1024 * 1024;
/// How many distinct window lengths [`RateLimiter::allow_with`](crate::RateLimiter::allow_with) keeps counters for.
pub const MAX_AD_HOC_WINDOWS: usize = 64;

// The bounds of a limits configuration.

/// The most tiers a configuration may name.
pub const MAX_TIERS: usize = 1_024;
/// The most per-client overrides a configuration may hold.
pub const MAX_OVERRIDES: usize = 10_000;
/// The most bytes of client ids and tier names a configuration may hold, so that it
/// always fits one gossip message (see `MAX_DECODE_BYTES`).
pub const MAX_NAME_BYTES: usize = 256 * 1024;
/// The longest tier name, in bytes.
pub const MAX_TIER_NAME: usize = 64;

/// One quota as written in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    /// Requests per window.
    pub limit: u64,
    /// The window in milliseconds.
    pub window_ms: u64,
    /// Token bucket capacity (default: the limit).
    #[serde(default)]
    pub burst: Option<u64>,
}

impl QuotaSpec {
    /// The quota this spec describes.
    ///
    /// # Errors
    /// The [`Quota::new`] and [`Quota::with_burst`] errors.
    pub fn to_quota(&self) -> Result<Quota, ConfigError> {
        let q = Quota::new(self.limit, Duration::from_millis(self.window_ms))?;
        match self.burst {
            Some(b) => q.with_burst(b),
            None => Ok(q),
        }
    }

    /// The spec of `quota`.
    pub fn of(quota: &Quota) -> Self {
        let burst = (quota.burst() != quota.limit()).then_some(quota.burst());
        Self { limit: quota.limit(), window_ms: quota.window_ms(), burst }
    }
}

/// A client's override: a tier's name, or a quota of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientOverride {
    /// A tier from [`LimitsConfig::tiers`].
    #[serde(default)]
    pub tier: Option<String>,
    /// Requests per window (with `window_ms`, instead of a tier).
    #[serde(default)]
    pub limit: Option<u64>,
    /// The window in milliseconds.
    #[serde(default)]
    pub window_ms: Option<u64>,
    /// Token bucket capacity.
    #[serde(default)]
    pub burst: Option<u64>,
}

/// Every limit in force: the default quota, tiers and per-client overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// The quota of every client without an override.
    pub default: QuotaSpec,
    /// Named quotas clients can be assigned to.
    #[serde(default)]
    pub tiers: BTreeMap<String, QuotaSpec>,
    /// Overrides by client id.
    #[serde(default)]
    pub clients: BTreeMap<String, ClientOverride>,
}

/// Why a configuration was refused. The configuration in force stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitsError {
    /// Not valid TOML, or fields missing or unknown.
    #[error("invalid limits file: {0}")]
    Parse(String),
    /// A quota is out of range.
    #[error("{what}: {source}")]
    Quota {
        /// Which quota.
        what: String,
        /// Why.
        source: ConfigError,
    },
    /// A client names a tier that does not exist.
    #[error("client {client:?} names unknown tier {tier:?}")]
    UnknownTier {
        /// The client.
        client: String,
        /// The tier.
        tier: String,
    },
    /// An override is neither a tier nor a complete quota.
    #[error("client {0:?}: give either `tier` or `limit` and `window_ms`")]
    IncompleteOverride(String),
    /// Too many tiers or overrides, or a name too long or empty.
    #[error("limits out of bounds: {0}")]
    TooLarge(&'static str),
    /// The configuration could not be written as TOML.
    #[error("cannot write the limits as TOML: {0}")]
    Write(String),
    /// A newer configuration (from another node) is already in force.
    #[error("a newer limits configuration is already in force")]
    Superseded,
}

impl LimitsConfig {
    /// A configuration with only a default quota.
    pub fn new(default: Quota) -> Self {
        Self { default: QuotaSpec::of(&default), tiers: BTreeMap::new(), clients: BTreeMap::new() }
    }

    /// Parses and validates a TOML document.
    ///
    /// # Errors
    /// [`LimitsError`] describing the first problem found.
    pub fn from_toml(text: &str) -> Result<Self, LimitsError> {
        let cfg: Self = toml::from_str(text).map_err(|e| LimitsError::Parse(e.to_string()))?;
        cfg.resolve()?;
        Ok(cfg)
    }

    /// The configuration as TOML.
    ///
    /// # Errors
    /// [`LimitsError::Write`] if the serializer refuses it.
    pub fn to_toml(&self) -> Result<String, LimitsError> {
        toml::to_string(self).map_err(|e| LimitsError::Write(e.to_string()))
    }

    /// Checks every quota and reference; returns the default quota and each client's.
    ///
    /// # Errors
    /// [`LimitsError`] describing the first problem found.
    pub fn resolve(&self) -> Result<Resolved<'_>, LimitsError> {
        if self.tiers.len() > MAX_TIERS {
            return Err(LimitsError::TooLarge("more than MAX_TIERS tiers"));
        }
        if self.clients.len() > MAX_OVERRIDES {
            return Err(LimitsError::TooLarge("more than MAX_OVERRIDES client overrides"));
        }
        let names: usize = self.tiers.keys().map(String::len).sum::<usize>()
            + self.clients.iter().map(|(c, o)| c.len() + o.tier.as_ref().map_or(0, String::len)).sum::<usize>();
        if names > MAX_NAME_BYTES {
            return Err(LimitsError::TooLarge("more than MAX_NAME_BYTES of names"));
        }
        let quota = |what: String, spec: &QuotaSpec| spec.to_quota().map_err(|source| LimitsError::Quota { what, source });
        let default = quota("default".into(), &self.default)?;
        let mut tiers = BTreeMap::new();
        for (name, spec) in &self.tiers {
            if name.is_empty() || name.len() > MAX_TIER_NAME {
                return Err(LimitsError::TooLarge("tier names are 1 to 64 bytes"));
            }
            tiers.insert(name.as_str(), quota(format!("tier {name:?}"), spec)?);
        }
        let mut clients = Vec::with_capacity(self.clients.len());
        for (client, o) in &self.clients {
            if client.is_empty() || client.len() > MAX_KEY_LEN_LIMIT {
                return Err(LimitsError::TooLarge("client ids are 1 to 65536 bytes"));
            }
            let q = match (&o.tier, o.limit, o.window_ms) {
                (Some(t), None, None) if o.burst.is_none() => {
                    *tiers.get(t.as_str()).ok_or_else(|| LimitsError::UnknownTier { client: client.clone(), tier: t.clone() })?
                }
                (None, Some(limit), Some(window_ms)) => {
                    quota(format!("client {client:?}"), &QuotaSpec { limit, window_ms, burst: o.burst })?
                }
                _ => return Err(LimitsError::IncompleteOverride(client.clone())),
            };
            clients.push((client.as_str(), q));
        }
        // Every window length other than the default's needs a store of its own.
        let windows: std::collections::BTreeSet<u64> = clients
            .iter()
            .map(|(_, q)| q.window_ms())
            .chain(tiers.values().map(Quota::window_ms))
            .filter(|&w| w != default.window_ms())
            .collect();
        if windows.len() > MAX_AD_HOC_WINDOWS {
            return Err(LimitsError::TooLarge("more distinct window lengths than MAX_AD_HOC_WINDOWS"));
        }
        Ok((default, clients))
    }
}

/// A validated configuration: the default quota and each overridden client's quota.
pub type Resolved<'a> = (Quota, Vec<(&'a str, Quota)>);

/// Orders configurations cluster-wide: the later change wins; ties go to the higher
/// node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct LimitsVersion {
    /// Unix ms of the change (at least one more than the version it replaced).
    pub at_ms: u64,
    /// The node that made it.
    pub node: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
[default]
limit = 100
window_ms = 1000

[tiers.gold]
limit = 1000
window_ms = 1000

[clients]
"acme" = { tier = "gold" }
"noisy" = { limit = 10, window_ms = 60000 }
"#;

    #[test]
    fn a_valid_file_resolves_every_client_and_round_trips() {
        let cfg = LimitsConfig::from_toml(TOML).unwrap();
        let (default, clients) = cfg.resolve().unwrap();
        assert_eq!(default.limit(), 100);
        assert_eq!(
            clients.iter().map(|(c, q)| (*c, q.limit(), q.window_ms())).collect::<Vec<_>>(),
            vec![("acme", 1000, 1000), ("noisy", 10, 60_000)]
        );
        assert_eq!(LimitsConfig::from_toml(&cfg.to_toml().unwrap()).unwrap(), cfg);
    }

    #[test]
    fn invalid_files_are_refused_with_the_reason() {
        let bad = |text: &str| LimitsConfig::from_toml(text).unwrap_err().to_string();
        assert!(bad("[default]\nlimit = 0\nwindow_ms = 1000").contains("limit must be at least 1"));
        assert!(bad("[default]\nlimit = 1").contains("window_ms"));
        assert!(bad("[default]\nlimit = 1\nwindow_ms = 1000\nsurprise = 1").contains("surprise"));
        assert!(bad(&TOML.replace("tier = \"gold\"", "tier = \"silver\"")).contains("unknown tier \"silver\""));
        assert!(bad(&TOML.replace("limit = 10, window_ms = 60000", "limit = 10")).contains("either `tier`"));
        assert!(bad("not toml at all [").contains("invalid limits file"));
    }

    #[test]
    fn a_config_needing_more_window_stores_than_there_are_is_refused() {
        let mut cfg = LimitsConfig::new(Quota::new(10, Duration::from_secs(1)).unwrap());
        for w in 0..=MAX_AD_HOC_WINDOWS as u64 {
            let spec = ClientOverride { tier: None, limit: Some(5), window_ms: Some(2_000 + w), burst: None };
            cfg.clients.insert(format!("client-{w}"), spec);
        }
        assert!(matches!(cfg.resolve(), Err(LimitsError::TooLarge(_))));
        cfg.clients.pop_first();
        assert!(cfg.resolve().is_ok());
    }
}
