//! The QUIC transport's building blocks, behind the `quic` feature (on by default):
//! [`tls`] loads a node's identity from PEM and builds quinn configs that require
//! certificates from the cluster CA; [`certs`] generates the CA and node certificates.

pub mod certs;
pub mod tls;

pub use tls::{TlsError, TlsIdentity};
