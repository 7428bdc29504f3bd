//! Helpers shared by the integration tests that need certificates (`mod common;`).

use crdt_rate_limiter::transport::{certs, TlsIdentity};

/// A cluster CA made for one test, and the identities it issues.
pub struct Ca {
    pub pem: String,
    pub key: String,
}

impl Ca {
    pub fn new() -> Self {
        let (pem, key) = certs::generate_ca().unwrap();
        Ca { pem, key }
    }

    pub fn identity(&self, name: &str) -> TlsIdentity {
        let (cert, key) = certs::issue(&self.pem, &self.key, name).unwrap();
        TlsIdentity::from_pem(self.pem.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
    }
}
