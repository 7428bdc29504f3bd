//! Mutual TLS over real QUIC on 127.0.0.1, and loading identities and certificates.
//! (The building blocks of the cluster transport; `tests/cluster.rs` runs the cluster.)
#![cfg(feature = "quic")]

mod common;
use common::Ca;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crdt_rate_limiter::transport::certs::{self, CertError};
use crdt_rate_limiter::transport::tls::{self, peer_node_name, TlsError, TlsIdentity};
use quinn::Endpoint;

/// Upper bound for every test body.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);

fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(tls::default_transport_config())
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// An endpoint that is both server and client for `id`.
fn node_endpoint(id: &TlsIdentity) -> Endpoint {
    let mut ep = Endpoint::server(tls::server_config(id, transport()).unwrap(), localhost()).unwrap();
    ep.set_default_client_config(tls::client_config(id, transport()).unwrap());
    ep
}

fn client_endpoint(cfg: quinn::ClientConfig) -> Endpoint {
    let mut ep = Endpoint::client(localhost()).unwrap();
    ep.set_default_client_config(cfg);
    ep
}

/// `from` dials `to` (server name `to_name`), sends `msg` on a uni stream;
/// checks both sides see the other's node name and the bytes arrive.
async fn exchange(from: &Endpoint, from_name: &str, to: &Endpoint, to_name: &str, msg: &[u8]) {
    let to_addr = to.local_addr().unwrap();
    let server = {
        let to = to.clone();
        tokio::spawn(async move {
            let conn = to.accept().await.unwrap().await.unwrap();
            let peer = peer_node_name(&conn);
            let mut recv = conn.accept_uni().await.unwrap();
            let data = recv.read_to_end(64 * 1024).await.unwrap();
            (peer, data, conn)
        })
    };
    let conn = from.connect(to_addr, to_name).unwrap().await.unwrap();
    assert_eq!(peer_node_name(&conn).as_deref(), Some(to_name));
    let mut send = conn.open_uni().await.unwrap();
    send.write_all(msg).await.unwrap();
    send.finish().unwrap();
    let (peer, data, server_conn) = server.await.unwrap();
    assert_eq!(peer.as_deref(), Some(from_name));
    assert_eq!(data, msg);
    conn.close(0u32.into(), b"done");
    server_conn.closed().await;
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f).await.expect("test timed out")
}

#[tokio::test]
async fn same_ca_both_directions() {
    bounded(async {
        let ca = Ca::new();
        let id_a = ca.identity("node-a");
        let id_b = ca.identity("node-b");
        assert_eq!(id_a.node_name().as_deref(), Some("node-a"));
        let a = node_endpoint(&id_a);
        let b = node_endpoint(&id_b);

        exchange(&a, "node-a", &b, "node-b", b"hello from a").await;
        exchange(&b, "node-b", &a, "node-a", b"hello from b").await;
    })
    .await;
}

#[tokio::test]
async fn wrong_server_name_is_rejected_by_client() {
    bounded(async {
        let ca = Ca::new();
        let a = node_endpoint(&ca.identity("node-a"));
        let b = node_endpoint(&ca.identity("node-b"));
        let b_addr = b.local_addr().unwrap();
        tokio::spawn(async move {
            while let Some(inc) = b.accept().await {
                let _ = inc.await;
            }
        });
        // Valid cluster certificate, but issued to node-b, not node-c.
        let err = a.connect(b_addr, "node-c").unwrap().await.unwrap_err();
        eprintln!("wrong server name -> client error: {err}");
    })
    .await;
}

/// What the server application observed.
#[derive(Debug)]
enum ServerEvent {
    HandshakeFailed(String),
    Established(Option<String>),
    Data(Vec<u8>),
}

/// Runs an accept loop on `server`, recording every event.
fn record_server(server: Endpoint) -> Arc<Mutex<Vec<ServerEvent>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let ev = ev.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Err(e) => ev.lock().unwrap().push(ServerEvent::HandshakeFailed(e.to_string())),
                    Ok(conn) => {
                        ev.lock().unwrap().push(ServerEvent::Established(peer_node_name(&conn)));
                        while let Ok(mut r) = conn.accept_uni().await {
                            if let Ok(d) = r.read_to_end(64 * 1024).await {
                                ev.lock().unwrap().push(ServerEvent::Data(d));
                            }
                        }
                    }
                }
            });
        }
    });
    events
}

/// Dials `addr` as `client`, tries to send data, and waits until the client
/// sees the connection fail or close. Returns a description for the logs.
async fn refused_client(client: &Endpoint, addr: SocketAddr, server_name: &str) -> String {
    let start = Instant::now();
    match client.connect(addr, server_name).unwrap().await {
        Err(e) => format!("connect() failed after {:?}: {e}", start.elapsed()),
        Ok(conn) => {
            let connected = start.elapsed();
            // The handshake "succeeded" from the client's point of view; try
            // to push data. Errors here are fine.
            let send = async {
                let mut s = conn.open_uni().await?;
                s.write_all(b"should never arrive").await?;
                s.finish()?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            }
            .await;
            let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.expect("client never saw the connection close");
            format!(
                "connect() succeeded after {connected:?}; send result {send:?}; \
                 closed after {:?}: {reason}",
                start.elapsed()
            )
        }
    }
}

