//! A service's NATS client says in its log, by name and at warn level, when it loses its
//! server and when it is back: a node loss during a fault run left no trace in the logs of
//! services running at `RUST_LOG=warn`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use testkit::NatsServer;

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn wait_for(logs: &Mutex<Vec<u8>>, text: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let all = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        let found = all
            .lines()
            .filter(|l| l.contains(text) && l.contains("client=events-test"))
            .count();
        if found >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer than {n} lines with {text:?}; log:\n{all}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_server_and_getting_it_back_are_logged() {
    let logs = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&logs);
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_env_filter("servicekit=info")
        .with_writer(move || Capture(Arc::clone(&sink)))
        .init();
    let mut nats = NatsServer::start().unwrap();
    let client = servicekit::nats::connect(&nats.url(), "events-test")
        .await
        .unwrap();
    wait_for(&logs, "NATS connected.", 1).await;
    nats.kill();
    wait_for(&logs, "NATS connection lost; reconnecting.", 1).await;
    nats.restart().unwrap();
    wait_for(&logs, "NATS connected.", 2).await;
    client.flush().await.unwrap();
}
