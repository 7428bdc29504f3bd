//! Mutual-TLS configuration for the QUIC gossip transport.
//!
//! Hidden, not a stable API: [`TlsIdentity`] and [`TlsError`] are public through
//! `transport`; the quinn configuration builders here are public for the TLS tests.
//!
//! Every node of a cluster holds a [`TlsIdentity`]: the cluster CA
//! certificate, its own certificate chain and its private key (see
//! [`super::certs`] for generating them). From it we build
//!
//! * a [`quinn::ServerConfig`] ([`server_config`]) that **requires** a client
//!   certificate chaining to the cluster CA, and
//! * a [`quinn::ClientConfig`] ([`client_config`]) that trusts **only** the
//!   cluster CA (no system/web roots) and presents the node's own certificate;
//!   [`member_client_config`] is the same, but accepts a server certificate the
//!   cluster CA issued for *any* node name (the cluster driver dials seeds by
//!   address and learns who answered from the verified certificate).
//!
//! Both use TLS 1.3 only (QUIC requires it), the *ring* crypto provider passed
//! explicitly (the process-wide default provider is never consulted), ALPN
//! [`ALPN`] (`crl-gossip/1`), and have 0-RTT disabled, so no application data
//! is ever accepted before the peer's certificate has been verified.
//!
//! # Identity and naming
//!
//! A node's name is the (first) DNS SubjectAltName of its certificate. When
//! dialing a peer, pass the peer's node name as the `server_name` argument of
//! [`quinn::Endpoint::connect`]; rustls then checks that the server's
//! certificate was issued by the cluster CA *for that name*. The server side
//! cannot check names (the client's name is not known in advance); it accepts
//! any client certificate issued by the cluster CA, and the application learns
//! who connected with [`peer_node_name`].
//!
//! # Authorization: never trust a successful `connect()`
//!
//! With TLS 1.3 the client finishes its side of the handshake *before* the
//! server has verified the client certificate. A client whose certificate is
//! rejected (wrong CA, none at all) can therefore see
//! [`quinn::Connecting`] resolve successfully and even open streams and queue
//! data; the server then closes the connection with a TLS alert (typically
//! `CONNECTION_CLOSE` with a crypto error such as "bad certificate" or
//! "certificate required"), which the client observes shortly afterwards as
//! [`quinn::ConnectionError::ConnectionClosed`] /
//! [`quinn::ConnectionError::TransportError`]. The server application never
//! receives such a connection (its `Incoming`/`Connecting` future errors) and
//! never receives its data.
//!
//! Authorization must therefore be based on the **verified peer certificate**
//! on each side ([`peer_node_name`] on an established connection), never on
//! the mere fact that `connect()` or `accept()` returned.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

/// ALPN protocol identifier of the gossip protocol, version 1.
pub const ALPN: &[u8] = b"crl-gossip/1";