/// Waits for the server to record the failed handshake, then asserts that
/// nothing was established or delivered.
async fn assert_server_refused(events: &Arc<Mutex<Vec<ServerEvent>>>) {
    loop {
        if !events.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Give any (wrongly) delivered data a moment to show up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let events = events.lock().unwrap();
    for e in events.iter() {
        match e {
            ServerEvent::HandshakeFailed(err) => eprintln!("server: handshake failed: {err}"),
            ServerEvent::Established(peer) => {
                panic!("server application got an established connection from {peer:?}")
            }
            ServerEvent::Data(d) => panic!("server application received {} bytes", d.len()),
        }
    }
}

#[tokio::test]
async fn client_cert_from_other_ca_is_refused() {
    bounded(async {
        let ca = Ca::new();
        let rogue_ca = Ca::new();
        let server = node_endpoint(&ca.identity("node-a"));
        let addr = server.local_addr().unwrap();
        let events = record_server(server);

        // Trusts the real cluster CA (so the client accepts the server), but
        // presents a certificate issued by another CA.
        let (cert, key) = certs::issue(&rogue_ca.pem, &rogue_ca.key, "node-evil").unwrap();
        let rogue = TlsIdentity::from_pem(ca.pem.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap();
        let client = client_endpoint(tls::client_config(&rogue, transport()).unwrap());
        let outcome = refused_client(&client, addr, "node-a").await;
        eprintln!("foreign client cert: {outcome}");
        assert_server_refused(&events).await;
    })
    .await;
}

#[tokio::test]
async fn node_from_other_cluster_is_refused() {
    bounded(async {
        let ca = Ca::new();
        let other = Ca::new();
        let server = node_endpoint(&ca.identity("node-a"));
        let addr = server.local_addr().unwrap();
        let events = record_server(server);

        // Entirely foreign node: trusts its own CA only and presents its own
        // cert. The client rejects the server first.
        let client = node_endpoint(&other.identity("node-x"));
        let outcome = refused_client(&client, addr, "node-a").await;
        eprintln!("foreign cluster node: {outcome}");
        assert!(outcome.starts_with("connect() failed"), "{outcome}");
        assert_server_refused(&events).await;
    })
    .await;
}

#[tokio::test]
async fn client_without_cert_is_refused() {
    bounded(async {
        let ca = Ca::new();
        let id = ca.identity("node-a");
        let server = node_endpoint(&id);
        let addr = server.local_addr().unwrap();
        let events = record_server(server);

        let provider = tls::crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(id.ca().clone()).unwrap();
        let mut tls_cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls_cfg.alpn_protocols = vec![tls::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls_cfg)).unwrap();
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(transport());
        let client = client_endpoint(cfg);

        let outcome = refused_client(&client, addr, "node-a").await;
        eprintln!("no client cert: {outcome}");
        assert_server_refused(&events).await;
    })
    .await;
}

#[tokio::test]
async fn datagrams_round_trip_at_max_size() {
    bounded(async {
        let ca = Ca::new();
        let a = node_endpoint(&ca.identity("node-a"));
        let b = node_endpoint(&ca.identity("node-b"));
        let b_addr = b.local_addr().unwrap();

        let echo = tokio::spawn(async move {
            let conn = b.accept().await.unwrap().await.unwrap();
            let d = conn.read_datagram().await.unwrap();
            let max = conn.max_datagram_size().unwrap();
            assert!(d.len() <= max, "echo side max {max} < {}", d.len());
            conn.send_datagram(d).unwrap();
            // Keep the connection open until the peer closes it.
            conn.closed().await;
        });

        let conn = a.connect(b_addr, "node-b").unwrap().await.unwrap();
        let max = conn.max_datagram_size().expect("datagrams not enabled");
        eprintln!("max_datagram_size = {max}");
        assert!(max >= 1000, "suspiciously small max datagram size {max}");
        let payload: Bytes = (0..max).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
        conn.send_datagram(payload.clone()).unwrap();
        let back = conn.read_datagram().await.unwrap();
        assert_eq!(back, payload);
        conn.close(0u32.into(), b"done");
        echo.await.unwrap();
    })
    .await;
}

// ----- identities and certificates -----

#[test]
fn missing_file() {
    let dir = std::env::temp_dir().join(format!("crl-tls-missing-{}", std::process::id()));
    let err = TlsIdentity::from_pem_files(dir.join("ca.pem"), dir.join("a.pem"), dir.join("a.key")).unwrap_err();
    assert!(matches!(err, TlsError::MissingFile { what: "CA certificate", .. }), "{err}");
}

#[test]
fn pem_files_round_trip_and_errors() {
    let dir = std::env::temp_dir().join(format!("crl-tls-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, ca_key) = certs::generate_ca().unwrap();
    let (cert, key) = certs::issue(&ca, &ca_key, "node-a").unwrap();
    std::fs::write(dir.join("ca.pem"), &ca).unwrap();
    std::fs::write(dir.join("a.pem"), &cert).unwrap();
    std::fs::write(dir.join("a.key"), &key).unwrap();
    let id = TlsIdentity::from_pem_files(dir.join("ca.pem"), dir.join("a.pem"), dir.join("a.key")).unwrap();
    assert_eq!(id.node_name().as_deref(), Some("node-a"));
    assert!(!format!("{id:?}").contains("PRIVATE"));

    // Cert file where the key should be.
    let err = TlsIdentity::from_pem_files(dir.join("ca.pem"), dir.join("a.pem"), dir.join("a.pem")).unwrap_err();
    assert!(matches!(err, TlsError::NoKey), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn content_errors() {
    let (ca, ca_key) = certs::generate_ca().unwrap();
    let (cert, key) = certs::issue(&ca, &ca_key, "node-a").unwrap();

    let err = TlsIdentity::from_pem(b"garbage", cert.as_bytes(), key.as_bytes()).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { what: "CA certificate" }), "{err}");
    let err = TlsIdentity::from_pem(ca.as_bytes(), b"", key.as_bytes()).unwrap_err();
    assert!(matches!(err, TlsError::NoCertificate { what: "certificate" }), "{err}");
    let err = TlsIdentity::from_pem(ca.as_bytes(), cert.as_bytes(), b"").unwrap_err();
    assert!(matches!(err, TlsError::NoKey), "{err}");

    let bad = "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n";
    let err = TlsIdentity::from_pem(ca.as_bytes(), bad.as_bytes(), key.as_bytes()).unwrap_err();
    assert!(matches!(err, TlsError::BadPem { what: "certificate", .. }), "{err}");
    let unterminated = "-----BEGIN PRIVATE KEY-----\nAAAA\n";
    let err = TlsIdentity::from_pem(ca.as_bytes(), cert.as_bytes(), unterminated.as_bytes()).unwrap_err();
    assert!(matches!(err, TlsError::BadPem { what: "private key", .. }), "{err}");

    // Well-formed PEM, but not a certificate.
    let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    let err = TlsIdentity::from_pem(junk.as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap_err();
    assert!(matches!(err, TlsError::InvalidCa(_)), "{err}");
}

#[test]
fn key_not_matching_cert_is_rejected_when_building_configs() {
    let (ca, ca_key) = certs::generate_ca().unwrap();
    let (cert_a, _) = certs::issue(&ca, &ca_key, "node-a").unwrap();
    let (_, key_b) = certs::issue(&ca, &ca_key, "node-b").unwrap();
    let id = TlsIdentity::from_pem(ca.as_bytes(), cert_a.as_bytes(), key_b.as_bytes()).unwrap();
    let err = tls::server_config(&id, transport()).unwrap_err();
    assert!(matches!(err, TlsError::Rustls(_)), "{err}");
    let err = tls::client_config(&id, transport()).unwrap_err();
    assert!(matches!(err, TlsError::Rustls(_)), "{err}");
}

#[test]
fn issue_errors() {
    let (ca, ca_key) = certs::generate_ca().unwrap();
    let (_, other_key) = certs::generate_ca().unwrap();
    for name in ["", "10.0.0.1", "*.nodes", "bad name", "node_a!"] {
        let err = certs::issue(&ca, &ca_key, name).unwrap_err();
        assert!(matches!(err, CertError::InvalidName { .. }), "{name:?}: {err}");
    }
    let err = certs::issue(&ca, &other_key, "node-a").unwrap_err();
    assert!(matches!(err, CertError::CaKeyMismatch), "{err}");
    let err = certs::issue("nope", &ca_key, "node-a").unwrap_err();
    assert!(matches!(err, CertError::BadCaCert(_)), "{err}");
    let err = certs::issue(&ca, "nope", "node-a").unwrap_err();
    assert!(matches!(err, CertError::BadCaKey(_)), "{err}");
}

#[test]
fn issued_cert_has_expected_fields() {
    let (ca, ca_key) = certs::generate_ca().unwrap();
    let (cert, _) = certs::issue(&ca, &ca_key, "node-a.cluster").unwrap();
    let der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()
    };
    assert_eq!(tls::node_name_from_cert(&der).as_deref(), Some("node-a.cluster"));
    let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let cn = x.subject().iter_common_name().next().unwrap().as_str().unwrap();
    assert_eq!(cn, "node-a.cluster");
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert_eq!(x.public_key().algorithm.algorithm, x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY);
}
