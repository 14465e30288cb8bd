//! `wss://` terminated by the gateway: the handshake with a private CA, a certificate
//! replaced on disk while connections stay up, a bad replacement that changes nothing, and
//! clients that cannot complete the handshake. Real TLS over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use messages::{Frame, FrameKind};
use servicekit::tls::{ReloadableCert, client_config, roots_from_file};
use testkit::NatsServer;
use testkit::tls::{ServerCert, TestCa};
use testkit::ws::{ConnectError, Received, TestClient, token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The DER of a PEM certificate, to compare with what a client was shown.
fn der(cert: &ServerCert) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(cert.cert_pem.as_bytes())
        .unwrap()
        .to_vec()
}

async fn heartbeat_answered(client: &mut TestClient) {
    client
        .send(&Frame::new(FrameKind::Heartbeat).with_msg_id(9))
        .await;
    match client.recv().await {
        Received::Frame(f) if f.kind == FrameKind::HeartbeatAck => {}
        other => panic!("expected a heartbeat ack, got {other:?}"),
    }
}

#[tokio::test]
async fn wss_handshakes_and_a_replaced_certificate_serves_new_clients_only() {
    let nats = NatsServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("gateway test CA");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let first = ca.server_cert();
    let (cert_file, key_file) = first.write(dir.path(), "gw");

    let mut cfg = config(&nats.url(), "gw-tls");
    cfg.tls = Some(ReloadableCert::load(&cert_file, &key_file).unwrap());
    cfg.tls_reload = Some(Duration::from_millis(100));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gw = ws_gateway::spawn(cfg, listener).unwrap();
    let addr = gw.addr();
    // No session resumption: a resumed session shows the certificate of the first one.
    let trust = {
        let mut config = client_config(roots_from_file(&ca_file).unwrap(), &[]).unwrap();
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    };

    // The endpoints are TLS only now: wait for readiness over a TLS client.
    let mut early = None;
    for _ in 0..200 {
        match TestClient::connect_tls(addr, &token("early", None, &[]), Arc::clone(&trust)).await {
            Ok(client) => {
                early = Some(client);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut early = early.expect("no TLS session within 10 s");
    assert_eq!(early.peer_certificate().unwrap(), der(&first));
    heartbeat_answered(&mut early).await;

    // Replace the files: new handshakes get the new certificate, the open session goes on.
    let second = ca.server_cert();
    second.write(dir.path(), "gw");
    let mut shown = Vec::new();
    for _ in 0..100 {
        let client = TestClient::connect_tls(addr, &token("late", None, &[]), Arc::clone(&trust))
            .await
            .unwrap();
        shown = client.peer_certificate().unwrap();
        if shown == der(&second) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(shown, der(&second), "the new certificate was never served");
    heartbeat_answered(&mut early).await;

    // A broken replacement (a key that is not the certificate's) changes nothing.
    let third = ca.server_cert();
    std::fs::write(&cert_file, &third.cert_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let client = TestClient::connect_tls(addr, &token("after-bad", None, &[]), Arc::clone(&trust))
        .await
        .unwrap();
    assert_eq!(client.peer_certificate().unwrap(), der(&second));
    heartbeat_answered(&mut early).await;

    // A client that does not trust the CA fails the handshake and gets no session.
    let stranger = TestCa::new("someone else");
    let stranger_file = stranger.write(&dir.path().join("other-ca.pem"));
    let distrust = Arc::new(client_config(roots_from_file(&stranger_file).unwrap(), &[]).unwrap());
    let refused = TestClient::connect_tls(addr, &token("stranger", None, &[]), distrust).await;
    assert!(
        matches!(refused, Err(ConnectError::Tls(_))),
        "{:?}",
        refused.err()
    );

    // Plain HTTP on the TLS port gets no answer but a closed connection, promptly.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a plaintext client was left hanging");
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));

    gw.shutdown().await.unwrap();
}

#[test]
fn a_certificate_that_does_not_load_is_a_start_up_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ca");
    let (cert, key) = ca.server_cert().write(dir.path(), "a");
    let (_, other_key) = ca.server_cert().write(dir.path(), "b");
    std::fs::write(dir.path().join("junk.pem"), "not a certificate").unwrap();
    assert!(ReloadableCert::load(&cert, &key).is_ok());
    assert!(ReloadableCert::load(&dir.path().join("junk.pem"), &key).is_err());
    assert!(
        ReloadableCert::load(&cert, &other_key).is_err(),
        "mismatched key"
    );
    assert!(ReloadableCert::load(&dir.path().join("missing.pem"), &key).is_err());
    // The command line refuses one of the pair without the other.
    let parsed = <ws_gateway::Args as clap::Parser>::try_parse_from([
        "ws-gateway",
        "--tls-cert",
        cert.to_str().unwrap(),
    ]);
    assert!(parsed.is_err());
}