/// Errors while loading a [`TlsIdentity`] or building QUIC/TLS configs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file does not exist.
    #[error("{what} file not found: {}", path.display())]
    MissingFile {
        /// Which input ("CA certificate", "certificate", "private key").
        what: &'static str,
        /// The path that was tried.
        path: PathBuf,
    },
    /// A PEM file exists but could not be read.
    #[error("cannot read {what} file {}: {source}", path.display())]
    ReadFile {
        /// Which input.
        what: &'static str,
        /// The path that was tried.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// The input holds PEM data that is malformed (bad base64, unterminated
    /// section, ...).
    #[error("malformed PEM in {what}: {source}")]
    BadPem {
        /// Which input.
        what: &'static str,
        /// The PEM decoding error.
        #[source]
        source: pem::Error,
    },
    /// The input holds no `CERTIFICATE` PEM section.
    #[error("no certificate found in {what}")]
    NoCertificate {
        /// Which input ("CA certificate" or "certificate").
        what: &'static str,
    },
    /// The key input holds no private key PEM section (PKCS#8, PKCS#1 or SEC1).
    #[error("no private key found in private key input")]
    NoKey,
    /// The CA certificate cannot be used as a trust anchor.
    #[error("invalid CA certificate: {0}")]
    InvalidCa(#[source] rustls::Error),
    /// Building the client-certificate verifier failed.
    #[error("cannot build client certificate verifier: {0}")]
    Verifier(#[from] VerifierBuilderError),
    /// rustls rejected the configuration (e.g. key does not match the
    /// certificate, unsupported key type).
    #[error("TLS configuration error: {0}")]
    Rustls(#[from] rustls::Error),
    /// The crypto provider lacks the cipher suite QUIC needs for Initial
    /// packets (`TLS13_AES_128_GCM_SHA256`).
    #[error("QUIC/TLS configuration error: {0}")]
    Quic(#[from] NoInitialCipherSuite),
}

const WHAT_CA: &str = "CA certificate";
const WHAT_CERT: &str = "certificate";
const WHAT_KEY: &str = "private key";

/// A node's TLS identity: the cluster CA, the node's certificate chain and
/// its private key.
///
/// `Debug` output never contains the private key.
pub struct TlsIdentity {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl TlsIdentity {
    /// Loads an identity from three PEM files: the cluster CA certificate,
    /// the node certificate (optionally followed by intermediates) and the
    /// node private key (PKCS#8, PKCS#1 or SEC1).
    ///
    /// A nonexistent file yields [`TlsError::MissingFile`]; see
    /// [`TlsIdentity::from_pem`] for the content checks.
    pub fn from_pem_files(ca_path: impl AsRef<Path>, cert_path: impl AsRef<Path>, key_path: impl AsRef<Path>) -> Result<Self, TlsError> {
        let ca = read_file(WHAT_CA, ca_path.as_ref())?;
        let cert = read_file(WHAT_CERT, cert_path.as_ref())?;
        let key = read_file(WHAT_KEY, key_path.as_ref())?;
        Self::from_pem(&ca, &cert, &key)
    }

    /// Builds an identity from in-memory PEM data.
    ///
    /// * `ca`: the cluster CA certificate. If several certificates are
    ///   present, the first one is used.
    /// * `cert`: the node certificate first, then any intermediates.
    /// * `key`: the node private key; the first key found is used.
    ///
    /// Fails with [`TlsError::NoCertificate`] / [`TlsError::NoKey`] when a
    /// section is missing, [`TlsError::BadPem`] for malformed PEM and
    /// [`TlsError::InvalidCa`] when the CA certificate is not a usable trust
    /// anchor. Whether the key matches the certificate is checked when a
    /// config is built ([`server_config`], [`client_config`]).
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let mut cas = parse_certs(WHAT_CA, ca)?;
        if cas.len() > 1 {
            tracing::warn!(count = cas.len(), "CA PEM holds several certificates; only the first is trusted");
        }
        let ca = cas.swap_remove(0);
        // Fail early if the CA cannot be a trust anchor.
        root_store(&ca)?;
        let chain = parse_certs(WHAT_CERT, cert)?;
        let key = match PrivateKeyDer::from_pem_slice(key) {
            Ok(key) => key,
            Err(pem::Error::NoItemsFound) => return Err(TlsError::NoKey),
            Err(source) => return Err(TlsError::BadPem { what: WHAT_KEY, source }),
        };
        Ok(Self { ca, chain, key })
    }

    /// The cluster CA certificate (DER).
    pub fn ca(&self) -> &CertificateDer<'static> {
        &self.ca
    }

    /// The node's certificate chain (DER), end-entity certificate first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The node name of this identity: the first DNS SubjectAltName of the
    /// end-entity certificate, if any.
    pub fn node_name(&self) -> Option<String> {
        self.chain.first().and_then(node_name_from_cert)
    }
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self { ca: self.ca.clone(), chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("node_name", &self.node_name())
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The crypto provider used for every config built by this module: *ring*,
/// constructed explicitly (the process-default provider is never used).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A transport config suitable for gossip: datagrams enabled (1 MiB receive
/// and send buffers), 30 s idle timeout, 5 s keep-alive.
///
/// Wrap it in an [`Arc`] and pass it to [`server_config`] / [`client_config`].
pub fn default_transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.datagram_receive_buffer_size(Some(1 << 20)).datagram_send_buffer_size(1 << 20).keep_alive_interval(Some(Duration::from_secs(5)));
    // 30 s always fits in a VarInt; keep quinn's default if it somehow did not.
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(30)) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// Builds the QUIC server config of a node.
///
/// The server presents `id`'s chain, **requires** a client certificate that
/// chains to `id`'s CA (anonymous clients are refused), speaks TLS 1.3 only
/// with ALPN [`ALPN`], and does not accept 0-RTT data.
pub fn server_config(id: &TlsIdentity, transport: Arc<quinn::TransportConfig>) -> Result<quinn::ServerConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(&id.ca)?), provider.clone()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No 0-RTT: early data would reach us before the client cert is verified.
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(Arc::new(tls))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// Builds the QUIC client config of a node.
///
/// The client trusts only `id`'s CA, presents `id`'s chain as its client
/// certificate, speaks TLS 1.3 only with ALPN [`ALPN`], and never sends 0-RTT
/// data. Dial with the peer's node name as server name.
pub fn client_config(id: &TlsIdentity, transport: Arc<quinn::TransportConfig>) -> Result<quinn::ClientConfig, TlsError> {
    let provider = crypto_provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(&id.ca)?), provider.clone()).build()?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    finish_client(tls, transport)
}

/// Builds the QUIC client config the cluster driver dials with.
///
/// Like [`client_config`] (TLS 1.3 only, ring, ALPN [`ALPN`], no 0-RTT, the node's
/// chain as client certificate), except that the server certificate is checked against
/// the name it carries itself rather than a name given by the caller: any certificate
/// the cluster CA issued is accepted, which is exactly what the server side accepts of
/// clients. The caller learns who answered with [`peer_node_name`] and must check it
/// against the node it meant to reach, if it knew.
///
/// # Errors
/// [`TlsError`] when the CA cannot be a trust anchor or the key does not match the
/// certificate.
pub fn member_client_config(id: &TlsIdentity, transport: Arc<quinn::TransportConfig>) -> Result<quinn::ClientConfig, TlsError> {
    let provider = crypto_provider();
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(&id.ca)?), provider.clone()).build()?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MemberVerifier { inner }))
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?;
    finish_client(tls, transport)
}

