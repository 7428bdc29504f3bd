//! Certificate generation for a cluster of gossiping nodes (development and
//! small deployments).
//!
//! Every node of a cluster holds a certificate issued by one cluster CA. The
//! node name is written both as the subject common name and as the (only) DNS
//! SubjectAltName; [`super::tls::peer_node_name`] reads it back from the
//! verified peer certificate, and the dialing side uses it as the TLS server
//! name.
//!
//! All keys are ECDSA P-256 (`PKCS_ECDSA_P256_SHA256`), serialized as PKCS#8
//! PEM (`-----BEGIN PRIVATE KEY-----`). Node certificates carry the extended
//! key usages `serverAuth` and `clientAuth`, because every node is both a QUIC
//! server and a QUIC client.
//!
//! Validity: the CA is valid for [`CA_VALIDITY_DAYS`] days and node
//! certificates for [`NODE_VALIDITY_DAYS`] days, both starting one day in the
//! past to tolerate clock skew between machines.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName};
use time::{Duration, OffsetDateTime};

/// Common name written into the CA certificate produced by [`generate_ca`].
pub const CA_COMMON_NAME: &str = "crdt-rate-limiter cluster CA";

/// Validity of a CA produced by [`generate_ca`], in days (10 years).
pub const CA_VALIDITY_DAYS: i64 = 3650;

/// Validity of a node certificate produced by [`issue`], in days (5 years).
pub const NODE_VALIDITY_DAYS: i64 = 1825;

/// Errors from certificate generation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The node name cannot be used as a DNS SubjectAltName / TLS server name.
    #[error("invalid node name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The CA certificate PEM holds no certificate or cannot be parsed.
    #[error("invalid CA certificate: {0}")]
    BadCaCert(String),
    /// The CA key PEM cannot be parsed.
    #[error("invalid CA private key: {0}")]
    BadCaKey(#[source] rcgen::Error),
    /// The CA private key does not belong to the CA certificate.
    #[error("the CA private key does not match the CA certificate")]
    CaKeyMismatch,
    /// Any other rcgen failure (key generation, signing, encoding).
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// Generates a new self-signed cluster CA (ECDSA P-256).
///
/// Returns `(ca_cert_pem, ca_key_pem)`. Keep `ca_key_pem` secret: whoever
/// holds it can mint node identities for the cluster.
pub fn generate_ca() -> Result<(String, String), CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    // The CA signs end-entity certificates only (no intermediates).
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issues a node certificate for `name`, signed by the given CA.
///
/// `name` becomes the subject CN and the only DNS SubjectAltName; it must be
/// a valid DNS name (e.g. `node-a` or `node-a.cluster.internal`), not an IP
/// address and not a wildcard. The CA key must belong to the CA certificate.
///
/// Returns `(cert_pem, key_pem)` where `cert_pem` holds only the node
/// certificate (the CA is distributed separately as `ca.pem`).
pub fn issue(ca_cert_pem: &str, ca_key_pem: &str, name: &str) -> Result<(String, String), CertError> {
    validate_node_name(name)?;

    let ca_der = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes()).map_err(|e| CertError::BadCaCert(e.to_string()))?;
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(CertError::BadCaKey)?;
    check_ca_key_matches(&ca_der, &ca_key)?;
    let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key).map_err(|e| CertError::BadCaCert(e.to_string()))?;

    let ia5 =
        name.to_string().try_into().map_err(|_| CertError::InvalidName { name: name.to_string(), reason: "not an IA5 (ASCII) string" })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::DnsName(ia5)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, NODE_VALIDITY_DAYS);

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Checks that `name` is usable as a node name: a syntactically valid DNS
/// name that is neither an IP address nor a wildcard.
pub fn validate_node_name(name: &str) -> Result<(), CertError> {
    let invalid = |reason| CertError::InvalidName { name: name.to_string(), reason };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err(invalid("IP addresses are not allowed, use a DNS-style name"));
    }
    if name.contains('*') {
        return Err(invalid("wildcards are not allowed"));
    }
    DnsName::try_from(name).map_err(|_| invalid("not a valid DNS name"))?;
    Ok(())
}

fn check_ca_key_matches(ca_der: &CertificateDer<'_>, ca_key: &KeyPair) -> Result<(), CertError> {
    let (_, x509) = x509_parser::parse_x509_certificate(ca_der.as_ref()).map_err(|e| CertError::BadCaCert(e.to_string()))?;
    if x509.tbs_certificate.subject_pki.raw != ca_key.subject_public_key_info().as_slice() {
        return Err(CertError::CaKeyMismatch);
    }
    Ok(())
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(days);
}
