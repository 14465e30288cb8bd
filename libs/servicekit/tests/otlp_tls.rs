#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The OTLP exporter against an `https` collector: a real OTLP receiver behind a
//! TLS-terminating proxy whose certificate a test CA signed. With the CA given as
//! `OTEL_EXPORTER_OTLP_CERTIFICATE` (here the equivalent field), spans arrive over TLS.
//! Only one test per binary may install the global subscriber; the other test here fails
//! before installing anything.

use std::path::PathBuf;
use std::time::Duration;

use servicekit::telemetry::{LogFormat, MessageSpan, Operation, TelemetryArgs, TelemetryError};
use testkit::otlp::Receiver;
use testkit::tls::{TestCa, TlsProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_https_collector_signed_by_the_configured_ca() {
    let receiver = Receiver::start().await.unwrap();
    let upstream = receiver
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("otlp-test-ca");
    let ca_file = ca.write(&dir.path().join("ca.pem"));
    let proxy = TlsProxy::start(&ca.server_cert(), upstream).await.unwrap();
    let args = TelemetryArgs {
        otlp_endpoint: Some(format!("https://localhost:{}", proxy.addr().port())),
        otlp_certificate: Some(ca_file),
        service_name: Some("otlp-tls-test".into()),
        ..TelemetryArgs::default()
    };
    let telemetry = servicekit::telemetry::init("otlp-tls-test", LogFormat::Text, &args).unwrap();
    assert!(telemetry.exporting());
    drop(MessageSpan::start(
        Operation::Publish,
        "ws.user.alice",
        7,
        None,
    ));
    // Dropping the guard flushes (a blocking call: off the async threads).
    tokio::task::spawn_blocking(move || drop(telemetry))
        .await
        .unwrap();
    let spans = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            spans.iter().any(|s| s.service == "otlp-tls-test")
        })
        .await;
    let span = spans
        .iter()
        .find(|s| s.service == "otlp-tls-test")
        .unwrap_or_else(|| panic!("no span arrived over TLS: {spans:?}"));
    assert_eq!(span.name, "publish ws.user");
    assert!(proxy.handshakes() >= 1);
}

#[test]
fn an_unreadable_collector_ca_file_is_a_configuration_error() {
    let args = TelemetryArgs {
        otlp_endpoint: Some("https://collector.example:4318".into()),
        otlp_certificate: Some(PathBuf::from("/nonexistent/otlp-ca.pem")),
        ..TelemetryArgs::default()
    };
    let err = servicekit::telemetry::init("otlp-tls-test", LogFormat::Text, &args).unwrap_err();
    assert!(matches!(err, TelemetryError::Tls(_)), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/otlp-ca.pem"),
        "{err}"
    );
}