/// The settings every client config shares: ALPN [`ALPN`], no 0-RTT, the transport.
fn finish_client(mut tls: rustls::ClientConfig, transport: Arc<quinn::TransportConfig>) -> Result<quinn::ClientConfig, TlsError> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let quic = QuicClientConfig::try_from(Arc::new(tls))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// Verifies a server certificate with webpki against the cluster CA, for the node name
/// written in the certificate itself (its first DNS SubjectAltName).
#[derive(Debug)]
struct MemberVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let not_a_member = || rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
        let name = node_name_from_cert(end_entity).ok_or_else(not_a_member)?;
        let name = ServerName::try_from(name).map_err(|_| not_a_member())?;
        self.inner.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The node name of the peer of an established connection, taken from its
/// **verified** certificate: the first DNS SubjectAltName of the end-entity
/// certificate.
///
/// Returns `None` if the peer presented no certificate (impossible with the
/// configs of this module once the connection is established) or the
/// certificate has no DNS SubjectAltName.
pub fn peer_node_name(conn: &quinn::Connection) -> Option<String> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().and_then(node_name_from_cert)
}

/// Extracts the first DNS SubjectAltName of a DER certificate.
///
/// This only parses; it does not verify anything. Use it on certificates that
/// were already verified (e.g. [`quinn::Connection::peer_identity`]).
pub fn node_name_from_cert(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = x509.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::DNSName(name) => Some((*name).to_string()),
        _ => None,
    })
}

fn root_store(ca: &CertificateDer<'static>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(TlsError::InvalidCa)?;
    Ok(roots)
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            TlsError::MissingFile { what, path: path.to_path_buf() }
        } else {
            TlsError::ReadFile { what, path: path.to_path_buf(), source }
        }
    })
}

fn parse_certs(what: &'static str, pem_data: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs =
        CertificateDer::pem_slice_iter(pem_data).collect::<Result<Vec<_>, _>>().map_err(|source| TlsError::BadPem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}
